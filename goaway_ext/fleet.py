"""Fleet views that do I/O, for :class:`goaway_ext.fairshare.FairShare`.

Each view polls in a background thread and hands the controller its last good
snapshot at once (``snapshot()`` never blocks and never does I/O), so a slow
or dead source can only make the view stale, and a stale view makes the
controller fall back to its plain chance. Two sources:

- :class:`HAProxyFleetView`: HAProxy's runtime API (``show stat`` on the
  stats socket): every server's current sessions (``scur``) as the balancer
  that places the connections sees them, its weight as capacity, and only
  servers whose status is UP (or unchecked) — a server in maintenance, down
  or draining is left out of the comparison;
- :class:`PeerFleetView`: each backend publishes its own load with a
  :class:`LoadPublisher` (a tiny HTTP endpoint) and reads its peers' (the
  addresses a Kubernetes headless Service gives). All peers are asked at
  once with a short timeout; a peer that does not answer in time, answers
  garbage, or has not answered for ``max_age`` seconds is left out, never
  waited for. There is no coordinator to lose.

Every answer read from the network is bounded (:data:`MAX_ANSWER_BYTES`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .fairshare import FleetSnapshot, ServerLoad

__all__ = [
    "LOAD_PATH",
    "MAX_ANSWER_BYTES",
    "PollingFleetView",
    "HAProxyFleetView",
    "parse_show_stat",
    "PeerFleetView",
    "LoadPublisher",
    "parse_load",
]

#: The path a :class:`LoadPublisher` answers on.
LOAD_PATH = "/goaway-ext/load"
#: Largest answer read from HAProxy or from a peer; more is an error (the source is left out).
MAX_ANSWER_BYTES = 1 << 20


def _positive(name: str, value: object) -> float:
    if type(value) is bool or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number greater than 0, got {value!r}")
    return number


class PollingFleetView:
    """Base of the views that poll: a daemon thread calls :meth:`fetch` every ``interval`` seconds.

    A fetch that raises leaves the last snapshot in place (it ages and goes
    stale); the error is kept in :attr:`last_error`. ``clock`` must be the
    controller's clock, since snapshots are stamped with it. Use as a context
    manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = _positive("interval", interval)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._snapshot: FleetSnapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fetched = threading.Condition()
        self._fetches = 0
        #: The last fetch error (None after a good fetch), for logs and tests.
        self.last_error: BaseException | None = None

    def fetch(self) -> tuple[ServerLoad, ...]:
        """Read the source once (in the polling thread); subclasses implement it."""
        raise NotImplementedError

    def snapshot(self) -> FleetSnapshot | None:
        """The last good snapshot, or None before the first one (never blocks)."""
        return self._snapshot

    def poll_once(self) -> None:
        """Fetch now, in the caller's thread (the polling thread does this every ``interval``)."""
        try:
            servers = self.fetch()
        except Exception as exc:  # any failure of the source only makes the view stale
            self.last_error = exc
        else:
            self._snapshot = FleetSnapshot(servers, self._clock())
            self.last_error = None
        with self._fetched:
            self._fetches += 1
            self._fetched.notify_all()

    def wait_fetches(self, count: int, timeout: float) -> bool:
        """Block until ``count`` fetches (good or bad) have run in all; for tests and start-up."""
        with self._fetched:
            return self._fetched.wait_for(lambda: self._fetches >= count, timeout)

    @property
    def fetches(self) -> int:
        """Fetches run so far, good or bad."""
        return self._fetches

    def start(self) -> None:
        """Start the polling thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._interval)

    def close(self) -> None:
        """Stop the polling thread and wait for it (a fetch in flight ends within its own timeout)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def __enter__(self) -> PollingFleetView:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ValueError(f"answer longer than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)


# HAProxy statuses of a server that takes new connections ("UP 1/3" is going down but still up).
_SERVING = ("UP", "no check", "OPEN")


def parse_show_stat(text: str, backend: str) -> tuple[ServerLoad, ...]:
    """The serving servers of ``backend`` in the CSV of HAProxy's ``show stat``.

    ``scur`` (current sessions: open TCP connections in ``mode tcp``) is the
    load and ``weight`` the capacity. Servers that are down, in maintenance,
    draining (``DRAIN``/``NOLB``) or weighted 0 are left out: they take no new
    connections, so they are no reference for anyone. Raises ValueError when
    the text is not ``show stat`` CSV.
    """
    if not text.startswith("# "):
        raise ValueError(f"not the CSV of 'show stat': {text[:80]!r}")
    rows = csv.DictReader(io.StringIO(text[2:]))
    fields = rows.fieldnames or []
    for needed in ("pxname", "svname", "scur", "status", "weight"):
        if needed not in fields:
            raise ValueError(f"'show stat' has no {needed!r} column: {fields[:12]!r}")
    servers = []
    for row in rows:
        if row["pxname"] != backend or row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        status = (row["status"] or "").strip()
        if not status.startswith(_SERVING):
            continue
        weight = float(row["weight"] or 0)
        if weight <= 0:
            continue
        servers.append(ServerLoad(row["svname"], float(row["scur"] or 0), weight))
    return tuple(servers)


class HAProxyFleetView(PollingFleetView):
    """Every server's open connections, as HAProxy's runtime API reports them.

    ``address`` is the stats socket: a path (``unix`` socket, the usual
    ``stats socket /run/haproxy.sock``) or ``host:port`` (``stats socket
    ipv4@...``). ``backend`` is the HAProxy backend the servers belong to;
    each server's controller uses its HAProxy server name as ``name``. The
    socket needs only ``level user``. ``timeout`` bounds each poll.
    """

    def __init__(
        self,
        address: str,
        backend: str,
        *,
        interval: float = 1.0,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval=interval, clock=clock)
        if not isinstance(address, str) or not address:
            raise TypeError(f"address must be a socket path or host:port, got {address!r}")
        if not isinstance(backend, str) or not backend:
            raise TypeError(f"backend must be a non-empty str, got {backend!r}")
        self._address = address
        self._backend = backend
        self._timeout = _positive("timeout", timeout)

    def _connect(self) -> socket.socket:
        if "/" in self._address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            sock.connect(self._address)
            return sock
        host, _, port = self._address.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=self._timeout)

    def fetch(self) -> tuple[ServerLoad, ...]:
        """Ask ``show stat`` once and parse the backend's rows."""
        with contextlib.closing(self._connect()) as sock:
            sock.settimeout(self._timeout)
            sock.sendall(b"show stat\n")
            answer = _read_all(sock)
        return parse_show_stat(answer.decode("utf-8", "replace"), self._backend)


def parse_load(body: bytes) -> ServerLoad:
    """A peer's answer: ``{"name": str, "connections": number >= 0, "capacity": number > 0}``.

    Anything else raises ValueError or TypeError naming what is wrong.
    """
    data: Any = json.loads(body.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"a load must be a JSON object, got {body[:80]!r}")
    for key in ("name", "connections"):
        if key not in data:
            raise ValueError(f"a load needs {key!r}, got {body[:80]!r}")
    return ServerLoad(data["name"], data["connections"], data.get("capacity", 1.0))


class PeerFleetView(PollingFleetView):
    """This server's own load plus every peer's, read from their :class:`LoadPublisher`.

    ``peers`` are ``http://host:port`` base URLs (or ``host:port``), this
    server's own address may be among them (it is skipped: the local value
    is always fresh). ``local`` returns this server's connections. Each poll
    asks every peer at once, waits at most ``timeout`` seconds in all, and
    keeps what came back; a peer whose last good answer is older than
    ``max_age`` is left out. Garbage, errors and silence count the same.
    """

    def __init__(
        self,
        name: str,
        local: Callable[[], float],
        peers: Sequence[str],
        *,
        capacity: float = 1.0,
        interval: float = 1.0,
        timeout: float = 0.5,
        max_age: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval=interval, clock=clock)
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if not callable(local):
            raise TypeError(f"local must be callable, got {local!r}")
        self._name = name
        self._local = local
        self._capacity = _positive("capacity", capacity)
        self._timeout = _positive("timeout", timeout)
        self._max_age = _positive("max_age", max_age)
        self._peers = [self._split(p) for p in peers]
        self._seen: dict[str, tuple[ServerLoad, float]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(self._peers))),
                                        thread_name_prefix="goaway-ext-peer")
        #: Peers left out at the last poll, with the reason (for logs and tests).
        self.left_out: dict[str, str] = {}

    @staticmethod
    def _split(peer: str) -> tuple[str, int]:
        if not isinstance(peer, str):
            raise TypeError(f"peers must be 'host:port' or 'http://host:port' strings, got {peer!r}")
        parts = urlsplit(peer if "://" in peer else f"http://{peer}")
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"peer must be 'host:port' or 'http://host:port', got {peer!r}")
        return parts.hostname, parts.port

    def _ask(self, host: str, port: int) -> ServerLoad:
        with socket.create_connection((host, port), timeout=self._timeout) as sock:
            sock.settimeout(self._timeout)
            sock.sendall(f"GET {LOAD_PATH} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            answer = _read_all(sock)
        head, sep, body = answer.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
            raise ValueError(f"not an HTTP 200 answer: {answer[:80]!r}")
        return parse_load(body)

    def fetch(self) -> tuple[ServerLoad, ...]:
        """Ask every peer at once; keep answers younger than ``max_age``; add this server."""
        futures = {self._pool.submit(self._ask, host, port): f"{host}:{port}" for host, port in self._peers}
        done, _ = wait(futures, timeout=self._timeout + 0.1)
        now = self._clock()
        left_out: dict[str, str] = {}
        for future, where in futures.items():
            if future not in done:
                left_out[where] = "no answer in time"
                continue
            try:
                load = future.result()
            except Exception as exc:  # garbage, refused, reset: the peer is left out
                left_out[where] = repr(exc)[:200]
                continue
            if load.name != self._name:
                self._seen[load.name] = (load, now)
        self.left_out = left_out
        fresh = [load for load, at in self._seen.values() if now - at <= self._max_age]
        fresh.append(ServerLoad(self._name, float(self._local()), self._capacity))
        return tuple(fresh)

    def close(self) -> None:
        """Stop polling; peer requests in flight end within ``timeout``."""
        super().close()
        self._pool.shutdown(wait=True, cancel_futures=True)


class LoadPublisher:
    """Publishes this server's load on ``GET /goaway-ext/load`` for its peers' :class:`PeerFleetView`.

    A small HTTP/1.0 server in a daemon thread (stdlib ``http.server``):
    ``local`` is called per request for the current connections. Anything
    but ``GET`` of :data:`LOAD_PATH` gets 404; each request has ``timeout``
    seconds to arrive. ``port`` 0 picks a free port (see :attr:`port`).
    """

    def __init__(
        self,
        name: str,
        local: Callable[[], float],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        capacity: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        ServerLoad(name, 0, capacity)  # validates name and capacity
        if not callable(local):
            raise TypeError(f"local must be callable, got {local!r}")
        publisher_timeout = _positive("timeout", timeout)

        class Handler(BaseHTTPRequestHandler):
            """Answers the load path only."""

            timeout = publisher_timeout  # per-connection socket timeout (StreamRequestHandler)

            def do_GET(self) -> None:
                if self.path != LOAD_PATH:
                    self.send_error(404)
                    return
                body = json.dumps({"name": name, "connections": float(local()), "capacity": capacity}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="goaway-ext-load", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The TCP port the publisher listens on."""
        port: int = self._server.server_address[1]
        return port

    def close(self) -> None:
        """Stop answering and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> LoadPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
