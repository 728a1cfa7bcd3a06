"""Fleet views for real: HAProxy's runtime API, and peers in their own processes (one dies, one lies)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from goaway_ext.demo.haproxy import find_haproxy, free_port, render_config
from goaway_ext.fairshare import DEFAULT_CEILING, FairShare, ServerLoad
from goaway_ext.fleet import (
    LOAD_PATH,
    HAProxyFleetView,
    LoadPublisher,
    PeerFleetView,
    parse_load,
    parse_show_stat,
)
from tests.manual_clock import ManualClock
from tests.serve_process import ServeProcess

# A peer process: "good NAME CONNECTIONS" publishes a load; "garbage" answers 200 with a body
# that is not a load; "silent" accepts and never answers. Each prints its port, then waits.
_PEER = r"""
import socket, sys, threading, time
kind = sys.argv[1]
if kind == "good":
    from goaway_ext.fleet import LoadPublisher
    pub = LoadPublisher(sys.argv[2], lambda: float(sys.argv[3]))
    print(pub.port, flush=True)
else:
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(16)
    print(srv.getsockname()[1], flush=True)
    held = []
    def serve():
        while True:
            conn, _ = srv.accept()
            held.append(conn)
            if kind == "garbage":
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n{\"name\": \"evil\", \"connections\": -5}")
                conn.close()
    threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""


@contextlib.contextmanager
def _peer(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", _PEER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_parse_load_refuses_garbage() -> None:
    assert parse_load(b'{"name": "b1", "connections": 3, "capacity": 0.5}') == ServerLoad("b1", 3, 0.5)
    assert parse_load(b'{"name": "b1", "connections": 3}').capacity == 1.0
    for bad in (b"", b"[]", b"{}", b'{"name": "b1"}', b'{"name": 3, "connections": 1}',
                b'{"name": "b1", "connections": -1}', b'{"name": "b1", "connections": "7"}',
                b'{"name": "b1", "connections": 1, "capacity": 0}', b"\xff"):
        with pytest.raises((ValueError, TypeError)):
            parse_load(bad)


def test_peers_in_their_own_processes_one_dies_one_lies_one_is_silent() -> None:
    clock = ManualClock(100.0)
    with _peer("good", "b2", "40") as (_, p2), _peer("good", "b3", "60") as (dying, p3), \
            _peer("garbage") as (_, pg), _peer("silent") as (_, ps):
        view = PeerFleetView("b1", lambda: 50.0, [f"127.0.0.1:{p}" for p in (p2, p3, pg, ps)],
                             timeout=1.0, max_age=3.0, clock=clock)
        try:
            view.poll_once()
            snap = view.snapshot()
            assert snap is not None and snap.taken_at == 100.0
            assert {s.name: s.connections for s in snap.servers} == {"b1": 50.0, "b2": 40.0, "b3": 60.0}
            assert set(view.left_out) == {f"127.0.0.1:{pg}", f"127.0.0.1:{ps}"}
            assert "time" in view.left_out[f"127.0.0.1:{ps}"].lower()  # silence, however it ended
            # A controller over it: b1 (50) is above b2 (40) * 1.1, so it sheds.
            fair = FairShare(view, "b1", clock=clock)
            assert fair.update() > 0.0
            dying.send_signal(signal.SIGKILL)
            dying.wait(timeout=30)
            clock.now = 102.0
            view.poll_once()  # b3 is dead: its last answer is 2 s old, still inside max_age
            assert f"127.0.0.1:{p3}" in view.left_out
            snap = view.snapshot()
            assert snap is not None and snap.find("b3") is not None
            clock.now = 104.0
            view.poll_once()  # 4 s old now: left out
            snap = view.snapshot()
            assert snap is not None and {s.name for s in snap.servers} == {"b1", "b2"}
        finally:
            view.close()


def test_peer_view_polls_in_the_background_and_snapshot_never_blocks() -> None:
    with _peer("silent") as (_, ps), LoadPublisher("b2", lambda: 7) as pub:
        view = PeerFleetView("b1", lambda: 5, [f"127.0.0.1:{pub.port}", f"127.0.0.1:{ps}"], interval=0.05,
                             timeout=0.5)
        with view:
            assert view.wait_fetches(2, timeout=60)
            snap = view.snapshot()  # a cached value: returns while the silent peer is still being asked
            assert snap is not None and {s.name for s in snap.servers} == {"b1", "b2"}


def test_publisher_answers_only_its_path() -> None:
    with LoadPublisher("b9", lambda: 3, capacity=2.0) as pub:
        with socket.create_connection(("127.0.0.1", pub.port), timeout=10) as sock:
            sock.sendall(b"GET /other HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 404")
        with socket.create_connection(("127.0.0.1", pub.port), timeout=10) as sock:
            sock.sendall(f"GET {LOAD_PATH} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert parse_load(data.partition(b"\r\n\r\n")[2]) == ServerLoad("b9", 3, 2.0)


def test_bad_peer_address_is_named() -> None:
    with pytest.raises(ValueError, match="nohost"):
        PeerFleetView("b1", lambda: 0, ["nohost"])
    with pytest.raises(TypeError, match="local"):
        PeerFleetView("b1", 5, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        PeerFleetView("b1", lambda: 0, [], timeout=0)


_SHOW_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n"
    "fe,FRONTEND,,,9,9,4096,9,0,0,0,0,0,,,,,OPEN,\n"
    "be,b1,0,0,4,4,,4,0,0,,0,,0,0,0,0,UP,1\n"
    "be,b2,0,0,3,3,,3,0,0,,0,,0,0,0,0,UP 1/2,2\n"
    "be,b3,0,0,2,2,,2,0,0,,0,,0,0,0,0,MAINT,1\n"
    "be,b4,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1\n"
    "be,b5,0,0,0,0,,0,0,0,,0,,0,0,0,0,no check,1\n"
    "be,b6,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,0\n"
    "be,BACKEND,0,0,9,9,,9,0,0,0,0,,0,0,0,0,UP,4\n"
    "other,x1,0,0,1,1,,1,0,0,,0,,0,0,0,0,UP,1\n"
)


def test_parse_show_stat_keeps_serving_servers_of_the_backend() -> None:
    servers = parse_show_stat(_SHOW_STAT, "be")
    assert servers == (ServerLoad("b1", 4, 1), ServerLoad("b2", 3, 2), ServerLoad("b5", 0, 1))
    with pytest.raises(ValueError, match="show stat"):
        parse_show_stat("Unknown command\n", "be")
    with pytest.raises(ValueError, match="scur"):
        parse_show_stat("# pxname,svname,status,weight\n", "be")


def _haproxy() -> str:
    binary = find_haproxy()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("HAProxy is required under CI=true (make test installs it)")
        pytest.skip("HAProxy is not installed (apt-get install haproxy; make test installs it as root)")
    return binary


class _Holder:
    """A TCP server that accepts and holds every connection (a backend, as HAProxy sees it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_haproxy_view_reads_current_sessions_from_a_real_haproxy() -> None:
    binary = _haproxy()
    holders = [_Holder() for _ in range(3)]
    clients: list[socket.socket] = []
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "haproxy.sock"
        port = free_port()
        config = Path(tmp) / "haproxy.cfg"
        config.write_text(render_config(port, [(f"b{i + 1}", "127.0.0.1", h.port) for i, h in
                                               enumerate(holders)], stats))
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        view = HAProxyFleetView(str(stats), "demo_servers", timeout=2.0)
        try:
            for _ in range(600):  # up to a minute for HAProxy to start and check all three servers
                view.poll_once()
                snap = view.snapshot()
                if snap is not None and len(snap.servers) == 3:
                    break
                if proc.poll() is not None:
                    pytest.fail(f"haproxy exited with {proc.returncode}")
                threading.Event().wait(0.1)
            else:
                pytest.fail(f"HAProxy never reported 3 servers UP: {view.snapshot()!r} {view.last_error!r}")
            for _ in range(6):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(600):
                view.poll_once()
                snap = view.snapshot()
                assert snap is not None
                if sum(s.connections for s in snap.servers) == 6:
                    break
                threading.Event().wait(0.1)
            else:
                pytest.fail(f"HAProxy never counted the 6 connections: {view.snapshot()!r}")
            # roundrobin: two sessions each
            assert sorted((s.name, s.connections) for s in snap.servers) == [("b1", 2), ("b2", 2), ("b3", 2)]
            fair = FairShare(view, "b1", clock=time.monotonic)
            assert fair.update() == 0.0 and fair.state == "balanced"
            # Take b3 out of the rotation: the view leaves it out, whatever it still holds.
            with socket.socket(socket.AF_UNIX) as admin:
                admin.settimeout(10)
                admin.connect(str(stats))
                admin.sendall(b"disable server demo_servers/b3\n")
                admin.recv(1000)
            view.poll_once()
            snap = view.snapshot()
            assert snap is not None and {s.name for s in snap.servers} == {"b1", "b2"}
            # b2 closes its two connections: b1 (2) is now far above b2 (0) and sheds at the ceiling.
            # (A TCP session ends when both sides closed: the clients that read EOF close too.)
            for client in clients:
                client.setblocking(False)
            for _ in range(600):  # up to a minute: EOF crosses HAProxy late on a loaded machine
                # b2 may not have accepted both sessions yet when HAProxy counts them: close
                # whatever it holds by now, again on each round.
                for conn in list(holders[1].held):
                    conn.close()
                for client in clients:
                    if client.fileno() != -1:
                        with contextlib.suppress(BlockingIOError):
                            if client.recv(1) == b"":
                                client.close()
                view.poll_once()
                snap = view.snapshot()
                assert snap is not None
                b2 = snap.find("b2")
                if b2 is not None and b2.connections == 0:
                    break
                threading.Event().wait(0.1)
            else:
                pytest.fail(f"b2's sessions never ended in HAProxy's view: {view.snapshot()!r}")
            assert fair.update() == DEFAULT_CEILING and fair.state == "shedding"
        finally:
            for c in clients:
                c.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            for h in holders:
                h.close()
    # HAProxy gone: polls fail, the snapshot ages, and the controller falls back.
    view.poll_once()
    assert view.last_error is not None


def test_haproxy_view_garbage_and_absent_socket() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        view = HAProxyFleetView(str(Path(tmp) / "none.sock"), "be", timeout=0.5)
        view.poll_once()
        assert view.snapshot() is None and isinstance(view.last_error, OSError)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(Path(tmp) / "fake.sock"))
        srv.listen(1)

        def liar() -> None:
            conn, _ = srv.accept()
            conn.recv(100)
            conn.sendall(b"Unknown command. Please enter one of the following commands only :\n")
            conn.close()

        t = threading.Thread(target=liar)
        t.start()
        fake = HAProxyFleetView(str(Path(tmp) / "fake.sock"), "be", timeout=5.0)
        fake.poll_once()
        t.join()
        srv.close()
        assert fake.snapshot() is None and isinstance(fake.last_error, ValueError)


def test_serve_fair_share_peers_sheds_only_the_loaded_server() -> None:
    # Two real `serve` processes publish their load and read each other's. Eight clients
    # connect straight to b1, none to b2: b1 is above its share and sends GOAWAYs, within
    # its drain-rate limit; once the view is gone (b2 killed), b1 falls back to --chance 0.
    import asyncio

    from goaway_ext import H2Client

    lp1, lp2 = free_port(), free_port()
    # --linger 1: serve's own default (ServeProcess shortens it); a drained connection stays
    # counted by b1's publisher for that second, as in the runs this test was tuned on.
    b1 = ServeProcess("--name", "b1", "--chance", "0", "--fair-share", "peers", "--peers", f"127.0.0.1:{lp2}",
                      "--publish-load", f"127.0.0.1:{lp1}", "--fair-interval", "0.2", "--fair-ceiling", "0.02",
                      "--fair-max-drain-rate", "1.0", "--linger", "1")
    b2 = ServeProcess("--name", "b2", "--chance", "0", "--fair-share", "peers", "--peers", f"127.0.0.1:{lp1}",
                      "--publish-load", f"127.0.0.1:{lp2}", "--fair-interval", "0.2", "--linger", "1")
    try:
        p1 = {"h2": b1.port, "load": b1.printed_port("publishing load on port ")}
        p2 = {"h2": b2.port, "load": b2.printed_port("publishing load on port ")}
        assert p1["load"] == lp1 and p2["load"] == lp2

        async def drive() -> tuple[int, int, int]:
            clients = [H2Client("127.0.0.1", p1["h2"]) for _ in range(8)]
            for c in clients:
                await c.__aenter__()
            try:
                for _ in range(2000):
                    await asyncio.gather(*(c.request("GET", "/") for c in clients))
                    if sum(c.goaways_received for c in clients) >= 3:
                        break
                stats = json.loads((await clients[0].request("GET", "/stats")).body)
                # While b1 still holds its eight, one client on b2 is far below: b2 never sheds.
                async with H2Client("127.0.0.1", p2["h2"]) as quiet:
                    for _ in range(300):
                        await quiet.request("GET", "/")
                    b2_goaways = quiet.goaways_received
                return sum(c.goaways_received for c in clients), b2_goaways, stats["requests"]
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)

        received, b2_goaways, requests = asyncio.run(drive())
        assert received >= 3, f"b1 never shed: {received} GOAWAYs over {requests} requests"
        assert b2_goaways == 0
    finally:
        for server in (b1, b2):
            server.stop(timeout=60)
