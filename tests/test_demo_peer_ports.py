"""The demo's peer ports: a publish port taken before its backend binds it is chosen again."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import pytest

import goaway_ext.demo.scenario as scenario
from goaway_ext.demo import PolicySpec
from goaway_ext.demo.fairsim import FairShareOptions
from goaway_ext.demo.processes import ProcessGroupRegistry
from goaway_ext.demo.report import ProgressLine


def test_a_taken_publish_port_is_chosen_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = scenario.free_port
    calls: list[int] = []

    def first_one_taken(host: str = "127.0.0.1") -> int:
        # Another process wins the race for the first port handed out.
        port = taken.getsockname()[1] if not calls else real(host)
        calls.append(port)
        return port

    monkeypatch.setattr(scenario, "free_port", first_one_taken)
    config = scenario.DemoConfig(backends=3, clients=6, rate=10.0, duration=1.0, warmup=1.0, window=1.0, seed=1,
                                 lb="builtin")
    registry = ProcessGroupRegistry()
    try:
        with taken:
            result = asyncio.run(asyncio.wait_for(scenario.run_scenario(
                config, PolicySpec("fair", fair=FairShareOptions()), registry, ProgressLine(io.StringIO()),
                tmp_path), 120))
    finally:
        registry.kill_all()
    assert len(calls) == 6  # three ports, then three new ones after the collision
    assert calls[0] not in calls[3:]
    assert "Address already in use" in (tmp_path / "fair" / "b1.log").read_text()
    assert result.failed_requests == 0 and result.watches_interrupted == 0, result.errors
    assert result.requests > 0
