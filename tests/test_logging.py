"""Named loggers: each module that acts logs under its own name, so users can route and filter them."""

from __future__ import annotations

import logging

import pytest
from h2.config import H2Configuration

from goaway_ext import ClientConnection, GoawayPolicy, ServerConnection


def test_server_and_client_log_the_drain_under_their_names(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="goaway_ext")
    server = ServerConnection(policy=GoawayPolicy(1.0, mode="single", allow_high_chance=True, linger=0.0))
    client = ClientConnection(H2Configuration(client_side=True, header_encoding=None))
    server.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
                        end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")], end_stream=True)
    client.receive_data(server.data_to_send())
    by_logger = {(r.name, r.levelno) for r in caplog.records}
    assert ("goaway_ext.server", logging.DEBUG) in by_logger, caplog.records
    assert ("goaway_ext.client", logging.DEBUG) in by_logger, caplog.records
    server_lines = [r.getMessage() for r in caplog.records if r.name == "goaway_ext.server"]
    assert any("final GOAWAY(last_stream_id=1) sent" in line for line in server_lines), server_lines
    assert any("drained" in line for line in server_lines), server_lines


def test_logger_names_are_the_module_names() -> None:
    import goaway_ext.asyncio_server
    import goaway_ext.client
    import goaway_ext.httpx
    import goaway_ext.server

    for module in (goaway_ext.server, goaway_ext.client, goaway_ext.httpx, goaway_ext.asyncio_server):
        assert module.log.name == module.__name__
