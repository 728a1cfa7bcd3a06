"""HAProxy as the demo's load balancer (``--lb haproxy``).

A real, widely deployed L4 balancer shows that the effect does not come from
our own proxy: in ``mode tcp`` with ``balance roundrobin`` HAProxy also picks a
server only when a TCP connection opens. The configuration is written into the
demo's temporary directory; HAProxy runs in the foreground (``-db``) in its own
process group, so the demo can stop it like any other child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from .processes import BackendStartError, ProcessGroupRegistry

__all__ = ["HAPROXY_PATH", "HAProxyNotInstalled", "HAProxyBalancer", "find_haproxy", "render_config"]

#: Where Debian's ``haproxy`` package installs the binary.
HAPROXY_PATH = "/usr/sbin/haproxy"


class HAProxyNotInstalled(RuntimeError):
    """``--lb haproxy`` was asked for but no haproxy binary exists."""


def find_haproxy() -> str | None:
    """Return the haproxy binary to use (Debian's path first, then ``$PATH``), or None."""
    if os.access(HAPROXY_PATH, os.X_OK):
        return HAPROXY_PATH
    return shutil.which("haproxy")


def render_config(
    frontend_port: int,
    backends: Sequence[tuple[str, str, int]],
    stats_socket: Path,
    *,
    host: str = "127.0.0.1",
    frontend_fd: int | None = None,
    balance: str = "roundrobin",
) -> str:
    """Return an HAProxy configuration: TCP mode, round robin, fast health checks.

    With ``frontend_fd`` the frontend listens on that inherited, already bound
    socket (``bind fd@N``) instead of binding ``host:frontend_port`` itself, so
    no other process can take the port between choosing it and HAProxy's bind.

    ``stats_socket`` is the runtime API socket through which the demo takes a
    server out of the rotation before restarting it (``disable server``).

    ``backends`` lists ``(name, host, port)``. A restarting server is noticed
    in two ways: a refused connect is retried on another server
    (``option redispatch 1`` redispatches on every retry), and the 200 ms
    health check takes it out of (and back into) the rotation quickly. The
    client and server timeouts are long because HTTP/2 connections and watch
    streams are meant to stay open. ``balance`` is ``roundrobin`` or
    ``leastconn`` (new connections to the server with the fewest).
    """
    if balance not in ("roundrobin", "leastconn"):
        raise ValueError(f"balance must be 'roundrobin' or 'leastconn', got {balance!r}")
    lines = [
        "global",
        "    maxconn 4096",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 10m",
        "    timeout server 10m",
        "    retries 3",
        "    option redispatch 1",
        "frontend demo_in",
        f"    bind fd@{frontend_fd}" if frontend_fd is not None else f"    bind {host}:{frontend_port}",
        "    default_backend demo_servers",
        "backend demo_servers",
        f"    balance {balance}",
    ]
    for name, backend_host, port in backends:
        lines.append(f"    server {name} {backend_host}:{port} check inter 200ms fall 1 rise 1")
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just considered free (racy: another process may take it before it is bound again).

    The demo does not use it for HAProxy any more (see ``HAProxyBalancer.start``).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class HAProxyBalancer:
    """Runs one HAProxy in front of the backends for the length of a scenario."""

    def __init__(
        self,
        backends: Sequence[tuple[str, str, int]],
        registry: ProcessGroupRegistry,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        balance: str = "roundrobin",
    ) -> None:
        binary = find_haproxy()
        if binary is None:
            raise HAProxyNotInstalled(
                f"--lb haproxy needs HAProxy, which is not installed (looked for {HAPROXY_PATH} and "
                "haproxy on PATH); install it with `apt-get install haproxy` (make demo / make test do "
                "that when run as root), or use the built-in balancer: --lb builtin"
            )
        self._binary = binary
        self._backends = list(backends)
        self._registry = registry
        self._work_dir = work_dir
        self._host = host
        self._process: asyncio.subprocess.Process | None = None
        self._socket = work_dir / "haproxy.sock"
        self._balance = balance
        self.port = 0

    @property
    def stats_socket(self) -> Path:
        """The runtime API socket (a fair-share backend reads ``show stat`` there)."""
        return self._socket

    @property
    def pid(self) -> int | None:
        """The HAProxy master pid while it runs."""
        return None if self._process is None else self._process.pid

    async def start(self, timeout: float = 10.0) -> None:
        """Write the configuration, start HAProxy and wait until its frontend accepts."""
        # We bind and listen on port 0 ourselves and hand the socket to HAProxy
        # (bind fd@N): binding a port picked earlier could collide with whoever
        # took it in between (and a foreign listener would pass the check below).
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((self._host, 0))
            listener.listen(1024)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            config = self._work_dir / "haproxy.cfg"
            config.write_text(render_config(self.port, self._backends, self._socket, host=self._host, frontend_fd=fd,
                                            balance=self._balance))
            log_path = self._work_dir / "haproxy.log"
            with open(log_path, "ab") as log:
                self._process = await asyncio.create_subprocess_exec(
                    self._binary, "-db", "-f", str(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, pass_fds=(fd,),
                )
        finally:
            listener.close()  # HAProxy holds its own copy
        self._registry.add(self._process.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._process.returncode is not None:
                break
            # The frontend socket accepts into its backlog before HAProxy runs, so
            # readiness is HAProxy answering on its runtime API socket instead.
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self._socket)), 1.0)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(b"show info\n")
                answer = await asyncio.wait_for(reader.read(), 2.0)
            except (OSError, asyncio.TimeoutError):
                answer = b""
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            if b"Name: HAProxy" in answer:
                return
            await asyncio.sleep(0.05)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        await self.stop()
        raise BackendStartError(
            f"haproxy did not accept connections on port {self.port} within {timeout:.0f} s:\n{tail}"
        )

    async def _command(self, command: str) -> str:
        """One runtime API command; HAProxy's answer."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self._socket)), 2.0)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 2.0)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return answer.decode(errors="replace").strip()

    async def set_enabled(self, index: int, enabled: bool) -> None:
        """Put server ``index`` in or out of the rotation through the runtime API.

        ``disable server`` (maintenance) stops new connections only; the open
        ones stay, so the backend can drain them itself.
        """
        name = self._backends[index][0]
        command = f"{'enable' if enabled else 'disable'} server demo_servers/{name}"
        answer = await self._command(command)
        if answer:
            raise BackendStartError(f"haproxy refused {command!r}: {answer}")

    async def set_address(self, index: int, host: str, port: int) -> None:
        """Point server ``index`` at another process (``set server ... addr``): a new replica.

        Connections already open stay with the old process; new ones go to
        the new address. The surge scenario attaches each new replica so.
        """
        name = self._backends[index][0]
        command = f"set server demo_servers/{name} addr {host} port {port}"
        answer = await self._command(command)
        if "changed" not in answer and "no need to change" not in answer:
            raise BackendStartError(f"haproxy refused {command!r}: {answer}")
        self._backends[index] = (name, host, port)

    async def wait_serving(self, index: int, timeout: float = 10.0) -> None:
        """Wait until HAProxy's health check reports server ``index`` UP (new connections go there)."""
        from ..fleet import parse_show_stat

        name = self._backends[index][0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            servers = parse_show_stat(await self._command("show stat"), "demo_servers")
            if any(server.name == name for server in servers):
                return
            if loop.time() > deadline:
                raise BackendStartError(f"haproxy did not report server {name} UP within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop HAProxy (SIGTERM: immediate stop; the clients are already done)."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.wait(), timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self._registry.forget(process.pid)
        self._process = None
