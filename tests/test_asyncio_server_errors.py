"""The asyncio server's error paths, each reached over a real socket by a real ``h2`` client.

A handler that raises, a peer that resets or breaks the protocol, a body over
``max_body``, a peer that stops reading (write backpressure) and one that goes
away while the server waits for it: what the peer is told, and that the server
neither hangs nor leaks the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes

from goaway_ext.asyncio_server import H2Server, Request, ResponseStream, _H2Protocol

Handler = Callable[[Request, ResponseStream], Awaitable[None]]
TIMEOUT = 20.0


class RawClient:
    """A plain ``h2`` client on an asyncio socket that records every event it reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, window: int | None) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: list[Any] = []
        self.eof = False
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.flush()

    @classmethod
    async def open(cls, port: int, *, window: int | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, window=window)

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def request(self, path: str, *, body: bytes | None = None, method: str | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        method = method or ("POST" if body is not None else "GET")
        headers = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                   (b":authority", b"t")]
        self.conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    async def read_until(self, done: Callable[[], bool]) -> None:
        while not done() and not self.eof:
            data = await asyncio.wait_for(self.reader.read(1 << 20), TIMEOUT)
            if not data:
                self.eof = True
                break
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.flush()

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)]

    def finished(self, sid: int) -> bool:
        return bool(self.of(h2.events.StreamEnded, sid) or self.of(h2.events.StreamReset, sid))

    def status(self, sid: int) -> int:
        (response,) = self.of(h2.events.ResponseReceived, sid)
        return int(dict(response.headers)[b":status"])

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, sid))

    def close(self) -> None:
        self.writer.close()


async def _serving(handler: Handler, scenario: Callable[[H2Server, int], Awaitable[None]], **options: Any) -> H2Server:
    server = H2Server(handler, **options)
    _, port = await server.start("127.0.0.1", 0)
    try:
        await scenario(server, port)
    finally:
        await server.shutdown(timeout=5.0)
    return server


def run(handler: Handler, scenario: Callable[[H2Server, int], Awaitable[None]], **options: Any) -> H2Server:
    return asyncio.run(asyncio.wait_for(_serving(handler, scenario, **options), 60))


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- a handler that raises ---------------------------------------------------------------


async def failing(request: Request, response: ResponseStream) -> None:
    if request.path == "/late":
        await response.start(200)
        await response.write(b"partial")
    if request.path != "/ok":
        raise RuntimeError("the handler broke")
    await response.end(b"fine")


def test_handler_exception_before_the_response_is_a_500_and_the_connection_lives_on(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(server: H2Server, port: int) -> None:
        client = await RawClient.open(port)
        broken = client.request("/early")
        await client.read_until(lambda: client.finished(broken))
        assert client.status(broken) == 500 and client.body(broken) == b"internal error\n"
        fine = client.request("/ok")  # same connection
        await client.read_until(lambda: client.finished(fine))
        assert client.status(fine) == 200 and client.body(fine) == b"fine"
        client.close()

    run(failing, scenario)
    assert any("handler failed on GET /early" in r.getMessage() and r.exc_info for r in caplog.records)


def test_handler_exception_after_the_headers_resets_the_stream_with_internal_error() -> None:
    async def scenario(server: H2Server, port: int) -> None:
        client = await RawClient.open(port)
        broken = client.request("/late")
        await client.read_until(lambda: client.finished(broken))
        assert client.status(broken) == 200  # already sent: only a reset can tell the client now
        (reset,) = client.of(h2.events.StreamReset, broken)
        assert reset.error_code == ErrorCodes.INTERNAL_ERROR
        assert not client.of(h2.events.StreamEnded, broken)
        fine = client.request("/ok")
        await client.read_until(lambda: client.finished(fine))
        assert client.body(fine) == b"fine"
        client.close()

    run(failing, scenario)


# -- a body over max_body ------------------------------------------------------------------


def test_body_over_max_body_is_never_processed_and_the_client_is_told() -> None:
    seen: list[int] = []

    async def echo(request: Request, response: ResponseStream) -> None:
        seen.append(len(request.body))
        await response.end(request.body)

    async def scenario(server: H2Server, port: int) -> None:
        client = await RawClient.open(port)
        big = client.request("/echo", body=b"x" * 5000)
        small = client.request("/echo", body=b"y" * 500)
        await client.read_until(lambda: client.finished(big) and client.finished(small))
        # Told either way the server answers it (413 now; REFUSED_STREAM before issue 12),
        # never a 200, and never a silent close.
        if client.of(h2.events.ResponseReceived, big):
            assert client.status(big) == 413
        else:
            (reset,) = client.of(h2.events.StreamReset, big)
            assert reset.error_code == ErrorCodes.REFUSED_STREAM
        assert client.status(small) == 200 and client.body(small) == b"y" * 500
        client.close()

    run(echo, scenario, max_body=1000)
    assert seen == [500]  # the handler never saw the big request


def test_declared_content_length_over_max_body_is_answered_before_any_body() -> None:
    seen: list[int] = []

    async def echo(request: Request, response: ResponseStream) -> None:
        seen.append(len(request.body))
        await response.end(b"")

    async def scenario(server: H2Server, port: int) -> None:
        client = await RawClient.open(port)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"),
                                       (b":authority", b"t"), (b"content-length", b"999999")])
        client.flush()  # headers only: the body never comes
        await client.read_until(lambda: client.finished(sid))
        assert client.of(h2.events.ResponseReceived, sid) or client.of(h2.events.StreamReset, sid)
        if client.of(h2.events.ResponseReceived, sid):
            assert client.status(sid) == 413
        client.close()

    run(echo, scenario, max_body=1000)
    assert seen == []


# -- the peer resets a stream, breaks the protocol ------------------------------------------


def test_peer_reset_cancels_the_handler_and_the_connection_serves_on() -> None:
    events: dict[str, Any] = {}

    async def slow(request: Request, response: ResponseStream) -> None:
        if request.path == "/ok":
            await response.end(b"fine")
            return
        events["started"].set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events["cancelled"] = True
            raise

    async def scenario(server: H2Server, port: int) -> None:
        events["started"] = asyncio.Event()
        client = await RawClient.open(port)
        held = client.request("/hold")
        await asyncio.wait_for(events["started"].wait(), TIMEOUT)
        client.conn.reset_stream(held, ErrorCodes.CANCEL)
        client.flush()
        await _until(lambda: events.get("cancelled", False), "the handler to be cancelled")
        fine = client.request("/ok")
        await client.read_until(lambda: client.finished(fine))
        assert client.body(fine) == b"fine"
        assert not client.of(h2.events.ResponseReceived, held)
        client.close()

    run(slow, scenario)
    assert events["cancelled"] is True


def test_peer_protocol_error_gets_goaway_protocol_error_and_a_close() -> None:
    async def ok(request: Request, response: ResponseStream) -> None:
        await response.end(b"fine")

    async def scenario(server: H2Server, port: int) -> None:
        client = await RawClient.open(port)
        fine = client.request("/")
        await client.read_until(lambda: client.finished(fine))
        # DATA on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 §6.1).
        client.writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        await client.read_until(lambda: False)  # until the server closes
        assert client.eof
        terminated = client.of(h2.events.ConnectionTerminated)
        assert terminated and terminated[-1].error_code == ErrorCodes.PROTOCOL_ERROR
        await _until(lambda: server.stats()["connections_open"] == 0, "the server to forget the connection")

    run(ok, scenario)


# -- write backpressure, and a peer lost while the server waits for it ------------------------


class _PauseSpy:
    """Counts the transport's real pause/resume calls (the protocol's behaviour is unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paused = asyncio.Event()
        self.pauses = 0
        self.resumes = 0
        pause, resume = _H2Protocol.pause_writing, _H2Protocol.resume_writing

        def pause_writing(proto: _H2Protocol) -> None:
            self.pauses += 1
            pause(proto)
            self.paused.set()

        def resume_writing(proto: _H2Protocol) -> None:
            self.resumes += 1
            resume(proto)

        monkeypatch.setattr(_H2Protocol, "pause_writing", pause_writing)
        monkeypatch.setattr(_H2Protocol, "resume_writing", resume_writing)


BIG = 32 << 20  # more than loopback's socket buffers hold, so the server's writes must wait


def test_a_peer_that_stops_reading_pauses_the_writer_and_gets_every_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    spy_box: list[_PauseSpy] = []
    chunk = bytes(range(256)) * 256  # 64 KiB

    async def firehose(request: Request, response: ResponseStream) -> None:
        await response.start(200)
        for _ in range(BIG // len(chunk)):
            await response.write(chunk)
        await response.end()

    async def scenario(server: H2Server, port: int) -> None:
        spy = _PauseSpy(monkeypatch)
        spy_box.append(spy)
        client = await RawClient.open(port, window=2**31 - 1)  # flow control never limits the server
        sid = client.request("/")
        await asyncio.wait_for(spy.paused.wait(), TIMEOUT)  # not reading: the server's writer paused
        await client.read_until(lambda: client.finished(sid))
        assert client.status(sid) == 200
        body = client.body(sid)
        assert len(body) == BIG and body == chunk * (BIG // len(chunk))
        client.close()

    run(firehose, scenario)
    assert spy_box[0].pauses >= 1 and spy_box[0].resumes >= 1


def test_a_peer_lost_while_the_writer_is_paused_ends_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[str] = []
    chunk = b"z" * 65536

    async def firehose(request: Request, response: ResponseStream) -> None:
        try:
            await response.start(200)
            for _ in range(BIG // len(chunk)):
                await response.write(chunk)
            ended.append("finished")
        except BaseException as exc:
            ended.append(type(exc).__name__)
            raise

    async def scenario(server: H2Server, port: int) -> None:
        spy = _PauseSpy(monkeypatch)
        client = await RawClient.open(port, window=2**31 - 1)
        client.request("/")
        await asyncio.wait_for(spy.paused.wait(), TIMEOUT)
        client.writer.transport.abort()  # gone without a GOAWAY, mid-response
        await _until(lambda: bool(ended), "the handler to end")
        await _until(lambda: server.stats()["connections_open"] == 0, "the server to forget the connection")

    run(firehose, scenario)
    assert ended and ended[0] in ("StreamClosed", "CancelledError"), ended
