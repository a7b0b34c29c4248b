"""Breaker: the circuitbreaker package's CircuitBreaker with one-trial half-open,
doubling recovery, float seconds, no global registry, and a listener."""

from __future__ import annotations

import contextlib
import logging

import gevent
import pytest
from circuitbreaker import CircuitBreaker, CircuitBreakerMonitor
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lbpool.breaker import ANY_TRIAL, PANIC_DIAL, Breaker, CircuitBreakerError
from lbpool.config import BreakerConfig


class FakeClock:
    """A monotonic clock the test moves by hand: deterministic sub-second timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    threshold: int = 3,
    recovery: float = 1.0,
    max_recovery: float = 8.0,
    listener=None,
    clock: FakeClock | None = None,
    name: str = "srv",
    **kwargs,
) -> tuple[Breaker, FakeClock]:
    clock = clock or FakeClock()
    config = BreakerConfig(
        failure_threshold=threshold,
        recovery_timeout=recovery,
        max_recovery_timeout=max_recovery,
    )
    return Breaker(name, config, listener, clock=clock, **kwargs), clock


def trip(breaker: Breaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(OSError("refused"))


def test_is_a_circuitbreaker_with_its_vocabulary() -> None:
    b, _ = make()
    assert isinstance(b, CircuitBreaker)
    assert b.name == "srv" and str(b) == "srv"
    assert b.state == "closed" and b.is_closed and b.closed and not b.opened
    assert b.failure_count == 0 and b.last_failure is None
    assert b.failure_threshold == 3 and b.recovery_timeout == 1.0
    assert b.retry_in() == 0.0 and b.trips == 0 and not b.trial_in_flight
    assert b.allow_dial()


def test_opens_at_threshold_of_consecutive_failures() -> None:
    b, _ = make(threshold=3)
    b.record_failure(OSError("1"))
    b.record_failure(OSError("2"))
    assert b.state == "closed" and b.is_closed and b.failure_count == 2
    err = OSError("3")
    b.record_failure(err)
    assert b.state == "open" and not b.is_closed and b.opened
    assert b.failure_count == 3 and b.last_failure is err
    assert b.trips == 1
    assert b.retry_in() == pytest.approx(1.0)


def test_success_resets_the_consecutive_count() -> None:
    b, _ = make(threshold=3)
    b.record_failure(OSError())
    b.record_failure(OSError())
    b.record_success()
    assert b.failure_count == 0 and b.last_failure is None
    b.record_failure(OSError())
    b.record_failure(OSError())
    assert b.is_closed


def test_open_refuses_until_recovery_elapses() -> None:
    b, clock = make(recovery=2.0)
    trip(b)
    for _ in range(3):
        assert not b.allow_dial()
    clock.advance(1.5)
    assert b.state == "open" and not b.allow_dial()
    assert b.retry_in() == pytest.approx(0.5)
    clock.advance(0.5)
    assert b.state == "half_open" and b.retry_in() == 0.0
    assert b.allow_dial()


def test_sub_second_recovery_uses_float_seconds() -> None:
    b, clock = make(recovery=0.05, max_recovery=0.2)
    trip(b)
    clock.advance(0.03)
    assert b.state == "open"
    assert b.open_remaining == pytest.approx(0.02)
    assert b.retry_in() == pytest.approx(0.02)
    clock.advance(0.02)
    assert b.state == "half_open"
    assert b.allow_dial()
    b.record_failure(OSError())
    assert b.recovery_timeout == pytest.approx(0.1)
    clock.advance(0.099)
    assert not b.allow_dial()
    clock.advance(0.001)
    assert b.allow_dial()


def test_half_open_admits_exactly_one_trial_at_a_time() -> None:
    b, clock = make()
    trip(b)
    clock.advance(1.0)
    assert b.allow_dial()
    assert b.trial_in_flight and b.state == "half_open"
    assert not any(b.allow_dial() for _ in range(100))
    b.record_success()
    assert b.state == "closed" and all(b.allow_dial() for _ in range(10))


def test_half_open_one_trial_among_concurrent_greenlets() -> None:
    b, clock = make()
    trip(b)
    clock.advance(1.0)
    admitted: list[int] = []
    refused: list[int] = []

    def caller(i: int) -> None:
        gevent.sleep(0)
        if b.allow_dial():
            admitted.append(i)
            gevent.sleep(0.01)  # the trial dial takes a while; the others run meanwhile
            b.record_success()
        else:
            refused.append(i)

    gevent.joinall([gevent.spawn(caller, i) for i in range(50)], raise_error=True)
    assert len(admitted) == 1 and len(refused) == 49
    assert b.is_closed


def test_half_open_one_trial_via_context_manager_among_greenlets() -> None:
    b, clock = make()
    trip(b)
    clock.advance(1.0)
    outcomes: list[str] = []

    def caller() -> None:
        try:
            with b:
                gevent.sleep(0.01)
                raise OSError("still down")
        except CircuitBreakerError:
            outcomes.append("rejected")
        except OSError:
            outcomes.append("trial")

    gevent.joinall([gevent.spawn(caller) for _ in range(20)], raise_error=True)
    assert outcomes.count("trial") == 1 and outcomes.count("rejected") == 19
    assert b.state == "open" and b.recovery_timeout == 2.0


def test_failed_trials_double_recovery_up_to_max_and_success_restores_base() -> None:
    b, clock = make(recovery=1.0, max_recovery=5.0)
    trip(b)
    seen = []
    for _ in range(5):
        clock.advance(b.recovery_timeout)
        assert b.allow_dial()
        b.record_failure(OSError("trial failed"))
        assert b.state == "open"
        seen.append(b.recovery_timeout)
        assert b.retry_in() == pytest.approx(b.recovery_timeout)
    assert seen == [2.0, 4.0, 5.0, 5.0, 5.0]
    assert b.trips == 1  # re-opening after a failed trial is not a new trip
    clock.advance(5.0)
    assert b.allow_dial()
    b.record_success()
    assert b.is_closed and b.recovery_timeout == 1.0 and b.failure_count == 0
    trip(b)
    assert b.trips == 2 and b.retry_in() == pytest.approx(1.0)


def test_abandon_trial_lets_the_next_caller_in() -> None:
    b, clock = make()
    trip(b)
    clock.advance(1.0)
    assert b.allow_dial()
    assert not b.allow_dial()
    b.abandon_trial()
    assert b.state == "half_open" and not b.trial_in_flight
    assert b.allow_dial()
    assert not b.allow_dial()


def test_stale_verdicts_while_open() -> None:
    b, clock = make(recovery=1.0)
    trip(b)
    clock.advance(0.5)
    b.record_success()  # from a dial admitted before the breaker opened: ignored
    assert b.state == "open"
    b.record_failure(OSError("late"))  # counted, but the wait is not extended
    assert b.failure_count == 4
    assert b.retry_in() == pytest.approx(0.5)
    assert b.recovery_timeout == 1.0


def test_listener_sees_every_transition() -> None:
    calls: list[tuple[Breaker, str, str]] = []
    b, clock = make(threshold=2, listener=lambda br, old, new: calls.append((br, old, new)))
    b.record_failure(OSError())
    assert calls == []
    b.record_failure(OSError())
    clock.advance(1.0)
    assert b.state == "half_open"  # a pure read: reported when the breaker next acts
    assert len(calls) == 1
    assert b.allow_dial()
    b.record_failure(OSError())
    clock.advance(2.0)
    assert b.allow_dial()
    b.record_success()
    assert all(br is b for br, _, _ in calls)
    assert [(old, new) for _, old, new in calls] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_listener_sees_state_already_changed() -> None:
    seen: list[tuple[str, bool]] = []
    b, _ = make(threshold=1, listener=lambda br, old, new: seen.append((br.state, br.is_closed)))
    b.record_failure(OSError())
    assert seen == [("open", False)]


def test_yielding_listener_never_sees_a_half_made_transition() -> None:
    calls: list[tuple[str, str]] = []

    def slow_listener(br: Breaker, old: str, new: str) -> None:
        calls.append((old, new))
        gevent.sleep(0.001)  # e.g. a metrics push that switches greenlets

    b, _ = make(threshold=1, listener=slow_listener)
    gevent.joinall(
        [gevent.spawn(b.record_failure, OSError(str(i))) for i in range(10)], raise_error=True
    )
    assert b.trips == 1 and calls == [("closed", "open")] and b.failure_count == 10


def test_listener_exceptions_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def listener(br: Breaker, old: str, new: str) -> None:
        raise RuntimeError("listener bug")

    b, clock = make(threshold=1, listener=listener)
    with caplog.at_level(logging.DEBUG, logger="lbpool"):
        b.record_failure(OSError())
        assert b.state == "open" and not b.is_closed and b.trips == 1
        clock.advance(1.0)
        assert b.allow_dial()
        b.record_success()
    assert b.is_closed
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert all(r.name == "lbpool" and r.exc_info for r in errors)
    assert "listener bug" in caplog.text


def test_logs_warning_on_open_and_info_on_close(caplog: pytest.LogCaptureFixture) -> None:
    b, clock = make(threshold=1, name="10.0.0.1:6379")
    with caplog.at_level(logging.DEBUG, logger="lbpool"):
        b.record_failure(OSError("refused"))
        clock.advance(1.0)
        assert b.allow_dial()
        b.record_failure(OSError("refused again"))
        clock.advance(2.0)
        assert b.allow_dial()
        b.record_success()
    levels = [(r.levelno, r.name) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "lbpool"),
        (logging.WARNING, "lbpool"),
        (logging.INFO, "lbpool"),
    ]
    assert all("10.0.0.1:6379" in r.getMessage() for r in caplog.records)


def test_breakers_with_the_same_name_are_independent() -> None:
    before = dict(CircuitBreakerMonitor.circuit_breakers)
    a, _ = make(threshold=1, name="same")
    b, _ = make(threshold=1, name="same")

    @a
    def guarded() -> str:
        return "ok"

    assert guarded() == "ok"
    a.record_failure(OSError())
    assert a.state == "open" and b.state == "closed" and b.allow_dial()
    assert CircuitBreakerMonitor.circuit_breakers == before


def test_reconfigure_applies_live_and_keeps_state() -> None:
    b, clock = make(threshold=3, recovery=1.0, max_recovery=8.0)
    b.record_failure(OSError())
    b.reconfigure(
        BreakerConfig(failure_threshold=5, recovery_timeout=2.0, max_recovery_timeout=3.0)
    )
    assert b.is_closed and b.failure_count == 1 and b.failure_threshold == 5
    for _ in range(3):
        b.record_failure(OSError())
    assert b.is_closed
    b.record_failure(OSError())
    assert b.state == "open" and b.retry_in() == pytest.approx(2.0)
    # an open breaker's wait is re-measured with the new timeout, state kept
    b.reconfigure(
        BreakerConfig(failure_threshold=5, recovery_timeout=0.5, max_recovery_timeout=3.0)
    )
    assert b.state == "open" and b.retry_in() == pytest.approx(0.5)
    clock.advance(0.5)
    assert b.allow_dial()
    b.record_failure(OSError())
    assert b.recovery_timeout == 1.0
    # the backoff level survives a reconfigure; the new cap applies
    b.reconfigure(
        BreakerConfig(failure_threshold=5, recovery_timeout=2.0, max_recovery_timeout=3.0)
    )
    assert b.recovery_timeout == 3.0 and b.state == "open"


def test_reconfigure_lower_threshold_opens_on_next_failure() -> None:
    b, _ = make(threshold=5)
    for _ in range(3):
        b.record_failure(OSError())
    b.reconfigure(BreakerConfig(failure_threshold=2))
    assert b.is_closed
    b.record_failure(OSError())
    assert b.state == "open" and b.trips == 1


def test_context_manager_counts_failures_and_rejects_when_open() -> None:
    b, clock = make(threshold=2, expected_exception=OSError)
    with pytest.raises(ValueError), b:
        raise ValueError("app error: the service answered")
    assert b.failure_count == 0
    for _ in range(2):
        with pytest.raises(OSError), b:
            raise OSError("refused")
    assert b.state == "open"
    with pytest.raises(CircuitBreakerError) as info, b:
        pass
    assert "srv" in str(info.value)
    clock.advance(1.0)
    with b:
        pass
    assert b.is_closed


def test_greenlet_exit_abandons_the_trial() -> None:
    b, clock = make(threshold=1)
    b.record_failure(OSError())
    clock.advance(1.0)

    def trial() -> None:
        with b:
            gevent.sleep(10)

    g = gevent.spawn(trial)
    gevent.sleep(0)
    assert b.trial_in_flight
    g.kill()
    assert b.state == "half_open" and not b.trial_in_flight
    assert b.allow_dial()


def test_decorator_uses_fallback_and_one_trial() -> None:
    b, clock = make(threshold=1, fallback_function=lambda *a, **k: "fallback")
    calls: list[int] = []

    @b
    def dial(n: int) -> str:
        calls.append(n)
        if n < 0:
            raise OSError("down")
        return "dialed"

    with pytest.raises(OSError):
        dial(-1)
    assert b.state == "open"
    assert dial(1) == "fallback" and calls == [-1]
    clock.advance(1.0)
    assert b.allow_dial()  # someone else holds the trial
    assert dial(2) == "fallback"
    b.abandon_trial()
    assert dial(3) == "dialed" and b.is_closed and calls == [-1, 3]


def test_decorated_generator() -> None:
    b, _ = make(threshold=1)

    @b
    def numbers(fail: bool):
        yield 1
        if fail:
            raise OSError("mid-stream")
        yield 2

    assert list(numbers(False)) == [1, 2]
    with pytest.raises(OSError):
        list(numbers(True))
    assert b.state == "open"
    with pytest.raises(CircuitBreakerError):
        list(numbers(False))


def test_reset_force_closes() -> None:
    changes: list[tuple[str, str]] = []
    b, _ = make(threshold=1, listener=lambda br, old, new: changes.append((old, new)))
    b.record_failure(OSError())
    b.reset()
    assert b.is_closed and b.state == "closed" and b.failure_count == 0
    assert changes == [("closed", "open"), ("open", "closed")]


def test_a_panic_dials_success_closes_through_half_open() -> None:
    """Open, its wait not over, a panic-mode dial succeeds: the breaker closes by the
    edges every breaker takes (open -> half_open -> closed). It went open -> closed,
    which the chaos suite's edge check caught under load, when every server's breaker
    had opened and panic mode dialed one."""
    changes: list[tuple[str, str]] = []
    b, _ = make(
        threshold=1,
        recovery=60,
        max_recovery=60,
        listener=lambda br, old, new: changes.append((old, new)),
    )
    b.record_failure(OSError())
    b.record_success(PANIC_DIAL)
    assert b.is_closed
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_repr_and_error_message_with_float_remaining() -> None:
    b, clock = make(threshold=1, recovery=0.25)
    b.record_failure(OSError("refused"))
    clock.advance(0.1)
    assert "open" in repr(b)
    assert "sec remaining" in str(CircuitBreakerError(b))


# -- evidence: trial tokens, dial-only streaks (DESIGN 15) -------------------------------


def _half_open(threshold: int = 1) -> tuple[Breaker, list[float]]:
    now = [0.0]
    breaker = Breaker(
        "s", BreakerConfig(failure_threshold=threshold, recovery_timeout=1), clock=lambda: now[0]
    )
    for _ in range(threshold):
        breaker.record_failure(OSError("x"))
    now[0] = 1.0
    return breaker, now


def test_a_report_that_is_not_the_trial_does_not_end_it() -> None:
    breaker, _ = _half_open()
    assert breaker.allow_dial()
    token = breaker.trial_token
    assert token
    breaker.record_failure(OSError("old connection"), None)  # not the trial's
    assert breaker.state == "half_open" and breaker.trial_in_flight
    breaker.record_success(None)  # a clean release of an old connection
    assert breaker.state == "half_open" and breaker.trial_in_flight
    breaker.abandon_trial(None)
    assert breaker.trial_in_flight
    assert not breaker.allow_dial()  # still one trial
    breaker.record_success(token)
    assert breaker.state == "closed"


def test_a_stale_trial_cannot_release_the_next_one() -> None:
    breaker, _ = _half_open()
    assert breaker.allow_dial()
    stale = breaker.trial_token
    breaker.abandon_trial(stale)
    assert breaker.allow_dial()
    breaker.abandon_trial(stale)  # the old one, late: not the trial in flight
    assert breaker.trial_in_flight
    breaker.record_failure(OSError("x"), stale)
    assert breaker.state == "half_open"


def test_dial_success_ends_only_a_streak_of_dial_failures() -> None:
    breaker = Breaker("s", BreakerConfig(failure_threshold=3))
    breaker.record_failure(OSError("refused"), dial=True)
    breaker.record_failure(OSError("refused"), dial=True)
    breaker.record_dial_success()
    assert breaker.failure_count == 0
    breaker.record_failure(OSError("reset in use"))
    breaker.record_failure(OSError("refused"), dial=True)
    breaker.record_dial_success()
    assert breaker.failure_count == 2  # includes an error in use: only a clean use ends it
    breaker.record_success(None)
    assert breaker.failure_count == 0


class QuietMachine(RuleBasedStateMachine):
    """``quiet`` (what the pool's return reads instead of three attributes) agrees with
    its inputs after any sequence of the breaker's own and the package's operations:
    closed, no failure in the streak, no failure-rate window."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.clock = make(threshold=2, recovery=1.0, max_recovery=4.0)

    @rule(dial=st.booleans(), trial=st.sampled_from([ANY_TRIAL, None, PANIC_DIAL, 1, 2]))
    def failure(self, dial: bool, trial: int | None) -> None:
        self.b.record_failure(OSError("refused"), trial, dial=dial)

    @rule(trial=st.sampled_from([ANY_TRIAL, None, PANIC_DIAL, 1, 2]))
    def success(self, trial: int | None) -> None:
        self.b.record_success(trial)

    @rule()
    def dial_success(self) -> None:
        self.b.record_dial_success()

    @rule()
    def clean_use(self) -> None:
        self.b.count_success()

    @rule()
    def admit(self) -> None:
        self.b.allow_dial()

    @rule(seconds=st.sampled_from([0.1, 1.0, 5.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reset(self) -> None:
        self.b.reset()

    @rule(ok=st.booleans())
    def context_manager(self, ok: bool) -> None:
        # the package's context-manager use (Breaker's own __enter__/__exit__)
        with contextlib.suppress(OSError, CircuitBreakerError), self.b:
            if not ok:
                raise OSError("refused")

    @rule(ok=st.booleans())
    def package_call(self, ok: bool) -> None:
        # the package's call(), its code around Breaker's __enter__/__exit__
        def fn() -> None:
            if not ok:
                raise OSError("refused")

        with contextlib.suppress(OSError, CircuitBreakerError):
            self.b.call(fn)

    @rule(rate=st.sampled_from([None, 0.5]), threshold=st.integers(1, 3))
    def reconfigure(self, rate: float | None, threshold: int) -> None:
        self.b.reconfigure(
            BreakerConfig(
                failure_threshold=threshold,
                recovery_timeout=1.0,
                max_recovery_timeout=4.0,
                failure_rate=None if rate is None else {"threshold": rate, "min_requests": 2},
            )
        )

    @invariant()
    def quiet_agrees(self) -> None:
        b = self.b
        assert b.is_closed == (b._state == "closed")
        assert b.quiet == (b.is_closed and b.failure_count == 0 and b.rate is None)


TestQuiet = QuietMachine.TestCase
TestQuiet.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
