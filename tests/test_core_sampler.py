"""Sampler: Bernoulli(chance) per call, geometric gaps, identical across cores."""

from __future__ import annotations

import inspect
import math
from types import ModuleType

import pytest


def test_chance_zero_never_fires(core: ModuleType) -> None:
    sampler = core.Sampler(0.0, seed=1)
    assert not any(sampler.sample() for _ in range(100_000))
    assert core.Sampler(0, seed=1).chance == 0.0


def test_chance_one_always_fires(core: ModuleType) -> None:
    sampler = core.Sampler(1.0, seed=1)
    assert all(sampler.sample() for _ in range(100_000))
    assert core.Sampler(1).chance == 1.0


@pytest.mark.parametrize("chance", [0.001, 0.01, 0.5])
def test_hit_count_is_binomial(core: ModuleType, chance: float) -> None:
    n = 1_000_000
    sampler = core.Sampler(chance, seed=20261126)
    hits = sum(1 for _ in range(n) if sampler.sample())
    mean, sd = n * chance, math.sqrt(n * chance * (1 - chance))
    assert abs(hits - mean) < 5 * sd, (hits, mean, sd)


def test_gaps_are_geometric(core: ModuleType) -> None:
    # Chi-square goodness of fit of the gaps (misses before each hit) to
    # Geometric(p), bins 0..29 and a tail bin; fixed seed, so not flaky.
    p = 0.1
    sampler = core.Sampler(p, seed=7)
    gaps: list[int] = []
    run = 0
    while len(gaps) < 20_000:
        if sampler.sample():
            gaps.append(run)
            run = 0
        else:
            run += 1
    bins = 30
    observed = [0] * (bins + 1)
    for gap in gaps:
        observed[min(gap, bins)] += 1
    expected = [len(gaps) * p * (1 - p) ** k for k in range(bins)]
    expected.append(len(gaps) * (1 - p) ** bins)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    # 30 degrees of freedom: the 99.9th percentile is 59.7.
    assert chi2 < 59.7, chi2


def test_consecutive_calls_independent(core: ModuleType) -> None:
    # Serial correlation of the 0/1 sequence: |r| < 5/sqrt(n) for independent draws.
    n = 200_000
    sampler = core.Sampler(0.3, seed=11)
    xs = [1.0 if sampler.sample() else 0.0 for _ in range(n)]
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / n
    cov = sum((xs[i] - mean) * (xs[i + 1] - mean) for i in range(n - 1)) / (n - 1)
    assert abs(cov / var) < 5 / math.sqrt(n)


def test_different_seeds_differ(core: ModuleType) -> None:
    a, b = core.Sampler(0.5, seed=1), core.Sampler(0.5, seed=2)
    assert [a.sample() for _ in range(256)] != [b.sample() for _ in range(256)]


def test_unseeded_instances_differ(core: ModuleType) -> None:
    a, b = core.Sampler(0.5), core.Sampler(0.5)
    assert [a.sample() for _ in range(256)] != [b.sample() for _ in range(256)]


def test_same_seed_same_sequence(core: ModuleType) -> None:
    a, b = core.Sampler(0.01, seed=99), core.Sampler(0.01, seed=99)
    assert [a.sample() for _ in range(50_000)] == [b.sample() for _ in range(50_000)]


@pytest.mark.parametrize("chance", [1e-9, 0.001, 0.02, 0.5, 0.999999])
@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1, -5, 2**200])
def test_cores_identical_sequences(both_cores: tuple[ModuleType, ModuleType], chance: float, seed: int) -> None:
    c, p = both_cores
    a, b = c.Sampler(chance, seed=seed), p.Sampler(chance, seed=seed)
    assert [a.sample() for _ in range(20_000)] == [b.sample() for _ in range(20_000)]


@pytest.mark.parametrize(
    ("chance", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (-0.001, ValueError),
        (1.0000001, ValueError),
        (2, ValueError),
        (10**400, ValueError),
        (True, TypeError),
        ("0.1", TypeError),
        (None, TypeError),
        (1j, TypeError),
    ],
)
def test_bad_chance_is_named(core: ModuleType, chance: object, error: type) -> None:
    with pytest.raises(error, match="chance") as info:
        core.Sampler(chance)
    assert repr(chance)[:30] in str(info.value)


@pytest.mark.parametrize("seed", [1.5, "1", True, b"1"])
def test_bad_seed_is_named(core: ModuleType, seed: object) -> None:
    with pytest.raises(TypeError, match="seed") as info:
        core.Sampler(0.1, seed=seed)
    assert repr(seed) in str(info.value)


@pytest.mark.parametrize("name", ["Sampler", "FrameScanner"])
def test_signature_and_docstring_match_between_cores(both_cores: tuple[ModuleType, ModuleType], name: str) -> None:
    # inspect.signature works on the compiled classes, and says what the pure twins say.
    compiled, pure = (getattr(core, name) for core in both_cores)

    def shape(cls: type) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert shape(compiled) == shape(pure)
    assert compiled.__doc__ and inspect.cleandoc(compiled.__doc__) == inspect.cleandoc(pure.__doc__ or "")


def test_sampler_repr(core: ModuleType) -> None:
    assert repr(core.Sampler(0.001, seed=1)) == "Sampler(chance=0.001)"
    assert repr(core.Sampler(1)) == "Sampler(chance=1.0)"


def test_setting_chance_changes_the_rate(core: ModuleType) -> None:
    # A fair-share controller moves a live connection's chance: 0 -> 0.5 -> 0.
    sampler = core.Sampler(0.0, seed=5)
    assert not any(sampler.sample() for _ in range(10_000))
    sampler.chance = 0.5
    assert sampler.chance == 0.5
    hits = sum(sampler.sample() for _ in range(10_000))
    assert 4_700 < hits < 5_300  # 6 standard deviations
    sampler.chance = 0
    assert sampler.chance == 0.0
    assert not any(sampler.sample() for _ in range(10_000))
    sampler.chance = 1.0
    assert all(sampler.sample() for _ in range(100))


@pytest.mark.parametrize("seed", [0, 3, 2**64 - 1])
def test_cores_identical_after_chance_changes(both_cores: tuple[ModuleType, ModuleType], seed: int) -> None:
    c, p = both_cores
    a, b = c.Sampler(0.01, seed=seed), p.Sampler(0.01, seed=seed)
    for chance in (0.02, 0.0, 0.3, 1e-6, 1.0, 0.5):
        assert [a.sample() for _ in range(500)] == [b.sample() for _ in range(500)]
        a.chance = chance
        b.chance = chance
    assert [a.sample() for _ in range(5_000)] == [b.sample() for _ in range(5_000)]


@pytest.mark.parametrize(("chance", "error"), [(float("nan"), ValueError), (1.5, ValueError), (True, TypeError),
                                               (None, TypeError), (10**400, ValueError)])
def test_bad_chance_set_is_named_and_changes_nothing(core: ModuleType, chance: object, error: type) -> None:
    sampler = core.Sampler(0.25, seed=1)
    with pytest.raises(error, match="chance") as info:
        sampler.chance = chance
    assert repr(chance)[:30] in str(info.value)
    assert sampler.chance == 0.25


def test_sampler_is_weakly_referenceable(core: ModuleType) -> None:
    # The controller tracks live connections' samplers without keeping them alive.
    import gc
    import weakref

    sampler = core.Sampler(0.1, seed=1)
    ref = weakref.ref(sampler)
    assert ref() is sampler
    del sampler
    gc.collect()
    assert ref() is None
