"""The resilience policies in isolation: their config (clear errors naming the field),
the failure-rate window, the breaker's panic-dial verdicts, the health-blind balancer,
panic mode and slow start in the manager's bookkeeping, the ``panic`` stat and gauge.
The same policies on real sockets under load: tests/reliability/test_resilience.py."""

from __future__ import annotations

from time import monotonic
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import lbpool.metrics
from lbpool.balance import ignoring_health, make_balancer
from lbpool.breaker import PANIC_DIAL, RATE_BUCKETS, Breaker, FailureRate
from lbpool.config import BreakerConfig, FailureRateConfig, parse_config, parse_share
from lbpool.errors import ConfigError
from lbpool.testing import EchoServer
from tests.library.test_breaker import FakeClock


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return {p.path: p.message for p in info.value.problems}


def backend(**sections: Any) -> dict[str, Any]:
    return {"backends": {"b": {"servers": ["127.0.0.1:1"], **sections}}}


# -- config ---------------------------------------------------------------------------------


def test_defaults_are_off_but_panic() -> None:
    b = parse_config(backend()).backends["b"]
    assert b.breaker.failure_rate is None
    assert b.balance.panic_threshold == 0.5
    assert b.balance.slow_start is None


@pytest.mark.parametrize(
    ("given", "share"), [(0.5, 0.5), ("50%", 0.5), (" 12.5 % ", 0.125), (1, 1.0), ("0", 0.0)]
)
def test_shares_are_numbers_or_percents(given: object, share: float) -> None:
    assert parse_share(given) == share


def test_policies_parse() -> None:
    b = parse_config(
        backend(
            breaker={"failure_rate": {"threshold": "25%", "min_requests": 5, "window": "2s"}},
            balance={"panic_threshold": "0%", "slow_start": {"window": "500ms"}},
        )
    ).backends["b"]
    assert b.breaker.failure_rate == FailureRateConfig(threshold=0.25, min_requests=5, window=2.0)
    assert b.balance.panic_threshold == 0.0
    assert b.balance.slow_start is not None
    assert (b.balance.slow_start.window, b.balance.slow_start.min_weight) == (0.5, 0.1)


def test_failure_rate_merges_over_defaults_key_by_key() -> None:
    data = backend(breaker={"failure_rate": {"min_requests": 3}})
    data["defaults"] = {"breaker": {"failure_rate": {"threshold": 0.3, "window": "5s"}}}
    rate = parse_config(data).backends["b"].breaker.failure_rate
    assert rate == FailureRateConfig(threshold=0.3, min_requests=3, window=5.0)
    data["backends"]["b"]["breaker"] = {"failure_rate": None}  # a backend turns it off
    assert parse_config(data).backends["b"].breaker.failure_rate is None


@pytest.mark.parametrize(
    ("sections", "path", "fragment"),
    [
        ({"breaker": {"failure_rate": {"threshold": 0}}}, "breaker.failure_rate.threshold", "> 0"),
        (
            {"breaker": {"failure_rate": {"threshold": "150%"}}},
            "breaker.failure_rate.threshold",
            "between 0 and 1",
        ),
        (
            {"breaker": {"failure_rate": {"threshold": "half"}}},
            "breaker.failure_rate.threshold",
            "percent",
        ),
        ({"breaker": {"failure_rate": {}}}, "breaker.failure_rate.threshold", "missing"),
        (
            {"breaker": {"failure_rate": {"threshold": 0.5, "min_requests": 0}}},
            "breaker.failure_rate.min_requests",
            ">= 1",
        ),
        (
            {"breaker": {"failure_rate": {"threshold": 0.5, "window": 0}}},
            "breaker.failure_rate.window",
            "> 0",
        ),
        (
            {"breaker": {"failure_rate": {"threshold": 0.5, "windw": "1s"}}},
            "breaker.failure_rate.windw",
            "",
        ),
        ({"balance": {"panic_threshold": 1.5}}, "balance.panic_threshold", "between 0 and 1"),
        ({"balance": {"panic_threshold": True}}, "balance.panic_threshold", "invalid share"),
        (
            {"balance": {"slow_start": {"min_weight": "200%"}}},
            "balance.slow_start.min_weight",
            "between 0 and 1",
        ),
        ({"balance": {"slow_start": {"window": "0s"}}}, "balance.slow_start.window", "> 0"),
        (
            {"strategy": "maglev", "balance": {"slow_start": {}}},
            "balance",
            "slow_start cannot be used with strategy maglev",
        ),
    ],
)
def test_config_errors_name_the_field(sections: dict[str, Any], path: str, fragment: str) -> None:
    found = problems(backend(**sections))
    full = f"backends.b.{path}"
    assert full in found, found
    assert fragment.lower() in found[full].lower(), found[full]


# -- the failure-rate window ----------------------------------------------------------------


def rate(threshold: float = 0.5, min_requests: int = 4, window: float = 10.0) -> Any:
    clock = FakeClock()
    cfg = FailureRateConfig(threshold=threshold, min_requests=min_requests, window=window)
    return FailureRate(cfg, clock), clock


def test_rate_needs_min_requests() -> None:
    r, _ = rate(min_requests=4)
    assert not r.failure()
    assert not r.failure()
    assert not r.failure()  # 3 of 3 failed, but only 3 outcomes
    assert r.failure()  # 4 of 4


def test_rate_opens_at_the_threshold_share() -> None:
    r, _ = rate(threshold=0.25, min_requests=4)
    for _ in range(3):
        r.success()
    assert r.failure()  # 1 of 4 = 25%
    r2, _ = rate(threshold=0.25, min_requests=4)
    for _ in range(4):
        r2.success()
    assert not r2.failure()  # 1 of 5 = 20%


def test_rate_window_slides() -> None:
    r, clock = rate(threshold=0.5, min_requests=4, window=10.0)
    r.failure()
    r.failure()
    r.failure()
    clock.now += 10.0 + 10.0 / RATE_BUCKETS  # those fell out of the window
    assert (r.outcomes, r.failed) == (0, 0)
    assert not r.failure()
    for _ in range(3):
        clock.now += 1.0  # within the window: kept, bucket by bucket
        r.success()
    assert (r.outcomes, r.failed) == (4, 1)
    clock.now += 8.5  # the first failure's bucket slid out, the successes' did not all
    assert r.failed == 0


def test_rate_buckets_allocate_nothing_per_outcome() -> None:
    r, clock = rate()
    ok, bad = r._ok, r._bad
    for i in range(100):
        clock.now += 0.37
        r.success() if i % 3 else r.failure()
    assert r._ok is ok and r._bad is bad and len(ok) == RATE_BUCKETS


def test_breaker_opens_by_rate_without_a_streak() -> None:
    clock = FakeClock()
    cfg = BreakerConfig(
        failure_threshold=5,
        failure_rate=FailureRateConfig(threshold=0.3, min_requests=9, window=10.0),
    )
    br = Breaker("s", cfg, clock=clock)
    for i in range(9):
        if i % 3 == 2:
            br.record_failure(OSError("reset"))
        else:
            br.count_success()
            br.record_success(None)
    assert br.state == "open" and br.trips == 1  # 3 of 9 failed; never 2 in a row
    clock.now += 31
    assert br.allow_dial()
    br.record_success(br.trial_token)
    assert br.is_closed and br.rate is not None and br.rate.outcomes == 0  # a fresh window


def test_reconfigure_turns_the_rate_on_and_off() -> None:
    br = Breaker("s", BreakerConfig())
    assert br.rate is None
    br.reconfigure(BreakerConfig(failure_rate=FailureRateConfig(threshold=0.5)))
    assert br.rate is not None
    br.reconfigure(BreakerConfig())
    assert br.rate is None


# -- panic dials ----------------------------------------------------------------------------


def open_breaker() -> tuple[Breaker, FakeClock]:
    clock = FakeClock()
    br = Breaker("s", BreakerConfig(failure_threshold=1, recovery_timeout=10), clock=clock)
    br.record_failure(OSError("down"))
    assert br.state == "open"
    return br, clock


def test_panic_dial_success_closes() -> None:
    br, _ = open_breaker()
    closes = br.closes
    br.record_success(PANIC_DIAL)
    assert br.is_closed and br.closes == closes + 1


def test_panic_dial_failure_keeps_it_open_and_its_wait() -> None:
    br, clock = open_breaker()
    clock.now += 4
    left = br.retry_in()
    br.record_failure(OSError("refused"), PANIC_DIAL, dial=True)
    assert br.state == "open" and br.recovery_timeout == 10 and br.retry_in() == left
    clock.now += 6  # half-open, its trial taken: a panic failure does not re-open it
    assert br.allow_dial()
    token = br.trial_token
    br.record_failure(OSError("refused"), PANIC_DIAL, dial=True)
    assert br.state == "half_open" and br.trial_in_flight
    br.record_success(token)
    assert br.is_closed and br.recovery_timeout == 10


def test_health_blind_balancer_picks_open_members() -> None:
    class M:
        def __init__(self, br: Breaker) -> None:
            self.breaker, self.active, self.weight = br, 0, 1

    members = [M(open_breaker()[0]) for _ in range(3)]
    for strategy in ("round_robin", "least_active", "weighted", "random"):
        assert make_balancer(strategy, members).pick() is None
        blind = make_balancer(strategy, ignoring_health(members))
        assert {blind.pick() for _ in range(30)} == {0, 1, 2} or strategy == "least_active"
        assert blind.pick({0, 1}) == 2


# -- in the manager -------------------------------------------------------------------------


def test_panic_stat_and_gauge(make_manager: Any) -> None:
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": ["127.0.0.1:1", "127.0.0.1:2"],
                    "pool": {"min_idle": 0},
                    "breaker": {"failure_threshold": 1},
                }
            }
        }
    )
    b = manager.backends["b"]
    assert not b.in_panic() and manager.stats().to_dict()["backends"]["b"]["panic"] is False
    b.pools[0].breaker.record_failure(OSError("x"))
    assert not b.in_panic()  # one of two eligible: not below 50%
    b.pools[1].breaker.record_failure(OSError("x"))
    assert b.in_panic() and manager.stats().backends["b"].panic is True
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    assert 'lbpool_panic{backend="b"} 1.0' in generate_latest(registry).decode()
    b.pools[0].breaker.reset()
    assert not b.in_panic()


def test_panic_off_at_zero(make_manager: Any) -> None:
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": ["127.0.0.1:1"],
                    "pool": {"min_idle": 0},
                    "breaker": {"failure_threshold": 1},
                    "balance": {"panic_threshold": 0},
                }
            }
        }
    )
    b = manager.backends["b"]
    b.pools[0].breaker.record_failure(OSError("x"))
    assert not b.in_panic()


def test_key_affinity_panic_tries_the_owner(make_manager: Any) -> None:
    """Panic on a maglev backend: the key's owner is dialed though its breaker is open
    (as Envoy's maglev ignores health in panic), and that dial closes it."""
    with EchoServer() as a, EchoServer() as b:
        manager = make_manager(
            {
                "backends": {
                    "k": {
                        "strategy": "maglev",
                        "servers": [a.address, b.address],
                        "pool": {"min_idle": 0},
                        "breaker": {"failure_threshold": 1, "recovery_timeout": 60},
                    }
                }
            }
        )
        owner = manager.owner("k", "key-1")
        for pool in manager.backends["k"].pools:
            pool.breaker.record_failure(OSError("blip"))
        assert manager.backends["k"].in_panic()
        with manager.get("k", key="key-1", timeout=2) as conn:
            assert conn.address == owner and conn.rank == 0
        pools = {p.name: p for p in manager.backends["k"].pools}
        assert pools[owner].breaker.is_closed
        manager.close()


def test_slow_start_warms_servers_that_join_or_recover(make_manager: Any) -> None:
    cfg: dict[str, Any] = {
        "backends": {
            "b": {
                "servers": ["127.0.0.1:1", "127.0.0.1:2"],
                "pool": {"min_idle": 0},
                "breaker": {"failure_threshold": 1},
                "balance": {"slow_start": {"window": "10s"}},
            }
        }
    }
    manager = make_manager(cfg)
    b = manager.backends["b"]
    assert b._warming == {}  # the first membership does not ramp
    cfg["backends"]["b"]["servers"] = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    manager.reload(cfg)
    assert [p.name for p in b._warming] == ["127.0.0.1:3"]
    b.pools[0].breaker.record_failure(OSError("x"))
    b.pools[0].breaker.reset()  # closed again: it warms up
    assert set(b._warming) == {b.pools[0], b.pools[2]}
    del cfg["backends"]["b"]["balance"]
    manager.reload(cfg)
    assert b._warming == {}


def test_slow_start_admission_is_min_weight_at_first(make_manager: Any) -> None:
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"],
                    "pool": {"min_idle": 0},
                    "balance": {"slow_start": {"window": "1h", "min_weight": 0.1}},
                }
            }
        }
    )
    b = manager.backends["b"]
    b._warming[b.pools[0]] = monotonic()
    picks = [b._warmed(0, frozenset()) for _ in range(4000)]
    kept = picks.count(0) / len(picks)
    assert 0.05 < kept < 0.15, kept  # ~ min_weight
    assert all(p in (0, 1, 2, 3) for p in picks)
