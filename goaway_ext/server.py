"""``ServerConnection``: an ``h2`` server connection that can drain gracefully.

``h2``'s own ``close_connection()`` moves its state machine to CLOSED, after
which every in-flight response is lost. ``ServerConnection`` never calls it.
It writes its GOAWAY and PING frames itself (with the core encoders) and appends
them after the bytes ``h2`` queued, so ``h2`` keeps serving every stream the
client may still complete (RFC 9113 §6.8).

Sans-IO, like ``h2``: bytes in (``receive_data``), bytes out (``data_to_send``),
and time passed in by the owner (``next_deadline``/``handle_timer``, the aioquic
style). The owner closes the socket at ``close_at``.

The h2 seam
-----------
Everything here uses public ``h2`` API (``receive_data``, ``data_to_send``,
``reset_stream``, ``acknowledge_received_data``, ``open_inbound_streams``,
``highest_inbound_stream_id``) plus one undocumented detail: ``H2Connection.streams``
(stream id -> ``H2Stream``), with ``H2Stream.closed`` and ``H2Stream.reset_stream``.
:meth:`ServerConnection._open_stream_ids` reads it when the ``grace`` deadline
cuts a drain short, to find the streams to reset; :meth:`ServerConnection._reset`
uses it when the peer's own GOAWAY moved ``h2`` to CLOSED (``h2`` then refuses
every send, yet the streams the peer opened still need their RST_STREAM).
``tests/test_contract_h2_server.py`` pins that detail and the public behaviour
we rely on, on the oldest and newest ``h2``.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, Event, PingAckReceived, RequestReceived, StreamReset
from h2.exceptions import ProtocolError, StreamClosedError

from ._core import MAX_STREAM_ID, RequestGate, encode_goaway, encode_ping, encode_rst_stream, serving_methods
from .events import ConnectionDrained, GoawaySent
from .policy import GoawayPolicy

# "goaway_ext.server": one DEBUG line per GOAWAY sent and per drained connection (never per request).
log = logging.getLogger(__name__)

__all__ = ["DrainState", "ServerConnection", "ConnectionStats", "ServerEvent"]

#: What ``ServerConnection.receive_data`` and ``handle_timer`` return.
ServerEvent = Event | GoawaySent | ConnectionDrained
"""What ``ServerConnection.receive_data`` returns: h2's events plus the two drain events."""


class DrainState(enum.Enum):
    """Where a server connection is in its drain; one value per connection.

    Rules (RFC 9113 §6.8), in the order a connection goes through them:

    ``SERVING``
        Normal. Each request asks the policy; the first trigger met (decider,
        request budget, chance, age, ``max_idle`` without an open stream, or
        ``start_drain``) leaves this state:
        to NOTICE in mode ``graceful``, to DRAINING in mode ``single``, to
        IDLE_WAIT in mode ``idle``.
    ``IDLE_WAIT``
        (mode ``idle``) No GOAWAY yet; keep serving. When no stream is open,
        send a PING (one at a time). Its ACK proves the client has read every
        response sent before it. If no stream was opened since the PING, and
        none is opened for ``ping_timeout`` after the ACK either, send one
        GOAWAY(highest stream id) and go to DRAINING: the client has read
        everything and has stayed idle. Any stream opened in between starts
        it over at the next idle moment (at most one PING per
        ``ping_timeout`` while the client stays busy). A client that does not
        read while idle never answers: it keeps the connection until it
        closes it itself. Nothing is sent after that GOAWAY (see
        :meth:`ServerConnection._idle_check`). If ``grace`` passes first,
        fall back to ``graceful``: NOTICE, with a new ``grace`` window
        counted from then.
    ``NOTICE``
        GOAWAY(2^31-1) and a PING are out; new streams are still served,
        because the client may have opened them before it read the GOAWAY.
        On the PING ACK (or after ``ping_timeout``) send the final
        GOAWAY(highest stream id seen) and go to DRAINING.
    ``DRAINING``
        The final last-stream-id L is fixed and never raised. Streams <= L
        finish normally, however long; streams > L get RST_STREAM
        REFUSED_STREAM and the application never sees them. When no stream
        is open, go to DRAINED.
    ``DRAINED``
        ``close_at`` = now + ``linger``. Late streams are still refused.

    ``grace`` (when set) is a hard deadline counted from the drain start: in
    NOTICE or DRAINING it sends the final GOAWAY if needed, resets every open
    stream with CANCEL and goes to DRAINED with ``close_at`` = now.

    Rapid reset (CVE-2023-44487) skips the rest from any state: when more
    than half of the last ``rapid_reset_window`` streams (a policy setting)
    were reset by the client before their response was complete, or refused
    as late, send GOAWAY(ENHANCE_YOUR_CALM) and go to DRAINED with
    ``close_at`` = now; nothing more is sent. A flood of frames that ask no
    work (more than ``max_control_rate`` in under a second, see
    :class:`ServerConnection`) does the same, with debug data
    ``control frame flood``.
    """

    SERVING = "serving"
    IDLE_WAIT = "idle_wait"
    NOTICE = "notice"
    DRAINING = "draining"
    DRAINED = "drained"


_NEXT: dict[DrainState, frozenset[DrainState]] = {
    DrainState.SERVING: frozenset({DrainState.IDLE_WAIT, DrainState.NOTICE, DrainState.DRAINING, DrainState.DRAINED}),
    DrainState.IDLE_WAIT: frozenset({DrainState.NOTICE, DrainState.DRAINING, DrainState.DRAINED}),
    DrainState.NOTICE: frozenset({DrainState.DRAINING, DrainState.DRAINED}),
    DrainState.DRAINING: frozenset({DrainState.DRAINED}),
    DrainState.DRAINED: frozenset(),
}

_SERVING = DrainState.SERVING
# h2's own methods, called directly on the serving path: cheaper than super() per call.
_H2_RECEIVE_DATA = H2Connection.receive_data
_H2_DATA_TO_SEND = H2Connection.data_to_send
_IDLE_WAIT = DrainState.IDLE_WAIT
_NOTICE = DrainState.NOTICE
_DRAINING = DrainState.DRAINING
_DRAINED = DrainState.DRAINED
# Bytes of DATA sent that excuse one counted frame: a client gives window back
# (stream and connection) at most about once per KiB it reads.
_BYTES_PER_EXCUSED_FRAME = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionStats:
    """Counters of one connection, a snapshot (``ServerConnection.stats``).

    ``requests_seen`` counts requests handed to the application (refused ones
    excluded); ``streams_refused`` the late streams reset with REFUSED_STREAM
    (in mode ``idle``, after its GOAWAY, refused by the GOAWAY alone);
    ``streams_cut`` the streams reset with CANCEL when ``grace`` ran out;
    ``drain_duration`` seconds from drain start to DRAINED (None before).
    """

    requests_seen: int
    goaways_sent: int
    streams_refused: int
    streams_cut: int
    drain_duration: float | None


def _check_max_control_rate(value: object) -> None:
    """Refuse a ``max_control_rate`` that is neither an int >= 1 nor None, naming it.

    The integrations that take the limit before any connection exists (grpclib's
    server) call this too, so a bad value fails where it is given, with the same words.
    """
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"max_control_rate must be an int >= 1, or None (off), got {value!r}")


class _Drain:
    """What a connection keeps only once its drain has started (see :class:`DrainState` for the rules).

    A serving connection points at the one shared :data:`_NO_DRAIN`, whose
    fields are the values before any drain (nothing pending, no reason, no
    deadlines), so the properties and checks that read them need no branch;
    ``ServerConnection._start`` (and ``_calm``) give the connection a
    ``_Drain`` of its own before writing to it. Why a separate object: a
    serving connection then sets one slot instead of twenty-one at construction,
    and the garbage collector, which traverses every slot of every
    connection at each collection, sees 16 instead of 37.
    """

    __slots__ = (
        "acked", "close_at", "duration", "final_id", "goaways_sent", "grace_deadline", "late", "pending",
        "pending_split", "ping_opaque", "ping_prefix", "pings", "probe_high", "queued", "queued_at", "reason",
        "resets", "silent", "started", "streams_cut", "streams_refused",
    )

    def __init__(self) -> None:
        self.resets = 0  # client resets seen while draining (the gate counts those while serving)
        self.late = 0  # streams opened above the final last-stream-id
        self.pending = bytearray()  # our frames, not yet handed out
        self.pending_split = False  # a frame of ours was cut by data_to_send(amount)
        self.queued: list[ServerEvent] = []
        self.queued_at = 0.0
        self.reason = ""
        self.started: float | None = None
        self.final_id: int | None = None
        self.ping_opaque: bytes | None = None  # the drain PING whose ACK we wait for
        self.ping_prefix = b""  # first 4 opaque bytes of every drain PING of this connection
        self.pings = 0
        self.acked = False  # idle mode: the probe was answered while idle; now in the quiet period
        self.probe_high = 0  # idle mode: highest stream id when the outstanding PING went out
        self.silent = False  # mode idle, GOAWAY sent at a proven idle moment: it is the last frame
        self.grace_deadline: float | None = None
        self.close_at: float | None = None
        self.goaways_sent = 0
        self.streams_refused = 0
        self.streams_cut = 0
        self.duration: float | None = None  # seconds from the drain's start to DRAINED


#: The state of every connection that has not started a drain: read, never written.
_NO_DRAIN = _Drain()


class ServerConnection(H2Connection):
    """Server-side ``H2Connection`` that sends GOAWAY without losing a request.

    Drop-in for ``H2Connection(config=H2Configuration(client_side=False))``:
    every ``h2`` event still comes out of :meth:`receive_data`, plus
    :class:`~goaway_ext.GoawaySent` and :class:`~goaway_ext.ConnectionDrained`.
    Events of streams refused during a drain are filtered out, and so is the
    ACK of the drain's own PING. ``policy`` decides when to drain (default:
    only when :meth:`start_drain` is called); ``clock`` must be the clock the
    owner passes to :meth:`handle_timer` (``loop.time`` for asyncio).

    ``max_control_rate`` (default 1000, None: off) bounds the frames that ask
    no work of the application: PING, SETTINGS, their ACKs, PRIORITY,
    RST_STREAM, WINDOW_UPDATE, GOAWAY, unknown types, DATA without data or
    END_STREAM. ``h2`` answers or absorbs each at tens of microseconds, so a
    peer can keep a core busy with them for ever (CVE-2019-9512, -9513, -9515,
    -9518). More than that many in under a second, less one for each request
    the peer opened and one per 512 bytes of DATA we sent meanwhile (what a
    client needs for its own PRIORITY, RST_STREAM and WINDOW_UPDATE frames):
    GOAWAY(ENHANCE_YOUR_CALM, ``control frame flood``) and ``close_at`` = now.
    The core counts them from the frame headers of each read; the clock is
    read once per ``max_control_rate`` frames, never per request.
    """

    # Our state lives in slots, not in the instance __dict__: h2 already keeps 18
    # attributes there, and past 30 keys CPython stops sharing the dict's keys,
    # which slows down every attribute access inside h2 itself (measured: +5% per
    # request). With slots, h2's own code runs exactly as fast as on H2Connection.
    __slots__ = (
        "_age_deadline", "_clock", "_control_mark", "_control_rate", "_drain", "_gate", "_idle_limit", "_idle_mark",
        "_idle_since", "_mode", "_ping_deadline", "_policy", "_reset_window", "_state", "_window_bad", "_window_total",
    )

    def __init__(
        self,
        config: H2Configuration | None = None,
        *,
        policy: GoawayPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_control_rate: int | None = 1000,
    ) -> None:
        if config is None:
            config = H2Configuration(client_side=False, header_encoding=None)
        elif not isinstance(config, H2Configuration):
            raise TypeError(f"config must be an h2.config.H2Configuration or None, got {config!r}")
        elif config.client_side:
            raise ValueError("config.client_side must be False: ServerConnection is the server side")
        if policy is None:
            policy = GoawayPolicy()
        elif not isinstance(policy, GoawayPolicy):
            raise TypeError(f"policy must be a GoawayPolicy or None, got {policy!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        _check_max_control_rate(max_control_rate)
        super().__init__(config=config)
        self._policy = policy
        self._clock = clock
        now = clock()
        budget = policy.new_budget(now)
        # Counting requests and asking decider, budget, sampler and fair share:
        # one call into the core per read (see RequestGate), not a Python loop.
        # The policy's private fields, read directly (same package): its
        # properties cost a Python call each, per connection.
        self._reset_window = policy._rapid_reset_window
        self._gate = RequestGate(RequestReceived, sampler=budget.sampler, max_requests=budget.max_requests,
                                 decider=policy._decider, admit=budget.admit,
                                 reset_type=None if self._reset_window is None else StreamReset,
                                 control_limit=None if max_control_rate is None else max_control_rate + 1)
        self._control_rate = max_control_rate
        # The first max_control_rate window begins with the connection: (began, frames counted,
        # requests, connection-level window given, our send window, 65,535 bytes at first).
        self._control_mark = (now, 0, 0, 0, 65535)
        self._window_total = 0  # streams and bad streams when the current rapid-reset window began
        self._window_bad = 0
        self._age_deadline = budget.age_deadline
        self._idle_limit = budget.max_idle
        self._idle_since: float | None = None  # max_idle: when the connection was last seen without streams
        self._idle_mark = 0  # requests_seen then: a request since means it was not idle all along
        self._mode = policy._mode
        self._state = _SERVING
        self._ping_deadline: float | None = None
        self._drain = _NO_DRAIN  # a drain's own state: a _Drain of its own from the drain's start

    # -- public state ---------------------------------------------------------------

    @property
    def policy(self) -> GoawayPolicy:
        """The policy this connection follows."""
        return self._policy

    @property
    def drain_state(self) -> DrainState:
        """Where the drain is (see :class:`DrainState` for the rules)."""
        return self._state

    @property
    def is_draining(self) -> bool:
        """True once a drain has started (even before the first GOAWAY in mode ``idle``)."""
        return self._state is not _SERVING

    @property
    def is_drained(self) -> bool:
        """True once every stream at or below the final last-stream-id has ended."""
        return self._state is _DRAINED

    @property
    def last_stream_id(self) -> int | None:
        """The final GOAWAY's last-stream-id, None until it is sent."""
        return self._drain.final_id

    @property
    def drain_reason(self) -> str:
        """Why the drain started: ``chance``, ``max_requests``, ``max_age``, ``decider``, ``shutdown``...; "" before."""
        return self._drain.reason

    @property
    def close_at(self) -> float | None:
        """When the owner should close the socket: drained + linger, or grace expiry; None before."""
        return self._drain.close_at

    @property
    def stats(self) -> ConnectionStats:
        """A snapshot of this connection's counters."""
        return ConnectionStats(
            requests_seen=self._gate.seen,
            goaways_sent=self._drain.goaways_sent,
            streams_refused=self._drain.streams_refused,
            streams_cut=self._drain.streams_cut,
            drain_duration=self._drain.duration,
        )

    # -- the h2 API, extended ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ServerEvent]:  # type: ignore[override]
        """Feed bytes from the socket; return ``h2``'s events plus ours.

        While serving, this is ``h2``'s list, untouched, after one look at each
        event for a request. During a drain, streams above the final
        last-stream-id are refused here (their HEADERS went through ``h2``, so
        HPACK stays in sync; their DATA is acknowledged for flow control).
        """
        due = self._gate.count(data)
        events: list[ServerEvent] = _H2_RECEIVE_DATA(self, data)  # type: ignore[assignment]
        if self._state is _SERVING:
            index = self._gate.scan(events)
            if not index:
                if not due:
                    return events
                index = -1
            return self._scanned(events, index)
        out = self._drain.queued  # events of a drain started outside receive_data come first
        self._drain.queued = []
        return self._receive_draining(events, 0, out, due)

    def _scanned(self, events: list[ServerEvent], index: int) -> list[ServerEvent]:
        """A serving read whose scan returned ``index`` (not 0): a drain starts, or a reset or control frames came in.

        A control count that is due while a drain starts is judged on the next
        read: it stays due until judged.
        """
        if index < 0:  # no drain: the rapid-reset check, and the control-frame rate when due
            if self._too_many_resets():
                self._calm(self._clock(), "rapid_reset", b"rapid reset")
            elif self._control_flood():
                self._calm(self._clock(), "control_flood", b"control frame flood")
            else:
                return events
            events.extend(self._drain.queued)
            self._drain.queued.clear()
            return events
        self._start(self._gate.reason)
        out = events[:index]
        out.extend(self._drain.queued)
        self._drain.queued.clear()
        return self._receive_draining(events, index, out)

    def data_to_send(self, amount: int | None = None) -> bytes:
        """Bytes for the socket: ``h2``'s frames, then ours (GOAWAY, PING), whole.

        With ``amount``, our frames are only started once ``h2``'s buffer is
        empty, and a frame of ours that was cut is finished before any more of
        ``h2``'s bytes, so frame boundaries stay intact.
        """
        if self._state is _SERVING:
            return _H2_DATA_TO_SEND(self, amount)
        self._progress(self._clock())
        pending = self._drain.pending
        if self._drain.silent and not pending:
            # The idle GOAWAY is out: nothing may follow it (see _idle_check).
            self.clear_outbound_data_buffer()
            return b""
        if amount is None:
            if self._drain.pending_split:
                # A frame of ours was cut by an earlier ``amount``: its rest
                # must come before any byte of h2's.
                data = bytes(pending) + super().data_to_send()
                pending.clear()
                self._drain.pending_split = False
                return data
            data = super().data_to_send()
            if pending:
                data += pending
                pending.clear()
            return data
        out = b""
        if self._drain.pending_split:
            out = bytes(pending[:amount])
            del pending[:amount]
            self._drain.pending_split = bool(pending)
            amount -= len(out)
            if not amount:
                return out
        data = super().data_to_send(amount)
        out += data
        if pending and len(data) < amount:
            room = amount - len(data)
            out += pending[:room]
            del pending[:room]
            self._drain.pending_split = bool(pending)
        return out

    # -- drain control -------------------------------------------------------------

    def start_drain(self, reason: str = "shutdown") -> None:
        """Start draining now, in the policy's mode (no-op if already draining).

        For server shutdown. The GOAWAY is in the next :meth:`data_to_send`;
        the events it causes come out of the next :meth:`receive_data` or
        :meth:`handle_timer` (and :meth:`next_deadline` says "now" until then).
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, got {reason!r}")
        if self._state is _SERVING:
            self._start(reason)

    def next_deadline(self) -> float | None:
        """The time (on ``clock``) at which :meth:`handle_timer` must run next, or None."""
        if self._drain.queued:
            return self._drain.queued_at
        state = self._state
        if state is _SERVING:
            age = self._age_deadline
            if self._idle_limit is None:
                return age
            idle = self._idle_deadline(self._clock())
            if idle is None or (age is not None and age < idle):
                return age
            return idle
        if state is _NOTICE or state is _IDLE_WAIT:
            ping, grace = self._ping_deadline, self._drain.grace_deadline
            if ping is None or (grace is not None and grace < ping):
                return grace
            return ping
        if state is _DRAINED:
            return self._drain.close_at
        return self._drain.grace_deadline

    def handle_timer(self, now: float) -> list[ServerEvent]:
        """Act on deadlines that passed by ``now``; return the events that were waiting.

        Handles ``max_age``, ``max_idle``, ``ping_timeout``, ``grace`` and the
        idle fallback. Safe to call early or often: nothing happens before a
        deadline. A bad ``now`` raises before anything changes.
        """
        if isinstance(now, bool) or not isinstance(now, (int, float)):
            raise TypeError(f"now must be a number (a time on the connection's clock), got {now!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time on the connection's clock, got {now!r}")
        state = self._state
        grace = self._drain.grace_deadline
        if state is _SERVING:
            if self._age_deadline is not None and now >= self._age_deadline:
                self._start("max_age", now)
            elif self._idle_limit is not None:
                idle = self._idle_deadline(now)
                if idle is not None and now >= idle:
                    self._start("max_idle", now)
        elif state is _IDLE_WAIT:
            if grace is not None and now >= grace:
                # Never idle within grace: fall back to the two-phase drain.
                assert self._policy.grace is not None
                self._drain.grace_deadline = now + self._policy.grace
                self._send_notice(now)
            elif self._ping_deadline is not None and now >= self._ping_deadline:
                self._idle_check(now, acked=False)
        elif state is _NOTICE:
            if grace is not None and now >= grace:
                self._expire(now)
            elif self._ping_deadline is not None and now >= self._ping_deadline:
                self._send_final(now)
        elif state is _DRAINING and grace is not None and now >= grace:
            self._expire(now)
        self._progress(now)
        drain = self._drain
        events = drain.queued
        if not events:
            return []  # never the shared _NO_DRAIN's list
        drain.queued = []
        return events

    # -- internals -----------------------------------------------------------------

    def _too_many_resets(self) -> bool:
        """Rapid reset check, run only when a stream went bad (reset or late), never per request.

        Envoy's rule: once a window of ``rapid_reset_window`` streams is
        complete, more than half of them bad closes the connection; otherwise
        a new window starts there. A flood is caught within two windows.
        """
        window = self._reset_window
        if window is None:
            return False
        late = self._drain.late
        total = self._gate.seen + late
        streams = total - self._window_total
        if streams < window:
            return False
        bad = self._gate.resets + self._drain.resets + late
        if (bad - self._window_bad) * 2 > streams:
            return True
        self._window_total = total
        self._window_bad = bad
        return False

    def _control_flood(self) -> bool:
        """The ``max_control_rate`` judgement, run only once the core's count of control frames is due.

        Rolling windows, as the clock is read only here: a window that began
        a second or more ago is over and a new one starts now; otherwise more
        than ``max_control_rate`` frames in it, less those excused (one per
        stream opened, late ones included, one per 512 bytes of DATA sent, worked out from the
        WINDOW_UPDATE increments the peer gave and our send window now), is a
        flood. A flood is caught within two windows.
        """
        gate = self._gate
        limit = gate.control_next
        rate = self._control_rate
        if rate is None or limit is None or gate.controls < limit:
            return False
        now = self._clock()
        # Streams opened: a late one, refused during a drain, may be reset by its client too.
        controls, seen, given = gate.controls, gate.seen + self._drain.late, gate.window_given
        window = self.outbound_flow_control_window
        began, marked, marked_seen, marked_given, marked_window = self._control_mark
        if now - began >= 1.0:
            self._control_mark = (now, controls, seen, given, window)
            gate.control_next = controls + rate + 1
            return False
        frames = controls - marked
        sent = (given - marked_given) - (window - marked_window)
        excused = (seen - marked_seen) + max(0, sent) // _BYTES_PER_EXCUSED_FRAME
        if frames - excused > rate:
            return True
        gate.control_next = controls + rate + excused - frames + 1
        return False

    def _calm(self, now: float, reason: str, debug: bytes) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) and close now: the client floods us (RFC 9113 §5.4.1).

        ``reason`` is the drain reason (``rapid_reset``, ``control_flood``), ``debug`` the GOAWAY's debug data.
        """
        drain = self._drain
        if drain.silent and self._state is _DRAINED and drain.close_at is not None and drain.close_at <= now:
            return  # already closing, silently
        if drain is _NO_DRAIN:  # a flood while serving: the drain starts here
            drain = self._drain = _Drain()
        last = drain.final_id
        if last is None:
            last = drain.final_id = self.highest_inbound_stream_id
        drain.reason = reason
        drain.pending += encode_goaway(last, ErrorCodes.ENHANCE_YOUR_CALM, debug)
        drain.goaways_sent += 1
        drain.silent = True  # the GOAWAY is the last frame; later streams are dropped unanswered
        self._ping_deadline = None
        self._queue(GoawaySent(last_stream_id=last, final=True, reason=reason), now)
        if drain.started is None:
            drain.started = now
        if self._state is not _DRAINED:
            self._move(_DRAINED)
        drain.duration = now - drain.started
        drain.close_at = now
        self._queue(ConnectionDrained(last_stream_id=last, reason=reason, duration=drain.duration), now)

    def _idle_deadline(self, now: float) -> float | None:
        """When ``max_idle`` runs out, None while a stream is open.

        Worked out when the owner asks (:meth:`next_deadline` after each flush,
        :meth:`handle_timer`), not per request: a request seen in between (the
        ``requests_seen`` counter moved) restarts the idle time from ``now``.
        """
        if self.open_inbound_streams:
            self._idle_since = None
            return None
        since = self._idle_since
        if since is None or self._idle_mark != self._gate.seen:
            since = self._idle_since = now
            self._idle_mark = self._gate.seen
        assert self._idle_limit is not None
        return since + self._idle_limit

    def _move(self, state: DrainState) -> None:
        if state not in _NEXT[self._state]:  # a bug here, never the peer's doing
            raise AssertionError(f"drain state {self._state.name} -> {state.name} is not allowed")
        self._state = state

    def _queue(self, event: ServerEvent, now: float) -> None:
        if not self._drain.queued:
            self._drain.queued_at = now
        self._drain.queued.append(event)

    def _start(self, reason: str, now: float | None = None) -> None:
        if now is None:
            now = self._clock()
        drain = self._drain
        if drain is _NO_DRAIN:
            drain = self._drain = _Drain()
        drain.reason = reason
        drain.started = now
        grace = self._policy.grace
        if grace is not None:
            drain.grace_deadline = now + grace
        if self._mode == "graceful":
            self._send_notice(now)
        elif self._mode == "single":
            self._send_final(now)
        else:
            self._move(_IDLE_WAIT)
            self._progress(now)

    def _new_ping(self, now: float) -> None:
        # Each drain PING has its own opaque (same 4-byte prefix, a counter), so
        # the ACK of an abandoned probe is still recognised as ours and
        # swallowed, but never taken for the ACK of the current one.
        if not self._drain.ping_prefix:
            self._drain.ping_prefix = os.urandom(4)
        self._drain.pings += 1
        self._drain.ping_opaque = self._drain.ping_prefix + self._drain.pings.to_bytes(4, "big")
        self._drain.pending += encode_ping(self._drain.ping_opaque)
        self._ping_deadline = now + self._policy.ping_timeout

    def _send_probe(self, now: float) -> None:
        # Mode idle, no stream open: ask the client to prove it read everything.
        self._drain.probe_high = self.highest_inbound_stream_id
        self._new_ping(now)

    def _idle_check(self, now: float, acked: bool) -> None:
        """Mode idle: the probe PING was answered (``acked``), or a deadline passed.

        Why this much care: httpcore (under httpx) fails every request that is
        waiting to read when it reads a GOAWAY, even one whose response came
        in the same read, and a request it has just assigned to the connection
        fails too if another task reads the GOAWAY before that request's
        HEADERS are written. The ACK arrives after the client read every byte
        sent before the PING; ``ping_timeout`` of quiet after it means the
        client is not about to use the connection. A client whose pool
        expires idle connections sooner than that (httpx: 5 s) closes this
        one itself and never reads the GOAWAY.

        That GOAWAY is the last frame the connection sends: ``h2``-based
        clients go CLOSED on a GOAWAY and fail on any frame after it in the
        same read (a RST_STREAM for a stream that crossed it, a WINDOW_UPDATE,
        a PING ACK), losing the GOAWAY's own event. Streams above the
        last-stream-id are still refused, without RST_STREAM: RFC 9113 §6.8
        lets the sender of a GOAWAY ignore them, and its last-stream-id
        already tells the client they were not processed.
        """
        idle = self.open_inbound_streams == 0 and self.highest_inbound_stream_id == self._drain.probe_high
        if acked:
            self._drain.ping_opaque = None
            if idle:  # every response read; now the quiet period
                self._drain.acked = True
                self._ping_deadline = now + self._policy.ping_timeout
                return
        elif idle:
            self._ping_deadline = None
            if self._drain.acked:
                self._drain.silent = True
                self._send_final(now)
            # else: no ACK yet; the client reads nothing while idle. Its ACK decides, when it comes.
            return
        # A stream was opened since the PING: ask again at the next idle moment.
        self._drain.ping_opaque = None
        self._ping_deadline = None
        self._drain.acked = False
        self._progress(now)

    def _send_notice(self, now: float) -> None:
        # RFC 9113 §6.8: GOAWAY(2^31-1) then a PING; the ACK proves the client
        # has read the GOAWAY, so every stream it opened before is here.
        self._drain.pending += encode_goaway(MAX_STREAM_ID)
        self._new_ping(now)
        self._drain.goaways_sent += 1
        self._move(_NOTICE)
        self._queue(GoawaySent(last_stream_id=MAX_STREAM_ID, final=False, reason=self._drain.reason), now)
        log.debug("drain (%s): GOAWAY(last_stream_id=%d) and PING sent", self._drain.reason, MAX_STREAM_ID)

    def _send_final(self, now: float) -> None:
        last = self.highest_inbound_stream_id
        self._drain.final_id = last
        self._drain.pending += encode_goaway(last)
        self._drain.goaways_sent += 1
        self._ping_deadline = None
        self._move(_DRAINING)
        self._queue(GoawaySent(last_stream_id=last, final=True, reason=self._drain.reason), now)
        log.debug("drain (%s): final GOAWAY(last_stream_id=%d) sent", self._drain.reason, last)
        self._progress(now)

    def _progress(self, now: float) -> None:
        state = self._state
        if state is _IDLE_WAIT:
            if self._drain.ping_opaque is None and not self._drain.acked and self.open_inbound_streams == 0:
                self._send_probe(now)
        elif state is _DRAINING and self.open_inbound_streams == 0:
            self._finish(now, self._policy.linger)

    def _finish(self, now: float, linger: float) -> None:
        drain = self._drain
        assert drain.started is not None and drain.final_id is not None
        self._move(_DRAINED)
        drain.duration = now - drain.started
        drain.close_at = now + linger
        log.debug("drain (%s): drained in %.3f s, close in %.3f s", drain.reason, drain.duration, linger)
        self._queue(ConnectionDrained(last_stream_id=drain.final_id, reason=drain.reason, duration=drain.duration), now)

    def _open_stream_ids(self) -> list[int]:
        # THE h2 seam (see the module docstring): ``streams`` and ``H2Stream.closed``.
        return [stream_id for stream_id, stream in self.streams.items() if stream_id & 1 and not stream.closed]

    def _expire(self, now: float) -> None:
        if self._state is _NOTICE:
            self._send_final(now)
            if self._state is _DRAINED:
                return
        for stream_id in self._open_stream_ids():
            if self._reset(stream_id, ErrorCodes.CANCEL):
                self._drain.streams_cut += 1
        self._finish(now, 0.0)

    def _reset(self, stream_id: int, code: ErrorCodes) -> bool:
        """Reset a stream the drain gives up on; True when an RST_STREAM was queued.

        Two peer actions in the same read as the stream's HEADERS change what
        that takes. A RST_STREAM of its own closed it already: nothing to send.
        Its GOAWAY moved ``h2`` to CLOSED, and ``h2`` then refuses every send,
        although the stream still needs its answer (RFC 9113 §6.8: a GOAWAY
        only stops new streams, the peer keeps reading; REFUSED_STREAM tells it
        the request can be retried). Then the stream is closed in ``h2``'s
        stream state (the seam in the module docstring) and the frame is
        written here, after ``h2``'s bytes.
        """
        try:
            self.reset_stream(stream_id, code)
        except StreamClosedError:
            return False
        except ProtocolError:
            stream = self.streams.get(stream_id)
            if stream is None or stream.closed:
                return False
            stream.reset_stream(code)
            if not self._drain.silent:
                self._drain.pending += encode_rst_stream(stream_id, code)
        return True

    def _receive_draining(self, events: list[ServerEvent], start: int, out: list[ServerEvent],
                          due: bool = False) -> list[ServerEvent]:
        """Slow path during a drain: refuse late streams, swallow our PING ACK; ``due``: judge the control rate."""
        refused: set[int] | None = None
        final = self._drain.final_id
        calm = False
        watch = self._reset_window is not None
        for index in range(start, len(events)):
            event = events[index]
            cls = event.__class__
            if cls is RequestReceived:
                stream_id = event.stream_id  # type: ignore[union-attr]
                if final is not None and stream_id > final:
                    # Late: HPACK already decoded it; refuse, retry-safe (RFC 9113 §8.7).
                    if self._reset(stream_id, ErrorCodes.REFUSED_STREAM):
                        self._drain.streams_refused += 1
                    if refused is None:
                        refused = set()
                    refused.add(stream_id)
                    self._drain.late += 1
                    if watch:
                        calm = calm or self._too_many_resets()
                    continue
                self._gate.seen += 1
            elif cls is StreamReset and watch and (refused is None or event.stream_id not in refused):  # type: ignore[union-attr]
                self._drain.resets += 1
                calm = calm or self._too_many_resets()
            elif cls is PingAckReceived:
                data = event.ping_data  # type: ignore[union-attr]
                prefix = self._drain.ping_prefix
                if prefix and data[:4] == prefix:  # ours: the application never sees it
                    if data == self._drain.ping_opaque:
                        if self._state is _NOTICE:
                            self._send_final(self._clock())
                            final = self._drain.final_id
                        elif self._state is _IDLE_WAIT:
                            self._idle_check(self._clock(), acked=True)
                            final = self._drain.final_id
                        else:
                            self._drain.ping_opaque = None
                    out.extend(self._drain.queued)
                    self._drain.queued.clear()
                    continue
            elif refused is not None and getattr(event, "stream_id", None) in refused:
                if cls is DataReceived:
                    # Give the bytes back to the connection window (the stream is gone).
                    self.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)  # type: ignore[union-attr]
                continue
            out.append(event)
        if calm:
            self._calm(self._clock(), "rapid_reset", b"rapid reset")
        elif due and self._control_flood():
            self._calm(self._clock(), "control_flood", b"control frame flood")
        self._progress(self._clock())
        if self._drain.queued:
            out.extend(self._drain.queued)
            self._drain.queued.clear()
        return out


# The Python methods, right in every drain state: the core's serving pair hands them every
# state but SERVING.
_PY_RECEIVE_DATA = ServerConnection.receive_data
_PY_DATA_TO_SEND = ServerConnection.data_to_send


def _install_serving_methods() -> None:
    """Make the class's ``receive_data`` and ``data_to_send`` the core's serving pair.

    While a connection serves, a read is ``h2``'s read plus the gate's scan and
    a write is ``h2``'s write: the core's two methods (``serving_methods``) do
    that in one call each and hand every other state to the Python methods
    above. They are class attributes, so a connection pays nothing for them
    (earlier, a bound method per instance shadowed each method: ~250 bytes and
    two more objects for the garbage collector per connection, and an
    unspecialised method lookup per call). A subclass that overrides either
    method keeps its own; ``super()`` reaches these.
    """
    # The class's __slots__ members for _state and _gate (mypy knows them as instance attributes).
    slots = vars(ServerConnection)
    receive, send = serving_methods(slots["_state"], _SERVING, slots["_gate"],
                                    _H2_RECEIVE_DATA, ServerConnection._scanned, _H2_DATA_TO_SEND,
                                    _PY_RECEIVE_DATA, _PY_DATA_TO_SEND)
    for method, own in ((receive, _PY_RECEIVE_DATA), (send, _PY_DATA_TO_SEND)):
        method.__doc__ = own.__doc__
        method.__qualname__ = own.__qualname__
        method.__module__ = own.__module__
    ServerConnection.receive_data = receive  # type: ignore[method-assign]
    ServerConnection.data_to_send = send  # type: ignore[method-assign]


_install_serving_methods()
