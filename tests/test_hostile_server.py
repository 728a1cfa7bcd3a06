"""Hostile peers against the asyncio server (``H2Server``) over real sockets: every limit floods.

Issue 12: reset streams are forgotten with everything they held; a peer that
does not read stops being read and is dropped past ``max_control_frames``;
request bodies get their window back only while the connection buffers less
than ``max_buffered``; ``close_at`` closes even a peer that does not read;
silent sockets are reaped (``handshake_timeout``, ``idle_timeout``); an
oversized body is answered 413, never REFUSED_STREAM, and ``H2Client`` does
not send it again. Memory is measured with ``tracemalloc`` (the server runs
in the test's process), after a warm-up. Every wait is bounded; no test
asserts a duration.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from raw_h2 import RawClient
from raw_h2 import parse_frames as parse

from goaway_ext import GoawayPolicy, H2Client, H2Server
from goaway_ext.asyncio_server import Request, ResponseStream, builtin_app

MB = 1024 * 1024
POST = [(b":method", b"POST"), (b":path", b"/echo"), (b":scheme", b"http"), (b":authority", b"hostile")]


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


def serve(test: Callable[[H2Server], Awaitable[None]], handler: Any = builtin_app, **options: Any) -> None:
    """Run ``test(server)`` against a started server on 127.0.0.1, then shut it down."""

    async def main() -> None:
        server = H2Server(handler, **options)
        await server.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(test(server), 120)
        finally:
            await server.shutdown(timeout=2.0)

    asyncio.run(main())


class Wire:
    """A raw client socket: write frames, read frames (or never read at all)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.client = RawClient()
        self.buffer = b""

    @classmethod
    async def open(cls, server: H2Server, *, settings: bytes = b"") -> Wire:
        assert server.address is not None
        reader, writer = await asyncio.open_connection(*server.address)
        wire = cls(reader, writer)
        writer.write(wire.client.preface() + settings)
        return wire

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frames(self, until: Callable[[Frame], bool], timeout: float = 30.0) -> list[Frame]:
        """Read frames until one matches ``until`` (returned last) or EOF (AssertionError)."""
        seen: list[Frame] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while len(self.buffer) >= 9 and len(self.buffer) >= 9 + int.from_bytes(self.buffer[:3], "big"):
                size = 9 + int.from_bytes(self.buffer[:3], "big")
                (frame,) = parse(self.buffer[:size])
                self.buffer = self.buffer[size:]
                seen.append(frame)
                if until(frame):
                    return seen
            chunk = await asyncio.wait_for(self.reader.read(65536), deadline - loop.time())
            if not chunk:
                raise AssertionError(f"EOF before the awaited frame; saw {seen[-5:]}")
            self.buffer += chunk

    async def at_eof(self, timeout: float = 30.0) -> bool:
        """True once the server closed the connection (within ``timeout``)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except ConnectionError:
            return True
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


def data(stream_id: int, payload: bytes, end_stream: bool = False) -> bytes:
    frame = DataFrame(stream_id)
    frame.data = payload
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def only_protocol(server: H2Server) -> Any:
    (proto,) = server._protocols
    return proto


async def well_behaved_get(server: H2Server) -> None:
    assert server.address is not None
    async with H2Client(*server.address, timeout=30) as client:
        response = await client.request("GET", "/")
        assert response.status == 200


async def wait_all_closed(server: H2Server, tries: int) -> None:
    """Wait, ``tries`` times 50 ms at most, until the server holds no connection (the caller asserts it)."""
    for _ in range(tries):
        if not server._protocols:
            return
        await asyncio.sleep(0.05)


# -- 1. reset streams are forgotten --------------------------------------------------------------


@pytest.mark.parametrize("plain_h2", [False, True], ids=["ServerConnection", "plain-h2"])
def test_reset_streams_free_their_entry_body_and_task(traced: None, plain_h2: bool) -> None:
    # Each stream: HEADERS, 16 KiB of body, RST_STREAM; 50 per write. Before
    # the fix each kept its _streams entry and its body until the connection
    # closed (60,000 of them: +42 MB).
    chunk = b"x" * 16384

    async def flood(server: H2Server) -> None:
        wire = await Wire.open(server)
        marks: dict[int, int] = {}
        sent = 0
        for batch in range(200):
            out = b""
            for _ in range(50):
                stream_id, headers = wire.client.headers(end_stream=False, headers=POST)
                out += headers + data(stream_id, chunk) + wire.client.reset(stream_id)
            await wire.send(out)
            sent += 50
            if batch in (99, 199):  # 5,000 streams: past the 4,096 closed streams h2 remembers
                ping = PingFrame(0)
                ping.opaque_data = mark = b"%08d" % batch
                await wire.send(ping.serialize())
                await wire.frames(lambda f, m=mark: isinstance(f, PingFrame) and f.opaque_data == m)
                proto = only_protocol(server)
                assert proto._streams == {} and proto._buffered == 0 and proto._owed == 0
                marks[batch] = live_bytes()
        growth = marks[199] - marks[99]
        assert growth < 512 * 1024, f"memory grew by {growth} bytes over 5,000 reset streams"
        await well_behaved_get(server)
        wire.close()

    # Memory per reset stream, so the rapid-reset limit (tests/test_rapid_reset.py),
    # which would close this connection after about 500 streams, is off here.
    serve(flood, plain_h2=plain_h2, policy=GoawayPolicy(rapid_reset_window=None))


def test_bodies_that_never_finish_are_answered_413_and_freed(traced: None) -> None:
    # No content-length: the server learns the size as the bytes arrive. Each
    # stream goes past max_body and never ends its body.
    chunk = b"y" * 16000

    async def flood(server: H2Server) -> None:
        wire = await Wire.open(server)
        before = live_bytes()
        for _ in range(40):
            stream_id, headers = wire.client.headers(end_stream=False, headers=POST)
            await wire.send(headers + b"".join(data(stream_id, chunk) for _ in range(3)))
            frames = await wire.frames(lambda f, s=stream_id: isinstance(f, RstStreamFrame) and f.stream_id == s)
            statuses = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == stream_id]
            assert statuses, "no response headers before the reset"
            reset = frames[-1]
            assert reset.error_code == ErrorCodes.NO_ERROR  # not REFUSED_STREAM: never "retry me"
        proto = only_protocol(server)
        assert proto._streams == {} and proto._buffered == 0
        growth = live_bytes() - before
        assert growth < 2 * MB, f"40 oversized bodies left {growth} bytes behind"
        wire.close()

    serve(flood, max_body=32 * 1024)


# -- 6. oversized bodies: 413, not retried ------------------------------------------------------------


def test_an_oversized_upload_gets_413_and_h2client_does_not_retry_it() -> None:
    async def upload(server: H2Server) -> None:
        assert server.address is not None
        async with H2Client(*server.address, timeout=30) as client:
            response = await client.request("POST", "/echo", body=b"z" * (2 * MB))
            assert response.status == 413
            assert b"larger than" in response.body
            assert client.requests_retried == 0 and client.streams_refused == 0
            assert client.connections_opened == 1
            # The connection is still good for the next request.
            ok = await client.request("POST", "/echo", body=b"small")
            assert (ok.status, ok.body) == (200, b"small")
        assert server.stats()["requests"] == 2

    serve(upload)


# -- 2. a peer that does not read --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_a_control_frame_flood_from_a_peer_that_never_reads_is_closed(kind: str) -> None:
    async def flood(server: H2Server) -> None:
        assert server.address is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, server.address)
        client = RawClient()
        if kind == "ping":
            frame: Frame = PingFrame(0)
        else:
            frame = SettingsFrame(0)
            frame.settings = {SettingsFrame.ENABLE_PUSH: 0}
        batch = client.preface() + frame.serialize() * 1000
        biggest = 0
        sent = 0
        try:
            for _ in range(1000):  # up to 1,000,000 frames
                await asyncio.wait_for(loop.sock_sendall(sock, batch), 5)
                sent += 1000
                batch = frame.serialize() * 1000
                for proto in list(server._protocols):
                    if proto.transport is not None:
                        biggest = max(biggest, proto.transport.get_write_buffer_size())
                if not server._protocols:
                    break
        except (ConnectionError, asyncio.TimeoutError):
            pass
        # Either the server dropped us mid-flood, or it stopped reading and our
        # send blocked; in both cases it must be gone soon, without our help.
        await wait_all_closed(server, 300)
        assert not server._protocols, "the connection of a peer that never reads is still open"
        assert biggest <= 1 * MB, f"write buffer reached {biggest} bytes"
        assert sent < 1_000_000
        sock.close()
        await well_behaved_get(server)

    serve(flood, max_control_rate=None)  # the queued-answers bound alone (the rate bound has its own test)


async def flood_until_calm(wire: Wire, batch: bytes) -> tuple[GoAwayFrame, int]:
    """Send ``batch`` (500 frames) until GOAWAY(ENHANCE_YOUR_CALM, control frame flood); it and the frames sent."""
    goaway: asyncio.Future[list[Frame]] = asyncio.ensure_future(wire.frames(lambda f: isinstance(f, GoAwayFrame)))
    sent = 0
    try:
        for _ in range(200):  # up to 100,000 frames; the limit is 1,000 a second
            if goaway.done():
                break
            await asyncio.wait_for(wire.send(batch), 30)
            sent += 500
    except ConnectionError:
        pass
    frames = await asyncio.wait_for(goaway, 30)
    last = frames[-1]
    assert isinstance(last, GoAwayFrame)
    assert last.error_code == ErrorCodes.ENHANCE_YOUR_CALM and last.additional_data == b"control frame flood"
    return last, sent


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_a_control_frame_flood_from_a_peer_that_reads_gets_enhance_your_calm(kind: str) -> None:
    # The peer reads every answer, so max_control_frames never applies; the
    # rate bound does: past max_control_rate frames in under a second,
    # GOAWAY(ENHANCE_YOUR_CALM) and EOF. The PING is answered for as long as
    # the connection lasts, and a well-behaved client is served afterwards.
    if kind == "ping":
        frame: Frame = PingFrame(0)
    else:
        frame = SettingsFrame(0)
        frame.settings = {SettingsFrame.ENABLE_PUSH: 0}
    batch = frame.serialize() * 500

    async def flood(server: H2Server) -> None:
        wire = await Wire.open(server)
        _, sent = await flood_until_calm(wire, batch)
        assert sent < 100_000
        assert await wire.at_eof()
        wire.close()
        await well_behaved_get(server)

    serve(flood)


def test_a_small_max_control_rate_judges_a_flood_once_within_one_read() -> None:
    # max_control_rate 10 and 200 PINGs in one write: the window is crossed
    # several times within one read; the GOAWAY still says why.
    async def flood(server: H2Server) -> None:
        wire = await Wire.open(server)
        await wire.send(PingFrame(0).serialize() * 200)
        frames = await wire.frames(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert frames[-1].additional_data == b"control frame flood"
        assert await wire.at_eof()
        wire.close()

    serve(flood, max_control_rate=10)


def test_control_frames_under_max_control_rate_are_all_answered() -> None:
    # A burst just under the bound (h2's own SETTINGS answer aside): every PING
    # gets its ACK, the connection stays and a request on it is answered.
    async def burst(server: H2Server) -> None:
        wire = await Wire.open(server)
        pings = []
        for index in range(900):
            ping = PingFrame(0)
            ping.opaque_data = index.to_bytes(8, "big")
            pings.append(ping.serialize())
        await wire.send(b"".join(pings))
        last = (899).to_bytes(8, "big")
        frames = await wire.frames(lambda f: isinstance(f, PingFrame) and f.opaque_data == last)
        assert sum(1 for f in frames if isinstance(f, PingFrame) and "ACK" in f.flags) == 900
        _, headers = wire.client.headers()
        await wire.send(headers)
        frames = await wire.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert not any(isinstance(f, GoAwayFrame) for f in frames)
        wire.close()

    serve(burst, max_control_rate=1000)


# Frames that ask no work of the application (CVE-2019-9512/-9513/-9515/-9518): each
# kind, flooded by a peer that reads, meets max_control_rate. "closed" kinds name a
# stream whose request was answered: h2 turns them into no event at all.
def _no_work_frame(kind: str) -> bytes:
    if kind == "ping_ack":
        return RawClient.ping_ack(b"12345678")
    if kind == "settings_ack":
        frame: Frame = SettingsFrame(0, flags=["ACK"])
    elif kind == "priority":
        frame = PriorityFrame(3, depends_on=0, stream_weight=15)
    elif kind == "window_update":
        frame = WindowUpdateFrame(0, window_increment=1)
    elif kind == "closed_window_update":
        frame = WindowUpdateFrame(1, window_increment=1)
    elif kind == "closed_reset":
        return RawClient.reset(1)
    elif kind == "empty_data":
        return data(3, b"")
    else:  # an extension frame type h2 does not know (RFC 9113 §5.5: ignored)
        return b"\x00\x00\x03\x0b\x00\x00\x00\x00\x00abc"
    return frame.serialize()


@pytest.mark.parametrize("kind", ["ping_ack", "settings_ack", "priority", "window_update", "closed_window_update",
                                  "closed_reset", "empty_data", "unknown"])
def test_a_flood_of_frames_that_need_no_answer_gets_enhance_your_calm(kind: str) -> None:
    batch = _no_work_frame(kind) * 500

    async def flood(server: H2Server) -> None:
        wire = await Wire.open(server)
        # Stream 1: a GET answered in full (so it is closed); stream 3: an upload left open.
        _, get = wire.client.headers()
        _, upload = wire.client.headers(end_stream=False, headers=POST)
        await wire.send(get)
        await wire.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags and f.stream_id == 1)
        await wire.send(upload)
        last, sent = await flood_until_calm(wire, batch)
        assert last.last_stream_id == 3
        assert sent < 100_000
        assert await wire.at_eof()
        wire.close()
        await well_behaved_get(server)

    serve(flood)


def test_a_flooder_cut_off_reads_our_goaway_then_eof_not_a_reset() -> None:
    # Closing a socket with unread input makes the kernel send RST, which can
    # destroy the GOAWAY that says why. The close lingers instead: FIN after
    # the GOAWAY, the flooder's input read and dropped until its own FIN. A
    # flooder that sends 300 KB without reading (the limit is met after a few
    # KB) gets every send through, then reads the GOAWAY and a clean EOF.
    flood = PriorityFrame(3, depends_on=0, stream_weight=15).serialize() * 2000  # 28 KB

    def flooder(address: tuple[str, int]) -> tuple[list[Frame], BaseException | None]:
        sock = socket.create_connection(address, timeout=30)
        received = b""
        error: BaseException | None = None
        try:
            sock.sendall(RawClient().preface())
            for _ in range(11):
                sock.sendall(flood)
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            error = exc
        finally:
            sock.close()
        whole, pos = [], 0
        while len(received) - pos >= 9 + int.from_bytes(received[pos : pos + 3], "big"):
            size = 9 + int.from_bytes(received[pos : pos + 3], "big")
            whole += parse(received[pos : pos + size])
            pos += size
        return whole, error

    async def run(server: H2Server) -> None:
        assert server.address is not None
        frames, error = await asyncio.to_thread(flooder, server.address)
        assert error is None, f"{error!r} instead of a clean EOF"
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert [(f.error_code, f.additional_data) for f in goaways] == [
            (ErrorCodes.ENHANCE_YOUR_CALM, b"control frame flood")]

    serve(run, flush_timeout=30.0)


def test_a_lingering_close_drops_at_most_a_mebibyte_of_input() -> None:
    # A flooder that never stops: past 1 MiB of dropped input the socket is
    # aborted, long before flush_timeout (30 s here) would end the linger.
    flood = PriorityFrame(3, depends_on=0, stream_weight=15).serialize() * 5000  # 70 KB

    def flooder(address: tuple[str, int]) -> BaseException | None:
        sock = socket.create_connection(address, timeout=30)
        try:
            sock.sendall(RawClient().preface())
            for _ in range(150):  # 10 MB
                sock.sendall(flood)
        except OSError as exc:
            return exc
        finally:
            sock.close()
        return None

    async def run(server: H2Server) -> None:
        assert server.address is not None
        error = await asyncio.to_thread(flooder, server.address)
        assert isinstance(error, (ConnectionResetError, BrokenPipeError)), error
        await wait_all_closed(server, 400)
        assert not server._protocols

    serve(run, flush_timeout=30.0)


def test_window_updates_that_follow_our_data_are_not_a_flood() -> None:
    # A client that gives back window (stream and connection) for every DATA
    # frame it reads, at full speed: 2 MiB in 16 KiB frames is 256 WINDOW_UPDATE
    # pairs, far over max_control_rate=50, and each is excused by the data we sent.
    async def big(request: Request, response: ResponseStream) -> None:
        await response.start(200)
        for _ in range(128):
            await response.write(b"x" * 16384)
        await response.end()

    async def download(server: H2Server) -> None:
        wire = await Wire.open(server)
        _, headers = wire.client.headers()
        await wire.send(headers)
        received = 0
        while True:
            frames = await wire.frames(lambda f: isinstance(f, (DataFrame, GoAwayFrame)))
            frame = frames[-1]
            assert not isinstance(frame, GoAwayFrame), frame
            received += len(frame.data)
            if frame.data:
                updates = b"".join(WindowUpdateFrame(stream, window_increment=len(frame.data)).serialize()
                                   for stream in (1, 0))
                await wire.send(updates)
            if "END_STREAM" in frame.flags:
                break
        assert received == 128 * 16384
        wire.close()

    serve(download, handler=big, max_control_rate=50)


async def big_windows_socket(server: H2Server, path: bytes) -> tuple[socket.socket, Any]:
    """A raw peer with a tiny receive buffer and huge windows that asks for ``path``; the server's send buffer is
    made small too, so its transport pauses after a few KiB instead of after the kernel's megabytes."""
    assert server.address is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, server.address)
    for _ in range(200):
        if server._protocols:
            break
        await asyncio.sleep(0.05)
    proto = only_protocol(server)
    assert proto.transport is not None
    proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = RawClient()
    settings = SettingsFrame(0)
    settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
    window = WindowUpdateFrame(0)
    window.window_increment = 2**31 - 1 - 65535
    _, headers = client.headers(headers=[(b":method", b"GET"), (b":path", path), (b":scheme", b"http"),
                                         (b":authority", b"hostile")])
    await loop.sock_sendall(sock, client.preface() + settings.serialize() + window.serialize() + headers)
    return sock, proto


# -- 4. close_at closes a peer that does not read ----------------------------------------------------


def test_close_at_aborts_a_connection_whose_peer_never_reads() -> None:
    # The peer opens big windows, asks for 4 MiB and never reads: the response
    # fills every buffer. At grace the stream is cut, and the socket must go
    # away after flush_timeout, not when (if ever) the peer reads.
    async def big(request: Request, response: ResponseStream) -> None:
        await response.send(200, b"w" * (4 * MB))

    async def stuck(server: H2Server) -> None:
        sock, proto = await big_windows_socket(server, b"/")
        await asyncio.wait_for(asyncio.shield(proto.closed), 30)  # before the fix: until the peer reads
        assert proto.drainable is not None and proto.drainable.is_drained  # closed at close_at (linger)
        sock.close()

    serve(stuck, big, policy=GoawayPolicy(1.0, allow_high_chance=True, ping_timeout=0.2, grace=0.5, linger=0.2),
          flush_timeout=0.5)


# -- 5. timeouts ------------------------------------------------------------------------------------


def test_silent_and_idle_connections_are_reaped() -> None:
    async def idle(server: H2Server) -> None:
        assert server.address is not None
        silent = [await asyncio.open_connection(*server.address) for _ in range(20)]
        # One that sends its preface and one request, then stays quiet.
        wire = await Wire.open(server)
        stream_id, headers = wire.client.headers()
        await wire.send(headers)
        frames = await wire.frames(lambda f: isinstance(f, GoAwayFrame))
        assert any(isinstance(f, DataFrame) and f.stream_id == stream_id for f in frames)
        assert frames[-1].last_stream_id == stream_id and frames[-1].error_code == ErrorCodes.NO_ERROR
        assert await wire.at_eof()
        wire.close()  # our FIN ends the server's lingering close
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(1), 30) == b""  # closed without a byte
            writer.close()
        await wait_all_closed(server, 600)
        assert not server._protocols

    serve(idle, handshake_timeout=0.5, idle_timeout=0.5)


def test_an_open_stream_keeps_an_idle_timeout_away() -> None:
    async def watch(server: H2Server) -> None:
        assert server.address is not None
        async with H2Client(*server.address, timeout=30) as client:
            async with client.stream("GET", "/watch?seconds=2") as response:
                events = [chunk async for chunk in response]
            assert b"".join(events).count(b"event") == 4
            assert client.goaways_received == 0
            # Once nothing is open, the connection goes after idle_timeout.
            await wait_all_closed(server, 300)
            assert not server._protocols

    serve(watch, idle_timeout=0.5)


# -- 3. backpressure on request bodies ----------------------------------------------------------------


def test_a_slow_handler_backpressures_its_uploads_and_every_upload_completes() -> None:
    gate = asyncio.Event()
    started: list[int] = []

    async def slow(request: Request, response: ResponseStream) -> None:
        started.append(request.stream_id)
        await gate.wait()
        await response.send(200, str(len(request.body)).encode())

    async def uploads(server: H2Server) -> None:
        assert server.address is not None
        size = 900 * 1024
        async with H2Client(*server.address, timeout=60) as client:
            tasks = [asyncio.ensure_future(client.request("POST", "/slow", body=b"u" * size)) for _ in range(10)]
            proto = None
            for _ in range(200):
                await asyncio.sleep(0.05)
                if server._protocols and started:
                    proto = only_protocol(server)
                    break
            assert proto is not None
            for _ in range(20):  # a while with the handlers held: the connection stays within its bound
                await asyncio.sleep(0.05)
                assert proto._buffered <= server.max_buffered + server.max_body + 100 * 65535
            assert len(started) < 10, "every upload was read while the handlers held their bodies"
            gate.set()
            responses = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert [(r.status, r.body) for r in responses] == [(200, str(size).encode())] * 10
            assert client.requests_retried == 0

    serve(uploads, slow, max_buffered=1 * MB, max_body=1 * MB)


def test_a_huge_read_is_worked_through_in_slices_so_other_connections_are_served_meanwhile() -> None:
    # 40,000 HEADERS+RST_STREAM pairs in one write (about 1.2 MB): the server
    # handles at most 4 KiB of it per turn of the event loop (a read can be
    # 256 KiB, ~8,000 streams), so a PING on another connection is answered
    # while the flood is still being worked through, not after it. (plain_h2: no reset limit cuts the
    # flood short, so the ordering is what is measured.)
    async def race(server: H2Server) -> None:
        flood = await Wire.open(server)
        other = await Wire.open(server)
        await other.frames(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
        wire = b"".join(headers + flood.client.reset(stream_id)
                        for stream_id, headers in (flood.client.headers(end_stream=False) for _ in range(40_000)))
        flood.writer.write(wire)
        host, port = flood.writer.get_extra_info("sockname")[:2]
        proto = next(p for p in server._protocols if p.peer == f"{host}:{port}")
        for _ in range(2000):  # until the server has started on the flood
            if proto.requests:
                break
            await asyncio.sleep(0.001)
        ping = PingFrame(0)
        ping.opaque_data = b"fairness"
        await other.send(ping.serialize())
        await other.frames(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"fairness")
        assert 0 < proto.requests < 40_000, proto.requests
        await flood.writer.drain()
        flood.close()
        other.close()

    serve(race, plain_h2=True)


def test_with_max_idle_the_policys_graceful_goaway_comes_before_the_idle_timeout() -> None:
    # idle_timeout (0.3 s) is shorter than the policy's max_idle (0.6 s): the
    # hard stop still waits for max_idle's graceful drain, so the client sees
    # GOAWAY(2^31-1) + PING first, then the final GOAWAY, then EOF.
    async def idle(server: H2Server) -> None:
        wire = await Wire.open(server)
        stream_id, headers = wire.client.headers()
        await wire.send(headers)
        frames = await wire.frames(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1].last_stream_id == 2**31 - 1, "the first GOAWAY should be max_idle's graceful notice"
        frames = await wire.frames(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1].last_stream_id == stream_id and frames[-1].error_code == ErrorCodes.NO_ERROR
        assert await wire.at_eof()
        wire.close()

    policy = GoawayPolicy(max_idle=0.6, jitter=0.0, ping_timeout=0.2, linger=0.2)
    serve(idle, policy=policy, idle_timeout=0.3, flush_timeout=0.2)


# -- 6. send_timeout: a peer that lets nothing through ------------------------------------------------


async def endless(request: Request, response: ResponseStream) -> None:
    """A response as long as the client reads (a watch that always has something to say)."""
    if request.path == "/chunks":
        for _ in range(32):
            await response.write(b"c" * 8192)
        await response.end()
    elif request.path == "/endless":
        while True:
            await response.write(b"w" * 16384)
    else:
        await response.send(200, b"ok\n")


def test_a_peer_that_never_reads_its_response_is_closed_at_send_timeout(caplog: pytest.LogCaptureFixture) -> None:
    # No drain, no idle reaper (a stream is open): before send_timeout this
    # connection, its handler task and its buffered bytes stayed for ever.
    async def stuck(server: H2Server) -> None:
        sock, proto = await big_windows_socket(server, b"/endless")
        await asyncio.wait_for(asyncio.shield(proto.closed), 30)
        assert "(send_timeout)" in caplog.text  # closed by this clock, not by another limit
        assert not server._protocols
        sock.close()
        await well_behaved_get(server)

    serve(stuck, endless, send_timeout=0.5, flush_timeout=0.2, idle_timeout=None)


def test_a_slow_but_steady_reader_keeps_its_stream_past_send_timeout() -> None:
    # 256 KiB read 1 KiB per 10 ms: several send_timeout periods long. Once
    # writing is paused, the buffer must fall by 48 KiB (64 KiB high water,
    # 16 KiB low) before it resumes: at least 48 reads, 480 ms of sleeps, so
    # each pause outlasts send_timeout (0.3 s) and only the progress made
    # within it (a smaller buffer at the check) keeps the stream.
    async def slow(server: H2Server) -> None:
        sock, proto = await big_windows_socket(server, b"/chunks")
        loop = asyncio.get_running_loop()
        buffer = b""
        body = 0
        ended = False
        paused = False
        while not ended:
            paused = paused or proto._resume is not None
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1024), 30)
            assert chunk, "the server closed a connection whose peer was reading"
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                size = 9 + int.from_bytes(buffer[:3], "big")
                (frame,) = parse(buffer[:size])
                buffer = buffer[size:]
                assert not isinstance(frame, (GoAwayFrame, RstStreamFrame)), frame
                if isinstance(frame, DataFrame):
                    body += len(frame.data)
                    ended = "END_STREAM" in frame.flags
            await asyncio.sleep(0.01)
        assert body == 32 * 8192
        assert paused  # writing was paused: the send_timeout clock did run
        assert proto in server._protocols
        sock.close()

    serve(slow, endless, send_timeout=0.3, idle_timeout=None)


def test_a_stream_without_flow_control_window_is_reset_at_send_timeout() -> None:
    # SETTINGS_INITIAL_WINDOW_SIZE 0 and never a WINDOW_UPDATE: the handler
    # waits for window for ever. At send_timeout the stream is reset (CANCEL),
    # its handler ends, and the connection itself stays usable.
    finished = []

    async def handler(request: Request, response: ResponseStream) -> None:
        try:
            await response.send(200, b"x" * 1000)
        finally:
            finished.append(request.stream_id)

    async def starved(server: H2Server) -> None:
        settings = SettingsFrame(0)
        settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0}
        wire = await Wire.open(server, settings=settings.serialize())
        stream_id, headers = wire.client.headers()
        await wire.send(headers)
        frames = await wire.frames(lambda f: isinstance(f, RstStreamFrame))
        assert frames[-1].stream_id == stream_id and frames[-1].error_code == ErrorCodes.CANCEL
        assert not any(isinstance(f, GoAwayFrame) for f in frames)
        for _ in range(200):
            if finished:
                break
            await asyncio.sleep(0.05)
        assert finished == [stream_id]
        proto = only_protocol(server)
        assert not proto._streams and not proto._window_waiters and proto._stall is None
        await wire.send(PingFrame(0).serialize())
        await wire.frames(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags)
        wire.close()

    serve(starved, handler, send_timeout=0.3)


# -- 7. no timer outlives its connection ----------------------------------------------------------------


def test_no_timer_of_a_closed_connection_stays_scheduled() -> None:
    # max_age an hour away: each connection holds a timer for it. Connection
    # B closes (once by its client, once by the idle reaper) while connection
    # A stays open with a stream held, so the loop's heap is never emptied
    # wholesale: B's handles must be cancelled and B itself collectable.
    release = asyncio.Event()

    async def handler(request: Request, response: ResponseStream) -> None:
        if request.path == "/hold":
            await response.start(200)
            await release.wait()
            await response.end()
        else:
            await response.send(200, b"ok")

    def live_handles_of(proto: Any) -> list[Any]:
        loop = asyncio.get_running_loop()
        scheduled: list[Any] = loop._scheduled  # type: ignore[attr-defined]
        return [h for h in scheduled if not h.cancelled() and getattr(h._callback, "__self__", None) is proto]

    async def run(server: H2Server) -> None:
        assert server.address is not None
        async with H2Client(*server.address, timeout=30) as holder:
            async with holder.stream("GET", "/hold") as held:
                assert held.status == 200
                for closer in ("client", "server"):
                    before = set(server._protocols)
                    client = H2Client(*server.address, timeout=30)
                    assert (await client.request("GET", "/")).status == 200
                    (proto,) = set(server._protocols) - before
                    assert proto._timer is not None  # its max_age timer
                    ref = weakref.ref(proto)
                    if closer == "client":
                        await client.aclose()
                    # else the idle reaper closes it (idle_timeout); the holder has a stream open
                    await asyncio.wait_for(asyncio.shield(proto.closed), 30)
                    assert live_handles_of(proto) == []
                    del proto
                    if closer == "server":
                        await client.aclose()
                    for _ in range(100):
                        gc.collect()
                        if ref() is None:
                            break
                        await asyncio.sleep(0.02)
                    assert ref() is None, gc.get_referrers(ref())
                release.set()

    serve(run, handler, policy=GoawayPolicy(0.0, max_age=3600), idle_timeout=0.5, handshake_timeout=0.5)
