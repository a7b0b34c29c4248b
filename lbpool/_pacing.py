"""Pacing long work so the hub keeps turning: a ``Pacer`` yields once per slice of CPU.

Work that grows with a fleet (a maglev table, a reload's new pools, a drain's closes)
calls its ``Pacer`` between small steps; once ``SLICE_SECONDS`` of wall time have gone
by since the last pause, it pauses: a short timed sleep, so the hub's loop takes a full
turn (timers, I/O), where ``gevent.sleep(0)`` would only requeue the worker behind the
ready callbacks. Measured at 1,000 servers: a maglev build with ``sleep(0)`` left 30 ms
between a 1 ms ticker's wake-ups, ring_hash 240 ms; a timed pause leaves about a slice.

A pacer never pauses in the hub itself (a hub callback may not block) nor in a thread
that has no hub (it never makes one), and, made with ``pauses=False``, never at all:
its caller then promised not to yield. Work shorter than a slice never pauses, so a
small reload stays one step.

Imports nothing from lbpool. ``__call__`` may yield (see above).
"""

from __future__ import annotations

from time import monotonic as _monotonic

import gevent

try:  # gevent's own helper; private, so a release that moves it only costs the pauses
    from gevent._hub_local import get_hub_if_exists
except ImportError:  # pragma: no cover

    def get_hub_if_exists() -> None:
        return None


__all__ = ["PAUSE_SECONDS", "SLICE_SECONDS", "Pacer"]

SLICE_SECONDS = 0.005  # work between pauses; few pauses (one per step made a build 6x longer)
PAUSE_SECONDS = 0.0001  # a timed sleep: the loop's full turn, not just its callbacks


class Pacer:
    """``pause()`` for one piece of work: yields to the hub at most once a slice."""

    __slots__ = ("_last", "_pauses", "_slice")

    def __init__(self, pauses: bool = True, slice_seconds: float = SLICE_SECONDS) -> None:
        self._last = _monotonic()
        self._slice = slice_seconds
        # in the hub (a callback) a sleep is refused: such a caller cannot be paced; nor
        # can code in a thread with no hub (making one there would leak its loop)
        hub = get_hub_if_exists() if pauses else None
        self._pauses = hub is not None and gevent.getcurrent() is not hub

    @property
    def pauses(self) -> bool:
        """Whether this pacer ever pauses (False in the hub, in a thread without one, or
        made with ``pauses=False``)."""
        return self._pauses

    def __call__(self) -> bool:
        """Pause if a slice has gone by since the last pause; True if it paused."""
        if self._pauses and _monotonic() - self._last >= self._slice:
            gevent.sleep(PAUSE_SECONDS)
            self._last = _monotonic()
            return True
        return False

    def pause_now(self) -> bool:
        """Pause now, whatever the time since the last pause (before a step that cannot
        be split, so it starts a slice of its own); True if it paused."""
        if self._pauses:
            gevent.sleep(PAUSE_SECONDS)
            self._last = _monotonic()
            return True
        return False
