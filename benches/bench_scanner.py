"""Frame scanner throughput: the Cython ``FrameScanner`` against its pure-Python twin.

Baseline: ``_core_py.FrameScanner`` on the same bytes. Target: the compiled
scanner at least 10x faster. The input is 64 KiB of mixed frames shaped like a
busy client's inbound traffic (HEADERS, DATA of many sizes, WINDOW_UPDATE,
PING, SETTINGS and a few GOAWAYs), fed three ways: as one chunk, in 4 KiB
reads (frame headers split across reads), and with no GOAWAY at all in 16 KiB
reads (the zero-copy path every ordinary read takes), and one GOAWAY among
four 16 KiB DATA frames in one chunk (few frames: the copy that removes the
GOAWAY is the whole cost, so it is written once, never sliced and joined).
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_per_call, report

from goaway_ext import _core_py

try:
    from goaway_ext import _core_c
except ImportError:  # pure-Python install: nothing to compare
    _core_c = None  # type: ignore[assignment]

SIZE = 64 * 1024
TARGET = 10.0


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, stream) + payload


def mixed_frames(goaways: bool, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    stream = 1
    while len(out) < SIZE:
        pick = rng.random()
        if pick < 0.15:
            out += frame(0x1, 0x4, stream, rng.randbytes(rng.randint(8, 60)))  # HEADERS
            stream += 2
        elif pick < 0.75:
            out += frame(0x0, 0, max(1, stream - 2), rng.randbytes(rng.choice([16, 64, 200, 512, 1400])))
        elif pick < 0.9:
            out += frame(0x8, 0, rng.choice([0, 1, 3]), struct.pack(">L", rng.randint(1, 65535)))
        elif pick < 0.95:
            out += frame(0x6, 0, 0, rng.randbytes(8))  # PING
        elif goaways and pick < 0.97:
            out += frame(0x7, 0, 0, struct.pack(">LL", 2**31 - 1, 0))
        else:
            out += frame(0x4, 0x1, 0, b"")  # SETTINGS ACK
    return bytes(out)


def big_data_with_goaway() -> bytes:
    """Four 16 KiB DATA frames with a GOAWAY in the middle: few frames, so the copy is the whole cost."""
    data = frame(0x0, 0, 1, bytes(16375))
    goaway = frame(0x7, 0, 0, struct.pack(">LL", 2**31 - 1, 0))
    return data + data + goaway + data + data


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted from make bench; the run is already short")
    return parser.parse_args(argv)


def main() -> None:
    parse_args()
    if _core_c is None:
        print("compiled core not built: nothing to compare (pure Python only)")
        return
    cases = {
        "64 KiB with GOAWAYs, one chunk": [mixed_frames(True)],
        "64 KiB with GOAWAYs, 4 KiB reads": chunks(mixed_frames(True), 4096),
        "64 KiB without GOAWAY, 16 KiB reads": chunks(mixed_frames(False), 16384),
    }
    # Copy-bound: both twins must copy ~64 KiB to cut the GOAWAY out of a bytes
    # object; memcpy, not scanning, is the cost, so no 10x is possible. Shown, not judged.
    copy_bound = {"one GOAWAY among 16 KiB DATA frames, one 64 KiB chunk": [big_data_with_goaway()]}
    cases.update(copy_bound)
    worst = float("inf")
    for title, pieces in cases.items():
        candidates = {}
        for name, core in (("cython", _core_c), ("python", _core_py)):
            def run(n: int, core: object = core, pieces: list[bytes] = pieces) -> None:
                for _ in range(n):
                    feed = core.FrameScanner().feed  # type: ignore[attr-defined]
                    for piece in pieces:
                        feed(piece)

            candidates[f"{name} FrameScanner"] = run
        results = best_per_call(candidates, 20, rounds=7)
        report(f"scanner: {title} (per 64 KiB)", results, "python FrameScanner", unit="us")
        speedup = results["python FrameScanner"] / results["cython FrameScanner"]
        mb_s = SIZE / results["cython FrameScanner"] / 1e6
        target = "" if title in copy_bound else f" (target >= {TARGET:.0f}x)"
        print(f"  cython: {mb_s:,.0f} MB/s, {speedup:.1f}x the pure twin{target}")
        if title in copy_bound:
            print("  (copy-bound: one 64 KiB memcpy is the floor for both twins; not held to the 10x target)")
            continue
        worst = min(worst, speedup)
    verdict = "meets" if worst >= TARGET else "MISSES"
    print(f"scanner speedup, worst case: {worst:.1f}x — {verdict} the >= {TARGET:.0f}x target")


if __name__ == "__main__":
    main()
