"""``PoolManager.wait_ready`` on loopback: what it waits for (min_idle connections, a
discovered backend's first answer, a key-affinity backend's first key table), that it
follows reloads made while it waits, what ``None`` means, and that it prints nothing and
leaves no greenlet behind whichever way it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent.event import Event

import lbpool._affinity
from lbpool import PoolClosed, PoolManager, PoolTimeout
from lbpool.hashing import build_table
from lbpool.testing import EchoServer
from tests.support.leaks import lbpool_greenlets, settle
from tests.support.net import dead_address

WAIT = 5.0  # bound on every wait that should end much sooner


def backend(servers: list[str], **kwargs: Any) -> dict[str, Any]:
    pool = {"min_idle": 1, "acquire_timeout": 0.2, "upkeep_interval": 0.05}
    return {"servers": servers, "pool": {**pool, **kwargs.pop("pool", {})}, **kwargs}


def spawned_by_wait_ready() -> list[gevent.Greenlet]:
    """Live greenlets running some ``wait_ready`` (a pool's, spawned by the manager's)."""
    return [g for g in lbpool_greenlets() if getattr(g._run, "__name__", "") == "wait_ready"]


def dial_failed(manager: PoolManager, name: str) -> Callable[[], bool]:
    return lambda: any(p.stats().dial_failures > 0 for p in manager.backends[name].pools)


@pytest.fixture
def waiting(make_manager: Callable[..., PoolManager]) -> Iterator[PoolManager]:
    """A manager whose one backend ``x`` can never be ready (its server refuses)."""
    yield make_manager({"backends": {"x": backend([dead_address()])}})


def test_a_pool_that_is_not_ready_prints_no_traceback(
    waiting: PoolManager, capfd: pytest.CaptureFixture[str]
) -> None:
    """It raised ``PoolTimeout`` and gevent printed each unready pool's greenlet's
    failure (``<Greenlet ...> failed with PoolTimeout`` and a traceback) on stderr."""
    start = monotonic()
    with pytest.raises(PoolTimeout, match=r"not ready: .*0 of min_idle 1"):
        waiting.wait_ready(0.3)
    assert monotonic() - start < WAIT
    gevent.sleep(0.01)  # the hub's loop prints a failed greenlet's report on a later turn
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed with" not in err, err
    assert not spawned_by_wait_ready()


@pytest.mark.parametrize("how", ["timeout", "kill"])
def test_an_interrupted_wait_ready_leaves_nothing_behind(
    waiting: PoolManager, capfd: pytest.CaptureFixture[str], how: str
) -> None:
    """Interrupted by the caller's ``gevent.Timeout`` or killed, it leaves no greenlet
    of its own and prints nothing; the manager still works (and waits again)."""
    if how == "timeout":
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
            waiting.wait_ready(30)
    else:
        job = gevent.spawn(waiting.wait_ready, 30)
        assert settle(dial_failed(waiting, "x"), WAIT)  # it is waiting now
        job.kill(block=True, timeout=WAIT)
        assert job.dead and isinstance(job.value, gevent.GreenletExit)
    assert not spawned_by_wait_ready()
    with pytest.raises(PoolTimeout):
        waiting.wait_ready(0.1)
    gevent.sleep(0.01)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed with" not in err, err


def test_a_reload_that_removes_the_unready_server_ends_the_wait(
    waiting: PoolManager, echo_server: EchoServer
) -> None:
    """The user's report: the pools were fixed when the call started, so it waited out
    its whole timeout on a server no longer configured, then named it."""
    job = gevent.spawn(waiting.wait_ready, 30)
    assert settle(dial_failed(waiting, "x"), WAIT)
    assert not job.ready()
    start = monotonic()
    waiting.reload({"backends": {"c": backend([echo_server.address])}})
    job.join(WAIT)
    assert job.successful(), job.exception
    assert monotonic() - start < WAIT
    assert waiting.stats().backends["c"].servers[echo_server.address].idle >= 1


def test_a_timeout_names_only_what_the_current_config_has(
    waiting: PoolManager, echo_server: EchoServer
) -> None:
    """A reload that swaps one unready server for another: the timeout names the new
    one, not the server the call started with; a backend the reload added is waited
    for too (here it is ready in time)."""
    old = waiting.backends["x"].pools[0].name
    new = dead_address()
    job = gevent.spawn(waiting.wait_ready, 1.0)
    assert settle(dial_failed(waiting, "x"), WAIT)
    waiting.reload({"backends": {"y": backend([new]), "c": backend([echo_server.address])}})
    job.join(WAIT)
    assert isinstance(job.exception, PoolTimeout), job.exception
    message = str(job.exception)
    assert new in message and old not in message, message
    assert echo_server.address not in message, message


def test_wait_ready_none_waits_without_limit_for_pools_as_for_dns(
    waiting: PoolManager, echo_server: EchoServer
) -> None:
    """``wait_ready(None)``: no limit (as for a discovered backend's first answer),
    not the pools' ``acquire_timeout`` (0.2 s here); it ends when the config is ready
    (here a reload makes it so) or the manager closes."""
    job = gevent.spawn(waiting.wait_ready, None)
    job.join(1.0)  # five acquire_timeouts
    assert not job.ready(), job.exception
    waiting.reload({"backends": {"x": backend([echo_server.address])}})
    job.join(WAIT)
    assert job.successful(), job.exception


def test_close_wakes_wait_ready_none(waiting: PoolManager) -> None:
    job = gevent.spawn(waiting.wait_ready, None)
    assert settle(dial_failed(waiting, "x"), WAIT)
    waiting.close(timeout=1)
    job.join(WAIT)
    assert isinstance(job.exception, PoolClosed), job.exception


@pytest.mark.parametrize("strategy", ["maglev", "ring_hash"])
def test_a_key_affinity_backend_is_usable_with_a_short_deadline_after_wait_ready(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    strategy: str,
) -> None:
    """wait_ready returned before the first key table was built (maglev takes
    0.1-0.3 s), so a short-deadline get right after failed with ``no key table``.
    ring_hash over 17 servers builds in the background too."""
    count = 2 if strategy == "maglev" else 17
    servers = [echo_server_factory().address for _ in range(count)]
    manager = make_manager({"backends": {"h": backend(servers, strategy=strategy)}})
    manager.wait_ready(WAIT)
    manager.get("h", key="user:1", timeout=0.05).release()


def test_wait_ready_names_the_backend_whose_key_table_is_not_built(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first table that takes longer than the deadline: ``PoolTimeout`` naming the
    backend and its key table; once built, wait_ready returns."""
    gate = Event()

    def slow_build(strategy: str, servers: Any, pause: Any = None) -> Any:
        if strategy == "maglev":
            assert gate.wait(WAIT)
        return build_table(strategy, servers, pause=pause)

    monkeypatch.setattr(lbpool._affinity, "build_table", slow_build)
    servers = [echo_server_factory().address for _ in range(2)]
    manager = make_manager(
        {
            "backends": {
                "h": backend(servers, strategy="maglev"),
                "r": backend(servers, strategy="round_robin"),
            }
        }
    )
    with pytest.raises(PoolTimeout, match=r"backend 'h': .*key table") as info:
        manager.wait_ready(0.3)
    assert "'r'" not in str(info.value)
    gate.set()
    manager.wait_ready(WAIT)
    manager.get("h", key="user:1", timeout=0.05).release()


def test_wait_ready_sees_a_pool_its_callers_made_ready(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer
) -> None:
    """``min_idle == max_size`` with every slot taken by callers' own dials: the pool
    becomes ready through their connections (lent straight from the dial), which set
    no event; ``wait_ready(None)`` waited for ever (found by review). It looks again
    at least every 0.1 s now."""

    def slow_setup(sock: Any) -> None:
        gevent.sleep(0.2)

    def cfg(min_idle: int) -> dict[str, Any]:
        pool = {"min_idle": min_idle, "max_size": 2}
        return {
            "backends": {"b": {"servers": [echo_server.address], "setup": slow_setup, "pool": pool}}
        }

    manager = make_manager(cfg(0))
    go = Event()

    def hold() -> None:
        with manager.get("b", timeout=5):
            go.wait(10)

    holders = [gevent.spawn(hold) for _ in range(2)]
    try:
        gevent.sleep(0.05)  # both dials in flight: every slot taken
        manager.reload(cfg(2))  # the same hook: nothing retired, min_idle now 2
        pool = manager.backends["b"].pools[0]
        assert not pool.is_ready()
        waiter = gevent.spawn(manager.wait_ready, None)
        waiter.join(timeout=5)  # the dials end at 0.2 s; the holders hold on
        assert waiter.dead and waiter.successful(), waiter.exception
        assert pool.stats().in_use == 2
    finally:
        go.set()
        gevent.joinall(holders, timeout=5)
        gevent.killall([*holders], timeout=5)
