"""The peer's own GOAWAY in the same read as a late stream (issue 11, item 1).

A client that opens a stream after our final GOAWAY and then says GOAWAY
itself puts both frames in one read. ``h2`` processes the whole read first, so
by the time ``ServerConnection`` refuses the late stream, ``h2`` is CLOSED and
refuses every send. ``receive_data`` used to raise ``ProtocolError`` there,
dropping the other events of the read (``ConnectionTerminated`` included) and
the refusal itself. Plain ``h2`` returns ``[RequestReceived, StreamEnded,
ConnectionTerminated]`` for the same bytes; we return ``ConnectionTerminated``
(the late stream never reaches the application) and the RST_STREAM
REFUSED_STREAM still goes out.

The bytes are built by hand (hpack + hyperframe), and once more over a real
socket against the asyncio server with an ``h2`` client that writes its late
HEADERS and its GOAWAY in one ``write``.
"""

from __future__ import annotations

import asyncio
import logging

import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame
from manual_clock import ManualClock
from raw_h2 import MAX_ID, REQUEST, RawClient, parse_frames

from goaway_ext import FrameScanner, GoawayPolicy, GoawaySent, H2Server, ServerConnection
from goaway_ext.asyncio_server import builtin_app
from goaway_ext.server import DrainState


def refusals(frames: list[Frame]) -> list[int]:
    return [f.stream_id for f in frames if isinstance(f, RstStreamFrame) and f.error_code == ErrorCodes.REFUSED_STREAM]


def drained_server(mode: str) -> tuple[ServerConnection, RawClient, ManualClock]:
    """Stream 1 served, the drain over: the final GOAWAY(1) is on the wire."""
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(mode=mode, ping_timeout=1.0), clock=clock)
    wire = RawClient()
    server.initiate_connection()
    server.receive_data(wire.preface() + wire.headers_frame(1))
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    server.start_drain("test")
    server.handle_timer(clock.now)
    clock.now += 2.0  # graceful: past ping_timeout, so the final GOAWAY goes out without an ACK
    server.handle_timer(clock.now)
    # idle mode may ask a PING first: answer every PING the way a client's h2 does.
    for _ in range(3):
        pings = [f for f in parse_frames(server.data_to_send()) if isinstance(f, PingFrame) and "ACK" not in f.flags]
        if not pings:
            break
        for ping in pings:
            server.receive_data(wire.ping_ack(ping.opaque_data))
        clock.now += 2.0
        server.handle_timer(clock.now)
    assert server.last_stream_id == 1 and server.drain_state is DrainState.DRAINED
    return server, wire, clock


@pytest.mark.parametrize("mode", ["graceful", "single", "idle"])
def test_late_headers_and_peer_goaway_in_one_read(mode: str) -> None:
    server, wire, _ = drained_server(mode)
    data = wire.headers_frame(3) + wire.goaway()
    plain = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    plain.initiate_connection()
    plain.receive_data(RawClient().preface())
    assert [type(e) for e in plain.receive_data(RawClient().headers_frame(3) + RawClient.goaway())] == [
        h2.events.RequestReceived, h2.events.StreamEnded, h2.events.ConnectionTerminated]

    events = server.receive_data(data)  # raised ProtocolError before the fix

    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    assert events[0].error_code == ErrorCodes.NO_ERROR and events[0].last_stream_id == 0
    out = server.data_to_send()
    rst = RstStreamFrame(3)
    rst.error_code = ErrorCodes.REFUSED_STREAM
    # Exactly one frame, the refusal, byte for byte; in mode idle the GOAWAY
    # is the last frame ever sent (see test_idle_mode.py), so none.
    assert out == (b"" if mode == "idle" else rst.serialize())
    assert server.stats.streams_refused == 1 and server.stats.requests_seen == 1
    assert server.open_inbound_streams == 0
    # Nothing more is ever sent for it, and nothing raises afterwards.
    assert server.handle_timer(200.0) == [] and server.data_to_send() == b""


def test_late_headers_and_peer_goaway_right_after_our_ping_ack() -> None:
    # Graceful mode: the PING ACK comes in one read, a late stream and the
    # client's GOAWAY in the next (how the issue saw it on the wire).
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(ping_timeout=30.0), clock=clock)
    wire = RawClient()
    server.initiate_connection()
    server.receive_data(wire.preface() + wire.headers_frame(1, end_stream=False))
    server.start_drain("test")
    assert server.handle_timer(clock.now) == [GoawaySent(last_stream_id=MAX_ID, final=False, reason="test")]
    ping = next(f for f in parse_frames(server.data_to_send()) if isinstance(f, PingFrame))
    assert server.receive_data(wire.ping_ack(ping.opaque_data)) == [
        GoawaySent(last_stream_id=1, final=True, reason="test")]
    server.data_to_send()
    events = server.receive_data(wire.headers_frame(3) + wire.headers_frame(5) + wire.goaway(0))
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    assert refusals(parse_frames(server.data_to_send())) == [3, 5]
    assert server.stats.streams_refused == 2
    # Stream 1 is still open (h2 cannot answer it any more: the peer left);
    # grace or the owner's close ends it. Our own frames still go out.
    assert server.drain_state is DrainState.DRAINING and server.open_inbound_streams == 1


def test_ping_ack_late_headers_and_peer_goaway_all_in_one_read() -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(ping_timeout=30.0), clock=clock)
    wire = RawClient()
    server.initiate_connection()
    server.receive_data(wire.preface() + wire.headers_frame(1))
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    server.start_drain("test")
    server.handle_timer(clock.now)
    ping = next(f for f in parse_frames(server.data_to_send()) if isinstance(f, PingFrame))
    # HEADERS 3 arrives after the ACK in the same read: h2 has already counted
    # it when the ACK is handled, so the final GOAWAY covers it and it is served
    # (as far as h2 still can): never refused, never an exception.
    events = server.receive_data(wire.ping_ack(ping.opaque_data) + wire.headers_frame(3) + wire.goaway(0))
    assert [type(e) for e in events] == [
        GoawaySent, h2.events.RequestReceived, h2.events.StreamEnded, h2.events.ConnectionTerminated]
    assert events[0] == GoawaySent(last_stream_id=3, final=True, reason="test")
    assert server.stats.streams_refused == 0 and server.stats.requests_seen == 2


def test_a_late_stream_reset_by_the_peer_in_the_same_read_as_its_goaway_is_not_refused() -> None:
    server, wire, _ = drained_server("single")
    events = server.receive_data(wire.headers_frame(3) + wire.reset(3) + wire.goaway())
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    assert server.data_to_send() == b""
    assert server.stats.streams_refused == 0


def test_grace_after_the_peers_goaway_cuts_each_open_stream_once() -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(mode="single", grace=5.0), clock=clock)
    wire = RawClient()
    server.initiate_connection()
    server.receive_data(wire.preface() + wire.headers_frame(1, end_stream=False))
    server.start_drain("test")
    server.handle_timer(clock.now)
    server.data_to_send()
    events = server.receive_data(wire.headers_frame(3) + wire.goaway(1))
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    assert refusals(parse_frames(server.data_to_send())) == [3]
    clock.now += 5.0
    assert [type(e).__name__ for e in server.handle_timer(clock.now)] == ["ConnectionDrained"]
    frames = parse_frames(server.data_to_send())
    assert [(f.stream_id, f.error_code) for f in frames] == [(1, ErrorCodes.CANCEL)]
    assert server.stats.streams_cut == 1 and server.stats.streams_refused == 1
    assert server.close_at == clock.now


# -- over a real socket ----------------------------------------------------------------------


async def _late_headers_and_goaway_over_a_socket(mode: str) -> tuple[list[Frame], dict[str, int]]:
    policy = GoawayPolicy(1.0, allow_high_chance=True, mode=mode, ping_timeout=0.2, linger=5.0)
    server = H2Server(builtin_app, policy=policy)
    host, port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        scanner = FrameScanner()  # keeps GOAWAY away from h2, which would go CLOSED on it
        client.initiate_connection()
        client.send_headers(1, REQUEST, end_stream=True)
        writer.write(client.data_to_send())
        raw = b""
        finals: list[int] = []
        ended = False
        while not (ended and finals and finals[-1] != MAX_ID):
            chunk = await asyncio.wait_for(reader.read(65536), 10.0)
            assert chunk, "the server closed before its final GOAWAY"
            raw += chunk
            data, goaways = scanner.feed(chunk)
            finals += [last for last, _, _ in goaways]
            ended |= any(isinstance(e, h2.events.StreamEnded) for e in client.receive_data(data))
            writer.write(client.data_to_send())  # PING ACKs
        assert finals[-1] == 1
        # The client did not read the GOAWAY "in time": it opens stream 3, then
        # says GOAWAY itself, both in one write.
        client.send_headers(3, REQUEST, end_stream=True)
        client.close_connection()
        late = client.data_to_send()
        assert [type(f) for f in parse_frames(late)] == [HeadersFrame, GoAwayFrame]
        writer.write(late)
        start = len(raw)
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10.0)
            if not chunk:
                break
            raw += chunk
        writer.close()
        totals = server.stats()
        return parse_frames(raw[start:]), totals
    finally:
        await server.shutdown(timeout=2.0)


@pytest.mark.parametrize("mode", ["single", "idle"])
def test_late_headers_and_goaway_in_one_write_over_a_socket(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="goaway_ext.asyncio_server")
    frames, totals = asyncio.run(_late_headers_and_goaway_over_a_socket(mode))
    assert refusals(frames) == ([] if mode == "idle" else [3])
    assert totals["streams_refused"] == 1 and totals["requests"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "protocol error" in m], messages
    assert [m for m in messages if "sent GOAWAY (error code" in m], messages
