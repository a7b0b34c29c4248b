"""The one upkeep loop: a standalone pool's, and the manager's for all its pools.

One greenlet keeps a heap of when each pool next has something to do. A pass runs
``run_upkeep`` of each pool that is due (nothing else: a pool at rest costs no work
and no wake-up), then asks it ``upkeep_due`` (seconds until its next pass; infinite:
none until something happens) and sleeps until the earliest. So the work of a pass
grows with the pools that have something due, not with the fleet (DESIGN 19).

``run_upkeep`` never waits on a server: checks and refill dials run as errands of
their pool (``lbpool.pool``), so one hung server never delays another pool's pass.
Nothing a pool raises -- a user's hook, ``gevent.Timeout`` and ``GreenletExit``
included -- stops the loop: it is logged and the others go on (DESIGN 20). Only a
real kill of the loop's own greenlet (``stop``) ends it.

``schedule(pool)`` adds a pool (a new ad-hoc one) or moves its pass earlier;
``on_demand(pool)`` (an acquisition of that pool had to wait or dial) gives a pool
at rest a pass now, and leaves one already ticking alone (or a busy pool would run a
pass per slow acquisition); ``wake`` re-reads ``pools()`` (a reload, new backends)
and gives each a pass; ``forget`` drops a pool. A pass over many due pools pauses
every slice (``lbpool._pacing``), so a thousand pools do not hold the hub.

Imports nothing from lbpool but ``_pacing`` (pools are typed by a protocol).
``schedule``, ``on_demand``, ``wake``, ``forget`` and ``abandon`` never yield; ``stop``
may (it joins the greenlet).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from time import monotonic as _monotonic
from typing import Protocol

import gevent
from gevent.event import Event

from lbpool._pacing import Pacer

__all__ = ["Keepable", "Upkeep"]

_log = logging.getLogger("lbpool")
_INF = float("inf")


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
    """One greenlet keeping the pools ``pools()`` returns (read at start and on
    ``wake``) and those given to ``schedule``."""

    def __init__(self, pools: Callable[[], Sequence[Keepable]]) -> None:
        self.pools = pools
        self._heap: list[tuple[float, int, Keepable]] = []  # (when, tie-break, pool)
        # pool -> the time of its one live heap entry; other entries are stale
        self._when: dict[Keepable, float] = {}
        self._seq = itertools.count()
        self._rescan = True  # read pools() before the next pass
        self._wake = Event()
        # when the loop's sleep ends (-inf while it runs a pass, which reads the heap
        # after it): an earlier entry must wake it
        self._sleep_until = -_INF
        self._stopped = False
        self.passes = 0  # pool passes run: what a pass costs is counted, for tests/bench
        self.greenlet = gevent.spawn(self._run)

    def schedule(self, pool: Keepable, at: float | None = None) -> None:
        """Give ``pool`` a pass at monotonic time ``at`` (None: now), unless it has one
        sooner. Never yields."""
        if at is None:
            at = _monotonic()
        current = self._when.get(pool)
        if current is not None and current <= at:
            return
        self._when[pool] = at
        heapq.heappush(self._heap, (at, next(self._seq), pool))
        if at < self._sleep_until:
            self._wake.set()

    def on_demand(self, pool: Keepable | None = None) -> None:
        """An acquisition of ``pool`` had to wait or dial: a pass now if it is at rest
        (no pass within its ``upkeep_interval``). None: any pool may be, read them all."""
        if pool is None:
            self.wake()
            return
        now = _monotonic()
        current = self._when.get(pool)
        if current is None or current > now + pool.config.upkeep_interval:
            self.schedule(pool, now)

    def forget(self, pool: Keepable) -> None:
        """No more passes for ``pool`` (its heap entry goes stale). Never yields."""
        self._when.pop(pool, None)

    def wake(self) -> None:
        """Re-read ``pools()`` and run a pass over each now (new pools, a reload, a test)."""
        self._rescan = True
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
        heap = self._heap
        while not self._stopped:
            self._wake.clear()  # before the pass: a wake during it gets another
            self._sleep_until = -_INF
            pause = Pacer()
            if self._rescan:
                self._rescan = False
                now = _monotonic()
                for pool in self.pools():
                    self.schedule(pool, now)
            now = _monotonic()
            while heap and heap[0][0] <= now and not self._stopped:
                at, _, pool = heapq.heappop(heap)
                if self._when.get(pool) != at:
                    continue  # stale: moved earlier, or forgotten
                del self._when[pool]
                self._keep(pool)
                pause()
            if self._stopped:
                break
            self._sleep_until = heap[0][0] if heap else _INF
            self._wake.wait(None if not heap else max(0.0, heap[0][0] - _monotonic()))

    def _keep(self, pool: Keepable) -> None:
        """One pool's pass, then its next. Whatever it raises is logged -- unless this
        greenlet is being killed (``stop``): then it ends."""
        self.passes += 1
        try:
            pool.run_upkeep()
            due = pool.upkeep_due()
        except BaseException:  # a hook's gevent.Timeout or GreenletExit too (DESIGN 20)
            if self._stopped:
                raise
            _log.exception("%s: upkeep failed", pool.name)
            due = pool.config.upkeep_interval
        if due < _INF:
            self.schedule(pool, _monotonic() + due)
