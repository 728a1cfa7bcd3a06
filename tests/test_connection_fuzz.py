"""Garbage into ServerConnection and ClientConnection: only ``h2.exceptions.ProtocolError`` may come out.

``tests/test_core_fuzz.py`` fuzzes the core (scanner, codec); this file feeds
the connection layer above it. Bytes are raw garbage or "well framed" garbage
(valid 9-byte headers with random types, flags, stream ids and payloads, so
h2's frame handlers and our drain paths are reached), cut at random points,
delivered to a fresh connection, one with a preface, or one in the middle of
a drain. A peer that sends garbage may be told off with ``ProtocolError`` (a
remote protocol violation, what h2 raises); any other exception escaping, or
a drain state going backwards, is a bug.

``make test`` runs a bounded number of examples; ``make fuzz`` scales them up
with ``GOAWAY_EXT_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import os
from typing import Any

import h2.exceptions
from chunking import split
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manual_clock import ManualClock

from goaway_ext import ClientConnection, GoawayPolicy, ServerConnection, encode_goaway
from goaway_ext.server import DrainState

EXAMPLES = int(os.environ.get("GOAWAY_EXT_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"fuzz")]
ORDER = [DrainState.SERVING, DrainState.IDLE_WAIT, DrainState.NOTICE, DrainState.DRAINING, DrainState.DRAINED]


frames = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0xFF]), st.integers(0, 9),
              st.binary(max_size=48)),
    max_size=12,
).map(lambda fs: b"".join(len(p).to_bytes(3, "big") + bytes([t, f]) + s.to_bytes(4, "big") + p
                          for t, f, s, p in fs))
garbage = st.one_of(st.binary(max_size=1024), frames)


def client_setup() -> tuple[H2Connection, bytes]:
    """A plain h2 client's opening bytes and one request on stream 1."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, REQUEST, end_stream=True)
    return client, client.data_to_send()


@fuzz
@given(data=garbage, cuts=st.lists(st.integers(0, 2048), max_size=20),
       phase=st.sampled_from(["raw", "preface", "serving", "notice", "draining"]),
       mode=st.sampled_from(["graceful", "single", "idle"]))
def test_server_connection_survives_garbage(data: bytes, cuts: list[int], phase: str, mode: str) -> None:
    clock = ManualClock(10.0)
    policy = GoawayPolicy(1.0 if phase in ("notice", "draining") else 0.0, allow_high_chance=True, mode=mode,
                          ping_timeout=1.0, grace=5.0)
    server = ServerConnection(policy=policy, clock=clock)
    server.initiate_connection()
    if phase != "raw":
        _, opening = client_setup()
        server.receive_data(opening if phase != "preface" else PREFACE)
        if phase == "draining":
            clock.now += 1.5  # past ping_timeout: the final GOAWAY is out
            server.handle_timer(clock.now)
        server.data_to_send()
    state = ORDER.index(server.drain_state)
    try:
        for piece in split(data, cuts, keep_empty=False):
            server.receive_data(piece)
            server.data_to_send(7)
            clock.now += 0.5
            server.handle_timer(clock.now)
            now_state = ORDER.index(server.drain_state)
            assert now_state >= state, "drain state went backwards"
            state = now_state
    except h2.exceptions.ProtocolError:
        return
    clock.now += 100
    server.handle_timer(clock.now)
    server.data_to_send()


@fuzz
@given(data=garbage, cuts=st.lists(st.integers(0, 2048), max_size=20), goaway_first=st.booleans())
def test_client_connection_survives_garbage(data: bytes, cuts: list[int], goaway_first: bool) -> None:
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client = ClientConnection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, REQUEST, end_stream=stream_id != 5)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    if goaway_first:
        client.receive_data(encode_goaway(3))
    last = client.goaway_last_stream_id
    try:
        for piece in split(data, cuts, keep_empty=False):
            client.receive_data(piece)
            client.data_to_send()
            if last is not None:
                assert client.goaway_last_stream_id is not None and client.goaway_last_stream_id <= last
            last = client.goaway_last_stream_id
    except h2.exceptions.ProtocolError:
        return


# -- ClientConnection's compiled read (GoawayGate) against its full Python read --------------


class FullRead(ClientConnection):
    """Overrides receive_data, so it never gets the gate: every read takes the Python path."""

    def receive_data(self, data):  # type: ignore[no-untyped-def]
        return super().receive_data(data)


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


# Frames a server might send (HEADERS use the static HPACK table only, so any order decodes),
# GOAWAYs of every kind, resets, SETTINGS ACKs that apply our MAX_FRAME_SIZE, frames over it.
WIRE_PIECES = [
    _frame(1, 0x4, 1, b"\x88"), _frame(1, 0x5, 3, b"\x88"), _frame(0, 0, 1, b"abc"), _frame(0, 1, 1, b""),
    _frame(0, 0, 1, b"x" * 17000), (20000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01",
    encode_goaway(2**31 - 1), encode_goaway(3), encode_goaway(1, 0, b"bye"), encode_goaway(3, 2, b"err"),
    encode_goaway(5), _frame(3, 0, 5, (7).to_bytes(4, "big")), _frame(3, 0, 3, (8).to_bytes(4, "big")),
    _frame(6, 0, 0, bytes(8)), _frame(4, 1, 0, b""), _frame(4, 0, 0, b"\x00\x05\x00\x00\x80\x00"),
    _frame(8, 0, 0, (1000).to_bytes(4, "big")), b"\x00\x00",
]
steps = st.lists(st.one_of(
    st.tuples(st.just("wire"), st.lists(st.sampled_from(range(len(WIRE_PIECES))), min_size=1, max_size=6),
              st.lists(st.integers(0, 40000), max_size=3), st.sampled_from(["bytes", "memoryview", "bytearray"])),
    st.tuples(st.just("ask"), st.sampled_from([16384, 20000, 32768])),
), max_size=10)


def _outcome(conn: ClientConnection, method: str, argument: Any) -> tuple[Any, ...]:
    try:
        result: Any = ("events", repr(getattr(conn, method)(argument)))
    except Exception as exc:  # the exact exception is part of the behaviour compared
        result = ("raised", type(exc).__name__, str(exc))
    return (*result, conn.data_to_send(), conn.goaway_last_stream_id, conn.goaway_error_code,
            conn.open_stream_count, conn.max_inbound_frame_size)


@fuzz
@given(script=steps)
def test_client_gate_reads_exactly_like_the_python_read(script: list[Any]) -> None:
    conns = [ClientConnection(H2Configuration(client_side=True, header_encoding=None)),
             FullRead(H2Configuration(client_side=True, header_encoding=None))]
    assert "receive_data" in vars(conns[0]) and "receive_data" not in vars(conns[1])
    for conn in conns:
        conn.initiate_connection()
        for stream_id in (1, 3, 5):
            conn.send_headers(stream_id, REQUEST, end_stream=stream_id != 5)
        conn.data_to_send()
    for step in script:
        if step[0] == "ask":
            outcomes = [_outcome(conn, "update_settings", {SettingCodes.MAX_FRAME_SIZE: step[1]}) for conn in conns]
            assert outcomes[0] == outcomes[1]
            continue
        _, picks, cuts, kind = step
        for piece in split(b"".join(WIRE_PIECES[i] for i in picks), cuts, keep_empty=True):
            chunk: Any = {"memoryview": memoryview, "bytearray": bytearray, "bytes": bytes}[kind](piece)
            outcomes = [_outcome(conn, "receive_data", chunk) for conn in conns]
            assert outcomes[0] == outcomes[1]
    assert ("receive_data" in vars(conns[0])) is (conns[0].goaway_last_stream_id is None)
