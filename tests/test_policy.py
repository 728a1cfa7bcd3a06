"""GoawayPolicy: every bad value is refused by name; budgets are jittered and reproducible."""

from __future__ import annotations

import math
from typing import Any

import pytest

from goaway_ext import GoawayPolicy
from goaway_ext.policy import MAX_SAFE_CHANCE


def test_defaults() -> None:
    p = GoawayPolicy()
    assert (p.chance, p.max_requests, p.max_age, p.jitter) == (0.0, None, None, 0.1)
    assert (p.ping_timeout, p.grace, p.linger, p.mode, p.decider) == (5.0, None, 1.0, "graceful", None)
    budget = p.new_budget(0.0)
    assert budget.sampler is None and budget.max_requests is None and budget.age_deadline is None
    assert "chance=0.0" in repr(p)


def test_high_chance_needs_explicit_permission() -> None:
    assert GoawayPolicy(MAX_SAFE_CHANCE).chance == 0.02
    with pytest.raises(ValueError, match=r"chance=0\.5 is above 0\.02.*allow_high_chance=True"):
        GoawayPolicy(0.5)
    assert GoawayPolicy(1.0, allow_high_chance=True).chance == 1.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"chance": -0.1}, ValueError, "chance"),
        ({"chance": 1.5, "allow_high_chance": True}, ValueError, "chance"),
        ({"chance": math.nan}, ValueError, "chance"),
        ({"chance": "0.1"}, TypeError, "chance"),
        ({"chance": True}, TypeError, "chance"),
        ({"max_requests": 0}, ValueError, "max_requests"),
        ({"max_requests": 2.5}, TypeError, "max_requests"),
        ({"max_requests": True}, TypeError, "max_requests"),
        ({"max_age": 0}, ValueError, "max_age"),
        ({"max_age": math.inf}, ValueError, "max_age"),
        ({"max_age": "1"}, TypeError, "max_age"),
        ({"max_age": 10**400}, ValueError, "max_age"),  # beyond any float: was OverflowError
        ({"max_idle": 0}, ValueError, "max_idle"),
        ({"max_idle": -1.0}, ValueError, "max_idle"),
        ({"max_idle": math.inf}, ValueError, "max_idle"),
        ({"max_idle": math.nan}, ValueError, "max_idle"),
        ({"max_idle": 10**400}, ValueError, "max_idle"),
        ({"max_idle": "5"}, TypeError, "max_idle"),
        ({"max_idle": True}, TypeError, "max_idle"),
        ({"grace": 10**400}, ValueError, "grace"),
        ({"ping_timeout": -(10**400)}, ValueError, "ping_timeout"),
        ({"linger": 10**400}, ValueError, "linger"),
        ({"jitter": 10**400}, ValueError, "jitter"),
        ({"max_requests": 2**1024}, ValueError, "max_requests"),  # was accepted, then failed in every connection
        ({"max_requests": 2**30 + 1}, ValueError, "max_requests"),
        ({"rapid_reset_window": 1}, ValueError, "rapid_reset_window"),
        ({"rapid_reset_window": 2**40}, ValueError, "rapid_reset_window"),
        ({"rapid_reset_window": 2.0}, TypeError, "rapid_reset_window"),
        ({"rapid_reset_window": True}, TypeError, "rapid_reset_window"),
        ({"jitter": -0.1}, ValueError, "jitter"),
        ({"jitter": 1.0}, ValueError, "jitter"),
        ({"ping_timeout": 0}, ValueError, "ping_timeout"),
        ({"ping_timeout": None}, TypeError, "ping_timeout"),
        ({"grace": -1}, ValueError, "grace"),
        ({"grace": math.nan}, ValueError, "grace"),
        ({"linger": -0.5}, ValueError, "linger"),
        ({"linger": None}, TypeError, "linger"),
        ({"mode": "fast"}, ValueError, "mode"),
        ({"decider": 3}, TypeError, "decider"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"allow_high_chance": 1}, TypeError, "allow_high_chance"),
    ],
)
def test_bad_values_name_the_argument(kwargs: dict[str, Any], exc: type[Exception], name: str) -> None:
    chance = kwargs.pop("chance", 0.0)
    with pytest.raises(exc, match=name) as info:
        GoawayPolicy(chance, **kwargs)
    value = kwargs.get(name, chance)
    if not (isinstance(value, float) and math.isnan(value)):
        assert repr(value) in str(info.value)


def test_max_requests_jitter_spreads_and_is_reproducible() -> None:
    limits = [GoawayPolicy(max_requests=1000, seed=3).new_budget(0.0).max_requests for _ in range(2)]
    assert limits[0] == limits[1]
    p = GoawayPolicy(max_requests=1000, jitter=0.1, seed=3)
    drawn = [p.new_budget(0.0).max_requests for _ in range(200)]
    assert all(d is not None and 900 <= d <= 1100 for d in drawn)
    assert len(set(drawn)) > 50
    again = GoawayPolicy(max_requests=1000, jitter=0.1, seed=3)
    assert [again.new_budget(0.0).max_requests for _ in range(200)] == drawn


def test_no_jitter_is_exact_and_limit_at_least_one() -> None:
    assert GoawayPolicy(max_requests=7, jitter=0.0).new_budget(0.0).max_requests == 7
    assert GoawayPolicy(max_age=30, jitter=0.0).new_budget(5.0).age_deadline == 35.0
    p = GoawayPolicy(max_requests=1, jitter=0.9, seed=1)
    assert {p.new_budget(0.0).max_requests for _ in range(50)} <= {1, 2}


def test_per_connection_samplers_are_independent_but_seeded() -> None:
    p = GoawayPolicy(0.01, seed=9)
    a, b = p.new_budget(0.0).sampler, p.new_budget(0.0).sampler
    assert a is not None and b is not None
    seq_a = [a.sample() for _ in range(5000)]
    seq_b = [b.sample() for _ in range(5000)]
    assert seq_a != seq_b
    q = GoawayPolicy(0.01, seed=9)
    c = q.new_budget(0.0).sampler
    assert c is not None and [c.sample() for _ in range(5000)] == seq_a


def test_repr_shows_every_setting() -> None:
    # Every constructor argument appears in the repr, so a startup log line says what runs.
    import inspect

    def exempt(headers: object) -> None:
        return None

    policy = GoawayPolicy(0.002, max_requests=5, max_age=60, jitter=0.2, ping_timeout=2, grace=30, linger=0.5,
                          mode="single", decider=exempt, seed=7)
    text = repr(policy)
    for name in inspect.signature(GoawayPolicy).parameters:
        assert f"{name}=" in text, (name, text)
    assert "decider=test_repr_shows_every_setting.<locals>.exempt" in text and "seed=7" in text
    assert " at 0x" not in text


def test_rapid_reset_window_default_and_off() -> None:
    assert GoawayPolicy().rapid_reset_window == 500
    assert GoawayPolicy(rapid_reset_window=None).rapid_reset_window is None
    assert "rapid_reset_window=500" in repr(GoawayPolicy())


def test_max_requests_up_to_what_one_connection_can_carry() -> None:
    policy = GoawayPolicy(max_requests=2**30, jitter=0.1, seed=1)
    assert 0.9 * 2**30 <= (policy.new_budget(0.0).max_requests or 0) <= 1.1 * 2**30


def test_max_idle_is_jittered_per_connection_like_max_age() -> None:
    assert GoawayPolicy().max_idle is None and GoawayPolicy().new_budget(0.0).max_idle is None
    policy = GoawayPolicy(max_idle=100, jitter=0.1, seed=5)
    assert policy.max_idle == 100.0 and "max_idle=100.0" in repr(policy)
    limits = [policy.new_budget(0.0).max_idle or 0.0 for _ in range(200)]
    assert all(90.0 <= limit <= 110.0 for limit in limits)
    assert len(set(limits)) > 150  # spread, so idle connections do not all go at once
    again = GoawayPolicy(max_idle=100, jitter=0.1, seed=5)
    assert [again.new_budget(0.0).max_idle for _ in range(200)] == limits  # reproducible with a seed
    assert {GoawayPolicy(max_idle=100, jitter=0.0).new_budget(0.0).max_idle for _ in range(5)} == {100.0}


def test_max_idle_draw_leaves_seeded_max_age_draws_unchanged() -> None:
    ages = [GoawayPolicy(max_age=60, seed=9).new_budget(0.0).age_deadline for _ in range(3)]
    both = [GoawayPolicy(max_age=60, max_idle=30, seed=9).new_budget(0.0).age_deadline for _ in range(3)]
    assert ages == both
