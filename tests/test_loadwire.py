"""The load generator's fast wire (``goaway_ext._loadwire``) against a real ``h2`` server, in memory.

Every test drives :class:`LoadWire` with the bytes a real ``h2.H2Connection``
server writes (or frames ``hyperframe`` serialises), so the wire is checked
against the protocol as ``h2`` speaks it, not against our own idea of it.
``split_frames`` is checked on both cores.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from goaway_ext._loadwire import (
    ENDED,
    GOAWAY,
    MAX_HEADER_BLOCK,
    REFUSED,
    RESET,
    TERMINATED,
    LoadWire,
    ResponseStatus,
    WireError,
    _indexed_only,
    encode_request_block,
    encode_request_blocks,
)

FIELDS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"), (b":path", b"/")]


def server_for(wire: LoadWire) -> tuple[h2.connection.H2Connection, list[Any]]:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    events = server.receive_data(wire.data_to_send())
    return server, events


def to_server(wire: LoadWire, server: h2.connection.H2Connection) -> list[Any]:
    return list(server.receive_data(wire.data_to_send()))


def answer(server: h2.connection.H2Connection, stream_id: int, status: bytes, body: bytes = b"",
           extra: list[tuple[bytes, bytes]] | None = None) -> None:
    server.send_headers(stream_id, [(b":status", status), *(extra or [])], end_stream=not body)
    if body:
        server.send_data(stream_id, body, end_stream=True)


def test_request_block_is_plain_hpack_and_leaves_the_table_alone() -> None:
    fields = [*FIELDS, (b"x-custom", b"v" * 300), (b"user-agent", b"goaway_ext")]
    block = encode_request_block(fields)
    assert block[0] == 0x20  # dynamic table size update to 0
    decoder = hpack.Decoder()
    for _ in range(3):  # the same bytes decode the same way every time: nothing entered the table
        assert [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)] == fields
    assert len(decoder.header_table.dynamic_entries) == 0
    assert encode_request_block(FIELDS) == b"\x20\x82\x86\x01\x0e127.0.0.1:8080\x84"
    with pytest.raises(TypeError, match="must be bytes"):
        encode_request_block([(":path", "/")])  # type: ignore[list-item]


def test_request_blocks_index_what_the_static_table_lacks() -> None:
    fields = [*FIELDS, (b"x-custom", b"v" * 300)]
    first, steady, size = encode_request_blocks(fields)
    assert size == (10 + 14 + 32) + (8 + 300 + 32)
    assert first.startswith(b"\x3f") and _indexed_only(steady)  # size update, then the steady block: indexes only
    assert steady == b"\x82\x86\xbf\x84\xbe"  # :authority was inserted first (63), x-custom last (62)
    decoder = hpack.Decoder()
    for block in (first, steady, steady, steady):
        assert [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)] == fields
    assert len(decoder.header_table.dynamic_entries) == 2
    big = [*FIELDS, (b"x-big", b"b" * 5000)]
    assert encode_request_blocks(big) == (encode_request_block(big), encode_request_block(big), 0)


@pytest.mark.parametrize("table_size", [4096, 56, 55, 0])
def test_a_smaller_server_table_switches_to_literals(table_size: int) -> None:
    # :authority 127.0.0.1:8080 takes 56 bytes of the table: a table of 56 or more keeps it.
    wire = LoadWire(FIELDS)
    server, _ = server_for(wire)
    wire.receive(server.data_to_send())
    seen = []
    for round_ in range(4):
        if round_ == 2:
            server.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
            wire.receive(server.data_to_send())
        ids = [wire.send_request() for _ in range(3)]
        out = wire.data_to_send()
        seen.extend(e.headers for e in server.receive_data(out) if isinstance(e, h2.events.RequestReceived))
        for stream_id in ids:
            answer(server, stream_id, b"200")
        assert [e[2] for e in wire.receive(server.data_to_send())] == [b"200"] * 3
    assert seen == [FIELDS] * 12
    assert (wire._block == encode_request_block(FIELDS)) == (table_size < 56)


def test_h2_server_reads_every_request() -> None:
    wire = LoadWire(FIELDS)
    server, events = server_for(wire)
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    ids = [wire.send_request() for _ in range(5)]
    assert ids == [1, 3, 5, 7, 9]
    received = [e for e in to_server(wire, server) if isinstance(e, h2.events.RequestReceived)]
    assert [e.stream_id for e in received] == ids
    assert all(e.headers == FIELDS and e.stream_ended for e in received)


def test_statuses_survive_a_changing_table() -> None:
    # The server's encoder inserts x-n values into its table, so the same
    # indexed bytes mean different fields over time: the cache must follow.
    wire = LoadWire(FIELDS)
    server, _ = server_for(wire)
    wire.receive(server.data_to_send())
    plan = [(b"200", b"1"), (b"200", b"1"), (b"404", b"1"), (b"404", b"2"), (b"200", b"2"), (b"503", b"3"),
            (b"200", b"1"), (b"404", b"2"), (b"200", b"3")]
    got = []
    for status, n in plan:
        stream_id = wire.send_request()
        to_server(wire, server)
        answer(server, stream_id, status, b"body" if status == b"200" else b"", [(b"x-n", n)])
        got.extend(wire.receive(server.data_to_send()))
    assert got == [(ENDED, 1 + 2 * i, status) for i, (status, _) in enumerate(plan)]
    assert wire.streams == {}


def test_flow_control_lets_a_large_response_through() -> None:
    wire = LoadWire(FIELDS, window=65535)
    server, _ = server_for(wire)
    body = bytes(range(256)) * 1024  # 256 KiB: four times the window
    stream_id = wire.send_request()
    to_server(wire, server)
    server.send_headers(stream_id, [(b":status", b"200")])
    sent, events = 0, []
    for _ in range(1000):
        while sent < len(body):
            size = min(server.local_flow_control_window(stream_id), server.max_outbound_frame_size, len(body) - sent)
            if size <= 0:
                break
            server.send_data(stream_id, body[sent:sent + size], end_stream=sent + size == len(body))
            sent += size
        events.extend(wire.receive(server.data_to_send()))
        if events:
            break
        to_server(wire, server)  # our WINDOW_UPDATEs open the windows again
    assert events == [(ENDED, stream_id, b"200")]
    assert sent == len(body)


def test_settings_and_ping_are_acknowledged() -> None:
    wire = LoadWire(FIELDS)
    server, _ = server_for(wire)
    wire.receive(server.data_to_send())
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in to_server(wire, server))
    server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 3, SettingCodes.HEADER_TABLE_SIZE: 0})
    server.ping(b"12345678")
    assert wire.receive(server.data_to_send()) == []
    assert wire.max_concurrent_streams == 3
    events = to_server(wire, server)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    assert [e.ping_data for e in events if isinstance(e, h2.events.PingAckReceived)] == [b"12345678"]
    stream_id = wire.send_request()  # a table size of 0 changes nothing for our blocks
    assert [e.headers for e in to_server(wire, server) if isinstance(e, h2.events.RequestReceived)] == [FIELDS]
    answer(server, stream_id, b"200", b"x")
    assert wire.receive(server.data_to_send()) == [(ENDED, stream_id, b"200")]


def opened(count: int) -> tuple[LoadWire, h2.connection.H2Connection]:
    wire = LoadWire(FIELDS)
    server, _ = server_for(wire)
    wire.receive(server.data_to_send())
    for _ in range(count):
        wire.send_request()
    to_server(wire, server)
    return wire, server


def test_graceful_goaway_refuses_streams_above_it_and_lets_the_rest_finish() -> None:
    wire, server = opened(3)
    events = wire.receive(GoAwayFrame(0, last_stream_id=3, error_code=0).serialize())
    assert events == [(GOAWAY, 3, 0), (REFUSED, 5, 0)]
    assert not wire.can_open and wire.goaway_last_stream_id == 3
    resets = [e for e in to_server(wire, server) if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(5, h2.errors.ErrorCodes.CANCEL)]
    answer(server, 1, b"200", b"a")
    answer(server, 3, b"200")
    assert wire.receive(server.data_to_send()) == [(ENDED, 1, b"200"), (ENDED, 3, b"200")]
    assert wire.receive(GoAwayFrame(0, last_stream_id=1).serialize()) == [(GOAWAY, 1, 0)]
    with pytest.raises(WireError, match="raised the last stream id from 1 to 3"):
        wire.receive(GoAwayFrame(0, last_stream_id=3).serialize())


def test_goaway_with_an_error_ends_the_connection() -> None:
    wire, _ = opened(3)
    events = wire.receive(GoAwayFrame(0, last_stream_id=1, error_code=2, additional_data=b"bye").serialize())
    assert events == [(REFUSED, 3, 0), (REFUSED, 5, 0), (TERMINATED, 2, b"bye")]
    assert wire.terminated and not wire.can_open


def test_rst_stream_refused_and_other_codes() -> None:
    wire, server = opened(2)
    server.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
    server.reset_stream(3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    assert wire.receive(server.data_to_send()) == [(REFUSED, 1, 7), (RESET, 3, 2)]
    assert wire.streams == {}


def test_padding_priority_continuation_and_trailers() -> None:
    wire, _ = opened(2)
    encoder = hpack.Encoder()
    informational = HeadersFrame(1, data=encoder.encode([(b":status", b"103")]), flags=["END_HEADERS"])
    final = HeadersFrame(1, data=encoder.encode([(b":status", b"201"), (b"x-a", b"b")]),
                         flags=["END_HEADERS", "PADDED", "PRIORITY"], pad_length=7, depends_on=0, stream_weight=16)
    data = DataFrame(1, data=b"xyz", flags=["PADDED"], pad_length=3)
    block = encoder.encode([(b"x-trailer", b"t" * 100)])
    trailers = HeadersFrame(1, data=block[:10], flags=["END_STREAM"])
    rest = ContinuationFrame(1, data=block[10:], flags=["END_HEADERS"])
    wire_bytes = b"".join(f.serialize() for f in (informational, final, data, trailers, rest))
    events = []
    for i in range(len(wire_bytes)):  # one byte per read: frames split anywhere
        events.extend(wire.receive(wire_bytes[i:i + 1]))
    assert events == [(ENDED, 1, b"201")]
    # The decoder saw every block: the next response decodes against the same table.
    second = HeadersFrame(3, data=encoder.encode([(b":status", b"201"), (b"x-a", b"b")]),
                          flags=["END_HEADERS", "END_STREAM"])
    assert wire.receive(second.serialize()) == [(ENDED, 3, b"201")]


def test_protocol_errors_queue_a_goaway() -> None:
    cases: list[tuple[bytes, str]] = [
        (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + bytes(16385), "frame length 16385 exceeds"),
        (HeadersFrame(1, data=b"\x88").serialize() + PingFrame(0, opaque_data=bytes(8)).serialize(),
         "inside a header block"),
        (ContinuationFrame(1, data=b"\x88", flags=["END_HEADERS"]).serialize(), "outside its header block"),
        (HeadersFrame(1, data=b"\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize(), "cannot decode"),
        (b"\x00\x00\x04\x05\x04\x00\x00\x00\x01\x00\x00\x00\x02", "PUSH_PROMISE"),
        (b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc", "PING of 3 bytes"),
    ]
    for data, message in cases:
        wire, _ = opened(1)
        with pytest.raises(WireError, match=message):
            wire.receive(data)
        out = wire.data_to_send()
        assert out[3] == 0x07 and wire.terminated, message  # a GOAWAY went out


def test_header_block_is_bounded() -> None:
    wire, _ = opened(1)
    wire.receive(HeadersFrame(1, data=b"\x88").serialize())
    piece = ContinuationFrame(1, data=b"\x88" * 16000).serialize()
    with pytest.raises(WireError, match=f"longer than {MAX_HEADER_BLOCK} bytes"):
        for _ in range(10):
            wire.receive(piece)


def test_status_cache_is_bounded_and_follows_the_table() -> None:
    assert ResponseStatus().max_cached == 64  # the README says so
    status = ResponseStatus(max_cached=4)
    encoder = hpack.Encoder()
    for code in (b"200", b"204", b"206", b"304", b"400", b"404", b"500"):  # static entries: indexed-only
        block = encoder.encode([(b":status", code)])
        assert status(block) == code and status(block) == code
        assert len(status._cache) <= 4
    # A dynamic index means different fields before and after an insertion.
    first = encoder.encode([(b":status", b"299")])  # literal, inserted at index 62
    assert status(first) == b"299"
    again = encoder.encode([(b":status", b"299")])  # indexed 62: cacheable
    assert again == b"\xbe" and status(again) == b"299"
    status(encoder.encode([(b":status", b"298")]))  # inserted at 62, pushing 299 to 63
    assert status(b"\xbe") == b"298" and status(b"\xbf") == b"299"


def test_window_update_frames_are_acknowledged_by_length() -> None:
    wire, _ = opened(1)
    with pytest.raises(WireError, match="WINDOW_UPDATE of 3 bytes"):
        wire.receive(b"\x00\x00\x03\x08\x00\x00\x00\x00\x00abc")
    wire, _ = opened(1)
    assert wire.receive(WindowUpdateFrame(0, window_increment=10).serialize()) == []
    assert wire.receive(RstStreamFrame(99, error_code=7).serialize()) == []  # not ours: nothing to report
    assert wire.receive(SettingsFrame(0, flags=["ACK"]).serialize()) == []
    with pytest.raises(ValueError, match="window must be"):
        LoadWire(FIELDS, window=10)


# -- split_frames, both cores ------------------------------------------------------------------


def _random_frames(rng: random.Random) -> list[Frame]:
    frames: list[Frame] = []
    for _ in range(rng.randrange(1, 30)):
        kind = rng.randrange(5)
        stream = rng.randrange(1, 2**31, 2)
        if kind == 0:
            frames.append(DataFrame(stream, data=rng.randbytes(rng.randrange(0, 3000)), flags=["END_STREAM"]))
        elif kind == 1:
            frames.append(HeadersFrame(stream, data=rng.randbytes(rng.randrange(0, 200)), flags=["END_HEADERS"]))
        elif kind == 2:
            frames.append(PingFrame(0, opaque_data=rng.randbytes(8)))
        elif kind == 3:
            frames.append(GoAwayFrame(0, last_stream_id=stream, error_code=rng.randrange(14)))
        else:
            frames.append(WindowUpdateFrame(stream, window_increment=rng.randrange(1, 2**31)))
    return frames


def test_split_frames_matches_hyperframe(core: ModuleType) -> None:
    rng = random.Random(14)
    for _ in range(200):
        frames = _random_frames(rng)
        data = b"".join(f.serialize() for f in frames)
        cut = rng.randrange(len(data) + 1)
        got, used = core.split_frames(data[:cut])
        rest, used_rest = core.split_frames(data[used:])
        assert used_rest == len(data) - used
        expected = []
        for frame in frames:
            payload = frame.serialize()[9:]
            expected.append((frame.type, sum(f.bit for f in frame.defined_flags if f.name in frame.flags),
                             frame.stream_id, len(payload), b"" if frame.type == 0 else payload))
        assert got + rest == expected
        assert data[:used] == b"".join(f.serialize() for f in frames[:len(got)])


def test_split_frames_edges(core: ModuleType) -> None:
    assert core.split_frames(b"") == ([], 0)
    assert core.split_frames(b"\x00\x00\x00\x04\x01\x80\x00\x00\x00") == ([(4, 1, 0, 0, b"")], 9)  # reserved bit
    assert core.split_frames(bytearray(b"\x00\x00\x01\x06")) == ([], 0)
    big = b"\x00\x40\x01\x00\x00\x00\x00\x00\x01"
    with pytest.raises(ValueError, match="frame length 16385 exceeds max_frame_size 16384"):
        core.split_frames(big)
    assert core.split_frames(big + bytes(16385), 16385)[1] == 16394
    with pytest.raises(TypeError, match="bytes-like"):
        core.split_frames("text")
