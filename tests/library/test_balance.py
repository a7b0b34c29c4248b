"""Balancing strategies: order, eligibility (breakers), exclude sets, fairness."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbpool.balance import P2C_THRESHOLD, STRATEGIES, Balancer, eligible, make_balancer
from lbpool.breaker import Breaker
from lbpool.config import BreakerConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class M:
    """A member as the balancer sees a Pool; each has its own breaker and clock."""

    active: int = 0
    weight: int = 1
    clock: FakeClock = field(default_factory=FakeClock)
    breaker: Breaker = field(init=False)

    def __post_init__(self) -> None:
        config = BreakerConfig(failure_threshold=1, recovery_timeout=10.0)
        self.breaker = Breaker("m", config, clock=self.clock)

    def set_state(self, state: str) -> None:
        """closed | open | half_open (no trial yet) | trial (half_open, trial in flight)."""
        if state == "closed":
            return
        self.breaker.record_failure(OSError("down"))
        if state == "open":
            return
        self.clock.now += 10.0
        assert self.breaker.state == "half_open"
        if state == "trial":
            assert self.breaker.allow_dial()


def members(n: int, states: dict[int, str] | None = None, **kw: int) -> list[M]:
    ms = [M(**kw) for _ in range(n)]
    for i, state in (states or {}).items():
        ms[i].set_state(state)
    return ms


def picks(b: Balancer, k: int, exclude: frozenset[int] = frozenset()) -> list[int | None]:
    return [b.pick(exclude) for _ in range(k)]


# ------------------------------------------------------------------ round_robin


def test_round_robin_cycles_in_order() -> None:
    b = make_balancer("round_robin", members(3))
    assert b.strategy == "round_robin" and len(b) == 3
    assert picks(b, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_open_breakers_and_resumes_when_closed() -> None:
    ms = members(4, {1: "open", 2: "open"})
    b = make_balancer("round_robin", ms)
    assert picks(b, 5) == [0, 3, 0, 3, 0]
    ms[2].breaker.reset()
    assert picks(b, 3) == [2, 3, 0]


def test_round_robin_exclude() -> None:
    b = make_balancer("round_robin", members(4))
    assert picks(b, 4, frozenset({0, 2})) == [1, 3, 1, 3]
    assert b.pick(frozenset({0, 1, 2, 3})) is None


# ------------------------------------------------------------------ least_active


def test_least_active_picks_the_lowest() -> None:
    ms = members(4)
    for m, a in zip(ms, [3, 1, 4, 2], strict=True):
        m.active = a
    b = make_balancer("least_active", ms)
    assert b.pick() == 1
    ms[1].active = 5
    assert b.pick() == 3


def test_least_active_breaks_ties_round_robin() -> None:
    ms = members(4)
    ms[0].active = 2
    b = make_balancer("least_active", ms)
    assert picks(b, 6) == [1, 2, 3, 1, 2, 3]
    ms[0].active = 0
    assert picks(b, 4) == [0, 1, 2, 3]


def test_least_active_skips_ineligible_and_excluded() -> None:
    ms = members(5, {0: "open", 3: "trial"})
    for m, a in zip(ms, [0, 4, 2, 0, 3], strict=True):
        m.active = a
    b = make_balancer("least_active", ms)
    assert b.pick() == 2
    assert b.pick(frozenset({2})) == 4
    assert b.pick(frozenset({1, 2, 4})) is None


def test_least_active_tracks_load_when_acquiring() -> None:
    ms = members(3)
    b = make_balancer("least_active", ms)
    for _ in range(30):
        i = b.pick()
        assert i is not None
        ms[i].active += 1
    assert [m.active for m in ms] == [10, 10, 10]


def test_p2c_stays_near_balanced_at_large_n() -> None:
    n = 200
    ms = members(n)
    b = make_balancer("least_active", ms, rng=random.Random(7))
    rng = random.Random(11)
    held: list[int] = []  # one entry per connection in use
    for step in range(20_000):
        i = b.pick()
        assert i is not None
        ms[i].active += 1
        held.append(i)
        if step % 2:  # a random connection comes back: steady churn at 50 per server
            k = rng.randrange(len(held))
            held[k], held[-1] = held[-1], held[k]
            ms[held.pop()].active -= 1
    loads = [m.active for m in ms]
    mean = sum(loads) / n
    # the power of two choices keeps the busiest server within O(log log n) of the mean;
    # uniform random routing gives ~+20 and a spread of ~40 in this simulation
    assert max(loads) - mean <= 4, loads
    assert max(loads) - min(loads) <= 12, loads
    for _ in range(n * 20):  # no releases: pure accumulation
        i = b.pick()
        assert i is not None
        ms[i].active += 1
    loads = [m.active for m in ms]
    assert max(loads) - sum(loads) / n <= 4, loads


def test_p2c_never_picks_an_ineligible_member() -> None:
    n = 100
    states = {i: ("open" if i % 3 else "trial") for i in range(n) if i % 10}
    ms = members(n, states)
    ok = {i for i in range(n) if i % 10 == 0}
    b = make_balancer("least_active", ms, rng=random.Random(3))
    seen = Counter(b.pick() for _ in range(5_000))
    assert set(seen) == ok
    # one eligible member left: found by sampling or the fallback scan
    only = members(n, {i: "open" for i in range(n) if i != 57})
    b = make_balancer("least_active", only, rng=random.Random(3))
    assert picks(b, 50) == [57] * 50
    assert b.pick(frozenset({57})) is None
    none = members(n, {i: "open" for i in range(n)})
    assert make_balancer("least_active", none).pick() is None


def test_p2c_exclude_all_but_one() -> None:
    n = 64
    b = make_balancer("least_active", members(n), rng=random.Random(5))
    everyone_but_9 = frozenset(range(n)) - {9}
    assert picks(b, 20, everyone_but_9) == [9] * 20


# ------------------------------------------------------------------ weighted


def test_weighted_is_nginx_smooth_sequence() -> None:
    a, b_, c = M(weight=5), M(weight=1), M(weight=1)
    b = make_balancer("weighted", [a, b_, c])
    names = "abc"
    seq = "".join(names[i] for i in picks(b, 14))  # type: ignore[index]
    assert seq == "aabacaa" * 2


def test_weighted_over_eligible_only() -> None:
    ms = [M(weight=3), M(weight=2), M(weight=1)]
    ms[1].set_state("open")
    b = make_balancer("weighted", ms)
    counts = Counter(picks(b, 400))
    assert counts == {0: 300, 2: 100}
    assert Counter(picks(b, 40, frozenset({0}))) == {2: 40}


# ------------------------------------------------------------------ random


def test_random_is_uniform() -> None:
    n, draws = 10, 20_000
    b = make_balancer("random", members(n), rng=random.Random(1234))
    counts = Counter(picks(b, draws))
    expected = draws / n
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert set(counts) == set(range(n))
    assert chi2 < 40  # df=9: p=0.001 is at 27.9; generous margin, fixed seed


def test_random_uniform_over_eligible_members() -> None:
    n, draws = 30, 20_000
    states = {i: "open" for i in range(n) if i not in (4, 17, 22)}
    b = make_balancer("random", members(n, states), rng=random.Random(99))
    counts = Counter(picks(b, draws))
    assert set(counts) == {4, 17, 22}
    expected = draws / 3
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 25  # df=2: p=0.001 is at 13.8
    assert Counter(picks(b, 100, frozenset({4, 22}))) == {17: 100}


# ------------------------------------------------------------------ all strategies


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("n", [0, 1, 3, P2C_THRESHOLD + 1, 50])
def test_all_ineligible_or_excluded_gives_none(strategy: str, n: int) -> None:
    b = make_balancer(strategy, members(n, {i: "open" for i in range(n)}))
    assert b.pick() is None
    b = make_balancer(strategy, members(n, {i: "trial" for i in range(n)}))
    assert b.pick() is None
    b = make_balancer(strategy, members(n))
    assert b.pick(frozenset(range(n))) is None


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_half_open_member_eligible_only_without_trial_in_flight(strategy: str) -> None:
    ms = members(3, {0: "open", 1: "half_open", 2: "open"})
    probe = ms[1].breaker
    b = make_balancer(strategy, ms)
    assert b.pick() == 1
    assert probe.allow_dial()  # the caller claims the trial
    assert b.pick() is None
    probe.abandon_trial()
    assert b.pick() == 1
    assert probe.allow_dial()
    probe.record_success()
    assert probe.is_closed and b.pick() == 1


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        make_balancer("fastest", members(2))


STATES = st.sampled_from(["closed", "open", "half_open", "trial"])


@settings(max_examples=300, deadline=None)
@given(
    strategy=st.sampled_from(sorted(STRATEGIES)),
    spec=st.lists(st.tuples(STATES, st.integers(0, 5), st.integers(1, 5)), min_size=0, max_size=24),
    exclude_bits=st.lists(st.booleans(), min_size=24, max_size=24),
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(1, 12),
)
def test_pick_is_always_eligible_and_none_only_when_nothing_is(
    strategy: str,
    spec: list[tuple[str, int, int]],
    exclude_bits: list[bool],
    seed: int,
    rounds: int,
) -> None:
    n = len(spec)
    ms = members(n, {i: s for i, (s, _, _) in enumerate(spec)})
    for m, (_, active, weight) in zip(ms, spec, strict=True):
        m.active, m.weight = active, weight
    exclude = frozenset(i for i in range(n) if exclude_bits[i])
    b = make_balancer(strategy, ms, rng=random.Random(seed))
    for _ in range(rounds):
        allowed = {i for i in range(n) if i not in exclude and eligible(ms[i].breaker)}
        got = b.pick(exclude)
        if got is None:
            assert not allowed
        else:
            assert got in allowed
            if strategy == "least_active" and n <= P2C_THRESHOLD:
                assert ms[got].active == min(ms[i].active for i in allowed)
            ms[got].active += 1
