"""The httpx transports' paths the contract tests leave out, over real sockets.

The sync transport against our server draining on every request (the
draining/refusal path that sends a request back to the pool), refused requests
with a body (replayed only when that is safe), connect failures, and the
HTTP/1.1 fallback (cleartext without prior knowledge, where no ALPN picks h2).
"""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_contract_httpcore import RefusingServer

from goaway_ext import GoawayPolicy
from goaway_ext.asyncio_server import H2Server, builtin_app
from goaway_ext.httpx import AsyncGracefulTransport, GracefulTransport


class ThreadedServer:
    """Our H2Server on its own loop in a thread, so sync clients can use it."""

    def __init__(self, policy: GoawayPolicy) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = H2Server(builtin_app, policy=policy)
            self.port = self.loop.run_until_complete(self.server.start("127.0.0.1", 0))[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert started.wait(20)
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        return asyncio.run_coroutine_threadsafe(self._stats(), self.loop).result(10)

    async def _stats(self) -> dict[str, int]:
        return self.server.stats()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout=5), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def draining() -> Iterator[ThreadedServer]:
    # chance 1.0, mode single: every request's connection gets GOAWAY at once, so
    # requests racing on that connection are refused or find it draining.
    server = ThreadedServer(GoawayPolicy(1.0, allow_high_chance=True, mode="single", linger=0.05))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def refusing() -> Iterator[RefusingServer]:
    server = RefusingServer(refuse_when_ended=True)
    try:
        yield server
    finally:
        server.stop()


def test_sync_transport_survives_a_server_that_drains_every_connection(draining: ThreadedServer) -> None:
    transport = GracefulTransport(http1=False)
    with httpx.Client(transport=transport, base_url=draining.url, timeout=20) as client:
        def get(i: int) -> tuple[int, bytes]:
            response = client.get("/")
            return response.status_code, response.content

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(get, range(200)))
    assert all(status == 200 and body.startswith(b"hello from") for status, body in results), results[:3]
    stats = transport.stats
    assert stats.goaways_received >= 2 and stats.connections_opened >= 2, stats
    # Requests that met a draining connection or a refusal went back to the pool.
    assert stats.requests_retried >= 1, stats
    server = draining.stats()
    assert server["requests"] >= 200 and server["goaways_sent"] >= 2


def test_async_transport_against_a_server_that_drains_every_connection(draining: ThreadedServer) -> None:
    async def main() -> GracefulTransport:
        transport = AsyncGracefulTransport(http1=False)
        async with httpx.AsyncClient(transport=transport, base_url=draining.url, timeout=20) as client:
            responses = await asyncio.gather(*(client.get("/") for _ in range(150)))
        assert {r.status_code for r in responses} == {200}
        assert all(r.content.startswith(b"hello from") for r in responses)
        return transport  # type: ignore[return-value]

    transport = asyncio.run(asyncio.wait_for(main(), 60))
    assert transport.stats.goaways_received >= 2 and transport.stats.requests_retried >= 1


def _second_request_refused_sync(refusing: RefusingServer, method: str) -> tuple[list[int], object]:
    transport = GracefulTransport(http1=False)
    url = f"http://127.0.0.1:{refusing.port}/"
    first: list[int] = []
    with httpx.Client(transport=transport, timeout=10) as client:
        worker = threading.Thread(target=lambda: first.append(client.get(url).status_code))
        worker.start()
        assert refusing.first_request.wait(10)
        try:
            outcome: object = client.request(method, url, content=b"payload").status_code
        except httpx.HTTPError as exc:
            outcome = exc
        worker.join(10)
    return first, outcome


def test_sync_refused_put_with_its_whole_body_is_replayed(refusing: RefusingServer) -> None:
    first, outcome = _second_request_refused_sync(refusing, "PUT")
    assert first == [200] and outcome == 200
    assert refusing.connections == 2


def test_sync_refused_post_with_a_sent_body_is_not_replayed(refusing: RefusingServer) -> None:
    first, outcome = _second_request_refused_sync(refusing, "POST")
    assert first == [200]
    assert isinstance(outcome, httpx.RemoteProtocolError) and "not replayed" in str(outcome), outcome
    assert refusing.connections == 1


def test_async_refused_put_with_its_whole_body_is_replayed(refusing: RefusingServer) -> None:
    async def main() -> AsyncGracefulTransport:
        transport = AsyncGracefulTransport(http1=False)
        url = f"http://127.0.0.1:{refusing.port}/"
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            first = asyncio.create_task(client.get(url))
            assert await asyncio.to_thread(refusing.first_request.wait, 10)
            second = await client.put(url, content=b"idempotent, sent whole")
            assert second.status_code == 200 and (await first).status_code == 200
        return transport

    transport = asyncio.run(asyncio.wait_for(main(), 30))
    assert transport.stats.streams_refused >= 1 and transport.stats.requests_retried >= 1
    assert refusing.connections == 2


def _closed_port() -> tuple[socket.socket, int]:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    return probe, probe.getsockname()[1]


def test_connect_failure_surfaces_as_httpx_connect_error() -> None:
    probe, port = _closed_port()
    with probe:
        transport = GracefulTransport(http1=False)
        with httpx.Client(transport=transport, timeout=5) as client, pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{port}/")

        async def main() -> None:
            async with httpx.AsyncClient(transport=AsyncGracefulTransport(http1=False), timeout=5) as client:
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"http://127.0.0.1:{port}/")

        asyncio.run(asyncio.wait_for(main(), 30))
        assert transport.stats.connections_opened == 0


class _Http11Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"plain http/1.1\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http11() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http11Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_http11_fallback_without_prior_knowledge(http11: str) -> None:
    # Cleartext and http1 left on: no ALPN, so httpcore speaks HTTP/1.1 and our
    # transports hand the socket to httpcore's own HTTP/1.1 connection.
    transport = GracefulTransport()
    with httpx.Client(transport=transport, timeout=10) as client:
        responses = [client.get(http11) for _ in range(3)]
    expected = ("HTTP/1.1", 200, b"plain http/1.1\n")
    assert [(r.http_version, r.status_code, r.content) for r in responses] == [expected] * 3

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=AsyncGracefulTransport(), timeout=10) as client:
            return [await client.get(http11) for _ in range(3)]

    responses = asyncio.run(asyncio.wait_for(main(), 30))
    assert {(r.http_version, r.status_code) for r in responses} == {("HTTP/1.1", 200)}
    assert transport.stats.goaways_received == 0
