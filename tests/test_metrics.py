"""goaway_ext.metrics: one set of process counters and Prometheus series, fed by every integration.

``H2Server`` here (the hypercorn integration has its own tests in
``tests/test_hypercorn.py``); a real ``H2Client`` on a real socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from goaway_ext import GoawayPolicy, ServerConnection, metrics


def _serve_requests(count: int) -> None:
    from goaway_ext.asyncio_client import H2Client
    from goaway_ext.asyncio_server import H2Server, builtin_app

    async def scenario() -> None:
        server = H2Server(builtin_app, policy=GoawayPolicy(1.0, allow_high_chance=True, mode="single", linger=0.05))
        host, port = await server.start()
        async with H2Client(host, port, timeout=10.0) as client:
            for _ in range(count):
                assert (await client.request("GET", "/")).status == 200
        for _ in range(200):  # the server sees each connection close shortly after the client
            if server.stats()["connections_open"] == 0:
                break
            await asyncio.sleep(0.02)
        await server.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_h2server_feeds_the_process_totals() -> None:
    before = metrics.totals()
    _serve_requests(4)
    after = metrics.totals()
    assert after.connections - before.connections == 4  # chance 1.0, mode single: one request per connection
    assert after.goaways_sent.get("chance", 0) - before.goaways_sent.get("chance", 0) == 4
    assert after.drains - before.drains == 4
    assert after.drain_seconds >= before.drain_seconds


def test_h2server_feeds_prometheus_when_it_is_installed() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")

    def sample(name: str, **labels: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    goaways = sample("goaway_ext_goaways_sent_total", reason="chance")
    drains = sample("goaway_ext_drain_seconds_count")
    _serve_requests(3)
    assert sample("goaway_ext_goaways_sent_total", reason="chance") - goaways == 3
    assert sample("goaway_ext_drain_seconds_count") - drains == 3


def test_a_meter_adds_only_what_changed_since_its_last_update() -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server = ServerConnection(policy=GoawayPolicy(mode="single", linger=0.0))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    meter = metrics.ConnectionMeter()
    before = metrics.totals()
    meter.update(server)
    assert metrics.totals() == before  # nothing happened yet
    server.start_drain("shutdown")
    server.data_to_send()
    events: list[Any] = server.handle_timer(0.0)
    assert server.drain_reason == "shutdown" and events
    meter.update(server)
    meter.update(server)  # twice: counted once
    after = metrics.totals()
    assert after.goaways_sent.get("shutdown", 0) - before.goaways_sent.get("shutdown", 0) == 1
    assert after.drains - before.drains == 1


def test_hypercorn_totals_are_the_shared_ones() -> None:
    pytest.importorskip("hypercorn")
    from goaway_ext import hypercorn

    assert hypercorn.totals is metrics.totals and hypercorn.GoawayTotals is metrics.GoawayTotals
