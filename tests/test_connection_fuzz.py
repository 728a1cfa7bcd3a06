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

import h2.exceptions
from chunking import split
from h2.config import H2Configuration
from h2.connection import H2Connection
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
