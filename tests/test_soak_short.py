"""The short soak ``make test`` runs; ``make soak`` (benches/soak.py) runs the long one.

- In memory: ``GOAWAY_EXT_SOAK_REQUESTS`` (default 20,000) requests through
  ServerConnection/ClientConnection pairs at chance 0.02, so several hundred
  drains: none lost, one new connection per drain, and after a warm-up no
  growth in live objects or allocated blocks, and RSS growth under 2 MB.
- Over a real socket: the ``serve`` command at chance 0.02 under
  ``python -m goaway_ext load``, twice; the server's RSS does not grow from
  the first run to the second, and no connection is left open behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse

import pytest
from soak_support import Footprint, run_in_memory, run_load_command, server_process

from goaway_ext.asyncio_client import H2Client

REQUESTS = int(os.environ.get("GOAWAY_EXT_SOAK_REQUESTS", "20000"))


def test_in_memory_soak_loses_nothing_and_leaks_nothing() -> None:
    result = run_in_memory(REQUESTS, chance=0.02, concurrency=10, seed=11)
    assert result.lost == 0
    assert result.completed == REQUESTS
    # chance 0.02 over 20,000 requests: about 400 drains (the seed fixes the exact count).
    assert result.drains > REQUESTS * 0.02 * 0.7
    assert result.connections == result.drains + 1
    assert result.goaways == 2 * result.drains  # two-phase: notice, then final
    # After warm-up, every sample (and the end) is within a small constant of
    # the warm-up footprint: nothing accumulates per request or per drain.
    assert result.warm is not None and len(result.samples) >= 5
    for sample in [*result.samples, result.end]:
        assert sample is not None
        assert sample.objects - result.warm.objects < 200, (result.warm, sample)
        assert sample.blocks - result.warm.blocks < 1000, (result.warm, sample)
    assert result.rss_growth < 2 * 1024 * 1024, result.rss_growth


def test_footprint_sees_a_leak() -> None:
    # The measurement itself must be able to fail: keep 5,000 containers alive.
    # (gc only counts objects it tracks; allocated blocks count the rest too.)
    before = Footprint.now()
    kept = [[] for _ in range(5000)]
    after = Footprint.now()
    assert after.objects - before.objects >= 5000 and after.blocks - before.blocks >= 4000
    del kept


@pytest.mark.slow
def test_real_socket_soak_server_memory_is_flat_and_every_connection_closes() -> None:
    with server_process("asyncio", 0.02) as server:
        first = run_load_command(server.url, 3000, clients=10, streams=10, timeout=120)
        warm_rss = server.rss
        second = run_load_command(server.url, 6000, clients=10, streams=10, timeout=120)
        end_rss = server.rss
        stats = _stats(server.url)
    for run, size in ((first, 3000), (second, 6000)):
        assert run["exit_status"] == 0 and run["failed"] == 0 and run["succeeded"] == size, run
        assert run["connections_opened"] == run["goaways_received"] + 10, run
    assert end_rss - warm_rss < 3 * 1024 * 1024, (warm_rss, end_rss)
    # Only the connection asking for /stats is still open; every drained one was closed.
    assert stats["connections_open"] == 1, stats
    assert stats["requests"] >= 9000


def _stats(url: str) -> dict[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None

    async def fetch() -> dict[str, int]:
        client = H2Client(parts.hostname, parts.port, timeout=10)
        try:
            response = await client.request("GET", "/stats")
            data: dict[str, int] = json.loads(response.body)
            return data
        finally:
            await client.aclose()

    return asyncio.run(asyncio.wait_for(fetch(), 30))
