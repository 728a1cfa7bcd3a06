"""Hostile clients against ServerConnection and the asyncio server.

The client here is raw: HEADERS encoded with ``hpack`` and framed with
``hyperframe``, so it can do what a well-behaved ``h2`` client never would
(ignore GOAWAY, never answer a PING, never close, reset every stream it opens)
and costs nothing per stream itself. Every case the issue lists:

- a client that keeps opening streams after the final GOAWAY: every one is
  refused, the application never sees one, memory stays flat;
- a client that never closes after the drain: the server cuts the connection
  at ``grace`` (or closes it after ``linger`` once drained), over a real socket;
- a client that never answers the drain's PING: the final GOAWAY still goes
  out after ``ping_timeout`` (in memory with a fake clock, and over a socket);
- a rapid-reset flood during a drain: memory stays flat and the drain ends as
  soon as the one real stream in flight does.

Memory is measured with ``tracemalloc`` after a warm-up. ``h2`` remembers up to
``MAX_CLOSED_STREAMS`` (2^16) closed stream ids per connection, by design, to
answer late frames correctly; the servers here lower that cap so a few
thousand streams are enough to reach the steady state. ``make soak`` runs the
same flood with h2's real cap and far more streams.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
)
from manual_clock import ManualClock
from raw_h2 import MAX_ID, RawClient, parse_frames

from goaway_ext import ConnectionDrained, GoawayPolicy, GoawaySent, H2Server, ServerConnection
from goaway_ext.asyncio_server import builtin_app
from goaway_ext.server import DrainState


class SmallMemoryServer(ServerConnection):
    """A ServerConnection whose h2 remembers 512 closed streams instead of 65,536."""

    MAX_CLOSED_STREAMS = 512


def start(server: ServerConnection, client: RawClient) -> None:
    server.initiate_connection()
    server.receive_data(client.preface())
    server.data_to_send()


def live_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


# -- in memory -------------------------------------------------------------------------------


def test_a_late_stream_reset_in_the_same_read_is_not_an_error() -> None:
    # Regression: a client that opens a stream after the final GOAWAY and resets
    # it at once (its HEADERS and RST_STREAM arrive in one read) made
    # ServerConnection refuse an already-closed stream: StreamClosedError
    # escaped receive_data, and a server owner dropped the whole connection
    # with the in-flight stream 1 on it.
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(mode="single"), clock=clock)
    client = RawClient()
    start(server, client)
    first, data = client.headers()
    assert [type(e) for e in server.receive_data(data)] == [h2.events.RequestReceived, h2.events.StreamEnded]
    server.start_drain("test")
    late, data = client.headers()
    events = server.receive_data(data + client.reset(late))
    assert events == [GoawaySent(last_stream_id=first, final=True, reason="test")]
    server.send_headers(first, [(b":status", b"200")], end_stream=True)
    frames = parse_frames(server.data_to_send())
    assert [type(f) for f in frames] == [HeadersFrame, GoAwayFrame]
    assert server.is_drained
    # The refused count only counts the RST_STREAM actually sent.
    assert server.stats.streams_refused == 0 and server.stats.requests_seen == 1


def test_streams_opened_after_the_final_goaway_are_all_refused_in_flat_memory(traced: None) -> None:
    clock = ManualClock(100.0)
    # Memory under a late-stream flood; the rapid-reset limit, which would end
    # it after a few hundred streams, is tested in tests/test_rapid_reset.py.
    server = SmallMemoryServer(policy=GoawayPolicy(mode="single", rapid_reset_window=None), clock=clock)
    client = RawClient()
    start(server, client)
    held, data = client.headers(end_stream=False)  # stays open: the drain never finishes
    server.receive_data(data)
    server.start_drain("test")
    assert server.handle_timer(clock.now) == [GoawaySent(last_stream_id=held, final=True, reason="test")]
    server.data_to_send()

    measured: list[int] = []
    for batch in range(50):
        wire = b""
        sent = []
        for _ in range(50):  # the client ignores the GOAWAY and keeps going (within max concurrent streams)
            stream_id, frame = client.headers()
            sent.append(stream_id)
            wire += frame
        assert server.receive_data(wire) == []  # the application sees none of it
        refused = [f.stream_id for f in parse_frames(server.data_to_send())
                   if isinstance(f, RstStreamFrame) and f.error_code == ErrorCodes.REFUSED_STREAM]
        assert refused == sent
        assert len(server.streams) <= 51
        if batch in (19, 49):  # 1,000 streams of warm-up (2x h2's closed-stream memory), then 1,500 more
            measured.append(live_bytes())
    assert server.stats.streams_refused == 2500
    assert server.drain_state is DrainState.DRAINING and server.open_inbound_streams == 1
    growth = measured[1] - measured[0]
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over 1,500 refused streams"


def test_a_client_that_never_answers_the_ping_gets_the_final_goaway_after_ping_timeout() -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(ping_timeout=2.0, grace=None), clock=clock)
    client = RawClient()
    start(server, client)
    first, data = client.headers(end_stream=False)
    server.receive_data(data)
    server.start_drain("test")
    assert server.handle_timer(clock.now) == [GoawaySent(last_stream_id=MAX_ID, final=False, reason="test")]
    frames = parse_frames(server.data_to_send())
    assert [type(f) for f in frames] == [GoAwayFrame, PingFrame]
    assert server.next_deadline() == clock.now + 2.0
    # Still in the notice: a stream that was racing the first GOAWAY is served.
    second, data = client.headers()
    assert [type(e) for e in server.receive_data(data)] == [h2.events.RequestReceived, h2.events.StreamEnded]
    clock.now += 1.99
    assert server.handle_timer(clock.now) == [] and server.data_to_send() == b""
    clock.now += 0.01
    assert server.handle_timer(clock.now) == [GoawaySent(last_stream_id=second, final=True, reason="test")]
    (goaway,) = parse_frames(server.data_to_send())
    assert isinstance(goaway, GoAwayFrame) and goaway.last_stream_id == second
    # The ACK that never came, and the streams after it, change nothing.
    third, data = client.headers()
    assert server.receive_data(data) == []
    assert [(type(f), f.stream_id) for f in parse_frames(server.data_to_send())] == [(RstStreamFrame, third)]
    assert h2.events.StreamEnded in [type(e) for e in server.receive_data(client.end(first))]
    for stream_id in (first, second):
        server.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
    server.data_to_send()
    events = server.handle_timer(clock.now)
    assert [type(e) for e in events] == [ConnectionDrained] and server.is_drained


def test_a_rapid_reset_flood_during_a_drain_keeps_memory_flat_and_does_not_stall_it(traced: None) -> None:
    clock = ManualClock(100.0)
    # The drain under a flood, limits off: tests/test_rapid_reset.py tests the rapid-reset limit, and
    # tests/test_control_rate.py the control-frame one (the late streams' RST_STREAMs count there).
    server = SmallMemoryServer(policy=GoawayPolicy(ping_timeout=30.0, rapid_reset_window=None), clock=clock,
                               max_control_rate=None)
    client = RawClient()
    start(server, client)
    held, data = client.headers()
    server.receive_data(data)
    server.start_drain("test")
    server.handle_timer(clock.now)
    ping = next(f for f in parse_frames(server.data_to_send()) if isinstance(f, PingFrame))

    def flood(count: int) -> Counter[str]:
        kinds: Counter[str] = Counter()
        for _ in range(count // 100):
            wire = b""
            for _ in range(100):  # open and cancel at once: CVE-2023-44487's pattern
                stream_id, frame = client.headers()
                wire += frame + client.reset(stream_id)
            kinds.update(type(e).__name__ for e in server.receive_data(wire))
            server.data_to_send()
            assert len(server.streams) <= 102
        return kinds

    # During the notice the streams are still accepted (the client may not
    # have read the GOAWAY yet), so the application sees each open and reset.
    kinds = flood(1000)
    assert kinds["RequestReceived"] == kinds["StreamReset"] == 1000
    before = live_bytes()
    flood(1000)
    during_notice = live_bytes() - before
    # The PING ACK arrives in the middle of the flood: the final GOAWAY goes out at once.
    events = server.receive_data(client.ping_ack(ping.opaque_data))
    last = held + 2 * 2000
    assert events == [GoawaySent(last_stream_id=last, final=True, reason="test")]
    assert parse_frames(server.data_to_send())[-1].last_stream_id == last
    # After it, the flood is all late streams, reset by the client in the same
    # read: the application sees nothing, and nothing is left to refuse.
    before = live_bytes()
    assert flood(1500) == Counter()
    after_final = live_bytes() - before
    assert server.drain_state is DrainState.DRAINING
    # The one real stream ends: drained on the spot, whatever the flood did.
    server.send_headers(held, [(b":status", b"200")], end_stream=True)
    server.data_to_send()
    assert [type(e) for e in server.handle_timer(clock.now)] == [ConnectionDrained]
    assert server.stats.requests_seen == 1 + 2000
    assert during_notice < 64 * 1024 and after_final < 64 * 1024, (during_notice, after_final)


# -- over a real socket, against the asyncio server --------------------------------------------


async def _raw_session(policy: GoawayPolicy, request: bytes, *, limit: float) -> list[tuple[float, Frame | None]]:
    """Serve with ``policy``; send ``request`` raw and never anything else; log frames until EOF."""
    server = H2Server(builtin_app, policy=policy)
    host, port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        began = loop.time()
        writer.write(request)
        await writer.drain()
        log: list[tuple[float, Frame | None]] = []
        buffer = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), limit)
            if not chunk:
                log.append((loop.time() - began, None))
                break
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                length = int.from_bytes(buffer[:3], "big")
                log += [(loop.time() - began, f) for f in parse_frames(buffer[: 9 + length])]
                buffer = buffer[9 + length :]
        writer.close()
        return log
    finally:
        await server.shutdown(timeout=2.0)


def _when(log: list[tuple[float, Frame | None]], kind: type, **fields: Any) -> float:
    for at, frame in log:
        if isinstance(frame, kind) and all(getattr(frame, k) == v for k, v in fields.items()):
            return at
    raise AssertionError(f"no {kind.__name__} {fields} in {[(round(t, 3), f) for t, f in log]}")


def test_a_client_that_holds_a_stream_and_never_closes_is_cut_at_grace() -> None:
    # chance 1.0: the request starts the drain. Its body never ends, the PING
    # is never answered, the socket is never closed: only grace ends this.
    client = RawClient()
    _, headers = client.headers(end_stream=False, headers=[(b":method", b"POST"), (b":path", b"/echo"),
                                                           (b":scheme", b"http"), (b":authority", b"h")])
    # linger is 60 s and each read waits at most 10 s: an EOF at all means the close came at grace.
    policy = GoawayPolicy(1.0, allow_high_chance=True, ping_timeout=0.3, grace=1.0, linger=60.0)
    log = asyncio.run(_raw_session(policy, client.preface() + headers, limit=10.0))
    notice = _when(log, GoAwayFrame, last_stream_id=MAX_ID)
    final = _when(log, GoAwayFrame, last_stream_id=1)
    cut = _when(log, RstStreamFrame, stream_id=1, error_code=ErrorCodes.CANCEL)
    eof = log[-1][0]
    assert log[-1][1] is None, "the socket should close at grace, not after linger"
    # Order and lower bounds only (timers never fire early; a loaded machine makes them late).
    assert notice < final < cut <= eof
    assert final - notice >= 0.25, "final GOAWAY should wait for the unanswered PING's ping_timeout"
    assert cut - notice >= 0.9, "the stream should be cut at grace, not before"


def test_a_drained_client_that_never_closes_is_closed_after_linger() -> None:
    client = RawClient()
    _, headers = client.headers()
    policy = GoawayPolicy(1.0, allow_high_chance=True, ping_timeout=0.2, grace=None, linger=0.4)
    log = asyncio.run(_raw_session(policy, client.preface() + headers, limit=10.0))
    response = _when(log, HeadersFrame, stream_id=1)
    final = _when(log, GoAwayFrame, last_stream_id=1)
    eof = log[-1][0]
    assert log[-1][1] is None, "closed after linger"
    assert response < final < eof
    assert final >= 0.15, "final GOAWAY should wait for the unanswered PING's ping_timeout"
    assert eof - final >= 0.35, "closed after linger, not before"
