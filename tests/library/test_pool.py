"""One-server Pool: sizing, FIFO handoff, timeouts, health, lifetime, close, ownership."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any, cast

import gevent
import pytest
from gevent.event import Event

from lbpool import (
    ConnectionReleased,
    DialError,
    LbpoolError,
    Pool,
    PoolClosed,
    PoolConfig,
    PoolExhausted,
    PoolTimeout,
)
from lbpool._waiters import WAITING, Waiter
from lbpool.breaker import Breaker
from lbpool.config import BreakerConfig, DialConfig, HealthCheckConfig
from lbpool.connection import _Conn
from lbpool.health import Unhealthy
from lbpool.manager import PoolManager
from lbpool.stats import ServerStats
from lbpool.testing import EchoServer, recv_exact
from tests.support.interrupt import throw_now
from tests.support.leaks import settle
from tests.support.procs import ProcessEchoServer, read_child_report


def make_pool(server: EchoServer | ProcessEchoServer, **pool_kw: object) -> Pool:
    kw: dict[str, object] = {"min_idle": 0, "max_size": 2, "acquire_timeout": 2.0}
    kw.update(pool_kw)
    return Pool(server.address, pool=PoolConfig.model_validate(kw), upkeep=False)


@pytest.fixture
def server() -> Iterator[EchoServer]:
    with EchoServer() as srv:
        yield srv


def assert_consistent(pool: Pool) -> None:
    s = pool.stats()
    assert s.size == s.idle + s.in_use + s.pending, s
    assert s.size <= s.max_size, s


def test_reuse_counts_hits_misses_and_uses(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server)
    with pool.get() as conn:
        conn.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        assert conn.uses == 1
        assert conn.backend is None
        assert conn.address == server.address
    with pool.get() as conn:
        assert conn.uses == 2
    s = pool.stats()
    assert (s.misses, s.hits, s.acquired, s.size, s.idle) == (1, 1, 2, 1, 1)
    assert server.connections_accepted == 1
    pool.close()


def test_handle_refuses_use_after_release(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server)
    conn = pool.acquire()
    conn.release()
    with pytest.raises(ConnectionReleased):
        conn.sendall(b"x")
    with pytest.raises(ConnectionReleased):
        _ = conn.sock
    conn.release()  # second release is a no-op, never returns it twice
    conn.discard()
    assert pool.stats().idle == 1
    other = pool.acquire()
    stale = conn
    with pytest.raises(ConnectionReleased):
        stale.recv(1)
    other.discard()
    with pytest.raises(ConnectionReleased):
        other.send(b"x")
    assert pool.stats().size == 0
    pool.close()


def test_handle_cannot_be_copied_or_pickled(server: EchoServer, no_fd_leak: None) -> None:
    """A copy of a handle would be a second handle to the same borrow, one that its
    ``release()`` does not cut: it could write into the next borrower's stream."""
    import copy
    import pickle

    pool = make_pool(server)
    conn = pool.acquire()
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="one borrow"):
            attempt(conn)
    conn.release()
    other = pool.acquire()
    with pytest.raises(TypeError, match="one borrow"):
        copy.copy(conn)  # released: still nothing to copy
    other.sendall(b"mine")
    assert recv_exact(other, 4) == b"mine"
    other.release()
    pool.close()


def test_handle_sends_any_bytes_like_object(server: EchoServer, no_fd_leak: None) -> None:
    """As a socket's: bytes, bytearray and memoryview (redis-py sends memoryviews),
    on the compiled path as on the pure one (a ``bytes`` annotation made mypyc refuse
    the others)."""
    pool = make_pool(server)
    with pool.acquire() as conn:
        for data in (b"ab", bytearray(b"cd"), memoryview(b"xef")[1:]):
            conn.sendall(data)
            assert recv_exact(conn, 2) == bytes(data)
            assert conn.send(data) == 2
            assert recv_exact(conn, 2) == bytes(data)
    pool.close()


def test_max_size_counts_dials_in_progress(server: EchoServer, no_fd_leak: None) -> None:
    gate = Event()
    started: list[int] = []

    def slow_setup(sock: object) -> None:
        started.append(1)
        gate.wait(5)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=3, acquire_timeout=5),
        setup=slow_setup,
        upkeep=False,
    )
    held: list[object] = []
    workers = [gevent.spawn(lambda: held.append(pool.acquire())) for _ in range(10)]
    gevent.sleep(0.05)
    assert len(started) == 3  # three dials in flight, seven waiting, none over max
    s = pool.stats()
    assert (s.size, s.pending, s.waiting) == (3, 3, 7)
    gate.set()
    gevent.joinall(workers[:3], timeout=5)
    assert len(held) == 3
    for h in list(held):
        h.release()  # type: ignore[attr-defined]
    gevent.joinall(workers, timeout=5)
    for h in held[3:]:
        h.release()  # type: ignore[attr-defined]
    assert server.connections_accepted <= 3
    assert_consistent(pool)
    pool.close()


def test_waiters_are_served_first_come_first_served(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    order: list[int] = []

    def waiter(i: int) -> None:
        with pool.get(timeout=5):
            order.append(i)
            gevent.sleep(0)

    greenlets = []
    for i in range(20):
        greenlets.append(gevent.spawn(waiter, i))
        gevent.sleep(0)  # each one queues before the next starts
    assert pool.stats().waiting == 20
    holder.release()
    gevent.joinall(greenlets, timeout=5)
    assert order == list(range(20))
    assert_consistent(pool)
    pool.close()


def test_waiter_timeout_leaves_no_trace(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.05)
    msg = str(info.value)
    assert server.address in msg and "1 in use" in msg and "1 max" in msg
    assert isinstance(info.value, TimeoutError)
    s = pool.stats()
    assert (s.waiting, s.timeouts) == (0, 1)
    holder.release()
    assert pool.stats().idle == 1  # nobody stranded to hand it to
    pool.close()


@pytest.mark.parametrize("interrupt", ["kill", "timeout"])
def test_interrupt_after_handoff_passes_connection_on(
    server: EchoServer, no_fd_leak: None, interrupt: str
) -> None:
    """The known gevent failure: a connection handed to a waiter that dies before it
    wakes must go to the next waiter, not vanish."""
    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    got: list[str] = []

    def first() -> None:
        if interrupt == "timeout":
            with gevent.Timeout(10):
                pool.acquire()
        else:
            pool.acquire()
        got.append("first")  # pragma: no cover - must not get here

    def second() -> None:
        with pool.get(timeout=5):
            got.append("second")

    g1 = gevent.spawn(first)
    gevent.sleep(0)
    g2 = gevent.spawn(second)
    gevent.sleep(0)
    holder.release()  # handed to g1; its wake-up is only scheduled
    throw_now(g1, gevent.Timeout(0) if interrupt == "timeout" else gevent.GreenletExit())
    gevent.joinall([g1, g2], timeout=5)
    assert got == ["second"]
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting) == (1, 1, 0, 0)
    pool.close()


class _Interrupt(Exception):
    pass


def test_interrupted_waiter_is_not_woken_later(server: EchoServer, no_fd_leak: None) -> None:
    """A waiter interrupted after a connection was handed to it (its wake-up scheduled,
    not run) that survives the interruption and waits on something else is not woken
    by that stale wake-up: the wait forgets its greenlet however it ends."""
    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    later = Event()
    seen: list[object] = []

    def waiter() -> None:
        try:
            pool.acquire()
        except _Interrupt:
            seen.append("interrupted")
        try:
            seen.append(later.wait(5))  # True only once ``later`` is set
        except BaseException as exc:  # a stale switch into this wait: gevent refuses it
            seen.append(type(exc).__name__)

    g = gevent.spawn(waiter)
    gevent.sleep(0)
    holder.release()  # handed to g; its wake-up is only scheduled
    throw_now(g, _Interrupt())
    gevent.sleep(0)  # (the stale wake-up ran already: it was queued before throw_now's)
    later.set()
    g.join(5)
    assert seen == ["interrupted", True]
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting) == (1, 1, 0, 0)
    pool.close()


def test_stray_switch_into_a_waiter_gives_its_wait_up(server: EchoServer, no_fd_leak: None) -> None:
    """A switch into a waiting greenlet that was not the pool's (nothing handed, no
    timer) fails its acquisition with gevent's ``InvalidSwitchError``, as gevent's own
    waits do, and takes it off the queue: the next release goes to the next waiter,
    and no connection is handed to a wait that has ended."""
    from gevent.exceptions import InvalidSwitchError

    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    outcomes: list[object] = []

    def wait_turn(tag: str) -> None:
        try:
            with pool.get(timeout=5):
                outcomes.append(tag)
        except InvalidSwitchError as exc:
            outcomes.append((tag, type(exc).__name__, pool.name in str(exc)))

    stray = gevent.spawn(wait_turn, "stray")
    gevent.sleep(0)
    after = gevent.spawn(wait_turn, "after")
    gevent.sleep(0)
    assert pool.stats().waiting == 2
    gevent.get_hub().loop.run_callback(stray.switch, "not the pool's")
    stray.join(5)
    assert outcomes == [("stray", "InvalidSwitchError", True)]
    assert pool.stats().waiting == 1
    holder.release()
    after.join(5)
    assert outcomes[1:] == ["after"]
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting) == (1, 1, 0, 0)
    assert pool._handed == 0
    pool.close()


def test_killed_waiter_leaves_queue(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=1)
    holder = pool.acquire()
    g = gevent.spawn(pool.acquire, 5)
    gevent.sleep(0)
    assert pool.stats().waiting == 1
    g.kill()
    assert pool.stats().waiting == 0
    holder.release()
    assert pool.stats().idle == 1
    pool.close()


def test_max_waiting_sheds_at_once(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=1, max_waiting=2)
    holder = pool.acquire()
    waiting = [gevent.spawn(pool.acquire, 5) for _ in range(2)]
    gevent.sleep(0)
    with pytest.raises(PoolExhausted):
        pool.acquire(timeout=5)
    assert pool.stats().shed == 1
    gevent.killall(waiting)
    holder.release()
    pool.close()


def test_discard_on_exception_in_with(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server)
    with pytest.raises(RuntimeError), pool.get() as conn:
        raise RuntimeError("application error")
    s = pool.stats()
    assert (s.size, s.closed["error"], pool.breaker.failure_count) == (0, 1, 0)
    with pytest.raises(OSError), pool.get() as conn:
        raise ConnectionResetError("peer reset")
    assert pool.breaker.failure_count == 1  # network errors count against the server
    with pool.get() as conn:
        conn.sendall(b"x")
        conn.recv(1)
    assert pool.breaker.failure_count == 0  # a clean use resets the streak
    pool.close()


def test_breaker_opens_on_dial_failures_and_blocks_dials(no_fd_leak: None) -> None:
    with EchoServer() as srv:
        address = srv.address
    pool = Pool(
        address,
        pool=PoolConfig(min_idle=0, max_size=2, acquire_timeout=1),
        breaker=Breaker(address, BreakerConfig(failure_threshold=3, recovery_timeout=60)),
        upkeep=False,
    )
    for _ in range(3):
        with pytest.raises(DialError) as info:
            pool.acquire()
        assert isinstance(info.value.__cause__, OSError)
    assert pool.breaker.state == "open"
    with pytest.raises(DialError, match="breaker open"):
        pool.acquire()
    s = pool.stats()
    assert (s.dial_failures, s.breaker_trips, s.size) == (3, 1, 0)
    pool.close()


def test_borrow_check_replaces_dead_connection(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, check_after=0)
    conn = pool.acquire()
    conn.release()
    server.restart()  # the server drops every client
    with pool.get() as conn:  # the dead one is found by the peek and replaced
        conn.sendall(b"ok")
        assert conn.recv(2) == b"ok"
        assert conn.uses == 1
    assert pool.stats().closed["unhealthy"] == 1
    pool.close()


def test_borrow_check_runs_configured_check(server: EchoServer, no_fd_leak: None) -> None:
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2, check_after=0),
        health_check=HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=1),
        upkeep=False,
    )
    pool.acquire().release()
    with pool.get() as conn:
        assert conn.uses == 2  # passed the send/expect check and was reused
    pool.close()


def test_a_setup_hook_that_closes_the_socket_pools_nothing(
    server: EchoServer, no_fd_leak: None
) -> None:
    """Refills (upkeep, for min_idle) and a caller's dial alike: a hook that closed
    the socket fails the dial. Before, the refill's socket (fd -1) crashed the idle
    watcher's greenlet and stayed counted as idle; acquire then raised AttributeError."""
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=1, max_size=2, acquire_timeout=1, upkeep_interval=0.05),
        setup=lambda sock: sock.close(),
    )
    assert settle(lambda: pool.stats().dial_failures >= 2, 5)
    with pytest.raises(DialError, match="left the socket closed"):
        pool.acquire()
    s = pool.stats()
    assert (s.size, s.idle, s.in_use) == (0, 0, 0), s
    assert_consistent(pool)
    pool.close()


@pytest.mark.parametrize("hook", ["health_fail", "health_close"])
def test_a_failing_health_hook_finds_the_connection_unhealthy(
    server: EchoServer, hook: str, no_fd_leak: None
) -> None:
    """A hook that raises, or one that closes the socket and returns (that socket was
    lent, fd -1), fails the borrow check: a fresh connection is lent."""
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2, check_after=0),
        health_check=HealthCheckConfig(hook=f"tests.support.hooks:{hook}", timeout=1),
        upkeep=False,
    )
    pool.acquire().release()
    with pool.get() as conn:  # the checked one failed its check: a fresh one
        assert conn.uses == 1
        conn.sendall(b"ok")
        assert conn.recv(2) == b"ok"
    assert pool.stats().closed["unhealthy"] == 1
    pool.close()


def test_killed_during_borrow_check_loses_no_slot(server: EchoServer, no_fd_leak: None) -> None:
    """A check that runs a hook runs as an errand (the hook may swallow its timer): a
    caller killed meanwhile leaves the connection to the check, which keeps it counted
    (pending) until its verdict and then hands it on."""
    gate = Event()
    entered = Event()

    def blocking_check(sock: object) -> None:
        entered.set()
        gate.wait(10)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=1, check_after=0),
        health_check=HealthCheckConfig(timeout=10).model_copy(update={"hook": blocking_check}),
        upkeep=False,
    )
    pool.acquire().release()
    g = gevent.spawn(pool.acquire, 30)
    assert entered.wait(5)
    g.kill()
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (1, 0, 0, 1)  # still under its check
    gate.set()
    assert settle(lambda: pool.stats().idle == 1, 5)  # passed: handed on, not lost
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (1, 1, 0, 0)
    pool.close()


def test_idle_timeout_closes_above_min_idle(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, min_idle=1, max_size=3, idle_timeout=0)
    conns = [pool.acquire() for _ in range(3)]
    for c in conns:
        c.release()
    pool.run_upkeep()
    s = pool.stats()
    assert (s.idle, s.closed["idle"]) == (1, 2)
    pool.close()


def test_max_lifetime_with_jitter(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_lifetime=100, lifetime_jitter=0.5, max_size=10)
    conns = [pool.acquire() for _ in range(10)]
    lifetimes = [c._conn.expires_at - c.created_at for c in conns]  # type: ignore[union-attr]
    assert all(50 <= life <= 100 for life in lifetimes)
    assert len({round(life, 6) for life in lifetimes}) > 1  # spread, not all at once
    for c in conns:
        c.release()
    pool.close()
    expiring = make_pool(server, max_lifetime=0.05, lifetime_jitter=0)
    conn = expiring.acquire()
    gevent.sleep(0.06)  # let real lifetime pass; the connection is in use throughout
    assert not conn.sock._closed  # type: ignore[attr-defined]
    conn.release()  # over-lifetime: closed on release, never while in use
    s = expiring.stats()
    assert (s.size, s.closed["lifetime"]) == (0, 1)
    expiring.close()


def test_refill_to_min_idle_dials_concurrently(server: EchoServer, no_fd_leak: None) -> None:
    gate = Event()
    in_setup: list[int] = []

    def setup(sock: object) -> None:
        in_setup.append(1)
        gate.wait(5)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=4, max_size=5),
        setup=setup,
        upkeep=False,
    )
    assert pool.fill() == 4
    gevent.sleep(0.05)
    assert len(in_setup) == 4  # all four dials are in flight together
    gate.set()
    pool.wait_ready(timeout=5)
    assert pool.stats().idle == 4
    pool.close()


def test_background_check_removes_dead_idle(server: EchoServer, no_fd_leak: None) -> None:
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2),
        health_check=HealthCheckConfig(interval=0.01),
        upkeep=False,
    )
    pool.acquire().release()
    server.restart()
    pool.run_upkeep()
    assert pool.stats().idle == 1  # checked at release: not due yet
    gevent.sleep(0.02)  # time passes: the check falls due (a timing rule, not a sync)
    pool.run_upkeep()
    s = pool.stats()
    assert (s.idle, s.closed["unhealthy"]) == (0, 1)
    pool.close()


def test_leak_warning_names_acquiring_stack(
    server: EchoServer, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(server, leak_threshold=0)

    def the_leaky_caller() -> object:
        return pool.acquire()

    conn = the_leaky_caller()
    with caplog.at_level(logging.WARNING, logger="lbpool"):
        pool.run_upkeep()
        pool.run_upkeep()  # warns once per borrow
    records = [r for r in caplog.records if "leak_threshold" in r.getMessage()]
    assert len(records) == 1
    assert records[0].name == "lbpool"
    assert "the_leaky_caller" in records[0].getMessage()
    conn.release()  # type: ignore[attr-defined]
    pool.close()


def test_close_wakes_waiters_and_drains(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=1)
    held = pool.acquire()
    waiter = gevent.spawn(pool.acquire, 5)
    gevent.sleep(0)

    def give_back() -> None:
        gevent.sleep(0.05)
        held.release()

    gevent.spawn(give_back)
    closer = gevent.spawn(pool.close, 10)
    closer.join(timeout=5)
    assert closer.successful()  # returned as soon as drained, long before 10 s
    assert isinstance(waiter.exception, PoolClosed)
    with pytest.raises(PoolClosed):
        pool.acquire()
    assert pool.stats().size == 0
    pool.close()  # twice is harmless


def test_close_during_a_failing_borrow_check_lends_and_dials_nothing(no_fd_leak: None) -> None:
    """``close(0)`` while a caller's borrow check (send/expect, inline) waits for its
    reply: the check fails (its connection is closed under it) and the caller gets
    "pool is closed" -- it does not go on to dial into the closed pool ("pool closed
    while dialing", a connection discarded)."""
    with EchoServer(delay=0.5) as slow:  # the check's +PONG comes after 0.5 s
        pool = Pool(
            slow.address,
            pool=PoolConfig(min_idle=0, max_size=2, check_after=0, acquire_timeout=10),
            health_check=HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=5),
            upkeep=False,
        )
        try:
            pool.acquire(timeout=5).release()  # dialed, not checked; checked when reused
            caller = gevent.spawn(pool.acquire, 10)
            assert settle(lambda: pool.stats().pending == 1, 5)  # its check is in flight
            pool.close(0)
            caller.join(5)
            assert isinstance(caller.exception, PoolClosed), caller.value
            assert str(caller.exception).endswith(": pool is closed"), caller.exception
            closed = {reason: n for reason, n in pool.stats().closed.items() if n}
            assert closed == {"unhealthy": 1}, closed
            assert pool.stats().misses == 1
        finally:
            pool.close()


def test_close_forces_after_timeout(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server)
    held = pool.acquire()
    pool.close(timeout=0.05)
    assert pool.stats().size == 0
    held.release()  # a release after a forced close is harmless
    with pytest.raises(ConnectionReleased):
        held.sendall(b"x")


def test_killed_dial_leaves_no_socket_or_slot(server: EchoServer, no_fd_leak: None) -> None:
    """A dial with a setup hook runs as an errand: a caller killed meanwhile leaves it
    to its verdict (here the hook runs out of dial.timeout: a failed dial), which
    frees the slot and closes the socket."""
    entered = Event()

    def hang(sock: object) -> None:
        entered.set()
        gevent.sleep(30)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=1),
        dial=DialConfig(timeout=0.5),
        setup=hang,
        upkeep=False,
    )
    g = gevent.spawn(pool.acquire, 10)
    assert entered.wait(5)
    g.kill()
    assert pool.stats().pending == 1  # the dial goes on alone
    assert settle(lambda: pool.stats().size == 0, 5)
    assert (pool.stats().pending, pool.stats().dial_failures) == (0, 1)
    entered.clear()
    g2 = gevent.spawn(pool.acquire, 10)  # the slot is free again: this one dials too
    assert entered.wait(5)
    g2.kill()
    pool.close()  # kills the errand: its socket closed, its slot freed
    assert pool.stats().size == 0


def test_use_from_another_os_thread_is_refused(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            pool.acquire()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(10)
    assert len(errors) == 1
    assert isinstance(errors[0], LbpoolError)
    assert "another thread" in str(errors[0])
    pool.close()


def idle_port(pool: Pool) -> int:
    with pool.get() as conn:
        return int(conn.sock.getsockname()[1])


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_fork_child_never_uses_parent_connection(
    process_echo_server: ProcessEchoServer, no_fd_leak: None
) -> None:
    """The server runs in a process of its own: one in this process would be copied into
    the child, which could then accept and close connections the parent dials."""
    pool = make_pool(process_echo_server)
    parent_conn = pool.acquire()
    parent_conn.sendall(b"p1")
    assert parent_conn.recv(2) == b"p1"
    idle = pool.acquire()
    idle.release()  # an idle one the child must not reuse
    parent_ports = {parent_conn.sock.getsockname()[1], idle_port(pool)}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        report = b"\xff\xff\xff"
        try:
            os.close(r)
            with pool.get(timeout=2) as conn:
                port = conn.sock.getsockname()[1]
                conn.sendall(b"child")
                ok = conn.uses == 1 and conn.recv(5) == b"child"
            report = bytes([0 if ok else 3]) + port.to_bytes(2, "big")
        finally:
            os.write(w, report)
            os._exit(0)
    os.close(w)
    result = read_child_report(r, pid, 10, size=3)
    assert result[:1] == b"\x00", result
    child_port = int.from_bytes(result[1:3], "big")
    assert child_port not in parent_ports  # the child dialed its own connection
    assert pool.stats().idle == 1
    parent_conn.sendall(b"p2")  # the parent's connection is undisturbed
    assert parent_conn.recv(2) == b"p2"
    parent_conn.release()
    pool.close()


def test_network_error_gets_idle_siblings_checked(server: EchoServer, no_fd_leak: None) -> None:
    """After one connection fails with a network error, the others idle on the same
    server are checked before reuse, even if they were used a moment ago."""
    pool = make_pool(server, max_size=3, check_after=3600)
    conns = [pool.acquire() for _ in range(3)]
    for c in conns[1:]:
        c.release()
    server.restart()  # the server dies: every client socket is closed by the peer
    conns[0].discard(ConnectionResetError("peer reset"))
    with pool.get() as conn:  # both idle ones are found dead on borrow and replaced
        conn.sendall(b"ok")
        assert conn.recv(2) == b"ok"
        assert conn.uses == 1
    s = pool.stats()
    assert (s.closed["unhealthy"], s.closed["error"]) == (2, 1)
    pool.close()


# -- the inlined hot-path copies, checked against the canonical helpers ---------------
# acquire's idle path and its wake (_woken) inline _lend; _return inlines
# _hand_on (the oldest waiter, else the idle stack). Each test starts two pools in the
# same state, takes the fast path on one and the canonical helper on the other, and
# compares everything observable.


def _state(pool: Pool) -> tuple[object, ...]:
    s = pool.stats()
    return (
        s.size,
        s.idle,
        s.in_use,
        s.pending,
        s.waiting,
        s.hits,
        s.misses,
        s.acquired,
        s.wait_count,
        s.closed,
        pool._handed,
        sorted(c.uses for c in pool._busy),
        [c.uses for c in pool._idle],
        s.max_in_use,
    )


def _caller(stack: str | None) -> str:
    """The function the recorded acquisition stack ends in."""
    assert stack is not None
    return stack.rstrip().splitlines()[-2].rsplit(" in ", 1)[1]


def test_fast_acquire_matches_lend(server: EchoServer, no_fd_leak: None) -> None:
    fast, canon = (make_pool(server, leak_threshold=60) for _ in range(2))
    with fast, canon:
        for pool in (fast, canon):
            pool.acquire().release()
            pool._idle[0].checked_at = monotonic()  # no borrow check on either side
        h_fast = fast.acquire()  # the inlined _lend
        conn = canon._idle.pop()
        canon._hits += 1
        h_canon = canon._lend(conn, monotonic())  # the canonical one
        assert _state(fast) == _state(canon)
        assert fast._busy == {h_fast._conn: h_fast} and canon._busy == {conn: h_canon}
        assert _caller(h_fast.stack) == _caller(h_canon.stack) == "test_fast_acquire_matches_lend"
        h_fast.release()
        h_canon.release()
        assert _state(fast) == _state(canon)


@pytest.mark.parametrize("max_idle", [None, 0])
@pytest.mark.parametrize("waiting", [True, False])
def test_fast_return_matches_hand_on(
    server: EchoServer, no_fd_leak: None, waiting: bool, max_idle: int | None
) -> None:
    fast, canon = (make_pool(server, max_size=1, max_idle=max_idle) for _ in range(2))
    with fast, canon:
        held = {pool: pool.acquire() for pool in (fast, canon)}
        waiters = []
        if waiting:
            waiters = [gevent.spawn(pool.acquire) for pool in (fast, canon)]
            gevent.sleep(0)
        queued = {pool: list(pool._waiters) for pool in (fast, canon)}
        conn_fast = held[fast]._conn
        held[fast].release()  # _return: the inlined _hand_on
        conn = held[canon]._conn
        assert conn is not None
        held[canon]._conn = None
        del canon._busy[conn]
        conn.last_used_at = conn.checked_at = monotonic()
        canon._hand_on(conn)  # the canonical one
        assert _state(fast) == _state(canon)
        if waiting:
            assert queued[fast][0].outcome is conn_fast
            assert queued[canon][0].outcome is conn
            gevent.joinall(waiters, timeout=5)
            assert _state(fast) == _state(canon)
            for g in waiters:
                g.value.release()
        elif max_idle == 0:  # closed at once, on both paths
            assert not fast._idle and not canon._idle
            assert fast.stats().closed["idle"] == canon.stats().closed["idle"] == 1
        else:
            assert list(fast._idle) == [conn_fast] and list(canon._idle) == [conn]


def test_fast_wake_matches_lend(server: EchoServer, no_fd_leak: None) -> None:
    """A waiter handed a connection wakes in acquire, which inlines _lend; the canonical
    side is a bare waiter joined by the test, lent to by the helper."""
    fast, canon = (make_pool(server, max_size=1) for _ in range(2))
    with fast, canon:
        held = {pool: pool.acquire() for pool in (fast, canon)}
        g = gevent.spawn(fast.acquire)
        gevent.sleep(0)
        w = canon._waiters.join(float("inf"))
        for pool in (fast, canon):
            held[pool].release()  # handed over, the waiter not awake yet
        assert _state(fast) == _state(canon)
        h_fast = g.get(timeout=5)  # woken: the inlined _lend
        conn = w.outcome
        assert isinstance(conn, _Conn)
        canon._handed -= 1  # what _woken does around _lend
        canon._waits_served += 1
        canon._hits += 1
        h_canon = canon._lend(conn, monotonic())  # the canonical one
        assert _state(fast)[:8] == _state(canon)[:8]  # wait_count: the wait's own timing
        assert _state(fast)[9:] == _state(canon)[9:]
        assert fast._waits_served == canon._waits_served == 1
        assert h_fast.uses == h_canon.uses == 2
        assert fast._busy == {h_fast._conn: h_fast} and canon._busy == {conn: h_canon}
        h_fast.release()
        h_canon.release()


def test_fast_join_matches_join(server: EchoServer, no_fd_leak: None) -> None:
    """acquire inlines WaitQueue.join: the queued waiter, its outcome and deadline, and the
    queue's timer are what join makes (the earliest deadline arms the timer, a later
    one does not)."""
    fast, canon = (make_pool(server, max_size=1) for _ in range(2))
    with fast, canon:
        held = {pool: pool.acquire() for pool in (fast, canon)}
        fast_waiters = [gevent.spawn(fast.acquire, t) for t in (30.0, 60.0)]
        gevent.sleep(0)
        start = fast._waiters[0].deadline - 30.0
        canon_waiters = [canon._waiters.join(start + t) for t in (30.0, 60.0)]
        for f, c in zip(fast._waiters, canon._waiters, strict=True):
            assert type(f) is type(c) is Waiter
            assert f.outcome is c.outcome is WAITING
            assert abs(f.deadline - c.deadline) < 1.0
        assert fast._waiters._timer_at == fast._waiters[0].deadline
        assert canon._waiters._timer_at == canon._waiters[0].deadline
        assert fast._waiters._timer is not None and canon._waiters._timer is not None
        for g in fast_waiters:
            g.kill()
        for w in canon_waiters:
            canon._waiters.remove(w)
        for pool in (fast, canon):
            held[pool].release()


def test_wait_bucket_matches_bisect() -> None:
    """The wait's bucket scan puts a wait where ``bisect_left`` over ``WAIT_BUCKETS`` does
    (the ``le`` semantics of the histogram: a wait equal to a bound is in its bucket),
    on every bound, just either side of it, and past the last."""
    import bisect
    import math

    from lbpool.pool import _wait_bucket
    from lbpool.stats import WAIT_BUCKETS

    values = [-1.0, 0.0, 1e-9, 1e6, math.inf]
    for bound in WAIT_BUCKETS:
        values += (math.nextafter(bound, -math.inf), bound, math.nextafter(bound, math.inf))
    for value in values:
        assert _wait_bucket(value) == bisect.bisect_left(WAIT_BUCKETS, value), value
    assert _wait_bucket(math.inf) == len(WAIT_BUCKETS)


# -- arguments are checked before anything changes (DESIGN 14) -------------------------

BAD_TIMEOUTS = [1j, float("nan"), True, "0.5"]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=["complex", "nan", "bool", "str"])
@pytest.mark.parametrize("path", ["idle", "full"])
def test_bad_timeout_is_refused_before_any_change(
    server: EchoServer, no_fd_leak: None, bad: object, path: str
) -> None:
    """On the fast path (an idle connection ready) and the slow one (a full pool, so
    the caller would queue), a bad ``timeout`` raises an error naming it, and the pool
    is untouched: no waiter queued, the timer intact, the next release goes on."""
    pool = make_pool(server, max_size=1)
    held = pool.acquire()
    if path == "idle":
        held.release()
    with pytest.raises((TypeError, ValueError), match="timeout"):
        pool.acquire(timeout=bad)  # type: ignore[arg-type]
    s = pool.stats()
    assert s.waiting == 0 and s.timeouts == 0, s
    assert_consistent(pool)
    if path == "full":
        follower = gevent.spawn(pool.acquire, 5)
        gevent.sleep(0)  # queued
        assert pool.stats().waiting == 1
        held.release()  # handed to the follower, not lost
        follower.get(timeout=5).release()
    start = monotonic()
    with pytest.raises(PoolTimeout):  # the one timer still works
        blocker = pool.acquire(timeout=1)
        pool.acquire(timeout=0.1)
    assert monotonic() - start < 0.1 + 0.5
    blocker.release()
    assert_consistent(pool)
    pool.close()


# -- max_idle, min_idle: auto, counters (issue 13) ------------------------------------


def test_max_idle_closes_a_release_beyond_it_at_once(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=4, max_idle=2, idle_timeout=3600)
    held = [pool.acquire() for _ in range(4)]
    server.wait_active(4)
    for conn in held:
        conn.release()
    server.wait_active(2)  # the server sees two closes now, not after idle_timeout
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.closed["idle"], s.released) == (2, 2, 0, 2, 4)
    with pool.get(), pool.get():  # the two kept are reused
        pass
    assert pool.stats().misses == 4 and server.connections_accepted == 4
    pool.close()


def test_max_idle_does_not_close_what_a_waiter_takes(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=2, max_idle=0)
    a, b = pool.acquire(), pool.acquire()
    waiter = gevent.spawn(pool.acquire, 5)
    gevent.sleep(0)
    a.release()  # handed straight to the waiter: max_idle counts idle ones only
    c = waiter.get(timeout=5)
    assert c.uses == 2 and pool.stats().closed["idle"] == 0
    b.release()
    c.release()
    server.wait_active(0)
    assert pool.stats().closed["idle"] == 2
    pool.close()


def test_max_idle_on_the_handoff_path_of_a_killed_waiter(
    server: EchoServer, no_fd_leak: None
) -> None:
    """A connection handed to a waiter killed before it woke goes back through
    ``_hand_on`` (not ``_return``): max_idle holds there too."""
    pool = make_pool(server, max_size=2, max_idle=1)
    a, b = pool.acquire(), pool.acquire()
    waiter = gevent.spawn(pool.acquire, 5)
    gevent.sleep(0)
    a.release()  # handed to the waiter, not awake yet
    b.release()  # nobody waits: idle (the one allowed)
    throw_now(waiter, gevent.GreenletExit())  # its handed connection is passed on
    server.wait_active(1)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.closed["idle"]) == (1, 1, 0, 1)
    assert_consistent(pool)
    pool.close()


def test_lowering_max_idle_by_reconfigure_closes_the_surplus(
    server: EchoServer, no_fd_leak: None
) -> None:
    pool = make_pool(server, max_size=4)
    for conn in [pool.acquire() for _ in range(4)]:
        conn.release()
    pool.reconfigure(
        pool=PoolConfig(min_idle=0, max_size=4, max_idle=1),
        dial=DialConfig(),
        health_check=HealthCheckConfig(),
    )
    server.wait_active(1)
    assert pool.stats().closed["idle"] == 3
    pool.close()


def test_refill_stops_at_max_idle(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, min_idle="auto", max_size=6, max_idle=2)
    held = [pool.acquire() for _ in range(5)]
    for conn in held[:3]:
        conn.discard()
    # auto wants 5 open (the peak in use); 2 are in use, and 2 idle is the most kept
    assert pool.fill() == 2
    pool.wait_ready(timeout=5)
    assert pool.fill() == 0
    assert pool.stats().idle == 2
    for conn in held[3:]:
        conn.release()
    assert pool.stats().closed["idle"] == 2
    pool.close()


def test_counters_are_exact_under_a_scripted_workload(server: EchoServer, no_fd_leak: None) -> None:
    pool = make_pool(server, max_size=2)
    a, b = pool.acquire(), pool.acquire()  # two dials: in use 2
    patient = gevent.spawn(pool.acquire, 5)
    hasty = gevent.spawn(pool.acquire, 0.05)
    gevent.sleep(0)
    with pytest.raises(PoolTimeout):
        hasty.get(timeout=5)  # a wait that timed out is still a wait
    a.release()  # handed to the patient waiter
    c = patient.get(timeout=5)
    b.discard()  # not a release: counted in closed
    with pytest.raises(RuntimeError), pool.get():  # a redial into b's slot ...
        raise RuntimeError("boom")  # ... discarded by the exception
    c.release()
    for _ in range(3):
        pool.acquire().release()
    s = pool.stats()
    assert (s.max_in_use, s.waits, s.released, s.timeouts) == (2, 2, 5, 1)
    assert (s.acquired, s.closed["discarded"], s.closed["error"]) == (7, 1, 1)
    # every acquisition ends as a release, a discard, or is still in use
    assert s.acquired == s.released + s.closed["discarded"] + s.closed["error"] + s.in_use
    d = s.to_dict()
    assert (d["max_in_use"], d["waits"], d["released"]) == (2, 2, 5)
    held = [pool.acquire() for _ in range(2)]
    assert pool.stats().max_in_use == 2
    for conn in held:
        conn.release()
    pool.close()


def test_max_in_use_counts_connections_handed_to_sleeping_waiters(
    server: EchoServer, no_fd_leak: None
) -> None:
    pool = make_pool(server, max_size=3)
    a, b, c = (pool.acquire() for _ in range(3))
    waiter = gevent.spawn(pool.acquire, 5)
    gevent.sleep(0)
    a.release()  # handed over, waiter asleep: still in use
    b.release()  # idle
    d = pool.acquire()  # in use now: c, d and the handed one
    assert pool.stats().max_in_use == 3
    e = waiter.get(timeout=5)
    for conn in (c, d, e):
        conn.release()
    assert pool.stats().max_in_use == 3
    pool.close()


def _burst(pool: Pool, workers: int, rounds: int) -> int:
    """``workers`` greenlets, each borrowing ``rounds`` times for a round trip, all at
    once; returns how many of those acquisitions dialed on the request path."""
    before = pool.stats().misses

    def work() -> None:
        for _ in range(rounds):
            with pool.get(timeout=5) as conn:
                conn.sendall(b"x")
                assert conn.recv(1) == b"x"

    jobs = [gevent.spawn(work) for _ in range(workers)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert all(job.dead for job in jobs)
    return pool.stats().misses - before


def test_min_idle_auto_keeps_a_periodic_burst_off_the_dialing_path(no_fd_leak: None) -> None:
    """Bursts of 6 concurrent borrowers, 0.9 s apart, idle_timeout 0.5 s. ``min_idle: 1``
    lets the quiet spell close all but one, so every burst dials most of its 6;
    ``auto`` remembers the peak (3 to 4 idle_timeouts) and keeps 6 open, so only the
    first burst dials. Both pools run side by side on real sockets."""
    workers, rounds, bursts, gap = 6, 12, 4, 0.9
    servers = {mode: EchoServer().start() for mode in ("auto", 1)}
    pools = {
        mode: Pool(
            servers[mode].address,
            pool=PoolConfig(
                min_idle=mode, max_size=8, idle_timeout=0.5, upkeep_interval=0.05, check_after=60
            ),
        )
        for mode in servers
    }
    try:
        for pool in pools.values():
            pool.wait_ready(timeout=5)
        dialed: dict[object, list[int]] = {mode: [] for mode in pools}
        for n in range(bursts):
            if n:
                gevent.sleep(gap)
            runs = {m: gevent.spawn(_burst, p, workers, rounds) for m, p in pools.items()}
            for mode, run in runs.items():
                dialed[mode].append(run.get(timeout=30))
        total = workers * rounds * bursts
        auto, fixed = dialed["auto"], dialed[1]
        assert sum(auto) / total < 0.05, dialed
        assert sum(auto[1:]) <= 1, dialed  # after the first burst: (almost) never
        assert all(d >= workers // 2 for d in fixed[1:]), dialed  # most of each burst
        s = pools["auto"].stats()
        assert s.max_in_use == workers and s.acquired == total
    finally:
        for mode, pool in pools.items():
            pool.close()
            servers[mode].stop()


def test_min_idle_auto_falls_when_demand_falls_and_refills_to_the_peak(
    server: EchoServer, no_fd_leak: None
) -> None:
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle="auto", max_size=8, idle_timeout=0.2, upkeep_interval=0.02),
    )
    pool.wait_ready(timeout=5)
    assert pool.stats().size == 1  # no demand seen yet: one, as min_idle 1
    held = [pool.acquire() for _ in range(5)]
    for conn in held[:4]:
        conn.discard()  # four of the peak's connections lost ...
    server.wait_accepted(9, timeout=5)  # ... and the upkeep dials them back
    server.wait_active(5, timeout=5)
    assert pool.stats().misses == 4  # the warm one, then 4 dials; refills are not misses
    held[4].release()
    start = monotonic()
    server.wait_active(1, timeout=10)  # then the quiet window passes: back to one
    # the peak is kept at least 3 idle_timeouts (a bucket ends every idle_timeout)
    assert monotonic() - start >= 0.6 - 0.05
    s = pool.stats()
    assert (s.size, s.max_in_use) == (1, 5)
    pool.close()


# -- close() right after the pool started greenlets of its own ------------------------


@pytest.mark.parametrize("work", ["refills", "background_checks"])
def test_close_before_its_own_greenlets_ran_gives_everything_back(
    echo_server: EchoServer, no_fd_leak: None, work: str
) -> None:
    """A refill or background check is a greenlet of the pool's own, counted (a slot,
    a connection off the idle stack) when spawned; ``close()`` right after, with no
    switch in between, kills it before it ever ran -- gevent then never runs its body,
    so the pool gives back what was counted for it: nothing stays counted, no socket
    stays open, and close returns at once instead of waiting out its timeout."""
    check = HealthCheckConfig(send="ping\n", expect="ping", interval=0.05)
    pool = Pool(
        echo_server.address,
        pool=PoolConfig(min_idle=2, max_size=4),
        health_check=check,
        upkeep=False,
    )
    if work == "refills":
        assert pool.fill() == 2  # two refill greenlets, not yet run
    else:
        pool.wait_ready(5)
        gevent.sleep(0.06)  # past health_check.interval: both idle ones are due
        pool.run_upkeep()  # two background checks, not yet run
        assert pool.stats().idle == 0
    # the two checks, counted as idle by upkeep: no refill dials for them
    assert pool.stats().pending == 2
    start = monotonic()
    pool.close(timeout=5)
    assert monotonic() - start < 2  # nothing left to wait for
    st = pool.stats()
    assert (st.size, st.idle, st.in_use, st.pending) == (0, 0, 0, 0), st
    assert settle(lambda: echo_server.active == 0, 5)


# -- background checks borrow connections, not slots to refill ------------------------

_PING = b"PING\r\n"


@contextlib.contextmanager
def _checked_pool(
    kind: str,
    server: EchoServer,
    make_manager: Callable[..., PoolManager],
    min_idle: int | str,
    hook: Callable[[Any], object] | None = None,
) -> Iterator[Callable[[], ServerStats]]:
    """A pool of ``server`` kept by a real upkeep (its own: ``kind`` "pool"; a manager's:
    "manager"), checked in the background every 20 ms (send/expect, then ``hook``),
    warmed; its stats. idle_timeout is short, so a surplus dial is closed again soon,
    as in the reported churn; max_size leaves room for one per check. Closed after."""
    pool_cfg: dict[str, Any] = {
        "min_idle": min_idle,
        "max_size": 8,
        "idle_timeout": 0.1,
        "upkeep_interval": 0.01,
    }
    check: dict[str, Any] = {"send": "PING\r\n", "expect": "+PONG", "interval": 0.02}
    if hook is not None:
        check["hook"] = hook
    if kind == "pool":
        pool = Pool(
            server.address,
            pool=PoolConfig.model_validate(pool_cfg),
            health_check=HealthCheckConfig.model_validate(check),
        )
        try:
            pool.wait_ready(5)
            yield pool.stats
        finally:
            pool.close()
        return
    manager = make_manager(
        {
            "defaults": {"pool": pool_cfg, "health_check": check},
            "backends": {"c": {"servers": [server.address]}},
        }
    )
    manager.wait_ready(5)
    yield lambda: manager.stats().backends["c"].servers[server.address]


@pytest.mark.parametrize("kind", ["pool", "manager"])
@pytest.mark.parametrize("min_idle", [1, 3, "auto"])
def test_background_checks_at_rest_dial_nothing(
    echo_server: EchoServer,
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
    kind: str,
    min_idle: int | str,
) -> None:
    """With no traffic, a pool checked in the background keeps exactly ``min_idle``
    connections (auto: 1) round after round: a connection upkeep has out for its
    check counts as idle, so no refill dials its replacement (which ``idle_timeout``
    or ``max_idle`` then closed: one new connection per round), and ``wait_ready``
    and ``stats`` agree on it."""
    want = 1 if min_idle == "auto" else int(min_idle)
    with _checked_pool(kind, echo_server, make_manager, min_idle) as stats:
        echo_server.wait_accepted(want, 5)
        rounds = 6  # each round: one PING per connection
        echo_server.wait_received(rounds * want * len(_PING), timeout=10)
        st = stats()
    assert echo_server.connections_accepted == want, st
    assert st.size == want, st
    assert st.size == st.idle + st.in_use + st.pending, st
    assert not any(st.closed.values()), st.closed
    assert st.dial_failures == 0


@pytest.mark.parametrize("kind", ["pool", "manager"])
def test_a_connection_failing_its_background_check_is_replaced(
    echo_server: EchoServer,
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
    kind: str,
) -> None:
    """The one connection whose background check fails is closed (``unhealthy``) and
    replaced by one dial; the pool is back at ``min_idle`` and stays there, with no
    further dials, through the rounds after."""
    calls: list[object] = []

    def fail_the_first(sock: Any) -> None:
        calls.append(sock)
        if len(calls) == 1:
            raise Unhealthy("the first check fails")

    with _checked_pool(kind, echo_server, make_manager, 2, fail_the_first) as stats:
        echo_server.wait_accepted(3, 5)  # two warmed, one replacing the failed one
        assert settle(lambda: stats().idle == 2, 5), stats()
        seen = len(calls)
        assert settle(lambda: len(calls) >= seen + 3 * 2, 5), len(calls)  # three more rounds
        st = stats()
    assert echo_server.connections_accepted == 3, st
    assert st.size == 2, st
    assert st.size == st.idle + st.in_use + st.pending, st
    assert {r: n for r, n in st.closed.items() if n} == {"unhealthy": 1}, st.closed


def test_a_failed_background_check_asks_for_its_replacement_at_once(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    """Step by step, with no upkeep loop: a check pass takes both idle connections out
    for their checks and starts no dial (``fill`` and ``wait_ready`` count them as
    idle; ``stats`` as pending). The check that fails frees its slot and, in that same
    step, asks upkeep for a refill (``on_demand``): its ``_checking`` count ended
    before its connection was closed. ``fill`` then dials exactly one."""
    failed = Event()
    asked: list[tuple[int, int, int]] = []

    def fail_the_first(sock: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise Unhealthy("the first check fails")

    pool = Pool(
        echo_server.address,
        pool=PoolConfig(min_idle=2, max_size=4),
        health_check=HealthCheckConfig(send="PING\r\n", expect="+PONG", interval=0.01),
        upkeep=False,
    )
    pool.health_config = pool.health_config.model_copy(update={"hook": fail_the_first})
    pool.wait_ready(5)
    echo_server.wait_accepted(2, 5)

    def on_demand() -> None:
        s = pool.stats()
        asked.append((s.size, s.idle, s.pending))

    pool.on_demand = on_demand
    gevent.sleep(0.02)  # past health_check.interval: both idle ones are due
    pool.run_upkeep()  # both out for their checks; nothing dialed for them
    st = pool.stats()
    assert (st.size, st.idle, st.pending) == (2, 0, 2), st
    assert pool.fill() == 0
    pool.wait_ready(5)  # ready: nothing to wait for, nothing dialed
    assert pool.stats().size == 2
    assert failed.wait(5)
    assert settle(lambda: pool.stats().pending == 0, 5), pool.stats()
    st = pool.stats()
    assert (st.size, st.idle, st.closed["unhealthy"]) == (1, 1, 1), st
    assert asked and asked[0][0] == 1, asked  # asked when the failed one's slot went
    assert pool.fill() == 1
    pool.wait_ready(5)
    echo_server.wait_accepted(3, 5)
    st = pool.stats()
    assert (st.size, st.idle, echo_server.connections_accepted) == (2, 2, 3), st
    pool.close()


# -- reconfigure: connections made the old way are retired ----------------------------
def _tagging_setup(made: list[object]) -> Callable[[object], None]:
    """A setup hook that records each socket it sets up in ``made``."""

    def setup(sock: object) -> None:
        made.append(sock)

    return setup


def _reconfigure(pool: Pool, **changes: object) -> None:
    """``pool.reconfigure`` with its current settings but ``changes`` (``pool`` fields,
    or ``dial``/``health_check``/``setup``/``weight`` whole)."""
    fields = {k: changes.pop(k) for k in list(changes) if k in PoolConfig.model_fields}
    pool.reconfigure(
        pool=pool.config.model_copy(update=fields),
        dial=cast(DialConfig, changes.pop("dial", pool.dial_config)),
        health_check=cast(HealthCheckConfig, changes.pop("health_check", pool.health_config)),
        setup=cast("Callable[[object], None] | None", changes.pop("setup", pool._setup)),
        weight=cast(int, changes.pop("weight", pool.weight)),
    )
    assert not changes


def test_reconfigure_new_setup_retires_the_old_connections(
    server: EchoServer, no_fd_leak: None
) -> None:
    """A new ``setup`` hook (a redis SELECT of another db, say): idle connections made
    with the old one close at once and are never lent again, the one in use closes when
    it comes back, and what is made from then on is made with the new hook."""
    old_made: list[object] = []
    new_made: list[object] = []
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=3, acquire_timeout=2),
        setup=_tagging_setup(old_made),
        upkeep=False,
    )
    with pool:
        held = [pool.acquire() for _ in range(3)]
        for conn in held[1:]:
            conn.release()
        assert pool.stats().idle == 2
        _reconfigure(pool, setup=_tagging_setup(new_made))
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.closed["lifetime"]) == (1, 0, 1, 2), st
        assert_consistent(pool)
        server.wait_active(1, timeout=5)  # the two idle ones are closed for real
        for _ in range(3):
            with pool.get() as conn:
                assert conn._conn is not None
                assert conn._conn.sock in new_made  # made with the new hook
                assert conn._conn.sock not in old_made
            assert_consistent(pool)
        held[0].release()  # in use at the reconfigure: closed, not pooled
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.closed["lifetime"]) == (1, 1, 0, 3), st
        assert [c.sock for c in pool._idle] == new_made
        assert len(old_made) == 3 and len(new_made) == 1


def test_reconfigure_retires_a_connection_dialed_the_old_way_in_flight(
    server: EchoServer, no_fd_leak: None
) -> None:
    """A refill dial that began before the reconfigure ends after it: its connection
    was made the old way, so it is closed instead of pooled; the next refill makes a
    new one."""
    gate = Event()
    entered = Event()
    new_made: list[object] = []

    def slow_old_setup(sock: object) -> None:
        entered.set()
        gate.wait(5)

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=1, max_size=2),
        setup=slow_old_setup,
        upkeep=False,
    )
    with pool:
        assert pool.fill() == 1
        assert entered.wait(5)
        _reconfigure(pool, setup=_tagging_setup(new_made))
        gate.set()
        assert settle(lambda: pool.stats().closed["lifetime"] == 1, 5)
        pool.wait_ready(5)  # the refill goes on: a new one
        st = pool.stats()
        assert (st.size, st.idle, st.pending, st.closed["lifetime"]) == (1, 1, 0, 1), st
        assert [c.sock for c in pool._idle] == new_made
        assert_consistent(pool)


def test_reconfigure_during_a_borrow_check_lends_a_new_connection(
    server: EchoServer, no_fd_leak: None
) -> None:
    """A connection under a borrow check while the reconfigure changes how connections
    are made is not lent when its check passes: closed, and the caller gets a new one."""
    gate = Event()
    entered = Event()

    def slow_check(sock: object) -> None:
        entered.set()
        gate.wait(5)

    new_made: list[object] = []
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2, check_after=0, acquire_timeout=5),
        health_check=HealthCheckConfig(hook=slow_check),  # type: ignore[arg-type]
        upkeep=False,
    )
    with pool:
        pool.acquire().release()
        old = pool._idle[0]
        g = gevent.spawn(pool.acquire)
        assert entered.wait(5)
        _reconfigure(pool, setup=_tagging_setup(new_made))
        gate.set()
        conn = g.get(timeout=5)
        assert conn._conn is not old
        assert conn._conn is not None and conn._conn.sock in new_made
        assert pool.stats().closed["lifetime"] == 1
        conn.release()
        assert_consistent(pool)


# each DialConfig field but timeout, changed: every one shapes the connections made
_DIAL_CHANGES: dict[str, object] = {
    "tcp_nodelay": False,
    "keepalive": False,
    "keepalive_idle": 60,
    "keepalive_interval": 10,
    "keepalive_count": 3,
    "tls": {"verify": False},
}


def test_every_dial_setting_but_the_timeout_is_covered() -> None:
    """A field added to DialConfig shapes connections unless said otherwise: this list
    has to name it (and the test below then checks it retires the old ones)."""
    assert set(DialConfig.model_fields) == {*_DIAL_CHANGES, "timeout"}


@pytest.mark.parametrize("field", sorted(_DIAL_CHANGES))
def test_reconfigure_new_dial_setting_retires_the_old_connections(
    server: EchoServer, no_fd_leak: None, field: str
) -> None:
    pool = make_pool(server, max_size=3)
    with pool:
        held = [pool.acquire() for _ in range(3)]
        for conn in held[1:]:
            conn.release()
        dial = DialConfig.model_validate({field: _DIAL_CHANGES[field]})
        _reconfigure(pool, dial=dial)
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.closed["lifetime"]) == (1, 0, 1, 2), st
        held[0].release()
        st = pool.stats()
        assert (st.size, st.idle, st.closed["lifetime"]) == (0, 0, 3), st
        assert_consistent(pool)


def test_reconfigure_that_shapes_nothing_retires_nothing(
    server: EchoServer, no_fd_leak: None
) -> None:
    """Sizing, timeouts, checks, weight, the dial's timeout, the same setup hook: the
    connections open are kept and lent again."""
    setup = _tagging_setup([])
    pool = Pool(server.address, pool=PoolConfig(min_idle=0, max_size=3), setup=setup, upkeep=False)
    with pool:
        held = [pool.acquire() for _ in range(3)]
        for conn in held[1:]:
            conn.release()
        kept = [*pool._idle, held[0]._conn]
        _reconfigure(
            pool,
            max_size=5,
            max_idle=4,
            acquire_timeout=3,
            idle_timeout=600,
            check_after=2,
            upkeep_interval=0.5,
            leak_threshold=60,
            dial=DialConfig(timeout=7),
            health_check=HealthCheckConfig(send="ping\n", expect="ping", interval=10),
            setup=setup,
            weight=3,
        )
        held[0].release()
        st = pool.stats()
        assert (st.size, st.idle, sum(st.closed.values())) == (3, 3, 0), st
        assert sorted(map(id, pool._idle)) == sorted(map(id, kept))
        assert_consistent(pool)


def test_reconfigure_lower_max_lifetime_retires_the_connections_past_it(
    server: EchoServer, no_fd_leak: None
) -> None:
    """Lowering ``max_lifetime`` rotates what is open: each connection's expiry is
    worked out again from its creation, so the idle ones already past it close at once
    and the one in use when it comes back; a new one lives out the new lifetime."""
    pool = make_pool(server, max_size=3, max_lifetime=3600, lifetime_jitter=0)
    with pool:
        held = [pool.acquire() for _ in range(3)]
        born = max(c.created_at for c in held)
        for conn in held[1:]:
            conn.release()
        while monotonic() - born < 0.05:  # the youngest is 50 ms old
            gevent.sleep(0.01)
        _reconfigure(pool, max_lifetime=0.04)
        st = pool.stats()
        assert (st.size, st.idle, st.in_use, st.closed["lifetime"]) == (1, 0, 1, 2), st
        held[0].release()
        assert pool.stats().closed["lifetime"] == 3
        fresh = pool.acquire()
        assert fresh._conn is not None
        assert fresh._conn.expires_at == pytest.approx(fresh.created_at + 0.04)
        fresh.discard()
        assert_consistent(pool)


def test_reconfigure_lifetime_applies_to_every_connection_on_every_path(
    server: EchoServer, no_fd_leak: None
) -> None:
    """A new ``max_lifetime``/``lifetime_jitter`` is worked out from each connection's
    creation whatever it was doing at the reconfigure (idle, in use, handed to a
    waiter not awake yet), and seen alike by release, idle reuse and upkeep."""
    pool = make_pool(server, max_size=2, max_lifetime=100, lifetime_jitter=0)
    with pool:
        a, b = pool.acquire(), pool.acquire()
        a.release()  # idle
        waiter = gevent.spawn(pool.acquire)
        gevent.sleep(0)  # queued
        conn_b = b._conn
        assert conn_b is not None
        b.release()  # handed to the waiter, not awake yet
        _reconfigure(pool, max_lifetime=1000, lifetime_jitter=0.5)
        idle = pool._idle[0]
        assert idle.created_at + 500 <= idle.expires_at <= idle.created_at + 1000
        handed = waiter.get(timeout=5)
        handed.release()  # brought up to date on its way back
        assert conn_b.created_at + 500 <= conn_b.expires_at <= conn_b.created_at + 1000
        pool.run_upkeep()  # upkeep's expiry check: nothing is past the new lifetime
        st = pool.stats()
        assert (st.size, st.idle, sum(st.closed.values())) == (2, 2, 0), st
        _reconfigure(pool, max_lifetime=0)  # and now every one is past it
        st = pool.stats()
        assert (st.size, st.idle, st.closed["lifetime"]) == (0, 0, 2), st
        assert_consistent(pool)


def test_a_server_that_speaks_first_is_named_once(
    echo_server_factory: Callable[..., EchoServer],
    caplog: pytest.LogCaptureFixture,
    no_fd_leak: None,
) -> None:
    """A greeting nobody reads makes every refill's connection look stirred before its
    first use: each is closed (it could hold anything), and the pool dialed again at
    every upkeep pass, for ever, with no word of why. One warning per pool now shows
    what the server sent and what reads it; refills after such a connection wait a
    second; the warning is logged from a greenlet of its own (a handler that yields
    -- here one that sleeps, as a socket handler may -- cannot run in the watcher's
    hub callback: the connection was lost between the idle stack and its retirement).
    A setup hook that reads the greeting keeps the connection."""

    class Yielding(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            gevent.sleep(0.01)

    yielding = Yielding()
    logging.getLogger("lbpool").addHandler(yielding)
    greeter = echo_server_factory(greeting=b"220 hello\r\n")
    config = PoolConfig(min_idle=1, max_size=2, upkeep_interval=0.05)
    try:
        with caplog.at_level("WARNING", logger="lbpool"):
            pool = Pool(greeter.address, pool=config)
            start = monotonic()
            assert settle(lambda: pool.stats().closed["unhealthy"] >= 2, 10)
            elapsed = monotonic() - start
            assert_consistent(pool)
            # paced: a second apart (it was one per 0.05 s upkeep pass)
            assert pool.stats().closed["unhealthy"] <= elapsed / 1.0 + 1.5
            pool.close()
    finally:
        logging.getLogger("lbpool").removeHandler(yielding)
    warned = [r.getMessage() for r in caplog.records if "speaks first" in r.getMessage()]
    assert len(warned) == 1, warned
    assert greeter.address in warned[0] and "setup hook" in warned[0]
    assert repr(b"220 hello\r\n") in warned[0]
    caplog.clear()

    def read_greeting(sock: Any) -> None:
        assert recv_exact(sock, 11) == b"220 hello\r\n"

    accepted = greeter.connections_accepted
    with caplog.at_level("WARNING", logger="lbpool"):
        reader = Pool(greeter.address, pool=config, setup=read_greeting)
        assert settle(lambda: reader.stats().idle == 1, 5)
        gevent.sleep(0.3)  # several upkeep passes: the connection stays
        s = reader.stats()
        assert (s.idle, s.closed["unhealthy"]) == (1, 0), s
        assert greeter.connections_accepted == accepted + 1  # dialed once
        with reader.get() as conn:
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"  # the caller reads its reply, not the greeting
        reader.close()
    assert not [r for r in caplog.records if "speaks first" in r.getMessage()]


def test_a_server_closing_unused_idle_connections_is_refilled_at_once(
    no_fd_leak: None,
) -> None:
    """A healthy server that closes connections idle for a while (redis ``timeout``,
    nginx ``keepalive_timeout``, a cloud load balancer) closes ``min_idle``
    connections nobody used. That is not a greeting: the refill is not paced (it was:
    ``wait_ready(1)`` right after such a close timed out, and pools with staggered
    connections sat below ``min_idle`` most of the time)."""
    from gevent.server import StreamServer

    idle_for = 1.3  # > the greeting window (Pool's _LOCAL_BACKOFF, 1 s after the dial)

    def handle(sock: Any, _address: Any) -> None:
        with contextlib.suppress(OSError):
            while True:
                with gevent.Timeout(idle_for, False):
                    data = sock.recv(100)
                    if not data:
                        return
                    sock.sendall(data)
                    continue
                return  # idle for idle_for: closed, as the server's idle timeout does

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        pool = Pool(
            f"127.0.0.1:{server.server_port}",
            pool=PoolConfig(min_idle=1, max_size=2, upkeep_interval=30),
        )
        pool.wait_ready(5)
        assert settle(lambda: pool.stats().closed["unhealthy"] == 1, 10)
        pool.wait_ready(1)  # refilled at once, not a second or an upkeep pass later
        assert pool.stats().idle == 1
        pool.close()
    finally:
        server.stop(timeout=2)
