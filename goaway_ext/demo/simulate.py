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

Watch streams are not modelled: they keep an old connection open after its
GOAWAY but carry no new requests, so they do not change where requests go.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..policy import ConnectionBudget, GoawayPolicy
from .report import BALANCED_RATIO, PlotUnavailable, RunResult, format_columns, write_json, write_plot

if TYPE_CHECKING:
    from . import PolicySpec

__all__ = [
    "RESTART_DOWNTIME",
    "RESTART_GAP",
    "RestartPlan",
    "SimulationParameters",
    "rolling_restart_plan",
    "simulate",
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


def rolling_restart_plan(backends: int, *, start: float, downtime: float, gap: float) -> list[RestartPlan]:
    """Restart backends one after another: each is down ``downtime`` s, the next stops ``gap`` s after."""
    plan = []
    t = start
    for b in range(backends):
        plan.append(RestartPlan(b, t, t + downtime))
        t += downtime + gap
    return plan


def simulate(params: SimulationParameters, policy: GoawayPolicy, label: str, plan: Sequence[RestartPlan]) -> RunResult:
    """Run the model once and return the same :class:`RunResult` the real demo produces.

    ``connections_opened`` counts every connection (the first ones included);
    ``goaways_sent`` counts only the drains the policy started, not those of
    the rolling restart, as the real demo does.
    """
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

    def place() -> int:
        for _ in range(params.backends):
            b = pointer[0]
            pointer[0] = (b + 1) % params.backends
            if not down[b]:
                return b
        raise RuntimeError("every backend is down at once; the restart plan leaves none up")

    backend_of = [0] * clients
    budget: list[ConnectionBudget] = []
    served = [0] * clients
    for c in range(clients):
        backend_of[c] = place()
        budget.append(policy.new_budget(phases[c]))
    result.connections_opened = clients

    events: list[tuple[float, int, str]] = []
    for step in plan:
        events.append((step.stop, step.backend, "stop"))
        events.append((step.up, step.backend, "up"))
    events.sort()
    next_event = 0
    if plan:
        result.restart_done = max(step.up for step in plan)

    step_index = 0
    while True:
        base = step_index * tick
        if base >= params.duration:
            break
        for c in range(clients):
            now = base + phases[c]
            while next_event < len(events) and events[next_event][0] <= now:
                at, b, what = events[next_event]
                next_event += 1
                result.events.append((at, names[b], what))
                if what == "stop":
                    down[b] = True
                    for other in range(clients):
                        if backend_of[other] == b:
                            backend_of[other] = place()
                            budget[other] = policy.new_budget(at)
                            served[other] = 0
                            result.connections_opened += 1
                else:
                    down[b] = False
            if now >= params.duration:
                continue
            b = backend_of[c]
            result.record(now, b)
            served[c] += 1
            if _drains(budget[c], served[c], now):
                result.goaways_sent += 1
                backend_of[c] = place()
                budget[c] = policy.new_budget(now)
                served[c] = 0
                result.connections_opened += 1
        step_index += 1
    result.goaways_received = result.goaways_sent
    return result


def _drains(budget: ConnectionBudget, served: int, now: float) -> bool:
    """The policy's per-request decision, in the order the server checks it."""
    if budget.sampler is not None and budget.sampler.sample():
        return True
    if budget.max_requests is not None and served >= budget.max_requests:
        return True
    return budget.age_deadline is not None and now >= budget.age_deadline


def format_simulation_table(results: list[RunResult], params: SimulationParameters) -> str:
    """One row per policy: final balance, time to rebalance, and what it costs in reconnects."""
    span = params.duration
    header = ["policy", "min share", "max share", "max/min", f"under {BALANCED_RATIO} after",
              "GOAWAYs/s (fleet)", "per backend/s", "per client/h"]
    rows = []
    for r in results:
        s = r.summary()
        shares = list(s.shares.values())
        sent = r.goaways_sent or 0
        rows.append([
            r.policy,
            f"{100 * min(shares):.2f}%",
            f"{100 * max(shares):.2f}%",
            "inf" if math.isinf(s.ratio) else f"{s.ratio:.2f}",
            "never" if s.rebalanced_after is None else f"{s.rebalanced_after:.0f} s",
            f"{sent / span:.2f}",
            f"{sent / span / params.backends:.3f}",
            f"{3600 * sent / span / params.clients:.1f}",
        ])
    title = (
        f"Model: {params.clients} clients x {params.rate:g} req/s, {params.backends} backends, rolling restart, "
        f"{params.duration:g} s in all; shares over the last {params.window:g} s."
    )
    return title + "\n" + format_columns(header, rows)


def run_simulation_command(args: argparse.Namespace, specs: Sequence[PolicySpec]) -> int:
    """``demo --simulate``: run the model once per policy and print its table."""
    restart_start = args.warmup
    plan = rolling_restart_plan(args.backends, start=restart_start, downtime=RESTART_DOWNTIME, gap=RESTART_GAP)
    restart_end = plan[-1].up
    params = SimulationParameters(
        backends=args.backends, clients=args.clients, rate=args.rate,
        duration=restart_end + args.duration, window=args.window, seed=args.seed,
    )
    results = []
    started = time.monotonic()
    for spec in specs:
        print(f"simulating {spec.label} ...", file=sys.stderr)
        results.append(simulate(params, spec.policy(args.seed), spec.label, plan))
    print(format_simulation_table(results, params))
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
