"""The waiter queue: callers waiting for a connection, their outcomes, one timer.

A ``Waiter`` is one wait of one greenlet. Its ``outcome`` is the only thing read when
it wakes -- the value it is switched with is not -- and is exactly one of:

- ``WAITING``: queued, nothing decided yet;
- a connection (``_Conn``): handed over, already counted by the pool as in use;
- ``PERMIT``: a slot was reserved for it in the pool's count: dial into it;
- ``CLOSED``: the pool closed while it waited;
- ``BROKEN``: the server's breaker opened while it waited: fail over;
- ``TIMED_OUT``: its deadline passed (the timer took it off the queue).

Everything but ``WAITING`` and ``TIMED_OUT`` is decided by the pool, which pops the
oldest waiter and calls ``hand`` (first come, first served); the wake-up is a hub
callback, so handing never switches greenlets. A waiter interrupted before it woke
still has its outcome set, and the pool passes on what it was handed.

``WaitQueue`` is a ``deque`` of waiters (so ``len``, truth and ``popleft`` stay C
calls on the hot path) plus one timer for the earliest deadline: waiters mostly
share a timeout, so the earliest deadline is the head's and the timer rarely moves.

``valid_timeout`` checks a caller's ``timeout`` before any deadline is made of it.

``Waiter`` itself is ``lbpool._handoff``'s (a native class when compiled), re-exported
here. Imports nothing else from lbpool at run time. Only ``Waiter.wait`` yields.
"""

from __future__ import annotations

from collections import deque
from numbers import Real
from time import monotonic
from typing import TYPE_CHECKING, Any, Union, cast

from lbpool._args import got
from lbpool._handoff import Waiter

if TYPE_CHECKING:
    from lbpool.connection import _Conn

__all__ = [
    "BROKEN",
    "CLOSED",
    "PERMIT",
    "TIMED_OUT",
    "WAITING",
    "Outcome",
    "WaitQueue",
    "Waiter",
    "valid_timeout",
]


def valid_timeout(value: object, where: str) -> float:
    """``value`` as a deadline's length in seconds, or ``TypeError``/``ValueError``
    naming the argument: called before anything changes, so a bad argument (``1j``,
    ``"1"``, ``True``, NaN) never reaches a waiter, a timer or a count. A negative
    timeout is no time at all, as 0 (an acquisition then fails fast with
    ``PoolTimeout`` unless a connection is ready); ``inf`` waits for ever. Any real
    number is taken (``numbers.Real``: ``int``, ``float``, ``fractions.Fraction``,
    numpy's), as its ``float``; not a ``bool``, a ``Decimal`` or a ``complex``."""
    if (
        type(value) is not float
        and type(value) is not int  # the common cases: no ABC check
        and (isinstance(value, bool) or not isinstance(value, Real))
    ):
        raise _not_seconds(value, where)
    try:
        seconds = float(cast(Real, value))
    except OverflowError:  # too large for a float (an int, a Fraction): by its sign
        seconds = _beyond_float(value, where)
    except Exception as exc:  # a Real whose __float__ raises
        raise _not_seconds(value, where) from exc
    if seconds != seconds:
        raise ValueError(f"{where}: timeout must be a number of seconds, not NaN")
    return seconds if seconds > 0 else 0.0


def _beyond_float(value: object, where: str) -> float:
    """A real number too large for a float: ``inf`` (for ever) if positive, else 0."""
    try:
        return float("inf") if cast(Any, value) > 0 else 0.0
    except Exception as exc:  # a Real that cannot be compared with 0
        raise _not_seconds(value, where) from exc


def _not_seconds(value: object, where: str) -> TypeError:
    return TypeError(f"{where}: timeout must be a number of seconds or None, got {got(value)}")


class Outcome:
    """A named outcome of a wait that is not a connection."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


WAITING = Outcome("WAITING")  # queued: nothing decided yet
PERMIT = Outcome("PERMIT")  # a reserved slot: the waiter may dial
CLOSED = Outcome("CLOSED")  # the pool closed while it waited
BROKEN = Outcome("BROKEN")  # the server's breaker opened while it waited: fail over
TIMED_OUT = Outcome("TIMED_OUT")  # the deadline passed

Handed = Union["_Conn", Outcome]

# A waiter whose deadline is this close is timed out with the others, not re-armed for.
_TIMER_SLACK = 0.0005


class WaitQueue(deque[Waiter]):
    """Waiters, oldest first, and one timer for the earliest deadline. Never yields."""

    __slots__ = ("_hub", "_timer", "_timer_at")

    def __init__(self, hub: Any) -> None:
        super().__init__()
        self._hub = hub
        self._timer: Any = None  # one libev/libuv timer for the earliest deadline
        self._timer_at = float("inf")  # its deadline (inf: not armed)

    def join(self, deadline: float) -> Waiter:
        """Queue a new waiter at the back; arm the timer if it is now the earliest."""
        w = Waiter(self._hub, WAITING, deadline)
        self.append(w)
        if deadline < self._timer_at:
            self._arm(deadline)
        return w

    def hand(self, outcome: Handed) -> None:
        """Give the oldest waiter ``outcome`` and schedule its wake-up (a hub callback)."""
        w = self.popleft()
        w.outcome = outcome
        self._hub.loop.run_callback(w, None)  # w(None) is w.switch(None)

    def hand_all(self, outcome: Outcome) -> None:
        """Give every waiter ``outcome`` (``CLOSED``, ``BROKEN``), oldest first."""
        while self:
            self.hand(outcome)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._timer_at = float("inf")

    def _arm(self, deadline: float) -> None:
        """(Re)arm the one timer for ``deadline``."""
        if self._timer is not None:
            self._timer.close()
        loop = self._hub.loop
        loop.update_now()  # the timer counts from the loop's clock: bring it up to now
        timer = loop.timer(max(deadline - monotonic(), 0.0))
        self._timer = timer
        self._timer_at = deadline
        timer.start(self._expire)

    def _expire(self) -> None:
        """Timer callback (in the hub): time out every waiter past its deadline."""
        self.stop_timer()
        limit = monotonic() + _TIMER_SLACK
        expired = [w for w in self if w.deadline <= limit]
        for w in expired:
            self.remove(w)
            w.outcome = TIMED_OUT  # all decided before any wakes (one may kill another)
        earliest = min((w.deadline for w in self), default=float("inf"))
        if earliest < float("inf"):  # a waiter with no deadline needs no timer
            self._arm(earliest)
        for w in expired:
            w.switch(None)
