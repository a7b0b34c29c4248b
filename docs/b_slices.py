"""Bench B in short alternating slices, with each wait's saved stack (issue #18).

Run from outside the repository's root (so ``PYTHONPATH`` can pick the build)::

    python docs/b_slices.py [PAIRS] [SECONDS]      # default 24 slices of 0.3 s
    python docs/b_slices.py --depth [PAIRS] [SECONDS]

The first form runs the bench's scenario B (500 greenlets over 10 connections, each
``acquire``, ``gevent.sleep(0)``, ``release``) for the floor, ``lbpool.Pool`` and
``manager.get`` in turns of ``SECONDS`` each, ``PAIRS`` turns of each, the order
rotated every turn, all in one process and against one echo server. It prints, for
``lbpool.Pool`` and ``manager.get``, the median and quartiles of each turn's ops/s over
the floor's turn next to it, and the bytes of C stack a waiting greenlet has saved
(``greenlet._stack_saved``: what each switch copies out and back). Short turns
alternated in one process follow a machine whose speed drifts over seconds better
than the bench's half-second rounds do.

``--depth`` runs the floor against itself with its wait 128 bytes deeper
(``next(map(Waiter.get, (w,)))`` for ``w.get()``), and against itself with the same
calls made before the wait (no deeper stack): what the stack's depth alone costs.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.hub import Waiter, get_hub

from lbpool.cli.bench import peers
from lbpool.testing import EchoServer, hot_path

GREENLETS = 500
KINDS = ("floor", "lbpool.Pool", "manager.get")


def turn(
    acquire: Callable[..., Any], arg: Any, release: Callable[[Any], None], seconds: float
) -> tuple[float, int]:
    """(ops/s, the largest stack saved by a waiting greenlet) of one turn of B:
    ``acquire(arg)`` (``acquire()`` when ``arg`` is None), as the bench's workers call
    it."""
    stop = [False]
    done = [0]
    sleep = gevent.sleep

    def worker() -> None:
        while not stop[0]:
            lease = acquire() if arg is None else acquire(arg)
            sleep(0)
            release(lease)
            done[0] += 1

    workers = [gevent.spawn(worker) for _ in range(GREENLETS)]
    try:
        gevent.sleep(0.05)  # every worker parked once
        saved = max(w._stack_saved for w in workers)
        n0, t0 = done[0], time.perf_counter()
        gevent.sleep(seconds)
        rate = (done[0] - n0) / (time.perf_counter() - t0)
    finally:
        stop[0] = True
        gevent.joinall(workers, timeout=10)
    return rate, saved


class _Floor:
    """The bench's floor (``peers.FloorPool``) with a choice of how its wait is made."""

    def __init__(self, how: str) -> None:
        self._idle: deque[int] = deque(range(10))
        self._waiters: deque[Any] = deque()
        self._hub = get_hub()
        self._run_callback = self._hub.loop.run_callback
        self._how = how

    def acquire(self) -> Any:
        if self._idle:
            return self._idle.pop()
        w = Waiter(self._hub)
        self._waiters.append(w)
        if self._how == "deeper":
            return next(map(Waiter.get, (w,)))
        if self._how == "calls first":
            next(map(int, (0,)))
        return w.get()

    def release(self, item: Any) -> None:
        if self._waiters:
            self._run_callback(self._waiters.popleft().switch, item)
        else:
            self._idle.append(item)


def report(rates: dict[str, list[float]], saved: dict[str, int], ref: str) -> None:
    for kind, values in rates.items():
        if kind == ref:
            continue
        ratios = [a / b for a, b in zip(values, rates[ref], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"{kind:<12} x {ref}: median {median:.3f} (quartiles {q1:.3f}-{q3:.3f}); "
            f"stack saved {saved[kind]} bytes ({ref}: {saved[ref]})"
        )


def main() -> None:
    args = sys.argv[1:]
    depth = "--depth" in args
    args = [a for a in args if a != "--depth"]
    pairs = int(args[0]) if args else 24
    seconds = float(args[1]) if len(args) > 1 else 0.3
    print(f"hot path {hot_path()}; {pairs} turns of {seconds} s each", file=sys.stderr)
    rates: dict[str, list[float]] = {}
    saved: dict[str, int] = {}
    if depth:
        kinds = ["plain", "deeper", "calls first"]
        for i in range(pairs):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                pool = _Floor(kind)
                rate, saved[kind] = turn(pool.acquire, None, pool.release, seconds)
                rates.setdefault(kind, []).append(rate)
        report(rates, saved, "plain")
        return
    server = EchoServer().start()
    try:
        with contextlib.ExitStack() as stack:
            adapters = {
                k: stack.enter_context(peers.make_adapter(k, server.address, 10, 5.0))
                for k in KINDS
            }
            for i in range(pairs):
                for kind in KINDS[i % 3 :] + KINDS[: i % 3]:
                    ad = adapters[kind]
                    rate, saved[kind] = turn(ad.acquire, ad.arg, ad.release, seconds)
                    rates.setdefault(kind, []).append(rate)
    finally:
        server.stop()
    report(rates, saved, "floor")


if __name__ == "__main__":
    main()
