"""``WriteStall``: send_timeout for an integration whose asyncio protocol sees ``pause_writing``.

A peer that stops reading makes the transport pause writing; from then on an
integration's writers wait, and stock servers (grpclib, hypercorn) wait for
ever, holding the connection, its streams and their tasks. This watches that
one wait without any work per request: a timer exists only while writing is
paused, and what it judges is progress, not total time (nginx's
``send_timeout``, Go's ``WriteByteTimeout``): a period in which writing never
resumed and the peer took not one byte of the buffer ends the connection; a
slow reader that takes a little every period keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["WriteStall"]


class WriteStall:
    """Calls ``on_stall`` once a ``timeout``-second period of paused writing went by without progress.

    The owner calls :meth:`paused` from its protocol's ``pause_writing``,
    :meth:`resumed` from ``resume_writing`` and :meth:`cancel` when the
    connection is lost.
    """

    __slots__ = ("_handle", "_is_paused", "_loop", "_on_stall", "_resumed", "_size", "_timeout", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport, timeout: float,
                 on_stall: Callable[[], None]) -> None:
        self._loop = loop
        self._transport = transport
        self._timeout = timeout
        self._on_stall = on_stall
        self._handle: asyncio.TimerHandle | None = None
        self._is_paused = False
        self._resumed = False
        self._size = 0

    def paused(self) -> None:
        """Writing paused: start a period unless one is under way."""
        self._is_paused = True
        if self._handle is None:
            self._arm()

    def resumed(self) -> None:
        """The peer took enough of our bytes: progress in the current period."""
        self._is_paused = False
        self._resumed = True

    def cancel(self) -> None:
        """The connection is gone: no timer outlives it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        self._resumed = False
        self._size = self._transport.get_write_buffer_size()
        self._handle = self._loop.call_later(self._timeout, self._check)

    def _check(self) -> None:
        self._handle = None
        if self._transport.is_closing():
            return
        if self._is_paused and not self._resumed and self._transport.get_write_buffer_size() >= self._size:
            self._on_stall()
        elif self._is_paused:
            self._arm()
