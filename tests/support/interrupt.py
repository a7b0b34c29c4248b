"""Interrupts and switches: deliver an exception into a waiting greenlet *now*, before
callbacks already scheduled on the hub run (the window in which a handed-off connection
can be lost); and prove that an action never switches greenlets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import greenlet


def throw_now(greenlet: gevent.Greenlet, exc: BaseException) -> None:
    """Raise ``exc`` inside ``greenlet`` synchronously, then come back here.

    ``greenlet.throw`` runs it at once; when it finishes, control passes to the hub,
    which runs the callbacks queued before ours (e.g. a pending handoff) and then
    switches back to us.
    """
    current = gevent.getcurrent()
    gevent.get_hub().loop.run_callback(current.switch)
    greenlet.throw(exc)


class SwitchCounter:
    """Counts greenlet switches away from the current greenlet while active."""

    def __init__(self) -> None:
        self.switches: list[tuple[Any, Any]] = []
        self._me = greenlet.getcurrent()
        self._previous: Any = None

    def _trace(self, event: str, args: Any) -> None:
        if event in ("switch", "throw"):
            origin, target = args
            if origin is self._me:
                self.switches.append((origin, target))
        if self._previous is not None:
            self._previous(event, args)

    def __enter__(self) -> SwitchCounter:
        self._previous = greenlet.settrace(self._trace)
        return self

    def __exit__(self, *exc: Any) -> None:
        greenlet.settrace(self._previous)


def no_switch(action: Callable[[], object]) -> None:
    """Run ``action`` and prove it never left the current greenlet: no switch was traced,
    and a zero-second gevent.Timeout armed around it (which fires only if the hub gets to
    run) never fired."""
    with SwitchCounter() as counter, gevent.Timeout(0):
        action()
    assert counter.switches == [], counter.switches
