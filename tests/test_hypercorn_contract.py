"""Contract: the hypercorn surface goaway_ext.hypercorn relies on (see its module docstring).

``make contract-hypercorn`` runs this file against the oldest and the newest
supported hypercorn, each in its own venv. A failure here means a hypercorn
release moved something the hook needs: read the failing check before
widening the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h2.connection
import hypercorn
import hypercorn.protocol
import pytest
from hypercorn.config import Config
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol

from goaway_ext import GoawayPolicy
from goaway_ext.asyncio_client import H2Client, H2ClientError
from goaway_ext.hypercorn import GoawayH2Protocol, enable_goaway, install_protocol, uninstall_protocol


def test_protocol_wrapper_looks_up_h2protocol_by_module_name_at_call_time() -> None:
    # The hook is an assignment to hypercorn.protocol.H2Protocol: it only works
    # while ProtocolWrapper reads that global each time it builds a protocol.
    assert hypercorn.protocol.H2Protocol is H2Protocol
    assert "H2Protocol" in ProtocolWrapper.__init__.__code__.co_names  # ALPN h2
    assert "H2Protocol" in ProtocolWrapper.handle.__code__.co_names  # prior knowledge, h2c upgrade
    install_protocol()
    try:
        assert hypercorn.protocol.H2Protocol is GoawayH2Protocol
    finally:
        uninstall_protocol()
    assert hypercorn.protocol.H2Protocol is H2Protocol


def test_h2protocol_constructor_and_methods_we_override() -> None:
    names = list(inspect.signature(H2Protocol.__init__).parameters)
    assert names == ["self", "app", "config", "context", "task_group", "connection_state", "ssl", "client",
                     "server", "send"]
    assert list(inspect.signature(H2Protocol.initiate).parameters) == ["self", "headers", "settings"]
    assert list(inspect.signature(H2Protocol.handle).parameters) == ["self", "event"]


def test_hypercorn_ends_connections_and_refuses_streams_through_the_h2_calls_we_override() -> None:
    # keep_alive_max_requests and "idle during shutdown" call close_connection();
    # a request after shutdown began gets reset_stream(id) with the default code.
    source = inspect.getsource(H2Protocol)
    assert source.count("self.connection.close_connection()") == 2
    assert "self.connection.reset_stream(event.stream_id)" in source
    assert "keep_alive_max_requests" in source
    assert "self.context.terminated.is_set()" in source


def test_command_line_entry_points() -> None:
    import hypercorn.__main__ as hypercorn_main

    assert callable(hypercorn_main.run)
    assert "run" in hypercorn_main.main.__code__.co_names
    assert list(inspect.signature(hypercorn_main.main).parameters) == ["sys_args"]


@contextlib.contextmanager
def _serve(config: Config) -> Iterator[int]:
    import hypercorn.asyncio

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/slow":
            await asyncio.sleep(0.4)
        await send({"type": "http.response.body", "body": b"done"})

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config.bind = [f"fd://{listener.detach()}"]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        loop.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_keep_alive_max_requests_end_to_end(enabled: bool) -> None:
    """With the hook all 5 in-flight responses arrive; stock hypercorn drops them (pinned too)."""

    async def scenario(port: int) -> list[bytes | str]:
        async with H2Client("127.0.0.1", port, timeout=3.0, max_attempts=1) as client:
            await client.request("GET", "/")

            async def slow() -> bytes | str:
                try:
                    return (await client.request("GET", "/slow")).body
                except H2ClientError as exc:  # anything else (a crash, a timeout) fails the test
                    return str(exc)

            return list(await asyncio.gather(*(slow() for _ in range(5))))

    config = Config()
    config.keep_alive_max_requests = 5
    config.keep_alive_timeout = 1
    if enabled:
        enable_goaway(config, GoawayPolicy(linger=0.05))
    try:
        with _serve(config) as port:
            bodies = asyncio.run(asyncio.wait_for(scenario(port), 20))
    finally:
        uninstall_protocol()
    if enabled:
        assert bodies == [b"done"] * 5
    else:
        # What this integration exists to fix: stock hypercorn's close_connection()
        # closes the socket under the 5 requests in flight (no timeout, no reset).
        assert bodies == ["the server closed the connection"] * 5


def test_swapped_connection_keeps_hypercorns_h2_settings() -> None:
    from hypercorn.asyncio.worker_context import WorkerContext

    config = Config()
    config.h2_max_concurrent_streams = 7
    enable_goaway(config)
    try:
        sent: list[Any] = []

        async def send(event: Any) -> None:
            sent.append(event)

        protocol = GoawayH2Protocol(None, config, WorkerContext(None), None, None, False, None, None, send)
        stock = H2Protocol(None, config, WorkerContext(None), None, None, False, None, None, send)
    finally:
        uninstall_protocol()
    assert type(protocol.connection) is not h2.connection.H2Connection
    assert isinstance(protocol.connection, h2.connection.H2Connection)
    assert protocol.connection.config.client_side is False
    assert dict(protocol.connection.local_settings) == dict(stock.connection.local_settings)
    assert protocol.connection.local_settings.max_concurrent_streams == 7


def test_our_constructor_sets_every_attribute_hypercorns_sets() -> None:
    # GoawayH2Protocol.__init__ does not call hypercorn's (that would build an h2
    # connection only to replace it), so it must set the same attributes, of the
    # same types, and leave the h2 connection configured the same way.
    from hypercorn.asyncio.worker_context import WorkerContext

    config = Config()
    config.h2_max_concurrent_streams = 9
    config.h2_max_inbound_frame_size = 2**15
    enable_goaway(config)
    try:
        async def send(event: Any) -> None:
            pass

        args = (None, config, WorkerContext(None), None, None, False, ("127.0.0.1", 1), ("127.0.0.1", 2), send)
        ours = GoawayH2Protocol(*args)
        stock = H2Protocol(*args)
    finally:
        uninstall_protocol()
    for name, value in vars(stock).items():
        assert hasattr(ours, name), name
        if name != "connection":
            assert type(getattr(ours, name)) is type(value), name
    ours_h2, stock_h2 = ours.connection, stock.connection
    assert dict(ours_h2.local_settings) == dict(stock_h2.local_settings)
    assert ours_h2.DEFAULT_MAX_INBOUND_FRAME_SIZE == stock_h2.DEFAULT_MAX_INBOUND_FRAME_SIZE == 2**15
    assert ours_h2.max_inbound_frame_size == stock_h2.max_inbound_frame_size
    assert ours_h2.config.client_side is False and ours_h2.config.header_encoding is None
    ours_h2.initiate_connection()
    stock_h2.initiate_connection()
    assert ours_h2.data_to_send() == stock_h2.data_to_send()  # the same SETTINGS on the wire


def test_a_config_without_goaway_keys_gets_hypercorns_own_constructor() -> None:
    from hypercorn.asyncio.worker_context import WorkerContext

    async def send(event: Any) -> None:
        pass

    protocol = GoawayH2Protocol(None, Config(), WorkerContext(None), None, None, False, None, None, send)
    assert type(protocol.connection) is h2.connection.H2Connection
    assert protocol.closed is False
