"""The one upkeep loop: a standalone pool's, and the manager's for all its pools.

One greenlet runs a pass over its pools (``run_upkeep`` each; one pool's failure is
logged, never stops the others), then sleeps until some pool has something to do:
every ``upkeep_interval`` while one is busy, else until the next idle expiry or
check (``upkeep_due``), so an idle pool costs no wake-ups. With no pool at all it
sleeps until woken. ``on_demand`` (called by an acquisition that had to wait or
dial) wakes a loop at rest, not one already ticking, or a busy pool would run a
pass per slow acquisition; ``wake`` wakes it whatever it is doing.

A pass over a big fleet pauses every slice (``lbpool._pacing``, which imports nothing
from lbpool either), so a thousand pools do not hold the hub for one pass.

Imports nothing from lbpool but ``_pacing`` (pools are typed by a protocol). ``on_demand``,
``wake`` and ``abandon`` never yield; ``stop`` may (it joins the greenlet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import gevent
from gevent.event import Event

from lbpool._pacing import Pacer

__all__ = ["Keepable", "Upkeep"]

_log = logging.getLogger("lbpool")


class _Interval(Protocol):
    @property
    def upkeep_interval(self) -> float: ...


class Keepable(Protocol):
    """What the loop needs of a pool."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> _Interval: ...
    def run_upkeep(self) -> None: ...
    def upkeep_due(self) -> float: ...


class Upkeep:
    """One greenlet keeping the pools ``pools()`` returns (re-read every pass)."""

    def __init__(self, pools: Callable[[], Sequence[Keepable]]) -> None:
        self.pools = pools
        self._wake = Event()
        self._resting = False  # asleep past the busy tick: on_demand should wake it
        self._stopped = False
        self.greenlet = gevent.spawn(self._run)

    def on_demand(self) -> None:
        """A pool had to wait or dial: wake the loop if it is at rest."""
        if self._resting:
            self._resting = False
            self._wake.set()

    def wake(self) -> None:
        """Run a pass now (new pools, a reload, a test)."""
        self._wake.set()

    def abandon(self) -> None:
        """Let the loop end after its current pass, without waiting for it."""
        self._stopped = True
        self._wake.set()

    def stop(self) -> None:
        """End the loop now; from another greenlet, wait until it has (it dies at once:
        its handlers never block)."""
        self._stopped = True
        if self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=True)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.clear()  # before the pass: a wake during it (a pause) gets another
            pools = self.pools()
            pause = Pacer()
            for pool in pools:
                try:
                    pool.run_upkeep()
                except Exception:  # never let one pool's bad hook stop the others
                    _log.exception("%s: upkeep failed", pool.name)
                pause()
            due = min((p.upkeep_due() for p in pools), default=None)
            busy_tick = min((p.config.upkeep_interval for p in pools), default=0.0)
            self._resting = due is None or due > busy_tick
            self._wake.wait(due)
            self._resting = False
