"""goaway_ext.grpclib against real gRPC peers: grpcio (C-core) servers and clients, and grpclib itself.

No protobuf: raw-bytes codecs and generic handlers (tests/grpc_peers.py).
Every RPC goes over real sockets on 127.0.0.1; loops are bounded in count.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpclib.client
import grpclib.server
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_peers import (
    CHAT,
    UNARY,
    EchoService,
    RawCodec,
    grpcio_client_load,
    methods,
    mixed_load,
    start_grpcio_server,
)
from grpclib.exceptions import StreamTerminatedError
from h2.errors import ErrorCodes

from goaway_ext import GoawayPolicy
from goaway_ext.grpclib import (
    MAX_REPLAYS,
    GoawayChannel,
    GoawayServer,
    enable_goaway,
    grpc_policy,
)


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def port_of(server: grpclib.server.Server) -> int:
    assert server._server is not None
    return int(server._server.sockets[0].getsockname()[1])


# -- grpcio as the server: grpc.max_connection_age_ms recycles connections ---------------

GRPCIO_AGE_OPTIONS = [("grpc.max_connection_age_ms", 150), ("grpc.max_connection_age_grace_ms", 10_000)]


def test_grpcio_max_connection_age_stock_channel_fails_goaway_channel_does_not() -> None:
    async def main() -> tuple[tuple[int, int, list[str]], tuple[int, int, list[str]], int]:
        server, port = await start_grpcio_server(GRPCIO_AGE_OPTIONS)
        try:
            stock = grpclib.client.Channel("127.0.0.1", port, codec=RawCodec())
            before = await mixed_load(stock, 160, 8)
            stock.close()
            ours = GoawayChannel("127.0.0.1", port, codec=RawCodec())
            after = await mixed_load(ours, 160, 8)
            opened = ours.connections_opened
            ours.close()
            return before, after, opened
        finally:
            await server.stop(None)

    before, after, opened = run(main())
    assert after == (160, 0, []), after
    assert opened >= 2  # the server did recycle connections under our channel
    assert before[1] > 0, "the stock channel should lose RPCs in flight on grpcio's GOAWAY"


def test_grpcio_long_server_streams_finish_on_the_old_connection() -> None:
    # Each stream lasts about 4 connection ages; grace is long, so the
    # streams must finish intact on the connection they started on.
    async def main() -> tuple[list[list[bytes]], int]:
        server, port = await start_grpcio_server(
            [("grpc.max_connection_age_ms", 100), ("grpc.max_connection_age_grace_ms", 20_000)])
        try:
            channel = GoawayChannel("127.0.0.1", port, codec=RawCodec())
            _, stream, _ = methods(channel)

            async def one(delay: float) -> list[bytes]:
                await asyncio.sleep(delay)
                return list(await stream(b"40 0.01"))

            results = await asyncio.gather(*(one(0.05 * k) for k in range(6)))
            opened = channel.connections_opened
            # Every old connection is closed once its last RPC ended (bounded wait:
            # the close is scheduled right after the release).
            for _ in range(100):
                old = [p for p in channel._all_protocols if p is not channel._protocol]
                if all(p.handler.connection_lost for p in old):
                    break
                await asyncio.sleep(0.01)
            assert old and all(p.handler.connection_lost for p in old)
            channel.close()
            return results, opened
        finally:
            await server.stop(None)

    results, opened = run(main())
    assert all(got == [b"%d" % k for k in range(40)] for got in results)
    assert opened >= 2


# -- grpcio as the client against a grpclib GoawayServer ------------------------------------


def live_undrained(server: GoawayServer) -> int:
    return sum(1 for protocol in server._goaway_protocols if protocol._h2 is not None and
               not protocol._h2.is_draining)


@pytest.mark.parametrize("policy_args", [
    {"chance": 1.0, "allow_high_chance": True},
    # Seeded (9 drains in 400 requests): unseeded, a run now and then drew at most one (seen once in CI).
    {"chance": 0.02, "seed": 4},
    {"max_age": 0.05},
], ids=["chance-1.0", "chance-0.02", "max_age-50ms"])
def test_grpcio_client_against_goaway_server(policy_args: dict[str, Any]) -> None:
    rpcs = 120 if policy_args.get("chance") == 1.0 else 400

    async def main() -> tuple[tuple[int, int], int, int, int]:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=GoawayPolicy(linger=0.05, **policy_args))
        await server.start("127.0.0.1", 0)
        try:
            result = await grpcio_client_load(port_of(server), rpcs, 4)
            stats = server.goaway_stats
            return result, stats.connections, stats.goaways_total, live_undrained(server)
        finally:
            server.close()
            await server.wait_closed()

    (ok, failed), connections, goaways, undrained = run(main())
    assert (ok, failed) == (rpcs, 0)
    assert goaways >= 2
    # Each connection but the one still serving was told to go away, once.
    assert undrained <= 1
    assert connections == goaways + undrained


# -- grpclib on both sides -------------------------------------------------------------


@pytest.mark.parametrize(("mode", "chance"), [("graceful", 1.0), ("single", 1.0), ("idle", 0.1)])
def test_grpclib_both_sides_under_concurrency(mode: str, chance: float) -> None:
    # Mode idle at chance 1.0 would close each connection at its first idle
    # moment, and a request racing that GOAWAY is refused again and again.
    # Its GOAWAY also waits for a PING ACK and then ping_timeout without a new
    # stream (tests/test_idle_mode.py): 12 workers back to back rarely leave
    # such a gap, so in mode idle this only checks that nothing fails.
    quiet = {"ping_timeout": 0.002} if mode == "idle" else {}

    async def main() -> tuple[tuple[int, int, list[str]], Any, int]:
        server = enable_goaway(grpclib.server.Server([EchoService()], codec=RawCodec()),
                               GoawayPolicy(chance, allow_high_chance=True, mode=mode, linger=0.05, **quiet))
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        try:
            result = await mixed_load(channel, 240, 12, stream_delay=0.0)
            return result, server.goaway_stats, channel.connections_opened
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    (ok, failed, errors), stats, opened = run(main())
    assert (ok, failed, errors) == (240, 0, [])
    if mode != "idle":
        assert stats.goaways_total >= 10
        assert opened >= 10


def test_streams_refused_by_goaway_are_replayed_transparently() -> None:
    # Mode single: the final GOAWAY goes out at once, with last-stream-id the
    # request that asked for it. The client does not read meanwhile (its
    # transport is paused) and sends three more RPCs on the connection: the
    # server refuses them (REFUSED_STREAM), and once the client reads again
    # it replays them on a new connection. No RPC fails.
    def drain_on_header(headers: Any) -> bool | None:
        return True if any(name == "x-drain" for name, _ in headers) else None

    async def main() -> tuple[list[Any], int, int]:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=GoawayPolicy(mode="single", decider=drain_on_header, linger=0.05))
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        unary, _, _ = methods(channel)
        try:
            assert await unary(b"warm") == b"warm"
            (protocol,) = server._goaway_protocols
            assert protocol._h2 is not None
            channel._protocol.connection._transport.pause_reading()
            first = asyncio.ensure_future(unary(b"drain", metadata={"x-drain": "1"}))
            for _ in range(500):  # bounded: until the server sent its final GOAWAY
                if protocol._h2.last_stream_id is not None:
                    break
                await asyncio.sleep(0.01)
            late = [asyncio.ensure_future(unary(b"late%d" % k)) for k in range(3)]
            for _ in range(500):  # until the server refused all three
                if protocol._h2.stats.streams_refused == 3:
                    break
                await asyncio.sleep(0.01)
            refused = protocol._h2.stats.streams_refused
            channel._protocol.connection._transport.resume_reading()
            results = await asyncio.gather(first, *late, return_exceptions=True)
            return results, refused, channel.connections_opened
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    results, refused, opened = run(main())
    assert results == [b"drain", b"late0", b"late1", b"late2"]
    assert refused == 3
    assert opened == 2


# -- a scripted h2 server: refusals decided per stream ----------------------------------


class RefusingServer:
    """A real h2 server on a socket that refuses the first ``refuse`` streams.

    Refused streams get RST_STREAM(REFUSED_STREAM) once the request's first DATA
    frame arrived; later streams get a gRPC echo of the request message.
    ``streams`` lists the stream ids seen, per connection.
    """

    def __init__(self, refuse: int, close_after_answer: bool = False) -> None:
        self.refuse = refuse
        self.close_after_answer = close_after_answer
        self.streams: list[int] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="ascii"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.streams.append(event.stream_id)
                        bodies[event.stream_id] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id in bodies:
                            bodies[event.stream_id] += event.data
                            if len(self.streams) <= self.refuse:
                                conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                                del bodies[event.stream_id]
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id in bodies:
                        body = bodies.pop(event.stream_id)
                        conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        conn.send_data(event.stream_id, body)
                        conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                        if self.close_after_answer:  # as a gRPC server does after its GOAWAY
                            writer.write(conn.data_to_send())
                            await writer.drain()
                            return
                writer.write(conn.data_to_send())
                await writer.drain()
        finally:
            writer.close()


def scripted(refuse: int, call: Callable[[GoawayChannel], Awaitable[Any]]) -> tuple[Any, list[int]]:
    async def main() -> tuple[Any, list[int]]:
        server = RefusingServer(refuse)
        channel = GoawayChannel("127.0.0.1", await server.start(), codec=RawCodec())
        try:
            try:
                result: Any = await call(channel)
            except StreamTerminatedError as exc:
                result = exc
            return result, server.streams
        finally:
            channel.close()
            await server.stop()

    return run(main(), timeout=30.0)  # type: ignore[no-any-return]


def test_unary_refused_with_refused_stream_is_replayed() -> None:
    result, streams = scripted(2, lambda channel: methods(channel)[0](b"hello"))
    assert result == b"hello"
    assert len(streams) == 3


def test_server_stream_refused_is_replayed() -> None:
    async def call(channel: GoawayChannel) -> Any:
        # The scripted server echoes the request as the one message of the stream.
        return await methods(channel)[1](b"3 0")

    result, streams = scripted(1, call)
    assert result == [b"3 0"]
    assert len(streams) == 2


def test_partly_sent_request_stream_is_never_replayed() -> None:
    async def call(channel: GoawayChannel) -> Any:
        _, _, upload = methods(channel)
        async with upload.open() as stream:
            await stream.send_message(b"part-1")
            await asyncio.sleep(0.2)  # the refusal arrives while the request stream is open
            await stream.send_message(b"part-2", end=True)
            return await stream.recv_message()

    result, streams = scripted(1, call)
    assert isinstance(result, StreamTerminatedError), result
    assert len(streams) == 1


def test_replays_are_bounded() -> None:
    result, streams = scripted(1000, lambda channel: methods(channel)[0](b"x"))
    assert isinstance(result, StreamTerminatedError), result
    assert len(streams) == MAX_REPLAYS + 1


# -- shutdown ------------------------------------------------------------------------


def _streams_during_close(make_server: Callable[[], grpclib.server.Server], rpc_timeout: float) -> Any:
    async def main() -> Any:
        server = make_server()
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        _, stream, _ = methods(channel)
        calls = [asyncio.ensure_future(stream(b"15 0.02", timeout=rpc_timeout)) for _ in range(4)]
        await asyncio.sleep(0.1)  # the streams are under way
        server.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.wait_for(server.wait_closed(), 10)
        channel.close()
        return results

    return run(main())


def test_close_drains_rpcs_in_flight() -> None:
    results = _streams_during_close(lambda: enable_goaway(grpclib.server.Server([EchoService()], codec=RawCodec()),
                                                          GoawayPolicy(linger=0.05)), 30.0)
    assert results == [[b"%d" % k for k in range(15)]] * 4


def test_stock_close_cancels_rpcs_in_flight() -> None:
    # The "before": grpclib's own Server.close() cancels every running RPC;
    # the client is never told and waits until its deadline.
    results = _streams_during_close(lambda: grpclib.server.Server([EchoService()], codec=RawCodec()), 1.5)
    assert all(result != [b"%d" % k for k in range(15)] for result in results)


def test_close_with_grace_cuts_rpcs_that_outlive_it() -> None:
    async def main() -> tuple[Any, Any]:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=grpc_policy(max_connection_age_grace=0.2, linger=0.05))
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        _, stream, _ = methods(channel)
        call = asyncio.ensure_future(stream(b"1000 0.01"))
        await asyncio.sleep(0.1)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        result = await asyncio.gather(call, return_exceptions=True)
        channel.close()
        return result[0], server.goaway_stats

    result, stats = run(main())
    assert isinstance(result, Exception)
    assert stats.streams_cut == 1
    assert stats.goaways == {"shutdown": 1}


# -- configuration -------------------------------------------------------------------


def test_grpc_policy_maps_grpc_names() -> None:
    policy = grpc_policy(max_connection_age=30.0, max_connection_age_grace=5.0, chance=0.001)
    assert (policy.max_age, policy.grace, policy.chance, policy.jitter) == (30.0, 5.0, 0.001, 0.1)
    with pytest.raises(ValueError, match="max_connection_age must be"):
        grpc_policy(max_connection_age=-1.0)
    with pytest.raises(ValueError, match="max_connection_age_grace must be"):
        grpc_policy(max_connection_age_grace=0.0)


def test_enable_goaway_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"grpclib\.server\.Server"):
        enable_goaway("not a server")  # type: ignore[arg-type]

    async def started() -> None:
        server = grpclib.server.Server([EchoService()], codec=RawCodec())
        with pytest.raises(TypeError, match="policy must be"):
            enable_goaway(server, 0.5)  # type: ignore[arg-type]
        await server.start("127.0.0.1", 0)
        try:
            with pytest.raises(RuntimeError, match=r"before Server\.start"):
                enable_goaway(server)
        finally:
            server.close()
            await server.wait_closed()

    run(started())


def test_free_port_is_closed_after_wait_closed() -> None:
    async def main() -> int:
        server = GoawayServer([EchoService()], codec=RawCodec(), policy=GoawayPolicy(linger=0.05))
        await server.start("127.0.0.1", 0)
        port = port_of(server)
        channel = GoawayChannel("127.0.0.1", port, codec=RawCodec())
        assert await methods(channel)[0](b"ping") == b"ping"
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        channel.close()
        return port

    port = run(main())
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_import_without_the_extra_names_it() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['grpclib'] = None; import goaway_ext.grpclib"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: goaway_ext.grpclib needs grpclib"), last
    assert "pip install '.[grpclib]'" in last


def test_grpc_policy_max_connection_idle() -> None:
    assert grpc_policy(max_connection_idle=60.0).max_idle == 60.0
    with pytest.raises(ValueError, match=r"^max_connection_idle must be"):
        grpc_policy(max_connection_idle=-1.0)


def test_max_connection_idle_drains_a_connection_without_rpcs() -> None:
    async def main() -> tuple[list[bytes], dict[str, int], dict[str, int], int, int]:
        server = enable_goaway(grpclib.server.Server([EchoService()], codec=RawCodec()),
                               grpc_policy(max_connection_idle=0.15, linger=0.05))
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        unary, stream, _ = methods(channel)
        try:
            # A stream three times longer than the idle limit is an RPC in
            # flight all along: no drain while it runs.
            got = list(await stream(b"10 0.05"))
            during = dict(server.goaway_stats.goaways)
            for _ in range(500):  # bounded: until the idle connection drained and closed
                if server.goaway_stats.goaways.get("max_idle") and not server._goaway_protocols:
                    break
                await asyncio.sleep(0.01)
            after = dict(server.goaway_stats.goaways)
            assert await unary(b"again") == b"again"
            return got, during, after, channel.connections_opened, server.goaway_stats.connections
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    got, during, after, opened, connections = run(main())
    assert got == [b"%d" % k for k in range(10)]
    assert during == {}
    assert after == {"max_idle": 1}
    assert opened == 2 and connections == 2


def test_readme_grpc_example_runs() -> None:
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists() and os.environ.get("GOAWAY_EXT_FROM_WHEEL"):
        pytest.skip("the wheel suite runs without the source tree's README")
    text = readme.read_text()
    section = text[text.index("## gRPC (grpclib)"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = block.group(1).replace("50051", str(port))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"20 RPCs, 0 failed, (\d+) connections, \{'max_age': (\d+)\}\n", done.stdout)
    assert match, done.stdout
    assert int(match.group(1)) >= 2 and int(match.group(2)) >= 1


def test_serving_shortcut_matches_server_connection() -> None:
    # goaway_ext.grpclib's serving connection calls h2's data_to_send directly;
    # that is only right while ServerConnection.data_to_send does nothing else
    # in state SERVING.
    import inspect

    import goaway_ext.server
    from goaway_ext.server import ServerConnection

    body = inspect.getsource(goaway_ext.server._PY_DATA_TO_SEND).split('"""')[2]
    first = [line.strip() for line in body.strip().splitlines()[:2]]
    assert first[0] == "if self._state is _SERVING:", first
    assert first[1] in ("return super().data_to_send(amount)", "return _H2_DATA_TO_SEND(self, amount)"), first
    if "_H2_DATA_TO_SEND" in first[1]:
        assert goaway_ext.server._H2_DATA_TO_SEND is h2.connection.H2Connection.data_to_send
    # The class's method while serving (the core's serving pair) hands out h2's bytes, nothing more.
    conn = ServerConnection()
    plain = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    plain.initiate_connection()
    assert ServerConnection.data_to_send(conn, 7) == plain.data_to_send(7)
    assert ServerConnection.data_to_send(conn) == plain.data_to_send()


def test_client_streams_in_flight_survive_grpcio_recycles() -> None:
    # Request streams (Upload: 8 messages, 30 ms apart) opened before a
    # GOAWAY finish on their connection; each is sent once, never replayed.
    async def main() -> tuple[list[bytes], int]:
        server, port = await start_grpcio_server(
            [("grpc.max_connection_age_ms", 100), ("grpc.max_connection_age_grace_ms", 20_000)])
        try:
            channel = GoawayChannel("127.0.0.1", port, codec=RawCodec())
            _, _, upload = methods(channel)

            async def one(index: int) -> bytes:
                await asyncio.sleep(0.04 * index)
                async with upload.open() as stream:
                    for part in range(8):
                        await stream.send_message(b"%d." % part, end=part == 7)
                        await asyncio.sleep(0.03)
                    return bytes(await stream.recv_message())

            results = await asyncio.gather(*(one(k) for k in range(8)))
            opened = channel.connections_opened
            channel.close()
            return results, opened
        finally:
            await server.stop(None)

    results, opened = run(main())
    assert results == [b"0.1.2.3.4.5.6.7."] * 8
    assert opened >= 2


def test_drains_reach_process_metrics_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from goaway_ext import metrics

    before = metrics.totals()

    async def main() -> Any:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=GoawayPolicy(1.0, allow_high_chance=True, linger=0.01))
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        unary, _, _ = methods(channel)
        for index in range(5):
            assert await unary(b"%d" % index) == b"%d" % index
        channel.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return server.goaway_stats

    with caplog.at_level("INFO", logger="goaway_ext.grpclib"):
        stats = run(main())
    after = metrics.totals()
    assert stats.connections == 5 and stats.goaways == {"chance": 5}
    assert after.connections - before.connections == 5
    assert after.goaways_sent.get("chance", 0) - before.goaways_sent.get("chance", 0) == 10  # 2 frames each
    assert after.drains - before.drains == stats.drained
    lines = [r.getMessage() for r in caplog.records if r.name == "goaway_ext.grpclib"]
    assert len(lines) == 5
    assert all(line.startswith("drained gRPC connection from 127.0.0.1:") and "reason=chance" in line
               for line in lines), lines


@pytest.mark.parametrize("channel_class", [grpclib.client.Channel, GoawayChannel])
def test_response_read_after_the_server_closed(channel_class: type) -> None:
    # The server answers in full and closes the socket at once; the client
    # task reads the reply only afterwards.
    async def main() -> Any:
        server = RefusingServer(0, close_after_answer=True)
        channel = channel_class("127.0.0.1", await server.start(), codec=RawCodec())
        unary, _, _ = methods(channel)
        try:
            async with unary.open() as stream:
                await stream.send_message(b"late reader", end=True)
                await asyncio.sleep(0.3)  # answer and FIN arrive meanwhile
                return await stream.recv_message()
        except StreamTerminatedError as exc:
            return exc
        finally:
            channel.close()
            await server.stop()

    result = run(main(), timeout=30.0)
    if channel_class is GoawayChannel:
        assert result == b"late reader"
    else:  # the "before": grpclib fails the RPC whose answer it already holds
        assert isinstance(result, StreamTerminatedError) and "Connection lost" in str(result), result


def test_bidi_streams_in_flight_survive_grpcio_recycles() -> None:
    # Each Chat call sends a message and reads its answer, 10 times, 30 ms
    # apart: every call spans several connection ages.
    async def main() -> tuple[list[list[bytes]], int]:
        server, port = await start_grpcio_server(
            [("grpc.max_connection_age_ms", 100), ("grpc.max_connection_age_grace_ms", 20_000)])
        try:
            channel = GoawayChannel("127.0.0.1", port, codec=RawCodec())
            chat = grpclib.client.StreamStreamMethod(channel, CHAT, bytes, bytes)

            async def one(index: int) -> list[bytes]:
                await asyncio.sleep(0.04 * index)
                answers = []
                async with chat.open() as stream:
                    for turn in range(10):
                        await stream.send_message(b"c%d-t%d" % (index, turn), end=turn == 9)
                        answers.append(bytes(await stream.recv_message()))
                        await asyncio.sleep(0.03)
                    assert await stream.recv_message() is None
                return answers

            results = await asyncio.gather(*(one(k) for k in range(6)))
            opened = channel.connections_opened
            channel.close()
            return results, opened
        finally:
            await server.stop(None)

    results, opened = run(main())
    assert results == [[b"C%d-T%d" % (k, t) for t in range(10)] for k in range(6)]
    assert opened >= 2


def test_a_fair_share_policy_moves_its_chance_while_the_server_serves() -> None:
    import time

    from goaway_ext.fairshare import FairShare, StaticFleetView

    view = StaticFleetView(time.monotonic)
    view.set("b1", 10)
    view.set("b2", 0)  # an empty peer: b1 sheds at the ceiling once update() ran
    fair = FairShare(view, "b1", clock=time.monotonic, ceiling=1.0, allow_high_chance=True, interval=0.05,
                     max_drain_rate=1.0)

    async def main() -> tuple[int, int, tuple[int, int], bool]:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=GoawayPolicy(fair_share=fair, mode="single", linger=30.0))
        assert fair.chance == 0.0  # nothing moves it before the server starts
        await server.start("127.0.0.1", 0)
        channel = GoawayChannel("127.0.0.1", port_of(server), codec=RawCodec())
        echo = grpclib.client.UnaryUnaryMethod(channel, UNARY, bytes, bytes)
        ok, counts = 0, (0, 0)
        try:
            for _ in range(500):
                assert await echo(b"x") == b"x"
                ok += 1
                # The drained connection lingers (30 s): open, no longer serving.
                counts = (server.open_connections, server.serving_connections)
                if server.goaway_stats.goaways_total:
                    break
                await asyncio.sleep(0.01)
        finally:
            channel.close()
            server.close()
            await server.wait_closed()
        return ok, server.goaway_stats.goaways_total, counts, server._goaway_fair_task is None

    ok, goaways, counts, stopped = run(main())
    assert fair.chance == 1.0 and fair.state == "shedding"
    assert goaways >= 1 and ok >= 1 and counts == (1, 0) and stopped
