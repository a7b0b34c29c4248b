"""Per-server circuit breaker: the ``circuitbreaker`` package's ``CircuitBreaker``, extended.

We keep the package's vocabulary (``closed``/``open``/``half_open``, ``failure_threshold``,
``recovery_timeout``, ``failure_count``, ``last_failure``, ``open_remaining``, ``state``)
and its context-manager/decorator use, and fix what a connection pool needs:

* half-open admits exactly one trial at a time (the package lets every caller through);
* each failed trial doubles the recovery timeout up to ``max_recovery_timeout``, and a
  successful trial restores the base timeout;
* times are float seconds on an injectable monotonic clock (the package rounds to ints,
  which breaks sub-second timeouts);
* no global registry: breakers of different managers never share state, whatever their
  names (``CircuitBreakerMonitor.register`` is never called);
* a listener sees every state change, and opening/closing is logged on ``lbpool``;
* optionally (``failure_rate``) it also opens on a failure *rate*: over a sliding
  window, at least ``min_requests`` outcomes and a failed share of ``threshold``
  (``FailureRate``: ten buckets of counts in preallocated lists, so recording an
  outcome allocates nothing). Successes are clean uses (``count_success``), failures
  every ``record_failure`` (network errors on connections in use, failed dials); a
  successful dial is no outcome: it would dilute a server that accepts every
  connection and fails every request (each failure brings a fresh dial, so half the
  outcomes would be successes). Consecutive counting stays.

Which exceptions count as failures is the caller's decision: the pool calls
``record_failure`` only for dial and network errors, never for application errors.
Used through ``with breaker:`` or as a decorator, the package's ``expected_exception``
predicate (default ``Exception``) decides instead.

Concurrency: no method yields between reading and writing state, so the breaker is
safe among greenlets of one hub without a lock. State is written *before* the listener
runs, so a listener may read or even drive the breaker.

There is no timer. ``state`` is a pure read that says ``half_open`` as soon as an open
breaker's wait has elapsed (so stats and balancers, even a metrics thread, see it without
changing anything); the stored state moves open -> half_open, and the listener hears of
it, when the breaker next acts: ``allow_dial``, a verdict, ``reset``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import wraps
from inspect import isasyncgenfunction, iscoroutinefunction, isgeneratorfunction
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import circuitbreaker
from circuitbreaker import CircuitBreaker, CircuitBreakerError

if TYPE_CHECKING:
    from lbpool.config import BreakerConfig, FailureRateConfig

__all__ = [
    "ANY_TRIAL",
    "PANIC_DIAL",
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "Breaker",
    "BreakerListener",
    "BreakerState",
    "CircuitBreakerError",
    "FailureRate",
]

logger = logging.getLogger("lbpool")

# The package's state names, typed (it ships no hints).
STATE_CLOSED: Final[str] = circuitbreaker.STATE_CLOSED
STATE_OPEN: Final[str] = circuitbreaker.STATE_OPEN
STATE_HALF_OPEN: Final[str] = circuitbreaker.STATE_HALF_OPEN

BreakerState = Literal["closed", "open", "half_open"]
BreakerListener = Callable[["Breaker", str, str], None]

# Doubling stops long before floats overflow; the cap is max_recovery_timeout anyway.
_MAX_BACKOFF_LEVEL = 64

# ``trial=`` of a verdict: "if a trial is in flight, this is its outcome" -- what the
# package API (``with breaker:``, the decorator) and direct calls mean. The pool passes
# the token ``allow_dial`` handed out (``trial_token``) for its trial's outcome, and
# None for anything else (an old connection's error, a clean release), which then
# cannot end a trial in flight.
ANY_TRIAL: Final[int] = -1

# ``trial=`` of a panic-mode dial's verdict (the manager's panic mode let a dial through
# to a server whose breaker refused it): success closes the breaker; failure is counted
# and changes nothing else (an open breaker keeps its wait, not doubled).
PANIC_DIAL: Final[int] = -2

# Buckets of a failure-rate window: the window slides by a tenth of itself.
RATE_BUCKETS: Final[int] = 10


class FailureRate:
    """Outcomes over a sliding window: ``RATE_BUCKETS`` buckets of (ok, failed) counts.

    The window is ``window`` seconds, cut into ten buckets of ``window / 10``; the
    buckets older than the window are zeroed as the clock moves on, so the counts
    cover between 90% and 100% of ``window`` (the current bucket is partial). Ints in
    two preallocated lists and two running totals: recording allocates nothing and
    costs one clock read (Hystrix's and resilience4j's time-based sliding window).
    Never yields.
    """

    __slots__ = (
        "_bad",
        "_clock",
        "_epoch",
        "_failed",
        "_ok",
        "_total",
        "_width",
        "min_requests",
        "threshold",
    )

    def __init__(self, config: FailureRateConfig, clock: Callable[[], float]) -> None:
        self.threshold = float(config.threshold)
        self.min_requests = config.min_requests
        self._width = float(config.window) / RATE_BUCKETS
        self._clock = clock
        self._ok = [0] * RATE_BUCKETS
        self._bad = [0] * RATE_BUCKETS
        self._total = 0  # outcomes in the window (ok + failed)
        self._failed = 0
        self._epoch = int(clock() / self._width)  # the current bucket's number

    @property
    def outcomes(self) -> int:
        """Outcomes recorded in the window now (stale buckets are dropped first)."""
        self._slide(int(self._clock() / self._width))
        return self._total

    @property
    def failed(self) -> int:
        """Failed outcomes in the window now."""
        self._slide(int(self._clock() / self._width))
        return self._failed

    def _slide(self, epoch: int) -> None:
        """Move the window to bucket number ``epoch``: zero the buckets it passed."""
        steps = epoch - self._epoch
        if not steps:
            return
        ok = self._ok
        bad = self._bad
        if steps >= RATE_BUCKETS or steps < 0:  # all stale (or the clock went back)
            for k in range(RATE_BUCKETS):
                ok[k] = bad[k] = 0
            self._total = self._failed = 0
        else:
            for e in range(self._epoch + 1, epoch + 1):
                k = e % RATE_BUCKETS
                self._total -= ok[k] + bad[k]
                self._failed -= bad[k]
                ok[k] = bad[k] = 0
        self._epoch = epoch

    def success(self) -> None:
        """Count a success in the current bucket."""
        epoch = int(self._clock() / self._width)
        if epoch != self._epoch:
            self._slide(epoch)
        self._ok[epoch % RATE_BUCKETS] += 1
        self._total += 1

    def failure(self) -> bool:
        """Count a failure; True when the window now says open (enough outcomes, and
        the failed share at or above ``threshold``)."""
        epoch = int(self._clock() / self._width)
        if epoch != self._epoch:
            self._slide(epoch)
        self._bad[epoch % RATE_BUCKETS] += 1
        self._total += 1
        self._failed += 1
        return self._total >= self.min_requests and self._failed >= self.threshold * self._total

    def clear(self) -> None:
        """Forget every outcome (the breaker opened or closed: a new window starts)."""
        self._slide(self._epoch + RATE_BUCKETS)
        self._epoch = int(self._clock() / self._width)

    def __repr__(self) -> str:
        return (
            f"<FailureRate {self._failed}/{self._total} failed, opens at "
            f"{self.threshold:.0%} of >= {self.min_requests}>"
        )


class Breaker(CircuitBreaker):  # type: ignore[misc]  # the package ships no type hints
    """One server's breaker: opens on consecutive failures, then probes with one trial.

    ``is_closed`` is a plain attribute, kept current on every transition, so the pool's
    hot path costs one attribute read. So is ``quiet``: closed, no failure in the
    current streak and no failure-rate window, so a clean use changes nothing (the
    pool's return reads it instead of three attributes). Its three inputs keep it:
    ``_transition``, ``rate``'s two writers, and ``_failure_count``, a property, so
    the package's own writes of the count keep it too.
    """

    is_closed: bool = False  # until __init__ closes it (the package's __init__ runs first)
    quiet: bool = False
    closes: int  # transitions to closed: connections dialed before the last one are stale
    rate: FailureRate | None = None  # the failure-rate window; None when failure_rate is off
    trips: int  # closed -> open transitions; re-opening after a failed trial is not a trip
    # the package's attributes, typed (it ships no hints)
    _name: str
    _state: str
    _failures: int = 0  # the streak's count, behind the ``_failure_count`` property
    _failure_threshold: int
    _last_failure: BaseException | None
    _recovery_timeout: float  # the current wait: base doubled per failed trial, capped
    _opened: float

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        listener: BreakerListener | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        expected_exception: Any = None,
        fallback_function: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(
            failure_threshold=config.failure_threshold,
            recovery_timeout=config.recovery_timeout,
            expected_exception=expected_exception,
            name=name,
            fallback_function=fallback_function,
        )
        self._clock = clock
        self._listener = listener
        self._base_recovery_timeout = float(config.recovery_timeout)
        self._max_recovery_timeout = float(config.max_recovery_timeout)
        self._backoff_level = 0  # failed trials in a row; current timeout = base * 2**level
        self._recovery_timeout = self._base_recovery_timeout
        self._failure_threshold = config.failure_threshold
        self._opened = clock()
        self._trial_in_flight = False
        self._trial_token = 0  # the claimed trial's number; tokens start at 1
        # the streak of failures includes an error on a connection in use (not only
        # dials): a successful dial does not end it, only a clean use does
        self._in_use_streak = False
        # the last failure was a failed dial: evidence that dials fail now, so panic
        # mode lets none through until a trial's verdict (see ``panic_may_dial``)
        self._dial_failed_last = False
        self.is_closed = True
        self.closes = 0
        self.trips = 0
        self._rate_config = config.failure_rate
        self.rate = None if config.failure_rate is None else FailureRate(config.failure_rate, clock)
        self._requiet()

    @property
    def _failure_count(self) -> int:
        """The package's failure count (consecutive failures), kept in ``_failures``."""
        return self._failures

    @_failure_count.setter
    def _failure_count(self, count: int) -> None:
        self._failures = count
        self._requiet()

    def _requiet(self) -> None:
        """Recompute ``quiet`` from its inputs; called by each of their writers."""
        self.quiet = self.is_closed and not self._failures and self.rate is None

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> str:
        """``closed``, ``open``, or ``half_open`` (an open breaker whose wait has elapsed)."""
        state = self._state
        if state == STATE_OPEN and self._clock() >= self._opened + self._recovery_timeout:
            return STATE_HALF_OPEN
        return state

    @property
    def trial_in_flight(self) -> bool:
        """True while the one half-open trial is claimed and has not reported."""
        return self._trial_in_flight

    @property
    def trial_token(self) -> int:
        """The trial in flight's token (0 when none): pass it with the trial's verdict."""
        return self._trial_token if self._trial_in_flight else 0

    @property
    def failure_threshold(self) -> int:
        return self._failure_threshold

    @property
    def recovery_timeout(self) -> float:
        """The current wait before a trial: the base, doubled per failed trial, capped."""
        return self._recovery_timeout

    @property
    def open_remaining(self) -> float:
        """Float seconds left open (negative once elapsed); the package rounds to ints."""
        return self._opened + self._recovery_timeout - self._clock()

    def retry_in(self) -> float:
        """Seconds until a trial is allowed; 0 when closed or half-open."""
        if self._state != STATE_OPEN:
            return 0.0
        return max(0.0, self.open_remaining)

    # ------------------------------------------------------------------ verdicts

    def allow_dial(self) -> bool:
        """May the caller dial? Half-open: True for exactly one caller, who owns the trial.

        The owner must report with ``record_success``, ``record_failure`` or
        ``abandon_trial`` (passing ``trial_token``, read right after this call); until
        then every other caller gets False.
        """
        if self.is_closed:
            return True
        if self._state == STATE_OPEN:
            self._promote()
        if self._state == STATE_HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            self._trial_token += 1
            return True
        return False

    def _not_the_trial(self, trial: int | None) -> bool:
        """A trial is in flight and this report is not its outcome (None: not a trial)."""
        return self._trial_in_flight and trial != ANY_TRIAL and trial != self._trial_token

    def record_success(self, trial: int | None = ANY_TRIAL) -> None:
        """A success: resets the failure count; in half-open, closes the breaker (as does
        a panic-mode dial's success, ``trial=PANIC_DIAL``, open or half-open).

        A success while still open comes from a call admitted before the breaker
        opened; it is stale and ignored (only a trial may close the breaker), as is,
        while a trial is in flight, any success that is not the trial's.
        """
        if self.is_closed:
            self._failure_count = 0
            self._last_failure = None
            self._in_use_streak = False
            return
        if trial == PANIC_DIAL:
            self.record_panic_success()
            return
        if self._state == STATE_OPEN:
            self._promote()
            if self._state == STATE_OPEN:
                return
        if self._not_the_trial(trial):
            return
        self._close()

    @property
    def panic_may_dial(self) -> bool:
        """May the backend's panic mode let a dial through to this (open) server? Not
        when its last failure was a failed dial: that is evidence the server cannot be
        dialed now (down, refusing, black-holed), and such a server is left to its
        half-open trial; so a backend whose every server is known down fails at once
        (DESIGN: "every breaker open: ``get`` fails at once"), while one whose breakers
        opened on errors of connections in use (a network blip resetting every
        connection) is dialed, each dial the verdict."""
        return not self._dial_failed_last

    def record_panic_success(self) -> None:
        """A dial let through by the backend's panic mode (the breaker open, or half-open
        with its trial taken) succeeded: that is its verdict, the breaker closes. (Its
        failure is an ordinary ``record_failure`` with no trial: counted, and the open
        breaker keeps its wait, not doubled.) Open, it goes through half-open, the
        edges every breaker takes (a listener never sees open -> closed)."""
        if self.is_closed:
            return
        if self._state == STATE_OPEN:  # the panic dial stands for the trial
            self._transition(STATE_HALF_OPEN)
        self._close()

    def count_success(self) -> None:
        """A clean use, for the failure rate (no-op when it is off or the breaker is not
        closed). Not a successful dial: the rate counts request outcomes (see the
        module's docstring). The pool calls it only when ``rate`` is set."""
        rate = self.rate
        if rate is not None and self.is_closed:
            rate.success()

    def record_dial_success(self) -> None:
        """A dial succeeded (outside a trial): it ends a streak of dial failures, but not
        a streak that includes errors reported on connections in use -- a server that
        accepts and then fails every request must still open its breaker."""
        if self.is_closed and not self._in_use_streak:
            self._failure_count = 0
            self._last_failure = None

    def record_failure(
        self, exc: BaseException | None = None, trial: int | None = ANY_TRIAL, *, dial: bool = False
    ) -> None:
        """A failure: opens the breaker at ``failure_threshold`` consecutive failures.

        ``dial``: a failed dial (connect, TLS, setup hook), which a later successful
        dial forgives; any other failure (an error on a connection in use, a failed
        check) is forgiven only by a clean use. In half-open, the trial's failure (or,
        with no trial in flight, any failure) re-opens with the recovery timeout
        doubled, up to ``max_recovery_timeout``; a failure that is not the trial in
        flight's is counted and changes nothing else. While open, failures are counted
        but do not extend the wait (they come from calls admitted earlier); so is a
        panic-mode dial's failure (``trial=PANIC_DIAL``), open or half-open.
        """
        self._last_failure = exc
        self._failure_count += 1
        self._dial_failed_last = dial
        if not dial:
            self._in_use_streak = True
        if trial == PANIC_DIAL and not self.is_closed:
            return  # a panic-mode dial: its failure keeps the breaker as it is
        if self.is_closed:
            rate = self.rate
            by_rate = rate is not None and rate.failure()
            if self._failure_count >= self._failure_threshold or by_rate:
                self._open(trip=True)
            return
        if self._state == STATE_OPEN:
            self._promote()
            if self._state == STATE_OPEN:
                return
        if self._not_the_trial(trial):
            return
        self._backoff_level = min(self._backoff_level + 1, _MAX_BACKOFF_LEVEL)
        self._recovery_timeout = self._backed_off_timeout()
        self._open(trip=False)

    def abandon_trial(self, trial: int | None = ANY_TRIAL) -> None:
        """The trial ended without a verdict (interrupted): let another caller try.

        With a token, only that trial's claim is released: a trial that outlived a
        re-open and a new half-open cannot release the new trial's claim.
        """
        if not self._not_the_trial(trial):
            self._trial_in_flight = False

    def reset(self) -> None:
        """Force-close (the package's ``reset``): failures forgotten, base timeout restored."""
        if self.is_closed:
            self._failure_count = 0
            self._last_failure = None
            self._in_use_streak = False
            return
        if self._state == STATE_OPEN:
            self._promote()
        self._close()

    def reconfigure(self, config: BreakerConfig) -> None:
        """Apply new settings live; the state, failure count and backoff level are kept.

        A threshold lowered below the current count opens on the next failure; an open
        breaker's wait is re-measured from when it opened with the new timeout.
        """
        self._failure_threshold = config.failure_threshold
        self._base_recovery_timeout = float(config.recovery_timeout)
        self._max_recovery_timeout = float(config.max_recovery_timeout)
        self._recovery_timeout = self._backed_off_timeout()
        if config.failure_rate != self._rate_config:  # a new window for new settings
            self._rate_config = config.failure_rate
            rate = config.failure_rate
            self.rate = None if rate is None else FailureRate(rate, self._clock)
            self._requiet()

    # ------------------------------------------------------------------ transitions

    def _backed_off_timeout(self) -> float:
        return min(
            self._base_recovery_timeout * 2.0**self._backoff_level, self._max_recovery_timeout
        )

    def _promote(self) -> None:
        """Open whose wait has elapsed becomes half-open (no trial claimed yet)."""
        if self._state == STATE_OPEN and self._clock() >= self._opened + self._recovery_timeout:
            self._transition(STATE_HALF_OPEN)

    def _open(self, *, trip: bool) -> None:
        self._opened = self._clock()
        self._trial_in_flight = False
        rate = self.rate
        if trip and rate is not None and self._failure_count < self._failure_threshold:
            failed, total = rate._failed, rate._total
            rate.clear()
            self.trips += 1
            self._transition(
                STATE_OPEN,
                logging.WARNING,
                "breaker %s opened: %d of the last %d outcomes failed (failure_rate "
                "threshold %.3g) (last: %r); retry in %.3gs",
                self._name,
                failed,
                total,
                rate.threshold,
                self._last_failure,
                self._recovery_timeout,
            )
        elif trip:
            if rate is not None:
                rate.clear()
            self.trips += 1
            self._transition(
                STATE_OPEN,
                logging.WARNING,
                "breaker %s opened after %d consecutive failures (last: %r); retry in %.3gs",
                self._name,
                self._failure_count,
                self._last_failure,
                self._recovery_timeout,
            )
        else:
            self._transition(
                STATE_OPEN,
                logging.WARNING,
                "breaker %s trial failed (%r); re-opened, retry in %.3gs",
                self._name,
                self._last_failure,
                self._recovery_timeout,
            )

    def _close(self) -> None:
        self.closes += 1
        if self.rate is not None:
            self.rate.clear()  # a fresh window: old failures must not re-trip it
        self._failure_count = 0
        self._last_failure = None
        self._in_use_streak = False
        self._dial_failed_last = False
        self._backoff_level = 0
        self._recovery_timeout = self._base_recovery_timeout
        self._trial_in_flight = False
        self._transition(STATE_CLOSED, logging.INFO, "breaker %s closed", self._name)

    def _transition(self, new: str, level: int = 0, msg: str = "", *args: object) -> None:
        """Write the state, then log, then tell the listener (whose errors never propagate).

        State first: a log handler or listener that yields must not let another greenlet
        see a half-made transition (and, say, trip the breaker twice).
        """
        old = self._state
        self._state = new
        self.is_closed = new == STATE_CLOSED
        self._requiet()
        if level:
            logger.log(level, msg, *args)
        if self._listener is None or old == new:
            return
        try:
            self._listener(self, old, new)
        except Exception:
            logger.exception("breaker %s: listener failed on %s -> %s", self._name, old, new)

    # ------------------------------------------------------------------ package API

    def __enter__(self) -> Breaker:
        """Admit the call through the same one-trial logic, or raise ``CircuitBreakerError``."""
        if not self.allow_dial():
            raise CircuitBreakerError(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> Literal[False]:
        self._settle(exc_type, exc_value)
        return False

    def _settle(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Turn an admitted call's outcome into a verdict.

        Exceptions outside the failure predicate mean the service answered: success.
        A BaseException that is not an Exception (GreenletExit, gevent.Timeout) is no
        verdict on the service: the trial, if any, is abandoned.
        """
        if exc_type is None:
            self.count_success()
            self.record_success()
        elif self.is_failure(exc_type, exc):
            self.record_failure(exc)
        elif not issubclass(exc_type, Exception):
            self.abandon_trial()
        else:
            self.count_success()
            self.record_success()

    def decorate(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """The package's decorator, minus the global registry, with one-trial admission."""
        if iscoroutinefunction(function) or isasyncgenfunction(function):
            return self._decorate_async(function)
        return self._decorate_sync(function)

    def _reject(self) -> Any:
        if self.fallback_function is None:
            raise CircuitBreakerError(self)
        return self.fallback_function

    def _decorate_sync(self, function: Callable[..., Any]) -> Callable[..., Any]:
        if isgeneratorfunction(function):

            @wraps(function)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                if not self.allow_dial():
                    yield from self._reject()(*args, **kwargs)
                    return
                with _Admitted(self):
                    yield from function(*args, **kwargs)

            return gen_wrapper

        @wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.allow_dial():
                return self._reject()(*args, **kwargs)
            with _Admitted(self):
                return function(*args, **kwargs)

        return wrapper

    def _decorate_async(self, function: Callable[..., Any]) -> Callable[..., Any]:
        if isasyncgenfunction(function):

            @wraps(function)
            async def gen_awrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                if not self.allow_dial():
                    async for item in self._reject()(*args, **kwargs):
                        yield item
                    return
                with _Admitted(self):
                    async for item in function(*args, **kwargs):
                        yield item

            return gen_awrapper

        @wraps(function)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.allow_dial():
                return await self._reject()(*args, **kwargs)
            with _Admitted(self):
                return await function(*args, **kwargs)

        return awrapper

    def __repr__(self) -> str:
        return (
            f"<Breaker {self._name!r} {self.state} failures={self._failure_count} "
            f"trips={self.trips} retry_in={self.retry_in():.3f}s>"
        )


class _Admitted:
    """Context for a call already admitted by ``allow_dial``: only reports the verdict."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> Literal[False]:
        self._breaker._settle(exc_type, exc_value)
        return False
