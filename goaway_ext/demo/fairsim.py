"""The fair-share policy inside the model: one controller per backend, a simulated fleet view.

The model runs the very :class:`goaway_ext.fairshare.FairShare` a server
runs. What is simulated is only the fleet view: every ``refresh`` seconds of
model time the model writes each serving backend's open connections into a
:class:`goaway_ext.fairshare.StaticFleetView` (a stopped backend is removed,
as HAProxy marks it DOWN and a dead peer stops answering) and then runs every
serving backend's ``update``, like the timer of ``serve``. The view is exact
and one refresh old at most, which is what HAProxy's stats socket gives a
backend that polls it every second. Each controller counts its own backend's
connections live (``FairShare(local=)``, as ``serve`` counts its serving
connections), so it stops shedding at its share between two refreshes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..fairshare import DEFAULT_CEILING, DEFAULT_MAX_DRAIN_RATE, DEFAULT_TOLERANCE, FairShare, StaticFleetView
from ..policy import GoawayPolicy

__all__ = ["FairShareOptions", "SimulatedFleet"]


@dataclass(frozen=True, slots=True)
class FairShareOptions:
    """The fair-share knobs the demo and the model share (see :class:`goaway_ext.fairshare.FairShare`)."""

    ceiling: float = DEFAULT_CEILING
    tolerance: float = DEFAULT_TOLERANCE
    max_drain_rate: float = DEFAULT_MAX_DRAIN_RATE
    fallback: float = 0.0
    gain: float = 1.0
    #: The load signal the simulated view reports: ``"connections"`` (what the library uses) or
    #: ``"requests"`` (requests per second over the last refresh; kept in the model to show why not).
    signal: str = "connections"

    def as_dict(self) -> dict[str, float | str]:
        """The options as stored in a ``--json`` file."""
        return {"ceiling": self.ceiling, "tolerance": self.tolerance, "max_drain_rate": self.max_drain_rate,
                "fallback": self.fallback, "gain": self.gain, "signal": self.signal}


class SimulatedFleet:
    """Per backend a policy with its own :class:`FairShare`, all reading one view the model refreshes.

    ``capacities`` gives each backend's relative capacity (1.0 each by
    default); a half-capacity backend declares 0.5 and its controller and
    the others' share it accordingly. ``clock`` is the model's one-element
    time cell (``simulate(..., clock=)``).
    """

    def __init__(
        self,
        names: Sequence[str],
        clock: list[float],
        options: FairShareOptions,
        *,
        capacities: Sequence[float] | None = None,
        refresh: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if options.signal not in ("connections", "requests"):
            raise ValueError(f"signal must be 'connections' or 'requests', got {options.signal!r}")
        self.refresh = refresh
        self._signal = options.signal
        self._last: list[int] = [0] * len(names)
        self._last_at = 0.0
        self._names = list(names)
        self._capacities = list(capacities) if capacities is not None else [1.0] * len(self._names)
        if len(self._capacities) != len(self._names):
            raise ValueError(f"need one capacity per backend ({len(self._names)}), got {len(self._capacities)}")

        def now() -> float:
            return clock[0]

        self.view = StaticFleetView(now)
        # The model's live connection counts (the list simulate() mutates in place), from the first tick on.
        self._live: Sequence[int] = [0] * len(self._names)

        def local(index: int) -> Callable[[], float]:
            return lambda: float(self._live[index])

        self.controllers = [
            FairShare(self.view, name, clock=now, ceiling=options.ceiling, tolerance=options.tolerance,
                      max_drain_rate=options.max_drain_rate, fallback=options.fallback, gain=options.gain,
                      max_staleness=3 * refresh, interval=refresh, allow_high_chance=True,
                      local=local(index) if options.signal == "connections" else None)
            for index, name in enumerate(self._names)
        ]
        self.policies = [
            GoawayPolicy(fair_share=controller, seed=None if seed is None else seed * 1000 + index)
            for index, controller in enumerate(self.controllers)
        ]

    def tick(self, now: float, connections: Sequence[int], down: Sequence[bool], requests: Sequence[int]) -> None:
        """Write every serving backend's load into the view, then run every controller.

        ``requests`` are the totals answered so far per backend; with the
        ``"requests"`` signal the view gets the rate since the previous tick.
        """
        self._live = connections
        loads: Sequence[float] = connections
        if self._signal == "requests":
            span = max(now - self._last_at, 1e-9)
            loads = [(n - last) / span for n, last in zip(requests, self._last, strict=True)]
            self._last = list(requests)
            self._last_at = now
        for name, n, is_down, capacity in zip(self._names, loads, down, self._capacities, strict=True):
            if is_down:
                self.view.remove(name)
            else:
                self.view.set(name, n, capacity)
        for controller, is_down in zip(self.controllers, down, strict=True):
            if not is_down:
                controller.update(now)
