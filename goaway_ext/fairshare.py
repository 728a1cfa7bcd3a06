"""Load-aware GOAWAY: shed connections only where the load is, then go quiet.

A fixed ``chance`` makes every connection of every server reconnect for ever,
balanced or not. :class:`FairShare` instead moves the chance of this server's
live connections, off the request path (call :meth:`FairShare.update` on a
timer, about once a second), from how far this server sits above the
least-loaded server of its fleet:

- the **load signal** is open HTTP/2 connections per unit of capacity. A
  GOAWAY moves a connection, not a request, and the balancer places
  connections, so connections are what the rule can steer; HAProxy's ``scur``
  counts exactly that. The model (``demo --simulate --heavy-client``) shows
  why not requests per second: one client carrying a large part of the load
  makes its server look overloaded wherever it goes, and a request-rate rule
  bounces that client around the fleet for ever;
- the **reference** is the least-loaded server, not the fleet mean: one starved
  server spreads its deficit thinly over the others, so a mean-based rule sees
  everybody "within tolerance" and never refills it;
- the effective chance is ``min(ceiling, gain * (load / least - 1 - tolerance))``
  and exactly 0 at or below ``least * (1 + tolerance)``; a least-loaded server
  with no connections (just restarted) makes every other server shed at the
  ceiling;
- when the fleet view is missing, stale, or does not list this server, the
  chance falls back to the plain ``fallback`` chance (kube-apiserver's rule);
- shedding starts above ``least * (1 + tolerance)``; once no server is
  starved (every one holds at least ``1 - tolerance`` of its share), it stops
  at this server's fair share (the fleet's connections times its part of the
  capacity): hysteresis. A drain is then admitted only while this server
  still holds more than its share, counted live (its own serving connections
  when ``local`` is given, else the view's count minus the drains admitted
  since the last update). The view is up to an interval old; without the
  stop, a server one connection above its share sheds two before the view
  shows the first move, and the fleet trades that connection back and forth
  for ever. While a server is starved there is no stop: under round robin it
  gets only 1/B of the fleet's reconnects, so servers at their share must
  shed too for it to fill at the rate the ceiling allows;
- whatever the chance, at most ``max_drain_rate`` of this server's
  connections start a drain per second (a token bucket). Both checks run only
  when the sampler fires, so the per-request cost is the core's countdown, as
  with a fixed chance: no reconnect storm into the balancer.

Everything here is sans-IO and clock-driven; the fleet views that do I/O live
in :mod:`goaway_ext.fleet` and only hand over their last snapshot.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._core import Sampler

__all__ = [
    "DEFAULT_CEILING",
    "DEFAULT_TOLERANCE",
    "DEFAULT_MAX_DRAIN_RATE",
    "DEFAULT_MAX_STALENESS",
    "ServerLoad",
    "FleetSnapshot",
    "FleetView",
    "StaticFleetView",
    "FairShare",
    "fair_chance",
]

#: Default ceiling of the effective chance: kube-apiserver's largest ``--goaway-chance``.
DEFAULT_CEILING = 0.02
#: Default tolerance above the least-loaded server (the model keeps max/min near 1.1 with it).
DEFAULT_TOLERANCE = 0.10
#: Default largest fraction of this server's connections that may start a drain per second.
DEFAULT_MAX_DRAIN_RATE = 0.05
#: Default age in seconds past which a fleet snapshot is stale and the fallback chance applies.
DEFAULT_MAX_STALENESS = 5.0


def _finite(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """Validate a finite real number in a range; name the argument and the value in every error."""
    if type(value) is bool or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    bad = not math.isfinite(number) or number < low or number > high or (low_open and number == low)
    if bad:
        lower = f"greater than {low:g}" if low_open else f"at least {low:g}"
        upper = "" if math.isinf(high) else f" and at most {high:g}"
        raise ValueError(f"{name} must be a finite number {lower}{upper}, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """One server's load as a fleet view saw it: open connections, and its relative capacity.

    ``capacity`` weighs the fair share (a server with half the CPU declares
    0.5 and is given half the connections); it must be above 0.
    """

    name: str
    connections: float
    capacity: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        _finite("connections", self.connections, 0.0)
        _finite("capacity", self.capacity, 0.0, low_open=True)

    @property
    def normalized(self) -> float:
        """Connections per unit of capacity: the quantity the rule equalises."""
        return self.connections / self.capacity


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Every reachable, serving server's load, taken at ``taken_at`` (on the controller's clock).

    Servers that are down, draining or unreachable are simply absent: the
    rule compares only servers that take connections.
    """

    servers: tuple[ServerLoad, ...]
    taken_at: float

    def find(self, name: str) -> ServerLoad | None:
        """The entry of ``name``, or None when the view does not list it."""
        for server in self.servers:
            if server.name == name:
                return server
        return None


@runtime_checkable
class FleetView(Protocol):
    """Where a :class:`FairShare` reads the fleet's load: the last snapshot, without waiting.

    ``snapshot()`` must return at once (a view that does I/O refreshes in the
    background and hands over what it has), or None when it has nothing yet.
    """

    def snapshot(self) -> FleetSnapshot | None:
        """The latest snapshot, or None."""
        ...


class StaticFleetView:
    """A fleet view set by its owner: for tests, the model, and same-host workers.

    Workers of one host (or one process) call :meth:`set` with their own
    connection count; ``clock`` stamps each entry, and :meth:`snapshot` lists
    the servers whose entry is younger than ``max_age`` (None keeps entries for
    ever). Thread-safe.
    """

    __slots__ = ("_clock", "_entries", "_lock", "_max_age")

    def __init__(self, clock: Callable[[], float], *, max_age: float | None = None) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._max_age = None if max_age is None else _finite("max_age", max_age, 0.0, low_open=True)
        self._entries: dict[str, tuple[ServerLoad, float]] = {}
        self._lock = threading.Lock()

    def set(self, name: str, connections: float, capacity: float = 1.0) -> None:
        """Record ``name``'s current load (replaces its previous entry)."""
        entry = ServerLoad(name, connections, capacity)
        with self._lock:
            self._entries[name] = (entry, self._clock())

    def remove(self, name: str) -> None:
        """Forget ``name`` (it stopped, or stopped taking connections)."""
        with self._lock:
            self._entries.pop(name, None)

    def snapshot(self) -> FleetSnapshot | None:
        """Every entry younger than ``max_age``; None when there is none."""
        now = self._clock()
        with self._lock:
            live = tuple(
                entry for entry, at in self._entries.values() if self._max_age is None or now - at <= self._max_age
            )
        return FleetSnapshot(live, now) if live else None


def fair_chance(
    mine: float, least: float, *, tolerance: float, ceiling: float, gain: float = 1.0, min_excess: float = 2.0
) -> float:
    """The rule itself: the chance for a server at ``mine`` when the least-loaded is at ``least``.

    Both loads are normalized (connections per unit of capacity). Zero at or
    below ``least * (1 + tolerance)``, and zero when ``mine - least`` is under
    ``min_excess`` (moving one connection changes that difference by two, so
    below two connections a move only swaps the roles: small fleets would
    shed for ever over a difference of one); ``gain * (mine / least - 1 -
    tolerance)`` above, capped at ``ceiling``; the ceiling when ``least`` is
    0 and this server has enough to give.
    """
    if mine <= least * (1.0 + tolerance) or mine - least < min_excess or mine <= 0.0:
        return 0.0
    if least <= 0.0:
        return ceiling
    return min(ceiling, gain * (mine / least - 1.0 - tolerance))


class FairShare:
    """The controller: one per server, shared by every connection of that server.

    Pass it to :class:`goaway_ext.GoawayPolicy` as ``fair_share=``; every new
    connection's sampler starts at the current effective chance and is
    tracked (weakly) here. :meth:`update` reads the fleet view, computes the
    chance with :func:`fair_chance` and moves every live sampler to it when it
    changed, so the request path only ever runs the core's countdown. Call it
    on a timer (``serve`` and the hypercorn wrapper do it every ``interval``
    seconds).

    ``name`` is this server's name in the fleet view. ``fallback`` is the
    plain chance used while the view is missing, older than ``max_staleness``
    seconds, or does not list this server (it must not exceed ``ceiling``).
    ``ceiling`` above 0.02 needs ``allow_high_chance=True``, as ``chance``
    does. ``local``, when given, is this server's own count of connections
    still serving, used instead of the view's entry for it: a balancer still
    counts a draining connection until its last stream ends (a watch can
    take seconds), and a server that counted those would shed again what it
    already shed. Once no server is starved, a drain is admitted only while
    this server holds more than its fair share (see :attr:`stop_at`).
    ``max_drain_rate`` bounds drains per second as a fraction of this
    server's connections (at least one drain may start per second whenever
    the chance is above 0, so a small server can still shed).
    """

    __slots__ = (
        "_allow",
        "_allowed",
        "_ceiling",
        "_chance",
        "_clock",
        "_connections",
        "_fallback",
        "_gain",
        "_interval",
        "_local",
        "_lock",
        "_max_drain_rate",
        "_max_staleness",
        "_name",
        "_refused",
        "_samplers",
        "_since_update",
        "_state",
        "_stop_at",
        "_tokens",
        "_tokens_at",
        "_tolerance",
        "_view",
    )

    def __init__(
        self,
        view: FleetView,
        name: str,
        *,
        clock: Callable[[], float],
        fallback: float = 0.0,
        ceiling: float = DEFAULT_CEILING,
        tolerance: float = DEFAULT_TOLERANCE,
        gain: float = 1.0,
        max_drain_rate: float = DEFAULT_MAX_DRAIN_RATE,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        interval: float = 1.0,
        allow_high_chance: bool = False,
        local: Callable[[], float] | None = None,
    ) -> None:
        if local is not None and not callable(local):
            raise TypeError(f"local must be callable or None, got {local!r}")
        if not isinstance(view, FleetView):
            raise TypeError(f"view must have a snapshot() method (a FleetView), got {view!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        if type(allow_high_chance) is not bool:
            raise TypeError(f"allow_high_chance must be a bool, got {allow_high_chance!r}")
        self._ceiling = _finite("ceiling", ceiling, 0.0, 1.0)
        if self._ceiling > DEFAULT_CEILING and not allow_high_chance:
            raise ValueError(
                f"ceiling={ceiling!r} is above {DEFAULT_CEILING}: while rebalancing, every client of an "
                f"overloaded server would reconnect about every {1 / self._ceiling:.0f} requests. "
                f"Pass allow_high_chance=True to allow it."
            )
        self._fallback = _finite("fallback", fallback, 0.0, 1.0)
        if self._fallback > self._ceiling:
            raise ValueError(f"fallback must not exceed ceiling ({self._ceiling!r}), got {fallback!r}")
        self._view = view
        self._local = local
        self._name = name
        self._clock = clock
        self._gain = _finite("gain", gain, 0.0, low_open=True)
        tol = _finite("tolerance", tolerance, 0.0)
        self._max_drain_rate = _finite("max_drain_rate", max_drain_rate, 0.0, 1.0, low_open=True)
        self._max_staleness = _finite("max_staleness", max_staleness, 0.0, low_open=True)
        self._interval = _finite("interval", interval, 0.0, low_open=True)
        self._allow = allow_high_chance
        self._tolerance = tol
        self._chance = self._fallback
        self._state = "fallback"
        self._connections = 0.0
        self._samplers: weakref.WeakSet[Sampler] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._tokens = 1.0
        self._tokens_at = clock()
        self._allowed = 0
        self._refused = 0
        self._stop_at = -math.inf
        self._since_update = 0

    # -- configuration, read-only ----------------------------------------------------

    @property
    def name(self) -> str:
        """This server's name in the fleet view."""
        return self._name

    @property
    def view(self) -> FleetView:
        """The fleet view this controller reads."""
        return self._view

    @property
    def ceiling(self) -> float:
        """Largest effective chance."""
        return self._ceiling

    @property
    def tolerance(self) -> float:
        """How far above the least-loaded server (relative) this server may sit without shedding."""
        return self._tolerance

    @property
    def fallback(self) -> float:
        """The plain chance used while the fleet view is stale or missing."""
        return self._fallback

    @property
    def max_drain_rate(self) -> float:
        """Largest fraction of this server's connections that may start a drain per second."""
        return self._max_drain_rate

    @property
    def interval(self) -> float:
        """Seconds between two :meth:`update` calls, as the owner's timer should run them."""
        return self._interval

    # -- state --------------------------------------------------------------------------

    @property
    def chance(self) -> float:
        """The effective chance every live connection of this server samples with now."""
        return self._chance

    @property
    def drains_allowed(self) -> int:
        """Drains the rate limit let through since the start."""
        return self._allowed

    @property
    def drains_refused(self) -> int:
        """Sampler hits the rate limit turned away (the connection stays), since the start."""
        return self._refused

    @property
    def stop_at(self) -> float:
        """Connections at or under which this server admits no drain until the next update.

        Its fair share of the fleet's connections at the last update (total
        times its part of the capacity); ``-inf`` while a server of the fleet
        is starved (below ``1 - tolerance`` of its share: it fills only from
        the fleet's reconnects) and while the view is unusable (the fallback
        chance is not load-aware, so nothing stops it).
        """
        return self._stop_at

    @property
    def state(self) -> str:
        """``"fallback"`` (no usable view), ``"shedding"`` (chance above 0) or ``"balanced"``."""
        return self._state

    def __repr__(self) -> str:
        return (
            f"FairShare(name={self._name!r}, chance={self._chance!r}, state={self._state!r}, "
            f"ceiling={self._ceiling!r}, tolerance={self._tolerance!r}, fallback={self._fallback!r}, "
            f"max_drain_rate={self._max_drain_rate!r})"
        )

    # -- the connection side (once per connection, once per sampler hit) ---------------

    def track(self, sampler: Sampler) -> None:
        """Start moving ``sampler``'s chance with this controller (held weakly; called per new connection)."""
        with self._lock:
            if sampler.chance != self._chance:
                sampler.chance = self._chance
            self._samplers.add(sampler)

    def admit(self) -> bool:
        """Called when a sampler fires: True lets the drain start, False skips it.

        Two checks. This server must still hold more connections than
        :attr:`stop_at` (its own live count from ``local``, or the count of
        the last update minus the drains admitted since), so a stale view
        cannot make it shed past its share. And a token bucket of
        ``max_drain_rate * connections`` tokens per second, holding at most
        one second's worth (and at least one token), bounds the rate.
        """
        now = self._clock()
        live = None if self._local is None or self._stop_at == -math.inf else float(self._local())
        with self._lock:
            held = self._connections - self._since_update if live is None else live
            if held <= self._stop_at:
                self._refused += 1
                return False
            rate = max(1.0, self._max_drain_rate * self._connections)
            tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if tokens >= 1.0:
                self._tokens = tokens - 1.0
                self._allowed += 1
                self._since_update += 1
                return True
            self._tokens = tokens
            self._refused += 1
            return False

    # -- the timer side ----------------------------------------------------------------

    def compute(self, snapshot: FleetSnapshot | None, now: float) -> tuple[float, str, float | None]:
        """The chance, state and this server's connections for ``snapshot`` at ``now`` (no side effect)."""
        chance, state, connections, _ = self._assess(snapshot, now)
        return chance, state, connections

    def _assess(self, snapshot: FleetSnapshot | None, now: float) -> tuple[float, str, float | None, float]:
        """:meth:`compute` plus :attr:`stop_at` (this server's fair share of the fleet's connections)."""
        if snapshot is None or now - snapshot.taken_at > self._max_staleness:
            return self._fallback, "fallback", None, -math.inf
        mine = snapshot.find(self._name)
        if mine is None:
            return self._fallback, "fallback", None, -math.inf
        if self._local is not None:
            mine = ServerLoad(mine.name, float(self._local()), mine.capacity)
        others = [server for server in snapshot.servers if server.name != self._name]
        least = min([server.normalized for server in others] + [mine.normalized])
        chance = fair_chance(mine.normalized, least, tolerance=self._tolerance, ceiling=self._ceiling,
                             gain=self._gain)
        total = mine.connections + sum(server.connections for server in others)
        capacity = mine.capacity + sum(server.capacity for server in others)
        per_capacity = total / capacity
        # A server starved by more than the tolerance fills only from the fleet's reconnects (round
        # robin sends it 1/B of them): everyone above the least keeps shedding, at the ceiling's rate.
        # Once every server is within the tolerance of its share, only count noise is left, and a
        # server stops at its share: going past it would only move the imbalance.
        starved = least < per_capacity * (1.0 - self._tolerance) - 1e-9
        stop_at = -math.inf if starved else per_capacity * mine.capacity
        return chance, ("shedding" if chance > 0.0 else "balanced"), mine.connections, stop_at

    def update(self, now: float | None = None) -> float:
        """Read the view, set the effective chance on every live connection; return the chance.

        Runs off the request path. Samplers are only touched when the chance
        changed, so a balanced fleet costs one snapshot per call.
        """
        if now is None:
            now = self._clock()
        chance, state, connections, stop_at = self._assess(self._view.snapshot(), now)
        with self._lock:
            self._state = state
            self._stop_at = stop_at
            self._since_update = 0
            if connections is not None:
                self._connections = connections
            else:
                self._connections = float(len(self._samplers))
            if chance == self._chance:
                return chance
            self._chance = chance
            samplers: Iterable[Sampler] = list(self._samplers)
        for sampler in samplers:
            sampler.chance = chance
        return chance
