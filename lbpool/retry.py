"""The retry budget behind ``manager.call``: how many retries a backend may make.

A retry is allowed while either source of it has room:

- **the share**: over a sliding window of ``WINDOW`` seconds (10 s, Finagle's default
  ``ttl``), percent-funded retries stay within ``budget_percent`` % of the calls made
  in the same window -- ``(retries + 1) * 100 <= calls * budget_percent``;
- **the reserve**: a token bucket of ``min_per_second`` tokens, refilled at
  ``min_per_second`` a second and full at the start, so a new manager (or a quiet
  backend) can retry ``min_per_second`` times at once before any call funded it.

So over any span of ``T`` seconds, retries <= ``budget_percent`` % of the calls made in
the windows that span touches + ``min_per_second * (1 + T)``: a backend whose every
request fails sees at most that many extra requests -- never a retry storm.

Sources: Finagle's ``RetryBudget`` (``com.twitter.finagle.service.RetryBudget``: every
request deposits, a retry withdraws ``100 / percentCanRetry`` times as much, deposits
expire after ``ttl``, a reserve of ``minRetriesPerSec``; ``percentCanRetry`` at most
1000) and Envoy's retry budget (``budget_percent``, a minimum that always allows a
few). Unlike Finagle, the reserve refills over time (a bucket of one second's worth)
instead of being a fixed floor for the whole window, which is what "a new manager's
budget already holds ``min_per_second`` retries" asks.

Cost: the window is ``BUCKETS`` integer counters for calls and as many for retries, in
two fixed lists, with running totals; ``called()`` and ``try_retry()`` allocate
nothing, never yield and take O(1) amortized time (a bucket is cleared when the clock
moves past it). Not thread-safe: like the rest of a manager, it belongs to one OS
thread's hub.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic

from lbpool.config import RetryConfig

__all__ = ["BUCKETS", "WINDOW", "RetryBudget"]

WINDOW = 10.0  # seconds a call funds retries for (Finagle's RetryBudget ttl)
BUCKETS = 10  # the window's granularity: one-second buckets
_WIDTH = WINDOW / BUCKETS


class RetryBudget:
    """One backend's retry budget and its counters (``calls``, ``retries``,
    ``retries_denied``, each since the budget was made).

    ``clock`` (seconds, monotonic) is injectable for tests."""

    __slots__ = (
        "_at",
        "_bucket_calls",
        "_bucket_retries",
        "_clock",
        "_filled_at",
        "_percent",
        "_rate",
        "_tokens",
        "_window_calls",
        "_window_retries",
        "calls",
        "retries",
        "retries_denied",
    )

    def __init__(
        self, config: RetryConfig | None = None, *, clock: Callable[[], float] = monotonic
    ) -> None:
        config = RetryConfig() if config is None else config
        self._clock = clock
        now = clock()
        self._percent = float(config.budget_percent)
        self._rate = float(config.min_per_second)
        self._tokens = self._rate  # full at the start: min_per_second retries at once
        self._filled_at = now
        # the window: per-bucket counts (index = bucket number % BUCKETS) and their sums;
        # _window_retries counts only the retries the share paid for (not the reserve's)
        self._bucket_calls = [0] * BUCKETS
        self._bucket_retries = [0] * BUCKETS
        self._window_calls = 0
        self._window_retries = 0
        self._at = int(now // _WIDTH)  # the bucket number "now" falls in
        self.calls = 0  # manager.call invocations (each deposits into the window)
        self.retries = 0  # retries allowed (and made)
        self.retries_denied = 0  # retries refused by the budget

    def reconfigure(self, config: RetryConfig) -> None:
        """New ``budget_percent``/``min_per_second`` (a reload); counts are kept, the
        reserve is capped at its new size. Never yields."""
        self._refill(self._clock())
        self._percent = float(config.budget_percent)
        self._rate = float(config.min_per_second)
        self._tokens = min(self._tokens, self._rate)

    def _advance(self, now: float) -> None:
        """Clear the buckets the clock moved past (at most the whole window)."""
        at = int(now // _WIDTH)
        gone = at - self._at
        if gone <= 0:
            return
        calls, retries = self._bucket_calls, self._bucket_retries
        for n in range(self._at + 1, self._at + 1 + min(gone, BUCKETS)):
            i = n % BUCKETS
            self._window_calls -= calls[i]
            self._window_retries -= retries[i]
            calls[i] = 0
            retries[i] = 0
        self._at = at

    def _refill(self, now: float) -> None:
        elapsed = now - self._filled_at
        if elapsed > 0:
            self._tokens = min(self._rate, self._tokens + elapsed * self._rate)
        self._filled_at = now

    def called(self) -> None:
        """Count one call (``manager.call``): it funds ``budget_percent`` % of a retry
        for ``WINDOW`` seconds. Never yields."""
        self._advance(self._clock())
        self.calls += 1
        self._window_calls += 1
        self._bucket_calls[self._at % BUCKETS] += 1

    def try_retry(self) -> bool:
        """Take one retry if the share or the reserve allows it (True, counted in
        ``retries``); else False, counted in ``retries_denied``. Never yields."""
        now = self._clock()
        self._advance(now)
        if (self._window_retries + 1) * 100.0 <= self._window_calls * self._percent:
            self._window_retries += 1
            self._bucket_retries[self._at % BUCKETS] += 1
            self.retries += 1
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.retries += 1
            return True
        self.retries_denied += 1
        return False

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self._percent:g}% + {self._rate:g}/s calls={self.calls} "
            f"retries={self.retries} denied={self.retries_denied}>"
        )
