"""What the demo measures, and how it shows it: time series, summary, table, progress, plot.

One :class:`RunResult` per policy holds requests served per backend per time
bucket (from the ``x-backend`` header of each response) plus the counters that
must stay at zero. The summary answers the demo's questions: how is the load
shared in the last window, how unequal is it (max/min share), and how long after
the rolling restart did the ratio settle under :data:`BALANCED_RATIO` for good.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "BALANCED_RATIO",
    "RunResult",
    "Summary",
    "ProgressLine",
    "format_table",
    "format_columns",
    "write_json",
    "write_plot",
    "restart_label",
    "PlotUnavailable",
]

#: The max/min share ratio under which the demo calls the load balanced.
BALANCED_RATIO = 1.25


@dataclass
class RunResult:
    """Everything recorded for one policy's scenario (times in seconds from its start).

    ``counts[i][b]`` is the number of requests backend ``b`` answered in bucket
    ``i`` (``[i * bucket, (i + 1) * bucket)``). ``events`` lists
    ``(time, backend, what)`` for the rolling restart (``"stop"`` and ``"up"``);
    ``restart_done`` is when the last restarted backend was accepting again.
    ``goaway_counts[i]`` is the number of policy GOAWAYs sent in bucket ``i``
    (empty when the run could not count them). ``capacities``, when set, is
    each backend's relative capacity: the max/min ratio then compares
    requests per unit of capacity (a half-capacity backend is balanced at
    half the requests), and the fair share of :meth:`last_back_after` is
    capacity-weighted.
    """

    policy: str
    backends: list[str]
    bucket: float
    duration: float
    window: float
    counts: list[list[int]] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    restart_done: float | None = None
    requests: int = 0
    failed_requests: int = 0
    watches_opened: int = 0
    watches_interrupted: int = 0
    connections_opened: int = 0
    goaways_received: int = 0
    goaways_sent: int | None = None
    lb: str = "builtin"
    pids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    goaway_counts: list[int] = field(default_factory=list)
    capacities: list[float] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        """Rebuild a result from one entry of the ``--json`` file's ``policies`` list."""
        summary = data.get("summary", {})
        return cls(
            policy=data["policy"],
            backends=list(data["backends"]),
            bucket=float(data["bucket_seconds"]),
            duration=float(data["duration"]),
            window=float(data["window"]),
            counts=[list(row) for row in data["counts"]],
            events=[(float(e["t"]), str(e["backend"]), str(e["what"])) for e in data["events"]],
            restart_done=data.get("restart_done"),
            requests=int(summary.get("requests", 0)),
            failed_requests=int(summary.get("failed_requests", 0)),
            watches_opened=int(summary.get("watches_opened", 0)),
            watches_interrupted=int(summary.get("watches_interrupted", 0)),
            connections_opened=int(summary.get("connections_opened", 0)),
            goaways_received=int(summary.get("goaways_received", 0)),
            goaways_sent=summary.get("goaways_sent"),
            lb=str(data.get("lb", "builtin")),
            options=dict(data.get("options", {})),
            goaway_counts=[int(n) for n in data.get("goaway_counts", [])],
        )

    def record(self, now: float, backend_index: int) -> None:
        """Count one request answered by ``backend_index`` at time ``now``."""
        index = max(0, int(now / self.bucket))
        while len(self.counts) <= index:
            self.counts.append([0] * len(self.backends))
        self.counts[index][backend_index] += 1
        self.requests += 1

    def record_goaway(self, now: float) -> None:
        """Count one GOAWAY the policy sent at time ``now`` (for the plot and the final-window rate)."""
        index = max(0, int(now / self.bucket))
        while len(self.goaway_counts) <= index:
            self.goaway_counts.append(0)
        self.goaway_counts[index] += 1

    def goaways_between(self, start: float, end: float) -> int:
        """Policy GOAWAYs sent in the buckets that lie inside ``[start, end)``."""
        first = max(0, round(start / self.bucket))
        last = min(len(self.goaway_counts), round(end / self.bucket))
        return sum(self.goaway_counts[first:last])

    def window_counts(self, start: float, end: float) -> list[int]:
        """Requests per backend in the buckets that lie inside ``[start, end)``."""
        first = max(0, round(start / self.bucket))
        last = min(len(self.counts), round(end / self.bucket))
        totals = [0] * len(self.backends)
        for row in self.counts[first:last]:
            for b, n in enumerate(row):
                totals[b] += n
        return totals

    def _weighted_ratio(self, counts: list[int]) -> float:
        """max/min of requests per unit of capacity (plain max/min without capacities)."""
        if self.capacities is None:
            return _ratio(counts)
        if not counts or min(counts) == 0:
            return math.inf
        per_unit = [n / c for n, c in zip(counts, self.capacities, strict=True)]
        return max(per_unit) / min(per_unit)

    def _buckets_in_run(self) -> int:
        """Buckets up to the end of the run (requests that finish while the clients stop are left out)."""
        return min(len(self.counts), round(self.duration / self.bucket))

    def summary(self) -> Summary:
        """Compute the numbers of the final table."""
        end = self._buckets_in_run() * self.bucket
        final = self.window_counts(max(0.0, end - self.window), end)
        shares = _shares(final)
        return Summary(
            policy=self.policy,
            lb=self.lb,
            shares=dict(zip(self.backends, shares, strict=True)),
            ratio=self._weighted_ratio(final),
            rebalanced_after=self.rebalanced_after(),
            goaways_sent=self.goaways_sent,
            goaways_received=self.goaways_received,
            connections_opened=self.connections_opened,
            requests=self.requests,
            failed_requests=self.failed_requests,
            watches_opened=self.watches_opened,
            watches_interrupted=self.watches_interrupted,
        )

    def ratio_series(self, smooth: float) -> list[tuple[float, float]]:
        """``(t, max/min ratio over [t - smooth, t))`` at every bucket boundary from ``smooth`` on."""
        series = []
        steps = round(smooth / self.bucket)
        for i in range(steps, self._buckets_in_run() + 1):
            t = i * self.bucket
            series.append((t, self._weighted_ratio(self.window_counts(t - smooth, t))))
        return series

    def share_series(self, smooth: float) -> tuple[list[float], list[list[float]]]:
        """Times and per-backend shares over a sliding window of ``smooth`` seconds (for plots)."""
        times: list[float] = []
        shares: list[list[float]] = [[] for _ in self.backends]
        steps = max(1, round(smooth / self.bucket))
        for i in range(steps, self._buckets_in_run() + 1):
            t = i * self.bucket
            row = _shares(self.window_counts(t - smooth, t))
            times.append(t)
            for b, value in enumerate(row):
                shares[b].append(value)
        return times, shares

    def last_back_after(
        self, smooth: float = 2.0, within: float = 0.2, capacities: Sequence[float] | None = None
    ) -> float | None:
        """Seconds from the last backend's return until its share reached ``1 - within`` of the fair share.

        The share is taken over a sliding window of ``smooth`` seconds, whose
        end is the time reported; None when it never got there (or no restart).
        The fair share is ``1 / backends``, or the backend's part of the total
        when ``capacities`` gives each backend's relative capacity.
        """
        ups = [(t, name) for t, name, what in self.events if what == "up"]
        if not ups:
            return None
        back, name = ups[-1]
        index = self.backends.index(name)
        if capacities is None:
            capacities = self.capacities
        part = 1.0 / len(self.backends) if capacities is None else capacities[index] / sum(capacities)
        target = (1.0 - within) * part
        times, shares = self.share_series(smooth)
        for t, share in zip(times, shares[index], strict=True):
            if t - smooth >= back and share >= target:
                return t - back
        return None

    def rebalanced_after(self, smooth: float | None = None) -> float | None:
        """Seconds from the end of the rolling restart until the ratio stayed under :data:`BALANCED_RATIO`.

        The ratio is taken over a sliding window (``smooth``, default the
        final window) so a single quiet bucket does not count. None means it
        never settled before the run ended.
        """
        if self.restart_done is None:
            return None
        width = self.window if smooth is None else smooth
        series = [(t, r) for t, r in self.ratio_series(width) if t >= self.restart_done]
        if not series or series[-1][1] >= BALANCED_RATIO:
            return None
        settled = series[-1][0]
        for t, r in reversed(series):
            if r >= BALANCED_RATIO:
                break
            settled = t
        # A sliding mean describes the middle of its window, not its end.
        return max(0.0, settled - width / 2 - self.restart_done)


@dataclass
class Summary:
    """The final table's row for one policy (``ratio`` is ``inf`` when a backend got nothing)."""

    policy: str
    lb: str
    shares: dict[str, float]
    ratio: float
    rebalanced_after: float | None
    goaways_sent: int | None
    goaways_received: int
    connections_opened: int
    requests: int
    failed_requests: int
    watches_opened: int
    watches_interrupted: int

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe dict (infinity becomes null, as JSON has no infinity)."""
        data = asdict(self)
        if math.isinf(self.ratio):
            data["ratio"] = None
        return data


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [n / total if total else 0.0 for n in counts]


def _ratio(counts: list[int]) -> float:
    if not counts or min(counts) == 0:
        return math.inf
    return max(counts) / min(counts)


def format_table(summaries: list[Summary], window: float, *, scenario: str = "rolling") -> str:
    """The final table, one row per policy, as plain text."""
    if not summaries:
        return ""
    names = list(summaries[0].shares)
    header = [
        "policy",
        *[f"{name} share" for name in names],
        "max/min",
        f"under {BALANCED_RATIO} after",
        "GOAWAYs sent",
        "connections",
        "requests",
        "failed",
        "watches interrupted",
    ]
    rows = []
    for s in summaries:
        rows.append([
            s.policy,
            *[f"{100 * s.shares[name]:.1f}%" for name in names],
            "inf" if math.isinf(s.ratio) else f"{s.ratio:.2f}",
            "never" if s.rebalanced_after is None else f"{s.rebalanced_after:.1f} s",
            "?" if s.goaways_sent is None else str(s.goaways_sent),
            str(s.connections_opened),
            str(s.requests),
            str(s.failed_requests),
            str(s.watches_interrupted),
        ])
    what = "surge upgrade (the last new backend attached)" if scenario == "surge" else "rolling restart"
    title = (
        f"Shares of requests per backend in the last {window:g} s; "
        f"'under {BALANCED_RATIO} after' counts from the end of the {what}."
    )
    return title + "\n" + format_columns(header, rows)


def format_columns(header: list[str], rows: list[list[str]]) -> str:
    """Align a header and rows as text columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


class ProgressLine:
    """Live progress on stderr: one rewritten line on a terminal, a line every few seconds otherwise.

    A log file or a CI console cannot handle carriage returns, so without a tty
    the same information comes as ordinary lines at ``every`` seconds.
    """

    def __init__(self, stream: TextIO | None = None, *, every: float = 5.0, width: int = 24) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = every
        self._width = width
        self._last_print = -math.inf
        self._dirty = False

    def update(self, label: str, elapsed: float, total: float, shares: dict[str, float], note: str = "") -> None:
        """Show where the run is and the current share per backend."""
        done = min(1.0, elapsed / total) if total > 0 else 1.0
        filled = int(done * self._width)
        bar = "#" * filled + "." * (self._width - filled)
        share_text = " ".join(f"{name} {100 * v:4.1f}%" for name, v in shares.items())
        text = f"{label:<18} [{bar}] {elapsed:5.1f}/{total:.0f} s  {share_text}"
        if note:
            text += f"  {note}"
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
            self._stream.flush()
            self._dirty = True
        elif elapsed - self._last_print >= self._every or elapsed < self._last_print:
            self._stream.write(text + "\n")
            self._stream.flush()
            self._last_print = elapsed

    def message(self, text: str) -> None:
        """A line that stays (a restart step, a warning), above the progress line on a tty."""
        if self._tty and self._dirty:
            self._stream.write("\r\x1b[K")
        self._stream.write(text + "\n")
        self._stream.flush()
        self._dirty = False

    def finish(self) -> None:
        """End the live line so the next output starts on a fresh line."""
        if self._tty and self._dirty:
            self._stream.write("\n")
            self._stream.flush()
        self._dirty = False
        self._last_print = -math.inf


def write_json(
    path: Path, parameters: dict[str, Any], results: list[RunResult], extra: dict[str, Any] | None = None
) -> None:
    """Write the raw time series and the summary of every policy to ``path``."""
    document: dict[str, Any] = {"parameters": parameters, "policies": []}
    for result in results:
        document["policies"].append({
            "policy": result.policy,
            "lb": result.lb,
            "backends": result.backends,
            "bucket_seconds": result.bucket,
            "duration": result.duration,
            "window": result.window,
            "counts": result.counts,
            "events": [{"t": t, "backend": b, "what": w} for t, b, w in result.events],
            "restart_done": result.restart_done,
            "pids": result.pids,
            "errors": result.errors,
            "options": result.options,
            "goaway_counts": result.goaway_counts,
            "summary": result.summary().as_json(),
        })
    if extra:
        document.update(extra)
    path.write_text(json.dumps(document, indent=1) + "\n")


def restart_label(result: RunResult) -> str:
    """What the shaded span of a plot panel says: the rolling restart, or the surge upgrade."""
    stops = sum(1 for _, _, what in result.events if what == "stop")
    if result.options.get("scenario") == "surge":
        return f"surge upgrade: {stops} backends replaced at once, attached one after another"
    return f"rolling restart of {stops} backends"


class PlotUnavailable(RuntimeError):
    """``--plot`` needs matplotlib, an optional extra that is not installed."""


def write_plot(path: Path, results: list[RunResult], smooth: float = 2.0) -> None:
    """Draw share per backend over time, one panel per policy, with the restarts marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: install the 'plot' extra "
            "(pip install '.[plot]' in a checkout)"
        ) from None
    # Each policy gets its share panel and, when the run counted them, a thin
    # GOAWAYs-per-second panel underneath, so "rebalances, then goes quiet" shows at a glance.
    rates = any(result.goaway_counts for result in results)
    rows = 2 * len(results) if rates else len(results)
    ratios = [3, 1] * len(results) if rates else [1] * len(results)
    figure, axes = plt.subplots(rows, 1, figsize=(9, (3.4 if rates else 2.6) * len(results) + 0.6), sharex=True,
                                squeeze=False, gridspec_kw={"height_ratios": ratios})
    share_axes = axes[::2, 0] if rates else axes[:, 0]
    if rates:
        for rate_ax, result in zip(axes[1::2, 0], results, strict=True):
            per_second = [n / result.bucket for n in result.goaway_counts]
            rate_ax.fill_between([(i + 0.5) * result.bucket for i in range(len(per_second))], per_second,
                                 step="mid", color="tab:red", alpha=0.6, linewidth=0)
            rate_ax.set_ylabel("GOAWAYs/s", fontsize=8)
            rate_ax.grid(alpha=0.3)
    for ax, result in zip(share_axes, results, strict=True):
        times, shares = result.share_series(smooth)
        many = len(result.backends) > 8
        for name, series in zip(result.backends, shares, strict=True):
            ax.plot(times, [100 * v for v in series], label=name, linewidth=0.9 if many else 1.6,
                    alpha=0.7 if many else 1.0)
        fair = 100 / len(result.backends)
        ax.axhline(fair, color="grey", linestyle=":", linewidth=1)
        # The y-range follows the data: with 20 backends every share sits near 5%, and a
        # 0-100% axis would squash all of them into one line at the bottom.
        peak = 100 * max((max(series) for series in shares if series), default=fair / 100)
        top = min(100.0, max(2 * fair, 1.1 * peak))
        stops = [t for t, _, what in result.events if what == "stop"]
        ups = [t for t, _, what in result.events if what == "up"]
        label_at = ax.get_xaxis_transform()  # x in data, y in axes fraction
        surge = result.options.get("scenario") == "surge"
        if stops and (many or surge):
            # One shaded span for the whole restart instead of a label per backend.
            ax.axvspan(min(stops), max(ups or stops), color="grey", alpha=0.15, linewidth=0)
            ax.text(min(stops), 0.97, f" {restart_label(result)}", transform=label_at, fontsize=7, va="top",
                    ha="left", alpha=0.8)
        else:
            for t, name, what in result.events:
                if what == "stop":
                    ax.axvline(t, color="black", alpha=0.25, linewidth=1)
                    ax.text(t, 0.03, f"{name} restart ", transform=label_at, fontsize=7, va="bottom",
                            ha="right", rotation=90, alpha=0.7)
        summary = result.summary()
        ratio = "inf" if math.isinf(summary.ratio) else f"{summary.ratio:.2f}"
        count = f", {len(result.backends)} backends, one line each" if many else ""
        ax.set_title(f"{result.policy} ({result.lb} balancer{count}): final max/min {ratio}", fontsize=10)
        ax.set_ylabel("share of requests %")
        ax.set_ylim(0, top)
        if not many:
            ax.legend(loc="upper right", fontsize=8, ncol=len(result.backends))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(f"seconds (share over a sliding {smooth:g} s window)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
