"""A small asyncio HTTP/2 client on :class:`~goaway_ext.ClientConnection` that follows GOAWAY.

It does what Go's and gRPC's clients do when a server asks them to reconnect
(RFC 9113 §6.8): requests in flight finish on the old connection, new requests
go to a fresh one, streams the server refused are sent again (it never
processed them), and the old connection is closed once its last stream ends.
The load generator, the demo clients and the tests are built on it.

One :class:`H2Client` talks to one origin and holds at most one connection
that takes new requests, plus the draining ones still finishing. Flow control
is honoured both ways: WINDOW_UPDATEs go out as the caller consumes response
data, and request bodies wait for the server's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from .client import ClientConnection
from .errors import ConnectionDrainingError
from .events import GoawayReceived, StreamRefused

__all__ = ["H2Client", "H2ClientError", "NotHTTP2Error", "Response", "StreamingResponse", "not_http2"]

_READ_SIZE = 65536
_CONNECTION_WINDOW = 1 << 24

Headers = tuple[tuple[bytes, bytes], ...]


class H2ClientError(Exception):
    """A request failed for a reason retrying here cannot fix: reset, lost connection, timeout.

    Refused streams and drained connections never surface as this error; they
    are retried (up to ``max_attempts``) before the caller sees anything.
    """


class _RefusedError(H2ClientError):
    """The server never processed the stream; the request may be sent again."""


class _SilentServerError(H2ClientError):
    """The connection ended before the server sent a single byte.

    Behind an L4 balancer this is a backend that went away between accept and
    answer. A server that never wrote its SETTINGS cannot have sent a response,
    so an idempotent request (RFC 9110 §9.2.2) may be sent again; others are
    reported, since the server might have acted on them.
    """


class NotHTTP2Error(H2ClientError):
    """The server answered in HTTP/1.x: it does not speak HTTP/2 on this port (no retry can help).

    ``answered`` is the version it used, for example ``"HTTP/1.1"``, or the
    first bytes it sent when they are not HTTP at all.
    """

    def __init__(self, answered: str) -> None:
        super().__init__(f"the server answered {answered}; this client speaks HTTP/2 only "
                         "(prior knowledge on http://, ALPN h2 on https://)")
        self.answered = answered


def not_http2(first: bytes) -> str | None:
    """What a server's first bytes say when they are not HTTP/2, else None.

    An HTTP/2 server's first frame is SETTINGS (type 4, RFC 9113 §3.4). An
    HTTP/1.x server answers our preface with a status line, which h2 would
    report as a frame megabytes long; a TLS server answers with a TLS alert.
    """
    if len(first) < 4 or first[3] == 0x4:
        return None
    if first.startswith(b"HTTP/1."):
        return first[:8].decode("ascii", "replace")
    if first[0] in (0x15, 0x16) and first[1] == 0x03:  # TLS record: alert or handshake
        return "with TLS (use https://)"
    return repr(first[:16])


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response: what :meth:`H2Client.request` returns."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), decoded, or None."""
        key = name.lower().encode("ascii")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None


class _Stream:
    """One request's view of the events ``h2`` reports for its stream."""

    __slots__ = ("_waiter", "chunks", "conn", "ended", "error", "response", "stream_id")

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.response: asyncio.Future[tuple[int, Headers]] = asyncio.get_running_loop().create_future()
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.error: H2ClientError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: H2ClientError) -> None:
        if self.ended or self.error is not None:
            return
        self.error = error
        if not self.response.done():
            self.response.set_exception(error)
            self.response.exception()  # mark retrieved: the reader re-raises it
        self.wake()

    async def next_chunk(self, timeout: float) -> bytes | None:
        """The next DATA payload, None at the end; acknowledges it for flow control."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except asyncio.TimeoutError:
                raise H2ClientError(f"no data on stream {self.stream_id} for {timeout} s") from None
            finally:
                self._waiter = None
        data, flow_length = self.chunks.popleft()
        self.conn.acknowledge(self.stream_id, flow_length)
        return data


class _Connection:
    """One TCP connection: an ``h2`` state machine, a reader task and its streams."""

    def __init__(self, client: H2Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client = client
        self.reader = reader
        self.writer = writer
        self.h2 = ClientConnection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.saw_goaway = False
        self.heard_from_server = False
        self._waiters: list[asyncio.Future[None]] = []
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW)
        self.flush()
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def usable(self) -> bool:
        return not self.closed and not self.h2.is_draining

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.writer.write(data)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        if flow_length and not self.closed:
            try:
                self.h2.acknowledge_received_data(flow_length, stream_id)
            except h2.exceptions.ProtocolError:  # stream or connection already gone
                return
            self.flush()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_for_change(self, timeout: float, what: str) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise H2ClientError(f"timed out after {timeout} s waiting for {what}") from None

    async def start(self, headers: list[tuple[bytes, bytes]], body: bytes, timeout: float) -> _Stream:
        """Send one request; return its stream once the response headers are in."""
        while True:
            if self.closed:
                raise ConnectionDrainingError("connection closed before the request was sent")
            h2c = self.h2
            if h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams:
                break
            await self._wait_for_change(timeout, "a free stream slot")
        stream_id = self.h2.get_next_available_stream_id()  # raises ConnectionDrainingError
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        stream = _Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.flush()
        if body:
            await self._send_body(stream, body, timeout)
        try:
            await asyncio.wait_for(asyncio.shield(stream.response), timeout)
        except asyncio.TimeoutError:
            self.cancel(stream)
            raise H2ClientError(f"no response headers on stream {stream_id} within {timeout} s") from None
        return stream

    async def _send_body(self, stream: _Stream, body: bytes, timeout: float) -> None:
        view = memoryview(body)
        sent = 0
        while sent < len(body):
            if stream.error is not None:
                raise stream.error
            if self.closed:
                raise H2ClientError("connection lost while sending the request body")
            try:
                window = min(self.h2.local_flow_control_window(stream.stream_id), self.h2.max_outbound_frame_size)
                if window <= 0:
                    if stream.ended:
                        return  # the response is complete and the server grants no more window
                    await self._wait_for_change(timeout, "the server's flow-control window")
                    continue
                chunk = bytes(view[sent : sent + window])
                self.h2.send_data(stream.stream_id, chunk)
            except h2.exceptions.StreamClosedError:
                if stream.error is not None:
                    raise stream.error from None
                # The server sent its whole response and then RST_STREAM(NO_ERROR)
                # (a 413, say): it wants no more of the body, and the response
                # stands (RFC 9113 §8.1).
                return
            sent += len(chunk)
            self.flush()
            try:
                await self.writer.drain()
            except OSError as exc:  # the socket died under the body: report it as ours
                if not self.heard_from_server:
                    raise _SilentServerError(f"the connection closed before the server sent anything ({exc})") from exc
                raise H2ClientError(f"connection lost while sending the request body: {exc}") from exc
        if stream.error is not None:
            raise stream.error
        try:
            self.h2.end_stream(stream.stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self.flush()

    def cancel(self, stream: _Stream) -> None:
        """Stop a stream the caller no longer wants (RST_STREAM CANCEL)."""
        if stream.stream_id in self.streams:
            if not self.closed and not stream.ended:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
                    self.flush()
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._wake_all()
        # saw_goaway, not h2.is_draining: within one read, the StreamEnded
        # events come before the GoawayReceived they are reported with.
        if not self.streams and self.saw_goaway:
            self.close()

    async def _read_loop(self) -> None:
        error: H2ClientError = H2ClientError("the server closed the connection")
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    break
                answered = None if self.heard_from_server else not_http2(data)
                if answered is not None:
                    error = NotHTTP2Error(answered)
                    self.heard_from_server = True
                    break
                self.heard_from_server = True
                self._dispatch(self.h2.receive_data(data))
                self.flush()
                if self.closed:
                    return
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            error = H2ClientError(f"HTTP/2 protocol error: {exc}")
        except OSError as exc:
            error = H2ClientError(f"connection error: {exc}")
        if not self.heard_from_server:
            error = _SilentServerError(f"the connection closed before the server sent anything ({error})")
        self.close(error)

    def _dispatch(self, events: Iterable[Any]) -> None:
        streams = self.streams
        terminated: h2.events.ConnectionTerminated | None = None
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is None:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                else:
                    stream.chunks.append((event.data, event.flow_controlled_length))
                    stream.wake()
            elif kind is h2.events.ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.response.done():
                    status = 0
                    fields = []
                    for name, value in event.headers:
                        if name == b":status":
                            status = int(value)
                        elif not name.startswith(b":"):
                            fields.append((name, value))
                    stream.response.set_result((status, tuple(fields)))
            elif kind is h2.events.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended = True
                    stream.wake()
                    self._forget(stream)
            elif kind is StreamRefused:
                self.client.streams_refused += 1
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.fail(_RefusedError(f"stream {event.stream_id} refused by the server"))
                    self._forget(stream)
            elif kind is h2.events.StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None and event.error_code != ErrorCodes.REFUSED_STREAM:
                    stream.fail(H2ClientError(f"stream {event.stream_id} reset by the server ({event.error_code!r})"))
                    self._forget(stream)
            elif kind is GoawayReceived:
                if not self.saw_goaway:
                    self.saw_goaway = True
                    self.client.goaways_received += 1
                self.client._connection_draining(self)
                if not streams:
                    self.close()
            elif kind is h2.events.ConnectionTerminated:
                terminated = event
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                self._wake_all()
        if terminated is not None:
            self.close(H2ClientError(f"the server ended the connection ({terminated.error_code!r})"))

    def close(self, error: H2ClientError | None = None) -> None:
        """Close the socket; streams still waiting fail with ``error`` (or a generic one)."""
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
            self.flush()
        self.closed = True
        for stream in list(self.streams.values()):
            stream.fail(error or H2ClientError("connection closed"))
        self.streams.clear()
        self._wake_all()
        self.writer.close()
        self.client._connection_closed(self)
        if self.task is not asyncio.current_task():
            self.task.cancel()


class StreamingResponse:
    """A response whose body is read chunk by chunk, e.g. a watch: ``async for chunk in resp``.

    Consuming a chunk is what opens the flow-control window again, so a slow
    reader slows the server down instead of buffering without bound.
    """

    def __init__(self, stream: _Stream, status: int, headers: Headers, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self.status = status
        self.headers = headers
        self.stream_id = stream.stream_id

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), decoded, or None."""
        return Response(self.status, self.headers, b"").header(name)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._stream.next_chunk(self._timeout)
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        """The rest of the body, joined."""
        return b"".join([chunk async for chunk in self])

    def close(self) -> None:
        """Drop the stream if it has not ended (RST_STREAM CANCEL)."""
        self._stream.conn.cancel(self._stream)


class H2Client:
    """An HTTP/2 client for one origin that follows GOAWAY without failing a request.

    ``ssl``: an ``SSLContext`` for https (ALPN ``h2`` is set on it), or None for
    cleartext HTTP/2 with prior knowledge. ``timeout`` bounds each wait (connect,
    response headers, each body chunk, a flow-control window); ``max_attempts``
    bounds how often a refused request is sent again. ``eager_reconnect``
    opens the replacement connection as soon as a GOAWAY arrives instead of at
    the next request (what a load generator holding C connections wants).

    Counters, for tests and the load generator: ``connections_opened``,
    ``goaways_received`` (connections that got at least one GOAWAY, so a
    two-phase shutdown counts once), ``streams_refused`` and
    ``requests_retried``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        timeout: float = 30.0,
        max_attempts: int = 5,
        eager_reconnect: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        self.host = host
        self.port = port
        self._ssl = ssl
        if ssl is not None:
            ssl.set_alpn_protocols(["h2"])
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.eager_reconnect = eager_reconnect
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self._authority = f"{host}:{port}".encode("idna")
        self._scheme = b"https" if ssl is not None else b"http"
        self._current: _Connection | None = None
        self._connections: set[_Connection] = set()
        self._connect_lock = asyncio.Lock()
        self.connections_opened = 0
        self.goaways_received = 0
        self.streams_refused = 0
        self.requests_retried = 0

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def open_connections(self) -> int:
        """Connections not closed yet: the current one plus those still draining."""
        return len(self._connections)

    async def aclose(self) -> None:
        """Close every connection; requests still running fail."""
        self._closing = True
        if self._reconnecting is not None:
            await self._reconnecting
        for conn in list(self._connections):
            conn.close()
        await asyncio.sleep(0)

    async def connect(self) -> None:
        """Open the connection now instead of at the first request (fails like a request would)."""
        await self._connection()

    async def request(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> Response:
        """Send a request and read the whole response."""
        async with self.stream(method, path, headers, body) as response:
            data = await response.read()
        return Response(response.status, response.headers, data)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> AsyncIterator[StreamingResponse]:
        """Send a request; yield the response with its body still to read (watch streams)."""
        fields = [
            (b":method", method.encode("ascii")),
            (b":scheme", self._scheme),
            (b":authority", self._authority),
            (b":path", path.encode("ascii")),
        ]
        fields.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        if body:
            fields.append((b"content-length", str(len(body)).encode("ascii")))
        stream = await self._start(fields, body)
        status, response_headers = stream.response.result()
        response = StreamingResponse(stream, status, response_headers, self.timeout)
        try:
            yield response
        finally:
            response.close()

    async def _start(self, fields: list[tuple[bytes, bytes]], body: bytes) -> _Stream:
        silent = 0
        for attempt in range(self.max_attempts):
            if attempt:
                self.requests_retried += 1
            conn = await self._connection()
            try:
                return await conn.start(fields, body, self.timeout)
            except (ConnectionDrainingError, _RefusedError):
                continue  # never processed by the server: send it on a new connection
            except _SilentServerError:
                if fields[0][1] not in _IDEMPOTENT:
                    raise
                silent += 1
                continue
        if silent == self.max_attempts:
            # Every connection was closed before the server sent a byte: not load, a mismatch.
            hint = "" if self._ssl else "; if it speaks TLS, pass ssl=an SSLContext"
            raise H2ClientError(f"the server closed {silent} connections in a row without sending anything{hint}")
        raise H2ClientError(f"request refused {self.max_attempts} times; giving up")

    async def _connection(self) -> _Connection:
        conn = self._current
        if conn is not None and conn.usable:
            return conn
        async with self._connect_lock:
            conn = self._current
            if conn is not None and conn.usable:
                return conn
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
                    ),
                    self.timeout,
                )
            except socket.gaierror as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: cannot resolve {self.host!r} "
                                    f"({exc.strerror})") from exc
            except asyncio.TimeoutError as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: no answer within "
                                    f"{self.timeout:g} s") from exc
            except OSError as exc:
                raise H2ClientError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc!r}") from exc
            conn = _Connection(self, reader, writer)
            self.connections_opened += 1
            self._connections.add(conn)
            self._current = conn
            return conn

    def _connection_draining(self, conn: _Connection) -> None:
        if self._current is conn:
            self._current = None
            if self.eager_reconnect and not self._closing and self._reconnecting is None:
                self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._connection()
        except H2ClientError:
            pass  # the next request tries again and reports the error
        finally:
            self._reconnecting = None

    def _connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if self._current is conn:
            self._current = None
