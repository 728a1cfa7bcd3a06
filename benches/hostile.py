"""Hostile peers against ``python -m goaway_ext serve``: the "hostile peers" table of docs/reliability.md.

Each attack runs on its own connection(s) against one ``serve`` process (its
default limits), while a well-behaved ``H2Client`` on another connection sends
``GET /`` every 20 ms throughout, from its own process. For each attack: the server's RSS growth
(peak during the attack minus before it, from /proc), what happened to the
flooding connection, and the well-behaved client's latencies (how many
requests, how many took over 100 ms, the slowest). Run by ``make soak``
(``benches/soak.py --only hostile``); ``--scale`` shrinks or grows every size.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from hyperframe.frame import DataFrame, PingFrame, SettingsFrame

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from raw_h2 import RawClient  # noqa: E402
from soak_support import rss_bytes, server_process  # noqa: E402

from goaway_ext import H2Client  # noqa: E402

MB = 1024 * 1024
POST = [(b":method", b"POST"), (b":path", b"/echo"), (b":scheme", b"http"), (b":authority", b"hostile")]


@dataclass
class Probe:
    """The well-behaved client's latencies, in seconds."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    def summary(self) -> str:
        if not self.latencies:
            return f"well-behaved client: 0 answered, {self.failures} failed"
        slow = sum(latency > 0.1 for latency in self.latencies)
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (f"well-behaved client: {len(ordered):,} GETs, {self.failures} failed, {slow} over 100 ms, "
                f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")


async def probe(port: int, stop: asyncio.Event, result: Probe) -> None:
    async with H2Client("127.0.0.1", port, timeout=30) as client:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            try:
                response = await client.request("GET", "/")
                if response.status != 200:
                    result.failures += 1
                else:
                    result.latencies.append(loop.time() - began)
            except Exception:
                result.failures += 1
            await asyncio.sleep(0.02)


def probe_main(port: int) -> None:
    """The prober's own process (so the attacker's CPU never delays it): probe until stdin closes, print JSON."""
    result = Probe()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_stdin, daemon=True).start()
        await probe(port, stop, result)

    asyncio.run(main())
    print(json.dumps({"latencies": result.latencies, "failures": result.failures}), flush=True)


class ProbeProcess:
    """Runs :func:`probe_main` in a child process for the length of one attack."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--probe", str(port)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def stop(self) -> Probe:
        out, _ = self.process.communicate("", timeout=60)
        data = json.loads(out.strip().splitlines()[-1])
        return Probe(data["latencies"], data["failures"])


class RssSampler:
    """Peak RSS of the server process while an attack runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_bytes(pid)
        self.peak = self.before

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.05)
        self.peak = max(self.peak, rss_bytes(self.pid))

    def growth(self) -> str:
        return f"server RSS {self.before / MB:.1f} MB, peak +{(self.peak - self.before) / MB:.1f} MB"


async def _read_until_closed(reader: asyncio.StreamReader, limit: float) -> str:
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except asyncio.TimeoutError:
        return "still open"
    except ConnectionError:
        pass
    return "closed by the server"


# -- the attacks: each returns (what was sent, what happened to the attacking connection) --------------


async def rapid_reset(port: int, streams: int, body: bytes = b"") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient()
    writer.write(client.preface())
    sent = 0
    try:
        while sent < streams:
            out = []
            for _ in range(100):
                stream_id, headers = client.headers(end_stream=False, headers=POST)
                frame = b""
                if body:
                    data = DataFrame(stream_id)
                    data.data = body
                    frame = data.serialize()
                out.append(headers + frame + client.reset(stream_id))
            writer.write(b"".join(out))
            await writer.drain()
            sent += 100
            if reader.at_eof():
                break
    except ConnectionError:
        return f"{sent:,} streams", "closed by the server mid-flood"
    if reader.at_eof():
        writer.close()
        return f"{sent:,} streams", "closed by the server mid-flood"
    ping = PingFrame(0)
    writer.write(ping.serialize())
    await writer.drain()
    what = f"{sent:,} streams" + (f" with {len(body) // 1024} KiB of body each" if body else "")
    outcome = "connection still open after the flood, every stream forgotten"
    writer.close()
    return what, outcome


async def never_reads(port: int, frames: int, kind: str) -> tuple[str, str]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    client = RawClient()
    if kind == "ping":
        frame = PingFrame(0).serialize()
    elif kind == "settings":
        settings = SettingsFrame(0)
        settings.settings = {SettingsFrame.ENABLE_PUSH: 0}
        frame = settings.serialize()
    else:  # GET requests whose responses are never read
        frame = b""
    sent = 0
    batch = 1000
    began = time.monotonic()
    blocked = False
    try:
        await loop.sock_sendall(sock, client.preface())
        while sent < frames:
            if kind == "get":
                wire = b"".join(client.headers()[1] for _ in range(50))
                count = 50
            else:
                wire, count = frame * batch, batch
            await asyncio.wait_for(loop.sock_sendall(sock, wire), 5)
            sent += count
    except asyncio.TimeoutError:
        blocked = True  # our send blocked: the server stopped reading
    except OSError:
        pass
    # Without reading (reading would make us a well-behaved peer): watch the
    # socket's TCP state until the server has closed or reset it, for 30 s.
    closed = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state != 1:  # not TCP_ESTABLISHED: FIN or RST received
            closed = True
            break
        await asyncio.sleep(0.05)
    sock.close()
    outcome = (f"{sent:,} sent" + (", then our send blocked (the server stopped reading)" if blocked else "")
               + (f"; closed by the server ({time.monotonic() - began:.1f} s after the first frame)" if closed
                  else "; still open 30 s later"))
    what = {"ping": "PINGs", "settings": "SETTINGS frames", "get": "GET requests"}[kind]
    return f"up to {frames:,} {what}, never reading", outcome


async def reading_flood(port: int, frames: int, kind: str) -> tuple[str, str]:
    """PINGs or SETTINGS as fast as we can write them, every answer read (and dropped) as it comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient()
    if kind == "ping":
        frame = PingFrame(0).serialize()
    else:
        settings = SettingsFrame(0)
        settings.settings = {SettingsFrame.ENABLE_PUSH: 0}
        frame = settings.serialize()
    began = time.monotonic()

    async def drain_answers() -> None:
        while await reader.read(65536):
            pass

    answers = asyncio.ensure_future(drain_answers())
    sent = 0
    try:
        writer.write(client.preface())
        while sent < frames and not answers.done():
            writer.write(frame * 1000)
            await asyncio.wait_for(writer.drain(), 5)
            sent += 1000
    except (OSError, asyncio.TimeoutError):
        pass
    try:
        await asyncio.wait_for(answers, 30)
        outcome = f"closed by the server ({time.monotonic() - began:.1f} s after the first frame)"
    except asyncio.TimeoutError:
        outcome = "still open 30 s later"
    except OSError:
        outcome = f"reset by the server ({time.monotonic() - began:.1f} s after the first frame)"
    writer.close()
    what = {"ping": "PINGs", "settings": "SETTINGS frames"}[kind]
    return f"up to {frames:,} {what}, every answer read", f"{sent:,} sent; {outcome}"


class _Uploader:
    """An h2 client that keeps up to 100 uploads open, sends as the windows allow, never ends a body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.open: set[int] = set()
        self.sent = 0
        self.answered_413 = 0

    def _open_streams(self) -> None:
        while len(self.open) < 100:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                             (":authority", "hostile")])
            self.open.add(stream_id)

    def _pump(self) -> None:
        chunk = b"u" * 16384
        for stream_id in list(self.open):
            while True:
                window = min(self.h2.local_flow_control_window(stream_id), len(chunk))
                if window <= 0:
                    break
                self.h2.send_data(stream_id, chunk[:window])
                self.sent += window

    async def run(self, seconds: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            self._open_streams()
            self._pump()
            self.writer.write(self.h2.data_to_send())
            await self.writer.drain()
            try:
                data = await asyncio.wait_for(self.reader.read(65536), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                continue
            if not data:
                return "closed by the server"
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and dict(event.headers).get(b":status") == b"413":
                    self.answered_413 += 1
                if isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
                    self.open.discard(event.stream_id)
        self.writer.close()
        return "open"


async def endless_uploads(port: int, connections: int, seconds: float) -> tuple[str, str]:
    uploaders = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        uploaders.append(_Uploader(reader, writer))
    outcomes = await asyncio.gather(*(u.run(seconds) for u in uploaders))
    sent = sum(u.sent for u in uploaders)
    answered = sum(u.answered_413 for u in uploaders)
    return (f"{connections} connections x 100 never-ending uploads for {seconds:.0f} s",
            f"{sent / MB:,.0f} MB accepted in all, {answered} bodies answered 413 at max_body; "
            f"connections {', '.join(sorted(set(outcomes)))}")


async def oversized_posts(port: int, count: int) -> tuple[str, str]:
    async with H2Client("127.0.0.1", port, timeout=60) as client:
        statuses = await asyncio.gather(*(client.request("POST", "/echo", body=b"z" * (2 * MB))
                                          for _ in range(count)))
        codes = sorted({r.status for r in statuses})
        return (f"{count} x 2 MB POSTs from H2Client",
                f"answered {codes}, {client.requests_retried} retried, {client.connections_opened} connection(s)")


async def silent_sockets(port: int, count: int) -> tuple[str, str]:
    loop = asyncio.get_running_loop()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    began = loop.time()
    closed = await asyncio.gather(*(_read_until_closed(reader, 30) for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    reaped = sum(c == "closed by the server" for c in closed)
    return f"{count:,} silent sockets", f"{reaped:,} closed by the server within {loop.time() - began:.1f} s"


ATTACKS = {
    "rapid reset": ("rapid_reset_window 500: GOAWAY(ENHANCE_YOUR_CALM) and close; each reset stream forgotten at "
                    "once (h2 remembers 4,096)",
                    lambda port, scale: rapid_reset(port, int(50_000 * scale))),
    "reset uploads": ("rapid_reset_window 500; each reset stream's body freed at once",
                      lambda port, scale: rapid_reset(port, int(10_000 * scale), b"x" * 16384)),
    "oversized bodies": ("max_body 1 MiB: 413 + RST_STREAM(NO_ERROR)",
                         lambda port, scale: oversized_posts(port, 20)),
    "never-ending uploads": ("max_buffered 1 MiB per connection, max_body 1 MiB",
                             lambda port, scale: endless_uploads(port, 3, 10 * min(scale, 3))),
    "PING flood, reads": ("max_control_rate 1,000 in under a second: GOAWAY(ENHANCE_YOUR_CALM) and close",
                          lambda port, scale: reading_flood(port, int(1_000_000 * scale), "ping")),
    "SETTINGS flood, reads": ("max_control_rate 1,000 in under a second: GOAWAY(ENHANCE_YOUR_CALM) and close",
                              lambda port, scale: reading_flood(port, int(1_000_000 * scale), "settings")),
    "PING flood, never reads": ("max_control_rate 1,000 in under a second; reading paused while writes are; "
                                "max_control_frames 1,000",
                                lambda port, scale: never_reads(port, int(1_000_000 * scale), "ping")),
    "SETTINGS flood, never reads": ("max_control_rate 1,000 in under a second; reading paused while writes are; "
                                    "max_control_frames 1,000",
                                    lambda port, scale: never_reads(port, int(1_000_000 * scale), "settings")),
    "requests, responses never read": ("reading paused while writes are; a 101st concurrent stream is a "
                                       "protocol error (h2's SETTINGS_MAX_CONCURRENT_STREAMS 100)",
                                       lambda port, scale: never_reads(port, int(50_000 * scale), "get")),
    "silent sockets": ("handshake_timeout 10 s",
                       lambda port, scale: silent_sockets(port, int(1000 * scale))),
}


async def _one(port: int, pid: int, name: str, scale: float) -> tuple[str, str, str]:
    limit, attack = ATTACKS[name]
    stop = asyncio.Event()
    sampler = RssSampler(pid)
    prober = ProbeProcess(port)
    sampling = asyncio.ensure_future(sampler.run(stop))
    await asyncio.sleep(1.0)  # the prober's interpreter starts and connects
    try:
        what, outcome = await attack(port, scale)
    except Exception as exc:  # reported in the row
        what, outcome = "attack failed", f"{type(exc).__name__}: {exc}"
    await asyncio.sleep(0.3)
    stop.set()
    await sampling
    result = prober.stop()
    return what, limit, f"{outcome}; {sampler.growth()}; {result.summary()}"


def run(scale: float = 1.0, only: list[str] | None = None) -> dict[str, tuple[str, str, str]]:
    """Every attack against one ``serve`` process: {attack: (size, limit, result)}."""
    rows: dict[str, tuple[str, str, str]] = {}
    with server_process("asyncio", 0.0) as server:
        for name in only or list(ATTACKS):
            began = time.monotonic()
            size, limit, result = asyncio.run(_one(server.port, server.process.pid, name, scale))
            result += f"; {time.monotonic() - began:.0f} s"
            print(f"{name}: {size}: {result}", flush=True)
            rows[name] = (size, limit, result)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe_main(int(sys.argv[2]))
    else:
        run(float(sys.argv[1]) if len(sys.argv) > 1 else 0.1)
