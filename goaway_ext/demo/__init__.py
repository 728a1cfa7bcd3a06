"""``python -m goaway_ext demo``: the rebalance demonstration, and its model (``--simulate``).

The demo shows the problem goaway_ext exists for and its fix, end to end on
127.0.0.1: backends running the asyncio server, an L4 balancer in front (our
round-robin proxy, or HAProxy with ``--lb haproxy``), HTTP/2 clients that keep
one connection and one watch each, a rolling restart, and then the load
share per backend, once per GOAWAY policy. The modules:

- :mod:`.scenario`: one policy's run (processes, balancer, clients, restart);
- :mod:`.proxy` / :mod:`.haproxy`: the two balancers;
- :mod:`.processes`: child processes, always cleaned up;
- :mod:`.report`: time series, summary, table, progress line, JSON and plot;
- :mod:`.simulate`: the same scenario as a model, for fleets of any size.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..policy import MAX_SAFE_CHANCE, GoawayPolicy
from .fairsim import FairShareOptions
from .report import PlotUnavailable, ProgressLine, RunResult, format_table, write_json, write_plot

__all__ = ["configure_parser", "run_command", "PolicySpec", "policies_from_args"]

# Limits that keep a real run meaningful on one machine; the model has wider ones.
_REAL_LIMITS = {"backends": (2, 16), "clients": (1, 500), "rate": (0.1, 200.0)}
_SIM_LIMITS = {"backends": (2, 1000), "clients": (1, 200_000), "rate": (0.01, 1000.0)}


class PolicySpec:
    """One GOAWAY policy the demo compares: a label, its ``serve`` options, and the policy object.

    The same spec drives the real backends (as command-line options) and the
    model (as a :class:`~goaway_ext.GoawayPolicy`), so both run the same rule.
    """

    def __init__(
        self,
        label: str,
        *,
        chance: float = 0.0,
        max_requests: int | None = None,
        max_age: float | None = None,
        fair: FairShareOptions | None = None,
    ) -> None:
        self.label = label
        self.chance = chance
        self.max_requests = max_requests
        self.max_age = max_age
        #: Fair-share settings; such a policy needs a fleet view (the model builds one per run).
        self.fair = fair

    def options(self) -> dict[str, Any]:
        """The policy's settings, as stored in the ``--json`` file (to replay it in the model)."""
        options: dict[str, Any] = {"chance": self.chance, "max_requests": self.max_requests,
                                   "max_age": self.max_age}
        if self.fair is not None:
            options["fair_share"] = self.fair.as_dict()
        return options

    @classmethod
    def from_options(cls, label: str, options: dict[str, Any]) -> PolicySpec:
        """The inverse of :meth:`options`."""
        fair = options.get("fair_share")
        return cls(label, chance=float(options.get("chance") or 0.0), max_requests=options.get("max_requests"),
                   max_age=options.get("max_age"), fair=None if fair is None else FairShareOptions(**fair))

    def serve_args(self) -> list[str]:
        """The ``python -m goaway_ext serve`` options for this policy."""
        # serve's own default chance is 0.001: say 0 explicitly for the baseline.
        args: list[str] = ["--chance", "0"]
        if self.chance > 0:
            args = ["--chance", repr(self.chance)]
            if self.chance > MAX_SAFE_CHANCE:
                args.append("--allow-high-chance")
        if self.max_requests is not None:
            args += ["--max-requests", str(self.max_requests)]
        if self.max_age is not None:
            args += ["--max-age", repr(self.max_age)]
        if self.fair is not None:
            # The fleet view (HAProxy's socket or the peers) is added per backend by the scenario.
            args += ["--fair-ceiling", repr(self.fair.ceiling), "--fair-tolerance", repr(self.fair.tolerance),
                     "--fair-max-drain-rate", repr(self.fair.max_drain_rate), "--fair-interval", "0.5",
                     "--fair-max-staleness", "3"]
            if self.fair.ceiling > MAX_SAFE_CHANCE:
                args.append("--allow-high-chance")
        return args

    def policy(self, seed: int | None) -> GoawayPolicy:
        """The policy object the server builds from :meth:`serve_args` (used by the model)."""
        if self.fair is not None:
            raise ValueError(f"{self.label}: a fair-share policy has one controller per backend; "
                             "build it with goaway_ext.demo.fairsim.SimulatedFleet")
        return GoawayPolicy(
            self.chance, max_requests=self.max_requests, max_age=self.max_age,
            seed=seed, allow_high_chance=True,
        )

    def __repr__(self) -> str:
        return f"PolicySpec({self.label!r})"


def _number(
    name: str, kind: Callable[[str], Any], low: float, high: float, *, low_open: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type=`` that names the option and its valid range in every error."""

    def parse(text: str) -> Any:
        what = "an integer" if kind is int else "a number"
        bound = f"greater than {low:g}" if low_open else f"from {low:g}"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what} {bound} to {high:g}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or value < low or value > high or (
            low_open and value == low
        ):
            raise argparse.ArgumentTypeError(f"{name} must be {what} {bound} to {high:g}, got {text!r}")
        return value

    return parse


def _chances(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--chance must be a probability in (0, 1] or a comma-separated list of them, got {text!r}"
            ) from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(
                f"--chance values must be in (0, 1] (the 'none' policy is always run), got {part!r}"
            )
        values.append(value)
    return values


def _ceilings(text: str) -> list[float]:
    check = _number("--fair-ceiling", float, 0.0, 1.0, low_open=True)
    return [check(part) for part in text.split(",")]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the demo's options on the ``demo`` sub-command."""
    parser.description = (
        "Rolling restart of HTTP/2 backends behind an L4 load balancer, once per GOAWAY policy: "
        "without GOAWAY the backend restarted last gets no traffic; with goaway_ext the load "
        "spreads again, with no failed request and no interrupted watch."
    )
    parser.add_argument("--backends", type=_number("--backends", int, 2, 1000), default=None,
                        help="backend processes (default 3; with --simulate 20)")
    parser.add_argument("--clients", type=_number("--clients", int, 1, 200_000), default=None,
                        help="HTTP/2 clients, one connection and one watch each (default 30; with --simulate 10000)")
    parser.add_argument("--rate", type=_number("--rate", float, 0.0, 1000.0, low_open=True), default=None,
                        help="requests per second per client (default 20; with --simulate 1)")
    parser.add_argument("--duration", type=_number("--duration", float, 1.0, 86400.0), default=None,
                        help="seconds of load after the rolling restart, per policy (default 20; with --simulate 400)")
    parser.add_argument("--warmup", type=_number("--warmup", float, 0.5, 3600.0), default=None,
                        help="seconds of load before the rolling restart (default 3; with --simulate 30)")
    parser.add_argument("--window", type=_number("--window", float, 0.5, 3600.0), default=None,
                        help="final window in seconds over which shares are reported (default 10; with --simulate 60)")
    parser.add_argument("--seed", type=_number("--seed", int, 0, 2**63 - 1), default=1,
                        help="seed for client timing and the policies' draws (default 1)")
    parser.add_argument("--lb", choices=("auto", "builtin", "haproxy"), default="auto",
                        help="load balancer: HAProxy (mode tcp, roundrobin), the built-in round-robin TCP proxy, "
                             "or auto (default): HAProxy when installed, else the built-in proxy")
    parser.add_argument("--chance", type=_chances, default=[0.01],
                        help="per-request GOAWAY probability for the 'chance' policy; a comma-separated list "
                             "runs one policy per value (default 0.01)")
    parser.add_argument("--max-requests", type=_number("--max-requests", int, 1, 10**9), default=None,
                        help="also run a policy that drains each connection after about N requests")
    parser.add_argument("--max-age", type=_number("--max-age", float, 0.0, 86400.0, low_open=True), default=None,
                        help="also run a policy that drains each connection after about S seconds")
    parser.add_argument("--policy", choices=("fair-share",), action="append", default=[],
                        help="also run the load-aware fair-share policy: each backend sheds only while it holds "
                             "more than the least-loaded backend (plus --fair-tolerance)")
    parser.add_argument("--fair-ceiling", type=_ceilings, default=[0.02],
                        help="fair-share: largest per-request chance (default 0.02); a comma-separated list "
                             "runs one fair-share policy per value")
    parser.add_argument("--fair-tolerance", type=_number("--fair-tolerance", float, 0.0, 10.0), default=0.10,
                        help="fair-share: relative excess over the least-loaded backend that is left alone "
                             "(default 0.10)")
    parser.add_argument("--fair-max-drain-rate", type=_number("--fair-max-drain-rate", float, 0.0, 1.0,
                                                              low_open=True), default=0.05,
                        help="fair-share: largest fraction of a backend's connections drained per second "
                             "(default 0.05)")
    parser.add_argument("--fair-signal", choices=("connections", "requests"), default="connections",
                        help="with --simulate: the load signal of the simulated fleet view (default connections)")
    parser.add_argument("--scenario", choices=("rolling", "surge"), default="rolling",
                        help="rolling restart (one backend after another), or surge upgrade (every backend "
                             "replaced at once, the new ones attached one after another; a real run needs HAProxy)")
    parser.add_argument("--balance", choices=("roundrobin", "leastconn"), default="roundrobin",
                        help="with --simulate: how the model's balancer places new connections (default roundrobin)")
    parser.add_argument("--heavy-client", type=_number("--heavy-client", float, 0.0, 0.9), default=0.0,
                        metavar="FRACTION", help="with --simulate: one client sends this fraction of all requests")
    parser.add_argument("--slow-backends", type=_number("--slow-backends", int, 0, 1000), default=0, metavar="N",
                        help="with --simulate: the first N backends have half capacity (fair-share is told so)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the 'none' policy (no GOAWAY)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="write the raw time series and the summary as JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="draw share per backend over time (needs the 'plot' extra: matplotlib)")
    parser.add_argument("--simulate", action="store_true",
                        help="no sockets: run the model with many clients and backends, same policy code")
    parser.add_argument("--compare", type=Path, default=None, metavar="FILE.json",
                        help="with --simulate: replay a real run's --json file in the model and compare the numbers")


def policies_from_args(args: argparse.Namespace) -> list[PolicySpec]:
    """The policies to compare, in table order: none, each chance, max-requests, max-age."""
    specs = [] if args.no_baseline else [PolicySpec("none")]
    for chance in args.chance:
        specs.append(PolicySpec(f"chance={chance:g}", chance=chance))
    if args.max_requests is not None:
        specs.append(PolicySpec(f"max-requests={args.max_requests}", max_requests=args.max_requests))
    if args.max_age is not None:
        specs.append(PolicySpec(f"max-age={args.max_age:g}s", max_age=args.max_age))
    if "fair-share" in args.policy:
        for ceiling in args.fair_ceiling:
            fair = FairShareOptions(ceiling=ceiling, tolerance=args.fair_tolerance,
                                    max_drain_rate=args.fair_max_drain_rate, signal=args.fair_signal)
            signal = "" if fair.signal == "connections" else f" signal={fair.signal}"
            specs.append(PolicySpec(f"fair-share ceiling={fair.ceiling:g}{signal}", fair=fair))
    return specs


def _resolve_defaults(args: argparse.Namespace) -> str | None:
    """Fill mode-dependent defaults and check cross-option limits; return an error or None."""
    sim = args.simulate
    defaults = {
        "backends": 20 if sim else 3,
        "clients": 10000 if sim else 30,
        "rate": 1.0 if sim else 20.0,
        "duration": 400.0 if sim else 20.0,
        "warmup": 30.0 if sim else 3.0,
        "window": 60.0 if sim else 10.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    limits = _SIM_LIMITS if sim else _REAL_LIMITS
    for name, (low, high) in limits.items():
        value = getattr(args, name)
        if not low <= value <= high:
            where = "with --simulate" if sim else "for a real run (use --simulate for larger fleets)"
            return f"--{name} must be from {low:g} to {high:g} {where}, got {value:g}"
    if args.window > args.duration:
        return f"--window ({args.window:g} s) must not be longer than --duration ({args.duration:g} s)"
    if not sim and args.clients * args.rate > 3000:
        return (f"--clients x --rate is {args.clients * args.rate:g} requests/s; a real run on one machine "
                "is limited to 3000 (use --simulate for larger fleets)")
    if args.json is not None and not args.json.parent.is_dir():
        return f"--json: directory {str(args.json.parent)!r} does not exist"
    if args.plot is not None:
        if not args.plot.parent.is_dir():
            return f"--plot: directory {str(args.plot.parent)!r} does not exist"
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return ("--plot needs matplotlib, which is not installed: install the 'plot' extra "
                    "(pip install '.[plot]' in a checkout)")
    if args.compare is not None and not (sim and args.compare.is_file()):
        return ("--compare needs --simulate and an existing JSON file written by `demo --json`, "
                f"got {str(args.compare)!r}")
    if sim and args.lb not in ("auto", "builtin"):
        return "--lb has no meaning with --simulate (the model has its own round-robin balancer)"
    if not sim:
        if args.balance != "roundrobin" and args.lb == "builtin":
            return "--balance leastconn needs HAProxy (--lb haproxy); the built-in proxy is round robin"
        if args.scenario == "surge" and args.lb == "builtin":
            return ("--scenario surge needs HAProxy (--lb haproxy): the demo re-points its servers at the new "
                    "replicas through the runtime API")
        for option, value, default in (("--heavy-client", args.heavy_client, 0.0),
                                       ("--slow-backends", args.slow_backends, 0),
                                       ("--fair-signal", args.fair_signal, "connections")):
            if value != default:
                return f"{option} is a model option for now: add --simulate (a real run does the rolling restart)"
    if args.slow_backends > args.backends:
        return f"--slow-backends ({args.slow_backends}) must not exceed --backends ({args.backends})"
    return None


def run_command(args: argparse.Namespace) -> int:
    """Run the demo (or the model); 0 when every policy kept failures and interruptions at zero."""
    error = _resolve_defaults(args)
    if error is not None:
        print(f"python -m goaway_ext demo: error: {error}", file=sys.stderr)
        return 2
    specs = policies_from_args(args)
    if not specs:
        print("python -m goaway_ext demo: error: --no-baseline leaves no policy to run", file=sys.stderr)
        return 2
    if args.simulate:
        from .simulate import run_simulation_command

        return run_simulation_command(args, specs)
    return _run_real(args, specs)


def _resolve_lb(lb: str, haproxy_installed: bool) -> tuple[str, str | None]:
    """``--lb auto``: HAProxy, the balancer users run, unless it is absent; then the built-in proxy and a note."""
    if lb != "auto":
        return lb, None
    if haproxy_installed:
        return "haproxy", None
    return "builtin", ("note: HAProxy is not installed (apt-get install haproxy, or run make demo as root); "
                       "using the built-in round-robin proxy instead")


def _run_real(args: argparse.Namespace, specs: list[PolicySpec]) -> int:
    from .haproxy import HAProxyNotInstalled, find_haproxy
    from .processes import BackendStartError, ProcessGroupRegistry
    from .scenario import DemoConfig, run_scenario

    args.lb, note = _resolve_lb(args.lb, find_haproxy() is not None)
    if note:
        print(note, file=sys.stderr)
    if args.lb == "haproxy" and find_haproxy() is None:
        print("python -m goaway_ext demo: error: --lb haproxy needs HAProxy, which is not installed "
              "(looked for /usr/sbin/haproxy and haproxy on PATH); install it with `apt-get install haproxy`, "
              "or use the built-in balancer (--lb builtin)", file=sys.stderr)
        return 2
    if args.scenario == "surge" and args.lb != "haproxy":
        print("python -m goaway_ext demo: error: --scenario surge needs HAProxy, which is not installed "
              "(apt-get install haproxy)", file=sys.stderr)
        return 2
    config = DemoConfig(
        backends=args.backends, clients=args.clients, rate=args.rate, duration=args.duration,
        warmup=args.warmup, window=args.window, seed=args.seed, lb=args.lb, balance=args.balance,
        scenario=args.scenario,
    )
    registry = ProcessGroupRegistry()
    progress = ProgressLine()
    results: list[RunResult] = []
    started = time.monotonic()
    what = "surge upgrade" if config.scenario == "surge" else "rolling restart"
    progress.message(
        f"goaway_ext demo: {config.backends} backends behind the {config.lb} balancer, {config.clients} clients "
        f"x {config.rate:g} req/s + 1 watch each; {what} after {config.warmup:g} s, then "
        f"{config.duration:g} s of load; policies: {', '.join(s.label for s in specs)}"
    )

    terminated = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            terminated.append(signal.SIGTERM)
            task.cancel()

        # SIGTERM ends the demo like Ctrl-C: cancel, let the finally blocks stop every child.
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            with tempfile.TemporaryDirectory(prefix="goaway-demo-") as work:
                for spec in specs:
                    result = await run_scenario(config, spec, registry, progress, Path(work))
                    results.append(result)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    status = 0
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress.finish()
        print("interrupted: every backend and balancer process was stopped", file=sys.stderr)
        # 128 + the signal number, as a shell reports a process killed by it: 143 for SIGTERM, 130 for Ctrl-C.
        status = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except (BackendStartError, HAProxyNotInstalled, OSError) as exc:
        progress.finish()
        print(f"python -m goaway_ext demo: error: {exc}", file=sys.stderr)
        status = 1
    finally:
        registry.kill_all()
    if status:
        return status
    print(format_table([r.summary() for r in results], config.window, scenario=config.scenario))
    for r in results:
        back = r.last_back_after()
        last = r.goaways_between(r.duration - config.window, r.duration)
        print(f"{r.policy}: the backend {'attached' if config.scenario == 'surge' else 'restarted'} last "
              f"reached 80% of its fair share "
              f"{'never' if back is None else f'{back:.1f} s'} after coming back (2 s window); "
              f"GOAWAYs received in the last {config.window:g} s: {last}")
    from .simulate import SimulationParameters, never_notes

    model = SimulationParameters(backends=config.backends, clients=config.clients, rate=config.rate,
                                 duration=config.duration, window=config.window, bucket=config.bucket, seed=args.seed)
    # A fair-share policy is silent once balanced: its noise floor is that of no GOAWAY at all.
    floors = [spec.policy(args.seed) if spec.fair is None else GoawayPolicy(seed=args.seed) for spec in specs]
    for note in never_notes(results, model, floors):
        print(note)
    print(f"(total {time.monotonic() - started:.0f} s)")
    return _write_outputs(args, results, registry.pids) or _verdict(results)


def _write_outputs(args: argparse.Namespace, results: list[RunResult], pids: list[int]) -> int:
    parameters = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    if args.json is not None:
        write_json(args.json, parameters, results, {"child_pids": pids})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        try:
            write_plot(args.plot, results)
        except PlotUnavailable as exc:
            print(f"python -m goaway_ext demo: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _verdict(results: list[RunResult]) -> int:
    """1 if any request failed or any watch was cut: the library's promise was broken."""
    broken = [r for r in results if r.failed_requests or r.watches_interrupted]
    for r in broken:
        print(f"FAILED: policy {r.policy}: {r.failed_requests} failed requests, "
              f"{r.watches_interrupted} interrupted watches; first errors: {r.errors[:3]}", file=sys.stderr)
    return 1 if broken else 0

