"""Refused streams against the real server: ``serve --mode single`` racing requests.

In mode ``single`` the first request on a connection gets GOAWAY at once, with
its own stream as last-stream-id; every stream the client already sent above
it is refused (REFUSED_STREAM) and must be sent again on a new connection. The
scripted servers of the contract tests stage this; here our own server does it
to two clients (H2Client and the httpx transport), and each
run must show refusals, retries, and every request succeeding.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from test_server_real_clients import Server

from goaway_ext.asyncio_client import H2Client
from goaway_ext.httpx import AsyncGracefulTransport

SINGLE = ("--chance", "1.0", "--allow-high-chance", "--mode", "single", "--linger", "0.2")


@pytest.fixture
def single() -> Iterator[Server]:
    server = Server(*SINGLE)
    try:
        yield server
    finally:
        server.stop()


async def refused_by_server(server: Server) -> int:
    async with H2Client("127.0.0.1", server.port, timeout=10) as client:
        return int(json.loads((await client.request("GET", "/stats")).body)["streams_refused"])


# Whether a racing stream is refused by the server (RST_STREAM) or held back by the
# client (the GOAWAY arrived before it was sent) depends on timing; bursts go on
# until the server has refused some (bounded), and every burst must fully succeed.
BURSTS = 40


def test_h2client_racing_requests_are_refused_retried_and_all_succeed(single: Server) -> None:
    async def main() -> tuple[H2Client, int]:
        async with H2Client("127.0.0.1", single.port, timeout=20, max_attempts=50) as client:
            for _ in range(BURSTS):  # each burst races a fresh connection's GOAWAY
                responses = await asyncio.gather(*(client.request("GET", "/") for _ in range(20)))
                assert all(r.status == 200 and r.body.startswith(b"hello from") for r in responses)
                refused = await refused_by_server(single)
                if refused and client.streams_refused:
                    break
            return client, refused

    client, refused = asyncio.run(asyncio.wait_for(main(), 180))
    assert refused > 0, "the server never refused a racing stream"
    assert client.streams_refused > 0 and client.requests_retried > 0, vars(client)
    assert client.goaways_received >= 1


def test_httpx_transport_racing_requests_are_refused_retried_and_all_succeed(single: Server) -> None:
    async def main() -> tuple[AsyncGracefulTransport, int]:
        transport = AsyncGracefulTransport(http1=False)
        async with httpx.AsyncClient(transport=transport, base_url=single.url, timeout=20) as client:
            for _ in range(BURSTS):
                responses = await asyncio.gather(*(client.get("/") for _ in range(20)))
                assert all(r.status_code == 200 and r.content.startswith(b"hello from") for r in responses)
                refused = await refused_by_server(single)
                if refused and transport.stats.streams_refused:
                    break
        return transport, refused

    transport, refused = asyncio.run(asyncio.wait_for(main(), 180))
    stats = transport.stats
    assert refused > 0, "the server never refused a racing stream"
    assert stats.streams_refused > 0 and stats.requests_retried > 0, stats
