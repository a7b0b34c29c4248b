"""``GCTime``: the time this thread spent in the interpreter's garbage collector.

A gen-2 collection is one pause over the whole process's heap (pytest's and every
earlier test's objects included) that a library cannot slice; a test that bounds how
long code holds the hub subtracts it from the gap it fell in (and may report it).
"""

from __future__ import annotations

import gc
import threading
from time import monotonic, thread_time
from typing import Any


class GCTime:
    """While entered: ``total`` is the CPU seconds this thread spent in GC since entry,
    ``wall`` the same collections' wall-clock seconds (longer under CPU contention),
    ``longest`` the longest single collection's CPU seconds. Collections run by other
    threads are not counted (``gc.callbacks`` fire in whichever thread collects)."""

    def __init__(self) -> None:
        self.total = self.wall = self.longest = 0.0
        self._start = self._start_wall = 0.0
        self._thread = threading.get_ident()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._start, self._start_wall = thread_time(), monotonic()
        else:
            took = thread_time() - self._start
            self.total += took
            self.wall += monotonic() - self._start_wall
            self.longest = max(self.longest, took)

    def __enter__(self) -> GCTime:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)
