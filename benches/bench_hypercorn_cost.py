"""What goaway_ext costs a hypercorn worker: instructions per request, per connection, bytes per idle connection.

Baseline: stock hypercorn (the same worker, ``hypercorn.asyncio.serve``, the
hook not installed). Candidate: the same worker with ``enable_goaway`` at
chance 0, the configuration whose connections never drain, so every
instruction it adds is overhead.

- Instructions (deterministic): the server runs under
  ``valgrind --tool=callgrind`` twice per row, once for a short and once for a
  long run of the same work; the difference divided by the extra work is the
  cost per unit, and start-up and shutdown cancel. A client process outside
  valgrind drives real sockets on 127.0.0.1. Rows: per request (one
  connection, sequential GETs) and per connection lifecycle (connect, HTTP/2
  handshake, one GET, client closes).
- Memory: the server (no valgrind) holds N idle HTTP/2 connections, each past
  its handshake and one GET; ``tracemalloc`` bytes and RSS are read before and
  after, per connection.

Usage::

    python benches/bench_hypercorn_cost.py [--quick] [--idle N] [--layouts 3] [--rows request,lifecycle,memory]

Targets (issue 14): per request <= 1.003x, per lifecycle <= 1.03x, idle
memory <= +1 KiB per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Five bytes for every request; lifespan is not used."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


# -- the server side (a subprocess) ----------------------------------------------------


def _install_bare_server_connection() -> None:
    """The floor: stock hypercorn whose h2 connection is swapped for a bare ``ServerConnection``.

    What ``ServerConnection`` itself costs per request, without the
    integration around it (no drain can run: nothing drives its timers).
    """
    import hypercorn.protocol
    from h2.config import H2Configuration
    from hypercorn.protocol.h2 import H2Protocol

    from goaway_ext import GoawayPolicy, ServerConnection

    policy = GoawayPolicy(0.0, max_requests=10**9)

    class Floor(H2Protocol):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            connection = ServerConnection(H2Configuration(client_side=False, header_encoding=None), policy=policy)
            connection.local_settings = self.connection.local_settings
            self.connection = connection

    hypercorn.protocol.H2Protocol = Floor  # type: ignore[attr-defined]



def serve(kind: str, fd: int, trace: bool, pad: int = 0) -> None:
    """Run one hypercorn asyncio worker on the inherited socket until SIGTERM.

    SIGUSR1 prints ``mem <tracemalloc bytes> <rss bytes>`` (tracemalloc only
    when ``trace``), which the memory row reads. ``pad`` (0, 1, 2 ...) moves
    every later allocation and type version tag (see :func:`shift_layout`), so
    repeating a row with other values averages out where things happen to land
    (see ``LAYOUTS``).
    """
    import tracemalloc

    layout = shift_layout(pad)

    if trace:
        tracemalloc.start()
    import hypercorn.asyncio
    from hypercorn.config import Config

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.keep_alive_timeout = 3600.0  # idle connections stay, on both servers
    config.keep_alive_max_requests = 10**9
    config.accesslog = None
    config.errorlog = None
    config.backlog = 4096
    # No date header, on both servers: its value changes every second, so how many
    # new HPACK table entries (and table searches) a run makes would depend on how
    # long it ran under valgrind. With it, two identical runs differed by up to 1.7%
    # per request, more than the target.
    config.include_date_header = False
    if kind == "goaway":
        from goaway_ext import GoawayPolicy
        from goaway_ext.hypercorn import enable_goaway

        enable_goaway(config, GoawayPolicy(0.0))
    elif kind == "floor":
        _install_bare_server_connection()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def report() -> None:
            traced = tracemalloc.get_traced_memory()[0] if trace else 0
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            print(f"mem {traced} {rss}", flush=True)

        loop.add_signal_handler(signal.SIGUSR1, report)
        print("ready", flush=True)
        await hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())
    del layout


def in_memory(kind: str, count: int, lifecycles: bool = False) -> None:
    """``count`` sequential requests through one protocol object, no sockets (deterministic).

    With ``lifecycles``, ``count`` protocol objects instead, each with its
    handshake, one request and its close.

    The client is a subclass of ``H2Connection`` for every kind, so h2's code
    sees two connection types in every variant alike (CPython specialises
    attribute access per type; one shared type would favour the baseline).
    """
    import h2.config
    import h2.connection
    import h2.events
    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.config import Config
    from hypercorn.events import Closed, RawData
    from hypercorn.protocol.h2 import H2Protocol
    from hypercorn.typing import ConnectionState

    class Client(h2.connection.H2Connection):
        pass

    config = Config()
    config.keep_alive_max_requests = 10**9
    config.include_date_header = False  # as in serve(): a run's length must not change its count
    protocol_class: Any = H2Protocol
    if kind == "goaway":
        from goaway_ext import GoawayPolicy
        from goaway_ext.hypercorn import GoawayH2Protocol, enable_goaway

        enable_goaway(config, GoawayPolicy(0.0))
        protocol_class = GoawayH2Protocol
    elif kind == "floor":
        import hypercorn.protocol

        _install_bare_server_connection()
        protocol_class = hypercorn.protocol.H2Protocol  # type: ignore[attr-defined]

    async def main() -> None:
        out = bytearray()

        async def send(event: Any) -> None:
            if isinstance(event, RawData):
                out.extend(event.data)

        context = WorkerContext(None)
        for _ in range(count if lifecycles else 1):
            out.clear()
            await one_connection(context, 1 if lifecycles else count, out, send)

    async def one_connection(context: Any, requests: int, out: bytearray, send: Any) -> None:
        client = Client(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        async with TaskGroup(asyncio.get_running_loop()) as task_group:
            protocol = protocol_class(ASGIWrapper(app), config, context, task_group,  # type: ignore[arg-type]
                                      ConnectionState({}), False, ("127.0.0.1", 1), ("127.0.0.1", 2), send)
            await protocol.initiate()
            await protocol.handle(RawData(client.data_to_send()))
            for _ in range(requests):
                stream_id = client.get_next_available_stream_id()
                client.send_headers(stream_id, _GET, end_stream=True)
                await protocol.handle(RawData(client.data_to_send()))
                ended = False
                while not ended:
                    await asyncio.sleep(0)
                    if not out:
                        continue
                    data = bytes(out)
                    out.clear()
                    for event in client.receive_data(data):
                        ended = ended or (isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id)
                    pending = client.data_to_send()
                    if pending:
                        await protocol.handle(RawData(pending))
            await protocol.handle(Closed())

    asyncio.run(main())


def in_memory_instructions(kind: str, count: int, lifecycles: bool = False) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(filter(None, [
            os.environ.get("PYTHONPATH"), str(ROOT)])))
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, str(HERE),
                   "_inmemory", kind, str(count), *(["lifecycles"] if lifecycles else [])]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return _callgrind_total(out)


# -- the client side (this process) ----------------------------------------------------


def _client_connection() -> Any:
    import h2.config
    import h2.connection

    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    return connection


_GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"bench")]


def _get(sock: socket.socket, connection: Any) -> None:
    """One GET on an open connection; returns when its response ended."""
    import h2.events

    stream_id = connection.get_next_available_stream_id()
    connection.send_headers(stream_id, _GET, end_stream=True)
    sock.sendall(connection.data_to_send())
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        events = connection.receive_data(data)
        out = connection.data_to_send()
        if out:
            sock.sendall(out)
        for event in events:
            if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                return


def _open(port: int) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection = _client_connection()
    sock.sendall(connection.data_to_send())
    return sock, connection


def lifecycles(port: int, count: int) -> None:
    for _ in range(count):
        sock, connection = _open(port)
        _get(sock, connection)
        sock.close()


def requests(port: int, count: int) -> None:
    sock, connection = _open(port)
    for _ in range(count):
        _get(sock, connection)
    sock.close()


class Server:
    """A ``serve`` subprocess on a fresh 127.0.0.1 socket, optionally under a wrapper (valgrind)."""

    def __init__(self, kind: str, wrapper: list[str], trace: bool = False, pad: int = 0) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        self.port = listener.getsockname()[1]
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(filter(None, [
            os.environ.get("PYTHONPATH"), str(ROOT)])))
        command = [*wrapper, sys.executable, str(HERE), "_serve", kind, str(listener.fileno()), f"--pad={pad}"]
        if trace:
            command.append("--trace")
        self.process = subprocess.Popen(command, pass_fds=[listener.fileno()], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env)
        listener.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r}")

    def memory(self) -> tuple[int, int]:
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        line = self.process.stdout.readline().split()
        return int(line[1]), int(line[2])

    def stop(self, timeout: float = 600.0) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def instructions(kind: str, work: Any, amount: int, pad: int = 0) -> int:
    """Instructions the server executed for a whole run doing ``work(port, amount)``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server = Server(kind, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"], pad=pad)
        try:
            work(server.port, amount)
        finally:
            server.stop()
        return _callgrind_total(out)


# Where objects land moves a per-request count by about +-0.2% (h2 looks classes
# up in dicts keyed by them), the size of the target: rows that judge a small
# ratio take the mean over these start-up paddings (bench_instructions.py).
LAYOUTS = (0, 1, 2)


def shift_layout(pad: int) -> list[Any]:
    """Start-up allocations that move what the process makes later; hold the result until the end.

    Three things move a per-request count with nothing else changed, each by
    a few thousand instructions: object addresses (dicts keyed by classes
    probe differently), how full each allocator pool is (a pool that fills and
    empties on every request costs more per free), and the type version tags
    (CPython's method cache is indexed by version tag and name address, so
    the same lookups collide differently). ``pad`` moves all three: objects
    of every small size class, and classes that take version tags first.
    Padding with objects of 81..177 bytes only, as before, left the pool fill
    of the other size classes and every version tag the same in every layout,
    so those differences between the two servers did not average out (callgrind
    showed +2-3k instructions per request in ``_PyObject_Free`` alone, with the
    same number of frees, in memory and in two of the three layouts).
    """
    held: list[Any] = [bytes(i % 479) for i in range(pad * 3001)]  # size classes 48..512
    held += [object() for _ in range(pad * 211)]  # 16
    held += [float(i) for i in range(pad * 307)]  # 32
    for i in range(pad * 211):
        cls = type(f"_Layout{i}", (), {})
        _ = cls.__doc__  # a lookup gives the class its version tag
        held.append(cls)
    return held


def per_unit(kind: str, work: Any, short: int, long: int, layouts: tuple[int, ...] = (0,)) -> float:
    """Instructions per unit of ``work``: (long run - short run) / (long - short), the mean over ``layouts``."""
    values = [(instructions(kind, work, long, pad) - instructions(kind, work, short, pad)) / (long - short)
              for pad in layouts]
    return sum(values) / len(values)


def idle_memory(kind: str, count: int) -> tuple[float, float]:
    """(tracemalloc bytes, RSS bytes) per idle HTTP/2 connection held by the server."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Server(kind, [], trace=True)
    held: list[tuple[socket.socket, Any]] = []
    try:
        # Warm up: the first connections load code and fill caches on both servers.
        for _ in range(20):
            held.append(_open(server.port))
            _get(*held[-1])
        time.sleep(0.2)
        traced_before, rss_before = server.memory()
        for _ in range(count):
            held.append(_open(server.port))
            _get(*held[-1])
        time.sleep(0.5)
        traced_after, rss_after = server.memory()
    finally:
        for sock, _ in held:
            sock.close()
        server.stop()
    return (traced_after - traced_before) / count, (rss_after - rss_before) / count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (less exact)")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections for the memory row (2000)")
    parser.add_argument("--rows", default="request,lifecycle,inmemory,memory",
                        help="which rows, comma-separated (request,lifecycle,inmemory,memory)")
    parser.add_argument("--layouts", type=int, default=1,
                        help="memory layouts to average the instruction rows over (1; make bench uses 3)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure stock hypercorn with a bare ServerConnection swapped in")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    wanted = set(args.rows.split(","))

    print("hypercorn 0.18 asyncio worker: stock vs goaway_ext at chance 0")
    if wanted & {"request", "lifecycle"}:
        if shutil.which("valgrind") is None:
            print("  valgrind not installed (apt-get install valgrind): instruction rows skipped")
        else:
            rows = [("request", "per request (1 connection, sequential GETs)", requests, 50,
                     250 if args.quick else 550, 1.003),
                    ("lifecycle", "per connection lifecycle (connect, handshake, 1 GET, close)", lifecycles, 20,
                     100 if args.quick else 220, 1.03)]
            for key, title, work, short, long, target in rows:
                if key not in wanted:
                    continue
                layouts = LAYOUTS[:args.layouts] if args.layouts <= len(LAYOUTS) else tuple(range(args.layouts))
                stock = per_unit("stock", work, short, long, layouts)
                ours = per_unit("goaway", work, short, long, layouts)
                print(f"  {title}: stock {stock / 1e3:,.1f}k instr, goaway_ext {ours / 1e3:,.1f}k instr, "
                      f"ratio {ours / stock:.4f} (target <= {target})")
                if args.floor:
                    floor = per_unit("floor", work, short, long, layouts)
                    print(f"    of which ServerConnection alone (bare swap into stock H2Protocol): "
                          f"{floor / 1e3:,.1f}k instr, ratio {floor / stock:.4f}")
    if "memory-request" in wanted or "inmemory" in wanted:
        short, long = 100, 600 if not args.quick else 300
        per = {kind: (in_memory_instructions(kind, long) - in_memory_instructions(kind, short)) / (long - short)
               for kind in ("stock", "goaway", "floor")}
        print(f"  per request in memory, no sockets (deterministic): stock {per['stock'] / 1e3:,.1f}k instr, "
              f"goaway_ext {per['goaway'] / 1e3:,.1f}k ({per['goaway'] / per['stock']:.4f}), "
              f"bare ServerConnection {per['floor'] / 1e3:,.1f}k ({per['floor'] / per['stock']:.4f})")
        short, long = 20, 120 if not args.quick else 70
        per = {kind: (in_memory_instructions(kind, long, True) - in_memory_instructions(kind, short, True))
               / (long - short) for kind in ("stock", "goaway")}
        print(f"  per connection lifecycle in memory (protocol object, handshake, 1 GET, close; deterministic): "
              f"stock {per['stock'] / 1e3:,.1f}k instr, goaway_ext {per['goaway'] / 1e3:,.1f}k "
              f"({per['goaway'] / per['stock']:.4f}, target <= 1.03)")
    if "memory" not in wanted:
        return
    stock_traced, stock_rss = idle_memory("stock", args.idle)
    ours_traced, ours_rss = idle_memory("goaway", args.idle)
    print(f"  idle connection memory ({args.idle} connections): tracemalloc stock {stock_traced / 1024:.2f} KiB, "
          f"goaway_ext {ours_traced / 1024:.2f} KiB (+{(ours_traced - stock_traced) / 1024:.2f} KiB, target <= +1); "
          f"RSS stock {stock_rss / 1024:.2f} KiB, goaway_ext {ours_rss / 1024:.2f} KiB "
          f"(+{(ours_rss - stock_rss) / 1024:.2f} KiB)")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_inmemory":
        in_memory(sys.argv[2], int(sys.argv[3]), lifecycles="lifecycles" in sys.argv[4:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "_serve":
        pads = [int(arg.split("=", 1)[1]) for arg in sys.argv[4:] if arg.startswith("--pad=")]
        serve(sys.argv[2], int(sys.argv[3]), "--trace" in sys.argv[4:], pads[0] if pads else 0)
    else:
        main()
