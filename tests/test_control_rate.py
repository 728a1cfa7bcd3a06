"""``max_control_rate`` in ServerConnection: frames that ask no work of the application are bounded.

PING, SETTINGS, their ACKs, PRIORITY, RST_STREAM, WINDOW_UPDATE, GOAWAY, unknown
frame types and DATA without data or END_STREAM each cost h2 tens of
microseconds and the peer 9 to 17 bytes (CVE-2019-9512, -9513, -9515, -9518).
The core counts them from the frame headers of each read (so frames h2 turns
into no event are counted too); the connection judges the rate once per
``max_control_rate`` frames. In memory with a manual clock; the floods over real
sockets are in test_hostile_server.py (asyncio), test_hypercorn.py and
test_grpclib.py.
"""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, PingFrame, PriorityFrame, WindowUpdateFrame
from manual_clock import ManualClock
from raw_h2 import RawClient
from raw_h2 import parse_frames as parse
from test_hostile import start

from goaway_ext import ConnectionDrained, GoawayPolicy, GoawaySent, ServerConnection
from goaway_ext.server import DrainState


def calm(out: bytes) -> list[GoAwayFrame]:
    return [f for f in parse(out) if isinstance(f, GoAwayFrame) and f.error_code == ErrorCodes.ENHANCE_YOUR_CALM]


def connection(rate: int | None, clock: ManualClock) -> tuple[ServerConnection, RawClient]:
    server = ServerConnection(policy=GoawayPolicy(), clock=clock, max_control_rate=rate)
    client = RawClient()
    start(server, client)
    return server, client


def test_a_ping_flood_gets_enhance_your_calm_and_close_now() -> None:
    clock = ManualClock(100.0)
    server, client = connection(10, clock)
    _, held = client.headers(end_stream=False)
    server.receive_data(held)
    events = server.receive_data(PingFrame(0).serialize() * 30)
    out = server.data_to_send()
    (goaway,) = calm(out)
    assert goaway.additional_data == b"control frame flood" and goaway.last_stream_id == 1
    assert server.drain_reason == "control_flood" and server.drain_state is DrainState.DRAINED
    assert server.close_at == 100.0
    assert [type(e) for e in events if isinstance(e, (GoawaySent, ConnectionDrained))] == [GoawaySent,
                                                                                           ConnectionDrained]
    # Judged once: more of the flood sends nothing more.
    server.receive_data(PingFrame(0).serialize() * 30)
    assert not calm(server.data_to_send())


def test_a_flood_split_into_one_byte_reads_is_counted_alike() -> None:
    clock = ManualClock(100.0)
    server, _ = connection(10, clock)
    flood = WindowUpdateFrame(0, window_increment=1).serialize() * 30
    for index in range(len(flood)):
        server.receive_data(flood[index : index + 1])
    assert len(calm(server.data_to_send())) == 1


def test_frames_spread_over_seconds_are_not_a_flood() -> None:
    clock = ManualClock(100.0)
    server, _ = connection(10, clock)
    for _ in range(20):  # 8 PINGs a second for 20 seconds
        server.receive_data(PingFrame(0).serialize() * 8)
        clock.now += 1.0
    out = server.data_to_send()
    assert not calm(out) and sum(1 for f in parse(out) if isinstance(f, PingFrame)) == 160
    assert server.drain_state is DrainState.SERVING


def test_each_request_excuses_one_frame() -> None:
    # A browser-like client: a PRIORITY frame with every request. 40 of them
    # in one second at max_control_rate=10 is not a flood.
    clock = ManualClock(100.0)
    server, client = connection(10, clock)
    for _ in range(40):
        stream_id, headers = client.headers()
        server.receive_data(PriorityFrame(stream_id, depends_on=0, stream_weight=15).serialize() + headers)
    assert not calm(server.data_to_send())
    assert server.drain_state is DrainState.SERVING
    server.receive_data(PingFrame(0).serialize() * 30)  # but 30 PINGs more are
    assert len(calm(server.data_to_send())) == 1


def test_off_counts_nothing() -> None:
    clock = ManualClock(100.0)
    server, _ = connection(None, clock)
    server.receive_data(PingFrame(0).serialize() * 5000)
    assert not calm(server.data_to_send())
    assert server._gate.controls == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_a_bad_max_control_rate_is_named_and_says_how_to_turn_it_off(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_control_rate must be an int >= 1, or None \(off\), got") as info:
        ServerConnection(max_control_rate=value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)
