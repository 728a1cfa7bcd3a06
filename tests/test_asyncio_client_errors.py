"""H2Client's error paths against scripted ``h2`` servers on real sockets.

Each server misbehaves one way (never answers, stalls a body, resets, sends an
error GOAWAY, refuses every stream, hangs up under an upload) and the client
must report it as an ``H2ClientError`` that says what happened, retry only
what the server never processed, and never hang.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from goaway_ext.asyncio_client import H2Client, H2ClientError
from goaway_ext.asyncio_server import H2Server, builtin_app

# What the scripted server does with each request: (connection, stream id, writer, connection number).
Script = Callable[[h2.connection.H2Connection, int, asyncio.StreamWriter, int], Awaitable[None]]


class ScriptedServer:
    def __init__(self, script: Script, *, on_data: bool = False) -> None:
        self.script = script
        self.on_data = on_data  # run the script at the first DATA frame instead of at the headers
        self.connections = 0
        self.requests = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        number = self.connections
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        started: set[int] = set()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    sid = getattr(event, "stream_id", 0)
                    trigger = (isinstance(event, h2.events.DataReceived) if self.on_data
                               else isinstance(event, h2.events.RequestReceived))
                    if trigger and sid not in started:
                        started.add(sid)
                        self.requests += 1
                        await self.script(conn, sid, writer, number)
                if not writer.is_closing():
                    writer.write(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def never(conn: Any, sid: int, writer: Any, number: int) -> None:
    pass


def test_no_response_headers_times_out_with_the_stream_named() -> None:
    async def main() -> None:
        async with ScriptedServer(never) as server, H2Client("127.0.0.1", server.port, timeout=0.5) as client:
            with pytest.raises(H2ClientError, match=r"no response headers on stream 1 within 0.5 s"):
                await client.request("GET", "/")

    run(main())


def test_a_body_that_stalls_times_out_per_chunk() -> None:
    async def headers_only(conn: Any, sid: int, writer: Any, number: int) -> None:
        conn.send_headers(sid, [(":status", "200")])
        conn.send_data(sid, b"first")

    async def main() -> None:
        async with ScriptedServer(headers_only) as server, H2Client("127.0.0.1", server.port, timeout=0.5) as client:
            async with client.stream("GET", "/") as response:
                assert response.status == 200
                chunks = []
                with pytest.raises(H2ClientError, match=r"no data on stream 1 for 0.5 s"):
                    async for chunk in response:
                        chunks.append(chunk)
                assert chunks == [b"first"]

    run(main())


@pytest.mark.parametrize("code", [ErrorCodes.INTERNAL_ERROR, ErrorCodes.CANCEL])
def test_a_reset_other_than_refused_is_reported_and_not_retried(code: ErrorCodes) -> None:
    async def reset(conn: Any, sid: int, writer: Any, number: int) -> None:
        conn.reset_stream(sid, code)

    async def main() -> None:
        async with ScriptedServer(reset) as server, H2Client("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(H2ClientError, match=rf"stream 1 reset by the server \(.*{code.name}"):
                await client.request("GET", "/")
            assert client.requests_retried == 0 and client.streams_refused == 0
            assert server.requests == 1  # the server may have acted on it: sent once only

    run(main())


def test_an_error_goaway_fails_the_streams_it_covers() -> None:
    async def goaway(conn: Any, sid: int, writer: Any, number: int) -> None:
        conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=sid)

    async def main() -> None:
        async with ScriptedServer(goaway) as server, H2Client("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(H2ClientError, match=r"the server ended the connection \(.*ENHANCE_YOUR_CALM"):
                await client.request("GET", "/")
            assert client.requests_retried == 0

    run(main())


def test_a_server_that_refuses_everything_is_given_up_after_max_attempts() -> None:
    async def refuse(conn: Any, sid: int, writer: Any, number: int) -> None:
        conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)

    async def main() -> None:
        async with ScriptedServer(refuse) as server, \
                H2Client("127.0.0.1", server.port, timeout=5, max_attempts=3) as client:
            with pytest.raises(H2ClientError, match=r"request refused 3 times; giving up"):
                await client.request("GET", "/")
            assert client.streams_refused == 3 and client.requests_retried == 2
            assert server.requests == 3

    run(main())


def test_connect_failure_names_the_address() -> None:
    with socket.socket() as probe:  # a port nobody listens on (the socket stays bound, never listening)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

        async def main() -> None:
            async with H2Client("127.0.0.1", port, timeout=5) as client:
                with pytest.raises(H2ClientError, match=rf"cannot connect to 127.0.0.1:{port}: "):
                    await client.request("GET", "/")
                assert client.connections_opened == 0

        run(main())


def test_connection_lost_while_sending_a_body_is_reported() -> None:
    async def hang_up(conn: Any, sid: int, writer: Any, number: int) -> None:
        # Answer nothing, grant no window, close once the upload started.
        conn.send_headers(sid, [(":status", "200")])
        writer.write(conn.data_to_send())
        writer.transport.abort()

    async def main() -> None:
        async with ScriptedServer(hang_up, on_data=True) as server, \
                H2Client("127.0.0.1", server.port, timeout=5, max_attempts=1) as client:
            with pytest.raises(H2ClientError, match=r"connection lost while sending the request body|"
                                                    r"the server closed the connection"):
                await client.request("POST", "/", body=b"b" * (4 << 20))
            assert client.requests_retried == 0  # a body that started may have been acted on

    run(main())


def test_tls_with_alpn_h2_against_our_server() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no self-signed certificate for the TLS server")
    from goaway_ext.asyncio_server import _tls_context

    async def main() -> None:
        server = H2Server(builtin_app, ssl_context=_tls_context(None, None))
        _, port = await server.start("127.0.0.1", 0)
        try:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            async with H2Client("127.0.0.1", port, ssl=context, timeout=10) as client:
                response = await client.request("GET", "/")
                assert response.status == 200 and b"hello" in response.body
                # Verification on (the default) and a self-signed certificate: a clear error, no retry loop.
            async with H2Client("127.0.0.1", port, ssl=ssl.create_default_context(), timeout=10) as strict:
                with pytest.raises(H2ClientError, match=r"(?i)certificate"):
                    await strict.request("GET", "/")
        finally:
            await server.shutdown(timeout=5)

    run(main())
