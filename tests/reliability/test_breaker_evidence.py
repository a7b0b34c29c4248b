"""Breakers judge servers on evidence (DESIGN 4, 15), on caller- and upkeep-driven
dials alike.

What counts: failed dials (connect error or timeout, TLS, setup hook), network errors
reported on connections in use, failed configured checks (on borrow and in upkeep).
A successful dial ends a streak of dial failures only; a half-open trial closes the
breaker only once the configured check passes on its connection; one trial at a
time, ended only by its own outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from lbpool import DialError
from lbpool.breaker import Breaker
from lbpool.config import BreakerConfig, HealthCheckConfig, PoolConfig
from lbpool.pool import Pool
from lbpool.testing import EchoServer, FaultProxy

pytestmark = pytest.mark.timeout(30)

PING = HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=2)


class Clock:
    """A manual monotonic clock for the breaker: recovery without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker_for(
    address: str, clock: Clock, events: dict[str, Event] | None = None, **kw: Any
) -> Breaker:
    cfg = {"failure_threshold": 1, "recovery_timeout": 1, "max_recovery_timeout": 60}
    cfg.update(kw)

    def listener(breaker: Breaker, old: str, new: str) -> None:
        if events is not None and new in events:
            events[new].set()

    return Breaker(address, BreakerConfig(**cfg), listener, clock=clock)


def test_dial_success_ends_a_streak_of_dial_failures(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    with FaultProxy(echo_server_factory().address) as proxy:
        breaker = Breaker(proxy.address, BreakerConfig(failure_threshold=3))
        pool = Pool(
            proxy.address, pool=PoolConfig(min_idle=0, max_size=4), breaker=breaker, upkeep=False
        )
        proxy.refuse()
        for _ in range(2):
            with pytest.raises(DialError):
                pool.acquire(timeout=5)
        proxy.recover()
        held = pool.acquire(timeout=5)  # a successful dial: the streak ends
        proxy.refuse()
        for _ in range(2):
            with pytest.raises(DialError):
                pool.acquire(timeout=5)
        assert breaker.state == "closed" and breaker.failure_count == 2
        held.release()
        pool.close()


def test_errors_in_use_are_not_forgiven_by_successful_dials(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    """A server that accepts and then fails every request still opens its breaker."""
    server = echo_server_factory()
    breaker = Breaker(server.address, BreakerConfig(failure_threshold=3))
    pool = Pool(
        server.address, pool=PoolConfig(min_idle=0, max_size=2), breaker=breaker, upkeep=False
    )
    for _ in range(3):
        with pytest.raises(ConnectionResetError), pool.get(timeout=5):  # a fresh dial each time
            raise ConnectionResetError("request failed")
    assert breaker.state == "open"
    pool.close()


@pytest.mark.parametrize("driver", ["caller", "upkeep"])
def test_trial_closes_the_breaker_only_once_the_check_passes(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None, driver: str
) -> None:
    """A server that accepts TCP and closes at once: the trial's connect succeeds but
    its PING fails, so the breaker re-opens with the wait doubled."""
    server = echo_server_factory(mode="close_on_accept")
    clock = Clock()
    events = {"open": Event(), "closed": Event()}
    breaker = breaker_for(server.address, clock, events)
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=1 if driver == "upkeep" else 0, max_size=2),
        health_check=PING,
        breaker=breaker,
        upkeep=False,
    )
    breaker.record_failure(ConnectionResetError("request failed"))
    assert breaker.state == "open"
    events["open"].clear()
    clock.now = 1.0  # recovery elapsed: half-open, one trial allowed
    if driver == "caller":
        with pytest.raises(DialError, match="health check"):
            pool.acquire(timeout=5)
    else:
        assert pool.fill() == 1
        assert events["open"].wait(5) or events["closed"].is_set()
    assert breaker.state == "open", breaker
    assert breaker.recovery_timeout == 2.0  # doubled
    s = pool.stats()
    assert (s.size, s.pending) == (0, 0), s
    pool.close()


@pytest.mark.parametrize("driver", ["caller", "upkeep"])
def test_error_on_an_old_connection_does_not_end_the_trial_in_flight(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None, driver: str
) -> None:
    server = echo_server_factory()
    clock = Clock()
    closed = Event()
    breaker = breaker_for(server.address, clock, {"closed": closed})
    entered, gate = Event(), Event()
    gated = [False]
    calls = [0]

    def setup(sock: Any) -> None:
        calls[0] += 1
        if gated[0]:
            entered.set()
            assert gate.wait(10)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=4),
        breaker=breaker,
        setup=setup,
        upkeep=False,
    )
    first, second = pool.acquire(timeout=5), pool.acquire(timeout=5)
    first.discard(ConnectionResetError("request failed"))  # opens (threshold 1)
    assert breaker.state == "open"
    clock.now = 1.0
    gated[0] = True
    trial: gevent.Greenlet | None = None
    if driver == "caller":
        trial = gevent.spawn(pool.acquire, 5)
    else:
        pool.reconfigure(
            pool=pool.config.model_copy(update={"min_idle": 1}),
            dial=pool.dial_config,
            health_check=pool.health_config,
            setup=setup,
        )
        assert pool.fill() == 1
    assert entered.wait(5)  # the trial dial is in flight, parked in its setup hook
    second.discard(ConnectionResetError("late error from before the breaker opened"))
    assert breaker.state == "half_open" and breaker.trial_in_flight, breaker
    assert pool.fill() == 0  # no second trial, from upkeep ...
    with pytest.raises(DialError, match="circuit breaker"):
        pool.acquire(timeout=5)  # ... nor from a caller
    assert calls[0] == 3  # two old connections + the one trial
    gate.set()
    assert closed.wait(5)  # the trial's own outcome ends it
    if trial is not None:
        trial.get(timeout=5).release()
    pool.close()


@pytest.mark.parametrize("driver", ["caller", "upkeep"])
def test_failed_checks_count_against_the_breaker(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None, driver: str
) -> None:
    server = echo_server_factory()
    breaker = Breaker(server.address, BreakerConfig(failure_threshold=5))
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=4, check_after=0),
        health_check=PING.model_copy(update={"timeout": 0.2, "interval": 0}),
        breaker=breaker,
        upkeep=False,
    )
    pool.acquire(timeout=5).release()  # one idle connection
    server.mode = "silent"
    if driver == "caller":
        # the check fails (charged), then a fresh dial serves the caller
        conn = pool.acquire(timeout=5)
        conn.discard()
    else:
        pool.run_upkeep()  # starts the check as an errand: wait for its verdict
        deadline = time.monotonic() + 5
        while pool.stats().closed["unhealthy"] == 0 and time.monotonic() < deadline:
            gevent.sleep(0.01)
    assert pool.stats().closed["unhealthy"] == 1
    assert breaker.failure_count == 1
    pool.close()
