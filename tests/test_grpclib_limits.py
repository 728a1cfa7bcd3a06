"""grpclib's ``send_timeout``: a client that reads nothing of our response is closed, not kept for ever.

Stock grpclib waits for ever once its transport pauses writing (its writers
wait on ``write_ready``), holding the connection and the RPC. ``GoawayServer``
watches that wait (``goaway_ext._stall.WriteStall``, a timer only while
writing is paused): a period without progress gets GOAWAY(ENHANCE_YOUR_CALM,
``send_timeout``), then the connection is closed (aborted a second later if
the peer still reads nothing). Over a real socket with a tiny receive buffer
that the test never reads; every wait bounded, no duration asserted.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from grpc_peers import UNARY, EchoService, RawCodec
from hyperframe.frame import DataFrame, SettingsFrame, WindowUpdateFrame
from raw_h2 import RawClient

from goaway_ext.grpclib import GoawayServer

MESSAGE = b"x" * (1 << 20)  # echoed back: a 1 MiB response that a non-reading peer cannot take


def unary_request() -> bytes:
    client = RawClient()
    settings = SettingsFrame(0)
    settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
    window = WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535)
    _, headers = client.headers(end_stream=False, headers=[
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", UNARY.encode()), (b":authority", b"limits"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    body = b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE
    frames = []
    for start in range(0, len(body), 16384):
        frame = DataFrame(1)
        frame.data = body[start : start + 16384]
        if start + 16384 >= len(body):
            frame.flags.add("END_STREAM")
        frames.append(frame.serialize())
    # The ACK of the server's SETTINGS: its larger stream window applies only from then on.
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    return client.preface() + settings.serialize() + ack + window.serialize() + headers + b"".join(frames)


@pytest.mark.parametrize("send_timeout", [0.3, None])
def test_a_client_that_never_reads_its_response_is_closed_at_send_timeout(send_timeout: float | None) -> None:
    async def main() -> None:
        server = GoawayServer([EchoService()], codec=RawCodec(), send_timeout=send_timeout)
        await server.start("127.0.0.1", 0)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            assert server._server is not None
            await loop.sock_connect(sock, server._server.sockets[0].getsockname()[:2])
            for _ in range(200):
                if server._goaway_protocols:
                    break
                await asyncio.sleep(0.05)
            (protocol,) = server._goaway_protocols
            assert protocol._goaway_transport is not None
            # The server's send buffer small too, so its transport pauses after a few KiB, not megabytes.
            protocol._goaway_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await asyncio.wait_for(loop.sock_sendall(sock, unary_request()), 30)
            for _ in range(600):  # up to 30 s
                if send_timeout is None and not protocol.connection.write_ready.is_set():
                    break  # off: writing paused, and nothing will close it
                if send_timeout is not None and not server.open_connections:
                    break
                await asyncio.sleep(0.05)
            if send_timeout is None:
                assert not protocol.connection.write_ready.is_set(), "writing never paused"
                await asyncio.sleep(1.0)  # three periods of the other case: still open
                assert server.open_connections == 1
                assert server.goaway_stats.goaways == {}
            else:
                assert server.open_connections == 0, "the connection of a peer that never reads is still open"
                assert server.goaway_stats.goaways == {"send_timeout": 1}
        finally:
            sock.close()
            server.close()
            await asyncio.wait_for(server.wait_closed(), 30)

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("value", [0, -1.0, "1", float("inf")])
def test_a_bad_send_timeout_is_named_and_says_how_to_turn_it_off(value: object) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match=r"send_timeout must be a positive number of seconds, or None \(off\)"):
            GoawayServer([EchoService()], codec=RawCodec(), send_timeout=value)  # type: ignore[arg-type]

    asyncio.run(main())


class _FakeTransport:
    """What WriteStall reads of a transport: its write buffer size and whether it is closing."""

    def __init__(self) -> None:
        self.size = 100_000

    def get_write_buffer_size(self) -> int:
        return self.size

    def is_closing(self) -> bool:
        return False


def test_write_stall_keeps_a_slow_but_steady_reader_and_ends_a_silent_one() -> None:
    from goaway_ext._stall import WriteStall

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport = _FakeTransport()
        stalls: list[float] = []
        watch = WriteStall(loop, transport, 0.1, lambda: stalls.append(loop.time()))  # type: ignore[arg-type]
        watch.paused()
        # Five periods; the peer takes a few bytes ten times a period (timers run in the order
        # they are due, so each period holds some of them however late the loop runs).
        for _ in range(50):
            await asyncio.sleep(0.01)
            transport.size -= 10
        assert not stalls
        for _ in range(100):  # then nothing at all: the next whole period ends it, once
            if stalls:
                break
            await asyncio.sleep(0.02)
        assert len(stalls) == 1
        watch.resumed()
        watch.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))
