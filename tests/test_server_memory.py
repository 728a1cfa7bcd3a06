"""ServerConnection in memory: a plain h2 client and our server, no sockets, a fake clock.

The client strips GOAWAY frames with FrameScanner before h2 sees them (plain h2
would go CLOSED on the first one), so it keeps reading in-flight responses.
Every server write is parsed with hyperframe and checked frame by frame.
"""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    PingAckReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame
from manual_clock import ManualClock
from raw_h2 import parse_frames

from goaway_ext import ConnectionDrained, FrameScanner, GoawayPolicy, GoawaySent, ServerConnection
from goaway_ext.server import DrainState

MAX = 2**31 - 1


def kinds(frames: list[Frame]) -> list[str]:
    out = []
    for f in frames:
        if isinstance(f, GoAwayFrame):
            out.append(f"GOAWAY({f.last_stream_id})")
        elif isinstance(f, RstStreamFrame):
            out.append(f"RST({f.stream_id},{ErrorCodes(f.error_code).name})")
        elif isinstance(f, PingFrame):
            out.append("PING_ACK" if "ACK" in f.flags else "PING")
        else:
            end = "+END" if "END_STREAM" in f.flags else ""
            out.append(f"{_type_name(f)}({f.stream_id}){end}")
    return out


def _type_name(frame: Frame) -> str:
    return type(frame).__name__.removesuffix("Frame").upper()

REQ = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"t")]


class Pair:
    """One client, one ServerConnection, and the wire between them."""

    def __init__(self, policy: GoawayPolicy | None = None) -> None:
        self.clock = ManualClock(1000.0)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.scanner = FrameScanner()
        self.server = ServerConnection(policy=policy, clock=self.clock)
        self.goaways: list[tuple[int, int, bytes]] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()

    def to_server(self) -> list[Any]:
        return self.server.receive_data(self.client.data_to_send())

    def server_frames(self) -> list[Frame]:
        return parse_frames(self.server.data_to_send())

    def deliver(self, frames_bytes: bytes) -> list[Any]:
        data, found = self.scanner.feed(frames_bytes)
        self.goaways.extend(found)
        return self.client.receive_data(data)

    def to_client(self) -> tuple[list[str], list[Any]]:
        raw = self.server.data_to_send()
        return kinds(parse_frames(raw)), self.deliver(raw)

    def request(self, end_stream: bool = True, headers: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers or REQ, end_stream=end_stream)
        return sid

    def respond(self, sid: int, body: bytes = b"ok", end: bool = True) -> None:
        self.server.send_headers(sid, [(b":status", b"200")])
        self.server.send_data(sid, body, end_stream=end)


def always(mode: str = "graceful", **kw: Any) -> GoawayPolicy:
    return GoawayPolicy(1.0, allow_high_chance=True, mode=mode, **kw)


def ours(events: list[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, (GoawaySent, ConnectionDrained))]


# -- each mode's exact frame sequence ------------------------------------------------


def test_graceful_two_phase_sequence() -> None:
    p = Pair(always(linger=1.0))
    sid = p.request()
    events = p.to_server()
    assert [type(e) for e in events if isinstance(e, (RequestReceived, GoawaySent))] == [RequestReceived, GoawaySent]
    assert ours(events) == [GoawaySent(last_stream_id=MAX, final=False, reason="chance")]
    frames, _ = p.to_client()
    assert frames == [f"GOAWAY({MAX})", "PING"]
    assert p.server.drain_state is DrainState.NOTICE
    # The client's h2 acks the PING by itself; the server swallows that ACK.
    events = p.to_server()
    assert not any(isinstance(e, PingAckReceived) for e in events)
    assert ours(events) == [GoawaySent(last_stream_id=sid, final=True, reason="chance")]
    assert p.to_client()[0] == ["GOAWAY(1)"]
    assert p.server.drain_state is DrainState.DRAINING and p.server.close_at is None
    p.clock.now += 0.25
    p.respond(sid)
    frames, client_events = p.to_client()
    assert frames == ["HEADERS(1)", "DATA(1)+END"]
    assert any(isinstance(e, StreamEnded) for e in client_events)
    assert p.server.is_drained and p.server.close_at == p.clock.now + 1.0
    # ConnectionDrained surfaced from data_to_send: next_deadline says "now".
    assert p.server.next_deadline() == p.clock.now
    assert p.server.handle_timer(p.clock.now) == [
        ConnectionDrained(last_stream_id=1, reason="chance", duration=pytest.approx(0.25))
    ]
    assert p.server.next_deadline() == p.server.close_at
    assert p.goaways == [(MAX, 0, b""), (1, 0, b"")]
    s = p.server.stats
    assert (s.requests_seen, s.goaways_sent, s.streams_refused, s.streams_cut) == (1, 2, 0, 0)
    assert s.drain_duration == pytest.approx(0.25)


def test_single_sequence() -> None:
    p = Pair(always("single"))
    sid = p.request()
    events = p.to_server()
    assert ours(events) == [GoawaySent(last_stream_id=1, final=True, reason="chance")]
    assert p.to_client()[0] == ["GOAWAY(1)"]
    p.respond(sid)
    assert p.to_client()[0] == ["HEADERS(1)", "DATA(1)+END"]
    assert p.server.is_drained


def test_idle_waits_for_no_open_stream() -> None:
    p = Pair(always("idle"))
    first = p.request()
    assert ours(p.to_server()) == []
    assert p.server.is_draining and p.server.drain_state is DrainState.IDLE_WAIT
    second = p.request()  # still served: no GOAWAY is out yet
    assert [e.stream_id for e in p.to_server() if isinstance(e, RequestReceived)] == [second]
    p.respond(first)
    assert p.to_client()[0] == ["HEADERS(1)", "DATA(1)+END"]
    p.respond(second)
    frames, _ = p.to_client()
    # Idle: a PING first; the GOAWAY only once its ACK proves the client read
    # everything and ping_timeout (5 s) passed without a new stream (test_idle_mode.py).
    assert frames == ["HEADERS(3)", "DATA(3)+END", "PING"]
    assert p.server.last_stream_id is None
    assert ours(p.to_server()) == []
    p.clock.now += 5.0
    assert p.server.handle_timer(p.clock.now) == [
        GoawaySent(last_stream_id=3, final=True, reason="chance"),
        ConnectionDrained(last_stream_id=3, reason="chance", duration=5.0),
    ]
    assert p.to_client()[0] == ["GOAWAY(3)"]
    assert p.server.is_drained


def test_idle_falls_back_to_graceful_after_grace() -> None:
    p = Pair(always("idle", grace=10.0))
    watch = p.request()
    p.to_server()
    assert p.server.next_deadline() == p.clock.now + 10.0
    p.clock.now += 10.0
    assert p.server.handle_timer(p.clock.now) == [GoawaySent(last_stream_id=MAX, final=False, reason="chance")]
    assert kinds(p.server_frames()) == [f"GOAWAY({MAX})", "PING"]
    assert p.server.drain_state is DrainState.NOTICE
    # A fresh grace window for the graceful phase.
    assert p.server.next_deadline() == p.clock.now + 5.0  # ping_timeout comes first
    p.respond(watch)
    p.to_client()


# -- racing streams ------------------------------------------------------------------


def test_stream_racing_final_goaway_is_refused_never_half_served() -> None:
    p = Pair(always("single"))
    sid = p.request()
    p.to_server()
    # The client has not read GOAWAY(1) yet: it opens stream 3 with a body.
    late = p.client.get_next_available_stream_id()
    p.client.send_headers(late, [(b":method", b"POST"), *REQ[1:]])
    for last in (False, False, True):  # 42,000 bytes: more than half the connection window
        p.client.send_data(late, b"x" * 14000, end_stream=last)
    events = p.to_server()
    assert all(getattr(e, "stream_id", None) != late for e in events), events
    frames = p.server_frames()
    assert f"RST({late},REFUSED_STREAM)" in kinds(frames)
    # Its DATA was given back to the connection window.
    assert any(_type_name(f) == "WINDOWUPDATE" and f.stream_id == 0 for f in frames)
    assert p.server.inbound_flow_control_window == 65535
    assert p.server.stats.streams_refused == 1
    # DATA still in flight for the refused stream does not disturb anything.
    p.respond(sid)
    _, client_events = p.to_client()
    assert any(isinstance(e, StreamEnded) and e.stream_id == sid for e in client_events)
    assert p.server.is_drained


def test_stream_opened_during_notice_is_served() -> None:
    p = Pair(always())
    first = p.request()
    p.to_server()
    second = p.request()  # before the client read GOAWAY(max)+PING
    events = p.to_server()
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [second]
    p.to_client()  # client reads notice, acks the PING
    assert ours(p.to_server()) == [GoawaySent(last_stream_id=second, final=True, reason="chance")]
    assert p.to_client()[0] == [f"GOAWAY({second})"]
    # After the final GOAWAY: refused, and the application never hears of it.
    third = p.request()
    events = p.to_server()
    assert not any(getattr(e, "stream_id", None) == third for e in events)
    frames, client_events = p.to_client()
    assert frames == [f"RST({third},REFUSED_STREAM)"]
    assert [(e.stream_id, e.error_code) for e in client_events if isinstance(e, StreamReset)] == [
        (third, ErrorCodes.REFUSED_STREAM)
    ]
    for sid in (first, second):
        p.respond(sid)
    _, client_events = p.to_client()
    assert sorted(e.stream_id for e in client_events if isinstance(e, StreamEnded)) == [first, second]
    assert p.server.is_drained


def test_hpack_stays_in_sync_after_refusal() -> None:
    p = Pair(always("single"))
    sid = p.request(end_stream=False)
    p.to_server()
    # Late stream 3 adds a new header to the client's HPACK dynamic table...
    late = p.client.get_next_available_stream_id()
    p.client.send_headers(late, [*REQ, (b"x-fresh", b"value-1")], end_stream=True)
    # ...and the trailers of stream 1 refer to it by index.
    p.client.send_headers(sid, [(b"x-fresh", b"value-1")], end_stream=True)
    events = p.to_server()
    trailers = [e for e in events if isinstance(e, TrailersReceived)]
    assert trailers and trailers[0].headers == [(b"x-fresh", b"value-1")]
    assert not any(getattr(e, "stream_id", None) == late for e in events)
    p.respond(sid)
    p.to_client()
    assert p.server.is_drained


def test_watch_below_last_id_keeps_streaming_after_final_goaway() -> None:
    p = Pair(always())
    watch = p.request()
    p.to_server()
    p.to_client()
    p.to_server()  # final GOAWAY(1)
    p.server.send_headers(watch, [(b":status", b"200")])
    received = b""
    for i in range(5):
        p.server.send_data(watch, b"event %d\n" % i, end_stream=i == 4)
        _, events = p.to_client()
        received += b"".join(e.data for e in events if isinstance(e, DataReceived))
        assert p.server.is_drained == (i == 4)
    assert received == b"".join(b"event %d\n" % i for i in range(5))
    assert p.goaways == [(MAX, 0, b""), (1, 0, b"")]


# -- timers --------------------------------------------------------------------------


def test_ping_timeout_sends_final_goaway() -> None:
    p = Pair(always(ping_timeout=2.0))
    p.request()
    p.to_server()
    assert kinds(p.server_frames()) == [f"GOAWAY({MAX})", "PING"]  # never delivered: no ACK
    assert p.server.next_deadline() == p.clock.now + 2.0
    assert p.server.handle_timer(p.clock.now + 1.9) == []
    p.clock.now += 2.0
    assert p.server.handle_timer(p.clock.now) == [GoawaySent(last_stream_id=1, final=True, reason="chance")]
    assert kinds(p.server_frames()) == ["GOAWAY(1)"]


def test_grace_resets_open_streams_and_closes_at_once() -> None:
    p = Pair(always(grace=3.0, linger=1.0))
    watch = p.request()
    p.to_server()
    p.to_client()
    p.to_server()
    p.server.send_headers(watch, [(b":status", b"200")])
    p.to_client()
    assert p.server.next_deadline() == p.clock.now + 3.0
    p.clock.now += 3.0
    events = p.server.handle_timer(p.clock.now)
    assert events == [ConnectionDrained(last_stream_id=1, reason="chance", duration=3.0)]
    assert kinds(p.server_frames()) == [f"RST({watch},CANCEL)"]
    assert p.server.close_at == p.clock.now
    assert p.server.stats.streams_cut == 1


def test_grace_during_notice_sends_final_goaway_first() -> None:
    p = Pair(always(grace=1.0, ping_timeout=5.0))
    p.request()
    p.to_server()
    p.server_frames()
    p.clock.now += 1.0
    p.server.handle_timer(p.clock.now)
    # h2's bytes (the RST) come first, ours are appended: order is irrelevant at a hard cut.
    assert sorted(kinds(p.server_frames())) == ["GOAWAY(1)", "RST(1,CANCEL)"]
    assert p.server.is_drained and p.server.close_at == p.clock.now


def test_linger_close_at_and_deadline() -> None:
    p = Pair(always("single", linger=2.5))
    sid = p.request()
    p.to_server()
    p.respond(sid)
    p.to_client()
    assert p.server.close_at == p.clock.now + 2.5
    p.server.handle_timer(p.clock.now)
    assert p.server.next_deadline() == p.clock.now + 2.5


def test_max_age_timer() -> None:
    p = Pair(GoawayPolicy(max_age=60.0, jitter=0.0, mode="single"))
    assert p.server.next_deadline() == p.clock.now + 60.0
    assert p.server.handle_timer(p.clock.now + 59.0) == []
    p.clock.now += 60.0
    assert p.server.handle_timer(p.clock.now) == [
        GoawaySent(last_stream_id=0, final=True, reason="max_age"),
        ConnectionDrained(last_stream_id=0, reason="max_age", duration=0.0),
    ]
    assert kinds(p.server_frames()) == ["GOAWAY(0)"]


def test_max_age_is_jittered_per_connection() -> None:
    policy = GoawayPolicy(max_age=100.0, jitter=0.1, seed=5)
    deadlines = {ServerConnection(policy=policy, clock=lambda: 0.0).next_deadline() for _ in range(50)}
    assert len(deadlines) == 50
    assert all(d is not None and 90.0 <= d <= 110.0 for d in deadlines)


# -- triggers, counters --------------------------------------------------------------


def test_max_requests_drains_on_the_nth_request() -> None:
    p = Pair(GoawayPolicy(max_requests=3, jitter=0.0, mode="single"))
    for _ in range(2):
        sid = p.request()
        assert ours(p.to_server()) == []
        p.respond(sid)
        p.to_client()
    sid = p.request()
    assert ours(p.to_server()) == [GoawaySent(last_stream_id=5, final=True, reason="max_requests")]
    assert p.server.stats.requests_seen == 3


def test_decider_exempts_and_forces() -> None:
    def decider(headers: Any) -> bool | None:
        path = dict(headers)[b":path"]
        return {b"/healthz": False, b"/bye": True}.get(path)

    p = Pair(GoawayPolicy(1.0, allow_high_chance=True, decider=decider, mode="single"))
    health = [(b":method", b"GET"), (b":path", b"/healthz"), (b":scheme", b"http"), (b":authority", b"t")]
    sid = p.request(headers=health)
    assert ours(p.to_server()) == []
    p.respond(sid)
    p.to_client()
    p2 = Pair(GoawayPolicy(decider=decider, mode="single"))
    p2.request(headers=[(b":method", b"GET"), (b":path", b"/bye"), (b":scheme", b"http"), (b":authority", b"t")])
    assert ours(p2.to_server()) == [GoawaySent(last_stream_id=1, final=True, reason="decider")]


def test_start_drain_on_idle_connection() -> None:
    p = Pair()
    assert p.server.next_deadline() is None
    p.server.start_drain()
    assert p.server.next_deadline() == p.clock.now
    assert p.server.handle_timer(p.clock.now) == [GoawaySent(last_stream_id=MAX, final=False, reason="shutdown")]
    p.to_client()
    events = p.to_server()
    assert ours(events) == [
        GoawaySent(last_stream_id=0, final=True, reason="shutdown"),
        ConnectionDrained(last_stream_id=0, reason="shutdown", duration=0.0),
    ]
    p.server.start_drain("again")  # no-op
    assert p.server.stats.goaways_sent == 2


def test_applications_own_ping_ack_passes_through() -> None:
    p = Pair(always())
    p.server.ping(b"appping!")
    p.to_client()
    assert any(isinstance(e, PingAckReceived) and e.ping_data == b"appping!" for e in p.to_server())


def test_no_policy_never_drains_and_output_is_plain_h2() -> None:
    p = Pair()
    for _ in range(20):
        sid = p.request()
        assert ours(p.to_server()) == []
        p.respond(sid)
        assert p.to_client()[0][-1].endswith("+END")
    assert not p.server.is_draining and p.server.stats.goaways_sent == 0


def test_data_to_send_amount_keeps_frames_whole() -> None:
    p = Pair(always())
    sid = p.request()
    p.to_server()
    p.respond(sid, body=b"z" * 100)
    wire = b""
    while chunk := p.server.data_to_send(7):
        assert len(chunk) <= 7
        wire += chunk
        if len(wire) == 7 * 20:  # inside our GOAWAY: h2 queues a frame meanwhile
            p.server.ping(b"between!")
    names = kinds(parse_frames(wire))
    assert names == ["HEADERS(1)", "DATA(1)+END", f"GOAWAY({MAX})", "PING", "PING"]


def test_cut_frame_of_ours_is_finished_before_h2_bytes_on_unbounded_send() -> None:
    # Regression (found by the stateful test): data_to_send(amount) cut our
    # GOAWAY, h2 then queued a frame, and a later data_to_send() with no amount
    # put h2's frame in the middle of ours, corrupting the stream.
    p = Pair()
    p.server.start_drain("test")
    assert p.to_client()[0] == [f"GOAWAY({MAX})", "PING"]
    p.to_server()  # the client's PING ACK: the final GOAWAY is queued
    wire = p.server.data_to_send(5)  # the first 5 bytes of it
    p.server.ping(b"between!")  # h2 queues a frame while ours is cut
    wire += p.server.data_to_send()
    assert kinds(parse_frames(wire)) == ["GOAWAY(0)", "PING"]


def test_goaway_bytes_equal_hyperframe() -> None:
    p = Pair(always("single"))
    p.request()
    p.to_server()
    f = GoAwayFrame(0)
    f.last_stream_id = 1
    f.error_code = 0
    assert p.server.data_to_send() == f.serialize()


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="client_side"):
        ServerConnection(H2Configuration(client_side=True))
    with pytest.raises(TypeError, match="config"):
        ServerConnection("nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy"):
        ServerConnection(policy=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reason"):
        ServerConnection().start_drain(3)  # type: ignore[arg-type]
    assert ServerConnection().config.header_encoding is None


def test_a_method_saved_before_the_drain_hands_out_the_goaway() -> None:
    # README "Server": receive_data and data_to_send are the same methods in every drain state,
    # so bound methods saved while serving send the drain's frames and swallow its PING's ACK.
    p = Pair()
    saved_send = p.server.data_to_send
    saved_receive = p.server.receive_data
    p.server.start_drain()
    p.server.handle_timer(p.clock.now)
    raw = saved_send()
    assert kinds(parse_frames(raw)) == [f"GOAWAY({MAX})", "PING"]
    p.deliver(raw)  # the client reads the GOAWAY and answers the PING
    events = saved_receive(p.client.data_to_send())
    assert not [e for e in events if isinstance(e, PingAckReceived)]
    assert [(e.last_stream_id, e.final) for e in ours(events) if isinstance(e, GoawaySent)] == [(0, True)]
    assert kinds(parse_frames(saved_send())) == ["GOAWAY(0)"]


def test_the_shared_state_of_serving_connections_stays_untouched_by_drains() -> None:
    # A serving connection reads its drain fields from one shared _NO_DRAIN; every drain,
    # whatever starts it (request trigger, start_drain, a rapid-reset flood), gets its own.
    import goaway_ext.server as server_module

    def fields(drain: Any) -> dict[str, Any]:
        return {name: getattr(drain, name) for name in type(drain).__slots__}

    pristine = fields(server_module._Drain())
    for policy in (always(), always("single"), always("idle"), None):
        p = Pair(policy)
        sid = p.request()
        p.to_server()
        p.server.start_drain()
        p.respond(sid)
        p.to_client()
        p.server.handle_timer(p.clock.now + 100)
        assert p.server.is_draining and p.server._drain is not server_module._NO_DRAIN
    flood = Pair(GoawayPolicy(rapid_reset_window=2))
    for _ in range(4):
        sid = flood.request(end_stream=False)
        flood.client.reset_stream(sid)
    flood.to_server()
    assert flood.server.drain_reason == "rapid_reset"
    assert fields(server_module._NO_DRAIN) == pristine
    fresh = ServerConnection()
    assert fresh.handle_timer(0.0) == [] and fresh.stats.goaways_sent == 0 and fresh.close_at is None
