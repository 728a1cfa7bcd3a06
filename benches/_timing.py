"""Shared timing helper: ratios are measured in one run, rounds interleaved.

Each round times every candidate once, in turn, so drift in CPU frequency or
load from other processes hits all of them alike; the best round of each is
kept (the least disturbed measurement of the same work).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_per_call(candidates: dict[str, Callable[[int], None]], loops: int, rounds: int = 7) -> dict[str, float]:
    """Return the best seconds per call for each candidate ``fn(loops)``."""
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn(loops)
            elapsed = (time.perf_counter() - start) / loops
            best[name] = min(best[name], elapsed)
    return best


def report(title: str, results: dict[str, float], baseline: str, unit: str = "ns") -> None:
    """Print each candidate's time and its ratio to ``baseline``."""
    scale = 1e9 if unit == "ns" else 1e6
    base = results[baseline]
    print(title)
    for name, value in results.items():
        ratio = value / base
        print(f"  {name:<42} {value * scale:9.1f} {unit}/call   {ratio:6.3f}x of {baseline} ({1 / ratio:6.1f}x faster)")
