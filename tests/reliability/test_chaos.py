"""Chaos on real sockets: a PoolManager over several EchoServers, each behind a
FaultProxy, under steady traffic while servers die, black-hole, reset, flap, all go
down at once, or turn slow.

The client is the one lbpool's contract is written for: ``manager.call(...)``; an
OSError from a used connection discards it and the request is retried once on a fresh
acquisition, within the call's one deadline (the retry budget is set wide open here:
this client always retries once; the budget is tested in test_manager_call.py). For
every scenario:

* no acquisition waits longer than the call's timeout (+ ``WAIT_SLACK``);
* a request fails only when no server could serve: its failure must be
  ``BackendUnavailable``/``PoolTimeout`` and must coincide with every server being
  down, or with every server's breaker being open (after an outage, until the
  recovery timeout lets a trial through: "fail at once" is the contract); the one
  other excuse is a ``PoolTimeout`` for a request whose attempt timed out on a server
  that was down (a black hole eats ``IO_TIMEOUT`` of its deadline, so its retry has
  less time to queue behind the busy healthy servers than a fresh request has; a
  reset or a refused server fails an attempt at once, and excuses nothing);
* no reply is ever out of step (every request has its own payload);
* each breaker moves only along closed -> open -> half_open -> (closed | open), and
  the faulted server's breaker does the full closed -> open -> half_open -> closed
  cycle; traffic returns to it once it recovered;
* afterwards no socket (``no_fd_leak``) and no greenlet is left.

The default run uses short versions (about two seconds each); ``-m slow`` runs long
ones that repeat each fault many times.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent.event import Event

from lbpool import BackendUnavailable, PoolManager, PoolTimeout
from lbpool.testing import EchoServer, FaultProxy, recv_exact
from tests.support.leaks import live_greenlets, settle

ACQUIRE_TIMEOUT = 2.0  # > IO_TIMEOUT: a caller queued behind stalled connections outlives them
WAIT_SLACK = 0.5  # allowed beyond the acquire timeout (scheduling on a loaded 2-core box)
IO_TIMEOUT = 0.8  # the client's own socket timeout for one round trip (a starved
#   2-core box can delay a healthy reply by a few hundred ms: that is not a fault)
DIAL_TIMEOUT = 1.0  # likewise for a dial and its PING setup hook
RECOVERY = 0.15  # breaker recovery_timeout (doubling per failed trial ...)
MAX_RECOVERY = 0.6  # ... up to this
WORKERS = 16
ALLOWED_EDGES = {
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "open"),
    ("half_open", "closed"),
}


# -- the cluster under test -----------------------------------------------------------------


class Cluster:
    """``n`` EchoServers, each behind a FaultProxy; the manager only sees the proxies.

    ``kill(i)``/``revive(i)`` stop and restart proxy ``i`` (listener closed and every
    connection dropped, then listening again on the same port: a server process that
    died and came back); the other faults are the proxy's own commands. The test marks
    each server's "cannot serve" intervals here, to judge failures against them.
    """

    def __init__(self, n: int) -> None:
        self.servers = [EchoServer().start() for _ in range(n)]
        self.proxies = [FaultProxy(s.address, connect_timeout=0.5).start() for s in self.servers]
        self.addresses = [p.address for p in self.proxies]
        self._down_since: dict[str, float] = {}
        self.down_intervals: dict[str, list[tuple[float, float]]] = {a: [] for a in self.addresses}

    def mark_down(self, i: int) -> None:
        self._down_since.setdefault(self.addresses[i], monotonic())

    def mark_up(self, i: int) -> None:
        address = self.addresses[i]
        since = self._down_since.pop(address, None)
        if since is not None:
            self.down_intervals[address].append((since, monotonic()))

    def is_down(self, address: str) -> bool:
        return address in self._down_since

    def kill(self, *indexes: int) -> None:
        """Kill these servers at one instant: refuse connects and drop every connection
        of all of them with no switch in between (``stop()`` yields, so stopping them one
        by one would let a request fail on one and then on the next, still "up")."""
        for i in indexes:
            self.mark_down(i)
            self.proxies[i].refuse()
            self.proxies[i].reset_all()
        for i in indexes:
            self.proxies[i].stop()  # and end their handler greenlets

    def revive(self, i: int) -> None:
        self.proxies[i].start()
        self.mark_up(i)

    def all_down_between(self, t0: float, t1: float) -> bool:
        """Was there a moment in [t0, t1] when every server was down?"""
        now = monotonic()
        spans = {
            a: [
                *self.down_intervals[a],
                *([(self._down_since[a], now)] if a in self._down_since else []),
            ]
            for a in self.addresses
        }
        # candidate moments: the starts of down intervals, and t0 itself
        moments = [t0] + [s for iv in spans.values() for s, _ in iv if t0 <= s <= t1]
        return any(
            all(any(s <= m <= e for s, e in spans[a]) for a in self.addresses) for m in moments
        )

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for server in self.servers:
            server.stop()


@dataclass
class Record:
    """What the clients saw."""

    ok: Counter[str] = field(default_factory=Counter)
    ok_after: dict[str, int] = field(default_factory=dict)  # per server, since mark_served
    retried: int = 0
    # (start, end, error, no breaker was closed, an attempt met a server that was down)
    failures: list[tuple[float, float, BaseException, bool, bool]] = field(default_factory=list)
    unexpected: list[BaseException] = field(default_factory=list)
    max_wait: float = 0.0
    waits: int = 0

    def served(self, address: str) -> None:
        self.ok[address] += 1
        if address in self.ok_after:
            self.ok_after[address] += 1

    def watch(self, address: str) -> None:
        self.ok_after[address] = 0


class Traffic:
    """``WORKERS`` greenlets sending requests through the manager until stopped."""

    def __init__(
        self,
        manager: PoolManager,
        cluster: Cluster,
        workers: int = WORKERS,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        self.manager = manager
        self.cluster = cluster
        self.io_timeout = io_timeout
        self.record = Record()
        self._stop = Event()
        self._seq = itertools.count()
        self.greenlets = [gevent.spawn(self._worker) for _ in range(workers)]

    def _waited(self, since: float) -> None:
        """One acquisition ended (it gave a connection, or failed) after ``since``."""
        self.record.waits += 1
        self.record.max_wait = max(self.record.max_wait, monotonic() - since)

    def _round_trip(self, conn: Any) -> None:
        payload = b"req-%d\n" % next(self._seq)
        conn.settimeout(self.io_timeout)
        conn.sendall(payload)
        got = recv_exact(conn, len(payload))
        if got != payload:  # a connection out of step: lbpool handed out a dirty one
            raise AssertionError(f"out of step: sent {payload!r}, got {got!r}")

    def request(self) -> None:
        start = monotonic()
        acquiring = [start]  # when the current attempt's acquisition began
        met_fault = [False]  # an attempt timed out on a server marked down (a black hole)

        def attempt(conn: Any) -> str:
            self._waited(acquiring[0])
            address = str(conn.address)
            down = self.cluster.is_down(address)
            try:
                self._round_trip(conn)
            except TimeoutError:  # IO_TIMEOUT of the deadline spent on it
                met_fault[0] |= down or self.cluster.is_down(address)
                raise
            finally:
                acquiring[0] = monotonic()  # a retry acquires from here
            return address

        try:
            address = self.manager.call("svc", attempt, timeout=ACQUIRE_TIMEOUT)
        except (BackendUnavailable, PoolTimeout) as exc:
            self._waited(acquiring[0])
            self._failed(start, exc, met_fault[0])
            return
        except OSError as exc:  # the retry's connection died too (or no time was left)
            self._failed(start, exc, met_fault[0])
            return
        self.record.served(address)

    def _failed(self, start: float, exc: BaseException, met_fault: bool) -> None:
        end = monotonic()
        # snapshot with no switch since the failure: could any server have served?
        pools = [p for b in self.manager.backends.values() for p in b.pools]
        no_breaker_closed = all(p.breaker.state != "closed" for p in pools)
        self.record.failures.append((start, end, exc, no_breaker_closed, met_fault))

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                self.request()
            except Exception as exc:  # reported by check(); the worker goes on
                self.record.unexpected.append(exc)
            gevent.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        gevent.joinall(self.greenlets, timeout=ACQUIRE_TIMEOUT + self.io_timeout * 2 + 2)
        assert all(g.dead for g in self.greenlets)

    def check(self) -> None:
        rec = self.record
        assert rec.unexpected == [], rec.unexpected[:5]
        assert rec.max_wait <= ACQUIRE_TIMEOUT + WAIT_SLACK, rec.max_wait
        for start, end, exc, no_breaker_closed, met_fault in rec.failures:
            assert isinstance(exc, (BackendUnavailable, PoolTimeout)), repr(exc)
            spent_on_fault = met_fault and isinstance(exc, PoolTimeout)
            assert (
                no_breaker_closed or spent_on_fault or self.cluster.all_down_between(start, end)
            ), f"a request failed while a server could serve: {exc!r}"
        assert sum(rec.ok.values()) > 0


def chaos_config(
    addresses: list[str],
    strategy: str = "round_robin",
    balance: dict[str, Any] | None = None,
    **breaker: Any,
) -> dict[str, Any]:
    return {
        "backends": {
            "svc": {
                "strategy": strategy,
                "servers": addresses,
                "pool": {
                    "min_idle": 1,
                    "max_size": 4,
                    "acquire_timeout": ACQUIRE_TIMEOUT,
                    "check_after": 0,  # peek every borrowed connection: finds dead ones
                    "upkeep_interval": 0.1,
                    "idle_timeout": 2,
                },
                "dial": {"timeout": DIAL_TIMEOUT},
                "setup": "tests.support.hooks:setup_ping",
                "breaker": {
                    "failure_threshold": 2,
                    "recovery_timeout": RECOVERY,
                    "max_recovery_timeout": MAX_RECOVERY,
                    **breaker,
                },
                # one retry, always: the budget would refuse some when every server is
                # down at once (those calls then fail with the OSError, not
                # BackendUnavailable); the budget itself is tested elsewhere
                "retry": {"attempts": 2, "budget_percent": 1000, "min_per_second": 100000},
                "balance": balance or {},
            }
        }
    }


class Transitions:
    """Every breaker state change, through the manager's listener."""

    def __init__(self, manager: PoolManager) -> None:
        self.events: list[tuple[str, str, str]] = []
        manager.add_breaker_listener(self._on_change)

    def _on_change(self, backend: str, address: str, old: str, new: str) -> None:
        self.events.append((address, old, new))

    def of(self, address: str) -> list[tuple[str, str]]:
        return [(old, new) for a, old, new in self.events if a == address]

    def check(self, faulted: list[str], clean: list[str]) -> None:
        for _, old, new in self.events:
            assert (old, new) in ALLOWED_EDGES, (old, new, self.events)
        for address in faulted:
            edges = self.of(address)
            cycle = [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
            it = iter(edges)
            assert all(step in it for step in cycle), (address, edges)  # in this order
        for address in clean:
            assert self.of(address) == [], (address, self.of(address))


@dataclass
class Run:
    cluster: Cluster
    manager: PoolManager
    traffic: Traffic
    transitions: Transitions
    greenlets_before: int

    def breaker(self, i: int) -> Any:
        return self.manager.backends["svc"].pools[i].breaker

    def wait_tripped(self, i: int, timeout: float = 5.0) -> None:
        """The faulted server's breaker opens (a request has to meet the fault first: a
        black hole is only seen when a round trip or dial times out)."""
        assert settle(lambda: self.breaker(i).state in ("open", "half_open"), timeout), (
            self.breaker(i).state
        )

    def wait_served(self, indexes: list[int], count: int = 5, timeout: float = 10.0) -> None:
        """Traffic comes back to recovered servers: their breakers close and they serve."""
        for i in indexes:
            self.traffic.record.watch(self.cluster.addresses[i])
        ok_after = self.traffic.record.ok_after
        assert settle(
            lambda: all(
                self.breaker(i).state == "closed" and ok_after[self.cluster.addresses[i]] >= count
                for i in indexes
            ),
            timeout,
        ), ([self.breaker(i).state for i in indexes], ok_after)

    def finish(self, faulted: list[int]) -> None:
        self.traffic.stop()
        rec = self.traffic.record
        rec.retried = self.manager.stats().backends["svc"].retries
        print(  # shown with -s: what the scenario actually exercised
            f"\nrequests ok={sum(rec.ok.values())} per server={dict(rec.ok)} "
            f"retried={rec.retried} failed={len(rec.failures)} "
            f"({Counter(type(f[2]).__name__ for f in rec.failures)}) "
            f"max_wait={rec.max_wait:.3f}s transitions={self.transitions.events}"
        )
        self.traffic.check()
        addresses = self.cluster.addresses
        self.transitions.check(
            [addresses[i] for i in faulted],
            [a for i, a in enumerate(addresses) if i not in faulted],
        )
        for pool in self.manager.backends["svc"].pools:
            s = pool.stats()
            assert s.size == s.idle + s.in_use + s.pending, s
            assert s.size <= s.max_size, s
            assert s.breaker_state == "closed", s
        self.manager.close(timeout=2)
        self.cluster.stop()
        assert settle(lambda: len(live_greenlets()) <= self.greenlets_before, 5), [
            g for g in live_greenlets()
        ]


@pytest.fixture
def chaos(no_fd_leak: None) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def start(
        n: int = 3,
        strategy: str = "round_robin",
        balance: dict[str, Any] | None = None,
        io_timeout: float = IO_TIMEOUT,
        **breaker: Any,
    ) -> Run:
        before = len(live_greenlets())
        cluster = Cluster(n)
        manager = PoolManager(chaos_config(cluster.addresses, strategy, balance, **breaker))
        transitions = Transitions(manager)
        manager.wait_ready(timeout=5)
        run = Run(
            cluster, manager, Traffic(manager, cluster, io_timeout=io_timeout), transitions, before
        )
        made.append(run)
        return run

    yield start
    for run in made:  # after a failure: leave nothing running for the next test
        run.traffic._stop.set()
        gevent.killall(run.traffic.greenlets, timeout=5)
        run.manager.close(timeout=0)
        run.cluster.stop()


def steady(seconds: float) -> None:
    """Let traffic flow for a while (this is the scenario's clock, not a synchronisation)."""
    gevent.sleep(seconds)


# -- the scenarios --------------------------------------------------------------------------

SCALES = [pytest.param(1, id="short"), pytest.param(8, id="long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("cycles", SCALES)
def test_server_killed_mid_traffic_and_restarted(chaos: Callable[..., Run], cycles: int) -> None:
    run = chaos()
    steady(0.2)
    for _ in range(cycles):
        run.cluster.kill(1)
        steady(0.5)
        run.wait_tripped(1)
        run.cluster.revive(1)
        run.wait_served([1])
    run.finish(faulted=[1])


@pytest.mark.parametrize("cycles", SCALES)
def test_blackholed_server(chaos: Callable[..., Run], cycles: int) -> None:
    # threshold 1: a request that met the black hole trips the breaker before its retry,
    # so the retry cannot land on another stalled connection to the same server
    run = chaos(failure_threshold=1)
    steady(0.2)
    for _ in range(cycles):
        run.cluster.mark_down(0)
        run.cluster.proxies[0].blackhole()
        steady(0.6)
        run.wait_tripped(0)
        run.cluster.proxies[0].recover()
        run.cluster.mark_up(0)
        run.wait_served([0])
    run.finish(faulted=[0])


@pytest.mark.parametrize("cycles", SCALES)
def test_resetting_server(chaos: Callable[..., Run], cycles: int) -> None:
    run = chaos()
    steady(0.2)
    for _ in range(cycles):
        proxy = run.cluster.proxies[2]
        run.cluster.mark_down(2)
        proxy.reset_new(True)
        proxy.reset_all()
        steady(0.5)
        run.wait_tripped(2)
        proxy.recover()
        run.cluster.mark_up(2)
        run.wait_served([2])
    run.finish(faulted=[2])


@pytest.mark.parametrize("cycles", SCALES)
def test_flapping_server(chaos: Callable[..., Run], cycles: int) -> None:
    run = chaos()
    steady(0.2)
    for _ in range(cycles):
        for _ in range(6):  # down 0.1 s, up 0.1 s, ...
            run.cluster.kill(0)
            steady(0.1)
            run.cluster.revive(0)
            steady(0.1)
        run.wait_served([0])
    run.finish(faulted=[0])


@pytest.mark.parametrize("cycles", SCALES)
def test_every_server_down_then_back(chaos: Callable[..., Run], cycles: int) -> None:
    # panic mode on (the default): the first acquisition after the breakers opened on
    # reset connections dials each server once (refused: evidence they cannot be
    # dialed); from then on, every breaker open and known down, ``get`` fails at once
    run = chaos()
    steady(0.2)
    for _ in range(cycles):
        run.cluster.kill(0, 1, 2)
        steady(0.5)
        for i in range(3):
            run.wait_tripped(i)
        failed_before = len(run.traffic.record.failures)
        start = monotonic()
        with pytest.raises(BackendUnavailable):
            run.manager.acquire("svc", timeout=ACQUIRE_TIMEOUT)
        assert monotonic() - start < 0.5  # every breaker open: fails at once, no wait
        for i in range(3):
            run.cluster.revive(i)
        run.wait_served([0, 1, 2])
        assert len(run.traffic.record.failures) >= failed_before
    assert run.traffic.record.failures  # the outage was seen, and excused
    run.finish(faulted=[0, 1, 2])


@pytest.mark.parametrize("cycles", SCALES)
def test_slow_server_under_least_active(chaos: Callable[..., Run], cycles: int) -> None:
    # slow, not faulty: its 0.1 s round trips must not time out even when a loaded box
    # starves the process for a while (it once took two of 0.8 s in a row: CI, hogs
    # and other jobs), so the clients wait up to 3 s for a reply here
    run = chaos(strategy="least_active", io_timeout=3.0)
    steady(0.2)
    for _ in range(cycles):
        run.cluster.proxies[0].latency(0.05)  # 0.1 s per round trip: 20x the others
        before = Counter(run.traffic.record.ok)
        steady(1.0)
        during = run.traffic.record.ok - before
        slow, fast = (
            during[run.cluster.addresses[0]],
            [during[a] for a in run.cluster.addresses[1:]],
        )
        assert slow * 3 < min(fast), (slow, fast)  # steered away from the slow one
        run.cluster.proxies[0].recover()
        run.wait_served([0])
    assert run.traffic.record.failures == []
    run.finish(faulted=[])


# -- half-open admits one trial, not a crowd -------------------------------------------------


def test_half_open_routes_one_trial_not_its_idle_connections(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    a, b = echo_server_factory(), echo_server_factory()
    cfg = {
        "backends": {
            "svc": {
                "servers": [a.address, b.address],
                "pool": {"min_idle": 0, "max_size": 4, "check_after": 0},
                "breaker": {"failure_threshold": 1, "recovery_timeout": 0.05},
            }
        }
    }
    with PoolManager(cfg) as manager:
        warm = [manager.acquire("svc") for _ in range(6)]
        for conn in warm:
            conn.release()  # three idle connections on each server
        suspect = manager.backends["svc"].pools[0]
        conn = manager.acquire("svc")
        assert conn.address == a.address
        conn.discard(ConnectionResetError("reset by peer"))  # a network error: opens it
        assert suspect.breaker.state == "open"
        # the server is given up for now: its idle connections are closed at once
        assert suspect.stats().idle == 0
        assert suspect.stats().closed["unhealthy"] == 2
        a.stop()  # and it stays down: the trial will fail
        assert settle(lambda: suspect.breaker.state == "half_open", 2)
        held = [manager.acquire("svc") for _ in range(4)]
        assert all(c.address == b.address for c in held)  # the failed trial failed over
        for c in held:
            c.release()
        st = suspect.stats()
        assert st.dial_failures == 1  # exactly one trial dial, not a crowd
        assert st.breaker_state == "open"  # the failed trial re-opened it
