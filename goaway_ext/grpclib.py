"""grpclib integration: gRPC connection age, graceful GOAWAY and channels that survive it.

grpclib (pure-Python gRPC for asyncio) builds one ``h2`` connection per TCP
connection in ``grpclib.protocol.H2Protocol.connection_made``, on both sides.
Stock grpclib has no ``MaxConnectionAge``, its ``Server.close()`` cancels every
RPC in flight, and its channel treats any GOAWAY as the end of the connection
("Received GOAWAY frame, closing connection"): every RPC in flight fails each
time a gRPC server recycles a connection (grpcio's
``grpc.max_connection_age_ms`` does exactly that).

One line each::

    server = enable_goaway(Server([Service()]), grpc_policy(max_connection_age=30.0))
    channel = GoawayChannel("127.0.0.1", 50051)          # instead of grpclib.client.Channel

The server side
---------------
:func:`enable_goaway` turns a ``grpclib.server.Server`` (before ``start()``)
into a :class:`GoawayServer`: each connection is a
:class:`~goaway_ext.ServerConnection` following a
:class:`~goaway_ext.GoawayPolicy`. :func:`grpc_policy` builds one with gRPC's
names: ``MaxConnectionAge`` is ``max_age``, ``MaxConnectionAgeGrace`` is
``grace`` and ``MaxConnectionIdle`` is ``max_idle``; ``chance`` and
``max_requests`` work as everywhere in goaway_ext.
``close()`` stops accepting connections and drains every connection (GOAWAY,
RPCs in flight finish, late ones are refused with REFUSED_STREAM);
``wait_closed()`` returns once every connection is closed, at the latest
``grace`` after ``close()`` when the policy has one. Each server counts its
own connections and drains (``goaway_stats``); the process totals and the
Prometheus series of :mod:`goaway_ext.metrics` include them, and each drained
connection logs one line on the ``goaway_ext.grpclib`` logger (INFO).

The channel side
----------------
:class:`GoawayChannel` is a ``grpclib.client.Channel`` whose connections are
:class:`~goaway_ext.ClientConnection` s. After a GOAWAY, RPCs at or below its
last-stream-id run to their end on the old connection (unary and streaming
alike, however long), new RPCs open a new connection, and the old one is
closed once its last RPC ends. An RPC the server refused (above the GOAWAY's
last-stream-id, or reset with REFUSED_STREAM) was never seen by the server's
application, so it is sent again on a new connection, as gRPC's transparent
retry does, when the whole request is still at hand: a unary request, or a
request stream before its first message. A request stream that already sent a
message is never replayed: it fails with grpclib's ``StreamTerminatedError``.
At most :data:`MAX_REPLAYS` replays per RPC, so a server that refuses
everything cannot keep an RPC looping.

What this module touches in grpclib
-----------------------------------
Public: ``H2Protocol`` (subclassed; attributes ``handler``, ``config``,
``h2_config``, ``connection``, ``processor``), ``Connection``,
``EventsProcessor`` (subclassed: ``register``, ``streams``, ``processors``,
``close``, ``process_stream_ended``, ``handler``, ``connection``; ``close``
spares the RPCs whose whole response is buffered), ``protocol.Stream`` (``headers``,
``wrapper``, ``__terminated__``), ``Server.close``/``wait_closed``,
``Channel.request``/``close``, ``client.Stream`` (subclassed).
Private, listed in :data:`GRPCLIB_PRIVATE_NAMES` and pinned by
``tests/test_grpclib_contract.py`` on the oldest and newest supported grpclib
(``make contract-grpclib``): ``Server._protocol_factory``, ``Server._server``,
``Server._server_closed_fut``, ``Channel._protocol_factory``,
``Channel._protocol``, ``Channel._connected``, ``protocol._set_nodelay``,
``Wrapper._error`` and ``client.Stream``'s ``_stream``, ``_release_stream``,
``_wrapper``, ``_cardinality``, ``_send_request_done``,
``_send_message_done``, ``_end_done``, ``_messages_sent``.
``connection_made`` is grpclib's own, re-stated with our connection class in
place of ``h2.connection.H2Connection`` (the one thing it hard-codes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from h2.connection import H2Connection
from h2.settings import SettingCodes

from . import metrics
from ._extras import missing_extra

try:
    import grpclib.client
except ModuleNotFoundError as _exc:
    raise missing_extra("goaway_ext.grpclib", "grpclib", _exc) from _exc
import grpclib.protocol
import grpclib.server
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from h2.events import StreamEnded

from ._stall import WriteStall
from .client import ClientConnection
from .errors import ConnectionDrainingError
from .events import ConnectionDrained, GoawayReceived, GoawaySent, StreamRefused
from .policy import GoawayPolicy
from .server import ServerConnection, _check_max_control_rate

__all__ = [
    "GRPCLIB_PRIVATE_NAMES",
    "MAX_REPLAYS",
    "GoawayChannel",
    "GoawayServer",
    "GrpcServerStats",
    "enable_goaway",
    "grpc_policy",
]

#: grpclib names with a leading underscore this module reads or overrides (see the module doc).
GRPCLIB_PRIVATE_NAMES: tuple[str, ...] = (
    "grpclib.server.Server._protocol_factory",
    "grpclib.server.Server._server",
    "grpclib.server.Server._server_closed_fut",
    "grpclib.client.Channel._protocol_factory",
    "grpclib.client.Channel._protocol",
    "grpclib.client.Channel._connected",
    "grpclib.protocol._set_nodelay",
    "grpclib.utils.Wrapper._error",
    "grpclib.client.Stream._stream",
    "grpclib.client.Stream._release_stream",
    "grpclib.client.Stream._wrapper",
    "grpclib.client.Stream._cardinality",
    "grpclib.client.Stream._send_request_done",
    "grpclib.client.Stream._send_message_done",
    "grpclib.client.Stream._end_done",
    "grpclib.client.Stream._messages_sent",
)

#: Replays of one refused RPC before its ``StreamTerminatedError`` is raised.
MAX_REPLAYS = 5

_log = logging.getLogger("goaway_ext.grpclib")
# Seconds a connection closed at send_timeout gets for its GOAWAY before it is aborted.
_FLUSH_TIMEOUT = 1.0


# -- policy with gRPC's names ----------------------------------------------------------


def grpc_policy(
    *,
    max_connection_age: float | None = None,
    max_connection_age_grace: float | None = None,
    max_connection_idle: float | None = None,
    chance: float = 0.0,
    **options: Any,
) -> GoawayPolicy:
    """A :class:`~goaway_ext.GoawayPolicy` from gRPC's server keepalive names (seconds).

    ``MaxConnectionAge`` -> ``max_age`` (jittered ±10% as gRPC does),
    ``MaxConnectionAgeGrace`` -> ``grace`` (counted from the first GOAWAY),
    ``MaxConnectionIdle`` -> ``max_idle`` (jittered too). Other ``GoawayPolicy`` options pass
    through. So a grpclib server configured like a grpc-go or grpcio one means
    the same thing.
    """
    if max_connection_age is not None:
        options["max_age"] = max_connection_age
    if max_connection_age_grace is not None:
        options["grace"] = max_connection_age_grace
    if max_connection_idle is not None:
        options["max_idle"] = max_connection_idle
    try:
        return GoawayPolicy(chance, **options)
    except (TypeError, ValueError) as exc:
        names = {"max_age": "max_connection_age", "grace": "max_connection_age_grace",
                 "max_idle": "max_connection_idle"}
        message = str(exc)
        for ours, theirs in names.items():
            if message.startswith(ours + " "):
                message = theirs + message[len(ours):]
        raise type(exc)(message) from exc


# -- the server ----------------------------------------------------------------------


@dataclass
class GrpcServerStats:
    """Counters of one :class:`GoawayServer`, over every connection it accepted.

    ``goaways`` counts drains by reason (``chance``, ``max_requests``,
    ``max_age``, ``shutdown`` ...), one per connection however many GOAWAY
    frames the drain's mode sends; what an operator compares with the
    connection count to see clients move.
    """

    connections: int = 0
    goaways: dict[str, int] = field(default_factory=dict)
    drained: int = 0
    streams_refused: int = 0
    streams_cut: int = 0

    @property
    def goaways_total(self) -> int:
        """Drains started, all reasons together."""
        return sum(self.goaways.values())


class _ServerConnection(ServerConnection):
    """``ServerConnection`` that knows its grpclib protocol; no method of h2's is wrapped.

    A serving connection needs no wake-ups beyond its age deadline, so on the
    hot path it costs what ``ServerConnection`` costs. Once a drain starts the
    protocol switches it to :class:`_WatchedServerConnection`.
    """

    __slots__ = ("_owner",)

    # While serving, ServerConnection.data_to_send is h2's plus one test of the
    # drain state; grpclib calls it about 6 times per RPC, so the serving class
    # calls h2's directly (a frame less each time). The drain starts inside
    # receive_data and the switch to the watched class comes with its first
    # event, so at most one write, grpclib's flush right after the read, goes
    # out before our GOAWAY; the next write carries it, in order.
    # tests/test_grpclib.py pins what this relies on in ServerConnection.
    data_to_send = H2Connection.data_to_send

    def __init__(self, *args: Any, owner: _ServerProtocol, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner


class _WatchedServerConnection(_ServerConnection):
    """Tells the protocol after every read and write, when its deadlines may have moved.

    Used while draining (the last stream's end sets ``close_at`` inside
    ``data_to_send``), and from the start in mode ``idle`` or with an idle
    limit, whose deadlines move with the streams.
    """

    __slots__ = ()

    def receive_data(self, data: bytes) -> list[Any]:  # type: ignore[override]
        events = super().receive_data(data)
        self._owner.wake()
        return events

    def data_to_send(self, amount: int | None = None) -> bytes:
        data = ServerConnection.data_to_send(self, amount)  # not the serving class's shortcut
        self._owner.wake()
        return data


def _make_h2(protocol: H2Protocol, h2_conn: Any, transport: asyncio.BaseTransport) -> None:
    """grpclib's ``H2Protocol.connection_made`` with ``h2_conn`` in place of its ``H2Connection``."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        grpclib.protocol._set_nodelay(sock)
    h2_conn.initiate_connection()
    initial = h2_conn.local_settings.initial_window_size
    conn_delta = protocol.config.http2_connection_window_size - initial
    stream_delta = protocol.config.http2_stream_window_size - initial
    if conn_delta:
        h2_conn.increment_flow_control_window(conn_delta)
    if stream_delta:
        h2_conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: protocol.config.http2_stream_window_size})
    protocol.connection = Connection(h2_conn, cast(asyncio.Transport, transport), config=protocol.config)
    protocol.connection.flush()
    protocol.connection.initialize()


class _IdleProcessor(EventsProcessor):
    """grpclib's server event processor, waking the protocol's timer when its last RPC ended.

    Only with a policy that has ``max_idle``: ``ServerConnection`` works out
    the idle deadline when asked, and the moment to ask is when no RPC is left
    (grpclib releases every RPC here, after its last frame). Nothing runs when
    an RPC starts.
    """

    def __init__(self, handler: Any, connection: Connection, protocol: _ServerProtocol) -> None:
        super().__init__(handler, connection)
        self._protocol = protocol

    def register(self, stream: grpclib.protocol.Stream) -> Callable[[], None]:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            if not self.streams:
                self._protocol.wake()

        return release_stream


class _ServerProtocol(H2Protocol):
    """grpclib's server protocol around a ``ServerConnection`` plus one timer."""

    def __init__(self, stock: H2Protocol, server: GoawayServer) -> None:
        super().__init__(stock.handler, stock.config, stock.h2_config)
        self._goaway_server = server
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._loop = asyncio.get_running_loop()
        self._h2: _ServerConnection | None = None
        self._started = False
        self._meter = metrics.ConnectionMeter()
        self._peer: str = "-"
        self._stall: WriteStall | None = None  # send_timeout, made the first time writing pauses
        self._goaway_transport: asyncio.Transport | None = None
        self.closed = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._goaway_server
        policy = server.goaway_policy
        cls = _WatchedServerConnection if policy.mode == "idle" else _ServerConnection
        h2_conn = cls(self.h2_config, policy=policy, clock=self._loop.time, owner=self,
                      max_control_rate=server.goaway_max_control_rate)
        self._h2 = h2_conn
        self._goaway_transport = cast(asyncio.Transport, transport)
        _make_h2(self, h2_conn, transport)
        if policy.max_idle is None:
            self.processor = EventsProcessor(self.handler, self.connection)
        else:
            self.processor = _IdleProcessor(self.handler, self.connection, self)
        self.processor.processors[GoawaySent] = self._on_goaway_sent
        self.processor.processors[ConnectionDrained] = self._on_drained
        server.goaway_stats.connections += 1
        metrics.connection_opened()  # process totals and Prometheus, shared with the other integrations
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        server._goaway_protocols.add(self)
        if server._goaway_closing:
            self.shutdown()
        self.wake()

    def pause_writing(self) -> None:
        """grpclib's (its writers wait), plus the send_timeout period (``WriteStall``)."""
        super().pause_writing()
        timeout = self._goaway_server.goaway_send_timeout
        if timeout is None or self._goaway_transport is None:
            return
        if self._stall is None:
            self._stall = WriteStall(self._loop, self._goaway_transport, timeout, self._on_stall)
        self._stall.paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.resumed()

    def _on_stall(self) -> None:
        """send_timeout: the peer took none of our bytes for a whole period. GOAWAY(ENHANCE_YOUR_CALM), then close.

        The GOAWAY goes behind the queued bytes; a peer that still reads
        nothing is aborted a second later (asyncio's close waits for ever).
        """
        h2_conn = self._h2
        transport = self._goaway_transport
        if h2_conn is None or transport is None or self.connection.is_closing():
            return
        _log.warning("closing gRPC connection from %s: it read nothing of the %d bytes queued for it in %.1f s "
                     "(send_timeout)", self._peer, transport.get_write_buffer_size(),
                     self._goaway_server.goaway_send_timeout)
        h2_conn._calm(self._loop.time(), "send_timeout", b"send_timeout")
        self._fire()  # the GOAWAY and the drain events; close_at is now: the connection closes
        self._loop.call_later(_FLUSH_TIMEOUT, transport.abort)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stall is not None:
            self._stall.cancel()
        self._goaway_server._goaway_protocols.discard(self)
        self._count_streams()
        if self._h2 is not None:
            self._meter.update(self._h2)
            if self._h2.is_draining:
                self._log_drain(self._h2)
        if not self.closed.done():
            self.closed.set_result(None)
        super().connection_lost(exc)

    # -- drain -------------------------------------------------------------------

    def shutdown(self) -> None:
        """Start this connection's drain (server shutdown) and send the GOAWAY now."""
        h2_conn = self._h2
        if h2_conn is None or self.connection.is_closing():
            return
        h2_conn.start_drain("shutdown")
        self._fire()

    def wake(self) -> None:
        """(Re)arm the timer for the connection's next deadline."""
        h2_conn = self._h2
        if h2_conn is None:
            return
        deadline = h2_conn.next_deadline()
        if deadline is None or deadline == self._armed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        h2_conn = self._h2
        if h2_conn is None or self.connection.is_closing():
            return
        for event in h2_conn.handle_timer(self._loop.time()):
            self.processor.process(event)  # type: ignore[arg-type]
        self.connection.flush()
        close_at = h2_conn.close_at
        if close_at is not None and self._loop.time() >= close_at:
            self.connection.close()  # connection_lost follows
            return
        self.wake()

    def _on_goaway_sent(self, event: GoawaySent) -> None:
        h2_conn = self._h2
        assert h2_conn is not None
        if h2_conn.__class__ is _ServerConnection:
            h2_conn.__class__ = _WatchedServerConnection  # same slots: from now on every write may end the drain
        self.wake()
        self._meter.update(h2_conn)
        if not self._started:
            self._started = True
            goaways = self._goaway_server.goaway_stats.goaways
            goaways[event.reason] = goaways.get(event.reason, 0) + 1

    def _on_drained(self, event: ConnectionDrained) -> None:
        self._goaway_server.goaway_stats.drained += 1
        if self._h2 is not None:
            self._meter.update(self._h2)
        self.wake()

    def _log_drain(self, h2_conn: ServerConnection) -> None:
        """One line per drained connection on the ``goaway_ext.grpclib`` logger, when it closes."""
        stats = h2_conn.stats
        if stats.drain_duration is not None:
            outcome = f"drained in {stats.drain_duration:.3f}s"
        else:
            outcome = f"closed by the peer while draining ({h2_conn.drain_state.value})"
        _log.info(
            "drained gRPC connection from %s: reason=%s last_stream_id=%s requests=%d goaways=%d "
            "refused=%d cut=%d: %s", self._peer, h2_conn.drain_reason, h2_conn.last_stream_id,
            stats.requests_seen, stats.goaways_sent, stats.streams_refused, stats.streams_cut, outcome,
        )

    def _count_streams(self) -> None:
        h2_conn = self._h2
        if h2_conn is not None:
            stats = h2_conn.stats
            self._goaway_server.goaway_stats.streams_refused += stats.streams_refused
            self._goaway_server.goaway_stats.streams_cut += stats.streams_cut


class GoawayServer(grpclib.server.Server):
    """A ``grpclib.server.Server`` whose connections drain gracefully.

    Build it like grpclib's ``Server`` with one more keyword, ``policy``, or
    turn an existing one into it with :func:`enable_goaway`. ``close()``
    drains every connection instead of cancelling every RPC, so a rolling
    restart loses no request; ``goaway_stats`` counts connections and drains.

    With a policy that has ``fair_share``, the server moves the controller on
    a timer (``FairShare.update()`` every ``interval`` seconds, from
    :meth:`start` to :meth:`close`), as ``H2Server`` does; give the
    controller ``local=lambda: server.serving_connections`` so it counts its
    own load as the connections that are not draining.

    ``max_control_rate`` (1000, None: off) bounds the frames a client may
    send that ask no work (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, empty
    DATA...) a second: past it GOAWAY(ENHANCE_YOUR_CALM) and the connection
    closes (see ``ServerConnection``); grpclib bounds none of them.
    ``send_timeout`` (60 s, None: off): a client that takes none of our
    queued bytes for that long (writing paused, no progress) gets
    GOAWAY(ENHANCE_YOUR_CALM, ``send_timeout``) and is closed; stock grpclib
    waits for ever, holding the connection and its RPCs.
    """

    goaway_policy: GoawayPolicy
    goaway_max_control_rate: int | None
    goaway_send_timeout: float | None
    goaway_stats: GrpcServerStats
    _goaway_protocols: set[_ServerProtocol]
    _goaway_closing: bool
    _goaway_fair_task: asyncio.Task[None] | None

    def __init__(self, *args: Any, policy: GoawayPolicy | None = None, max_control_rate: int | None = 1000,
                 send_timeout: float | None = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._goaway_setup(policy, max_control_rate, send_timeout)

    def _goaway_setup(self, policy: GoawayPolicy | None, max_control_rate: int | None = 1000,
                      send_timeout: float | None = 60.0) -> None:
        if policy is None:
            policy = GoawayPolicy()
        elif not isinstance(policy, GoawayPolicy):
            raise TypeError(f"policy must be a GoawayPolicy or None, got {policy!r}")
        _check_limits(max_control_rate, send_timeout)
        self.goaway_policy = policy
        self.goaway_max_control_rate = max_control_rate
        self.goaway_send_timeout = None if send_timeout is None else float(send_timeout)
        self.goaway_stats = GrpcServerStats()
        self._goaway_protocols = set()
        self._goaway_closing = False
        self._goaway_fair_task = None

    @property
    def open_connections(self) -> int:
        """Connections open now (a fair-share load signal, as ``H2Server.open_connections``)."""
        return len(self._goaway_protocols)

    @property
    def serving_connections(self) -> int:
        """Open connections not draining: what a fair-share controller counts as its own load."""
        return sum(1 for protocol in self._goaway_protocols if protocol._h2 is None or not protocol._h2.is_draining)

    async def start(self, *args: Any, **kwargs: Any) -> None:
        """grpclib's ``start``; then, with a fair-share policy, the controller's update timer."""
        await super().start(*args, **kwargs)
        if self.goaway_policy.fair_share is not None and self._goaway_fair_task is None:
            self._goaway_fair_task = asyncio.get_running_loop().create_task(self._goaway_run_fair_share())

    async def _goaway_run_fair_share(self) -> None:
        fair = self.goaway_policy.fair_share
        assert fair is not None
        while True:
            try:
                fair.update()
            except Exception:  # a broken view must not stop serving; the chance stays where it was
                _log.exception("fair-share update failed")
            await asyncio.sleep(fair.interval)

    def _protocol_factory(self) -> H2Protocol:
        stock = super()._protocol_factory()  # grpclib's handler bookkeeping stays grpclib's
        return _ServerProtocol(stock, self)

    def close(self) -> None:
        """Stop accepting connections and start a graceful drain on every connection.

        RPCs in flight finish (within the policy's ``grace``, when set); RPCs
        that arrive after the final GOAWAY are refused with REFUSED_STREAM,
        which a gRPC client retries elsewhere.
        """
        if self._server is None or self._server_closed_fut is None:
            raise RuntimeError("Server is not started")
        self._goaway_closing = True
        if self._goaway_fair_task is not None:
            self._goaway_fair_task.cancel()
            self._goaway_fair_task = None
        self._server.close()
        if not self._server_closed_fut.done():
            self._server_closed_fut.set_result(None)
        for protocol in list(self._goaway_protocols):
            protocol.shutdown()

    async def wait_closed(self) -> None:
        """Wait until every connection has drained and closed, then for grpclib's handlers."""
        if self._server is None or self._server_closed_fut is None:
            raise RuntimeError("Server is not started")
        await self._server_closed_fut
        while self._goaway_protocols:
            await asyncio.wait({protocol.closed for protocol in self._goaway_protocols})
        await super().wait_closed()


def _check_limits(max_control_rate: object, send_timeout: object) -> None:
    _check_max_control_rate(max_control_rate)
    if send_timeout is not None and (type(send_timeout) not in (int, float)
                                     or not 0 < send_timeout < 1e9):  # type: ignore[operator]
        raise ValueError(f"send_timeout must be a positive number of seconds, or None (off), got {send_timeout!r}")


def enable_goaway(server: grpclib.server.Server, policy: GoawayPolicy | None = None, *,
                  max_control_rate: int | None = 1000, send_timeout: float | None = 60.0) -> GoawayServer:
    """Turn ``server`` (not started yet) into a :class:`GoawayServer` following ``policy``; return it.

    The one line for an existing grpclib server. Its handlers, codec and
    configuration stay as they are; only the connections change. ``policy``
    defaults to one that only makes ``close()`` graceful. A policy with
    ``fair_share`` works as in ``H2Server``: the server calls its
    ``update()`` every ``interval`` seconds while it serves.
    ``max_control_rate``, ``send_timeout``: as for :class:`GoawayServer`.
    """
    if not isinstance(server, grpclib.server.Server):
        raise TypeError(f"server must be a grpclib.server.Server, got {server!r}")
    if policy is not None and not isinstance(policy, GoawayPolicy):
        raise TypeError(f"policy must be a GoawayPolicy or None, got {policy!r}")
    _check_limits(max_control_rate, send_timeout)
    if server._server is not None:
        raise RuntimeError("enable_goaway() must be called before Server.start(): started connections are stock")
    if not isinstance(server, GoawayServer):
        server.__class__ = GoawayServer
    goaway_server = cast(GoawayServer, server)
    goaway_server._goaway_setup(policy, max_control_rate, send_timeout)
    return goaway_server


# -- the channel ---------------------------------------------------------------------


def _lost(protocol: H2Protocol) -> bool:
    """True once grpclib's client handler saw the connection end."""
    return bool(getattr(protocol.handler, "connection_lost", False))


class _ClientProcessor(EventsProcessor):
    """grpclib's event processor, plus GOAWAY and refusals, and close-when-idle."""

    def __init__(self, handler: Any, connection: Connection, protocol: _ClientProtocol) -> None:
        super().__init__(handler, connection)
        self._protocol = protocol
        self._ended: set[int] = set()  # streams whose whole response is buffered
        self.processors[GoawayReceived] = self._on_goaway
        self.processors[StreamRefused] = self._on_refused
        self.processors[StreamEnded] = self._on_stream_ended

    def register(self, stream: grpclib.protocol.Stream) -> Callable[[], None]:
        release = super().register(stream)
        protocol = self._protocol
        ended = self._ended

        def release_stream() -> None:
            ended.discard(stream.id)
            release()
            if protocol.draining and not self.streams:
                protocol.close_soon()

        return release_stream

    def _on_stream_ended(self, event: StreamEnded) -> None:
        if event.stream_id in self.streams:
            self._ended.add(event.stream_id)
        self.process_stream_ended(event)

    def close(self, reason: str = "Connection closed") -> None:
        """As grpclib's, but an RPC whose whole response arrived is left to finish reading it.

        A gRPC server closes the connection as soon as the last stream below
        its GOAWAY ends, often before the client task has read the response
        that is already in its buffer; grpclib would fail that RPC with
        "Connection lost".
        """
        streams = self.streams
        self.streams = {stream_id: stream for stream_id, stream in streams.items() if stream_id not in self._ended}
        try:
            super().close(reason)
        finally:
            self.streams = streams

    def _on_goaway(self, event: GoawayReceived) -> None:
        self._protocol.draining = True
        if not self.streams:
            self._protocol.close_soon()

    def _on_refused(self, event: StreamRefused) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or getattr(stream, "goaway_refused", False):
            return
        stream.goaway_refused = True  # type: ignore[attr-defined]
        wrapper = stream.wrapper
        if wrapper is not None and wrapper._error is None:  # a GOAWAY refusal: h2 reported no reset
            stream.__terminated__(f"stream {event.stream_id} refused by the server (not processed)")


class _ClientProtocol(H2Protocol):
    """grpclib's client protocol around a ``ClientConnection``."""

    draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _make_h2(self, ClientConnection(config=self.h2_config), transport)
        self.processor = _ClientProcessor(self.handler, self.connection, self)

    def close_soon(self) -> None:
        """Close this drained connection once the current callbacks have run."""
        asyncio.get_running_loop().call_soon(self._close_drained)

    def _close_drained(self) -> None:
        if not self.processor.streams and not _lost(self):
            self.processor.close("drained after GOAWAY")


class _ReplayingStream(grpclib.client.Stream):  # type: ignore[type-arg]
    """grpclib's client RPC, sent again on a new connection when the server refused it."""

    _held: tuple[Any] | None = None
    _request_end = False
    _replays = 0

    async def send_request(self, *, end: bool = False) -> None:
        """As grpclib's; a connection that got GOAWAY meanwhile is skipped for a new one."""
        self._request_end = end
        for _ in range(MAX_REPLAYS):
            try:
                await super().send_request(end=end)
            except ConnectionDrainingError:
                continue  # raised before any byte of the stream was written
            return
        await super().send_request(end=end)

    async def send_message(self, message: Any, *, end: bool = False) -> None:
        """As grpclib's; a refused unary request is sent again on a new connection."""
        client_streaming = self._cardinality.client_streaming
        if not client_streaming:
            self._held = (message,)
        while True:
            try:
                await super().send_message(message, end=end)
                return
            except StreamTerminatedError:
                if not self._may_replay():
                    raise
                await self._replay()
                if not client_streaming:
                    return  # the replay sent the message

    async def recv_initial_metadata(self) -> None:
        """As grpclib's; a refused RPC whose request is at hand is sent again first."""
        while True:
            try:
                await super().recv_initial_metadata()
                return
            except StreamTerminatedError:
                if not self._may_replay():
                    raise
                await self._replay()

    def _may_replay(self) -> bool:
        stream = getattr(self, "_stream", None)
        if stream is None or not getattr(stream, "goaway_refused", False) or stream.headers is not None:
            return False
        if not isinstance(self._wrapper._error, StreamTerminatedError):
            return False  # a deadline or a cancellation, not the refusal
        if self._cardinality.client_streaming and self._messages_sent:
            return False  # never a partly sent request stream
        return self._replays < MAX_REPLAYS

    async def _replay(self) -> None:
        while True:
            self._replays += 1
            if "_stream" in vars(self):  # not after an attempt that never got a stream
                self._release_stream()
                del self._stream
            self._wrapper._error = None
            self._wrapper.cancelled = None
            self._send_request_done = False
            self._send_message_done = False
            self._end_done = False
            self._messages_sent = 0
            try:
                await grpclib.client.Stream.send_request(self, end=self._request_end)
                if self._held is not None:
                    await grpclib.client.Stream.send_message(self, self._held[0], end=True)
                return
            except ConnectionDrainingError:
                if self._replays >= MAX_REPLAYS:
                    raise
            except StreamTerminatedError:
                if not self._may_replay():
                    raise


class GoawayChannel(grpclib.client.Channel):
    """A ``grpclib.client.Channel`` that keeps RPCs alive across a server's GOAWAY.

    Same arguments as grpclib's ``Channel``. After a GOAWAY the RPCs in flight
    finish on the old connection, new RPCs go to a new one, refused RPCs are
    replayed when gRPC's rules allow (see the module doc), and the old
    connection closes once idle. ``connections_opened`` counts TCP connections.
    """

    connections_opened = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._all_protocols: set[_ClientProtocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        stock = super()._protocol_factory()
        protocol = _ClientProtocol(stock.handler, stock.config, stock.h2_config)
        self.connections_opened += 1
        self._all_protocols = {p for p in self._all_protocols if not _lost(p)}
        self._all_protocols.add(protocol)
        return protocol

    @property
    def _connected(self) -> bool:
        protocol = self._protocol
        return protocol is not None and not _lost(protocol) and not getattr(
            protocol, "draining", False)

    def request(self, *args: Any, **kwargs: Any) -> grpclib.client.Stream:  # type: ignore[type-arg]
        """As grpclib's; the RPC object also replays refused requests."""
        stream = super().request(*args, **kwargs)
        stream.__class__ = _ReplayingStream
        return stream

    def close(self) -> None:
        """Close every connection of this channel, draining ones included."""
        for protocol in list(self._all_protocols):
            if protocol is not self._protocol and not _lost(protocol):
                protocol.processor.close()
        self._all_protocols.clear()
        super().close()

