"""``max_idle``: a connection without an open stream for S seconds drains (issue 11, item 5).

In memory with a manual clock (exact deadlines and frames), then over a real
socket against ``python -m goaway_ext serve --max-idle``, and the hypercorn
wiring (``goaway_max_idle`` key, ``--goaway-max-idle`` flag).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from serve_process import ServeProcess
from test_server_memory import Pair, kinds, ours

from goaway_ext import ConnectionDrained, FrameScanner, GoawayPolicy, GoawaySent
from goaway_ext.server import DrainState

MAX = 2**31 - 1


def idle_pair(mode: str = "single", **kw: float) -> Pair:
    return Pair(GoawayPolicy(max_idle=10.0, jitter=0.0, mode=mode, **kw))


def test_a_connection_that_never_sends_a_request_drains_after_max_idle() -> None:
    p = idle_pair()
    start = p.clock.now
    assert p.server.next_deadline() == start + 10.0
    p.clock.now += 9.99
    assert p.server.handle_timer(p.clock.now) == []
    assert not p.server.is_draining
    p.clock.now = start + 10.0
    assert p.server.handle_timer(p.clock.now) == [
        GoawaySent(last_stream_id=0, final=True, reason="max_idle"),
        ConnectionDrained(last_stream_id=0, reason="max_idle", duration=0.0),
    ]
    assert kinds(p.server_frames()) == ["GOAWAY(0)"]


def test_an_open_stream_holds_it_and_idle_time_starts_when_the_last_one_ends() -> None:
    p = idle_pair()
    sid = p.request()
    p.to_server()
    assert p.server.next_deadline() is None  # a stream is open: no idle deadline at all
    p.clock.now += 60.0  # a long watch, far past max_idle
    assert p.server.handle_timer(p.clock.now) == [] and not p.server.is_draining
    p.respond(sid)
    p.to_client()
    ended = p.clock.now
    assert p.server.next_deadline() == ended + 10.0
    p.clock.now += 10.0
    assert ours(p.server.handle_timer(p.clock.now))[0] == GoawaySent(last_stream_id=1, final=True, reason="max_idle")


def test_a_request_in_between_restarts_the_idle_time() -> None:
    p = idle_pair()
    start = p.clock.now
    assert p.server.next_deadline() == start + 10.0
    p.clock.now += 6.0
    sid = p.request()
    p.to_server()
    p.respond(sid)  # answered at once: the owner never saw it open
    p.to_client()
    p.clock.now += 4.0  # start + 10: the first idle deadline, but a request came in between
    assert p.server.handle_timer(p.clock.now) == []
    assert p.server.next_deadline() == p.clock.now + 10.0
    p.clock.now += 10.0
    assert ours(p.server.handle_timer(p.clock.now))[0].reason == "max_idle"


def test_max_age_and_max_idle_the_earlier_deadline_wins() -> None:
    p = Pair(GoawayPolicy(max_idle=10.0, max_age=5.0, jitter=0.0, mode="single"))
    assert p.server.next_deadline() == p.clock.now + 5.0
    p.clock.now += 5.0
    assert ours(p.server.handle_timer(p.clock.now))[0].reason == "max_age"


@pytest.mark.parametrize(("mode", "frames"), [("graceful", [f"GOAWAY({MAX})", "PING"]), ("idle", ["PING"])])
def test_max_idle_starts_the_policys_drain_mode(mode: str, frames: list[str]) -> None:
    p = idle_pair(mode)
    p.server.next_deadline()
    p.clock.now += 10.0
    p.server.handle_timer(p.clock.now)
    assert p.server.is_draining and p.server.drain_state is not DrainState.SERVING
    assert kinds(p.server_frames()) == frames


def test_without_max_idle_next_deadline_does_not_look_at_streams() -> None:
    p = Pair(GoawayPolicy(max_age=5.0, jitter=0.0))
    p.request(end_stream=False)
    p.to_server()
    assert p.server.next_deadline() == p.clock.now + 5.0


# -- over a real socket: python -m goaway_ext serve --max-idle ------------------------------------


async def _session(port: int) -> list[str]:
    """One watch (longer than max-idle), then wait; the log of what arrived, in order, until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    scanner = FrameScanner()
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":path", b"/watch?seconds=1"), (b":scheme", b"http"),
                            (b":authority", b"t")], end_stream=True)
    writer.write(client.data_to_send())
    log: list[str] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 15.0)
            if not chunk:
                log.append("EOF")
                return log
            data, goaways = scanner.feed(chunk)
            for event in client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    if event.data:
                        log.append("data")
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    log.append("end")
            log += [f"GOAWAY({last})" for last, _, _ in goaways]
            writer.write(client.data_to_send())
    finally:
        writer.close()


def test_serve_max_idle_sends_goaway_only_after_the_watch_ended() -> None:
    server = ServeProcess("--max-idle", "0.3", "--chance", "0", "--mode", "single", "--linger", "0.1")
    try:
        log = asyncio.run(_session(server.port))
    finally:
        server.stop()
    # The watch (1 s, longer than --max-idle 0.3) streams to its end; only then,
    # once idle, the GOAWAY, and the server closes after the linger.
    assert log[-3:] == ["end", "GOAWAY(1)", "EOF"], log
    assert log.count("data") == 2


def test_serve_rejects_a_bad_max_idle_by_its_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "goaway_ext", "serve", "--port", "0", "--max-idle", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-idle" in out.stderr, out.stderr


# -- hypercorn: the config key and the flag --------------------------------------------------------


def test_hypercorn_goaway_max_idle_key_and_flag() -> None:
    pytest.importorskip("hypercorn")
    from hypercorn.config import Config

    from goaway_ext.hypercorn import CONFIG_KEYS, main, policy_for

    assert CONFIG_KEYS["goaway_max_idle"] == "max_idle"
    policy = policy_for(Config.from_mapping({"goaway_max_idle": 120, "goaway_jitter": 0.0}))
    assert policy is not None and policy.max_idle == 120.0
    assert policy.new_budget(0.0).max_idle == 120.0
    kept = policy_for(Config.from_mapping({"goaway_max_idle": 60, "keep_alive_max_requests": 10}))
    assert kept is not None and (kept.max_idle, kept.max_requests) == (60.0, 10)
    with pytest.raises(ValueError, match="goaway_max_idle"):
        policy_for(Config.from_mapping({"goaway_max_idle": 0}))
    assert main(["--goaway-max-idle", "-2", "tests.no_such_module:app"]) == 2

