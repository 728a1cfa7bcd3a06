"""API edges (issue 12, item 9): bad arguments raise at once, name the argument, change nothing.

The ``GoawayPolicy`` cases (``max_age=10**400``, ``max_requests=2**1024`` ...)
are in ``tests/test_policy.py`` with every other bad policy value.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import pytest
from test_server_memory import Pair, always, kinds

from goaway_ext import ClientConnection, GoawayPolicy
from goaway_ext.server import DrainState


@pytest.mark.parametrize("data", [10**8, 100, "abc", None, 1.5, True])
def test_client_receive_data_takes_only_bytes_like_as_h2_does(data: Any) -> None:
    client = ClientConnection()
    client.initiate_connection()
    tracemalloc.start()
    try:
        with pytest.raises(TypeError, match="bytes-like"):
            client.receive_data(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"receive_data({data!r}) allocated {peak} bytes before failing"
    assert client.receive_data(bytearray()) == [] and client.receive_data(memoryview(b"")) == []


def _snapshot(p: Pair) -> tuple[Any, ...]:
    server = p.server
    return (server.drain_state, server.next_deadline(), server.stats, server.last_stream_id, server.close_at)


@pytest.mark.parametrize(("now", "exc"), [(None, TypeError), ("1", TypeError), (True, TypeError), ([], TypeError),
                                          (math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError)])
@pytest.mark.parametrize("where", ["serving past max_age", "idle wait past grace", "notice past ping_timeout",
                                   "draining past grace"])
def test_handle_timer_rejects_a_bad_now_before_changing_anything(now: Any, exc: type[Exception], where: str) -> None:
    if where == "serving past max_age":
        p = Pair(GoawayPolicy(max_age=1.0, jitter=0.0))
    elif where == "idle wait past grace":
        p = Pair(always("idle", grace=1.0))
        p.request(end_stream=False)
        p.to_server()
    elif where == "notice past ping_timeout":
        p = Pair(always("graceful", ping_timeout=1.0))
        p.request(end_stream=False)
        p.to_server()
    else:
        p = Pair(always("single", grace=1.0))
        p.request(end_stream=False)
        p.to_server()
    p.server.data_to_send()
    p.clock.now += 5.0  # every deadline above has passed: a half-done handle_timer would show
    before = _snapshot(p)
    with pytest.raises(exc, match="now"):
        p.server.handle_timer(now)
    assert _snapshot(p) == before
    assert p.server.data_to_send() == b""
    # The same call with a good time does the work.
    p.server.handle_timer(p.clock.now)
    assert _snapshot(p) != before or kinds(p.server_frames())
    assert p.server.drain_state is not DrainState.SERVING


@pytest.mark.parametrize("arg, value", [
    ("send_timeout", 0), ("send_timeout", -1.0), ("send_timeout", math.nan), ("send_timeout", True),
    ("max_control_rate", 0), ("max_control_rate", -3), ("max_control_rate", 1.5), ("max_control_rate", True),
    ("idle_timeout", 0), ("handshake_timeout", None),
])
def test_h2server_limits_refuse_bad_values_naming_them(arg: str, value: Any) -> None:
    from goaway_ext import H2Server
    from goaway_ext.asyncio_server import builtin_app

    # The limits that None turns off say so; handshake_timeout has no off.
    off = " or None \\(off\\)" if arg != "handshake_timeout" else ""
    with pytest.raises(ValueError, match=rf"^{arg} must be a positive [a-z ]+{off}, got {value!r}$"):
        H2Server(builtin_app, **{arg: value})


def test_h2server_limits_none_turns_them_off() -> None:
    from goaway_ext import H2Server
    from goaway_ext.asyncio_server import builtin_app

    server = H2Server(builtin_app, send_timeout=None, max_control_rate=None)
    assert server.send_timeout is None and server.max_control_rate is None
    assert H2Server(builtin_app).send_timeout == 60.0 and H2Server(builtin_app).max_control_rate == 1000
