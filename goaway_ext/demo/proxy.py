"""A tiny round-robin TCP proxy: the demo's default L4 load balancer.

It behaves like the balancers the demo is about (kube-proxy in iptables mode,
HAProxy in ``mode tcp``, a cloud NLB): it chooses a backend only when a client
opens a TCP connection and then copies bytes both ways until one side is done.
It never looks inside the HTTP/2 stream, so a client that keeps its connection
keeps its backend, which is exactly the imbalance GOAWAY corrects.

A backend can be taken out of the rotation before it is stopped (what
Kubernetes does when it removes a terminating pod from the endpoints), so no
new connection lands on a server that is shutting down; a backend that refuses
the connection anyway is skipped and the next one is tried, as HAProxy does
with ``option redispatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

__all__ = ["RoundRobinProxy"]

_CHUNK = 65536


class RoundRobinProxy:
    """Accepts TCP connections on ``host:port`` and spreads them over ``backends`` in turn.

    ``backends`` is a list of ``(host, port)``. ``connect_timeout`` bounds each
    attempt to reach a backend, so a hung backend cannot stall the clients.
    ``connections_per_backend`` counts the connections placed on each backend,
    which the demo reports next to the request shares.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 2.0,
    ) -> None:
        if not backends:
            raise ValueError("backends must name at least one (host, port)")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self._backends = list(backends)
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._next = 0
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._enabled = [True] * len(self._backends)
        self.connections_per_backend = [0] * len(self._backends)
        self.failed_connects = 0

    @property
    def port(self) -> int:
        """The port clients connect to (known once :meth:`start` returned)."""
        return self._port

    async def set_enabled(self, index: int, enabled: bool) -> None:
        """Put backend ``index`` in or out of the rotation; its open connections are left alone."""
        self._enabled[index] = enabled

    async def start(self) -> None:
        """Bind and start accepting; with ``port=0`` the kernel picks the port."""
        self._server = await asyncio.start_server(self._accept, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting and cut every connection still being proxied."""
        if self._server is not None:
            self._server.close()
            self._server = None
        pipes = list(self._pipes)
        for task in pipes:
            task.cancel()
        if pipes:
            await asyncio.wait(pipes, timeout=2.0)

    async def _open_backend(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        # One full turn of the rotation at most: every backend in it gets one try.
        for _ in range(len(self._backends)):
            index = self._next
            self._next = (self._next + 1) % len(self._backends)
            if not self._enabled[index]:
                continue
            host, port = self._backends[index]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), self._connect_timeout
                )
            except (OSError, asyncio.TimeoutError):
                self.failed_connects += 1
                continue
            self.connections_per_backend[index] += 1
            return index, reader, writer
        return None

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            opened = await self._open_backend()
            if opened is None:
                return
            _, backend_reader, backend_writer = opened
            try:
                await asyncio.gather(
                    _copy(client_reader, backend_writer),
                    _copy(backend_reader, client_writer),
                )
            finally:
                backend_writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(backend_writer.wait_closed(), 1.0)
        finally:
            self._pipes.discard(task)
            client_writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client_writer.wait_closed(), 1.0)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction; pass the end of stream on as a half-close, like a TCP proxy must."""
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        # A reset on one side resets the other: close both without waiting.
        writer.transport.abort()
        return
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
