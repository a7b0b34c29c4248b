"""Leak checks: open fds, live greenlets, lbpool's own greenlets; and ``settle``.

Every check compares with a baseline taken at the start of the test that asks (see
``tests/conftest.py``), never with an absolute count, so one test's leak is reported
by that test alone.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from time import monotonic
from typing import Any

import gevent
import greenlet


def fd_count() -> int:
    """Open file descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def open_fds() -> dict[str, str]:
    """fd number -> what it points at, for a leak report."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def live_greenlets() -> list[Any]:
    """Greenlets that are started and not dead, other than the main one and the hub."""
    hub = gevent.get_hub()
    return [
        g
        for g in gc.get_objects()
        if isinstance(g, greenlet.greenlet)
        and g is not hub
        and g.parent is not None
        and bool(g)  # started and not dead
    ]


def lbpool_greenlets() -> list[gevent.Greenlet]:
    """Greenlets running (or scheduled to run) lbpool code, test servers excluded."""
    found = []
    for g in gc.get_objects():
        if not isinstance(g, gevent.Greenlet) or g.dead:
            continue
        fn = getattr(g, "_run", None)
        owner = getattr(fn, "__self__", None)
        module = type(owner).__module__ if owner is not None else getattr(fn, "__module__", "")
        if (module or "").startswith("lbpool") and module != "lbpool.testing":
            found.append(g)
    return found


_baseline: list[gevent.Greenlet] = []  # held, so no id is reused while compared


def mark_greenlet_baseline() -> None:
    """Record lbpool's live greenlets now (conftest does, as each test starts)."""
    _baseline[:] = lbpool_greenlets()


def new_lbpool_greenlets() -> list[gevent.Greenlet]:
    """lbpool greenlets alive now that were not when the current test started."""
    return [g for g in lbpool_greenlets() if not any(g is b for b in _baseline)]


def settle(predicate: Callable[[], bool], timeout: float = 1.0) -> bool:
    """Poll ``predicate`` (with hub turns) until true or ``timeout``: for closes that
    gevent completes on a later loop iteration, which nothing can be waited on for.

    A full ``gc.collect()`` (for sockets only garbage still holds) runs at most every
    ``_GC_EVERY`` seconds, and once more before giving up: in a test process one takes
    tens of milliseconds, all of it inside the hub, so collecting on every poll would
    starve the very traffic a test is waiting on."""
    if predicate():  # the common case: nothing to wait for, no collection paid
        return True
    deadline = monotonic() + timeout
    collected = monotonic()
    gc.collect()
    while True:
        if predicate():
            return True
        now = monotonic()
        if now >= deadline:
            gc.collect()
            return predicate()
        if now - collected >= _GC_EVERY:
            gc.collect()
            collected = monotonic()
            continue
        gevent.sleep(0.01)


_GC_EVERY = 0.25
