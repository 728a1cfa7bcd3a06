"""What the demo reads from its backends' logs: the drains the policy started.

The demo's "GOAWAYs sent" is the number of connections a policy asked to
leave, the quantity the model counts (one per draw that fired). ``serve``
logs every GOAWAY it sends with its reason (``GOAWAY to PEER:
last_stream_id=N final=BOOL reason=R``, INFO, on stderr, which the demo keeps
in ``<backend>.log``), so each drain is counted at its start.

Why not ``GET /stats``: its ``drains`` counts drains that *completed*
(``ConnectionDrained``), and a drain lasts until the connection's open
streams end: here the client's watch, up to ``WATCH_SECONDS``. The demo could
only read it just before SIGTERM (after that the shutdown's drains mix in),
so a drain started in the seconds before a backend's restart was never
counted. In the rolling restart that is when the others shed most: in a real
fair-share run (HAProxy, round robin) 15 of 52 policy drains completed after
their backend's read, and ``/stats`` said 37 where the model said 49.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["count_policy_drains", "LogCursor"]

_GOAWAY = re.compile(r"GOAWAY to (\S+): last_stream_id=\d+ final=(True|False) reason=(\S+)")
#: The drain of a stopping server: the restart's, not the policy's.
_SHUTDOWN = "shutdown"


def count_policy_drains(text: str) -> int:
    """Drains started for any reason but shutdown in ``text`` (one or more backends' log lines).

    A graceful drain sends two GOAWAYs to the same peer (``final=False``,
    then ``final=True``) and counts once; a single-phase drain sends one
    ``final=True`` GOAWAY and counts once.
    """
    first_sent: dict[str, bool] = {}  # per peer: its last GOAWAY was a first one (more to come)
    count = 0
    for match in _GOAWAY.finditer(text):
        peer, final, reason = match.group(1), match.group(2) == "True", match.group(3)
        second = final and first_sent.get(peer, False)
        first_sent[peer] = not final
        if reason != _SHUTDOWN and not second:
            count += 1
    return count


class LogCursor:
    """Where a log file ended when the run began: the run counts only what was written after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._start = path.stat().st_size
        except FileNotFoundError:
            self._start = 0

    def text(self) -> str:
        """Everything written since the cursor was made."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self._start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
