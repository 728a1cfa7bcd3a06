"""One policy's run of the demo: backends, balancer, clients, rolling restart, measurements.

Timeline (seconds from the start of the load):

1. ``0 .. warmup``: every client has connected through the balancer and sends
   requests at a steady rate, each also keeping one watch open;
2. rolling restart: each backend in turn gets SIGTERM (its server drains every
   connection gracefully: requests in flight finish, watches end with
   END_STREAM, clients reconnect through the balancer), exits, and is started
   again on the same port; the next one follows once it is listening;
3. ``duration`` more seconds of the same load; the final ``window`` is what the
   table reports.

The surge scenario (``scenario="surge"``, HAProxy only) replaces step 2: a new
replica of every backend starts beside the old one (a 100% surge, on ports of
its own); at the end of the warm-up every server leaves the rotation, server
``b1`` is pointed at its new replica (``set server ... addr``) and attached,
every old process gets SIGTERM at once, and the other new replicas are
attached one after another, ``RESTART_DOWNTIME + RESTART_GAP`` seconds apart
(the model's surge plan): the first one attached takes every client.

Every response names its backend (``x-backend``), which is how requests are
attributed. A request that raises, or answers anything but 200, is a failure; a
watch that ends any other way than a clean END_STREAM is an interruption. Both
must stay at zero: that is the library's promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..asyncio_client import H2Client, H2ClientError
from .haproxy import HAProxyBalancer
from .ports import PortReservation
from .processes import Backend, BackendStartError, ProcessGroupRegistry
from .proxy import RoundRobinProxy
from .report import ProgressLine, RunResult
from .serve_log import LogCursor, count_policy_drains
from .simulate import RESTART_DOWNTIME, RESTART_GAP

if TYPE_CHECKING:
    from . import PolicySpec

__all__ = ["DemoConfig", "run_scenario", "WATCH_SECONDS", "REQUEST_TIMEOUT"]

#: Length of each watch; like a Kubernetes watch timeout, it ends cleanly and is opened again.
WATCH_SECONDS = 4
#: Bound on any single request or watch chunk: nothing in the demo can hang for ever.
REQUEST_TIMEOUT = 10.0
_HOST = "127.0.0.1"
#: Between leaving the rotation and SIGTERM: connections the balancer is opening right now arrive.
_PRE_STOP_DELAY = 0.2
#: Fleet starts tried when a reserved port was taken all the same before its backend bound it (see ``ports``).
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "Address already in use"
_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of a real run, validated by the CLI."""

    backends: int
    clients: int
    rate: float
    duration: float
    warmup: float
    window: float
    seed: int
    lb: str
    bucket: float = 0.5
    balance: str = "roundrobin"
    scenario: str = "rolling"


class _Load:
    """The clients: each one :class:`H2Client`, a steady request loop and a watch loop."""

    def __init__(self, config: DemoConfig, port: int, result: RunResult, clock: Callable[[], float]) -> None:
        self._config = config
        self._port = port
        self._result = result
        self._clock = clock
        self._index = {name: i for i, name in enumerate(result.backends)}
        self._clients: list[H2Client] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._rng = random.Random(config.seed)

    def start(self) -> None:
        """Start every client; their first connections go through the balancer in turn."""
        for n in range(self._config.clients):
            client = H2Client(_HOST, self._port, timeout=REQUEST_TIMEOUT)
            self._clients.append(client)
            phase = self._rng.random() / self._config.rate
            self._tasks.append(asyncio.create_task(self._requests(client, phase), name=f"requests-{n}"))
            self._tasks.append(asyncio.create_task(self._watches(client), name=f"watch-{n}"))

    async def stop(self) -> None:
        """Let requests in flight finish, end the watches, close every connection."""
        self._stopping = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            if task.get_name().startswith("watch-"):
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT)
        for task in tasks:
            task.cancel()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._result.connections_opened = sum(c.connections_opened for c in self._clients)
        self._result.goaways_received = sum(c.goaways_received for c in self._clients)

    def _error(self, text: str) -> None:
        if len(self._result.errors) < 20:
            self._result.errors.append(f"{self._clock():.2f}s {text}")

    async def _requests(self, client: H2Client, phase: float) -> None:
        interval = 1.0 / self._config.rate
        next_at = self._clock() + phase
        seen_goaways = 0
        while not self._stopping:
            delay = next_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            next_at += interval
            try:
                response = await client.request("GET", "/")
            except (H2ClientError, OSError, asyncio.TimeoutError) as exc:
                self._result.failed_requests += 1
                self._error(f"request failed: {exc!r}")
                continue
            backend = self._index.get(response.header("x-backend") or "")
            if response.status != 200 or backend is None:
                self._result.failed_requests += 1
                self._error(f"bad response: status {response.status}, x-backend {response.header('x-backend')!r}")
                continue
            self._result.record(self._clock(), backend)
            while seen_goaways < client.goaways_received:  # when each GOAWAY arrived, for the final window
                seen_goaways += 1
                self._result.record_goaway(self._clock())
            if self._clock() > next_at + interval:
                next_at = self._clock()  # fell behind (a slow moment): resume the rate, no burst

    async def _watches(self, client: H2Client) -> None:
        while not self._stopping:
            self._result.watches_opened += 1
            try:
                async with client.stream("GET", f"/watch?seconds={WATCH_SECONDS}") as response:
                    if response.status != 200:
                        raise H2ClientError(f"watch answered status {response.status}")
                    async for _chunk in response:
                        pass
            except (H2ClientError, OSError, asyncio.TimeoutError) as exc:
                if self._stopping:
                    return
                self._result.watches_interrupted += 1
                self._error(f"watch interrupted: {exc!r}")
                await asyncio.sleep(0.1)


async def run_scenario(
    config: DemoConfig,
    spec: PolicySpec,
    registry: ProcessGroupRegistry,
    progress: ProgressLine,
    work_dir: Path,
) -> RunResult:
    """Run the whole timeline for one policy and return its measurements.

    Every process started here is stopped before this returns or raises
    (cancellation included); ``registry`` is the safety net behind that.
    """
    loop = asyncio.get_running_loop()
    names = [f"b{i + 1}" for i in range(config.backends)]
    run_dir = work_dir / spec.label.replace("=", "-").replace(" ", "_")  # HAProxy splits its config at spaces
    run_dir.mkdir(parents=True, exist_ok=True)
    # The policy's drains are counted from the backends' logs, from where they end now (see ``serve_log``).
    # The surge's new replicas run beside the old ones under the same names: each writes its own log.
    log_names = [*names, *(f"{name}-new" for name in names if config.scenario == "surge")]
    logs = [LogCursor(run_dir / f"{log_name}.log") for log_name in log_names]
    if config.scenario == "surge" and config.lb != "haproxy":
        raise ValueError("the surge scenario needs HAProxy (--lb haproxy): it re-points servers at new replicas")
    # Every backend port (main and publish) stays reserved until the run ends, so a restarted
    # backend finds its ports free again (see ``ports``).
    reserved: list[PortReservation] = []

    def reserve() -> int:
        reservation = PortReservation(_HOST)
        reserved.append(reservation)
        return reservation.port

    fleet: list[list[str]] = [[] for _ in names]

    def replica(i: int, log_name: str | None = None) -> Backend:
        return Backend(names[i], [*spec.serve_args(), *fleet[i], *_seed_args(config.seed, i)], registry, run_dir,
                       host=_HOST, port=reserve(), log_name=log_name)

    def choose_ports() -> tuple[list[Backend], list[Backend]]:
        nonlocal fleet
        for reservation in reserved:
            reservation.close()
        reserved.clear()
        if spec.fair is not None:
            fleet = _fleet_args(names, config.lb, run_dir, reserve)
        # The surge's new replicas run beside the old ones from the start (their ports are their own).
        return ([replica(i) for i in range(len(names))],
                [replica(i, f"{names[i]}-new") for i in range(len(names))] if config.scenario == "surge" else [])

    backends: list[Backend] = []
    new: list[Backend] = []
    result = RunResult(
        policy=spec.label, backends=names, bucket=config.bucket, duration=0.0, window=config.window, lb=config.lb,
        options={**spec.options(), "scenario": config.scenario},
    )
    balancer: RoundRobinProxy | HAProxyBalancer | None = None
    load: _Load | None = None
    progress_task: asyncio.Task[None] | None = None
    try:
        for attempt in range(_PORT_ATTEMPTS):
            backends, new = choose_ports()
            started = await asyncio.gather(*(b.start() for b in [*backends, *new]), return_exceptions=True)
            failed = [exc for exc in started if isinstance(exc, BaseException)]
            if not failed:
                break
            collided = any(isinstance(exc, BackendStartError) and _ADDRESS_IN_USE in str(exc) for exc in failed)
            if not collided or attempt == _PORT_ATTEMPTS - 1:
                raise failed[0]
            # A process that shares ports on purpose (SO_REUSEADDR) listened on a reserved one
            # before its backend: stop whatever started, choose every port again, start again.
            await asyncio.gather(*(b.kill() for b in [*backends, *new]))
        if config.lb == "haproxy":
            balancer = HAProxyBalancer([(b.name, b.host, b.port) for b in backends], registry, run_dir,
                                       balance=config.balance)
        else:
            balancer = RoundRobinProxy([(b.host, b.port) for b in backends])
        await balancer.start()
        start = loop.time()

        def clock() -> float:
            return loop.time() - start

        # Restarts run on the model's schedule (one slot per backend), so the run's length is
        # known at the start and the progress total never moves. A slow restart only delays
        # the next slot; the load after the last one still lasts at least ``duration``.
        slot = RESTART_DOWNTIME + RESTART_GAP
        if config.scenario == "surge":
            expected_total = config.warmup + _PRE_STOP_DELAY + (config.backends - 1) * slot + config.duration
        else:
            expected_total = config.warmup + config.backends * slot + config.duration
        state = {"note": "warm-up", "total": expected_total}
        load = _Load(config, balancer.port, result, clock)
        load.start()
        progress_task = asyncio.create_task(_show_progress(progress, spec.label, result, clock, state))
        await _sleep_until(clock, config.warmup)
        if config.scenario == "surge":
            assert isinstance(balancer, HAProxyBalancer)
            state["note"] = "surge upgrade"
            await _surge(balancer, backends, new, result, clock, slot)
            backends, new = new, backends
        for index, backend in enumerate(backends if config.scenario == "rolling" else []):
            await _sleep_until(clock, config.warmup + index * slot)
            state["note"] = f"restarting {backend.name}"
            # Out of the rotation first, then SIGTERM: no new connection lands on a server
            # that is shutting down (Kubernetes removes the endpoint, then the pod stops).
            await balancer.set_enabled(index, False)
            await asyncio.sleep(_PRE_STOP_DELAY)
            result.events.append((clock(), backend.name, "stop"))
            await backend.stop(_STOP_TIMEOUT)
            await backend.start()
            await balancer.set_enabled(index, True)
            result.events.append((clock(), backend.name, "up"))
        result.restart_done = result.events[-1][0]
        end = max(expected_total, result.restart_done + config.duration)
        state["note"] = "after the restart"
        await _sleep_until(clock, end)
        result.duration = end
        progress_task.cancel()
        await load.stop()
        load = None
        # No request is left, so no policy starts a drain any more: every one is in the logs.
        result.goaways_sent = sum(count_policy_drains(log.text()) for log in logs)
        result.pids = list(registry.pids)
    finally:
        if progress_task is not None:
            progress_task.cancel()
            with contextlib.suppress(BaseException):
                await progress_task
        progress.finish()
        await _shutdown(load, balancer, [*backends, *new])
        for reservation in reserved:
            reservation.close()
    return result


async def _surge(
    balancer: HAProxyBalancer, old: list[Backend], new: list[Backend], result: RunResult,
    clock: Callable[[], float], gap: float,
) -> None:
    """Replace every backend at once, attach the new replicas ``gap`` s apart.

    Every server leaves the rotation, ``b1`` is re-pointed at its new replica
    and attached (and UP in HAProxy's health check) before the old processes
    get SIGTERM, so the clients they drain have somewhere to go: all of them
    land on ``b1``.
    """
    for index in range(len(old)):
        await balancer.set_enabled(index, False)
    await balancer.set_address(0, new[0].host, new[0].port)
    await balancer.set_enabled(0, True)
    await balancer.wait_serving(0)
    await asyncio.sleep(_PRE_STOP_DELAY)
    now = clock()
    for backend in old:
        # b1's old process "stops" a millisecond before its new one is up, as in the model's surge plan,
        # so replaying this schedule moves its old connections with the others'.
        result.events.append((now - 0.001 if backend is old[0] else now, backend.name, "stop"))
    result.events.append((now, new[0].name, "up"))
    start = now
    stopping = asyncio.gather(*(b.stop(_STOP_TIMEOUT) for b in old))
    for index in range(1, len(new)):
        await _sleep_until(clock, start + index * gap)
        await balancer.set_address(index, new[index].host, new[index].port)
        await balancer.set_enabled(index, True)
        result.events.append((clock(), new[index].name, "up"))
    await stopping


async def _shutdown(
    load: _Load | None, balancer: RoundRobinProxy | HAProxyBalancer | None, backends: list[Backend]
) -> None:
    """Stop everything, in order, even when cancelled half-way (each step bounded)."""
    steps: list[Callable[[], Awaitable[object]]] = []
    if load is not None:
        steps.append(load.stop)
    if balancer is not None:
        steps.append(balancer.stop)
    steps.extend(b.kill for b in backends)
    for step in steps:
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.wait_for(step(), 20.0))


def _fleet_args(names: list[str], lb: str, run_dir: Path, reserve: Callable[[], int]) -> list[list[str]]:
    """The fleet view of each fair-share backend: HAProxy's stats socket, or (built-in proxy) its peers.

    Every peer must know the others' publish ports before any starts, so they
    are chosen here with ``reserve`` (a :class:`~.ports.PortReservation` held
    until the run ends: the port is still free when its backend binds it, at
    the first start and after a restart). Should another process take one all
    the same, ``serve`` exits at start with "Address already in use" in its
    log (it starts its publisher before it prints ``listening on``), and
    :func:`run_scenario` chooses every port again (:data:`_PORT_ATTEMPTS`
    times in all).
    """
    if lb == "haproxy":
        socket_path = str(run_dir / "haproxy.sock")  # where HAProxyBalancer puts it
        return [["--fair-share", "haproxy", "--haproxy-socket", socket_path, "--haproxy-backend", "demo_servers"]
                for _ in names]
    ports = [reserve() for _ in names]
    return [
        ["--fair-share", "peers", "--publish-load", f"{_HOST}:{port}",
         "--peers", ",".join(f"{_HOST}:{p}" for p in ports if p != port)]
        for port in ports
    ]


def _seed_args(seed: int, index: int) -> list[str]:
    """Per-backend seed for the policy's draws (each backend its own stream of draws)."""
    return ["--seed", str(seed * 1000 + index)]


async def _sleep_until(clock: Callable[[], float], t: float) -> None:
    delay = t - clock()
    if delay > 0:
        await asyncio.sleep(delay)


async def _show_progress(
    progress: ProgressLine, label: str, result: RunResult, clock: Callable[[], float], state: dict[str, object]
) -> None:
    while True:
        await asyncio.sleep(0.25)
        now = clock()
        counts = result.window_counts(max(0.0, now - 2.0), now)
        total = sum(counts) or 1
        shares = {name: n / total for name, n in zip(result.backends, counts, strict=True)}
        note = str(state["note"])
        if result.failed_requests or result.watches_interrupted:
            note += f"  failed {result.failed_requests} interrupted {result.watches_interrupted}"
        total_time = state["total"]
        assert isinstance(total_time, float)
        progress.update(label, now, total_time, shares, note)
