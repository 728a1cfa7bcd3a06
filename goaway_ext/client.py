"""Client side of a graceful GOAWAY: an ``H2Connection`` that keeps working after one.

``h2`` treats every inbound GOAWAY as the end of the connection: it moves to
CLOSED, drops its output and raises ``ProtocolError`` on the responses the
server is still allowed to send. RFC 9113 §6.8 says otherwise: streams at or
below the frame's Last-Stream-ID complete normally, streams above it were never
processed, and a server may send two GOAWAYs (2^31-1 first, the real bound
after a round trip). :class:`ClientConnection` takes GOAWAY frames out of the
byte stream with the core's :class:`~goaway_ext.FrameScanner` before ``h2``
parses anything, and applies those rules itself.

Drain rules, in one place (the state is ``goaway_last_stream_id``):

========================  ================================================================
state                     what the connection does
========================  ================================================================
open (``None``)           plain ``h2``
draining (an int ``L``)   streams ≤ ``L`` run to the end (HEADERS, DATA, trailers, flow
                          control); our open streams > ``L`` are reset with CANCEL and
                          reported as :class:`~goaway_ext.StreamRefused`; new streams raise
                          :class:`~goaway_ext.ConnectionDrainingError`; a later GOAWAY may
                          lower ``L`` (refusing more streams) but never raise it
dead                      a GOAWAY with an error code went to ``h2``: ``h2`` is CLOSED and
                          returned ``ConnectionTerminated``, as without this class
========================  ================================================================

A GOAWAY that raises ``L`` breaks a MUST of §6.8; like any protocol violation
(§5.4.1) it ends the connection: a GOAWAY(PROTOCOL_ERROR) is queued and
``ProtocolError`` raised, as ``h2`` does for its own errors.

The one place this module reads ``h2`` beyond its documented API is
:meth:`ClientConnection._open_outbound_above`; ``tests/test_contract_h2_client.py``
pins it on the oldest and newest supported ``h2``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import MethodType
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ._core import DEFAULT_MAX_FRAME_SIZE, MAX_DEBUG_DATA, FrameScanner, GoawayGate, encode_goaway
from .errors import ConnectionDrainingError
from .events import GoawayReceived, StreamRefused

# "goaway_ext.client": one DEBUG line per GOAWAY received (never per request).
log = logging.getLogger(__name__)

__all__ = ["ClientConnection"]

_REFUSED_STREAM = ErrorCodes.REFUSED_STREAM
_StreamReset = h2.events.StreamReset
# h2's own methods, called directly: cheaper than super() on every read and request.
_H2_RECEIVE_DATA = h2.connection.H2Connection.receive_data
_H2_SEND_HEADERS = h2.connection.H2Connection.send_headers
_H2_NEXT_STREAM_ID = h2.connection.H2Connection.get_next_available_stream_id


class ClientConnection(h2.connection.H2Connection):
    """A client ``H2Connection`` that survives a graceful GOAWAY (RFC 9113 §6.8).

    Drop-in for ``H2Connection(config=H2Configuration(client_side=True))``:
    every method behaves the same until the server sends GOAWAY. Then, for a
    GOAWAY with NO_ERROR, :meth:`receive_data` returns a
    :class:`~goaway_ext.GoawayReceived` event instead of ``h2``'s
    ``ConnectionTerminated``, keeps delivering the streams the server will
    still finish, and returns :class:`~goaway_ext.StreamRefused` for the ones it
    will not (safe to retry on a new connection). A RST_STREAM with
    REFUSED_STREAM also yields ``StreamRefused`` right after ``h2``'s
    ``StreamReset``. :attr:`is_draining` and :attr:`open_stream_count` tell a
    pool when to stop sending on the connection and when to close it.
    """

    # h2's acknowledged frame-size bound, which h2 sets and reads as usual: a
    # slot, so the core's GoawayGate reads it on every read without a lookup.
    __slots__ = ("max_inbound_frame_size",)

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        if config is None:
            config = h2.config.H2Configuration(client_side=True)
        elif not config.client_side:
            raise ValueError("ClientConnection needs an H2Configuration with client_side=True")
        super().__init__(config=config)
        self._scanner = FrameScanner(DEFAULT_MAX_FRAME_SIZE)
        # The gate also keeps the largest MAX_FRAME_SIZE we asked for
        # (asked_frame_size): h2 only applies it once the server ACKs, but the
        # server may use it as soon as it has read it.
        self._gate = GoawayGate(self._scanner, _StreamReset)
        self._goaway_last_stream_id: int | None = None
        self._goaway_error_code: int | None = None
        self._refused: set[int] = set()
        # Until a GOAWAY arrives, send_headers and get_next_available_stream_id
        # have nothing to guard: the instance gets h2's own as attributes, which
        # shadow the class's methods (plain functions, non-data descriptors) and
        # save a Python frame and a super() per request. receive_data becomes
        # the gate's receive: scanner and h2's receive_data in one call, no
        # Python frame of ours on a read without GOAWAY or reset. The first
        # GOAWAY drops all three (see _receive_goaway). A subclass that
        # overrides one of them keeps its own.
        cls = type(self)
        shortcuts = 0
        if cls.receive_data is _OWN_RECEIVE_DATA:
            self._gate.attach(self, MethodType(_H2_RECEIVE_DATA, self), self._after_read,
                              MethodType(_OWN_RECEIVE_DATA, self))
            self.receive_data = self._gate.receive  # type: ignore[method-assign]
            shortcuts = 4
        if cls.send_headers is _OWN_SEND_HEADERS:
            self.send_headers = MethodType(_H2_SEND_HEADERS, self)  # type: ignore[method-assign]
            shortcuts |= 1
        if cls.get_next_available_stream_id is _OWN_NEXT_STREAM_ID:
            self.get_next_available_stream_id = MethodType(_H2_NEXT_STREAM_ID, self)  # type: ignore[method-assign]
            shortcuts |= 2
        self._shortcuts = shortcuts

    # -- what a pool asks -------------------------------------------------

    @property
    def is_draining(self) -> bool:
        """True once the server sent any GOAWAY: open no new stream here."""
        return self._goaway_last_stream_id is not None

    @property
    def goaway_last_stream_id(self) -> int | None:
        """The lowest Last-Stream-ID received so far, or None before any GOAWAY."""
        return self._goaway_last_stream_id

    @property
    def goaway_error_code(self) -> int | None:
        """Error code of the latest GOAWAY (0 is NO_ERROR), or None before any."""
        return self._goaway_error_code

    @property
    def open_stream_count(self) -> int:
        """Streams still open in either direction; a draining connection at 0 can close."""
        return self.open_outbound_streams + self.open_inbound_streams

    # -- outbound guards --------------------------------------------------

    def get_next_available_stream_id(self) -> int:
        """As ``h2``'s, but raises :class:`~goaway_ext.ConnectionDrainingError` after GOAWAY."""
        if self._goaway_last_stream_id is not None:
            raise self._draining_error()
        return _H2_NEXT_STREAM_ID(self)

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[Any],
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        """As ``h2``'s; opening a new stream after GOAWAY raises ``ConnectionDrainingError``.

        RFC 9113 §6.8: the receiver of a GOAWAY must not open more streams on
        the connection. Headers on a stream that already exists (trailers) are
        still allowed.
        """
        if self._goaway_last_stream_id is not None and stream_id > self.highest_outbound_stream_id:
            raise self._draining_error()
        _H2_SEND_HEADERS(
            self,
            stream_id,
            headers,
            end_stream=end_stream,
            priority_weight=priority_weight,
            priority_depends_on=priority_depends_on,
            priority_exclusive=priority_exclusive,
        )

    def update_settings(self, new_settings: dict[SettingCodes | int, int]) -> None:
        """As ``h2``'s; also lets the GOAWAY scanner accept a larger MAX_FRAME_SIZE.

        The scanner only needs the limit to bound what it buffers; ``h2`` still
        enforces the acknowledged value on every frame it is handed.
        """
        super().update_settings(new_settings)
        asked = new_settings.get(SettingCodes.MAX_FRAME_SIZE)
        if asked is not None and asked > self._gate.asked_frame_size:
            self._gate.asked_frame_size = asked

    def _draining_error(self) -> ConnectionDrainingError:
        return ConnectionDrainingError(
            f"the server sent GOAWAY (last stream id {self._goaway_last_stream_id}); "
            "open the stream on a new connection"
        )

    # -- inbound ----------------------------------------------------------

    def receive_data(self, data: Any) -> list[Any]:
        """As ``h2``'s, with GOAWAY frames handled per RFC 9113 §6.8 (see the module doc).

        Events for frames in ``data`` come first, in wire order; the GOAWAY
        outcome (``GoawayReceived`` then any ``StreamRefused``, or ``h2``'s
        ``ConnectionTerminated`` for an error code) follows them. ``data`` must
        be bytes-like (``bytes``, ``bytearray``, ``memoryview``): anything else
        raises ``TypeError``, as in ``h2``.

        Until the first GOAWAY the instance's ``receive_data`` is the core's
        ``GoawayGate.receive``, which does the same in one call and comes back
        here (or to :meth:`_after_read`) for anything but a plain read.
        """
        scanner = self._scanner
        limit = self.max_inbound_frame_size
        asked = self._gate.asked_frame_size
        if limit < asked:
            limit = asked
        if limit != scanner.max_frame_size:
            scanner.max_frame_size = limit
        if data.__class__ is not bytes:
            # bytes(data) of an int would build that many zero bytes: take only
            # bytes-like objects, with h2's own error for anything else.
            data = bytes(memoryview(data))
        try:
            for_h2, goaways = scanner.feed(data)
        except ValueError as exc:
            # Same outcome as h2's own check on an oversize frame.
            self.close_connection(error_code=ErrorCodes.FRAME_SIZE_ERROR)
            raise h2.exceptions.FrameTooLargeError(str(exc)) from exc
        if not for_h2:
            events: list[Any] = []
        else:
            events = _H2_RECEIVE_DATA(self, for_h2)
            for event in events:
                if type(event) is _StreamReset:
                    events = self._add_refusals(events)
                    break
        if goaways:
            for last_stream_id, error_code, debug_data in goaways:
                self._receive_goaway(last_stream_id, error_code, debug_data, events)
        return events

    def _after_read(self, events: list[Any], goaways: Any) -> list[Any]:
        """The gate's slow half: h2's events of a read with a StreamReset among them or GOAWAYs in it.

        The same steps as the end of :meth:`receive_data`, in the same order.
        """
        for event in events:
            if type(event) is _StreamReset:
                events = self._add_refusals(events)
                break
        for last_stream_id, error_code, debug_data in goaways:
            self._receive_goaway(last_stream_id, error_code, debug_data, events)
        return events

    def _add_refusals(self, events: list[Any]) -> list[Any]:
        # RST_STREAM(REFUSED_STREAM): the peer did no work on it (RFC 9113 §8.7).
        out: list[Any] = []
        for event in events:
            out.append(event)
            if type(event) is _StreamReset and event.error_code == _REFUSED_STREAM:
                stream_id = event.stream_id
                if stream_id is not None and stream_id not in self._refused:
                    self._refused.add(stream_id)
                    out.append(StreamRefused(stream_id=stream_id))
        return out

    def _receive_goaway(
        self, last_stream_id: int, error_code: int, debug_data: bytes, events: list[Any]
    ) -> None:
        previous = self._goaway_last_stream_id
        if previous is not None and last_stream_id > previous:
            try:
                self.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:  # already closed: nothing more to say
                pass
            raise h2.exceptions.ProtocolError(
                f"GOAWAY raised the last stream id from {previous} to {last_stream_id} "
                "(RFC 9113 §6.8: it may only go down)"
            )
        self._goaway_last_stream_id = last_stream_id
        self._goaway_error_code = error_code
        if self._shortcuts:  # from now on the class's guarded methods answer
            if self._shortcuts & 1:
                del self.send_headers
            if self._shortcuts & 2:
                del self.get_next_available_stream_id
            if self._shortcuts & 4:
                del self.receive_data
            self._shortcuts = 0
        refused = self._open_outbound_above(last_stream_id)
        log.debug("GOAWAY(last_stream_id=%d, error_code=%d) received; %d stream(s) above it refused",
                  last_stream_id, error_code, len(refused))
        if error_code:
            # Keep h2's behaviour: it sees the frame, goes CLOSED, reports
            # ConnectionTerminated. What came before in this read is delivered.
            frame = encode_goaway(last_stream_id, error_code, debug_data[:MAX_DEBUG_DATA])
            events.extend(super().receive_data(frame))
        else:
            events.append(
                GoawayReceived(last_stream_id=last_stream_id, error_code=error_code, debug_data=debug_data)
            )
            for stream_id in refused:
                # CANCEL closes it on our side and tells the server we gave up.
                self.reset_stream(stream_id, ErrorCodes.CANCEL)
        for stream_id in refused:
            if stream_id not in self._refused:
                self._refused.add(stream_id)
                events.append(StreamRefused(stream_id=stream_id))

    def _open_outbound_above(self, last_stream_id: int) -> list[int]:
        """Ids of our streams above ``last_stream_id`` that are not closed yet.

        The h2 seam: ``H2Connection.streams`` (``dict[int, H2Stream]``) and
        ``H2Stream.closed`` are not underscored but not in h2's documented API
        either. h2 offers only counts of open streams, and to refuse the right
        ones we need their ids. Pinned by ``tests/test_contract_h2_client.py``.
        """
        return sorted(
            stream_id
            for stream_id, stream in self.streams.items()
            if stream_id > last_stream_id and stream_id % 2 == 1 and not stream.closed
        )


# What __init__ compares with to know whether a subclass overrides them.
_OWN_SEND_HEADERS = ClientConnection.send_headers
_OWN_NEXT_STREAM_ID = ClientConnection.get_next_available_stream_id
_OWN_RECEIVE_DATA = ClientConnection.receive_data
