"""What a hostile or broken peer can cost the fair-share fleet views, flooded for real.

The publisher runs in its own process (so its threads and file descriptors can
be counted from /proc) and is flooded with held sockets, slow-loris requests
and garbage while a well-behaved peer keeps asking. The reader is pointed at
peers in their own processes that answer huge or trickle their answer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from goaway_ext.fleet import LOAD_PATH, MAX_LOAD_BYTES, MAX_REQUEST_BYTES, LoadPublisher, PeerFleetView

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads and fds in /proc")

# "publisher CAP TIMEOUT": a LoadPublisher; "huge": answers 200 with an endless body;
# "trickle": answers one byte every 50 ms for ever. Each prints its port, then waits on stdin.
_PROCESS = r"""
import socket, sys, threading, time
kind = sys.argv[1]
if kind == "publisher":
    from goaway_ext.fleet import LoadPublisher
    pub = LoadPublisher("b2", lambda: 7.0, max_connections=int(sys.argv[2]), timeout=float(sys.argv[3]))
    print(pub.port, flush=True)
else:
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    def one(conn):
        try:
            conn.recv(4096)
            if kind == "huge":
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n{\"name\": \"big\", \"connections\": 1, \"pad\": \"")
                while True:
                    conn.sendall(b"x" * 65536)
            else:
                for byte in b"HTTP/1.0 200 OK\r\n\r\n" * 100000:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.05)
        except OSError:
            pass
    def serve():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""


@contextlib.contextmanager
def _process(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", _PROCESS, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {LOAD_PATH} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def test_publisher_under_a_flood_still_answers_a_good_peer_with_bounded_threads_and_sockets() -> None:
    cap, flood = 32, 400
    with _process("publisher", str(cap), "1.0") as (proc, port):
        baseline_fds = _fds(proc.pid)
        held: list[socket.socket] = []
        loris: list[socket.socket] = []
        stop = threading.Event()
        try:
            for _ in range(flood):  # opened and held, never a byte sent
                held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(10):  # slow loris: one byte of the request every 100 ms
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"G")
                loris.append(sock)

            def dribble() -> None:
                while not stop.wait(0.1):
                    for sock in loris:
                        with contextlib.suppress(OSError):
                            sock.sendall(b"E")

            threading.Thread(target=dribble, daemon=True).start()
            # Garbage, while the flood is held: too long, and not HTTP.
            for payload, status in ((os.urandom(MAX_REQUEST_BYTES + 1).replace(b"\n", b"x"), b"431"),
                                    (os.urandom(200).replace(b"\n", b"x") + b"\r\n\r\n", b"400"),
                                    (b"POST " + LOAD_PATH.encode() + b" HTTP/1.1\r\n\r\n", b"405")):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(payload)
                    answer = b""
                    with contextlib.suppress(ConnectionResetError):
                        while chunk := sock.recv(4096):
                            answer += chunk
                    assert answer.startswith(b"HTTP/1.0 " + status), answer[:80]
            # A well-behaved peer, asking like PeerFleetView does, every time.
            view = PeerFleetView("b1", lambda: 1.0, [f"127.0.0.1:{port}"], timeout=2.0)
            try:
                for _ in range(5):
                    view.poll_once()
                    snap = view.snapshot()
                    assert view.left_out == {} and snap is not None and snap.find("b2") is not None, view.left_out
            finally:
                view.close()
            # Bounded: one thread serves them all, and it holds at most `cap` sockets.
            assert _threads(proc.pid) <= 3
            assert _fds(proc.pid) <= baseline_fds + cap
            # The slow-loris sockets reach their deadline (1 s) and are closed, dribbling or not.
            assert all(_closed_by_peer(sock, timeout=30) for sock in loris)
            # The flood's sockets were closed too (evicted, or at their deadline).
            assert all(_closed_by_peer(sock, timeout=30) for sock in held[:50])
        finally:
            stop.set()
            for sock in held + loris:
                sock.close()


def test_publisher_limits_are_checked_and_counted() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        LoadPublisher("b1", lambda: 0, max_connections=0)
    with pytest.raises(ValueError, match="timeout"):
        LoadPublisher("b1", lambda: 0, timeout=0)
    with LoadPublisher("b1", lambda: 2.0, max_connections=2, timeout=0.5) as pub:
        idle = [socket.create_connection(("127.0.0.1", pub.port), timeout=10) for _ in range(3)]
        try:
            assert b'"connections": 2.0' in _ask(pub.port)  # answered although 3 idle sockets came first
            assert _closed_by_peer(idle[0], timeout=30)  # the oldest went first
            assert pub.evicted >= 2 and pub.open_connections <= 2
            for _ in range(600):
                if pub.open_connections == 0:
                    break
                time.sleep(0.05)
            assert pub.open_connections == 0 and pub.timed_out >= 1
        finally:
            for sock in idle:
                sock.close()

    def broken() -> float:
        raise RuntimeError("no count")

    with LoadPublisher("b1", broken) as pub:
        assert _ask(pub.port).startswith(b"HTTP/1.0 500")


def test_reader_leaves_out_huge_and_trickling_peers_and_never_piles_up_asks() -> None:
    with _process("huge") as (_, huge), _process("trickle") as (_, trickle), \
            LoadPublisher("good", lambda: 3.0) as good:
        peers = [f"127.0.0.1:{huge}"] + [f"127.0.0.1:{trickle}"] * 1 + [f"127.0.0.1:{good.port}"]
        view = PeerFleetView("b1", lambda: 1.0, peers, timeout=0.5)
        done = threading.Event()

        def polls() -> None:
            for _ in range(3):
                view.poll_once()
                snap = view.snapshot()
                assert snap is not None and {s.name for s in snap.servers} == {"b1", "good"}
            done.set()

        try:
            thread = threading.Thread(target=polls, daemon=True)
            thread.start()
            # Three polls of a 0.5 s timeout: never stuck on the peer that trickles for ever.
            assert done.wait(60), "a poll waited on a peer past its timeout"
            thread.join()
            assert f"{MAX_LOAD_BYTES}" in view.left_out[f"127.0.0.1:{huge}"]
            assert "time" in view.left_out[f"127.0.0.1:{trickle}"].lower()
        finally:
            view.close()
