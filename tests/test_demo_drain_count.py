"""The demo counts the drains a policy started from its backends' logs, also those still in progress.

``/stats``' ``drains`` counts completed drains only; a drain held open by a
watch when the demo reads it (just before the backend's restart) was lost,
which made the real fair-share runs' GOAWAY counts 21-24% off the model's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from goaway_ext.asyncio_client import H2Client
from goaway_ext.demo.processes import Backend, ProcessGroupRegistry
from goaway_ext.demo.serve_log import LogCursor, count_policy_drains


@pytest.mark.parametrize("mode", ["graceful", "single"])
def test_a_drain_held_open_by_a_watch_is_counted_at_its_start(tmp_path: Path, mode: str) -> None:
    (tmp_path / "b1.log").write_text("GOAWAY to 127.0.0.1:1: last_stream_id=1 final=False reason=chance\n")
    cursor = LogCursor(tmp_path / "b1.log")  # an earlier run's line is not this run's

    async def scenario() -> tuple[int, int, int]:
        registry = ProcessGroupRegistry()
        backend = Backend("b1", ["--max-requests", "1", "--jitter", "0", "--mode", mode], registry, tmp_path)
        await backend.start()
        watcher = H2Client("127.0.0.1", backend.port, timeout=10.0)
        idle = H2Client("127.0.0.1", backend.port, timeout=10.0)
        try:
            # The watch is its connection's one request: the policy starts a drain at once, the watch holds it.
            async with watcher.stream("GET", "/watch?seconds=3") as response:
                for _ in range(500):
                    if count_policy_drains(cursor.text()) == 1:
                        break
                    await asyncio.sleep(0.01)
                completed = json.loads((await idle.request("GET", "/stats")).body)["drains"]
                counted = count_policy_drains(cursor.text())
                async for _chunk in response:
                    pass
            await backend.stop()  # the idle connection gets the shutdown's drain: not the policy's
            return completed, counted, count_policy_drains(cursor.text())
        finally:
            await watcher.aclose()
            await idle.aclose()
            await backend.kill()
            registry.kill_all()

    completed, counted, after_stop = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert (completed, counted, after_stop) == (0, 1, 1)
    assert "reason=shutdown" in (tmp_path / "b1.log").read_text()


def test_each_drain_counts_once_whatever_its_mode_and_shutdown_never() -> None:
    lines = [
        "GOAWAY to 127.0.0.1:5: last_stream_id=2147483647 final=False reason=chance",  # graceful: 1
        "GOAWAY to 127.0.0.1:6: last_stream_id=7 final=True reason=max_requests",  # single: 2
        "GOAWAY to 127.0.0.1:5: last_stream_id=9 final=True reason=chance",
        "GOAWAY to 127.0.0.1:7: last_stream_id=2147483647 final=False reason=shutdown",
        "GOAWAY to 127.0.0.1:7: last_stream_id=3 final=True reason=shutdown",
        "GOAWAY to 127.0.0.1:5: last_stream_id=2147483647 final=False reason=max_age",  # a new connection, same peer: 3
        "drained connection from 127.0.0.1:5: last_stream_id=9 reason=chance in 0.500s",
    ]
    assert count_policy_drains("\n".join(f"2026-12-03 15:49:48,483 INFO x: {line}" for line in lines)) == 3
