"""Process-wide counters and optional Prometheus metrics, shared by every integration.

An operator wants one answer to "is the rebalancing happening?", whatever
serves the connections: the hypercorn integration and ``H2Server`` both
report here, so :func:`totals` and the Prometheus series cover them all.

Counting is done from :class:`~goaway_ext.ConnectionStats` differences
(:class:`ConnectionMeter`), not from events, so an integration only has to
call :meth:`ConnectionMeter.update` when it is convenient (a drain moved, the
connection closed); nothing runs per request.

Prometheus metrics (created on first use, only when ``prometheus_client``
imports, in its default registry): ``goaway_ext_goaways_sent_total{reason}``,
``goaway_ext_streams_refused_total``, ``goaway_ext_drain_seconds`` (histogram).
Optional because most deployments do not run it, and a metrics library should
not become a dependency of a protocol extension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .server import ServerConnection

__all__ = ["ConnectionMeter", "GoawayTotals", "connection_opened", "totals"]


@dataclass
class GoawayTotals:
    """Process-wide counters over every connection goaway_ext served.

    What an operator checks to see the rebalancing work: connections served,
    GOAWAYs sent per reason (``chance``, ``max_requests``, ``max_age``,
    ``decider``, ``shutdown``), streams refused because they came after the
    final GOAWAY, streams cut by ``grace``, and drains with their total duration.
    """

    connections: int = 0
    goaways_sent: dict[str, int] = field(default_factory=dict)
    streams_refused: int = 0
    streams_cut: int = 0
    drains: int = 0
    drain_seconds: float = 0.0

    def snapshot(self) -> GoawayTotals:
        """A copy that later connections do not change."""
        return GoawayTotals(self.connections, dict(self.goaways_sent), self.streams_refused, self.streams_cut,
                            self.drains, self.drain_seconds)


_TOTALS = GoawayTotals()


def totals() -> GoawayTotals:
    """A snapshot of this process's :class:`GoawayTotals` (every integration)."""
    return _TOTALS.snapshot()


def connection_opened() -> None:
    """Count one connection served with goaway_ext."""
    _TOTALS.connections += 1


class _Prometheus:
    """The Prometheus series, made on first use; all None when ``prometheus_client`` is absent."""

    def __init__(self) -> None:
        self.ready = False
        self.goaways: Any = None
        self.refused: Any = None
        self.drain: Any = None

    def setup(self) -> bool:
        if self.ready:
            return self.goaways is not None
        self.ready = True
        try:
            import prometheus_client  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            return False
        self.goaways = prometheus_client.Counter(
            "goaway_ext_goaways_sent", "GOAWAY frames sent by goaway_ext, by drain reason", ["reason"])
        self.refused = prometheus_client.Counter(
            "goaway_ext_streams_refused", "Streams refused with REFUSED_STREAM after the final GOAWAY")
        self.drain = prometheus_client.Histogram(
            "goaway_ext_drain_seconds", "Seconds from the start of a drain to its last stream's end",
            buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, float("inf")))
        return True


_PROMETHEUS = _Prometheus()


class ConnectionMeter:
    """What of one connection's counters was already added to the totals.

    One per connection, made when its first drain step is reported (or at
    close); :meth:`update` adds only what changed since the last call, so an
    integration may call it as often as it likes.
    """

    __slots__ = ("_cut", "_drained", "_goaways", "_refused")

    def __init__(self) -> None:
        self._goaways = 0
        self._refused = 0
        self._cut = 0
        self._drained = False

    def update(self, connection: ServerConnection) -> None:
        """Add what ``connection`` did since the last call to the totals and Prometheus."""
        stats = connection.stats
        goaways = stats.goaways_sent - self._goaways
        refused = stats.streams_refused - self._refused
        cut = stats.streams_cut - self._cut
        drained = stats.drain_duration is not None and not self._drained
        if not (goaways or refused or cut or drained):
            return
        self._goaways, self._refused, self._cut = stats.goaways_sent, stats.streams_refused, stats.streams_cut
        prometheus = _PROMETHEUS.setup()
        if goaways:
            reason = connection.drain_reason
            _TOTALS.goaways_sent[reason] = _TOTALS.goaways_sent.get(reason, 0) + goaways
            if prometheus:
                _PROMETHEUS.goaways.labels(reason=reason).inc(goaways)
        if refused:
            _TOTALS.streams_refused += refused
            if prometheus:
                _PROMETHEUS.refused.inc(refused)
        _TOTALS.streams_cut += cut
        if drained:
            self._drained = True
            assert stats.drain_duration is not None
            _TOTALS.drains += 1
            _TOTALS.drain_seconds += stats.drain_duration
            if prometheus:
                _PROMETHEUS.drain.observe(stats.drain_duration)
