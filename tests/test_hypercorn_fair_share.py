"""Fair share from hypercorn config keys and ``--goaway-*`` flags: parsing, errors, and a real 2-worker host.

The host, not the worker, is one server of the fleet: the real test runs
``python -m goaway_ext.hypercorn`` with two workers and a peer that holds no
connection, checks that the host publishes the connections of both workers
as one number, and that the host sheds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypercorn.config import Config

from goaway_ext import GoawayPolicy
from goaway_ext._hostfleet import HostLoad, drain_rate_line, fleet_settings, worker_drain_rate, worker_fair_share
from goaway_ext.fairshare import FairShare, StaticFleetView
from goaway_ext.fleet import LOAD_PATH, HAProxyFleetView, LoadPublisher, PeerFleetView
from goaway_ext.hypercorn import FAIR_SHARE_KEYS, enable_goaway, policy_for, uninstall_protocol
from tests.test_hypercorn import APP, ROOT, hypercorn_server


def test_fair_share_keys_build_the_controller_serve_would() -> None:
    config = Config.from_mapping({
        "goaway_fair_share": "haproxy", "goaway_name": "b1", "goaway_haproxy_socket": "/run/haproxy.sock",
        "goaway_haproxy_backend": "be", "goaway_chance": 0.001, "goaway_fair_ceiling": 0.01,
        "goaway_fair_tolerance": 0.2, "goaway_fair_max_drain_rate": 0.1, "goaway_fair_interval": 0.5,
        "goaway_fair_max_staleness": 4})
    policy = policy_for(config)
    assert policy is not None and policy.chance == 0.0  # goaway_chance is the controller's fallback
    fair = policy.fair_share
    assert isinstance(fair, FairShare) and isinstance(fair.view, HAProxyFleetView)
    assert (fair.name, fair.fallback, fair.ceiling, fair.tolerance, fair.max_drain_rate, fair.interval) == (
        "b1", 0.001, 0.01, 0.2, 0.1, 0.5)
    assert fair.view._backend == "be" and fair.view._address == "/run/haproxy.sock"
    assert fair.view._thread is None  # nothing polls before this process serves a connection

    peers = policy_for(Config.from_mapping({"goaway_fair_share": "peers", "goaway_name": "b1",
                                            "goaway_peers": ["10.0.0.2:9000", "http://10.0.0.3:9000"]}))
    assert peers is not None and peers.fair_share is not None
    assert isinstance(peers.fair_share.view, PeerFleetView)
    assert peers.fair_share.view._peers == [("10.0.0.2", 9000), ("10.0.0.3", 9000)]
    # TOML has one string as often as a list.
    same = policy_for(Config.from_mapping({"goaway_fair_share": "peers", "goaway_name": "b1",
                                           "goaway_peers": "10.0.0.2:9000,10.0.0.3:9000"}))
    assert same is not None and same.fair_share is not None
    assert same.fair_share.view._peers == peers.fair_share.view._peers  # type: ignore[attr-defined]


def test_rapid_reset_window_key_and_flag() -> None:
    assert policy_for(Config.from_mapping({"goaway_rapid_reset_window": 50})).rapid_reset_window == 50  # type: ignore[union-attr]
    assert policy_for(Config.from_mapping({"goaway_rapid_reset_window": 0})).rapid_reset_window is None  # type: ignore[union-attr]
    assert policy_for(Config.from_mapping({"goaway_chance": 0.001})).rapid_reset_window == 500  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"goaway_rapid_reset_window must be in 2\.\.\d+, got 1"):
        policy_for(Config.from_mapping({"goaway_rapid_reset_window": 1}))
    result = _wrapper(APP, "--goaway-rapid-reset-window", "1", "--bind", "127.0.0.1:0")
    assert result.returncode == 2 and "--goaway-rapid-reset-window must be in 2.." in result.stderr


@pytest.mark.parametrize("keys, error, match", [
    ({"goaway_fair_share": "haproxi", "goaway_name": "b1"}, ValueError,
     "goaway_fair_share must be 'haproxy' or 'peers', got 'haproxi'"),
    ({"goaway_fair_share": "peers", "goaway_peers": "a:1"}, ValueError, "needs goaway_name"),
    ({"goaway_fair_share": "haproxy", "goaway_name": "b1", "goaway_haproxy_backend": "be"}, ValueError,
     "goaway_fair_share haproxy needs goaway_haproxy_socket"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1"}, ValueError, "goaway_fair_share peers needs goaway_peers"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "nohost"}, ValueError,
     "goaway_peers: .*'nohost'"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": [1]}, TypeError, "goaway_peers must be"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "a:1", "goaway_publish_load": "a:b"},
     ValueError, "goaway_publish_load must be .*'a:b'"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "a:1", "goaway_fair_ceiling": 0.5},
     ValueError, "goaway_fair_ceiling=0.5 is above 0.02.*Set goaway_allow_high_chance = true"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "a:1", "goaway_fair_tolerance": -1},
     ValueError, "goaway_fair_tolerance must be .*-1"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "a:1", "goaway_fair_interval": "1"},
     TypeError, "goaway_fair_interval must be a number, got '1'"),
    ({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "a:1", "goaway_chance": 0.03,
      "goaway_allow_high_chance": True}, ValueError, "goaway_chance must not exceed"),
    ({"goaway_peers": "a:1"}, ValueError, "goaway_peers is set but goaway_fair_share is not"),
    ({"goaway_fair_share": "haproxy", "goaway_name": "b1", "goaway_haproxy_socket": "/s",
      "goaway_haproxy_backend": "be", "goaway_peers": "a:1"}, ValueError, "goaway_peers is only read with"),
    ({"goaway_fair_sahre": "peers"}, ValueError, "did you mean goaway_fair_share"),
])
def test_a_bad_fair_share_key_is_named_with_its_value(keys: dict[str, Any], error: type[Exception],
                                                     match: str) -> None:
    try:
        with pytest.raises(error, match=match):
            enable_goaway(Config.from_mapping(keys))
    finally:
        uninstall_protocol()


def test_hypercorn_keys_are_the_values_serve_flags_set() -> None:
    # One set of checks (goaway_ext._hostfleet) serves both: each goaway_* key is a serve flag's value.
    from goaway_ext._hostfleet import FLEET_VALUES

    assert list(FAIR_SHARE_KEYS.values()) == list(FLEET_VALUES)
    assert all(key == "goaway_" + name for key, name in FAIR_SHARE_KEYS.items())


def _wrapper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "goaway_ext.hypercorn", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_a_bad_fair_share_flag_is_one_line_in_the_flags_typed() -> None:
    result = _wrapper(APP, "--goaway-fair-share", "peers", "--goaway-name", "b1", "--bind", "127.0.0.1:0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    # The value typed is named as a flag; the one missing by its key (a flag or a config-file key sets it).
    assert result.stderr == ("python -m goaway_ext.hypercorn: --goaway-fair-share peers needs goaway_peers "
                             "(HOST:PORT,...)\n"), result.stderr
    result = _wrapper(APP, "--goaway-fair-share", "peers", "--goaway-name", "b1", "--goaway-peers", "127.0.0.1:1",
                      "--goaway-fair-ceiling", "0.5", "--bind", "127.0.0.1:0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--goaway-fair-ceiling 0.5 is above 0.02" in result.stderr
    assert "Pass --goaway-allow-high-chance" in result.stderr
    assert set(FAIR_SHARE_KEYS) <= {a.dest for a in __import__("goaway_ext.hypercorn").hypercorn._parser()._actions}


def test_a_policy_given_in_code_keeps_its_fair_share_under_keep_alive_max_requests() -> None:
    # hypercorn's keep_alive_max_requests (1000 by default) makes a copy of the policy;
    # the copy must keep the controller and the rapid-reset window.
    fair = FairShare(StaticFleetView(time.monotonic), "b1", clock=time.monotonic)
    config = Config()
    try:
        enable_goaway(config, GoawayPolicy(fair_share=fair, rapid_reset_window=40))
        policy = policy_for(config)
        assert policy is not None and policy.max_requests == config.keep_alive_max_requests
        assert policy.fair_share is fair and policy.rapid_reset_window == 40
    finally:
        uninstall_protocol()


def test_a_fair_share_given_in_code_is_updated_on_a_thread_while_serving() -> None:
    from goaway_ext.asyncio_client import H2Client
    from tests.test_hypercorn import run, serve_in_thread

    view = StaticFleetView(time.monotonic)
    view.set("b1", 10)
    view.set("b2", 0)  # an empty peer: b1 sheds at the ceiling once update() ran
    fair = FairShare(view, "b1", clock=time.monotonic, ceiling=1.0, allow_high_chance=True, interval=0.05,
                     max_drain_rate=1.0)
    config = Config()

    async def scenario(port: int) -> int:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            for _ in range(500):
                await client.request("GET", "/")
                if client.goaways_received:
                    break
                await asyncio.sleep(0.01)
            return client.goaways_received

    enable_goaway(config, GoawayPolicy(fair_share=fair, mode="single", linger=0.05))
    try:
        assert fair.chance == 0.0  # nothing updates it before the first connection
        with serve_in_thread(config) as port:
            goaways = run(scenario(port))
    finally:
        uninstall_protocol()  # stops the update thread
    assert fair.chance == 1.0 and fair.state == "shedding" and goaways >= 1


def _load(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {LOAD_PATH} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return float(json.loads(data.partition(b"\r\n\r\n")[2])["connections"])


@pytest.mark.parametrize("workers, part", [(0, None), (1, None), (4, 0.025)])
def test_the_drain_rate_line_says_the_hosts_rate_and_what_each_worker_holds(workers: int, part: float | None) -> None:
    settings = fleet_settings({"fair_share": "haproxy", "name": "b1", "haproxy_socket": "/run/haproxy.sock",
                               "haproxy_backend": "be", "fair_max_drain_rate": 0.1}, lambda name: "goaway_" + name,
                              chance=0.0, allow_high_chance=False)
    assert settings is not None
    built = worker_fair_share(settings, HostLoad(workers), chance=0.0, allow_high_chance=False, workers=workers)
    assert built is not None
    fair, view = built
    view.close()
    line = drain_rate_line(settings.max_drain_rate, workers)
    assert line.startswith("goaway_ext: fair share max_drain_rate 0.1 per host (at most 0.1 x the host's connections "
                           "start a drain per second")
    if part is None:  # one process serves: it holds the host's whole rate
        assert fair.max_drain_rate == 0.1 and line.endswith(", at least one)") and "per worker" not in line
    else:  # what a worker's controller really holds, as the line says it
        assert fair.max_drain_rate == part == worker_drain_rate(0.1, workers)
        assert line.endswith(f"), 0.025 per worker ({workers} workers, each at most 0.025 x the host's connections "
                             "per second, at least one)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("worker_class", ["asyncio", "trio"])
def test_two_workers_are_one_server_of_the_fleet_and_the_loaded_host_sheds(tmp_path: Path, worker_class: str) -> None:
    if worker_class == "trio":
        pytest.importorskip("trio")
    from goaway_ext.asyncio_client import H2Client

    # The peer first reports more connections than the test ever opens, so this host is under its
    # share and sheds nothing while the count is checked (a GOAWAY'd connection that closed would
    # leave the sum one short of the clients); then it reports none, and this host must shed.
    peer_load = [1000.0]
    with LoadPublisher("b2", lambda: peer_load[0]) as quiet_peer:
        config = (f'goaway_fair_share = "peers"\ngoaway_name = "b1"\ngoaway_peers = ["127.0.0.1:{quiet_peer.port}"]\n'
                  'goaway_publish_load = "127.0.0.1:0"\ngoaway_fair_interval = 0.2\n'
                  'goaway_fair_max_drain_rate = 1.0\nkeep_alive_timeout = 60\n')  # idle clients stay
        with hypercorn_server("--worker-class", worker_class, workers=2, config=config, tmp_path=tmp_path) as server:
            server.wait_for_log("Running on", count=2, timeout=30)  # both workers accept
            server.wait_for_log("publishing this host's load on port")  # port 0: the parent says which
            publish = int(next(line for line in server.log if "publishing this host's load" in line).split()[-1])
            # The policy line shows the parent's controller (the host's rate); this line names both figures.
            assert any(line.endswith("goaway_ext: fair share max_drain_rate 1 per host (at most 1 x the host's "
                                     "connections start a drain per second), 0.5 per worker (2 workers, each at "
                                     "most 0.5 x the host's connections per second, at least one)")
                       for line in server.log), server.log

            async def scenario() -> tuple[set[str], list[float], int]:
                clients: list[H2Client] = []
                pids: set[str] = set()
                try:
                    # Connections until both workers hold some (the kernel picks the worker).
                    while len(clients) < 8 or len(pids) < 2:
                        assert len(clients) < 200, f"200 connections all went to one worker: {pids}"
                        client = H2Client("127.0.0.1", server.port, timeout=10.0)
                        await client.__aenter__()
                        clients.append(client)
                        pids.add((await client.request("GET", "/")).header("x-worker-pid") or "?")
                    seen = []
                    for _ in range(500):  # the publisher (in the parent) sums both workers' slots
                        seen.append(await asyncio.to_thread(_load, publish))
                        if seen[-1] == len(clients):
                            break
                        await asyncio.sleep(0.02)
                    peer_load[0] = 0.0  # the peer empties: this host is now far above its share
                    for _ in range(2000):
                        await asyncio.gather(*(c.request("GET", "/") for c in clients))
                        if sum(c.goaways_received for c in clients) >= 3:
                            break
                    return pids, seen, sum(c.goaways_received for c in clients)
                finally:
                    for client in clients:
                        await client.__aexit__(None, None, None)

            pids, seen, goaways = asyncio.run(asyncio.wait_for(scenario(), 60))
            assert len(pids) == 2 and seen[-1] >= 8, (pids, seen)
            assert goaways >= 3, f"the host above its share never shed ({goaways} GOAWAYs)"
            server.wait_for_log("reason=chance")
            for _ in range(500):  # every connection closed: both slots back to 0
                if _load(publish) == 0.0:
                    break
                time.sleep(0.02)
            assert _load(publish) == 0.0


def _admin(stats: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(stats))
        sock.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer.decode()


def test_two_workers_behind_a_real_haproxy_shed_to_the_server_it_brings_back(tmp_path: Path) -> None:
    # b1: hypercorn, 2 workers, reading HAProxy's `show stat` (goaway_fair_share = "haproxy");
    # b2: `serve`. b2 is in maintenance while 8 clients connect (all to b1), then comes back:
    # b1 holds everything, b2 nothing, so b1's workers shed and the clients' reconnects reach b2.
    import os
    import signal

    from goaway_ext.asyncio_client import H2Client
    from goaway_ext.demo.haproxy import find_haproxy, render_config

    binary = find_haproxy()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("HAProxy is required under CI=true (make test installs it)")
        pytest.skip("HAProxy is not installed (apt-get install haproxy; make test installs it as root)")
    stats = tmp_path / "haproxy.sock"
    b2 = subprocess.Popen([sys.executable, "-m", "goaway_ext", "serve", "--port", "0", "--chance", "0", "--name",
                           "b2", "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, start_new_session=True)
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        assert b2.stdout is not None
        b2_port = int(b2.stdout.readline().rsplit(":", 1)[1])
        config = (f'goaway_fair_share = "haproxy"\ngoaway_name = "b1"\ngoaway_haproxy_socket = "{stats}"\n'
                  'goaway_haproxy_backend = "demo_servers"\ngoaway_fair_interval = 0.2\n'
                  'goaway_fair_max_drain_rate = 1.0\nkeep_alive_timeout = 60\n')
        with hypercorn_server(workers=2, config=config, tmp_path=tmp_path) as b1:
            b1.wait_for_log("Running on", count=2, timeout=30)
            front = _free_port()
            (tmp_path / "haproxy.cfg").write_text(render_config(
                front, [("b1", "127.0.0.1", b1.port), ("b2", "127.0.0.1", b2_port)], stats))
            haproxy = subprocess.Popen([binary, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
            view = HAProxyFleetView(str(stats), "demo_servers", timeout=2.0)

            def serving() -> dict[str, float]:
                view.poll_once()
                snap = view.snapshot()
                return {} if snap is None else {s.name: s.connections for s in snap.servers}

            for _ in range(600):
                if set(serving()) == {"b1", "b2"}:
                    break
                assert haproxy.poll() is None, "haproxy exited"
                time.sleep(0.1)
            else:
                pytest.fail(f"HAProxy never reported b1 and b2 up: {view.last_error!r}")
            _admin(stats, "disable server demo_servers/b2")

            async def scenario() -> tuple[int, int, dict[str, float]]:
                clients = [H2Client("127.0.0.1", front, timeout=10.0) for _ in range(8)]
                for client in clients:
                    await client.__aenter__()
                try:
                    for client in clients:  # every connection lands on b1 (hypercorn names its worker)
                        assert (await client.request("GET", "/")).header("x-worker-pid")
                    _admin(stats, "enable server demo_servers/b2")
                    for _ in range(600):  # back in the rotation once its health check passes
                        if "b2" in await asyncio.to_thread(serving):
                            break
                        await asyncio.sleep(0.05)
                    requests, loads = 0, {}
                    for round_ in range(3000):
                        for response in await asyncio.gather(*(c.request("GET", "/") for c in clients)):
                            assert response.status == 200
                        requests += len(clients)
                        # A client reconnects through HAProxy at its next request after a GOAWAY.
                        if sum(c.goaways_received for c in clients) >= 3 and round_ % 10 == 0:
                            loads = await asyncio.to_thread(serving)
                            if loads.get("b2", 0) >= 1:
                                break
                    return sum(c.goaways_received for c in clients), requests, loads
                finally:
                    for client in clients:
                        await client.__aexit__(None, None, None)

            goaways, requests, loads = asyncio.run(asyncio.wait_for(scenario(), 90))
            assert goaways >= 3, f"b1 never shed: {goaways} GOAWAYs in {requests} requests"
            assert loads.get("b2", 0) >= 1, loads
            b1.wait_for_log("reason=chance")
    finally:
        for proc in (b2, haproxy):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def test_the_host_publishes_from_the_process_that_enabled_it_until_uninstall() -> None:
    from goaway_ext import hypercorn as integration

    config = Config.from_mapping({"goaway_fair_share": "peers", "goaway_name": "b1", "goaway_peers": "127.0.0.1:1",
                                  "goaway_publish_load": "127.0.0.1:0"})
    try:
        enable_goaway(config)
        publisher = integration._HOSTS[config].publisher
        assert publisher is not None
        assert _load(publisher.port) == 0.0  # no connection yet, but already listed for the peers
    finally:
        uninstall_protocol()
    with pytest.raises(ConnectionRefusedError):
        _load(publisher.port)
