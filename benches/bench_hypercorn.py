"""hypercorn benchmarks: goaway_ext.hypercorn against stock hypercorn, same machine, same run.

0. before/after: ``keep_alive_max_requests = 5``, one connection, one request,
   then 5 concurrent slow requests (the 5th crosses the budget): responses
   completed on stock hypercorn vs with goaway_ext.
1. In process, no sockets: hypercorn's ``H2Protocol`` vs ``GoawayH2Protocol``
   on one asyncio loop fed by an in-memory h2 client; CPU time per request
   (``time.process_time``, so other processes matter less) and Python
   function calls per request (deterministic).
2. ``h2load`` requests/s, baseline stock ``python -m hypercorn`` vs
   ``python -m goaway_ext.hypercorn --goaway-chance 0`` (the policy installed,
   no GOAWAY: h2load fails the requests queued behind one). Target >= 0.99x.
3. ``python -m goaway_ext load`` requests/s, baseline stock hypercorn vs
   goaway_ext at ``--goaway-chance 0.001`` (GOAWAYs and reconnects included).
   Target >= 0.98x.

Rounds alternate between the two servers, both running the whole time, so
noise from other processes hits both; the best round of each is compared and
so is the median of the paired rounds. On a shared machine requests/s swings
with other people's load, so each round also reads the server process's CPU
time (``/proc``): CPU microseconds per request is the steadier view of the
same overhead. Both servers get
``keep_alive_max_requests`` high enough that neither ends a connection on its own.

Usage: python benches/bench_hypercorn.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
APP = f"{HERE}:app"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/`` a 5-byte body; ``/slow`` the same after 0.5 s."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    if scope["path"] == "/slow":
        await asyncio.sleep(0.5)
    await send({"type": "http.response.body", "body": b"hello"})


def _start(module: str, config_text: str, *extra: str) -> tuple[subprocess.Popen[str], int, Path]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    config = Path(tempfile.mkstemp(suffix=".toml")[1])
    config.write_text(config_text)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, APP, "--bind", f"fd://{listener.fileno()}", "--workers", "0",
         "--config", str(config), "--error-logfile", "-", "--log-level", "WARNING", *extra],
        pass_fds=[listener.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    listener.close()
    deadline = time.monotonic() + 20
    while True:  # the socket already listens; wait until hypercorn answers on it
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                probe.settimeout(1)
                if probe.recv(12).startswith(b"HTTP/1.1"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"{module} did not start")
        time.sleep(0.1)
    return proc, port, config


def _stop(*servers: tuple[subprocess.Popen[str], int, Path]) -> None:
    for proc, _, _ in servers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _, config in servers:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        config.unlink(missing_ok=True)


def before_after() -> None:
    from goaway_ext.asyncio_client import H2Client

    async def scenario(port: int) -> int:
        async with H2Client("127.0.0.1", port, timeout=8.0, max_attempts=1) as client:
            await client.request("GET", "/")

            async def slow() -> bool:
                try:
                    return (await client.request("GET", "/slow")).body == b"hello"
                except Exception:
                    return False

            return sum(await asyncio.gather(*(slow() for _ in range(5))))

    print("keep_alive_max_requests = 5: 1 request, then 5 concurrent 0.5 s requests on the same connection")
    for label, module in (("stock hypercorn", "hypercorn"), ("hypercorn + goaway_ext", "goaway_ext.hypercorn")):
        server = _start(module, "keep_alive_max_requests = 5\nkeep_alive_timeout = 2\n")
        try:
            done = asyncio.run(scenario(server[1]))
        finally:
            _stop(server)
        print(f"  {label:<24} {done} of 5 responses completed")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(proc: subprocess.Popen[str]) -> float:
    """User + system CPU time of a running process, from /proc (0.0 where there is none)."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _measured(proc: subprocess.Popen[str], requests: int, run: Any) -> tuple[float, float, Any]:
    """Run one round against ``proc``: (requests/s, server CPU microseconds per request, extra)."""
    before = _cpu_seconds(proc)
    rate, extra = run()
    return rate, (_cpu_seconds(proc) - before) / requests * 1e6, extra


_REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"bench")]


async def _in_process_round(protocol_class: Any, config: Any, requests: int, batch: int = 10) -> float:
    """Serve ``requests`` through one protocol object fed by an in-memory h2 client; CPU seconds per request."""
    import h2.config
    import h2.connection
    import h2.events
    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.events import Closed, RawData
    from hypercorn.typing import ConnectionState

    out = bytearray()

    async def send(event: Any) -> None:
        if isinstance(event, RawData):
            out.extend(event.data)

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    start = time.process_time()
    async with TaskGroup(asyncio.get_running_loop()) as task_group:
        protocol = protocol_class(ASGIWrapper(app), config, WorkerContext(None), task_group, ConnectionState({}),
                                  False, ("127.0.0.1", 1), ("127.0.0.1", 2), send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        for _ in range(requests // batch):
            for _ in range(batch):
                client.send_headers(client.get_next_available_stream_id(), _REQUEST, end_stream=True)
            await protocol.handle(RawData(client.data_to_send()))
            ended = 0
            while ended < batch:
                await asyncio.sleep(0)
                if not out:
                    continue
                data = bytes(out)
                out.clear()
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        ended += 1
                    elif isinstance(event, h2.events.DataReceived):
                        client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                pending = client.data_to_send()
                if pending:
                    await protocol.handle(RawData(pending))
        await protocol.handle(Closed())
    return (time.process_time() - start) / requests


def bench_in_process(rounds: int, requests: int) -> None:
    """hypercorn's H2Protocol vs GoawayH2Protocol, no sockets: CPU per request and Python calls per request."""
    import cProfile
    import pstats

    from hypercorn.config import Config
    from hypercorn.protocol.h2 import H2Protocol

    from goaway_ext.hypercorn import GoawayH2Protocol, enable_goaway

    stock_config, our_config = Config(), Config()
    stock_config.keep_alive_max_requests = our_config.keep_alive_max_requests = 10**9
    enable_goaway(our_config)  # policy at chance 0: the per-request path, no GOAWAY
    candidates = {"stock": (H2Protocol, stock_config), "ours": (GoawayH2Protocol, our_config)}

    async def run_all() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for cls, config in candidates.values():
            await _in_process_round(cls, config, requests // 5)
        for _ in range(rounds):
            for name, (cls, config) in candidates.items():
                times[name].append(await _in_process_round(cls, config, requests))
        return times

    times = asyncio.run(run_all())
    calls: dict[str, float] = {}
    for name, (cls, config) in candidates.items():
        profile = cProfile.Profile()
        profile.enable()
        asyncio.run(_in_process_round(cls, config, 2000))
        profile.disable()
        calls[name] = pstats.Stats(profile).total_calls / 2000  # type: ignore[attr-defined]
    ratios = sorted(o / b for o, b in zip(times["ours"], times["stock"], strict=True))
    print(f"in process (no sockets): {requests} requests per round, {rounds} interleaved rounds, CPU time")
    print(f"  baseline hypercorn H2Protocol                         best {min(times['stock']) * 1e6:7.1f} us/request"
          f"   {calls['stock']:7.1f} Python calls/request")
    print(f"  GoawayH2Protocol (policy at chance 0)                 best {min(times['ours']) * 1e6:7.1f} us/request"
          f"   {calls['ours']:7.1f} Python calls/request")
    print(f"  ratio vs H2Protocol: CPU median of paired rounds {statistics.median(ratios):.3f}x, "
          f"best/best {min(times['ours']) / min(times['stock']):.3f}x; calls {calls['ours'] / calls['stock']:.4f}x")


def _load(port: int, requests: int) -> tuple[float, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "load", f"http://127.0.0.1:{port}/", "-n", str(requests), "-c", "4",
         "-m", "10", "--json", "--no-progress"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"load reported failures:\n{out.stdout}{out.stderr}")
    summary = json.loads(out.stdout)
    return float(summary["requests_per_second"]), summary


def _report(title: str, baseline: str, candidate: str, base: list[tuple[float, float]],
            ours: list[tuple[float, float]], target: str) -> None:
    rates_b, rates_o = [b[0] for b in base], [o[0] for o in ours]
    cpu_b, cpu_o = [b[1] for b in base], [o[1] for o in ours]
    ratios = sorted(o / b for o, b in zip(rates_o, rates_b, strict=True))
    print(title)
    print(f"  baseline {baseline:<44} best {max(rates_b):8.0f} req/s   server CPU {min(cpu_b):6.0f} us/request")
    print(f"  {candidate:<53} best {max(rates_o):8.0f} req/s   server CPU {min(cpu_o):6.0f} us/request")
    print(f"  ratio vs {baseline}: req/s best/best {max(rates_o) / max(rates_b):.3f}x, "
          f"median of paired rounds {statistics.median(ratios):.3f}x (target {target}); "
          f"server CPU per request best/best {min(cpu_o) / min(cpu_b):.3f}x")


def bench_h2load(rounds: int, requests: int) -> None:
    # Imported here: hypercorn also loads this file as the ASGI app, without benches/ on sys.path.
    from _h2load import h2load_rps

    h2load = shutil.which("h2load")
    if h2load is None:
        print("h2load: skipped (install Debian package nghttp2-client)")
        return
    config = "keep_alive_max_requests = 100000000\n"
    stock = _start("hypercorn", config)
    ours = _start("goaway_ext.hypercorn", config, "--goaway-chance", "0")
    try:
        h2load_rps(h2load, stock[1], requests // 4)
        h2load_rps(h2load, ours[1], requests // 4)
        base: list[tuple[float, float]] = []
        mine: list[tuple[float, float]] = []
        for _ in range(rounds):
            for server, into in ((stock, base), (ours, mine)):
                rate, cpu, _ = _measured(
                    server[0], requests, lambda port=server[1]: (h2load_rps(h2load, port, requests), None)
                )
                into.append((rate, cpu))
    finally:
        _stop(stock, ours)
    _report(f"h2load -n {requests} -c 10 -m 10, {rounds} interleaved rounds", "stock hypercorn",
            "goaway_ext.hypercorn --goaway-chance 0", base, mine, ">= 0.99x")


def bench_load(rounds: int, requests: int) -> None:
    config = "keep_alive_max_requests = 100000000\n"
    stock = _start("hypercorn", config)
    ours = _start("goaway_ext.hypercorn", config, "--goaway-chance", "0.001")
    goaways = opened = 0
    try:
        _load(stock[1], requests // 4)
        _load(ours[1], requests // 4)
        base: list[tuple[float, float]] = []
        mine: list[tuple[float, float]] = []
        for _ in range(rounds):
            rate, cpu, _ = _measured(stock[0], requests, lambda: _load(stock[1], requests))
            base.append((rate, cpu))
            rate, cpu, summary = _measured(ours[0], requests, lambda: _load(ours[1], requests))
            mine.append((rate, cpu))
            goaways += summary["goaways_received"]
            opened += summary["connections_opened"]
    finally:
        _stop(stock, ours)
    _report(f"python -m goaway_ext load -n {requests} -c 4 -m 10, {rounds} interleaved rounds", "stock hypercorn",
            "goaway_ext.hypercorn --goaway-chance 0.001", base, mine, ">= 0.98x")
    print(f"  goaway_ext rounds: {goaways} GOAWAYs, {opened} connections opened, 0 failed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (make bench)")
    return parser.parse_args(argv)


def main() -> None:
    quick = parse_args().quick
    before_after()
    bench_in_process(rounds=5 if quick else 11, requests=2000 if quick else 5000)
    bench_h2load(rounds=3 if quick else 9, requests=5000 if quick else 10000)
    bench_load(rounds=3 if quick else 7, requests=3000 if quick else 6000)


if __name__ == "__main__":
    main()
