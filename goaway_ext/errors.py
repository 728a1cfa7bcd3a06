"""Exceptions goaway_ext raises besides ``ValueError``/``TypeError`` for bad arguments."""

from __future__ import annotations

from h2.exceptions import ProtocolError

__all__ = ["ConnectionDrainingError"]


class ConnectionDrainingError(ProtocolError):
    """A new stream was requested on a connection that received or sent GOAWAY.

    It subclasses ``h2``'s ``ProtocolError`` so code that already handles h2's
    "connection closed" errors keeps working; the request was never sent, so it
    is always safe to retry it on a new connection.
    """
