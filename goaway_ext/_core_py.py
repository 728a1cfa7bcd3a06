"""Pure-Python core: frame codec, request sampler and inbound GOAWAY scanner.

This module is the reference twin of ``_core_c.pyx``. Both must give the same
results for the same inputs, byte for byte and draw for draw, so any change here
is mirrored there (the test suite runs every check over both). Type checkers
read this file; the compiled module ships a ``.pyi`` with the same signatures.

Wire layout (RFC 9113 §4.1): every frame starts with a 9-byte header, a 24-bit
payload length, an 8-bit type, 8 bits of flags and a reserved bit followed by a
31-bit stream id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from struct import Struct
from typing import Any

__all__ = [
    "MAX_STREAM_ID",
    "MAX_ERROR_CODE",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_DEBUG_DATA",
    "encode_goaway",
    "encode_ping",
    "encode_rst_stream",
    "decode_goaway",
    "Sampler",
    "FrameScanner",
    "GoawayGate",
    "ExemptPaths",
    "RequestGate",
    "serving_methods",
    "split_frames",
]

#: Largest stream identifier (31 bits, RFC 9113 §5.1.1).
MAX_STREAM_ID = 0x7FFFFFFF
#: Largest error code (32 bits, RFC 9113 §7).
MAX_ERROR_CODE = 0xFFFFFFFF
#: Frame payloads every peer must accept (SETTINGS_MAX_FRAME_SIZE default, §6.5.2).
DEFAULT_MAX_FRAME_SIZE = 16384
#: Debug data that still fits a GOAWAY payload of DEFAULT_MAX_FRAME_SIZE.
MAX_DEBUG_DATA = DEFAULT_MAX_FRAME_SIZE - 8
_MAX_FRAME_SIZE_LIMIT = 0xFFFFFF

_TYPE_DATA = 0x00
_TYPE_RST_STREAM = 0x03
_TYPE_PING = 0x06
_TYPE_GOAWAY = 0x07
_TYPE_WINDOW_UPDATE = 0x08
_FLAG_ACK = 0x01
_FLAG_END_STREAM = 0x01
_FLAG_PADDED = 0x08
# Frame types RequestGate.count never counts: DATA (judged by its payload),
# HEADERS, PUSH_PROMISE (an error from a client, h2 ends the connection) and
# CONTINUATION (h2 refuses a run of more than 64).
_WORK_TYPES = frozenset((0x00, 0x01, 0x05, 0x09))
# The client connection preface (RFC 9113 §3.4) that comes before its first frame.
_PREFACE_LENGTH = 24

# length (as 8 + 16 bits), type, flags, stream id, then the payload words.
_GOAWAY_HEAD = Struct(">BHBBLLL")
_PING_HEAD = Struct(">BHBBL")
_RST_STREAM = Struct(">BHBBLL")
_FRAME_HEADER = Struct(">BHBBL")
_GOAWAY_FIXED = Struct(">LL")

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GAP_CAP = 0x7FFFFFFFFFFFFFFF


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass, but True as a stream id is a bug, not a value.
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value!r}")
    return value


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes-like, got {value!r}")
    return bytes(value)


def _check_chance(chance: object) -> float:
    if type(chance) is bool or not isinstance(chance, (int, float)):
        raise TypeError(f"chance must be a real number in [0, 1], got {chance!r}")
    try:
        value = float(chance)
    except OverflowError:  # an int too large for a float is far outside [0, 1]
        value = math.inf
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"chance must be a real number in [0, 1], got {chance!r}")
    return value


def encode_goaway(last_stream_id: int, error_code: int = 0, debug_data: bytes = b"") -> bytes:
    """Return a whole GOAWAY frame (RFC 9113 §6.8).

    The frame is built by hand rather than through ``h2`` so that sending it does
    not move the ``h2`` state machine to CLOSED: the connection keeps serving the
    streams at or below ``last_stream_id``. ``debug_data`` is capped so the
    payload never exceeds 16,384 bytes, the frame size every peer accepts.
    """
    # The common call (plain ints, no debug data) is checked inline; anything
    # else goes through the full checks, which also word the errors.
    if not (type(last_stream_id) is int and 0 <= last_stream_id <= MAX_STREAM_ID):
        _check_int("last_stream_id", last_stream_id, 0, MAX_STREAM_ID)
    if not (type(error_code) is int and 0 <= error_code <= MAX_ERROR_CODE):
        _check_int("error_code", error_code, 0, MAX_ERROR_CODE)
    if type(debug_data) is bytes and not debug_data:
        return _GOAWAY_HEAD.pack(0, 8, _TYPE_GOAWAY, 0, 0, last_stream_id, error_code)
    debug = _check_bytes("debug_data", debug_data)
    if len(debug) > MAX_DEBUG_DATA:
        raise ValueError(
            f"debug_data of {len(debug)} bytes makes the GOAWAY payload longer than "
            f"{DEFAULT_MAX_FRAME_SIZE} bytes (at most {MAX_DEBUG_DATA} bytes of debug_data)"
        )
    length = 8 + len(debug)
    head = _GOAWAY_HEAD.pack(length >> 16, length & 0xFFFF, _TYPE_GOAWAY, 0, 0, last_stream_id, error_code)
    return head + debug if debug else head


def encode_ping(opaque: bytes, ack: bool = False) -> bytes:
    """Return a whole PING frame (RFC 9113 §6.7) carrying exactly 8 opaque bytes.

    Used for the round trip of the two-phase shutdown: once the ACK comes back,
    every stream the client opened before the first GOAWAY has reached us.
    """
    data = _check_bytes("opaque", opaque)
    if len(data) != 8:
        raise ValueError(f"opaque must be exactly 8 bytes, got {len(data)} bytes: {data!r}")
    if type(ack) is not bool:
        raise TypeError(f"ack must be a bool, got {ack!r}")
    return _PING_HEAD.pack(0, 8, _TYPE_PING, _FLAG_ACK if ack else 0, 0) + data


def encode_rst_stream(stream_id: int, error_code: int) -> bytes:
    """Return a whole RST_STREAM frame (RFC 9113 §6.4).

    Stream 0 is refused: RST_STREAM on the connection stream is a connection
    error for the receiver.
    """
    _check_int("stream_id", stream_id, 1, MAX_STREAM_ID)
    _check_int("error_code", error_code, 0, MAX_ERROR_CODE)
    return _RST_STREAM.pack(0, 4, _TYPE_RST_STREAM, 0, stream_id, error_code)


def decode_goaway(payload: bytes) -> tuple[int, int, bytes]:
    """Split a GOAWAY payload (the bytes after the 9-byte header).

    Returns ``(last_stream_id, error_code, debug_data)``. The reserved bit in
    front of the last stream id is ignored, as RFC 9113 §6.8 requires.
    """
    data = _check_bytes("payload", payload)
    if len(data) < 8:
        raise ValueError(f"payload must be at least 8 bytes, got {len(data)} bytes: {data!r}")
    last, code = _GOAWAY_FIXED.unpack_from(data)
    return last & MAX_STREAM_ID, code, data[8:]


class Sampler:
    """Decides, request by request, whether this one starts a drain.

    Each call to :meth:`sample` is an independent Bernoulli(``chance``) trial,
    like kube-apiserver's ``--goaway-chance``. Instead of drawing a uniform
    number per request, the sampler draws the number of misses before the next
    hit from the geometric distribution and counts it down: by memorylessness
    the resulting sequence is the same i.i.d. Bernoulli process, and the hot
    path is one decrement. Each instance owns its splitmix64 state, so no lock
    and no state is shared between connections; both cores produce the same
    sequence for the same seed.
    """

    __slots__ = ("__weakref__", "_chance", "_countdown", "_log_miss", "_state")

    def __init__(self, chance: float, *, seed: int | None = None) -> None:
        value = _check_chance(chance)
        if seed is None:
            state = int.from_bytes(os.urandom(8), "little")
        elif type(seed) is bool or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        else:
            state = seed & _MASK64
        self._chance = value
        self._state = state
        self._log_miss = math.log1p(-value) if 0.0 < value < 1.0 else 0.0
        self._countdown = self._draw_gap()

    @property
    def chance(self) -> float:
        """The probability that one call to :meth:`sample` returns True."""
        return self._chance

    @chance.setter
    def chance(self, chance: float) -> None:
        # A load-aware controller moves the chance of live connections off the
        # request path. The countdown in flight was drawn for the old chance, so
        # a new gap is drawn; the Bernoulli process is memoryless, so from here
        # on every call is a Bernoulli(new chance) trial.
        value = _check_chance(chance)
        self._chance = value
        self._log_miss = math.log1p(-value) if 0.0 < value < 1.0 else 0.0
        self._countdown = self._draw_gap()

    def __repr__(self) -> str:
        return f"Sampler(chance={self._chance!r})"

    def _next64(self) -> int:
        # splitmix64 (Steele, Lea, Flood 2014): tiny state, passes BigCrush.
        state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        self._state = state
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def _draw_gap(self) -> int:
        chance = self._chance
        if chance >= 1.0:
            return 0
        if chance <= 0.0:
            return _GAP_CAP
        # u in (0, 1]; P(gap >= k) = P(u <= (1-p)^k) = (1-p)^k: geometric.
        u = ((self._next64() >> 11) + 1) * (1.0 / 9007199254740992.0)
        gap = math.log(u) / self._log_miss
        if gap >= 9.223372036854775807e18:
            return _GAP_CAP
        return int(gap)

    def sample(self) -> bool:
        """Return True with probability ``chance``, independently of earlier calls."""
        left = self._countdown
        if left:
            # chance 0 starts at 2**63 - 1: centuries of calls before it could run out.
            self._countdown = left - 1
            return False
        self._countdown = self._draw_gap()
        return True


class FrameScanner:
    """Takes GOAWAY frames out of an inbound HTTP/2 byte stream.

    A client hands every chunk it reads to :meth:`feed` and passes the bytes it
    returns to ``h2``. GOAWAY frames (stream 0, payload of at least 8 bytes) are
    removed and returned decoded, so ``h2`` never sees them and never moves to
    CLOSED; everything else, including malformed GOAWAYs, reaches ``h2``
    unchanged, so ``h2`` keeps raising its own protocol errors. Chunks may split
    frames anywhere. A chunk from which nothing is removed or held back is
    returned as the very same ``bytes`` object. A frame longer than
    ``max_frame_size`` raises ValueError, and so does every later call: past
    such a header the frame boundaries can no longer be trusted.
    """

    __slots__ = ("_error", "_goaway", "_goaway_left", "_header", "_max_frame_size", "_pass")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._max_frame_size = _check_int(
            "max_frame_size", max_frame_size, DEFAULT_MAX_FRAME_SIZE, _MAX_FRAME_SIZE_LIMIT
        )
        self._pass = 0
        self._goaway_left = 0
        self._goaway = bytearray()
        self._header = bytearray()
        self._error: str | None = None

    @property
    def max_frame_size(self) -> int:
        """Largest frame payload accepted (our SETTINGS_MAX_FRAME_SIZE)."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max_frame_size = _check_int("max_frame_size", value, DEFAULT_MAX_FRAME_SIZE, _MAX_FRAME_SIZE_LIMIT)

    def _fail(self, length: int) -> None:
        self._error = f"frame length {length} exceeds max_frame_size {self._max_frame_size}"
        raise ValueError(self._error)

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        """Scan one chunk; return ``(bytes_for_h2, goaways)``.

        ``goaways`` lists ``(last_stream_id, error_code, debug_data)`` for every
        GOAWAY frame completed in this chunk, in wire order.
        """
        if self._error is not None:
            raise ValueError(self._error)
        if not isinstance(data, bytes):
            data = _check_bytes("data", data)
        n = len(data)
        pos = 0
        run = 0  # start of the pass-through run not yet copied into pieces
        pieces: list[bytes] = []
        found: list[tuple[int, int, bytes]] = []
        changed = False
        while pos < n:
            if self._pass:
                take = min(self._pass, n - pos)
                self._pass -= take
                pos += take
                continue
            if self._goaway_left:
                changed = True
                take = min(self._goaway_left, n - pos)
                self._goaway += data[pos : pos + take]
                self._goaway_left -= take
                pos += take
                run = pos
                if not self._goaway_left:
                    found.append(decode_goaway(bytes(self._goaway)))
                    self._goaway = bytearray()
                continue
            if self._header or n - pos < 9:
                # A header split across chunks is held back until it is whole.
                changed = True
                pieces.append(data[run:pos])
                take = min(9 - len(self._header), n - pos)
                self._header += data[pos : pos + take]
                pos += take
                run = pos
                if len(self._header) < 9:
                    break
                header = bytes(self._header)
                self._header = bytearray()
                length_hi, length_lo, ftype, _flags, stream = _FRAME_HEADER.unpack(header)
                length = (length_hi << 16) | length_lo
                if length > self._max_frame_size:
                    self._fail(length)
                if ftype == _TYPE_GOAWAY and stream & MAX_STREAM_ID == 0 and length >= 8:
                    self._goaway_left = length
                else:
                    pieces.append(header)
                    self._pass = length
                continue
            length_hi, length_lo, ftype, _flags, stream = _FRAME_HEADER.unpack_from(data, pos)
            length = (length_hi << 16) | length_lo
            if length > self._max_frame_size:
                self._fail(length)
            if ftype == _TYPE_GOAWAY and stream & MAX_STREAM_ID == 0 and length >= 8:
                changed = True
                pieces.append(data[run:pos])
                self._goaway_left = length
                pos += 9
                run = pos
            else:
                self._pass = length
                pos += 9
        if not changed:
            return data, found
        pieces.append(data[run:pos])
        return b"".join(pieces), found


class GoawayGate:
    """A client connection's read while no GOAWAY has been seen, in one call.

    ``ClientConnection`` stores the gate's bound :meth:`receive` on the
    instance in place of its own ``receive_data`` until the first GOAWAY: one
    call (a C call in the compiled core) that runs the ``scanner`` over the
    chunk and hands what is left to ``h2``'s ``receive_data``. Whatever a
    plain read does not cover goes back to the connection's Python code, which
    keeps the behaviour exact: a chunk that is not ``bytes``, a frame-size
    bound that moved since the last read (an acknowledged SETTINGS, a larger
    MAX_FRAME_SIZE asked for), a frame over the bound (``fallback``, the full
    read); GOAWAYs in the chunk or a ``reset_type`` event (h2's
    ``StreamReset``) among h2's events (``after``). It also holds
    :attr:`asked_frame_size`, the other half of that bound.
    """

    __slots__ = ("_after", "_asked", "_connection", "_fallback", "_receive", "_reset_type", "_scanner")

    def __init__(self, scanner: FrameScanner, reset_type: type) -> None:
        if type(scanner) is not FrameScanner:
            raise TypeError(f"scanner must be a FrameScanner of this core, got {scanner!r}")
        if not isinstance(reset_type, type):
            raise TypeError(f"reset_type must be a class, got {reset_type!r}")
        self._scanner = scanner
        self._reset_type = reset_type
        self._asked = DEFAULT_MAX_FRAME_SIZE
        self._connection: Any = None
        self._receive: Callable[[bytes], list[Any]] | None = None
        self._after: Callable[[list[Any], Any], list[Any]] | None = None
        self._fallback: Callable[[Any], list[Any]] | None = None

    @property
    def asked_frame_size(self) -> int:
        """The largest SETTINGS_MAX_FRAME_SIZE we asked the peer for (16384 until we ask for more).

        Why here: the peer may send frames that large as soon as it has read
        our SETTINGS, before ``h2`` applies the value on the ACK, so the
        scanner's bound is the larger of the two.
        """
        return self._asked

    @asked_frame_size.setter
    def asked_frame_size(self, value: int) -> None:
        self._asked = _check_int("asked_frame_size", value, DEFAULT_MAX_FRAME_SIZE, _MAX_FRAME_SIZE_LIMIT)

    def attach(
        self,
        connection: Any,
        receive: Callable[[bytes], list[Any]],
        after: Callable[[list[Any], Any], list[Any]],
        fallback: Callable[[Any], list[Any]],
    ) -> None:
        """Give :meth:`receive` the connection, h2's read, the slow half and the full read.

        ``connection.max_inbound_frame_size`` is h2's acknowledged frame-size
        bound; ``receive(bytes)`` is h2's ``receive_data`` and returns a list;
        ``after(events, goaways)`` finishes a read that saw GOAWAYs or a
        reset; ``fallback(data)`` is the connection's full Python read.
        """
        for name, value in (("receive", receive), ("after", after), ("fallback", fallback)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        self._connection = connection
        self._receive = receive
        self._after = after
        self._fallback = fallback

    def receive(self, data: Any) -> list[Any]:
        """Scan ``data`` and hand the rest to h2; the events, or what ``after``/``fallback`` make of the read."""
        connection = self._connection
        if connection is None or self._receive is None or self._after is None or self._fallback is None:
            raise RuntimeError("GoawayGate.receive() needs attach() first")
        scanner = self._scanner
        if data.__class__ is not bytes or scanner._error is not None:
            return self._fallback(data)
        limit = connection.max_inbound_frame_size
        if limit.__class__ is not int:
            return self._fallback(data)
        if limit < self._asked:
            limit = self._asked
        if limit != scanner._max_frame_size:
            return self._fallback(data)
        try:
            for_h2, goaways = scanner.feed(data)
        except ValueError:
            # An oversize frame: the scanner now refuses every read, and the full
            # read turns that into h2's FrameTooLargeError with the same message.
            return self._fallback(data)
        if for_h2:
            events = self._receive(for_h2)
            if events.__class__ is not list:
                raise TypeError(f"receive must return a list, got {events!r}")
        else:
            events = []
        if goaways:
            return self._after(events, goaways)
        reset_type = self._reset_type
        for event in events:
            if event.__class__ is reset_type:
                return self._after(events, ())
        return events


def _path_set(paths: tuple[str | bytes, ...]) -> frozenset[str | bytes]:
    if not paths:
        raise ValueError("ExemptPaths needs at least one path, got none")
    items: set[str | bytes] = set()
    for path in paths:
        if isinstance(path, str):
            raw = path.encode("utf-8")
        elif isinstance(path, (bytes, bytearray)):
            raw = bytes(path)
        else:
            raise TypeError(f"each path must be a str or bytes, got {path!r}")
        if not raw.startswith(b"/"):
            raise ValueError(f"each path must start with '/', got {path!r}")
        items.add(raw)
        items.add(raw.decode("latin-1"))  # h2 with a header_encoding hands out str
    return frozenset(items)


class ExemptPaths:
    """A decider that exempts requests for the given paths (health checks, ``/stats``).

    ``GoawayPolicy(decider=ExemptPaths("/healthz"))``: a request whose
    ``:path`` is exactly one of ``paths`` (query string included) returns False,
    so it neither counts toward ``max_requests`` nor draws the chance; every
    other request returns None (the policy decides). Why a class and not a
    function: :class:`RequestGate` recognises it and runs the header scan in
    the compiled core, so a connection with this decider installed costs what
    one without a decider costs.
    """

    __slots__ = ("_given", "_paths")

    def __init__(self, *paths: str | bytes) -> None:
        self._paths = _path_set(paths)
        self._given = paths

    @property
    def paths(self) -> tuple[str | bytes, ...]:
        """The exempt paths, as given."""
        return self._given

    def __repr__(self) -> str:
        return f"ExemptPaths({', '.join(map(repr, self._given))})"

    def __call__(self, headers: Any) -> bool | None:
        """False (exempt) when the request's ``:path`` is one of the paths, else None."""
        for item in headers:
            name = item[0]
            if name == b":path" or name == ":path":
                return False if item[1] in self._paths else None
        return None


class RequestGate:
    """The per-request work of a serving connection, in one call.

    ``ServerConnection`` hands each list of ``h2`` events to :meth:`scan`,
    which spots the events of ``request_type`` (h2's ``RequestReceived``;
    the core does not import h2), counts them, and asks, request by request
    and in this order: ``decider`` (True starts a drain, False exempts the
    request from the rest, None goes on), the ``max_requests`` budget, the
    ``sampler`` and, on a sampler hit, ``admit`` (a fair-share rate limit).
    One call per read instead of several Python calls per request is what
    keeps a serving ``ServerConnection`` within 0.3% of ``H2Connection``.
    Events of ``reset_type`` (h2's ``StreamReset``) are counted in
    :attr:`resets` for the rapid-reset limit; a scan that saw one and starts
    no drain returns -1, so the connection looks at the count only then.

    With ``control_limit``, :meth:`count` also counts the
    inbound frames that ask no work of the application (see :meth:`count`)
    from the frame headers in the bytes, so that frames ``h2`` turns into no
    event at all (a WINDOW_UPDATE or RST_STREAM for a closed stream) are
    counted too. The count is compared with :attr:`control_next` once per
    read; the connection judges the rate only when it is reached.
    """

    __slots__ = ("_admit", "_control_next", "_controls", "_decider", "_given", "_head", "_left", "_reason",
                 "_request_type", "_reset_type", "_resets", "_sampler", "_seen", "_skip")

    def __init__(
        self,
        request_type: type,
        *,
        sampler: Any = None,
        max_requests: int | None = None,
        decider: Callable[[Any], bool | None] | None = None,
        admit: Callable[[], bool] | None = None,
        reset_type: type | None = None,
        control_limit: int | None = None,
    ) -> None:
        if not isinstance(request_type, type):
            raise TypeError(f"request_type must be a class, got {request_type!r}")
        if reset_type is not None and not isinstance(reset_type, type):
            raise TypeError(f"reset_type must be a class or None, got {reset_type!r}")
        self._reset_type = reset_type
        self._resets = 0
        if control_limit is not None:
            control_limit = _check_int("control_limit", control_limit, 1, _GAP_CAP)
        self._control_next = control_limit
        self._controls = 0
        self._given = 0
        # A server's h2 connection reads the client's 24-byte preface first; the frames start after it.
        self._skip = _PREFACE_LENGTH
        self._head = b""
        if decider is not None and not callable(decider):
            raise TypeError(f"decider must be callable or None, got {decider!r}")
        if admit is not None and not callable(admit):
            raise TypeError(f"admit must be callable or None, got {admit!r}")
        if sampler is not None and not hasattr(sampler, "sample"):
            raise TypeError(f"sampler must have a sample() method or be None, got {sampler!r}")
        self._request_type = request_type
        self._decider = decider
        self._sampler = sampler
        self._admit = admit
        self._left = None if max_requests is None else _check_int("max_requests", max_requests, 1, _GAP_CAP)
        self._seen = 0
        self._reason = ""

    @property
    def seen(self) -> int:
        """Requests counted so far (those a drain refused are never counted)."""
        return self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen = _check_int("seen", value, 0, _GAP_CAP)

    @property
    def reason(self) -> str:
        """Why the last :meth:`scan` that returned non-zero starts a drain; "" before."""
        return self._reason

    @property
    def resets(self) -> int:
        """Events of ``reset_type`` counted so far (stream resets by the peer: the rapid-reset limit)."""
        return self._resets

    @property
    def controls(self) -> int:
        """Frames counted by :meth:`count` so far (frames that ask no work of the application)."""
        return self._controls

    @property
    def window_given(self) -> int:
        """Sum of the connection-level WINDOW_UPDATE increments counted so far (whole frames in one read)."""
        return self._given

    @property
    def control_next(self) -> int | None:
        """The :attr:`controls` count at which :meth:`count` returns True; None: nothing is counted."""
        return self._control_next

    @control_next.setter
    def control_next(self, value: int) -> None:
        if self._control_next is None:
            raise RuntimeError("control_next needs a gate made with control_limit")
        self._control_next = _check_int("control_next", value, 1, _GAP_CAP)

    def count(self, data: Any) -> bool:
        """Count the frames in ``data`` (the next bytes of the client's stream) that ask no work; True once due.

        Counted: PING, SETTINGS (with or without ACK), PRIORITY, RST_STREAM,
        WINDOW_UPDATE, GOAWAY, frames of unknown type, and DATA without
        END_STREAM that carries no data. Such a frame costs the peer 9 to 17
        bytes and ``h2`` tens of microseconds (CVE-2019-9512, -9513, -9515,
        -9518): without a bound a peer can keep a core busy for ever. HEADERS,
        CONTINUATION (``h2`` refuses a long run of them) and DATA that carries
        data are not counted; a request's frames cost no more than one header
        read each. A frame header split between reads is carried over; the
        payload is never copied. Returns ``controls >= control_next``
        (always False without ``control_limit``).
        """
        limit = self._control_next
        if limit is None:
            return False
        if data.__class__ is not bytes:
            data = _check_bytes("data", data)
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return self._controls >= limit
        head = self._head
        if head:
            take = 9 - len(head)
            head += data[pos : pos + take]
            pos += take
            if len(head) < 9:
                self._head = head
                self._skip = 0
                return self._controls >= limit
            self._head = b""
            pos = self._frame(head, 0, data, pos, n)
        unpack = _FRAME_HEADER.unpack_from
        while n - pos >= 9:
            pos = self._frame(data, pos, data, pos + 9, n, unpack)
        if pos >= n:
            self._skip = pos - n
        else:
            self._skip = 0
            self._head = data[pos:]
        return self._controls >= limit

    def _frame(self, header: bytes, at: int, data: bytes, payload: int, n: int,
               unpack: Callable[[bytes, int], tuple[int, ...]] = _FRAME_HEADER.unpack_from) -> int:
        """Count one frame whose header is ``header[at:at+9]`` and payload starts at ``data[payload]``; its end."""
        length_hi, length_lo, ftype, flags, stream = unpack(header, at)
        length = (length_hi << 16) | length_lo
        if ftype == _TYPE_DATA:
            if not flags & _FLAG_END_STREAM and (
                length == 0 or (flags & _FLAG_PADDED and payload < n and data[payload] + 1 == length)
            ):
                self._controls += 1
        elif ftype not in _WORK_TYPES:
            self._controls += 1
            if ftype == _TYPE_WINDOW_UPDATE and not stream & MAX_STREAM_ID and length == 4 and payload + 4 <= n:
                self._given += int.from_bytes(data[payload : payload + 4], "big") & MAX_STREAM_ID
        return payload + length

    def _trigger(self, event: Any) -> bool:
        decider = self._decider
        if decider is not None:
            verdict = decider(event.headers or [])
            if verdict is not None:
                if verdict:
                    self._reason = "decider"
                    return True
                return False
        left = self._left
        if left is not None:
            left -= 1
            self._left = left
            if left <= 0:
                self._reason = "max_requests"
                return True
        sampler = self._sampler
        if sampler is None or not sampler.sample():
            return False
        admit = self._admit
        if admit is None or admit():
            self._reason = "chance"
            return True
        return False

    def scan(self, events: list[Any]) -> int:
        """Count the requests in ``events``; return the 1-based index of the one that starts a drain.

        Else 0, or -1 when ``events`` held a ``reset_type`` event.
        """
        if not isinstance(events, list):
            raise TypeError(f"events must be a list, got {events!r}")
        request_type = self._request_type
        reset_type = self._reset_type
        index = 0
        reset = False
        for event in events:
            index += 1
            cls = event.__class__
            if cls is request_type:
                self._seen += 1
                if self._trigger(event):
                    return index
            elif cls is reset_type:
                self._resets += 1
                reset = True
        return -1 if reset else 0


def serving_methods(
    state_slot: Any,
    serving: object,
    gate_slot: Any,
    receive: Callable[..., list[Any]],
    after: Callable[..., list[Any]],
    send: Callable[..., bytes],
    slow_receive: Callable[..., list[Any]],
    slow_send: Callable[..., bytes],
) -> tuple[Callable[..., list[Any]], Callable[..., bytes]]:
    """Return ``(receive_data, data_to_send)``, the two methods of a connection class that serves.

    Why: while a ``ServerConnection`` serves, a read is ``h2``'s read plus the
    gate's :meth:`RequestGate.scan`, and a write is ``h2``'s write; these two
    methods do exactly that, in one call into the compiled core, and hand
    everything else to the class's own Python methods. As class attributes
    they cost a connection nothing (no bound method per instance, no
    reference cycle through the gate), and an override in a subclass still
    wins.

    ``state_slot`` and ``gate_slot`` are the class's ``__slots__`` members
    holding the drain state and the :class:`RequestGate`. When the state is
    ``serving`` (identity), ``receive_data(self, data)`` counts the control
    frames in ``data`` (:meth:`RequestGate.count`), calls ``receive(self,
    data)`` (which must return a list), scans it, and returns it as is when
    the scan gives 0 and no count is due, else ``after(self, events, index)``
    (index -1: only the count is due); and ``data_to_send(self,
    amount=None)`` is ``send(self, amount)``. In any other
    state, or when a slot is unset or ``self`` is of another class, they are
    ``slow_receive(self, data)`` and ``slow_send(self, amount)``.
    """
    for name, value in (("receive", receive), ("after", after), ("send", send), ("slow_receive", slow_receive),
                        ("slow_send", slow_send)):
        if not callable(value):
            raise TypeError(f"{name} must be callable, got {value!r}")
    for name, value in (("state_slot", state_slot), ("gate_slot", gate_slot)):
        if type(value).__name__ != "member_descriptor":
            raise TypeError(f"{name} must be a __slots__ member of a class, got {value!r}")
    state_owner = state_slot.__objclass__
    gate_owner = gate_slot.__objclass__

    def receive_data(self: Any, data: Any) -> list[Any]:
        if not isinstance(self, state_owner) or getattr(self, state_slot.__name__, None) is not serving:
            return slow_receive(self, data)
        gate = getattr(self, gate_slot.__name__, None) if isinstance(self, gate_owner) else None
        if gate.__class__ is not RequestGate:
            return slow_receive(self, data)
        due = gate._control_next is not None and gate.count(data)
        events = receive(self, data)
        if events.__class__ is not list:
            raise TypeError(f"receive must return a list, got {events!r}")
        index = gate.scan(events)
        if index == 0:
            if not due:
                return events
            index = -1
        return after(self, events, index)

    def data_to_send(self: Any, amount: Any = None) -> bytes:
        if isinstance(self, state_owner) and getattr(self, state_slot.__name__, None) is serving:
            return send(self, amount)
        return slow_send(self, amount)

    return receive_data, data_to_send


# -- load generator: whole frames out of a byte stream ----------------------------------------

_NO_PAYLOAD = b""


def split_frames(
    data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> tuple[list[tuple[int, int, int, int, bytes]], int]:
    """Cut the whole frames at the front of ``data``; return ``(frames, used)``.

    Each frame is ``(type, flags, stream_id, length, payload)`` in wire order;
    ``used`` is the number of bytes they take, so ``data[used:]`` is the start of
    a frame still to come. The load generator's fast path reads responses with
    this one call per read instead of parsing each frame in Python. DATA
    payloads are not copied (``payload`` is ``b""``; the load generator only
    counts their ``length`` for flow control); every other frame's payload is.
    A frame longer than ``max_frame_size`` (our SETTINGS_MAX_FRAME_SIZE) raises
    ValueError naming its length: past it, frame boundaries cannot be trusted.
    """
    if not isinstance(data, bytes):
        data = _check_bytes("data", data)
    n = len(data)
    pos = 0
    frames: list[tuple[int, int, int, int, bytes]] = []
    unpack = _FRAME_HEADER.unpack_from
    while n - pos >= 9:
        length_hi, length_lo, ftype, flags, stream = unpack(data, pos)
        length = (length_hi << 16) | length_lo
        if length > max_frame_size:
            raise ValueError(f"frame length {length} exceeds max_frame_size {max_frame_size}")
        end = pos + 9 + length
        if end > n:
            break
        payload = _NO_PAYLOAD if ftype == _TYPE_DATA else data[pos + 9 : end]
        frames.append((ftype, flags, stream & MAX_STREAM_ID, length, payload))
        pos = end
    return frames, pos
