"""A small, real asyncio HTTP/2 server on :class:`~goaway_ext.ServerConnection`.

It exists to show (and test, and demo) the drain end to end: one
``ServerConnection`` per TCP connection, one async handler call per request,
flow control respected, timers driven by the event loop, and the socket closed
at ``close_at`` (after the linger), never earlier. TLS with ALPN ``h2`` when
given an ``ssl.SSLContext``; cleartext HTTP/2 with prior knowledge otherwise.
The server speaks only HTTP/2: an HTTP/1.x request gets a plain
``505 HTTP Version Not Supported`` and the connection is closed.

``python -m goaway_ext serve`` runs it with a built-in app (see
:func:`builtin_app`); SIGTERM and SIGINT drain every connection and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import MethodType
from typing import Any
from urllib.parse import parse_qs

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

from . import metrics
from ._cli import CommandError, bind_error, check_readable, configure_logging, fail, flag_message, log_level, ssl_error
from ._core import ExemptPaths
from .events import ConnectionDrained, GoawaySent
from .policy import MODES, GoawayPolicy
from .server import DrainState, ServerConnection

__all__ = ["Request", "ResponseStream", "Handler", "H2Server", "builtin_app", "configure_parser", "run_command"]

log = logging.getLogger("goaway_ext.asyncio_server")

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_READ_SLICE = 4096  # bytes of input handled per turn of the event loop (fairness between connections)
# A lingering close (see _H2Protocol.close) reads and drops at most this much of the peer's input.
_LINGER_BYTES = 1 << 20
_HTTP1_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
_HTTP1_REFUSAL = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
    b"content-type: text/plain\r\n"
    b"connection: close\r\n"
)
_HTTP1_BODY = b"this server speaks only HTTP/2 (prior knowledge on cleartext, or TLS with ALPN h2)\n"


@dataclass(frozen=True, slots=True)
class Request:
    """One complete HTTP/2 request, body included (up to the server's ``max_body``).

    ``headers`` are the raw ``(name, value)`` byte pairs as received; ``path``
    is without the query string; ``server`` lets a handler reach the server
    (its ``shutdown_event``, its ``stats()``).
    """

    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stream_id: int
    server: H2Server

    def param(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``, or ``default``."""
        values = parse_qs(self.query).get(name)
        return values[0] if values else default


class StreamClosed(Exception):
    """The peer reset the stream, or the connection went away, while a handler was writing."""


class ResponseStream:
    """Writes the response of one request: :meth:`start`, :meth:`write` chunk by chunk, :meth:`end`.

    Writes wait for flow-control window (the peer's WINDOW_UPDATE) and for the
    socket to accept more, so a slow reader slows the handler instead of
    filling memory. :meth:`send` is the one-call form for small responses.
    """

    __slots__ = ("_ended", "_proto", "_started", "stream_id")

    def __init__(self, proto: _H2Protocol, stream_id: int) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self._started = False
        self._ended = False

    @property
    def started(self) -> bool:
        """True once the response headers were sent."""
        return self._started

    @property
    def ended(self) -> bool:
        """True once END_STREAM was sent."""
        return self._ended

    async def start(self, status: int = 200, headers: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        """Send the response headers (the server adds ``x-backend``)."""
        self._send_headers(status, headers, end_stream=False)
        self._proto.flush()

    def _send_headers(self, status: int, headers: Iterable[tuple[str | bytes, str | bytes]], end_stream: bool) -> None:
        if self._started:
            raise RuntimeError("response headers already sent")
        proto = self._proto
        proto.check_open(self.stream_id)
        fields: list[tuple[bytes, bytes]] = [(b":status", str(status).encode()), proto.server.backend_header]
        for name, value in headers:
            fields.append(
                (name.encode() if isinstance(name, str) else name, value.encode() if isinstance(value, str) else value)
            )
        self._started = True
        proto.conn.send_headers(self.stream_id, fields, end_stream=end_stream)
        if end_stream:
            self._ended = True

    async def write(self, data: bytes) -> None:
        """Send body bytes, as many DATA frames as the windows and frame size allow."""
        if not self._started:
            await self.start()
        await self._proto.send_body(self.stream_id, data, end_stream=False)

    async def end(self, data: bytes = b"") -> None:
        """Send the last body bytes (if any) with END_STREAM."""
        if self._ended:
            return
        if not self._started:
            self._send_headers(200, (), end_stream=not data)
            if not data:
                self._proto.flush()
                return
        self._ended = True
        await self._proto.send_body(self.stream_id, data, end_stream=True)

    async def send(
        self, status: int, body: bytes = b"", headers: Iterable[tuple[str | bytes, str | bytes]] = ()
    ) -> None:
        """Send a whole response: headers (with content-length) and body."""
        fields = [*headers, ("content-length", str(len(body)))]
        self._send_headers(status, fields, end_stream=not body)
        if body:
            self._ended = True
            await self._proto.send_body(self.stream_id, body, end_stream=True)
        else:
            self._proto.flush()


#: ``handler(request, response)``: must end the response (the server ends it if not).
Handler = Callable[[Request, ResponseStream], Awaitable[None]]
"""A request handler: it answers through the ``ResponseStream``, so it can stream (watches)."""


@dataclass(slots=True)
class _StreamState:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    reset: bool = False
    ended: bool = False  # END_STREAM received: the body is complete and the handler runs
    size: int = 0  # body bytes counted against the connection's max_buffered
    owed: int = 0  # flow-controlled bytes received but not yet given back as window


@dataclass(slots=True)
class _StallCheck:
    """One send_timeout period under way: what was held back when it began, to tell progress from none."""

    handle: asyncio.TimerHandle
    size: int  # our write buffer when it began; -1: writing was not paused then
    waiters: dict[int, asyncio.Future[None]]  # the streams waiting for window then, and the very waits
    resumed: bool = False  # writing resumed since: the peer took our bytes


# _H2Protocol._control_since once a peer went over max_control_rate.
_FLOODED = -1.0

# h2 remembers this many closed streams per connection (its default is 65,536,
# about 11 MB once full) so that late frames on them are answered correctly. A
# reset flood fills that record; 4,096 keeps it under 1 MB and still covers
# any frame a well-behaved peer sends after a stream it closed.
_CLOSED_STREAMS_REMEMBERED = 4096


class _ServedConnection(ServerConnection):
    MAX_CLOSED_STREAMS = _CLOSED_STREAMS_REMEMBERED


class _PlainConnection(H2Connection):
    MAX_CLOSED_STREAMS = _CLOSED_STREAMS_REMEMBERED


# What ``_H2Protocol.conn`` is until the preface arrives: one shared, never-initiated
# connection instead of a throwaway H2Connection per accepted socket. Nothing
# touches ``conn`` before the preface except flush(), whose data_to_send() is b"".
_NOT_STARTED = H2Connection()
_H2_DATA_TO_SEND = H2Connection.data_to_send
_SERVING = DrainState.SERVING


class _H2Protocol(asyncio.Protocol):
    """One TCP connection: bytes <-> the connection object, events -> handler tasks."""

    # Slots: past 30 attributes CPython stops sharing an instance dict's keys, and
    # every ``self.x`` on the per-request path then becomes a dict lookup.
    __slots__ = (
        "__weakref__",  # tests check that a closed connection is collectable
        "_abort_handle", "_backlog", "_backlog_scheduled", "_buffered", "_closing", "_control", "_control_seen",
        "_control_since", "_data_to_send", "_held", "_idle_since", "_lingered", "_offset", "_owed", "_preface",
        "_reading_paused",
        "_receive", "_resume", "_serving", "_stall", "_started", "_streams", "_timed", "_timer", "_timer_at",
        "_watchdog", "_window_waiters", "closed", "conn", "drainable", "drains", "loop", "peer", "requests", "server",
        "transport",
    )

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn: H2Connection = _NOT_STARTED  # replaced once the preface is seen
        self.drainable: ServerConnection | None = None
        # conn's receive_data and data_to_send, looked up once per connection
        # (and again when a drain starts, see _drain_started): a serving
        # ServerConnection holds them as instance attributes, which CPython's
        # method-call shortcut cannot cache, so a lookup per call costs more
        # than on h2's own class.
        self._receive: Callable[[bytes], list[Any]] = _NOT_STARTED.receive_data
        self._data_to_send: Callable[[], bytes] = _NOT_STARTED.data_to_send
        self._serving: ServerConnection | None = None  # drainable, while its drain has not started
        self._timed = False  # flush() must ask drainable for its next deadline (draining, or max_idle)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._preface = b""
        self._started = False
        self._streams: dict[int, _StreamState] = {}
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._resume: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closing = False
        self._lingered = -1  # input dropped by a lingering close; -1: not lingering
        self._abort_handle: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle_since = self.loop.time()
        self._buffered = 0  # request body bytes held for this connection (incomplete or in a handler)
        self._held = 0  # of which in bodies whose handler runs (freed when it returns)
        self._owed = 0  # flow-controlled bytes not yet acknowledged, over all streams
        self._control = 0  # PING/SETTINGS answers queued since our write buffer was last empty
        self._control_seen = 0  # PING/SETTINGS frames received since _control_since (max_control_rate)
        # When the current max_control_rate window began; 0.0: at the first check (no clock read per
        # connection); _FLOODED: over the rate, to be closed after this read.
        self._control_since = 0.0
        self._stall: _StallCheck | None = None  # the send_timeout period under way, only while held back
        self._backlog = b""  # read but not processed yet from _offset on (see _step)
        self._offset = 0
        self._backlog_scheduled = False
        self._reading_paused = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.requests = 0
        self.drains = 0

    # -- transport callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._arm_watchdog(self.server.handshake_timeout)
        self.server.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timers()
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        for state in self._streams.values():
            if state.task is not None and not state.task.done():
                state.task.cancel()
        self._wake_all(error=True)
        if self._resume is not None and not self._resume.done():
            self._resume.set_exception(StreamClosed("connection lost"))
            self._resume.exception()  # mark retrieved: nobody may be waiting
        self.server.connection_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        # The peer is not reading what we send: stop reading what it sends, so
        # that its PINGs, SETTINGS and requests cannot make us queue answers
        # without bound. Handlers writing wait on _resume.
        self._resume = self.loop.create_future()
        self._update_reading()
        if self._stall is None and self.server.send_timeout is not None:
            self._arm_stall()

    def resume_writing(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None
        if self._stall is not None:
            self._stall.resumed = True  # the peer took enough of our bytes: progress
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the socket only while we write freely and have no unprocessed backlog."""
        transport = self.transport
        if transport is None or self._closing:
            return
        want = self._resume is None and not self._backlog
        if want and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        elif not want and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        if self._backlog and self._resume is None and not self._backlog_scheduled:
            self._backlog_scheduled = True
            self.loop.call_soon(self._process_backlog)

    def _process_backlog(self) -> None:
        self._backlog_scheduled = False
        if self._closing or self._resume is not None or not self._backlog:
            return
        self._step()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            if self._lingered >= 0:  # a lingering close: dropped, up to _LINGER_BYTES
                self._lingered += len(data)
                if self._lingered > _LINGER_BYTES:
                    self.abort()
            return
        if self._backlog:  # reads arriving while a backlog waits (TLS may deliver a little after a pause)
            self._backlog = self._backlog[self._offset :] + data
        else:
            self._backlog = data
        self._offset = 0
        self._step()

    def _step(self) -> None:
        # One read can hold thousands of frames (a reset flood packs ~8,000
        # streams into 256 KiB). Work through it _READ_SLICE bytes per turn of
        # the event loop, not reading more meanwhile, so the other connections
        # are served between slices.
        backlog, offset = self._backlog, self._offset
        if offset == 0 and len(backlog) <= _READ_SLICE:
            data = backlog
            self._backlog = b""
        else:
            data = backlog[offset : offset + _READ_SLICE]
            self._offset = offset + len(data)
            if self._offset >= len(backlog):
                self._backlog, self._offset = b"", 0
        try:
            self._process(data)
        finally:
            if self._closing:
                self._backlog, self._offset = b"", 0
            self._update_reading()

    def _process(self, data: bytes) -> None:
        if not self._started:
            data = self._check_preface(data)
            if not data:
                return
        if self._control:
            assert self.transport is not None
            if not self.transport.get_write_buffer_size():
                self._control = 0  # the peer read every answer: the count starts over
        try:
            events = self._receive(data)
        except ProtocolError as exc:
            log.info("protocol error from %s: %s", self.peer, exc)
            self._check_drain()
            self.flush()
            self.close()
            return
        # _check_drain, inlined: this runs once per read, the other callers seldom.
        serving = self._serving
        if serving is not None and serving._state is not _SERVING:  # the read started a drain
            self._drain_started()
        self._handle(events)
        if self._control > self.server.max_control_frames:
            if self._control_since == _FLOODED:
                log.warning("closing %s: more than %d PING/SETTINGS frames in under a second (max_control_rate)",
                            self.peer, self.server.max_control_rate)
                self.calm(b"control frame flood")
                return
            log.warning("closing %s: %d PING/SETTINGS answers queued that it does not read (max_control_frames=%d)",
                        self.peer, self._control, self.server.max_control_frames)
            self.abort()
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too (after a lingering close's FIN, the end of it)

    # -- helpers --------------------------------------------------------------------

    def _check_preface(self, data: bytes) -> bytes:
        buffered = self._preface + data
        if len(buffered) < len(_PREFACE) and _PREFACE.startswith(buffered):
            self._preface = buffered
            return b""
        if not buffered.startswith(_PREFACE):
            assert self.transport is not None
            if buffered.startswith(_HTTP1_METHODS):
                log.info("refused an HTTP/1.x request from %s: this server speaks only HTTP/2", self.peer)
                name, value = self.server.backend_header
                self.transport.write(
                    _HTTP1_REFUSAL + name + b": " + value + b"\r\ncontent-length: "
                    + str(len(_HTTP1_BODY)).encode() + b"\r\n\r\n" + _HTTP1_BODY
                )
            self.close()
            return b""
        self._started = True
        self._preface = b""
        self._idle_since = self.loop.time()
        config = H2Configuration(client_side=False, header_encoding=None)
        if self.server.plain_h2:
            self.conn = _PlainConnection(config=config)
        else:
            drainable = self.drainable = _ServedConnection(config, policy=self.server.policy, clock=self.loop.time,
                                                           max_control_rate=self.server.max_control_rate)
            self.conn = drainable
            self._serving = drainable
            self._timed = drainable._idle_limit is not None
            metrics.connection_opened()  # process totals and Prometheus, shared with hypercorn
            if self.server.is_shutting_down:
                drainable.start_drain("shutdown")
                self._serving = None
                self._timed = True
            elif not self._timed and drainable._age_deadline is not None:
                # Its one deadline while serving without max_idle (what next_deadline()
                # returns then): its age, which no request moves.
                self._schedule(drainable._age_deadline)
        self._receive = self.conn.receive_data
        # While serving, ServerConnection's write is h2's own (tests/test_grpclib.py pins
        # that): calling h2's directly is a Python-to-Python call, where the connection's
        # method (the core's serving pair) would enter h2 from C, ~0.6k instructions more
        # per flush. _drain_started swaps in the connection's own when the drain starts.
        self._data_to_send = (self.conn.data_to_send if self._serving is None
                              else MethodType(_H2_DATA_TO_SEND, self.conn))
        self.conn.initiate_connection()
        # Request bodies get their stream window back only while the connection
        # buffers less than max_buffered (see _may_acknowledge). The connection
        # window is made large enough for every stream's window at once, so
        # that streams held back can never starve the one allowed to proceed.
        settings = self.conn.local_settings
        self.conn.increment_flow_control_window(settings.max_concurrent_streams * settings.initial_window_size)
        return buffered

    def close(self) -> None:
        """Close after a short flush: what is queued gets ``flush_timeout`` seconds, then the socket is aborted.

        A lingering close (nginx's ``lingering_close``): closing a socket with
        unread input makes the kernel send RST, which can destroy our last
        bytes (the GOAWAY that says why) before the peer reads them. So our
        side sends FIN after the queued bytes (``write_eof``) and reads and
        drops what the peer still sends, until its FIN, at most
        ``flush_timeout`` seconds and ``_LINGER_BYTES``; then the socket is
        closed (or aborted). TLS transports cannot half-close: closed at once.
        """
        transport = self.transport
        if transport is not None and not self._closing:
            self._closing = True
            self._cancel_timers()  # a closing connection needs only the abort below
            if not transport.can_write_eof():
                transport.close()
            else:
                try:
                    transport.write_eof()
                except OSError:  # the peer is gone already (ENOTCONN after its RST): nothing to linger for
                    transport.abort()
                    return
                self._lingered = 0
                if self._reading_paused:
                    self._reading_paused = False
                    transport.resume_reading()
            if self._abort_handle is None:
                self._abort_handle = self.loop.call_later(self.server.flush_timeout, self.abort)

    def _cancel_timers(self) -> None:
        """Cancel the drain timer (max_age and the rest), the watchdog and the send_timeout check.

        Run as soon as the connection starts closing, not only when the socket
        is gone: a max_age timer hours away must not outlive its connection.
        """
        for handle in (self._timer, self._watchdog):
            if handle is not None:
                handle.cancel()
        self._timer = self._watchdog = None
        self._timer_at = None
        if self._stall is not None:
            self._stall.handle.cancel()
            self._stall = None

    def calm(self, reason: bytes) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) naming the last stream, then close (RFC 9113 §5.4.1): a peer past a limit.

        The last-stream-id never rises above one a drain already announced.
        The GOAWAY goes behind whatever is queued; ``close`` gives it
        ``flush_timeout``, so a peer that does not read is aborted anyway.
        """
        if self._closing:
            return
        if not self._started:
            self.abort()
            return
        last = self.conn.highest_inbound_stream_id
        drainable = self.drainable
        if drainable is not None and drainable.last_stream_id is not None:
            last = min(last, drainable.last_stream_id)
        with contextlib.suppress(ProtocolError):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=reason, last_stream_id=last)
        self.flush()
        self.close()

    # -- send_timeout: a peer that lets nothing through -------------------------------

    def _arm_stall(self) -> None:
        """Start a send_timeout period: armed only while writing is paused or a stream waits for window."""
        assert self.server.send_timeout is not None and self.transport is not None
        if self._closing:
            return
        size = self.transport.get_write_buffer_size() if self._resume is not None else -1
        handle = self.loop.call_later(self.server.send_timeout, self._on_stall)
        self._stall = _StallCheck(handle, size, dict(self._window_waiters))

    def _on_stall(self) -> None:
        """One send_timeout period is over: judge progress since it began, not total time.

        Writing paused and the peer took not one byte of our write buffer (and
        writing never resumed): the connection goes (GOAWAY ENHANCE_YOUR_CALM,
        then ``close``). A stream that still waits on the very window wait it
        waited on a period ago got no WINDOW_UPDATE in that time: that stream
        is reset (CANCEL) and its handler ends. A slow reader that drains a
        little each period, or a watch that waits on its own clock, is left alone.
        """
        check, self._stall = self._stall, None
        transport = self.transport
        if self._closing or transport is None or check is None:
            return
        if self._resume is not None and check.size >= 0 and not check.resumed:
            if transport.get_write_buffer_size() >= check.size:
                log.warning("closing %s: it read nothing of the %d bytes queued for it in %.1f s (send_timeout)",
                            self.peer, transport.get_write_buffer_size(), self.server.send_timeout)
                self.calm(b"send_timeout")
                return
        seen = check.waiters
        starved = [stream_id for stream_id, waiter in self._window_waiters.items() if seen.get(stream_id) is waiter]
        for stream_id in starved:
            log.info("resetting stream %d of %s: no flow-control window for %.1f s (send_timeout)", stream_id,
                     self.peer, self.server.send_timeout)
            self._reset(stream_id, ErrorCodes.CANCEL)
        if starved:
            self.flush()
        if self._resume is not None or self._window_waiters:
            self._arm_stall()

    def abort(self) -> None:
        """Drop the connection now, queued bytes included (a peer that does not read gets no more time)."""
        self._closing = True
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def _arm_watchdog(self, delay: float | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if delay is not None and not self._closing:
            self._watchdog = self.loop.call_later(delay, self._on_watchdog)

    def _on_watchdog(self) -> None:
        """Reap a connection that never sent its preface, or that has had no open stream for ``idle_timeout``."""
        self._watchdog = None
        if self._closing:
            return
        if not self._started:
            log.info("closing %s: no HTTP/2 preface within %.1f s (handshake_timeout)", self.peer,
                     self.server.handshake_timeout)
            self.abort()
            return
        timeout = self.server._idle_hard_stop if self.drainable is not None else self.server.idle_timeout
        if timeout is None:
            return
        if self._streams:
            self._arm_watchdog(timeout)
            return
        left = self._idle_since + timeout - self.loop.time()
        if left > 0:
            self._arm_watchdog(left)
            return
        # The hard stop. A policy with max_idle has sent its graceful GOAWAY
        # already; otherwise the client gets h2's one GOAWAY now, naming the
        # last stream it opened: with nothing in flight, nothing is lost.
        log.info("closing %s: no open stream for %.1f s (idle_timeout)", self.peer, timeout)
        if self.drainable is None or not self.drainable.is_draining:
            with contextlib.suppress(ProtocolError):
                self.conn.close_connection()
        self.flush()
        self.close()

    def flush(self) -> None:
        if self._closing:
            return
        data = self._data_to_send()
        if data:
            assert self.transport is not None
            self.transport.write(data)
        if self._timed:
            # flush() runs several times per request. A serving connection without
            # max_idle has one deadline, its age (what next_deadline() returns then):
            # it is scheduled once, when the connection starts (_check_preface), and
            # flush() asks again only once the drain has started (_drain_started).
            assert self.drainable is not None
            deadline = self.drainable.next_deadline()
            if deadline != self._timer_at:
                self._schedule(deadline)

    def _check_drain(self) -> None:
        """After a call that may have started the drain: notice it (see :meth:`_drain_started`)."""
        serving = self._serving
        if serving is not None and serving._state is not _SERVING:
            self._drain_started()

    def _drain_started(self) -> None:
        """drainable left SERVING: its own receive_data and data_to_send answer now, and its deadlines move."""
        conn = self.conn
        self._serving = None
        self._timed = True
        self._receive = conn.receive_data
        self._data_to_send = conn.data_to_send

    def _schedule(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not self._closing:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        drainable = self.drainable
        if drainable is None or self._closing:
            return
        now = self.loop.time()
        events = drainable.handle_timer(now)
        self._check_drain()
        self._handle(events)
        self.flush()
        if not self._timed:  # still serving (the timer fired a little early): the age deadline again
            self._schedule(drainable.next_deadline())
        close_at = drainable.close_at
        if close_at is not None and now >= close_at:
            log.info("closing drained connection from %s", self.peer)
            self.close()

    def start_drain(self) -> None:
        """Server shutdown: drain this connection (plain h2: GOAWAY the h2 way)."""
        if self._closing:
            return
        if not self._started:
            # No preface yet: _check_preface starts the drain the moment it
            # arrives, so a client that connected just before shutdown still
            # gets its first requests answered instead of a reset.
            return
        if self.drainable is not None:
            self.drainable.start_drain("shutdown")
            self._check_drain()
        else:
            with contextlib.suppress(ProtocolError):
                self.conn.close_connection()
            self.flush()
            self.close()
            return
        self.flush()

    def check_open(self, stream_id: int) -> None:
        state = self._streams.get(stream_id)
        if self._closing or state is None or state.reset:
            raise StreamClosed(f"stream {stream_id} was reset or its connection closed")

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            cls = event.__class__
            if cls is RequestReceived:
                self.requests += 1
                opened = _StreamState(event.headers)
                self._streams[event.stream_id] = opened
                declared = _header(event.headers, b"content-length")
                if declared.isdigit() and int(declared) > self.server.max_body:
                    self._too_large(event.stream_id, opened)
            elif cls is DataReceived:
                self._body(event.stream_id, event.data, event.flow_controlled_length)
            elif cls is StreamEnded:
                state = self._streams.get(event.stream_id)
                if state is not None and not state.reset and state.task is None:
                    state.ended = True
                    self._held += state.size
                    state.task = self.loop.create_task(self._run(event.stream_id, state))
            elif cls is WindowUpdated:
                if event.stream_id:
                    self._wake(event.stream_id)
                else:
                    self._wake_all()
            elif cls is RemoteSettingsChanged:
                self._control += 1  # h2 answers it with a SETTINGS ACK
                self._control_seen += 1
                if self._control_seen > self.server._control_rate:
                    self._control_rate_check()
                self._wake_all()
            elif cls is PingReceived:
                self._control += 1  # h2 answers it with a PING ACK
                self._control_seen += 1
                if self._control_seen > self.server._control_rate:
                    self._control_rate_check()
            elif cls is StreamReset:
                state = self._streams.get(event.stream_id)
                if state is not None:
                    # Reset by the peer: nobody will read this stream again.
                    state.reset = True
                    if state.task is not None:
                        state.task.cancel()
                    self._wake(event.stream_id, error=True)
                    self._free(event.stream_id, state)
            elif cls is ConnectionTerminated:
                log.info("peer %s sent GOAWAY (error code %s)", self.peer, event.error_code)
                self.flush()
                self.close()
            elif cls is GoawaySent:
                log.info(
                    "GOAWAY to %s: last_stream_id=%d final=%s reason=%s",
                    self.peer, event.last_stream_id, event.final, event.reason,
                )
            elif cls is ConnectionDrained:
                self.drains += 1
                log.info(
                    "drained connection from %s: last_stream_id=%d reason=%s in %.3fs",
                    self.peer, event.last_stream_id, event.reason, event.duration,
                )

    def _control_rate_check(self) -> None:
        """More than ``max_control_rate`` PING/SETTINGS since the window began: a flood if under a second.

        The clock is read once per ``max_control_rate`` frames, never per
        request. A flood pushes ``_control`` past ``max_control_frames`` so
        that the one check after each read (in ``_process``) closes it.
        """
        if self._control_since == _FLOODED:
            return  # already judged; the rest of this read changes nothing
        now = self.loop.time()
        if now - self._control_since < 1.0:
            self._control_since = _FLOODED
            self._control = self.server.max_control_frames + 1
        else:
            self._control_since = now
            self._control_seen = 1

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        state = self._streams.get(stream_id)
        if state is not None:
            state.reset = True
            if state.task is not None:
                state.task.cancel()
        with contextlib.suppress(ProtocolError):
            self.conn.reset_stream(stream_id, code)
        self._wake(stream_id, error=True)
        if state is not None:
            self._free(stream_id, state)

    # -- request bodies: buffering and flow control -------------------------------------

    def _body(self, stream_id: int, data: bytes, flow_length: int) -> None:
        state = self._streams.get(stream_id)
        if state is None or state.reset or state.ended:
            # Nobody will read it (a reset or refused stream): the connection
            # window comes back at once, h2 skips the closed stream's own.
            self._acknowledge(flow_length, stream_id)
            return
        state.body += data
        state.size += len(data)
        self._buffered += len(data)
        if state.size > self.server.max_body:
            state.owed += flow_length
            self._owed += flow_length
            self._too_large(stream_id, state)
        elif self._may_acknowledge(state):
            self._acknowledge(flow_length, stream_id)
        else:
            state.owed += flow_length
            self._owed += flow_length

    def _may_acknowledge(self, state: _StreamState) -> bool:
        """Whether ``state``'s stream may have its window back now (the backpressure rule).

        Under ``max_buffered`` every stream may. Over it, only the oldest
        incomplete stream, and only when no handler holds a body (else one
        ending frees room): so a connection never stalls for good, and holds
        at most max_buffered + max_body + one window per stream.
        """
        if self._buffered <= self.server.max_buffered:
            return True
        if self._held:
            return False
        for other in self._streams.values():
            if not other.ended and not other.reset:
                return other is state
        return False

    def _acknowledge(self, flow_length: int, stream_id: int) -> None:
        if flow_length:
            with contextlib.suppress(ProtocolError):
                self.conn.acknowledge_received_data(flow_length, stream_id)

    def _too_large(self, stream_id: int, state: _StreamState) -> None:
        """A body over ``max_body``: answer 413 and stop the upload (RST_STREAM NO_ERROR, RFC 9113 §8.1).

        Never REFUSED_STREAM: that tells the client the request was not
        processed and may be sent again, so a client would upload it again.
        """
        log.info("request body over max_body=%d on stream %d from %s: 413", self.server.max_body, stream_id, self.peer)
        state.reset = True
        body = b"request body larger than %d bytes\n" % self.server.max_body
        with contextlib.suppress(ProtocolError):
            self.conn.send_headers(stream_id, [(b":status", b"413"), self.server.backend_header,
                                               (b"content-type", b"text/plain"),
                                               (b"content-length", str(len(body)).encode())])
            self.conn.send_data(stream_id, body, end_stream=True)
        self._reset(stream_id, ErrorCodes.NO_ERROR)

    def _free(self, stream_id: int, state: _StreamState) -> None:
        """Forget a stream that ended or was reset: its entry, its body, its window debt."""
        if self._streams.get(stream_id) is not state:
            return
        del self._streams[stream_id]
        self._window_waiters.pop(stream_id, None)
        self._buffered -= state.size
        if state.ended:
            self._held -= state.size
        state.body = bytearray()
        state.size = 0
        if not self._streams:
            self._idle_since = self.loop.time()
        if state.owed:
            self._owed -= state.owed
            owed, state.owed = state.owed, 0
            self._acknowledge(owed, stream_id)  # the connection window, at least
        if self._owed:
            for other_id, other in list(self._streams.items()):
                if other.owed and self._may_acknowledge(other):
                    self._owed -= other.owed
                    owed, other.owed = other.owed, 0
                    self._acknowledge(owed, other_id)

    def _wake(self, stream_id: int, error: bool = False) -> None:
        waiter = self._window_waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            if error:
                waiter.set_exception(StreamClosed(f"stream {stream_id} was reset"))
            else:
                waiter.set_result(None)

    def _wake_all(self, error: bool = False) -> None:
        for stream_id in list(self._window_waiters):
            self._wake(stream_id, error)

    async def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Send ``data`` on a stream within the flow-control windows, then flush."""
        conn = self.conn
        view = memoryview(data)
        while True:
            self.check_open(stream_id)
            if not view:
                if end_stream:
                    conn.end_stream(stream_id)
                break
            size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(view))
            if size <= 0:
                self.flush()
                waiter = self.loop.create_future()
                self._window_waiters[stream_id] = waiter
                if self._stall is None and self.server.send_timeout is not None:
                    self._arm_stall()
                await waiter
                continue
            last = size == len(view)
            conn.send_data(stream_id, view[:size].tobytes(), end_stream=end_stream and last)
            view = view[size:]
            if last:
                break
        self.flush()
        if self._resume is not None:
            await self._resume

    async def _run(self, stream_id: int, state: _StreamState) -> None:
        path, _, query = _header(state.headers, b":path").partition("?")
        body = bytes(state.body)
        state.body = bytearray()  # one copy only; still counted in state.size until the handler returns
        request = Request(
            method=_header(state.headers, b":method"),
            path=path,
            query=query,
            headers=state.headers,
            body=body,
            stream_id=stream_id,
            server=self.server,
        )
        response = ResponseStream(self, stream_id)
        try:
            await self.server.handler(request, response)
            if not response.ended:
                await response.end()
        except (StreamClosed, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path)
            if not self._closing:
                if not response.started:
                    with contextlib.suppress(StreamClosed, ProtocolError):
                        await response.send(500, b"internal error\n")
                else:
                    self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
                    self.flush()
        finally:
            self._free(stream_id, state)
            if not self._closing:
                self.flush()  # window given back by _free


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


class H2Server:
    """An asyncio HTTP/2 server: one :class:`ServerConnection` per connection, one handler call per request.

    ``policy`` applies to every connection; ``name`` goes into the
    ``x-backend`` header of every response (default ``host:port``), so a
    client behind a balancer can count where its requests went.
    ``plain_h2=True`` uses h2's own ``H2Connection`` instead (no drain; for
    benchmarks against the baseline).

    The limits bound what one hostile or broken peer can cost (README, "Limits"):
    ``max_body`` bytes per request body (larger: 413); ``max_buffered`` bytes of
    request bodies per connection before stream windows stop coming back, so a
    slow handler slows its client; ``max_control_frames`` PING/SETTINGS answers
    queued to a peer that does not read before it is dropped;
    ``max_control_rate`` frames that ask no work (PING, SETTINGS, PRIORITY,
    WINDOW_UPDATE, empty DATA...; see :class:`ServerConnection`) a second
    from a peer that does read (each costs CPU; past it
    GOAWAY(ENHANCE_YOUR_CALM));
    a preface within ``handshake_timeout`` seconds; ``idle_timeout`` seconds
    without an open stream before the connection is closed (None: never);
    ``send_timeout`` seconds in which a peer lets none of our bytes through
    (writing paused: the connection goes; a stream without flow-control
    window: that stream is reset), measured as time without progress so a
    slow but steady reader keeps its watch; ``flush_timeout`` seconds for
    queued bytes when a connection is closed, then it is aborted.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        policy: GoawayPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
        name: str | None = None,
        max_body: int = 1 << 20,
        max_buffered: int = 1 << 20,
        max_control_frames: int = 1000,
        max_control_rate: int | None = 1000,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = 300.0,
        send_timeout: float | None = 60.0,
        flush_timeout: float = 1.0,
        plain_h2: bool = False,
    ) -> None:
        for arg, value in (("max_body", max_body), ("max_buffered", max_buffered),
                           ("max_control_frames", max_control_frames), ("max_control_rate", max_control_rate)):
            if value is None and arg == "max_control_rate":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                off = " or None (off)" if arg == "max_control_rate" else ""
                raise ValueError(f"{arg} must be a positive int{off}, got {value!r}")
        for arg, seconds in (("handshake_timeout", handshake_timeout), ("idle_timeout", idle_timeout),
                             ("send_timeout", send_timeout), ("flush_timeout", flush_timeout)):
            if seconds is None and arg in ("idle_timeout", "send_timeout"):
                continue
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 1e9:
                off = " or None (off)" if arg in ("idle_timeout", "send_timeout") else ""
                raise ValueError(f"{arg} must be a positive number of seconds{off}, got {seconds!r}")
        self.handler = handler
        self.policy = policy if policy is not None else GoawayPolicy()
        self.ssl_context = ssl_context
        self.max_body = max_body
        self.max_buffered = max_buffered
        self.max_control_frames = max_control_frames
        self.max_control_rate = max_control_rate
        # What _handle compares its PING/SETTINGS count with, for plain_h2 connections only:
        # a ServerConnection counts every frame that asks no work itself (max_control_rate
        # is passed to it). Off is a count no connection reaches.
        self._control_rate = max_control_rate if max_control_rate is not None and plain_h2 else 1 << 62
        self.send_timeout = None if send_timeout is None else float(send_timeout)
        self.handshake_timeout = float(handshake_timeout)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.flush_timeout = float(flush_timeout)
        # With the policy's max_idle, its graceful drain goes first: the hard
        # stop waits until the longest jittered max_idle, the PING ACK wait and
        # the linger have had their turn.
        self._idle_hard_stop = self.idle_timeout
        max_idle = self.policy.max_idle
        if self.idle_timeout is not None and max_idle is not None:
            self._idle_hard_stop = max(self.idle_timeout, max_idle * (1 + self.policy.jitter)
                                      + self.policy.ping_timeout + self.policy.linger + self.flush_timeout)
        self.plain_h2 = plain_h2
        self._accept_errors = 0
        self._accept_logged_at: float | None = None
        self._previous_handler: Any = None
        self._name = name
        self.backend_header = (b"x-backend", (name or "").encode())
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[_H2Protocol] = set()
        self._totals = {"connections_opened": 0, "requests": 0, "goaways_sent": 0, "streams_refused": 0,
                        "streams_cut": 0, "drains": 0}
        self._shutdown: asyncio.Event | None = None
        self._fair_task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        """The value of the ``x-backend`` header."""
        return self.backend_header[1].decode()

    @property
    def shutdown_event(self) -> asyncio.Event:
        """Set when shutdown starts: long handlers (watches) should end their stream cleanly."""
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
        return self._shutdown

    @property
    def is_shutting_down(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shutdown is not None and self._shutdown.is_set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind and start accepting; returns the bound ``(host, port)`` (port 0 picks one)."""
        if self.ssl_context is not None:
            self.ssl_context.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _H2Protocol(self), host, port, ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout if self.ssl_context is not None else None,
        )
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._exception_handler)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        if self._name is None:
            self.backend_header = (b"x-backend", f"{host}:{self.address[1]}".encode())
        self.shutdown_event  # noqa: B018  (created on the loop that serves)
        if self.policy.fair_share is not None and self._fair_task is None:
            self._fair_task = loop.create_task(self._run_fair_share())
        return self.address

    @property
    def open_connections(self) -> int:
        """Connections open now: this server's load signal for a fair-share fleet view."""
        return len(self._protocols)

    @property
    def serving_connections(self) -> int:
        """Open connections not draining: what a fair-share controller counts as its own load."""
        return sum(1 for proto in self._protocols if proto.drainable is None or not proto.drainable.is_draining)

    async def _run_fair_share(self) -> None:
        """The fair-share timer: move every connection's chance from the fleet view, off the request path."""
        fair = self.policy.fair_share
        assert fair is not None
        while True:
            try:
                fair.update()
            except Exception:  # a broken view must not stop the server; the chance stays where it was
                log.exception("fair-share update failed")
            await asyncio.sleep(fair.interval)

    #: At most one log line per this many seconds about failed accepts.
    ACCEPT_ERROR_LOG_INTERVAL = 10.0

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Rate-limit asyncio's "out of system resource" accept reports (EMFILE and friends).

        asyncio already backs off (it stops accepting for a second, then
        retries); at the file-descriptor limit it reports every retry, so a
        full server would log without pause. We log the first one, then one
        line per ``ACCEPT_ERROR_LOG_INTERVAL`` with the count. Anything else
        goes to the loop's previous handler.
        """
        server = self._server
        sock = context.get("socket")
        if (server is not None and sock is not None and "accept" in str(context.get("message", ""))
                and any(sock.fileno() == s.fileno() for s in server.sockets)):
            self._accept_errors += 1
            now = loop.time()
            if self._accept_logged_at is None or now - self._accept_logged_at >= self.ACCEPT_ERROR_LOG_INTERVAL:
                self._accept_logged_at = now
                log.error("cannot accept connections: %s (%d failed accept(s) so far; asyncio retries every "
                          "second; next report in %.0f s)", context.get("exception"), self._accept_errors,
                          self.ACCEPT_ERROR_LOG_INTERVAL)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def connection_opened(self, proto: _H2Protocol) -> None:
        self._protocols.add(proto)
        self._totals["connections_opened"] += 1
        if self.is_shutting_down:
            proto.start_drain()

    def connection_closed(self, proto: _H2Protocol) -> None:
        if proto in self._protocols:
            self._protocols.discard(proto)
            self._add(self._totals, proto)
            drainable = proto.drainable
            # A connection that never left SERVING sent no GOAWAY and refused or
            # cut no stream: nothing to report, and a stats snapshot per close
            # costs about as much as the rest of the close.
            if drainable is not None and drainable._state is not _SERVING:
                metrics.ConnectionMeter().update(drainable)

    @staticmethod
    def _add(totals: dict[str, int], proto: _H2Protocol) -> None:
        totals["requests"] += proto.requests
        totals["drains"] += proto.drains
        if proto.drainable is not None and proto.drainable._state is not _SERVING:  # else all three are 0
            s = proto.drainable.stats
            totals["goaways_sent"] += s.goaways_sent
            totals["streams_refused"] += s.streams_refused
            totals["streams_cut"] += s.streams_cut

    def stats(self) -> dict[str, Any]:
        """Counters over every connection so far, open or closed (what ``GET /stats`` returns)."""
        totals = dict(self._totals)
        for proto in self._protocols:
            self._add(totals, proto)
        totals["connections_open"] = len(self._protocols)
        return {"name": self.name, **totals}

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, drain every connection with ``start_drain``, wait at most ``timeout`` s, then close."""
        self.shutdown_event.set()
        if self._fair_task is not None:
            self._fair_task.cancel()
            self._fair_task = None
        if self._server is not None:
            self._server.close()
        for proto in list(self._protocols):
            proto.start_drain()
        # Connections accepted while we wait are drained in connection_opened;
        # wait for them too, until every connection is gone or time runs out.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._protocols:
            left = deadline - loop.time()
            if left <= 0:
                log.warning("%d connection(s) still open after %.1fs: closing them", len(self._protocols), timeout)
                break
            await asyncio.wait([proto.closed for proto in self._protocols], timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        for proto in list(self._protocols):
            proto.abort()
        if self._server is not None:
            await self._server.wait_closed()
            if loop.get_exception_handler() == self._exception_handler:
                loop.set_exception_handler(self._previous_handler)

    async def serve_forever(self, host: str = "127.0.0.1", port: int = 8080, *,
                            shutdown_timeout: float = 10.0) -> None:
        """Serve until SIGTERM or SIGINT, then drain every connection (bounded by ``shutdown_timeout``) and return.

        The graceful entry point: a process manager's SIGTERM (or Ctrl-C) ends
        running watches through ``shutdown_event``, finishes every request in
        flight, sends each client its GOAWAY, and returns without a traceback.
        Starts the server first unless :meth:`start` was already awaited.
        Cancelling the call shuts down the same way.
        """
        if self._server is None:
            await self.start(host, port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                continue
            installed.append(signum)
        try:
            await stop.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            log.info("shutting down: draining %d connection(s)", len(self._protocols))
            await self.shutdown(shutdown_timeout)
            log.info("stopped")

    def run(self, host: str = "127.0.0.1", port: int = 8080, *, shutdown_timeout: float = 10.0) -> None:
        """Blocking form of :meth:`serve_forever`: its own event loop, returns after a clean shutdown."""
        asyncio.run(self.serve_forever(host, port, shutdown_timeout=shutdown_timeout))


# -- the built-in app -------------------------------------------------------------------


async def builtin_app(request: Request, response: ResponseStream) -> None:
    """``GET /``, ``GET /watch?seconds=N``, ``POST /echo``, ``GET /stats``: what ``serve`` runs.

    A watch sends one chunk every 0.5 s for N seconds, like a Kubernetes watch,
    and ends its stream cleanly (END_STREAM) when the server shuts down, so a
    watch is never cut off by a drain.
    """
    server = request.server
    text = [("content-type", "text/plain")]
    if request.path == "/" and request.method == "GET":
        await response.send(200, f"hello from {server.name}\n".encode(), text)
    elif request.path == "/watch" and request.method == "GET":
        try:
            seconds = float(request.param("seconds", "5") or "5")
            if not 0 <= seconds <= 3600:
                raise ValueError
        except ValueError:
            await response.send(400, b"seconds must be a number in [0, 3600]\n", text)
            return
        await response.start(200, text)
        shutdown = server.shutdown_event
        for index in range(round(seconds / 0.5)):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(shutdown.wait(), 0.5)
            if shutdown.is_set():
                break
            await response.write(f"event {index}\n".encode())
        await response.end()
    elif request.path == "/echo" and request.method == "POST":
        await response.send(200, request.body, [("content-type", "application/octet-stream")])
    elif request.path == "/stats" and request.method == "GET":
        body = json.dumps(server.stats(), sort_keys=True).encode() + b"\n"
        await response.send(200, body, [("content-type", "application/json")])
    elif request.path in ("/", "/watch", "/echo", "/stats"):
        await response.send(405, b"method not allowed\n", text)
    else:
        await response.send(404, b"not found\n", text)


# -- command line -------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m goaway_ext serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one (default 8080)")
    parser.add_argument("--chance", type=float, default=0.001, help="per-request GOAWAY probability (default 0.001)")
    parser.add_argument("--allow-high-chance", action="store_true", help="accept --chance above 0.02 (tests, demos)")
    parser.add_argument("--max-requests", type=int, default=None, help="drain after about N requests per connection")
    parser.add_argument("--max-age", type=float, default=None, help="drain connections older than about S seconds")
    parser.add_argument("--max-idle", type=float, default=None,
                        help="drain connections without an open stream for about S seconds")
    parser.add_argument("--jitter", type=float, default=0.1, help="spread of --max-requests/--max-age (default 0.1)")
    parser.add_argument("--mode", choices=MODES, default="graceful", help="drain mode (default graceful)")
    parser.add_argument("--grace", type=float, default=None, help="hard deadline in seconds after a drain starts")
    parser.add_argument("--ping-timeout", type=float, default=5.0, help="wait for the drain PING ACK (default 5)")
    parser.add_argument("--linger", type=float, default=1.0, help="seconds between drained and close (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed the policy's draws (reproducible runs)")
    parser.add_argument("--rapid-reset-window", type=int, default=500, metavar="N",
                        help="rapid reset (CVE-2023-44487) limit: close a connection whose client reset more than "
                             "half of its last N streams (default 500; 0 turns it off)")
    parser.add_argument("--name", default=None, help="x-backend header value (default HOST:PORT)")
    parser.add_argument("--tls", action="store_true", help="TLS with ALPN h2 (self-signed unless --certfile)")
    parser.add_argument("--certfile", default=None, help="PEM certificate chain for --tls")
    parser.add_argument("--keyfile", default=None, help="PEM private key for --tls")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, help="bound on the shutdown drain (default 10)")
    parser.add_argument("--handshake-timeout", type=float, default=10.0,
                        help="close connections without an HTTP/2 preface after S seconds (default 10)")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="close connections with no open stream after S seconds (default 300)")
    parser.add_argument("--send-timeout", type=float, default=60.0,
                        help="close a connection whose peer reads none of our bytes for S seconds, reset a stream "
                             "without flow-control window for S seconds (default 60; 0 turns it off)")
    parser.add_argument("--max-control-rate", type=int, default=1000, metavar="N",
                        help="GOAWAY(ENHANCE_YOUR_CALM) to a peer sending more than N PING/SETTINGS frames in "
                             "under a second (default 1000; 0 turns it off)")
    fair = parser.add_argument_group(
        "fair share", "load-aware GOAWAY: shed only while this server holds more connections than the "
        "least-loaded one (plus a tolerance); --chance becomes the fallback while the fleet view is stale")
    fair.add_argument("--fair-share", choices=("haproxy", "peers"), default=None,
                      help="where the fleet's load comes from: HAProxy's stats socket, or the peers' --publish-load")
    fair.add_argument("--haproxy-socket", default=None, metavar="PATH|HOST:PORT",
                      help="with --fair-share haproxy: HAProxy's stats socket")
    fair.add_argument("--haproxy-backend", default=None, metavar="NAME",
                      help="with --fair-share haproxy: the HAProxy backend this server belongs to "
                           "(--name must be its server name there)")
    fair.add_argument("--peers", default=None, metavar="HOST:PORT,...",
                      help="with --fair-share peers: the peers' --publish-load addresses")
    fair.add_argument("--publish-load", default=None, metavar="[HOST:]PORT",
                      help="publish this server's open connections for its peers (GET /goaway-ext/load)")
    fair.add_argument("--fair-ceiling", type=float, default=None,
                      help="largest effective chance (default 0.02; above needs --allow-high-chance)")
    fair.add_argument("--fair-tolerance", type=float, default=None,
                      help="relative excess over the least-loaded server left alone (default 0.10)")
    fair.add_argument("--fair-max-drain-rate", type=float, default=None,
                      help="largest fraction of this server's connections drained per second (default 0.05)")
    fair.add_argument("--fair-interval", type=float, default=None,
                      help="seconds between fleet-view polls and chance updates (default 1)")
    fair.add_argument("--fair-max-staleness", type=float, default=None,
                      help="seconds after which the fleet view is stale and --chance applies (default 5)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--plain-h2", action="store_true", help=argparse.SUPPRESS)  # benchmarks: h2 baseline


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """The server's TLS context with ALPN h2; a bad file or pair raises ``CommandError`` naming its flag."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is None:
        # A throwaway self-signed certificate, made with the openssl command line.
        with tempfile.TemporaryDirectory() as tmp:
            certfile, keyfile = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            try:
                subprocess.run(
                    ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                     "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", keyfile,
                     "-out", certfile],
                    check=True, capture_output=True, timeout=60,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise CommandError(f"--tls without --certfile needs the openssl command to make a self-signed "
                                   f"certificate, and it failed ({exc}); pass --certfile and --keyfile") from None
            context.load_cert_chain(certfile, keyfile)
    else:
        check_readable("--certfile", certfile)
        if keyfile is not None:
            check_readable("--keyfile", keyfile)
        try:
            context.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as exc:
            raise ssl_error(exc, certfile, keyfile) from None
    context.set_alpn_protocols(["h2"])
    return context


def _fair_flag(name: str) -> str:
    """A fair-share value's ``serve`` flag, for errors: ``fair_ceiling`` -> ``--fair-ceiling``."""
    return "--" + name.replace("_", "-")


class _FairShareSetup:
    """What ``serve --fair-share`` starts beside the server: the fleet view, the publisher.

    The flags are checked and the controller is built by :mod:`goaway_ext._hostfleet`,
    as hypercorn's ``goaway_*`` keys are: both refuse the same values, each error
    naming the flag and the value. ``serve`` is a host of one process.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from ._hostfleet import FLEET_VALUES, fleet_settings, worker_fair_share

        self.server: H2Server | None = None
        self.publisher: Any = None
        self.view: Any = None
        self.fair: Any = None
        values = {name: getattr(args, name) for name in FLEET_VALUES}
        # --name alone is no mistake: it is also the x-backend header.
        self.settings = fleet_settings(values, _fair_flag, chance=args.chance,
                                       allow_high_chance=args.allow_high_chance, standalone=("name",))
        if self.settings is not None:
            built = worker_fair_share(self.settings, self, chance=args.chance,
                                      allow_high_chance=args.allow_high_chance, workers=1)
            if built is not None:
                self.fair, self.view = built

    def open(self) -> float:
        """This server's open connections (0 before it starts): what its peers read."""
        return float(self.server.open_connections) if self.server is not None else 0.0

    def serving(self) -> float:
        """This server's connections that are not draining (0 before it starts): its own load."""
        return float(self.server.serving_connections) if self.server is not None else 0.0

    def start(self, server: H2Server) -> None:
        """Start polling and publishing for ``server``."""
        from ._hostfleet import start_publisher

        self.server = server
        if self.view is not None:
            self.view.start()
        if self.settings is not None:
            try:
                self.publisher = start_publisher(self.settings, self, "--publish-load")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            if self.publisher is not None:
                print(f"publishing load on port {self.publisher.port}", flush=True)

    def close(self) -> None:
        """Stop the view's thread and the publisher."""
        if self.view is not None:
            self.view.close()
        if self.publisher is not None:
            self.publisher.close()


async def _serve(args: argparse.Namespace, policy: GoawayPolicy, context: ssl.SSLContext | None,
                 fair: _FairShareSetup | None = None) -> int:
    try:
        server = H2Server(builtin_app, policy=policy, ssl_context=context, name=args.name, plain_h2=args.plain_h2,
                          handshake_timeout=args.handshake_timeout, idle_timeout=args.idle_timeout,
                          send_timeout=args.send_timeout or None, max_control_rate=args.max_control_rate or None)
    except ValueError as exc:
        message = flag_message(str(exc), ("handshake_timeout", "idle_timeout", "send_timeout", "max_control_rate"))
        # On the command line 0 is "off" for these two (None for H2Server); --idle-timeout has no off.
        off = " or 0 (off)" if message.startswith(("--send-timeout", "--max-control-rate")) else ""
        raise CommandError(message.replace(" or None (off)", off)) from None
    try:
        host, port = await server.start(args.host, args.port)
    except OSError as exc:
        raise bind_error(args.host, args.port, exc) from None
    if fair is not None:
        # Before "listening on": whoever waits for that line (the demo) then knows that the load
        # publisher's port was free too, or sees the process exit with the reason.
        fair.start(server)
    print(f"listening on {host}:{port}", flush=True)
    log.info("serving %s as %s with %r%s; limits: handshake_timeout=%s idle_timeout=%s send_timeout=%s "
             "max_control_rate=%s", "https" if context else "h2c", server.name, policy,
             " (plain h2 baseline)" if args.plain_h2 else "", server.handshake_timeout, server.idle_timeout,
             server.send_timeout, server.max_control_rate)
    await server.serve_forever(shutdown_timeout=args.shutdown_timeout)
    return 0


#: Decider of ``serve``: ``/stats`` never starts a drain, so watching the server does not change it.
#: An ExemptPaths, so the compiled core checks the path without a Python call per request.
exempt_stats = ExemptPaths("/stats")


def run_command(args: argparse.Namespace) -> int:
    """Run ``serve`` until SIGTERM/SIGINT, then drain and exit 0; 2 and one line on stderr on a bad option."""
    try:
        configure_logging(log_level(args.log_level))
        if (args.certfile or args.keyfile) and not args.tls:
            flag = "--certfile" if args.certfile else "--keyfile"
            raise CommandError(f"{flag} needs --tls (without --tls the server speaks cleartext h2c and would "
                               "ignore the certificate)")
        if args.keyfile and not args.certfile:
            raise CommandError("--keyfile needs --certfile")
        if not 0 <= args.port <= 65535:
            raise CommandError(f"--port must be in 0..65535, got {args.port}")
        if args.shutdown_timeout <= 0:
            raise CommandError(f"--shutdown-timeout must be positive, got {args.shutdown_timeout}")
        try:
            fair = _FairShareSetup(args)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        try:
            policy = GoawayPolicy(
                0.0 if fair.fair is not None else args.chance, max_requests=args.max_requests,
                max_age=args.max_age, max_idle=args.max_idle, jitter=args.jitter,
                ping_timeout=args.ping_timeout, grace=args.grace, linger=args.linger, mode=args.mode,
                seed=args.seed, allow_high_chance=args.allow_high_chance, decider=exempt_stats,
                fair_share=fair.fair, rapid_reset_window=args.rapid_reset_window or None,
            )
        except (TypeError, ValueError) as exc:
            raise CommandError(flag_message(str(exc), _POLICY_FLAGS)) from None
        context = _tls_context(args.certfile, args.keyfile) if args.tls else None
        try:
            return asyncio.run(_serve(args, policy, context, fair))
        finally:
            fair.close()
    except CommandError as exc:
        return fail("serve", exc)


# GoawayPolicy arguments that ``serve`` takes as flags of the same name.
_POLICY_FLAGS = ("chance", "max_requests", "max_age", "max_idle", "jitter", "ping_timeout", "grace", "linger", "mode",
                 "seed", "allow_high_chance", "rapid_reset_window")
