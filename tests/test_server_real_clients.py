"""The asyncio server (``python -m goaway_ext serve``) against real clients over real sockets.

curl and nghttp (nghttp2) are real peers that follow GOAWAY; the test-local
``FollowingClient`` is a minimal h2 client that takes GOAWAY frames out with
``FrameScanner`` (so h2 never goes CLOSED), lets in-flight streams finish and
sends new requests on a new connection: Kubernetes' invariant
"connections opened == GOAWAYs + 1" is checked with it. Everything binds
127.0.0.1 on port 0, every wait is bounded, every subprocess is terminated.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from serve_process import ServeProcess

from goaway_ext import FrameScanner

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
H2LOAD = shutil.which("h2load")
need_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (Debian package curl)")
need_nghttp = pytest.mark.skipif(NGHTTP is None, reason="nghttp is not installed (Debian package nghttp2-client)")
need_h2load = pytest.mark.skipif(H2LOAD is None, reason="h2load is not installed (Debian package nghttp2-client)")


class Server(ServeProcess):
    """``serve`` logging at INFO: the tests read its drain lines in :meth:`stderr`."""

    def __init__(self, *args: str) -> None:
        super().__init__("--log-level", "INFO", *args, start_timeout=20)

    def stderr(self) -> str:
        return self.text


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Server] = []

    def start(*args: str) -> Server:
        server = Server(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


ALWAYS = ("--chance", "1.0", "--allow-high-chance", "--linger", "0.2")


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--max-time", "15", *args], capture_output=True, text=True, timeout=timeout)


def stats(server: Server) -> dict[str, Any]:
    out = curl("--http2-prior-knowledge", f"{server.url}/stats")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# -- curl and nghttp ------------------------------------------------------------------


@need_curl
def test_curl_every_response_complete_with_goaway_on_every_request(serve: Any) -> None:
    server = serve(*ALWAYS, "--name", "b1")
    watch = subprocess.Popen(
        [CURL, "-sS", "--max-time", "15", "--http2-prior-knowledge", f"{server.url}/watch?seconds=1.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(5):
            out = curl("--http2-prior-knowledge", "-i", f"{server.url}/")
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("HTTP/2 200")
            assert "x-backend: b1" in out.stdout and out.stdout.endswith("hello from b1\n")
        echo = curl("--http2-prior-knowledge", "--data-binary", "x" * 100_000, f"{server.url}/echo")
        assert echo.returncode == 0 and echo.stdout == "x" * 100_000
        # The watch's own request started a drain; it still reads its whole body.
        body, err = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert body == "event 0\nevent 1\nevent 2\n"
    counters = stats(server)
    assert counters["drains"] >= 7 and counters["goaways_sent"] >= 14  # two-phase: 2 per drain


@need_curl
def test_curl_next_request_opens_a_new_connection(serve: Any) -> None:
    server = serve(*ALWAYS)
    out = curl("--http2-prior-knowledge", "-w", "connects=%{num_connects}\n", f"{server.url}/", f"{server.url}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("hello from") == 2
    # num_connects is per transfer: 1 means that transfer opened its own connection.
    assert out.stdout.count("connects=1") == 2


@need_nghttp
def test_nghttp_watch_in_flight_reads_whole_body(serve: Any) -> None:
    server = serve(*ALWAYS)
    assert NGHTTP is not None
    out = subprocess.run(
        [NGHTTP, "-nv", f"{server.url}/watch?seconds=1", f"{server.url}/", f"{server.url}/echo?x"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    goaways = [line for line in out.stdout.splitlines() if "recv GOAWAY" in line]
    assert len(goaways) == 2  # notice, then final
    assert "last_stream_id=2147483647" in out.stdout
    # Three streams, all at or below the final last-stream-id, all answered.
    assert out.stdout.count(":status: 200") == 2 and out.stdout.count(":status: 405") == 1
    assert out.stdout.count("recv DATA frame") >= 3


@need_curl
@need_h2load
def test_h2load_every_request_that_reached_serve_is_answered(serve: Any) -> None:
    """h2load multiplexes 4 streams on each of 4 connections while serve drains them gracefully.

    h2load (nghttp2 1.52) does not reconnect after a GOAWAY: it stops using that
    connection and counts its remaining requests as failed, including a few it had
    submitted that nghttp2 then never sent. So the check is the server's side: every
    request serve received got a 2xx that h2load read in full, none was cut or refused.
    """
    server = serve("--chance", "0.05", "--allow-high-chance", "--mode", "graceful", "--linger", "0.2", "--seed", "5")
    assert H2LOAD is not None
    out = subprocess.run([H2LOAD, "-n", "2000", "-c", "4", "-m", "4", f"{server.url}/"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    found = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored, (\d+) timeout", out.stdout)
    assert found is not None, out.stdout
    total, _started, _done, succeeded, failed, _errored, timeout = map(int, found.groups())
    counters = stats(server)  # counts this /stats request too
    report = out.stdout + json.dumps(counters)
    assert total == 2000 and succeeded + failed == total and timeout == 0, report
    assert succeeded > 0 and counters["requests"] == succeeded + 1, report
    assert f"status codes: {succeeded} 2xx, 0 3xx, 0 4xx, 0 5xx" in out.stdout, report
    assert counters["goaways_sent"] > 0, report
    assert counters["streams_cut"] == 0 and counters["streams_refused"] == 0, report


@need_curl
def test_tls_with_alpn_h2(serve: Any) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command line is not installed: serve --tls cannot make a self-signed certificate")
    server = serve(*ALWAYS, "--tls")
    out = curl("-k", "--http2", "-i", f"https://127.0.0.1:{server.port}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/2 200")


@need_curl
def test_http11_is_refused_clearly_and_never_gets_goaway(serve: Any) -> None:
    server = serve(*ALWAYS)
    out = curl("--http1.1", "-i", f"{server.url}/")
    assert out.stdout.startswith("HTTP/1.1 505 HTTP Version Not Supported")
    assert "speaks only HTTP/2" in out.stdout
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = b""
        while chunk := sock.recv(4096):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 505") and b"\x07\x00\x00\x00\x00\x00" not in raw
    assert stats(server)["goaways_sent"] == 0  # and serve exempts /stats from the policy


@need_curl
def test_sigterm_ends_watch_cleanly_and_exits_zero(serve: Any) -> None:
    server = serve("--chance", "0", "--linger", "0.2")
    watch = subprocess.Popen(
        [CURL, "-N", "-sS", "--max-time", "15", "--http2-prior-knowledge", f"{server.url}/watch?seconds=30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()  # the watch is in flight: its first event arrived (-N: unbuffered)
        assert first == "event 0\n", first
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        rest, err = watch.communicate(timeout=10)
        body = first + rest
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err  # END_STREAM, not a reset or a cut connection
    assert body.startswith("event 0\n") and len(body.splitlines()) < 10
    assert "drained connection" in server.stderr()


def test_bad_option_exits_2_with_reason() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "goaway_ext", "serve", "--port", "0", "--chance", "0.5"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2 and "--allow-high-chance" in out.stderr


# -- a GOAWAY-following h2 client ---------------------------------------------------------


class Refused(Exception):
    """The server never processed the request: retry it on a new connection."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.scanner = FrameScanner()
        self.goaways: list[int] = []
        self.waiting: dict[int, tuple[asyncio.Future[tuple[int, bytes, dict[bytes, bytes]]], dict[str, Any]]] = {}
        self.h2.initiate_connection()
        self.flush()
        self.task = asyncio.get_running_loop().create_task(self.read_loop())

    @property
    def usable(self) -> bool:
        return not self.goaways and not self.task.done()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes, dict[bytes, bytes]]:
        if not self.usable:
            raise Refused("connection draining")
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                   (b":authority", b"127.0.0.1")]
        self.h2.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)
        future: asyncio.Future[tuple[int, bytes, dict[bytes, bytes]]] = asyncio.get_running_loop().create_future()
        self.waiting[sid] = (future, {"status": 0, "body": bytearray(), "headers": {}})
        self.flush()
        return await asyncio.wait_for(future, 15)

    def fail(self, sid: int, exc: Exception) -> None:
        future, _ = self.waiting.pop(sid)
        if not future.done():
            future.set_exception(exc)

    async def read_loop(self) -> None:
        try:
            while data := await self.reader.read(65536):
                data, found = self.scanner.feed(data)
                for last, _code, _debug in found:
                    self.goaways.append(last)
                    for sid in [s for s in self.waiting if s > last]:
                        self.fail(sid, Refused(f"stream {sid} above last_stream_id {last}"))
                for event in self.h2.receive_data(data):
                    entry = self.waiting.get(getattr(event, "stream_id", 0))
                    if entry is None:
                        continue
                    if isinstance(event, ResponseReceived):
                        entry[1]["headers"] = dict(event.headers)
                        entry[1]["status"] = int(entry[1]["headers"][b":status"])
                    elif isinstance(event, DataReceived):
                        entry[1]["body"] += event.data
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded):
                        self.waiting.pop(event.stream_id)
                        entry[0].set_result((entry[1]["status"], bytes(entry[1]["body"]), entry[1]["headers"]))
                    elif isinstance(event, StreamReset):
                        refused = event.error_code == ErrorCodes.REFUSED_STREAM
                        self.fail(event.stream_id, Refused("refused") if refused else ConnectionError("reset"))
                self.flush()  # h2 acks the drain PING by itself; we read on until the server closes
        finally:
            for sid in list(self.waiting):
                self.fail(sid, ConnectionError("connection closed with the request in flight"))
            self.writer.close()


class FollowingClient:
    """Follows GOAWAY like Go's client: in-flight streams finish, new requests go to a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[_Conn] = []
        self.lock = asyncio.Lock()
        self.retries = 0

    async def _current(self) -> _Conn:
        async with self.lock:
            if not self.conns or not self.conns[-1].usable:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                self.conns.append(_Conn(reader, writer))
            return self.conns[-1]

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes, dict[bytes, bytes]]:
        for _ in range(10):
            conn = await self._current()
            try:
                return await conn.request(method, path, body)
            except Refused:
                self.retries += 1
        raise AssertionError("refused 10 times in a row")

    async def aclose(self) -> None:
        # Connections that got GOAWAY are closed by the server (after its linger): wait for that.
        draining = [conn.task for conn in self.conns if conn.goaways]
        if draining:
            await asyncio.wait(draining, timeout=5)
        for conn in self.conns:
            conn.task.cancel()
        await asyncio.gather(*(c.task for c in self.conns), return_exceptions=True)


@pytest.mark.parametrize("mode", ["graceful", "single", "idle"])
def test_connections_opened_equals_goaways_plus_one(serve: Any, mode: str) -> None:
    # Mode idle sends its GOAWAY only after ping_timeout without a new stream:
    # this client pauses longer than that between requests.
    quiet = ("--ping-timeout", "0.05") if mode == "idle" else ()
    pause = 0.1 if mode == "idle" else 0.0
    server = serve("--chance", "0.25", "--allow-high-chance", "--seed", "7", "--mode", mode, "--linger", "0.2", *quiet)

    async def run() -> FollowingClient:
        client = FollowingClient(server.port)
        try:
            for i in range(40):
                status, _, headers = await client.request("GET", "/" if i % 2 else "/echo", b"")
                assert status in (200, 405) and headers[b"x-backend"] == f"127.0.0.1:{server.port}".encode()
                await asyncio.sleep(pause)
        finally:
            await client.aclose()
        return client

    client = asyncio.run(asyncio.wait_for(run(), 40))
    opened = len(client.conns)
    left_after_goaway = sum(1 for conn in client.conns[:-1] if conn.goaways)
    assert opened >= 3
    assert opened == left_after_goaway + 1
    # Each connection the client left had a final GOAWAY; the server counted the same.
    server_stats = stats(server)
    assert server_stats["connections_opened"] == opened + 1  # + the curl asking for /stats
    sent_by_server = server_stats["goaways_sent"]  # serve exempts /stats: its connection sent none
    assert sent_by_server == sum(len(c.goaways) for c in client.conns), server_stats


def test_concurrent_tasks_300_requests_no_failure(serve: Any) -> None:
    server = serve("--chance", "0.02", "--seed", "11", "--linger", "0.2")

    async def run() -> FollowingClient:
        client = FollowingClient(server.port)

        async def worker(n: int) -> None:
            for i in range(30):
                if i % 3 == 0:
                    payload = f"task {n} request {i}".encode()
                    status, body, _ = await client.request("POST", "/echo", payload)
                    assert (status, body) == (200, payload)
                else:
                    status, body, _ = await client.request("GET", "/")
                    assert status == 200 and body.startswith(b"hello from")

        try:
            await asyncio.gather(*(worker(n) for n in range(10)))
        finally:
            await client.aclose()
        return client

    client = asyncio.run(asyncio.wait_for(run(), 45))
    assert sum(1 for c in client.conns if c.goaways) >= 1
    assert len(client.conns) >= 2


def test_connection_opened_during_shutdown_is_served_and_waited_for() -> None:
    # Regression: shutdown used to close a connection whose preface had not
    # arrived yet, and never waited for connections accepted after it began.
    # A client that connected just before shutdown must get its response.
    import h2.config
    import h2.events

    from goaway_ext import ClientConnection
    from goaway_ext.asyncio_server import H2Server, builtin_app

    async def scenario() -> tuple[int, bytes]:
        server = H2Server(builtin_app, name="b1")
        host, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        for _ in range(500):  # accepted, but no preface sent yet
            if server.stats()["connections_open"] == 1:
                break
            await asyncio.sleep(0.01)
        assert server.stats()["connections_open"] == 1
        shutdown = asyncio.create_task(server.shutdown(timeout=5.0))
        for _ in range(500):  # the shutdown has begun: the connection was told to drain
            if server.is_shutting_down:
                break
            await asyncio.sleep(0.01)
        assert server.is_shutting_down
        # A plain h2 client would go CLOSED on the shutdown GOAWAY and choke on
        # the PING behind it; ClientConnection keeps the stream alive.
        conn = ClientConnection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                              (b":authority", b"x")], end_stream=True)
        writer.write(conn.data_to_send())
        status, body, ended = 0, b"", False
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            writer.write(conn.data_to_send())
        writer.close()
        await asyncio.wait_for(shutdown, 10)
        return status, body

    status, body = asyncio.run(scenario())
    assert status == 200
    assert body == b"hello from b1\n"
