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

Every answer read from the network is bounded in size (:data:`MAX_ANSWER_BYTES`,
:data:`MAX_LOAD_BYTES` for a peer) and in time: each source has ``timeout``
seconds in all, from connect to the last byte, so a peer that trickles its
answer is cut off like one that is silent. The publisher bounds what peers
can hold of it: at most ``max_connections`` sockets (the oldest goes when a
new one arrives), ``timeout`` seconds and :data:`MAX_REQUEST_BYTES` each.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from .fairshare import FleetSnapshot, ServerLoad

__all__ = [
    "LOAD_PATH",
    "MAX_ANSWER_BYTES",
    "MAX_LOAD_BYTES",
    "MAX_REQUEST_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "PollingFleetView",
    "HAProxyFleetView",
    "parse_show_stat",
    "PeerFleetView",
    "LoadPublisher",
    "parse_load",
]

#: The path a :class:`LoadPublisher` answers on.
LOAD_PATH = "/goaway-ext/load"
#: Largest answer read from HAProxy (``show stat`` of a large config); more is an error (the view goes stale).
MAX_ANSWER_BYTES = 1 << 20
#: Largest answer read from a peer (a load is about 80 bytes); more and the peer is left out.
MAX_LOAD_BYTES = 16 << 10
#: Largest request a :class:`LoadPublisher` reads (its request line and headers); more is answered 431.
MAX_REQUEST_BYTES = 4 << 10
#: Default cap on the sockets a :class:`LoadPublisher` holds at once.
DEFAULT_MAX_CONNECTIONS = 256
#: Most threads a :class:`PeerFleetView` asks peers with (more peers wait their turn within the timeout).
MAX_ASKING_THREADS = 128


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


def _read_all(sock: socket.socket, deadline: float, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """Everything until EOF, at most ``limit`` bytes, by ``deadline`` (monotonic) in all.

    The deadline covers the whole answer, not each read: a source that sends a
    byte now and then would otherwise hold the reader for ever.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole answer in time ({size} bytes so far)")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"answer longer than {limit} bytes")
        chunks.append(chunk)


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no time left to connect")
    return socket.create_connection((host, port), timeout=left)


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

    def _connect(self, deadline: float) -> socket.socket:
        if "/" in self._address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            sock.connect(self._address)
            return sock
        host, _, port = self._address.rpartition(":")
        return _connect(host, int(port), deadline)

    def fetch(self) -> tuple[ServerLoad, ...]:
        """Ask ``show stat`` once and parse the backend's rows (``timeout`` seconds in all)."""
        deadline = time.monotonic() + self._timeout
        with contextlib.closing(self._connect(deadline)) as sock:
            sock.settimeout(self._timeout)
            sock.sendall(b"show stat\n")
            answer = _read_all(sock, deadline)
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
    ``max_age`` is left out. Garbage, errors, silence, an answer over
    :data:`MAX_LOAD_BYTES` and one that has not ended within ``timeout``
    (from the connect on) count the same. A peer still being asked from an
    earlier poll is not asked again until that ask ended.
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
        # One thread per peer (up to MAX_ASKING_THREADS): slow peers cannot hold up the others'
        # asks, and each ask ends by its deadline, so no thread stays stuck.
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_ASKING_THREADS, len(self._peers))),
                                        thread_name_prefix="goaway-ext-peer")
        self._asking: dict[str, Future[ServerLoad]] = {}
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

    def _ask(self, host: str, port: int, deadline: float) -> ServerLoad:
        with _connect(host, port, deadline) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(f"GET {LOAD_PATH} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            answer = _read_all(sock, deadline, MAX_LOAD_BYTES)
        head, sep, body = answer.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
            raise ValueError(f"not an HTTP 200 answer: {answer[:80]!r}")
        return parse_load(body)

    def fetch(self) -> tuple[ServerLoad, ...]:
        """Ask every peer at once; keep answers younger than ``max_age``; add this server."""
        deadline = time.monotonic() + self._timeout
        left_out: dict[str, str] = {}
        futures: dict[Future[ServerLoad], str] = {}
        for host, port in self._peers:
            where = f"{host}:{port}"
            running = self._asking.get(where)
            if running is not None and not running.done():
                left_out[where] = "still being asked since an earlier poll"
                continue
            future = self._pool.submit(self._ask, host, port, deadline)
            self._asking[where] = future
            futures[future] = where
        done, _ = wait(futures, timeout=self._timeout + 0.1)
        now = self._clock()
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


class _Peer:
    """One socket the publisher holds: what it read, what it still has to send, and its deadline."""

    __slots__ = ("deadline", "received", "sock", "unsent")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = b""
        self.unsent = b""


def _answer(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


class LoadPublisher:
    """Publishes this server's load on ``GET /goaway-ext/load`` for its peers' :class:`PeerFleetView`.

    A small HTTP/1.0 server on one daemon thread (a selector, no thread per
    connection): ``local`` is called per request for the current connections.
    Anything but ``GET`` of :data:`LOAD_PATH` gets 404 (405 for another
    method, 400 for what is not HTTP). ``port`` 0 picks a free port (see
    :attr:`port`).

    What peers (or anybody who can reach the port) can hold of it is bounded,
    so a flood, a slow client or garbage cannot stop it answering a
    well-behaved peer: each connection has ``timeout`` seconds from accept to
    its last answer byte and :data:`MAX_REQUEST_BYTES` of request (more:
    431); at most ``max_connections`` are held at once, and a new one past
    that closes the oldest (a real peer sends its request at once and is
    answered in the same turn, so only a socket that sends nothing is that
    old). Memory is then at most about ``max_connections`` times
    :data:`MAX_REQUEST_BYTES`, and the thread count is one.
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        ServerLoad(name, 0, capacity)  # validates name and capacity
        if not callable(local):
            raise TypeError(f"local must be callable, got {local!r}")
        if type(max_connections) is not int or max_connections < 1:
            raise ValueError(f"max_connections must be an int of at least 1, got {max_connections!r}")
        self._name = name
        self._local = local
        self._capacity = capacity
        self._timeout = _positive("timeout", timeout)
        self._max_connections = max_connections
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.setblocking(False)
        self._port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # Accept order is deadline order (every socket gets the same timeout), so the
        # oldest socket is both the first to expire and the one a full house closes.
        self._peers: dict[socket.socket, _Peer] = {}
        self._stopping = False
        #: Answers sent (any status).
        self.answered = 0
        #: Sockets closed for being the oldest when ``max_connections`` were held.
        self.evicted = 0
        #: Sockets closed at their deadline, their request or answer unfinished.
        self.timed_out = 0
        self._thread = threading.Thread(target=self._run, name="goaway-ext-load", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The TCP port the publisher listens on (still known after :meth:`close`)."""
        return self._port

    @property
    def max_connections(self) -> int:
        """Most sockets held at once."""
        return self._max_connections

    @property
    def open_connections(self) -> int:
        """Sockets held now (never above :attr:`max_connections`)."""
        return len(self._peers)

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                self._expire(now)
                wait_for = 0.5
                if self._peers:
                    wait_for = max(0.0, min(wait_for, next(iter(self._peers.values())).deadline - now))
                for key, _ in self._selector.select(wait_for):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        assert isinstance(sock, socket.socket)
                        peer = self._peers.get(sock)
                        if peer is not None:
                            self._serve(peer)
        finally:
            for sock in list(self._peers):
                self._drop(sock)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()

    def _expire(self, now: float) -> None:
        while self._peers:
            sock, peer = next(iter(self._peers.items()))
            if peer.deadline > now:
                return
            self.timed_out += 1
            self._drop(sock)

    def _accept(self) -> None:
        for _ in range(64):  # a burst, then the others get their turn
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors: make room, take the rest next turn
                if self._peers:
                    self.evicted += 1
                    self._drop(next(iter(self._peers)))
                return
            if len(self._peers) >= self._max_connections:
                self.evicted += 1
                self._drop(next(iter(self._peers)))
            sock.setblocking(False)
            self._peers[sock] = _Peer(sock, time.monotonic() + self._timeout)
            self._selector.register(sock, selectors.EVENT_READ, None)

    def _drop(self, sock: socket.socket) -> None:
        self._peers.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()

    def _serve(self, peer: _Peer) -> None:
        sock = peer.sock
        if peer.unsent:
            self._send(peer)
            return
        try:
            chunk = sock.recv(MAX_REQUEST_BYTES + 1 - len(peer.received))
        except BlockingIOError:
            return
        except OSError:
            self._drop(sock)
            return
        if not chunk:
            self._drop(sock)
            return
        peer.received += chunk
        head, sep, _ = peer.received.partition(b"\r\n\r\n")
        if not sep:
            head, sep, _ = peer.received.partition(b"\n\n")
        if not sep:
            if len(peer.received) > MAX_REQUEST_BYTES:
                self._reply(peer, _answer("431 Request Header Fields Too Large", b"request too large\n"))
            return
        self._reply(peer, self._respond(head))

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _answer("400 Bad Request", b"not an HTTP/1 request\n")
        method, path = parts[0], parts[1]
        if path != LOAD_PATH.encode():
            return _answer("404 Not Found", b"not found\n")
        if method != b"GET":
            return _answer("405 Method Not Allowed", b"GET only\n")
        try:
            connections = float(self._local())
        except Exception:  # the server's own count failed: say so, do not die
            return _answer("500 Internal Server Error", b"load unavailable\n")
        body = json.dumps({"name": self._name, "connections": connections, "capacity": self._capacity}).encode()
        return _answer("200 OK", body, "application/json")

    def _reply(self, peer: _Peer, answer: bytes) -> None:
        peer.received = b""
        peer.unsent = answer
        self.answered += 1
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(peer.sock, selectors.EVENT_WRITE, None)
        self._send(peer)

    def _send(self, peer: _Peer) -> None:
        try:
            sent = peer.sock.send(peer.unsent)
        except BlockingIOError:
            return
        except OSError:
            self._drop(peer.sock)
            return
        peer.unsent = peer.unsent[sent:]
        if not peer.unsent:
            self._drop(peer.sock)  # HTTP/1.0: the answer ends with the connection

    def close(self) -> None:
        """Stop answering, close every socket and release the port."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join()
        self._wake_w.close()

    def __enter__(self) -> LoadPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
