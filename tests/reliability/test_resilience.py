"""The resilience policies on real sockets (``balance.panic_threshold``,
``breaker.failure_rate``, ``balance.slow_start``), through ``lbpool.testing.FaultProxy``.

The client is the one of test_chaos.py: acquire, one round trip, and on an OSError
the ``with`` discards the connection and the request is retried once on a fresh
acquisition. Measurements are printed (``-s``); the bounds asserted are generous (two
CPU hogs on two cores delay a healthy round trip by a few hundred ms).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent.event import Event

from lbpool import BackendUnavailable, PoolManager, PoolTimeout
from lbpool.testing import EchoServer, FaultProxy, recv_exact
from tests.support.leaks import settle

IO_TIMEOUT = 1.0


class Cluster:
    """``n`` EchoServers, each behind a FaultProxy; the manager sees the proxies."""

    def __init__(self, n: int) -> None:
        self.servers = [EchoServer().start() for _ in range(n)]
        self.proxies = [FaultProxy(s.address, connect_timeout=0.5).start() for s in self.servers]
        self.addresses = [p.address for p in self.proxies]

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for server in self.servers:
            server.stop()


class Traffic:
    """``workers`` greenlets sending requests until stopped; every outcome is logged as
    ``(time, address or None, error or None)``."""

    def __init__(
        self,
        manager: PoolManager,
        workers: int,
        pause: float = 0.002,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        self.manager = manager
        self.io_timeout = io_timeout
        self.log: list[tuple[float, str | None, BaseException | None]] = []
        self.unexpected: list[BaseException] = []
        self._seq = itertools.count()
        self._pause = pause
        self._stop = Event()
        self.greenlets = [gevent.spawn(self._worker) for _ in range(workers)]

    def request(self) -> None:
        for attempt in (1, 2):
            try:
                conn = self.manager.acquire("svc", timeout=2.0)
            except (BackendUnavailable, PoolTimeout) as exc:
                self.log.append((monotonic(), None, exc))
                return
            payload = b"req-%d\n" % next(self._seq)
            try:
                with conn:
                    conn.settimeout(self.io_timeout)
                    conn.sendall(payload)
                    assert recv_exact(conn, len(payload)) == payload
            except OSError as exc:
                if attempt == 1:
                    continue
                self.log.append((monotonic(), None, exc))
                return
            self.log.append((monotonic(), conn.address, None))
            return

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                self.request()
            except Exception as exc:
                self.unexpected.append(exc)
            gevent.sleep(self._pause)

    def failures(self) -> list[BaseException]:
        return [exc for _, _, exc in self.log if exc is not None]

    def served_since(self, t: float) -> Counter[str]:
        return Counter(a for when, a, _ in self.log if a is not None and when >= t)

    def stop(self) -> None:
        self._stop.set()
        gevent.joinall(self.greenlets, timeout=10)
        gevent.killall(self.greenlets, timeout=5)
        assert self.unexpected == [], self.unexpected[:5]


@pytest.fixture
def cluster(no_fd_leak: None) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        made.append(Cluster(n))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def _config(addresses: list[str], **sections: Any) -> dict[str, Any]:
    backend: dict[str, Any] = {
        "strategy": "round_robin",
        "servers": addresses,
        "pool": {"min_idle": 1, "max_size": 40, "acquire_timeout": 2, "check_after": 0},
        "dial": {"timeout": 1.0},
    }
    for name, section in sections.items():
        backend[name] = {**backend.get(name, {}), **section}
    return {"backends": {"svc": backend}}


# -- panic mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("panic", [0.5, 0.0], ids=["panic", "no-panic"])
def test_blip_every_connection_reset(cluster: Any, make_manager: Any, panic: float) -> None:
    """Every connection to every server is reset at once while the servers keep
    accepting: every breaker opens (3 failures), and for 30 s none would let a trial
    through. With panic mode the balancer keeps picking across all four, each dial is
    its server's verdict, and no request fails; without it, callers get
    ``BackendUnavailable`` although every server is fine.

    The blip hits requests whose replies no client can have read: the proxies hold
    everything first, and the reset waits until no request has completed for a poll
    interval (so no reply forwarded before the hold is still unread in a client's
    socket, where it would survive the RST: a clean use that ends a breaker's streak
    of failures). Each server then has at least three requests in flight and nothing
    to answer them, so its breaker opens on their errors before any retry's round
    trip can succeed."""
    c = cluster(4)
    manager = make_manager(
        _config(
            c.addresses,
            breaker={"failure_threshold": 3, "recovery_timeout": 30},
            balance={"panic_threshold": panic},
        )
    )
    manager.wait_ready(timeout=5)
    # held requests wait for the reset, not for their read timeout
    traffic = Traffic(manager, workers=100, io_timeout=10.0)
    assert settle(lambda: len(traffic.served_since(0)) == 4, 5)
    gevent.sleep(0.2)
    saw_panic = []
    manager.add_breaker_listener(lambda *_: saw_panic.append(manager.backends["svc"].in_panic()))
    for proxy in c.proxies:
        proxy.blackhole()
    # until no request completed across a poll interval (every reply forwarded before
    # the hold has been read) with at least three held on each server; bounded
    deadline = monotonic() + 10
    done = len(traffic.log)
    while True:
        gevent.sleep(0.01)  # hub turns: a poll sees any reply still unread
        with gevent.Timeout(1, False):  # and its reader runs (libev may run this timer
            gevent.idle()  # before a ready socket of the same turn): until nothing is ready
        servers = manager.stats().backends["svc"].servers
        before, done = done, len(traffic.log)
        if before == done and all(s.in_use >= 3 for s in servers.values()):
            break
        assert monotonic() < deadline, servers
    assert traffic.failures() == []  # nothing timed out while held
    blip = monotonic()
    for proxy in c.proxies:
        proxy.reset_all()
        proxy.recover()  # forwarding again for the requests retried on new connections
    # in panic mode every server serves again soon; without it the breakers refuse them
    back = panic and settle(lambda: len(traffic.served_since(blip + 0.001)) == 4, 5)
    # the moment the fourth server served again after the blip
    firsts: dict[str, float] = {}
    for when, address, _ in traffic.log:
        if address is not None and when > blip and address not in firsts:
            firsts[address] = when
    gevent.sleep(0.3)
    traffic.stop()
    trips = sum(p.breaker.trips for p in manager.backends["svc"].pools)
    failed = traffic.failures()
    print(
        f"\npanic_threshold={panic}: trips={trips} failed={len(failed)} "
        f"({Counter(type(e).__name__ for e in failed)}) all 4 serving again after "
        f"{(max(firsts.values()) - blip) if len(firsts) == 4 else float('nan'):.3f}s; "
        f"panic seen={any(saw_panic)} served={dict(traffic.served_since(blip))}"
    )
    assert trips == 4  # the blip opened every breaker
    if panic:
        assert any(saw_panic)
        assert failed == []
        assert back, dict(traffic.served_since(blip))
        assert max(firsts.values()) - blip < 3.0  # typically well under 1 s
        # out of panic: at least half the breakers closed by their dials' verdicts (a
        # server left open once the backend is out of panic waits for its own trial)
        assert manager.stats().backends["svc"].panic is False
    else:  # the contrast: the breakers refuse servers that are fine
        assert any(isinstance(e, BackendUnavailable) for e in failed)


def test_panic_dial_failure_keeps_the_wait(cluster: Any, make_manager: Any) -> None:
    """In panic mode a dial to an open server is its verdict: one that fails keeps the
    breaker open without doubling its wait (and, evidence that it cannot be dialed, no
    further panic dial goes there), one that succeeds closes it; the backend reports
    ``panic`` meanwhile."""
    c = cluster(2)
    manager = make_manager(
        _config(
            c.addresses,
            pool={"min_idle": 0},
            breaker={"failure_threshold": 1, "recovery_timeout": 30},
        )
    )
    backend = manager.backends["svc"]
    held = [manager.acquire("svc", timeout=2) for _ in range(2)]
    assert {conn.address for conn in held} == set(c.addresses)
    for conn in held:  # errors on connections in use: both open, dials may be fine
        conn.discard(ConnectionResetError("reset by peer"))
    assert all(p.breaker.state == "open" for p in backend.pools)
    assert backend.in_panic()
    assert manager.stats().backends["svc"].panic is True
    assert manager.stats().to_dict()["backends"]["svc"]["panic"] is True
    c.proxies[0].refuse()
    failures = backend.pools[0].stats().dial_failures
    with manager.acquire("svc", timeout=2) as conn:  # each dial is the verdict
        assert conn.address == c.addresses[1]
    first = backend.pools[0]
    assert first.stats().dial_failures == failures + 1  # its panic dial was refused ...
    assert first.breaker.state == "open"
    assert first.breaker.recovery_timeout == 30  # ... not doubled by it
    assert not first.breaker.panic_may_dial  # and not dialed again in panic
    assert backend.pools[1].breaker.is_closed
    assert not backend.in_panic()  # one of two eligible: not below 50%


def test_panic_dials_no_server_known_down(cluster: Any, make_manager: Any) -> None:
    """Every breaker open on failed dials (the servers refuse): panic mode has no
    server that may be fine, so ``get`` fails at once, dialing nothing (DESIGN: every
    breaker open, fail at once)."""
    c = cluster(2)
    manager = make_manager(
        _config(
            c.addresses,
            pool={"min_idle": 0},
            breaker={"failure_threshold": 1, "recovery_timeout": 30},
        )
    )
    for proxy in c.proxies:
        proxy.refuse()
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            manager.acquire("svc", timeout=2)
    backend = manager.backends["svc"]
    assert backend.in_panic()
    failures = [p.stats().dial_failures for p in backend.pools]
    for proxy in c.proxies:
        proxy.recover()
    start = monotonic()
    with pytest.raises(BackendUnavailable) as info:
        manager.acquire("svc", timeout=2)
    assert monotonic() - start < 0.5
    assert [p.stats().dial_failures for p in backend.pools] == failures  # nothing dialed
    assert "refused" in str(info.value).lower()  # the last failure is named
    assert all(p.breaker.recovery_timeout == 30 for p in backend.pools)


# -- failure rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [True, False], ids=["rate", "consecutive-only"])
def test_one_request_in_three_fails(cluster: Any, make_manager: Any, rate: bool) -> None:
    """A server that resets one request in three never has three failures in a row, so
    consecutive counting alone never opens its breaker; the failure rate does, within
    its window."""
    c = cluster(1)
    breaker: dict[str, Any] = {"failure_threshold": 3, "recovery_timeout": 30}
    if rate:
        breaker["failure_rate"] = {"threshold": "20%", "min_requests": 12, "window": "3s"}
    manager = make_manager(_config(c.addresses, breaker=breaker, balance={"panic_threshold": 0}))
    manager.wait_ready(timeout=5)
    c.proxies[0].reset_every(3)
    br = manager.backends["svc"].pools[0].breaker
    start = monotonic()
    requests = 0
    while br.is_closed and requests < 60:  # sequential: outcomes reach it in order
        Traffic(manager, 0).request()
        requests += 1
    took = monotonic() - start
    print(f"\nfailure_rate={'on' if rate else 'off'}: {requests} requests, {took:.3f}s, {br!r}")
    if rate:
        assert not br.is_closed
        assert br.trips == 1
        assert br.failure_count < 3  # opened by rate, not by a streak
        assert took < 3.0  # within the window
    else:
        assert br.is_closed and br.trips == 0
        assert requests == 60


def test_a_server_that_accepts_and_fails_every_request_opens_by_rate(
    cluster: Any, make_manager: Any
) -> None:
    """Every request is reset: each failure discards its connection and the next request
    dials a fresh one, which connects fine. Dial successes are no outcomes (they would
    make the failed share about half, below a 60% threshold, and the breaker would
    never open); the rate counts requests, all failed, so it opens after
    ``min_requests``. ``failure_threshold`` is out of reach: it opens by rate alone."""
    c = cluster(1)
    breaker = {
        "failure_threshold": 1000,
        "recovery_timeout": 30,
        "failure_rate": {"threshold": "60%", "min_requests": 20, "window": "10s"},
    }
    manager = make_manager(_config(c.addresses, breaker=breaker, balance={"panic_threshold": 0}))
    manager.wait_ready(timeout=5)
    c.proxies[0].reset_every(1)
    br = manager.backends["svc"].pools[0].breaker
    requests = 0
    while br.is_closed and requests < 60:  # sequential: outcomes reach it in order
        Traffic(manager, 0).request()
        requests += 1
    assert not br.is_closed, f"still closed after {requests} failed requests: {br!r}"
    assert br.trips == 1
    assert requests <= 21  # the 20th failed request opens it (one spare for a slow reset)
    assert manager.backends["svc"].pools[0].stats().dial_failures == 0


# -- slow start -------------------------------------------------------------------------------


def test_slow_start_after_recovery(cluster: Any, make_manager: Any) -> None:
    """A server whose breaker closes under steady load: over the first 10% of the
    window it gets at most a third of its fair share, and its full share by the end."""
    window = 2.0
    c = cluster(4)
    manager = make_manager(
        _config(
            c.addresses,
            breaker={"failure_threshold": 2, "recovery_timeout": 0.2},
            balance={"slow_start": {"window": window, "min_weight": "10%"}},
        )
    )
    manager.wait_ready(timeout=5)
    closed_at: list[float] = []
    target = c.addresses[0]
    manager.add_breaker_listener(
        lambda _b, address, old, new: (
            closed_at.append(monotonic()) if address == target and new == "closed" else None
        )
    )
    traffic = Traffic(manager, workers=12)
    gevent.sleep(0.2)
    c.proxies[0].refuse()
    c.proxies[0].reset_all()
    br = manager.backends["svc"].pools[0].breaker
    assert settle(lambda: not br.is_closed, 5)
    c.proxies[0].recover()
    assert settle(lambda: bool(closed_at), 5)
    t0 = closed_at[0]
    gevent.sleep(window * 1.3)
    traffic.stop()
    slices = 10
    rows = []
    for k in range(slices + 2):  # two tenths past the window: full share
        lo, hi = t0 + k * window / slices, t0 + (k + 1) * window / slices
        served = [a for when, a, _ in traffic.log if a is not None and lo <= when < hi]
        share = served.count(target) / max(1, len(served))
        rows.append((k, len(served), share / 0.25))
    print("\nslice  requests  share/fair")
    for k, n, rel in rows:
        print(f"{k * 10:>3}%  {n:>8}  {rel:10.2f}")
    assert traffic.failures() == []
    assert all(n >= 10 for _, n, _ in rows), rows  # load was steady
    assert rows[0][2] <= 1 / 3, rows
    last = rows[slices - 1][2]
    after = (rows[slices][1] * rows[slices][2] + rows[slices + 1][1] * rows[slices + 1][2]) / (
        rows[slices][1] + rows[slices + 1][1]
    )
    assert last >= 0.6, rows  # ~0.95 expected
    assert after >= 0.7, rows  # ~1.0 expected
    assert not manager.backends["svc"]._warming  # warm: off the pick path again
