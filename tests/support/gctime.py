"""``GCTime``: this thread's CPU time spent in the interpreter's garbage collector.

A gen-2 collection is one pause over the whole process's heap (pytest's and every
earlier test's objects included) that a library cannot slice; a test that bounds how
long code holds the hub subtracts it from the gap it fell in (and may report it).
"""

from __future__ import annotations

import gc
from time import thread_time
from typing import Any


class GCTime:
    """While entered: ``total`` is the CPU seconds this thread spent in GC since entry,
    ``longest`` the longest single collection (seconds)."""

    def __init__(self) -> None:
        self.total = self.longest = 0.0
        self._start = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = thread_time()
        else:
            took = thread_time() - self._start
            self.total += took
            self.longest = max(self.longest, took)

    def __enter__(self) -> GCTime:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)
