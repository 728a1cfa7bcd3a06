"""``python -m goaway_ext load URL``: an HTTP/2 load generator that follows GOAWAY.

nghttp2's ``h2load`` counts every request still queued on a connection as
failed once a GOAWAY arrives, so it cannot measure a server that rebalances.
This one holds C connections (each an :class:`~goaway_ext.H2Client` that
reconnects as soon as its connection drains), keeps M streams in flight on
each, retries refused streams, and prints an h2load-style summary plus the
connections opened and GOAWAYs seen. ``--processes P`` splits the connections
over P processes when one core cannot keep the server busy.

:func:`run_load` is the same thing as a function returning a :class:`LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._cli import fail
from .asyncio_client import H2Client, H2ClientError, NotHTTP2Error

__all__ = ["LoadResult", "configure_parser", "run_command", "run_load", "run_load_async"]

_PROGRESS_EVERY = 0.5


@dataclass
class LoadResult:
    """What a load run measured; ``summary()`` prints it the way h2load does."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    duration: float = 0.0
    connections: int = 0
    connections_opened: int = 0
    goaways_received: int = 0
    streams_refused: int = 0
    requests_retried: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def requests_per_second(self) -> float:
        """Finished requests (succeeded or failed) per second of wall time."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    def latency(self) -> dict[str, float]:
        """Request latency in seconds: min, mean, max, sd, p50, p99 (zeros when none)."""
        values = sorted(self.latencies)
        if not values:
            return {"min": 0.0, "mean": 0.0, "max": 0.0, "sd": 0.0, "p50": 0.0, "p99": 0.0}
        mean = sum(values) / len(values)
        variance = sum((v - mean) ** 2 for v in values) / len(values)

        def rank(q: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

        return {"min": values[0], "mean": mean, "max": values[-1], "sd": math.sqrt(variance),
                "p50": rank(0.50), "p99": rank(0.99)}

    def merge(self, other: LoadResult) -> None:
        """Add another process's counts to this one (durations: the longest)."""
        for name in ("requests", "succeeded", "failed", "connections", "connections_opened", "goaways_received",
                     "streams_refused", "requests_retried"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.duration = max(self.duration, other.duration)
        for mine, theirs in ((self.status, other.status), (self.errors, other.errors)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.latencies.extend(other.latencies)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no raw latencies)."""
        return {
            "requests": self.requests, "succeeded": self.succeeded, "failed": self.failed,
            "duration": self.duration, "requests_per_second": self.requests_per_second,
            "latency": self.latency(), "connections": self.connections,
            "connections_opened": self.connections_opened, "goaways_received": self.goaways_received,
            "streams_refused": self.streams_refused, "requests_retried": self.requests_retried,
            "status": self.status, "errors": self.errors,
        }

    def summary(self) -> str:
        """Human-readable lines in h2load's layout."""
        lat = self.latency()
        codes = Counter({"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
        for code, count in self.status.items():
            codes[f"{code[0]}xx"] += count

        def ms(value: float) -> str:
            return f"{value * 1000:.2f}ms"

        lines = [
            f"finished in {self.duration:.2f}s, {self.requests_per_second:.2f} req/s",
            f"requests: {self.requests} total, {self.succeeded} succeeded, {self.failed} failed",
            "status codes: " + ", ".join(f"{codes[k]} {k}" for k in ("2xx", "3xx", "4xx", "5xx")),
            f"connections: {self.connections} held, {self.connections_opened} opened, "
            f"{self.goaways_received} GOAWAYs received, {self.streams_refused} streams refused, "
            f"{self.requests_retried} requests retried",
            f"{'':22}{'min':>10}{'max':>10}{'mean':>10}{'sd':>10}{'p99':>10}",
            f"{'time for request:':22}{ms(lat['min']):>10}{ms(lat['max']):>10}{ms(lat['mean']):>10}"
            f"{ms(lat['sd']):>10}{ms(lat['p99']):>10}",
        ]
        for message, count in sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"error ({count}x): {message}")
        return "\n".join(lines)


class _Budget:
    """Hands out request slots until ``total`` is reached or the deadline passes."""

    def __init__(self, total: int | None, deadline: float | None) -> None:
        self.left = total
        self.deadline = deadline

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _target(url: str) -> tuple[str, int, str, ssl.SSLContext | None]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL must be http://HOST[:PORT]/PATH or https://..., got {url!r}")
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path, context


async def run_load_async(
    url: str,
    *,
    requests: int | None = None,
    connections: int = 1,
    streams: int = 1,
    duration: float | None = None,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 30.0,
    insecure: bool = False,
    progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Run the load in the current event loop; see :func:`run_load`."""
    if requests is None and duration is None:
        raise ValueError("give a request count, a duration, or both")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests!r}")
    if connections < 1 or streams < 1:
        raise ValueError(f"connections and streams must be at least 1, got {connections!r} and {streams!r}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    host, port, path, context = _target(url)
    if context is not None and insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    result = LoadResult(connections=connections)
    clients = [
        H2Client(host, port, ssl=context, timeout=timeout, eager_reconnect=True) for _ in range(connections)
    ]
    started = time.monotonic()
    budget = _Budget(requests, None if duration is None else started + duration)
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()

    def count_clients() -> None:
        result.connections_opened = sum(c.connections_opened for c in clients)
        result.goaways_received = sum(c.goaways_received for c in clients)
        result.streams_refused = sum(c.streams_refused for c in clients)
        result.requests_retried = sum(c.requests_retried for c in clients)

    async def worker(client: H2Client) -> None:
        while budget.take():
            begin = time.monotonic()
            try:
                response = await client.request(method, path, body=body)
            except NotHTTP2Error as exc:  # every request would fail the same way: stop here
                raise H2ClientError(f"the server answered {exc.answered}; this load generator speaks HTTP/2") from exc
            except H2ClientError as exc:
                result.failed += 1
                errors[str(exc)] += 1
            else:
                result.succeeded += 1
                status[str(response.status)] += 1
                result.latencies.append(time.monotonic() - begin)
            result.requests += 1

    async def reporter() -> None:
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            result.duration = time.monotonic() - started
            count_clients()
            if progress is not None:
                progress(result)

    report = asyncio.get_running_loop().create_task(reporter())
    try:
        # Open the C connections first, so they all exist before the clock starts.
        opened = await asyncio.gather(*(c.connect() for c in clients), return_exceptions=True)
        for outcome in opened:
            if isinstance(outcome, BaseException):
                raise H2ClientError(f"cannot start: {outcome}") from outcome
        started = time.monotonic()
        budget.deadline = None if duration is None else started + duration
        await asyncio.gather(*(worker(c) for c in clients for _ in range(streams)))
        result.duration = time.monotonic() - started
    finally:
        report.cancel()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    count_clients()
    result.status = dict(status)
    result.errors = dict(errors)
    return result


# What a child process shares with the parent for progress lines: slot -> LoadResult field.
_PROGRESS_FIELDS = ("requests", "failed", "goaways_received", "connections_opened")


def _child(kwargs: dict[str, Any], done: Any, out: Any) -> None:
    def tick(partial: LoadResult) -> None:
        for slot, name in enumerate(_PROGRESS_FIELDS):
            done[slot] = getattr(partial, name)

    try:
        result = asyncio.run(run_load_async(progress=tick, **kwargs))
        out.put(("ok", result))
    except Exception as exc:  # reported by the parent
        out.put(("error", str(exc) if isinstance(exc, (H2ClientError, ValueError)) else f"{type(exc).__name__}: {exc}"))


def run_load(
    url: str,
    *,
    requests: int | None = None,
    connections: int = 1,
    streams: int = 1,
    duration: float | None = None,
    processes: int = 1,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 30.0,
    insecure: bool = False,
    progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Send ``requests`` (or run for ``duration`` seconds) over ``connections`` x ``streams``.

    With ``processes`` > 1 the connections and the request count are split
    between processes (each runs its own event loop) and the results merged.
    ``progress`` is called about twice a second with the partial result.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes!r}")
    if processes > connections:
        raise ValueError(f"processes ({processes}) cannot exceed connections ({connections})")
    common: dict[str, Any] = {"streams": streams, "duration": duration, "method": method, "body": body,
                              "timeout": timeout, "insecure": insecure}
    if processes == 1:
        return asyncio.run(
            run_load_async(url, requests=requests, connections=connections, progress=progress, **common)
        )
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    counters = []
    children = []
    for i in range(processes):
        share_conns = connections // processes + (1 if i < connections % processes else 0)
        share_reqs = None if requests is None else requests // processes + (1 if i < requests % processes else 0)
        done = ctx.Array("q", len(_PROGRESS_FIELDS))
        counters.append(done)
        kwargs = dict(common, url=url, requests=share_reqs, connections=share_conns)
        child = ctx.Process(target=_child, args=(kwargs, done, out), daemon=True)
        child.start()
        children.append(child)
    merged = LoadResult()
    started = time.monotonic()
    received = 0
    problems: list[str] = []
    limit = (duration or 0) + timeout * 4 + 60
    try:
        while received < processes:
            try:
                kind, payload = out.get(timeout=_PROGRESS_EVERY)
            except Exception:  # queue.Empty: time for a progress line
                if time.monotonic() - started > limit:
                    raise TimeoutError("load processes did not finish in time") from None
                if progress is not None:
                    partial = LoadResult(duration=time.monotonic() - started)
                    for slot, name in enumerate(_PROGRESS_FIELDS):
                        setattr(partial, name, sum(c[slot] for c in counters))
                    progress(partial)
                continue
            received += 1
            if kind == "ok":
                merged.merge(payload)
            else:
                problems.append(payload)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)
    if problems:
        raise H2ClientError("; ".join(dict.fromkeys(problems)))
    return merged


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``load`` command's options (called by ``python -m goaway_ext``)."""
    parser.description = ("An HTTP/2 load generator that follows GOAWAY: C connections, M streams in flight on "
                          "each, refused streams retried, an h2load-style summary (h2load counts the requests "
                          "queued on a connection that got GOAWAY as failed; this one does not).")
    parser.add_argument("url", help="http://HOST:PORT/PATH (h2 prior knowledge) or https://... (ALPN h2)")
    parser.add_argument("-n", "--requests", type=int, default=None, help="total requests (default 1000 "
                        "unless --duration is given)")
    parser.add_argument("-c", "--clients", type=int, default=1, help="connections held open (default 1)")
    parser.add_argument("-m", "--max-concurrent-streams", type=int, default=1,
                        help="streams in flight per connection (default 1)")
    parser.add_argument("-D", "--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("-P", "--processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--method", default="GET", help="request method (default GET)")
    parser.add_argument("--data", default=None, help="request body (a string; sent as UTF-8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-wait timeout in seconds (default 30)")
    parser.add_argument("-k", "--insecure", action="store_true", help="do not verify the server's certificate")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run_command(args: argparse.Namespace) -> int:
    """Run the ``load`` command; exit status 1 when any request failed, 2 (one line on stderr) on a bad option."""
    requests = args.requests
    if requests is None and args.duration is None:
        requests = 1000
    for flag, value in (("-n/--requests", requests), ("-c/--clients", args.clients),
                        ("-m/--max-concurrent-streams", args.max_concurrent_streams),
                        ("-P/--processes", args.processes)):
        if value is not None and value < 1:
            return fail("load", f"{flag} must be at least 1, got {value}")
    if args.duration is not None and not args.duration > 0:
        return fail("load", f"-D/--duration must be positive, got {args.duration:g}")
    if not args.timeout > 0:
        return fail("load", f"--timeout must be positive, got {args.timeout:g}")
    if args.processes > args.clients:
        return fail("load", f"-P/--processes ({args.processes}) cannot exceed -c/--clients ({args.clients}): "
                            "each process holds at least one connection")
    tty = sys.stderr.isatty()
    last_line = [0.0]

    def show(partial: LoadResult) -> None:
        now = time.monotonic()
        if not tty and now - last_line[0] < 1.0:
            return
        last_line[0] = now
        total = f"/{requests}" if requests is not None else ""
        line = (f"progress: {partial.requests}{total} requests, {partial.requests_per_second:.0f} req/s, "
                f"{partial.failed} failed, {partial.goaways_received} GOAWAYs")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        result = run_load(
            args.url, requests=requests, connections=args.clients, streams=args.max_concurrent_streams,
            duration=args.duration, processes=args.processes, method=args.method,
            body=b"" if args.data is None else args.data.encode("utf-8"), timeout=args.timeout,
            insecure=args.insecure, progress=None if args.no_progress else show,
        )
    except (ValueError, H2ClientError, TimeoutError) as exc:
        if tty and not args.no_progress:
            print(file=sys.stderr)
        return fail("load", f"{args.url}: {exc}" if isinstance(exc, H2ClientError) else exc)
    if tty and not args.no_progress:
        print(file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    sys.stdout.flush()
    return 0 if result.failed == 0 else 1
