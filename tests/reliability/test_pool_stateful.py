"""Property-based: the pool's invariants hold at every step of any interleaving of
acquire, release, discard, wait, timeout, kill, borrow and background checks, and
close -- and ``size == idle + in_use + pending`` at every greenlet switch in between
(a tracer checks it on each one: a connection under a check is counted as pending)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import greenlet
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lbpool import HealthCheckConfig, Pool, PoolClosed, PoolConfig, PoolTimeout
from lbpool.testing import EchoServer
from tests.support.interrupt import throw_now
from tests.support.leaks import fd_count

MAX_SIZE = 2
_server: EchoServer | None = None


@pytest.fixture(scope="module", autouse=True)
def _module_server() -> Iterator[None]:
    """One echo server for every example of the machine, stopped when the module ends."""
    global _server
    with EchoServer() as _server:
        yield
    _server = None


def shared_server() -> EchoServer:
    assert _server is not None, "the module fixture starts the server"
    return _server


def settle(pool: Pool | None = None, rounds: int = 5) -> None:
    """Let scheduled handoffs and wake-ups run (they are hub callbacks), and let dials
    in flight finish, so each step starts from a quiet pool (hypothesis replays steps
    and needs them to behave the same)."""
    for _ in range(rounds):
        gevent.sleep(0)
    if pool is not None:
        with gevent.Timeout(2, False):
            while pool._pending or pool._held:
                gevent.sleep(0.0005)
        for _ in range(rounds):
            gevent.sleep(0)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        server = shared_server()
        settle()
        self.baseline = fd_count()
        self.pool = Pool(
            server.address,
            pool=PoolConfig(min_idle=0, max_size=MAX_SIZE, acquire_timeout=5, check_after=1000),
            # a round trip, so a check yields: other rules' steps interleave with it
            health_check=HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=2),
            upkeep=False,
        )
        self.checkers: list[gevent.Greenlet] = []
        self.violations: list[str] = []
        self._previous_trace = greenlet.settrace(self._trace)
        self.held: list[Any] = []
        self.waiters: dict[int, gevent.Greenlet] = {}
        self.seq = 0
        self.served: list[int] = []
        self.closed = False
        self.releases = 0  # clean releases of a lent connection, before any close
        self.peak = 0  # the most in use seen at an invariant check

    # -- helpers -----------------------------------------------------------------
    def _trace(self, event: str, args: Any) -> None:
        """On every greenlet switch: the sizes add up (as ``stats()`` adds them)."""
        pool = self.pool
        if event in ("switch", "throw") and not pool._closing:
            counted = len(pool._idle) + len(pool._busy) + pool._handed
            counted += pool._pending + pool._held
            if pool._size != counted and len(self.violations) < 5:
                self.violations.append(f"size {pool._size} != {counted}: {pool!r}")
        if self._previous_trace is not None:
            self._previous_trace(event, args)

    def _spawn_waiter(self, timeout: float) -> None:
        seq = self.seq
        self.seq += 1

        def wait() -> None:
            conn = self.pool.acquire(timeout=timeout)
            self.served.append(seq)
            self.held.append(conn)

        self.waiters[seq] = gevent.spawn(wait)
        settle(self.pool)  # let it queue (or take a free slot) before the next step

    def _queued_seqs(self) -> list[int]:
        by_greenlet = {g: s for s, g in self.waiters.items()}
        return [by_greenlet[w.greenlet] for w in self.pool._waiters if w.greenlet in by_greenlet]

    # -- rules -------------------------------------------------------------------
    @initialize(holders=st.integers(0, MAX_SIZE), waiters=st.integers(0, 3))
    def start_busy(self, holders: int, waiters: int) -> None:
        """Start from a full pool with a queue, often: that is where handoffs race."""
        for _ in range(holders + (waiters if holders == MAX_SIZE else 0)):
            self._spawn_waiter(timeout=5)

    # Rules carry no preconditions on timing-dependent state (hypothesis needs the same
    # draws on replay); a rule with nothing to act on is a no-op.
    @rule()
    def acquire_or_wait(self) -> None:
        self._spawn_waiter(timeout=5)

    @rule()
    def wait_with_short_timeout(self) -> None:
        self._spawn_waiter(timeout=0.002)
        self.waiters[self.seq - 1].join(timeout=2)  # served at once, or times out

    @rule(
        i=st.integers(min_value=0),
        how=st.sampled_from(["release", "discard", "error", "with"]),
        wake=st.booleans(),
    )
    def give_back(self, i: int, how: str, wake: bool) -> None:
        if not self.held:
            return
        conn = self.held.pop(i % len(self.held))
        if how == "release":
            self.releases += not self.closed  # after a close it was force-closed already
            conn.release()
        elif how == "discard":
            conn.discard()
        elif how == "error":
            conn.discard(ConnectionResetError("peer reset"))
        else:
            try:
                with conn:
                    raise KeyError("application error")
            except KeyError:
                pass
        if how != "release":
            self.pool.breaker.record_success()  # keep the breaker out of this test
        if wake:  # else the handoff stays pending: the next rule may interrupt it
            settle(self.pool)

    @rule(i=st.integers(min_value=0))
    def release_twice(self, i: int) -> None:
        if not self.held:
            return
        conn = self.held.pop(i % len(self.held))
        self.releases += not self.closed
        conn.release()
        conn.release()  # a no-op: not counted twice
        settle(self.pool)

    @rule(i=st.integers(min_value=0), exc=st.sampled_from(["kill", "timeout"]))
    def interrupt_waiter(self, i: int, exc: str) -> None:
        alive = [g for g in self.waiters.values() if not g.dead]
        if not alive:
            return
        g = alive[i % len(alive)]
        throw_now(g, gevent.Timeout(0) if exc == "timeout" else gevent.GreenletExit())
        settle(self.pool)

    @rule(
        i=st.integers(min_value=0),
        j=st.integers(min_value=0),
        exc=st.sampled_from(["kill", "timeout"]),
    )
    def release_then_interrupt(self, i: int, j: int, exc: str) -> None:
        """A release hands a connection on; an interrupt lands before the wake-up."""
        self.give_back(i, "release", wake=False)
        self.interrupt_waiter(j, exc)

    @rule()
    def check_on_next_borrow(self) -> None:
        """The idle connections are due a check: the next borrows run it (and yield)."""
        for conn in self.pool._idle:
            conn.checked_at = float("-inf")

    @rule()
    def background_check(self) -> None:
        """Upkeep's check of every idle connection, in its own greenlet, left running:
        the next rules' steps interleave with it."""
        self.checkers.append(gevent.spawn(self.pool._check_idle, float("inf")))
        gevent.sleep(0)

    @rule()
    def let_time_pass(self) -> None:
        gevent.sleep(0.003)
        settle(self.pool)

    @rule(timeout=st.sampled_from([0.0, 0.01]))
    def close(self, timeout: float) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.close(timeout)
        settle(self.pool)

    # -- invariants --------------------------------------------------------------
    @invariant()
    def sizes_add_up(self) -> None:
        assert not self.violations, self.violations
        s = self.pool.stats()
        assert s.size <= MAX_SIZE, s
        if not self.closed:
            assert s.size == s.idle + s.in_use + s.pending, s
            assert len(self.pool._busy) == len(self.held), (s, len(self.held))
            assert s.waiting == len(self._queued_seqs()), s

    @invariant()
    def usage_counters_add_up(self) -> None:
        s = self.pool.stats()
        self.peak = max(self.peak, s.in_use)
        assert self.peak <= s.max_in_use <= MAX_SIZE, (self.peak, s)
        assert s.waiting <= s.waits <= self.seq, s  # each caller queues at most once
        assert s.released == self.releases, (self.releases, s)
        if not self.closed:  # every borrow ends released or discarded, or is in use
            ended = s.released + s.closed["discarded"] + s.closed["error"]
            assert s.acquired == ended + len(self.pool._busy), s

    @invariant()
    def first_come_first_served(self) -> None:
        queued = self._queued_seqs()
        assert queued == sorted(queued)
        if queued:
            assert all(s < queued[0] for s in self.served), (self.served, queued)

    @invariant()
    def waiters_end_only_as_expected(self) -> None:
        for g in self.waiters.values():
            if g.dead and g.exception is not None:
                assert isinstance(g.exception, (PoolTimeout, PoolClosed, gevent.Timeout)), repr(
                    g.exception
                )

    def teardown(self) -> None:
        greenlet.settrace(self._previous_trace)
        gevent.joinall(self.checkers, timeout=2)
        for g in self.waiters.values():
            g.kill(block=False)
        settle(self.pool)
        for conn in self.held:
            conn.release()
        self.pool.close(timeout=1)
        gevent.joinall(list(self.waiters.values()), timeout=2)
        assert all(g.dead for g in self.waiters.values())
        assert self.pool.stats().size == 0
        with gevent.Timeout(2, False):
            while fd_count() > self.baseline:  # the echo server closes its side on EOF
                gevent.sleep(0.005)
        assert fd_count() <= self.baseline


PoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolInvariants = PoolMachine.TestCase
