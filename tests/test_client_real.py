"""The clients against the real asyncio server over sockets (127.0.0.1 only).

The server runs as ``python -m goaway_ext serve`` in a subprocess. At chance
1.0 every request starts a drain, the harshest case a client can meet: every
connection is told to go away right after its first request. Nothing may fail,
and each connection a client opened but the current one must have been retired
by a GOAWAY.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from serve_process import ServeProcess

from goaway_ext.asyncio_client import H2Client
from goaway_ext.httpx import AsyncGracefulTransport, GracefulTransport
from goaway_ext.loadgen import run_load

pytestmark = pytest.mark.slow

WATCH_SECONDS = 2  # the server sends a chunk every 0.5 s
WATCH_BODY_CHUNKS = 4


class Server(ServeProcess):
    """A running ``serve`` subprocess and its port."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args, start_timeout=15)


@pytest.fixture(scope="module")
def always() -> Iterator[Server]:
    """A server that drains every connection on its first request."""
    server = Server("--chance", "1.0", "--allow-high-chance")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sometimes() -> Iterator[Server]:
    """A server at kube-apiserver's highest allowed chance, 0.02."""
    server = Server("--chance", "0.02")
    try:
        yield server
    finally:
        server.stop()


def test_httpx_async_transport_watches_and_requests_survive(always: Server) -> None:
    async def main() -> None:
        transport = AsyncGracefulTransport(http1=False)
        async with httpx.AsyncClient(transport=transport, base_url=always.url, timeout=15) as client:
            async def watch() -> list[bytes]:
                async with client.stream("GET", f"/watch?seconds={WATCH_SECONDS}") as response:
                    assert response.status_code == 200 and response.headers["x-backend"]
                    return [chunk async for chunk in response.aiter_raw()]

            async def requests(count: int) -> list[int]:
                codes = []
                for _ in range(count):
                    response = await client.get("/")
                    assert response.headers["x-backend"]
                    codes.append(response.status_code)
                return codes

            watches = [asyncio.create_task(watch()) for _ in range(10)]
            codes = await asyncio.gather(*(requests(20) for _ in range(10)))
            bodies = await asyncio.gather(*watches)
        assert [c for batch in codes for c in batch] == [200] * 200
        assert all(len(b"".join(body).splitlines()) >= WATCH_BODY_CHUNKS for body in bodies)
        stats = transport.stats
        # Every connection but the last was retired by a GOAWAY; at chance 1.0
        # the last one was told to go too.
        assert stats.goaways_received >= 1
        assert stats.goaways_received <= stats.connections_opened <= stats.goaways_received + 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_httpx_requests_retried_counts_requests_not_turns(always: Server) -> None:
    # At chance 1.0 every connection drains, so one request may go back to the pool
    # several times; requests_retried counts each request once.
    async def main() -> None:
        transport = AsyncGracefulTransport(http1=False)
        async with httpx.AsyncClient(transport=transport, base_url=always.url, timeout=15) as client:
            responses = await asyncio.gather(*(client.get("/") for _ in range(50)))
        assert [r.status_code for r in responses] == [200] * 50
        assert 0 <= transport.stats.requests_retried <= 50, transport.stats

    asyncio.run(asyncio.wait_for(main(), 60))


def test_load_progress_with_processes_shows_goaways(always: Server) -> None:
    # -P 2: the progress lines come from the parent, which adds up the children's counts.
    completed = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "load", always.url + "/", "-D", "3", "-c", "2", "-m", "2", "-P", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    progress = [line for line in completed.stderr.splitlines() if line.startswith("progress: ")]
    assert progress, completed.stderr
    goaways = [int(line.split(" failed, ")[1].split()[0]) for line in progress]
    assert goaways[-1] > 0, progress


def test_httpx_sync_transport(always: Server) -> None:
    transport = GracefulTransport(http1=False)
    with httpx.Client(transport=transport, base_url=always.url, timeout=15) as client:
        for i in range(30):
            assert client.get("/").status_code == 200
            if i % 10 == 0:
                # A body sent whole with a non-idempotent method still works
                # when nothing is refused: only partial bodies are never replayed.
                echoed = client.post("/echo", content=b"x" * 1000)
                assert echoed.status_code == 200 and echoed.content == b"x" * 1000
    assert transport.stats.connections_opened >= 30


def test_h2client_with_eager_reconnect(always: Server) -> None:
    async def main() -> None:
        async with H2Client("127.0.0.1", always.port, timeout=15, eager_reconnect=True) as client:
            async def watch() -> bytes:
                async with client.stream("GET", f"/watch?seconds={WATCH_SECONDS}") as response:
                    return await response.read()

            async def requests(count: int) -> None:
                for i in range(count):
                    if i % 5 == 0:
                        body = bytes(range(256)) * 800  # 200 KiB: more than one flow-control window
                        response = await client.request("POST", "/echo", body=body)
                        assert response.body == body
                    else:
                        response = await client.request("GET", "/")
                    assert response.status == 200 and response.header("x-backend")

            watches = [asyncio.create_task(watch()) for _ in range(5)]
            await asyncio.gather(*(requests(10) for _ in range(5)))
            bodies = await asyncio.gather(*watches)
            assert all(len(body.splitlines()) >= WATCH_BODY_CHUNKS for body in bodies)
        # Eager reconnect: each GOAWAY replaced its connection at once.
        assert client.connections_opened == client.goaways_received + 1
        assert client.open_connections == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_load_generator_at_chance_002(sometimes: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import goaway_ext.loadgen

    # Progress every millisecond, so the run reports several times however fast it is.
    monkeypatch.setattr(goaway_ext.loadgen, "_PROGRESS_EVERY", 0.001)
    ticks: list[int] = []
    result = run_load(sometimes.url + "/", requests=3000, connections=10, streams=10, timeout=15,
                      progress=lambda partial: ticks.append(partial.requests))
    assert result.failed == 0 and result.succeeded == 3000, result.errors
    assert result.goaways_received > 0
    assert result.connections_opened == result.goaways_received + 10
    assert result.latency()["max"] >= result.latency()["p99"] >= result.latency()["min"] > 0
    assert len(ticks) >= 2 and ticks == sorted(ticks) and 0 < ticks[-1] <= 3000, ticks  # progress only grows


def test_load_command_json(sometimes: Server) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "load", sometimes.url + "/", "-n", "300", "-c", "2", "-m", "4",
         "--json", "--processes", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["requests"] == 300 and summary["failed"] == 0
    assert summary["connections_opened"] == summary["goaways_received"] + 2


def test_load_command_text_and_bad_arguments(sometimes: Server) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "load", sometimes.url + "/", "-n", "50", "-c", "1", "-m", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "requests: 50 total, 50 succeeded, 0 failed" in completed.stdout
    assert "time for request:" in completed.stdout
    bad = subprocess.run([sys.executable, "-m", "goaway_ext", "load", "ftp://x/", "-n", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "URL must be" in bad.stderr


async def _front_that_drops_first(backend_port: int, dropped: list[int]) -> asyncio.base_events.Server:
    # A tiny L4 front: the first connection is accepted and closed at once (a
    # backend gone between accept and answer); later ones are piped through.
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not dropped:
            dropped.append(1)
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
def test_connection_closed_before_server_spoke(method: str, retried: bool) -> None:
    # Regression: a connection that died before the server sent one byte
    # failed the request; an idempotent one is now sent again, a POST is not.
    from goaway_ext.asyncio_client import H2ClientError
    from goaway_ext.asyncio_server import H2Server, builtin_app

    async def scenario() -> tuple[int, bytes] | str:
        server = H2Server(builtin_app, name="b1")
        _, port = await server.start("127.0.0.1", 0)
        dropped: list[int] = []
        front = await _front_that_drops_first(port, dropped)
        front_port = front.sockets[0].getsockname()[1]
        client = H2Client("127.0.0.1", front_port, timeout=5.0)
        try:
            path = "/" if method == "GET" else "/echo"
            response = await client.request(method, path, body=b"" if method == "GET" else b"x")
            return response.status, response.body
        except H2ClientError as exc:
            return str(exc)
        finally:
            await client.aclose()
            front.close()
            await server.shutdown(timeout=2.0)

    result = asyncio.run(asyncio.wait_for(scenario(), 20))
    if retried:
        assert result == (200, b"hello from b1\n")
    else:
        assert isinstance(result, str) and "before the server sent anything" in result
