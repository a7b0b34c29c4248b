"""``lbpool bench``: lbpool against a floor and its peers, in one gevent process, on loopback.

Scenarios (``--scenarios A,B,C,D,E``), run interleaved over ``--rounds`` rounds so that
machine noise hits every implementation alike; each number reported is the median
over rounds, and each ratio the median of *same-round* ratios:

- A, uncontended: one acquire + release cycle (ns/op) of ``lbpool.Pool``,
  ``manager.get()`` and the peers, against the floor: a bare ``collections.deque``
  ``pop``/``append``.
- B, contended: 500 greenlets share ``max_size`` 10 and ``gevent.sleep(0)`` while
  holding (ops/s; acquire wait p50/p99/max). Floor: :class:`~lbpool._bench_peers.FloorPool`
  (deque + FIFO ``Waiter`` handoff, no timeouts or health).
- C, echo: 50 greenlets do 64-byte request/response through a pool of 10 against a
  loopback echo server (req/s; latency p50/p99/max); baselines: the floor pool, and
  one fresh connection per request (no pool).
- D, balancing: the cost of one ``pick`` at 10/100/1,000 servers per strategy.
- E, failover: three servers behind a manager, one stopped mid-run and started again
  on its port: requests that failed, and how long until traffic spreads back to it.

Besides the numbers, the bench *observes* each pool's behaviour (max connections
held and opened against its limit, whether waiters are served in arrival order,
whether an acquire honours a timeout, whether a wait parks only its greenlet without
monkey-patching) and lists what each one lacks. ``--json`` prints machine-readable
results, ``--plot FILE.png`` draws them (matplotlib, imported only then), ``--profile``
adds cProfile listings of lbpool's hot paths.

Nothing in the core imports this module; it imports the peers only when they run.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import cProfile
import gc
import heapq
import io
import json
import logging
import os
import platform
import pstats
import random
import re
import statistics
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from time import monotonic, perf_counter, perf_counter_ns
from typing import Any

import gevent

from lbpool import _bench_peers as peers
from lbpool.testing import EchoServer, recv_exact

__all__ = ["QUICK", "SCENARIOS", "Settings", "main", "run"]

SCENARIOS = ("A", "B", "C", "D", "E")
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
_ACQUIRE_TIMEOUT = 60.0  # generous: contention must not turn into timeouts
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
)


def _log(enabled: bool, text: str) -> None:
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


def _median(values: Sequence[float]) -> float:
    vals = [x for x in values if x == x]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def _ratio(a: float, b: float) -> float:
    if not b or a != a or b != b:
        return float("nan")
    return a / b


def _round(x: float, digits: int = 3) -> float:
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


def _measure_a(ad: peers.Adapter, seconds: float) -> float:
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


def _warm(ad: peers.Adapter) -> None:
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


def _b_worker(
    i: int, run: _Run, acquire: Callable[[], Any], release: Callable[[Any], None]
) -> None:
    now = perf_counter
    sleep = gevent.sleep
    deadline = run.deadline
    waits = run.samples
    counts = run.counts
    starts = run.starts
    t0 = now()
    while t0 < deadline:
        starts[i] = t0
        try:
            lease = acquire()
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
        t0 = now()
        if t0 <= deadline:
            counts[i] += 1


def _c_worker(
    i: int,
    run: _Run,
    acquire: Callable[[], Any],
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
    t0 = now()
    while t0 < deadline:
        if budget is not None:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        starts[i] = t0
        lease: Any = None
        try:
            lease = acquire()
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
            t0 = now()
            continue
        t1 = now()
        starts[i] = 0.0
        lats.append(t1 - t0)
        release(lease)
        if t1 <= deadline:
            counts[i] += 1
        t0 = now()


def _contended_round(
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
    acquire = ad.call()
    workers = [gevent.spawn(worker, i, run, acquire, ad.release, *extra) for i in range(greenlets)]
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


def _members(n: int, rng: random.Random) -> list[_Member]:
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


def _measure_d(members: dict[int, list[_Member]], seconds: float) -> dict[str, float]:
    from lbpool.balance import make_balancer

    out: dict[str, float] = {}
    for n, ms in members.items():
        d: deque[Any] = deque(ms)
        out[f"{FLOOR_A}/{n}"] = _timed(lambda k, d=d: _deque_rr_loop(d, k), seconds)  # type: ignore[misc]
        for strategy in STRATEGIES:
            pick = make_balancer(strategy, ms, rng=random.Random(n)).pick
            out[f"{strategy}/{n}"] = _timed(lambda k, p=pick: _pick_loop(p, k), seconds)  # type: ignore[misc]
    return out


# -- scenario E: failover ----------------------------------------------------------


def _scenario_e(s: Settings, verbose: bool) -> dict[str, Any]:
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
            try:
                # the recommended client pattern: a request whose connection dies in
                # flight is retried once on a fresh acquisition (the `with` discarded
                # the dead one and told the server's breaker)
                for attempt in (1, 2):
                    try:
                        with manager.get("e", 2.0) as conn:
                            address = conn.address
                            conn.sendall(payload)
                            recv_exact(conn, len(payload))
                        break
                    except OSError:
                        if attempt == 2:
                            raise
                        retried.append(monotonic())
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
        _log(verbose, f"  E: stopped {victim.address} at +{t_kill - t_base:.2f}s")
        breaker = manager.backends["e"].pools[1].breaker
        t_open: float | None = None
        while monotonic() < t_kill + s.e_outage:
            if t_open is None and breaker.state == "open":
                t_open = monotonic()
            gevent.sleep(0.005)
        victim.start()
        t_back = monotonic()
        _log(verbose, f"  E: restarted {victim.address} at +{t_back - t_base:.2f}s")
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
        "victim_share_after_spread": _round(share_after),
    }


# -- observations ------------------------------------------------------------------


def _observe(kind: str, address: str, server: EchoServer, s: Settings) -> dict[str, Any]:
    """Measure what a pool does (not what its docs say): limit, order, timeout."""
    obs: dict[str, Any] = {"limit": SIZE}
    accepted0 = server.connections_accepted
    with peers.make_adapter(kind, address, SIZE, _ACQUIRE_TIMEOUT) as ad:
        _warm(ad)
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


# -- the run -----------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "gevent": getattr(gevent, "__version__", "?"),
        "platform": platform.platform(),
    }


def _available_peers(address: str, enabled: bool) -> tuple[list[str], dict[str, str]]:
    if not enabled:
        return [], dict.fromkeys(peers.PEERS, "disabled (--no-peers)")
    ok: list[str] = []
    missing: dict[str, str] = {}
    for kind in peers.PEERS:
        try:
            with peers.make_adapter(kind, address, 1, 1.0):
                pass
        except peers.PeerMissing as exc:
            missing[kind] = str(exc)
        except Exception as exc:  # installed but unusable here: say so, go on
            missing[kind] = f"{type(exc).__name__}: {exc}"
        else:
            ok.append(kind)
    return ok, missing


@contextlib.contextmanager
def _quiet_lbpool_logs() -> Iterator[None]:
    logger = logging.getLogger("lbpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def run(
    settings: Settings, *, verbose: bool = False, command: str = "lbpool bench"
) -> dict[str, Any]:
    """Run the bench; returns JSON-ready results (plus ``_samples`` for plotting)."""
    s = settings
    t_start = monotonic()
    server = EchoServer().start()
    address = server.address
    try:
        peer_ok, peer_missing = _available_peers(address, s.peers)
        a_impls = [FLOOR_A, FLOOR, POOL, MANAGER, *peer_ok]
        b_impls = [FLOOR, POOL, MANAGER, *peer_ok]
        c_impls = [FLOOR, POOL, MANAGER, *peer_ok, DIAL]
        per_round: dict[str, dict[str, list[Any]]] = {sc: {} for sc in SCENARIOS}
        samples: dict[str, dict[str, list[float]]] = {"B": {}, "C": {}}
        rng = random.Random(1)
        members = {n: _members(n, rng) for n in SERVER_COUNTS} if "D" in s.scenarios else {}
        payload = b"x" * s.payload
        failed: dict[str, str] = {}  # peers that broke mid-run: dropped, with the reason

        def measure(sc: str, kind: str, fn: Callable[[peers.Adapter], Any]) -> None:
            if kind in failed:
                return
            try:
                with peers.make_adapter(kind, address, SIZE, _ACQUIRE_TIMEOUT) as ad:
                    value = fn(ad)
            except Exception as exc:
                if kind not in peers.PEERS:
                    raise
                failed[kind] = f"scenario {sc}: {type(exc).__name__}: {exc}"
                _log(verbose, f"  {kind} failed, dropped: {failed[kind]}")
                for rounds in per_round.values():
                    rounds.pop(kind, None)
                return
            if isinstance(value, dict) and "_samples" in value:
                samples[sc][kind] = value.pop("_samples")
            per_round[sc].setdefault(kind, []).append(value)

        def b_round(ad: peers.Adapter) -> dict[str, Any]:
            _warm(ad)
            return _contended_round(ad, s.b_greenlets, s.b_seconds, _b_worker)

        def c_round(ad: peers.Adapter) -> dict[str, Any]:
            _warm(ad)
            budget = [s.c_dial_max] if ad.name == DIAL else None
            out = _contended_round(
                ad, s.c_greenlets, s.c_seconds, _c_worker, ad.io, payload, budget
            )
            gevent.sleep(0.01)  # let the server's handlers of closed sockets end
            return out

        for r in range(s.rounds):
            _log(verbose, f"round {r + 1}/{s.rounds}")
            if "A" in s.scenarios:
                for kind in _rotate(a_impls, r):
                    measure("A", kind, lambda ad: _measure_a(ad, s.a_seconds))
            if "B" in s.scenarios:
                for kind in _rotate(b_impls, r):
                    measure("B", kind, b_round)
            if "C" in s.scenarios:
                for kind in _rotate(c_impls, r):
                    measure("C", kind, c_round)
            if "D" in s.scenarios:
                for key, ns in _measure_d(members, s.d_seconds).items():
                    per_round["D"].setdefault(key, []).append(ns)
        peer_missing.update(failed)
        peer_ok = [k for k in peer_ok if k not in failed]
        e_result: dict[str, Any] | None = None
        if "E" in s.scenarios:
            _log(verbose, "scenario E (failover)")
            with _quiet_lbpool_logs():  # the breaker's warnings are the point here
                e_result = _scenario_e(s, verbose)
        observations: dict[str, Any] = {}
        if {"B", "C"} & set(s.scenarios):
            _log(verbose, "observing behaviour (limit, order, timeout, cooperation)")
            for kind in [FLOOR, POOL, MANAGER, *peer_ok]:
                observations[kind] = _observe(kind, address, server, s)
        profile_text = _profile(address, s) if s.profile else None
    finally:
        server.stop()

    scen = _summarise(per_round, s)
    if e_result is not None:
        scen["E"] = e_result
    result: dict[str, Any] = {
        "meta": {
            "command": command,
            "settings": {k: v for k, v in asdict(s).items() if k != "profile"},
            "machine": _machine(),
            "peers": peers.peer_versions(),
            "peers_missing": peer_missing,
            "pool_max_size": SIZE,
            "duration_s": 0.0,
        },
        "scenarios": scen,
        "observations": observations,
        "targets": _targets(scen, s),
    }
    if profile_text is not None:
        result["profile"] = profile_text
    result["meta"]["duration_s"] = round(monotonic() - t_start, 2)
    result["_samples"] = samples
    return result


def _same_round(
    values: Sequence[Any], refs: Sequence[Any], get: Callable[[Any], float], digits: int = 3
) -> float:
    """Median over rounds of value/reference, each pair from the same round."""
    return _round(
        _median([_ratio(get(v), get(r)) for v, r in zip(values, refs, strict=True)]), digits
    )


def _num(x: Any) -> float:
    return float(x)


def _summarise(per_round: dict[str, dict[str, list[Any]]], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if per_round["A"]:
        rounds_a = per_round["A"]
        a: dict[str, Any] = {}
        for kind, vals in rounds_a.items():
            row: dict[str, Any] = {
                "ns_per_op": _round(_median(vals), 1),
                "rounds": [round(v, 1) for v in vals],
                # the floor, as in every scenario: a deque with FIFO handoff to waiters
                "x_floor": _same_round(vals, rounds_a[FLOOR], _num, 2),
                # and against the bare pop/append, the lowest any Python code can go
                "x_deque": _same_round(vals, rounds_a[FLOOR_A], _num, 2),
            }
            if SQLA in rounds_a:
                row["x_sqlalchemy"] = _same_round(vals, rounds_a[SQLA], _num)
            a[kind] = row
        out["A"] = {"unit": "ns per acquire+release", "floor": FLOOR, "results": a}
    for sc, rate_key, dist_key in (("B", "ops_per_s", "wait_us"), ("C", "req_per_s", "latency_us")):
        rounds = per_round[sc]
        if not rounds:
            continue
        floor_r = rounds[FLOOR]
        res: dict[str, Any] = {}
        for kind, rs in rounds.items():
            rate = [x["ops_per_s"] for x in rs]
            row = {
                rate_key: _round(_median(rate), 0),
                dist_key: {
                    q: _round(_median([x["dist"][q] for x in rs]), 1) for q in ("p50", "p99", "max")
                },
                "x_floor": _same_round(rs, floor_r, _rate),
                "p99_x_floor": _same_round(rs, floor_r, _p99),
                "max_x_floor": _same_round(rs, floor_r, _max),
                "errors": _sum_errors(rs),
                "starved_greenlets": max(x["starved"] for x in rs),
                "still_waiting_at_end": max(x["still_waiting"] for x in rs),
                "rounds": [_round(v, 0) for v in rate],
            }
            for ref, key in ((SQLA, "x_sqlalchemy"), (DIAL, "x_dial")):
                if ref in rounds and kind != ref:
                    row[key] = _same_round(rs, rounds[ref], _rate, 2)
            res[kind] = row
        out[sc] = {
            "greenlets": s.b_greenlets if sc == "B" else s.c_greenlets,
            "max_size": SIZE,
            "floor": FLOOR,
            "results": res,
        }
        if sc == "C":
            out[sc]["payload_bytes"] = s.payload
    if per_round["D"]:
        rounds_d = per_round["D"]
        d: dict[str, Any] = {}
        for name in (FLOOR_A, *STRATEGIES):
            row = {str(n): _round(_median(rounds_d[f"{name}/{n}"]), 1) for n in SERVER_COUNTS}
            row["x_1000_vs_10"] = _same_round(
                rounds_d[f"{name}/1000"], rounds_d[f"{name}/10"], _num, 2
            )
            d[name] = row
        out["D"] = {"unit": "ns per pick", "floor": f"{FLOOR_A} popleft/append", "results": d}
    return out


def _rate(x: dict[str, Any]) -> float:
    return float(x["ops_per_s"])


def _p99(x: dict[str, Any]) -> float:
    return float(x["dist"]["p99"])


def _max(x: dict[str, Any]) -> float:
    return float(x["dist"]["max"])


def _sum_errors(rs: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for x in rs:
        for k, v in x["errors"].items():
            total[k] = total.get(k, 0) + v
    return total


def _target(tid: str, text: str, value: Any, limit: Any, op: str) -> dict[str, Any]:
    met: bool | None
    if value is None or (isinstance(value, float) and value != value):
        met = None
    elif op == "<=":
        met = bool(value <= limit)
    elif op == ">=":
        met = bool(value >= limit)
    else:
        met = bool(value == limit)
    return {"id": tid, "target": text, "value": value, "limit": f"{op} {limit}", "met": met}


def _targets(scen: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    if "A" in scen:
        a = scen["A"]["results"]
        t.append(_target("A.pool", "Pool cycle / FIFO deque floor", a[POOL]["x_floor"], 8, "<="))
        t.append(
            _target(
                "A.manager", "manager.get cycle / FIFO deque floor", a[MANAGER]["x_floor"], 12, "<="
            )
        )
        t.append(
            _target(
                "A.manager_vs_sqla",
                "manager.get cycle / QueuePool cycle",
                a[MANAGER].get("x_sqlalchemy"),
                0.25,
                "<=",
            )
        )
    if "B" in scen:
        b = scen["B"]["results"]
        for kind in LBPOOL:
            t.append(
                _target(f"B.{kind}.rate", f"{kind} ops/s / floor", b[kind]["x_floor"], 0.8, ">=")
            )
            t.append(
                _target(
                    f"B.{kind}.p99", f"{kind} p99 wait / floor's", b[kind]["p99_x_floor"], 2, "<="
                )
            )
            t.append(
                _target(
                    f"B.{kind}.sqla",
                    f"{kind} ops/s / SQLAlchemy's",
                    b[kind].get("x_sqlalchemy"),
                    4,
                    ">=",
                )
            )
    if "C" in scen:
        c = scen["C"]["results"]
        for kind in LBPOOL:
            t.append(
                _target(f"C.{kind}.rate", f"{kind} req/s / floor", c[kind]["x_floor"], 0.95, ">=")
            )
            t.append(
                _target(
                    f"C.{kind}.max",
                    f"{kind} max latency / floor's",
                    c[kind]["max_x_floor"],
                    3,
                    "<=",
                )
            )
            t.append(
                _target(
                    f"C.{kind}.dial",
                    f"{kind} req/s / dial-per-request",
                    c[kind].get("x_dial"),
                    5,
                    ">=",
                )
            )
    if "D" in scen:
        d = scen["D"]["results"]
        for strategy in ("round_robin", "least_active"):
            t.append(
                _target(
                    f"D.{strategy}",
                    f"{strategy} pick at 1,000 / at 10 servers",
                    d[strategy]["x_1000_vs_10"],
                    1.5,
                    "<=",
                )
            )
    if "E" in scen:
        e = scen["E"]
        t.append(
            _target(
                "E.failed",
                "requests failed (client retries once; failover could serve)",
                e["requests_failed"],
                0,
                "==",
            )
        )
        t.append(
            _target(
                "E.spread",
                "traffic spread again after the server's return (s)",
                e["spread_after_return_s"],
                round(s.e_recovery + 1.0, 3),
                "<=",
            )
        )
    return t


# -- profiling ---------------------------------------------------------------------


def _profile(address: str, s: Settings) -> str:
    """cProfile of lbpool's hot paths: uncontended cycle (Pool, manager) and handoff."""
    out = io.StringIO()
    n = 20_000 if s.quick else 100_000
    for kind in LBPOOL:
        with peers.make_adapter(kind, address, SIZE, _ACQUIRE_TIMEOUT) as ad:
            loop = _loop0 if ad.arg is None else _loop1
            loop(ad.acquire, ad.arg, ad.release, 100)
            prof = cProfile.Profile()
            prof.enable()
            loop(ad.acquire, ad.arg, ad.release, n)
            prof.disable()
        out.write(f"== {kind}: {n} uncontended acquire+release cycles\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    with peers.make_adapter(POOL, address, SIZE, _ACQUIRE_TIMEOUT) as ad:
        _warm(ad)
        prof = cProfile.Profile()
        prof.enable()
        _contended_round(ad, s.b_greenlets, s.b_seconds, _b_worker)
        prof.disable()
    out.write(f"== {POOL}: contended handoff ({s.b_greenlets} greenlets, max_size {SIZE})\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


# -- output ------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "-"
        if digits == 0:
            return f"{x:,.0f}"
        return f"{x:,.{digits}f}"
    return str(x)


def _tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table printed."""
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    scen = result["scenarios"]
    if "A" in scen:
        rows = [
            [
                k,
                _fmt(v["ns_per_op"]),
                _fmt(v["x_floor"], 1),
                _fmt(v["x_deque"], 1),
                _fmt(v.get("x_sqlalchemy"), 3),
            ]
            for k, v in scen["A"]["results"].items()
        ]
        header = ["impl", "ns/op", "x floor", "x bare deque", "x QueuePool"]
        tables.append(("A  uncontended acquire+release", header, rows))
    for sc, title, rate_key, dist_key, ratio_key in (
        ("B", "B  contended: 500 greenlets, max_size 10", "ops_per_s", "wait_us", "p99_x_floor"),
        ("C", "C  echo 64 B: 50 greenlets, pool of 10", "req_per_s", "latency_us", "max_x_floor"),
    ):
        if sc not in scen:
            continue
        rows = []
        for k, v in scen[sc]["results"].items():
            errors = sum(v["errors"].values())
            rows.append(
                [
                    k,
                    _fmt(v[rate_key]),
                    _fmt(v["x_floor"], 2),
                    _fmt(v[dist_key]["p50"], 1),
                    _fmt(v[dist_key]["p99"], 1),
                    _fmt(v[dist_key]["max"], 1),
                    _fmt(v[ratio_key], 2),
                    str(errors),
                    str(v["starved_greenlets"]),
                ]
            )
        what = "wait" if sc == "B" else "latency"
        tables.append(
            (
                title,
                [
                    "impl",
                    "ops/s" if sc == "B" else "req/s",
                    "x floor",
                    f"{what} p50 us",
                    "p99 us",
                    "max us",
                    "p99 x floor" if sc == "B" else "max x floor",
                    "errors",
                    "starved",
                ],
                rows,
            )
        )
    if "D" in scen:
        rows = [
            [k, _fmt(v["10"]), _fmt(v["100"]), _fmt(v["1000"]), _fmt(v["x_1000_vs_10"], 2)]
            for k, v in scen["D"]["results"].items()
        ]
        tables.append(("D  pick cost, ns", ["strategy", "10", "100", "1,000", "1000/10"], rows))
    if "E" in scen:
        e = scen["E"]
        rows = [[k, json.dumps(v) if isinstance(v, dict) else _fmt(v, 3)] for k, v in e.items()]
        tables.append(("E  failover: 3 servers, one stopped and restarted", ["", "value"], rows))
    obs = result["observations"]
    if obs:
        rows = []
        for k, v in obs.items():
            tmo = v["timeout"]
            tdesc = tmo["kind"]
            if tmo.get("raised"):
                tdesc += f": {tmo['raised']} {tmo['elapsed_s']:.2f}s"
            rows.append(
                [
                    k,
                    f"{v['max_held']}/{v['limit']}",
                    str(v["connections_opened"]),
                    f"{v['overtakes']}/{v['grants']}",
                    f"{v['starved']}/{v['probe_greenlets']}",
                    tdesc,
                    "yes" if v["cooperative_unpatched"] else "no",
                    ", ".join(v["missing"]) or "-",
                ]
            )
        tables.append(
            (
                "Observed behaviour",
                [
                    "impl",
                    "max held",
                    "opened",
                    "overtakes",
                    "starved",
                    "acquire timeout (asked 0.1s)",
                    "coop w/o patching",
                    "missing",
                ],
                rows,
            )
        )
    rows = [
        [t["id"], t["target"], _fmt(t["value"], 3), t["limit"], _met(t["met"])]
        for t in result["targets"]
    ]
    tables.append(("Targets (same-run medians)", ["id", "target", "value", "limit", "met"], rows))
    return tables


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def render_plain(result: dict[str, Any]) -> str:
    out: list[str] = [_header(result)]
    for title, header, rows in _tables(result):
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        out.append("")
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        out.append("  ".join("-" * w for w in widths))
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


_NUMERIC = re.compile(r"^[-+]?[\d.,/]+$|^-$")


def render_markdown(result: dict[str, Any]) -> str:
    """The same tables as GitHub-flavoured Markdown (for docs/benchmarks.md)."""
    out: list[str] = [_header(result)]
    for title, header, rows in _tables(result):
        out += ["", f"**{title.strip()}**", ""]
        out.append("| " + " | ".join(header) + " |")
        numeric = [i > 0 and all(_NUMERIC.match(r[i]) for r in rows) for i in range(len(header))]
        out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def _header(result: dict[str, Any]) -> str:
    m = result["meta"]
    mach = m["machine"]
    st = m["settings"]
    peers_txt = ", ".join(f"{k} {v}" if v else f"{k} (missing)" for k, v in m["peers"].items())
    rounds = f"{st['rounds']} round{'s' if st['rounds'] != 1 else ''}"
    quick = " (quick)" if st["quick"] else ""
    return (
        f"lbpool bench: {rounds}{quick}, "
        f"{m['duration_s']:.1f}s; {mach['cpu']}, {mach['nproc']} CPUs, Python {mach['python']}, "
        f"gevent {mach['gevent']}; peers: {peers_txt}"
    )


def _print_rich(result: dict[str, Any]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the tables to 80
        console = Console(width=170)
    console.print(_header(result))
    for title, header, rows in _tables(result):
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 or h in ("target", "missing") else "right")
        for r in rows:
            table.add_row(*(_colour(c) for c in r))
        console.print(table)
    return True


def _colour(cell: str) -> str:
    if cell == "met":
        return "[green]met[/green]"
    if cell == "NOT met":
        return "[red]NOT met[/red]"
    return cell.replace("[", "\\[")


def write_plot(result: dict[str, Any], path: str) -> None:
    """Latency/wait distributions (CDFs) and throughput per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples: dict[str, dict[str, list[float]]] = result.get("_samples", {})
    scen = result["scenarios"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for col, (sc, rate_key, label) in enumerate(
        (("B", "ops_per_s", "acquire wait"), ("C", "req_per_s", "request latency"))
    ):
        ax = axes[0][col]
        for kind, vals in samples.get(sc, {}).items():
            if not vals:
                continue
            v = sorted(x * 1e6 for x in vals)
            if len(v) > 4000:
                step = len(v) / 4000
                v = [v[int(i * step)] for i in range(4000)] + [v[-1]]
            ys = [(i + 1) / len(v) for i in range(len(v))]
            ax.plot([max(x, 0.1) for x in v], ys, label=kind)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (us, log)")
        ax.set_ylabel("fraction <= x")
        ax.set_title(f"{sc}: {label} distribution (last round)")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
        ax2 = axes[1][col]
        if sc in scen:
            res = scen[sc]["results"]
            names = list(res)
            vals2 = [res[k][rate_key] for k in names]
            bars = ax2.bar(range(len(names)), vals2, color="tab:blue")
            for k, bar in zip(names, bars, strict=True):
                if k in LBPOOL:
                    bar.set_color("tab:orange")
                elif k in (FLOOR, DIAL):
                    bar.set_color("tab:gray")
            for i, k in enumerate(names):
                starved = res[k].get("starved_greenlets", 0)
                if starved:
                    ax2.annotate(
                        f"{starved} never\nserved",
                        (i, vals2[i] or 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="tab:red",
                    )
            ax2.set_xticks(range(len(names)))
            ax2.set_xticklabels(names, rotation=20, fontsize=8)
            ax2.set_ylabel("ops/s" if sc == "B" else "req/s")
            ax2.set_title(f"{sc}: throughput (median of rounds)")
            ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_header(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    """Strict JSON: NaN and infinities (a metric with no data) become null."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# -- entry point -------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lbpool bench",
        description="Benchmark lbpool against a floor and peer pools (gevent, loopback).",
    )
    p.add_argument("--quick", action="store_true", help="a ~15 s run (2 short rounds)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of A,B,C,D,E (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw distributions and throughput")
    p.add_argument("--no-peers", action="store_true", help="skip SQLAlchemy and other peers")
    p.add_argument("--profile", action="store_true", help="add cProfile listings of hot paths")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    base = QUICK if ns.quick else Settings()
    wanted = tuple(x.strip().upper() for x in ns.scenarios.split(",") if x.strip())
    bad = [x for x in wanted if x not in SCENARIOS]
    if bad or not wanted:
        raise ValueError(
            f"--scenarios: unknown {', '.join(bad) or '(none)'}; choose from A,B,C,D,E"
        )
    rounds = base.rounds if ns.rounds is None else ns.rounds
    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    return replace(
        base,
        rounds=rounds,
        scenarios=tuple(x for x in SCENARIOS if x in wanted),
        peers=not ns.no_peers,
        profile=ns.profile,
    )


def main(argv: list[str] | None = None) -> int:
    """``lbpool bench [--quick] [--rounds N] [--scenarios A,B] [--json] [--plot F.png]``."""
    try:
        ns = _parse(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        settings = settings_from_args(ns)
    except ValueError as exc:
        print(f"lbpool bench: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["lbpool bench", *(sys.argv[1:] if argv is None else argv)])
    result = run(settings, verbose=not ns.quiet and not ns.json, command=command)
    if ns.plot:
        write_plot(result, ns.plot)
    public = _jsonable({k: v for k, v in result.items() if not k.startswith("_")})
    if ns.json:
        sys.stdout.write(json.dumps(public, indent=2, allow_nan=False) + "\n")
    elif ns.markdown:
        print(render_markdown(public))
    else:
        if not _print_rich(public):
            print(render_plain(public))
        if "profile" in public:
            print(public["profile"])
        if ns.plot:
            print(f"plot written to {ns.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
