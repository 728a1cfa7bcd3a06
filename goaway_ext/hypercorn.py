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
  For a config that was not enabled it changes nothing. Otherwise its
  constructor sets the attributes hypercorn's sets, with a
  :class:`~goaway_ext.ServerConnection` (hypercorn's ``h2`` configuration and
  local settings) as the only ``h2`` connection; once a drain starts it wraps
  the ``send`` callable hypercorn gave it. Timers: on asyncio, one task per
  worker waits for ``context.terminated`` and a connection holds a
  ``loop.call_later`` handle only while a deadline is scheduled; on trio, one
  timer task per connection. It uses the attributes ``connection``, ``config``,
  ``context`` (``terminated``, ``event_class``), ``task_group.spawn``, ``send``
  and ``closed``, and overrides the public methods ``initiate`` and
  ``send_task`` (hypercorn's sending task, which ends when the connection
  does: that is how the end is learnt without a hook on every event); no
  private method.
- hypercorn calls ``close_connection()`` in two places (request budget spent;
  idle during shutdown) and ``reset_stream(id)`` in one (a request after
  shutdown began). The connection class here turns the first into a graceful
  drain and the second into REFUSED_STREAM, which tells the client the request
  was never processed (RFC 9113 §8.7).
- The command line replaces ``hypercorn.__main__.run`` in its own process only,
  to put the ``--goaway-*`` options on the config hypercorn's parser built, and
  runs worker processes with :func:`run` (which starts hypercorn's worker
  functions ``asyncio_worker``, ``uvloop_worker``, ``trio_worker`` itself).

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
  finish within hypercorn's ``graceful_timeout``, late ones are refused; with
  worker processes the parent waits for every worker (:func:`run`);
- one log line per drained connection on hypercorn's error log and the logger
  ``goaway_ext.hypercorn``, process totals in :func:`totals`, and Prometheus
  metrics when ``prometheus_client`` is importable (:mod:`goaway_ext.metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib.util
import io
import logging
import multiprocessing
import multiprocessing.connection
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import h2.config
import h2.settings

from ._extras import missing_extra

try:
    import hypercorn.protocol
except ModuleNotFoundError as _exc:
    raise missing_extra("goaway_ext.hypercorn", "hypercorn", _exc) from _exc
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol
from priority.priority import PriorityTree  # hypercorn's dependency: its per-connection stream tree

from ._hostfleet import (
    FleetRunner,
    FleetSettings,
    HostLoad,
    ProcessFleet,
    drain_rate_line,
    fleet_settings,
    start_publisher,
    worker_fair_share,
)
from .fleet import LoadPublisher, PollingFleetView
from .metrics import ConnectionMeter, GoawayTotals, connection_opened, totals
from .policy import MODES, GoawayPolicy
from .server import DrainState, ServerConnection

__all__ = [
    "CONFIG_KEYS",
    "FAIR_SHARE_KEYS",
    "WORKER_EXIT_MARGIN",
    "GoawayH2Protocol",
    "GoawayTotals",
    "enable_goaway",
    "install_protocol",
    "uninstall_protocol",
    "policy_for",
    "run",
    "totals",
    "main",
]

#: Logger of this integration: one line per drained connection (also on hypercorn's
#: error log) and the effective policy at startup.
log = logging.getLogger("goaway_ext.hypercorn")

#: hypercorn config keys (TOML, Python config, or attributes) -> ``GoawayPolicy`` argument.
#: A config carrying any of them is enabled once the hook is installed.
CONFIG_KEYS: dict[str, str] = {
    "goaway_chance": "chance",
    "goaway_max_requests": "max_requests",
    "goaway_max_age": "max_age",
    "goaway_max_idle": "max_idle",
    "goaway_jitter": "jitter",
    "goaway_ping_timeout": "ping_timeout",
    "goaway_grace": "grace",
    "goaway_linger": "linger",
    "goaway_mode": "mode",
    "goaway_seed": "seed",
    "goaway_allow_high_chance": "allow_high_chance",
    "goaway_rapid_reset_window": "rapid_reset_window",  # 0 turns the limit off (TOML has no None)
}

#: hypercorn config keys of the load-aware policy -> the ``serve`` option they mirror
#: (``goaway_fair_share`` is ``serve --fair-share``, ``goaway_name`` is ``--name`` ...).
#: With ``goaway_fair_share`` set, ``goaway_chance`` is the fallback chance, as ``--chance``
#: is for ``serve``. Each worker process builds its own fleet view and controller from
#: these keys (a policy object does not reach spawned workers); the host, not the worker,
#: is one server of the fleet (see :mod:`goaway_ext._hostfleet`).
FAIR_SHARE_KEYS: dict[str, str] = {
    "goaway_fair_share": "fair_share",
    "goaway_name": "name",
    "goaway_haproxy_socket": "haproxy_socket",
    "goaway_haproxy_backend": "haproxy_backend",
    "goaway_peers": "peers",
    "goaway_publish_load": "publish_load",
    "goaway_fair_ceiling": "fair_ceiling",
    "goaway_fair_tolerance": "fair_tolerance",
    "goaway_fair_max_drain_rate": "fair_max_drain_rate",
    "goaway_fair_interval": "fair_interval",
    "goaway_fair_max_staleness": "fair_max_staleness",
}
# hypercorn config keys of limits that are ``ServerConnection`` arguments, not policy ones.
_LIMIT_KEYS: dict[str, str] = {
    "goaway_max_control_rate": "max_control_rate",  # 0 turns the limit off (TOML has no None)
}
_ALL_KEYS = {**CONFIG_KEYS, **FAIR_SHARE_KEYS, **_LIMIT_KEYS}

_STOCK_H2_PROTOCOL = H2Protocol
# h2's own write, the serving connection's (see _HypercornConnection).
_H2_DATA_TO_SEND = H2Connection.data_to_send


_SERVING = DrainState.SERVING
# Policies given in code, per config object. A weak mapping, not an attribute,
# so the config still pickles for hypercorn's spawned workers (a policy holds a
# lock and does not).
_GIVEN: weakref.WeakKeyDictionary[Config, GoawayPolicy] = weakref.WeakKeyDictionary()
_SETUPS: weakref.WeakKeyDictionary[Config, _Setup] = weakref.WeakKeyDictionary()
_SETUPS_LOCK = threading.Lock()
# The host's shared connection counts and publisher, per config, in the process that
# owns the listening sockets (where enable_goaway or the command line ran).
_HOSTS: weakref.WeakKeyDictionary[Config, _Host] = weakref.WeakKeyDictionary()
# In a worker process spawned by run(): the host's counts and this worker's slot.
_WORKER_SLOT: tuple[HostLoad, int] | None = None


class _Host:
    """This host's side of the fair share: the shared counts, and the publisher (started once)."""

    __slots__ = ("__weakref__", "load", "publisher")

    def __init__(self, load: HostLoad, publisher: LoadPublisher | None) -> None:
        self.load = load
        self.publisher = publisher


def _host_for(config: Config, settings: FleetSettings) -> _Host:
    """The host of ``config`` in this process, made (and its publisher started) on first use."""
    host = _HOSTS.get(config)
    if host is None:
        workers = config.workers if config.workers > 0 and not config.use_reloader else 0
        load = HostLoad(workers)
        host = _HOSTS[config] = _Host(load, start_publisher(settings, load, "goaway_publish_load"))
    return host


class _Setup:
    """What every connection of one config shares, computed once per config (not per connection)."""

    __slots__ = ("fleet", "h2_config", "local_settings", "max_control_rate", "policy", "shutdown_ping_timeout",
                 "signature", "timed", "watch_idle")

    def __init__(self, signature: tuple[Any, ...], policy: GoawayPolicy | None, config: Config,
                 fleet: ProcessFleet | None = None, max_control_rate: int | None = 1000) -> None:
        self.signature = signature
        self.policy = policy
        self.max_control_rate = max_control_rate
        # A connection of this config may have a deadline while serving (max_age, max_idle),
        # and max_idle needs hypercorn's idle updates watched (see GoawayH2Protocol.__init__).
        self.watch_idle = policy is not None and policy.max_idle is not None
        self.timed = self.watch_idle or (policy is not None and policy.max_age is not None)
        # Fair share: this process's connection counts and the controller's update thread.
        self.fleet = fleet
        # h2 only reads its configuration, so one object serves every connection.
        self.h2_config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        # hypercorn's local SETTINGS, the values its own H2Protocol puts on each connection.
        self.local_settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: config.h2_max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: config.h2_max_header_list_size,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        }
        # On shutdown the final GOAWAY must go out before hypercorn cuts the
        # connections at graceful_timeout: wait for the PING ACK at most half of it.
        ping = policy.ping_timeout if policy is not None else 0.0
        self.shutdown_ping_timeout = min(ping, max(0.0, float(config.graceful_timeout)) / 2.0)


# -- turning it on ---------------------------------------------------------------------


def install_protocol() -> None:
    """Make hypercorn build every new HTTP/2 connection with :class:`GoawayH2Protocol`.

    Process-wide and idempotent. Harmless for servers whose config was not
    enabled: their connections behave exactly as stock hypercorn's.
    """
    hypercorn.protocol.H2Protocol = GoawayH2Protocol  # type: ignore[attr-defined]


def uninstall_protocol() -> None:
    """Put hypercorn's own ``H2Protocol`` back (for tests and benchmarks).

    Also stops the fair-share threads this process started (update threads
    and load publishers): new connections are stock hypercorn's, so no
    controller has anything to move and no load is worth publishing.
    """
    hypercorn.protocol.H2Protocol = _STOCK_H2_PROTOCOL  # type: ignore[attr-defined]
    with _SETUPS_LOCK:
        setups = list(_SETUPS.values())
        hosts = list(_HOSTS.items())
        _HOSTS.clear()
    for setup in setups:
        if setup.fleet is not None and setup.fleet.runner is not None:
            setup.fleet.runner.close()
    for _config, host in hosts:
        if host.publisher is not None:
            host.publisher.close()


def enable_goaway(config: Config, policy: GoawayPolicy | None = None) -> Config:
    """Turn goaway_ext on for every HTTP/2 connection served with ``config``; return it.

    The one line for code that calls ``hypercorn.asyncio.serve`` or
    ``hypercorn.trio.serve``. ``policy`` defaults to the ``goaway_*`` keys on
    the config (see :data:`CONFIG_KEYS`), else to a policy that only makes
    ``keep_alive_max_requests`` and shutdown graceful. The policy is checked
    here, so a bad value or an unknown ``goaway_*`` key fails at startup, not
    on the first connection. Set the keys before calling it.
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
    # getattr, not vars(): see _check_keys.
    return any(hasattr(config, key) for key in _ALL_KEYS)


def _check_keys(config: Config) -> None:
    # hypercorn keeps keys it does not know, so a misspelt goaway_* key would
    # silently do nothing: refuse it, naming the closest valid one. Only when
    # the keys are read: vars() turns the config's attributes into a real dict
    # for good (CPython 3.11), and every later read of a config attribute,
    # several per request in hypercorn, then takes a slower path.
    for key in vars(config):
        if key.startswith("goaway_") and key not in _ALL_KEYS:
            close = difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(_ALL_KEYS)}"
            raise ValueError(f"unknown hypercorn config key {key}{hint}")


def _options_from_keys(config: Config) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, name in CONFIG_KEYS.items():
        value = getattr(config, key, None)
        if key == "goaway_rapid_reset_window" and type(value) is int and value == 0:
            options[name] = None  # the limit off
        elif value is not None:
            options[name] = value
    return options


def _max_control_rate(config: Config) -> int | None:
    """``goaway_max_control_rate`` (1000 when unset, 0: off) as ``ServerConnection(max_control_rate=)`` takes it."""
    value = getattr(config, "goaway_max_control_rate", None)
    if value is None:
        return 1000
    if type(value) is not int or value < 0:
        raise ValueError(f"hypercorn config goaway_max_control_rate must be an int >= 1, or 0 (off), got {value!r}")
    return value or None


def _signature(config: Config) -> tuple[Any, ...]:
    return (id(_GIVEN.get(config)), getattr(config, "keep_alive_max_requests", None),
            getattr(config, "graceful_timeout", None),
            tuple(getattr(config, key, None) for key in _ALL_KEYS))


def _key_names(message: str) -> str:
    """A policy error in the names of the config file: ``goaway_chance``, not ``chance``."""
    message = message.replace("Pass allow_high_chance=True", "Set goaway_allow_high_chance = true")
    for key, name in CONFIG_KEYS.items():
        message = re.sub(rf"(?<![\w-]){name}(?==| must)", key, message)
    return message


def _fleet_for(config: Config, options: dict[str, Any]) -> tuple[GoawayPolicy | None, ProcessFleet | None]:
    """The fair-share policy and this process's fleet hooks from the ``goaway_*`` keys; (None, None) without.

    In a worker spawned by :func:`run` the counts go to the worker's slot of
    the host's shared array; otherwise this process is the host (slot 0, and
    the publisher starts here).
    """
    values = {name: getattr(config, key, None) for key, name in FAIR_SHARE_KEYS.items()}
    chance = options.get("chance", 0.0)
    allow = options.get("allow_high_chance", False)
    settings = fleet_settings(values, lambda name: "goaway_" + name, chance=chance, allow_high_chance=allow)
    if settings is None:
        return None, None
    if _WORKER_SLOT is not None:
        load, index = _WORKER_SLOT
        workers = max(1, int(config.workers))
    else:
        load, index, workers = _host_for(config, settings).load, 0, 1
    built = worker_fair_share(settings, load, chance=chance, allow_high_chance=allow, workers=workers)
    if built is None:  # only publishing: count, never shed for the fleet
        return None, ProcessFleet(load.slot(index), None)
    fair, view = built
    policy = GoawayPolicy(**{**options, "chance": 0.0, "fair_share": fair})
    return policy, ProcessFleet(load.slot(index), FleetRunner(fair, view))


def _build_setup(config: Config) -> _Setup:
    signature = _signature(config)
    given = _GIVEN.get(config)
    if given is None:  # with a policy given in code, its goaway_* keys are not read, so not checked
        if not _has_keys(config):
            return _Setup(signature, None, config)
        _check_keys(config)
    max_control_rate = _max_control_rate(config)
    cap = getattr(config, "keep_alive_max_requests", None)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else None
    fleet: ProcessFleet | None = None
    if given is not None:
        policy = given
        if cap is not None and (given.max_requests is None or given.max_requests > cap):
            policy = GoawayPolicy(
                given.chance, max_requests=cap, max_age=given.max_age, max_idle=given.max_idle, jitter=given.jitter,
                ping_timeout=given.ping_timeout, grace=given.grace, linger=given.linger, mode=given.mode,
                decider=given.decider, allow_high_chance=True, fair_share=given.fair_share,
                rapid_reset_window=given.rapid_reset_window,
            )
        if given.fair_share is not None:
            # A controller given in code: its view is the caller's (started here if it polls and is
            # not running yet); the update timer is ours, as in H2Server.
            view = given.fair_share.view
            fleet = ProcessFleet(None, FleetRunner(given.fair_share, view if isinstance(view, PollingFleetView)
                                                   else None, owns_view=False))
    else:
        options = _options_from_keys(config)
        budget = options.get("max_requests")
        if cap is not None and (budget is None or budget > cap):
            options["max_requests"] = cap
        try:
            policy = GoawayPolicy(**options)
            fair_policy, fleet = _fleet_for(config, options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"hypercorn config goaway_*: {_key_names(str(exc))}") from exc
        if fair_policy is not None:
            policy = fair_policy
    return _Setup(signature, policy, config, fleet, max_control_rate)


# The last config a connection was built for and its setup: a worker serves one
# config, and a WeakKeyDictionary lookup makes a weak reference and a Python
# call on every connection. Reset whenever a setup is (re)built.
_LAST_SETUP: tuple[weakref.ref[Config], _Setup] | None = None


def policy_for(config: Config) -> GoawayPolicy | None:
    """The policy connections served with ``config`` follow; None if it is not enabled.

    ``keep_alive_max_requests`` is mapped onto ``max_requests`` when the policy
    has none or a larger one: the copy keeps every other setting (a ``seed``
    given in code cannot be read back, so that copy draws fresh seeds).
    Rechecks the config each call; connections reuse the result, so keys
    changed after serving started apply only once this is called again.
    """
    global _LAST_SETUP
    with _SETUPS_LOCK:
        cached = _SETUPS.get(config)
        if cached is None or cached.signature != _signature(config):
            old, cached = cached, _build_setup(config)
            _SETUPS[config] = cached
            _LAST_SETUP = None
            if old is not None and old.fleet is not None and old.fleet.runner is not None:
                old.fleet.runner.close()  # its connections keep their samplers; new ones follow the new policy
        return cached.policy


def _setup_for(config: Config) -> _Setup:
    """Per connection: the cached setup, built on a config's first connection only."""
    global _LAST_SETUP
    last = _LAST_SETUP
    if last is not None and last[0]() is config:
        return last[1]
    setup = _SETUPS.get(config)
    if setup is None:
        policy_for(config)
        setup = _SETUPS[config]
    _LAST_SETUP = (weakref.ref(config), setup)
    return setup


# -- the connection and the protocol ---------------------------------------------------


class _HypercornConnection(ServerConnection):
    """A ``ServerConnection`` that keeps hypercorn's two hard stops from being hard.

    hypercorn ends a connection with ``close_connection()`` (which would move
    ``h2`` to CLOSED and lose every response in flight) and rejects requests
    during shutdown with ``reset_stream(id)`` (NO_ERROR). Here the first starts
    a drain and the second refuses the stream, so the client may retry it.
    A shutdown drain waits for the PING ACK at most ``shutdown_ping_timeout``.
    It overrides ``ServerConnection._start`` (same package) to learn when a
    drain begins, and ``ServerConnection._move`` to become a
    :class:`_DrainingHypercornConnection` when it leaves SERVING.
    """

    __slots__ = ("_drain_seen", "owner", "shutdown_ping_timeout", "terminated")

    # hypercorn calls connection.data_to_send() and receive_data(data) several
    # times per request. Both are class attributes here, never instance ones, so
    # CPython specialises those call sites (an attribute of the instance makes
    # each a generic lookup and a call from C). While serving, data_to_send is
    # h2's own; _move switches the object to _DrainingHypercornConnection, whose
    # data_to_send is ServerConnection's, when the drain starts. receive_data is
    # ServerConnection's, a class attribute already (the core's serving read).
    data_to_send = _H2_DATA_TO_SEND

    def __init__(self, config: h2.config.H2Configuration, *, policy: GoawayPolicy, terminated: Any,
                 shutdown_ping_timeout: float, max_control_rate: int | None = 1000) -> None:
        super().__init__(config, policy=policy, clock=time.monotonic, max_control_rate=max_control_rate)
        self.terminated = terminated  # hypercorn's worker-wide "shutdown began" event
        self.shutdown_ping_timeout = shutdown_ping_timeout
        # The protocol, told once when the drain starts (its _on_drain). The object
        # itself, not a bound method: that would be one more object per connection.
        self.owner: GoawayH2Protocol | None = None
        self._drain_seen = False

    def check_drain(self) -> None:
        """Tell ``owner`` the first time the connection is found draining."""
        if not self._drain_seen and self._state is not _SERVING:
            self._drain_seen = True
            if self.owner is not None:
                self.owner._on_drain()

    def _move(self, state: DrainState) -> None:
        if self.__class__ is _HypercornConnection:  # leaving SERVING: the draining methods take over
            self.__class__ = _DrainingHypercornConnection
        ServerConnection._move(self, state)

    def _start(self, reason: str, now: float | None = None) -> None:
        # ServerConnection's one place where a drain begins, whatever started it
        # (a request's trigger, max_age, start_drain): hooked here rather than in
        # receive_data, so serving a request costs nothing extra.
        ServerConnection._start(self, reason, now)
        self.check_drain()

    def start_drain(self, reason: str = "shutdown") -> None:
        super().start_drain(reason)
        if reason == "shutdown" and self._ping_deadline is not None:
            # Also when a drain for another reason is already waiting for its ACK.
            self._ping_deadline = min(self._ping_deadline, self._clock() + self.shutdown_ping_timeout)
        self.check_drain()

    @property
    def shutting_down(self) -> bool:
        """True once hypercorn's worker began to shut down."""
        return bool(self.terminated.is_set())

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


class _DrainingHypercornConnection(_HypercornConnection):
    """A :class:`_HypercornConnection` whose drain has started: ServerConnection's writes again."""

    __slots__ = ()
    data_to_send = ServerConnection.data_to_send


class _AsyncioWorker:
    """One per hypercorn asyncio worker: its live connections and the one task that waits for shutdown.

    Instead of a task per connection, a connection is found here when the
    worker's ``terminated`` event fires, and its drain deadlines are
    ``loop.call_later`` handles that exist only while something is scheduled.
    """

    __slots__ = ("__weakref__", "context", "live", "loop", "terminated", "watcher")

    def __init__(self, context: Any) -> None:
        self.context = weakref.ref(context)  # weak: see watcher
        self.live: set[GoawayH2Protocol] = set()
        # Set by the watcher before it drains the live connections: a connection
        # registered later reads it instead of the event (two Python calls).
        self.terminated = False
        self.loop = asyncio.get_running_loop()
        # The event, not the context: this object is the context's value in a
        # weak mapping and must not keep its key alive.
        self.watcher = self.loop.create_task(self._watch(context.terminated))

    async def _watch(self, terminated: Any) -> None:
        await terminated.wait()
        self.terminated = True
        for protocol in list(self.live):
            protocol._begin_shutdown()


_WORKERS: weakref.WeakKeyDictionary[Any, _AsyncioWorker] = weakref.WeakKeyDictionary()
# The worker of the last connection: checked first, a process has one worker context.
_LAST_WORKER: _AsyncioWorker | None = None


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

    Why the constructor sets hypercorn's attributes itself: calling
    hypercorn's would build an ``h2`` connection only to replace it (a fifth of
    a connection's cost). ``tests/test_hypercorn_contract.py`` checks that the
    attributes and ``h2`` settings are exactly those of a stock ``H2Protocol``.
    """

    # Slots for what every connection sets; what only a drain, a timer or trio
    # needs is a class default here and lands in the instance's dict when first
    # set, so a connection that never drains stores nothing for it.
    __slots__ = ("_fleet", "_goaway", "_worker")
    _armed: float | None = None  # the deadline the timer is set for
    _draining = False
    _logged = False
    _meter: ConnectionMeter | None = None
    _send_to_server: Callable[[Any], Awaitable[None]] | None = None  # hypercorn's send, once ours replaces it
    _shutdown_seen = False
    _timed = False  # True when the config's policy has max_age or max_idle (a deadline while serving)
    _timer: asyncio.TimerHandle | None = None
    _wake: Any = None  # trio: the event that wakes the connection's timer task

    def __init__(self, app: Any, config: Config, context: Any, task_group: Any, connection_state: Any,
                 ssl: bool, client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Callable[[Any], Awaitable[None]]) -> None:
        setup = _setup_for(config)
        policy = setup.policy
        self._goaway: _HypercornConnection | None = None
        self._fleet: ProcessFleet | None = None
        if policy is None:
            super().__init__(app, config, context, task_group, connection_state, ssl, client, server, send)
            return
        # What hypercorn's H2Protocol.__init__ sets, with our connection as the only h2 connection.
        self.app = app
        self.client = client
        self.closed = False
        self.config = config
        self.context = context
        self.task_group = task_group
        self.connection_state = connection_state
        connection = _HypercornConnection(setup.h2_config, policy=policy, terminated=context.terminated,
                                          shutdown_ping_timeout=setup.shutdown_ping_timeout,
                                          max_control_rate=setup.max_control_rate)
        connection.DEFAULT_MAX_INBOUND_FRAME_SIZE = config.h2_max_inbound_frame_size
        connection.local_settings = h2.settings.Settings(client=False, initial_values=setup.local_settings)
        self.connection = connection
        self.keep_alive_requests = 0
        self.send = send
        self.server = server
        self.ssl = ssl
        self.streams = {}
        self.has_data = context.event_class()
        self.priority = PriorityTree()
        self.stream_buffers = {}
        # goaway_ext's state: hypercorn's send until a drain starts, then ours (see _send_through).
        self._goaway = connection
        connection.owner = self
        self._worker: _AsyncioWorker | None = None
        self._fleet = setup.fleet  # fair share: counted from initiate to close
        if setup.timed:
            self._timed = True
            if setup.watch_idle:
                # max_idle counts from the moment the last stream ends, which only
                # hypercorn's idle update tells: watch it (only with max_idle set).
                self._send_to_server = send
                self.send = self._send_watching_idle

    async def initiate(self, headers: list[tuple[bytes, bytes]] | None = None,
                       settings: bytes | None = None) -> None:
        """Start as hypercorn does; register with the worker (asyncio) or start the timer task (trio)."""
        fleet = self._fleet
        if fleet is not None:
            fleet.opened()  # before hypercorn's sending task exists, whose end counts the close
        try:
            await super().initiate(headers, settings)
        except BaseException:
            if fleet is not None:
                self._fleet = None
                fleet.closed(False)
            raise
        if self._goaway is None:
            return
        connection_opened()
        global _LAST_WORKER
        context = self.context
        worker = _LAST_WORKER
        if worker is None or worker.context() is not context:
            if type(context).__module__.startswith("hypercorn.trio"):
                # trio has no loop.call_later; its worker keeps one timer task per connection.
                self._wake = context.event_class()
                self.task_group.spawn(self._run_timer_trio)
                return
            worker = _WORKERS.get(context)
            if worker is None:
                worker = _WORKERS[context] = _AsyncioWorker(context)
            _LAST_WORKER = worker
        self._worker = worker
        worker.live.add(self)
        if worker.terminated:  # else, if shutdown began, the worker's watcher finds this connection in live
            self._begin_shutdown()
        elif self._timed and self._goaway.next_deadline() is not None:  # most connections: no deadline, no call
            self._arm()

    async def send_task(self) -> None:
        """hypercorn's sending task; when it ends, the connection has ended, and so does our part.

        Learning of the end here, rather than by overriding ``handle`` or
        making ``closed`` a property, costs nothing per event or per request.
        """
        try:
            await H2Protocol.send_task(self)
        finally:
            if self._goaway is not None:
                self._on_closed()

    # -- internals -------------------------------------------------------------------------

    def _on_drain(self) -> None:
        self._draining = True
        if self._fleet is not None:
            self._fleet.drained()
        self._meter = ConnectionMeter()
        if self._send_to_server is None:
            self._send_to_server = self.send
        self.send = self._send_through
        if self._worker is not None and not self.closed:
            self._arm()

    def _begin_shutdown(self) -> None:
        """The worker began to shut down (asyncio): drain now; the GOAWAY goes out from a task."""
        connection = self._goaway
        if connection is None or self.closed or self._shutdown_seen:
            return
        self._shutdown_seen = True
        connection.start_drain("shutdown")
        self.task_group.spawn(self._tick)

    def _on_closed(self) -> None:
        connection = self._goaway
        assert connection is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._worker is not None:
            self._worker.live.discard(self)
        connection.owner = None  # no cycle left between the two
        fleet, self._fleet = self._fleet, None
        if fleet is not None:
            fleet.closed(self._draining)
        if self._draining:
            self._report()
            self._log_drain()
        if self._wake is not None:
            self._spawn(self._wake.set)  # ends the trio timer task

    def _spawn(self, func: Callable[..., Awaitable[None]], *args: Any) -> bool:
        try:
            self.task_group.spawn(func, *args)
        except RuntimeError:  # the connection's task group is already closing (worker shutdown)
            return False
        return True

    async def _send_watching_idle(self, event: Any) -> None:
        assert self._send_to_server is not None
        await self._send_to_server(event)
        if event.__class__ is Updated and event.idle and not self.closed:
            await self._rearm()

    async def _send_through(self, event: Any) -> None:
        # While draining, our timer owns the close: hypercorn's idle timer
        # would close right after the last response, before the linger.
        # Every drain step that matters is followed by something hypercorn
        # sends (bytes, or an idle update), so this is where timers move.
        if event.__class__ is not Updated or not event.idle:
            assert self._send_to_server is not None
            await self._send_to_server(event)
        self._report()
        await self._rearm()

    def _arm(self) -> None:
        """(asyncio) One ``call_later`` handle for the connection's next deadline, none when nothing is due."""
        connection = self._goaway
        assert connection is not None and self._worker is not None
        deadline = connection.next_deadline()
        if deadline == self._armed and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            self._timer = self._worker.loop.call_later(max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        if not self.closed:
            self.task_group.spawn(self._tick)

    async def _tick(self) -> None:
        if not await self._step() and not self.closed:
            self._arm()

    async def _rearm(self) -> None:
        if self._worker is not None:
            if not self.closed:
                self._arm()
            return
        connection = self._goaway
        assert connection is not None
        deadline = connection.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed) and self._wake is not None:
            await self._wake.set()

    async def _step(self) -> bool:
        """Act on whatever deadline passed; True once the connection was closed here."""
        connection = self._goaway
        assert connection is not None
        connection.handle_timer(time.monotonic())
        connection.check_drain()
        send = self._send_to_server or self.send  # hypercorn's own, whether or not a drain replaced it
        data = connection.data_to_send()
        if data:
            await send(RawData(data=data))
        if self._draining:
            self._report()
        close_at = connection.close_at
        if close_at is not None and time.monotonic() >= close_at:
            if not self.closed:
                await send(Closed())
            return True
        return False

    async def _run_timer_trio(self) -> None:
        """trio: one task per connection: shutdown, ping timeout, grace, age, linger, close."""
        connection = self._goaway
        assert connection is not None
        terminated = self.context.terminated
        while not self.closed:
            deadline = connection.next_deadline()
            self._armed = deadline
            now = time.monotonic()
            if deadline is None or deadline > now:
                watched = [self._wake] if self._shutdown_seen else [self._wake, terminated]
                await _wait_trio(watched, None if deadline is None else deadline - now)
                await self._wake.clear()
                if self.closed:
                    break
            if not self._shutdown_seen and terminated.is_set():
                self._shutdown_seen = True
                connection.start_drain("shutdown")
            if await self._step():
                break
        self._armed = None

    def _report(self) -> None:
        connection = self._goaway
        assert connection is not None
        if self._meter is None:
            self._meter = ConnectionMeter()
        self._meter.update(connection)

    def _log_drain(self) -> None:
        """One line per drain, on hypercorn's error log and logger ``goaway_ext.hypercorn``."""
        connection = self._goaway
        assert connection is not None
        if self._logged:
            return
        self._logged = True
        stats = connection.stats
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        if stats.drain_duration is not None:
            outcome = f"drained in {stats.drain_duration:.3f}s"
        else:
            outcome = f"closed by the peer while draining ({connection.drain_state.value})"
        line = (f"goaway_ext: drained HTTP/2 connection from {peer}: reason={connection.drain_reason} "
                f"last_stream_id={connection.last_stream_id} requests={stats.requests_seen} "
                f"goaways={stats.goaways_sent} refused={stats.streams_refused} cut={stats.streams_cut}: {outcome}")
        log.info(line)
        if not self._spawn(self.config.log.info, line):
            error_logger = getattr(self.config.log, "error_logger", None)
            if error_logger is not None:
                error_logger.info(line)


# -- worker processes ------------------------------------------------------------------

#: Seconds the parent waits, past ``graceful_timeout``, for workers to finish their
#: lifespan shutdown before it kills them.
WORKER_EXIT_MARGIN = 5.0

_WORKER_FUNCTIONS = {
    "asyncio": ("hypercorn.asyncio.run", "asyncio_worker"),
    "uvloop": ("hypercorn.asyncio.run", "uvloop_worker"),
    "trio": ("hypercorn.trio.run", "trio_worker"),
}


def _worker_main(config: Config, sockets: Any, shutdown_event: Any, host_load: Any = None, slot: int = 0) -> None:
    """A spawned worker: the hook installed, SIGTERM turned into hypercorn's graceful shutdown.

    ``host_load`` (the host's shared counts, for fair share) and ``slot`` (this
    worker's place in it) come from the parent.
    """
    from hypercorn.utils import NoAppError

    global _WORKER_SLOT
    if host_load is not None:
        _WORKER_SLOT = (HostLoad(array=host_load), slot)
    install_protocol()
    # A SIGTERM sent to the whole process group (systemd, ``kill -- -PGID``)
    # reaches the workers too; without this it would kill them mid-request.
    signal.signal(signal.SIGTERM, lambda *_: shutdown_event.set())
    module, name = _WORKER_FUNCTIONS[config.worker_class]
    worker = getattr(importlib.import_module(module), name)
    try:
        worker(config=config, sockets=sockets, shutdown_event=shutdown_event)
    except NoAppError as exc:
        print(f"python -m goaway_ext.hypercorn: {exc}", file=sys.stderr)
        sys.exit(2)


def _run_reloading(config: Config) -> int:
    """hypercorn's ``run`` with its reloader, its worker function swapped for :func:`_worker_main`.

    Why: the reloader spawns fresh worker processes, in which the hook
    installed here does not exist; hypercorn's ``run`` imports the worker
    function from its module when called, so for the time of the call that
    module attribute is ours, which installs the hook and then runs
    hypercorn's worker (its keyword arguments are the same).
    """
    import hypercorn.run as hypercorn_run

    install_protocol()
    if config.worker_class not in _WORKER_FUNCTIONS:
        return int(hypercorn_run.run(config))  # hypercorn names the bad worker class
    module = importlib.import_module(_WORKER_FUNCTIONS[config.worker_class][0])
    name = _WORKER_FUNCTIONS[config.worker_class][1]
    original = getattr(module, name)
    setattr(module, name, _worker_main)
    try:
        return int(hypercorn_run.run(config))
    finally:
        setattr(module, name, original)


def run(config: Config) -> int:
    """``hypercorn.run.run``, except that shutdown waits for every worker to drain.

    hypercorn's own ``run`` terminates the other workers as soon as one exits,
    which cuts their requests in flight. Here, on SIGTERM or SIGINT, every
    worker drains its own connections and the parent waits for all of them,
    up to ``graceful_timeout`` plus :data:`WORKER_EXIT_MARGIN` (for the
    application's lifespan shutdown), then kills what is left. A worker
    that exits with 0 on its own (hypercorn's ``--max-requests``) is replaced;
    one that fails stops the server the same graceful way. With
    ``workers = 0`` this is hypercorn's ``run``; with ``--reload``, hypercorn's
    ``run`` and its reloader, whose spawned workers install the hook first.
    """
    import hypercorn.run as hypercorn_run
    from hypercorn.utils import write_pid_file

    if config.workers == 0:
        install_protocol()
        return int(hypercorn_run.run(config))
    if config.use_reloader:
        return _run_reloading(config)
    if config.worker_class not in _WORKER_FUNCTIONS:
        raise ValueError(f"No worker of class {config.worker_class} exists")
    if config.pid_path is not None:
        write_pid_file(config.pid_path)
    sockets = config.create_sockets()
    context = multiprocessing.get_context("spawn")
    shutdown_event = context.Event()
    processes: list[Any] = []
    state = {"stopping": False, "reloading": False}
    # Fair share: the host's counts (made with the publisher when the config was checked);
    # each worker writes its own slot, 1..workers, and a slot is cleared when its worker exits.
    policy_for(config)
    host = _HOSTS.get(config)
    slots: dict[Any, int] = {}

    def exited(process: Any) -> None:
        index = slots.pop(process, None)
        if index is not None and host is not None:
            host.load.clear(index)

    def stop(*_: Any) -> None:
        state["stopping"] = True
        shutdown_event.set()

    def reload(*_: Any) -> None:
        state["reloading"] = True
        shutdown_event.set()

    def populate() -> None:
        # Workers inherit SIGINT ignored: the parent alone turns it into a shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while len(processes) < config.workers:
            kwargs: dict[str, Any] = {"config": config, "sockets": sockets, "shutdown_event": shutdown_event}
            free = 0
            if host is not None:
                free = min(set(range(1, host.load.slots)) - set(slots.values()))
                kwargs.update(host_load=host.load.array, slot=free)
            process = context.Process(target=_worker_main, kwargs=kwargs)
            process.daemon = config.daemon
            process.start()
            processes.append(process)
            if host is not None:
                slots[process] = free
        signal.signal(signal.SIGINT, stop)

    exitcode = 0
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)
    try:
        populate()
        while processes and not state["stopping"]:
            # A timeout, because a signal does not interrupt the wait (PEP 475):
            # the shutdown deadline below must start when the signal arrives.
            multiprocessing.connection.wait([process.sentinel for process in processes], timeout=0.5)
            for process in [p for p in processes if p.exitcode is not None]:
                process.join()
                processes.remove(process)
                exited(process)
                if process.exitcode != 0 and not state["stopping"] and not state["reloading"]:
                    exitcode = process.exitcode
                    stop()
            if state["reloading"] and not state["stopping"]:
                for process in processes:
                    process.join()
                    exited(process)
                processes.clear()
                shutdown_event.clear()
                state["reloading"] = False
            if not state["stopping"]:
                populate()
        # Shutdown: every worker drains; wait for all of them, not just the first.
        deadline = time.monotonic() + float(config.graceful_timeout) + WORKER_EXIT_MARGIN
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.exitcode is None:
                print(f"goaway_ext: worker {process.pid} still running {config.graceful_timeout} s + "
                      f"{WORKER_EXIT_MARGIN} s after shutdown began; killing it", file=sys.stderr)
                process.kill()
                process.join()
            elif process.exitcode != 0 and exitcode == 0:
                exitcode = process.exitcode
    finally:
        for process in processes:
            if process.exitcode is None:
                process.kill()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()
    return exitcode


# -- command line ----------------------------------------------------------------------

_PROG = "python -m goaway_ext.hypercorn"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, allow_abbrev=False, add_help=False,
        usage=f"{_PROG} [--goaway-... options] [hypercorn options] APPLICATION",
        description="hypercorn with graceful GOAWAY: every hypercorn option, plus these --goaway-... ones "
                    "(also accepted as goaway_... keys in a hypercorn TOML config, e.g. goaway_chance = 0.001).",
    )
    group = parser.add_argument_group("goaway_ext")
    group.add_argument("--goaway-chance", type=float, default=None,
                       help="per-request probability of a graceful GOAWAY (0.001 is usual; max 0.02)")
    group.add_argument("--goaway-max-requests", type=int, default=None,
                       help="drain after about N requests per connection (jittered); "
                            "hypercorn's own --max-requests restarts workers, this does not")
    group.add_argument("--goaway-max-age", type=float, default=None,
                       help="drain connections older than S seconds (jittered)")
    group.add_argument("--goaway-max-idle", type=float, default=None,
                       help="drain connections without an open stream for S seconds (jittered)")
    group.add_argument("--goaway-mode", choices=MODES, default=None,
                       help="graceful (two GOAWAYs + PING, default), single, or idle")
    group.add_argument("--goaway-grace", type=float, default=None,
                       help="hard deadline in seconds after a drain starts (default: none)")
    group.add_argument("--goaway-jitter", type=float, default=None, help="relative spread of budgets (0.1)")
    group.add_argument("--goaway-ping-timeout", type=float, default=None,
                       help="seconds to wait for the PING ACK of a graceful drain (5; on shutdown at most "
                            "half of --graceful-timeout)")
    group.add_argument("--goaway-linger", type=float, default=None,
                       help="seconds the socket stays open once drained (1)")
    group.add_argument("--goaway-seed", type=int, default=None, help="seed for reproducible draws")
    group.add_argument("--goaway-allow-high-chance", action="store_true", default=None,
                       help="accept --goaway-chance above 0.02 (tests and demos)")
    group.add_argument("--goaway-rapid-reset-window", type=int, default=None, metavar="N",
                       help="rapid reset (CVE-2023-44487) limit: close a connection whose client reset more "
                            "than half of its last N streams (default 500; 0 turns it off)")
    group.add_argument("--goaway-max-control-rate", type=int, default=None, metavar="N",
                       help="GOAWAY(ENHANCE_YOUR_CALM) to a client sending more than N frames that ask no work "
                            "(PING, SETTINGS, PRIORITY, WINDOW_UPDATE, empty DATA...) in under a second "
                            "(default 1000; 0 turns it off)")
    fair = parser.add_argument_group(
        "goaway_ext fair share (the options of serve --fair-share; the host, not the worker, is one server "
        "of the fleet)",
        "load-aware GOAWAY: shed only while this host holds more connections than the least-loaded one "
        "(plus a tolerance); --goaway-chance becomes the fallback while the fleet view is stale")
    fair.add_argument("--goaway-fair-share", choices=("haproxy", "peers"), default=None,
                      help="where the fleet's load comes from: HAProxy's stats socket, or the peers' "
                           "--goaway-publish-load")
    fair.add_argument("--goaway-name", default=None, metavar="NAME",
                      help="this host's name in the fleet (its HAProxy server name, or the name its peers see)")
    fair.add_argument("--goaway-haproxy-socket", default=None, metavar="PATH|HOST:PORT",
                      help="with --goaway-fair-share haproxy: HAProxy's stats socket")
    fair.add_argument("--goaway-haproxy-backend", default=None, metavar="NAME",
                      help="with --goaway-fair-share haproxy: the HAProxy backend this host belongs to")
    fair.add_argument("--goaway-peers", default=None, metavar="HOST:PORT,...",
                      help="with --goaway-fair-share peers: the peers' --goaway-publish-load addresses")
    fair.add_argument("--goaway-publish-load", default=None, metavar="[HOST:]PORT",
                      help="publish this host's open connections (all workers) for its peers, from the parent")
    fair.add_argument("--goaway-fair-ceiling", type=float, default=None,
                      help="largest effective chance (default 0.02; above needs --goaway-allow-high-chance)")
    fair.add_argument("--goaway-fair-tolerance", type=float, default=None,
                      help="relative excess over the least-loaded server left alone (default 0.10)")
    fair.add_argument("--goaway-fair-max-drain-rate", type=float, default=None,
                      help="largest fraction of this host's connections drained per second (default 0.05), "
                           "split between the workers")
    fair.add_argument("--goaway-fair-interval", type=float, default=None,
                      help="seconds between fleet-view polls and chance updates (default 1)")
    fair.add_argument("--goaway-fair-max-staleness", type=float, default=None,
                      help="seconds after which the fleet view is stale and --goaway-chance applies (default 5)")
    return parser


def _flag_names(message: str, flags: set[str]) -> str:
    """A policy error in the names the user typed: ``--goaway-chance 0.5``, not ``goaway_chance=0.5``."""
    renamed = message
    if flags & {"goaway_chance", "goaway_fair_ceiling"}:
        renamed = renamed.replace("Set goaway_allow_high_chance = true", "Pass --goaway-allow-high-chance")
    for key in sorted(flags, key=len, reverse=True):
        flag = "--" + key.replace("_", "-")
        renamed = re.sub(rf"(?<![\w-]){key}=", flag + " ", renamed)
        renamed = re.sub(rf"(?<![\w-]){key}(?![\w=])", flag, renamed)
    if renamed != message:
        renamed = renamed.replace("hypercorn config goaway_*: ", "")
    return renamed


def _hypercorn_help(hypercorn_main: Any) -> str:
    """hypercorn's own --help, under our name and without its reStructuredText backquotes."""
    out = io.StringIO()
    argv0 = sys.argv[0] if sys.argv else ""
    sys.argv[:1] = [_PROG]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            hypercorn_main.main(["--help"])
    finally:
        sys.argv[:1] = [argv0]
    return re.sub(r"`([^`]*)`", r"\1", out.getvalue())


def _app_problem(path: str, load: bool) -> str | None:
    """Why ``APPLICATION`` cannot be loaded: the module is looked up, and only loaded when ``load``.

    With worker processes the parent never imports the application (as in
    hypercorn); a missing attribute is then reported by the worker, in one line too.
    """
    module_name = path.split(":")[-2] if path.count(":") == 2 else path.split(":", 1)[0]
    module_path = Path(module_name).resolve()
    import_name = module_path.with_suffix("").name if module_path.is_file() else module_path.name
    sys.path.insert(0, str(module_path.parent))
    try:
        found = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path.pop(0)
    if found is None:
        return (f"cannot load application {path!r}: no module named {import_name!r} "
                f"(looked in {module_path.parent} and on sys.path)")
    if load:
        from hypercorn.utils import NoAppError, load_application

        try:
            load_application(path, 0)
        except NoAppError as exc:
            return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m goaway_ext.hypercorn``: hypercorn's command line with ``--goaway-*`` options.

    Our options are taken out; the rest goes to hypercorn's own parser, so
    every hypercorn option (``--bind``, ``--workers``, ``--config`` ...)
    works as documented there. Values from the command line win over
    ``goaway_*`` keys in a ``--config`` TOML file. Workers are run by
    :func:`run`, so a shutdown waits for every worker's drain.
    """
    import hypercorn.__main__ as hypercorn_main

    global _PROG
    if argv is None and sys.argv and Path(sys.argv[0]).name == "goaway-ext-hypercorn":
        _PROG = "goaway-ext-hypercorn"  # the console script names itself
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if "--version" in args_list:
        from . import __version__

        print(f"goaway_ext {__version__}")
        return 0
    if any(arg in ("-h", "--help") for arg in args_list):
        parser.print_help()
        print("\nhypercorn's options follow.\n")
        print(_hypercorn_help(hypercorn_main), end="")
        return 0
    ours, rest = parser.parse_known_args(args_list)
    overrides = {key: value for key, value in vars(ours).items() if value is not None}
    hypercorn_run = hypercorn_main.run  # type: ignore[attr-defined]

    stock_error = argparse.ArgumentParser.error

    def one_line_error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        # hypercorn's parser would print its 30-line usage before the error.
        self.exit(2, f"{_PROG}: {message} (see {_PROG} --help)\n")

    def run_with_goaway(config: Config) -> int:
        argparse.ArgumentParser.error = stock_error  # type: ignore[method-assign]
        for key, value in overrides.items():
            setattr(config, key, value)
        problem = _app_problem(config.application_path, load=config.workers == 0)
        if problem is not None:
            print(f"{_PROG}: {problem}", file=sys.stderr)
            return 2
        try:
            enable_goaway(config)
        except (TypeError, ValueError) as exc:
            print(f"{_PROG}: {_flag_names(str(exc), set(overrides))}", file=sys.stderr)
            return 2
        policy = policy_for(config)
        lines = [f"goaway_ext: HTTP/2 connections follow {policy!r}"]
        host = _HOSTS.get(config)
        if host is not None and policy is not None and policy.fair_share is not None:  # from goaway_* keys
            # The line above shows this process's controller, with the host's rate; workers hold a part.
            lines.append(drain_rate_line(policy.fair_share.max_drain_rate, host.load.slots - 1))  # its workers
        if host is not None and host.publisher is not None:  # the port, also when the key asked for 0
            lines.append(f"goaway_ext: publishing this host's load on port {host.publisher.port}")
        # A logger of our own: config.log would be cached on the config, which
        # then no longer pickles for spawned workers.
        error_logger = config.logger_class(config).error_logger
        for line in lines:
            log.info(line)
            if error_logger is not None:
                error_logger.info(line)
        return run(config)

    hypercorn_main.run = run_with_goaway  # type: ignore[attr-defined]
    # Only while hypercorn parses its options; put back before anything else runs.
    argparse.ArgumentParser.error = one_line_error  # type: ignore[method-assign]
    sys_argv0 = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = _PROG  # hypercorn's usage and errors then name this command
    try:
        return int(hypercorn_main.main(rest))
    finally:
        argparse.ArgumentParser.error = stock_error  # type: ignore[method-assign]
        hypercorn_main.run = hypercorn_run  # type: ignore[attr-defined]
        if sys.argv:
            sys.argv[0] = sys_argv0


if __name__ == "__main__":
    from goaway_ext.hypercorn import main as _main

    sys.exit(_main())
