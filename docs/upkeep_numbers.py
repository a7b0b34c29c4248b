"""Numbers for docs/reliability.md ("Upkeep stays cheap"): memory per idle ad-hoc pool
and the upkeep cost of a new ad-hoc name at 10 and at 5,000 names, in one run.

    PYTHONPATH=. python docs/upkeep_numbers.py

One echo server on 0.0.0.0, reached as 127.0.x.y:PORT (distinct names, one server).
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import gevent

from lbpool import PoolManager
from lbpool.testing import EchoServer


def name(i: int, port: int) -> str:
    return f"127.{i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}:{port}"


def main() -> None:
    server = EchoServer(host="0.0.0.0").start()
    # nothing else falls due during the run (idle checks hourly): only a new name's own work
    defaults = {"pool": {"min_idle": 1, "idle_timeout": 3600}, "health_check": {"interval": 3600}}
    manager = PoolManager({"adhoc": {"max_pools": 100_000}, "defaults": defaults})
    upkeep = manager._upkeep
    spent = [0.0]
    keep = upkeep._keep

    def timed(pool: object) -> None:
        t = time.perf_counter()
        keep(pool)  # type: ignore[arg-type]
        spent[0] += time.perf_counter() - t

    upkeep._keep = timed  # type: ignore[method-assign]
    made = 0
    visits: list[float] = []  # pool passes per new name

    def add(count: int, pace: float = 0.002) -> float:
        """Upkeep time per new name (its passes), in ms."""
        nonlocal made
        # a new pool gets a pass while its first dial is in flight and one a busy tick
        # (upkeep_interval, 1 s) later: wait those out on both sides of the window
        gevent.sleep(1.5)
        spent[0] = 0.0
        passes = upkeep.passes
        for _ in range(count):
            manager.get(name(made, server.port)).release()
            made += 1
            gevent.sleep(pace)
        gevent.sleep(1.5)
        visits.append((upkeep.passes - passes) / count)
        return spent[0] / count * 1000

    gc.disable()  # a collection of a big heap landing in one pass is not upkeep's cost
    start = time.monotonic()
    add(10)
    at10 = add(10)
    at10_visits = visits[-1]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    add(1000)
    gc.collect()
    per_pool = (tracemalloc.get_traced_memory()[0] - before) / 1000
    tracemalloc.stop()
    # quickly (well within the 60 s an at-rest pool may go without a pass): the pools
    # made here are all at rest when the last ten names come
    add(5000 - made, pace=0)
    at5000 = add(10)
    at5000_visits = visits[-1]
    gc.enable()
    print(f"run took {time.monotonic() - start:.1f} s")
    print(f"python memory per ad-hoc name (pool + 1 idle connection): {per_pool / 1024:.1f} KiB")
    print(
        f"upkeep time per new ad-hoc name: at 20 names {at10:.3f} ms, at 5,000 names "
        f"{at5000:.3f} ms (ratio {at5000 / at10:.2f}); pool passes per new name "
        f"{at10_visits:.1f} and {at5000_visits:.1f}"
    )
    manager.close()
    server.stop()


if __name__ == "__main__":
    main()
