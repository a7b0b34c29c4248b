"""Snapshots at scale: ``Pool.stats`` made without the dataclass ``__init__`` is the same
value, ``to_dict`` is what ``dataclasses.asdict`` gave, and stats / to_dict / a
Prometheus collect at 1,000 servers keep the hub running (a ticker greenlet's longest
gap; the real numbers are measured by ``lbpool bench --scenarios S``)."""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from lbpool import Backend, LbpoolError, Pool, PoolManager, PoolTimeout
from lbpool._snapshot import RAW_FIELDS as _RAW_FIELDS
from lbpool.breaker import Breaker
from lbpool.config import BreakerConfig, HealthCheckConfig, PoolConfig
from lbpool.stats import (
    _SERVER_FIELDS,
    CLOSE_REASONS,
    WAIT_BUCKETS,
    ServerStats,
    _server_stats_from_raw,
)
from lbpool.testing import EchoServer, recv_exact
from tests.support.leaks import settle
from tests.support.net import dead_address, listening_addresses

SERVERS = 1000


def old_to_dict(s: ServerStats) -> dict[str, Any]:
    """What ServerStats.to_dict returned before (dataclasses.asdict)."""
    data = dataclasses.asdict(s)
    data["closed"] = dict(s.closed)
    data["wait_buckets"] = {str(le): n for le, n in s.wait_buckets.items()}
    return data


def one_config_each(
    manager: PoolManager,
    configs: list[list[str]],
    config: Callable[[list[str]], dict[str, Any]],
    membership: Callable[[], set[str]],
    count: int,
) -> int:
    """Reload through ``configs`` over and over while taking ``membership()`` up to
    ``count`` times (20 s at most): each must be exactly one config's servers. Returns
    how many were taken; the reloading greenlet has ended."""
    stop = False

    def reloader() -> None:
        i = 0
        while not stop:
            i += 1
            manager.reload(config(configs[i % len(configs)]))
            gevent.sleep(0.001)

    g = gevent.spawn(reloader)
    allowed = [set(c) for c in configs]
    seen = 0
    try:
        deadline = time.monotonic() + 20
        while seen < count and time.monotonic() < deadline:
            servers = membership()
            assert servers in allowed, f"a mix of memberships: {sorted(servers)}"
            seen += 1
    finally:
        stop = True
        g.get(timeout=10)
    return seen


def test_pool_stats_is_a_plain_server_stats(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer
) -> None:
    config = {"backends": {"one": {"servers": [echo_server.address], "pool": {"max_size": 1}}}}
    manager = make_manager(config)
    conn = manager.acquire("one")
    waiter = gevent.spawn(manager.acquire, "one", 5.0)
    gevent.sleep(0.01)
    conn.sendall(b"x")
    assert recv_exact(conn, 1) == b"x"
    conn.release()
    waiter.get(timeout=5).discard(ValueError("done"))
    s = manager.stats().backends["one"].servers[echo_server.address]
    assert type(s) is ServerStats
    assert tuple(vars(s)) == _SERVER_FIELDS  # every field, in declaration order
    again = ServerStats(**vars(s))  # the dataclass __init__ makes the same value
    assert again == s and repr(again) == repr(s)
    assert s.to_dict() == old_to_dict(s) == again.to_dict()
    assert list(s.to_dict()) == list(old_to_dict(s))
    assert s.wait_count == 2 and s.waits == 1 and s.size == s.idle + s.in_use + s.pending
    assert dataclasses.replace(s, owner_hits=3).owner_hits == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.size = 5  # type: ignore[misc]


def test_a_breaker_whose_wait_elapsed_is_half_open_in_every_capture(no_fd_leak: None) -> None:
    """An open breaker turns half-open when its wait elapses, with no call in between:
    ``stats()``, the raw capture (the collector's) and what a snapshot makes of it
    all say so at once."""
    now = [1000.0]
    breaker = Breaker(
        "b", BreakerConfig(failure_threshold=1, recovery_timeout=5), clock=lambda: now[0]
    )
    with EchoServer() as server:
        address = server.address
    pool = Pool(address, pool=PoolConfig(min_idle=0), breaker=breaker, upkeep=False)
    try:
        with pytest.raises(LbpoolError):
            pool.acquire(timeout=2)  # nothing listens there now: the breaker opens
        states = lambda: (  # noqa: E731
            pool.stats().breaker_state,
            pool._raw()[_RAW_FIELDS.index("breaker_state")],
            _server_stats_from_raw(pool._raw()).to_dict()["breaker_state"],
        )
        assert states() == ("open",) * 3
        now[0] += 5.01
        assert states() == ("half_open",) * 3
    finally:
        pool.close()


@pytest.fixture
def fleet() -> Iterator[list[str]]:
    """1,000 listening loopback sockets (min_idle 0: nothing dials them)."""
    with listening_addresses(SERVERS) as addresses:
        yield addresses


def longest_gap(work: Callable[[], object]) -> float:
    """Run ``work`` in a greenlet; the longest the hub let a ticker greenlet wait."""
    gaps = [0.0]
    stop = False

    def tick() -> None:
        last = time.perf_counter()
        while not stop:
            gevent.sleep(0)
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    # a full collection of the test process's heap is CPython's pause, not lbpool's
    # hold (it can pass 200 ms in a worker that ran hundreds of tests): kept out
    gc.collect()
    gc.disable()
    try:
        ticker = gevent.spawn(tick)
        gevent.sleep(0)
        gevent.spawn(work).get(timeout=60)
        stop = True
        ticker.get(timeout=5)
    finally:
        gc.enable()
    return gaps[0]


def test_snapshots_at_1000_servers_keep_the_hub_running(
    make_manager: Callable[..., PoolManager], fleet: list[str]
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    import lbpool.metrics

    backends = {f"b{i}": {"servers": fleet[i * 100 : (i + 1) * 100]} for i in range(10)}
    manager = make_manager({"defaults": {"pool": {"min_idle": 0}}, "backends": backends})
    registry = prometheus_client.CollectorRegistry()
    collector = lbpool.metrics.register(manager, registry)
    stats = manager.stats()
    assert len(stats.servers()) == SERVERS
    assert all(s.size == s.idle + s.in_use + s.pending for s in stats.servers())
    # generous: CI is loaded; the bench reports the real numbers (a few ms)
    assert longest_gap(manager.stats) < 0.2
    assert longest_gap(stats.to_dict) < 0.2
    families: list[Any] = []  # the samples made, as prometheus_client's exposition reads them
    assert longest_gap(lambda: families.extend((f, f.samples) for f in collector.collect())) < 0.2
    sizes = next(samples for f, samples in families if f.name == "lbpool_size")
    assert len(sizes) == SERVERS
    text: list[bytes] = []  # lbpool's exposition: the lines written from the columns
    assert longest_gap(lambda: text.append(lbpool.metrics.generate_latest(registry))) < 0.2
    assert text[0].count(b"\nlbpool_size{") == SERVERS


def turns_during(work: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``work`` in a greenlet: how many turns a ticker greenlet got meanwhile, and
    what ``work`` returned."""
    turns = [0]
    stop = False

    def tick() -> None:
        while not stop:
            gevent.sleep(0)
            turns[0] += 1

    ticker = gevent.spawn(tick)
    gevent.sleep(0)
    before = turns[0]
    try:
        value = gevent.spawn(work).get(timeout=30)
    finally:
        stop = True
        ticker.get(timeout=5)
    return turns[0] - before, value


@pytest.fixture
def sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fleet is "big" and every server ends a slice: each snapshot pauses at
    every server, so a test sees slicing whatever the machine's speed."""
    import lbpool.stats

    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_POOLS", 2)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_SECONDS", 0.0)


def test_a_big_snapshot_lets_other_greenlets_run(
    make_manager: Callable[..., PoolManager], fleet: list[str], sliced: None
) -> None:
    """Taken from a greenlet, a big fleet's snapshot yields between servers (a ticker
    gets turns while it is taken); each server's numbers still agree."""
    manager = make_manager(
        {"defaults": {"pool": {"min_idle": 0}}, "backends": {"b": {"servers": fleet[:50]}}}
    )
    during, stats = turns_during(manager.stats)
    assert during >= 10, during  # one pause per server: the ticker ran between them
    assert len(stats.servers()) == 50
    assert all(s.size == s.idle + s.in_use + s.pending for s in stats.servers())
    # from the hub itself (a callback) it cannot yield: one go, the same servers
    done = gevent.event.AsyncResult()
    gevent.get_hub().loop.run_callback(lambda: done.set(manager.stats()))
    assert set(done.get(timeout=5).backends["b"].servers) == set(fleet[:50])


def test_a_sliced_snapshot_never_mixes_two_memberships(
    make_manager: Callable[..., PoolManager], fleet: list[str], sliced: None
) -> None:
    """Reloads land while snapshots pause: every snapshot's servers are exactly one
    applied config's (a snapshot whose membership changed in a pause starts over)."""
    import lbpool.manager

    configs = [fleet[0:20], fleet[20:40], fleet[0:40], fleet[10:30]]

    def config(servers: list[str]) -> dict[str, Any]:
        return {"defaults": {"pool": {"min_idle": 0}}, "backends": {"b": {"servers": servers}}}

    manager = make_manager(config(configs[0]))
    restarts = [0]
    real = lbpool.manager.PoolManager._stats_in_slices

    def counted(self: PoolManager, pause: Any) -> Any:
        snapshot = real(self, pause)
        restarts[0] += snapshot is None
        return snapshot

    lbpool.manager.PoolManager._stats_in_slices = counted  # type: ignore[method-assign]
    try:
        seen = one_config_each(
            manager, configs, config, lambda: set(manager.stats().backends["b"].servers), 60
        )
    finally:
        lbpool.manager.PoolManager._stats_in_slices = real  # type: ignore[method-assign]
    assert seen >= 10
    assert restarts[0] >= 1  # the reloads did land inside snapshots


def test_a_big_to_dict_lets_other_greenlets_run_and_gives_the_same_data(
    make_manager: Callable[..., PoolManager], fleet: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbpool.stats

    manager = make_manager(
        {"defaults": {"pool": {"min_idle": 0}}, "backends": {"b": {"servers": fleet[:50]}}}
    )
    stats = manager.stats()
    whole = stats.to_dict()  # 50 servers: one go
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_POOLS", 2)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_SECONDS", 0.0)
    during, sliced = turns_during(stats.to_dict)
    assert during >= 10, during
    assert sliced == whole


def test_a_sliced_snapshot_reads_each_servers_key_affinity_hits_with_its_numbers(
    make_manager: Callable[..., PoolManager], fleet: list[str], sliced: None
) -> None:
    """Key-affinity traffic runs while a snapshot pauses at every server: each server's
    owner and fallback hits are read in the same step as its other numbers, so they
    never count acquisitions its ``acquired`` does not (``stats()`` and the
    collector's snapshot alike)."""
    manager = make_manager(
        {
            "defaults": {"pool": {"min_idle": 0}},
            "backends": {"kv": {"servers": fleet[:60], "strategy": "maglev"}},
        }
    )
    manager.wait_ready(10)
    stop = False
    served = [0]

    def traffic() -> None:
        while not stop and served[0] < 100_000:
            served[0] += 1
            manager.get("kv", key=f"k{served[0]}", timeout=5).release()
            gevent.sleep(0)

    worker = gevent.spawn(traffic)
    try:
        assert settle(lambda: served[0] >= 100, 10)
        at_start = served[0]
        during, stats = turns_during(manager.stats)
        assert during >= 10 and served[0] > at_start  # traffic in its pauses
        at_start = served[0]
        during, raw = turns_during(manager._raw_snapshot)
        assert during >= 10 and served[0] > at_start
    finally:
        stop = True
        worker.get(timeout=10)
    servers = stats.backends["kv"].servers.values()
    assert sum(s.owner_hits + s.fallback_hits for s in servers) > 0
    over = [s for s in servers if s.owner_hits + s.fallback_hits > s.acquired]
    assert not over, [(s.address, s.owner_hits, s.fallback_hits, s.acquired) for s in over]
    _, raws, hits = raw["kv"]
    acquired = {r[0]: r[_RAW_FIELDS.index("hits")] + r[_RAW_FIELDS.index("misses")] for r in raws}
    assert hits and all(sum(hits[a]) <= acquired[a] for a in hits), (hits, acquired)


def test_a_backends_own_stats_from_another_thread_are_taken_by_the_managers_hub(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``manager.backends[name].stats()`` from another OS thread, while the manager's
    thread runs key-affinity traffic: taken by the manager's own hub (as
    ``PoolManager.stats()`` is), so every server's numbers agree."""
    addresses = [echo_server_factory().address for _ in range(3)]
    manager = make_manager(
        {
            "defaults": {"pool": {"min_idle": 0, "max_size": 4}},
            "backends": {"kv": {"servers": addresses, "strategy": "maglev"}},
        }
    )
    manager.wait_ready(10)
    takers: list[int] = []
    take = Backend._take

    def spied(self: Backend, *args: Any) -> Any:
        takers.append(threading.get_ident())
        return take(self, *args)

    monkeypatch.setattr(Backend, "_take", spied)
    stop = False
    served = [0]

    def traffic(i: int) -> None:
        while not stop and served[0] < 200_000:
            with manager.get("kv", key=f"k{i}-{served[0]}", timeout=5):
                served[0] += 1
                gevent.sleep(0)

    workers = [gevent.spawn(traffic, i) for i in range(10)]
    taken: list[Any] = []

    def reader() -> None:
        taken.extend(manager.backends["kv"].stats() for _ in range(100))

    thread = threading.Thread(target=reader)
    at_start = served[0]
    thread.start()
    try:
        assert settle(lambda: not thread.is_alive(), 30)
    finally:
        stop = True
        gevent.joinall(workers, timeout=10)
        thread.join(10)
    assert len(taken) == 100 and served[0] > at_start
    assert set(takers) == {threading.get_ident()}  # the manager's thread took them all
    for stats in taken:
        for s in stats.servers.values():
            assert s.size == s.idle + s.in_use + s.pending, s
            assert s.owner_hits + s.fallback_hits <= s.acquired, s


def test_a_breaker_listener_taking_a_big_snapshot_does_not_yield(
    make_manager: Callable[..., PoolManager], fleet: list[str], sliced: None
) -> None:
    """A listener runs inside a pool's step (here a failed dial's), which must not
    yield: a snapshot it takes is taken in one go, however big the fleet."""
    refused = dead_address()  # a port nothing listens on: the dial is refused
    manager = make_manager(
        {
            "defaults": {"pool": {"min_idle": 0}, "breaker": {"failure_threshold": 1}},
            "backends": {"b": {"servers": fleet[:39]}, "down": {"servers": [refused]}},
        }
    )
    other_ran: list[bool] = []
    seen: list[tuple[bool, int]] = []

    def listener(backend: str, server: str, old: str, new: str) -> None:
        other = gevent.spawn(other_ran.append, True)  # runs only if the listener yields
        snapshot = manager.stats()
        seen.append((bool(other_ran), len(snapshot.servers())))
        other.join(timeout=5)

    manager.add_breaker_listener(listener)
    with pytest.raises(LbpoolError):
        manager.acquire("down", timeout=5)
    assert seen and seen[0] == (False, 40), seen


# -- the raw capture (Pool._raw) that ServerStats and the collector are made from ----


def read_off(pool: Pool) -> dict[str, Any]:
    """A pool's numbers read straight off its attributes, as ``Pool.stats`` read them
    before the raw capture: what ``_server_stats_from_raw(pool._raw())`` must equal."""
    acquired = pool._hits + pool._misses
    observed = acquired - pool._waits_served
    cumulative = list(itertools.accumulate(pool._wait_counts, initial=observed))
    return {
        "address": pool.name,
        "backend": pool.backend,
        "size": pool._size,
        "idle": len(pool._idle),
        "in_use": len(pool._busy) + pool._handed,
        "pending": pool._pending + pool._held,
        "waiting": len(pool._waiters),
        "acquired": acquired,
        "hits": pool._hits,
        "misses": pool._misses,
        "timeouts": pool._timeouts,
        "shed": pool._shed,
        "dial_failures": pool._dial_failures,
        "closed": dict(pool._closed_by),
        "wait_time_total": pool._wait_total,
        "wait_time_max": pool._wait_max,
        "breaker_state": pool.breaker.state,
        "breaker_trips": pool.breaker.trips,
        "max_size": pool.config.max_size,
        "draining": pool._closing,
        "wait_count": cumulative[-1],
        "wait_buckets": dict(zip(WAIT_BUCKETS, cumulative[1:-1], strict=True)),
        "owner_hits": 0,
        "fallback_hits": 0,
        "max_in_use": max(pool._demand.seen, pool._peak),
        "waits": pool._waits,
        "released": pool._released,
    }


def check_capture(pool: Pool) -> ServerStats:
    """The raw capture, the ServerStats made from it and the attributes agree (no
    yield between the reads); the capture owns its copies."""
    raw = pool._raw()
    expected = read_off(pool)
    assert len(raw) == len(_RAW_FIELDS)
    assert raw[_RAW_FIELDS.index("closed")] is not pool._closed_by
    assert tuple(raw[_RAW_FIELDS.index("closed")]) == CLOSE_REASONS  # the collector's order
    s = _server_stats_from_raw(raw)
    assert vars(s) == expected and tuple(vars(s)) == _SERVER_FIELDS
    assert s == pool.stats() == ServerStats(**expected)
    assert s.to_dict() == old_to_dict(s)
    assert s.size == s.idle + s.in_use + s.pending, s
    return s


def test_the_raw_capture_agrees_with_server_stats_mid_borrow_mid_check_with_waiters(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    gate = gevent.event.Event()
    entered = gevent.event.Event()

    def blocking_check(sock: object) -> None:
        entered.set()
        gate.wait(10)

    pool = Pool(
        echo_server.address,
        pool=PoolConfig(min_idle=0, max_size=2, check_after=0),
        health_check=HealthCheckConfig(timeout=10).model_copy(update={"hook": blocking_check}),
        upkeep=False,
    )
    try:
        check_capture(pool)  # fresh: nothing counted, the histogram all zeros
        a = pool.acquire()
        b = pool.acquire()
        b.release()
        s = check_capture(pool)  # mid-borrow: one in use, one idle, nothing queued
        assert (s.in_use, s.idle, s.wait_count, s.waits) == (1, 1, 2, 0)
        checked = gevent.spawn(pool.acquire, 30)  # takes b: its borrow check blocks
        assert entered.wait(5)
        waiter = gevent.spawn(pool.acquire, 30)  # both slots taken: queues
        assert settle(lambda: len(pool._waiters) == 1, 5)
        s = check_capture(pool)  # mid-check (pending) with a waiter
        assert (s.size, s.in_use, s.pending, s.waiting, s.waits) == (2, 1, 1, 1, 1)
        gate.set()
        c = checked.get(timeout=5)
        a.release()  # handed to the waiter
        d = waiter.get(timeout=5)
        s = check_capture(pool)  # one wait served: the cumulative histogram
        assert (s.in_use, s.waits, s.wait_count) == (2, 1, 4)
        assert list(s.wait_buckets.values())[-1] == 4  # every wait under 10 s
        with pytest.raises(PoolTimeout):  # a wait that times out: counted, not served
            pool.acquire(timeout=0.01)
        c.discard(ValueError("done"))
        d.release()
        s = check_capture(pool)
        assert (s.timeouts, s.waits, s.size, s.idle) == (1, 2, 1, 1)
        assert sum(s.closed.values()) == 1 and s.wait_count == 5
    finally:
        gate.set()
        pool.close()


def test_a_raw_snapshot_is_one_membership_and_sliced(
    make_manager: Callable[..., PoolManager], fleet: list[str], sliced: None
) -> None:
    """The collector's snapshot (``_raw_snapshot``) is taken as ``stats()`` is: in
    slices that let other greenlets run, each of one applied config's servers, with
    each backend's numbers; reloads landing in its pauses never mix two."""
    configs = [fleet[0:20], fleet[20:40], fleet[0:40], fleet[10:30]]

    def config(servers: list[str]) -> dict[str, Any]:
        return {"defaults": {"pool": {"min_idle": 0}}, "backends": {"b": {"servers": servers}}}

    manager = make_manager(config(configs[2]))
    during, raw = turns_during(manager._raw_snapshot)
    assert during >= 10, during
    backend, raws, hits = raw["b"]
    assert [r[0] for r in raws] == configs[2] and hits == {}
    assert backend == dataclasses.replace(manager.stats().backends["b"], servers={})
    seen = one_config_each(
        manager, configs, config, lambda: {r[0] for r in manager._raw_snapshot()["b"][1]}, 40
    )
    assert seen >= 10


def test_an_in_hub_collect_pauses_between_slices_and_exports_the_same(
    make_manager: Callable[..., PoolManager],
    fleet: list[str],
    sliced: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scrape in the manager's own thread makes its samples in slices with timed
    pauses between them (``Pacer``: timers and I/O run too, not only ready
    greenlets); what it exports is what an unpaused collect exports."""
    pytest.importorskip("prometheus_client")
    import lbpool.metrics
    import lbpool.stats

    manager = make_manager(
        {"defaults": {"pool": {"min_idle": 0}}, "backends": {"b": {"servers": fleet[:50]}}}
    )
    collector = lbpool.metrics.LbpoolCollector(manager)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_POOLS", 1000)  # the snapshot: one go
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", 5)
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SECONDS", 0.0)
    timer_fired = gevent.event.Event()
    timer = gevent.get_hub().loop.timer(0.0)
    timer.start(timer_fired.set)  # fires only in a full turn of the hub's loop
    try:
        during, paused = turns_during(lambda: list(collector.collect()))
    finally:
        timer.close()
    assert during >= 10, during
    assert timer_fired.is_set()
    monkeypatch.setattr(lbpool.metrics.LbpoolCollector, "_may_yield", lambda self: False)
    whole = list(collector.collect())
    assert [(f.name, f.samples) for f in paused] == [(f.name, f.samples) for f in whole]


def _by_hand(buckets: Any) -> ServerStats:
    fields = {f: 0 for f in _SERVER_FIELDS}
    fields.update(address="h:1", backend=None, breaker_state="closed", draining=False)
    fields.update(closed=dict.fromkeys(CLOSE_REASONS, 1), wait_time_total=0.0)
    fields.update(wait_time_max=0.0, wait_buckets=buckets)
    return ServerStats(**fields)


@pytest.mark.parametrize(
    "buckets",
    [
        dict(zip(WAIT_BUCKETS, range(13), strict=True)),  # the pool's keys, in order
        {float(str(le)): i for i, le in enumerate(WAIT_BUCKETS)},  # equal, not the same
        dict(zip(reversed(WAIT_BUCKETS), range(13), strict=True)),  # another order
        {**dict(zip(WAIT_BUCKETS[:12], range(12), strict=True)), 20.0: 12},  # another key
        dict(zip(WAIT_BUCKETS[:3], range(3), strict=True)),  # fewer
        types.MappingProxyType(dict(zip(WAIT_BUCKETS, range(13), strict=True))),  # a Mapping
        {},
        {1: 5, 10: 7},  # ints equal to buckets: named as the buckets
        {int(le) if le == int(le) else le: i for i, le in enumerate(WAIT_BUCKETS)},
        collections.OrderedDict(zip(WAIT_BUCKETS, range(13), strict=True)),
        {True: 1, "x": 2},
    ],
    ids=[
        "pool's",
        "equal keys",
        "reversed",
        "other key",
        "fewer",
        "mapping proxy",
        "empty",
        "ints",
        "all, some ints",
        "OrderedDict",
        "odd keys",
    ],
)
def test_to_dict_of_a_server_stats_made_by_hand(buckets: Any) -> None:
    """``to_dict`` keys any histogram by ``str(le)`` of the bucket it equals (``1`` is
    ``"1.0"``), else by ``str(key)``, in its own order, and hands out fresh dicts:
    changing them changes neither the stats nor the next ``to_dict``."""
    s = _by_hand(buckets)
    data = s.to_dict()
    named = {le: str(le) for le in WAIT_BUCKETS}
    keyed = [(named.get(le, str(le)), n) for le, n in buckets.items()]
    expected = {**vars(s), "closed": dict(s.closed), "wait_buckets": dict(keyed)}
    assert data == expected  # (not old_to_dict: asdict cannot copy a mapping proxy)
    assert list(data["wait_buckets"].items()) == keyed
    assert list(data) == list(_SERVER_FIELDS)
    data["wait_buckets"]["0.001"] = -1
    data["closed"]["idle"] = -1
    assert s.to_dict() == expected and s.closed["idle"] == 1
    assert s.wait_buckets is buckets


@dataclasses.dataclass(frozen=True, slots=True)
class _SlottedStats(ServerStats):
    note: str = ""


def test_to_dict_of_a_server_stats_subclass_has_every_field() -> None:
    fields = vars(_by_hand(dict.fromkeys(WAIT_BUCKETS, 1)))
    s = _SlottedStats(**fields, note="mine")
    data = s.to_dict()
    assert list(data) == [*_SERVER_FIELDS, "note"] and data["note"] == "mine"
    assert data["wait_buckets"] == {str(le): 1 for le in WAIT_BUCKETS}
    assert data["closed"] == dict(s.closed) and data["closed"] is not s.closed
