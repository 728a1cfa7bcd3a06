"""Contract: the grpclib surface goaway_ext.grpclib relies on (see its module docstring).

``make contract-grpclib`` runs this file against the oldest and the newest
supported grpclib, each in its own venv (grpclib and pytest only). A failure
here means a grpclib release moved something the integration needs: read the
failing check before widening the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import grpclib.client
import grpclib.protocol
import grpclib.server
import grpclib.utils
from grpc_peers import EchoService, RawCodec, methods
from grpclib.protocol import EventsProcessor, H2Protocol

from goaway_ext import GoawayPolicy
from goaway_ext.grpclib import GRPCLIB_PRIVATE_NAMES, GoawayChannel, GoawayServer


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _instance_attrs(cls: type) -> set[str]:
    """Names a class defines, annotates, or assigns on ``self`` anywhere in its source."""
    names = set(dir(cls)) | set(getattr(cls, "__annotations__", {}))
    source = _source(cls)
    names |= {line.split("self.", 1)[1].split("=")[0].strip().split(":")[0].strip()
              for line in source.splitlines() if "self." in line and "=" in line.split("self.", 1)[1]}
    return names


def test_every_private_name_we_touch_exists() -> None:
    for dotted in GRPCLIB_PRIVATE_NAMES:
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                target: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            rest_parts = parts[cut:]
            break
        for index, part in enumerate(rest_parts):
            last = index == len(rest_parts) - 1
            if last and isinstance(target, type):
                assert part in _instance_attrs(target), dotted
            else:
                target = getattr(target, part)


def test_connection_made_is_the_sequence_we_restate() -> None:
    # goaway_ext.grpclib._make_h2 repeats these steps with its own connection class.
    source = _source(H2Protocol.connection_made)
    steps = [
        "_set_nodelay(sock)",
        "H2Connection(config=self.h2_config)",
        "initiate_connection()",
        "http2_connection_window_size - initial",
        "http2_stream_window_size - initial",
        "increment_flow_control_window(conn_delta)",
        "SettingCodes.INITIAL_WINDOW_SIZE",
        "self.connection = Connection(",
        "self.connection.flush()",
        "self.connection.initialize()",
        "self.processor = EventsProcessor(self.handler, self.connection)",
    ]
    positions = [source.find(step) for step in steps]
    assert -1 not in positions, [step for step, pos in zip(steps, positions, strict=True) if pos == -1]
    assert positions == sorted(positions)
    assert list(inspect.signature(H2Protocol.__init__).parameters) == ["self", "handler", "config", "h2_config"]


def test_factories_and_hooks_are_looked_up_on_the_instance() -> None:
    assert "self._protocol_factory" in _source(grpclib.server.Server.start)
    assert "H2Protocol(handler, self._config, self._h2_config)" in _source(grpclib.server.Server._protocol_factory)
    assert "self._protocol_factory" in _source(grpclib.client.Channel._create_connection)
    assert "self._connected" in _source(grpclib.client.Channel.__connect__)
    assert "self._channel.__connect__()" in _source(grpclib.client.Stream.send_request)
    assert "self.processors[event.__class__]" in _source(EventsProcessor.process)
    assert "release_stream" in _source(EventsProcessor.register)
    assert "self.processors" in _source(EventsProcessor.__init__)
    assert "self.channel.request(" in _source(grpclib.client.ServiceMethod.open)


def test_stream_send_request_takes_the_id_just_before_sending_headers() -> None:
    # A GOAWAY can only land between RPCs, never between these two calls: our
    # ClientConnection raises ConnectionDrainingError from the first, before any byte.
    source = _source(grpclib.protocol.Stream.send_request)
    assert source.index("get_next_available_stream_id()") < source.index("send_headers(")


def test_processor_close_terminates_the_streams_in_its_dict() -> None:
    # _ClientProcessor.close hides streams whose response is complete from
    # grpclib's close by handing it a smaller ``streams`` dict for the call.
    source = _source(EventsProcessor.close)
    assert "for stream in self.streams.values():" in source
    assert "stream.__terminated__(reason)" in source
    assert "_streams: _Streams = self.streams" in _source(EventsProcessor.register)
    assert "stream.__ended__()" in _source(EventsProcessor.process_stream_ended)


def test_wrapper_raises_its_error_on_enter() -> None:
    # A replayed RPC clears Wrapper._error; grpclib raises it on every later `with`.
    assert "raise self._error" in _source(grpclib.utils.Wrapper.__enter__)
    assert "self._error = error" in _source(grpclib.utils.Wrapper.cancel)


def test_server_close_and_wait_closed_names() -> None:
    close = _source(grpclib.server.Server.close)
    assert "self._server.close()" in close and "self._server_closed_fut" in close
    assert "await self._server_closed_fut" in _source(grpclib.server.Server.wait_closed)


def test_grpclib_both_sides_with_goaway() -> None:
    async def main() -> tuple[int, int]:
        server = GoawayServer([EchoService()], codec=RawCodec(),
                              policy=GoawayPolicy(1.0, allow_high_chance=True, linger=0.05))
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        channel = GoawayChannel("127.0.0.1", port, codec=RawCodec())
        unary, stream, _ = methods(channel)
        try:
            results = await asyncio.gather(*(unary(b"m%d" % k) for k in range(40)),
                                           *(stream(b"5 0") for _ in range(10)))
        finally:
            channel.close()
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)
        assert results[:40] == [b"m%d" % k for k in range(40)]
        assert all(result == [b"0", b"1", b"2", b"3", b"4"] for result in results[40:])
        return server.goaway_stats.goaways_total, channel.connections_opened

    goaways, opened = asyncio.run(asyncio.wait_for(main(), 30))
    assert goaways >= 2
    assert opened >= 2
