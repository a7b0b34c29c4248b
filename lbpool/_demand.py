"""Recent peak demand: what ``min_idle: auto`` sizes a pool to.

The pool keeps one int on its hot path: ``peak``, the most connections in use at once
since the current bucket began (a compare per borrow, nothing allocated). The upkeep
closes a bucket every ``span`` seconds (``roll``), shifting its peak into a ring of the
last ``BUCKETS - 1`` closed buckets. The recent peak is the largest of those and the
current bucket's, so a peak is remembered for at least ``(BUCKETS - 1) * span`` and at
most ``BUCKETS * span`` -- with ``span = idle_timeout``, between 3x and 4x
``idle_timeout``: a pool that was busy a few idle timeouts ago still holds what that
busy spell needed, so the next burst after a quiet spell finds its connections open
instead of dialing them on the request path; after a longer quiet spell it shrinks.

The same shape as a sliding-window maximum over time buckets (e.g. Finagle's
``WindowedPercentileHistogram``, Envoy's "peak over the last N intervals"): O(BUCKETS)
per roll, nothing per borrow.

Never yields; imports nothing from lbpool.
"""

from __future__ import annotations

__all__ = ["BUCKETS", "DemandWindow"]

#: Buckets in the window, the current one included: a peak is kept 3 to 4 spans.
BUCKETS = 4


class DemandWindow:
    """The closed buckets' peaks and when the current bucket ends.

    ``seen``: the largest peak ever rolled in (with the pool's current ``peak``, the
    peak in use since the start: ``ServerStats.max_in_use``).
    """

    __slots__ = ("_next_roll", "_ring", "seen", "span")

    def __init__(self, span: float, now: float) -> None:
        self.span = span  # seconds per bucket (> 0)
        self._ring = [0] * (BUCKETS - 1)  # closed buckets' peaks, oldest first
        self._next_roll = now + span
        self.seen = 0

    @property
    def next_roll(self) -> float:
        """Monotonic time at which the current bucket closes."""
        return self._next_roll

    def roll(self, peak: int, in_use: int, now: float) -> int:
        """Close the buckets that ended by ``now``; returns the peak the pool keeps
        counting from: ``peak`` unchanged if no bucket ended, else ``in_use`` (the
        level the new bucket starts at). A bucket in which no roll ran gets ``peak``
        too: in use never exceeded it there (an overestimate, so never too few)."""
        if now < self._next_roll:
            return peak
        ended = int((now - self._next_roll) // self.span) + 1
        if peak > self.seen:
            self.seen = peak
        ring = self._ring
        for _ in range(min(ended, BUCKETS - 1)):
            ring.pop(0)
            ring.append(peak)
        self._next_roll += ended * self.span
        return in_use

    def recent(self, peak: int) -> int:
        """The recent peak in use: the closed buckets' and the current one's (``peak``)."""
        return max(max(self._ring), peak)

    def can_fall(self, peak: int) -> bool:
        """Would a roll lower ``recent`` (some closed bucket is above the current)?"""
        return max(self._ring) > peak
