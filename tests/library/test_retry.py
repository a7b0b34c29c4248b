"""lbpool.retry: the retry budget, on an injected clock (no sockets, no sleeps).

The invariant (Finagle's RetryBudget, with a reserve that refills): over a run of
``T`` seconds shorter than the window, retries <= budget_percent % of calls +
min_per_second * (1 + T); and a new budget grants ``min_per_second`` retries at once.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lbpool.config import RetryConfig
from lbpool.retry import BUCKETS, WINDOW, RetryBudget


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(percent: float = 20, per_second: int = 10, clock: Clock | None = None) -> RetryBudget:
    return RetryBudget(
        RetryConfig(budget_percent=percent, min_per_second=per_second), clock=clock or Clock()
    )


def test_a_new_budget_holds_min_per_second_retries() -> None:
    b = budget(percent=0, per_second=10)
    assert [b.try_retry() for _ in range(11)] == [True] * 10 + [False]
    assert (b.calls, b.retries, b.retries_denied) == (0, 10, 1)


def test_the_reserve_refills_at_min_per_second_up_to_its_size() -> None:
    clock = Clock()
    b = budget(percent=0, per_second=10, clock=clock)
    while b.try_retry():
        pass
    clock.now += 0.25  # 2.5 tokens
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
    clock.now += 60  # long quiet: the reserve holds one second's worth, not 60
    assert sum(b.try_retry() for _ in range(20)) == 10


def test_calls_fund_budget_percent_of_a_retry_each() -> None:
    b = budget(percent=20, per_second=0)
    assert not b.try_retry()  # no call yet, no reserve
    for _ in range(4):
        b.called()
    assert not b.try_retry()  # 4 calls fund 0.8 of a retry
    b.called()
    assert b.try_retry()  # 5 calls: one
    assert not b.try_retry()
    for _ in range(10):
        b.called()
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
    assert (b.calls, b.retries, b.retries_denied) == (15, 3, 4)


def test_calls_fund_retries_for_the_window_only() -> None:
    clock = Clock()
    b = budget(percent=100, per_second=0, clock=clock)
    for _ in range(5):
        b.called()
    clock.now += WINDOW + WINDOW / BUCKETS  # every bucket of those calls has expired
    assert not b.try_retry()
    b.called()
    assert b.try_retry()


def test_retries_expire_with_the_window_too() -> None:
    clock = Clock()
    b = budget(percent=50, per_second=0, clock=clock)
    for _ in range(4):
        b.called()
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
    clock.now += WINDOW + WINDOW / BUCKETS
    for _ in range(2):
        b.called()
    assert [b.try_retry() for _ in range(2)] == [True, False]


def test_reconfigure_keeps_counts_and_caps_the_reserve() -> None:
    b = budget(percent=0, per_second=10)
    b.try_retry()
    b.reconfigure(RetryConfig(budget_percent=0, min_per_second=2))
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
    assert (b.retries, b.retries_denied) == (3, 1)


def test_a_zero_budget_never_retries() -> None:
    b = budget(percent=0, per_second=0)
    for _ in range(100):
        b.called()
    assert not b.try_retry()


def test_called_and_try_retry_allocate_nothing_per_call() -> None:
    import tracemalloc

    clock = Clock()
    b = budget(clock=clock)
    for _ in range(100):  # warm up: every bucket touched once
        b.called()
        b.try_retry()
        clock.now += 0.25
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(1000):
            b.called()
            b.try_retry()
            clock.now += 0.01
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(
        s.size_diff
        for s in after.compare_to(before, "filename")
        if s.traceback[0].filename.endswith("retry.py")
    )
    assert grown < 1024, grown  # floats and small ints only: nothing kept per call


class BudgetMachine(RuleBasedStateMachine):
    """Random calls, retries and clock steps within one window: retries never exceed
    the share of calls plus the reserve's refill, and never go below what the
    reserve alone guarantees."""

    @initialize(
        percent=st.sampled_from([0, 5, 20, 100, 250, 1000]),
        per_second=st.sampled_from([0, 1, 10, 50]),
    )
    def start(self, percent: int, per_second: int) -> None:
        self.clock = Clock()
        self.start_at = self.clock.now
        self.percent, self.per_second = percent, per_second
        self.budget = budget(percent, per_second, self.clock)
        self.granted = 0
        self.asked = 0

    @rule(n=st.integers(1, 20))
    def calls(self, n: int) -> None:
        for _ in range(n):
            self.budget.called()

    @rule(n=st.integers(1, 20))
    def retries(self, n: int) -> None:
        for _ in range(n):
            self.asked += 1
            self.granted += self.budget.try_retry()

    @rule(dt=st.floats(0.0, 0.5))
    def tick(self, dt: float) -> None:
        if self.clock.now + dt - self.start_at < WINDOW - WINDOW / BUCKETS:
            self.clock.now += dt  # within one window: no call has expired yet

    @invariant()
    def bounded(self) -> None:
        b = self.budget
        elapsed = self.clock.now - self.start_at
        limit = self.percent / 100 * b.calls + self.per_second * (1 + elapsed)
        assert b.retries <= math.floor(limit + 1e-9), (b, elapsed)
        assert (b.retries, b.retries_denied) == (self.granted, self.asked - self.granted)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"attempts": 0}, "attempts", "must be >= 1 (got 0)"),
        ({"attempts": "x"}, "attempts", "must be a whole number"),
        ({"budget_percent": -1}, "budget_percent", "must be >= 0"),
        ({"budget_percent": 1001}, "budget_percent", "must be <= 1000"),
        ({"budget_percent": "20%"}, "budget_percent", "must be a number between 0 and 1000"),
        ({"budget_percent": True}, "budget_percent", "must be a number between 0 and 1000"),
        ({"min_per_second": -1}, "min_per_second", "must be >= 0"),
        ({"min_per_second": 1.5}, "min_per_second", "must be a whole number"),
        ({"nope": 1}, "nope", "unknown key (allowed: attempts, budget_percent, min_per_second)"),
    ],
)
def test_retry_config_is_validated(data: dict[str, object], field: str, message: str) -> None:
    from lbpool import ConfigError, parse_config

    config = {"backends": {"b": {"servers": ["127.0.0.1:1"], "retry": data}}}
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    text = str(info.value)
    assert f"backends.b.retry.{field}" in text
    assert message in text


def test_retry_section_merges_over_defaults_key_by_key() -> None:
    from lbpool import parse_config

    config = parse_config(
        {
            "defaults": {"retry": {"attempts": 3, "budget_percent": 50}},
            "backends": {"b": {"servers": ["127.0.0.1:1"], "retry": {"min_per_second": 0}}},
        }
    )
    assert config.backends["b"].retry == RetryConfig(
        attempts=3, budget_percent=50, min_per_second=0
    )
    assert parse_config({}).defaults.retry == RetryConfig(
        attempts=2, budget_percent=20, min_per_second=10
    )


def test_an_error_in_an_inherited_retry_value_names_the_defaults_line(tmp_path: object) -> None:
    from pathlib import Path

    from lbpool import ConfigError, load_config

    path = Path(str(tmp_path)) / "c.yaml"
    path.write_text(
        "defaults:\n  retry:\n    attempts: 0\nbackends:\n  b:\n    servers: [127.0.0.1:1]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:3: defaults.retry.attempts: must be >= 1" in str(info.value)
