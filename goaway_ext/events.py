"""Events goaway_ext adds to the ones ``h2`` returns from ``receive_data``.

Like ``h2.events``, they are small immutable records with keyword fields; unlike
``h2``'s, they are frozen, so an application can keep them without copying.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GoawaySent", "ConnectionDrained", "GoawayReceived", "StreamRefused"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GoawaySent:
    """The server put a GOAWAY on the wire.

    ``final`` is False for the first frame of a two-phase shutdown (last stream
    id 2^31-1, RFC 9113 §6.8), True once ``last_stream_id`` is the real bound
    no later frame will raise. ``reason`` says what started the drain:
    ``"chance"``, ``"max_requests"``, ``"max_age"``, ``"max_idle"``,
    ``"decider"``, or whatever the caller passed to ``start_drain``.
    """

    last_stream_id: int
    final: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionDrained:
    """Every stream at or below the final last-stream-id has ended.

    The server may now close the socket (after a short linger, so the peer
    reads the last frames before the FIN). ``duration`` is seconds from the
    start of the drain, on the clock the caller passes in.
    """

    last_stream_id: int
    reason: str
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GoawayReceived:
    """The peer sent GOAWAY; streams at or below ``last_stream_id`` still complete."""

    last_stream_id: int
    error_code: int
    debug_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRefused:
    """A stream we opened was never processed by the peer: safe to retry elsewhere.

    Either it was above a GOAWAY's last stream id, or the peer reset it with
    REFUSED_STREAM (RFC 9113 §8.7).
    """

    stream_id: int
