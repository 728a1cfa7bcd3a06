"""Mode ``idle`` in memory: the GOAWAY waits for a proven, lasting idle moment (issue 11, item 2).

httpcore (under httpx) fails every request that waits to read when it reads a
GOAWAY, even one whose response came in the same read, and a request it has
just put on the connection when another task reads the GOAWAY first. So: when
no stream is open the server sends a PING; its ACK proves the client read
every response; the GOAWAY goes out only if no stream is opened from the PING
until ``ping_timeout`` after the ACK, and nothing is ever sent after it.
Frames are checked one by one (hyperframe); time is a manual clock.
"""

from __future__ import annotations

import h2.events
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame
from raw_h2 import RawClient
from raw_h2 import parse_frames as parse
from test_server_memory import Pair, always, kinds, ours

from goaway_ext import ConnectionDrained, GoawaySent
from goaway_ext.server import DrainState

MAX = 2**31 - 1


def to_client(p: Pair) -> tuple[list[str], bytes]:
    """Hand the server's output to the client; the kinds of its frames and a PING's opaque."""
    raw = p.server.data_to_send()
    frames = parse(raw)
    opaque = [f.opaque_data for f in frames if isinstance(f, PingFrame)]
    p.deliver(raw)  # the client's h2 reads it and queues the ACK
    return kinds(frames), opaque[0] if opaque else b""


def idle_after_one_request(ping_timeout: float = 5.0) -> Pair:
    p = Pair(always("idle", ping_timeout=ping_timeout))
    sid = p.request()
    assert ours(p.to_server()) == []
    assert p.server.drain_state is DrainState.IDLE_WAIT
    p.respond(sid)
    return p


def test_ping_when_idle_then_goaway_after_a_quiet_ping_timeout() -> None:
    p = idle_after_one_request(ping_timeout=5.0)
    frames, _ = to_client(p)
    assert frames == ["HEADERS(1)", "DATA(1)+END", "PING"]  # never a GOAWAY in the same write
    events = p.to_server()  # the ACK
    assert events == [], "our ACK is swallowed, and it does not send the GOAWAY yet"
    assert p.server.next_deadline() == p.clock.now + 5.0
    p.clock.now += 4.99
    assert p.server.handle_timer(p.clock.now) == [] and p.server.data_to_send() == b""
    p.clock.now += 0.01
    assert p.server.handle_timer(p.clock.now) == [
        GoawaySent(last_stream_id=1, final=True, reason="chance"),
        ConnectionDrained(last_stream_id=1, reason="chance", duration=5.0),
    ]
    assert kinds(p.server_frames()) == ["GOAWAY(1)"]
    assert p.server.is_drained and p.server.stats.goaways_sent == 1


def test_a_stream_opened_in_the_quiet_period_starts_over() -> None:
    p = idle_after_one_request()
    to_client(p)
    p.to_server()  # ACK: quiet period
    p.clock.now += 1.0
    second = p.request()
    assert [e.stream_id for e in p.to_server() if isinstance(e, h2.events.RequestReceived)] == [second]
    p.respond(second)
    frames, _ = to_client(p)
    assert frames == ["HEADERS(3)", "DATA(3)+END"]  # idle again, but the quiet period is still running
    p.clock.now += 4.0
    assert p.server.handle_timer(p.clock.now) == []  # it was not quiet: no GOAWAY, a new PING
    frames, _ = to_client(p)
    assert frames == ["PING"]
    p.to_server()
    p.clock.now += 5.0
    assert ours(p.server.handle_timer(p.clock.now))[0] == GoawaySent(last_stream_id=3, final=True, reason="chance")


def test_a_stream_opened_before_the_ack_postpones_the_goaway() -> None:
    p = idle_after_one_request()
    held = p.server.data_to_send()  # response 1 + PING, still on its way to the client
    assert kinds(parse(held))[-1] == "PING"
    second = p.request()  # sent before the client read the PING
    p.to_server()
    p.deliver(held)
    assert ours(p.to_server()) == []  # the ACK, after stream 3 opened: proves nothing
    assert p.server.data_to_send() == b""  # stream 3 is open: no new PING yet
    p.respond(second)
    frames, _ = to_client(p)
    assert frames == ["HEADERS(3)", "DATA(3)+END", "PING"]


def test_a_client_that_never_reads_while_idle_never_gets_the_goaway() -> None:
    # httpcore reads only for a request in flight: an idle pooled connection
    # never answers. The connection stays until the client closes it (httpx
    # expires idle connections after 5 s) or grace ends the wait.
    p = idle_after_one_request(ping_timeout=2.0)
    assert kinds(p.server_frames())[-1] == "PING"  # never delivered
    p.clock.now += 2.0
    assert p.server.handle_timer(p.clock.now) == []
    assert p.server.next_deadline() is None and p.server.drain_state is DrainState.IDLE_WAIT
    p.clock.now += 100.0
    assert p.server.handle_timer(p.clock.now) == [] and p.server.data_to_send() == b""


def test_the_late_ack_of_a_client_that_came_back_starts_over() -> None:
    p = idle_after_one_request(ping_timeout=2.0)
    held = p.server.data_to_send()
    p.clock.now += 3.0
    p.server.handle_timer(p.clock.now)
    second = p.request()  # the client comes back: it sends, then reads the PING
    p.to_server()
    p.deliver(held)
    assert ours(p.to_server()) == []
    p.respond(second)
    frames, _ = to_client(p)
    assert frames == ["HEADERS(3)", "DATA(3)+END", "PING"]
    # An ACK of the old PING (a client may send it twice) is ours but proves nothing.
    assert p.server.receive_data(RawClient.ping_ack(parse(held)[-1].opaque_data)) == []
    p.to_server()
    p.clock.now += 2.0
    assert ours(p.server.handle_timer(p.clock.now))[0] == GoawaySent(last_stream_id=3, final=True, reason="chance")


def test_the_idle_goaway_is_the_last_frame_late_streams_are_refused_silently() -> None:
    # h2-based clients (httpcore) go CLOSED on a GOAWAY and raise on any frame
    # after it in the same read, so nothing follows it: not the RST_STREAM of a
    # stream that crossed it, not a WINDOW_UPDATE for its body, not a PING ACK.
    p = idle_after_one_request(ping_timeout=1.0)
    to_client(p)
    p.to_server()
    p.clock.now += 1.0
    p.server.handle_timer(p.clock.now)
    assert kinds(p.server_frames()) == ["GOAWAY(1)"]
    late = p.request(end_stream=False)  # crossed the GOAWAY
    for _ in range(3):
        p.client.send_data(late, b"x" * 15000)
    p.client.end_stream(late)
    p.client.ping(b"clientpg")
    events = p.server.receive_data(p.client.data_to_send())
    assert [type(e) for e in events] == [h2.events.PingReceived]  # the late stream never reaches the app
    assert p.server.data_to_send() == b""
    assert p.server.stats.streams_refused == 1 and p.server.open_inbound_streams == 0
    assert p.server.stats.requests_seen == 1


def test_late_streams_after_an_idle_fallback_to_graceful_still_get_rst() -> None:
    # Only the GOAWAY of a proven idle moment is silent afterwards.
    p = Pair(always("idle", grace=10.0, ping_timeout=1.0))
    watch = p.request()
    p.to_server()
    p.clock.now += 10.0
    p.server.handle_timer(p.clock.now)
    assert kinds(p.server_frames()) == [f"GOAWAY({MAX})", "PING"]
    p.clock.now += 1.0
    p.server.handle_timer(p.clock.now)
    assert kinds(p.server_frames()) == [f"GOAWAY({watch})"]
    late = p.request()
    p.server.receive_data(p.client.data_to_send())
    assert kinds(p.server_frames()) == [f"RST({late},{ErrorCodes.REFUSED_STREAM.name})"]


def test_start_drain_in_idle_mode_on_a_connection_without_streams() -> None:
    p = Pair(always("idle", ping_timeout=0.5))
    p.server.start_drain("shutdown")
    assert p.server.handle_timer(p.clock.now) == []
    frames, _ = to_client(p)
    assert frames == ["PING"]
    assert p.to_server() == []
    p.clock.now += 0.5
    assert p.server.handle_timer(p.clock.now) == [
        GoawaySent(last_stream_id=0, final=True, reason="shutdown"),
        ConnectionDrained(last_stream_id=0, reason="shutdown", duration=0.5)]
