"""Property tests for ``FrameScanner``: GOAWAYs out, everything else through, any split.

Random frame sequences (GOAWAYs, malformed GOAWAYs that must pass through, and
other frame types) are cut at random points, down to one byte at a time. The
bytes handed on must equal the input minus the GOAWAY frames, the GOAWAYs
found must be exactly those sent, and both cores must give the same answer for
every chunk.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from chunking import split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("GOAWAY_EXT_SCANNER_EXAMPLES", "150"))
prop = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Frame = tuple[int, int, int, bytes]  # type, flags, stream id (with R bit), payload


def encode(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def is_goaway(frame: Frame) -> bool:
    ftype, _flags, stream, payload = frame
    return ftype == 7 and stream & 0x7FFFFFFF == 0 and len(payload) >= 8


goaways = st.builds(
    lambda last, code, debug, r_bit: (7, 0, r_bit << 31, (last | r_bit << 31).to_bytes(4, "big")
                                      + code.to_bytes(4, "big") + debug),
    st.integers(0, 2**31 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=40), st.integers(0, 1),
)
malformed_goaways = st.one_of(
    st.tuples(st.just(7), st.integers(0, 255), st.integers(1, 2**32 - 1), st.binary(min_size=8, max_size=20)),
    st.tuples(st.just(7), st.integers(0, 255), st.just(0), st.binary(max_size=7)),
)
others = st.tuples(
    st.integers(0, 255).filter(lambda t: t != 7), st.integers(0, 255), st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
)
frame_lists = st.lists(st.one_of(goaways, malformed_goaways, others), max_size=25)


def expected(frames: list[Frame]) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    out = b"".join(encode(*f) for f in frames if not is_goaway(f))
    found = [
        (int.from_bytes(p[:4], "big") & 0x7FFFFFFF, int.from_bytes(p[4:8], "big"), p[8:])
        for (_t, _f, _s, p) in frames
        if is_goaway((_t, _f, _s, p))
    ]
    return out, found


def scan(core: ModuleType, chunks: list[bytes]) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    scanner = core.FrameScanner()
    outs: list[bytes] = []
    found: list[tuple[int, int, bytes]] = []
    for chunk in chunks:
        out, got = scanner.feed(chunk)
        assert type(out) is bytes
        outs.append(out)
        found.extend(got)
    return outs, found


@prop
@given(frames=frame_lists, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_random_splits_remove_exactly_the_goaways(core: ModuleType, frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode(*f) for f in frames)
    outs, found = scan(core, split(wire, cuts))
    assert (b"".join(outs), found) == expected(frames)


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None)
@given(frames=frame_lists)
def test_byte_by_byte(core: ModuleType, frames: list[Frame]) -> None:
    wire = b"".join(encode(*f) for f in frames)
    outs, found = scan(core, [wire[i : i + 1] for i in range(len(wire))])
    assert (b"".join(outs), found) == expected(frames)


@prop
@given(frames=frame_lists, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_both_cores_agree_chunk_by_chunk(
    both_cores: tuple[ModuleType, ModuleType], frames: list[Frame], cuts: list[int]
) -> None:
    chunks = split(b"".join(encode(*f) for f in frames), cuts)
    compiled, pure = both_cores
    assert scan(compiled, chunks) == scan(pure, chunks)


@prop
@given(data=st.binary(max_size=1500), cuts=st.lists(st.integers(0, 3000), max_size=20))
def test_garbage_only_raises_value_error_and_stays_failed(
    both_cores: tuple[ModuleType, ModuleType], data: bytes, cuts: list[int]
) -> None:
    results = []
    for core in both_cores:
        scanner = core.FrameScanner()
        outcome: list[object] = []
        for chunk in split(data, cuts):
            try:
                outcome.append(scanner.feed(chunk))
            except ValueError as exc:
                outcome.append(str(exc))
                with pytest.raises(ValueError):
                    scanner.feed(b"\x00" * 9)
                break
        results.append(outcome)
    assert results[0] == results[1]


@prop
@given(frames=st.lists(others, max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_no_goaway_means_no_copy(core: ModuleType, frames: list[Frame], cuts: list[int]) -> None:
    # Cut only at frame boundaries or inside payloads: nothing is held back.
    wire = b"".join(encode(*f) for f in frames)
    safe = set()
    pos = 0
    for frame in frames:
        safe.update(range(pos + 9, pos + 9 + len(frame[3]) + 1))
        safe.add(pos)
        pos += 9 + len(frame[3])
    safe.add(pos)
    ordered = sorted(safe)
    chunks = split(wire, [ordered[c % len(ordered)] for c in cuts])
    scanner = core.FrameScanner()
    for chunk in chunks:
        out, found = scanner.feed(chunk)
        assert out is chunk and found == []


def test_oversize_length_is_reported_not_trusted(core: ModuleType) -> None:
    scanner = core.FrameScanner()
    with pytest.raises(ValueError, match="16385"):
        scanner.feed((16385).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
    with pytest.raises(ValueError):
        scanner.feed(b"")


def test_max_frame_size_setter(core: ModuleType) -> None:
    scanner = core.FrameScanner()
    assert scanner.max_frame_size == 16384
    for bad in (16383, 0, 2**24, -1):
        with pytest.raises(ValueError):
            scanner.max_frame_size = bad
    for bad_type in (True, "16384", 16384.0, None):
        with pytest.raises(TypeError):
            scanner.max_frame_size = bad_type
    assert scanner.max_frame_size == 16384
    scanner.max_frame_size = 2**24 - 1
    big = encode(7, 0, 0, b"\x00\x00\x00\x05\x00\x00\x00\x00" + b"d" * 20000)
    assert scanner.feed(big) == (b"", [(5, 0, b"d" * 20000)])
    scanner.max_frame_size = 16384
    with pytest.raises(ValueError):
        scanner.feed(big)
    with pytest.raises(ValueError):
        core.FrameScanner(16383)


def test_bytes_like_input(core: ModuleType) -> None:
    frame = encode(7, 0, 0, b"\x00\x00\x00\x01\x00\x00\x00\x00")
    data = encode(0, 1, 1, b"hi")
    for kind in (bytearray, memoryview):
        scanner = core.FrameScanner()
        assert scanner.feed(kind(data + frame)) == (data, [(1, 0, b"")])
    with pytest.raises(TypeError):
        core.FrameScanner().feed("text")
