"""Server benchmarks: what ServerConnection costs per request, against plain h2.

1. In memory: the same request/response loop (h2 client <-> server, no sockets)
   on ``ServerConnection(policy chance 0.001)`` and on h2's ``H2Connection``.
   Rounds are interleaved and the best round of each is compared, so machine
   noise hits both sides alike. Target: ratio <= 1.01.
2. Over TCP: ``h2load`` requests/s against ``python -m goaway_ext serve`` with
   ``ServerConnection`` (chance 0: h2load does not follow GOAWAY) and against
   the same server on plain ``H2Connection`` (hidden ``--plain-h2``), runs
   interleaved, best of each. Target: ratio >= 0.99. Skipped without h2load.

Usage: python benches/bench_server.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import shutil
import signal
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from _h2load import h2load_rps
from h2.config import H2Configuration
from h2.connection import H2Connection

from goaway_ext import CORE, FrameScanner, GoawayPolicy, ServerConnection

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"bench")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"5")]


def _pair(make_server: object) -> tuple[H2Connection, H2Connection, FrameScanner]:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server: H2Connection = make_server()  # type: ignore[operator]
    scanner = FrameScanner()
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server, scanner


def _loop(make_server: object, requests: int, state: list[object]) -> float:
    """Time ``requests`` request/response exchanges; a drained connection is replaced (cost included)."""
    if not state:
        state.extend(_pair(make_server))
    client, server, scanner = state  # type: ignore[misc]
    start = time.perf_counter()
    for _ in range(requests):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        for event in server.receive_data(client.data_to_send()):
            if event.__class__.__name__ == "RequestReceived":
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello", end_stream=True)
        data, _ = scanner.feed(server.data_to_send())
        for event in client.receive_data(data):
            if event.__class__.__name__ == "DataReceived":
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if getattr(server, "is_draining", False):
            client.receive_data(scanner.feed(server.data_to_send())[0])
            state[:] = _pair(make_server)
            client, server, scanner = state  # type: ignore[misc]
    return (time.perf_counter() - start) / requests


def _plain() -> H2Connection:
    return H2Connection(H2Configuration(client_side=False, header_encoding=None))


_POLICY = GoawayPolicy(0.001, seed=1)


def _ours() -> ServerConnection:
    return ServerConnection(policy=_POLICY)


def _worker(kind: str, pipe: Connection) -> None:
    """One variant per process: CPython's inline caches then see one class only, as in a real server."""
    make = _ours if kind == "ours" else _plain
    state: list[object] = []
    while (requests := pipe.recv()) > 0:
        gc.collect()
        pipe.send(_loop(make, requests, state))


def bench_in_memory(rounds: int, per_round: int) -> None:
    # Each variant runs in its own process and the rounds alternate between them, so load
    # on the machine hits both alike; in one process the two classes would share h2's
    # specialised call sites and slow each other down.
    context = multiprocessing.get_context("fork")
    pipes, procs = {}, []
    for kind in ("plain", "ours"):
        parent, child = context.Pipe()
        proc = context.Process(target=_worker, args=(kind, child), daemon=True)
        proc.start()
        pipes[kind] = parent
        procs.append(proc)
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    try:
        for kind in ("plain", "ours"):  # warm up
            pipes[kind].send(per_round)
            pipes[kind].recv()
        for index in range(rounds):
            order = ("plain", "ours") if index % 2 else ("ours", "plain")
            for kind in order:
                pipes[kind].send(per_round)
                times[kind].append(pipes[kind].recv())
    finally:
        for kind in pipes:
            pipes[kind].send(0)
        for proc in procs:
            proc.join(10)
    base, ext = times["plain"], times["ours"]
    ratios = sorted(e / b for e, b in zip(ext, base, strict=True))
    print(f"in-memory request/response, core={CORE}, {rounds} interleaved rounds x {per_round} requests")
    print(f"  baseline h2.H2Connection:            best {min(base) * 1e6:7.2f} us/request")
    print(f"  ServerConnection(chance=0.001):      best {min(ext) * 1e6:7.2f} us/request")
    print(f"  ratio vs H2Connection: best/best {min(ext) / min(base):.4f}x, "
          f"median of paired rounds {statistics.median(ratios):.4f}x (target <= 1.01x)")


def _start(*extra: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "goaway_ext", "serve", "--port", "0", "--chance", "0", "--log-level", "WARNING",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.strip().rsplit(":", 1)[1])


def bench_h2load(rounds: int, requests: int) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        print("h2load: skipped (install Debian package nghttp2-client)")
        return
    ours_proc, ours_port = _start()
    plain_proc, plain_port = _start("--plain-h2")
    try:
        h2load_rps(h2load, ours_port, requests // 4)
        h2load_rps(h2load, plain_port, requests // 4)
        ours, plain = [], []
        for _ in range(rounds):
            plain.append(h2load_rps(h2load, plain_port, requests))
            ours.append(h2load_rps(h2load, ours_port, requests))
    finally:
        for proc in (ours_proc, plain_proc):
            proc.send_signal(signal.SIGTERM)
        for proc in (ours_proc, plain_proc):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ratios = sorted(o / p for o, p in zip(ours, plain, strict=True))
    print(f"h2load -n {requests} -c 10 -m 10 against `serve` (asyncio), {rounds} interleaved rounds")
    print(f"  baseline serve --plain-h2 (h2.H2Connection): best {max(plain):9.0f} req/s")
    print(f"  serve with ServerConnection (chance 0):      best {max(ours):9.0f} req/s")
    print(f"  ratio vs plain H2Connection: best/best {max(ours) / max(plain):.4f}x, "
          f"median of paired rounds {statistics.median(ratios):.4f}x (target >= 0.99x)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (make bench)")
    return parser.parse_args(argv)


def main() -> None:
    quick = parse_args().quick
    bench_in_memory(rounds=10 if quick else 40, per_round=1000)
    bench_h2load(rounds=2 if quick else 7, requests=5000 if quick else 10000)


if __name__ == "__main__":
    main()
