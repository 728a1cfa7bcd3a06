"""Core micro-benchmarks, Cython and pure core, each against its named baseline.

- decision: ``Sampler.sample()`` vs ``random.random() < p`` (target <= 0.6x);
- encoding: ``encode_goaway`` vs ``hyperframe``'s ``GoAwayFrame(...).serialize()``
  (target >= 20x faster) and vs a hand-written ``struct.pack`` version.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from pathlib import Path

from hyperframe.frame import GoAwayFrame

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_per_call, report

from goaway_ext import _core_py

try:
    from goaway_ext import _core_c
except ImportError:  # pure-Python install: bench what exists
    _core_c = None  # type: ignore[assignment]

CORES = [("cython", _core_c), ("python", _core_py)] if _core_c is not None else [("python", _core_py)]
P = 0.001
LOOPS = 1_000_000
_HEAD = struct.Struct(">BHBBLLL")


def struct_goaway(last: int, code: int = 0) -> bytes:
    """The obvious hand-written encoder, for comparison (no validation)."""
    return _HEAD.pack(0, 8, 7, 0, 0, last, code)


def bench_decision() -> None:
    rand = random.random

    def baseline(n: int) -> None:
        for _ in range(n):
            rand() < P  # noqa: B015

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    candidates = {"random.random() < p": baseline, "empty loop": empty}
    for name, core in CORES:
        sample = core.Sampler(P, seed=1).sample

        def run(n: int, sample: object = sample) -> None:
            for _ in range(n):
                sample()  # type: ignore[operator]

        candidates[f"{name} Sampler.sample()"] = run
    results = best_per_call(candidates, LOOPS)
    report(f"decision per request (chance {P}, {LOOPS:,} calls, loop included)", results, "random.random() < p")
    loop = results["empty loop"]
    for name, _core in CORES:
        net = (results[f"{name} Sampler.sample()"] - loop) / (results["random.random() < p"] - loop)
        print(f"  {name} Sampler.sample() vs random.random() < p, loop cost removed: {net:.3f}x (target <= 0.6x)")


def bench_encode() -> None:
    last = 12345

    def hyper(n: int) -> None:
        for _ in range(n):
            GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()

    def packed(n: int) -> None:
        for _ in range(n):
            struct_goaway(last)

    candidates = {"hyperframe GoAwayFrame.serialize()": hyper, "struct.pack (no checks)": packed}
    for name, core in CORES:
        encode = core.encode_goaway

        def run(n: int, encode: object = encode) -> None:
            for _ in range(n):
                encode(last)  # type: ignore[operator]

        candidates[f"{name} encode_goaway()"] = run
    results = best_per_call(candidates, LOOPS // 10)
    report("encode one GOAWAY frame", results, "hyperframe GoAwayFrame.serialize()")
    for name, _core in CORES:
        ours = results[f"{name} encode_goaway()"]
        print(f"  {name} encode_goaway vs struct.pack: {results['struct.pack (no checks)'] / ours:.2f}x faster")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted from make bench; the run is already short")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()
    bench_decision()
    bench_encode()
