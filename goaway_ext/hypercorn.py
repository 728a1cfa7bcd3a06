"""hypercorn integration: graceful GOAWAY, request budgets and drains for ASGI apps.

hypercorn speaks HTTP/2 through one ``h2`` connection per TCP connection, made in
``hypercorn.protocol.h2.H2Protocol``. Two of its paths lose responses: its
``keep_alive_max_requests`` calls ``close_connection()`` when request N+1
arrives, which moves ``h2`` to CLOSED and silently drops every response still in
flight; and on shutdown it resets streams that arrive late with NO_ERROR, which
a client cannot tell from a failure.

One line turns goaway_ext on for a hypercorn server::

    enable_goaway(config, GoawayPolicy(chance=0.001))   # then hypercorn.asyncio.serve(app, config)

or from the command line, every hypercorn option still accepted::

    python -m goaway_ext.hypercorn app:app --goaway-chance 0.001 [--goaway-max-requests N ...]

The hook, and everything it touches in hypercorn
------------------------------------------------
- :func:`install_protocol` assigns :class:`GoawayH2Protocol` to the module
  attribute ``hypercorn.protocol.H2Protocol``, the name hypercorn's
  ``ProtocolWrapper`` looks up for every new HTTP/2 connection (ALPN ``h2``,
  prior knowledge and h2c upgrade alike, asyncio and trio workers alike).
- :class:`GoawayH2Protocol` subclasses ``hypercorn.protocol.h2.H2Protocol``.
  For a config that was not enabled it changes nothing. Otherwise it swaps the
  ``h2`` connection hypercorn made for a :class:`~goaway_ext.ServerConnection`
  with the same ``h2`` configuration and local settings, wraps the ``send``
  callable hypercorn gave it, and runs one timer task per connection. It uses
  the attributes ``connection``, ``config``, ``context`` (``terminated``,
  ``event_class``), ``task_group.spawn``, ``send`` and ``closed``, and overrides
  the public methods ``initiate`` and ``handle``; no private method.
- hypercorn calls ``close_connection()`` in two places (request budget spent;
  idle during shutdown) and ``reset_stream(id)`` in one (a request after
  shutdown began). The connection class here turns the first into a graceful
  drain and the second into REFUSED_STREAM, which tells the client the request
  was never processed (RFC 9113 §8.7).
- The command line replaces ``hypercorn.__main__.run`` in its own process only,
  to put the ``--goaway-*`` options on the config hypercorn's parser built.

``tests/test_hypercorn_contract.py`` pins these on the oldest and newest
supported hypercorn (``make contract-hypercorn``).

What changes for a hypercorn server
-----------------------------------
- each HTTP/2 connection follows the :class:`~goaway_ext.GoawayPolicy`
  (chance, request budget, age); HTTP/1.1 and HTTP/3 are untouched;
- ``keep_alive_max_requests`` becomes the policy's ``max_requests`` when that is
  unset or larger, and hypercorn's own check starts a drain instead of killing
  the connection: every request it accepted is answered;
- shutdown sends GOAWAY on every HTTP/2 connection at once; requests in flight
  finish within hypercorn's ``graceful_timeout``, late ones are refused;
- one log line per drained connection on hypercorn's error log, process totals
  in :func:`totals`, and Prometheus metrics when ``prometheus_client`` is
  importable.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.connection

from ._extras import missing_extra

try:
    import hypercorn.protocol
except ModuleNotFoundError as _exc:
    raise missing_extra("goaway_ext.hypercorn", "hypercorn", _exc) from _exc
from h2.errors import ErrorCodes
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol

from .events import ConnectionDrained, GoawaySent
from .policy import MODES, GoawayPolicy
from .server import ServerConnection, ServerEvent

__all__ = [
    "CONFIG_KEYS",
    "GoawayH2Protocol",
    "GoawayTotals",
    "enable_goaway",
    "install_protocol",
    "uninstall_protocol",
    "policy_for",
    "totals",
    "main",
]

#: hypercorn config keys (TOML, Python config, or attributes) -> ``GoawayPolicy`` argument.
#: A config carrying any of them is enabled once the hook is installed.
CONFIG_KEYS: dict[str, str] = {
    "goaway_chance": "chance",
    "goaway_max_requests": "max_requests",
    "goaway_max_age": "max_age",
    "goaway_jitter": "jitter",
    "goaway_ping_timeout": "ping_timeout",
    "goaway_grace": "grace",
    "goaway_linger": "linger",
    "goaway_mode": "mode",
    "goaway_seed": "seed",
    "goaway_allow_high_chance": "allow_high_chance",
}

_STOCK_H2_PROTOCOL = H2Protocol
# Policies given in code, per config object. A weak mapping, not an attribute,
# so the config still pickles for hypercorn's spawned workers (a policy holds a
# lock and does not).
_GIVEN: weakref.WeakKeyDictionary[Config, GoawayPolicy] = weakref.WeakKeyDictionary()
# The effective policy per config: built once, shared by all its connections,
# so per-connection seeds come from one generator.
_EFFECTIVE: weakref.WeakKeyDictionary[Config, tuple[tuple[Any, ...], GoawayPolicy]] = weakref.WeakKeyDictionary()
_EFFECTIVE_LOCK = threading.Lock()


# -- turning it on ---------------------------------------------------------------------


def install_protocol() -> None:
    """Make hypercorn build every new HTTP/2 connection with :class:`GoawayH2Protocol`.

    Process-wide and idempotent. Harmless for servers whose config was not
    enabled: their connections behave exactly as stock hypercorn's.
    """
    hypercorn.protocol.H2Protocol = GoawayH2Protocol  # type: ignore[attr-defined]


def uninstall_protocol() -> None:
    """Put hypercorn's own ``H2Protocol`` back (for tests and benchmarks)."""
    hypercorn.protocol.H2Protocol = _STOCK_H2_PROTOCOL  # type: ignore[attr-defined]


def enable_goaway(config: Config, policy: GoawayPolicy | None = None) -> Config:
    """Turn goaway_ext on for every HTTP/2 connection served with ``config``; return it.

    The one line for code that calls ``hypercorn.asyncio.serve`` or
    ``hypercorn.trio.serve``. ``policy`` defaults to the ``goaway_*`` keys on
    the config (see :data:`CONFIG_KEYS`), else to a policy that only makes
    ``keep_alive_max_requests`` and shutdown graceful. The policy is checked
    here, so a bad value fails at startup, not on the first connection.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a hypercorn.config.Config, got {config!r}")
    if policy is not None:
        if not isinstance(policy, GoawayPolicy):
            raise TypeError(f"policy must be a GoawayPolicy or None, got {policy!r}")
        _GIVEN[config] = policy
    elif not _has_keys(config):
        config.goaway_chance = 0.0  # type: ignore[attr-defined]
    policy_for(config)
    install_protocol()
    return config


def _has_keys(config: Config) -> bool:
    return any(key in vars(config) or hasattr(type(config), key) for key in CONFIG_KEYS)


def _options_from_keys(config: Config) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, name in CONFIG_KEYS.items():
        value = getattr(config, key, None)
        if value is not None:
            options[name] = value
    return options


def policy_for(config: Config) -> GoawayPolicy | None:
    """The policy connections served with ``config`` follow; None if it is not enabled.

    ``keep_alive_max_requests`` is mapped onto ``max_requests`` when the policy
    has none or a larger one: the copy keeps every other setting (a ``seed``
    given in code cannot be read back, so that copy draws fresh seeds).
    """
    given = _GIVEN.get(config)
    if given is None and not _has_keys(config):
        return None
    cap = getattr(config, "keep_alive_max_requests", None)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else None
    signature = (id(given), cap, tuple(getattr(config, key, None) for key in CONFIG_KEYS))
    with _EFFECTIVE_LOCK:
        cached = _EFFECTIVE.get(config)
        if cached is not None and cached[0] == signature:
            return cached[1]
        if given is not None:
            policy = given
            if cap is not None and (given.max_requests is None or given.max_requests > cap):
                policy = GoawayPolicy(
                    given.chance, max_requests=cap, max_age=given.max_age, jitter=given.jitter,
                    ping_timeout=given.ping_timeout, grace=given.grace, linger=given.linger, mode=given.mode,
                    decider=given.decider, allow_high_chance=True,
                )
        else:
            options = _options_from_keys(config)
            budget = options.get("max_requests")
            if cap is not None and (budget is None or budget > cap):
                options["max_requests"] = cap
            try:
                policy = GoawayPolicy(**options)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"hypercorn config goaway_*: {exc}") from exc
        _EFFECTIVE[config] = (signature, policy)
        return policy


# -- counters --------------------------------------------------------------------------


@dataclass
class GoawayTotals:
    """Process-wide counters over every hypercorn connection goaway_ext served.

    What an operator checks to see the rebalancing work: GOAWAYs sent per
    reason (``chance``, ``max_requests``, ``max_age``, ``decider``,
    ``shutdown``), streams refused because they came after the final GOAWAY,
    streams cut by ``grace``, and drains with their total duration.
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
    """A snapshot of this process's :class:`GoawayTotals`."""
    return _TOTALS.snapshot()


class _Prometheus:
    """Prometheus metrics, created on first use, only when ``prometheus_client`` imports.

    Optional because most hypercorn deployments do not run it, and a metrics
    library should not become a dependency of a protocol extension.
    """

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


# -- the connection and the protocol ---------------------------------------------------


class _HypercornConnection(ServerConnection):
    """A ``ServerConnection`` that keeps hypercorn's two hard stops from being hard.

    hypercorn ends a connection with ``close_connection()`` (which would move
    ``h2`` to CLOSED and lose every response in flight) and rejects requests
    during shutdown with ``reset_stream(id)`` (NO_ERROR). Here the first starts
    a drain and the second refuses the stream, so the client may retry it.
    It also keeps the goaway_ext events it produced for the protocol to report.
    """

    def __init__(self, *args: Any, terminated: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reported: list[ServerEvent] = []
        self.drain_reason = "-"
        self.terminated = terminated  # hypercorn's worker-wide "shutdown began" event
        self.on_drain: Callable[[], None] | None = None  # called once, when the drain starts
        self._drain_seen = False

    def check_drain(self) -> None:
        """Call ``on_drain`` the first time the connection is found draining."""
        if not self._drain_seen and self.is_draining:
            self._drain_seen = True
            if self.on_drain is not None:
                self.on_drain()

    def note(self, events: list[ServerEvent]) -> None:
        """Keep our own events (GoawaySent, ConnectionDrained) for the protocol to report."""
        for event in events:
            if event.__class__ is GoawaySent or event.__class__ is ConnectionDrained:
                self.reported.append(event)
                self.drain_reason = event.reason

    def start_drain(self, reason: str = "shutdown") -> None:
        if not self.is_draining:
            self.drain_reason = reason
        super().start_drain(reason)
        self.check_drain()

    @property
    def shutting_down(self) -> bool:
        """True once hypercorn's worker began to shut down."""
        return bool(self.terminated.is_set())

    def receive_data(self, data: bytes) -> list[ServerEvent]:  # type: ignore[override]
        events = super().receive_data(data)
        if self.is_draining:
            self.check_drain()
            self.note(events)
        return events

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        if error_code:  # a real error stays what h2 makes it
            super().close_connection(error_code, additional_data, last_stream_id)
        else:
            self.start_drain("shutdown" if self.shutting_down else "max_requests")

    def reset_stream(self, stream_id: int, error_code: ErrorCodes | int = 0) -> None:
        if self.shutting_down and error_code == 0:
            error_code = ErrorCodes.REFUSED_STREAM
        super().reset_stream(stream_id, error_code)


def _copy_h2_setup(stock: h2.connection.H2Connection, policy: GoawayPolicy, terminated: Any) -> _HypercornConnection:
    """A drain-capable connection configured exactly like the one hypercorn just made."""
    connection = _HypercornConnection(config=stock.config, policy=policy, clock=time.monotonic,
                                      terminated=terminated)
    connection.local_settings = stock.local_settings
    connection.DEFAULT_MAX_INBOUND_FRAME_SIZE = stock.DEFAULT_MAX_INBOUND_FRAME_SIZE
    connection.max_inbound_frame_size = stock.max_inbound_frame_size
    return connection


async def _wait_asyncio(events: Sequence[Any], timeout: float | None) -> None:
    import asyncio

    tasks = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _wait_trio(events: Sequence[Any], timeout: float | None) -> None:
    import trio  # type: ignore[import-not-found, unused-ignore]

    async with trio.open_nursery() as nursery:
        async def wait_one(event: Any) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        if timeout is not None:
            nursery.cancel_scope.deadline = trio.current_time() + timeout
        for event in events:
            nursery.start_soon(wait_one, event)


class GoawayH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol with a :class:`~goaway_ext.ServerConnection` inside.

    Why a subclass and not a fork: hypercorn's stream handling, flow control
    and priorities stay hypercorn's; only the ``h2`` connection object, the
    timers a drain needs and the socket close after a drain are added.
    Connections of a config that is not enabled are stock hypercorn.
    """

    def __init__(self, app: Any, config: Config, context: Any, task_group: Any, connection_state: Any,
                 ssl: bool, client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Callable[[Any], Awaitable[None]]) -> None:
        super().__init__(app, config, context, task_group, connection_state, ssl, client, server, send)
        policy = policy_for(config)
        self._goaway: _HypercornConnection | None = None
        if policy is None:
            return
        self._goaway = _copy_h2_setup(self.connection, policy, context.terminated)
        self.connection = self._goaway
        # hypercorn's own send until a drain starts; then ours (see _send_through).
        self._send_to_server = self.send
        self._goaway.on_drain = self._on_drain
        self._wake = context.event_class()
        self._armed: float | None = None
        self._is_trio = type(context).__module__.startswith("hypercorn.trio")
        self._counted_refused = 0
        self._counted_cut = 0
        self._shutdown_started = False
        self._logged = False
        _TOTALS.connections += 1

    async def initiate(self, headers: list[tuple[bytes, bytes]] | None = None,
                       settings: bytes | None = None) -> None:
        """Start as hypercorn does, plus this connection's drain timer."""
        await super().initiate(headers, settings)
        if self._goaway is not None:
            self.task_group.spawn(self._run_timer)

    async def handle(self, event: Any) -> None:
        """hypercorn's handling, then whatever the drain needs now (report, timer, close)."""
        await super().handle(event)
        if self._goaway is None:
            return
        if isinstance(event, Closed):
            if self._goaway.reported:
                await self._report()
            self._count_stream_totals()
            await self._log_drain()
            await self._wake.set()
            return
        if self._goaway.is_draining:
            if self._goaway.reported:
                await self._report()
            await self._rearm()

    # -- internals -------------------------------------------------------------------------

    def _on_drain(self) -> None:
        self.send = self._send_through

    async def _send_through(self, event: Any) -> None:
        # While draining, our timer owns the close: hypercorn's idle timer
        # would close right after the last response, before the linger.
        connection = self._goaway
        assert connection is not None
        if event.__class__ is Updated and event.idle:
            return
        await self._send_to_server(event)
        if event.__class__ is RawData:
            await self._rearm()

    async def _rearm(self) -> None:
        connection = self._goaway
        assert connection is not None
        deadline = connection.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            await self._wake.set()

    async def _flush_ours(self) -> None:
        connection = self._goaway
        assert connection is not None
        data = connection.data_to_send()
        if data:
            await self._send_to_server(RawData(data=data))

    async def _run_timer(self) -> None:
        """One task per connection: shutdown, ping timeout, grace, age, linger, close."""
        connection = self._goaway
        assert connection is not None
        terminated = self.context.terminated
        wait = _wait_trio if self._is_trio else _wait_asyncio
        while not self.closed:
            deadline = connection.next_deadline()
            self._armed = deadline
            now = time.monotonic()
            if deadline is None or deadline > now:
                watched = [self._wake] if self._shutdown_started else [self._wake, terminated]
                await wait(watched, None if deadline is None else deadline - now)
                await self._wake.clear()
                if self.closed:
                    break
                now = time.monotonic()
            if not self._shutdown_started and terminated.is_set():
                self._shutdown_started = True
                connection.start_drain("shutdown")
            connection.note(connection.handle_timer(now))
            connection.check_drain()
            await self._flush_ours()
            if connection.reported:
                await self._report()
            close_at = connection.close_at
            if close_at is not None and time.monotonic() >= close_at:
                await self._send_to_server(Closed())
                break
        self._armed = None

    async def _report(self) -> None:
        connection = self._goaway
        assert connection is not None
        events, connection.reported = connection.reported, []
        prometheus = _PROMETHEUS.setup()
        for event in events:
            if isinstance(event, GoawaySent):
                _TOTALS.goaways_sent[event.reason] = _TOTALS.goaways_sent.get(event.reason, 0) + 1
                if prometheus:
                    _PROMETHEUS.goaways.labels(reason=event.reason).inc()
            elif isinstance(event, ConnectionDrained):
                _TOTALS.drains += 1
                _TOTALS.drain_seconds += event.duration
                if prometheus:
                    _PROMETHEUS.drain.observe(event.duration)

    async def _log_drain(self) -> None:
        """One line per drain on hypercorn's error log, when the connection ends."""
        connection = self._goaway
        assert connection is not None
        if self._logged or not connection.is_draining:
            return
        self._logged = True
        stats = connection.stats
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        if stats.drain_duration is not None:
            outcome = f"drained in {stats.drain_duration:.3f}s"
        else:
            outcome = f"closed by the peer while draining ({connection.drain_state.value})"
        await self.config.log.info(
            f"goaway_ext: drained HTTP/2 connection from {peer}: reason={connection.drain_reason} "
            f"last_stream_id={connection.last_stream_id} requests={stats.requests_seen} "
            f"goaways={stats.goaways_sent} refused={stats.streams_refused} cut={stats.streams_cut}: {outcome}"
        )

    def _count_stream_totals(self) -> None:
        connection = self._goaway
        assert connection is not None
        stats = connection.stats
        refused = stats.streams_refused - self._counted_refused
        cut = stats.streams_cut - self._counted_cut
        self._counted_refused, self._counted_cut = stats.streams_refused, stats.streams_cut
        _TOTALS.streams_refused += refused
        _TOTALS.streams_cut += cut
        if refused and _PROMETHEUS.setup():
            _PROMETHEUS.refused.inc(refused)


# -- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m goaway_ext.hypercorn", allow_abbrev=False, add_help=False,
        description="hypercorn with graceful GOAWAY: every hypercorn option, plus these --goaway-* ones "
                    "(also accepted as goaway_* keys in a hypercorn TOML config).",
    )
    group = parser.add_argument_group("goaway_ext")
    group.add_argument("--goaway-chance", type=float, default=None,
                       help="per-request probability of a graceful GOAWAY (0.001 is usual; max 0.02)")
    group.add_argument("--goaway-max-requests", type=int, default=None,
                       help="drain after about N requests per connection (jittered); "
                            "hypercorn's own --max-requests restarts workers, this does not")
    group.add_argument("--goaway-max-age", type=float, default=None,
                       help="drain connections older than S seconds (jittered)")
    group.add_argument("--goaway-mode", choices=MODES, default=None,
                       help="graceful (two GOAWAYs + PING, default), single, or idle")
    group.add_argument("--goaway-grace", type=float, default=None,
                       help="hard deadline in seconds after a drain starts (default: none)")
    group.add_argument("--goaway-jitter", type=float, default=None, help="relative spread of budgets (0.1)")
    group.add_argument("--goaway-ping-timeout", type=float, default=None,
                       help="seconds to wait for the PING ACK of a graceful drain (5)")
    group.add_argument("--goaway-linger", type=float, default=None,
                       help="seconds the socket stays open once drained (1)")
    group.add_argument("--goaway-seed", type=int, default=None, help="seed for reproducible draws")
    group.add_argument("--goaway-allow-high-chance", action="store_true", default=None,
                       help="accept --goaway-chance above 0.02 (tests and demos)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m goaway_ext.hypercorn``: hypercorn's command line with ``--goaway-*`` options.

    Our options are taken out; the rest goes to hypercorn's own parser, so
    every hypercorn option (``--bind``, ``--workers``, ``--config`` ...)
    works as documented there. Values from the command line win over
    ``goaway_*`` keys in a ``--config`` TOML file.
    """
    import hypercorn.__main__ as hypercorn_main

    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if any(arg in ("-h", "--help") for arg in args_list):
        parser.print_help()
        print("\nhypercorn's options follow.\n")
        hypercorn_main.main(["--help"])
        return 0
    ours, rest = parser.parse_known_args(args_list)
    overrides = {key: value for key, value in vars(ours).items() if value is not None}
    hypercorn_run = hypercorn_main.run  # type: ignore[attr-defined]

    def run_with_goaway(config: Config) -> int:
        for key, value in overrides.items():
            setattr(config, key, value)
        try:
            enable_goaway(config)
        except (TypeError, ValueError) as exc:
            print(f"python -m goaway_ext.hypercorn: {exc}", file=sys.stderr)
            return 2
        return hypercorn_run(config)

    hypercorn_main.run = run_with_goaway  # type: ignore[attr-defined]
    try:
        return hypercorn_main.main(rest)
    finally:
        hypercorn_main.run = hypercorn_run  # type: ignore[attr-defined]


if __name__ == "__main__":
    from goaway_ext.hypercorn import main as _main

    sys.exit(_main())
elif __name__ == "__mp_main__":
    # hypercorn's workers are spawned processes; multiprocessing re-imports the
    # parent's main module in each under this name. The config they receive
    # carries the goaway_* keys; the hook has to be installed here too.
    from goaway_ext.hypercorn import install_protocol as _install

    _install()
