"""One deadline bounds everything an acquisition does (DESIGN 14, 17, 18).

Each test is a situation from the field: a server that accepts and then hangs, a
setup hook blocked on something other than the socket, connects that never complete
while callers' deadlines are shorter than ``dial.timeout``, a name whose first
address is unreachable. In every one a caller never waits past its timeout plus
scheduling slack (``SLACK``), and the work cut short still reaches its verdict.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

import lbpool.dial
from lbpool import DialError, LbpoolError, PoolManager, PoolTimeout
from lbpool.config import Address, DialConfig, HealthCheckConfig, PoolConfig
from lbpool.pool import Pool
from lbpool.testing import EchoServer, recv_exact
from tests.support.leaks import settle

pytestmark = pytest.mark.timeout(30)

SLACK = 0.5  # scheduling slack on a shared 2-core machine


def opened_event(manager: PoolManager, address: str, state: str = "open") -> Event:
    """An Event set when ``address``'s breaker enters ``state``."""
    event = Event()

    def listener(backend: str, addr: str, old: str, new: str) -> None:
        if addr == address and new == state:
            event.set()

    manager.add_breaker_listener(listener)
    return event


def timed_get(manager: PoolManager, timeout: float) -> tuple[str | None, float]:
    """(address served, or None on PoolTimeout; seconds taken)."""
    start = monotonic()
    try:
        with manager.get("b", timeout=timeout) as conn:
            served: str | None = conn.address
    except PoolTimeout:
        served = None
    return served, monotonic() - start


def test_hung_server_borrow_checks_bounded_by_deadline_and_charged(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    no_fd_leak: None,
) -> None:
    """A server that accepts but stops answering, idle connections due for a 1 s check,
    callers with 0.3 s: each check gets at most the time left, no further idle
    connection is taken past the deadline, no unchecked fresh connection is lent, and
    the checks cut short go on to their verdict -- so the hung server's breaker opens
    and callers fail over to the healthy one."""
    hung, good = echo_server_factory(), echo_server_factory()
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": [hung.address, good.address],
                    "pool": {"min_idle": 3, "max_size": 6, "check_after": 0},
                    "health_check": {"send": "PING\r\n", "expect": "+PONG", "timeout": 1},
                    "breaker": {"failure_threshold": 2, "recovery_timeout": 60},
                }
            }
        }
    )
    opened = opened_event(manager, hung.address)
    manager.wait_ready(5)
    hung.mode = "silent"  # reads every PING, answers none
    outcomes = []
    for _ in range(6):
        served, took = timed_get(manager, 0.3)
        assert took < 0.3 + SLACK, (served, took)
        outcomes.append(served)
    assert hung.address not in outcomes  # never a connection to the hung server
    assert opened.wait(5)  # the checks went on to their 1 s verdicts and were charged
    for _ in range(6):
        served, took = timed_get(manager, 0.3)
        assert served == good.address and took < 0.3 + SLACK


def test_borrow_checks_that_use_up_the_deadline_end_the_acquisition(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    """Idle connections due for a check whose hook fails after 0.15 s, a caller with
    0.25 s: the first check fails, the next gets what is left and is cut short, no
    further idle connection is taken past the deadline, and the acquisition ends there
    with ``PoolTimeout``: no dial, no wait on a fresh deadline. One timeout counted."""
    server = echo_server_factory()
    checks: list[float] = []

    def hook(sock: Any) -> None:
        checks.append(monotonic())
        gevent.sleep(0.15)
        raise RuntimeError("unhealthy")

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=3, check_after=0),
        health_check=HealthCheckConfig(hook=hook, timeout=1.0),
        upkeep=False,
    )
    try:
        held = [pool.acquire(timeout=5) for _ in range(3)]  # dialed: not checked
        for conn in held:
            conn.release()
        start = monotonic()
        with pytest.raises(PoolTimeout, match="acquire deadline passed during borrow checks"):
            pool.acquire(timeout=0.25)
        assert monotonic() - start < 0.25 + SLACK
        s = pool.stats()
        assert (s.timeouts, s.misses, s.waits) == (1, 3, 0), s
        assert 1 <= len(checks) <= 2, checks
    finally:
        pool.close()


def test_setup_hook_runs_within_the_dial_budget(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    """A setup hook that waits on something other than the socket: running out of the
    dial's budget is a failed dial (counted), never a connection handed back late."""
    server = echo_server_factory()
    never = Event()

    def setup(sock: Any) -> None:
        never.wait(30)  # a lock, a queue: not the socket, so its timeout cannot help

    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2),
        dial=DialConfig(timeout=0.5),
        setup=setup,
        upkeep=False,
    )
    start = monotonic()
    with pytest.raises(DialError, match="setup hook"):
        pool.acquire(timeout=5)
    assert monotonic() - start < 0.5 + SLACK
    assert pool.stats().dial_failures == 1
    # a caller whose deadline is shorter than the dial's: on time, and the dial it
    # started still reaches its verdict (a failed dial) after dial.timeout
    start = monotonic()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.2)
    assert monotonic() - start < 0.2 + SLACK
    assert settle(lambda: pool.stats().dial_failures == 2, 5)
    s = pool.stats()
    assert (s.size, s.pending) == (0, 0), s
    pool.close()


def test_connect_timeouts_open_the_breaker_whatever_the_callers_deadlines(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    black_hole: Address,
    no_fd_leak: None,
) -> None:
    """Connects to one server never complete; callers use 0.3 s, dial.timeout is 1 s.
    Each dial a caller gives up on goes on to its verdict, so the breaker opens and
    every later caller is served by the other server."""
    good = echo_server_factory()
    dead = str(black_hole)
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": [dead, good.address],
                    "pool": {"min_idle": 0, "max_size": 4},
                    "dial": {"timeout": 1},
                    "breaker": {"failure_threshold": 2, "recovery_timeout": 60},
                }
            }
        }
    )
    opened = opened_event(manager, dead)
    for _ in range(4):
        served, took = timed_get(manager, 0.3)
        assert took < 0.3 + SLACK
    assert opened.wait(5)
    for _ in range(6):
        served, took = timed_get(manager, 0.3)
        assert served == good.address and took < 0.3 + SLACK
    # a caller whose deadline allows a full dial fails over on its own
    manager.backends["b"].pools[0].breaker.reset()
    for _ in range(2):  # whichever server round robin picks first
        served, took = timed_get(manager, 3)
        assert served == good.address and took < 1 + SLACK


def test_name_with_an_unreachable_first_address(
    echo_server_factory: Callable[..., EchoServer],
    black_hole: Address,
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    """A name resolving to [unreachable, serving]: Happy Eyeballs starts the second
    address 250 ms after the first, so a get takes ~0.25 s, not dial.timeout."""
    good = echo_server_factory()
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (black_hole.host, black_hole.port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (good.host, good.port)),
    ]
    monkeypatch.setattr(lbpool.dial, "resolve", lambda host, port, timeout=None: infos)
    pool = Pool(
        Address("two.example", good.port),
        pool=PoolConfig(min_idle=0, max_size=2),
        dial=DialConfig(timeout=2),
        upkeep=False,
    )
    for _ in range(2):
        start = monotonic()
        conn = pool.acquire(timeout=5)
        assert monotonic() - start < lbpool.dial.ATTEMPT_DELAY + SLACK
        conn.settimeout(2)
        conn.sendall(b"hi")
        assert recv_exact(conn, 2) == b"hi"
        conn.discard()  # next one dials again
    assert pool.stats().dial_failures == 0
    pool.close()


def invariant_holds(pool: Pool) -> bool:
    s = pool.stats()
    return s.size == s.idle + s.in_use + s.pending


@pytest.mark.parametrize("strategy", ["round_robin", "least_active", "weighted", "random"])
def test_no_queue_behind_dials_that_never_complete_while_another_server_can_serve(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    black_hole: Address,
    strategy: str,
    no_fd_leak: None,
) -> None:
    """Three servers, max_size 1: one refuses connects, one's only slot is a dial to a
    black hole (it will not complete for 20 s), one is momentarily full (its connection
    in use). A caller with 3 s, whichever server the strategy picks first and wherever
    failover then leads it, must queue where a release can serve it -- not behind the
    dial -- and be served as soon as the connection in use comes back."""
    good = echo_server_factory()
    with gsocket.socket() as closed_port:  # bound, not listening: connects are refused
        closed_port.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed_port.getsockname()[1]}"
        hole = str(black_hole)
        manager = make_manager(
            {
                "backends": {
                    "b": {
                        "strategy": strategy,
                        "servers": [refused, hole, good.address],
                        "pool": {"min_idle": 0, "max_size": 1},
                        "dial": {"timeout": 20},
                        "breaker": {"failure_threshold": 1000},
                    }
                }
            }
        )
        pools = {p.name: p for p in manager.backends["b"].pools}
        dialing = gevent.spawn(pools[hole].acquire, 25)  # its one slot: a hanging dial
        assert settle(lambda: pools[hole].stats().pending == 1, 5)
        held = pools[good.address].acquire(timeout=5)
        for _ in range(6):
            caller = gevent.spawn(timed_get, manager, 3)
            assert settle(lambda: sum(p.stats().waiting for p in pools.values()) == 1, 5)
            assert pools[hole].stats().waiting == 0  # queued where a release can serve it
            held.release()
            served, took = caller.get(timeout=5)
            assert served == good.address and took < 1 + SLACK, (served, took)
            held = pools[good.address].acquire(timeout=5)
        held.release()
        dialing.kill(block=True, timeout=5)
        assert all(invariant_holds(p) for p in pools.values())
        assert pools[hole].breaker.failure_count == 0  # no caller was charged for it


class SwallowingHook:
    """A hostile hook: waits on ``gate`` and swallows every exception thrown into it
    (the dial's or check's timer, a caller's ``gevent.Timeout``) until the gate opens
    or ``limit`` passes; only sockets to ``port`` (None: every socket) are held."""

    def __init__(self, port: int | None = None, limit: float = 8.0) -> None:
        self.port = port
        self.limit = limit
        self.gate = Event()
        self.entered = Event()
        self.swallowed = Event()
        self.done = Event()

    def __call__(self, sock: Any) -> None:
        if self.port is not None and sock.getpeername()[1] != self.port:
            return
        self.entered.set()
        end = monotonic() + self.limit
        while not self.gate.is_set() and monotonic() < end:
            try:
                self.gate.wait(end - monotonic())
            except BaseException:  # hostile on purpose
                self.swallowed.set()
        self.done.set()


def test_setup_hook_that_swallows_its_timeout_cannot_hold_the_caller(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    """A setup hook catches the dial's timer and goes on waiting. The caller (5 s,
    dial.timeout 0.3 s) leaves with a DialError soon after the dial's budget, not when
    the hook returns; the late hook is a failed dial, its socket closed, its slot freed.
    The same hook returning within the budget after a short-deadline caller left: its
    connection goes to the idle stack."""
    server = echo_server_factory()
    hook = SwallowingHook()
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2),
        dial=DialConfig(timeout=0.3),
        setup=hook,
        upkeep=False,
    )
    start = monotonic()
    with pytest.raises(DialError, match="overran"):
        pool.acquire(timeout=5)
    assert monotonic() - start < 0.3 + SLACK
    assert hook.swallowed.wait(5) and not hook.done.is_set()  # still running, alone
    s = pool.stats()
    assert (s.size, s.pending) == (1, 1), s  # its slot is held until it ends
    hook.gate.set()
    assert hook.done.wait(5)
    assert settle(lambda: pool.stats().dial_failures == 1, 5)  # late: a failed dial
    s = pool.stats()
    assert (s.size, s.idle, s.pending) == (0, 0, 0), s
    # within the dial's budget, after the caller left: the connection is kept
    pool.dial_config = DialConfig(timeout=5)
    hook.gate.clear()
    hook.done.clear()
    start = monotonic()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.2)
    assert monotonic() - start < 0.2 + SLACK
    hook.gate.set()
    assert hook.done.wait(5)
    assert settle(lambda: pool.stats().idle == 1, 5)
    s = pool.stats()
    assert (s.size, s.pending, s.dial_failures) == (1, 0, 1), s
    assert invariant_holds(pool)
    pool.close()


@pytest.mark.parametrize("strategy", ["round_robin", "least_active", "weighted", "random"])
def test_swallowing_setup_hook_on_one_server_callers_fail_over_on_time(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    strategy: str,
    no_fd_leak: None,
) -> None:
    """The hook holds dials to one server past dial.timeout (swallowing its timer):
    whichever server a caller picks first, it is served by the other one within the
    dial's budget plus slack, never held until the hook lets go."""
    stuck, good = echo_server_factory(), echo_server_factory()
    hook = SwallowingHook(port=stuck.port)
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "strategy": strategy,
                    "servers": [stuck.address, good.address],
                    "pool": {"min_idle": 0, "max_size": 4},
                    "dial": {"timeout": 0.3},
                    "breaker": {"failure_threshold": 1000},
                    "setup": hook,
                }
            }
        }
    )
    for _ in range(4):
        start = monotonic()
        with manager.get("b", timeout=5) as conn:
            assert conn.address == good.address
        assert monotonic() - start < 0.3 + SLACK
    hook.gate.set()
    pools = manager.backends["b"].pools
    assert settle(lambda: all(p.stats().pending == 0 for p in pools), 5)
    assert all(invariant_holds(p) for p in pools)
    assert pools[0].stats().idle == 0  # every late hook was a failed dial, closed


def test_health_hook_that_swallows_its_timeout_cannot_hold_a_borrow(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    """A borrow check's hook catches the check's timer and goes on waiting. The caller
    (5 s, check timeout 0.3 s) gives up on that connection soon after the check's
    timeout and is served by a new one; the late hook fails its connection (closed,
    counted unhealthy), and every slot is accounted for."""
    server = echo_server_factory()
    hook = SwallowingHook()
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=2, check_after=0),
        health_check=HealthCheckConfig(hook=hook, timeout=0.3),
        upkeep=False,
    )
    first = pool.acquire(timeout=5)  # a new connection is not checked
    first.release()
    start = monotonic()
    conn = pool.acquire(timeout=5)  # the idle one is checked: the hook holds it
    assert monotonic() - start < 0.3 + SLACK
    assert hook.swallowed.is_set() and not hook.done.is_set()
    s = pool.stats()
    assert (s.size, s.in_use, s.pending) == (2, 1, 1), s  # one lent, one under check
    hook.gate.set()
    assert hook.done.wait(5)
    assert settle(lambda: pool.stats().closed["unhealthy"] == 1, 5)
    conn.release()
    s = pool.stats()
    assert (s.size, s.idle, s.pending) == (1, 1, 0), s
    assert invariant_holds(pool)
    pool.close()


@pytest.mark.parametrize("where", ["dial_errand", "refill", "borrow_check", "manager"])
def test_close_abandons_a_greenlet_whose_hook_swallows_the_kill(
    echo_server_factory: Callable[..., EchoServer],
    make_manager: Callable[..., PoolManager],
    where: str,
    caplog: pytest.LogCaptureFixture,
    no_fd_leak: None,
) -> None:
    """A hook (setup or health) that swallows every exception, ``GreenletExit`` too,
    runs in a greenlet of the pool's own (a dial errand a caller left, an upkeep
    refill, a borrow check). ``close(timeout=0.5)`` closes its socket, kills it, and
    when it will not die abandons it, logged at WARNING naming the pool: close returns
    within its timeout (not when the hook ends, 8 s later), with every slot given back;
    when the hook ends at last, nothing is counted twice."""
    server = echo_server_factory()
    hook = SwallowingHook()
    if where == "manager":
        manager = make_manager(
            {
                "backends": {
                    "b": {
                        "servers": [server.address],
                        "pool": {"min_idle": 0},
                        "setup": hook,
                        "dial": {"timeout": "1s"},
                    }
                }
            }
        )
        with pytest.raises(PoolTimeout):
            manager.acquire("b", timeout=0.2)
        pool = manager._all_pools()[0]
    else:
        setup = hook if where in ("dial_errand", "refill") else None
        pool = Pool(
            server.address,
            pool=PoolConfig(min_idle=1 if where == "refill" else 0, max_size=1, check_after=0),
            dial=DialConfig(timeout=1),
            health_check=HealthCheckConfig(hook=hook if setup is None else None, timeout=0.3),
            setup=setup,
            upkeep=where == "refill",
        )
        if where == "dial_errand":
            with pytest.raises(PoolTimeout):
                pool.acquire(timeout=0.2)
        elif where == "borrow_check":
            pool.acquire(timeout=5).release()  # a new connection is not checked
            with pytest.raises(PoolTimeout):
                pool.acquire(timeout=0.2)  # the idle one is checked: the hook holds it
    assert hook.entered.wait(5) and not hook.done.is_set()
    start = monotonic()
    if where == "manager":
        manager.close(timeout=0.5)
    else:
        pool.close(timeout=0.5)
    assert monotonic() - start < 0.5 + SLACK  # the hook holds on for 8 s
    assert not hook.done.is_set()
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (0, 0, 0, 0), s
    assert any(
        r.levelname == "WARNING" and pool.name in r.getMessage() and "abandoned" in r.getMessage()
        for r in caplog.records
    )
    hook.gate.set()  # the abandoned greenlet ends now: it must give back nothing twice
    assert hook.done.wait(5)
    assert settle(lambda: not pool._dialers, 5)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (0, 0, 0, 0), s
    assert (pool._held, pool._refilling, pool._checking, pool._handed) == (0, 0, 0, 0)


class FailThenHoldHook:
    """A setup hook: dials to ``fail_port`` fail after ``fail_after`` s; dials to any
    other server wait on ``gate`` (held past every caller's deadline)."""

    def __init__(self, fail_port: int, fail_after: float) -> None:
        self.fail_port = fail_port
        self.fail_after = fail_after
        self.failing = Event()  # a dial to fail_port is in the hook
        self.holding = Event()  # a dial to another server is in the hook
        self.gate = Event()

    def __call__(self, sock: Any) -> None:
        if sock.getpeername()[1] == self.fail_port:
            self.failing.set()
            gevent.sleep(self.fail_after)
            raise OSError("refused by the test's setup hook")
        self.holding.set()
        self.gate.wait(30)


@pytest.mark.parametrize("route", ["get", "get with timeout", "Backend.acquire", "call"])
def test_one_server_backend_fails_over_within_the_first_deadline(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    route: str,
    no_fd_leak: None,
) -> None:
    """A one-server backend's acquisition goes straight to its server (no pick); its
    dial fails after 0.8 s, by which time a reload has added a second server, whose
    dial hangs. The failover there gets what is left of the first deadline (2 s in
    all), not a fresh one: the caller leaves at 2 s, not 2.8 s."""
    first, second = echo_server_factory(), echo_server_factory()
    hook = FailThenHoldHook(first.port, fail_after=0.8)

    def config(*servers: str) -> dict[str, Any]:
        backend = {
            "servers": list(servers),
            "pool": {"min_idle": 0, "max_size": 2, "acquire_timeout": 2.0},
            "dial": {"timeout": 10},
            "breaker": {"failure_threshold": 1000},
            "setup": hook,
        }
        return {"backends": {"b": backend}}

    manager = make_manager(config(first.address))

    def borrow() -> tuple[BaseException | None, float]:
        start = monotonic()
        try:
            if route == "get":
                manager.get("b").release()
            elif route == "Backend.acquire":  # the same path, not inlined
                manager.backends["b"].acquire().release()
            elif route == "call":  # through Backend.acquire
                manager.call("b", lambda conn: None)
            else:
                manager.get("b", timeout=2.0).release()
        except LbpoolError as exc:
            return exc, monotonic() - start
        return None, monotonic() - start

    caller = gevent.spawn(borrow)
    assert hook.failing.wait(5)
    manager.reload(config(first.address, second.address))
    error, took = caller.get(timeout=10)
    hook.gate.set()
    assert hook.holding.is_set()  # it did fail over to the new server
    assert isinstance(error, PoolTimeout), error
    assert 2.0 - 0.05 <= took < 2.0 + SLACK, took
