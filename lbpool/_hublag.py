"""How long since the hub last polled for I/O: what an idle read watcher can vouch for.

An idle connection's read watcher (``Pool._stirred``) sees bytes or EOF only when the
hub polls. Code that holds the hub (CPU-bound work, a blocking call) delays that, so a
connection can be stirred and not yet known to be. A borrow after such a stretch peeks
instead of trusting the watcher (DESIGN 16); a borrow after a recent poll does not, so
the common path makes no system call.

The hub loop's cached time (``loop.now()``) is the time of its last poll: libev's
``ev_now`` follows the wall clock (which one is found once, by comparing clocks with
the loop's time). A poll's watchers run one after another, so a greenlet woken by a
poll may borrow before the idle watcher that the same poll fired has run: the borrow
also asks that watcher whether it is ``pending`` (libev). A loop that is not libev
(libuv: its watchers have no ``pending``) vouches for nothing: every long rest is
peeked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# A borrow peeks when the connection has rested longer than this (seconds) and the hub
# has not polled for longer than this: below it the watcher's view is as fresh as a
# peek's would be (bytes can always be on the wire).
WATCH_LAG = 0.001

_MATCH = 60.0  # seconds: a clock this close to the loop's time is the one it follows


def _always() -> float:
    return float("inf")


_last: tuple[Any, Callable[[], float]] | None = None  # the last loop asked for, its lag


def hub_lag(loop: Any) -> Callable[[], float]:
    """A function returning the seconds since ``loop`` (a gevent hub's loop) last
    polled; always ``inf`` (so every long rest is peeked) for a loop that is not
    libev's (no ``pendingcnt``; its watchers have no ``pending``) or has no ``now()``,
    or whose clock matches neither the wall clock nor the monotonic one. The last
    loop's function is kept: a fleet's pools share their hub's."""
    global _last
    last = _last
    if last is not None and last[0] is loop:
        return last[1]
    lag = _find_lag(loop)
    _last = (loop, lag)
    return lag


def _find_lag(loop: Any) -> Callable[[], float]:
    try:
        loop.update_now()
        now = loop.now
        seen = float(now())
    except Exception:  # an unusual loop: peek after every long rest, never fail here
        return _always
    if not isinstance(getattr(loop, "pendingcnt", None), int):
        # not libev (libuv): its watchers have no ``pending`` to ask, so every long
        # rest is peeked
        return _always
    for clock in (time.time, time.monotonic):
        if abs(clock() - seen) < _MATCH:
            return _lag(clock, loop)
    return _always


def _lag(clock: Callable[[], float], loop: Any) -> Callable[[], float]:
    loop_now = loop.now

    def lag() -> float:
        return clock() - float(loop_now())

    return lag
