"""The demo's backend ports: reserved for the whole run, so a restart finds them free; chosen again on a collision."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import socket
import urllib.request
from pathlib import Path

import pytest

import goaway_ext.demo.scenario as scenario
from goaway_ext.demo import PolicySpec
from goaway_ext.demo.fairsim import FairShareOptions
from goaway_ext.demo.ports import PortReservation
from goaway_ext.demo.processes import Backend, BackendStartError, ProcessGroupRegistry
from goaway_ext.demo.report import ProgressLine, RunResult
from goaway_ext.fleet import LOAD_PATH

_CONFIG = scenario.DemoConfig(backends=2, clients=6, rate=10.0, duration=1.0, warmup=1.0, window=1.0, seed=1,
                              lb="builtin")


def _run(tmp_path: Path) -> RunResult:
    registry = ProcessGroupRegistry()
    try:
        return asyncio.run(asyncio.wait_for(scenario.run_scenario(
            _CONFIG, PolicySpec("fair", fair=FairShareOptions()), registry, ProgressLine(io.StringIO()),
            tmp_path), 120))
    finally:
        registry.kill_all()


def _publish_port(backend: Backend) -> int:
    args = backend._policy_args
    return int(args[args.index("--publish-load") + 1].rsplit(":", 1)[1])


def test_a_restarted_backend_gets_its_ports_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between b1's exit and its new start, another process tries to take both its ports.

    Without the reservation the plain bind succeeds (the ports are free while
    b1 is down) and the new b1 cannot start; with it the bind is refused, b1
    comes back on both ports, and its peers' address for it answers as b1.
    """
    real_stop, real_start = Backend.stop, Backend.start
    occupiers: list[socket.socket] = []
    refused: list[tuple[str, int]] = []
    seen_by_peers: list[dict[str, object]] = []

    async def stop_then_occupy(self: Backend, timeout: float = 15.0) -> int | None:
        status = await real_stop(self, timeout)
        if self.name == "b1" and not occupiers and not refused:
            for kind, port in (("main", self.port), ("publish", _publish_port(self))):
                sock = socket.socket()
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    occupiers.append(sock)  # the race lost: the port is someone else's now
                except OSError as exc:
                    sock.close()
                    assert exc.errno == errno.EADDRINUSE, exc
                    refused.append((kind, port))
        return status

    async def start_then_ask(self: Backend, timeout: float = 15.0) -> None:
        restart = self.starts > 0
        await real_start(self, timeout)
        if restart and self.name == "b1":
            url = f"http://127.0.0.1:{_publish_port(self)}{LOAD_PATH}"  # what b2 polls for b1
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            seen_by_peers.append(json.loads(body))

    monkeypatch.setattr(Backend, "stop", stop_then_occupy)
    monkeypatch.setattr(Backend, "start", start_then_ask)
    try:
        result = _run(tmp_path)
    finally:
        for sock in occupiers:
            sock.close()
    assert occupiers == [] and [kind for kind, _ in refused] == ["main", "publish"]
    assert len(seen_by_peers) == 1 and seen_by_peers[0]["name"] == "b1", seen_by_peers
    assert [name for _, name, what in result.events if what == "up"] == ["b1", "b2"]
    assert result.failed_requests == 0 and result.watches_interrupted == 0, result.errors
    assert result.window_counts(result.restart_done, result.duration)[0] > 0  # b1 serves again


def test_a_port_taken_all_the_same_is_chosen_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that shares ports on purpose (SO_REUSEADDR) listens on b1's reserved publish port first."""
    taken: list[socket.socket] = []
    ports: list[int] = []

    class FirstOneTaken(PortReservation):
        def __init__(self, host: str = "127.0.0.1") -> None:
            super().__init__(host)
            ports.append(self.port)
            if not taken:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, self.port))
                sock.listen()
                taken.append(sock)

    monkeypatch.setattr(scenario, "PortReservation", FirstOneTaken)
    try:
        result = _run(tmp_path)
    finally:
        for sock in taken:
            sock.close()
    assert len(ports) == 8  # two publish and two main ports, then four new ones after the collision
    assert ports[0] not in ports[4:]
    assert "Address already in use" in (tmp_path / "fair" / "b1.log").read_text()
    assert result.failed_requests == 0 and result.watches_interrupted == 0, result.errors
    assert result.requests > 0


def test_a_port_taken_during_a_restart_stops_the_run_naming_it(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The one gap the reservation leaves (ports.py): a process that binds with SO_REUSEADDR itself and
    listens on b1's port between its exit and its new start. The balancer knows b1 by that port, so the
    demo cannot choose another one mid-run: it stops, and its error names the port and the reason."""
    real_stop = Backend.stop
    squatters: list[socket.socket] = []
    ports: list[int] = []

    async def stop_then_squat(self: Backend, timeout: float = 15.0) -> int | None:
        status = await real_stop(self, timeout)
        if self.name == "b1" and not squatters:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen()
            squatters.append(sock)
            ports.append(self.port)
        return status

    monkeypatch.setattr(Backend, "stop", stop_then_squat)
    try:
        with pytest.raises(BackendStartError) as raised:
            _run(tmp_path)
    finally:
        for sock in squatters:
            sock.close()
    assert len(ports) == 1
    message = str(raised.value)
    assert "backend b1 did not report 'listening on'" in message, message
    assert f"--port {ports[0]}: address 127.0.0.1:{ports[0]} is already in use" in message, message
