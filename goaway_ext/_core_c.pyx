# cython: language_level=3, embedsignature=True, embedsignature.format=clinic
"""Compiled core: the twin of ``_core_py`` (read that module for the rules).

Every function and class here gives the same results as its pure-Python twin,
including error types and messages, and the same Sampler draws for the same
seed (same splitmix64, same libm ``log``/``log1p``). The buffers written here
are sized before any byte is stored, and every read of caller data is bounded
by its length, whatever that data is.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE, _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.math cimport log, log1p
from libc.string cimport memcmp, memcpy

import os

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1

cdef extern from *:
    """
    /* A tuple of at least two items whose class indexes like tuple itself,
       so that item[0] and item[1] are its first two fields. */
    static inline int goaway_plain_pair(PyObject *item) {
        PyTypeObject *type = Py_TYPE(item);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2) return 0;
        return type == &PyTuple_Type || (type->tp_as_mapping != NULL
            && type->tp_as_mapping->mp_subscript == PyTuple_Type.tp_as_mapping->mp_subscript);
    }
    """
    bint _plain_pair "goaway_plain_pair"(object item) noexcept

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

MAX_STREAM_ID = 0x7FFFFFFF
MAX_ERROR_CODE = 0xFFFFFFFF
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_DEBUG_DATA = 16384 - 8

cdef long long _MAX_STREAM_ID = 0x7FFFFFFF
cdef long long _MAX_ERROR_CODE = 0xFFFFFFFF
cdef Py_ssize_t _MAX_DEBUG = 16384 - 8
cdef long long _MAX_FRAME_SIZE_LIMIT = 0xFFFFFF
cdef unsigned char _TYPE_RST_STREAM = 0x03
cdef unsigned char _TYPE_PING = 0x06
cdef unsigned char _TYPE_GOAWAY = 0x07
cdef unsigned char _TYPE_WINDOW_UPDATE = 0x08
cdef unsigned char _FLAG_END_STREAM = 0x01
cdef unsigned char _FLAG_PADDED = 0x08
cdef long long _PREFACE_LENGTH = 24
cdef unsigned long long _GAP_CAP = 0x7FFFFFFFFFFFFFFF


cdef inline void _put32(unsigned char* out, unsigned long long value) noexcept:
    out[0] = (value >> 24) & 0xFF
    out[1] = (value >> 16) & 0xFF
    out[2] = (value >> 8) & 0xFF
    out[3] = value & 0xFF


cdef inline unsigned long long _get32(const unsigned char* src) noexcept:
    return ((<unsigned long long>src[0] << 24) | (<unsigned long long>src[1] << 16)
            | (<unsigned long long>src[2] << 8) | <unsigned long long>src[3])


cdef inline void _put_header(unsigned char* out, Py_ssize_t length, unsigned char ftype,
                             unsigned char flags, unsigned long long stream) noexcept:
    out[0] = (length >> 16) & 0xFF
    out[1] = (length >> 8) & 0xFF
    out[2] = length & 0xFF
    out[3] = ftype
    out[4] = flags
    _put32(out + 5, stream)


cdef long long _check_int(str name, object value, long long low, long long high) except? -1:
    # bool is an int subclass, but True as a stream id is a bug, not a value.
    cdef int overflow = 0
    cdef long long result
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    result = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow != 0 or result < low or result > high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value!r}")
    return result


cdef bytes _check_bytes(str name, object value):
    if type(value) is bytes:
        return <bytes>value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes-like, got {value!r}")
    return bytes(value)


def encode_goaway(last_stream_id, error_code=0, debug_data=b""):
    """Return a whole GOAWAY frame (RFC 9113 §6.8); see ``_core_py.encode_goaway``."""
    cdef long long last = _check_int("last_stream_id", last_stream_id, 0, _MAX_STREAM_ID)
    cdef long long code = _check_int("error_code", error_code, 0, _MAX_ERROR_CODE)
    cdef bytes debug = _check_bytes("debug_data", debug_data)
    cdef Py_ssize_t debug_len = PyBytes_GET_SIZE(debug)
    if debug_len > _MAX_DEBUG:
        raise ValueError(
            f"debug_data of {debug_len} bytes makes the GOAWAY payload longer than "
            f"16384 bytes (at most {_MAX_DEBUG} bytes of debug_data)"
        )
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, 17 + debug_len)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    _put_header(out, 8 + debug_len, _TYPE_GOAWAY, 0, 0)
    _put32(out + 9, <unsigned long long>last)
    _put32(out + 13, <unsigned long long>code)
    if debug_len:
        memcpy(out + 17, PyBytes_AS_STRING(debug), debug_len)
    return frame


def encode_ping(opaque, ack=False):
    """Return a whole PING frame (RFC 9113 §6.7); see ``_core_py.encode_ping``."""
    cdef bytes data = _check_bytes("opaque", opaque)
    if PyBytes_GET_SIZE(data) != 8:
        raise ValueError(f"opaque must be exactly 8 bytes, got {PyBytes_GET_SIZE(data)} bytes: {data!r}")
    if type(ack) is not bool:
        raise TypeError(f"ack must be a bool, got {ack!r}")
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, 17)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    _put_header(out, 8, _TYPE_PING, 1 if ack else 0, 0)
    memcpy(out + 9, PyBytes_AS_STRING(data), 8)
    return frame


def encode_rst_stream(stream_id, error_code):
    """Return a whole RST_STREAM frame (RFC 9113 §6.4); see ``_core_py.encode_rst_stream``."""
    cdef long long stream = _check_int("stream_id", stream_id, 1, _MAX_STREAM_ID)
    cdef long long code = _check_int("error_code", error_code, 0, _MAX_ERROR_CODE)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, 13)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    _put_header(out, 4, _TYPE_RST_STREAM, 0, <unsigned long long>stream)
    _put32(out + 9, <unsigned long long>code)
    return frame


cdef tuple _decode_at(const unsigned char* src, Py_ssize_t length):
    return (
        <long long>(_get32(src) & 0x7FFFFFFF),
        <long long>_get32(src + 4),
        PyBytes_FromStringAndSize(<char*>src + 8, length - 8),
    )


cdef tuple _decode(bytes data):
    return _decode_at(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def decode_goaway(payload):
    """Split a GOAWAY payload into ``(last_stream_id, error_code, debug_data)``."""
    cdef bytes data = _check_bytes("payload", payload)
    if PyBytes_GET_SIZE(data) < 8:
        raise ValueError(f"payload must be at least 8 bytes, got {PyBytes_GET_SIZE(data)} bytes: {data!r}")
    return _decode(data)


cdef double _check_chance(object chance) except? -1.0:
    cdef double value
    if type(chance) is bool or not isinstance(chance, (int, float)):
        raise TypeError(f"chance must be a real number in [0, 1], got {chance!r}")
    try:
        value = float(chance)
    except OverflowError:
        value = float("inf")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"chance must be a real number in [0, 1], got {chance!r}")
    return value


cdef class Sampler:
    """Sampler(chance, *, seed=None)
--

Decides, request by request, whether this one starts a drain.

    Each call to :meth:`sample` is an independent Bernoulli(``chance``) trial,
    like kube-apiserver's ``--goaway-chance``. Instead of drawing a uniform
    number per request, the sampler draws the number of misses before the next
    hit from the geometric distribution and counts it down: by memorylessness
    the resulting sequence is the same i.i.d. Bernoulli process, and the hot
    path is one decrement. Each instance owns its splitmix64 state, so no lock
    and no state is shared between connections; both cores produce the same
    sequence for the same seed.
    """

    cdef double _chance
    cdef double _log_miss
    cdef unsigned long long _state
    cdef unsigned long long _countdown
    cdef object __weakref__

    def __init__(self, chance, *, seed=None):
        cdef double value = _check_chance(chance)
        if seed is None:
            state = int.from_bytes(os.urandom(8), "little")
        elif type(seed) is bool or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        else:
            state = seed & 0xFFFFFFFFFFFFFFFF
        self._chance = value
        self._state = state
        self._log_miss = log1p(-value) if 0.0 < value < 1.0 else 0.0
        self._countdown = self._draw_gap()

    @property
    def chance(self):
        """The probability that one call to :meth:`sample` returns True."""
        return self._chance

    @chance.setter
    def chance(self, chance):
        # Same as the twin: validate, then draw a fresh gap for the new chance.
        cdef double value = _check_chance(chance)
        self._chance = value
        self._log_miss = log1p(-value) if 0.0 < value < 1.0 else 0.0
        self._countdown = self._draw_gap()

    def __repr__(self):
        return f"Sampler(chance={self._chance!r})"

    cdef inline unsigned long long _next64(self) noexcept:
        cdef unsigned long long z
        self._state += 0x9E3779B97F4A7C15ULL
        z = self._state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        return z ^ (z >> 31)

    cdef unsigned long long _draw_gap(self) noexcept:
        cdef double u, gap
        if self._chance >= 1.0:
            return 0
        if self._chance <= 0.0:
            return _GAP_CAP
        u = <double>((self._next64() >> 11) + 1) * (1.0 / 9007199254740992.0)
        gap = log(u) / self._log_miss
        if gap >= 9.223372036854775807e18:
            return _GAP_CAP
        return <unsigned long long>gap

    cdef inline bint _hit(self) noexcept:
        if self._countdown:
            self._countdown -= 1
            return False
        self._countdown = self._draw_gap()
        return True

    def sample(self):
        """Return True with probability ``chance``, independently of earlier calls."""
        return self._hit()


cdef class FrameScanner:
    """FrameScanner(max_frame_size=16384)
--

Takes GOAWAY frames out of an inbound HTTP/2 byte stream.

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

    cdef Py_ssize_t _max_frame_size
    cdef Py_ssize_t _pass
    cdef Py_ssize_t _goaway_left
    cdef bytearray _goaway
    cdef unsigned char _header[9]
    cdef Py_ssize_t _header_len
    cdef object _error

    def __init__(self, max_frame_size=16384):
        self._max_frame_size = _check_int("max_frame_size", max_frame_size, 16384, _MAX_FRAME_SIZE_LIMIT)
        self._pass = 0
        self._goaway_left = 0
        self._goaway = bytearray()
        self._header_len = 0
        self._error = None

    @property
    def max_frame_size(self):
        """Largest frame payload accepted (our SETTINGS_MAX_FRAME_SIZE)."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value):
        self._max_frame_size = _check_int("max_frame_size", value, 16384, _MAX_FRAME_SIZE_LIMIT)

    cdef int _fail(self, Py_ssize_t length) except -1:
        self._error = f"frame length {length} exceeds max_frame_size {self._max_frame_size}"
        raise ValueError(self._error)

    def feed(self, data):
        """Scan one chunk; return ``(bytes_for_h2, goaways)``."""
        if self._error is not None:
            raise ValueError(self._error)
        if not isinstance(data, bytes):
            data = _check_bytes("data", data)
        cdef list found = []
        return self._feed(<bytes>data, found), found

    cdef object _feed(self, bytes chunk, list found):
        # feed() after its checks (GoawayGate calls it directly): the bytes for
        # h2 come back, the decoded GOAWAYs are appended to ``found``.
        cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t run = 0
        cdef Py_ssize_t take
        # The bytes for h2 are written once into ``out``, allocated at the first
        # change and sized for the worst case (a held header plus the chunk),
        # then shrunk in place: no slices, no join.
        cdef bytes out = None
        cdef unsigned char* dst = NULL
        cdef Py_ssize_t olen = 0
        cdef PyObject* raw
        while pos < n:
            if self._pass:
                take = self._pass if self._pass < n - pos else n - pos
                self._pass -= take
                pos += take
                continue
            if self._goaway_left:
                if out is None:
                    out = PyBytes_FromStringAndSize(NULL, n + 9)
                    dst = <unsigned char*>PyBytes_AS_STRING(out)
                take = self._goaway_left if self._goaway_left < n - pos else n - pos
                if take == self._goaway_left and not len(self._goaway):
                    found.append(_decode_at(src + pos, take))  # the whole payload is in this chunk
                else:
                    self._goaway += chunk[pos:pos + take]
                    if take == self._goaway_left:
                        found.append(_decode(bytes(self._goaway)))
                        self._goaway = bytearray()
                self._goaway_left -= take
                pos += take
                run = pos
                continue
            if self._header_len or n - pos < 9:
                # A header split across chunks is held back until it is whole.
                if out is None:
                    out = PyBytes_FromStringAndSize(NULL, n + 9)
                    dst = <unsigned char*>PyBytes_AS_STRING(out)
                memcpy(dst + olen, src + run, pos - run)
                olen += pos - run
                take = 9 - self._header_len
                if take > n - pos:
                    take = n - pos
                memcpy(self._header + self._header_len, src + pos, take)
                self._header_len += take
                pos += take
                run = pos
                if self._header_len < 9:
                    break
                self._header_len = 0
                if not _start_frame(self, self._header):
                    memcpy(dst + olen, self._header, 9)
                    olen += 9
                continue
            if _start_frame(self, src + pos):
                if out is None:
                    out = PyBytes_FromStringAndSize(NULL, n + 9)
                    dst = <unsigned char*>PyBytes_AS_STRING(out)
                memcpy(dst + olen, src + run, pos - run)
                olen += pos - run
                pos += 9
                run = pos
            else:
                pos += 9
        if out is None:
            return chunk
        memcpy(dst + olen, src + run, pos - run)
        olen += pos - run
        # Hand our one reference to _PyBytes_Resize (it needs the only one).
        raw = <PyObject*>out
        Py_INCREF(out)
        out = None
        _PyBytes_Resize(&raw, olen)
        result = <object>raw
        Py_DECREF(result)
        return result


cdef inline bint _start_frame(FrameScanner scanner, const unsigned char* header) except -1:
    # Returns True when the frame is a GOAWAY to take out, False when it passes.
    # A function, not a method: no vtable call per frame, so the C compiler inlines it.
    cdef Py_ssize_t length = (header[0] << 16) | (header[1] << 8) | header[2]
    if length > scanner._max_frame_size:
        scanner._fail(length)
    if header[3] == _TYPE_GOAWAY and (_get32(header + 5) & 0x7FFFFFFF) == 0 and length >= 8:
        scanner._goaway_left = length
        return True
    scanner._pass = length
    return False


cdef extern from *:
    """
    #include "structmember.h"

    /* True when an item of the list is exactly of class ``type`` (no subclass). */
    static inline int goaway_list_has_type(PyObject *list, PyObject *type) {
        Py_ssize_t i, n = PyList_GET_SIZE(list);
        for (i = 0; i < n; i++) {
            if ((PyObject *)Py_TYPE(PyList_GET_ITEM(list, i)) == type) return 1;
        }
        return 0;
    }

    /* Where ``obj`` keeps the attribute that ``descr`` describes, when that is a
       writable object slot (a name in a class's __slots__) of a class ``obj`` is
       an instance of: its byte offset in ``obj``; else -1. Reading the slot there
       is what ``obj.name`` does, without the attribute lookup. A later __class__
       assignment needs the same layout, so the offset stays a slot. */
    static Py_ssize_t goaway_slot_offset(PyObject *descr, PyObject *obj) {
        PyMemberDef *member;
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        if (!PyObject_TypeCheck(obj, ((PyDescrObject *)descr)->d_type)) return -1;
        member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) return -1;
        return member->offset;
    }

    /* The object in that slot (borrowed), NULL when it is unset. */
    static inline PyObject *goaway_slot_value(PyObject *obj, Py_ssize_t offset) {
        return *(PyObject **)((char *)obj + offset);
    }
    """
    bint _list_has_type "goaway_list_has_type"(list items, object type) noexcept
    Py_ssize_t _slot_offset "goaway_slot_offset"(object descr, object obj) noexcept
    PyObject* _slot_value "goaway_slot_value"(object obj, Py_ssize_t offset) noexcept

cdef tuple _NO_GOAWAYS = ()


cdef class GoawayGate:
    """GoawayGate(scanner, reset_type)
--

A client connection's read while no GOAWAY has been seen, in one call; see ``_core_py.GoawayGate``."""

    cdef FrameScanner _scanner
    cdef object _reset_type
    cdef long long _asked
    cdef list _found
    cdef object _connection
    cdef Py_ssize_t _limit_slot
    cdef object _receive
    cdef object _after
    cdef object _fallback

    def __init__(self, scanner, reset_type):
        if type(scanner) is not FrameScanner:
            raise TypeError(f"scanner must be a FrameScanner of this core, got {scanner!r}")
        if not isinstance(reset_type, type):
            raise TypeError(f"reset_type must be a class, got {reset_type!r}")
        self._scanner = <FrameScanner>scanner
        self._reset_type = reset_type
        self._asked = 16384
        self._found = []

    @property
    def asked_frame_size(self):
        """The largest SETTINGS_MAX_FRAME_SIZE we asked the peer for (16384 until we ask for more)."""
        return self._asked

    @asked_frame_size.setter
    def asked_frame_size(self, value):
        self._asked = _check_int("asked_frame_size", value, 16384, _MAX_FRAME_SIZE_LIMIT)

    def attach(self, connection, receive, after, fallback):
        """Give :meth:`receive` the connection, h2's read, the slow half and the full read."""
        for name, value in (("receive", receive), ("after", after), ("fallback", fallback)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        self._connection = connection
        # ClientConnection declares max_inbound_frame_size in __slots__: read it
        # straight from its slot (an attribute lookup would cost ~200 instructions
        # per read); for anything else, look it up.
        self._limit_slot = _slot_offset(getattr(type(connection), "max_inbound_frame_size", None), connection)
        self._receive = receive
        self._after = after
        self._fallback = fallback

    def receive(self, data):
        """Scan ``data``, hand the rest to h2; see ``_core_py.GoawayGate.receive``."""
        cdef FrameScanner scanner = self._scanner
        cdef object limit_value
        cdef PyObject* raw
        cdef long long limit
        cdef int overflow = 0
        cdef bint failed = False
        cdef object for_h2
        cdef object events
        cdef object goaways = None
        if self._connection is None:
            raise RuntimeError("GoawayGate.receive() needs attach() first")
        if type(data) is not bytes or scanner._error is not None:
            return self._fallback(data)
        # The scanner's bound is the larger of h2's acknowledged limit and the
        # one we asked for; when it moved since the last read, the full read
        # sets it (and validates it) as it always did.
        raw = _slot_value(self._connection, self._limit_slot) if self._limit_slot >= 0 else NULL
        if raw != NULL:
            limit_value = <object>raw
        else:  # no slot, or an empty one (then the lookup raises AttributeError)
            limit_value = self._connection.max_inbound_frame_size
        if type(limit_value) is not int:
            return self._fallback(data)
        limit = PyLong_AsLongLongAndOverflow(limit_value, &overflow)
        if overflow:
            return self._fallback(data)
        if limit < self._asked:
            limit = self._asked
        if limit != scanner._max_frame_size:
            return self._fallback(data)
        try:
            for_h2 = scanner._feed(<bytes>data, self._found)
        except ValueError:
            failed = True
        if failed:
            # An oversize frame: the scanner now refuses every read, and the full
            # read turns that into h2's FrameTooLargeError with the same message.
            self._found = []
            return self._fallback(data)
        if self._found:
            goaways = self._found
            self._found = []
        if PyBytes_GET_SIZE(for_h2):
            events = self._receive(for_h2)
            if type(events) is not list:
                raise TypeError(f"receive must return a list, got {events!r}")
        else:
            events = []
        if goaways is not None:
            return self._after(events, goaways)
        if _list_has_type(<list>events, self._reset_type):
            return self._after(events, _NO_GOAWAYS)
        return events


cdef frozenset _path_set(tuple paths):
    cdef set items = set()
    cdef bytes raw
    if not paths:
        raise ValueError("ExemptPaths needs at least one path, got none")
    for path in paths:
        if isinstance(path, str):
            raw = (<str>path).encode("utf-8")
        elif isinstance(path, (bytes, bytearray)):
            raw = bytes(path)
        else:
            raise TypeError(f"each path must be a str or bytes, got {path!r}")
        if not raw.startswith(b"/"):
            raise ValueError(f"each path must start with '/', got {path!r}")
        items.add(raw)
        items.add(raw.decode("latin-1"))  # h2 with a header_encoding hands out str
    return frozenset(items)


cdef inline bint _among(bytes value, tuple items) noexcept:
    # True when ``value`` equals one of ``items`` (all bytes): lengths first, then the bytes.
    cdef Py_ssize_t size = PyBytes_GET_SIZE(value)
    cdef const char* data = PyBytes_AS_STRING(value)
    cdef bytes item
    for item in items:
        if PyBytes_GET_SIZE(item) == size and memcmp(PyBytes_AS_STRING(item), data, size) == 0:
            return True
    return False


cdef class ExemptPaths:
    """ExemptPaths(*paths)
--

A decider that exempts requests for the given paths; see ``_core_py.ExemptPaths``."""

    cdef frozenset _paths
    cdef tuple _given
    cdef tuple _raw

    def __init__(self, *paths):
        self._paths = _path_set(paths)
        self._given = paths
        # The paths as bytes (what h2 hands out without a header_encoding),
        # compared by length and bytes: for the few paths a decider exempts,
        # cheaper than hashing into the set (~150 instructions per request).
        self._raw = tuple(sorted(item for item in self._paths if type(item) is bytes))

    @property
    def paths(self):
        """The exempt paths, as given."""
        return self._given

    def __repr__(self):
        return f"ExemptPaths({', '.join(map(repr, self._given))})"

    cdef object _verdict(self, object headers):
        cdef object item
        cdef object name
        cdef bint plain
        cdef bint match
        for item in headers:
            # h2 hands out hpack's HeaderTuple, a tuple subclass: item[0] on it
            # goes through a generic slot and a method call (~750 instructions
            # per header). Its fields are read directly instead, which is the
            # same thing whenever the class keeps tuple's own indexing.
            plain = _plain_pair(item)
            name = <object>PyTuple_GET_ITEM(item, 0) if plain else item[0]
            if type(name) is bytes:
                match = <bytes>name == b":path"
            elif type(name) is str:
                match = <str>name == ":path"
            else:
                match = name == b":path" or name == ":path"
            if match:
                value = <object>PyTuple_GET_ITEM(item, 1) if plain else item[1]
                if type(value) is bytes:
                    return False if _among(<bytes>value, self._raw) else None
                return False if value in self._paths else None
        return None

    def __call__(self, headers):
        """False (exempt) when the request's ``:path`` is one of the paths, else None."""
        return self._verdict(headers)


cdef class RequestGate:
    """RequestGate(request_type, *, sampler=None, max_requests=None, decider=None, admit=None, reset_type=None, control_limit=None)
--

The per-request work of a serving connection, in one call; see ``_core_py.RequestGate``."""

    cdef object _request_type
    cdef object _reset_type
    cdef long long _resets
    cdef object _decider
    cdef ExemptPaths _exempt
    cdef Sampler _sampler
    cdef object _other_sampler
    cdef object _admit
    cdef long long _left
    cdef bint _limited
    cdef long long _seen
    cdef str _reason
    cdef bint _counting
    cdef long long _control_next
    cdef long long _controls
    cdef long long _given
    cdef long long _skip
    cdef unsigned char _head[9]
    cdef int _have

    def __init__(self, request_type, *, sampler=None, max_requests=None, decider=None, admit=None, reset_type=None,
                 control_limit=None):
        if not isinstance(request_type, type):
            raise TypeError(f"request_type must be a class, got {request_type!r}")
        if reset_type is not None and not isinstance(reset_type, type):
            raise TypeError(f"reset_type must be a class or None, got {reset_type!r}")
        self._reset_type = reset_type
        self._resets = 0
        self._counting = control_limit is not None
        self._control_next = _check_int("control_limit", control_limit, 1, _GAP_CAP) if self._counting else 0
        self._controls = 0
        self._given = 0
        self._skip = _PREFACE_LENGTH
        self._have = 0
        if decider is not None and not callable(decider):
            raise TypeError(f"decider must be callable or None, got {decider!r}")
        if admit is not None and not callable(admit):
            raise TypeError(f"admit must be callable or None, got {admit!r}")
        if sampler is not None and not hasattr(sampler, "sample"):
            raise TypeError(f"sampler must have a sample() method or be None, got {sampler!r}")
        self._request_type = request_type
        self._decider = decider
        self._exempt = decider if type(decider) is ExemptPaths else None
        self._sampler = sampler if type(sampler) is Sampler else None
        self._other_sampler = sampler if self._sampler is None else None
        self._admit = admit
        self._limited = max_requests is not None
        self._left = _check_int("max_requests", max_requests, 1, 0x7FFFFFFFFFFFFFFF) if self._limited else 0
        self._seen = 0
        self._reason = ""

    @property
    def seen(self):
        """Requests counted so far (those a drain refused are never counted)."""
        return self._seen

    @seen.setter
    def seen(self, value):
        self._seen = _check_int("seen", value, 0, 0x7FFFFFFFFFFFFFFF)

    @property
    def reason(self):
        """Why the last :meth:`scan` that returned non-zero starts a drain; "" before."""
        return self._reason

    @property
    def resets(self):
        """Events of ``reset_type`` counted so far (stream resets by the peer: the rapid-reset limit)."""
        return self._resets

    @property
    def controls(self):
        """Frames counted by :meth:`count` so far (frames that ask no work of the application)."""
        return self._controls

    @property
    def window_given(self):
        """Sum of the connection-level WINDOW_UPDATE increments counted so far (whole frames in one read)."""
        return self._given

    @property
    def control_next(self):
        """The :attr:`controls` count at which :meth:`count` returns True; None: nothing is counted."""
        return self._control_next if self._counting else None

    @control_next.setter
    def control_next(self, value):
        if not self._counting:
            raise RuntimeError("control_next needs a gate made with control_limit")
        self._control_next = _check_int("control_next", value, 1, _GAP_CAP)

    def count(self, data):
        """Count the frames in ``data`` that ask no work; True once due. See ``_core_py.RequestGate.count``."""
        if not self._counting:
            return False
        return self._count(_check_bytes("data", data))

    cdef inline void _frame(self, const unsigned char* header, const unsigned char* payload, Py_ssize_t avail,
                            long long* length) noexcept:
        """Count one frame; ``avail`` payload bytes are readable at ``payload``; its length into ``length``."""
        cdef long long size = (header[0] << 16) | (header[1] << 8) | header[2]
        cdef unsigned char ftype = header[3]
        cdef unsigned char flags = header[4]
        length[0] = size
        if ftype == 0x00:  # DATA: counted when it carries no data and does not end the stream
            if not flags & _FLAG_END_STREAM and (
                    size == 0 or (flags & _FLAG_PADDED and avail > 0 and payload[0] + 1 == size)):
                self._controls += 1
        elif ftype != 0x01 and ftype != 0x05 and ftype != 0x09:  # not HEADERS, PUSH_PROMISE, CONTINUATION
            self._controls += 1
            if (ftype == _TYPE_WINDOW_UPDATE and (_get32(header + 5) & 0x7FFFFFFF) == 0 and size == 4
                    and avail >= 4):
                self._given += _get32(payload) & 0x7FFFFFFF

    cdef bint _count(self, bytes chunk) noexcept:
        cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
        cdef long long pos = self._skip
        cdef long long length = 0
        cdef Py_ssize_t take
        if pos >= n:
            self._skip = pos - n
            return self._controls >= self._control_next
        if self._have:
            take = 9 - self._have
            if take > n - pos:
                take = n - pos
            memcpy(self._head + self._have, src + pos, take)
            self._have += take
            pos += take
            if self._have < 9:
                self._skip = 0
                return self._controls >= self._control_next
            self._have = 0
            self._frame(self._head, src + pos, n - pos, &length)
            pos += length
        while n - pos >= 9:
            self._frame(src + pos, src + pos + 9, n - pos - 9, &length)
            pos += 9 + length
        if pos >= n:
            self._skip = pos - n
        else:
            self._skip = 0
            self._have = n - pos
            memcpy(self._head, src + pos, self._have)
        return self._controls >= self._control_next

    cdef bint _trigger(self, object event) except -1:
        cdef object verdict
        if self._decider is not None:
            if self._exempt is not None:
                verdict = self._exempt._verdict(event.headers or ())
            else:
                verdict = self._decider(event.headers or [])
            if verdict is not None:
                if verdict:
                    self._reason = "decider"
                    return True
                return False
        if self._limited:
            self._left -= 1
            if self._left <= 0:
                self._reason = "max_requests"
                return True
        if self._sampler is not None:
            if not self._sampler._hit():
                return False
        elif self._other_sampler is None or not self._other_sampler.sample():
            return False
        if self._admit is None or self._admit():
            self._reason = "chance"
            return True
        return False

    def scan(self, list events):
        """Count the requests in ``events``; return the 1-based index of the one that starts a drain.

        Else 0, or -1 when ``events`` held a ``reset_type`` event.
        """
        return self._scan(events)

    cdef Py_ssize_t _scan(self, list events) except -2:
        cdef Py_ssize_t index
        cdef Py_ssize_t n = len(events)
        cdef object request_type = self._request_type
        cdef object reset_type = self._reset_type
        cdef object event
        cdef bint reset = False
        for index in range(n):
            event = events[index]
            if type(event) is request_type:
                self._seen += 1
                if self._trigger(event):
                    return index + 1
            elif type(event) is reset_type:
                self._resets += 1
                reset = True
        return -1 if reset else 0


cdef extern from *:
    """
    /* The offset of a writable object slot that ``descr`` (a __slots__ member) describes; else -1. */
    static Py_ssize_t goaway_member_offset(PyObject *descr) {
        PyMemberDef *member;
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) return -1;
        return member->offset;
    }

    /* The class that declares the slot ``descr`` describes (borrowed). */
    static inline PyObject *goaway_member_owner(PyObject *descr) {
        return (PyObject *)((PyDescrObject *)descr)->d_type;
    }

    /* What ``obj`` holds in the slot at ``offset`` of class ``owner`` (borrowed);
       NULL when ``obj`` is no instance of ``owner`` or the slot is unset. */
    static inline PyObject *goaway_slot_get(PyObject *obj, PyObject *owner, Py_ssize_t offset) {
        if (!PyObject_TypeCheck(obj, (PyTypeObject *)owner)) return NULL;
        return *(PyObject **)((char *)obj + offset);
    }
    """
    Py_ssize_t _member_offset "goaway_member_offset"(object descr) noexcept
    PyObject* _member_owner "goaway_member_owner"(object descr) noexcept
    PyObject* _slot_get "goaway_slot_get"(object obj, object owner, Py_ssize_t offset) noexcept


def serving_methods(state_slot, serving, gate_slot, receive, after, send, slow_receive, slow_send):
    """Return ``(receive_data, data_to_send)`` for a connection class; see ``_core_py.serving_methods``."""
    cdef Py_ssize_t state_at
    cdef Py_ssize_t gate_at
    for name, value in (("receive", receive), ("after", after), ("send", send), ("slow_receive", slow_receive),
                        ("slow_send", slow_send)):
        if not callable(value):
            raise TypeError(f"{name} must be callable, got {value!r}")
    state_at = _member_offset(state_slot)
    if state_at < 0:
        raise TypeError(f"state_slot must be a __slots__ member of a class, got {state_slot!r}")
    gate_at = _member_offset(gate_slot)
    if gate_at < 0:
        raise TypeError(f"gate_slot must be a __slots__ member of a class, got {gate_slot!r}")
    state_owner = <object>_member_owner(state_slot)
    gate_owner = <object>_member_owner(gate_slot)

    def receive_data(self, data):
        cdef PyObject* raw
        cdef RequestGate gate
        cdef Py_ssize_t index
        cdef object events
        cdef bint due = False
        if _slot_get(self, state_owner, state_at) != <PyObject*>serving:
            return slow_receive(self, data)
        raw = _slot_get(self, gate_owner, gate_at)
        if raw == NULL or (<object>raw).__class__ is not RequestGate:
            return slow_receive(self, data)
        gate = <RequestGate>raw
        if gate._counting:
            due = gate._count(<bytes>data if type(data) is bytes else _check_bytes("data", data))
        events = receive(self, data)
        if type(events) is not list:
            raise TypeError(f"receive must return a list, got {events!r}")
        index = gate._scan(<list>events)
        if index == 0:
            if not due:
                return events
            index = -1
        return after(self, events, index)

    def data_to_send(self, amount=None):
        if _slot_get(self, state_owner, state_at) == <PyObject*>serving:
            return send(self, amount)
        return slow_send(self, amount)

    return receive_data, data_to_send


# -- load generator: whole frames out of a byte stream ----------------------------------------

cdef bytes _NO_PAYLOAD = b""


def split_frames(data, max_frame_size=16384):
    """Cut the whole frames at the front of ``data``; return ``(frames, used)``."""
    if not isinstance(data, bytes):
        data = _check_bytes("data", data)
    cdef long long limit = max_frame_size
    cdef bytes chunk = <bytes>data
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(chunk)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t length
    cdef Py_ssize_t end
    cdef unsigned char ftype
    cdef list frames = []
    cdef object payload
    while n - pos >= 9:
        length = (src[pos] << 16) | (src[pos + 1] << 8) | src[pos + 2]
        if length > limit:
            raise ValueError(f"frame length {length} exceeds max_frame_size {max_frame_size}")
        end = pos + 9 + length
        if end > n:
            break
        ftype = src[pos + 3]
        if ftype == 0:
            payload = _NO_PAYLOAD
        else:
            payload = PyBytes_FromStringAndSize(<const char*>src + pos + 9, length)
        frames.append((ftype, src[pos + 4], _get32(src + pos + 5) & 0x7FFFFFFF, length, payload))
        pos = end
    return frames, pos
