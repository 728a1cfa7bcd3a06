"""Fuzzing the core with arbitrary bytes and split points.

``make test`` runs a bounded number of examples; ``make fuzz`` sets
``GOAWAY_EXT_FUZZ_EXAMPLES`` much higher. Under ``make asan`` the same tests run
on a compiled core built with AddressSanitizer (and ``PYTHONMALLOC=malloc``, so
every bytes object is a malloc block ASan can guard), which turns any read or
write out of bounds in the Cython code into a crash.

The only exception a scanner may raise is the documented ValueError for a frame
length above its limit; ``decode_goaway`` raises ValueError only below 8 bytes.
"""

from __future__ import annotations

import os
from types import ModuleType

from chunking import split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("GOAWAY_EXT_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 4096), max_size=40),
       limit=st.sampled_from([16384, 16385, 0xFFFFFF]))
def test_scanner_survives_garbage(core: ModuleType, data: bytes, cuts: list[int], limit: int) -> None:
    scanner = core.FrameScanner(limit)
    out: list[bytes] = []
    try:
        for piece in split(data, cuts):
            passed, found = scanner.feed(piece)
            out.append(passed)
            for last, code, debug in found:
                assert 0 <= last < 2**31 and 0 <= code < 2**32 and isinstance(debug, bytes)
    except ValueError as exc:
        assert "exceeds max_frame_size" in str(exc)
        return
    # Nothing appears from nowhere: what reaches h2 is a subsequence of the input
    # (the scanner only removes GOAWAY frames; it never adds, changes or reorders a byte).
    assert _is_subsequence(b"".join(out), data)


def _is_subsequence(small: bytes, big: bytes) -> bool:
    rest = iter(big)
    return all(byte in rest for byte in small)  # ``in`` consumes the iterator up to the match


def _decode_goaway_here(payload: bytes) -> tuple[int, int, bytes]:
    """RFC 9113 §6.8, written out independently of the core under test."""
    return int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big"), payload[8:]


def test_subsequence_check_can_fail() -> None:
    assert _is_subsequence(b"ace", b"abcde") and _is_subsequence(b"", b"x")
    assert not _is_subsequence(b"ca", b"abc") and not _is_subsequence(b"aa", b"a")


@fuzz
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 3),
                                 st.binary(max_size=64)), max_size=30),
       cuts=st.lists(st.integers(0, 4096), max_size=60))
def test_scanner_on_well_framed_garbage(core: ModuleType, frames: list[tuple[int, int, int, bytes]],
                                        cuts: list[int]) -> None:
    # Valid frame boundaries with random types, flags, stream ids and payloads:
    # the scanner must take out exactly the GOAWAYs on stream 0 of 8+ bytes.
    wire, kept, expected = [], [], []
    for ftype, flags, stream, payload in frames:
        ftype = 7 if ftype < 64 else ftype  # make GOAWAY common
        frame = len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload
        wire.append(frame)
        if ftype == 7 and stream == 0 and len(payload) >= 8:
            expected.append(_decode_goaway_here(payload))
        else:
            kept.append(frame)
    data = b"".join(wire)
    scanner = core.FrameScanner()
    out, found = [], []
    for piece in split(data, cuts):
        passed, goaways = scanner.feed(piece)
        out.append(passed)
        found.extend(goaways)
    assert b"".join(out) == b"".join(kept)
    assert found == expected


@fuzz
@given(payload=st.binary(max_size=512))
def test_decode_goaway_any_bytes(core: ModuleType, payload: bytes) -> None:
    try:
        last, code, debug = core.decode_goaway(payload)
    except ValueError:
        assert len(payload) < 8
        return
    assert debug == payload[8:]
    assert last == int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
    assert code == int.from_bytes(payload[4:8], "big")


@fuzz
@given(last=st.integers(-(2**70), 2**70), code=st.integers(-(2**70), 2**70), debug=st.binary(max_size=64))
def test_encoders_any_ints(core: ModuleType, last: int, code: int, debug: bytes) -> None:
    try:
        frame = core.encode_goaway(last, code, debug)
    except ValueError as exc:
        assert not (0 <= last < 2**31 and 0 <= code < 2**32)
        assert "last_stream_id" in str(exc) or "error_code" in str(exc)
    else:
        assert len(frame) == 17 + len(debug)
    try:
        frame = core.encode_rst_stream(last, code)
    except ValueError:
        assert not (0 < last < 2**31 and 0 <= code < 2**32)
    else:
        assert len(frame) == 13
