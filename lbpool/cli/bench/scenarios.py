"""The scenarios ``lbpool bench`` measures, each a function of the pools it compares.

Scenarios (``--scenarios A,B,C,D,E``), run interleaved over ``--rounds`` rounds so that
machine noise hits every implementation alike; each number reported is the median
over rounds, and each ratio the median of *same-round* ratios:

- A, uncontended: one acquire + release cycle (ns/op) of ``lbpool.Pool``,
  ``manager.get()`` and the peers, against the floor: a bare ``collections.deque``
  ``pop``/``append``.
- B, contended: 500 greenlets share ``max_size`` 10 and ``gevent.sleep(0)`` while
  holding (ops/s; acquire wait p50/p99/max). Floor: :class:`~lbpool.cli.bench.peers.FloorPool`
  (deque + FIFO ``Waiter`` handoff, no timeouts or health).
- C, echo: 50 greenlets do 64-byte request/response through a pool of 10 against a
  loopback echo server (req/s; latency p50/p99/max); baselines: the floor pool, and
  one fresh connection per request (no pool).
- D, balancing: the cost of one ``pick`` at 10/100/1,000 servers per strategy.
- E, failover: three servers behind a manager, one stopped mid-run and started again
  on its port: requests that failed, and how long until traffic spreads back to it.
- S, scale (opt-in: ``--scenarios S``): at 10, 100 and 1,000 configured servers
  (loopback listening sockets; the kernel's backlog completes the dials), the
  manager's creation, ``wait_ready``, then, once every pool (``max_size`` 2) has
  served one queued acquisition (waits in every histogram, fractional wait times, as
  in a busy fleet), one upkeep pass over every pool while some connections are in
  use, ``stats()``, ``to_dict()``, a Prometheus ``collect()`` with every family's
  samples made (what prometheus_client's own exposition reads), a whole in-hub
  scrape's text (``lbpool.metrics.generate_latest``, paced, lbpool's families
  written from the snapshot's columns: ``expose_first``, a collector's first scrape,
  which makes its line templates; ``expose``, the third, as every later scrape, every
  pool not held having queued again before each; ``expose_unpaced``:
  ``prometheus_client.generate_latest``, for comparison) and a new ad-hoc name's
  first ``get``: wall ms, the hub's longest
  stretch (a ticker greenlet's longest gap) and the operation's CPU ms (its own
  greenlet's run time over all its slices) per operation, median over rounds, with
  the 1,000/100 and 1,000/10 ratios (of wall ms); and the "snapshot total":
  ``stats`` + ``to_dict`` + ``expose`` (a whole scrape, snapshot and text) CPU ms,
  summed per round. The hashing strategies' pick cost by server count is scenario H.

Besides the numbers, ``observe`` measures each pool's behaviour (max connections
held and opened against its limit, whether waiters are served in arrival order,
whether an acquire honours a timeout, whether a wait parks only its greenlet without
monkey-patching) and lists what each one lacks; ``profile_hot_paths`` gives cProfile
listings of lbpool's own. The rounds are run by ``lbpool.cli.bench.run``.
"""

from __future__ import annotations

import bisect
import cProfile
import gc
import heapq
import io
import pstats
import random
import statistics
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import monotonic, perf_counter, perf_counter_ns, thread_time
from typing import Any

import gevent
import gevent.pool
import greenlet

from lbpool.cli.bench import peers
from lbpool.testing import EchoServer, recv_exact

__all__ = ["OPT_IN", "QUICK", "SCENARIOS", "Settings"]

SCENARIOS = ("A", "B", "C", "D", "E", "H")  # what a plain ``lbpool bench`` runs
# Run only when named (``--scenarios R``): R needs redis-py and a redis-server binary,
# and would lengthen every run, --quick included.
OPT_IN = ("R", "S")
SIZE = 10  # max_size of every pool
FLOOR_A = "deque"
FLOOR = "floor"
POOL = "lbpool.Pool"
MANAGER = "manager.get"
SQLA = "sqlalchemy"
GCP = "gcp"
GSOCK = "gsocketpool"
DIAL = "dial/request"
LBPOOL = (POOL, MANAGER)
STRATEGIES = ("round_robin", "least_active", "weighted", "random")
SERVER_COUNTS = (10, 100, 1000)
HASHING = ("maglev", "ring_hash", "rendezvous")  # scenario H: key-affinity tables
H_SERVERS = 100  # balance and disruption are measured over this many servers
ACQUIRE_TIMEOUT = 60.0  # generous: contention must not turn into timeouts
_GRACE = 0.3  # after a round's deadline, how long workers get to finish their op


@dataclass(frozen=True)
class Settings:
    """How long and how hard each scenario runs (the default: well under 2 minutes)."""

    rounds: int = 5
    scenarios: tuple[str, ...] = SCENARIOS
    quick: bool = False
    peers: bool = True
    a_seconds: float = 0.12  # timed loop per implementation per round
    b_seconds: float = 0.5
    b_greenlets: int = 500
    c_seconds: float = 0.5
    c_greenlets: int = 50
    c_dial_max: int = 2500  # dials per round for the no-pool baseline (ephemeral ports)
    payload: int = 64
    d_seconds: float = 0.03
    e_kill_at: float = 1.0
    e_outage: float = 1.5
    e_tail: float = 3.5  # run this long after the server is back
    e_recovery: float = 1.0  # breaker recovery_timeout
    e_greenlets: int = 20
    e_pace: float = 0.002  # each E greenlet sleeps this long between requests
    probe_seconds: float = 0.3
    probe_greenlets: int = 100
    h_balance_keys: int = 1_000_000
    h_disruption_keys: int = 100_000
    r_seconds: float = 0.5  # scenario R: GETs timed per implementation per round
    r_greenlets: int = 50
    r_value: int = 100  # bytes
    profile: bool = False


QUICK = Settings(
    rounds=2,
    quick=True,
    a_seconds=0.025,
    b_seconds=0.15,
    c_seconds=0.15,
    c_dial_max=500,
    d_seconds=0.006,
    e_kill_at=0.4,
    e_outage=1.5,
    e_tail=2.6,
    probe_seconds=0.15,
    probe_greenlets=60,
    h_balance_keys=20_000,
    h_disruption_keys=10_000,
    r_seconds=0.15,
)


def progress(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


# -- small statistics helpers ------------------------------------------------------


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i]


def _dist_us(values: list[float]) -> dict[str, float]:
    """p50/p99/max of seconds, in microseconds."""
    v = sorted(values)
    return {
        "p50": round(_pct(v, 0.50) * 1e6, 2),
        "p99": round(_pct(v, 0.99) * 1e6, 2),
        "max": round(v[-1] * 1e6, 2) if v else float("nan"),
        "n": len(v),
    }


def median(values: Sequence[float]) -> float:
    vals = [x for x in values if x == x]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    if not b or a != a or b != b:
        return float("nan")
    return a / b


def rounded(x: float, digits: int = 3) -> float:
    return round(x, digits) if x == x else x


# -- scenario A: uncontended cycle -------------------------------------------------


def _loop0(acquire: Callable[[], Any], arg: Any, release: Callable[[Any], None], n: int) -> int:
    r = range(n)
    t0 = perf_counter_ns()
    for _ in r:
        release(acquire())
    return perf_counter_ns() - t0


def _loop1(acquire: Callable[[Any], Any], arg: Any, release: Callable[[Any], None], n: int) -> int:
    r = range(n)
    t0 = perf_counter_ns()
    for _ in r:
        release(acquire(arg))
    return perf_counter_ns() - t0


def measure_a(ad: peers.Adapter, seconds: float) -> float:
    """ns per acquire+release, timed over about ``seconds`` with gc off (as timeit)."""
    loop = _loop0 if ad.arg is None else _loop1
    loop(ad.acquire, ad.arg, ad.release, 200)  # warm: dial, caches
    per = max(loop(ad.acquire, ad.arg, ad.release, 1000) / 1000, 1.0)
    n = max(1000, int(seconds * 1e9 / per))
    gc.collect()
    gc.disable()
    try:
        elapsed = loop(ad.acquire, ad.arg, ad.release, n)
    finally:
        gc.enable()
    return elapsed / n


# -- scenarios B and C: contended --------------------------------------------------


def warm(ad: peers.Adapter) -> None:
    """Open the pool's connections up front, so a round measures reuse, not dials."""
    if not ad.limit:
        return
    acquire = ad.call()
    held = [acquire() for _ in range(ad.limit)]
    for lease in held:
        ad.release(lease)


@dataclass
class _Run:
    """Shared state of one contended round."""

    deadline: float
    counts: list[int]
    starts: list[float]  # start of the acquire in progress, 0.0 when none
    samples: list[float]
    errors: dict[str, int]


def _error(run: _Run, exc: BaseException) -> None:
    name = type(exc).__name__
    run.errors[name] = run.errors.get(name, 0) + 1


def b_worker(
    i: int, run: _Run, acquire: Callable[..., Any], arg: Any, release: Callable[[Any], None]
) -> None:
    now = perf_counter
    sleep = gevent.sleep
    deadline = run.deadline
    waits = run.samples
    counts = run.counts
    starts = run.starts
    lease: Any = None
    t0 = now()
    try:
        while t0 < deadline:
            starts[i] = t0
            try:
                lease = acquire() if arg is None else acquire(arg)
            except Exception as exc:
                starts[i] = 0.0
                _error(run, exc)
                t0 = now()
                continue
            t1 = now()
            starts[i] = 0.0
            waits.append(t1 - t0)
            sleep(0)
            release(lease)
            lease = None
            t0 = now()
            if t0 <= deadline:
                counts[i] += 1
    finally:
        if lease is not None:  # killed holding it (contended_round's end): given back
            release(lease)


def c_worker(
    i: int,
    run: _Run,
    acquire: Callable[..., Any],
    arg: Any,
    release: Callable[[Any], None],
    io_of: Callable[[Any], Any],
    payload: bytes,
    budget: list[int] | None,
) -> None:
    now = perf_counter
    n = len(payload)
    deadline = run.deadline
    lats = run.samples
    counts = run.counts
    starts = run.starts
    lease: Any = None
    t0 = now()
    try:
        while t0 < deadline:
            if budget is not None:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            starts[i] = t0
            try:
                lease = acquire() if arg is None else acquire(arg)
                s = io_of(lease)
                s.sendall(payload)
                got = s.recv(n)
                while len(got) < n:
                    more = s.recv(n - len(got))
                    if not more:
                        raise ConnectionError("echo server closed the connection")
                    got += more
            except Exception as exc:
                starts[i] = 0.0
                _error(run, exc)
                if lease is not None:
                    release(lease)
                    lease = None
                t0 = now()
                continue
            t1 = now()
            starts[i] = 0.0
            lats.append(t1 - t0)
            release(lease)
            lease = None
            if t1 <= deadline:
                counts[i] += 1
            t0 = now()
    finally:
        if lease is not None:  # killed holding it (contended_round's end): given back
            release(lease)


def contended_round(
    ad: peers.Adapter,
    greenlets: int,
    seconds: float,
    worker: Callable[..., None],
    *extra: Any,
) -> dict[str, Any]:
    """Run ``greenlets`` workers for ``seconds``; ops completed by the deadline count.

    Acquires still waiting when the round ends enter the wait/latency distribution
    with the time they had waited so far (censored), so a pool that starves some
    callers cannot hide them by never serving them.
    """
    gc.collect()
    start = perf_counter()
    run = _Run(start + seconds, [0] * greenlets, [0.0] * greenlets, [], {})
    # acquire(arg) called by the worker itself, as scenario A's _loop1 and a caller's
    # own code (manager.get("bench")) call it: no closure's frame in between
    workers = [
        gevent.spawn(worker, i, run, ad.acquire, ad.arg, ad.release, *extra)
        for i in range(greenlets)
    ]
    gevent.joinall(workers, timeout=seconds + _GRACE)
    end = perf_counter()
    pending = [end - t for t in run.starts if t > 0.0]
    run.samples.extend(pending)
    alive = [w for w in workers if not w.dead]
    if alive:
        gevent.killall(alive, block=True, timeout=2.0)
    ops = sum(run.counts)
    done_by = min(end, run.deadline) - start
    return {
        "ops": ops,
        "ops_per_s": ops / done_by if done_by > 0 else float("nan"),
        "dist": _dist_us(run.samples),
        "errors": dict(run.errors),
        "still_waiting": len(pending),
        "killed": len(alive),
        "starved": sum(1 for c in run.counts if c == 0),
        "_samples": run.samples,
    }


# -- scenario D: balancer pick cost ------------------------------------------------


class _Member:
    """A light stand-in for a Pool: what a balancer reads."""

    __slots__ = ("active", "breaker", "weight")

    def __init__(self, active: int, weight: int, breaker: Any) -> None:
        self.active = active
        self.weight = weight
        self.breaker = breaker


def make_members(n: int, rng: random.Random) -> list[_Member]:
    from lbpool.breaker import Breaker
    from lbpool.config import BreakerConfig

    cfg = BreakerConfig()
    return [
        _Member(rng.randrange(0, 6), rng.randrange(1, 4), Breaker(f"m{i}", cfg)) for i in range(n)
    ]


def _pick_loop(pick: Callable[[Any], Any], n: int) -> int:
    empty: frozenset[int] = frozenset()
    r = range(n)
    t0 = perf_counter_ns()
    for _ in r:
        pick(empty)
    return perf_counter_ns() - t0


def _deque_rr_loop(d: deque[Any], n: int) -> int:
    popleft = d.popleft
    append = d.append
    r = range(n)
    t0 = perf_counter_ns()
    for _ in r:
        append(popleft())
    return perf_counter_ns() - t0


def _timed(loop: Callable[[int], int], seconds: float) -> float:
    loop(200)
    per = max(loop(1000) / 1000, 1.0)
    n = max(1000, int(seconds * 1e9 / per))
    gc.collect()
    gc.disable()
    try:
        return loop(n) / n
    finally:
        gc.enable()


def measure_d(members: dict[int, list[_Member]], seconds: float) -> dict[str, float]:
    from lbpool.balance import make_balancer

    out: dict[str, float] = {}
    for n, ms in members.items():
        d: deque[Any] = deque(ms)
        out[f"{FLOOR_A}/{n}"] = _timed(lambda k, d=d: _deque_rr_loop(d, k), seconds)  # type: ignore[misc]
        for strategy in STRATEGIES:
            pick = make_balancer(strategy, ms, rng=random.Random(n)).pick
            out[f"{strategy}/{n}"] = _timed(lambda k, p=pick: _pick_loop(p, k), seconds)  # type: ignore[misc]
    return out


# -- scenario H: key-affinity tables -------------------------------------------------


def _addresses(n: int) -> list[tuple[str, int]]:
    return [(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:11211", 1) for i in range(n)]


def _owner_loop(owner: Callable[[Any], int], keys: list[bytes], n: int) -> int:
    k = len(keys)
    t0 = perf_counter_ns()
    for i in range(n):
        owner(keys[i % k])
    return perf_counter_ns() - t0


def h_tables() -> dict[str, Any]:
    """The tables scenario H times: per strategy and server count (built once)."""
    from lbpool.hashing import build_table

    return {f"{st}/{n}": build_table(st, _addresses(n)) for st in HASHING for n in SERVER_COUNTS}


def measure_h_picks(
    tables: dict[str, Any], members: dict[int, list[_Member]], seconds: float
) -> dict[str, float]:
    """ns per ``owner(key)`` per table, and a round_robin pick over as many members."""
    from lbpool.balance import make_balancer

    keys = [f"user:{i}".encode() for i in range(4096)]
    out: dict[str, float] = {}
    for n in SERVER_COUNTS:
        pick = make_balancer("round_robin", members[n]).pick
        out[f"round_robin/{n}"] = _timed(lambda k, p=pick: _pick_loop(p, k), seconds)  # type: ignore[misc]
        for st in HASHING:
            owner = tables[f"{st}/{n}"].owner
            out[f"{st}/{n}"] = _timed(lambda k, o=owner: _owner_loop(o, keys, k), seconds)  # type: ignore[misc]
    return out


def measure_h_placement(s: Settings) -> dict[str, Any]:
    """Balance (largest / mean keys per server) and disruption (share of keys that move
    when one of ``H_SERVERS`` leaves, or one joins), per strategy. Deterministic."""
    from lbpool.hashing import build_table

    servers = _addresses(H_SERVERS + 1)
    base, joined = servers[:H_SERVERS], servers
    left = base[:37] + base[38:]  # one from the middle leaves
    keys = [f"user:{i}".encode() for i in range(max(s.h_balance_keys, s.h_disruption_keys))]
    out: dict[str, Any] = {}
    for st in HASHING:
        table = build_table(st, base)
        owner = table.owner
        counts = [0] * H_SERVERS
        owners = []
        for i, key in enumerate(keys):
            o = owner(key)
            if i < s.h_balance_keys:
                counts[o] += 1
            if i < s.h_disruption_keys:
                owners.append(base[o][0])
        mean = sum(counts) / H_SERVERS
        dk = keys[: s.h_disruption_keys]
        moved = {}
        for name, members in (("leave", left), ("join", joined)):
            t = build_table(st, members)
            moved[name] = sum(
                1 for key, was in zip(dk, owners, strict=True) if members[t.owner(key)][0] != was
            ) / len(dk)
        out[st] = {
            "max_over_mean": rounded(max(counts) / mean, 4),
            "min_over_mean": rounded(min(counts) / mean, 4),
            "moved_leave": rounded(moved["leave"], 5),
            "moved_join": rounded(moved["join"], 5),
        }
    return {
        "servers": H_SERVERS,
        "balance_keys": s.h_balance_keys,
        "disruption_keys": s.h_disruption_keys,
        "ideal_moved": rounded(1 / H_SERVERS, 5),
        "results": out,
    }


# -- scenario S: scale ------------------------------------------------------------

S_OPS = (
    "create",
    "wait_ready",
    "upkeep_pass",
    "stats",
    "to_dict",
    "collect",
    "expose_first",
    "expose",
    "expose_unpaced",
    "adhoc_get",
)
# a snapshot's and a whole scrape's work (a later scrape, as Prometheus makes every few
# seconds; the first one is shown beside it): the "snapshot total" is the sum of their cpu_ms
S_SNAPSHOT_OPS = ("stats", "to_dict", "expose")
S_PER_BACKEND = 100  # servers per backend (10 backends at 1,000 servers)
S_BUSY = 10  # connections held while the upkeep pass and the snapshots are measured


def _s_timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """Run ``fn`` in a greenlet: (wall ms, the hub's longest stretch in ms, cpu ms, its
    result).

    The stretch is a ticker greenlet's longest gap between two of its turns. cpu ms is
    the greenlet's own run time, summed over every stretch it ran (a sliced snapshot
    runs in several): the thread's CPU time (``time.thread_time``) between each switch
    into it and the next switch out, seen by a ``greenlet.settrace`` hook (the previous
    one is called too, and put back afterwards). It leaves out the pauses between
    slices, and time another process took the core."""
    longest = [0.0]
    stop = [False]
    cpu = [0.0]
    entered = [0.0]
    measured: list[Any] = [None]

    def tick() -> None:
        last = perf_counter()
        while not stop[0]:
            gevent.sleep(0)
            now = perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    def trace(event: str, args: Any) -> None:
        if event in ("switch", "throw"):
            origin, target = args
            if target is measured[0]:
                entered[0] = thread_time()
            elif origin is measured[0]:
                cpu[0] += thread_time() - entered[0]
        if previous is not None:
            previous(event, args)

    ticker = gevent.spawn(tick)
    gevent.sleep(0)
    job = gevent.spawn(fn)
    measured[0] = job
    previous = greenlet.settrace(trace)
    try:
        t0 = perf_counter()
        value = job.get()
        wall = perf_counter() - t0
    finally:
        greenlet.settrace(previous)
    stop[0] = True
    ticker.join()
    return wall * 1e3, longest[0] * 1e3, cpu[0] * 1e3, value


def _queue_one(pool: Any) -> None:
    """One acquisition queued on ``pool`` and served (both connections held, one given
    back): every pool then has waits in its histogram and a fractional wait time, as
    a busy fleet's pools have (their lines are not all small whole numbers)."""
    first, second = pool.acquire(10), pool.acquire(10)
    waiter = gevent.spawn(pool.acquire, 10)
    gevent.sleep(0)  # it queues
    first.release()
    waiter.get(timeout=10).release()
    second.release()


def _s_round(n: int, listeners: list[Any], spare: list[Any]) -> dict[str, dict[str, float]]:
    import lbpool

    addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in listeners[:n]]
    backends = {
        f"s{i // S_PER_BACKEND}": {"servers": addresses[i : i + S_PER_BACKEND]}
        for i in range(0, n, S_PER_BACKEND)
    }
    config = {"defaults": {"pool": {"min_idle": 0, "max_size": 2}}, "backends": backends}
    out: dict[str, dict[str, float]] = {}

    def record(op: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        wall, hub, cpu, value = _s_timed(fn)
        out[op] = {"ms": wall, "hub_ms": hub, "cpu_ms": cpu}
        return value

    manager = record("create", lambda: lbpool.PoolManager(config))
    held: list[Any] = []
    try:
        record("wait_ready", lambda: manager.wait_ready(30))
        gevent.pool.Pool(50).map(_queue_one, manager._all_pools())
        names = list(backends)
        for i in range(S_BUSY):
            held.append(manager.acquire(names[i % len(names)], timeout=10))
        pools = manager._all_pools()
        record("upkeep_pass", lambda: [p.run_upkeep() for p in pools])
        stats = record("stats", manager.stats)
        record("to_dict", stats.to_dict)
        try:
            import lbpool.metrics
        except ImportError:  # prometheus_client is not installed
            pass
        else:
            from prometheus_client import CollectorRegistry
            from prometheus_client import generate_latest as unpaced

            collector = lbpool.metrics.LbpoolCollector(manager)
            record("collect", lambda: [(f, f.samples) for f in collector.collect()])
            registry = CollectorRegistry()
            registry.register(lbpool.metrics.LbpoolCollector(manager))
            record("expose_first", lambda: lbpool.metrics.generate_latest(registry))
            # every pool not held queues again before each later scrape (new wait times,
            # new counts: what a busy fleet's next scrape sees); the second scrape still
            # costs more (about 2 ms at 1,000 servers here: the allocator's pages for the
            # text are new to it): the third is as the rest
            free = [p for p in pools if p.stats().in_use == 0]
            gevent.pool.Pool(50).map(_queue_one, free)
            lbpool.metrics.generate_latest(registry)
            gevent.pool.Pool(50).map(_queue_one, free)
            record("expose", lambda: lbpool.metrics.generate_latest(registry))
            record("expose_unpaced", lambda: unpaced(registry))
        adhoc = f"127.0.0.1:{spare[0].getsockname()[1]}"

        def first_get() -> None:
            with manager.get(adhoc, timeout=10):
                pass

        record("adhoc_get", first_get)
    finally:
        for conn in held:
            conn.release()
        manager.close(timeout=5)
    return out


def scenario_s(s: Settings, verbose: bool) -> dict[str, Any]:
    """Scenario S: each operation's cost at 10, 100 and 1,000 servers (see the module)."""
    from gevent import socket as gsocket

    listeners: list[Any] = []
    spare: list[Any] = []
    per: dict[int, dict[str, dict[str, list[float]]]] = {n: {} for n in SERVER_COUNTS}
    try:
        for group, count in ((listeners, max(SERVER_COUNTS)), (spare, 1)):
            for _ in range(count):
                sock = gsocket.socket()
                sock.bind(("127.0.0.1", 0))
                sock.listen(128)
                group.append(sock)
        for r in range(s.rounds):
            for n in SERVER_COUNTS:
                progress(verbose, f"  S round {r + 1}/{s.rounds}: {n} servers")
                for op, v in _s_round(n, listeners, spare).items():
                    for k, x in v.items():
                        per[n].setdefault(op, {}).setdefault(k, []).append(x)
    finally:
        for sock in listeners + spare:
            sock.close()
    results: dict[str, Any] = {}
    big, mid, small = SERVER_COUNTS[-1], SERVER_COUNTS[-2], SERVER_COUNTS[0]
    for op in S_OPS:
        if op not in per[big]:
            continue
        row: dict[str, Any] = {}
        for n in SERVER_COUNTS:
            row[str(n)] = {k: rounded(median(v), 3) for k, v in per[n][op].items()}
        row[f"x_{big}_over_{mid}"] = rounded(
            ratio(median(per[big][op]["ms"]), median(per[mid][op]["ms"])), 2
        )
        row[f"x_{big}_over_{small}"] = rounded(
            ratio(median(per[big][op]["ms"]), median(per[small][op]["ms"])), 2
        )
        results[op] = row
    # stats + to_dict + expose: CPU ms per round (same-round sums), median over rounds
    total: dict[str, float] = {}
    if all(op in per[big] for op in S_SNAPSHOT_OPS):
        for n in SERVER_COUNTS:
            rounds = [per[n][op]["cpu_ms"] for op in S_SNAPSHOT_OPS]
            sums = [sum(t) for t in zip(*rounds, strict=True)]
            total[str(n)] = rounded(median(sums), 3)
    return {
        "unit": (
            "ms (wall), hub_ms (the hub's longest stretch) and cpu_ms (the operation's "
            "own greenlet's CPU time over all its slices), median over rounds"
        ),
        "servers": list(SERVER_COUNTS),
        "rounds": s.rounds,
        "busy_connections": S_BUSY,
        "results": results,
        "snapshot_ops": list(S_SNAPSHOT_OPS),
        "snapshot_total_cpu_ms": total,
    }


# -- scenario R: redis-py over lbpool ----------------------------------------------


def _overtakes(spans: list[tuple[float, float]]) -> tuple[float, int]:
    """How often a GET finished before one that had started earlier (it overtook it):
    (overtakes per GET, the most GETs that overtook a single one). ``spans`` are
    (start, end) pairs; counted as inversions of the end order against the start order
    with a Fenwick tree, O(n log n). With a first come, first served pool only GETs in
    flight together overtake each other; a pool that lets a returning caller take its
    connection straight back overtakes the callers it leaves waiting, over and over."""
    n = len(spans)
    if n < 2:
        return (0.0, 0)
    ends = sorted(range(n), key=lambda i: spans[i][1])
    rank = [0] * n
    for r, i in enumerate(ends):
        rank[i] = r + 1
    tree = [0] * (n + 1)
    total = worst = 0
    # latest start first: each GET counts the later-started ones that ended before it
    for i in sorted(range(n), key=lambda i: spans[i][0], reverse=True):
        r = rank[i] - 1
        seen = 0
        while r > 0:
            seen += tree[r]
            r -= r & -r
        total += seen
        worst = max(worst, seen)
        r = rank[i]
        while r <= n:
            tree[r] += 1
            r += r & -r
    return (total / n, worst)


def _r_round(client: Any, greenlets: int, seconds: float, key: str) -> dict[str, Any]:
    """``greenlets`` greenlets GET ``key`` through ``client`` for ``seconds``; the rate,
    the latencies, and how fairly the greenlets were served (each one's GETs against
    the mean, how many got none, overtakes)."""
    deadline = perf_counter() + seconds
    counts = [0] * greenlets
    spans: list[tuple[float, float]] = []
    errors: dict[str, int] = {}

    def worker(i: int) -> None:
        now = perf_counter
        get = client.get
        done = spans.append
        t0 = now()
        while t0 < deadline:
            try:
                get(key)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                t0 = now()
                continue
            t1 = now()
            done((t0, t1))
            if t1 <= deadline:
                counts[i] += 1
            t0 = t1

    jobs = [gevent.spawn(worker, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=seconds + 30)
    gevent.killall(jobs, timeout=5)
    mean = sum(counts) / greenlets
    per_get, worst = _overtakes(spans)
    return {
        "ops_per_s": sum(counts) / seconds,
        "dist": _dist_us([b - a for a, b in spans]),
        "errors": errors,
        "min_share": min(counts) / mean if mean else 0.0,
        "max_share": max(counts) / mean if mean else 0.0,
        "starved": sum(1 for c in counts if c == 0),
        "overtakes_per_get": per_get,
        "max_overtaken": worst,
    }


def scenario_r(s: Settings, verbose: bool) -> dict[str, Any]:
    """GET of a ``r_value``-byte value by ``r_greenlets`` greenlets through redis-py,
    over ``lbpool.contrib.redis`` (twice: ``max_size`` SIZE, as the blocking pool's
    ``max_connections``, and ``max_size`` one per greenlet, what the unbounded
    ``ConnectionPool`` opens) and over redis-py's ``ConnectionPool`` and
    ``BlockingConnectionPool``, interleaved over ``s.rounds`` rounds against one
    loopback ``redis-server`` started here. Each lbpool row's headline ratio is against
    the redis-py pool with the same connections. ``{"skipped": why}`` when redis-py or
    redis-server is missing."""
    why = peers.redis_missing()
    if why is not None:
        progress(verbose, f"scenario R skipped: {why}")
        return {"skipped": why}
    impls = list(peers.REDIS_IMPLS)
    per_round: dict[str, list[dict[str, Any]]] = {k: [] for k in impls}
    key = "bench:r"
    greenlets = s.r_greenlets
    with peers.redis_server() as address:
        with peers.redis_client(impls[2], address, SIZE, ACQUIRE_TIMEOUT) as client:
            client.set(key, b"v" * s.r_value)
        for r in range(s.rounds):
            progress(verbose, f"scenario R round {r + 1}/{s.rounds}")
            k = r % len(impls)
            for kind in impls[k:] + impls[:k]:
                with peers.redis_client(kind, address, SIZE, ACQUIRE_TIMEOUT, greenlets) as client:
                    # warm: as many connections as the pool will open for the greenlets
                    warmers = [gevent.spawn(client.get, key) for _ in range(greenlets)]
                    gevent.joinall(warmers, timeout=30, raise_error=True)
                    per_round[kind].append(_r_round(client, greenlets, s.r_seconds, key))
    lb, lb_wide, plain, blocking = impls
    results: dict[str, Any] = {}
    for kind, rs in per_round.items():
        rate = [x["ops_per_s"] for x in rs]
        row: dict[str, Any] = {
            "ops_per_s": rounded(median(rate), 0),
            "latency_us": {
                q: rounded(median([x["dist"][q] for x in rs]), 1) for q in ("p50", "p99", "max")
            },
            "errors": {
                name: sum(x["errors"].get(name, 0) for x in rs)
                for name in sorted({n for x in rs for n in x["errors"]})
            },
            "rounds": [rounded(v, 0) for v in rate],
            # fairness, medians over rounds: a greenlet's GETs / the mean (min, max),
            # greenlets with no GET in a round, GETs finished ahead of an earlier one
            "fairness": {
                "min_share": rounded(median([x["min_share"] for x in rs]), 3),
                "max_share": rounded(median([x["max_share"] for x in rs]), 3),
                "starved": median([x["starved"] for x in rs]),
                "overtakes_per_get": rounded(median([x["overtakes_per_get"] for x in rs]), 2),
                "max_overtaken": median([x["max_overtaken"] for x in rs]),
            },
        }
        for ref, name in ((plain, "x_connection_pool"), (blocking, "x_blocking_pool")):
            row[name] = rounded(
                median([ratio(a, b) for a, b in zip(rate, (x["ops_per_s"] for x in per_round[ref]),
                                                    strict=True)]),
                3,
            )  # fmt: skip
        results[kind] = row
    return {
        "greenlets": greenlets,
        "value_bytes": s.r_value,
        "max_size": SIZE,
        "note": (
            f"{lb} and {blocking}: {SIZE} connections; {lb_wide}: {greenlets}; {plain} is "
            f"unbounded and opens {greenlets} (bounded, it raises instead of waiting)"
        ),
        "results": results,
        # lbpool's GETs per second over the redis-py pool with the same connections,
        # median of same-round ratios
        "x_connection_pool": results[lb_wide]["x_connection_pool"],
        "x_blocking_pool": results[lb]["x_blocking_pool"],
    }


# -- scenario E: failover ----------------------------------------------------------


def scenario_e(s: Settings, verbose: bool) -> dict[str, Any]:
    from lbpool.manager import PoolManager

    servers = [EchoServer().start() for _ in range(3)]
    victim = servers[1]
    recovery = s.e_recovery
    config = {
        "backends": {
            "e": {
                "strategy": "round_robin",
                "servers": [x.address for x in servers],
                "pool": {"max_size": SIZE, "acquire_timeout": 2.0},
                "breaker": {"recovery_timeout": recovery},
                "dial": {"timeout": 1.0},
            }
        }
    }
    manager = PoolManager(config)
    payload = b"e" * s.payload
    ok: list[tuple[float, str]] = []  # (end time, server)
    retried: list[float] = []  # requests whose first connection died in flight
    failed: list[dict[str, Any]] = []
    t_base = monotonic()
    stop_at = t_base + s.e_kill_at + s.e_outage + s.e_tail

    def client() -> None:
        while True:
            t0 = monotonic()
            if t0 >= stop_at:
                return
            address: str | None = None
            tries = 0

            def attempt(conn: Any) -> None:
                nonlocal address, tries
                tries += 1
                if tries > 1:
                    retried.append(monotonic())
                address = conn.address
                conn.sendall(payload)
                recv_exact(conn, len(payload))

            try:
                # the recommended client: manager.call retries a request whose
                # connection died in flight on a fresh acquisition (after discarding
                # the dead one, which tells the server's breaker), within one deadline
                manager.call("e", attempt, timeout=2.0)
            except Exception as exc:
                failed.append(
                    {
                        "start": t0,
                        "end": monotonic(),
                        "server": address,
                        "error": type(exc).__name__,
                    }
                )
            else:
                assert address is not None  # set by the attempt that succeeded
                ok.append((monotonic(), address))
            gevent.sleep(s.e_pace)

    try:
        manager.wait_ready(5.0)
        clients = [gevent.spawn(client) for _ in range(s.e_greenlets)]
        gevent.sleep(max(0.0, t_base + s.e_kill_at - monotonic()))
        t_kill = monotonic()
        victim.stop()
        progress(verbose, f"  E: stopped {victim.address} at +{t_kill - t_base:.2f}s")
        breaker = manager.backends["e"].pools[1].breaker
        t_open: float | None = None
        while monotonic() < t_kill + s.e_outage:
            if t_open is None and breaker.state == "open":
                t_open = monotonic()
            gevent.sleep(0.005)
        victim.start()
        t_back = monotonic()
        progress(verbose, f"  E: restarted {victim.address} at +{t_back - t_base:.2f}s")
        gevent.joinall(clients, timeout=stop_at - monotonic() + 5.0)
        gevent.killall([c for c in clients if not c.dead], block=True, timeout=2.0)
        stats = manager.stats().backends["e"].servers[victim.address]
        trips, dial_failures = stats.breaker_trips, stats.dial_failures
    finally:
        manager.close(2.0)
        for x in servers:
            x.stop()

    # when is traffic spread again: the first victim success after its return that
    # opens a window of 0.25 s in which the victim serves >= 20% of the requests (fair
    # share: 33%)
    ok.sort()
    ends = [t for t, _ in ok]
    victim_ends = [t for t, a in ok if a == victim.address and t >= t_back]
    spread_at: float | None = None
    for t in victim_ends:
        lo = bisect.bisect_left(ends, t)
        hi = bisect.bisect_left(ends, t + 0.25)
        window = ok[lo:hi]
        if len(window) >= 10:
            share = sum(1 for _, a in window if a == victim.address) / len(window)
            if share >= 0.2:
                spread_at = t
                break
    in_flight = [f for f in failed if f["start"] < t_kill]
    after_kill = [f for f in failed if f["start"] >= t_kill]
    kinds: dict[str, int] = {}
    for f in after_kill:
        key = f"{f['error']}@{f['server'] or 'acquire'}"
        kinds[key] = kinds.get(key, 0) + 1
    tail = [a for t, a in ok if spread_at is not None and t >= spread_at]
    share_after = sum(1 for a in tail if a == victim.address) / len(tail) if tail else float("nan")
    return {
        "servers": 3,
        "strategy": "round_robin",
        "recovery_timeout_s": recovery,
        "outage_s": round(t_back - t_kill, 3),
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "failed_in_flight_at_kill": len(in_flight),
        "failed_after_kill": len(after_kill),
        "failed_after_kill_by_kind": kinds,
        "retried_once": len(retried),
        "breaker_open_after_s": None if t_open is None else round(t_open - t_kill, 3),
        "breaker_trips": trips,
        "dial_failures": dial_failures,
        "first_served_after_return_s": (round(victim_ends[0] - t_back, 3) if victim_ends else None),
        "spread_after_return_s": None if spread_at is None else round(spread_at - t_back, 3),
        "victim_share_after_spread": rounded(share_after),
    }


# -- observations ------------------------------------------------------------------


def observe(kind: str, address: str, server: EchoServer, s: Settings) -> dict[str, Any]:
    """Measure what a pool does (not what its docs say): limit, order, timeout."""
    obs: dict[str, Any] = {"limit": SIZE}
    accepted0 = server.connections_accepted
    with peers.make_adapter(kind, address, SIZE, ACQUIRE_TIMEOUT) as ad:
        warm(ad)
        obs.update(_order_probe(ad, s.probe_greenlets, s.probe_seconds))
    gevent.sleep(0)
    obs["connections_opened"] = server.connections_accepted - accepted0
    if kind == FLOOR:
        obs["timeout"] = {"kind": "none", "honored": None, "raised": None, "elapsed_s": None}
        obs["cooperative_unpatched"] = True
    else:
        probe = peers.timeout_probe(kind, address, SIZE, 0.1)
        ad_kind = {SQLA: "pool-wide (QueuePool(timeout=...))", GSOCK: "none"}.get(kind, "per call")
        obs["timeout"] = {"kind": ad_kind, **probe}
        if kind in (SQLA, GCP):
            obs["cooperative_unpatched"] = peers.unpatched_handoff_probe(kind, address)[
                "cooperative"
            ]
        else:
            obs["cooperative_unpatched"] = _native_handoff_probe(kind, address)
    missing: list[str] = []
    if obs["max_held"] > SIZE or obs["connections_opened"] > SIZE:
        missing.append("size limit")
    if obs["overtakes"] or obs["starved"]:
        missing.append("FIFO fairness")
    if kind != FLOOR and not obs["timeout"]["honored"]:
        missing.append("acquire timeout")
    if not obs["cooperative_unpatched"]:
        missing.append("gevent-cooperative wait (needs monkey-patching)")
    obs["missing"] = missing
    return obs


def _native_handoff_probe(kind: str, address: str) -> bool:
    """A pool of one, held; released by another greenlet after 10 ms: got in time?"""
    with peers.make_adapter(kind, address, 1, 1.0) as ad:
        acquire = ad.call()
        lease = acquire()
        releaser = gevent.spawn_later(0.01, ad.release, lease)
        t0 = monotonic()
        try:
            got = acquire()
        except Exception:
            return False
        elapsed = monotonic() - t0
        releaser.join(1.0)
        ad.release(got)
    return elapsed < 0.15


def _order_probe(ad: peers.Adapter, greenlets: int, seconds: float) -> dict[str, Any]:
    """Contended run with tickets: overtakes (a caller served while an earlier one
    still waits), max connections held at once, callers never served."""
    acquire = ad.call()
    release = ad.release
    heap: list[int] = []
    done: set[int] = set()
    st = {"ticket": 0, "held": 0, "max_held": 0, "overtakes": 0, "grants": 0, "errors": 0}
    counts = [0] * greenlets
    deadline = monotonic() + seconds

    def worker(i: int) -> None:
        while monotonic() < deadline:
            t = st["ticket"]
            st["ticket"] = t + 1
            heapq.heappush(heap, t)
            try:
                lease = acquire()
            except Exception:
                st["errors"] += 1
                done.add(t)
                continue
            done.add(t)
            while heap and heap[0] in done:
                done.discard(heapq.heappop(heap))
            st["grants"] += 1
            if heap and heap[0] < t:
                st["overtakes"] += 1
            st["held"] += 1
            if st["held"] > st["max_held"]:
                st["max_held"] = st["held"]
            gevent.sleep(0)
            st["held"] -= 1
            release(lease)
            counts[i] += 1

    workers = [gevent.spawn(worker, i) for i in range(greenlets)]
    gevent.joinall(workers, timeout=seconds + _GRACE)
    alive = [w for w in workers if not w.dead]
    if alive:
        gevent.killall(alive, block=True, timeout=2.0)
    return {
        "max_held": st["max_held"],
        "grants": st["grants"],
        "overtakes": st["overtakes"],
        "fifo": st["overtakes"] == 0,
        "starved": sum(1 for c in counts if c == 0),
        "probe_greenlets": greenlets,
        "acquire_errors": st["errors"],
    }


# -- profiling ---------------------------------------------------------------------


def profile_hot_paths(address: str, s: Settings) -> str:
    """cProfile of lbpool's hot paths: uncontended cycle (Pool, manager) and handoff."""
    out = io.StringIO()
    n = 20_000 if s.quick else 100_000
    for kind in LBPOOL:
        with peers.make_adapter(kind, address, SIZE, ACQUIRE_TIMEOUT) as ad:
            loop = _loop0 if ad.arg is None else _loop1
            loop(ad.acquire, ad.arg, ad.release, 100)
            prof = cProfile.Profile()
            prof.enable()
            loop(ad.acquire, ad.arg, ad.release, n)
            prof.disable()
        out.write(f"== {kind}: {n} uncontended acquire+release cycles\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    with peers.make_adapter(POOL, address, SIZE, ACQUIRE_TIMEOUT) as ad:
        warm(ad)
        prof = cProfile.Profile()
        prof.enable()
        contended_round(ad, s.b_greenlets, s.b_seconds, b_worker)
        prof.disable()
    out.write(f"== {POOL}: contended handoff ({s.b_greenlets} greenlets, max_size {SIZE})\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()
