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


# -- the integrations over real sockets: the same bound, from the same ServerConnection ---------


def _flood_frames() -> bytes:
    # Answered PINGs and WINDOW_UPDATEs for stream 1 (open, then closed: h2 then makes no event).
    return (PingFrame(0).serialize() + WindowUpdateFrame(1, window_increment=1).serialize()) * 250


def _get_stream_1() -> bytes:
    return RawClient().headers()[1]


def test_hypercorn_closes_a_flood_with_enhance_your_calm() -> None:
    from hypercorn.config import Config
    from raw_h2 import flood_until_goaway
    from test_hypercorn import serve_in_thread

    from goaway_ext.hypercorn import enable_goaway

    config = Config()
    enable_goaway(config)
    with serve_in_thread(config) as port:
        goaway, _, closed = flood_until_goaway(("127.0.0.1", port), _flood_frames(), setup=_get_stream_1())
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM and goaway.additional_data == b"control frame flood"
    assert goaway.last_stream_id == 1 and closed


def test_hypercorn_max_control_rate_key_and_flag() -> None:
    from hypercorn.config import Config
    from test_hypercorn import APP, _wrapper

    from goaway_ext.hypercorn import _setup_for, policy_for

    def rate(mapping: dict[str, object]) -> int | None:
        config = Config.from_mapping(mapping)
        policy_for(config)
        return _setup_for(config).max_control_rate

    assert rate({"goaway_max_control_rate": 50}) == 50
    assert rate({"goaway_max_control_rate": 0}) is None
    assert rate({"goaway_chance": 0.001}) == 1000
    with pytest.raises(ValueError, match=r"goaway_max_control_rate must be an int >= 1, or 0 \(off\), got -1"):
        policy_for(Config.from_mapping({"goaway_max_control_rate": -1}))
    result = _wrapper(APP, "--goaway-max-control-rate", "-5", "--bind", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert "--goaway-max-control-rate must be an int >= 1, or 0 (off), got -5" in result.stderr


def test_grpclib_closes_a_flood_with_enhance_your_calm() -> None:
    import asyncio

    import grpclib.server
    from grpc_peers import EchoService, RawCodec
    from raw_h2 import flood_until_goaway

    from goaway_ext.grpclib import GoawayServer, enable_goaway

    async def main() -> tuple[GoAwayFrame, int, bool]:
        with pytest.raises(ValueError, match=r"max_control_rate must be an int >= 1, or None \(off\), got 0"):
            enable_goaway(grpclib.server.Server([EchoService()], codec=RawCodec()), max_control_rate=0)
        assert GoawayServer([EchoService()], codec=RawCodec(), max_control_rate=None).goaway_max_control_rate is None
        server = GoawayServer([EchoService()], codec=RawCodec())
        await server.start("127.0.0.1", 0)
        try:
            assert server._server is not None
            port = server._server.sockets[0].getsockname()[1]
            return await asyncio.to_thread(flood_until_goaway, ("127.0.0.1", port), _flood_frames(),
                                           setup=_get_stream_1())
        finally:
            server.close()
            await server.wait_closed()

    goaway, _, closed = asyncio.run(asyncio.wait_for(main(), 60))
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM and goaway.additional_data == b"control frame flood"
    assert closed
