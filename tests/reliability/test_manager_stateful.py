"""Property-based: the manager's invariants hold at every step of any interleaving of
acquire, release, discard (network error), timeouts, killed waiters, servers going down
and coming back, breaker recovery, reloads (servers added/removed, resized, strategy
changed) and close -- checked against a simple model of who holds what.

Determinism for hypothesis: every rule settles the hub (handoffs are callbacks; dials on
loopback finish promptly) before the next one; the breakers run on a clock the machine
owns (``advance_clock``), so half-open comes when a rule says so, not when the wall
clock happens to pass a recovery timeout; no rule has a precondition on
timing-dependent state (a rule with nothing to act on is a no-op).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lbpool import (
    BackendUnavailable,
    ConnectionReleased,
    PoolClosed,
    PoolManager,
    PoolTimeout,
)
from lbpool.pool import Pool
from lbpool.testing import EchoServer
from tests.support.interrupt import throw_now
from tests.support.leaks import fd_count

N_SERVERS = 3
RECOVERY = 10.0  # breaker recovery_timeout, on the machine's clock
STATES = {"closed", "open", "half_open"}
_servers: list[EchoServer] = []


@pytest.fixture(scope="module", autouse=True)
def _module_servers() -> Iterator[None]:
    """The echo servers every example shares, stopped when the module ends."""
    _servers.extend(EchoServer().start() for _ in range(N_SERVERS))
    try:
        yield
    finally:
        for server in _servers:
            server.stop()
        _servers.clear()


def shared_servers() -> list[EchoServer]:
    assert _servers, "the module fixture starts the servers"
    for server in _servers:
        if not server.listening:  # a previous example left it down
            server.start()
    return _servers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(
    addresses: list[str], max_size: int = 2, strategy: str = "round_robin"
) -> dict[str, Any]:
    return {
        "backends": {
            "svc": {
                "strategy": strategy,
                "servers": addresses,
                "pool": {
                    "min_idle": 0,
                    "max_size": max_size,
                    "acquire_timeout": 5,
                    "check_after": 0,  # every borrow peeks: a dead server's idle ones go
                    "upkeep_interval": 3600,  # no background pass between steps
                },
                "dial": {"timeout": 2},
                "breaker": {
                    "failure_threshold": 2,
                    "recovery_timeout": RECOVERY,
                    "max_recovery_timeout": RECOVERY * 4,
                },
            }
        }
    }


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.servers = shared_servers()
        self.pools: list[Pool] = []  # every pool the manager ever had
        self.settle()
        self.baseline = fd_count()
        self.clock = FakeClock()
        self.manager = PoolManager(config([s.address for s in self.servers]))
        self.track_pools()
        self.held: list[Any] = []
        self.released: list[Any] = []
        self.waiters: list[gevent.Greenlet] = []
        self.closed = False
        self.settle()

    # -- helpers -------------------------------------------------------------------------
    def track_pools(self) -> None:
        """Adopt new pools: their breakers run on the machine's clock."""
        for backend in self.manager.backends.values():
            for pool in backend.pools:
                if pool not in self.pools:
                    pool.breaker._clock = self.clock
                    self.pools.append(pool)

    def live_pools(self) -> list[Pool]:
        return [p for b in self.manager.backends.values() for p in b.pools]

    def settle(self, rounds: int = 5) -> None:
        """Run queued handoffs and wake-ups; let dials in flight finish (bounded)."""
        for _ in range(rounds):
            gevent.sleep(0)
        with gevent.Timeout(2, False):
            while any(p.stats().pending for p in self.pools):
                gevent.sleep(0.0005)
        for _ in range(rounds):
            gevent.sleep(0)

    def _acquire(self, timeout: float) -> None:
        conn = self.manager.acquire("svc", timeout=timeout)
        self.held.append(conn)

    def spawn_acquire(self, timeout: float) -> gevent.Greenlet:
        g = gevent.spawn(self._acquire, timeout)
        self.waiters.append(g)
        self.settle()
        return g

    def take(self, i: int) -> Any:
        return self.held.pop(i % len(self.held))

    # -- rules ---------------------------------------------------------------------------
    @initialize(busy=st.integers(0, 6), waiting=st.integers(0, 2))
    def start_busy(self, busy: int, waiting: int) -> None:
        """Often start from full pools with a queue: where handoffs and shrinks race."""
        for _ in range(busy + (waiting if busy == 6 else 0)):
            self.spawn_acquire(timeout=5)

    @rule()
    def acquire(self) -> None:
        self.spawn_acquire(timeout=5)

    @rule()
    def acquire_short_timeout(self) -> None:
        g = self.spawn_acquire(timeout=0.002)
        g.join(timeout=2)  # served at once, or timed out

    @rule(
        i=st.integers(min_value=0),
        how=st.sampled_from(["release", "discard", "error", "with_error", "use"]),
    )
    def give_back(self, i: int, how: str) -> None:
        if not self.held:
            return
        conn = self.take(i)
        if how == "release":
            conn.release()
        elif how == "discard":
            conn.discard()
        elif how == "error":
            conn.discard(ConnectionResetError("peer reset"))
        elif how == "with_error":
            try:
                with conn:
                    raise KeyError("application error")
            except KeyError:
                pass
        else:  # a real round trip; a dead server shows as an OSError: discarded
            try:
                with conn:
                    conn.settimeout(2)
                    conn.sendall(b"hello")
                    if conn.recv(5) != b"hello":
                        raise ConnectionResetError("closed")
            except OSError:
                pass
        self.released.append(conn)
        self.settle()

    @rule(i=st.integers(min_value=0), kind=st.sampled_from(["kill", "timeout"]), wake=st.booleans())
    def interrupt_waiter(self, i: int, kind: str, wake: bool) -> None:
        """Interrupt a queued waiter; with ``wake=False`` a release first hands it a
        connection whose wake-up is still pending: the interrupt lands in that window."""
        alive = [g for g in self.waiters if not g.dead]
        if not alive:
            return
        if not wake and self.held:
            conn = self.take(0)
            conn.release()
            self.released.append(conn)
        g = alive[i % len(alive)]
        throw_now(g, gevent.GreenletExit() if kind == "kill" else gevent.Timeout(0))
        self.settle()

    @rule(j=st.integers(0, N_SERVERS - 1))
    def server_down(self, j: int) -> None:
        self.servers[j].stop()
        self.settle()

    @rule(j=st.integers(0, N_SERVERS - 1))
    def server_up(self, j: int) -> None:
        self.servers[j].start()
        self.settle()

    @rule(seconds=st.sampled_from([RECOVERY / 2, RECOVERY * 1.01, RECOVERY * 5]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(
        servers=st.lists(
            st.integers(0, N_SERVERS - 1), min_size=1, max_size=N_SERVERS, unique=True
        ),
        max_size=st.integers(1, 3),
        strategy=st.sampled_from(["round_robin", "least_active", "weighted", "random"]),
    )
    def reload(self, servers: list[int], max_size: int, strategy: str) -> None:
        cfg = config([self.servers[j].address for j in servers], max_size, strategy)
        if self.closed:
            try:
                self.manager.reload(cfg)
            except PoolClosed:
                return
            raise AssertionError("reload of a closed manager must raise PoolClosed")
        self.manager.reload(cfg)
        self.track_pools()
        self.settle()

    @rule(timeout=st.sampled_from([0.0, 0.01]))
    def close(self, timeout: float) -> None:
        if self.closed:
            self.manager.close(timeout)  # twice is harmless
            return
        self.closed = True
        self.manager.close(timeout)
        self.settle()

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def pools_add_up(self) -> None:
        live = self.live_pools()
        for pool in self.pools:
            s = pool.stats()
            assert s.breaker_state in STATES, s
            if self.closed:
                assert s.size == s.idle == s.in_use == s.pending == s.waiting == 0, s
                continue
            assert s.size == s.idle + s.in_use + s.pending, s
            # never above max_size, except by connections in use when a reload shrank it
            assert s.size <= s.max_size or (s.idle == 0 and s.pending == 0), s
            if pool not in live:  # removed by a reload: draining
                assert s.draining and s.idle == 0 and s.waiting == 0, s
        if self.closed:
            return
        for pool in live:  # DESIGN 22: per server, draining pools' slots count too
            s = pool.stats()
            draining = sum(
                p.stats().size for p in self.pools if p not in live and p.name == s.address
            )
            assert pool._inherited == draining, (pool._inherited, draining, s)
            # above max_size only by connections in use when a reload shrank it or
            # removed and added the server back: nothing idle, nothing dialing
            assert s.size + draining <= s.max_size or (s.idle == 0 and s.pending == 0), s

    @invariant()
    def model_matches(self) -> None:
        if self.closed:
            return
        busy = sum(len(p._busy) for p in self.pools)
        assert busy == len(self.held), (busy, len(self.held))
        queued = sum(len(p._waiters) for p in self.pools)
        assert queued == sum(1 for g in self.waiters if not g.dead)  # settled: no one mid-handoff
        for pool in self.live_pools():
            s = pool.stats()
            if s.waiting:  # nobody waits while a slot or an idle connection is free
                # (slots a draining pool of the same server still holds are not free)
                assert s.size + pool._inherited >= s.max_size and s.idle == 0, s

    @invariant()
    def released_handles_are_dead(self) -> None:
        for conn in self.released[-5:]:
            assert conn.released
            try:
                conn.sendall(b"x")
            except ConnectionReleased:
                pass
            else:
                raise AssertionError("a released handle could still write")

    @invariant()
    def waiters_end_only_as_expected(self) -> None:
        for g in self.waiters:
            if g.dead and g.exception is not None:
                assert isinstance(
                    g.exception,
                    (PoolTimeout, PoolClosed, BackendUnavailable, gevent.Timeout),
                ), repr(g.exception)

    def teardown(self) -> None:
        # what this run reached, for --hypothesis-show-statistics
        for pool in self.pools:
            s = pool.stats()
            if s.breaker_trips:
                event("a breaker tripped")
            if s.breaker_state == "closed" and s.breaker_trips:
                event("a breaker recovered")
            if s.timeouts:
                event("an acquisition timed out")
            if s.closed["unhealthy"]:
                event("a dead idle connection was caught on borrow")
            if s.draining:
                event("a removed server drained")
        for g in self.waiters:
            if g.dead and g.exception is not None:
                event(f"waiter ended with {type(g.exception).__name__}")
        for g in self.waiters:
            g.kill(block=False)
        self.settle()
        for conn in self.held:
            conn.release()
        self.manager.close(timeout=1)
        gevent.joinall(self.waiters, timeout=2)
        assert all(g.dead for g in self.waiters)
        for pool in self.pools:
            s = pool.stats()
            assert s.size == s.idle == s.in_use == s.pending == 0, s
        assert self.manager._upkeep.greenlet.dead
        for server in self.servers:
            if not server.listening:
                server.start()
        with gevent.Timeout(2, False):
            while fd_count() > self.baseline:  # the servers close their side on EOF
                gevent.sleep(0.005)
        assert fd_count() <= self.baseline


ManagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LBPOOL_STATEFUL_EXAMPLES", "250")),  # deeper: raise it
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerInvariants = ManagerMachine.TestCase
