"""Ports the demo holds for its backends from the moment it chooses them until the run ends.

A backend's ports (its main port, and with ``--policy fair-share`` over the
built-in proxy its ``--publish-load`` port) must stay the same across its
restart: the balancer and the peers were told them once. Between a backend's
exit and its new process's bind, any other process could get one of them,
most often from the kernel itself, as the ephemeral port of a ``bind(0)`` or
of an outgoing connection.

A :class:`PortReservation` closes that gap: the demo keeps a socket bound to
the port with ``SO_REUSEADDR`` and never listens on it. On Linux such a socket
lets another ``SO_REUSEADDR`` socket bind the same address (``serve``'s asyncio
server and its load publisher both set it), so the backend binds and listens as
before, while the kernel never hands the port out as an ephemeral port and a
plain ``bind`` of it fails with "Address already in use". Connections to the
port while the backend is down are refused, as without the reservation. Only
a process that binds the port with ``SO_REUSEADDR`` itself and listens in
the gap can still take it; the first start then chooses again (see
``run_scenario``), a restart fails naming the port.
"""

from __future__ import annotations

import socket

__all__ = ["PortReservation"]


class PortReservation:
    """One port bound (not listening) by the demo, so that only its backend can listen on it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]

    def close(self) -> None:
        """Release the port (at the end of the run)."""
        self._sock.close()

    def __repr__(self) -> str:
        return f"PortReservation({self.host}:{self.port})"
