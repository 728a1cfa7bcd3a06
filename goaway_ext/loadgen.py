"""``python -m goaway_ext load URL``: an HTTP/2 load generator that follows GOAWAY.

nghttp2's ``h2load`` counts every request still queued on a connection as
failed once a GOAWAY arrives, so it cannot measure a server that rebalances.
This one holds C connections (each an :class:`~goaway_ext.H2Client` that
reconnects as soon as its connection drains), keeps M streams in flight on
each, retries refused streams, and prints an h2load-style summary plus the
connections opened and GOAWAYs seen. ``--processes P`` splits the connections
over P processes when one core cannot keep the server busy.

:func:`run_load` is the same thing as a function returning a :class:`LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset, WindowUpdated

from ._cli import fail
from ._loadwire import ENDED, GOAWAY, REFUSED, RESET, TERMINATED, LoadWire, WireError
from .asyncio_client import H2ClientError, not_http2
from .client import ClientConnection
from .events import GoawayReceived, StreamRefused

__all__ = ["LoadResult", "configure_parser", "run_command", "run_load", "run_load_async"]

_PROGRESS_EVERY = 0.5


@dataclass
class LoadResult:
    """What a load run measured; ``summary()`` prints it the way h2load does."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    duration: float = 0.0
    connections: int = 0
    connections_opened: int = 0
    goaways_received: int = 0
    streams_refused: int = 0
    requests_retried: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def requests_per_second(self) -> float:
        """Finished requests (succeeded or failed) per second of wall time."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    def latency(self) -> dict[str, float]:
        """Request latency in seconds: min, mean, max, sd, p50, p99 (zeros when none)."""
        values = sorted(self.latencies)
        if not values:
            return {"min": 0.0, "mean": 0.0, "max": 0.0, "sd": 0.0, "p50": 0.0, "p99": 0.0}
        mean = sum(values) / len(values)
        variance = sum((v - mean) ** 2 for v in values) / len(values)

        def rank(q: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

        return {"min": values[0], "mean": mean, "max": values[-1], "sd": math.sqrt(variance),
                "p50": rank(0.50), "p99": rank(0.99)}

    def merge(self, other: LoadResult) -> None:
        """Add another process's counts to this one (durations: the longest)."""
        for name in ("requests", "succeeded", "failed", "connections", "connections_opened", "goaways_received",
                     "streams_refused", "requests_retried"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.duration = max(self.duration, other.duration)
        for mine, theirs in ((self.status, other.status), (self.errors, other.errors)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.latencies.extend(other.latencies)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no raw latencies)."""
        return {
            "requests": self.requests, "succeeded": self.succeeded, "failed": self.failed,
            "duration": self.duration, "requests_per_second": self.requests_per_second,
            "latency": self.latency(), "connections": self.connections,
            "connections_opened": self.connections_opened, "goaways_received": self.goaways_received,
            "streams_refused": self.streams_refused, "requests_retried": self.requests_retried,
            "status": self.status, "errors": self.errors,
        }

    def summary(self) -> str:
        """Human-readable lines in h2load's layout."""
        lat = self.latency()
        codes = Counter({"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
        for code, count in self.status.items():
            codes[f"{code[0]}xx"] += count

        def ms(value: float) -> str:
            return f"{value * 1000:.2f}ms"

        lines = [
            f"finished in {self.duration:.2f}s, {self.requests_per_second:.2f} req/s",
            f"requests: {self.requests} total, {self.succeeded} succeeded, {self.failed} failed",
            "status codes: " + ", ".join(f"{codes[k]} {k}" for k in ("2xx", "3xx", "4xx", "5xx")),
            f"connections: {self.connections} held, {self.connections_opened} opened, "
            f"{self.goaways_received} GOAWAYs received, {self.streams_refused} streams refused, "
            f"{self.requests_retried} requests retried",
            f"{'':22}{'min':>10}{'max':>10}{'mean':>10}{'sd':>10}{'p99':>10}",
            f"{'time for request:':22}{ms(lat['min']):>10}{ms(lat['max']):>10}{ms(lat['mean']):>10}"
            f"{ms(lat['sd']):>10}{ms(lat['p99']):>10}",
        ]
        for message, count in sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"error ({count}x): {message}")
        return "\n".join(lines)


class _Budget:
    """Hands out request slots until ``total`` is reached or the deadline passes."""

    def __init__(self, total: int | None, deadline: float | None) -> None:
        self.left = total
        self.deadline = deadline

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _target(url: str) -> tuple[str, int, str, ssl.SSLContext | None]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL must be http://HOST[:PORT]/PATH or https://..., got {url!r}")
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path, context


# The load generator trusts the server under test: h2's header validation and
# normalisation (most of its per-request time) are switched off on both sides.
def _config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                     normalize_outbound_headers=False, validate_inbound_headers=False,
                                     normalize_inbound_headers=False)


_ENGINES = ("auto", "fast", "h2")
_MAX_ATTEMPTS = 5  # as H2Client: a request refused this many times fails
_READ_WINDOW = 1 << 24
# Bytes queued for one connection's socket (asyncio's write buffer) before it stops
# reading from the server until they are sent: a server that floods PINGs or SETTINGS
# and never reads the acknowledgements cannot make the client buffer without bound.
_MAX_WRITE_BUFFER = 1 << 16


class _Run:
    """One load run in one event loop: the request template, the budget, the counters, the connections.

    Every request of a run is the same request, so a refused one is retried by
    sending the template again (``retries`` holds the attempt numbers waiting).
    """

    def __init__(self, host: str, port: int, path: str, context: ssl.SSLContext | None, method: str, body: bytes,
                 streams: int, timeout: float, budget: _Budget, result: LoadResult, engine: str = "fast",
                 max_write_buffer: int = _MAX_WRITE_BUFFER) -> None:
        self.host, self.port, self.context = host, port, context
        if context is not None:
            context.set_alpn_protocols(["h2"])
        self.fields = [(b":method", method.encode("ascii")), (b":scheme", b"https" if context else b"http"),
                       (b":authority", f"{host}:{port}".encode("idna")), (b":path", path.encode("ascii"))]
        if body:
            self.fields.append((b"content-length", str(len(body)).encode("ascii")))
        self.body = body
        self.streams = streams
        self.timeout = timeout
        self.budget = budget
        self.result = result
        self.engine = engine
        self.max_write_buffer = max_write_buffer
        self.status: Counter[bytes | None] = Counter()
        self.errors: Counter[str] = Counter()
        self.retries: list[int] = []
        self.exhausted = False
        self.running = False  # set once every first connection is open
        self.in_flight = 0
        self.conns: set[_LoadConnection] = set()
        self.opening = 0
        self.fatal: BaseException | None = None
        self.heard_any = False  # has any connection of the run received a byte?
        self.done = asyncio.get_running_loop().create_future()
        self.connections_opened = 0
        self.goaways_received = 0
        self.streams_refused = 0
        self.requests_retried = 0

    def new_wire(self) -> LoadWire | _H2Wire:
        """The protocol half of a new connection: the fast wire, or h2 for a body or ``engine="h2"``."""
        if self.engine == "fast":
            return LoadWire(self.fields, window=_READ_WINDOW)
        return _H2Wire(self.fields, self.body, _READ_WINDOW)

    def next_attempt(self) -> int:
        """The attempt number of the next request to send (a retry first), or 0 when there is none."""
        if self.retries:
            self.requests_retried += 1
            return self.retries.pop()
        if self.exhausted:
            return 0
        if self.budget.take():
            return 1
        self.exhausted = True
        return 0

    def retry(self, attempt: int) -> None:
        if attempt >= _MAX_ATTEMPTS:
            self.failed(f"request refused {_MAX_ATTEMPTS} times; giving up")
            return
        self.retries.append(attempt + 1)
        for conn in self.conns:  # a connection with a free slot takes it at once
            if conn.take_retries():
                break

    def failed(self, message: str) -> None:
        self.result.failed += 1
        self.result.requests += 1
        self.errors[message] += 1

    def check_done(self) -> None:
        if self.done.done():
            return
        if self.fatal is not None or (self.exhausted and not self.in_flight and not self.retries):
            self.done.set_result(None)

    def stop(self, error: BaseException) -> None:
        if self.fatal is None:
            self.fatal = error
        self.check_done()

    async def open(self, first: bool = False) -> None:
        """Open one connection; a failure stops the run at the start and is retried later on."""
        self.connections_opened += 1
        self.opening += 1
        loop = asyncio.get_running_loop()
        try:
            try:
                await asyncio.wait_for(loop.create_connection(
                    lambda: _LoadConnection(self), self.host, self.port, ssl=self.context,
                    server_hostname=self.host if self.context else None), self.timeout)
            except socket.gaierror as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: cannot resolve {self.host!r} "
                                    f"({exc.strerror})") from exc
            except asyncio.TimeoutError as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: no answer within "
                                    f"{self.timeout:g} s") from exc
            except OSError as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc!r}") from exc
        except H2ClientError as exc:
            if first:
                raise
            self.errors[str(exc)] += 1  # a replacement failed: try again shortly
            if not self.done.done():
                loop.call_later(0.1, lambda: loop.create_task(self.open()))
        finally:
            self.opening -= 1

    def expire(self, now: float) -> None:
        for conn in list(self.conns):
            conn.expire(now - self.timeout)


class _H2Wire:
    """The ``h2`` path behind :class:`~goaway_ext._loadwire.LoadWire`'s interface.

    Used for requests with a body (the fast wire sends none) and with
    ``engine="h2"``: a :class:`~goaway_ext.ClientConnection` whose events are
    turned into the fast wire's event tuples, so one connection class drives both.
    """

    def __init__(self, fields: list[tuple[bytes, bytes]], body: bytes, window: int) -> None:
        self.h2 = ClientConnection(_config())
        self.fields = fields
        self.body = body
        self.codes: dict[int, bytes] = {}
        self.bodies: dict[int, memoryview] = {}  # request body bytes not sent yet
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(window)

    @property
    def can_open(self) -> bool:
        h2c = self.h2
        return (not h2c.is_draining and h2c.state_machine.state != h2.connection.ConnectionState.CLOSED
                and h2c.highest_outbound_stream_id + 2 <= h2c.HIGHEST_ALLOWED_STREAM_ID)  # stream ids left

    @property
    def draining(self) -> bool:
        return self.h2.is_draining and self.h2.goaway_error_code == 0

    @property
    def max_concurrent_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

    def send_request(self) -> int:
        h2c = self.h2
        stream_id = h2c.get_next_available_stream_id()
        h2c.send_headers(stream_id, self.fields, end_stream=not self.body)
        if self.body:
            self.bodies[stream_id] = memoryview(self.body)
            self.send_bodies()
        return stream_id

    def send_bodies(self) -> None:
        h2c = self.h2
        for stream_id, view in list(self.bodies.items()):
            try:
                size = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size, len(view))
            except h2.exceptions.StreamClosedError:
                del self.bodies[stream_id]
                continue
            while size > 0:
                last = size == len(view)
                h2c.send_data(stream_id, view[:size].tobytes(), end_stream=last)
                view = view[size:]
                if last:
                    break
                size = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size, len(view))
            if view:
                self.bodies[stream_id] = view
            else:
                del self.bodies[stream_id]

    def reset(self, stream_id: int) -> None:
        self.codes.pop(stream_id, None)
        self.bodies.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def receive(self, data: bytes) -> list[tuple[int, int, Any]]:
        h2c = self.h2
        try:
            events = h2c.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise WireError(int(ErrorCodes.PROTOCOL_ERROR), str(exc)) from exc
        out: list[tuple[int, int, Any]] = []
        terminated: tuple[int, int, Any] | None = None
        for event in events:
            kind = event.__class__
            if kind is DataReceived:
                if event.flow_controlled_length:
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is ResponseReceived:
                for name, value in event.headers:
                    if name == b":status":
                        self.codes[event.stream_id] = value
                        break
            elif kind is StreamEnded:
                self.bodies.pop(event.stream_id, None)
                out.append((ENDED, event.stream_id, self.codes.pop(event.stream_id, None)))
            elif kind is StreamRefused:
                self.codes.pop(event.stream_id, None)
                self.bodies.pop(event.stream_id, None)
                out.append((REFUSED, event.stream_id, 0))
            elif kind is StreamReset:
                if event.error_code != ErrorCodes.REFUSED_STREAM:  # a refusal: StreamRefused follows
                    out.append((RESET, event.stream_id, int(event.error_code)))
            elif kind is GoawayReceived:
                out.append((GOAWAY, event.last_stream_id, event.error_code))
            elif kind is ConnectionTerminated:
                # Last, after the refusals ClientConnection reports behind it: those are retried.
                terminated = (TERMINATED, int(event.error_code or 0), event.additional_data)
            elif kind is WindowUpdated and self.bodies:
                self.send_bodies()
        if terminated is not None:
            out.append(terminated)
        return out


def _error_name(code: int) -> str:
    try:
        return repr(ErrorCodes(code))
    except ValueError:
        return str(code)


class _LoadConnection(asyncio.Protocol):
    """One connection of the run: keeps up to ``streams`` requests in flight, one write per read."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.wire = run.new_wire()
        self.transport: asyncio.Transport | None = None
        self.flight: dict[int, tuple[float, int]] = {}  # stream id -> (start, attempt)
        self.heard = False
        self.saw_goaway = False
        self.closed = False

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Past max_write_buffer unsent bytes asyncio calls pause_writing: we stop reading
        # until the server takes what we owe it (every reply we queue answers a read), so
        # a connection holds at most that plus the replies to one read (at most 256 KiB).
        transport.set_write_buffer_limits(high=self.run.max_write_buffer)
        self.run.conns.add(self)
        self.fill()
        self.flush()

    def pause_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        run = self.run
        if not self.heard:
            self.heard = True
            run.heard_any = True
            answered = not_http2(data)
            if answered is not None:
                run.stop(H2ClientError(f"the server answered {answered}; this load generator speaks HTTP/2"))
                self.close()
                return
        try:
            events = self.wire.receive(data)
        except WireError as exc:
            self.flush()
            self.lose(f"HTTP/2 protocol error: {exc}")
            return
        flight = self.flight
        if events:
            now = time.monotonic()  # every response in one read arrived at the same time
            result = run.result
            status = run.status
            latencies = result.latencies
            for kind, first, second in events:
                if kind == ENDED:
                    entry = flight.pop(first, None)
                    if entry is not None:
                        run.in_flight -= 1
                        result.succeeded += 1
                        result.requests += 1
                        status[second] += 1
                        latencies.append(now - entry[0])
                elif kind == REFUSED:
                    run.streams_refused += 1
                    entry = flight.pop(first, None)
                    if entry is not None:
                        run.in_flight -= 1
                        run.retry(entry[1])
                elif kind == RESET:
                    if flight.pop(first, None) is not None:
                        run.in_flight -= 1
                        run.failed(f"stream {first} reset by the server ({_error_name(second)})")
                elif kind == GOAWAY:
                    self.retire(goaway=True)
                elif kind == TERMINATED:
                    self.flush()
                    self.lose(f"the server ended the connection ({_error_name(first)})")
                    return
        self.fill()
        self.flush()
        if self.saw_goaway and not flight:
            self.close()
        run.check_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        run = self.run
        run.conns.discard(self)
        if not run.heard_any and run.fatal is None:
            # Not one byte from this server on any connection: a setup mistake (a TLS server
            # asked for cleartext, a port that accepts and closes), not load; stop the run.
            hint = "; if it speaks TLS, use an https:// URL" if run.context is None else ""
            run.stop(H2ClientError(f"the server closed the connection without sending anything{hint}"))
        if self.flight:
            reason = f"connection error: {exc}" if exc else "the server closed the connection"
            if not self.heard:
                reason = f"the connection closed before the server sent anything ({reason})"
            self.lose(reason)
        if not self.saw_goaway and run.fatal is None and not run.done.done():
            # Lost without a GOAWAY (closed, reset, timed out): nothing else replaces it, and a
            # run whose every connection is gone would wait for ever. Open its replacement.
            self.saw_goaway = True
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, lambda: loop.create_task(run.open()) if not run.done.done() else None)
        run.check_done()

    # -- requests

    def fill(self) -> None:
        """Start requests until ``streams`` are in flight (none once the server sent GOAWAY)."""
        if self.closed or self.saw_goaway or not self.run.running:
            return
        wire, run, flight = self.wire, self.run, self.flight
        if not wire.can_open:
            # A GOAWAY the wire read in this very read (another connection's retry got here
            # before our own loop reached its event), or stream ids used up (2**31 of them).
            self.retire(goaway=wire.draining)
            return
        limit = min(run.streams, wire.max_concurrent_streams)
        if len(flight) >= limit:
            return
        now = time.monotonic()
        send = wire.send_request
        while len(flight) < limit:
            if not wire.can_open:
                # The last stream id (2**31-1) is taken: the requests in flight finish here,
                # the next one goes to the replacement (RFC 9113 5.1.1: ids are never reused).
                self.retire(goaway=False)
                return
            attempt = run.next_attempt()
            if not attempt:
                return
            flight[send()] = (now, attempt)
            run.in_flight += 1

    def retire(self, goaway: bool) -> None:
        """No new stream here from now on; open the replacement at once (a graceful GOAWAY is counted once)."""
        if not self.saw_goaway:
            self.saw_goaway = True
            if goaway:
                self.run.goaways_received += 1
            asyncio.get_running_loop().create_task(self.run.open())

    def take_retries(self) -> bool:
        if self.closed or self.saw_goaway or len(self.flight) >= self.run.streams:
            return False
        self.fill()
        self.flush()
        return True

    def expire(self, started_before: float) -> None:
        late = [stream_id for stream_id, (start, _) in self.flight.items() if start < started_before]
        for stream_id in late:
            del self.flight[stream_id]
            self.run.in_flight -= 1
            self.run.failed(f"no response on stream {stream_id} within {self.run.timeout:g} s")
            self.wire.reset(stream_id)
        if late:
            self.fill()
            self.flush()
            self.run.check_done()

    # -- the socket

    def flush(self) -> None:
        data = self.wire.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def lose(self, reason: str) -> None:
        """Fail every request in flight with ``reason`` and close."""
        for stream_id in list(self.flight):
            del self.flight[stream_id]
            self.run.in_flight -= 1
            self.run.failed(reason)
        self.close()
        self.run.check_done()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.conns.discard(self)
            if self.transport is not None:
                self.transport.close()


async def run_load_async(
    url: str,
    *,
    requests: int | None = None,
    connections: int = 1,
    streams: int = 1,
    duration: float | None = None,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 30.0,
    insecure: bool = False,
    progress: Callable[[LoadResult], None] | None = None,
    engine: str = "auto",
    max_write_buffer: int = _MAX_WRITE_BUFFER,
) -> LoadResult:
    """Run the load in the current event loop; see :func:`run_load`.

    Each connection is an asyncio protocol without a task or a future per
    request; every read is answered with one write. Its protocol half is the
    fast wire (``engine="fast"``, the default for requests without a body):
    the request's header block is encoded once and sent with a new frame
    header per request, responses are cut into frames by the core and their
    header blocks decoded once per distinct block (see ``goaway_ext._loadwire``),
    so the load generator spends a fraction of the server's CPU per request.
    With a body, or ``engine="h2"``, it is a :class:`~goaway_ext.ClientConnection`
    with h2's header validation off (the server under test is trusted). Either
    way a GOAWAY opens the replacement connection at once and refused streams
    are sent again on it.
    """
    if requests is None and duration is None:
        raise ValueError("give a request count, a duration, or both")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests!r}")
    if connections < 1 or streams < 1:
        raise ValueError(f"connections and streams must be at least 1, got {connections!r} and {streams!r}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    if engine not in _ENGINES:
        raise ValueError(f"engine must be one of {', '.join(_ENGINES)}, got {engine!r}")
    if engine == "fast" and body:
        raise ValueError(f"engine='fast' sends no request body, got body of {len(body)} bytes; "
                         "pass engine='auto' (the default) or 'h2' with a body")
    if type(max_write_buffer) is not int or max_write_buffer < 1024:
        raise ValueError(f"max_write_buffer must be an int of at least 1024 bytes, got {max_write_buffer!r}")
    host, port, path, context = _target(url)
    if context is not None and insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    result = LoadResult(connections=connections)
    budget = _Budget(requests, None)
    run = _Run(host, port, path, context, method, body, streams, timeout, budget, result,
               "h2" if engine == "h2" or body else "fast", max_write_buffer)
    started = time.monotonic()

    def count() -> None:
        result.connections_opened = run.connections_opened
        result.goaways_received = run.goaways_received
        result.streams_refused = run.streams_refused
        result.requests_retried = run.requests_retried

    async def reporter() -> None:
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            now = time.monotonic()
            run.expire(now)
            result.duration = now - started
            count()
            if progress is not None:
                progress(result)

    report = asyncio.get_running_loop().create_task(reporter())
    try:
        # Open the C connections first, so they all exist before the clock starts.
        opened = await asyncio.gather(*(run.open(first=True) for _ in range(connections)), return_exceptions=True)
        for outcome in opened:
            if isinstance(outcome, BaseException):
                raise H2ClientError(f"cannot start: {outcome}") from outcome
        if run.fatal is not None:
            raise run.fatal
        started = time.monotonic()
        run.running = True
        budget.deadline = None if duration is None else started + duration
        for conn in list(run.conns):
            conn.fill()
            conn.flush()
        if not run.conns and not run.opening:
            raise H2ClientError("the server closed every connection before the first request")
        await run.done
        if run.fatal is not None:
            raise run.fatal
        result.duration = time.monotonic() - started
    finally:
        report.cancel()
        for conn in list(run.conns):
            conn.close()
        await asyncio.sleep(0)
    count()
    for code, seen in run.status.items():
        key = "0" if code is None else code.decode("ascii", "replace")
        result.status[key] = result.status.get(key, 0) + seen
    result.errors = dict(run.errors)
    return result


# What a child process shares with the parent for progress lines: slot -> LoadResult field.
_PROGRESS_FIELDS = ("requests", "failed", "goaways_received", "connections_opened")


def _child(kwargs: dict[str, Any], done: Any, out: Any) -> None:
    def tick(partial: LoadResult) -> None:
        for slot, name in enumerate(_PROGRESS_FIELDS):
            done[slot] = getattr(partial, name)

    try:
        result = asyncio.run(run_load_async(progress=tick, **kwargs))
        out.put(("ok", result))
    except Exception as exc:  # reported by the parent
        out.put(("error", str(exc) if isinstance(exc, (H2ClientError, ValueError)) else f"{type(exc).__name__}: {exc}"))


def run_load(
    url: str,
    *,
    requests: int | None = None,
    connections: int = 1,
    streams: int = 1,
    duration: float | None = None,
    processes: int = 1,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 30.0,
    insecure: bool = False,
    progress: Callable[[LoadResult], None] | None = None,
    engine: str = "auto",
    max_write_buffer: int = _MAX_WRITE_BUFFER,
) -> LoadResult:
    """Send ``requests`` (or run for ``duration`` seconds) over ``connections`` x ``streams``.

    With ``processes`` > 1 the connections and the request count are split
    between processes (each runs its own event loop) and the results merged.
    ``progress`` is called about twice a second with the partial result.
    A connection with ``max_write_buffer`` bytes unsent stops reading from the
    server until they are sent (a server that floods PINGs and reads nothing
    cannot grow the client's memory; its requests fail by ``timeout``).
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes!r}")
    if processes > connections:
        raise ValueError(f"processes ({processes}) cannot exceed connections ({connections})")
    common: dict[str, Any] = {"streams": streams, "duration": duration, "method": method, "body": body,
                              "timeout": timeout, "insecure": insecure, "engine": engine,
                              "max_write_buffer": max_write_buffer}
    if processes == 1:
        return asyncio.run(
            run_load_async(url, requests=requests, connections=connections, progress=progress, **common)
        )
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    counters = []
    children = []
    for i in range(processes):
        share_conns = connections // processes + (1 if i < connections % processes else 0)
        share_reqs = None if requests is None else requests // processes + (1 if i < requests % processes else 0)
        done = ctx.Array("q", len(_PROGRESS_FIELDS))
        counters.append(done)
        kwargs = dict(common, url=url, requests=share_reqs, connections=share_conns)
        child = ctx.Process(target=_child, args=(kwargs, done, out), daemon=True)
        child.start()
        children.append(child)
    merged = LoadResult()
    started = time.monotonic()
    received = 0
    problems: list[str] = []
    limit = (duration or 0) + timeout * 4 + 60
    try:
        while received < processes:
            try:
                kind, payload = out.get(timeout=_PROGRESS_EVERY)
            except Exception:  # queue.Empty: time for a progress line
                if time.monotonic() - started > limit:
                    raise TimeoutError("load processes did not finish in time") from None
                if progress is not None:
                    partial = LoadResult(duration=time.monotonic() - started)
                    for slot, name in enumerate(_PROGRESS_FIELDS):
                        setattr(partial, name, sum(c[slot] for c in counters))
                    progress(partial)
                continue
            received += 1
            if kind == "ok":
                merged.merge(payload)
            else:
                problems.append(payload)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)
    if problems:
        raise H2ClientError("; ".join(dict.fromkeys(problems)))
    return merged


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``load`` command's options (called by ``python -m goaway_ext``)."""
    parser.description = ("An HTTP/2 load generator that follows GOAWAY: C connections, M streams in flight on "
                          "each, refused streams retried, an h2load-style summary (h2load counts the requests "
                          "queued on a connection that got GOAWAY as failed; this one does not).")
    parser.add_argument("url", help="http://HOST:PORT/PATH (h2 prior knowledge) or https://... (ALPN h2)")
    parser.add_argument("-n", "--requests", type=int, default=None, help="total requests (default 1000 "
                        "unless --duration is given)")
    parser.add_argument("-c", "--clients", type=int, default=1, help="connections held open (default 1)")
    parser.add_argument("-m", "--max-concurrent-streams", type=int, default=1,
                        help="streams in flight per connection (default 1)")
    parser.add_argument("-D", "--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("-P", "--processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--method", default="GET", help="request method (default GET)")
    parser.add_argument("--data", default=None, help="request body (a string; sent as UTF-8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-wait timeout in seconds (default 30)")
    parser.add_argument("-k", "--insecure", action="store_true", help="do not verify the server's certificate")
    parser.add_argument("--engine", choices=_ENGINES, default="auto",
                        help="fast: requests encoded once, responses read without h2 (no body); h2: through h2; "
                             "auto (default): fast unless --data is given")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run_command(args: argparse.Namespace) -> int:
    """Run the ``load`` command; exit status 1 when any request failed, 2 (one line on stderr) on a bad option."""
    requests = args.requests
    if requests is None and args.duration is None:
        requests = 1000
    for flag, value in (("-n/--requests", requests), ("-c/--clients", args.clients),
                        ("-m/--max-concurrent-streams", args.max_concurrent_streams),
                        ("-P/--processes", args.processes)):
        if value is not None and value < 1:
            return fail("load", f"{flag} must be at least 1, got {value}")
    if args.duration is not None and not args.duration > 0:
        return fail("load", f"-D/--duration must be positive, got {args.duration:g}")
    if not args.timeout > 0:
        return fail("load", f"--timeout must be positive, got {args.timeout:g}")
    if args.engine == "fast" and args.data:
        # The fast engine encodes one bodiless request once; a body goes through h2 (--engine auto picks it).
        return fail("load", f"--engine fast sends no request body, got --data of {len(args.data)} characters: "
                            "use --engine auto (the default) or --engine h2 with --data")
    if args.processes > args.clients:
        return fail("load", f"-P/--processes ({args.processes}) cannot exceed -c/--clients ({args.clients}): "
                            "each process holds at least one connection")
    tty = sys.stderr.isatty()
    last_line = [time.monotonic()]  # the first line after a second: a quick failure prints only its error

    def show(partial: LoadResult) -> None:
        now = time.monotonic()
        if not tty and now - last_line[0] < 1.0:
            return
        last_line[0] = now
        total = f"/{requests}" if requests is not None else ""
        line = (f"progress: {partial.requests}{total} requests, {partial.requests_per_second:.0f} req/s, "
                f"{partial.failed} failed, {partial.goaways_received} GOAWAYs")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        result = run_load(
            args.url, requests=requests, connections=args.clients, streams=args.max_concurrent_streams,
            duration=args.duration, processes=args.processes, method=args.method,
            body=b"" if args.data is None else args.data.encode("utf-8"), timeout=args.timeout,
            insecure=args.insecure, progress=None if args.no_progress else show, engine=args.engine,
        )
    except (ValueError, H2ClientError, TimeoutError) as exc:
        if tty and not args.no_progress:
            print(file=sys.stderr)
        return fail("load", f"{args.url}: {exc}" if isinstance(exc, H2ClientError) else exc)
    if tty and not args.no_progress:
        print(file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    sys.stdout.flush()
    return 0 if result.failed == 0 else 1
