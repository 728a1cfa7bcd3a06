"""Unary gRPC RPCs per second: a stock grpclib server vs the same server with goaway_ext.

    python benches/bench_grpclib.py [--rpcs 4000] [--concurrency 8] [--rounds 7] [--chance 0.001]
    python benches/bench_grpclib.py --callgrind      # + server instructions per RPC (Debian valgrind)
    python benches/bench_grpclib.py --vs-grpcio      # the README's before/after table against grpcio

Each server runs in its own process (``--serve stock|goaway``), the same raw-bytes
echo service, started side by side. One client process drives both with the same
``GoawayChannel`` (a stock channel would lose RPCs on the goaway_ext server's
GOAWAYs), rounds interleaved: stock, goaway, stock, goaway... Reported: best
req/s of each, the ratio best/best and the median of the per-round ratios
(target >= 0.99x). On a shared machine wall-clock ratios move by several percent
from run to run; ``--callgrind`` counts the server's instructions per RPC
instead (difference of two runs of different length, so start-up cancels out),
which does not depend on the load of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from grpc_peers import (  # noqa: E402
    EchoService,
    RawCodec,
    grpcio_client_load,
    methods,
    mixed_load,
    start_grpcio_server,
)


def serve(mode: str, chance: float, exit_after: int | None) -> None:
    """Run one server; print its port; with ``exit_after``, stop after that many RPCs."""
    import grpclib.server

    from goaway_ext import GoawayPolicy
    from goaway_ext.grpclib import enable_goaway

    async def main() -> None:
        service = EchoService()
        done = asyncio.Event()
        served = 0
        if exit_after is not None:
            echo = service.unary

            async def counted(stream: object) -> None:
                nonlocal served
                await echo(stream)
                served += 1
                if served >= exit_after:
                    done.set()

            service.unary = counted  # type: ignore[method-assign]
        server = grpclib.server.Server([service], codec=RawCodec())
        if mode == "goaway":
            server = enable_goaway(server, GoawayPolicy(chance, seed=1, allow_high_chance=True))
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        print(server._server.sockets[0].getsockname()[1], flush=True)
        if exit_after is None:
            await asyncio.Event().wait()
        await done.wait()
        await asyncio.sleep(0.05)  # the last replies leave the socket

    asyncio.run(main())


def start_server(mode: str, chance: float, exit_after: int | None = None,
                 prefix: list[str] | None = None) -> tuple[subprocess.Popen[str], int]:
    command = [*(prefix or []), sys.executable, __file__, "--serve", mode, "--chance", str(chance)]
    if exit_after is not None:
        command += ["--exit-after", str(exit_after)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip():
        process.kill()
        raise RuntimeError(f"server {mode} did not start")
    return process, int(line)


async def drive(port: int, rpcs: int, concurrency: int, channel: object | None = None) -> float:
    """Seconds for ``rpcs`` unary RPCs from ``concurrency`` tasks; every one must succeed."""
    from goaway_ext.grpclib import GoawayChannel

    own = channel is None
    chan = GoawayChannel("127.0.0.1", port, codec=RawCodec()) if own else channel
    unary, _, _ = methods(chan)  # type: ignore[arg-type]
    per_task = rpcs // concurrency

    async def worker() -> None:
        for index in range(per_task):
            payload = b"%d" % index
            if await unary(payload) != payload:
                raise AssertionError("wrong echo")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if own:
        chan.close()  # type: ignore[union-attr]
    return elapsed


def throughput(args: argparse.Namespace) -> None:
    from goaway_ext.grpclib import GoawayChannel

    servers = {mode: start_server(mode, args.chance) for mode in ("stock", "goaway")}
    try:
        async def main() -> dict[str, list[float]]:
            channels = {mode: GoawayChannel("127.0.0.1", port, codec=RawCodec())
                        for mode, (_, port) in servers.items()}
            for mode, (_, port) in servers.items():  # warm-up
                await drive(port, args.rpcs // 4, args.concurrency, channels[mode])
            rates: dict[str, list[float]] = {mode: [] for mode in servers}
            for _ in range(args.rounds):
                for mode, (_, port) in servers.items():
                    elapsed = await drive(port, args.rpcs, args.concurrency, channels[mode])
                    rates[mode].append(args.rpcs / elapsed)
            for channel in channels.values():
                channel.close()
            return rates

        rates = asyncio.run(main())
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait()
    stock, goaway = rates["stock"], rates["goaway"]
    pairs = [g / s for s, g in zip(stock, goaway, strict=True)]
    print(f"unary RPCs/s, {args.rpcs} RPCs x {args.rounds} rounds, {args.concurrency} concurrent, "
          f"server processes side by side, rounds interleaved")
    print(f"  stock grpclib server                 best {max(stock):8.0f}  median {statistics.median(stock):8.0f}")
    print(f"  goaway_ext (enable_goaway, {args.chance:g})    best {max(goaway):8.0f}  "
          f"median {statistics.median(goaway):8.0f}")
    print(f"  ratio best/best {max(goaway) / max(stock):.3f}x, median of rounds {statistics.median(pairs):.3f}x "
          f"(target >= 0.99x)")


def callgrind(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None:
        print("callgrind: valgrind is not installed (apt-get install valgrind); skipped")
        return
    short, long = 200, 200 + args.callgrind_rpcs
    configs = {
        "stock grpclib server": ("stock", 0.0),
        "goaway_ext, chance 0 (hot path only)": ("goaway", 0.0),
        f"goaway_ext, chance {args.chance:g}": ("goaway", args.chance),
    }
    per_rpc: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (mode, chance) in configs.items():
            totals = []
            for count in (short, long):
                out = os.path.join(tmp, f"{mode}-{chance}-{count}.out")
                prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q"]
                process, port = start_server(mode, chance, exit_after=count, prefix=prefix)
                asyncio.run(drive(port, count, args.concurrency))
                process.wait(timeout=600)
                text = Path(out).read_text()
                match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
                assert match, "no totals in callgrind output"
                totals.append(int(match.group(1)))
            per_rpc[label] = (totals[1] - totals[0]) / (long - short)
    base = per_rpc["stock grpclib server"]
    print(f"server instructions per unary RPC (callgrind, difference of {short} and {long} RPCs)")
    for label, value in per_rpc.items():
        print(f"  {label:<40} {value:12.0f}   {value / base:.4f}x  (throughput ratio {base / value:.4f}x)")


def python_calls(args: argparse.Namespace, rpcs: int = 500) -> None:
    """Python function calls per unary RPC, server and client in one process (deterministic)."""
    import cProfile
    import pstats

    import grpclib.server

    from goaway_ext import GoawayPolicy
    from goaway_ext.grpclib import GoawayChannel, enable_goaway

    async def count(mode: str, chance: float) -> float:
        server = grpclib.server.Server([EchoService()], codec=RawCodec())
        if mode == "goaway":
            server = enable_goaway(server, GoawayPolicy(chance, seed=1, allow_high_chance=True))
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        channel = GoawayChannel("127.0.0.1", server._server.sockets[0].getsockname()[1], codec=RawCodec())
        unary, _, _ = methods(channel)
        for _ in range(50):
            await unary(b"x")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(rpcs):
            await unary(b"x")
        profile.disable()
        channel.close()
        server.close()
        await server.wait_closed()
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        return sum(entry[1] for entry in stats.values()) / rpcs

    base = asyncio.run(count("stock", 0.0))
    ours = asyncio.run(count("goaway", 0.0))
    print(f"Python calls per unary RPC (server and client in one process, {rpcs} RPCs)")
    print(f"  stock grpclib server                 {base:8.1f}")
    print(f"  goaway_ext, chance 0                 {ours:8.1f}   {ours / base:.4f}x")


def vs_grpcio(args: argparse.Namespace) -> None:
    """The before/after rows: grpcio recycling connections, and grpcio calling our server."""
    import grpclib.client

    from goaway_ext import GoawayPolicy
    from goaway_ext.grpclib import GoawayChannel, GoawayServer

    rpcs, concurrency = args.grpcio_rpcs, 8
    options = [("grpc.max_connection_age_ms", 150), ("grpc.max_connection_age_grace_ms", 10_000)]

    async def against_grpcio(channel_class: type) -> str:
        server, port = await start_grpcio_server(options)
        try:
            channel = channel_class("127.0.0.1", port, codec=RawCodec())
            ok, failed, errors = await mixed_load(channel, rpcs, concurrency)
            opened = getattr(channel, "connections_opened", "-")
            channel.close()
        finally:
            await server.stop(None)
        kinds = sorted({error.split(":")[0] for error in errors})
        return f"{ok} / {failed}" + (f" ({', '.join(kinds)})" if kinds else "") + f" | {opened}"

    async def grpcio_client(policy: GoawayPolicy) -> str:
        server = GoawayServer([EchoService()], codec=RawCodec(), policy=policy)
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        try:
            ok, failed = await grpcio_client_load(server._server.sockets[0].getsockname()[1], rpcs, concurrency)
            stats = server.goaway_stats
            connections, goaways = stats.connections, stats.goaways_total
        finally:
            server.close()
            await server.wait_closed()
        return f"{ok} / {failed} | {connections} / {goaways}"

    print(f"{rpcs} RPCs from {concurrency} tasks, every 4th a 20-message server stream, the rest unary")
    print("| client -> server | RPCs ok / failed | connections opened (/ GOAWAYs) |")
    print("|---|---|---|")
    print(f"| stock grpclib Channel -> grpcio, max_connection_age 150 ms | "
          f"{asyncio.run(against_grpcio(grpclib.client.Channel))} |")
    print(f"| GoawayChannel -> grpcio, max_connection_age 150 ms | {asyncio.run(against_grpcio(GoawayChannel))} |")
    policies = [
        ("chance 1.0", GoawayPolicy(1.0, allow_high_chance=True, linger=0.05)),
        ("chance 0.02", GoawayPolicy(0.02, linger=0.05)),
        ("max_age 50 ms", GoawayPolicy(max_age=0.05, linger=0.05)),
    ]
    for label, policy in policies:
        print(f"| grpcio -> GoawayServer, {label} | {asyncio.run(grpcio_client(policy))} |")

    async def both_sides(policy: GoawayPolicy) -> str:
        server = GoawayServer([EchoService()], codec=RawCodec(), policy=policy)
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        try:
            channel = GoawayChannel("127.0.0.1", server._server.sockets[0].getsockname()[1], codec=RawCodec())
            ok, failed, _ = await mixed_load(channel, rpcs, concurrency)
            channel.close()
            stats = server.goaway_stats
            connections, goaways = stats.connections, stats.goaways_total
        finally:
            server.close()
            await server.wait_closed()
        return f"{ok} / {failed} | {connections} / {goaways}"

    policies.append(("chance 1.0, mode single", GoawayPolicy(1.0, allow_high_chance=True, mode="single",
                                                              linger=0.05)))
    for label, policy in policies:
        print(f"| GoawayChannel -> GoawayServer, {label} | {asyncio.run(both_sides(policy))} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; an unknown one stops it before any measurement (exit 2, named)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpcs", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chance", type=float, default=0.001)
    parser.add_argument("--callgrind", action="store_true", help="also count server instructions per RPC")
    parser.add_argument("--callgrind-rpcs", type=int, default=1000)
    parser.add_argument("--vs-grpcio", action="store_true", help="only the before/after table against grpcio")
    parser.add_argument("--grpcio-rpcs", type=int, default=2000)
    parser.add_argument("--serve", choices=["stock", "goaway"], help=argparse.SUPPRESS)
    parser.add_argument("--exit-after", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and RPCs (make bench)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.quick:
        args.rounds, args.rpcs = 3, 2000
    if args.serve:
        serve(args.serve, args.chance, args.exit_after)
        return
    if args.vs_grpcio:
        vs_grpcio(args)
        return
    python_calls(args)
    throughput(args)
    if args.callgrind:
        callgrind(args)


if __name__ == "__main__":
    main()
