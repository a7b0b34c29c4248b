"""Key-affinity routing through the manager (maglev, ring_hash, rendezvous) on loopback.

Placement itself (reference compatibility, balance, disruption) is tested in
test_hashing.py; here: that acquisitions go where the table says, fall back in the
key's own order when the owner cannot serve, count, and survive reloads and rebuilds.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from time import monotonic, thread_time
from typing import Any

import gevent
import pytest
from gevent.event import Event

from lbpool import BackendUnavailable, PoolManager
from lbpool.config import parse_config
from lbpool.hashing import build_table
from lbpool.testing import EchoServer, recv_exact
from tests.support.gctime import GCTime
from tests.support.leaks import settle
from tests.support.net import dead_address

STRATEGIES = ["maglev", "ring_hash", "rendezvous"]
KEYS = [f"user:{i}" for i in range(300)]


def config(
    addresses: list[str], strategy: str = "maglev", **sections: dict[str, Any]
) -> dict[str, Any]:
    backend: dict[str, Any] = {
        "strategy": strategy,
        "servers": addresses,
        "pool": {"min_idle": 0, "max_size": 4, "acquire_timeout": 2, "check_after": 0},
        "breaker": {"failure_threshold": 1, "recovery_timeout": 60},
    }
    for name, section in sections.items():
        backend[name] = {**backend.get(name, {}), **section}
    return {"backends": {"kv": backend}}


def served(manager: PoolManager, key: str | bytes, timeout: float = 2) -> tuple[str, int]:
    """One round trip for ``key``: (who served it, its rank)."""
    with manager.get("kv", timeout=timeout, key=key) as conn:
        conn.sendall(b"ping")
        assert recv_exact(conn, 4) == b"ping"
        return conn.address, conn.rank


def fallbacks(strategy: str, addresses: list[str], keys: list[str]) -> dict[str, str]:
    """Each key's second server in its own order (its first fallback)."""
    table = build_table(strategy, [(a, 1) for a in addresses])
    out = {}
    for key in keys:
        order = table.order(key)
        next(order)
        out[key] = addresses[next(order)]
    return out


def built(manager: PoolManager, name: str = "kv") -> None:
    placement = manager.backends[name]._placement
    assert placement is not None
    assert placement.wait_built(10)


@pytest.fixture
def echo_fleet(
    echo_server_factory: Callable[..., EchoServer],
) -> Callable[[int], list[EchoServer]]:
    def make(n: int) -> list[EchoServer]:
        return [echo_server_factory() for _ in range(n)]

    return make


@pytest.fixture
def manager_of(make_manager: Callable[..., PoolManager]) -> Iterator[Callable[..., PoolManager]]:
    def make(addresses: list[str], strategy: str = "maglev", **sections: Any) -> PoolManager:
        manager = make_manager(config(addresses, strategy, **sections))
        built(manager)
        return manager

    yield make


# ------------------------------------------------------------------------ routing


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_routes_every_key_to_its_owner(
    echo_fleet: Callable[[int], list[EchoServer]],
    manager_of: Callable[..., PoolManager],
    strategy: str,
) -> None:
    addresses = [s.address for s in echo_fleet(5)]
    manager = manager_of(addresses, strategy)
    table = build_table(strategy, [(a, 1) for a in addresses])
    seen = set()
    for key in KEYS:
        owner = addresses[table.owner(key)]
        assert manager.owner("kv", key) == owner
        assert served(manager, key) == (owner, 0)
        assert served(manager, key.encode()) == (owner, 0)  # str is its UTF-8 bytes
        seen.add(owner)
    assert seen == set(addresses)
    stats = manager.stats().backends["kv"]
    assert stats.strategy == strategy
    assert sum(s.owner_hits for s in stats.servers.values()) == 2 * len(KEYS)
    assert sum(s.fallback_hits for s in stats.servers.values()) == 0


def test_a_hashing_backend_needs_a_key(
    echo_fleet: Callable[[int], list[EchoServer]], manager_of: Callable[..., PoolManager]
) -> None:
    manager = manager_of([s.address for s in echo_fleet(2)], "ring_hash")
    with pytest.raises(ValueError, match=r"backend 'kv' routes by key \(ring_hash\)"):
        manager.get("kv")
    with pytest.raises(ValueError, match="'kv'"):
        manager.acquire("kv", timeout=1)
    assert all(s.acquired == 0 for s in manager.stats().backends["kv"].servers.values())


def test_other_strategies_ignore_a_key(
    echo_server: EchoServer, make_manager: Callable[..., PoolManager]
) -> None:
    manager = make_manager(config([echo_server.address], "least_active"))
    with manager.get("kv", key="user:1") as conn:
        assert conn.rank == 0
    with manager.get(echo_server.address, key=b"x") as conn:  # ad hoc: round_robin
        assert conn.rank == 0 and conn.backend is None
    with pytest.raises(ValueError, match="does not route by key"):
        manager.owner("kv", "user:1")


@pytest.mark.parametrize("bad", [42, 1.5, None, bytearray(b"k"), ["k"]])
def test_a_key_of_the_wrong_type_is_refused_before_anything_changes(
    echo_server: EchoServer, manager_of: Callable[..., PoolManager], bad: Any
) -> None:
    manager = manager_of([echo_server.address], "rendezvous")
    if bad is not None:
        for call in (manager.get, manager.acquire):
            with pytest.raises(TypeError, match="key must be str or bytes"):
                call("kv", key=bad)
            with pytest.raises(TypeError, match="key must be str or bytes"):
                call("127.0.0.1:1", key=bad)  # would make an ad-hoc pool
    with pytest.raises(TypeError, match="key must be str or bytes"):
        manager.owner("kv", bad)
    assert "" not in manager.stats().backends  # no ad-hoc pool was made
    assert manager.stats().backends["kv"].servers[echo_server.address].acquired == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_key_without_utf8_is_a_value_error_before_anything_changes(
    echo_server: EchoServer, manager_of: Callable[..., PoolManager], strategy: str
) -> None:
    """A lone surrogate from untrusted JSON: ValueError naming ``key`` (its type is
    right, its value has no UTF-8), raised before an ad-hoc pool is made or a wait
    begins; maglev used to crash the process (mmh3 given the str)."""
    manager = manager_of([echo_server.address], strategy)
    key = json.loads('{"user": "\\ud800"}')["user"]
    for call in (manager.get, manager.acquire):
        with pytest.raises(ValueError, match="key must be encodable as UTF-8"):
            call("kv", key=key)
        with pytest.raises(ValueError, match="key must be encodable as UTF-8"):
            call("127.0.0.1:1", key=key)  # would make an ad-hoc pool
    with pytest.raises(ValueError, match="key must be encodable as UTF-8"):
        manager.owner("kv", key)
    assert "" not in manager.stats().backends
    assert manager.stats().backends["kv"].servers[echo_server.address].acquired == 0
    assert served(manager, "user:\u00e9")[1] == 0  # other non-ASCII keys still work


# ----------------------------------------------------------------------- fallback


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_open_breaker_moves_only_its_keys_and_they_come_back(
    echo_fleet: Callable[[int], list[EchoServer]],
    manager_of: Callable[..., PoolManager],
    strategy: str,
) -> None:
    fleet = echo_fleet(10)
    addresses = [s.address for s in fleet]
    # a trial while it is still down fails (and that key still falls back): cap the wait
    manager = manager_of(
        addresses, strategy, breaker={"recovery_timeout": 0.2, "max_recovery_timeout": 0.4}
    )
    second = fallbacks(strategy, addresses, KEYS)
    changes: dict[str, Event] = {"open": Event(), "closed": Event()}
    manager.add_breaker_listener(
        lambda _b, _a, _old, new: changes[new].set() if new in changes else None
    )
    owners = {key: manager.owner("kv", key) for key in KEYS}
    for key in KEYS:
        assert served(manager, key) == (owners[key], 0)
    victim = fleet[3]
    victim.stop()
    theirs = [k for k in KEYS if owners[k] == victim.address]
    assert theirs
    # the first of its keys finds it down: the dial fails, its breaker opens, rank 1 serves
    assert served(manager, theirs[0]) == (second[theirs[0]], 1)
    assert changes["open"].is_set()
    for key in KEYS:
        want = (second[key], 1) if key in theirs else (owners[key], 0)
        assert served(manager, key) == want, key
        assert manager.owner("kv", key) == owners[key]  # placement ignores breakers
    victim.restart()
    breaker = manager.backends["kv"].pools[3].breaker
    gevent.sleep(breaker.retry_in())  # the recovery timeout, then one trial closes it
    assert served(manager, theirs[0]) == (victim.address, 0)
    assert changes["closed"].wait(2)
    for key in KEYS:
        assert served(manager, key) == (owners[key], 0)
    stats = manager.stats().backends["kv"].servers
    assert sum(s.fallback_hits for s in stats.values()) == len(theirs) + 1
    assert stats[victim.address].fallback_hits == 0
    assert stats[victim.address].owner_hits == 2 * len(theirs) + 1  # before, trial, after


def test_hash_fallback_none_raises_naming_the_owner(
    echo_fleet: Callable[[int], list[EchoServer]], manager_of: Callable[..., PoolManager]
) -> None:
    live = [s.address for s in echo_fleet(2)]
    dead = dead_address()
    manager = manager_of([*live, dead], "maglev", balance={"hash_fallback": "none"})
    key = next(k for k in KEYS if manager.owner("kv", k) == dead)
    with pytest.raises(BackendUnavailable) as info:
        manager.get("kv", key=key)
    text = str(info.value)
    assert dead in text and "hash_fallback: none" in text and "refused" in text.lower()
    assert list(info.value.errors) == [dead]
    # now its breaker is open: the message says so
    with pytest.raises(BackendUnavailable, match=rf"{dead} \[open, retry in"):
        manager.get("kv", key=key)
    other = next(k for k in KEYS if manager.owner("kv", k) != dead)
    assert served(manager, other)[1] == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failed_dial_falls_back_within_the_deadline(
    echo_fleet: Callable[[int], list[EchoServer]],
    manager_of: Callable[..., PoolManager],
    strategy: str,
) -> None:
    live = [s.address for s in echo_fleet(3)]
    dead = dead_address()
    addresses = [*live, dead]
    manager = manager_of(addresses, strategy, breaker={"failure_threshold": 5})
    theirs = [k for k in KEYS if manager.owner("kv", k) == dead][:3]
    assert theirs
    second = fallbacks(strategy, addresses, theirs)
    for key in theirs:
        started = monotonic()
        assert served(manager, key, timeout=1) == (second[key], 1)
        assert monotonic() - started < 1
    stats = manager.stats().backends["kv"].servers[dead]
    assert stats.dial_failures == len(theirs)  # one dial per acquisition, not more
    assert stats.breaker_state == "closed"


def test_every_server_down_is_backend_unavailable(
    manager_of: Callable[..., PoolManager],
) -> None:
    dead = [dead_address(), dead_address()]
    manager = manager_of(dead, "rendezvous", breaker={"failure_threshold": 5})
    with pytest.raises(BackendUnavailable) as info:
        manager.get("kv", key="k", timeout=1)
    assert set(info.value.errors) == set(dead)


# ------------------------------------------------------------------------ reloads


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_reload_removing_the_owner_moves_only_its_keys(
    echo_fleet: Callable[[int], list[EchoServer]],
    manager_of: Callable[..., PoolManager],
    strategy: str,
) -> None:
    fleet = echo_fleet(5)
    addresses = [s.address for s in fleet]
    manager = manager_of(addresses, strategy)
    owners = {key: manager.owner("kv", key) for key in KEYS}
    for key in KEYS:
        served(manager, key)
    gone = addresses[2]
    placement = manager.backends["kv"]._placement
    assert placement is not None
    old = placement._current
    manager.reload(config([a for a in addresses if a != gone], strategy))
    # maglev: reload never yields, the rebuild has not run, the old table still routes;
    # the removed owner is skipped, so its keys (only) go to their next server. Small
    # ring_hash and rendezvous tables are built inline: the new table is in place, and
    # it places the removed owner's keys on their next server too.
    inline = strategy != "maglev"
    assert placement.building is not inline and (placement._current is old) is not inline
    second = fallbacks(strategy, addresses, KEYS)
    for key in KEYS:
        want = second[key] if owners[key] == gone else owners[key]
        assert manager.owner("kv", key) == want  # never yields
    assert (placement._current is old) is not inline
    assert placement.wait_built(10)
    moved_others = 0
    for key in KEYS:
        address, rank = served(manager, key)
        assert rank == 0 and address != gone
        if owners[key] != gone and address != owners[key]:
            moved_others += 1
    if strategy == "maglev":  # near-minimal disruption: a few other keys may move
        assert moved_others <= 0.05 * len(KEYS)
    else:
        assert moved_others == 0


@pytest.mark.parametrize("release", ["just_before", "just_after"])
@pytest.mark.parametrize("strategy", ["rendezvous", "ring_hash"])
def test_a_reload_removing_the_owner_moves_its_queued_caller_to_the_new_owner(
    echo_fleet: Callable[[int], list[EchoServer]],
    manager_of: Callable[..., PoolManager],
    strategy: str,
    release: str,
) -> None:
    """A caller queued on a key's owner when a reload removes it is served by the key's
    new owner within its deadline, never by the removed server, whether the owner's
    connection came back just before the reload (handed, the caller not awake yet) or
    just after (its drain not started yet); the removed server's connection closes.
    (Tables of 3 servers are built inline: ``owner`` after the reload is the new one.)"""
    addresses = [s.address for s in echo_fleet(3)]
    manager = manager_of(addresses, strategy, pool={"max_size": 1})
    gone = addresses[0]
    key = next(k for k in KEYS if manager.owner("kv", k) == gone)
    held = manager.acquire("kv", key=key)
    assert held.address == gone  # the owner is full: a caller of the key queues on it
    got: dict[str, Any] = {}

    def caller() -> None:
        with manager.get("kv", timeout=5, key=key) as conn:
            got["address"], got["rank"] = conn.address, conn.rank
            conn.sendall(b"ping")
            got["echo"] = recv_exact(conn, 4)

    g = gevent.spawn(caller)
    removed = manager.backends["kv"].pools[0]
    assert removed.name == gone
    assert settle(lambda: removed.stats().waiting == 1, timeout=5)
    if release == "just_before":  # handed to the caller, which has not woken yet
        held.release()
    manager.reload(config(addresses[1:], strategy, pool={"max_size": 1}))
    new_owner = manager.owner("kv", key)
    assert new_owner != gone
    if release == "just_after":
        held.release()
    g.join(5)
    assert g.successful(), g.exception
    assert got["address"] == new_owner and got["echo"] == b"ping"
    assert settle(lambda: removed.closed and removed.stats().size == 0, timeout=5)
    assert removed.stats().closed["discarded"] + removed.stats().closed["idle"] == 1


def test_a_reload_to_a_hashing_strategy_waits_for_the_first_table(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    addresses = [s.address for s in echo_fleet(3)]
    manager = make_manager(config(addresses, "round_robin"))
    served(manager, "k")
    manager.reload(config(addresses, "maglev"))
    table = build_table("maglev", [(a, 1) for a in addresses])
    assert served(manager, "user:7") == (addresses[table.owner("user:7")], 0)
    manager.reload(config(addresses, "round_robin"))
    assert manager.backends["kv"]._placement is None
    with manager.get("kv") as conn:  # no key needed any more
        assert conn.rank == 0


def _key_past(addresses: list[str], cut: int) -> tuple[str, list[int]]:
    """A key whose owner and first fallback are both at index >= ``cut``."""
    table = build_table("maglev", [(a, 1) for a in addresses])
    for i in range(10_000):
        order = list(table.order(f"k{i}"))
        if order[0] >= cut and order[1] >= cut:
            return f"k{i}", order
    raise AssertionError("no such key")


def test_a_waiter_across_a_switch_to_round_robin_gets_a_current_server(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    """A keyed acquisition waiting on its owner when a reload removes the owner and its
    next server and switches to round_robin: it is served by a server of the new config
    (its picker used to map the stopped placement's indices onto the new pools:
    IndexError, or an unrelated server)."""
    addresses = [s.address for s in echo_fleet(5)]
    cfg = config(addresses, "maglev", pool={"max_size": 1, "acquire_timeout": 3})
    manager = make_manager(cfg)
    built(manager)
    key, _ = _key_past(addresses, 2)
    held = manager.get("kv", key=key)
    waiter = gevent.spawn(served, manager, key, 3)
    gevent.sleep(0.05)
    assert manager.stats().backends["kv"].servers[held.address].waiting == 1
    new = addresses[:2]
    cfg = config(new, "round_robin", pool={"max_size": 1, "acquire_timeout": 3})
    manager.reload(cfg)
    address, _rank = waiter.get(timeout=3)
    assert address in new
    held.release()


def test_a_waiter_for_a_first_table_wakes_when_the_placement_stops(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    addresses = [s.address for s in echo_fleet(3)]
    manager = make_manager(config(addresses, "round_robin"))
    manager.reload(config(addresses, "maglev"))  # the first table: ~0.1 s to build
    placement = manager.backends["kv"]._placement
    assert placement is not None and placement.building
    waiter = gevent.spawn(served, manager, "user:1", 5)
    gevent.sleep(0)
    manager.reload(config(addresses[1:], "round_robin"))
    started = monotonic()
    address, _rank = waiter.get(timeout=5)
    assert monotonic() - started < 1.0  # at once, not after the 5 s deadline
    assert address in addresses[1:]


def _keyed_load(
    manager: PoolManager, current: dict[str, Any], stop: Event, n: int
) -> tuple[Counter[str], list[int]]:
    """``n`` greenlets of keyed round trips until ``stop``: (errors by kind and text,
    [acquisitions served, served by a server in neither the config in force when the
    acquisition began nor the one when it returned])."""
    errors: Counter[str] = Counter()
    counts = [0, 0]

    def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            before = current["servers"]
            try:
                with manager.get("kv", key=f"user:{w}:{i % 97}") as conn:
                    counts[0] += 1
                    if conn.address not in current["servers"] | before:
                        counts[1] += 1
                    conn.sendall(b"x")
                    assert recv_exact(conn, 1) == b"x"
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            gevent.sleep(0)

    current["workers"] = [gevent.spawn(worker, w) for w in range(n)]
    return errors, counts


def test_a_reload_storm_under_keyed_load_never_names_a_stale_server(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    """50 keyed greenlets while reloads add and remove servers, change weights and switch
    between every strategy: no error at all (an in-flight picker used to map a stale
    index onto the new pools: IndexError, or an unrelated server), and every
    acquisition is served by a server of the config in force when it began or when it
    returned. (Not "when it returned" alone: a pool removed while an acquisition waits
    in it can still hand that waiter a connection, with any strategy: pool.py.)"""
    addresses = [s.address for s in echo_fleet(8)]
    rng = random.Random(1)
    strategies = [*STRATEGIES, "round_robin"]

    def cfg(strategy: str, chosen: list[str]) -> dict[str, Any]:
        servers = [{"address": a, "weight": rng.choice([1, 1, 2, 5])} for a in chosen]
        # 10 s: a table rebuilt under this load on a machine three times oversubscribed
        # took past 2 s (pure Python); what is tested is who serves, not how fast
        return config(servers, strategy, pool={"acquire_timeout": 10})  # type: ignore[arg-type]

    manager = make_manager(cfg("maglev", addresses[:4]))
    built(manager)
    current: dict[str, Any] = {"servers": set(addresses[:4])}
    stop = Event()
    errors, counts = _keyed_load(manager, current, stop, 50)
    for _ in range(25):
        gevent.sleep(rng.uniform(0.02, 0.08))
        # every config serves some load before the next reload, however slow the
        # machine: waited for (bounded), not assumed from a rate
        more = counts[0] + 20
        assert settle(lambda more=more: counts[0] >= more, 10), (counts, errors)
        chosen = rng.sample(addresses, rng.randint(2, 8))
        manager.reload(cfg(rng.choice(strategies), chosen))
        current["servers"] = set(chosen)
    stop.set()
    gevent.joinall(current["workers"], timeout=15)
    assert not errors, errors
    assert counts[0] >= 500 and counts[1] == 0, counts  # 25 reloads, 20 each at least


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_disjoint_replacement_under_load_serves_every_key(
    echo_fleet: Callable[[int], list[EchoServer]],
    make_manager: Callable[..., PoolManager],
    strategy: str,
) -> None:
    """A reload replacing every server (a redeploy to new hosts) under 50 keyed
    greenlets: while the new table is pending, keys go to the new servers by rendezvous
    score; no BackendUnavailable (it was an outage until the table was built)."""
    fleet = [s.address for s in echo_fleet(8)]
    old, new = fleet[:4], fleet[4:]
    manager = make_manager(config(old, strategy, pool={"acquire_timeout": 2}))
    built(manager)
    current: dict[str, Any] = {"servers": set(old)}
    stop = Event()
    errors, counts = _keyed_load(manager, current, stop, 50)
    gevent.sleep(0.1)
    manager.reload(config(new, strategy, pool={"acquire_timeout": 2}))
    current["servers"] = set(new)
    placement = manager.backends["kv"]._placement
    assert placement is not None
    owners = {manager.owner("kv", f"user:{i}") for i in range(200)}  # never LookupError
    assert owners <= set(new) and len(owners) > 1
    assert placement.wait_built(10)
    gevent.sleep(0.1)
    stop.set()
    gevent.joinall(current["workers"], timeout=5)
    assert not errors, errors
    assert counts[0] > 100 and counts[1] == 0, counts


def test_a_reload_storm_does_not_starve_the_table(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    """maglev reloads every 30 ms (a build takes ~0.1-0.3 s) under load: builds are not
    killed, so tables keep swapping in during the storm, and the table's membership
    equals the config's soon after it ends (it used to stay at the first one)."""
    addresses = [s.address for s in echo_fleet(6)]

    def cfg(weight: int) -> dict[str, Any]:
        servers = [
            {"address": a, "weight": weight if i == 0 else 1} for i, a in enumerate(addresses)
        ]
        return config(servers, "maglev")  # type: ignore[arg-type]

    manager = make_manager(cfg(1))
    built(manager)
    placement = manager.backends["kv"]._placement
    assert placement is not None
    current: dict[str, Any] = {"servers": set(addresses)}
    stop = Event()
    errors, _counts = _keyed_load(manager, current, stop, 20)
    swaps = 0
    last = placement._current
    deadline = monotonic() + 1.5
    longest = deadline + 15  # a starved box: the storm goes on until a table swaps in
    weight = 1
    while monotonic() < deadline or (not swaps and monotonic() < longest):
        weight = weight % 3 + 1
        manager.reload(cfg(weight))
        for _ in range(3):
            gevent.sleep(0.01)
            if placement._current is not last:
                swaps += 1
                last = placement._current
    ended = monotonic()
    assert swaps >= 1
    # caught up with the last config once the storm ended (it used to keep the first
    # table for good); bounded, not timed: a starved box builds slowly
    assert placement.wait_built(15)
    took = monotonic() - ended
    assert placement._current is not None
    table = placement._current[0]
    assert dict(zip(table.addresses, table.weights, strict=True)) == {
        a: weight if i == 0 else 1 for i, a in enumerate(addresses)
    }
    print(f"storm: {swaps} swaps in 1.5 s; caught up {took * 1000:.0f} ms after it ended")
    stop.set()
    gevent.joinall(current["workers"], timeout=5)
    assert not errors, errors


def test_close_ends_a_rebuild_in_progress(
    echo_fleet: Callable[[int], list[EchoServer]], make_manager: Callable[..., PoolManager]
) -> None:
    addresses = [s.address for s in echo_fleet(2)]
    manager = make_manager(config(addresses, "maglev"))
    placement = manager.backends["kv"]._placement
    assert placement is not None and placement.building
    manager.close(timeout=1)
    assert not placement.building  # and the conftest finalizer finds no lbpool greenlet


class _Ticker:
    """A 1 ms ticker greenlet: the longest gaps between its wake-ups, in wall time and
    in this thread's CPU time, and the CPU time the interpreter's GC took within each.

    CPU time is what the hub was held for; wall time adds whatever other processes
    (two CPU hogs on two cores) took from us. A gen-2 collection is one pause over the
    whole process's heap (pytest's included) that a library cannot slice: it is
    reported, and subtracted from the gap it fell in."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.cpu_not_gc = 0.0
        self.ticks = 0
        self._gc = GCTime()
        self._stop = Event()
        self._greenlet: gevent.Greenlet[..., None] | None = None

    @property
    def gc_pause(self) -> float:
        return self._gc.longest

    def _run(self) -> None:
        last, last_cpu, last_gc = monotonic(), thread_time(), self._gc.total
        while not self._stop.is_set():
            gevent.sleep(0.001)
            now, cpu, in_gc = monotonic(), thread_time(), self._gc.total
            self.ticks += 1
            self.wall = max(self.wall, now - last)
            self.cpu = max(self.cpu, cpu - last_cpu)
            self.cpu_not_gc = max(self.cpu_not_gc, cpu - last_cpu - (in_gc - last_gc))
            last, last_cpu, last_gc = now, cpu, in_gc

    def __enter__(self) -> _Ticker:
        self._gc.__enter__()
        self._greenlet = gevent.spawn(self._run)
        gevent.sleep(0.005)  # ticking
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._greenlet is not None
        self._greenlet.join(2)
        self._gc.__exit__()

    def __str__(self) -> str:
        return (
            f"longest gap {self.wall * 1000:.1f} ms wall, {self.cpu * 1000:.1f} ms CPU, "
            f"{self.cpu_not_gc * 1000:.1f} ms CPU outside GC (longest GC pause "
            f"{self.gc_pause * 1000:.1f} ms), {self.ticks} ticks"
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_1000_servers_in_a_manager_keep_the_hub_responsive(
    make_manager: Callable[..., PoolManager], strategy: str
) -> None:
    """Building a manager of 1,000 servers, reloading one away, and reloading all of them
    for 1,000 others, each with its key table (re)built: a ticker greenlet is never held
    up long. Every long step is paced (pools made, drained and kept in slices, tables
    built in slices): the bound is on CPU time outside GC, which two CPU hogs do not
    inflate; wall time and GC pauses are printed (``-s``). Nothing is dialed (min_idle 0,
    no acquisition): the servers need not exist.

    The configs are parsed before each step (pydantic validates 1,000 servers in one
    go, ~10-25 ms: that is the caller's parse, not a rebuild; ``parse_config`` lets a
    caller do it ahead). What is left in one step is the switch (re-tuning the servers
    kept, the new balancer and table signature, ~5-16 ms): bounded at 50 ms (the
    table rebuild's own slices, ~5 ms, are held to the issue's 20 ms in test_hashing).
    """
    first = [f"127.0.0.{1 + i // 250}:{20000 + i}" for i in range(1000)]
    other = [f"127.0.1.{1 + i // 250}:{20000 + i}" for i in range(1000)]
    parsed = [parse_config(config(servers, strategy)) for servers in (first, first[1:], other)]
    # the same steps on a small fleet first: what they import lazily (CI runs with
    # PYTHONDONTWRITEBYTECODE, so a first import compiles its module) is not a rebuild
    small = make_manager(config(first[:10], strategy))
    built(small)
    small.reload(config(other[:10], strategy))
    built(small)
    small.close()
    steps: dict[str, _Ticker] = {}
    with _Ticker() as ticker:
        manager = make_manager(parsed[0])
        built(manager)
    steps["made"] = ticker
    with _Ticker() as ticker:
        manager.reload(parsed[1])  # one server leaves
        built(manager)
    steps["one left"] = ticker
    with _Ticker() as ticker:
        manager.reload(parsed[2])  # all replaced: 1,000 made, 999 drained
        built(manager)
        drainers = list(manager._drainers)
        gevent.joinall(drainers, timeout=10)
        assert all(g.dead for g in drainers)
    steps["all replaced"] = ticker
    assert list(manager.stats().backends["kv"].servers) == other
    for step, ticker in steps.items():
        print(f"{strategy}, 1,000 servers, {step}: {ticker}")
    for step, ticker in steps.items():
        assert ticker.ticks >= 1, step
        # the table rebuild itself pauses every 5 ms (test_hashing bounds it at the
        # issue's 20 ms); a reload's one-step switch is ~5-16 ms here, once 28 ms on a
        # loaded machine (CPU time too grows with a busy sibling core): 50 ms of room,
        # against ~250 ms for an unpaced table build or 1,000 pools made in one go
        assert ticker.cpu_not_gc < 0.05, (step, str(ticker))


# -------------------------------------------------------------------------- stats


def test_owner_and_fallback_hits_in_stats_and_to_dict(
    echo_fleet: Callable[[int], list[EchoServer]], manager_of: Callable[..., PoolManager]
) -> None:
    live = [s.address for s in echo_fleet(2)]
    dead = dead_address()
    manager = manager_of([*live, dead], "rendezvous", breaker={"failure_threshold": 5})
    mine = [k for k in KEYS if manager.owner("kv", k) != dead][:5]
    theirs = [k for k in KEYS if manager.owner("kv", k) == dead][:3]
    for key in mine + theirs:
        served(manager, key)
    servers = manager.stats().backends["kv"].servers
    assert sum(s.owner_hits for s in servers.values()) == len(mine)
    assert sum(s.fallback_hits for s in servers.values()) == len(theirs)
    assert servers[dead].owner_hits == servers[dead].fallback_hits == 0
    data = manager.stats().to_dict()["backends"]["kv"]["servers"]
    assert sum(d["owner_hits"] for d in data.values()) == len(mine)
    assert sum(d["fallback_hits"] for d in data.values()) == len(theirs)
    own = manager.backends["kv"].stats()  # the backend's own, taken in one go
    assert own == manager.stats().backends["kv"] and own.servers == servers


def test_owner_and_fallback_hits_in_prometheus(
    echo_fleet: Callable[[int], list[EchoServer]], manager_of: Callable[..., PoolManager]
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    import lbpool.metrics

    live = [s.address for s in echo_fleet(2)]
    dead = dead_address()
    manager = manager_of([*live, dead], "maglev", breaker={"failure_threshold": 5})
    key = next(k for k in KEYS if manager.owner("kv", k) == dead)
    address, _ = served(manager, key)
    served(manager, next(k for k in KEYS if manager.owner("kv", k) != dead))  # an owner hit
    registry = prometheus_client.CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    text = prometheus_client.generate_latest(registry).decode()
    samples = {
        (s.name, s.labels["server"]): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name in ("lbpool_owner_hits_total", "lbpool_fallback_hits_total")
    }
    assert samples[("lbpool_fallback_hits_total", address)] == 1
    assert sum(v for (n, _), v in samples.items() if n == "lbpool_owner_hits_total") == 1
    assert sum(v for (n, _), v in samples.items() if n == "lbpool_fallback_hits_total") == 1


def test_owner_after_close_and_from_another_thread(make_manager: Any) -> None:
    """``owner`` as every other call: from another OS thread an ``LbpoolError`` naming
    the manager (it waited 5 s for a key table only this manager's hub builds, then
    raised PoolTimeout); once closed, ``PoolClosed`` (it said the backend was unknown,
    'configured: none', as if the name were misspelled)."""
    import threading

    import lbpool

    manager = make_manager(config(["127.0.0.1:7001", "127.0.0.1:7002"]))
    owner = manager.owner("kv", "user:1")
    assert owner in ("127.0.0.1:7001", "127.0.0.1:7002")
    errors: list[BaseException] = []

    def other() -> None:
        try:
            manager.owner("kv", "user:1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    start = monotonic()
    thread.start()
    thread.join(10)
    assert monotonic() - start < 2
    assert len(errors) == 1 and type(errors[0]) is lbpool.LbpoolError, errors
    assert "manager belongs to another thread" in str(errors[0])
    manager.close()
    with pytest.raises(lbpool.PoolClosed, match="the manager is closed"):
        manager.owner("kv", "user:1")


def test_owner_waiting_for_the_first_table_when_the_manager_closes(make_manager: Any) -> None:
    """A caller of ``owner`` waiting for the first key table when ``close()`` comes gets
    ``PoolClosed``, as a waiting ``get`` does (it was woken and answered)."""
    import lbpool

    manager = make_manager(config(["127.0.0.1:7001", "127.0.0.1:7002"]))
    if manager.backends["kv"].first_table() is None:
        pytest.skip("the first key table was built before the caller could wait for it")
    waiting = gevent.spawn(manager.owner, "kv", "user:1")
    gevent.sleep(0)  # it waits for the table
    manager.close()
    waiting.join(5)
    assert isinstance(waiting.exception, lbpool.PoolClosed), waiting.value
