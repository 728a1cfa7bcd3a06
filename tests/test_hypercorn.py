"""goaway_ext.hypercorn against a real hypercorn, real sockets and real clients.

Every server is ``python -m goaway_ext.hypercorn`` in a subprocess on a socket
this test bound (port 0, handed over as ``fd://``), so no port can be taken in
between; every server is killed when its test ends. The ASGI app under test is
``app`` below, which the server imports from this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio  # the app sleeps with anyio so that it runs on hypercorn's asyncio and trio workers
import pytest

HERE = Path(__file__).resolve()
APP = f"{HERE}:app"
ROOT = HERE.parent.parent


# -- the ASGI app the servers run ------------------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/`` small body; ``/slow?s=S``; ``/stream?chunks=N&interval=S`` (a watch); ``/echo`` (POST).

    Backend-neutral (anyio), so the same app runs on hypercorn's trio worker.
    """
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if os.environ.get("GOAWAY_TEST_HANG_AT_SHUTDOWN"):
                    await anyio.sleep_forever()  # a worker that never finishes its shutdown
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    path = scope["path"]
    body = b""
    if path == "/echo":
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
    headers = [(b"content-type", b"text/plain"), (b"x-worker-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if path == "/slow":
        await anyio.sleep(float(query.get("s", "1")))
        await send({"type": "http.response.body", "body": b"slow done\n"})
    elif path == "/stream":
        chunks, interval = int(query.get("chunks", "10")), float(query.get("interval", "0.05"))
        for index in range(chunks):
            await send({"type": "http.response.body", "body": b"chunk %d\n" % index, "more_body": True})
            await anyio.sleep(interval)
        await send({"type": "http.response.body", "body": b"end\n"})
    elif path == "/echo":
        await send({"type": "http.response.body", "body": body})
    else:
        await send({"type": "http.response.body", "body": b"ok\n"})


def stream_body(chunks: int) -> bytes:
    """What ``/stream?chunks=N`` sends in full."""
    return b"".join(b"chunk %d\n" % i for i in range(chunks)) + b"end\n"


# -- running servers -------------------------------------------------------------------


@dataclass
class Server:
    """A running hypercorn subprocess and the lines of its error log."""

    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drain_lines(self) -> list[str]:
        return [line for line in self.log if "goaway_ext: drained" in line]

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(needle in line for line in self.log) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} x{count} not logged within {timeout}s; log: {self.log}")
            time.sleep(0.02)


@contextlib.contextmanager
def hypercorn_server(*args: str, module: str = "goaway_ext.hypercorn", workers: int = 0,
                     config: str | None = None, tmp_path: Path | None = None) -> Iterator[Server]:
    """Run ``python -m MODULE`` on a fresh 127.0.0.1 socket; always kill it afterwards."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = listener.getsockname()[1]
    command = [sys.executable, "-m", module, APP, "--bind", f"fd://{listener.fileno()}",
               "--workers", str(workers), "--error-logfile", "-", *args]
    if config is not None:
        assert tmp_path is not None
        config_path = tmp_path / "hypercorn.toml"
        config_path.write_text(config)
        command += ["--config", str(config_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, pass_fds=[listener.fileno()], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=ROOT)
    listener.close()
    server = Server(process, port)

    def read_log() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.log.append(line.rstrip("\n"))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        server.wait_for_log("Running on", timeout=20.0)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        reader.join(timeout=5)


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a client coroutine with a hard bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- real clients ----------------------------------------------------------------------

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (make system-tools)")
needs_nghttp = pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp not installed (make system-tools)")


@needs_curl
def test_curl_gets_every_response_whole_while_each_request_drains() -> None:
    # chance 1.0: every request starts a drain on its connection, and is still served.
    with hypercorn_server("--goaway-chance", "1.0", "--goaway-allow-high-chance") as server:
        for path, expected in [("/", b"ok\n"), ("/stream?chunks=6&interval=0.02", stream_body(6))]:
            for _ in range(3):  # one curl per request: curl 7.88 mishandles a reused prior-knowledge connection
                result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
                                         server.url + path], capture_output=True, timeout=20, check=True)
                assert result.stdout == expected
        result = subprocess.run(["curl", "-sS", "--http1.1", "-i", "--max-time", "10", server.url + "/"],
                                capture_output=True, timeout=20, check=True)
        assert result.stdout.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in result.stdout.lower()
        server.wait_for_log("goaway_ext: drained", count=6)  # curl closes first: "closed by the peer"


@needs_nghttp
def test_nghttp_completes_requests_multiplexed_on_a_draining_connection() -> None:
    with hypercorn_server("--goaway-chance", "1.0", "--goaway-allow-high-chance") as server:
        urls = [server.url + "/stream?chunks=8&interval=0.03"] + [server.url + "/"] * 4
        result = subprocess.run(["nghttp", "-v", *urls], capture_output=True, timeout=30, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("recv GOAWAY frame") == 2  # notice (2^31-1), then final
        assert "last_stream_id=2147483647" in result.stdout
        assert result.stdout.count("chunk ") == 8 and "end\n" in result.stdout


def test_load_through_goaways_fails_nothing_and_reconnects_once_per_goaway() -> None:
    from goaway_ext.asyncio_client import H2Client

    requests, concurrency = 1500, 10

    async def load(port: int) -> H2Client:
        client = H2Client("127.0.0.1", port, timeout=20.0)
        counter = iter(range(requests))
        failures: list[BaseException] = []

        async def worker() -> None:
            for index in counter:
                try:
                    if index % 7 == 0:
                        response = await client.request("POST", "/echo", body=b"x" * 100)
                        assert response.body == b"x" * 100
                    else:
                        response = await client.request("GET", "/")
                        assert response.body == b"ok\n"
                    assert response.status == 200
                except Exception as exc:  # counted and reported below
                    failures.append(exc)

        async with client:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        assert not failures, failures[:3]
        return client

    with hypercorn_server("--goaway-chance", "0.02", "--goaway-seed", "7") as server:
        client = run(load(server.port))
    assert client.goaways_received > 10  # ~requests * 0.02
    # Kubernetes' invariant: opened == GOAWAYs + 1, except that a GOAWAY on the
    # last connection (after the last request) opens nothing.
    assert client.goaways_received <= client.connections_opened <= client.goaways_received + 1


def test_load_generator_at_chance_002_fails_nothing_and_reopens_once_per_goaway() -> None:
    # The run is 20,000 requests (README: 0 failed, 379 opened = 375 GOAWAYs + 4);
    # 4,000 keep this test within a few seconds on a shared 2-core machine.
    import goaway_ext.loadgen  # noqa: F401  (an import error in our own module must fail)
    connections = 4
    with hypercorn_server("--goaway-chance", "0.02", "--goaway-seed", "11") as server:
        result = subprocess.run(
            [sys.executable, "-m", "goaway_ext", "load", server.url + "/", "-n", "4000", "-c", str(connections),
             "-m", "10", "--json", "--no-progress", "--timeout", "20"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["requests"], summary["succeeded"], summary["failed"]) == (4000, 4000, 0)
    assert summary["goaways_received"] > 30  # ~4000 * 0.02, less what draining connections carry
    # opened == GOAWAYs + initial, less the final connections that got a GOAWAY after their last request
    assert summary["goaways_received"] <= summary["connections_opened"] <= summary["goaways_received"] + connections


def test_keep_alive_max_requests_drains_instead_of_dropping_in_flight_responses(tmp_path: Path) -> None:
    # Stock hypercorn answers 0 of these 5 (README, "before/after"): request 6
    # crosses keep_alive_max_requests=5 and close_connection() drops the rest.
    from goaway_ext.asyncio_client import H2Client

    async def scenario(port: int) -> tuple[list[bytes], H2Client]:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            await client.request("GET", "/")
            responses = await asyncio.gather(*(client.request("GET", "/slow?s=0.5") for _ in range(5)))
            return [r.body for r in responses], client

    with hypercorn_server(config="keep_alive_max_requests = 5\n", tmp_path=tmp_path) as server:
        bodies, client = run(scenario(server.port))
        server.wait_for_log("reason=max_requests")
    assert bodies == [b"slow done\n"] * 5
    assert client.connections_opened == 1


def test_a_stream_in_flight_when_shutdown_starts_is_read_in_full() -> None:
    from goaway_ext.asyncio_client import H2Client

    chunks = 30

    async def scenario(server: Server) -> tuple[bytes, H2Client]:
        async with H2Client("127.0.0.1", server.port, timeout=10.0) as client:
            async with client.stream("GET", f"/stream?chunks={chunks}&interval=0.05") as response:
                body = b""
                async for chunk in response:
                    if not body:
                        server.process.send_signal(signal.SIGTERM)  # shutdown: drain now
                    body += chunk
            return body, client

    with hypercorn_server("--graceful-timeout", "10") as server:
        body, client = run(scenario(server))
        assert server.process.wait(timeout=10) == 0
        server.wait_for_log("reason=shutdown")
    assert body == stream_body(chunks)
    assert client.goaways_received == 1


def test_the_stream_whose_request_started_the_drain_is_read_in_full() -> None:
    from goaway_ext.asyncio_client import H2Client

    async def scenario(port: int) -> tuple[bytes, bytes, H2Client]:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            async with client.stream("GET", "/stream?chunks=20&interval=0.03") as response:
                first = await response.read()
            second = (await client.request("GET", "/")).body
            return first, second, client

    with hypercorn_server("--goaway-chance", "1.0", "--goaway-allow-high-chance", "--goaway-mode", "single") as server:
        first, second, client = run(scenario(server.port))
    assert first == stream_body(20)
    assert second == b"ok\n"
    assert client.connections_opened == 2 and client.goaways_received >= 1


def test_trio_worker_drains_and_a_stream_in_flight_at_shutdown_completes() -> None:
    # One spawned trio worker (hypercorn's default process layout): SIGTERM to
    # the parent reaches the worker as hypercorn's graceful shutdown.
    pytest.importorskip("trio")
    from goaway_ext.asyncio_client import H2Client

    chunks = 20

    async def scenario(server: Server) -> tuple[bytes, bytes, H2Client]:
        async with H2Client("127.0.0.1", server.port, timeout=10.0) as client:
            first = (await client.request("GET", "/")).body
            async with client.stream("GET", f"/stream?chunks={chunks}&interval=0.05") as response:
                body = b""
                async for chunk in response:
                    if not body:
                        server.process.send_signal(signal.SIGTERM)
                    body += chunk
            return first, body, client

    with hypercorn_server("--worker-class", "trio", "--goaway-max-requests", "1", "--graceful-timeout", "10",
                          workers=1) as server:
        first, body, client = run(scenario(server))
        server.wait_for_log("reason=max_requests", count=1)
        server.process.wait(timeout=15)
    assert first == b"ok\n"
    assert body == stream_body(chunks)
    assert client.connections_opened == 2  # max_requests=1: the stream went to a new connection


def test_spawned_workers_get_the_hook_too(tmp_path: Path) -> None:
    # hypercorn's default: one spawned worker process, which receives the
    # config by pickle; the goaway_* keys in the TOML file must reach it.
    config = "goaway_chance = 1.0\ngoaway_allow_high_chance = true\ngoaway_mode = \"single\"\n"
    with hypercorn_server(workers=1, config=config, tmp_path=tmp_path) as server:
        result = subprocess.run([sys.executable, "-c", _ONE_REQUEST, str(server.port)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"body": "ok\n", "goaways": 1}
        server.wait_for_log("reason=chance")


def test_reload_workers_get_the_hook_too(tmp_path: Path) -> None:
    # --reload: hypercorn's reloader spawns the worker process (again after each change);
    # the worker it starts must install the hook as well.
    config = "goaway_chance = 1.0\ngoaway_allow_high_chance = true\ngoaway_mode = \"single\"\n"
    with hypercorn_server("--reload", workers=1, config=config, tmp_path=tmp_path) as server:
        result = subprocess.run([sys.executable, "-c", _ONE_REQUEST, str(server.port)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"body": "ok\n", "goaways": 1}
        server.wait_for_log("reason=chance")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0


_ONE_REQUEST = """
import asyncio, json, sys
from goaway_ext.asyncio_client import H2Client
async def main():
    async with H2Client("127.0.0.1", int(sys.argv[1]), timeout=10) as client:
        response = await client.request("GET", "/")
        await asyncio.sleep(0.2)
        print(json.dumps({"body": response.body.decode(), "goaways": client.goaways_received}))
asyncio.run(main())
"""


def test_bad_goaway_option_fails_at_startup_with_its_name() -> None:
    result = subprocess.run([sys.executable, "-m", "goaway_ext.hypercorn", APP, "--goaway-chance", "0.5",
                             "--bind", "127.0.0.1:0"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    # One line, in the names typed on the command line.
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("python -m goaway_ext.hypercorn: --goaway-chance 0.5 is above 0.02")
    assert "Pass --goaway-allow-high-chance" in result.stderr


def test_httpx_transport_against_hypercorn_fails_nothing() -> None:
    httpx = pytest.importorskip("httpx")
    from goaway_ext.httpx import AsyncGracefulTransport

    async def load(url: str) -> int:
        failures = 0
        transport = AsyncGracefulTransport(http2=True, http1=False)
        async with httpx.AsyncClient(transport=transport, base_url=url, timeout=20.0) as client:
            async def worker(count: int) -> None:
                nonlocal failures
                for index in range(count):
                    try:
                        if index % 5 == 0:
                            response = await client.post("/echo", content=b"y" * 64)
                            ok = response.content == b"y" * 64
                        else:
                            response = await client.get("/stream?chunks=2&interval=0" if index % 3 else "/")
                            ok = response.status_code == 200 and response.http_version == "HTTP/2"
                        failures += not ok
                    except httpx.HTTPError:
                        failures += 1

            await asyncio.gather(*(worker(60) for _ in range(10)))
        return failures

    with hypercorn_server("--goaway-chance", "0.02", "--goaway-seed", "3") as server:
        assert run(load(server.url)) == 0
        server.wait_for_log("goaway_ext: drained", count=3)


# -- in process: the one line from code ------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(config: Any) -> Iterator[int]:
    """``hypercorn.asyncio.serve(app, config)`` on its own loop and thread; port 0; always stopped."""
    import hypercorn.asyncio

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns and closes it
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait))
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        loop.close()
    assert not errors, errors


def test_enable_goaway_is_one_line_from_code_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    from hypercorn.config import Config

    from goaway_ext import GoawayPolicy
    from goaway_ext.asyncio_client import H2Client
    from goaway_ext.hypercorn import enable_goaway, totals, uninstall_protocol

    async def scenario(port: int) -> H2Client:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            for _ in range(5):
                assert (await client.request("GET", "/")).body == b"ok\n"
            for _ in range(1000):  # the last connection's drain is counted when it ends
                if totals().drains - before.drains == 5:
                    break
                await asyncio.sleep(0.01)
            return client

    caplog.set_level("INFO", logger="goaway_ext.hypercorn")
    before = totals()
    config = Config()
    enable_goaway(config, GoawayPolicy(1.0, allow_high_chance=True, mode="single", linger=0.05))
    try:
        with serve_in_thread(config) as port:
            client = run(scenario(port))
    finally:
        uninstall_protocol()
    after = totals()
    assert client.connections_opened == 5 == client.goaways_received
    assert after.connections - before.connections == 5
    assert after.goaways_sent.get("chance", 0) - before.goaways_sent.get("chance", 0) == 5
    assert after.drains - before.drains == 5
    drained = [r for r in caplog.records if r.name == "goaway_ext.hypercorn" and "goaway_ext: drained" in r.message]
    assert len(drained) == 5 and all("reason=chance" in r.message for r in drained)


def test_a_config_that_was_not_enabled_stays_stock_hypercorn() -> None:
    from hypercorn.config import Config

    from goaway_ext.asyncio_client import H2Client
    from goaway_ext.hypercorn import install_protocol, policy_for, totals, uninstall_protocol

    async def scenario(port: int) -> H2Client:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            for _ in range(3):
                await client.request("GET", "/")
            return client

    config = Config()
    assert policy_for(config) is None
    before = totals()
    install_protocol()  # process-wide hook, but this config never asked for it
    try:
        with serve_in_thread(config) as port:
            client = run(scenario(port))
    finally:
        uninstall_protocol()
    assert client.goaways_received == 0
    assert totals().connections == before.connections


def test_config_keys_and_keep_alive_max_requests_map_onto_the_policy() -> None:
    from hypercorn.config import Config

    from goaway_ext import GoawayPolicy
    from goaway_ext.hypercorn import policy_for

    config = Config.from_mapping({"goaway_chance": 0.001, "goaway_max_age": 30, "goaway_mode": "single",
                                  "keep_alive_max_requests": 500})
    policy = policy_for(config)
    assert policy is not None
    assert (policy.chance, policy.max_age, policy.mode, policy.max_requests) == (0.001, 30.0, "single", 500)
    assert policy_for(config) is policy  # one policy per config: per-connection seeds from one generator
    config.goaway_max_requests = 100
    assert policy_for(config).max_requests == 100  # type: ignore[union-attr]

    given = GoawayPolicy(0.001, max_age=60)
    code_config = Config()
    code_config.keep_alive_max_requests = 50
    from goaway_ext.hypercorn import enable_goaway, uninstall_protocol

    try:
        enable_goaway(code_config, given)
        mapped = policy_for(code_config)
        assert mapped is not given and mapped is not None
        assert (mapped.chance, mapped.max_age, mapped.max_requests) == (0.001, 60.0, 50)
        with pytest.raises(ValueError, match=r"goaway_\*: .*mode"):
            enable_goaway(Config.from_mapping({"goaway_mode": "sometimes"}))
    finally:
        uninstall_protocol()


def test_a_serving_connection_is_h2s_own_to_hypercorn_until_its_drain_starts() -> None:
    # While serving, hypercorn's connection.data_to_send() and receive_data() find
    # their methods on the class (h2's own write, a read scanned by the core's gate):
    # no per-instance attribute, so CPython specialises hypercorn's call sites.
    # start_drain switches the object to the draining methods: the GOAWAY and PING
    # come out of the next data_to_send(), and the PING's ACK is swallowed and
    # answered with the final GOAWAY.
    import h2.connection
    import h2.events
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.config import Config

    from goaway_ext import ClientConnection, GoawayPolicy, GoawayReceived
    from goaway_ext.hypercorn import GoawayH2Protocol, enable_goaway, uninstall_protocol

    async def send(event: Any) -> None:
        pass

    config = enable_goaway(Config(), GoawayPolicy(0.0, linger=0.05))
    try:
        protocol = GoawayH2Protocol(None, config, WorkerContext(None), None, None, False, None, None, send)
    finally:
        uninstall_protocol()
    connection = protocol.connection
    assert type(connection).data_to_send is h2.connection.H2Connection.data_to_send
    assert "data_to_send" not in vars(connection) and "receive_data" not in vars(connection)
    client = ClientConnection()  # reads on after a GOAWAY, as h2's own client does not
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
                        end_stream=True)
    connection.initiate_connection()
    events = connection.receive_data(client.data_to_send())
    assert [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)] == [1]
    client.receive_data(connection.data_to_send())
    connection.start_drain()
    assert type(connection).data_to_send is not h2.connection.H2Connection.data_to_send
    notice = [e for e in client.receive_data(connection.data_to_send())
              if isinstance(e, (GoawayReceived, h2.events.PingReceived))]
    assert sorted(type(e).__name__ for e in notice) == ["GoawayReceived", "PingReceived"]
    assert [e.last_stream_id for e in notice if isinstance(e, GoawayReceived)] == [2**31 - 1]
    events = connection.receive_data(client.data_to_send())  # the PING ACK
    assert not [e for e in events if isinstance(e, h2.events.PingAckReceived)]
    connection.send_headers(1, [(":status", "200")], end_stream=True)
    final = [e for e in client.receive_data(connection.data_to_send()) if isinstance(e, GoawayReceived)]
    assert [e.last_stream_id for e in final] == [1]
    assert connection.is_drained


def test_goaway_keys_beside_a_policy_given_in_code_are_not_read() -> None:
    # The policy given in code decides alone; the config's goaway_* policy keys
    # are not read, so not checked either (checking them would need vars(config),
    # which slows every later config read down on CPython 3.11).
    from hypercorn.config import Config

    from goaway_ext import GoawayPolicy
    from goaway_ext.hypercorn import enable_goaway, policy_for, uninstall_protocol

    given = GoawayPolicy(0.001)
    try:
        config = enable_goaway(Config.from_mapping({"goaway_chance": 0.01, "goaway_max_reqests": 10}), given)
        policy = policy_for(config)
        assert policy is not None
        # The given chance, not the key's; hypercorn's keep_alive_max_requests (1000) still maps.
        assert (policy.chance, policy.max_requests) == (0.001, 1000)
    finally:
        uninstall_protocol()


def test_prometheus_metrics_when_prometheus_client_is_installed() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from hypercorn.config import Config

    from goaway_ext import GoawayPolicy
    from goaway_ext.asyncio_client import H2Client
    from goaway_ext.hypercorn import enable_goaway, uninstall_protocol

    def sample(name: str, **labels: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    async def scenario(port: int) -> None:
        async with H2Client("127.0.0.1", port, timeout=10.0) as client:
            for _ in range(3):
                await client.request("GET", "/")
            for _ in range(1000):  # the last connection's drain is counted when it ends
                if sample("goaway_ext_drain_seconds_count") - drains == 3:
                    break
                await asyncio.sleep(0.01)

    goaways = sample("goaway_ext_goaways_sent_total", reason="chance")
    drains = sample("goaway_ext_drain_seconds_count")
    config = enable_goaway(Config(), GoawayPolicy(1.0, allow_high_chance=True, linger=0.05))
    try:
        with serve_in_thread(config) as port:
            run(scenario(port))
    finally:
        uninstall_protocol()
    assert sample("goaway_ext_goaways_sent_total", reason="chance") - goaways == 6  # notice + final, x3
    assert sample("goaway_ext_drain_seconds_count") - drains == 3


# -- shutdown with several workers, and a client that never ACKs ---------------------------


@pytest.mark.parametrize("to", ["parent", "process group"])
def test_sigterm_with_two_workers_lets_every_slow_request_finish(to: str) -> None:
    # Stock hypercorn.run.run terminates the other workers as soon as one
    # exits, so the longest request (3.5 s here) is always cut: whichever worker
    # holds it, the other one exits first (idle, or its last request is shorter).
    # "process group": the workers get SIGTERM too (systemd, kill -- -PGID).
    from goaway_ext.asyncio_client import H2Client

    durations = [2.0, 2.5, 3.0, 3.5]

    async def scenario(server: Server) -> tuple[list[tuple[int, bytes]], set[str]]:
        started: asyncio.Queue[str] = asyncio.Queue()

        async def one(seconds: float) -> tuple[int, bytes]:
            async with H2Client("127.0.0.1", server.port, timeout=20.0) as client:
                async with client.stream("GET", f"/slow?s={seconds}") as response:
                    await started.put(response.header("x-worker-pid") or "?")
                    return response.status, await response.read()

        tasks = [asyncio.create_task(one(seconds)) for seconds in durations]
        pids = {await started.get() for _ in durations}  # every request is in flight
        server.process.send_signal(signal.SIGTERM)
        if to == "process group":
            for pid in pids:
                os.kill(int(pid), signal.SIGTERM)
        return list(await asyncio.gather(*tasks)), pids

    with hypercorn_server("--graceful-timeout", "10", workers=2) as server:
        results, pids = run(scenario(server))
        assert server.process.wait(timeout=20) == 0
    assert results == [(200, b"slow done\n")] * len(durations)
    print("worker pids that served the requests:", pids)


def _frames(data: bytes) -> list[Any]:
    from hyperframe.frame import Frame

    frames, view = [], memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        frame.parse_body(view[9:9 + length])
        frames.append(frame)
        view = view[9 + length:]
    return frames


def test_shutdown_sends_the_final_goaway_to_a_client_that_never_acks_the_ping() -> None:
    # graceful_timeout 4 s < ping_timeout 5 s: the PING wait of a shutdown drain
    # is capped at half of graceful_timeout, so the final GOAWAY (last stream 1)
    # goes out before hypercorn cuts the connection, and the request still ends.
    import h2.config
    import h2.connection
    from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame

    with hypercorn_server("--graceful-timeout", "4") as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.send_headers(1, [(b":method", b"GET"), (b":path", b"/slow?s=2"), (b":scheme", b"http"),
                                (b":authority", b"test")], end_stream=True)
        sock.sendall(client.data_to_send())  # and nothing after this: no SETTINGS ACK, no PING ACK
        received = b""
        while not any(isinstance(f, HeadersFrame) for f in _frames(received)):
            chunk = sock.recv(65536)
            assert chunk, "closed before the response started"
            received += chunk
        server.process.send_signal(signal.SIGTERM)
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        assert server.process.wait(timeout=20) == 0
    frames = _frames(received)
    assert [f.last_stream_id for f in frames if isinstance(f, GoAwayFrame)] == [2**31 - 1, 1]
    assert any(isinstance(f, PingFrame) and "ACK" not in f.flags for f in frames)
    assert b"".join(f.data for f in frames if isinstance(f, DataFrame)) == b"slow done\n"
    assert any(isinstance(f, DataFrame) and "END_STREAM" in f.flags for f in frames)
    server.wait_for_log("reason=shutdown")


# -- errors a person sees ----------------------------------------------------------------


def _wrapper(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "goaway_ext.hypercorn", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_an_unknown_goaway_key_in_the_config_names_it_and_the_closest_valid_one(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text("goaway_chanse = 0.001\n")
    result = _wrapper(APP, "--config", str(config), "--bind", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr == ("python -m goaway_ext.hypercorn: unknown hypercorn config key goaway_chanse; "
                             "did you mean goaway_chance?\n")

    from hypercorn.config import Config

    from goaway_ext.hypercorn import enable_goaway, uninstall_protocol

    try:
        with pytest.raises(ValueError, match="unknown hypercorn config key goaway_max_reqests; did you mean "
                                             "goaway_max_requests"):
            enable_goaway(Config.from_mapping({"goaway_max_reqests": 10}))
    finally:
        uninstall_protocol()


def test_a_bad_value_in_the_config_file_is_named_as_its_key(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text("goaway_chance = 0.5\n")
    result = _wrapper(APP, "--config", str(config), "--bind", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "goaway_chance=0.5 is above 0.02" in result.stderr
    assert "Set goaway_allow_high_chance = true" in result.stderr


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("application, problem", [
    ("no_such_module_here:app", "no module named 'no_such_module_here'"),
    (f"{HERE}:no_such_app", "application not found"),
])
def test_a_missing_app_is_one_line_not_a_traceback(workers: int, application: str, problem: str) -> None:
    result = _wrapper(application, "--bind", "127.0.0.1:0", "--workers", str(workers))
    assert result.returncode != 0
    # With a worker process, the policy line comes first (the worker finds the app missing).
    lines = [line for line in result.stderr.splitlines() if line.strip() and "connections follow" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m goaway_ext.hypercorn: ") and problem in lines[0]


def test_help_names_the_wrapper_and_has_no_markup() -> None:
    result = _wrapper("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m goaway_ext.hypercorn ")
    assert "usage: python -m goaway_ext.hypercorn [-h]" in result.stdout  # hypercorn's part, under our name
    assert "hypercorn.py" not in result.stdout and "`" not in result.stdout
    assert "--goaway-chance" in result.stdout and "--graceful-timeout" in result.stdout


def test_startup_logs_the_effective_policy_in_one_line(tmp_path: Path) -> None:
    with hypercorn_server("--goaway-chance", "0.001", config="keep_alive_max_requests = 50\n",
                          tmp_path=tmp_path) as server:
        lines = [line for line in server.log if "goaway_ext: HTTP/2 connections follow" in line]
    assert len(lines) == 1
    assert "GoawayPolicy(chance=0.001, max_requests=50," in lines[0] and "mode='graceful'" in lines[0]


def test_no_application_or_an_unknown_option_is_one_line_not_hypercorns_whole_usage() -> None:
    for args, needle in [((), "the following arguments are required: application"),
                         ((APP, "--no-such-option"), "unrecognized arguments: --no-such-option")]:
        result = _wrapper(*args)
        assert result.returncode == 2
        prog = "python -m goaway_ext.hypercorn"
        assert result.stderr == f"{prog}: {needle} (see {prog} --help)\n"


def test_version_and_the_console_script_name_itself() -> None:
    import goaway_ext

    result = _wrapper("--version")
    assert (result.returncode, result.stdout) == (0, f"goaway_ext {goaway_ext.__version__}\n")
    script = Path(sys.executable).parent / "goaway-ext-hypercorn"
    if not script.exists():
        pytest.skip(f"console scripts are not installed next to {sys.executable}")
    usage = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: goaway-ext-hypercorn ")
    assert "usage: goaway-ext-hypercorn [-h]" in usage.stdout


_RUN_WITH_SHORT_MARGIN = """
import sys
from hypercorn.config import Config
import goaway_ext.hypercorn as wrapper
wrapper.WORKER_EXIT_MARGIN = 0.5
config = Config()
config.application_path = sys.argv[1]
config.bind = ["127.0.0.1:0"]
config.workers = 1
config.graceful_timeout = 0.5
config.errorlog = "-"
wrapper.enable_goaway(config)
sys.exit(wrapper.run(config))
"""


def test_a_worker_still_running_after_graceful_timeout_and_the_margin_is_killed() -> None:
    env = dict(os.environ, GOAWAY_TEST_HANG_AT_SHUTDOWN="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-c", _RUN_WITH_SHORT_MARGIN, APP], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "Running on" in line:
                break
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "still running 0.5 s + 0.5 s after shutdown began; killing it" in output


@pytest.mark.parametrize("worker_class", ["asyncio", "trio"])
def test_max_idle_drains_a_connection_once_its_last_stream_ended(worker_class: str) -> None:
    # The idle time starts when the connection's last stream ends, which
    # happens after a stream was open (the timer had nothing to wait for then).
    if worker_class == "trio":
        pytest.importorskip("trio")
    from goaway_ext.asyncio_client import H2Client

    async def scenario(server: Server) -> H2Client:
        async with H2Client("127.0.0.1", server.port, timeout=10.0) as client:
            assert (await client.request("GET", "/slow?s=1.5")).body == b"slow done\n"  # longer than max_idle
            for _ in range(400):  # the GOAWAY arrives about 0.5 s after the response
                if client.goaways_received:
                    break
                await asyncio.sleep(0.02)
            return client

    with hypercorn_server("--goaway-max-idle", "0.5", "--goaway-jitter", "0", "--worker-class", worker_class,
                          "--keep-alive", "60") as server:
        client = run(scenario(server))
        server.wait_for_log("reason=max_idle")
    assert client.goaways_received >= 1
