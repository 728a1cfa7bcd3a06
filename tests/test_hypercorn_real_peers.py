"""hypercorn with the hook, judged by peers that are not our own H2Client.

The H2Client scenarios of test_hypercorn.py again with curl and nghttp, and the
two paths only a raw socket shows: a request arriving during shutdown is
refused with REFUSED_STREAM (hypercorn's own answer is a NO_ERROR reset), and a
drained client that never closes is closed after linger.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import h2.config
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame
from test_hypercorn import _frames, hypercorn_server, stream_body

from goaway_ext import ClientConnection, GoawayReceived, StreamRefused

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (make system-tools)")
needs_nghttp = pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp not installed (make system-tools)")
HIGH = ("--goaway-chance", "1.0", "--goaway-allow-high-chance")


class RawH2:
    """An ``h2`` client on a blocking socket that records events and never closes by itself.

    goaway_ext's ClientConnection, because plain h2 goes CLOSED at the first GOAWAY
    and then rejects the frames a draining server still sends.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.conn = ClientConnection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: list[Any] = []
        self.wire = b""  # every byte the server sent, to check frames h2 interprets for us
        self.eof = False
        self.flush()

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def get(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"GET"), (b":path", path.encode()), (b":scheme", b"http"),
                                     (b":authority", b"t")], end_stream=True)
        self.flush()
        return sid

    def read_until(self, done: Any) -> None:
        while not done() and not self.eof:
            data = self.sock.recv(65536)  # bounded by the socket timeout
            if not data:
                self.eof = True
                return
            self.wire += data
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.flush()

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", 0) == sid)]


def test_a_request_arriving_during_shutdown_is_refused_with_refused_stream() -> None:
    with hypercorn_server("--graceful-timeout", "10") as server:
        client = RawH2(server.port)
        slow = client.get("/slow?s=2")
        client.read_until(lambda: client.of(h2.events.ResponseReceived, slow))
        # The late request is encoded now (a draining client would not open it) and sent
        # only once the shutdown's GOAWAY arrived.
        late = client.conn.get_next_available_stream_id()
        client.conn.send_headers(late, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                        (b":authority", b"t")], end_stream=True)
        pending = client.conn.data_to_send()
        server.process.send_signal(signal.SIGTERM)
        client.read_until(lambda: client.of(GoawayReceived))  # the shutdown's GOAWAY
        # hypercorn alone resets it with NO_ERROR; the hook says REFUSED_STREAM, so a
        # client knows the server never processed it and may send it elsewhere.
        client.sock.sendall(pending)
        client.read_until(lambda: client.of(StreamRefused, late) and client.of(h2.events.StreamEnded, slow))
        client.sock.close()
        assert server.process.wait(timeout=20) == 0
    resets = [(f.stream_id, f.error_code) for f in _frames(client.wire) if isinstance(f, RstStreamFrame)]
    assert resets == [(late, ErrorCodes.REFUSED_STREAM)], resets
    assert not client.of(h2.events.ResponseReceived, late)
    assert b"".join(e.data for e in client.of(h2.events.DataReceived, slow)) == b"slow done\n"


def test_a_drained_client_that_never_closes_is_closed_at_linger() -> None:
    # hypercorn's own keep-alive timeout is 60 s and each read waits at most 20 s, so
    # an EOF at all is the close at linger.
    with hypercorn_server(*HIGH, "--goaway-mode", "single", "--goaway-linger", "0.5", "--keep-alive", "60") as server:
        client = RawH2(server.port)
        sid = client.get("/")
        client.read_until(lambda: False)  # until the server closes; the client never does
        client.sock.close()
        server.wait_for_log("goaway_ext: drained")
    assert client.eof
    assert b"".join(e.data for e in client.of(h2.events.DataReceived, sid)) == b"ok\n"
    goaways = client.of(GoawayReceived)
    assert goaways and goaways[-1].error_code == ErrorCodes.NO_ERROR and goaways[-1].last_stream_id == sid


@needs_curl
def test_curl_reads_a_stream_in_flight_at_shutdown_in_full() -> None:
    with hypercorn_server("--graceful-timeout", "10") as server:
        curl = subprocess.Popen(["curl", "-N", "-sS", "--http2-prior-knowledge", "--max-time", "20",
                                 server.url + "/stream?chunks=30&interval=0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert curl.stdout is not None
            first = curl.stdout.readline()  # -N: unbuffered, so this is the stream in flight
            server.process.send_signal(signal.SIGTERM)
            rest, err = curl.communicate(timeout=30)
        finally:
            if curl.poll() is None:
                curl.kill()
                curl.wait()
        assert server.process.wait(timeout=20) == 0
        server.wait_for_log("reason=shutdown")
    assert curl.returncode == 0, err
    assert first + rest == stream_body(30)


@needs_curl
def test_curl_reads_the_stream_that_started_the_drain_and_reconnects() -> None:
    with hypercorn_server(*HIGH, "--goaway-mode", "single") as server:
        result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20",
                                 "-w", "|connects=%{num_connects}\n",
                                 server.url + "/stream?chunks=20&interval=0.03", server.url + "/"],
                                capture_output=True, timeout=40)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split(b"|connects=1\n")[:2]
    assert first == stream_body(20) and second == b"ok\n"


@needs_nghttp
def test_nghttp_keep_alive_max_requests_drains_without_dropping_in_flight_responses(tmp_path: Path) -> None:
    # Request 6 crosses keep_alive_max_requests=5: stock hypercorn's close_connection() drops the
    # streams in flight; with the hook they all complete on the draining connection.
    with hypercorn_server(config="keep_alive_max_requests = 5\n", tmp_path=tmp_path) as server:
        urls = [server.url + "/"] + [server.url + f"/slow?s=0.5&n={n}" for n in range(5)]  # nghttp merges repeats
        result = subprocess.run(["nghttp", "-v", *urls], capture_output=True, timeout=40, text=True)
        server.wait_for_log("reason=max_requests")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert result.stdout.count("slow done") == 5 and result.stdout.count(":status: 200") == 6
    assert "recv GOAWAY frame" in result.stdout
