"""The rebalance demonstration, end to end: real backends, a real balancer, real clients.

Each real run is a short seeded ``python -m goaway_ext demo`` in a subprocess
(3 backends, 30 clients, a rolling restart, then a few seconds of load), once
with the built-in proxy and once with HAProxy. A high chance (0.2) stands in
for minutes of chance 0.01: it makes each connection live a fraction of a
second, so a few seconds are enough to rebalance and to average out the noise
of 30 clients (the model below says the final ratio stays under 1.4 for 100
seeds out of 100). The model (``--simulate``) is checked against the very
same recorded runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from goaway_ext.__main__ import main
from goaway_ext.demo import PolicySpec
from goaway_ext.demo.haproxy import find_haproxy, render_config
from goaway_ext.demo.report import RunResult
from goaway_ext.demo.simulate import (
    COUNT_TOLERANCE,
    SHARE_TOLERANCE,
    SimulationParameters,
    compare_with_run,
    rolling_restart_plan,
    simulate,
)

_SHORT_RUN = [
    "--backends", "3", "--clients", "30", "--rate", "20", "--chance", "0.2",
    "--warmup", "1", "--duration", "5", "--window", "3", "--seed", "7",
]
_RUN_TIMEOUT = 90


def _processes_tagged(tag: str) -> list[int]:
    """Pids whose environment carries ``tag``: the demo and everything it started."""
    found = []
    needle = f"GOAWAY_DEMO_TEST_TAG={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, just not yet reaped by its parent


def _run_demo(tmp_path: Path, lb: str) -> tuple[dict[str, Any], str, str]:
    tag = uuid.uuid4().hex
    out = tmp_path / f"demo-{lb}.json"
    env = dict(os.environ, GOAWAY_DEMO_TEST_TAG=tag)
    proc = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "demo", *_SHORT_RUN, "--lb", lb, "--json", str(out)],
        capture_output=True, text=True, timeout=_RUN_TIMEOUT, env=env,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    # Nothing the demo started may survive it.
    leftovers = [pid for pid in _processes_tagged(tag) if _pid_alive(pid)]
    assert leftovers == [], f"processes left running: {leftovers}"
    document = json.loads(out.read_text())
    assert all(not _pid_alive(pid) for pid in document["child_pids"])
    return document, proc.stdout, proc.stderr


def _check_rebalance(document: dict[str, Any]) -> None:
    policies = {entry["policy"]: entry for entry in document["policies"]}
    assert set(policies) == {"none", "chance=0.2"}
    none, chance = policies["none"]["summary"], policies["chance=0.2"]["summary"]
    # Without GOAWAY the backend restarted last gets (almost) nothing, for good.
    assert none["shares"]["b3"] < 0.05, none
    assert none["goaways_sent"] == 0
    # With GOAWAY the load is spread again.
    assert chance["ratio"] is not None and chance["ratio"] < 1.5, chance
    assert chance["goaways_sent"] > 100
    for summary in (none, chance):
        assert summary["failed_requests"] == 0, policies
        assert summary["watches_interrupted"] == 0, policies
        assert summary["requests"] >= 300  # 10 per client in the run (configured: 20/s each); speed is for benches
        assert summary["watches_opened"] >= 30
    # One connection per client to begin with, more after every restart and GOAWAY.
    assert none["connections_opened"] >= 30 + 20
    assert chance["connections_opened"] >= chance["goaways_sent"]


def _check_model_agrees(document: dict[str, Any]) -> None:
    """The model, on each run's own restart schedule, within the documented tolerances."""
    parameters = document["parameters"]
    for entry in document["policies"]:
        run = RunResult.from_json(entry)
        spec = PolicySpec.from_options(run.policy, run.options)
        agreement = compare_with_run(run, spec.policy, clients=parameters["clients"], rate=parameters["rate"])
        assert agreement.within, agreement


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    """One short real run through the built-in proxy, shared by the checks below."""
    return _run_demo(tmp_path_factory.mktemp("builtin"), "builtin")


def test_builtin_balancer_rebalances_only_with_goaway(builtin_run: tuple[dict[str, Any], str, str]) -> None:
    document, stdout, stderr = builtin_run
    _check_rebalance(document)
    assert "max/min" in stdout and "chance=0.2" in stdout
    # Progress went to stderr: bar, time and b3's share (the first update always prints).
    assert re.search(r"\[[#.]+\]\s+[\d.]+/\d+ s .*\bb3\s+[\d.]+%", stderr), stderr[-2000:]
    # The progress total is known at the start and never changes during a policy's run.
    totals: dict[str, set[str]] = {}
    for line in stderr.splitlines():
        found = re.match(r"(\S+)\s+\[[#.]+\]\s+[\d.]+/(\d+) s", line)
        if found:
            totals.setdefault(found.group(1), set()).add(found.group(2))
    assert set(totals) == {"none", "chance=0.2"}, stderr
    assert all(len(seen) == 1 for seen in totals.values()), totals


def test_model_agrees_with_builtin_run(builtin_run: tuple[dict[str, Any], str, str]) -> None:
    _check_model_agrees(builtin_run[0])


@pytest.mark.skipif(find_haproxy() is None, reason="HAProxy is not installed (make test installs it as root)")
def test_haproxy_rebalances_only_with_goaway(tmp_path: Path) -> None:
    document, _, _ = _run_demo(tmp_path, "haproxy")
    assert all(entry["lb"] == "haproxy" for entry in document["policies"])
    _check_rebalance(document)
    _check_model_agrees(document)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_every_process(signum: int) -> None:
    tag = uuid.uuid4().hex
    env = dict(os.environ, GOAWAY_DEMO_TEST_TAG=tag)
    proc = subprocess.Popen(
        [sys.executable, "-m", "goaway_ext", "demo", "--clients", "5", "--rate", "5", "--warmup", "30",
         "--duration", "30", "--lb", "haproxy" if find_haproxy() else "builtin"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # A shell may start us with SIGINT ignored; the demo must see Ctrl-C as a user would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 20
        # Wait until the backends and the balancer run (demo + 3 backends + maybe haproxy).
        while time.monotonic() < deadline and len(_processes_tagged(tag)) < 4:
            time.sleep(0.1)
        time.sleep(1.0)
        assert len(_processes_tagged(tag)) >= 4
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports
    assert "interrupted" in stderr
    assert [pid for pid in _processes_tagged(tag) if _pid_alive(pid)] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clients", "0"], "--clients must be an integer from 1"),
        (["--clients", "many"], "--clients must be an integer"),
        (["--backends", "1"], "--backends must be an integer from 2"),
        (["--rate", "0"], "--rate must be a number greater than 0"),
        (["--rate", "nan"], "--rate must be a number"),
        (["--duration", "-3"], "--duration must be a number from 1"),
        (["--chance", "0"], "--chance values must be in (0, 1]"),
        (["--chance", "x"], "--chance must be a probability"),
        (["--lb", "nginx"], "--lb: invalid choice"),
        (["--seed", "-1"], "--seed must be an integer from 0"),
        (["--max-age", "0"], "--max-age must be a number greater than 0"),
        (["--window", "30"], "--window (30 s) must not be longer than --duration"),
        (["--clients", "1000"], "--clients must be from 1 to 500 for a real run"),
        (["--json", "/nonexistent-dir/x.json"], "--json: directory"),
        (["--compare", "x.json"], "--compare needs --simulate"),
        (["--simulate", "--lb", "haproxy"], "--lb has no meaning with --simulate"),
    ],
)
def test_bad_values_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = main(["demo", *argv])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    stderr = capsys.readouterr().err
    assert message in stderr, stderr


def test_simulate_command_prints_the_model_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "demo", "--simulate", "--clients", "2000", "--backends", "10",
         "--duration", "200", "--window", "30", "--warmup", "10", "--chance", "0.02"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chance=0.02" in proc.stdout and "per client/h" in proc.stdout


def test_model_without_goaway_starves_the_last_backend() -> None:
    params = SimulationParameters(backends=5, clients=500, rate=2.0, duration=60.0, window=10.0)
    plan = rolling_restart_plan(5, start=5.0, downtime=1.5, gap=0.5)
    none = simulate(params, PolicySpec("none").policy(1), "none", plan).summary()
    assert none.shares["b5"] == 0.0
    assert none.goaways_sent == 0
    # Every client reconnects once per restart of its backend, and never otherwise.
    assert 500 < none.connections_opened <= 500 * 5


def test_model_rebalances_at_the_expected_speed() -> None:
    """Time to rebalance is about 2 / (chance x rate): the rule of thumb docs/simulation.md gives."""
    params = SimulationParameters(backends=4, clients=4000, rate=2.0, duration=120.0, window=10.0)
    plan = rolling_restart_plan(4, start=5.0, downtime=1.5, gap=0.5)
    result = simulate(params, PolicySpec("c", chance=0.02).policy(3), "c", plan)
    summary = result.summary()
    settle = summary.rebalanced_after
    assert settle is not None and 0.5 * 2 / (0.02 * 2) <= settle <= 2.0 * 2 / (0.02 * 2), settle
    # Bernoulli draws: the number of drains is chance x requests, within 5 sigma.
    expected = 0.02 * result.requests
    assert abs((result.goaways_sent or 0) - expected) < 5 * expected**0.5


def test_model_same_seed_same_result() -> None:
    params = SimulationParameters(backends=3, clients=50, rate=5.0, duration=20.0, window=5.0, seed=4)
    plan = rolling_restart_plan(3, start=2.0, downtime=1.0, gap=0.5)
    first = simulate(params, PolicySpec("c", chance=0.05).policy(9), "c", plan)
    second = simulate(params, PolicySpec("c", chance=0.05).policy(9), "c", plan)
    assert first.counts == second.counts and first.goaways_sent == second.goaways_sent


def test_tolerances_are_the_documented_ones() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "simulation.md").read_text()
    assert f"{COUNT_TOLERANCE:.0%}" in text and f"{SHARE_TOLERANCE * 100:.0f} points" in text


def test_haproxy_config_is_tcp_round_robin(tmp_path: Path) -> None:
    config = render_config(8000, [("b1", "127.0.0.1", 9001), ("b2", "127.0.0.1", 9002)], tmp_path / "s.sock")
    assert "mode tcp" in config and "balance roundrobin" in config
    assert "server b2 127.0.0.1:9002 check" in config and "bind 127.0.0.1:8000" in config
    assert f"stats socket {tmp_path / 's.sock'}" in config


def test_haproxy_frontend_is_a_socket_we_bound_so_no_port_race(tmp_path: Path) -> None:
    config = render_config(8000, [("b1", "127.0.0.1", 9001)], tmp_path / "s.sock", frontend_fd=7)
    assert "    bind fd@7\n" in config and "bind 127.0.0.1" not in config


@pytest.mark.skipif(find_haproxy() is None, reason="HAProxy is not installed (make test installs it as root)")
def test_haproxy_balancer_listens_on_the_port_it_reports(tmp_path: Path) -> None:
    import asyncio

    from goaway_ext.demo.haproxy import HAProxyBalancer
    from goaway_ext.demo.processes import ProcessGroupRegistry

    async def scenario() -> None:
        balancer = HAProxyBalancer([("b1", "127.0.0.1", 1)], ProcessGroupRegistry(), tmp_path)
        await balancer.start()
        try:
            assert "bind fd@" in (tmp_path / "haproxy.cfg").read_text()
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", balancer.port), 5)
            writer.close()
        finally:
            await balancer.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_missing_haproxy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import goaway_ext.demo.haproxy as haproxy_module

    monkeypatch.setattr(haproxy_module, "find_haproxy", lambda: None)
    assert main(["demo", "--lb", "haproxy"]) == 2
    assert "--lb haproxy needs HAProxy, which is not installed" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["demo", "--plot", str(tmp_path / "x.png")]) == 2
    assert "install the 'plot' extra (pip install '.[plot]'" in capsys.readouterr().err


def test_lb_auto_prefers_haproxy_and_says_when_it_falls_back() -> None:
    from goaway_ext.demo import _resolve_lb

    assert _resolve_lb("auto", True) == ("haproxy", None)
    lb, note = _resolve_lb("auto", False)
    assert lb == "builtin" and note is not None and "\n" not in note and "HAProxy is not installed" in note
    assert _resolve_lb("builtin", True) == ("builtin", None)


def _flat_run(counts: list[int], policy: str = "chance=0.01") -> RunResult:
    run = RunResult(policy=policy, backends=["b1", "b2", "b3"], bucket=0.5, duration=20.0, window=10.0, lb="model")
    run.counts = [list(counts) for _ in range(40)]
    run.restart_done = 0.0
    return run


def test_never_is_explained_when_it_is_only_the_noise_floor() -> None:
    from goaway_ext.demo.simulate import balanced_floor, never_notes

    params = SimulationParameters(backends=3, clients=30, rate=20.0, duration=20.0, window=10.0, seed=1)
    policy = PolicySpec("chance=0.01", chance=0.01).policy(1)
    median, high = balanced_floor(params, policy)
    assert high >= 1.25 and median <= high  # 10 clients per backend: 1.25 is within the noise
    noise, imbalance = _flat_run([13, 10, 10]), _flat_run([30, 10, 10])  # max/min 1.3 and 3.0
    assert noise.summary().rebalanced_after is None and imbalance.summary().rebalanced_after is None
    notes = never_notes([noise, imbalance], params, [policy, policy])
    assert len(notes) == 1 and "\n" not in notes[0], notes
    assert notes[0].startswith("'never' for chance=0.01 is noise") and "1.30" in notes[0]
    # A big fleet has a low floor: the same 1.3 is then a real imbalance, and no note.
    fleet = SimulationParameters(backends=3, clients=3000, rate=1.0, duration=20.0, window=10.0, seed=1)
    assert never_notes([noise], fleet, [policy]) == []
