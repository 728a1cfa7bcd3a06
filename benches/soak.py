"""``make soak``: the long runs behind docs/reliability.md, and the writer of its tables.

Runs, at full size (each can be scaled down from the command line):

- 1,000,000 requests in memory through ServerConnection/ClientConnection at
  chance 0.02 (about 20,000 drains): 0 lost, RSS growth under 5 MB after the
  warm-up, live objects and allocated blocks flat;
- a late-stream flood and a rapid-reset flood after the final GOAWAY, past
  h2's own memory of 65,536 closed streams: every stream refused, memory flat;
- ``python -m goaway_ext load -n 100000 -c 20 -m 20`` against ``serve`` at
  chance 0.02, and against hypercorn with goaway_ext at chance 0.02: 0 failed,
  connections opened == GOAWAYs + clients, server RSS before and after.

- hostile peers against ``serve`` (benches/hostile.py): rapid resets, reset and
  oversized uploads, never-ending uploads, PING/SETTINGS floods and requests
  from peers that never read, silent sockets; server RSS growth and a
  well-behaved client's latencies on another connection throughout.

Each check rewrites its own row of the generated table in docs/reliability.md
(the hostile peers have their own table, rewritten whole).
``--fuzz-report JUNIT.xml`` instead writes the rows of ``make fuzz`` from
pytest's JUnit XML. Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hyperframe.frame import RstStreamFrame  # noqa: E402
from raw_h2 import RawClient  # noqa: E402
from raw_h2 import parse_frames as parse  # noqa: E402
from soak_support import Footprint, run_in_memory, run_load_command, server_process  # noqa: E402
from test_hostile import start  # noqa: E402

import goaway_ext  # noqa: E402
from goaway_ext import GoawayPolicy, ServerConnection  # noqa: E402

REPORT = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- generated rows: begin -->"
END = "<!-- generated rows: end -->"
HEADER = "| check | size | result | how | last run |\n|---|---|---|---|---|"
MB = 1024 * 1024

Row = tuple[str, str, str, str]  # size, result, how, verdict ("pass"/"FAIL")


def _today() -> str:
    return datetime.date.today().isoformat()


def update_report(rows: dict[str, Row], path: Path = REPORT) -> None:
    """Replace (or add) the rows named in ``rows``; keep every other row as it is."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    existing: dict[str, str] = {}
    order: list[str] = []
    for line in body.strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] in ("check", "---"):
            continue
        existing[cells[0]] = line.strip()
        order.append(cells[0])
    stamp = f"{_today()}, core {goaway_ext.CORE}, Python {platform.python_version()}"
    for name, (size, result, how, verdict) in rows.items():
        mark = "" if verdict == "pass" else "**FAILED**: "
        existing[name] = f"| {name} | {size} | {mark}{result} | {how} | {stamp} |"
        if name not in order:
            order.append(name)
    lines = "\n".join(existing[name] for name in order)
    path.write_text(f"{head}{BEGIN}\n{HEADER}\n{lines}\n{END}{tail}")


def _mb(value: int) -> str:
    return f"{value / MB:+.2f} MB"


# -- the checks ---------------------------------------------------------------------------------


def in_memory(requests: int, chance: float) -> dict[str, Row]:
    last = [0.0]

    def progress(partial: object) -> None:
        now = time.monotonic()
        if now - last[0] > 5:
            last[0] = now
            print(f"  in memory: {getattr(partial, 'requests', 0):,} requests", file=sys.stderr, flush=True)

    result = run_in_memory(requests, chance=chance, concurrency=10, seed=2024, samples=20, progress=progress)
    assert result.warm is not None and result.end is not None
    worst_objects = max(s.objects for s in [*result.samples, result.end]) - result.warm.objects
    worst_blocks = max(s.blocks for s in [*result.samples, result.end]) - result.warm.blocks
    ok = (result.lost == 0 and result.completed == requests and result.rss_growth < 5 * MB
          and worst_objects < 200 and worst_blocks < 2000 and result.connections == result.drains + 1)
    size = (f"{requests:,} requests, chance {chance}, 10 streams in flight; {result.drains:,} drains, "
            f"{result.connections:,} connections")
    res = (f"{result.lost} lost; RSS {_mb(result.rss_growth)} after warm-up (limit 5 MB); live objects "
           f"{result.object_growth:+d} (worst {worst_objects:+d}), allocated blocks {result.block_growth:+d} "
           f"(worst {worst_blocks:+d}) over {len(result.samples) + 1} samples; {result.duration:.0f} s, "
           f"{requests / result.duration:,.0f} req/s")
    print(f"in memory: {size}: {res}")
    return {"In memory: ServerConnection + ClientConnection soak": (size, res, "`make soak`",
                                                                     "pass" if ok else "FAIL")}


def _flood(streams: int, rapid_reset: bool) -> tuple[bool, str]:
    """A drained connection (stream 1 held) hit by ``streams`` late streams; memory after h2's cap."""
    server = ServerConnection(policy=GoawayPolicy(mode="single"))
    client = RawClient()
    start(server, client)
    _, data = client.headers(end_stream=False)  # stream 1, held open: the drain never ends
    server.receive_data(data)
    server.start_drain("soak")
    server.handle_timer(time.monotonic())
    server.data_to_send()
    # h2's closed-stream record fills up to its cap, then its table is resized
    # once more as entries churn (measured: flat from about 1.5x the cap on).
    warm_at = min(2 * ServerConnection.MAX_CLOSED_STREAMS, streams // 2)
    warm: Footprint | None = None
    warm_traced = 0
    tracemalloc.start()
    refused = 0
    sent = 0
    while sent < streams:
        wire = b""
        for _ in range(50):
            stream_id, frame = client.headers()
            wire += frame + (client.reset(stream_id) if rapid_reset else b"")
        sent += 50
        if server.receive_data(wire):
            return False, f"the application saw a late stream near {sent}"
        refused += sum(isinstance(f, RstStreamFrame) for f in parse(server.data_to_send()))
        if warm is None and sent >= warm_at:
            warm = Footprint.now()
            warm_traced = tracemalloc.get_traced_memory()[0]
    end = Footprint.now()
    traced = tracemalloc.get_traced_memory()[0] - warm_traced
    tracemalloc.stop()
    assert warm is not None
    expected = 0 if rapid_reset else streams
    ok = (end.blocks - warm.blocks < 2000 and end.objects - warm.objects < 200 and traced < 256 * 1024
          and refused == expected
          and server.stats.streams_refused == expected and server.open_inbound_streams == 1)
    what = "nothing to refuse (each reset by the client)" if rapid_reset else f"{refused:,} refused"
    cap = ServerConnection.MAX_CLOSED_STREAMS
    where = (f"past h2's closed-stream cap of {cap:,}" if warm_at > 1.5 * cap
             else "before h2's closed-stream memory is full: growth expected")
    return ok, (f"{what}, none reached the application; from stream {warm_at:,} ({where}) to the end: "
                f"live bytes (tracemalloc) {traced / 1024:+.1f} KiB, objects {end.objects - warm.objects:+d}, "
                f"blocks {end.blocks - warm.blocks:+d}, RSS {_mb(end.rss - warm.rss)}")


def floods(streams: int) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for rapid, name in ((False, "Hostile: streams opened after the final GOAWAY"),
                        (True, "Hostile: rapid-reset flood after the final GOAWAY")):
        began = time.monotonic()
        ok, res = _flood(streams, rapid)
        res += f"; {time.monotonic() - began:.0f} s"
        print(f"{name}: {res}")
        rows[name] = (f"{streams:,} streams on one connection", res, "`make soak`", "pass" if ok else "FAIL")
    return rows


def sockets(kind: str, chance: float, requests: int, clients: int, streams: int, processes: int) -> dict[str, Row]:
    name = {"asyncio": "Real sockets: `serve` (asyncio server)",
            "hypercorn": "Real sockets: hypercorn + goaway_ext"}[kind]
    how = f"`python -m goaway_ext load -n {requests} -c {clients} -m {streams}`"
    try:
        with server_process(kind, chance) as server:
            rss_start = server.rss
            summary = run_load_command(server.url, requests, clients, streams, processes,
                                       timeout=max(600.0, requests / 50))
            rss_end = server.rss
    except Exception as exc:  # reported in the row, and the exit status
        return {name: (f"{requests:,} requests", f"{type(exc).__name__}: {exc}", how, "FAIL")}
    opened, goaways = summary["connections_opened"], summary["goaways_received"]
    ok = (summary["failed"] == 0 and summary["succeeded"] == requests and opened == goaways + clients
          and summary["exit_status"] == 0)
    size = f"{requests:,} requests, {clients} connections x {streams} streams, chance {chance}"
    res = (f"{summary['failed']} failed, {summary['succeeded']:,} succeeded; connections opened {opened:,} = "
           f"GOAWAYs {goaways:,} + {clients}; {summary['streams_refused']} refused, "
           f"{summary['requests_retried']} retried; {summary['requests_per_second']:,.0f} req/s, "
           f"p99 {summary['latency']['p99'] * 1000:.1f} ms; server RSS {rss_start / MB:.1f} -> {rss_end / MB:.1f} MB")
    print(f"{name}: {res}")
    return {name: (size, res, how + " (`make soak`)", "pass" if ok else "FAIL")}


HOSTILE_BEGIN = "<!-- hostile rows: begin -->"
HOSTILE_END = "<!-- hostile rows: end -->"


def hostile_table(scale: float, path: Path = REPORT) -> int:
    """Run benches/hostile.py at ``scale`` and rewrite the hostile peers table; the number of failed attacks."""
    import hostile

    rows = hostile.run(scale)
    stamp = f"{_today()}, core {goaway_ext.CORE}, Python {platform.python_version()}, scale {scale}"
    lines = ["| attack | size | limit | result | last run |", "|---|---|---|---|---|"]
    failed = 0
    for name, (size, limit, result) in rows.items():
        if "attack failed" in size or "still open 30 s" in result:
            failed += 1
            result = f"**FAILED**: {result}"
        lines.append(f"| {name} | {size} | {limit} | {result} | {stamp} |")
    text = path.read_text()
    head, rest = text.split(HOSTILE_BEGIN, 1)
    _, tail = rest.split(HOSTILE_END, 1)
    path.write_text(f"{head}{HOSTILE_BEGIN}\n" + "\n".join(lines) + f"\n{HOSTILE_END}{tail}")
    return failed


def fuzz_rows(junit: Path, fuzz_examples: int, stateful_examples: int, stateful_steps: int) -> dict[str, Row]:
    """One row per test case of a ``make fuzz`` run, from pytest's JUnit XML."""
    rows: dict[str, Row] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        module = next((p for p in parts if p.startswith("test_")), parts[-1])  # tests.test_x[.Class]
        test = ".".join([*parts[parts.index(module) + 1 :], case.get("name", "")])
        seconds = float(case.get("time", "0"))
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        size = (f"{stateful_examples:,} runs of up to {stateful_steps} steps" if module == "test_stateful"
                else f"{fuzz_examples:,} examples")
        result = "failed" if failed else "skipped" if skipped else "passed"
        rows[f"Fuzz: `{module}.py::{test}`"] = (size, f"{result} in {seconds:.0f} s", "`make fuzz`",
                                                 "FAIL" if failed else "pass")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1_000_000, help="in-memory requests (default 1,000,000)")
    parser.add_argument("--chance", type=float, default=0.02)
    parser.add_argument("--flood", type=int, default=200_000, help="streams per hostile flood (default 200,000)")
    parser.add_argument("--load-requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--hostile-scale", type=float, default=0.5,
                        help="size of the hostile peers attacks (1.0: 50,000 rapid resets, 1,000,000 PINGs, "
                             "1,000 silent sockets; default 0.5)")
    parser.add_argument("--only", choices=["memory", "flood", "asyncio", "hypercorn", "hostile"], action="append",
                        help="run only these checks (repeatable)")
    parser.add_argument("--no-report", action="store_true", help="print only, do not touch docs/reliability.md")
    parser.add_argument("--fuzz-report", type=Path, help="write make fuzz's rows from this JUnit XML and exit")
    parser.add_argument("--fuzz-examples", type=int, default=20000)
    parser.add_argument("--stateful-examples", type=int, default=2000)
    parser.add_argument("--stateful-steps", type=int, default=80)
    args = parser.parse_args(argv)

    if args.fuzz_report is not None:
        rows = fuzz_rows(args.fuzz_report, args.fuzz_examples, args.stateful_examples, args.stateful_steps)
    else:
        only = set(args.only or ["memory", "flood", "asyncio", "hypercorn", "hostile"])
        rows = {}
        if "hostile" in only:
            if hostile_table(args.hostile_scale):
                print("FAILED: hostile peers (see docs/reliability.md)", file=sys.stderr)
                return 1
            print(f"updated the hostile peers table of {REPORT.relative_to(ROOT)}")
            only.discard("hostile")
        if "memory" in only:
            rows.update(in_memory(args.requests, args.chance))
        if "flood" in only:
            rows.update(floods(args.flood))
        for kind in ("asyncio", "hypercorn"):
            if kind in only:
                rows.update(sockets(kind, args.chance, args.load_requests, args.clients, args.streams,
                                    args.processes))
    if not args.no_report:
        update_report(rows)
        print(f"updated {REPORT.relative_to(ROOT)} ({len(rows)} rows)")
    failed = [name for name, row in rows.items() if row[3] != "pass"]
    for name in failed:
        print(f"FAILED: {name}: {rows[name][1]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
