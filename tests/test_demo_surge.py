"""The surge upgrade through a real HAProxy: every backend replaced at once, new replicas attached in turn."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from goaway_ext.demo import PolicySpec
from goaway_ext.demo.fairsim import FairShareOptions
from goaway_ext.demo.haproxy import find_haproxy
from goaway_ext.demo.processes import ProcessGroupRegistry
from goaway_ext.demo.report import ProgressLine, RunResult
from goaway_ext.demo.scenario import DemoConfig, run_scenario
from goaway_ext.demo.serve_log import count_policy_drains
from goaway_ext.demo.simulate import RESTART_DOWNTIME, RESTART_GAP

pytestmark = pytest.mark.skipif(
    find_haproxy() is None and os.environ.get("CI") != "true",
    reason="HAProxy is not installed (make test installs it as root)",
)


def _surge(tmp_path: Path, spec: PolicySpec, duration: float) -> tuple[RunResult, list[int]]:
    config = DemoConfig(backends=3, clients=9, rate=10.0, duration=duration, warmup=1.5, window=2.0, seed=1,
                        lb="haproxy", scenario="surge")
    registry = ProcessGroupRegistry()
    try:
        result = asyncio.run(asyncio.wait_for(
            run_scenario(config, spec, registry, ProgressLine(io.StringIO()), tmp_path), 120))
    finally:
        registry.kill_all()
    return result, registry.pids


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_surge_puts_every_client_on_the_first_replica_attached(tmp_path: Path) -> None:
    result, pids = _surge(tmp_path, PolicySpec("none"), 3.0)
    stops = [t for t, _, what in result.events if what == "stop"]
    ups = [(t, name) for t, name, what in result.events if what == "up"]
    assert len(stops) == 3 and max(stops) - min(stops) < 0.01  # every old replica at once
    assert [name for _, name in ups] == ["b1", "b2", "b3"]
    gap = RESTART_DOWNTIME + RESTART_GAP
    # Each replica is attached no earlier than its slot (b1 at the stop, then one per gap); a busy
    # machine may attach one late, which shortens the next interval, not its slot.
    assert all(ups[i][0] - ups[0][0] >= i * gap - 0.05 for i in (1, 2)), ups
    summary = result.summary()
    assert summary.shares["b1"] == 1.0, summary  # nothing ever moves the clients off b1
    assert result.failed_requests == 0 and result.watches_interrupted == 0, result.errors
    assert result.goaways_sent == 0
    assert len(pids) == 3 + 3 + 1 and not any(_alive(pid) for pid in pids)  # old, new, HAProxy


def test_fair_share_spreads_the_surge_without_losing_a_request(tmp_path: Path) -> None:
    fair = FairShareOptions(ceiling=0.2, max_drain_rate=0.5)
    result, _ = _surge(tmp_path, PolicySpec("fair", fair=fair), 6.0)
    summary = result.summary()
    assert result.failed_requests == 0 and result.watches_interrupted == 0, result.errors
    assert min(summary.shares.values()) > 0.15, summary  # b2 and b3 took clients from b1
    assert result.goaways_sent and result.goaways_sent > 0
    # The old and the new replica of each backend ran at once under one name: each wrote its own
    # log (one process per file: one start line each), and the run's count is
    # every file's: the new b1, which took every client, shed most of them.
    logs = {path.stem: path.read_text() for path in (tmp_path / "fair").glob("b*.log")}
    assert sorted(logs) == ["b1", "b1-new", "b2", "b2-new", "b3", "b3-new"], sorted(logs)
    for name, text in logs.items():
        assert text.count(" serving h2c as ") == 1, (name, text[-2000:])
    assert result.goaways_sent == sum(count_policy_drains(text) for text in logs.values())
    assert count_policy_drains(logs["b1-new"]) > 0
