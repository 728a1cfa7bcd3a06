"""Real gRPC peers for the grpclib tests and benchmark: raw-bytes services, no protobuf.

A grpclib service and codec, a grpcio (``grpc.aio``) server with the same
methods, and small RPC helpers. Requests are plain bytes: ``b"<n> <delay>"`` asks
the streaming method for n messages, ``delay`` seconds apart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.client
import grpclib.const
from grpclib.encoding.base import CodecBase

SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
UPLOAD = f"/{SERVICE}/Upload"
CHAT = f"/{SERVICE}/Chat"
STREAM_LEN = 20


class RawCodec(CodecBase):
    """Messages are bytes on the wire and in code (content type application/grpc)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return bytes(data)


def parse_stream_request(request: bytes) -> tuple[int, float]:
    count, delay = request.split()
    return int(count), float(delay)


class EchoService:
    """grpclib service: Unary echoes, Stream sends n numbered messages, Upload joins a request stream,
    Chat answers each message upper-cased."""

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        card = grpclib.const.Cardinality
        return {
            UNARY: grpclib.const.Handler(self.unary, card.UNARY_UNARY, bytes, bytes),
            STREAM: grpclib.const.Handler(self.stream, card.UNARY_STREAM, bytes, bytes),
            UPLOAD: grpclib.const.Handler(self.upload, card.STREAM_UNARY, bytes, bytes),
            CHAT: grpclib.const.Handler(self.chat, card.STREAM_STREAM, bytes, bytes),
        }

    async def unary(self, stream: Any) -> None:
        message = await stream.recv_message()
        await stream.send_message(message)

    async def stream(self, stream: Any) -> None:
        count, delay = parse_stream_request(await stream.recv_message())
        for index in range(count):
            await stream.send_message(b"%d" % index)
            if delay:
                await asyncio.sleep(delay)

    async def upload(self, stream: Any) -> None:
        parts = [message async for message in stream]
        await stream.send_message(b"".join(parts))

    async def chat(self, stream: Any) -> None:
        async for message in stream:
            await stream.send_message(message.upper())


def grpcio_handler() -> Any:
    """The same methods as a grpcio generic handler (bytes in, bytes out)."""
    import grpc

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(request: bytes, context: Any) -> Any:
        count, delay = parse_stream_request(request)
        for index in range(count):
            yield b"%d" % index
            if delay:
                await asyncio.sleep(delay)

    async def upload(requests: Any, context: Any) -> bytes:
        return b"".join([message async for message in requests])

    async def chat(requests: Any, context: Any) -> Any:
        async for message in requests:
            yield message.upper()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


async def start_grpcio_server(options: list[tuple[str, Any]]) -> tuple[Any, int]:
    import grpc

    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpcio_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def methods(channel: grpclib.client.Channel) -> tuple[Any, Any, Any]:
    """grpclib method objects for Unary, Stream and Upload on ``channel``."""
    return (
        grpclib.client.UnaryUnaryMethod(channel, UNARY, bytes, bytes),
        grpclib.client.UnaryStreamMethod(channel, STREAM, bytes, bytes),
        grpclib.client.StreamUnaryMethod(channel, UPLOAD, bytes, bytes),
    )


async def mixed_load(channel: grpclib.client.Channel, rpcs: int, concurrency: int,
                     stream_delay: float = 0.002) -> tuple[int, int, list[str]]:
    """``rpcs`` RPCs from ``concurrency`` tasks: every 4th a server stream, the rest unary.

    Returns (succeeded, failed, first errors). A stream counts as succeeded only
    when every message arrived, in order.
    """
    unary, stream, _ = methods(channel)
    ok = failed = 0
    errors: list[str] = []

    async def worker(worker_id: int) -> None:
        nonlocal ok, failed
        for index in range(rpcs // concurrency):
            try:
                if index % 4 == 0:
                    got = await stream(b"%d %f" % (STREAM_LEN, stream_delay))
                    assert got == [b"%d" % k for k in range(STREAM_LEN)], got
                else:
                    payload = b"w%d-%d" % (worker_id, index)
                    assert await unary(payload) == payload
                ok += 1
            except Exception as exc:  # what the stock channel raises on GOAWAY varies
                failed += 1
                if len(errors) < 3:
                    errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok, failed, errors


async def grpcio_client_load(port: int, rpcs: int, concurrency: int) -> tuple[int, int]:
    ok = failed = 0
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        stream = channel.unary_stream("/test.Echo/Stream")

        async def worker(worker_id: int) -> None:
            nonlocal ok, failed
            for index in range(rpcs // concurrency):
                try:
                    if index % 4 == 0:
                        got = [message async for message in stream(b"%d 0.001" % STREAM_LEN)]
                        assert got == [b"%d" % k for k in range(STREAM_LEN)]
                    else:
                        payload = b"g%d-%d" % (worker_id, index)
                        assert await unary(payload) == payload
                    ok += 1
                except Exception:
                    failed += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok, failed
