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


def _heap(cls: type) -> list[Any]:
    """Every object the garbage collector tracks that is a ``cls`` (filtered by a C
    loop). A walk over the whole heap: tens of milliseconds in a test worker that ran
    hundreds of tests, so the per-test leak check records spawns instead."""
    return list(filter(type(cls).__instancecheck__.__get__(cls), gc.get_objects()))


def live_greenlets() -> list[Any]:
    """Greenlets that are started and not dead, other than the main one and the hub."""
    hub = gevent.get_hub()
    return [
        g
        for g in _heap(greenlet.greenlet)
        if g is not hub and g.parent is not None and bool(g)  # started and not dead
    ]


def _runs_lbpool(g: gevent.Greenlet) -> bool:
    """Whether ``g`` runs (or is scheduled to run) lbpool code, test servers excluded."""
    fn = getattr(g, "_run", None)
    owner = getattr(fn, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(fn, "__module__", "")
    return (module or "").startswith("lbpool") and module != "lbpool.testing"


def lbpool_greenlets() -> list[gevent.Greenlet]:
    """Greenlets alive now running lbpool code, found on the whole heap."""
    return [g for g in _heap(gevent.Greenlet) if not g.dead and _runs_lbpool(g)]


_real_spawn = gevent.spawn
_spawned: list[gevent.Greenlet] = []  # since the current test started (held: no id reuse)
_PRUNE_AT = 4096
_prune_at = [_PRUNE_AT]


def recording_spawn(*args: Any, **kwargs: Any) -> gevent.Greenlet:
    """``gevent.spawn``, and the greenlet recorded for ``new_lbpool_greenlets``.
    conftest installs it as ``gevent.spawn`` for every test: the library spawns its
    greenlets only that way (``tests/library/test_layout.py`` checks), so this sees
    all of them without a walk over the worker's heap (which cost 20-30 ms a call,
    two or three calls a test: half of the suite's time)."""
    g = _real_spawn(*args, **kwargs)
    if len(_spawned) >= _prune_at[0]:  # a long test spawning thousands: keep the live
        _spawned[:] = [s for s in _spawned if not s.dead]  # ones, and prune again once
        _prune_at[0] = max(_PRUNE_AT, 2 * len(_spawned))  # as many more were spawned
    _spawned.append(g)
    return g


def mark_greenlet_baseline() -> None:
    """Start recording anew (conftest does, as each test starts)."""
    _spawned.clear()
    _prune_at[0] = _PRUNE_AT


def new_lbpool_greenlets() -> list[gevent.Greenlet]:
    """lbpool greenlets spawned since the current test started and alive now."""
    return [g for g in _spawned if not g.dead and _runs_lbpool(g)]


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
