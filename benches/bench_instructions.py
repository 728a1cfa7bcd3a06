"""Every overhead ratio of goaway_ext in ONE table, each with its target (``make bench``).

Instruction rows are deterministic: the measured process runs under
``valgrind --tool=callgrind`` twice, once for a short and once for a long run
of the same work, and the difference divided by the extra work is the cost of
one unit, so interpreter start-up, imports and shutdown cancel. Wall-clock
noise on a shared machine (±20% between rounds) does not move them.

- in memory, server side: recorded client bytes (handshake, then one GET per
  chunk) are replayed into ``ServerConnection`` and into ``H2Connection``; the
  server answers each request. Chance 0, chance 0.001 (a seed whose first
  drain lies beyond the run, so the sampler counts down without firing), and
  chance 0.001 with ``serve``'s ``/stats`` decider.
- in memory, client side: recorded server bytes replayed into ``ClientConnection``
  and ``H2Connection`` sending the GETs; the client + server pair row is the sum
  of both sides (chance 0.001, no drain), each measured in its own process as
  in real use (in one process the two classes share h2's specialised bytecode
  and slow each other down, which no deployment pays).
- ``serve`` against ``serve --plain-h2`` (same asyncio server, h2's own
  connection): per request on one connection, and per connection lifecycle
  (connect, handshake, one GET, close). A Python h2 client outside valgrind
  drives real sockets on 127.0.0.1.
- hypercorn + goaway_ext against stock hypercorn: the same two rows, from
  ``bench_hypercorn_cost.py`` (its server and client).
- bytes per idle connection: ``tracemalloc`` of one connection object after
  its handshake and one request (in memory), RSS of ``serve`` holding N idle
  connections, tracemalloc of the hypercorn worker holding N.
- the load generator: instructions per request at ``-c 1 -m 1`` of ``python -m
  goaway_ext load`` (fast and h2 engines), of h2load, and of ``serve`` itself
  (is the client cheap enough that the server is the bottleneck?); then
  interleaved rounds at ``-c 10 -m 10`` with ``serve`` and the client pinned to
  separate cores: each client's CPU per request against ``serve``'s in the same
  run, and req/s against h2load's (best/best and the median of paired rounds).
- wall-clock rows (best of interleaved rounds): ``Sampler.sample()`` against
  ``random.random() < p``, ``encode_goaway`` against hyperframe, the scanner
  against its pure twin; and the size of the compiled module.

Usage: python benches/bench_instructions.py [--quick] [--only ROW-PREFIX ...] [--idle N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"bench")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"5")]
CHANCE = 0.001


# -- what runs under valgrind ----------------------------------------------------------------


def _no_drain_seed(requests: int) -> int:
    """A policy seed whose first connection draws no drain within ``requests`` requests at CHANCE."""
    from goaway_ext import _core_py

    for seed in range(1, 10_000):
        conn_seed = random.Random(seed).getrandbits(64)
        if _core_py.Sampler(CHANCE, seed=conn_seed)._countdown > requests + 10:
            return seed
    raise RuntimeError("no seed found")


def _server_factory(variant: str, requests: int) -> Callable[[], Any]:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from goaway_ext import GoawayPolicy, ServerConnection
    from goaway_ext.asyncio_server import exempt_stats

    if variant == "plain":
        return lambda: H2Connection(H2Configuration(client_side=False, header_encoding=None))
    seed = _no_drain_seed(requests)
    policies = {
        "chance0": GoawayPolicy(0.0),
        "chance": GoawayPolicy(CHANCE, seed=seed),
        "decider": GoawayPolicy(CHANCE, seed=seed, decider=exempt_stats),
    }
    policy = policies[variant]
    return lambda: ServerConnection(policy=policy)


def run_replay(variant: str, count: int, recording: str) -> None:
    """Server side only: replay the first ``count`` recorded request chunks."""
    from h2.events import RequestReceived

    with open(recording, "rb") as file:
        chunks: list[bytes] = pickle.load(file)["client"]
    server = _server_factory(variant, len(chunks))()
    server.initiate_connection()
    server.data_to_send()
    for chunk in chunks[: 2 + count]:
        for event in server.receive_data(chunk):
            if event.__class__ is RequestReceived:
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello", end_stream=True)
        server.data_to_send()
    if getattr(server, "is_draining", False):
        raise SystemExit("the server started a drain: the row would measure a drain, not the hot path")


def run_client_replay(variant: str, count: int, recording: str) -> None:
    """Client side only: send ``count`` GETs, read the recorded server bytes for each."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived

    from goaway_ext import ClientConnection

    with open(recording, "rb") as file:
        chunks: list[bytes] = pickle.load(file)["server"]
    if variant == "loadwire":
        run_loadwire_replay(count, chunks)
        return
    config = H2Configuration(client_side=True, header_encoding=None)
    if variant == "h2engine":  # the load generator's h2 engine: validation off
        from goaway_ext.loadgen import _config

        config = _config()
    client = H2Connection(config) if variant == "plain" else ClientConnection(config)
    client.initiate_connection()
    client.data_to_send()
    for chunk in chunks[:2]:
        client.receive_data(chunk)
        client.data_to_send()
    for chunk in chunks[2 : 2 + count]:
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST, end_stream=True)
        client.data_to_send()
        for event in client.receive_data(chunk):
            if event.__class__ is DataReceived:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


def run_loadwire_replay(count: int, chunks: list[bytes]) -> None:
    """The load generator's fast wire on the same recorded server bytes: send a GET, read its response."""
    from goaway_ext._loadwire import ENDED, LoadWire

    wire = LoadWire(REQUEST)
    wire.data_to_send()
    for chunk in chunks[:2]:
        wire.receive(chunk)
        wire.data_to_send()
    for chunk in chunks[2 : 2 + count]:
        stream_id = wire.send_request()
        wire.data_to_send()
        if wire.receive(chunk) != [(ENDED, stream_id, b"200")]:
            raise SystemExit(f"the fast wire misread the response on stream {stream_id}")


def record(path: Path, requests: int) -> None:
    """Bytes for the replays: each side's handshake, then one chunk per GET (client) and per response (server)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, RequestReceived

    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    chunks: list[bytes] = []
    answers: list[bytes] = []
    for _ in range(2):
        chunks.append(client.data_to_send())
        server.receive_data(chunks[-1])
        answers.append(server.data_to_send())
        client.receive_data(answers[-1])
    for _ in range(requests):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST, end_stream=True)
        chunks.append(client.data_to_send())
        for event in server.receive_data(chunks[-1]):
            if isinstance(event, RequestReceived):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello", end_stream=True)
        answers.append(server.data_to_send())
        for event in client.receive_data(answers[-1]):
            if isinstance(event, DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    path.write_bytes(pickle.dumps({"client": chunks, "server": answers}))


# -- callgrind plumbing ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONHASHSEED="0",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _callgrind(argv: list[str], tmp: Path) -> int:
    out = tmp / f"cg-{time.monotonic_ns()}.out"
    subprocess.run(["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={out}",
                    sys.executable, *argv], check=True, env=_env(), timeout=1800)
    return _total(out)


# Memory layout moves per-request counts by about ±0.2% (h2 looks classes up in
# dicts whose probe counts depend on object addresses; an unrelated import shifts
# them), which is the size of the targets. Each in-memory row is therefore the
# mean over LAYOUTS runs whose start-up allocates a different amount first.
LAYOUTS = (0, 1, 2)


def in_process_per_unit(mode: str, variant: str, short: int, long: int, tmp: Path, *extra: str) -> float:
    values = []
    for pad in LAYOUTS:
        counts = [_callgrind([str(HERE), "_run", mode, variant, str(n), *extra, f"--pad={pad}"], tmp)
                  for n in (short, long)]
        values.append((counts[1] - counts[0]) / (long - short))
    return sum(values) / len(values)


class Serve:
    """``python -m goaway_ext serve`` (chance 0, like the h2load rows) in a subprocess, maybe under valgrind.

    With ``pad``, the process first allocates a little (see LAYOUTS) and then
    runs the same ``serve`` command line.
    """

    def __init__(self, plain: bool, wrapper: list[str], pad: int | None = None) -> None:
        start = ["-m", "goaway_ext"] if pad is None else [str(HERE), "_serve", f"--pad={pad}"]
        command = [*wrapper, sys.executable, *start, "serve", "--port", "0", "--chance", "0",
                   "--log-level", "WARNING", *(["--plain-h2"] if plain else [])]
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.errors, text=True, env=_env())
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on"):
            self.process.kill()
            self.process.wait()
            self.errors.seek(0)
            raise RuntimeError(f"serve did not start: {line!r} {self.errors.read()[-2000:]}")
        self.port = int(line.strip().rsplit(":", 1)[1])

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_per_unit(plain: bool, work: Callable[[int, int], None], short: int, long: int, tmp: Path,
                   layouts: tuple[int, ...] | None = None) -> float:
    """Instructions of ``serve`` per unit of ``work``; with ``layouts``, the mean over those memory layouts."""
    values = []
    for pad in layouts or (None,):
        counts = []
        for amount in (short, long):
            out = tmp / f"serve-{plain}-{amount}-{time.monotonic_ns()}.out"
            server = Serve(plain, ["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={out}"], pad)
            try:
                work(server.port, amount)
            finally:
                server.stop()
            counts.append(_total(out))
        values.append((counts[1] - counts[0]) / (long - short))
    return sum(values) / len(values)


def serve_lifecycles(port: int, count: int) -> None:
    """``count`` connections one after the other: preface, SETTINGS and one GET in one write, the response, close.

    The client's answers to the server's frames (SETTINGS ACK, WINDOW_UPDATE)
    go out in one write just before the close, so every connection reaches
    the server in the same reads whatever the timing: the request, then the
    answers and the end of the stream. (Sent as soon as they are due, they
    land in the same read as the FIN or in a read of their own depending on
    the event loop's timing, which moved this row by a few percent.)
    """
    import bench_hypercorn_cost as hc
    import h2.events

    for _ in range(count):
        connection = hc._client_connection()
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, REQUEST, end_stream=True)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connection.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    ended = True
        sock.sendall(connection.data_to_send())
        _close_after_server(sock)


def serve_requests(port: int, count: int) -> None:
    """``count`` GETs one after the other on one connection, then the close (see :func:`_close_after_server`)."""
    import bench_hypercorn_cost as hc

    sock, connection = hc._open(port)
    for _ in range(count):
        hc._get(sock, connection)
    _close_after_server(sock)


def _close_after_server(sock: socket.socket) -> None:
    """Send our FIN, wait for the server's, then close: no connection of ours is open when ``serve`` is stopped.

    A connection still open at SIGTERM is drained by the shutdown, and the close
    of a drained connection reports to the metrics, whose first use imports
    prometheus_client (~110M instructions). Whether that happened depended on
    timing and landed in one run of a short/long pair only: the start-up
    differences of 110M that made earlier lifecycle figures unusable.
    """
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(600)
    while sock.recv(65536):
        pass
    sock.close()


# -- memory ---------------------------------------------------------------------------------


def connection_bytes(variant: str, count: int = 500) -> float:
    """tracemalloc bytes per server connection object, after its handshake and one request."""
    import gc
    import tracemalloc

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import RequestReceived

    make = _server_factory(variant, 10)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, REQUEST, end_stream=True)
    hello = client.data_to_send()

    def one() -> Any:
        server = make()
        server.initiate_connection()
        for event in server.receive_data(hello):
            if event.__class__ is RequestReceived:
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, b"hello", end_stream=True)
        server.data_to_send()
        return server

    held = [one() for _ in range(20)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held += [one() for _ in range(count)]
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def serve_idle_rss(plain: bool, count: int) -> float:
    import bench_hypercorn_cost as hc

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Serve(plain, [])
    held: list[tuple[socket.socket, Any]] = []
    try:
        for _ in range(20):
            held.append(hc._open(server.port))
            hc._get(*held[-1])
        time.sleep(0.2)
        before = server.rss()
        for _ in range(count):
            held.append(hc._open(server.port))
            hc._get(*held[-1])
        time.sleep(0.5)
        after = server.rss()
    finally:
        for sock, _ in held:
            sock.close()
        server.stop()
    return (after - before) / count


# -- wall-clock rows ---------------------------------------------------------------------------


def wall_core() -> dict[str, float]:
    """Ratios from the core micro-benchmarks (compiled core; best of interleaved rounds)."""
    import struct

    from _timing import best_per_call
    from hyperframe.frame import GoAwayFrame

    from goaway_ext import _core_c, _core_py

    rand = random.random
    sample = _core_c.Sampler(CHANCE, seed=1).sample
    encode = _core_c.encode_goaway

    def baseline(n: int) -> None:
        for _ in range(n):
            rand() < CHANCE  # noqa: B015

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    def sampled(n: int) -> None:
        for _ in range(n):
            sample()

    def hyper(n: int) -> None:
        for _ in range(n):
            GoAwayFrame(0, last_stream_id=12345, error_code=0).serialize()

    def ours(n: int) -> None:
        for _ in range(n):
            encode(12345)

    times = best_per_call({"random": baseline, "empty": empty, "sample": sampled, "hyper": hyper, "encode": ours},
                          300_000)
    decision = (times["sample"] - times["empty"]) / (times["random"] - times["empty"])

    import bench_scanner as bs

    worst = float("inf")
    for pieces in ([bs.mixed_frames(True)], bs.chunks(bs.mixed_frames(True), 4096),
                   bs.chunks(bs.mixed_frames(False), 16384)):
        def run(n: int, core: Any, pieces: list[bytes] = pieces) -> None:
            for _ in range(n):
                feed = core.FrameScanner().feed
                for piece in pieces:
                    feed(piece)

        scan = best_per_call({"c": lambda n, p=pieces: run(n, _core_c, p),
                              "py": lambda n, p=pieces: run(n, _core_py, p)}, 20)
        worst = min(worst, scan["py"] / scan["c"])
    # The load generator's split_frames on a read of 10 responses as serve writes them.
    response = (b"\x00\x00\x04\x01\x04\x00\x00\x00\x01\x88\xbf\xbe\xbd"
                b"\x00\x00\x0e\x00\x01\x00\x00\x00\x01hello from b1\n")
    read = response * 10

    def split(n: int, core: Any) -> None:
        cut = core.split_frames
        for _ in range(n):
            cut(read)

    cut = best_per_call({"c": lambda n: split(n, _core_c), "py": lambda n: split(n, _core_py)}, 2000)
    _ = struct
    return {"decision": decision, "encode": times["hyper"] / times["encode"], "scanner": worst,
            "split": cut["py"] / cut["c"], "split_c": cut["c"]}


# -- the load generator ------------------------------------------------------------------------

# The clients compared on the same ``serve`` (chance 0): our load generator's two engines and h2load.
LOAD_CLIENTS = ("load", "load --engine h2", "h2load")


def _client_argv(name: str, url: str, requests: int, connections: int, streams: int) -> list[str]:
    counts = ["-n", str(requests), "-c", str(connections), "-m", str(streams)]
    if name == "h2load":
        return ["h2load", *counts, url]
    engine = ["--engine", "h2"] if name.endswith("h2") else []
    return [sys.executable, "-m", "goaway_ext", "load", url, *counts, "--no-progress", *engine]


def _callgrind_command(argv: list[str], tmp: Path) -> int:
    out = tmp / f"cg-{time.monotonic_ns()}.out"
    subprocess.run(["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={out}", *argv], check=True,
                   env=_env(), timeout=1800, stdout=subprocess.DEVNULL)
    return _total(out)


def load_instructions(short: int, long: int, tmp: Path) -> dict[str, float]:
    """Instructions per request at ``-c 1 -m 1`` of each client (under callgrind, ``serve`` native) and of ``serve``.

    One stream at a time makes every request one read and one write whatever
    the speed of either side, so the count does not depend on how responses
    batch up under valgrind. ``serve``'s own row runs it under callgrind with
    h2load (native) as the client.
    """
    per: dict[str, float] = {}
    server = Serve(False, [])
    try:
        url = f"http://127.0.0.1:{server.port}/"
        for name in LOAD_CLIENTS:
            counts = [_callgrind_command(_client_argv(name, url, n, 1, 1), tmp) for n in (short, long)]
            per[name] = (counts[1] - counts[0]) / (long - short)
    finally:
        server.stop()

    for client, key in (("h2load", "serve"), ("load", "serve driven by load")):
        def work(port: int, amount: int, client: str = client) -> None:
            subprocess.run(_client_argv(client, f"http://127.0.0.1:{port}/", amount, 1, 1), check=True,
                           stdout=subprocess.DEVNULL, timeout=600, env=_env())

        per[key] = serve_per_unit(False, work, short, long, tmp)
    return per


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_rounds(rounds: int, requests: int) -> dict[str, Any]:
    """Interleaved rounds of each client against one ``serve`` at chance 0, ``-c 10 -m 10``.

    ``serve`` is pinned to core 0 and the client to core 1 (``taskset``, when
    there are two cores), as h2load and a server would be on a real test bed.
    In each round every client makes a short and a long run: req/s comes from
    the long one; CPU per request (the client's getrusage, ``serve``'s /proc)
    is the difference between the two divided by the extra requests, so the
    client's start-up (interpreter, imports, connections) cancels.
    """
    import re

    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    server = Serve(False, ["taskset", "-c", "0"] if pinned else [])
    short = requests // 10
    rps: dict[str, list[float]] = {name: [] for name in LOAD_CLIENTS}
    cpu: dict[str, list[float]] = {name: [] for name in LOAD_CLIENTS}
    serve_cpu: dict[str, list[float]] = {name: [] for name in LOAD_CLIENTS}

    def one(name: str, url: str, count: int) -> tuple[float, float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        served = _process_cpu(server.process.pid)
        argv = _client_argv(name, url, count, 10, 10)
        done = subprocess.run((["taskset", "-c", "1"] if pinned else []) + argv, capture_output=True, text=True,
                              timeout=900, env=_env())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        served = _process_cpu(server.process.pid) - served
        failed = re.search(r"(\d+) failed", done.stdout)
        rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)
        if failed is None or int(failed.group(1)) or rate is None:
            raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
        return float(rate.group(1)), after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, served

    try:
        url = f"http://127.0.0.1:{server.port}/"
        subprocess.run(_client_argv("h2load", url, requests // 4, 10, 10), check=True, stdout=subprocess.DEVNULL)
        for i in range(rounds):
            order = list(LOAD_CLIENTS) if i % 2 == 0 else list(reversed(LOAD_CLIENTS))
            for name in order:
                _, client_short, serve_short = one(name, url, short)
                rate, client_long, serve_long = one(name, url, requests)
                rps[name].append(rate)
                cpu[name].append((client_long - client_short) / (requests - short) * 1e6)
                serve_cpu[name].append((serve_long - serve_short) / (requests - short) * 1e6)
    finally:
        server.stop()
    return {"rps": rps, "cpu": cpu, "serve_cpu": serve_cpu, "pinned": pinned}


def module_size() -> tuple[int, bool] | None:
    try:
        from goaway_ext import _core_c
    except ImportError:
        return None
    data = Path(_core_c.__file__ or "").read_bytes()
    return len(data), b".symtab" not in data and b".debug_info" not in data


# -- the table ----------------------------------------------------------------------------------


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def add(self, what: str, base: str, ours: str, ratio: float | None, target: str, ok: bool | None) -> None:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        ratio_text = "-" if ratio is None else f"{ratio:.4f}"
        self.rows.append((what, base, ours, ratio_text, target, verdict))
        print(f"  {what}: {base} | {ours} | {ratio_text} | {target} {verdict}", flush=True)

    def print(self) -> None:
        print()
        print("| what | baseline | goaway_ext | ratio | target | |")
        print("|---|---|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def kinstr(value: float) -> str:
    return f"{value / 1e3:,.1f}k instr"


def ensure_valgrind() -> bool:
    if shutil.which("valgrind"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing Debian valgrind", flush=True)
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind",
                       shell=True, check=False, stdout=subprocess.DEVNULL)
    return shutil.which("valgrind") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (less exact)")
    parser.add_argument("--only", nargs="*", default=None, help="only rows whose group starts with these words")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections held for the RSS rows")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    def want(group: str) -> bool:
        return args.only is None or any(group.startswith(word) for word in args.only)

    table = Table()
    short, long = (100, 600) if args.quick else (200, 1200)
    have_valgrind = ensure_valgrind()
    # Byte-compile first: after a source edit, the first measured process would
    # compile the changed modules (~100M instructions with the asyncio server)
    # in its short run only, which skewed a per-unit figure by up to 0.5M.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "goaway_ext"), str(HERE.parent)],
                   check=False, stdout=subprocess.DEVNULL)
    if not have_valgrind:
        print("valgrind is not installed (apt-get install valgrind): instruction rows skipped")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if have_valgrind and want("memory"):
            recording = tmp / "client.bin"
            record(recording, long + 10)
            base = server_plain = in_process_per_unit("replay", "plain", short, long, tmp, str(recording))
            server_chance = base
            for variant, title, target in (("chance0", "chance 0", None), ("chance", f"chance {CHANCE}", None),
                                           ("decider", f"chance {CHANCE} + serve's /stats decider", 1.003)):
                ours = in_process_per_unit("replay", variant, short, long, tmp, str(recording))
                if variant == "chance":
                    server_chance = ours
                verdict = None if target is None else ours / base <= target
                table.add(f"server per request, in memory, {title}", kinstr(base), kinstr(ours), ours / base,
                          f"<= {target}" if target else "(no target)", verdict)
            # Each side in its own process, as in real use: in one process h2's code would
            # see two classes at every call site and its specialised bytecode would thrash
            # (measured: +22k instructions per request that no real deployment pays).
            client_base = in_process_per_unit("client", "plain", short, long, tmp, str(recording))
            client_ours = in_process_per_unit("client", "ours", short, long, tmp, str(recording))
            table.add("client per request, in memory (ClientConnection vs H2Connection)", kinstr(client_base),
                      kinstr(client_ours), client_ours / client_base, "(no target)", None)
            base = client_base + server_plain
            ours = client_ours + server_chance
            table.add(f"client + server pair per request (sum of both sides), chance {CHANCE}", kinstr(base),
                      kinstr(ours), ours / base, "<= 1.004", ours / base <= 1.004)
        if have_valgrind and want("load"):
            recording = tmp / "load.bin"
            record(recording, long + 10)
            engine = in_process_per_unit("client", "h2engine", short, long, tmp, str(recording))
            fast = in_process_per_unit("client", "loadwire", short, long, tmp, str(recording))
            table.add("`load` protocol work per request, in memory: fast wire vs its h2 engine (ClientConnection)",
                      kinstr(engine), kinstr(fast), fast / engine, "(no target)", None)
        if have_valgrind and want("serve"):
            import bench_hypercorn_cost as hc

            # Three memory layouts each (as the in-memory rows), and the lifecycle
            # client writes so that the server's reads do not depend on timing.
            rows = [("per request (1 connection, sequential GETs; three layouts)", serve_requests, 50,
                     250 if args.quick else 550, 1.003),
                    ("per connection lifecycle (connect, handshake, 1 GET, close; three layouts)", serve_lifecycles,
                     20, 120 if args.quick else 220, 1.02)]
            for title, work, a, b, target in rows:
                base = serve_per_unit(True, work, a, b, tmp, LAYOUTS)
                ours = serve_per_unit(False, work, a, b, tmp, LAYOUTS)
                table.add(f"serve vs serve --plain-h2, {title}", kinstr(base), kinstr(ours), ours / base,
                          f"<= {target}", ours / base <= target)
        if have_valgrind and want("hypercorn"):
            import bench_hypercorn_cost as hc

            rows = [("per request (1 connection, sequential GETs)", hc.requests, 50, 250 if args.quick else 550,
                     1.003),
                    ("per connection lifecycle (connect, handshake, 1 GET, close)", hc.lifecycles, 20,
                     100 if args.quick else 220, 1.03)]
            for title, work, a, b, target in rows:
                # Real sockets, the worker under callgrind, three memory layouts (hc.LAYOUTS).
                base = hc.per_unit("stock", work, a, b, hc.LAYOUTS)
                ours = hc.per_unit("goaway", work, a, b, hc.LAYOUTS)
                table.add(f"hypercorn + goaway_ext vs stock, {title}, real sockets, 3 layouts", kinstr(base),
                          kinstr(ours), ours / base, f"<= {target}", ours / base <= target)
    if want("idle"):
        base = connection_bytes("plain")
        ours = connection_bytes("decider")
        table.add("bytes per connection object (tracemalloc, after handshake + 1 request)", f"{base / 1024:.2f} KiB",
                  f"{ours / 1024:.2f} KiB", ours / base, "(no target)", None)
        base = serve_idle_rss(True, args.idle)
        ours = serve_idle_rss(False, args.idle)
        table.add(f"serve, RSS per idle connection ({args.idle} held)", f"{base / 1024:.2f} KiB",
                  f"{ours / 1024:.2f} KiB (+{(ours - base) / 1024:.2f})", ours / base, "(no target)", None)
        try:
            import hypercorn  # noqa: F401
        except ImportError:
            print("hypercorn not installed: its memory row skipped")
        else:
            import bench_hypercorn_cost as hc

            stock = hc.idle_memory("stock", args.idle)[0]
            ours = hc.idle_memory("goaway", args.idle)[0]
            table.add(f"hypercorn, tracemalloc per idle connection ({args.idle} held)", f"{stock / 1024:.2f} KiB",
                      f"{ours / 1024:.2f} KiB (+{(ours - stock) / 1024:.2f})", ours / stock,
                      "<= +1 KiB", ours - stock <= 1024)
    if want("core"):
        size = module_size()
        if size is not None:
            table.add("compiled module size (stripped?)", "824 KB unstripped (before)",
                      f"{size[0] / 1024:.0f} KB, {'stripped' if size[1] else 'NOT stripped'}", None, "stripped",
                      size[1])
            core = wall_core()
            table.add("Sampler.sample() vs random.random() < p (wall, loop removed)", "1.0", "-",
                      core["decision"], "<= 0.6", core["decision"] <= 0.6)
            table.add("encode_goaway: hyperframe time / ours (wall)", "1.0", "-", core["encode"], ">= 20",
                      core["encode"] >= 20)
            table.add("scanner: pure twin time / compiled, worst input (wall)", "1.0", "-", core["scanner"],
                      ">= 10", core["scanner"] >= 10)
            table.add("split_frames (load's response reader), 10 responses per read: pure twin time / compiled "
                      f"(wall; compiled {core['split_c'] * 1e6:.2f} us)", "1.0", "-", core["split"], "(no target)",
                      None)
    if want("load"):
        import statistics

        if shutil.which("h2load") is None:
            print("h2load not installed: the load rows skipped")
        else:
            engines = (("load", "fast engine", "<= 0.5"), ("load --engine h2", "h2 engine (before: h2 per request)",
                                                            None))
            if have_valgrind:
                with tempfile.TemporaryDirectory() as tmpdir:
                    per = load_instructions(*((100, 600) if args.quick else (200, 1200)), Path(tmpdir))
                table.add("`serve` instructions per request, -c 1 -m 1: driven by `load` vs by h2load (the "
                          "server's cost of our requests)", kinstr(per["serve"]), kinstr(per["serve driven by load"]),
                          per["serve driven by load"] / per["serve"], "(no target)", None)
                for name, label, target in engines:
                    ratio = per[name] / per["serve"]
                    table.add(f"`load` {label}, instructions per request, -c 1 -m 1, vs `serve`'s "
                              f"(h2load: {kinstr(per['h2load'])})", kinstr(per["serve"]), kinstr(per[name]), ratio,
                              target or "(before)", None if target is None else ratio <= 0.5)
            measured = load_rounds(2 if args.quick else 5, 5000 if args.quick else 20000)
            rps, cpu, serve_cpu = measured["rps"], measured["cpu"], measured["serve_cpu"]
            pinning = "serve and client pinned to separate cores" if measured["pinned"] else "not pinned"
            for name, label, target in engines:
                mine, theirs = statistics.median(cpu[name]), statistics.median(serve_cpu[name])
                table.add(f"`load` {label}, CPU per request vs `serve`'s in the same runs, -c 10 -m 10 (median)",
                          f"{theirs:.1f} us (under h2load: {statistics.median(serve_cpu['h2load']):.1f} us)",
                          f"{mine:.1f} us (h2load: {statistics.median(cpu['h2load']):.1f} us)",
                          mine / theirs, target or "(before)", None if target is None else mine / theirs <= 0.5)
                paired = statistics.median(a / b for a, b in zip(rps[name], rps["h2load"], strict=True))
                best = max(rps[name]) / max(rps["h2load"])
                table.add(f"`load` {label} vs h2load req/s, chance 0, -c 10 -m 10, {pinning} "
                          f"(best/best; median of paired rounds {paired:.3f})", f"{max(rps['h2load']):,.0f} req/s",
                          f"{max(rps[name]):,.0f} req/s", best, ">= 0.9" if target else "(before)",
                          min(best, paired) >= 0.9 if target else None)
    table.print()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_serve":
        # ``serve`` in a memory layout of its own (Serve with pad): allocate, then the command line.
        import runpy

        _layout = [bytes(48 + 16 * (i % 7)) for i in range(int(sys.argv[2].split("=", 1)[1]) * 3001)]
        sys.argv = ["goaway_ext", *sys.argv[3:]]
        runpy.run_module("goaway_ext", run_name="__main__", alter_sys=True)
    elif len(sys.argv) >= 5 and sys.argv[1] == "_run":
        pads = [int(arg.split("=", 1)[1]) for arg in sys.argv if arg.startswith("--pad=")]
        sys.argv = [arg for arg in sys.argv if not arg.startswith("--pad=")]
        _layout = [bytes(48 + 16 * (i % 7)) for i in range(pads[0] * 3001)] if pads else []
        mode, variant, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if mode == "replay":
            run_replay(variant, count, sys.argv[5])
        else:
            run_client_replay(variant, count, sys.argv[5])
    else:
        asyncio.set_event_loop_policy(None)
        main()
