"""The hand-off: one greenlet's wait for a connection, as a native (compiled) class.

``Waiter`` does for lbpool what ``gevent.hub.Waiter`` did (source: gevent's
``gevent/_waiter.py``, whose semantics are copied for the parts lbpool uses), with the
wait's own two fields, ``outcome`` and ``deadline``, on the same object. Compiled with
mypyc (setup.py ``COMPILED``), it is a native class: the compiled pool makes one with a
direct C call and reads and writes its fields as C struct members, where a Python
subclass of gevent's Waiter cost a type lookup and a generic attribute access for each.

The guarantees of gevent's Waiter that the pool's hand-off relies on (the pool's
compiled wait, in ``Pool.acquire``, inlines ``get`` for a new waiter -- records the
greenlet, switches to the hub, forgets the greenlet however the switch ends -- and
``WaitQueue.join``; ``tests/library/test_pool.py`` checks the copies):

- ``get()`` parks the calling greenlet (``hub.switch()``) with the greenlet recorded,
  and clears it in a ``finally``: a wake-up scheduled for a wait that was interrupted
  (killed, a ``gevent.Timeout``) finds no greenlet and switches into nothing -- never
  into a greenlet that has moved on. A second greenlet calling ``get()`` while one
  waits raises ``ConcurrentObjectUseError``, as gevent's does.
- ``switch(value)`` is run by the hub (``loop.run_callback``, or the timer): it
  switches into the waiting greenlet; an exception out of that switch goes to
  ``hub.handle_error`` (gevent's "handled inside switch"). With no greenlet waiting it
  only records the wake-up, so a ``get()`` after it returns at once (gevent stores the
  value for that). Switching from any greenlet but the hub raises ``AssertionError``,
  as gevent's does.
- The value switched in is never read: ``outcome`` is the one channel
  (``lbpool._waiters`` names the outcomes).

Not copied: ``throw``, ``clear``, ``ready``/``successful``/``exc_info``,
``switch_args``: lbpool uses none of them. ``__call__`` differs: gevent's is a link
callback (``source`` a finished greenlet); here it is ``switch``, so the pool hands
the waiter itself to ``loop.run_callback`` (no bound method made per hand-off).

Imports nothing from lbpool. Only ``get``/``wait`` yield.
"""

from __future__ import annotations

import sys
from typing import Any, Final, final

from gevent.exceptions import ConcurrentObjectUseError
from greenlet import getcurrent

__all__ = ["Waiter"]

# bound once as Final: the compiled build keeps it in a C static (no global lookup)
_getcurrent: Final = getcurrent


@final
class Waiter:
    """One greenlet's wait: ``outcome`` (the one field read when it wakes) and
    ``deadline`` (monotonic seconds, ``inf`` for none), waited for in ``hub``.

    ``outcome`` is an ``lbpool._waiters`` outcome or a handed connection; typed
    ``object`` so the compiled class checks nothing on a write (a connection is a
    native class of another module)."""

    __slots__ = ("_woken", "deadline", "greenlet", "hub", "outcome")

    hub: Any  # the hub that parks and wakes the waiting greenlet
    greenlet: Any  # the greenlet parked in get(), else None
    outcome: object
    deadline: float
    _woken: bool  # switched while no greenlet waited: get() returns at once

    def __init__(self, hub: Any, outcome: object, deadline: float) -> None:
        self.hub = hub
        self.greenlet = None
        self.outcome = outcome
        self.deadline = deadline
        self._woken = False

    def get(self) -> None:
        """Park the calling greenlet until ``switch`` (may yield). Returns at once if
        ``switch`` already ran; ``ConcurrentObjectUseError`` if another greenlet waits
        on this waiter. The greenlet is forgotten however the wait ends."""
        if self._woken:
            return
        if self.greenlet is not None:
            raise ConcurrentObjectUseError(f"This Waiter is already used by {self.greenlet!r}")
        self.greenlet = _getcurrent()
        try:
            self.hub.switch()
        finally:
            self.greenlet = None

    def wait(self) -> object:
        """Park until woken (may yield); returns ``outcome``."""
        self.get()  # the switch value is not read: ``outcome`` is the one channel
        return self.outcome

    def switch(self, value: object) -> None:
        """Wake the waiting greenlet with ``value`` (in the hub only: ``AssertionError``
        elsewhere). An error raised by that switch goes to ``hub.handle_error``. With no
        greenlet waiting (its wait was interrupted, or has not begun) only the wake-up
        is recorded."""
        self.__call__(value)

    def __call__(self, value: object) -> None:
        """``switch(value)``: the waiter itself is the hub callback that wakes it
        (``loop.run_callback(waiter, None)``), so no bound method is made per wake-up
        (the body is here, not in ``switch``: the pure path calls this one)."""
        greenlet = self.greenlet
        if greenlet is None:
            self._woken = True
            return
        if _getcurrent() is not self.hub:
            raise AssertionError("Can only use Waiter.switch method from the Hub greenlet")
        switch = greenlet.switch
        try:
            switch(value)
        except BaseException:  # as gevent's bare except: the hub must go on
            self.hub.handle_error(switch, *sys.exc_info())
