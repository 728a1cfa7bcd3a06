"""When a server connection should start its drain: ``GoawayPolicy``.

A policy is plain configuration, shared by every connection of a server. Each
new connection asks it for a :class:`ConnectionBudget`: its own sampler, its own
jittered request limit and its own jittered age deadline, so connections that
were opened together do not all reconnect together.

Four triggers compose, the first one met wins:

- ``chance``: per request, like kube-apiserver's ``--goaway-chance``;
- ``max_requests``: a request budget, like nginx ``keepalive_requests`` and
  Envoy ``max_requests_per_connection``;
- ``max_age``: a connection age, like gRPC's ``MaxConnectionAge``;
- ``max_idle``: time without an open stream, like gRPC's ``MaxConnectionIdle``
  and Envoy's ``idle_timeout``.

``decider`` may force or exempt single requests (health checks, verbs).
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._core import Sampler

if TYPE_CHECKING:
    from .fairshare import FairShare

__all__ = ["MODES", "MAX_SAFE_CHANCE", "MAX_REQUESTS_LIMIT", "GoawayPolicy", "ConnectionBudget", "Decider"]

#: The drain modes a policy may name; see ``goaway_ext.server.DrainState``.
MODES = ("graceful", "single", "idle")
#: Largest chance accepted without ``allow_high_chance`` (kube-apiserver's bound).
MAX_SAFE_CHANCE = 0.02

#: ``decider(headers)``: True forces a drain, False exempts the request, None defers to the policy.
Decider = Callable[[Sequence[tuple[Any, Any]]], "bool | None"]
"""Sees a request's headers: True forces a drain, False exempts the request, None leaves it to chance."""


def _real(name: str, value: object, *, low: float, low_open: bool, none_ok: bool = False) -> float | None:
    """Validate a finite real number above ``low``; name the argument in every error."""
    if value is None:
        if none_ok:
            return None
        raise TypeError(f"{name} must be a number, got None")
    if type(value) is bool or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or None' if none_ok else ''}, got {value!r}")
    bound = "greater than" if low_open else "at least"
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float, e.g. 10**400
        number = math.inf
    if not math.isfinite(number) or number < low or (low_open and number == low):
        raise ValueError(f"{name} must be a finite number {bound} {low:g}, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """What one connection may use before it drains, drawn once when it opens.

    ``sampler`` is None when ``chance`` is 0 (no per-request draw at all);
    ``max_requests`` is the jittered request limit, ``age_deadline`` the jittered
    moment (on the connection's clock) its age runs out, ``max_idle`` the
    jittered seconds it may stay without an open stream; None means no limit.
    ``admit``, set by a fair-share policy, is asked only when the sampler fires:
    False skips that drain (the server's drain-rate limit).
    """

    sampler: Sampler | None
    max_requests: int | None
    age_deadline: float | None
    admit: Callable[[], bool] | None = None
    max_idle: float | None = None


#: Most requests one connection can carry: client stream ids are odd and below 2^31.
MAX_REQUESTS_LIMIT = 2**30


class GoawayPolicy:
    """Configuration of when and how a server connection sends GOAWAY.

    ``chance`` above 0.02 is refused unless ``allow_high_chance=True``: at that
    rate a client reconnects every few dozen requests, which costs more than the
    balance it buys (kube-apiserver refuses it too). Tests and demos need 1.0.

    ``max_idle`` drains a connection that had no open stream for that many
    seconds (gRPC's ``MaxConnectionIdle``): nothing is in flight then, so no
    client has anything to lose. ``jitter`` spreads ``max_requests``,
    ``max_age`` and ``max_idle`` uniformly over ±``jitter`` per connection
    (gRPC spec A9 uses 10%). ``ping_timeout`` bounds
    the wait for the PING ACK of a graceful drain; ``grace`` is the hard
    deadline after a drain starts (None waits for ever, like Go); ``linger`` is
    how long the socket stays open once drained, so the peer reads the last
    frames before the FIN. ``mode`` is ``"graceful"`` (RFC 9113 §6.8 two-phase),
    ``"single"`` (one GOAWAY, as Go and kube-apiserver) or ``"idle"`` (wait for
    the connection to be idle, for clients that lose in-flight requests on
    GOAWAY). ``seed`` makes every draw reproducible, connection after connection.

    ``fair_share`` (a :class:`goaway_ext.fairshare.FairShare`) replaces the
    fixed chance with a load-aware one: the controller moves the chance of
    every live connection from the fleet view and holds the fallback chance
    itself, so ``chance`` must stay 0 with it.

    ``rapid_reset_window`` bounds rapid reset (CVE-2023-44487), as Envoy does:
    when more than half of the last ``rapid_reset_window`` streams a client
    opened on a connection were reset by it before their response was
    complete, or refused as late, the connection gets GOAWAY(ENHANCE_YOUR_CALM)
    and is closed. It lives here so every integration gets it. None turns it
    off (a proxy in front that already enforces it).
    """

    __slots__ = (
        "_allow_high_chance", "_chance", "_decider", "_fair_share", "_fixed", "_grace", "_jitter", "_linger", "_lock",
        "_max_age", "_max_idle", "_max_requests", "_mode", "_ping_timeout", "_rapid_reset_window", "_seed",
        "_seeds",
    )

    def __init__(
        self,
        chance: float = 0.0,
        *,
        max_requests: int | None = None,
        max_age: float | None = None,
        max_idle: float | None = None,
        jitter: float = 0.1,
        ping_timeout: float = 5.0,
        grace: float | None = None,
        linger: float = 1.0,
        mode: str = "graceful",
        decider: Decider | None = None,
        seed: int | None = None,
        allow_high_chance: bool = False,
        fair_share: FairShare | None = None,
        rapid_reset_window: int | None = 500,
    ) -> None:
        if type(allow_high_chance) is not bool:
            raise TypeError(f"allow_high_chance must be a bool, got {allow_high_chance!r}")
        if type(chance) is bool or not isinstance(chance, (int, float)):
            raise TypeError(f"chance must be a number in [0, 1], got {chance!r}")
        if not 0.0 <= float(chance) <= 1.0:  # false for NaN too
            raise ValueError(f"chance must be a number in [0, 1], got {chance!r}")
        if float(chance) > MAX_SAFE_CHANCE and not allow_high_chance:
            raise ValueError(
                f"chance={chance!r} is above {MAX_SAFE_CHANCE}: every client would reconnect about every "
                f"{1 / float(chance):.0f} requests, which costs more than the rebalancing buys "
                f"(kube-apiserver refuses it too; 0.001 is the usual value). "
                f"Pass allow_high_chance=True for tests and demos."
            )
        if max_requests is not None:
            if type(max_requests) is bool or not isinstance(max_requests, int):
                raise TypeError(f"max_requests must be an int or None, got {max_requests!r}")
            if not 1 <= max_requests <= MAX_REQUESTS_LIMIT:
                raise ValueError(
                    f"max_requests must be in 1..{MAX_REQUESTS_LIMIT} (a connection carries at most 2^30 "
                    f"requests: client stream ids are odd and below 2^31), got {max_requests!r}"
                )
        jitter_value = _real("jitter", jitter, low=0.0, low_open=False)
        assert jitter_value is not None
        if jitter_value >= 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if decider is not None and not callable(decider):
            raise TypeError(f"decider must be callable or None, got {decider!r}")
        if seed is not None and (type(seed) is bool or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if rapid_reset_window is not None:
            if type(rapid_reset_window) is bool or not isinstance(rapid_reset_window, int):
                raise TypeError(f"rapid_reset_window must be an int or None, got {rapid_reset_window!r}")
            if not 2 <= rapid_reset_window <= MAX_REQUESTS_LIMIT:
                raise ValueError(f"rapid_reset_window must be in 2..{MAX_REQUESTS_LIMIT}, got {rapid_reset_window!r}")
        if fair_share is not None:
            from .fairshare import FairShare

            if not isinstance(fair_share, FairShare):
                raise TypeError(f"fair_share must be a FairShare or None, got {fair_share!r}")
            if float(chance) != 0.0:
                raise ValueError(
                    f"chance must be 0 with fair_share (got {chance!r}): the controller's fallback "
                    "is the chance used while its fleet view is stale"
                )
        self._fair_share = fair_share
        self._chance = float(chance)
        self._max_requests = max_requests
        self._max_age = _real("max_age", max_age, low=0.0, low_open=True, none_ok=True)
        self._max_idle = _real("max_idle", max_idle, low=0.0, low_open=True, none_ok=True)
        self._rapid_reset_window = rapid_reset_window
        self._jitter = jitter_value
        ping = _real("ping_timeout", ping_timeout, low=0.0, low_open=True)
        assert ping is not None
        self._ping_timeout = ping
        self._grace = _real("grace", grace, low=0.0, low_open=True, none_ok=True)
        linger_value = _real("linger", linger, low=0.0, low_open=False)
        assert linger_value is not None
        self._linger = linger_value
        self._mode = mode
        self._decider = decider
        self._seed = seed
        self._allow_high_chance = allow_high_chance
        # One generator of per-connection seeds: with ``seed`` set, the n-th
        # connection always gets the same draws.
        self._seeds = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        self._lock = threading.Lock()
        # A policy that draws nothing per connection (chance 0, no limit to
        # jitter, no fair share) gives every connection this one budget: a
        # frozen budget is safe to share, and building one costs more than
        # the rest of a connection's setup on our side (~9k instructions).
        # The seed generator is untouched then, and nothing ever reads it.
        self._fixed: ConnectionBudget | None = None
        if (fair_share is None and self._chance == 0.0 and max_requests is None and self._max_age is None
                and self._max_idle is None):
            self._fixed = ConnectionBudget(None, None, None, None, None)

    @property
    def chance(self) -> float:
        """Per-request probability of starting a drain."""
        return self._chance

    @property
    def max_requests(self) -> int | None:
        """Request budget per connection before jitter (None: no budget)."""
        return self._max_requests

    @property
    def max_age(self) -> float | None:
        """Connection age budget in seconds before jitter (None: no budget)."""
        return self._max_age

    @property
    def max_idle(self) -> float | None:
        """Seconds a connection may stay without an open stream, before jitter (None: no limit)."""
        return self._max_idle

    @property
    def rapid_reset_window(self) -> int | None:
        """Streams over which a majority of client resets closes the connection (None: no limit)."""
        return self._rapid_reset_window

    @property
    def jitter(self) -> float:
        """Relative spread of max_requests, max_age and max_idle, so clients do not reconnect in lockstep."""
        return self._jitter

    @property
    def ping_timeout(self) -> float:
        """Seconds a graceful drain waits for its PING ACK before the final GOAWAY."""
        return self._ping_timeout

    @property
    def grace(self) -> float | None:
        """Hard deadline in seconds after a drain starts (None: wait for ever)."""
        return self._grace

    @property
    def linger(self) -> float:
        """Seconds between drained and socket close, so the peer reads the last frames."""
        return self._linger

    @property
    def mode(self) -> str:
        """'graceful', 'single' or 'idle'."""
        return self._mode

    @property
    def fair_share(self) -> FairShare | None:
        """The load-aware controller that sets the chance, or None for a fixed chance."""
        return self._fair_share

    @property
    def decider(self) -> Decider | None:
        """Per-request hook: force (True) or exempt (False) a request."""
        return self._decider

    def __repr__(self) -> str:
        """Every setting, so a log line of the policy says exactly what a server runs."""
        decider = self._decider
        decider_text = "None" if decider is None else getattr(decider, "__qualname__", None) or repr(decider)
        return (
            f"GoawayPolicy(chance={self._chance!r}, max_requests={self._max_requests!r}, "
            f"max_age={self._max_age!r}, max_idle={self._max_idle!r}, jitter={self._jitter!r}, "
            f"ping_timeout={self._ping_timeout!r}, "
            f"grace={self._grace!r}, linger={self._linger!r}, mode={self._mode!r}, decider={decider_text}, "
            f"seed={self._seed!r}, allow_high_chance={self._allow_high_chance!r}, fair_share={self._fair_share!r}, "
            f"rapid_reset_window={self._rapid_reset_window!r})"
        )

    def _spread(self, uniform: float) -> float:
        return 1.0 + self._jitter * (2.0 * uniform - 1.0)

    def new_budget(self, now: float) -> ConnectionBudget:
        """Draw the budget of a connection opened at ``now`` (seconds on its clock).

        Called once per connection; thread-safe, so one policy can serve
        several event loops.
        """
        if self._fixed is not None:
            return self._fixed
        limit: int | None = None
        deadline: float | None = None
        idle: float | None = None
        with self._lock:
            # The jitter is drawn from the policy's one generator, in the same
            # turn as the connection's seed: a generator of its own per
            # connection (random.Random(seed)) cost ~30k instructions to build,
            # as much as the rest of a connection's setup on our side. With
            # ``seed`` set, the n-th connection still gets the same draws.
            seeds = self._seeds
            conn_seed = seeds.getrandbits(64)
            if self._max_requests is not None:
                limit = max(1, round(self._max_requests * self._spread(seeds.random())))
            if self._max_age is not None:
                deadline = now + self._max_age * self._spread(seeds.random())
            if self._max_idle is not None:  # drawn last, so seeded draws of the others stay as they were
                idle = self._max_idle * self._spread(seeds.random())
        fair = self._fair_share
        if fair is not None:
            # Always a sampler: the controller may raise the chance later.
            tracked = Sampler(fair.chance, seed=conn_seed)
            fair.track(tracked)
            return ConnectionBudget(tracked, limit, deadline, fair.admit, idle)
        sampler = Sampler(self._chance, seed=conn_seed) if self._chance > 0.0 else None
        return ConnectionBudget(sampler, limit, deadline, None, idle)
