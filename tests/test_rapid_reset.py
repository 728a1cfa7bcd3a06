"""Rapid reset (CVE-2023-44487) is bounded in ServerConnection (issue 12, item 6).

A client that opens streams and resets them at once (or keeps opening streams
after the final GOAWAY, which are refused) costs the server work for nothing.
Envoy's rule, kept here: once a window of ``rapid_reset_window`` streams (500 by
default) is complete, more than half of them reset by the client before their
response was complete, or refused as late, gets GOAWAY(ENHANCE_YOUR_CALM) and
``close_at`` = now. In memory with the raw client of ``test_hostile``, then
over a real socket against the asyncio server with a second, well-behaved
client that keeps getting answers.
"""

from __future__ import annotations

import asyncio

import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame
from manual_clock import ManualClock
from raw_h2 import RawClient
from raw_h2 import parse_frames as parse
from test_hostile import start

from goaway_ext import ConnectionDrained, GoawayPolicy, GoawaySent, H2Server, ServerConnection
from goaway_ext.asyncio_client import H2Client
from goaway_ext.asyncio_server import builtin_app
from goaway_ext.server import DrainState


def flood(server: ServerConnection, client: RawClient, pairs: int, batch: int = 50) -> tuple[list[object], bytes]:
    """``pairs`` HEADERS+RST_STREAM, ``batch`` per read; every event and every byte the server returned."""
    events: list[object] = []
    out = b""
    for _ in range(pairs // batch):
        wire = b""
        for _ in range(batch):
            stream_id, frame = client.headers()
            wire += frame + client.reset(stream_id)
        events += server.receive_data(wire)
        out += server.data_to_send()
    return events, out


def calm_goaways(out: bytes) -> list[GoAwayFrame]:
    return [f for f in parse(out) if isinstance(f, GoAwayFrame) and f.error_code == ErrorCodes.ENHANCE_YOUR_CALM]


def test_a_reset_flood_gets_enhance_your_calm_and_close_now_even_with_a_stream_held() -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(max_requests=1000), clock=clock)
    client = RawClient()
    start(server, client)
    _, data = client.headers(end_stream=False)  # the issue: --max-requests did not stop it with one held
    server.receive_data(data)
    events, out = flood(server, client, 1500)
    goaways = calm_goaways(out)
    assert len(goaways) == 1 and goaways[0].additional_data == b"rapid reset"
    ours = [e for e in events if isinstance(e, (GoawaySent, ConnectionDrained))]
    assert [type(e) for e in ours] == [GoawaySent, ConnectionDrained]
    assert ours[0] == GoawaySent(last_stream_id=goaways[0].last_stream_id, final=True, reason="rapid_reset")
    seen = sum(1 for e in events if isinstance(e, h2.events.RequestReceived))
    assert 500 <= seen <= 1000 + 50, seen  # caught within two windows (and one read)
    assert server.drain_state is DrainState.DRAINED and server.close_at == clock.now
    assert server.next_deadline() == clock.now  # the owner closes the socket at once
    # Until the socket is closed, nothing more is answered or handed to the application.
    more, rest = flood(server, client, 500)
    assert rest == b"" and not [e for e in more if isinstance(e, h2.events.RequestReceived)]
    assert server.stats.goaways_sent == 1


def test_refused_late_streams_count_too_a_flood_after_the_final_goaway_is_closed() -> None:
    # In hypercorn during a drain, late streams are consumed inside
    # receive_data, so hypercorn's own limit never sees them: this one does.
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(mode="single"), clock=clock)
    client = RawClient()
    start(server, client)
    held, data = client.headers(end_stream=False)
    server.receive_data(data)
    server.start_drain("test")
    server.handle_timer(clock.now)
    server.data_to_send()
    out = b""
    for _ in range(40):
        wire = b"".join(client.headers()[1] for _ in range(50))  # no resets: every one is refused as late
        server.receive_data(wire)
        out += server.data_to_send()
        if server.close_at is not None:
            break
    assert len(calm_goaways(out)) == 1 and calm_goaways(out)[0].last_stream_id == held
    assert 500 <= server.stats.streams_refused <= 1050
    assert server.close_at == clock.now


def test_a_client_that_cancels_some_requests_is_never_cut() -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(), clock=clock)
    client = RawClient()
    start(server, client)
    for index in range(4000):
        stream_id, frame = client.headers(end_stream=False)
        if index % 5 < 2:  # 40% cancelled, far more than browsers or proxies do
            events = server.receive_data(frame + client.reset(stream_id))
        else:
            events = server.receive_data(frame + client.end(stream_id))
            server.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
        assert not [e for e in events if isinstance(e, (GoawaySent, ConnectionDrained))]
        server.data_to_send()
    assert server.drain_state is DrainState.SERVING


@pytest.mark.parametrize(("window", "caught"), [(None, None), (10, (10, 20 + 50)), (2000, (2000, 4000 + 50))])
def test_the_window_is_configurable_and_none_turns_it_off(window: int | None, caught: tuple[int, int] | None) -> None:
    clock = ManualClock(100.0)
    server = ServerConnection(policy=GoawayPolicy(rapid_reset_window=window), clock=clock)
    client = RawClient()
    start(server, client)
    events, out = flood(server, client, 5000)
    seen = sum(1 for e in events if isinstance(e, h2.events.RequestReceived))
    if caught is None:
        assert seen == 5000 and calm_goaways(out) == [] and server.drain_state is DrainState.SERVING
    else:
        assert caught[0] <= seen <= caught[1], seen
        assert len(calm_goaways(out)) == 1


# -- over a real socket, against the asyncio server --------------------------------------------------


async def _flood_and_serve() -> tuple[list[Frame], list[int], dict[str, object]]:
    server = H2Server(builtin_app, policy=GoawayPolicy())
    host, port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        client = RawClient()
        writer.write(client.preface())
        frames: list[Frame] = []
        statuses: list[int] = []

        async def read_all() -> None:
            buffer = b""
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 20.0)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length = int.from_bytes(buffer[:3], "big")
                    frames.extend(parse(buffer[: 9 + length]))
                    buffer = buffer[9 + length :]

        reading = asyncio.ensure_future(read_all())
        async with H2Client(host, port, timeout=10.0) as other:
            for _ in range(40):  # up to 40 x 100 pairs; the server closes long before
                if reading.done():
                    break
                writer.write(b"".join(h + client.reset(sid) for sid, h in (client.headers() for _ in range(100))))
                try:
                    await writer.drain()
                except ConnectionError:
                    break
                statuses.append((await other.request("GET", "/")).status)  # another client is still answered
            await asyncio.wait_for(reading, 20.0)
            statuses.append((await other.request("GET", "/")).status)
        writer.close()
        return frames, statuses, server.stats()
    finally:
        await server.shutdown(timeout=2.0)


def test_a_reset_flood_on_a_real_socket_is_cut_and_other_clients_are_served() -> None:
    frames, statuses, stats = asyncio.run(_flood_and_serve())
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert isinstance(frames[0], SettingsFrame) and not [f for f in frames if isinstance(f, HeadersFrame)]
    assert set(statuses) == {200} and len(statuses) >= 2
    assert int(stats["requests"]) <= 1100 + 10  # type: ignore[call-overload]
