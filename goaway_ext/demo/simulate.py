"""The rebalance model without sockets: thousands of clients, tens of backends, same policy code.

A real run on one machine tops out at a few dozen clients. To choose a chance
for a fleet, :func:`simulate` replays the demo's scenario as a model, with the
very :class:`goaway_ext.GoawayPolicy` the server uses: every simulated
connection draws its budget with ``policy.new_budget(now)`` (the per-connection
``Sampler``, jittered request limit and age deadline) and consults it on every
request, exactly as ``ServerConnection`` does.

The model (documented with its assumptions in docs/simulation.md):

- time advances in ticks of ``1 / rate``; in each tick every client sends one
  request, in a fixed per-client phase order (steady rate, like the demo);
- a request goes to the backend of the client's current connection and is
  counted there; the policy then decides whether that connection drains;
- a drained connection is replaced at once by a new one, placed by a
  round-robin balancer that skips backends which are down (a restarting
  backend refuses connections, the balancer moves on), as the demo's balancer
  does; reconnect latency (a millisecond on loopback) is ignored;
- a rolling restart stops each backend at its ``stop`` time: every connection
  on it moves to the balancer at once (the graceful shutdown GOAWAY), and the
  backend takes connections again from its ``up`` time.

Options beyond the demo: ``balance="leastconn"`` places each new connection
on the backend with the fewest (as HAProxy's ``balance leastconn``); a
``heavy`` client sends that fraction of all requests over its one connection;
the surge scenario (:func:`surge_plan`) replaces every backend at once and
attaches the new ones one after another. A fair-share policy runs one
:class:`goaway_ext.fairshare.FairShare` per backend, fed by a simulated fleet
view (:mod:`goaway_ext.demo.fairsim`) that the model refreshes every second.

Watch streams are not modelled: they keep an old connection open after its
GOAWAY but carry no new requests, so they do not change where requests go.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..policy import ConnectionBudget, GoawayPolicy
from .report import BALANCED_RATIO, PlotUnavailable, RunResult, format_columns, write_json, write_plot

if TYPE_CHECKING:
    from . import PolicySpec
    from .fairsim import FairShareOptions

__all__ = [
    "Agreement",
    "balanced_floor",
    "never_notes",
    "COUNT_TOLERANCE",
    "SHARE_TOLERANCE",
    "compare_with_run",
    "format_agreement",
    "plan_from_events",
    "RESTART_DOWNTIME",
    "RESTART_GAP",
    "RestartPlan",
    "SimulationParameters",
    "rolling_restart_plan",
    "simulate",
    "surge_plan",
    "run_simulation_command",
    "format_simulation_table",
]

#: Seconds a backend is away during the real demo's restart (SIGTERM, drain, exit, new process
#: listening), as measured on the demo machine; the model uses it for its rolling restart.
RESTART_DOWNTIME = 1.5
#: Seconds the real demo waits after one backend is back before stopping the next.
RESTART_GAP = 0.5


@dataclass(frozen=True)
class RestartPlan:
    """One backend's restart: it stops taking work at ``stop`` and is back at ``up`` (seconds)."""

    backend: int
    stop: float
    up: float


@dataclass(frozen=True)
class SimulationParameters:
    """The scenario the model replays; the same knobs as the real demo."""

    backends: int
    clients: int
    rate: float
    duration: float
    window: float
    bucket: float = 0.5
    seed: int = 1
    balance: str = "roundrobin"
    heavy: float = 0.0


def rolling_restart_plan(backends: int, *, start: float, downtime: float, gap: float) -> list[RestartPlan]:
    """Restart backends one after another: each is down ``downtime`` s, the next stops ``gap`` s after."""
    plan = []
    t = start
    for b in range(backends):
        plan.append(RestartPlan(b, t, t + downtime))
        t += downtime + gap
    return plan


def surge_plan(backends: int, *, start: float, attach_gap: float) -> list[RestartPlan]:
    """Replace every backend at once; the balancer attaches the new ones ``attach_gap`` s apart.

    The first one attached takes every client (the surge upgrade the issue was
    first reported with). Backend 0 is attached at ``start``; it is stopped a
    millisecond before, so its old connections leave with the others.
    """
    plan = [RestartPlan(0, start - 0.001, start)]
    plan.extend(RestartPlan(b, start, start + b * attach_gap) for b in range(1, backends))
    return plan


class FleetHook(Protocol):
    """What the model calls every ``refresh`` seconds: the connections per backend, and which are down."""

    refresh: float

    def tick(self, now: float, connections: Sequence[int], down: Sequence[bool], requests: Sequence[int]) -> None:
        """Refresh the simulated fleet view and run every backend's controller (``requests``: totals so far)."""
        ...


def simulate(
    params: SimulationParameters,
    policy: GoawayPolicy | Sequence[GoawayPolicy],
    label: str,
    plan: Sequence[RestartPlan],
    *,
    fleet: FleetHook | None = None,
    clock: list[float] | None = None,
) -> RunResult:
    """Run the model once and return the same :class:`RunResult` the real demo produces.

    ``policy`` is one policy for every backend, or one per backend (a
    fair-share policy has a controller per server). ``fleet.tick`` runs every
    ``fleet.refresh`` seconds of model time; ``clock[0]`` is kept at the model
    time of the request being decided, for controllers that read a clock.
    ``connections_opened`` counts every connection (the first ones included);
    ``goaways_sent`` counts only the drains the policy started, not those of
    the rolling restart, as the real demo does.
    """
    if params.balance not in ("roundrobin", "leastconn"):
        raise ValueError(f"balance must be 'roundrobin' or 'leastconn', got {params.balance!r}")
    if not 0.0 <= params.heavy < 1.0:
        raise ValueError(f"heavy must be a fraction in [0, 1), got {params.heavy!r}")
    policies = [policy] * params.backends if isinstance(policy, GoawayPolicy) else list(policy)
    if len(policies) != params.backends:
        raise ValueError(f"need one policy per backend ({params.backends}), got {len(policies)}")
    model_clock = clock if clock is not None else [0.0]
    rng = random.Random(params.seed)
    names = [f"b{i + 1}" for i in range(params.backends)]
    result = RunResult(
        policy=label, backends=names, bucket=params.bucket, duration=params.duration,
        window=params.window, lb="model",
    )
    result.goaways_sent = 0
    tick = 1.0 / params.rate
    clients = params.clients
    # Per-client phase inside a tick: clients do not all fire at the same instant.
    phases = sorted(rng.random() * tick for _ in range(clients))

    down = [False] * params.backends
    pointer = [rng.randrange(params.backends)]
    conns = [0] * params.backends
    answered = [0] * params.backends  # requests per backend so far, for a request-rate fleet view
    leastconn = params.balance == "leastconn"
    n_backends = params.backends

    def place() -> int:
        if leastconn:
            start = pointer[0]
            best = -1
            for k in range(n_backends):
                b = (start + k) % n_backends
                if not down[b] and (best < 0 or conns[b] < conns[best]):
                    best = b
            if best >= 0:
                pointer[0] = (best + 1) % n_backends
                conns[best] += 1
                return best
        else:
            for _ in range(n_backends):
                b = pointer[0]
                pointer[0] = (b + 1) % n_backends
                if not down[b]:
                    conns[b] += 1
                    return b
        raise RuntimeError("every backend is down at once; the restart plan leaves none up")

    backend_of = [0] * clients
    budget: list[ConnectionBudget] = []
    served = [0] * clients
    for c in range(clients):
        backend_of[c] = place()
        budget.append(policies[backend_of[c]].new_budget(phases[c]))
    result.connections_opened = clients
    # The heavy client (client 0) sends this many requests per tick instead of one.
    heavy_requests = round(params.heavy * (clients - 1) / (1.0 - params.heavy)) if params.heavy > 0 else 1
    next_refresh = 0.0
    heavy_moves: list[float] = []

    events: list[tuple[float, int, str]] = []
    for step in plan:
        events.append((step.stop, step.backend, "stop"))
        events.append((step.up, step.backend, "up"))
    events.sort()
    next_event = 0
    if plan:
        result.restart_done = max(step.up for step in plan)

    # The request path below runs once per simulated request (millions per policy), so it keeps
    # RunResult.record and the policy's decision inline: the same arithmetic and draws in the same order.
    counts = result.counts
    bucket = params.bucket
    duration = params.duration
    requests = 0
    step_index = 0
    while True:
        base = step_index * tick
        if base >= duration:
            break
        for c in range(clients):
            now = base + phases[c]
            if fleet is not None and now >= next_refresh:
                model_clock[0] = now
                fleet.tick(now, conns, down, answered)
                next_refresh = now + fleet.refresh
            while next_event < len(events) and events[next_event][0] <= now:
                # Events at the same instant apply together (a surge stops every backend at once):
                # first every backend changes state, then the connections of stopped ones move.
                at = events[next_event][0]
                stopped = set()
                while next_event < len(events) and events[next_event][0] == at:
                    _, b, what = events[next_event]
                    next_event += 1
                    result.events.append((at, names[b], what))
                    down[b] = what == "stop"
                    if down[b]:
                        stopped.add(b)
                if stopped:
                    model_clock[0] = at
                    for other in range(clients):
                        old = backend_of[other]
                        if old in stopped:
                            conns[old] -= 1
                            new = backend_of[other] = place()
                            budget[other] = policies[new].new_budget(at)
                            served[other] = 0
                            result.connections_opened += 1
            if now >= duration:
                continue
            index = int(now / bucket)  # RunResult.record's bucket (now >= 0)
            while len(counts) <= index:
                counts.append([0] * n_backends)
            row = counts[index]
            for _ in range(heavy_requests if c == 0 else 1):
                b = backend_of[c]
                row[b] += 1
                requests += 1
                answered[b] += 1
                served[c] += 1
                model_clock[0] = now
                decision = budget[c]  # the policy's decision, in the order the server checks it
                sampler = decision.sampler
                if (
                    (sampler is not None and sampler.sample() and (decision.admit is None or decision.admit()))
                    or (decision.max_requests is not None and served[c] >= decision.max_requests)
                    or (decision.age_deadline is not None and now >= decision.age_deadline)
                ):
                    result.goaways_sent += 1
                    result.record_goaway(now)
                    if c == 0 and params.heavy:
                        heavy_moves.append(now)
                    conns[b] -= 1
                    new = backend_of[c] = place()
                    budget[c] = policies[new].new_budget(now)
                    served[c] = 0
                    result.connections_opened += 1
        step_index += 1
    result.requests += requests
    result.goaways_received = result.goaways_sent
    if params.heavy:
        result.options["heavy_client_moves"] = len(heavy_moves)
        result.options["heavy_client_moves_final"] = sum(t >= params.duration - params.window for t in heavy_moves)
        result.options["heavy_client_backend"] = names[backend_of[0]]
    return result


#: Requests the equilibrium run of :func:`balanced_floor` may simulate (a few seconds of CPU);
#: it measures between 5 and 60 windows within that budget.
FLOOR_REQUESTS = 5_000_000


def balanced_floor(params: SimulationParameters, policy: GoawayPolicy) -> tuple[float, float]:
    """max/min over one window when nothing is out of balance: (median, 90th percentile).

    A few clients per backend never give equal shares, however well they are
    spread: connection counts differ by one or two and requests arrive in
    bursts. This runs the model with no restart (round robin from the start)
    and measures the ratio of successive windows, the noise floor under which
    "under 1.25" cannot be reached.
    """
    per_window = params.clients * params.rate * params.window
    windows = max(5, min(60, int(FLOOR_REQUESTS // max(per_window, 1.0))))
    run = simulate(replace(params, duration=params.window * (windows + 1)), policy, "floor", [])
    ratios = []
    for k in range(1, windows + 1):
        counts = run.window_counts(k * params.window, (k + 1) * params.window)
        ratios.append(max(counts) / min(counts) if min(counts) > 0 else math.inf)
    ratios.sort()
    return statistics.median(ratios), ratios[math.ceil(0.9 * len(ratios)) - 1]


def never_notes(results: Sequence[RunResult], params: SimulationParameters,
                policies: Sequence[GoawayPolicy]) -> list[str]:
    """One line per "never" that is only the noise floor (see :func:`balanced_floor`), for under the table."""
    notes = []
    for result, policy in zip(results, policies, strict=True):
        summary = result.summary()
        if summary.rebalanced_after is not None or math.isinf(summary.ratio) or summary.ratio < BALANCED_RATIO:
            continue
        median, high = balanced_floor(params, policy)
        if high >= BALANCED_RATIO and summary.ratio <= high:
            notes.append(
                f"'never' for {result.policy} is noise, not imbalance: even perfectly balanced, {params.clients} "
                f"clients on {params.backends} backends give a max/min of {median:.2f} over {params.window:g} s "
                f"(median; 90% under {high:.2f}, model), and {summary.ratio:.2f} is within that."
            )
    return notes


def format_simulation_table(results: list[RunResult], params: SimulationParameters, *,
                            scenario: str = "rolling", capacities: Sequence[float] | None = None) -> str:
    """One row per policy: final balance, time to rebalance, and what it costs in reconnects.

    "last at 80% after" is the time from the last backend's return until its
    share of requests (over 2 s) reached 80% of its fair share (capacity-
    weighted when ``capacities`` is given): the filling of the backend that
    came back empty, without the lag of the final window's sliding ratio.
    The last column is the rate that goes on for ever: GOAWAYs per client per
    hour over the final window only (a load-aware policy goes quiet there).
    """
    span = params.duration
    header = ["policy", "min share", "max share", "max/min", f"under {BALANCED_RATIO} after", "last at 80% after",
              "GOAWAYs/s (fleet)", "per backend/s", "per client/h", f"per client/h, last {params.window:g} s"]
    rows = []
    for r in results:
        s = r.summary()
        shares = list(s.shares.values())
        sent = r.goaways_sent or 0
        back = r.last_back_after(capacities=capacities)
        rows.append([
            r.policy,
            f"{100 * min(shares):.2f}%",
            f"{100 * max(shares):.2f}%",
            "inf" if math.isinf(s.ratio) else f"{s.ratio:.2f}",
            "never" if s.rebalanced_after is None else f"{s.rebalanced_after:.0f} s",
            "never" if back is None else f"{back:.1f} s",
            f"{sent / span:.2f}",
            f"{sent / span / params.backends:.3f}",
            f"{3600 * sent / span / params.clients:.1f}",
            f"{3600 * r.goaways_between(span - params.window, span) / params.window / params.clients:.2f}",
        ])
    what = "surge upgrade" if scenario == "surge" else "rolling restart"
    extra = "" if params.balance == "roundrobin" else f", {params.balance} balancer"
    if params.heavy:
        extra += f", one client sends {100 * params.heavy:g}% of the requests"
    title = (
        f"Model: {params.clients} clients x {params.rate:g} req/s, {params.backends} backends, {what}{extra}, "
        f"{params.duration:g} s in all; shares over the last {params.window:g} s."
    )
    return title + "\n" + format_columns(header, rows)


def run_simulation_command(args: argparse.Namespace, specs: Sequence[PolicySpec]) -> int:
    """``demo --simulate``: run the model once per policy and print its table (or ``--compare``)."""
    if args.compare is not None:
        return _run_compare(args.compare)
    from .fairsim import SimulatedFleet

    restart_start = args.warmup
    scenario = getattr(args, "scenario", "rolling")
    if scenario == "surge":
        plan = surge_plan(args.backends, start=restart_start, attach_gap=RESTART_DOWNTIME + RESTART_GAP)
    else:
        plan = rolling_restart_plan(args.backends, start=restart_start, downtime=RESTART_DOWNTIME, gap=RESTART_GAP)
    restart_end = max(step.up for step in plan)
    params = SimulationParameters(
        backends=args.backends, clients=args.clients, rate=args.rate,
        duration=restart_end + args.duration, window=args.window, seed=args.seed,
        balance=getattr(args, "balance", "roundrobin"), heavy=getattr(args, "heavy_client", 0.0),
    )
    slow = getattr(args, "slow_backends", 0)
    capacities = [0.5] * slow + [1.0] * (args.backends - slow)
    names = [f"b{i + 1}" for i in range(args.backends)]
    results = []
    started = time.monotonic()
    for spec in specs:
        print(f"simulating {spec.label} ...", file=sys.stderr)
        if spec.fair is not None:
            clock = [0.0]
            fleet = SimulatedFleet(names, clock, spec.fair, capacities=capacities, seed=args.seed)
            result = simulate(params, fleet.policies, spec.label, plan, fleet=fleet, clock=clock)
        else:
            result = simulate(params, spec.policy(args.seed), spec.label, plan)
        result.options = {**spec.options(), "scenario": scenario, **result.options}
        if slow:
            result.capacities = list(capacities)
        results.append(result)
    print(format_simulation_table(results, params, scenario=scenario, capacities=capacities if slow else None))
    if slow:
        print(f"(max/min and 'under {BALANCED_RATIO} after' compare requests per unit of capacity: the "
              f"half-capacity backends are balanced at half the requests of the others)")
        fair = 100 * 0.5 / sum(capacities)
        full = 100 * 1.0 / sum(capacities)
        for r in results:
            shares = r.summary().shares
            rest = statistics.fmean(shares[n] for n in names[slow:])
            print(f"{r.policy}: half-capacity backends {', '.join(names[:slow])} carry "
                  f"{', '.join(f'{100 * shares[n]:.2f}%' for n in names[:slow])} of the requests "
                  f"(capacity-fair: {fair:.2f}%), the others {100 * rest:.2f}% on average (capacity-fair: {full:.2f}%)")
    if params.heavy:
        print(f"(the heavy client's backend answers its {100 * params.heavy:g}% on top of a share of the other "
              f"clients: no placement of one connection evens requests, so max/min of requests stays high; "
              f"what matters is that connections stay even and the client stays put)")
        for r in results:
            shares = r.summary().shares
            home = str(r.options.get("heavy_client_backend"))
            rest = statistics.fmean(v for n, v in shares.items() if n != home)
            moves, final = r.options.get("heavy_client_moves", 0), r.options.get("heavy_client_moves_final", 0)
            verdict = "it stays put" if not final else "it keeps moving"
            print(f"{r.policy}: the heavy client ({100 * params.heavy:g}% of all requests) ends on {home}, which "
                  f"carries {100 * shares[home]:.2f}% of the requests (the others {100 * rest:.2f}% on average); "
                  f"it moved {moves} times, {final} of them in the last {params.window:g} s: {verdict}")
    # A fair-share policy's noise floor is that of no GOAWAY at all: it is silent once balanced.
    floors = [spec.policy(args.seed) if spec.fair is None else GoawayPolicy(seed=args.seed) for spec in specs]
    for note in never_notes(results, params, floors):
        print(note)
    print(f"(model time {params.duration:g} s per policy, computed in {time.monotonic() - started:.1f} s)")
    if args.json is not None:
        write_json(args.json, {k: str(v) for k, v in vars(args).items()}, results)
    if args.plot is not None:
        try:
            write_plot(args.plot, results, smooth=max(params.bucket, args.window / 4))
        except PlotUnavailable as exc:
            print(f"python -m goaway_ext demo: error: {exc}", file=sys.stderr)
            return 1
    return 0


@dataclass(frozen=True)
class Agreement:
    """The model replayed on a real run's exact schedule, side by side with what the run measured.

    ``model_*`` values are means over ``seeds`` model runs. ``within`` says
    whether every quantity agrees within the stated tolerances:
    :data:`COUNT_TOLERANCE` (relative; or three times the model's own
    seed-to-seed spread, whichever is larger) on policy GOAWAYs and
    connections opened; on each backend's final share, :data:`SHARE_TOLERANCE` or three
    times the model's own seed-to-seed spread, whichever is larger (with a
    few dozen clients the share of one run is that noisy, and the model says so).
    """

    policy: str
    real_goaways: int | None
    model_goaways: float
    real_connections: int
    model_connections: float
    real_shares: dict[str, float]
    model_shares: dict[str, float]
    share_tolerance: dict[str, float]
    real_rebalanced_after: float | None
    model_rebalanced_after: list[float | None]
    within: bool


#: Relative tolerance on counts (GOAWAYs, connections) between the model and a real run.
COUNT_TOLERANCE = 0.15
#: Absolute tolerance on each backend's share of the final window.
SHARE_TOLERANCE = 0.10


def plan_from_events(events: Sequence[tuple[float, str, str]], names: Sequence[str]) -> list[RestartPlan]:
    """Turn a real run's ``(time, backend, "stop"|"up")`` events into the model's restart plan."""
    stops: dict[str, float] = {}
    plan = []
    for t, name, what in events:
        if what == "stop":
            stops[name] = t
        elif name in stops:
            plan.append(RestartPlan(list(names).index(name), stops.pop(name), t))
    return plan


def compare_with_run(
    real: RunResult, policy_for_seed: Callable[[int], GoawayPolicy] | None, *, clients: int, rate: float,
    seeds: int = 20, fair: FairShareOptions | None = None, balance: str = "roundrobin", refresh: float = 0.5,
) -> Agreement:
    """Replay ``real``'s schedule in the model ``seeds`` times and compare the numbers of the table.

    The model gets the request rate the real clients achieved (``rate`` is
    what they aimed at; a busy machine delivers a little less, mostly while
    reconnecting), so both see the same number of policy draws. A
    fair-share run is replayed with ``fair`` (one controller per backend,
    the view refreshed every ``refresh`` seconds, as the demo's backends
    poll) and ``policy_for_seed`` may be None; ``balance`` is the run's.
    """
    plan = plan_from_events(real.events, real.backends)
    served = sum(real.window_counts(0.0, real.duration))
    if served and real.duration > 0:
        rate = min(rate, served / (clients * real.duration))
    params = [
        SimulationParameters(backends=len(real.backends), clients=clients, rate=rate, duration=real.duration,
                             window=real.window, bucket=real.bucket, seed=seed, balance=balance)
        for seed in range(1, seeds + 1)
    ]
    runs = []
    for p in params:
        if fair is not None:
            from .fairsim import SimulatedFleet

            clock = [0.0]
            fleet = SimulatedFleet(real.backends, clock, fair, refresh=refresh, seed=p.seed)
            runs.append(simulate(p, fleet.policies, real.policy, plan, fleet=fleet, clock=clock))
        elif policy_for_seed is not None:
            runs.append(simulate(p, policy_for_seed(p.seed), real.policy, plan))
        else:
            raise ValueError("compare_with_run needs policy_for_seed, or fair= for a fair-share run")
    summaries = [r.summary() for r in runs]
    real_summary = real.summary()
    model_shares = {name: statistics.fmean(s.shares[name] for s in summaries) for name in real.backends}
    share_tolerance = {
        name: max(SHARE_TOLERANCE, 3.0 * statistics.pstdev(s.shares[name] for s in summaries))
        for name in real.backends
    }
    model_goaways = sum(r.goaways_sent or 0 for r in runs) / seeds
    model_connections = sum(r.connections_opened for r in runs) / seeds

    def close(real_value: float, model_value: float, spread: float) -> bool:
        # 15% of the model's mean, 3 for tiny counts, or three of the model's own standard
        # deviations (a few dozen drains differ that much from seed to seed), whichever is largest.
        return abs(real_value - model_value) <= max(COUNT_TOLERANCE * max(model_value, 1.0), 3.0, 3.0 * spread)

    goaway_spread = statistics.pstdev(r.goaways_sent or 0 for r in runs)
    connection_spread = statistics.pstdev(r.connections_opened for r in runs)
    within = (
        (real.goaways_sent is None or close(real.goaways_sent, model_goaways, goaway_spread))
        and close(real.connections_opened, model_connections, connection_spread)
        and all(abs(real_summary.shares[n] - model_shares[n]) <= share_tolerance[n] for n in real.backends)
    )
    return Agreement(
        policy=real.policy,
        real_goaways=real.goaways_sent,
        model_goaways=model_goaways,
        real_connections=real.connections_opened,
        model_connections=model_connections,
        real_shares=real_summary.shares,
        model_shares=model_shares,
        share_tolerance=share_tolerance,
        real_rebalanced_after=real_summary.rebalanced_after,
        model_rebalanced_after=[s.rebalanced_after for s in summaries],
        within=within,
    )


def format_agreement(rows: Sequence[Agreement]) -> str:
    """The real-versus-model table printed by ``demo --simulate --compare FILE``."""
    header = ["policy", "GOAWAYs real/model", "connections real/model", "final shares real", "final shares model",
              "under 1.25 after real / model median", "agree"]
    body = []
    for a in rows:
        settled = sorted(x for x in a.model_rebalanced_after if x is not None)
        never = len(a.model_rebalanced_after) - len(settled)
        median = (
            "never" if len(settled) * 2 < len(a.model_rebalanced_after) else f"{settled[len(settled) // 2]:.1f} s"
        )
        real_settle = "never" if a.real_rebalanced_after is None else f"{a.real_rebalanced_after:.1f} s"
        body.append([
            a.policy,
            f"{'?' if a.real_goaways is None else a.real_goaways}/{a.model_goaways:.0f}",
            f"{a.real_connections}/{a.model_connections:.0f}",
            " ".join(f"{100 * v:.0f}%" for v in a.real_shares.values()),
            " ".join(f"{100 * v:.0f}±{100 * a.share_tolerance[n]:.0f}%" for n, v in a.model_shares.items()),
            f"{real_settle} / {median} ({never} of {len(a.model_rebalanced_after)} never)",
            "yes" if a.within else "NO",
        ])
    return (
        f"Model replayed on the real run's restart schedule (mean of the model runs; tolerances, each time "
        f"whichever is larger: on counts {100 * COUNT_TOLERANCE:.0f}% or 3 standard deviations of the model's runs; "
        f"on shares {100 * SHARE_TOLERANCE:.0f} points or 3 standard deviations)\n"
        + format_columns(header, body)
    )


def _run_compare(path: Path) -> int:
    """``--simulate --compare FILE``: the model on each recorded run's own schedule, side by side."""
    from . import PolicySpec

    try:
        document = json.loads(path.read_text())
        parameters = document["parameters"]
        clients, rate = int(parameters["clients"]), float(parameters["rate"])
        runs = [RunResult.from_json(entry) for entry in document["policies"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"python -m goaway_ext demo: error: --compare: {path} is not a `demo --json` file ({exc!r})",
              file=sys.stderr)
        return 2
    balance = str(parameters.get("balance") or "roundrobin")
    rows = []
    for run in runs:
        spec = PolicySpec.from_options(run.policy, run.options)
        rows.append(compare_with_run(run, spec.policy if spec.fair is None else None, clients=clients, rate=rate,
                                     fair=spec.fair, balance=balance))
    print(format_agreement(rows))
    return 0 if all(row.within for row in rows) else 1
