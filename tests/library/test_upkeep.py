"""The one upkeep loop on its own, with stand-in pools (no sockets)."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import pytest

import lbpool.manager
from lbpool import PoolManager
from lbpool._pacing import Pacer
from lbpool._upkeep import Upkeep
from lbpool.pool import Pool
from lbpool.testing import EchoServer
from tests.support.leaks import settle
from tests.support.net import free_port


class FakePool:
    def __init__(self, name: str, due: float, interval: float = 0.01, fail: bool = False) -> None:
        self.name = name
        self.config = SimpleNamespace(upkeep_interval=interval)
        self.due = due
        self.fail = fail
        self.passes = 0

    def run_upkeep(self) -> None:
        self.passes += 1
        if self.fail:
            raise ValueError("bad hook")

    def upkeep_due(self) -> float:
        return self.due


def test_one_failing_pool_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bad, good = FakePool("bad", 0.01, fail=True), FakePool("good", 0.01)
    upkeep = Upkeep(lambda: [bad, good])
    try:  # ticking every upkeep_interval, the failing pool's passes included
        assert settle(lambda: bad.passes >= 3 and good.passes >= 3, 5), (bad.passes, good.passes)
        assert "bad: upkeep failed" in caplog.text
    finally:
        upkeep.stop()
    assert upkeep.greenlet.dead


def test_at_rest_it_sleeps_until_due_and_on_demand_wakes_it() -> None:
    pool = FakePool("p", due=30.0)
    upkeep = Upkeep(lambda: [pool])
    try:
        assert settle(lambda: pool.passes >= 1, 5)
        gevent.sleep(0.05)
        assert pool.passes == 1  # one pass, then at rest for 30 s
        upkeep.on_demand()
        assert settle(lambda: pool.passes >= 2, 5)
        pool.due = 0.01  # busy now: on_demand while ticking is not needed
        upkeep.wake()
        assert settle(lambda: pool.passes >= 5, 5), pool.passes
    finally:
        upkeep.stop()


def test_no_pools_sleeps_until_woken_and_rereads_pools() -> None:
    pools: list[FakePool] = []
    upkeep = Upkeep(lambda: pools)
    try:
        gevent.sleep(0.05)
        pools.append(FakePool("new", due=30.0))
        upkeep.on_demand()  # at rest with nothing to keep
        assert settle(lambda: pools[0].passes >= 1, 5)
        gevent.sleep(0.01)
        assert pools[0].passes == 1
    finally:
        upkeep.stop()


def test_abandon_ends_the_loop_after_its_pass_without_yielding() -> None:
    pool = FakePool("p", due=30.0)
    upkeep = Upkeep(lambda: [pool])
    assert settle(lambda: pool.passes >= 1, 5)
    upkeep.abandon()
    assert not upkeep.greenlet.dead  # not waited for
    assert settle(lambda: upkeep.greenlet.dead, 5)
    assert pool.passes == 1


# -- on real sockets: upkeep survives anything, and stays cheap (DESIGN 19, 20) ----------

WAIT = 10.0  # bound on every wait below (two CPU hogs may slow a round trip a lot)


def _raise_timeout(sock: Any) -> None:
    with gevent.Timeout(0.01):  # the hook's own timer around a slow call
        gevent.sleep(5)


def _raise_exit(sock: Any) -> None:
    raise gevent.GreenletExit


HOSTILE = {"timeout": _raise_timeout, "greenlet_exit": _raise_exit}


def _pool(manager: PoolManager, name: str) -> Pool:
    return manager.backends[name].pools[0]


@pytest.mark.parametrize("raised", sorted(HOSTILE))
def test_a_health_hook_raising_base_exception_fails_its_check_not_upkeep(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    no_fd_leak: None,
    raised: str,
) -> None:
    """A background check whose hook raises gevent.Timeout (of its own) or GreenletExit
    counts its connection unhealthy; upkeep goes on refilling, so the server is dialed
    again and again, and another pool is still kept."""
    bad, good = echo_server_factory(), echo_server_factory()
    pool_cfg = {"min_idle": 1, "upkeep_interval": 0.02, "check_after": 60}
    manager = make_manager(
        {
            "backends": {
                "bad": {
                    "servers": [bad.address],
                    "pool": pool_cfg,
                    "health_check": {"hook": HOSTILE[raised], "interval": 0.05},
                    "breaker": {"failure_threshold": 1000},
                },
                "good": {"servers": [good.address], "pool": pool_cfg},
            }
        }
    )
    manager.wait_ready(timeout=WAIT)
    # each check fails, its connection closes, the refill dials a new one: again and again
    bad.wait_accepted(4, timeout=WAIT)
    assert not manager._upkeep.greenlet.dead
    assert settle(lambda: _pool(manager, "bad").stats().closed["unhealthy"] >= 3, WAIT)
    # and the other pool is still kept: a discarded connection is replaced
    manager.get("good").discard()
    good.wait_accepted(2, timeout=WAIT)
    assert settle(lambda: _pool(manager, "good").stats().idle == 1, WAIT)


def _setup_timeout(sock: Any) -> None:
    _raise_timeout(sock)


@pytest.mark.parametrize("raised", sorted(HOSTILE))
def test_a_setup_hook_raising_base_exception_fails_the_refill_dial(
    make_manager: Callable[..., PoolManager],
    echo_server: EchoServer,
    no_fd_leak: None,
    raised: str,
) -> None:
    """A refill whose setup hook raises gevent.Timeout or GreenletExit is a failed dial:
    counted (the breaker sees it), the slot freed, and upkeep tries again later."""
    manager = make_manager(
        {
            "backends": {
                "svc": {
                    "servers": [echo_server.address],
                    "pool": {"min_idle": 1, "upkeep_interval": 0.02},
                    "setup": HOSTILE[raised],
                    "breaker": {"failure_threshold": 1000},
                }
            }
        }
    )
    pool = _pool(manager, "svc")
    assert settle(lambda: pool.stats().dial_failures >= 3, WAIT), pool.stats()
    s = pool.stats()
    assert s.size == s.pending  # nothing leaked: only refills in flight hold slots
    assert not manager._upkeep.greenlet.dead


def _hang_on_timeout(sock: Any) -> None:
    try:
        gevent.sleep(30)
    except gevent.Timeout:  # swallows the check's timer and goes on
        gevent.sleep(30)


@pytest.mark.parametrize("hung", ["silent_server", "swallowing_hook"])
def test_one_hung_server_does_not_delay_another_pools_upkeep(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    no_fd_leak: None,
    hung: str,
) -> None:
    """Background checks of a server that stopped answering (or whose hook swallows
    the check's timer) run as errands: another pool with upkeep_interval 100 ms is
    back at min_idle long before those checks end (each takes 20 s here; the upkeep
    used to wait for them one after the other)."""
    slow, fast = echo_server_factory(), echo_server_factory()
    check: dict[str, Any] = (
        {"send": "PING\r\n", "expect": "+PONG", "timeout": 20, "interval": 0.1}
        if hung == "silent_server"
        else {"hook": _hang_on_timeout, "timeout": 0.05, "interval": 0.1}
    )
    manager = make_manager(
        {
            "backends": {
                "slow": {
                    "servers": [slow.address],
                    "pool": {"min_idle": 3, "max_size": 3, "check_after": 60},
                    "health_check": check,
                },
                "fast": {
                    "servers": [fast.address],
                    "pool": {"min_idle": 2, "upkeep_interval": 0.1},
                },
            }
        }
    )
    manager.wait_ready(timeout=WAIT)
    slow_pool, fast_pool = _pool(manager, "slow"), _pool(manager, "fast")
    slow.mode = "silent"
    assert settle(lambda: slow_pool.stats().pending >= 1, WAIT)  # checks under way
    held = [manager.get("fast") for _ in range(2)]
    for conn in held:
        conn.discard()
    start = monotonic()
    assert settle(lambda: fast_pool.stats().idle == 2, WAIT), fast_pool.stats()
    took = monotonic() - start
    assert took < 5, took  # a hung check takes 20 s; generous for loaded machines
    assert slow_pool.stats().pending <= 2  # at most _BACKGROUND_CHECKS per pool


class _Ticker:
    """The longest gap between a 1 ms ticker's wake-ups: how long the hub was held."""

    def __init__(self) -> None:
        self.gap = 0.0
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = monotonic()
        while True:
            gevent.sleep(0.001)
            now = monotonic()
            self.gap = max(self.gap, now - last)
            last = now

    def stop(self) -> float:
        self.greenlet.kill()
        return self.gap


def test_a_huge_min_idle_dials_a_few_at_a_time_and_stops_at_the_open_breaker(
    make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    """min_idle 100,000 against a refusing port: refills go a few at a time, so the hub
    is never held (the gap of a 1 ms ticker stays small) and dialing stops once the
    breaker opens (failure_threshold 5): at most the dials already in flight follow."""
    address = f"127.0.0.1:{free_port()}"
    ticker = _Ticker()
    try:
        manager = make_manager(
            {
                "backends": {
                    "svc": {
                        "servers": [address],
                        "pool": {"min_idle": 100_000, "max_size": 100_000},
                        "breaker": {"failure_threshold": 5, "recovery_timeout": 60},
                    }
                }
            }
        )
        pool = _pool(manager, "svc")
        assert settle(lambda: pool.breaker.state == "open" and pool.stats().size == 0, WAIT)
        gevent.sleep(0.2)
    finally:
        gap = ticker.stop()
    print(f"hub gap with min_idle 100,000: {gap * 1000:.1f} ms")
    assert gap < 0.5, gap  # generous (two CPU hogs); measured about 3 ms
    assert pool.stats().dial_failures <= 5 + 4  # threshold + the dials in flight


def test_refill_keeps_a_few_dials_in_flight_until_min_idle(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    manager = make_manager(
        {
            "backends": {
                "svc": {
                    "servers": [echo_server.address],
                    "pool": {"min_idle": 40, "max_size": 40, "upkeep_interval": 60},
                }
            }
        }
    )
    pool = _pool(manager, "svc")
    most = 0

    def watch() -> None:
        nonlocal most
        while True:
            most = max(most, pool.stats().pending)
            gevent.sleep(0)

    watcher = gevent.spawn(watch)
    try:  # one pass (the next is 60 s away): each refill that succeeds starts the next
        assert settle(lambda: pool.stats().idle == 40, WAIT), pool.stats()
    finally:
        watcher.kill()
    assert 1 <= most <= 4, most


def test_a_construction_that_paused_still_warms_every_pool(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Construction makes the pools in paced slices (it may yield to the hub between
    them); the upkeep greenlet, started first, may run its first pass in such a pause,
    before any backend is registered. The pools must still get their first pass
    (warmed to ``min_idle``) without anyone asking: here every pause yields."""
    monkeypatch.setattr(lbpool.manager, "Pacer", lambda: Pacer(slice_seconds=0.0))
    servers = [echo_server_factory() for _ in range(3)]
    manager = make_manager(
        {
            "backends": {
                "svc": {
                    "servers": [s.address for s in servers],
                    "pool": {"min_idle": 2, "upkeep_interval": 60},
                }
            }
        }
    )
    pools = manager.backends["svc"].pools
    assert settle(lambda: all(p.stats().idle == 2 for p in pools), WAIT), [
        p.stats().idle for p in pools
    ]


# -- ad-hoc host:port pools --------------------------------------------------------------


def test_an_unused_adhoc_pool_is_closed_and_forgotten(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    manager = make_manager(
        {"defaults": {"pool": {"min_idle": 1, "idle_timeout": 0.3, "upkeep_interval": 0.05}}}
    )
    with manager.get(echo_server.address) as conn:
        conn.sendall(b"hi")
    assert manager.stats().backends[""].servers
    assert settle(lambda: not manager._adhoc, WAIT)  # forgotten, spellings and all
    assert settle(lambda: echo_server.active == 0, WAIT)  # its sockets closed
    assert "" not in manager.stats().backends
    with manager.get(echo_server.address) as conn:  # a later use makes a new pool
        conn.sendall(b"hi")


def test_adhoc_pools_are_bounded_by_max_pools(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    no_fd_leak: None,
) -> None:
    servers = [echo_server_factory() for _ in range(5)]
    manager = make_manager({"adhoc": {"max_pools": 3}, "defaults": {"pool": {"min_idle": 1}}})
    held = manager.get(servers[0].address)  # in use: never the one evicted
    for server in servers[1:]:
        manager.get(server.address).release()
    kept = manager.stats().backends[""].servers
    assert len(kept) == 3, list(kept)
    assert servers[0].address in kept and servers[4].address in kept
    assert settle(lambda: servers[1].active == 0 and servers[2].active == 0, WAIT)
    held.release()


def test_a_new_adhoc_name_costs_no_pass_over_the_pools_at_rest(
    make_manager: Callable[..., PoolManager], monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """200 ad-hoc names at rest; one more gets a pass of its own, not one over all."""
    server = EchoServer(host="0.0.0.0").start()  # reached as 127.0.0.x: distinct names
    try:
        # no periodic pass in the test's time (a loaded box stretched it into one: 202
        # passes): only the passes a use asks for are counted
        manager = make_manager({"defaults": {"pool": {"min_idle": 0, "upkeep_interval": 3600}}})
        for i in range(200):
            manager.get(f"127.0.{i // 250}.{i % 250 + 1}:{server.port}").release()
        passes: list[str] = []
        real = Pool.run_upkeep

        def counting(pool: Pool) -> None:
            passes.append(pool.name)
            real(pool)

        def passes_ended() -> bool:
            """No pass for 0.3 s (bounded: 20 s): what was asked for has run."""
            end = monotonic() + 20
            while monotonic() < end:
                seen = len(passes)
                gevent.sleep(0.3)
                if len(passes) == seen:
                    return True
            return False

        monkeypatch.setattr(Pool, "run_upkeep", counting)
        assert passes_ended()  # the passes their first uses asked for (late on a busy box)
        passes.clear()
        new = f"127.0.1.1:{server.port}"
        manager.get(new).release()
        assert settle(lambda: new in passes, 10)  # its own pass ...
        assert passes_ended()
        assert len(passes) < 20, len(passes)  # ... not one over all 201, as it used to be
        manager.close()
    finally:
        server.stop()


def test_pause_now_pauses_whatever_the_slice_but_never_in_the_hub() -> None:
    """``Pacer.pause_now`` pauses at once (a ticker gets a turn) though no slice has gone
    by, where ``pacer()`` would not; in the hub, or made with ``pauses=False``, never."""
    turns = [0]
    stop = [False]

    def tick() -> None:
        while not stop[0]:
            turns[0] += 1
            gevent.sleep(0)

    ticker = gevent.spawn(tick)
    try:
        gevent.sleep(0)
        pacer = Pacer(slice_seconds=1e9)

        def both() -> tuple[bool, int, bool, int]:
            before = turns[0]
            by_slice = pacer()
            between = turns[0] - before
            return by_slice, between, pacer.pause_now(), turns[0] - before - between

        by_slice, between, now, after = gevent.spawn(both).get(timeout=5)
        assert (by_slice, between) == (False, 0)
        assert now is True and after >= 1
        assert Pacer(pauses=False).pause_now() is False
        in_hub = gevent.event.AsyncResult()
        gevent.get_hub().loop.run_callback(lambda: in_hub.set(Pacer().pause_now()))
        assert in_hub.get(timeout=5) is False
    finally:
        stop[0] = True
        ticker.get(timeout=5)
