"""``python -m goaway_ext load`` against a real ``serve`` over sockets, on both of its engines.

The fast engine (requests encoded once, responses read without ``h2``) and the
``h2`` engine must keep the same promises: at chance 0 nothing drains; at a
draining chance, in every drain mode, every request is answered (refused ones
retried on the replacement connection), nothing fails, and each GOAWAY is
counted once (connections opened = GOAWAYs + connections held).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from serve_process import ServeProcess

from goaway_ext import loadgen
from goaway_ext.loadgen import run_load

REQUESTS = 1500


class Serve(ServeProcess):
    """``serve`` with its URL ending in "/", as ``load`` takes it."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args)
        self.url += "/"


# Mode idle waits for a moment without streams, which a loaded connection never has, and
# falls back to graceful after --grace: a short grace makes its drains happen in the run.
@pytest.fixture(scope="module", params=[("0", "graceful"), ("0.05", "graceful"), ("0.05", "single"),
                                        ("0.05", "idle")], ids=lambda p: f"chance{p[0]}-{p[1]}")
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Serve, float]]:
    chance, mode = request.param
    serve = Serve("--chance", chance, "--allow-high-chance", "--mode", mode,
                  *(["--grace", "0.1"] if mode == "idle" else []))
    try:
        yield serve, float(chance)
    finally:
        serve.stop()


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_every_request_answered(server: tuple[Serve, float], engine: str) -> None:
    serve, chance = server
    result = run_load(serve.url, requests=REQUESTS, connections=4, streams=8, timeout=20, engine=engine)
    assert result.failed == 0 and result.succeeded == REQUESTS == result.requests, result.errors
    assert result.status == {"200": REQUESTS}
    assert result.connections_opened == result.goaways_received + 4
    if chance:
        assert result.goaways_received > 0  # 1500 draws at 5%: none at all has odds of 1e-33
        # Streams above a GOAWAY's last-stream-id come back refused and are sent again.
        assert result.requests_retried <= result.streams_refused
    else:
        assert result.goaways_received == result.streams_refused == result.requests_retried == 0
    assert 0 < result.latency()["min"] <= result.latency()["p99"] <= result.latency()["max"]


@pytest.mark.parametrize("server", [("0", "graceful")], indirect=True, ids=["chance0-graceful"])
def test_a_body_goes_through_h2_and_the_cli_names_the_engine(server: tuple[Serve, float]) -> None:
    serve, _ = server
    body = b"x" * 100_000  # more than the stream's first window: h2's flow control sends it in parts
    result = run_load(serve.url + "echo", requests=40, connections=2, streams=4, method="POST", body=body,
                      timeout=20)
    assert result.failed == 0 and result.status == {"200": 40}, result.errors
    with pytest.raises(ValueError, match="engine='fast' sends no request body, got body of 1 bytes"):
        run_load(serve.url, requests=1, body=b"x", engine="fast")
    with pytest.raises(ValueError, match="engine must be one of auto, fast, h2, got 'h3'"):
        run_load(serve.url, requests=1, engine="h3")
    for engine in ("fast", "h2"):
        done = subprocess.run([sys.executable, "-m", "goaway_ext", "load", serve.url, "-n", "30", "-c", "2", "-m", "3",
                               "--engine", engine, "--no-progress"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "requests: 30 total, 30 succeeded, 0 failed" in done.stdout, done.stderr


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_over_tls(engine: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (serve --tls makes its self-signed certificate with it)")
    serve = Serve("--chance", "0.05", "--allow-high-chance", "--tls")
    try:
        url = serve.url.replace("http://", "https://")
        result = run_load(url, requests=300, connections=2, streams=5, timeout=20, insecure=True, engine=engine)
    finally:
        serve.stop()
    assert result.failed == 0 and result.status == {"200": 300}, result.errors
    assert result.goaways_received > 0 and result.connections_opened == result.goaways_received + 2


def test_through_haproxy(tmp_path: Path) -> None:
    # HAProxy's HPACK coder is C and strict (a size update or an index it did not
    # expect is a COMPRESSION_ERROR), and its response blocks are not h2's.
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (make test installs it as root)")
    serve = Serve("--chance", "0")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    backend = serve.url.split("//", 1)[1].rstrip("/")
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind fd@{listener.fileno()} proto h2
    default_backend back
backend back
    server s1 {backend} proto h2
""")
    proxy = subprocess.Popen([haproxy, "-f", str(config), "-db"], pass_fds=[listener.fileno()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()  # HAProxy holds it; connections wait in its backlog until it accepts
    try:
        for engine in ("fast", "h2"):
            result = run_load(url, requests=400, connections=2, streams=8, timeout=20, engine=engine)
            assert result.failed == 0 and result.status == {"200": 400}, (engine, result.errors)
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        serve.stop()


class RawH2Server(asyncio.Protocol):
    """A scripted server for one test: h2's own connection, its preface sent on accept; subclasses answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())


def load_against(protocol: Callable[[], asyncio.Protocol], requests: int, streams: int, engine: str) -> Any:
    """``load`` on one connection at a time against ``protocol`` served on 127.0.0.1; its result."""
    async def scenario() -> Any:
        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(loadgen.run_load_async(f"http://127.0.0.1:{port}/", requests=requests,
                                                                 connections=1, streams=streams, timeout=10,
                                                                 engine=engine), 30)
        finally:
            server.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_the_command_exits_1_when_a_request_failed(engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    # README "Load generator": an h2load-style summary on stdout, exit status 1 if any request failed.
    # The server resets every stream with INTERNAL_ERROR: not a refusal, so nothing is retried.
    from h2.errors import ErrorCodes

    from goaway_ext.__main__ import main

    class ResetsEverything(RawH2Server):
        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.conn.reset_stream(event.stream_id, ErrorCodes.INTERNAL_ERROR)
            self.transport.write(self.conn.data_to_send())

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(ResetsEverything, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        status = main(["load", f"http://127.0.0.1:{port}/", "-n", "6", "-c", "2", "-m", "3", "--engine", engine,
                       "--timeout", "10", "--no-progress"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    out = capsys.readouterr().out
    assert status == 1, out
    assert "requests: 6 total, 0 succeeded, 6 failed" in out, out


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_refusal_and_goaway_in_one_read(engine: str) -> None:
    # Regression: a REFUSED_STREAM read before a GOAWAY in the same read made the retry
    # reach this connection before its own loop saw the GOAWAY; the GOAWAY went uncounted
    # (connections opened != GOAWAYs + connections held).
    from h2.errors import ErrorCodes

    from goaway_ext import encode_goaway

    seen: list[int] = []

    class Scripted(RawH2Server):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.scripted = bool(seen)  # only the first connection is scripted
            seen.append(1)

        def data_received(self, data: bytes) -> None:
            ids = [e.stream_id for e in self.conn.receive_data(data) if isinstance(e, h2.events.RequestReceived)]
            if not self.scripted and len(ids) >= 2:
                self.scripted = True
                self.conn.reset_stream(ids[0], ErrorCodes.REFUSED_STREAM)
                out = self.conn.data_to_send() + encode_goaway(ids[-1])
                for stream_id in ids[1:]:
                    self.conn.send_headers(stream_id, [(":status", "200")], end_stream=True)
                self.transport.write(out + self.conn.data_to_send())
                self.transport.close()
                return
            for stream_id in ids:
                self.conn.send_headers(stream_id, [(":status", "200")], end_stream=True)
            self.transport.write(self.conn.data_to_send())

    result = load_against(Scripted, requests=40, streams=4, engine=engine)
    assert result.failed == 0 and result.status == {"200": 40}, result.errors
    assert result.streams_refused >= 1 and result.requests_retried >= 1
    assert result.goaways_received == 1 and result.connections_opened == 2


class PingFlood:
    """A raw server on 127.0.0.1: SETTINGS, then PINGs as fast as the socket takes them; it reads nothing.

    Its receive buffer is small, so the client's PING ACKs back up in the client
    after a few KiB instead of several MiB of kernel buffers on loopback.
    """

    PING = (8).to_bytes(3, "big") + bytes([6, 0]) + bytes(4) + b"floodnow"
    CAP = 16 << 20  # what it sends at most: the client without a bound reads it all

    def __init__(self) -> None:
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the accepted socket inherits it
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.flood, daemon=True)
        self.thread.start()

    def flood(self) -> None:
        self.listener.settimeout(30)
        with contextlib.suppress(OSError), self.listener.accept()[0] as conn:
            conn.settimeout(0.1)
            conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS: we are HTTP/2
            block = self.PING * 4096
            pending = memoryview(block)
            while not self.done.is_set() and self.sent < self.CAP:
                try:
                    sent = conn.send(pending)
                except TimeoutError:
                    continue  # the client stopped reading: it is holding back, as it should
                self.sent += sent
                pending = pending[sent:] or memoryview(block)
            self.done.wait(30)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        self.listener.close()


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_a_ping_flood_that_reads_nothing_cannot_grow_the_write_buffer(engine: str, monkeypatch: Any) -> None:
    # README "Load generator": past max_write_buffer unsent bytes a connection stops reading,
    # so the PING ACKs it owes a server that reads nothing stay bounded (the default, 64 KiB,
    # plus the replies to one read of at most 256 KiB); the request fails by its timeout.
    peak = [0]

    class Watched(loadgen._LoadConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # A small kernel send buffer too: the ACKs reach asyncio's buffer after a few KiB.
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport is not None:
                peak[0] = max(peak[0], self.transport.get_write_buffer_size())

    monkeypatch.setattr(loadgen, "_LoadConnection", Watched)
    flood = PingFlood()
    try:
        result = asyncio.run(asyncio.wait_for(loadgen.run_load_async(flood.url, requests=1, timeout=2,
                                                                     engine=engine), 60))
    finally:
        flood.close()
    assert result.failed == 1 and result.succeeded == 0
    assert list(result.errors) == ["no response on stream 1 within 2 s"]
    assert flood.sent < PingFlood.CAP  # the client stopped reading long before the flood's end
    assert 0 < peak[0] <= (64 << 10) + (256 << 10) + len(PingFlood.PING), peak[0]


@pytest.mark.parametrize("bad", [1023, 0, 65536.0, "64k"])
def test_max_write_buffer_bad_value_is_named(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_write_buffer"):
        run_load("http://127.0.0.1:9/", requests=1, max_write_buffer=bad)


@pytest.mark.parametrize("engine", ["fast", "h2"])
def test_a_connection_out_of_stream_ids_moves_to_a_new_one_without_losing_a_request(
        engine: str, monkeypatch: Any) -> None:
    # RFC 9113 5.1.1: a client cannot reuse a stream id; past 2**31-1 it needs a new connection.
    # The first connection starts 5 stream ids below the end, so the run crosses the limit at once.
    from goaway_ext._loadwire import LoadWire

    last = 2**31 - 1
    start = last - 8  # ids start, start+2, ... last: 5 requests
    ids: list[list[int]] = []  # per connection, the stream ids the server saw

    class StartsHigh(loadgen._LoadConnection):
        def __init__(self, run: Any) -> None:
            super().__init__(run)
            if not ids:  # the first connection only
                if isinstance(self.wire, LoadWire):
                    self.wire.next_stream_id = start
                else:
                    self.wire.h2.highest_outbound_stream_id = start - 2

    class Answering(RawH2Server):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.ids: list[int] = []
            ids.append(self.ids)

        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.ids.append(event.stream_id)
                    self.conn.send_headers(event.stream_id, [(":status", "200")], end_stream=True)
            self.transport.write(self.conn.data_to_send())

    monkeypatch.setattr(loadgen, "_LoadConnection", StartsHigh)

    result = load_against(Answering, requests=20, streams=2, engine=engine)
    assert result.failed == 0 and result.status == {"200": 20}, result.errors
    assert result.connections_opened == 2 and result.goaways_received == 0 and result.streams_refused == 0
    assert ids[0] == list(range(start, last + 1, 2))  # every id up to the last one, then no more
    assert ids[1] == list(range(1, 2 * 15, 2))  # the other 15 on the new connection
