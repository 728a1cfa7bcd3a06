"""Receive-path overhead of ``ClientConnection`` against a plain ``h2`` ``H2Connection``.

Baseline: ``h2.connection.H2Connection`` (client side) receiving the same
recorded server bytes. Target: ``ClientConnection`` at most 1.02x the
baseline's time. The bytes are a server's answers to 40 streams (HEADERS, then
four 256-byte DATA frames each, like a chatty API or a watch), read in 16 KiB
chunks; each round replays them into a fresh connection that has opened the
same streams, and only ``receive_data`` is timed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import h2.config
import h2.connection

from goaway_ext import CORE, ClientConnection

STREAMS = 40
CHUNK = 16384
ROUNDS = 1000
TARGET = 1.02
REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "bench")]


def plain() -> h2.connection.H2Connection:
    return h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))


def prepare(factory: Callable[[], h2.connection.H2Connection]) -> h2.connection.H2Connection:
    conn = factory()
    conn.initiate_connection()
    for i in range(STREAMS):
        conn.send_headers(2 * i + 1, REQUEST, end_stream=True)
    conn.data_to_send()
    return conn


def record() -> list[bytes]:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(_client_bytes())
    for i in range(STREAMS):
        stream_id = 2 * i + 1
        server.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json")])
        for part in range(4):
            server.send_data(stream_id, bytes([65 + part]) * 256, end_stream=part == 3)
    wire = server.data_to_send()
    return [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)]


def _client_bytes() -> bytes:
    conn = plain()
    conn.initiate_connection()
    for i in range(STREAMS):
        conn.send_headers(2 * i + 1, REQUEST, end_stream=True)
    return conn.data_to_send()


def time_once(factory: Callable[[], h2.connection.H2Connection], chunks: list[bytes]) -> float:
    conn = prepare(factory)
    receive = conn.receive_data
    gc.disable()  # a collection landing in one candidate's run is noise, not overhead
    try:
        start = time.perf_counter()
        for chunk in chunks:
            receive(chunk)
        return time.perf_counter() - start
    finally:
        gc.enable()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{ROUNDS // 4} rounds instead of {ROUNDS} (make bench)")
    return parser.parse_args(argv)


def main() -> None:
    rounds = ROUNDS // 4 if parse_args().quick else ROUNDS
    chunks = record()
    samples: dict[str, list[float]] = {"H2Connection": [], "ClientConnection": []}
    paired: list[float] = []
    for i in range(rounds):
        # Adjacent runs share the machine's momentary load; alternate the order.
        order = [("H2Connection", plain), ("ClientConnection", ClientConnection)]
        if i % 2:
            order.reverse()
        times = {name: time_once(factory, chunks) for name, factory in order}
        for name, value in times.items():
            samples[name].append(value)
        paired.append(times["ClientConnection"] / times["H2Connection"])
    size = sum(map(len, chunks))
    print(f"receive path: {STREAMS} responses, {size:,} bytes in {len(chunks)} reads, {rounds} rounds (core: {CORE})")
    base_best = min(samples["H2Connection"])
    for name, values in samples.items():
        best = min(values)
        print(f"  {name:<18} best {best * 1e6:8.1f} us   median {statistics.median(values) * 1e6:8.1f} us   "
              f"{best / base_best:5.3f}x of H2Connection (best vs best)")
    ratio = statistics.median(paired)
    verdict = "meets" if ratio <= TARGET else "MISSES"
    print(f"ClientConnection / H2Connection, median of {rounds} paired runs: {ratio:.3f}x — "
          f"{verdict} the <= {TARGET}x target")


if __name__ == "__main__":
    sys.exit(main())
