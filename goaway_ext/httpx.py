"""httpx transports that survive a server's GOAWAY (the optional ``httpx`` extra).

::

    import httpx
    from goaway_ext.httpx import AsyncGracefulTransport

    client = httpx.AsyncClient(transport=AsyncGracefulTransport(http2=True))

Stock httpcore (1.0.x) fails every request in flight at or below a GOAWAY's
last stream id: ``h2`` goes CLOSED and the responses the server is still
sending raise ``RemoteProtocolError``. With these transports:

- requests in flight finish on the old connection;
- a request the server refused (above the last stream id, or RST_STREAM
  REFUSED_STREAM), or one that reaches a connection already draining, goes to a
  new connection through httpcore's own retry path (``ConnectionNotAvailable``)
  — but only when none of its body was sent yet, or when it is idempotent
  (RFC 9110 §9.2.2) and its body went out whole; a request whose body was
  partly sent is never replayed and fails with ``RemoteProtocolError``;
- the old connection is closed when its last stream ends.

Patching surface (httpcore offers no hook, so these private names are what we
touch; ``tests/test_contract_httpcore.py`` pins each on the supported httpcore):

- the transport's ``_pool``: when it is a plain ``ConnectionPool`` its class
  becomes a subclass that overrides only ``create_connection`` (public, meant
  for overriding); proxies keep stock behaviour;
- ``HTTPConnection``: ``_connect``, ``_request_lock``, ``_connection``,
  ``_connect_failed``, ``_http1``, ``_http2``, ``_origin``,
  ``_keepalive_expiry``, to build our HTTP/2 class where httpcore builds its own;
- ``HTTP2Connection``: ``_h2_state`` (becomes a :class:`~goaway_ext.ClientConnection`),
  ``_events``, ``_max_streams_semaphore``, ``_request_count``, and the
  overridden ``_read_incoming_data``, ``_receive_stream_event``,
  ``_send_stream_data``, ``_send_end_stream``, ``_response_closed``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import h2.events
import h2.exceptions

from ._extras import missing_extra

try:
    import httpcore
    import httpx
except ModuleNotFoundError as _exc:
    raise missing_extra("goaway_ext.httpx", "httpx", _exc) from _exc
from h2.errors import ErrorCodes
from httpcore._async.http2 import AsyncHTTP2Connection
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._sync.http2 import HTTP2Connection
from httpcore._sync.http11 import HTTP11Connection

from .client import ClientConnection
from .errors import ConnectionDrainingError
from .events import GoawayReceived, StreamRefused

log = logging.getLogger(__name__)  # "goaway_ext.httpx": GOAWAYs received, requests retried

__all__ = [
    "AsyncGracefulHTTP2Connection",
    "GracefulStats",
    "AsyncGracefulTransport",
    "GracefulHTTP2Connection",
    "GracefulTransport",
]

# RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass
class GracefulStats:
    """What a transport's HTTP/2 connections went through, for tests and dashboards.

    ``requests_retried`` counts requests that went back to the pool for a new
    connection (refused, or reaching a draining connection), each once however
    many times it went back. ``goaways_received`` counts connections that got at least one GOAWAY (a
    two-phase shutdown counts once), so over one client
    ``connections_opened == goaways_received + 1`` while the server only
    rebalances (Kubernetes' own invariant).
    """

    connections_opened: int = 0
    goaways_received: int = 0
    streams_refused: int = 0
    requests_retried: int = 0
    # Requests already counted in requests_retried: one request may go back to the pool
    # several times (at chance 1.0 each new connection drains too) and counts once.
    _retried: weakref.WeakSet[httpcore.Request] = field(
        default_factory=weakref.WeakSet, init=False, repr=False, compare=False
    )

    def _count_retry(self, request: httpcore.Request) -> None:
        if request not in self._retried:
            self._retried.add(request)
            self.requests_retried += 1
            log.debug("retrying %s %s on a new connection", request.method.decode(), request.url.target.decode())


class _Refused(h2.events.StreamReset):
    """Queued in httpcore's per-stream event list in place of a refused stream's reset.

    A ``StreamReset`` subclass so httpcore's own dispatch queues it for the
    stream and its own reader raises ``RemoteProtocolError(event)``, which we
    turn into a retry.
    """

    def __init__(self, stream_id: int) -> None:  # h2 4.1 takes no arguments, 4.2+ keywords
        self.stream_id = stream_id
        self.error_code = ErrorCodes.REFUSED_STREAM
        self.remote_reset = True


def _speaks_h2(stream: Any, http1: bool, http2: bool) -> bool:
    # The same choice httpcore makes: ALPN said h2, or h2 with prior knowledge.
    ssl_object = stream.get_extra_info("ssl_object")
    negotiated = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
    return negotiated or (http2 and not http1)


class _Drain:
    """Bookkeeping shared by the sync and async HTTP/2 connection classes."""

    _events: dict[int, list[Any]]
    _request_count: int

    @property
    def _client(self) -> ClientConnection:
        client: ClientConnection = self._h2_state  # type: ignore[attr-defined]
        return client

    def _init_drain(self, stats: GracefulStats | None) -> None:
        self._stats = stats if stats is not None else GracefulStats()
        self._stats.connections_opened += 1
        self._body_started: set[int] = set()
        self._body_done: set[int] = set()
        #: The latest GOAWAY the server sent on this connection, if any.
        self.goaway: GoawayReceived | None = None

    def _translate(self, events: list[Any]) -> list[Any]:
        """Turn our events into what httpcore's dispatch understands."""
        out: list[Any] = []
        for event in events:
            kind = type(event)
            if kind is GoawayReceived:
                if self.goaway is None:
                    self._stats.goaways_received += 1
                    log.debug("GOAWAY(last_stream_id=%d, error_code=%d) received", event.last_stream_id,
                              event.error_code)
                self.goaway = event
            elif kind is StreamRefused:
                self._stats.streams_refused += 1
                if out and type(out[-1]) is h2.events.StreamReset and out[-1].stream_id == event.stream_id:
                    out.pop()  # h2's own StreamReset(REFUSED_STREAM); ours replaces it
                out.append(_Refused(event.stream_id))
            else:
                out.append(event)
        return out

    def _refusal(self, request: httpcore.Request, stream_id: int) -> Exception:
        """Retry (ConnectionNotAvailable) when it is safe, else RemoteProtocolError."""
        started = stream_id in self._body_started
        whole = stream_id in self._body_done
        if not started or (whole and request.method.upper() in _IDEMPOTENT):
            self._request_count -= 1
            self._stats._count_retry(request)
            return httpcore.ConnectionNotAvailable()
        return httpcore.RemoteProtocolError(
            f"stream {stream_id} was refused by the server after part of its body was sent; "
            "not replayed"
        )

    def _head_is_refused(self, stream_id: int) -> bool:
        queue = self._events.get(stream_id)
        return bool(queue) and isinstance(queue[0], _Refused)  # type: ignore[index]


class AsyncGracefulHTTP2Connection(_Drain, AsyncHTTP2Connection):
    """httpcore's async HTTP/2 connection on a :class:`~goaway_ext.ClientConnection`.

    It stops taking requests at the first GOAWAY (``is_available`` is False),
    finishes the streams the server will still serve, hands refused ones back
    to the pool for a new connection, and closes when the last one ends.
    """

    def __init__(
        self,
        origin: httpcore.Origin,
        stream: Any,
        keepalive_expiry: float | None = None,
        *,
        stats: GracefulStats | None = None,
    ) -> None:
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        self._h2_state = ClientConnection(config=self.CONFIG)
        self._init_drain(stats)

    def is_available(self) -> bool:
        """False once the server sent GOAWAY: the pool then opens a new connection."""
        return not self._client.is_draining and super().is_available()

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """As httpcore's; a request reaching a draining connection goes back to the pool."""
        if self._client.is_draining:
            raise httpcore.ConnectionNotAvailable()
        try:
            return await super().handle_async_request(request)
        except ConnectionDrainingError:
            # Raised by get_next_available_stream_id, after the stream slot was
            # taken and before any byte of this request was written.
            await self._max_streams_semaphore.release()
            self._request_count -= 1
            self._stats._count_retry(request)
            if not self._events:
                await self.aclose()
            raise httpcore.ConnectionNotAvailable() from None

    async def _read_incoming_data(self, request: httpcore.Request) -> list[Any]:
        return self._translate(await super()._read_incoming_data(request))

    async def _receive_stream_event(self, request: httpcore.Request, stream_id: int) -> Any:
        try:
            return await super()._receive_stream_event(request, stream_id)
        except httpcore.RemoteProtocolError as exc:
            if exc.args and isinstance(exc.args[0], _Refused):
                raise self._refusal(request, stream_id) from None
            raise

    async def _send_stream_data(self, request: httpcore.Request, stream_id: int, data: bytes) -> None:
        if self._head_is_refused(stream_id):
            raise self._refusal(request, stream_id)
        self._body_started.add(stream_id)
        try:
            await super()._send_stream_data(request, stream_id, data)
        except h2.exceptions.StreamClosedError:
            if self._head_is_refused(stream_id):
                raise self._refusal(request, stream_id) from None
            raise

    async def _send_end_stream(self, request: httpcore.Request, stream_id: int) -> None:
        if self._head_is_refused(stream_id):
            raise self._refusal(request, stream_id)
        await super()._send_end_stream(request, stream_id)
        self._body_done.add(stream_id)

    async def _response_closed(self, stream_id: int) -> None:
        await super()._response_closed(stream_id)
        self._body_started.discard(stream_id)
        self._body_done.discard(stream_id)
        if self._client.is_draining and not self._events and not self.is_closed():
            await self.aclose()


class GracefulHTTP2Connection(_Drain, HTTP2Connection):
    """httpcore's sync HTTP/2 connection on a :class:`~goaway_ext.ClientConnection`.

    Same behaviour as :class:`AsyncGracefulHTTP2Connection`, for ``httpx.Client``.
    """

    def __init__(
        self,
        origin: httpcore.Origin,
        stream: Any,
        keepalive_expiry: float | None = None,
        *,
        stats: GracefulStats | None = None,
    ) -> None:
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        self._h2_state = ClientConnection(config=self.CONFIG)
        self._init_drain(stats)

    def is_available(self) -> bool:
        """False once the server sent GOAWAY: the pool then opens a new connection."""
        return not self._client.is_draining and super().is_available()

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        """As httpcore's; a request reaching a draining connection goes back to the pool."""
        if self._client.is_draining:
            raise httpcore.ConnectionNotAvailable()
        try:
            return super().handle_request(request)
        except ConnectionDrainingError:
            self._max_streams_semaphore.release()
            self._request_count -= 1
            self._stats._count_retry(request)
            if not self._events:
                self.close()
            raise httpcore.ConnectionNotAvailable() from None

    def _read_incoming_data(self, request: httpcore.Request) -> list[Any]:
        return self._translate(super()._read_incoming_data(request))

    def _receive_stream_event(self, request: httpcore.Request, stream_id: int) -> Any:
        try:
            return super()._receive_stream_event(request, stream_id)
        except httpcore.RemoteProtocolError as exc:
            if exc.args and isinstance(exc.args[0], _Refused):
                raise self._refusal(request, stream_id) from None
            raise

    def _send_stream_data(self, request: httpcore.Request, stream_id: int, data: bytes) -> None:
        if self._head_is_refused(stream_id):
            raise self._refusal(request, stream_id)
        self._body_started.add(stream_id)
        try:
            super()._send_stream_data(request, stream_id, data)
        except h2.exceptions.StreamClosedError:
            if self._head_is_refused(stream_id):
                raise self._refusal(request, stream_id) from None
            raise

    def _send_end_stream(self, request: httpcore.Request, stream_id: int) -> None:
        if self._head_is_refused(stream_id):
            raise self._refusal(request, stream_id)
        super()._send_end_stream(request, stream_id)
        self._body_done.add(stream_id)

    def _response_closed(self, stream_id: int) -> None:
        super()._response_closed(stream_id)
        self._body_started.discard(stream_id)
        self._body_done.discard(stream_id)
        if self._client.is_draining and not self._events and not self.is_closed():
            self.close()


class _AsyncGracefulHTTPConnection(httpcore.AsyncHTTPConnection):
    graceful_stats: GracefulStats

    # Builds our HTTP/2 class where httpcore would build its own; the rest of
    # handle_async_request (and everything else) is httpcore's.
    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._connection is None:
            async with self._request_lock:
                if self._connection is None:
                    try:
                        stream = await self._connect(request)
                    except BaseException:
                        self._connect_failed = True
                        raise
                    if _speaks_h2(stream, self._http1, self._http2):
                        self._connection = AsyncGracefulHTTP2Connection(
                            origin=self._origin,
                            stream=stream,
                            keepalive_expiry=self._keepalive_expiry,
                            stats=self.graceful_stats,
                        )
                    else:
                        self._connection = AsyncHTTP11Connection(
                            origin=self._origin, stream=stream, keepalive_expiry=self._keepalive_expiry
                        )
        return await super().handle_async_request(request)


class _GracefulHTTPConnection(httpcore.HTTPConnection):
    graceful_stats: GracefulStats

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._connection is None:
            with self._request_lock:
                if self._connection is None:
                    try:
                        stream = self._connect(request)
                    except BaseException:
                        self._connect_failed = True
                        raise
                    if _speaks_h2(stream, self._http1, self._http2):
                        self._connection = GracefulHTTP2Connection(
                            origin=self._origin,
                            stream=stream,
                            keepalive_expiry=self._keepalive_expiry,
                            stats=self.graceful_stats,
                        )
                    else:
                        self._connection = HTTP11Connection(
                            origin=self._origin, stream=stream, keepalive_expiry=self._keepalive_expiry
                        )
        return super().handle_request(request)


class _AsyncGracefulConnectionPool(httpcore.AsyncConnectionPool):
    graceful_stats: GracefulStats

    def create_connection(self, origin: httpcore.Origin) -> Any:
        connection = super().create_connection(origin)
        if type(connection) is httpcore.AsyncHTTPConnection:
            # Same object, same settings; only the class that handles requests
            # changes, plus the shared counters.
            connection.__class__ = _AsyncGracefulHTTPConnection
            connection.graceful_stats = self.graceful_stats  # type: ignore[attr-defined]
        return connection


class _GracefulConnectionPool(httpcore.ConnectionPool):
    graceful_stats: GracefulStats

    def create_connection(self, origin: httpcore.Origin) -> Any:
        connection = super().create_connection(origin)
        if type(connection) is httpcore.HTTPConnection:
            connection.__class__ = _GracefulHTTPConnection
            connection.graceful_stats = self.graceful_stats  # type: ignore[attr-defined]
        return connection


class AsyncGracefulTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose HTTP/2 connections follow GOAWAY (see module doc).

    Takes the same arguments; ``http2`` defaults to True. For cleartext HTTP/2
    with prior knowledge pass ``http1=False``. With a proxy, httpcore's stock
    connections are used.
    """

    def __init__(self, *, http2: bool = True, **kwargs: Any) -> None:
        super().__init__(http2=http2, **kwargs)
        #: Counters over every connection this transport opens.
        self.stats = GracefulStats()
        if type(self._pool) is httpcore.AsyncConnectionPool:
            self._pool.__class__ = _AsyncGracefulConnectionPool
            self._pool.graceful_stats = self.stats  # type: ignore[attr-defined]


class GracefulTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose HTTP/2 connections follow GOAWAY (see module doc).

    Takes the same arguments; ``http2`` defaults to True. For cleartext HTTP/2
    with prior knowledge pass ``http1=False``. With a proxy, httpcore's stock
    connections are used.
    """

    def __init__(self, *, http2: bool = True, **kwargs: Any) -> None:
        super().__init__(http2=http2, **kwargs)
        #: Counters over every connection this transport opens.
        self.stats = GracefulStats()
        if type(self._pool) is httpcore.ConnectionPool:
            self._pool.__class__ = _GracefulConnectionPool
            self._pool.graceful_stats = self.stats  # type: ignore[attr-defined]
