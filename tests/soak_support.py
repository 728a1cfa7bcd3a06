"""The soak engine shared by ``tests/test_soak_short.py`` and ``benches/soak.py``.

In memory: requests through a :class:`~goaway_ext.ServerConnection` with a
per-request GOAWAY chance, answered over a :class:`~goaway_ext.ClientConnection`
that follows every drain to a new connection. Nothing is kept per request, so
after a warm-up the number of live Python objects, of allocated memory blocks
and the RSS must stay flat however many requests go through.

Over real sockets: the ``serve`` command (or hypercorn with goaway_ext) in a
subprocess on 127.0.0.1, loaded by ``python -m goaway_ext load``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events
from h2.config import H2Configuration
from manual_clock import ManualClock
from serve_process import OutputProcess, ServeProcess

from goaway_ext import ClientConnection, GoawayPolicy, GoawayReceived, ServerConnection, StreamRefused

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"soak")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]
BODY = b"ok\n"


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@dataclass
class Footprint:
    """What is alive in this process at one moment (after a full collection)."""

    objects: int
    blocks: int
    rss: int

    @classmethod
    def now(cls) -> Footprint:
        gc.collect()
        return cls(objects=len(gc.get_objects()), blocks=sys.getallocatedblocks(), rss=rss_bytes())


@dataclass
class InMemoryResult:
    requests: int = 0
    completed: int = 0
    lost: int = 0
    refused: int = 0
    retried: int = 0
    connections: int = 0
    goaways: int = 0
    drains: int = 0
    duration: float = 0.0
    warm: Footprint | None = None
    end: Footprint | None = None
    samples: list[Footprint] = field(default_factory=list)

    @property
    def object_growth(self) -> int:
        assert self.warm is not None and self.end is not None
        return self.end.objects - self.warm.objects

    @property
    def block_growth(self) -> int:
        assert self.warm is not None and self.end is not None
        return self.end.blocks - self.warm.blocks

    @property
    def rss_growth(self) -> int:
        assert self.warm is not None and self.end is not None
        return self.end.rss - self.warm.rss


def run_in_memory(
    requests: int,
    *,
    chance: float = 0.02,
    concurrency: int = 10,
    seed: int = 7,
    warmup: int | None = None,
    samples: int = 10,
    progress: Callable[[InMemoryResult], None] | None = None,
) -> InMemoryResult:
    """Send ``requests`` through ServerConnection/ClientConnection pairs in memory.

    Each connection keeps up to ``concurrency`` streams in flight. The client
    follows every GOAWAY: no new stream on a draining connection, refused
    streams retried on the next one. A connection is replaced once the server
    says it is drained and the client has nothing open. The footprint is taken
    after ``warmup`` requests (default a tenth) and again at the end.
    """
    policy = GoawayPolicy(chance, seed=seed)
    clock = ManualClock(0.0)
    result = InMemoryResult()
    warmup = requests // 10 if warmup is None else warmup
    sample_every = max(1, (requests - warmup) // max(1, samples))
    next_sample = warmup
    to_send = requests  # requests not yet sent (retries included)
    started = time.perf_counter()
    client_config = H2Configuration(client_side=True, header_encoding=None)
    server_config = H2Configuration(client_side=False, header_encoding=None)
    while to_send > 0:
        result.connections += 1
        client = ClientConnection(client_config)
        server = ServerConnection(server_config, policy=policy, clock=clock)
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        in_flight: set[int] = set()
        quiet = 0
        while True:
            while to_send > 0 and len(in_flight) < concurrency and not client.is_draining:
                stream_id = client.get_next_available_stream_id()
                client.send_headers(stream_id, REQUEST, end_stream=True)
                in_flight.add(stream_id)
                to_send -= 1
            wire = client.data_to_send()
            sent = bool(wire)
            if wire:
                for event in server.receive_data(wire):
                    cls = event.__class__
                    if cls is h2.events.StreamEnded:
                        server.send_headers(event.stream_id, RESPONSE)
                        server.send_data(event.stream_id, BODY, end_stream=True)
                    elif cls.__name__ == "ConnectionDrained":
                        result.drains += 1
            clock.now += 0.001
            wire = server.data_to_send()
            if wire:
                for event in client.receive_data(wire):
                    cls = event.__class__
                    if cls is h2.events.StreamEnded:
                        in_flight.discard(event.stream_id)
                        result.completed += 1
                        result.requests += 1
                    elif cls is h2.events.DataReceived:
                        client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif cls is StreamRefused:
                        in_flight.discard(event.stream_id)
                        result.refused += 1
                        result.retried += 1
                        to_send += 1  # never processed: safe to send again on the next connection
                    elif cls is GoawayReceived:
                        result.goaways += 1
                    elif cls is h2.events.StreamReset:
                        in_flight.discard(event.stream_id)
                        result.lost += 1
                        result.requests += 1
            if not in_flight and (server.is_drained or to_send == 0):
                break
            quiet = 0 if (wire or sent) else quiet + 1
            if quiet > 3:
                raise RuntimeError(f"connection {result.connections} stalled in {server.drain_state}")
            if result.requests >= next_sample:
                footprint = Footprint.now()
                if result.warm is None:
                    result.warm = footprint
                else:
                    result.samples.append(footprint)
                next_sample += sample_every
                if progress is not None:
                    result.duration = time.perf_counter() - started
                    progress(result)
        if in_flight:  # a connection ended with a request unanswered: lost
            result.lost += len(in_flight)
            result.requests += len(in_flight)
    result.duration = time.perf_counter() - started
    del client, server
    result.end = Footprint.now()
    if result.warm is None:
        result.warm = result.end
    return result


# -- real sockets --------------------------------------------------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app hypercorn serves in the soak: ``ok`` for every request."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": BODY})


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    log: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def rss(self) -> int:
        return rss_bytes(self.process.pid)


@contextlib.contextmanager
def server_process(kind: str, chance: float, timeout: float = 20.0) -> Iterator[ServerProcess]:
    """``serve`` (kind "asyncio") or goaway_ext's hypercorn (kind "hypercorn") on 127.0.0.1; always stopped."""
    if kind not in ("asyncio", "hypercorn"):
        raise ValueError(f"kind must be 'asyncio' or 'hypercorn', got {kind!r}")
    running: OutputProcess | None = None
    try:
        if kind == "asyncio":
            running = ServeProcess("--chance", str(chance), start_timeout=timeout, cwd=ROOT)
            port = running.port
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(512)
                running = OutputProcess(
                    [sys.executable, "-m", "goaway_ext.hypercorn", f"{HERE}:app", "--bind", f"fd://{listener.fileno()}",
                     "--workers", "0", "--error-logfile", "-", "--goaway-chance", str(chance)],
                    cwd=ROOT, pass_fds=(listener.fileno(),))
                try:
                    running.wait_for("Running on", timeout=timeout)
                except RuntimeError as exc:
                    raise RuntimeError(f"hypercorn server did not start: {exc}") from None
                port = listener.getsockname()[1]
        yield ServerProcess(running.process, port, running.output)
    finally:
        if running is not None:
            running.stop(timeout=15)


def run_load_command(url: str, requests: int, clients: int, streams: int, processes: int = 1,
                     timeout: float = 600.0) -> dict[str, Any]:
    """``python -m goaway_ext load URL -n N -c C -m M --json``; its JSON summary plus the exit status."""
    command = [sys.executable, "-m", "goaway_ext", "load", url, "-n", str(requests), "-c", str(clients),
               "-m", str(streams), "--json", "--no-progress", "--timeout", "30"]
    if processes > 1:
        command += ["--processes", str(processes)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if not completed.stdout.strip():
        raise RuntimeError(f"load printed nothing (exit {completed.returncode}): {completed.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(completed.stdout)
    summary["exit_status"] = completed.returncode
    return summary
