"""The asyncio server arms a serving connection's age deadline without asking on every flush."""

from __future__ import annotations

import asyncio

from goaway_ext import GoawayPolicy, H2Client, H2Server
from goaway_ext.asyncio_server import builtin_app


def test_max_age_drains_an_idle_connection_over_a_real_socket() -> None:
    # One request, then nothing: only the timer armed from flush() can start the drain.
    async def main() -> tuple[int, int, int]:
        server = H2Server(builtin_app, policy=GoawayPolicy(max_age=0.3, jitter=0.0, linger=0.05))
        host, port = await server.start("127.0.0.1", 0)
        try:
            async with H2Client(host, port, timeout=10) as client:
                first = await client.request("GET", "/")
                for _ in range(200):  # bounded wait on the event that matters
                    if client.goaways_received:
                        break
                    await asyncio.sleep(0.05)
                second = await client.request("GET", "/")
                return first.status, second.status, client.goaways_received
        finally:
            await server.shutdown()

    first, second, goaways = asyncio.run(asyncio.wait_for(main(), 30))
    assert (first, second) == (200, 200)
    assert goaways == 1
