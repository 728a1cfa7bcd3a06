"""Fair share for a server made of worker processes, set up from configuration values.

hypercorn (and any pre-fork server) runs N worker processes on one listening
socket. The balancer places a connection on the *host* (HAProxy's server line,
the address a Kubernetes headless Service lists) and the kernel picks the
worker. So the host, not the worker, is one server of the fleet:

- every worker counts its open and serving HTTP/2 connections in its own slot
  of a shared array (:class:`HostLoad`); the host's load is the sum of the
  slots, and every worker sees the same sum;
- one :class:`~goaway_ext.fleet.LoadPublisher` per host, in the process that
  owns the listening socket (hypercorn's parent): peers list one address per
  host and read the host's total there;
- every worker reads the fleet itself (its own HAProxy or peer view: one small
  request per source per interval) and runs its own
  :class:`~goaway_ext.fairshare.FairShare` over its own connections, with the
  host's serving sum as this server's load. Workers then compute the same
  chance from the same numbers, and a worker depends on nobody but its source:
  no reader process to lose. ``max_drain_rate`` is split evenly between the
  workers, so the host as a whole drains at most its rate (plus the one drain
  per second and worker that a small server always gets).

Values come in as the argument names of ``serve --fair-share`` (``fair_share``,
``name``, ``haproxy_socket`` ...); errors name them as the caller spells them.
``serve`` uses the same checks and controller, as a host of one process: both
commands then refuse the same values with the same messages.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .fairshare import FairShare, StaticFleetView
from .fleet import HAProxyFleetView, LoadPublisher, PeerFleetView, PollingFleetView

__all__ = ["ConnectionCounts", "FLEET_VALUES", "FleetSettings", "HostLoad", "LoadSlot", "FleetRunner", "ProcessFleet",
           "drain_rate_line", "fleet_settings", "publish_address", "start_publisher", "worker_drain_rate",
           "worker_fair_share"]

SOURCES = ("haproxy", "peers")

#: The names :func:`fleet_settings` reads: ``serve``'s flags ``--fair-share``, ``--name`` ...
#: with ``-`` as ``_``, and hypercorn's keys without their ``goaway_`` prefix.
FLEET_VALUES = ("fair_share", "name", "haproxy_socket", "haproxy_backend", "peers", "publish_load", "fair_ceiling",
                "fair_tolerance", "fair_max_drain_rate", "fair_interval", "fair_max_staleness")

# FairShare's argument -> the serve-style name of the value that sets it.
_FAIR_ARGUMENTS = {"ceiling": "fair_ceiling", "tolerance": "fair_tolerance", "max_drain_rate": "fair_max_drain_rate",
                   "interval": "fair_interval", "max_staleness": "fair_max_staleness", "fallback": "chance"}


@dataclass(frozen=True)
class FleetSettings:
    """Where the fleet's load comes from and the FairShare knobs, checked (see :func:`fleet_settings`)."""

    source: str | None  # "haproxy", "peers", or None (only publishing)
    name: str
    haproxy_socket: str | None
    haproxy_backend: str | None
    peers: tuple[str, ...]
    publish: tuple[str, int] | None
    ceiling: float
    tolerance: float
    max_drain_rate: float
    interval: float
    max_staleness: float


def publish_address(value: object, label: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (or an int port) as ``(host, port)``; host defaults to 127.0.0.1."""
    if type(value) is int:
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str):
        host, _, port_text = value.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
    else:
        raise TypeError(f"{label} must be '[HOST:]PORT', got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{label} must be '[HOST:]PORT' with a port in 0..65535, got {value!r}")
    return host, int(port_text)


def _relabel(message: str, label: Callable[[str], str]) -> str:
    """A FairShare error in the caller's names: ``ceiling must`` -> ``goaway_fair_ceiling must``.

    A label that is a flag (``--fair-ceiling``) gets its value as typed,
    ``--fair-ceiling 0.5`` rather than ``--fair-ceiling=0.5``.
    """
    for argument, name in sorted(_FAIR_ARGUMENTS.items(), key=lambda item: -len(item[0])):
        named = label(name)
        if named.startswith("-"):
            message = re.sub(rf"(?<![\w-]){argument}=", named + " ", message)
        message = re.sub(rf"(?<![\w-]){argument}(?=[= ]|$)", named, message)
    allow = label("allow_high_chance")
    if allow.startswith("-"):
        message = message.replace("allow_high_chance=True", allow)
    return message


def fleet_settings(values: Mapping[str, Any], label: Callable[[str], str], *, chance: float,
                   allow_high_chance: bool, standalone: Collection[str] = ()) -> FleetSettings | None:
    """Check the fair-share values (serve's argument names) and return them, or None when none is set.

    ``values`` maps ``fair_share``, ``name``, ``haproxy_socket``,
    ``haproxy_backend``, ``peers`` (a list, or one comma-separated string),
    ``publish_load``, ``fair_ceiling``, ``fair_tolerance``,
    ``fair_max_drain_rate``, ``fair_interval``, ``fair_max_staleness`` to
    values (absent or None: the default). ``label`` turns one of those names
    into what the user wrote (a config key, a flag), so every error names the
    value as the user set it. ``chance`` is the fallback. A value set while
    neither ``fair_share`` nor ``publish_load`` is would do nothing, and is
    refused, unless it is in ``standalone`` (serve's ``--name`` is also its
    ``x-backend`` header).
    """
    given = {key: value for key, value in values.items() if value is not None}
    source = given.get("fair_share")
    publish = given.get("publish_load")
    if source is None and publish is None:
        extra = sorted(set(given) - {"fair_share"} - set(standalone))
        if extra:
            raise ValueError(f"{label(extra[0])} is set but {label('fair_share')} is not: set "
                             f"{label('fair_share')} to 'haproxy' or 'peers' (or remove {label(extra[0])})")
        return None
    if source is not None and source not in SOURCES:
        raise ValueError(f"{label('fair_share')} must be 'haproxy' or 'peers', got {source!r}")
    name = given.get("name")
    if not isinstance(name, str) or not name:
        why = f"{label('fair_share')} {source}" if source is not None else label("publish_load")
        raise ValueError(f"{why} needs {label('name')}: this server's name in the fleet (its HAProxy server "
                         f"name, or the name its peers see), got {name!r}")
    socket_path = given.get("haproxy_socket")
    backend = given.get("haproxy_backend")
    peers_value = given.get("peers", ())
    if source == "haproxy":
        for key, value in (("haproxy_socket", socket_path), ("haproxy_backend", backend)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label('fair_share')} haproxy needs {label(key)} (a non-empty string), "
                                 f"got {value!r}")
    elif "haproxy_socket" in given or "haproxy_backend" in given:
        key = "haproxy_socket" if "haproxy_socket" in given else "haproxy_backend"
        raise ValueError(f"{label(key)} is only read with {label('fair_share')} haproxy, {_source_is(source, label)}")
    if isinstance(peers_value, str):
        peers = tuple(p.strip() for p in peers_value.split(",") if p.strip())
    elif isinstance(peers_value, (list, tuple)) and all(isinstance(p, str) for p in peers_value):
        peers = tuple(p.strip() for p in peers_value if p.strip())
    else:
        raise TypeError(f"{label('peers')} must be 'HOST:PORT,...' or a list of 'HOST:PORT' strings, "
                        f"got {peers_value!r}")
    if source == "peers":
        if not peers:
            got = f", got {peers_value!r}" if "peers" in given else ""
            raise ValueError(f"{label('fair_share')} peers needs {label('peers')} (HOST:PORT,...){got}")
        for peer in peers:
            try:
                PeerFleetView._split(peer)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{label('peers')}: {exc}") from None
    elif peers:
        raise ValueError(f"{label('peers')} is only read with {label('fair_share')} peers, {_source_is(source, label)}")
    address = None if publish is None else publish_address(publish, label("publish_load"))
    settings = FleetSettings(
        source=source, name=name, haproxy_socket=socket_path, haproxy_backend=backend, peers=peers, publish=address,
        ceiling=given.get("fair_ceiling", 0.02), tolerance=given.get("fair_tolerance", 0.10),
        max_drain_rate=given.get("fair_max_drain_rate", 0.05), interval=given.get("fair_interval", 1.0),
        max_staleness=given.get("fair_max_staleness", 5.0),
    )
    if source is not None:
        # The controller checks its numbers; a probe over an empty view surfaces its errors now.
        try:
            _controller(settings, StaticFleetView(time.monotonic), chance=chance,
                        allow_high_chance=allow_high_chance, local=lambda: 0.0, workers=1)
        except (TypeError, ValueError) as exc:
            raise type(exc)(_relabel(str(exc), label)) from None
    return settings


def _source_is(source: str | None, label: Callable[[str], str]) -> str:
    """The end of an "only read with" error: what ``fair_share`` is instead."""
    return f"and {label('fair_share')} is not set" if source is None else f"got {label('fair_share')} {source!r}"


def _controller(settings: FleetSettings, view: Any, *, chance: float, allow_high_chance: bool,
                local: Callable[[], float], workers: int) -> FairShare:
    return FairShare(view, settings.name, clock=time.monotonic, fallback=chance, ceiling=settings.ceiling,
                     tolerance=settings.tolerance, max_drain_rate=worker_drain_rate(settings.max_drain_rate, workers),
                     interval=settings.interval, max_staleness=settings.max_staleness,
                     allow_high_chance=allow_high_chance, local=local)


def worker_drain_rate(host_rate: float, workers: int) -> float:
    """Each worker's ``max_drain_rate``: an even part of the host's, so the host drains at most its rate.

    A worker's controller sees the host's connections as its own load, so its
    token bucket is ``host_rate / workers`` times the host's connections per
    second; the workers together get ``host_rate`` times them (plus the one
    drain per second that each worker always may start).
    """
    return host_rate / max(1, workers)


def drain_rate_line(host_rate: float, workers: int) -> str:
    """The startup log line on fair share's drain rate: the host's figure and each worker's part, both named.

    The policy line before it shows the controller of the process that logs
    (the parent: the whole host's rate); a worker's controller holds its part.
    """
    workers = max(1, workers)
    head = (f"goaway_ext: fair share max_drain_rate {host_rate:g} per host (at most {host_rate:.4g} x the host's "
            f"connections start a drain per second")
    if workers == 1:
        return head + ", at least one)"
    share = worker_drain_rate(host_rate, workers)
    return (head + f"), {share:.4g} per worker ({workers} workers, each at most {share:.4g} x the host's "
            f"connections per second, at least one)")


class LoadSlot:
    """One process's counts in a :class:`HostLoad`: written by that process only (its event loop)."""

    __slots__ = ("_array", "_at")

    def __init__(self, array: Any, index: int) -> None:
        self._array = array
        self._at = 2 * index

    def opened(self) -> None:
        """A connection opened: it counts as open and serving."""
        self._array[self._at] += 1.0
        self._array[self._at + 1] += 1.0

    def drained(self) -> None:
        """A connection started its drain: still open, no longer serving."""
        self._array[self._at + 1] -= 1.0

    def closed(self, drained: bool) -> None:
        """A connection closed (``drained``: its drain had started, so it was already out of serving)."""
        self._array[self._at] -= 1.0
        if not drained:
            self._array[self._at + 1] -= 1.0


class HostLoad:
    """The open and serving HTTP/2 connections of every process of one host, in shared memory.

    Slot 0 is the process that made it; slots 1..``workers`` are for worker
    processes, which get the array when they are spawned. Each slot has one
    writer, and a double is written whole, so readers need no lock: a sum
    read while a worker counts is off by that one connection at most.
    """

    __slots__ = ("array", "slots")

    def __init__(self, workers: int = 0, *, array: Any = None) -> None:
        self.slots = workers + 1 if array is None else len(array) // 2
        self.array = array if array is not None else multiprocessing.get_context("spawn").RawArray(
            "d", 2 * self.slots)

    def slot(self, index: int) -> LoadSlot:
        """The writer of slot ``index``."""
        if not 0 <= index < self.slots:
            raise ValueError(f"slot must be in 0..{self.slots - 1}, got {index!r}")
        return LoadSlot(self.array, index)

    def clear(self, index: int) -> None:
        """Forget a process that exited (its connections died with it)."""
        self.array[2 * index] = 0.0
        self.array[2 * index + 1] = 0.0

    def open(self) -> float:
        """The host's open connections (what its peers read)."""
        return float(max(0.0, sum(self.array[0::2])))

    def serving(self) -> float:
        """The host's connections that are not draining (this server's own load for FairShare)."""
        return float(max(0.0, sum(self.array[1::2])))


class ConnectionCounts(Protocol):
    """A host's connection counts, as the fleet sees them: a :class:`HostLoad`, or ``serve``'s one server."""

    def open(self) -> float:
        """Open connections: what the publisher and the peers read."""

    def serving(self) -> float:
        """Connections not draining: the controller's own load (``FairShare(local=)``)."""


def start_publisher(settings: FleetSettings, host: ConnectionCounts, label: str) -> LoadPublisher | None:
    """The host's publisher when ``settings.publish`` is set; an OSError becomes a ValueError naming ``label``."""
    if settings.publish is None:
        return None
    address, port = settings.publish
    try:
        return LoadPublisher(settings.name, host.open, host=address, port=port)
    except OSError as exc:
        raise ValueError(f"{label} {address}:{port}: cannot listen there ({exc.strerror or exc})") from None


def worker_fair_share(settings: FleetSettings, host: ConnectionCounts, *, chance: float, allow_high_chance: bool,
                      workers: int) -> tuple[FairShare, PollingFleetView] | None:
    """A worker's controller and fleet view (not started), or None when the settings only publish.

    ``serve`` is a host of one worker (``workers=1``: the whole drain rate).
    """
    view: PollingFleetView
    if settings.source == "haproxy":
        assert settings.haproxy_socket is not None and settings.haproxy_backend is not None
        view = HAProxyFleetView(settings.haproxy_socket, settings.haproxy_backend, interval=settings.interval)
    elif settings.source == "peers":
        view = PeerFleetView(settings.name, host.open, list(settings.peers), interval=settings.interval)
    else:
        return None
    return _controller(settings, view, chance=chance, allow_high_chance=allow_high_chance, local=host.serving,
                       workers=workers), view


class FleetRunner:
    """Per process: the fleet view's polling thread and a thread that calls ``FairShare.update()``.

    Started by the process's first connection (:meth:`ensure_started`), so a
    process that serves nothing (a parent, a config checked at startup) runs
    no thread. A thread rather than an event-loop task: the same code then
    serves asyncio and trio workers, and ``update()`` only moves each live
    sampler's chance (the controller holds a lock for its own state).
    """

    __slots__ = ("_fair", "_lock", "_owns_view", "_started", "_stop", "_thread", "_view")

    def __init__(self, fair: FairShare, view: PollingFleetView | None, *, owns_view: bool = True) -> None:
        self._fair = fair
        self._view = view
        self._owns_view = owns_view
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fair(self) -> FairShare:
        """The controller this runner updates."""
        return self._fair

    def ensure_started(self) -> None:
        """Start the view's polling and the update thread, once."""
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            if self._view is not None:
                self._view.start()
            self._thread = threading.Thread(target=self._run, name="goaway-ext-fair-share", daemon=True)
            self._thread.start()
            self._started = True

    def _run(self) -> None:
        while True:
            try:
                self._fair.update()
            except Exception:  # a broken view must not stop the updates; the chance stays where it was
                import logging

                logging.getLogger("goaway_ext.fairshare").exception("fair-share update failed")
            if self._stop.wait(self._fair.interval):
                return

    def close(self) -> None:
        """Stop the update thread, and the view's when this runner made the view."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._view is not None and self._owns_view:
            self._view.close()



class ProcessFleet:
    """What one process's connections tell the fleet: counts into its slot, and the runner's start.

    Called by the server once per connection (open, drain start, close),
    never per request.
    """

    __slots__ = ("runner", "slot")

    def __init__(self, slot: LoadSlot | None, runner: FleetRunner | None) -> None:
        self.slot = slot
        self.runner = runner

    def opened(self) -> None:
        """A connection opened (the first one starts the runner)."""
        if self.slot is not None:
            self.slot.opened()
        if self.runner is not None:
            self.runner.ensure_started()

    def drained(self) -> None:
        """A connection started its drain."""
        if self.slot is not None:
            self.slot.drained()

    def closed(self, drained: bool) -> None:
        """A connection closed."""
        if self.slot is not None:
            self.slot.closed(drained)
