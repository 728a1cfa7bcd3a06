"""The load generator's HTTP/2 client wire, sans-IO, without ``h2`` on the request path.

A load run sends the same request again and again and needs one thing from
each response: its status. Going through ``h2`` costs most of the load
generator's CPU (header validation and HPACK encoding per request, HPACK
decoding and an event object per frame), which made ``load`` the bottleneck
against a fast server. :class:`LoadWire` does the same job with less:

- the request's header blocks are encoded once (:func:`encode_request_blocks`):
  the first request of a connection puts the fields the static table lacks
  (``:authority``, usually) into the server's HPACK table, and every later
  request names all its fields by index, the same bytes each time, so only
  the 9-byte frame header with the stream id changes (and the server decodes
  an index, not a literal, as with h2load's requests);
- responses are cut into frames by the core's :func:`~goaway_ext._core.split_frames`
  (one call per read, compiled on the Cython core);
- a response header block made only of indexed fields does not change the
  HPACK dynamic table (RFC 7541 §6.1), so its status is cached by its bytes
  until a block that does change the table arrives (:class:`ResponseStatus`);
  every other block goes through a real ``hpack.Decoder``, which therefore
  always sees every change to the table and stays in sync.

It keeps the promises of the ``h2`` path: flow control (WINDOW_UPDATE as
DATA arrives, connection and stream), SETTINGS and PING acknowledged, a
GOAWAY handled as RFC 9113 §6.8 says (no new streams; streams above its
last-stream-id reported as refused, so they can be retried elsewhere; a later
GOAWAY may only lower that id), RST_STREAM(REFUSED_STREAM) reported as refused.
It sends no request bodies (the load generator uses ``h2`` when there is one)
and accepts no server push (it announces SETTINGS_ENABLE_PUSH = 0).

:meth:`LoadWire.receive` returns events as plain tuples ``(kind, a, b)``, one
per finished, refused or reset stream and one per GOAWAY:

=============  ===================  ============================================
kind           a                    b
=============  ===================  ============================================
``ENDED``      stream id            the response's ``:status`` (bytes) or None
``REFUSED``    stream id            the error code (REFUSED_STREAM or 0 for GOAWAY)
``RESET``      stream id            the RST_STREAM error code
``GOAWAY``     last-stream-id       error code 0 (a graceful GOAWAY)
``TERMINATED`` error code           debug data: a GOAWAY with an error code
=============  ===================  ============================================

A protocol violation by the server raises :class:`WireError` after queueing
a GOAWAY with the matching error code.
"""

from __future__ import annotations

from collections.abc import Iterable
from struct import Struct
from typing import Any

import hpack
from hpack.table import HeaderTable

from ._core import DEFAULT_MAX_FRAME_SIZE, decode_goaway, encode_goaway, encode_ping, encode_rst_stream, split_frames

__all__ = ["ENDED", "GOAWAY", "REFUSED", "RESET", "TERMINATED", "LoadWire", "ResponseStatus", "WireError",
           "encode_request_block", "encode_request_blocks"]

ENDED, REFUSED, RESET, GOAWAY, TERMINATED = range(5)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0x9)
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20

# Error codes (RFC 9113 §7).
_PROTOCOL_ERROR = 0x1
_FLOW_CONTROL_ERROR = 0x3
_FRAME_SIZE_ERROR = 0x6
_REFUSED_STREAM = 0x7
_CANCEL = 0x8
_COMPRESSION_ERROR = 0x9

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4

_HEAD = Struct(">BHBBL")
_U32 = Struct(">L")
_SETTING = Struct(">HL")

#: Largest header block (HEADERS + CONTINUATION) a response may use; a bigger
#: one ends the connection, so a server cannot make the client buffer without bound.
MAX_HEADER_BLOCK = 65536
_MAX_WINDOW = 0x7FFFFFFF
_DEFAULT_WINDOW = 65535


class WireError(Exception):
    """The server broke the protocol; ``error_code`` is the one sent in our GOAWAY."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    length = len(payload)
    return _HEAD.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id) + payload


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1); ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """An HPACK string literal without Huffman coding (RFC 7541 §5.2)."""
    return _integer(len(data), 7, 0x00) + data


_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)


def _table_entry_size(name: bytes, value: bytes) -> int:
    return len(name) + len(value) + 32  # RFC 7541 §4.1


def encode_request_blocks(fields: Iterable[tuple[bytes, bytes]],
                          table_size: int = 4096) -> tuple[bytes, bytes, int]:
    """``(first, steady, size)``: the first request's header block, every later one's, and the table they use.

    ``first`` sets the dynamic table's size to ``size`` (RFC 7541 §6.3; just
    what the inserted fields take, so nothing is ever evicted) and sends each
    field the static table does not hold whole as a literal with incremental
    indexing (§6.2.1). ``steady`` is then all indexed fields (§6.1): with
    nothing else ever inserted, the entries keep their indexes (the last one
    inserted is 62) for the life of the connection. When the fields would
    not fit ``table_size``, both blocks are :func:`encode_request_block`'s
    and ``size`` is 0.
    """
    fields = list(fields)
    inserted = [(name, value) for name, value in fields if (name, value) not in _STATIC_FIELDS]
    size = sum(_table_entry_size(name, value) for name, value in inserted)
    if size > table_size:
        block = encode_request_block(fields)
        return block, block, 0
    first = bytearray(_integer(size, 5, 0x20))
    steady = bytearray()
    position = {field: len(inserted) - i for i, field in enumerate(inserted)}  # 1 = the newest
    for name, value in fields:
        full = _STATIC_FIELDS.get((name, value))
        if full is not None:
            first += _integer(full, 7, 0x80)
            steady += _integer(full, 7, 0x80)
            continue
        named = _STATIC_NAMES.get(name)
        if named is not None:
            first += _integer(named, 6, 0x40)
        else:
            first += b"\x40" + _string(name)
        first += _string(value)
        steady += _integer(len(HeaderTable.STATIC_TABLE) + position[(name, value)], 7, 0x80)
    return bytes(first), bytes(steady), size


def encode_request_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """One HPACK header block for ``fields`` that never uses the dynamic table (the fallback of the blocks above).

    It starts with a dynamic table size update to 0 (RFC 7541 §6.3), so it is
    valid whatever SETTINGS_HEADER_TABLE_SIZE the server announces, then each
    field is a static-table index when name and value are there (``:method
    GET``, ``:scheme http``, ``:path /``), else a literal without indexing
    (§6.2.2) with the name indexed when the static table has it. Nothing is
    inserted into the server's table, so the same bytes are valid for every
    request on the connection.
    """
    out = bytearray(b"\x20")
    for name, value in fields:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError(f"header fields must be bytes, got {(name, value)!r}")
        full = _STATIC_FIELDS.get((name, value))
        if full is not None:
            out += _integer(full, 7, 0x80)
            continue
        named = _STATIC_NAMES.get(name)
        if named is not None:
            out += _integer(named, 4, 0x00)
        else:
            out += b"\x00" + _string(name)
        out += _string(value)
    return bytes(out)


def _indexed_only(block: bytes) -> bool:
    """True when every field of ``block`` is an indexed field (RFC 7541 §6.1): it leaves the table alone."""
    pos, n = 0, len(block)
    while pos < n:
        byte = block[pos]
        if not byte & 0x80 or byte == 0x80:  # a literal, a size update, or index 0 (an error for the decoder)
            return False
        pos += 1
        if byte & 0x7F == 0x7F:  # the index goes on in continuation bytes
            while pos < n and block[pos] & 0x80:
                pos += 1
            pos += 1
    return pos == n


class ResponseStatus:
    """The ``:status`` of response header blocks, decoded once per distinct block.

    Every block is either answered from the cache or decoded by the one real
    ``hpack.Decoder``. Only blocks made of indexed fields are cached: they do
    not change the dynamic table, so the same bytes mean the same fields until
    the table changes; any other block changes it (or may), so the cache is
    emptied when one is decoded. The cache holds at most ``max_cached`` blocks
    (emptied when full), so a server cannot grow it without bound.
    """

    __slots__ = ("_cache", "_decoder", "max_cached")

    def __init__(self, max_cached: int = 64) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self._cache: dict[bytes, bytes | None] = {}
        self.max_cached = max_cached

    def __call__(self, block: bytes) -> bytes | None:
        """Decode ``block`` (every block of the connection must come through here, in order)."""
        cache = self._cache
        if block in cache:
            return cache[block]
        indexed = _indexed_only(block)
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise WireError(_COMPRESSION_ERROR, f"cannot decode a response header block: {exc}") from exc
        status = None
        for name, value in fields:
            if name == b":status":
                status = bytes(value)
                break
        if indexed:
            if len(cache) >= self.max_cached:
                cache.clear()
            cache[block] = status
        elif cache:
            cache.clear()
        return status


class LoadWire:
    """One HTTP/2 client connection that sends one fixed request over and over (see the module doc).

    ``fields`` are the request's header fields (bytes, pseudo-headers first);
    requests carry no body. ``window`` is the receive window announced for the
    connection and for each stream; received DATA is counted and given back with
    WINDOW_UPDATE once half a window has arrived.
    """

    __slots__ = ("_block", "_buf", "_continuation", "_fields", "_first", "_half", "_out", "_received",
                 "_request_head", "_status", "_table_size", "_unacked", "goaway_last_stream_id",
                 "max_concurrent_streams", "next_stream_id", "streams", "terminated")

    def __init__(self, fields: Iterable[tuple[bytes, bytes]], *, window: int = 1 << 24) -> None:
        if not _DEFAULT_WINDOW <= window <= _MAX_WINDOW:
            raise ValueError(f"window must be in {_DEFAULT_WINDOW}..{_MAX_WINDOW}, got {window!r}")
        self._fields = list(fields)
        first, steady, self._table_size = encode_request_blocks(self._fields)
        if len(first) > DEFAULT_MAX_FRAME_SIZE:
            raise ValueError(f"the request's header block is {len(first)} bytes, more than one frame carries")
        self._first: bytes | None = first  # sent once, on the connection's first request
        self._use_block(steady)
        self._out = bytearray()
        self._buf = b""
        self._continuation: tuple[int, int, bytearray] | None = None
        self._status = ResponseStatus()
        self._half = window // 2
        self._unacked = 0
        self._received: dict[int, int] = {}
        #: Open streams: id -> the final status received so far (None before the response's HEADERS).
        self.streams: dict[int, bytes | None] = {}
        self.next_stream_id = 1
        #: The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says).
        self.max_concurrent_streams = _MAX_WINDOW
        #: The lowest last-stream-id of the GOAWAYs received, None before any.
        self.goaway_last_stream_id: int | None = None
        #: True once a GOAWAY with an error code or a protocol error ended the connection.
        self.terminated = False
        self._out += PREFACE
        settings = _SETTING.pack(_SETTINGS_ENABLE_PUSH, 0) + _SETTING.pack(_SETTINGS_INITIAL_WINDOW_SIZE, window)
        self._out += _frame(_SETTINGS, 0, 0, settings)
        if window > _DEFAULT_WINDOW:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(window - _DEFAULT_WINDOW))

    def _use_block(self, block: bytes) -> None:
        self._block = block
        length = len(block)
        self._request_head = bytes([length >> 16, (length >> 8) & 0xFF, length & 0xFF, _HEADERS,
                                    _END_STREAM | _END_HEADERS])

    @property
    def draining(self) -> bool:
        """Has a graceful GOAWAY (NO_ERROR) arrived, and no error ended the connection?"""
        return self.goaway_last_stream_id is not None and not self.terminated

    @property
    def can_open(self) -> bool:
        """May a new stream be opened here (no GOAWAY, not ended, stream ids left)?"""
        return self.goaway_last_stream_id is None and not self.terminated and self.next_stream_id <= _MAX_WINDOW

    def send_request(self) -> int:
        """Queue the request on a new stream; return its id (check :attr:`can_open` and the stream limit first)."""
        stream_id = self.next_stream_id
        self.next_stream_id = stream_id + 2
        out = self._out
        if self._first is None:
            out += self._request_head
            out += _U32.pack(stream_id)
            out += self._block
        else:
            out += _frame(_HEADERS, _END_STREAM | _END_HEADERS, stream_id, self._first)
            self._first = None
        self.streams[stream_id] = None
        return stream_id

    def reset(self, stream_id: int, error_code: int = _CANCEL) -> None:
        """Give up on an open stream: forget it and queue RST_STREAM (CANCEL unless told otherwise)."""
        if self.streams.pop(stream_id, 0) != 0:
            self._received.pop(stream_id, None)
            self._out += encode_rst_stream(stream_id, error_code)

    def data_to_send(self) -> bytes:
        """The bytes queued for the server since the last call."""
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def _fail(self, error_code: int, message: str) -> WireError:
        self.terminated = True
        self._out += encode_goaway(0, error_code)
        return WireError(error_code, message)

    def receive(self, data: bytes) -> list[tuple[int, int, Any]]:
        """Take bytes read from the server; return the events they complete (see the module doc)."""
        if self._buf:
            data = self._buf + data
        try:
            frames, used = split_frames(data, DEFAULT_MAX_FRAME_SIZE)
        except ValueError as exc:
            raise self._fail(_FRAME_SIZE_ERROR, str(exc)) from None
        self._buf = data[used:] if used < len(data) else b""
        events: list[tuple[int, int, Any]] = []
        streams = self.streams
        received = self._received
        half = self._half
        for ftype, flags, stream_id, length, payload in frames:
            if self._continuation is not None and ftype != _CONTINUATION:
                raise self._fail(_PROTOCOL_ERROR, f"frame of type {ftype} inside a header block")
            if ftype == _DATA:
                if not stream_id:
                    raise self._fail(_PROTOCOL_ERROR, "DATA on stream 0")
                if length:
                    unacked = self._unacked + length
                    if unacked >= half:
                        self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(unacked))
                        unacked = 0
                    self._unacked = unacked
                if flags & _END_STREAM:
                    status = streams.pop(stream_id, 0)
                    if status != 0:
                        received.pop(stream_id, None)
                        events.append((ENDED, stream_id, status))
                elif length and stream_id in streams:
                    got = received.get(stream_id, 0) + length
                    if got >= half:
                        self._out += _frame(_WINDOW_UPDATE, 0, stream_id, _U32.pack(got))
                        got = 0
                    received[stream_id] = got
            elif ftype == _HEADERS:
                if not stream_id:
                    raise self._fail(_PROTOCOL_ERROR, "HEADERS on stream 0")
                if flags & (_PADDED | _PRIORITY):
                    payload = self._unpad(flags, payload)
                if flags & _END_HEADERS:
                    self._header_block(stream_id, payload, flags & _END_STREAM, events)
                else:
                    self._continuation = (stream_id, flags & _END_STREAM, bytearray(payload))
            elif ftype == _CONTINUATION:
                self._continue(stream_id, flags, payload, events)
            elif ftype == _RST_STREAM:
                if length != 4:
                    raise self._fail(_FRAME_SIZE_ERROR, f"RST_STREAM of {length} bytes")
                if streams.pop(stream_id, 0) != 0:
                    received.pop(stream_id, None)
                    code = _U32.unpack(payload)[0]
                    events.append((REFUSED if code == _REFUSED_STREAM else RESET, stream_id, code))
            elif ftype == _SETTINGS:
                self._settings(flags, length, payload)
            elif ftype == _PING:
                if length != 8:
                    raise self._fail(_FRAME_SIZE_ERROR, f"PING of {length} bytes")
                if not flags & _ACK:
                    self._out += encode_ping(payload, ack=True)
            elif ftype == _GOAWAY:
                if length < 8:
                    raise self._fail(_FRAME_SIZE_ERROR, f"GOAWAY of {length} bytes")
                self._goaway(payload, events)
            elif ftype == _WINDOW_UPDATE:
                if length != 4:
                    raise self._fail(_FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {length} bytes")
            elif ftype == _PUSH_PROMISE:
                raise self._fail(_PROTOCOL_ERROR, "PUSH_PROMISE after SETTINGS_ENABLE_PUSH = 0")
            # PRIORITY and frame types this side does not know are ignored (RFC 9113 §5.5).
        return events

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        start, pad = 0, 0
        if flags & _PADDED:
            if not payload:
                raise self._fail(_PROTOCOL_ERROR, "PADDED HEADERS without a pad length")
            pad = payload[0]
            start = 1
        if flags & _PRIORITY:
            start += 5
        end = len(payload) - pad
        if end < start:
            raise self._fail(_PROTOCOL_ERROR, "HEADERS padding longer than its payload")
        return payload[start:end]

    def _continue(self, stream_id: int, flags: int, payload: bytes, events: list[tuple[int, int, Any]]) -> None:
        pending = self._continuation
        if pending is None or pending[0] != stream_id:
            raise self._fail(_PROTOCOL_ERROR, f"CONTINUATION on stream {stream_id} outside its header block")
        block = pending[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise self._fail(_PROTOCOL_ERROR, f"a response header block longer than {MAX_HEADER_BLOCK} bytes")
        if flags & _END_HEADERS:
            self._continuation = None
            self._header_block(stream_id, bytes(block), pending[1], events)

    def _header_block(self, stream_id: int, block: bytes, end_stream: int,
                      events: list[tuple[int, int, Any]]) -> None:
        try:
            status = self._status(block)  # always decoded: the table must see every block
        except WireError as exc:
            raise self._fail(exc.error_code, str(exc)) from None
        streams = self.streams
        if stream_id not in streams:
            return  # a stream we reset or never opened
        if status is not None:  # the final status replaces an informational (1xx) one; trailers have none
            streams[stream_id] = status
        if end_stream:
            self._received.pop(stream_id, None)
            events.append((ENDED, stream_id, streams.pop(stream_id)))

    def _settings(self, flags: int, length: int, payload: bytes) -> None:
        if flags & _ACK:
            return
        if length % 6:
            raise self._fail(_FRAME_SIZE_ERROR, f"SETTINGS of {length} bytes")
        for offset in range(0, length, 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == _SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_concurrent_streams = value
            elif code == _SETTINGS_INITIAL_WINDOW_SIZE and value > _MAX_WINDOW:
                raise self._fail(_FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
            elif code == _SETTINGS_HEADER_TABLE_SIZE and value < self._table_size:
                # Our entries no longer fit the server's table. From the ACK on, every block
                # empties the table (a size update to 0, RFC 7541 §4.2) and uses no index into it.
                self._table_size = 0
                self._first = None
                self._use_block(encode_request_block(self._fields))
            # The other settings only matter to a sender of DATA, and this one sends none.
        self._out += _frame(_SETTINGS, _ACK, 0, b"")

    def _goaway(self, payload: bytes, events: list[tuple[int, int, Any]]) -> None:
        last, code, debug = decode_goaway(payload)
        previous = self.goaway_last_stream_id
        if previous is not None and last > previous:
            raise self._fail(_PROTOCOL_ERROR, f"GOAWAY raised the last stream id from {previous} to {last} "
                                              "(RFC 9113 §6.8: it may only go down)")
        self.goaway_last_stream_id = last
        streams = self.streams
        refused = sorted(stream_id for stream_id in streams if stream_id > last)
        for stream_id in refused:
            del streams[stream_id]
            self._received.pop(stream_id, None)
        if code:
            self.terminated = True
            events.extend((REFUSED, stream_id, 0) for stream_id in refused)
            events.append((TERMINATED, code, debug))
            return
        events.append((GOAWAY, last, code))
        for stream_id in refused:
            self._out += encode_rst_stream(stream_id, _CANCEL)  # the server did no work on it: tell it we gave up
            events.append((REFUSED, stream_id, 0))
