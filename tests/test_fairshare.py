"""FairShare: the load-aware chance, its fallbacks, its limits, and its effect on real connections."""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived

from goaway_ext import GoawayPolicy, ServerConnection
from goaway_ext._core import Sampler
from goaway_ext.fairshare import (
    DEFAULT_CEILING,
    FairShare,
    FleetSnapshot,
    ServerLoad,
    StaticFleetView,
    fair_chance,
)
from tests.manual_clock import ManualClock


def _fleet(clock: ManualClock, loads: dict[str, float], **capacity: float) -> StaticFleetView:
    view = StaticFleetView(clock)
    for name, n in loads.items():
        view.set(name, n, capacity.get(name, 1.0))
    return view


def test_rule_is_zero_at_or_below_share_plus_tolerance() -> None:
    assert fair_chance(100, 100, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(110, 100, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(50, 100, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(0, 0, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(111, 100, tolerance=0.1, ceiling=0.02, gain=1.0) == pytest.approx(0.01)
    assert fair_chance(200, 100, tolerance=0.1, ceiling=0.02) == 0.02
    assert fair_chance(5, 0, tolerance=0.1, ceiling=0.02) == 0.02  # a restarted, empty server


def test_rule_ignores_a_difference_of_one_connection() -> None:
    # 2 vs 1 is 100% above, but moving one connection only swaps the two: no shedding.
    assert fair_chance(2, 1, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(1, 0, tolerance=0.1, ceiling=0.02) == 0.0
    assert fair_chance(3, 1, tolerance=0.1, ceiling=0.02) == 0.02
    assert fair_chance(2, 0, tolerance=0.1, ceiling=0.02) == 0.02


def test_reference_is_the_least_loaded_server_not_the_mean() -> None:
    # One starved server among 20: every other is only ~4% above the mean,
    # yet each must shed, or the starved one is never refilled.
    clock = ManualClock(10.0)
    loads = {f"b{i}": 526.0 for i in range(19)} | {"b19": 0.0}
    fair = FairShare(_fleet(clock, loads), "b3", clock=clock)
    assert fair.update() == DEFAULT_CEILING
    assert fair.state == "shedding"
    starved = FairShare(_fleet(clock, loads), "b19", clock=clock)
    assert starved.update() == 0.0
    assert starved.state == "balanced"


def test_capacity_weighs_the_share() -> None:
    clock = ManualClock()
    # b2 has half the capacity: 60 connections on it is 120 per unit, above 100 * 1.1.
    view = _fleet(clock, {"b1": 100, "b2": 60}, b2=0.5)
    assert FairShare(view, "b2", clock=clock).update() > 0.0
    assert FairShare(view, "b1", clock=clock).update() == 0.0
    view.set("b2", 50, 0.5)
    assert FairShare(view, "b2", clock=clock).update() == 0.0


def test_falls_back_when_the_view_is_stale_missing_or_lacks_this_server() -> None:
    clock = ManualClock(0.0)
    view = StaticFleetView(clock)
    fair = FairShare(view, "me", clock=clock, fallback=0.001, max_staleness=5.0)
    assert fair.chance == 0.001 and fair.update() == 0.001 and fair.state == "fallback"  # nothing yet
    view.set("other", 10)
    assert fair.update() == 0.001 and fair.state == "fallback"  # we are not listed
    view.set("me", 100)
    assert fair.update() == DEFAULT_CEILING

    class Frozen:
        def snapshot(self) -> FleetSnapshot:
            return FleetSnapshot((ServerLoad("me", 100), ServerLoad("other", 10)), taken_at=0.0)

    frozen = FairShare(Frozen(), "me", clock=clock, fallback=0.001, max_staleness=5.0)
    clock.now = 5.0
    assert frozen.update() == DEFAULT_CEILING
    clock.now = 5.01
    assert frozen.update() == 0.001 and frozen.state == "fallback"


def test_static_view_forgets_entries_older_than_max_age() -> None:
    clock = ManualClock(0.0)
    view = StaticFleetView(clock, max_age=2.0)
    view.set("a", 1)
    clock.now = 1.5
    view.set("b", 2)
    snap = view.snapshot()
    assert snap is not None and {s.name for s in snap.servers} == {"a", "b"}
    clock.now = 3.0
    snap = view.snapshot()
    assert snap is not None and {s.name for s in snap.servers} == {"b"}
    view.remove("b")
    assert view.snapshot() is None


def test_update_moves_every_live_sampler_and_forgets_dead_ones() -> None:
    clock = ManualClock(0.0)
    view = _fleet(clock, {"me": 10, "other": 10})
    fair = FairShare(view, "me", clock=clock)
    policy = GoawayPolicy(fair_share=fair, seed=1)
    budgets = [policy.new_budget(0.0) for _ in range(5)]
    assert all(b.sampler is not None and b.sampler.chance == 0.0 for b in budgets)
    view.set("me", 30)
    assert fair.update() == DEFAULT_CEILING
    assert all(b.sampler is not None and b.sampler.chance == DEFAULT_CEILING for b in budgets)
    fresh = policy.new_budget(0.0)  # a new connection starts at the current chance
    assert fresh.sampler is not None and fresh.sampler.chance == DEFAULT_CEILING
    del budgets, fresh
    gc.collect()
    view.set("me", 10)
    assert fair.update() == 0.0  # no dead sampler is kept alive or touched


def test_drain_rate_limit_caps_drains_per_second() -> None:
    clock = ManualClock(0.0)
    view = _fleet(clock, {"me": 1000, "other": 0})
    fair = FairShare(view, "me", clock=clock, max_drain_rate=0.05, ceiling=1.0, allow_high_chance=True)
    fair.update()
    allowed = 0
    for tick in range(1, 101):  # 10 s in steps of 0.1 s, 1000 sampler hits per step
        clock.now = tick / 10
        allowed += sum(fair.admit() for _ in range(1000))
    # 5% of 1000 connections per second: at most 50/s over 10 s, plus the initial token.
    assert 480 <= allowed <= 51 * 10 + 1
    assert fair.drains_allowed == allowed and fair.drains_refused == 100_000 - allowed


def test_drain_rate_lets_a_small_server_shed_one_per_second() -> None:
    clock = ManualClock(0.0)
    fair = FairShare(_fleet(clock, {"me": 3, "other": 0}), "me", clock=clock, max_drain_rate=0.01)
    fair.update()
    assert fair.admit() and not fair.admit()
    clock.now = 1.0
    assert fair.admit() and not fair.admit()


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"ceiling": 0.05}, ValueError, "ceiling"),
        ({"ceiling": math.nan}, ValueError, "ceiling"),
        ({"ceiling": 1.5, "allow_high_chance": True}, ValueError, "ceiling"),
        ({"fallback": 0.03}, ValueError, "fallback"),
        ({"fallback": -1}, ValueError, "fallback"),
        ({"tolerance": -0.1}, ValueError, "tolerance"),
        ({"tolerance": "0.1"}, TypeError, "tolerance"),
        ({"gain": 0}, ValueError, "gain"),
        ({"max_drain_rate": 0}, ValueError, "max_drain_rate"),
        ({"max_drain_rate": 2}, ValueError, "max_drain_rate"),
        ({"max_staleness": math.inf}, ValueError, "max_staleness"),
        ({"interval": 0}, ValueError, "interval"),
        ({"allow_high_chance": 1}, TypeError, "allow_high_chance"),
    ],
)
def test_bad_values_name_the_argument(kwargs: dict[str, Any], exc: type[Exception], name: str) -> None:
    clock = ManualClock()
    with pytest.raises(exc, match=name):
        FairShare(StaticFleetView(clock), "me", clock=clock, **kwargs)


def test_bad_construction_is_named() -> None:
    clock = ManualClock()
    with pytest.raises(TypeError, match="view"):
        FairShare(object(), "me", clock=clock)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        FairShare(StaticFleetView(clock), "", clock=clock)
    with pytest.raises(ValueError, match="connections"):
        ServerLoad("a", -1)
    with pytest.raises(ValueError, match="capacity"):
        ServerLoad("a", 1, 0)
    fair = FairShare(StaticFleetView(clock), "me", clock=clock)
    with pytest.raises(ValueError, match="chance must be 0 with fair_share"):
        GoawayPolicy(0.001, fair_share=fair)
    with pytest.raises(TypeError, match="fair_share"):
        GoawayPolicy(fair_share=object())  # type: ignore[arg-type]


def _request(client: H2Connection, server: ServerConnection) -> list[Any]:
    stream = client.get_next_available_stream_id()
    client.send_headers(stream, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                 (":authority", "x")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    for event in events:
        if isinstance(event, RequestReceived):
            server.send_headers(event.stream_id, [(":status", "200")], end_stream=True)
    if server.is_draining:  # the plain h2 client would close on GOAWAY; the drain is what we count
        return list(events)
    return list(events) + list(client.receive_data(server.data_to_send()))


def _connect(policy: GoawayPolicy, clock: ManualClock) -> tuple[H2Connection, ServerConnection]:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = ServerConnection(policy=policy, clock=clock)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def test_server_connections_drain_only_while_above_share() -> None:
    clock = ManualClock(0.0)
    view = _fleet(clock, {"me": 20, "other": 20})
    fair = FairShare(view, "me", clock=clock, ceiling=0.5, allow_high_chance=True, max_drain_rate=1.0)
    policy = GoawayPolicy(fair_share=fair, seed=7)
    pairs = [_connect(policy, clock) for _ in range(20)]
    fair.update()
    for client, server in pairs:  # balanced: 20 requests each, no drain at all
        for _ in range(20):
            _request(client, server)
        assert not server.is_draining
    view.set("other", 0)  # the other server restarted empty
    assert fair.update() == 0.5
    drained = 0
    for step in range(1, 21):
        clock.now = step * 0.1
        for client, server in pairs:
            if not server.is_draining:
                _request(client, server)
                drained += server.is_draining
    assert drained == sum(server.is_draining for _, server in pairs)
    # 20 connections x 100% per second for 2 s, one token to start: the limit, not the chance, bounds it.
    assert 10 <= drained <= 20
    assert fair.drains_refused > 0


def test_sampler_type_is_the_core_sampler() -> None:
    clock = ManualClock()
    fair = FairShare(StaticFleetView(clock), "me", clock=clock, fallback=0.01)
    budget = GoawayPolicy(fair_share=fair).new_budget(0.0)
    assert isinstance(budget.sampler, Sampler) and budget.sampler.chance == 0.01
    assert budget.admit is not None


def test_local_serving_count_replaces_the_view_entry_for_this_server() -> None:
    # The balancer still counts 30 on "me" (10 of them draining); the server knows only 20 serve.
    clock = ManualClock()
    view = _fleet(clock, {"me": 30, "other": 20})
    assert FairShare(view, "me", clock=clock).update() > 0.0
    serving = [20.0]
    fair = FairShare(view, "me", clock=clock, local=lambda: serving[0])
    assert fair.update() == 0.0
    serving[0] = 25.0
    assert fair.update() > 0.0
    with pytest.raises(TypeError, match="local"):
        FairShare(view, "me", clock=clock, local=3)  # type: ignore[arg-type]


def test_shedding_stops_at_the_share_between_two_updates() -> None:
    # 11/10/9 connections: one move evens the fleet. The token bucket alone would let two
    # drains through before the next update (then the view shows 9/10/11 and the fleet trades
    # that connection back and forth for ever); the stop at the share lets exactly one through.
    clock = ManualClock(0.0)
    view = _fleet(clock, {"me": 11, "a": 10, "b": 9})
    fair = FairShare(view, "me", clock=clock, ceiling=1.0, allow_high_chance=True, max_drain_rate=0.5)
    assert fair.update() > 0.0 and fair.stop_at == pytest.approx(10.0)
    assert fair.admit() and not fair.admit() and not fair.admit()
    clock.now = 1.0  # a second later the bucket has tokens again: the stop still holds
    assert not fair.admit()
    assert fair.drains_allowed == 1 and fair.drains_refused == 3
    view.set("me", 10)
    view.set("b", 10)
    assert fair.update() == 0.0


def test_live_local_count_stops_shedding_and_lets_inflow_extend_it() -> None:
    # With local=, the server's own live count decides: under round robin some of the
    # reconnects come back, so a server keeps shedding while it is still above its share.
    clock = ManualClock(0.0)
    live = [24.0]
    view = _fleet(clock, {"me": 24, "a": 20, "b": 19})
    fair = FairShare(view, "me", clock=clock, ceiling=1.0, allow_high_chance=True, max_drain_rate=1.0,
                     local=lambda: live[0])
    assert fair.update() > 0.0
    assert fair.stop_at == pytest.approx(21.0)
    clock.now = 1.0  # a full bucket: 24 tokens
    admitted = 0
    while fair.admit():
        admitted += 1
        live[0] -= 1
    assert admitted == 3 and live[0] == 21.0
    live[0] += 2  # two reconnects of other servers landed here
    assert fair.admit() and fair.admit()
    live[0] -= 2
    assert not fair.admit()


def test_a_starved_server_makes_everyone_above_it_shed_past_the_share() -> None:
    # One server far below its share (more than the tolerance) fills only from the fleet's
    # reconnects, 1/B of them under round robin: servers at their share must shed too.
    clock = ManualClock(0.0)
    view = _fleet(clock, {"me": 30, "a": 30, "b": 0})
    fair = FairShare(view, "me", clock=clock, ceiling=1.0, allow_high_chance=True, max_drain_rate=1.0,
                     local=lambda: 15.0)
    assert fair.update() == 1.0 and fair.stop_at == -math.inf
    assert fair.admit()


def test_fallback_is_not_stopped_by_a_share() -> None:
    clock = ManualClock(0.0)
    fair = FairShare(StaticFleetView(clock), "me", clock=clock, fallback=0.01, max_drain_rate=1.0,
                     local=lambda: 0.0)
    fair.update()
    assert fair.state == "fallback" and fair.stop_at == -math.inf
    assert fair.admit()
