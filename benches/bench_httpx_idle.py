"""Stock httpx against ``python -m goaway_ext serve --mode idle``: requests lost per workload.

The client is ``httpx.AsyncClient(http2=True, http1=False)`` (httpcore underneath,
nothing of goaway_ext), 10 concurrent tasks, three workloads:

- ``busy``: 10 tasks send 200 GETs back to back, plus 10 one-second watches;
- ``random``: the same with a random 0-30 ms pause after each GET;
- ``bursts``: 20 bursts of 10 concurrent GETs, 0.3 s apart.

Each line prints the GETs and watches that succeeded and failed, and the
server's GOAWAY and connection counts (``GET /stats``). Extra arguments go to
``serve`` (e.g. ``--ping-timeout 0.2``). Baseline: the same run against an
older checkout (``PYTHONPATH=/path/to/checkout``).

Usage: python benches/bench_httpx_idle.py [--quick | --chance 1.0,0.02] [serve options...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys

import httpx

from goaway_ext.asyncio_server import configure_parser


async def run(port: int, workload: str) -> tuple[collections.Counter[str], dict[str, int]]:
    outcome: collections.Counter[str] = collections.Counter()
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(http2=True, http1=False, timeout=30) as client:

        async def get() -> None:
            try:
                response = await client.get(url + "/")
                outcome["get ok" if response.status_code == 200 else "get bad"] += 1
            except httpx.HTTPError:
                outcome["get failed"] += 1

        async def watch() -> None:
            try:
                response = await client.get(url + "/watch?seconds=1")
                outcome["watch ok" if response.text.count("event") == 2 else "watch cut"] += 1
            except httpx.HTTPError:
                outcome["watch failed"] += 1

        async def worker(count: int, pause: float) -> None:
            for _ in range(count):
                await get()
                if pause:
                    await asyncio.sleep(random.uniform(0, pause))

        if workload == "bursts":
            for _ in range(20):
                await asyncio.gather(*[get() for _ in range(10)])
                await asyncio.sleep(0.3)
        else:
            pause = 0.03 if workload == "random" else 0.0
            await asyncio.gather(*[worker(20, pause) for _ in range(10)], *[watch() for _ in range(10)])
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        stats = (await client.get(url + "/stats")).json()
    return outcome, stats


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest for ``serve``.

    The rest is checked against serve's own parser here, before any run: a word
    that neither takes would otherwise reach the first serve, which would refuse
    it only after this script had started its measurements.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other options go to serve.")
    parser.add_argument("--chance", default="1.0,0.02", help="comma-separated chances (default 1.0,0.02)")
    parser.add_argument("--quick", action="store_true", help="chance 1.0 only (the harshest; what make bench runs)")
    args, serve_args = parser.parse_known_args(argv)
    serve_parser = argparse.ArgumentParser(prog=f"{parser.prog} (serve options)")
    configure_parser(serve_parser)
    _, unknown = serve_parser.parse_known_args(serve_args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither this script's options nor serve's)")
    return args, serve_args


def main() -> int:
    args, serve_args = parse_args()
    for chance in ["1.0"] if args.quick else args.chance.split(","):
        for workload in ("busy", "random", "bursts"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "goaway_ext", "serve", "--port", "0", "--mode", "idle", "--chance", chance,
                 "--allow-high-chance", "--linger", "0.5", "--log-level", "WARNING", *serve_args],
                stdout=subprocess.PIPE, text=True,
            )
            assert proc.stdout is not None
            port = int(proc.stdout.readline().rsplit(":", 1)[1])
            try:
                outcome, stats = asyncio.run(run(port, workload))
            finally:
                proc.terminate()
                proc.wait(10)
            print(f"chance {chance:>5} {workload:7s} GET ok {outcome['get ok']:3d} failed {outcome['get failed']:3d}"
                  f" | watch ok {outcome['watch ok']:2d} failed {outcome['watch failed'] + outcome['watch cut']:2d}"
                  f" | GOAWAYs {stats['goaways_sent']:3d}, connections {stats['connections_opened'] - 1:3d}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
