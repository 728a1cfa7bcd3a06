"""Frame encoders equal hyperframe's serialisation byte for byte; bad input is named."""

from __future__ import annotations

from types import ModuleType

import pytest
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame
from hypothesis import example, given
from hypothesis import strategies as st

MAX_STREAM = 2**31 - 1
MAX_CODE = 2**32 - 1
streams = st.integers(0, MAX_STREAM)
codes = st.integers(0, MAX_CODE)
debug = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"x" * 16376]))


@given(last=streams, code=codes, data=debug)
@example(last=0, code=0, data=b"")
@example(last=MAX_STREAM, code=MAX_CODE, data=b"x" * 16376)
def test_goaway_matches_hyperframe(core: ModuleType, last: int, code: int, data: bytes) -> None:
    expected = GoAwayFrame(0, last_stream_id=last, error_code=code, additional_data=data).serialize()
    assert core.encode_goaway(last, code, data) == expected


@given(last=streams, code=codes, data=debug)
def test_goaway_round_trips(core: ModuleType, last: int, code: int, data: bytes) -> None:
    frame = core.encode_goaway(last, code, data)
    assert core.decode_goaway(frame[9:]) == (last, code, data)
    parsed, _length = Frame.parse_frame_header(memoryview(frame[:9]))
    parsed.parse_body(memoryview(frame[9:]))
    assert (parsed.last_stream_id, parsed.error_code, parsed.additional_data) == (last, code, data)


@given(opaque=st.binary(min_size=8, max_size=8), ack=st.booleans())
def test_ping_matches_hyperframe(core: ModuleType, opaque: bytes, ack: bool) -> None:
    expected = PingFrame(0, opaque_data=opaque, flags=["ACK"] if ack else []).serialize()
    assert core.encode_ping(opaque, ack) == expected


@given(stream=st.integers(1, MAX_STREAM), code=codes)
@example(stream=1, code=0)
@example(stream=MAX_STREAM, code=MAX_CODE)
def test_rst_stream_matches_hyperframe(core: ModuleType, stream: int, code: int) -> None:
    assert core.encode_rst_stream(stream, code) == RstStreamFrame(stream, error_code=code).serialize()


def test_decode_ignores_reserved_bit(core: ModuleType) -> None:
    payload = bytes([0x80, 0, 0, 5, 0, 0, 0, 2]) + b"why"
    assert core.decode_goaway(payload) == (5, 2, b"why")
    assert core.decode_goaway(bytearray(payload)) == (5, 2, b"why")
    assert core.decode_goaway(memoryview(payload)) == (5, 2, b"why")


def test_bytes_like_inputs_accepted(core: ModuleType) -> None:
    assert core.encode_goaway(1, 0, bytearray(b"ab")) == core.encode_goaway(1, 0, memoryview(b"ab"))
    assert core.encode_ping(bytearray(8)) == core.encode_ping(b"\0" * 8)


BAD_CALLS = [
    ("encode_goaway", (-1,), ValueError, "last_stream_id", '-1'),
    ("encode_goaway", (2**31,), ValueError, "last_stream_id", '2147483648'),
    ("encode_goaway", (10**40,), ValueError, "last_stream_id", '10000000000000000000000000000000000000000'),
    ("encode_goaway", (1.0,), TypeError, "last_stream_id", '1.0'),
    ("encode_goaway", (True,), TypeError, "last_stream_id", 'True'),
    ("encode_goaway", ("1",), TypeError, "last_stream_id", "'1'"),
    ("encode_goaway", (1, -1), ValueError, "error_code", '-1'),
    ("encode_goaway", (1, 2**32), ValueError, "error_code", '4294967296'),
    ("encode_goaway", (1, None), TypeError, "error_code", 'None'),
    ("encode_goaway", (1, 0, "text"), TypeError, "debug_data", "'text'"),
    ("encode_goaway", (1, 0, None), TypeError, "debug_data", 'None'),
    ("encode_goaway", (1, 0, b"x" * 16377), ValueError, "debug_data", '16377'),
    ("encode_ping", (b"1234567",), ValueError, "opaque", '7 bytes'),
    ("encode_ping", (b"123456789",), ValueError, "opaque", '9 bytes'),
    ("encode_ping", ("12345678",), TypeError, "opaque", "'12345678'"),
    ("encode_ping", (b"12345678", 1), TypeError, "ack", '1'),
    ("encode_rst_stream", (0, 0), ValueError, "stream_id", 'got 0'),
    ("encode_rst_stream", (2**31, 0), ValueError, "stream_id", '2147483648'),
    ("encode_rst_stream", (1, 2**32), ValueError, "error_code", '4294967296'),
    ("encode_rst_stream", (1, False), TypeError, "error_code", 'False'),
    ("decode_goaway", (b"1234567",), ValueError, "payload", '7 bytes'),
    ("decode_goaway", ("12345678",), TypeError, "payload", "'12345678'"),
]


@pytest.mark.parametrize(("name", "args", "error", "word", "shown"), BAD_CALLS)
def test_bad_input_is_named(
    core: ModuleType, name: str, args: tuple[object, ...], error: type, word: str, shown: str
) -> None:
    with pytest.raises(error) as info:
        getattr(core, name)(*args)
    assert word in str(info.value)
    assert shown in str(info.value)


@pytest.mark.parametrize(("name", "args", "error", "word", "shown"), BAD_CALLS)
def test_both_cores_fail_alike(
    both_cores: tuple[ModuleType, ModuleType], name: str, args: tuple[object, ...], error: type, word: str, shown: str
) -> None:
    messages = []
    for core in both_cores:
        with pytest.raises(error) as info:
            getattr(core, name)(*args)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_constants_agree(both_cores: tuple[ModuleType, ModuleType]) -> None:
    c, p = both_cores
    for name in ("MAX_STREAM_ID", "MAX_ERROR_CODE", "DEFAULT_MAX_FRAME_SIZE", "MAX_DEBUG_DATA"):
        assert getattr(c, name) == getattr(p, name)
