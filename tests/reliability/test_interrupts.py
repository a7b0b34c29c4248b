"""Interruptions at every yield point of a manager acquisition, and none in release.

Each test drives one acquisition (``manager.acquire("svc")``) until its greenlet is
parked at one precise yield point -- found by the pool's state (its waiter queue, its
errands, its drain event: the compiled hot path has no Python frames) and, where
there are Python frames, by walking them, or by an Event a hook sets -- and then
interrupts it there, with ``GreenletExit`` (a kill) or a
``gevent.Timeout`` (the very timer object the caller armed, as gevent itself would
throw it). Nothing here relies on a sleep landing at the right moment.

For every (point x interruption) the same things must hold: no lost slot (``size ==
idle + in_use + pending`` at once, everything 0 after ``close``), no stranded waiter (a
caller queued behind the interrupted one is still served), no leaked socket
(``no_fd_leak``) and no lbpool greenlet left behind.

Yield points covered (acquire): queued in the pool's waiter list; handed a connection,
woken not yet; handed a dial permit, woken not yet; inside the TCP connect; inside a
Happy Eyeballs race of two addresses; waiting for an errand (a dial or check that may
outlast the caller's deadline, in its own greenlet); inside the
TLS handshake; inside the ``setup`` hook and inside a borrow check's hook (both
errands: a hook may swallow its timer, so the caller waits for it, never runs it);
inside the borrow send/expect check; in an upkeep refill dial (also as the breaker's
half-open trial); and the drain wait of ``close``. Release: proven to never switch
greenlets, in every state it can meet, with a greenlet switch tracer.
"""

from __future__ import annotations

import contextlib
import socket as stdsocket
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import greenlet
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from lbpool import ConnectionReleased, PoolClosed, PoolManager
from lbpool.pool import Pool
from lbpool.testing import EchoServer, FaultProxy, hot_path, recv_exact
from tests.support.interrupt import no_switch, throw_now
from tests.support.leaks import new_lbpool_greenlets, settle
from tests.support.tls import TLSCerts

KINDS = ["kill", "timeout"]
WAIT = 5.0  # bound on every wait for a greenlet to reach its point


# -- helpers ---------------------------------------------------------------------------


def frames_of(g: greenlet.greenlet) -> list[str]:
    names = []
    frame = g.gr_frame
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def wait_in(g: greenlet.greenlet, function: str) -> None:
    """Block (polling, bounded) until ``g`` is suspended inside ``function`` (a Python
    function: one of the pool's is found by the pool's state, ``wait_queued`` etc.)."""
    assert settle(lambda: function in frames_of(g), WAIT), (function, frames_of(g))


# Compiled (mypyc) functions make no Python frames: in lbpool.pool's, a greenlet's
# place is found by the pool's state alone; on the pure path, by its frames as well.
COMPILED = hot_path() == "compiled"


def in_pool_function(g: greenlet.greenlet, function: str) -> bool:
    return COMPILED or function in frames_of(g)


def pools_of(manager: PoolManager) -> list[Pool]:
    return [pool for backend in manager.backends.values() for pool in backend.pools]


def queued(manager: PoolManager, g: greenlet.greenlet) -> bool:
    """Is ``g`` parked in a pool's waiter queue (``Pool.acquire``)?"""
    return any(w.greenlet is g for pool in pools_of(manager) for w in pool._waiters)


def wait_queued(manager: PoolManager, g: greenlet.greenlet) -> None:
    """Block (polling, bounded) until ``g`` is parked in ``Pool.acquire``, queued."""
    assert settle(lambda: queued(manager, g) and in_pool_function(g, "acquire"), WAIT), frames_of(g)


def wait_for_errand(manager: PoolManager, g: greenlet.greenlet) -> None:
    """Block (polling, bounded) until ``g`` is parked in ``Pool._await_errand``: not
    queued, and joining a live errand of its pool (the join's link is the only one an
    errand gets)."""

    def parked() -> bool:
        joined = any(e.has_links() and not e.dead for p in pools_of(manager) for e in p._dialers)
        return joined and not g.dead and not queued(manager, g)

    assert settle(lambda: parked() and in_pool_function(g, "_await_errand"), WAIT), frames_of(g)


class Caller:
    """One acquisition in its own greenlet, armed with its own ``gevent.Timeout``.

    ``interrupt("timeout")`` throws that very timer object into the greenlet -- what
    gevent does when it expires -- and ``interrupt("kill")`` kills the greenlet; with
    ``now=True`` both are delivered synchronously (``throw_now``), before callbacks
    already queued on the hub (a pending handoff) can run.
    """

    def __init__(self, manager: PoolManager, name: str = "svc") -> None:
        self.conn: Any = None
        self.timer = gevent.Timeout(3600)
        self.greenlet = gevent.spawn(self._run, manager, name)

    def _run(self, manager: PoolManager, name: str) -> None:
        self.timer.start()
        try:
            self.conn = manager.acquire(name)
        finally:
            self.timer.close()

    def interrupt(self, kind: str, *, now: bool = False) -> None:
        g = self.greenlet
        exc: BaseException = gevent.GreenletExit() if kind == "kill" else self.timer
        if now:
            throw_now(g, exc)
        elif kind == "kill":
            g.kill(block=True, timeout=WAIT)
        else:
            g.kill(exc, block=True, timeout=WAIT)
        assert g.join(WAIT) is None or g.dead
        assert g.dead
        assert self.conn is None  # it never got a connection
        expected = gevent.GreenletExit if kind == "kill" else gevent.Timeout
        assert isinstance(g.exception, expected) or (kind == "kill" and g.exception is None)

    def served(self) -> Any:
        assert self.greenlet.join(WAIT) is None or self.greenlet.dead
        assert self.greenlet.successful(), self.greenlet.exception
        assert self.conn is not None
        return self.conn


def the_pool(manager: PoolManager) -> Pool:
    return manager.backends["svc"].pools[0]


def assert_consistent(manager: PoolManager) -> None:
    for backend in manager.backends.values():
        for pool in backend.pools:
            s = pool.stats()
            assert s.size == s.idle + s.in_use + s.pending, s
            assert s.size <= s.max_size, s
            assert s.waiting == len(pool._waiters), s


def round_trip(conn: Any, payload: bytes = b"ping") -> None:
    conn.settimeout(WAIT)
    conn.sendall(payload)
    assert recv_exact(conn, len(payload)) == payload


def finish(manager: PoolManager, *conns: Any) -> None:
    """Give everything back, close, and check that nothing is left anywhere."""
    for conn in conns:
        if conn is not None:
            conn.release()
    pools = [p for b in manager.backends.values() for p in b.pools]
    assert_consistent(manager)
    manager.close(timeout=WAIT)
    for pool in pools:
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.pending, s.waiting) == (0, 0, 0, 0, 0), s
    assert settle(lambda: not new_lbpool_greenlets(), WAIT), new_lbpool_greenlets()


def config(
    addresses: list[str],
    *,
    pool: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    pool_cfg: dict[str, Any] = {
        "min_idle": 0,
        "max_size": 1,
        # longer than dial.timeout and health_check.timeout (30 s): dials and checks
        # run in the caller's greenlet (shorter deadlines run them as errands: see
        # the errand tests below)
        "acquire_timeout": 90,
        "check_after": 3600,
        "upkeep_interval": 3600,  # upkeep only where a test runs it
    }
    pool_cfg.update(pool or {})
    backend: dict[str, Any] = {
        "servers": addresses,
        "pool": pool_cfg,
        "dial": {"timeout": 30},
        "breaker": {"failure_threshold": 5, "recovery_timeout": 60},
    }
    backend.update(sections)
    return {"backends": {"svc": backend}}


class Gate:
    """A hook that parks its caller on an Event: the interrupt lands exactly inside it."""

    def __init__(self) -> None:
        self.entered = Event()
        self.open = Event()
        self.calls = 0

    def __call__(self, sock: Any) -> None:
        self.calls += 1
        self.entered.set()
        assert self.open.wait(30)

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT)
        self.entered.clear()


class BacklogServer:
    """A listener whose accept queue is full: a connect to it hangs in SYN_SENT (no
    SYN-ACK) until ``unblock()`` starts accepting. The only way to park a greenlet inside
    a real ``connect()`` on loopback."""

    def __init__(self) -> None:
        self.listener = gsocket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.fillers: list[Any] = []
        self.accepted: list[Any] = []
        self._acceptor: gevent.Greenlet | None = None
        for _ in range(4):
            f = stdsocket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(self.listener.getsockname())
            self.fillers.append(f)

    def unblock(self) -> None:
        for f in self.fillers:
            f.close()
        self.fillers.clear()
        self._acceptor = gevent.spawn(self._accept_forever)

    def _accept_forever(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            self.accepted.append(sock)

    def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.kill()
        for s in self.fillers + self.accepted:
            s.close()
        self.listener.close()


@pytest.fixture
def backlog() -> Iterator[BacklogServer]:
    server = BacklogServer()
    yield server
    server.close()


@pytest.fixture
def server(echo_server_factory: Callable[..., EchoServer]) -> EchoServer:
    return echo_server_factory()


# -- waiting in the queue, and the two handoff windows ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_while_queued(server: EchoServer, no_fd_leak: None, kind: str) -> None:
    manager = PoolManager(config([server.address]))
    holder = manager.acquire("svc")
    victim = Caller(manager)
    wait_queued(manager, victim.greenlet)
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)
    assert the_pool(manager).stats().waiting == 2
    victim.interrupt(kind)
    assert the_pool(manager).stats().waiting == 1  # left no trace in the queue
    assert_consistent(manager)
    holder.release()
    conn = follower.served()  # not stranded behind the dead waiter
    round_trip(conn)
    assert conn.uses == 2
    finish(manager, conn)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("handed", ["connection", "permit"])
def test_interrupt_after_handoff_before_wakeup(
    server: EchoServer, no_fd_leak: None, kind: str, handed: str
) -> None:
    """The handoff is done (a connection, or a permit to dial into a freed slot) but the
    waiter's wake-up is still a queued hub callback when the interrupt lands."""
    manager = PoolManager(config([server.address]))
    holder = manager.acquire("svc")
    victim = Caller(manager)
    wait_queued(manager, victim.greenlet)
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)
    if handed == "connection":
        holder.release()  # handed straight to the victim
    else:
        holder.discard()  # the slot is freed: the victim is handed a permit to dial
    pool = the_pool(manager)
    assert pool.stats().waiting == 1  # the victim was popped: the handoff happened
    victim.interrupt(kind, now=True)
    conn = follower.served()  # what the victim was handed went on to the follower
    round_trip(conn)
    assert conn.uses == (2 if handed == "connection" else 1)
    assert server.connections_accepted == (1 if handed == "connection" else 2)
    assert_consistent(manager)
    finish(manager, conn)


# -- inside the dial: connect, TLS handshake, setup hook ----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_connect(backlog: BacklogServer, no_fd_leak: None, kind: str) -> None:
    manager = PoolManager(config([backlog.address]))
    victim = Caller(manager)
    wait_in(victim.greenlet, "_connect")  # lbpool.dial._connect, inside sock.connect
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)  # max_size 1: the dial in flight holds the slot
    assert the_pool(manager).stats().pending == 1
    victim.interrupt(kind)
    backlog.unblock()
    conn = follower.served()  # got the freed slot (a permit) and dialed
    pool = the_pool(manager)
    assert pool.breaker.failure_count == 0  # an interruption is no verdict on the server
    assert pool.stats().dial_failures == 0
    assert_consistent(manager)
    finish(manager, conn)


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_tls_handshake(tls_certs: TLSCerts, no_fd_leak: None, kind: str) -> None:
    with (
        EchoServer(ssl_context=tls_certs.server_context()) as tls_server,
        FaultProxy(tls_server.address) as proxy,
    ):
        proxy.blackhole()  # accepted, but the ClientHello is never answered
        manager = PoolManager(
            config(
                [proxy.address],
                dial={
                    "timeout": 30,
                    "tls": {"ca_file": tls_certs.ca_file, "server_hostname": "localhost"},
                },
            )
        )
        victim = Caller(manager)
        wait_in(victim.greenlet, "do_handshake")
        follower = Caller(manager)
        wait_queued(manager, follower.greenlet)
        victim.interrupt(kind)
        proxy.recover()
        conn = follower.served()
        round_trip(conn)
        assert the_pool(manager).breaker.failure_count == 0
        assert_consistent(manager)
        finish(manager, conn)


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_setup_hook(server: EchoServer, no_fd_leak: None, kind: str) -> None:
    """A dial with a setup hook runs as an errand (the hook may swallow its timer), so
    the caller is parked waiting for it: interrupted there, the errand goes on with
    its slot and hands its connection to the caller queued behind."""
    gate = Gate()
    manager = PoolManager(config([server.address], setup=gate))
    victim = Caller(manager)
    gate.wait_entered()
    wait_for_errand(manager, victim.greenlet)
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)
    victim.interrupt(kind)
    s = the_pool(manager).stats()
    assert (s.size, s.pending, s.waiting) == (1, 1, 1), s  # the errand keeps its slot
    assert_consistent(manager)
    gate.open.set()
    conn = follower.served()
    round_trip(conn)
    assert gate.calls == 1  # the errand's connection, handed on
    assert the_pool(manager).breaker.failure_count == 0
    finish(manager, conn)


# -- inside the borrow health check ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_borrow_send_expect(
    server: EchoServer, no_fd_leak: None, kind: str
) -> None:
    manager = PoolManager(
        config(
            [server.address],
            pool={"check_after": 0},
            health_check={"send": "PING\r\n", "expect": "+PONG", "timeout": 30},
        )
    )
    manager.acquire("svc").release()  # one idle connection, due for a check on borrow
    server.mode = "silent"  # the check's PING is read but never answered
    victim = Caller(manager)
    wait_in(victim.greenlet, "_recv_exact_prefix")
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)
    victim.interrupt(kind)
    s = the_pool(manager).stats()
    assert s.closed["unhealthy"] == 1  # the checked one is closed, not lost, not reused
    server.mode = "echo"
    conn = follower.served()  # the freed slot went to the follower, who dialed
    round_trip(conn)
    assert conn.uses == 1
    finish(manager, conn)


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_borrow_health_hook(
    server: EchoServer, no_fd_leak: None, kind: str
) -> None:
    gate = Gate()
    manager = PoolManager(
        config(
            [server.address],
            pool={"check_after": 0},
            health_check={"hook": gate, "timeout": 30},
        )
    )
    manager.acquire("svc").release()
    victim = Caller(manager)
    gate.wait_entered()
    wait_for_errand(manager, victim.greenlet)  # a check with a hook is an errand
    follower = Caller(manager)
    wait_queued(manager, follower.greenlet)
    victim.interrupt(kind)
    assert_consistent(manager)
    gate.open.set()
    conn = follower.served()
    round_trip(conn)
    assert conn.uses == 2  # the check went on, passed, and handed its connection on
    finish(manager, conn)


# -- a refill dial (upkeep), also as the breaker's half-open trial --------------------------


def refill_dialer(pool: Pool) -> gevent.Greenlet:
    assert settle(lambda: len(pool._dialers) == 1, WAIT)
    return next(iter(pool._dialers))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trial", [False, True], ids=["closed", "half_open_trial"])
def test_interrupt_during_refill_dial(
    server: EchoServer, no_fd_leak: None, kind: str, trial: bool
) -> None:
    """A refill dial runs in a greenlet of the pool's own, which nothing but close()
    interrupts from outside: whatever else arrives there (a GreenletExit, a
    gevent.Timeout) is its setup hook's doing (DESIGN 20), so it is a failed dial --
    the slot is freed, a trial ends failed, the failure counts -- and upkeep goes on."""
    gate = Gate()
    manager = PoolManager(
        config(
            [server.address],
            pool={"min_idle": 1},
            setup=gate,
            # closed: one failure must not open it (the follower is served after it)
            breaker={"failure_threshold": 1 if trial else 2, "recovery_timeout": 0.05},
        )
    )
    pool = the_pool(manager)
    dialer = refill_dialer(pool)  # the manager's first upkeep pass started it
    gate.wait_entered()
    if trial:  # make the next refill the breaker's half-open trial
        gate.open.set()
        assert settle(lambda: pool.stats().idle == 1, WAIT)
        gate.open.clear()
        with pytest.raises(ConnectionResetError), manager.get("svc"):
            raise ConnectionResetError("peer reset")  # opens the breaker (threshold 1)
        assert pool.breaker.state == "open"
        assert settle(lambda: pool.breaker.state == "half_open", WAIT)
        assert pool.fill() == 1
        dialer = refill_dialer(pool)
        gate.wait_entered()
        assert pool.breaker.trial_in_flight
    follower: Caller | None = None
    if not trial:  # (while the trial is in flight the server is not eligible: no queue)
        follower = Caller(manager)
        wait_queued(manager, follower.greenlet)  # max_size 1: the refill holds the slot
    if kind == "kill":
        dialer.kill(block=True, timeout=WAIT)
    else:
        dialer.kill(gevent.Timeout(), block=True, timeout=WAIT)
    assert dialer.dead
    assert pool._refilling == 0
    assert not pool.breaker.trial_in_flight  # the trial ended, failed
    s = pool.stats()
    assert s.dial_failures == 1, s  # counted as a failed dial
    gate.open.set()
    if follower is not None:
        assert (s.size, s.pending, s.waiting) == (1, 1, 0), s  # the slot: a permit to it
        conn = follower.served()
    else:
        assert (s.size, s.pending) == (0, 0), s
        assert s.breaker_state == "open"  # the failed trial re-opened it
        assert settle(lambda: pool.breaker.state == "half_open", WAIT)
        conn = manager.acquire("svc")  # the next caller may run the trial
    round_trip(conn)
    assert pool.breaker.state == "closed"
    finish(manager, conn)


# -- waiting for an errand: a dial or check that may outlast the caller's deadline ----------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("then", ["verdict", "close"])
def test_interrupt_while_waiting_for_a_dial_errand(
    backlog: BacklogServer, no_fd_leak: None, kind: str, then: str
) -> None:
    """acquire_timeout (5 s) < dial.timeout (30 s): the dial is an errand. The caller,
    interrupted while it waits, leaves; the dial goes on to its verdict (its connection
    handed on to the idle stack), or is stopped by close -- no slot lost either way."""
    manager = PoolManager(config([backlog.address], pool={"acquire_timeout": 5}))
    victim = Caller(manager)
    wait_for_errand(manager, victim.greenlet)
    pool = the_pool(manager)
    assert len(pool._dialers) == 1
    victim.interrupt(kind)
    s = pool.stats()
    assert (s.size, s.pending) == (1, 1), s  # the errand still holds its slot
    assert_consistent(manager)
    if then == "verdict":
        backlog.unblock()
        assert settle(lambda: pool.stats().idle == 1, WAIT)
        assert pool.stats().pending == 0
        conn = manager.acquire("svc")
        assert conn.uses == 1  # the errand's connection (the backlog server does not echo)
        assert backlog.listener.getsockname()[1] == int(conn.address.rsplit(":", 1)[1])
        finish(manager, conn)
    else:
        finish(manager)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("then", ["verdict", "close"])
def test_interrupt_while_waiting_for_a_check_errand(
    server: EchoServer, no_fd_leak: None, kind: str, then: str
) -> None:
    gate = Gate()
    manager = PoolManager(
        config(
            [server.address],
            pool={"check_after": 0, "acquire_timeout": 5},
            health_check={"hook": gate, "timeout": 30},
        )
    )
    manager.acquire("svc").release()
    victim = Caller(manager)
    gate.wait_entered()
    wait_for_errand(manager, victim.greenlet)
    victim.interrupt(kind)
    pool = the_pool(manager)
    s = pool.stats()
    assert (s.size, s.idle, s.pending) == (1, 0, 1), s  # the connection is with its check
    assert_consistent(manager)
    if then == "verdict":
        gate.open.set()
        assert settle(lambda: pool.stats().idle == 1, WAIT)  # passed: handed back
        assert pool.breaker.failure_count == 0
        conn = manager.acquire("svc", timeout=60)
        assert conn.uses == 2
        round_trip(conn)
        finish(manager, conn)
    else:
        finish(manager)
        gate.open.set()


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_a_happy_eyeballs_race(
    backlog: BacklogServer, no_fd_leak: None, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name resolving to two addresses, both hanging: the caller waits on the race
    (two attempt greenlets). Interrupted there, every attempt is stopped and closed."""
    import lbpool.dial

    port = int(backlog.address.rsplit(":", 1)[1])
    info = (stdsocket.AF_INET, stdsocket.SOCK_STREAM, 6, "", ("127.0.0.1", port))
    monkeypatch.setattr(lbpool.dial, "resolve", lambda host, port, timeout=None: [info, info])
    manager = PoolManager(config([f"two.example:{port}"]))
    victim = Caller(manager)
    wait_in(victim.greenlet, "_connect")
    pool = the_pool(manager)

    def attempts() -> list[gevent.Greenlet]:
        return [g for g in new_lbpool_greenlets() if g._run is lbpool.dial._attempt_into]

    assert settle(lambda: len(attempts()) == 2, WAIT)  # the second after ATTEMPT_DELAY
    victim.interrupt(kind)
    assert not attempts()  # stopped with the caller (their sockets closed: no_fd_leak)
    assert pool.breaker.failure_count == 0 and pool.stats().dial_failures == 0
    s = pool.stats()
    assert (s.size, s.pending) == (0, 0), s
    finish(manager)


# -- the drain wait of close -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_during_close_drain_wait(server: EchoServer, no_fd_leak: None, kind: str) -> None:
    manager = PoolManager(config([server.address], pool={"max_size": 2}))
    held = manager.acquire("svc")
    manager.acquire("svc").release()  # and one idle
    pool = the_pool(manager)
    timer = gevent.Timeout(3600)

    def closing() -> None:
        timer.start()
        try:
            manager.close(timeout=30)
        finally:
            timer.close()

    closer = gevent.spawn(closing)
    # parked in close's drain wait: the pool refuses, its idle one is closed, and
    # close() is suspended waiting for the held connection to come back
    assert settle(
        lambda: (
            pool.closed
            and pool._drained.linkcount() > 0  # close() waits on it, and nothing else does
            and in_pool_function(closer, "close")
        ),
        WAIT,
    )
    assert pool.stats().idle == 0
    if kind == "kill":
        closer.kill(block=True, timeout=WAIT)
    else:
        throw_now(closer, timer)
        assert closer.join(WAIT) is None or closer.dead
    assert closer.dead
    with pytest.raises(PoolClosed):
        manager.acquire("svc")
    held.release()  # comes back after the interrupted close: closed, not pooled
    with pytest.raises(ConnectionReleased):
        held.sendall(b"x")
    manager.close(timeout=WAIT)  # a second close is harmless
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending, s.waiting) == (0, 0, 0, 0, 0), s
    assert settle(lambda: not new_lbpool_greenlets(), WAIT), new_lbpool_greenlets()


def test_close_wakes_manager_waiters_with_pool_closed(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    a, b = echo_server_factory(), echo_server_factory()
    manager = PoolManager(config([a.address, b.address]))
    held = [manager.acquire("svc"), manager.acquire("svc")]  # both servers full
    waiter = Caller(manager)
    wait_queued(manager, waiter.greenlet)
    closer = gevent.spawn(manager.close, WAIT)
    assert waiter.greenlet.join(WAIT) is None or waiter.greenlet.dead
    for conn in held:
        conn.release()
    closer.join(WAIT)
    assert isinstance(waiter.greenlet.exception, PoolClosed), repr(waiter.greenlet.exception)


@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_close_then_second_close_forces(
    server: EchoServer, no_fd_leak: None, kind: str
) -> None:
    """A close interrupted while connections are still out: a later ``close(timeout)``
    must still honour its own timeout (force-close the rest, leave no greenlet), not
    return at once while the first close's drain goes on in the background."""
    manager = PoolManager(config([server.address]))
    held = manager.acquire("svc")
    pool = the_pool(manager)
    closer = gevent.spawn(manager.close, 30)
    assert settle(lambda: pool.closed, WAIT)
    if kind == "kill":
        closer.kill(block=True, timeout=WAIT)
    else:
        closer.kill(gevent.Timeout(), block=True, timeout=WAIT)
    try:
        manager.close(timeout=0.05)
        assert pool.stats().size == 0, pool.stats()  # forced by the second close
        assert not new_lbpool_greenlets(), new_lbpool_greenlets()
    finally:
        held.release()  # harmless after a forced close


# -- release never yields ------------------------------------------------------------------


RELEASE_CASES = [
    "idle",  # back onto the idle stack
    "handoff",  # straight to a waiter
    "permit",  # a discard frees a slot: a waiter gets a permit
    "network_error",  # a discard that opens the breaker (logs a warning)
    "with_exception",  # an exception escaping ``with``
    "over_lifetime",  # closed on release
    "shrunk",  # reload shrank max_size: closed on release
    "closing",  # the manager is closing: closed on release
    "after_forced_close",  # a late release after close(timeout) forced it
    "removed_server",  # reload removed its server: the drain closes it
    "twice",  # the second release is a no-op
]


@pytest.mark.parametrize("case", RELEASE_CASES)
def test_release_never_yields(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None, case: str
) -> None:
    a, b = echo_server_factory(), echo_server_factory()
    pool_cfg: dict[str, Any] = {"max_size": 2}
    if case == "over_lifetime":
        pool_cfg.update(max_lifetime=0, lifetime_jitter=0)
    manager = PoolManager(
        config([a.address], pool=pool_cfg, breaker={"failure_threshold": 1, "recovery_timeout": 60})
    )
    conn = manager.acquire("svc")
    other = manager.acquire("svc")
    round_trip(conn)
    waiter: Caller | None = None
    closer: gevent.Greenlet | None = None
    if case in ("handoff", "permit"):
        waiter = Caller(manager)
        wait_queued(manager, waiter.greenlet)
    if case == "shrunk":
        manager.reload(config([a.address], pool={"max_size": 1}))
    if case == "removed_server":
        manager.reload(config([b.address]))
    if case == "closing":
        pool = the_pool(manager)
        closer = gevent.spawn(manager.close, WAIT)
        assert settle(lambda: pool.closed, WAIT)
    if case == "after_forced_close":
        manager.close(timeout=0)

    if case in ("permit", "network_error"):
        no_switch(lambda: conn.discard(ConnectionResetError("reset") if case != "permit" else None))
    elif case == "with_exception":

        def leave_with_error() -> None:
            with contextlib.suppress(KeyError), conn:
                raise KeyError("application error")

        no_switch(leave_with_error)
    elif case == "twice":
        no_switch(conn.release)
        no_switch(conn.release)
        no_switch(conn.discard)
    else:
        no_switch(conn.release)
    with pytest.raises(ConnectionReleased):
        conn.sendall(b"x")

    if waiter is not None:
        got = waiter.served()
        got.release()
    other.release()
    if closer is not None:
        closer.join(WAIT)
        assert closer.successful()
    if case == "network_error":
        assert settle(lambda: True)
    manager.close(timeout=WAIT)
    assert settle(lambda: not new_lbpool_greenlets(), WAIT), new_lbpool_greenlets()
