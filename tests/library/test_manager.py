"""PoolManager: routing, failover, breakers, strategies, reload, close."""

from __future__ import annotations

import collections
import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import gevent
import gevent.server
import pytest
from gevent.event import Event

import lbpool
from lbpool import (
    Backend,
    BackendUnavailable,
    ConfigError,
    PoolClosed,
    PoolManager,
    PoolTimeout,
    UnknownBackend,
)
from lbpool.testing import EchoServer, recv_exact
from tests.support.leaks import settle
from tests.support.net import PeakEchoServer, dead_address


class CountingServer:
    """A loopback line-echo server that counts the requests it answers."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests = 0
        self.accepted = 0
        self._clients: set[socket.socket] = set()
        self._server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self._server.init_socket()
        self.port = self._server.server_port
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def _handle(self, sock: socket.socket, _addr: Any) -> None:
        self.accepted += 1
        self._clients.add(sock)
        try:
            while True:
                data = sock.recv(64)
                if not data:
                    return
                if self.delay:
                    gevent.sleep(self.delay)
                self.requests += 1
                sock.sendall(data)
        except OSError:
            return
        finally:
            self._clients.discard(sock)
            sock.close()

    def stop(self) -> None:
        self._server.stop(timeout=1)
        for c in list(self._clients):
            c.close()
        self._clients.clear()

    def restart(self) -> None:
        self._server = gevent.server.StreamServer(("127.0.0.1", self.port), self._handle)
        self._server.start()


@pytest.fixture
def servers() -> Iterator[Callable[..., CountingServer]]:
    made: list[CountingServer] = []

    def make(delay: float = 0.0) -> CountingServer:
        srv = CountingServer(delay)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


def config(
    addresses: list[Any], strategy: str = "round_robin", **sections: dict[str, Any]
) -> dict[str, Any]:
    pool = {"min_idle": 0, "max_size": 10, "acquire_timeout": 2}
    pool.update(sections.pop("pool", {}))
    breaker = {"failure_threshold": 2, "recovery_timeout": 60}
    breaker.update(sections.pop("breaker", {}))
    backend = {"strategy": strategy, "servers": addresses, "pool": pool, "breaker": breaker}
    backend.update(sections)
    return {"backends": {"svc": backend}}


def request(manager: PoolManager, name: str = "svc", timeout: float | None = None) -> str:
    with manager.get(name, timeout=timeout) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        return conn.address


def test_routes_by_name_and_host_port(servers: Callable[..., CountingServer]) -> None:
    a = servers()
    other = servers()
    with PoolManager(config([a.address])) as manager:
        with manager.get("svc") as conn:
            assert conn.backend == "svc"
            assert conn.address == a.address
        with manager.get(other.address) as conn:  # not configured: its own pool
            assert conn.backend is None
            assert conn.address == other.address
        with pytest.raises(UnknownBackend) as info:
            manager.get("nope")
        assert isinstance(info.value, KeyError)
        assert "nope" in str(info.value)
        stats = manager.stats().to_dict()
        json.dumps(stats)
        assert set(stats["backends"]) == {"svc", ""}
        assert stats["backends"][""]["servers"][other.address]["acquired"] == 1
        assert stats["backends"]["svc"]["strategy"] == "round_robin"
        assert stats["backends"]["svc"]["servers"][a.address]["hits"] == 0


def test_failover_with_zero_caller_errors_while_one_server_down(
    servers: Callable[..., CountingServer],
) -> None:
    a, b = servers(), servers()
    down = dead_address()
    with PoolManager(config([a.address, down, b.address])) as manager:
        results = collections.Counter(request(manager) for _ in range(60))
        st = manager.stats().backends["svc"].servers[down]
    assert down not in results
    assert results[a.address] > 0 and results[b.address] > 0
    assert st.breaker_state == "open"
    assert st.dial_failures == 2  # threshold reached, then skipped: never dialed again
    assert st.breaker_trips == 1


def test_concurrent_failover_many_greenlets(servers: Callable[..., CountingServer]) -> None:
    a, b = servers(), servers()
    down = dead_address()
    errors: list[BaseException] = []
    with PoolManager(config([down, a.address, b.address], "least_active")) as manager:

        def worker() -> None:
            for _ in range(20):
                try:
                    request(manager)
                except Exception as exc:  # pragma: no cover - the assertion reports it
                    errors.append(exc)

        gevent.joinall([gevent.spawn(worker) for _ in range(30)], timeout=20)
    assert errors == []
    assert a.requests + b.requests == 600


def test_all_open_fails_at_once_and_explains(servers: Callable[..., CountingServer]) -> None:
    down1, down2 = dead_address(), dead_address()
    with PoolManager(config([down1, down2])) as manager:
        for _ in range(2):
            with pytest.raises(BackendUnavailable):
                manager.get("svc")
        start = monotonic()
        with pytest.raises(BackendUnavailable) as info:
            manager.get("svc", timeout=5)
        assert monotonic() - start < 0.5  # not waiting out the deadline
    err = info.value
    assert set(err.errors) == {down1, down2}
    assert err.states == {down1: "open", down2: "open"}
    text = str(err)
    assert "open" in text and "retry in" in text and "refused" in text.lower()
    assert all(isinstance(e, lbpool.DialError) for e in err.errors.values())


def test_reset_after_accept_opens_breaker(servers: Callable[..., CountingServer]) -> None:
    good = servers()
    resetter = gevent.server.StreamServer(("127.0.0.1", 0), _reset_handler)
    resetter.start()
    bad = f"127.0.0.1:{resetter.server_port}"
    try:
        cfg = config([bad, good.address], pool={"check_after": 1000})
        with PoolManager(cfg) as manager:
            failures = 0
            for _ in range(20):
                try:
                    request(manager)
                except OSError:
                    failures += 1
            st = manager.stats().backends["svc"].servers[bad]
        assert st.breaker_state == "open"
        assert failures == 2  # the threshold; then the balancer skips it
        assert st.closed["error"] == 2
    finally:
        resetter.stop()


def _reset_handler(sock: socket.socket, _addr: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.recv(64)
    sock.close()


def test_dial_timeout_counts_and_deadline_bounds_failover(
    servers: Callable[..., CountingServer],
) -> None:
    """Servers that never accept in time: each dial times out; the whole acquisition
    (with failover) still ends by its own deadline."""
    blackholes = [_full_backlog_listener() for _ in range(3)]
    try:
        addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s, _ in blackholes]
        cfg = config(addrs, dial={"timeout": 0.2}, breaker={"failure_threshold": 1})
        with PoolManager(cfg) as manager:
            start = monotonic()
            with pytest.raises((BackendUnavailable, PoolTimeout)) as info:
                manager.get("svc", timeout=0.5)
            elapsed = monotonic() - start
            assert elapsed < 0.5 + 0.4, elapsed
            if isinstance(info.value, BackendUnavailable):
                assert "timed out" in str(info.value)
            stats = manager.stats().backends["svc"].servers
            assert sum(s.dial_failures for s in stats.values()) >= 1
            assert all(s.dial_failures <= 1 for s in stats.values())  # each dialed once
    finally:
        for listener, fillers in blackholes:
            for f in fillers:
                f.close()
            listener.close()


def _full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so a new connect gets no SYN-ACK."""
    import socket as stdsocket

    listener = stdsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(8):
        f = stdsocket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(listener.getsockname())
        fillers.append(f)
    return listener, fillers


def test_breaker_half_open_lets_exactly_one_trial(servers: Callable[..., CountingServer]) -> None:
    srv = servers()
    port_addr = srv.address
    srv.stop()
    # panic mode (default 50%) lets no dial through here: the breaker opened on failed
    # dials, evidence the server cannot be dialed, so only the half-open trial may
    cfg = config([port_addr], breaker={"failure_threshold": 2, "recovery_timeout": 0.3})
    with PoolManager(cfg) as manager:
        for _ in range(2):
            with pytest.raises(BackendUnavailable):
                manager.get("svc")
        pool_stats = manager.stats().backends["svc"].servers[port_addr]
        assert pool_stats.breaker_state == "open"
        srv.restart()
        breaker = manager.backends["svc"].pools[0].breaker
        opened = Event()
        deadline = monotonic() + 5
        while breaker.state != "half_open" and monotonic() < deadline:
            gevent.sleep(0.05)
        opened.set()
        outcomes: list[str] = []

        def caller() -> None:
            try:
                request(manager, timeout=2)
                outcomes.append("ok")
            except BackendUnavailable:
                outcomes.append("unavailable")

        gevent.joinall([gevent.spawn(caller) for _ in range(20)], timeout=10)
        # exactly one trial dial went through; the others were told at once
        assert srv.accepted == 1
        assert outcomes.count("ok") >= 1
        assert manager.stats().backends["svc"].servers[port_addr].breaker_state == "closed"
        assert request(manager) == port_addr


def test_breaker_failed_trial_doubles_recovery(servers: Callable[..., CountingServer]) -> None:
    down = dead_address()
    breaker = {"failure_threshold": 1, "recovery_timeout": 0.1, "max_recovery_timeout": 0.3}
    cfg = config([down], breaker=breaker)
    with PoolManager(cfg) as manager:
        breaker = manager.backends["svc"].pools[0].breaker
        with pytest.raises(BackendUnavailable):
            manager.get("svc")
        waits = []
        for _ in range(3):
            waits.append(breaker.retry_in())
            gevent.sleep(breaker.retry_in() + 0.02)
            with pytest.raises(BackendUnavailable):
                manager.get("svc")  # the one trial, failing: re-opened, doubled
        assert waits[0] <= 0.1 + 1e-6
        assert 0.15 < breaker.retry_in() <= 0.3 + 1e-6
        assert manager.stats().backends["svc"].servers[down].breaker_trips == 1


def _share(manager: PoolManager, n: int) -> collections.Counter[str]:
    return collections.Counter(request(manager) for _ in range(n))


def test_round_robin_spreads_evenly(servers: Callable[..., CountingServer]) -> None:
    srvs = [servers() for _ in range(3)]
    with PoolManager(config([s.address for s in srvs], "round_robin")) as manager:
        _share(manager, 90)
    assert [s.requests for s in srvs] == [30, 30, 30]  # measured by the servers


def test_weighted_follows_weights(servers: Callable[..., CountingServer]) -> None:
    a, b = servers(), servers()
    addrs = [{"address": a.address, "weight": 3}, {"address": b.address, "weight": 1}]
    with PoolManager(config(addrs, "weighted")) as manager:
        _share(manager, 80)
    assert (a.requests, b.requests) == (60, 20)


def test_random_is_roughly_uniform(servers: Callable[..., CountingServer]) -> None:
    srvs = [servers() for _ in range(3)]
    with PoolManager(config([s.address for s in srvs], "random")) as manager:
        _share(manager, 300)
    assert all(50 <= s.requests <= 150 for s in srvs), [s.requests for s in srvs]


def test_least_active_steers_away_from_slow_server(servers: Callable[..., CountingServer]) -> None:
    slow, fast1, fast2 = servers(delay=0.05), servers(), servers()
    cfg = config([slow.address, fast1.address, fast2.address], "least_active")
    with PoolManager(cfg) as manager:

        def worker() -> None:
            for _ in range(20):
                request(manager)

        gevent.joinall([gevent.spawn(worker) for _ in range(6)], timeout=20)
    assert slow.requests + fast1.requests + fast2.requests == 120
    assert slow.requests < min(fast1.requests, fast2.requests) / 2, (
        slow.requests,
        fast1.requests,
        fast2.requests,
    )


def test_reload_under_load_no_caller_error(servers: Callable[..., CountingServer]) -> None:
    a, b, c = servers(), servers(), servers()
    errors: list[BaseException] = []
    done = Event()
    with PoolManager(config([a.address, b.address])) as manager:

        def worker() -> None:
            while not done.is_set():
                try:
                    request(manager)
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                gevent.sleep(0)

        workers = [gevent.spawn(worker) for _ in range(20)]
        gevent.sleep(0.1)
        manager.reload(config([b.address, c.address], pool={"max_size": 3}))  # remove a, add c
        gevent.sleep(0.1)
        manager.reload(config([c.address], "least_active", pool={"max_size": 20}))
        gevent.sleep(0.1)
        before_c = c.requests
        gevent.sleep(0.1)
        done.set()
        gevent.joinall(workers, timeout=10)
        stats = manager.stats().backends["svc"]
        assert list(stats.servers) == [c.address]
        assert stats.strategy == "least_active"
        assert stats.servers[c.address].max_size == 20
    assert errors == []
    assert c.requests > before_c  # traffic kept flowing after the last reload


def test_reload_removed_server_closes_idle_now_and_busy_on_release(
    servers: Callable[..., CountingServer],
) -> None:
    a, b = servers(), servers()
    with PoolManager(config([a.address, b.address])) as manager:
        held = [manager.get("svc") for _ in range(2)]  # one on each
        idle_conn = manager.get(a.address)  # an ad-hoc pool is separate; ignore
        idle_conn.release()
        manager.acquire("svc").release()  # leaves an idle one on a
        removed_pool = manager.backends["svc"].pools[0]
        assert removed_pool.name == a.address
        manager.reload(config([b.address]))
        gevent.sleep(0)
        st = removed_pool.stats()
        assert st.idle == 0 and st.draining
        for h in held:
            h.release()
        assert removed_pool.stats().size == 0


def test_wait_ready_and_close_leave_nothing(
    servers: Callable[..., CountingServer], no_fd_leak: None
) -> None:
    srvs = [servers() for _ in range(2)]
    manager = PoolManager(config([s.address for s in srvs], pool={"min_idle": 3}))
    manager.wait_ready(timeout=5)
    st = manager.stats().backends["svc"].servers
    assert all(s.idle == 3 for s in st.values())
    held = manager.get("svc")
    manager.close(timeout=0.2)
    with pytest.raises(PoolClosed):
        manager.get("svc")
    held.release()
    manager.close()
    assert manager._upkeep.greenlet.dead


def test_from_yaml(tmp_path: Any, servers: Callable[..., CountingServer]) -> None:
    srv = servers()
    path = tmp_path / "lb.yaml"
    path.write_text(
        "backends:\n  svc:\n    servers: ['" + srv.address + "']\n    pool: {min_idle: 0}\n"
    )
    with PoolManager.from_yaml(path) as manager:
        assert request(manager) == srv.address


def test_use_from_another_os_thread_names_the_manager(
    servers: Callable[..., CountingServer],
) -> None:
    import threading

    srv = servers()
    errors: list[BaseException] = []
    with PoolManager(config([srv.address])) as manager:
        request(manager)

        def other() -> None:
            for name in ("svc", srv.address, "127.0.0.1:1"):
                try:
                    manager.get(name)
                except BaseException as exc:
                    errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, lbpool.LbpoolError)
        assert "manager belongs to another thread" in str(exc)


def test_reload_shrink_closes_extra_connections_as_they_return(
    servers: Callable[..., CountingServer],
) -> None:
    srv = servers()
    with PoolManager(config([srv.address], pool={"max_size": 4})) as manager:
        held = [manager.get("svc") for _ in range(4)]
        manager.reload(config([srv.address], pool={"max_size": 2}))
        pool = manager.backends["svc"].pools[0]
        assert pool.stats().size == 4  # nothing in use is touched
        for conn in held:
            conn.release()
        st = pool.stats()
        assert (st.size, st.idle, st.max_size) == (2, 2, 2)
        assert st.closed["discarded"] == 2


# -- a reload that changes how connections are made retires the old ones ---------------
def _consistent(pool: Any) -> None:
    st = pool.stats()
    assert st.size == st.idle + st.in_use + st.pending, st
    assert st.size <= st.max_size, st


@contextlib.contextmanager
def _invariants_watched(pool: Any) -> Iterator[list[str]]:
    """Check ``size == idle + in_use + pending`` (and ``<= max_size``) at every hub turn
    while the block runs; what failed is in the list yielded (empty: held throughout)."""
    broken: list[str] = []
    stop = Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                _consistent(pool)
            except AssertionError as exc:
                broken.append(str(exc))
            gevent.sleep(0)

    g = gevent.spawn(watch)
    try:
        yield broken
    finally:
        stop.set()
        g.join(5)


@pytest.fixture
def selected() -> Iterator[dict[str, list[Any]]]:
    """``tests.support.hooks.SELECTED``: the sockets each "select a db" hook set up."""
    from tests.support import hooks

    yield hooks.SELECTED
    for made in hooks.SELECTED.values():
        made.clear()


def test_reload_new_setup_hook_retires_the_connections_made_with_the_old_one(
    make_manager: Callable[..., PoolManager],
    echo_server: EchoServer,
    selected: dict[str, list[Any]],
    no_fd_leak: None,
) -> None:
    """The redis ``SELECT`` case: a reload moves the setup hook from db 1 to db 2. The
    idle connections that selected db 1 close at once, the one in use when it comes
    back; upkeep refills ``min_idle`` with db-2 ones; every acquisition that starts
    after the reload, under load, gets a db-2 connection."""

    def cfg(setup: str) -> dict[str, Any]:
        pool = {"min_idle": 2, "max_size": 6}
        return config([echo_server.address], pool=pool, setup=f"tests.support.hooks:{setup}")  # type: ignore[arg-type]

    manager = make_manager(cfg("setup_db1"))
    manager.wait_ready(5)
    pool = manager.backends["svc"].pools[0]
    held = manager.get("svc")
    assert held._conn is not None
    held_sock = held._conn.sock
    assert settle(lambda: pool.stats().idle == 2, 5)  # upkeep keeps min_idle idle
    assert len(selected["db1"]) == 3
    after: list[Any] = []  # sockets lent to acquisitions begun after the reload
    reloaded = Event()
    stop = Event()

    def work() -> None:
        while not stop.is_set():
            begun_after = reloaded.is_set()
            with manager.get("svc") as conn:
                conn.sendall(b"ping")
                assert recv_exact(conn, 4) == b"ping"
                if begun_after:
                    assert conn._conn is not None
                    after.append(conn._conn.sock)
            gevent.sleep(0.001)

    with _invariants_watched(pool) as broken:
        workers = [gevent.spawn(work) for _ in range(4)]
        gevent.sleep(0.05)
        manager.reload(cfg("setup_db2"))
        reloaded.set()
        old = set(map(id, selected["db1"]))
        assert not old & {id(c.sock) for c in pool._idle}  # the idle ones closed at once
        assert settle(lambda: len(after) >= 50, 10)
        stop.set()
        gevent.joinall(workers, timeout=5, raise_error=True)
        held.release()  # in use at the reload: closed, not pooled
        assert settle(lambda: pool.stats().idle >= 2, 5)  # min_idle, refilled
    assert broken == []
    assert not old & set(map(id, after))
    assert all(any(s is sock for s in selected["db2"]) for sock in after)
    assert all(any(s is c.sock for s in selected["db2"]) for c in pool._idle)
    st = pool.stats()
    assert st.closed["lifetime"] >= 3 and st.size <= 6, st
    assert held_sock.fileno() == -1


def test_reload_new_tls_settings_retire_the_connections_made_with_the_old_ones(
    make_manager: Callable[..., PoolManager],
    tls_echo_server: EchoServer,
    tls_certs: Any,
    no_fd_leak: None,
) -> None:
    """TLS through the same rule: connections made with the old TLS settings (here,
    verification off) are not lent after a reload turns verification on; the one in
    use closes when it comes back."""

    def cfg(tls: dict[str, Any]) -> dict[str, Any]:
        return config(
            [tls_echo_server.address], pool={"min_idle": 2, "max_size": 4}, dial={"tls": tls}
        )

    manager = make_manager(cfg({"verify": False}))
    manager.wait_ready(5)
    pool = manager.backends["svc"].pools[0]
    held = manager.get("svc")
    assert held._conn is not None
    old_context = held._conn.sock.context  # type: ignore[attr-defined]
    assert settle(lambda: pool.stats().idle == 2, 5)
    manager.reload(cfg({"ca_file": tls_certs.ca_file}))
    st = pool.stats()
    assert (st.idle, st.in_use, st.closed["lifetime"]) == (0, 1, 2), st
    for _ in range(4):
        with manager.get("svc") as conn:
            assert conn._conn is not None
            context = conn._conn.sock.context  # type: ignore[attr-defined]
            assert context is not old_context and context.check_hostname
            conn.sendall(b"ping")
            assert recv_exact(conn, 4) == b"ping"
        _consistent(pool)
    held.release()
    assert pool.stats().closed["lifetime"] == 3
    _consistent(pool)


def test_reload_that_shapes_no_connection_retires_nothing(
    make_manager: Callable[..., PoolManager], servers: Callable[..., CountingServer]
) -> None:
    """Sizing, weights, strategy, breaker, balance, retry, timeouts: what is open stays
    open and is lent again."""
    a, b = servers(), servers()
    manager = make_manager(config([a.address, b.address], pool={"min_idle": 2}))
    manager.wait_ready(5)
    pools = {p.name: p for p in manager.backends["svc"].pools}
    held = manager.get("svc")
    assert settle(lambda: all(p.stats().idle == 2 for p in pools.values()), 5)
    opened = {name: {id(c) for c in p._idle} for name, p in pools.items()}
    manager.reload(
        config(
            [{"address": a.address, "weight": 3}, b.address],
            "least_active",
            pool={"min_idle": 2, "max_size": 7, "acquire_timeout": 3, "idle_timeout": 600},
            breaker={"failure_threshold": 9, "recovery_timeout": 5},
            balance={"panic_threshold": 0},
            retry={"attempts": 3},
            dial={"timeout": 4},
            health_check={"interval": 10},
        )
    )
    assert {p.name: p for p in manager.backends["svc"].pools} == pools  # the same pools
    held.release()
    for name, pool in pools.items():
        st = pool.stats()
        assert sum(st.closed.values()) == 0, st
        assert opened[name] <= {id(c) for c in pool._idle}
        _consistent(pool)


class _EqualHook:
    """A setup hook equal to another with the same settings (as redis-py's
    ``handshake(db=0)`` is to another ``handshake(db=0)``)."""

    def __init__(self, db: int) -> None:
        self.db = db

    def __call__(self, sock: Any) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _EqualHook) and other.db == self.db

    def __hash__(self) -> int:
        return hash(self.db)


def test_reload_with_an_equal_setup_hook_object_retires_nothing(
    make_manager: Callable[..., PoolManager], servers: Callable[..., CountingServer]
) -> None:
    """A program that builds its config again for each reload makes a new but equal
    hook object: the same hook, nothing retired (hooks compared by identity retired
    every connection on every such reload; found by review). A different one does."""
    a = servers()

    def cfg(db: int, max_size: int = 10) -> Any:
        return config([a.address], pool={"min_idle": 2, "max_size": max_size}, setup=_EqualHook(db))

    manager = make_manager(cfg(0))
    manager.wait_ready(5)
    (pool,) = manager.backends["svc"].pools
    manager.reload(cfg(0, max_size=11))
    assert sum(pool.stats().closed.values()) == 0
    manager.reload(cfg(1, max_size=11))
    assert pool.stats().closed["lifetime"] == 2


def test_breaker_listener_sees_every_transition(servers: Callable[..., CountingServer]) -> None:
    srv = servers()
    address = srv.address
    srv.stop()
    seen: list[tuple[str, str, str, str]] = []
    cfg = config([address], breaker={"failure_threshold": 1, "recovery_timeout": 0.05})
    with PoolManager(cfg) as manager:
        manager.add_breaker_listener(lambda *change: seen.append(change))
        with pytest.raises(BackendUnavailable):
            manager.get("svc")
        srv.restart()
        breaker = manager.backends["svc"].pools[0].breaker
        gevent.sleep(breaker.retry_in() + 0.01)  # recovery time passes (a timing rule)
        assert request(manager) == address
    assert [(old, new) for _b, _a, old, new in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert all(b == "svc" and a == address for b, a, _o, _n in seen)


def test_upkeep_sleeps_without_pools_and_wakes_for_new_ones(
    servers: Callable[..., CountingServer],
) -> None:
    """No pool, no work: the upkeep greenlet blocks on its event, no timer ticks; an
    ad-hoc pool wakes it and gets its min_idle connections."""
    srv = servers()
    with PoolManager({"defaults": {"pool": {"min_idle": 2}}}) as manager:
        gevent.sleep(0)
        upkeep = manager._upkeep
        before = upkeep.passes
        gevent.sleep(0.05)
        assert upkeep.passes == before  # asleep: nothing to keep
        manager.get(srv.address).release()
        pool = manager.stats().backends[""].servers[srv.address]
        deadline = monotonic() + 5
        while pool.idle < 2 and monotonic() < deadline:
            gevent.sleep(0.01)
            pool = manager.stats().backends[""].servers[srv.address]
        assert upkeep.passes > before  # woken
        assert pool.idle >= 2  # and kept the new pool at min_idle


def test_adhoc_spellings_share_one_pool_and_aliases_are_bounded(
    servers: Callable[..., CountingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbpool.manager as manager_module

    srv = servers()
    monkeypatch.setattr(manager_module, "_MAX_ADHOC_ALIASES", 3)
    with PoolManager() as manager:
        spellings = [f"127.0.0.1:{'0' * i}{srv.port}" for i in range(6)]
        for name in spellings:
            with manager.get(name) as conn:
                assert conn.address == srv.address
        servers_seen = manager.stats().backends[""].servers
        assert list(servers_seen) == [srv.address]  # one pool for all spellings
        assert servers_seen[srv.address].misses == 1  # dialed once, reused after
        assert len(manager._adhoc) <= 3


def test_upkeep_rests_while_pools_are_at_rest_and_wakes_on_demand(
    servers: Callable[..., CountingServer],
) -> None:
    """An idle manager costs no wake-ups: with every pool at min_idle and nothing lent,
    upkeep sleeps until the next idle check is due (30 s here), not every
    upkeep_interval; an acquisition that must dial wakes it, and while connections are
    lent it ticks every upkeep_interval again."""
    srv = servers()
    cfg = config([srv.address], pool={"min_idle": 1, "upkeep_interval": 0.02})
    with PoolManager(cfg) as manager:
        manager.wait_ready(timeout=5)
        pool = manager.backends["svc"].pools[0]
        passes: list[float] = []
        real = pool.run_upkeep

        def counting() -> None:
            passes.append(monotonic())
            real()

        pool.run_upkeep = counting  # type: ignore[method-assign]
        manager._upkeep.wake()  # let the loop take one pass and go back to sleep
        gevent.sleep(0.01)
        assert pool.upkeep_due() >= 29  # at rest: next health check is 30 s away
        passes.clear()
        gevent.sleep(0.2)  # ten busy ticks' worth of time
        assert passes == []  # asleep: no pass at all

        held = [manager.get("svc") for _ in range(2)]  # the second must dial: demand
        assert settle(lambda: len(passes) >= 3, 5), passes  # ticking while lent
        for conn in held:
            conn.release()


@pytest.mark.parametrize("nested", ["timeout", "unavailable"])
def test_lbpool_errors_raised_in_a_with_block_do_not_charge_its_server(
    servers: Callable[..., CountingServer], nested: str
) -> None:
    """PoolTimeout is a TimeoutError and BackendUnavailable a ConnectionError (both
    OSErrors, for callers' sake); escaping a ``with`` block they speak of another pool,
    so the connection is discarded without counting against its own server."""
    a, b = servers(), servers()
    cfg = config([a.address], breaker={"failure_threshold": 1})
    other = {"servers": [b.address if nested == "timeout" else dead_address()]}
    other["pool"] = {"min_idle": 0, "max_size": 1}
    cfg["backends"]["other"] = other
    with PoolManager(cfg) as manager:
        blocker = manager.acquire("other") if nested == "timeout" else None
        expected = PoolTimeout if nested == "timeout" else BackendUnavailable
        with pytest.raises(expected), manager.get("svc") as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            manager.acquire("other", timeout=0.05)  # fails: full, or its server is down
        stats = manager.stats().backends["svc"].servers[a.address]
        assert (stats.breaker_state, stats.breaker_trips) == ("closed", 0)
        assert manager.backends["svc"].pools[0].breaker.failure_count == 0
        assert stats.closed["error"] == 1  # discarded all the same: its stream is unknown
        if blocker is not None:
            blocker.release()


# -- a bad timeout is refused before anything changes (DESIGN 14) ----------------------


@pytest.mark.parametrize(
    "bad", [1j, float("nan"), True, "0.5"], ids=["complex", "nan", "bool", "str"]
)
@pytest.mark.parametrize("method", ["get", "acquire"])
@pytest.mark.parametrize("n_servers", [1, 2])  # 1: the path straight to the one pool
def test_bad_timeout_is_refused_by_the_manager(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    bad: object,
    method: str,
    n_servers: int,
) -> None:
    addresses = [echo_server_factory().address for _ in range(n_servers)]
    manager = make_manager({"backends": {"b": {"servers": addresses, "pool": {"min_idle": 0}}}})
    manager.get("b").release()  # one idle connection: the fast path is open
    with pytest.raises((TypeError, ValueError), match=r"^backend 'b': timeout"):
        getattr(manager, method)("b", timeout=bad)
    for pool in manager.backends["b"].pools:
        s = pool.stats()
        assert (s.waiting, s.in_use, s.timeouts) == (0, 0, 0), s


@pytest.mark.parametrize("method", ["get", "acquire"])
def test_bad_timeout_with_a_new_adhoc_name_makes_no_pool(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    method: str,
    no_fd_leak: None,
) -> None:
    """The timeout is checked before the name is routed: a bad one with a host:port
    never seen leaves no ad-hoc pool behind (one used to be made, then the check
    raised)."""
    address = echo_server_factory().address
    manager = make_manager({})
    with pytest.raises(TypeError, match=rf"^backend '{address}': timeout"):
        getattr(manager, method)(address, timeout="1")
    assert not manager._adhoc and not manager._all_pools()  # no ad-hoc backend, no pool
    with manager.get(address, timeout=5) as conn:  # the name itself works
        assert conn.address == address


# -- a full server is not a failed one (DESIGN 17) -------------------------------------


@pytest.mark.parametrize("strategy", ["round_robin", "least_active", "weighted", "random"])
@pytest.mark.parametrize("max_waiting", [1, 0], ids=["sheds", "queues"])
def test_full_server_sends_callers_to_another_server(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    strategy: str,
    max_waiting: int,
) -> None:
    """A full (max_size 1, one caller queued), B idle: every new caller is served by B
    at once, none refused or left to time out, and A's breaker is not charged."""
    a, b = echo_server_factory(), echo_server_factory()
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "strategy": strategy,
                    "servers": [a.address, b.address],
                    "pool": {"min_idle": 0, "max_size": 1, "max_waiting": max_waiting},
                }
            }
        }
    )
    pool_a = manager.backends["b"].pools[0]
    held = pool_a.acquire(timeout=5)
    queued = gevent.spawn(pool_a.acquire, 10)
    gevent.sleep(0)
    assert pool_a.stats().waiting == 1
    for _ in range(10):
        start = monotonic()
        with manager.get("b", timeout=0.5) as conn:
            assert conn.address == b.address
        assert monotonic() - start < 0.5
    s = pool_a.stats()
    assert (s.waiting, s.shed, s.timeouts) == (1, 0, 0), s
    assert pool_a.breaker.failure_count == 0 and pool_a.breaker.state == "closed"
    held.release()
    queued.get(timeout=5).release()


def test_every_server_full_and_shedding_is_pool_exhausted(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
) -> None:
    a, b = echo_server_factory(), echo_server_factory()
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "servers": [a.address, b.address],
                    "pool": {"min_idle": 0, "max_size": 1, "max_waiting": 1},
                }
            }
        }
    )
    pools = manager.backends["b"].pools
    held = [p.acquire(timeout=5) for p in pools]
    queued = [gevent.spawn(p.acquire, 10) for p in pools]
    gevent.sleep(0)
    with pytest.raises(lbpool.PoolExhausted):
        manager.get("b", timeout=1)
    for pool in pools:
        assert pool.breaker.failure_count == 0
    for conn in held:
        conn.release()
    for g in queued:
        g.get(timeout=5).release()


@pytest.mark.parametrize("strategy", ["round_robin", "least_active", "weighted", "random"])
def test_saturated_servers_share_the_queue(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    strategy: str,
) -> None:
    """When every server is full, callers queue across them as the strategy spreads
    them; looking for a server that can serve at once must not skew the strategy (it
    used to move round_robin's cursor, so nearly every caller queued on the first)."""
    a, b = echo_server_factory(), echo_server_factory()
    manager = make_manager(
        {
            "backends": {
                "b": {
                    "strategy": strategy,
                    "servers": [a.address, b.address],
                    "pool": {"min_idle": 0, "max_size": 2, "acquire_timeout": 10},
                }
            }
        }
    )
    release = Event()

    def hold() -> None:
        with manager.get("b"):
            release.wait(10)

    holders = [gevent.spawn(hold) for _ in range(4)]  # both servers full
    assert settle(lambda: all(p.stats().in_use == 2 for p in manager.backends["b"].pools), 5)
    queued = [gevent.spawn(hold) for _ in range(40)]
    assert settle(lambda: sum(p.stats().waiting for p in manager.backends["b"].pools) == 40, 5)
    waiting = [p.stats().waiting for p in manager.backends["b"].pools]
    release.set()
    gevent.joinall(holders + queued, timeout=10, raise_error=True)
    assert min(waiting) >= 10, waiting  # an even spread is 20/20; starvation was 40/0


@pytest.mark.parametrize(
    "bad", [1j, float("nan"), True, "0.5"], ids=["complex", "nan", "bool", "str"]
)
def test_bad_timeout_is_refused_by_wait_ready_and_close(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    bad: object,
) -> None:
    a = echo_server_factory()
    manager = make_manager({"backends": {"b": {"servers": [a.address]}}})
    with pytest.raises((TypeError, ValueError), match="timeout"):
        manager.wait_ready(bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="timeout"):
        manager.close(bad)  # type: ignore[arg-type]
    assert not manager.closed  # refused before anything changed
    manager.wait_ready(timeout=5)
    with manager.get("b", timeout=10**400) as conn:  # too large for a float: for ever
        conn.sendall(b"x")


@pytest.mark.parametrize("release", ["just_before", "just_after"])
def test_reload_fails_a_removed_servers_waiter_over_never_hands_it_that_server(
    servers: Callable[..., CountingServer],
    make_manager: Callable[..., PoolManager],
    release: str,
) -> None:
    """A caller queued on a server a reload removes is failed over to the servers left,
    within its deadline: never handed the removed server's connection, whether that
    came back just before the reload (handed, its waiter not awake yet) or just after
    (the drain not started yet); the removed server's connection then closes."""
    a, b = servers(), servers()
    manager = make_manager(config([a.address, b.address], pool={"max_size": 1}))
    held = {}
    for _ in range(2):
        conn = manager.acquire("svc")
        held[conn.address] = conn
    assert set(held) == {a.address, b.address}  # both full: the next caller queues
    got: dict[str, Any] = {}

    def waiter() -> None:
        with manager.get("svc", timeout=5) as conn:
            got["address"] = conn.address
            conn.sendall(b"ping")
            got["echo"] = conn.recv(4)

    w = gevent.spawn(waiter)
    pools = {p.name: p for p in manager.backends["svc"].pools}
    assert settle(lambda: any(p.stats().waiting for p in pools.values()), timeout=5)
    gone = next(name for name, p in pools.items() if p.stats().waiting)
    kept = a.address if gone == b.address else b.address
    if release == "just_before":  # handed to the waiter, which has not woken yet
        held[gone].release()
    manager.reload(config([kept], pool={"max_size": 1}))
    if release == "just_after":
        held[gone].release()
    held[kept].release()  # the server left can serve it now
    w.join(5)
    assert w.successful(), w.exception
    assert got == {"address": kept, "echo": b"ping"}
    removed = pools[gone]
    assert settle(lambda: removed.stats().size == 0 and removed.closed, timeout=5)
    gone_server = a if gone == a.address else b
    assert settle(lambda: not gone_server._clients, timeout=5)  # its connection closed


# -- max_size per server across reloads (DESIGN 22) -----------------------------------------


@pytest.mark.parametrize("readds", [1, 2])
def test_max_size_holds_when_a_server_is_removed_and_added_back(
    make_manager: Callable[..., PoolManager], readds: int, no_fd_leak: None
) -> None:
    """``max_size: 2``, two connections in use; a reload removes the server and another
    adds it back (``readds`` 2: twice, so the first new pool is itself removed while the
    first one still drains). The new pool counts the draining pool's in-use connections:
    never more than 2 connections are open to the server, and callers are served as the
    old ones come back."""
    srv, other = PeakEchoServer().start(), EchoServer().start()
    try:
        pool_cfg = {"max_size": 2, "acquire_timeout": 10}
        manager = make_manager(config([srv.address], pool=pool_cfg))
        held = [manager.acquire("svc") for _ in range(2)]
        srv.wait_active(2)
        for _ in range(readds):
            manager.reload(config([other.address], pool=pool_cfg))
            manager.reload(config([srv.address], pool=pool_cfg))
        fresh = manager.backends["svc"].pools[0]
        served: list[str] = []
        go = Event()

        def caller() -> None:
            with manager.get("svc", timeout=10) as conn:
                conn.sendall(b"ping")
                assert recv_exact(conn, 4) == b"ping"
                served.append(conn.address)
                go.wait(10)  # held: the next caller needs a slot

        def queued_or_holding() -> int:
            st = fresh.stats()
            return st.waiting + len(served)

        callers = [gevent.spawn(caller) for _ in range(3)]
        assert settle(lambda: queued_or_holding() == 3, timeout=5), fresh.stats()
        assert srv.peak <= 2, f"{srv.peak} connections were open at once (max_size 2)"
        assert fresh.stats().waiting == 3  # nothing dialed past max_size
        for conn in held:
            conn.release()  # each closes (its pool drains) and frees a slot here
        assert settle(lambda: len(served) == 2, timeout=5), fresh.stats()
        go.set()
        gevent.joinall(callers, timeout=10)
        assert all(c.successful() for c in callers), [c.exception for c in callers]
        assert served == [srv.address] * 3
        assert srv.peak <= 2, f"{srv.peak} connections were open at once (max_size 2)"
        st = fresh.stats()
        assert (st.size, st.max_size) == (2, 2)  # both slots its own again
    finally:
        srv.stop()
        other.stop()


def test_a_timeout_says_when_a_replaced_pool_still_holds_the_slots(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    no_fd_leak: None,
) -> None:
    """A server removed and added back while its connections are in use: the new pool
    may open none until they come back (DESIGN 22), and its timeout says why instead of
    "0 in use, 2 max"."""
    srv, other = echo_server_factory(), echo_server_factory()
    pool_cfg = {"max_size": 2, "acquire_timeout": 10}
    manager = make_manager(config([srv.address], pool=pool_cfg))
    held = [manager.acquire("svc") for _ in range(2)]
    manager.reload(config([other.address], pool=pool_cfg))
    manager.reload(config([srv.address], pool=pool_cfg))
    with pytest.raises(PoolTimeout) as info:
        manager.get("svc", timeout=0.1)
    assert "2 max, 2 of them still held by a pool a reload replaced" in str(info.value)
    for conn in held:
        conn.release()
    with manager.get("svc", timeout=10) as conn:  # a slot came back: served
        assert conn.address == srv.address
    hold = [manager.acquire("svc", timeout=10) for _ in range(2)]
    with pytest.raises(PoolTimeout) as info:  # a plain timeout says nothing of it
        manager.get("svc", timeout=0.1)
    assert "still held" not in str(info.value)
    for conn in hold:
        conn.release()


# -- errors name where they happened (DESIGN, Errors) ----------------------------------------


def test_pool_errors_carry_address_and_backend_at_every_raise_site(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
) -> None:
    """``PoolTimeout``, ``PoolExhausted`` and ``PoolClosed`` say which server (or None)
    and which backend (or None: an ad-hoc ``host:port``, the manager as a whole)."""
    a, adhoc = echo_server_factory(), echo_server_factory()
    pool_cfg = {"min_idle": 0, "max_size": 1, "max_waiting": 1}
    manager = make_manager(
        {"defaults": {"pool": pool_cfg}, "backends": {"b": {"servers": [a.address]}}}
    )
    pool = manager.backends["b"].pools[0]
    held = manager.acquire("b")
    with pytest.raises(PoolTimeout) as timed_out:  # the pool's own wait
        pool.acquire(timeout=0.05)
    assert (timed_out.value.address, timed_out.value.backend) == (a.address, "b")
    with pytest.raises(PoolTimeout) as timed_out:  # through the manager: the same pool
        manager.acquire("b", timeout=0.05)
    assert (timed_out.value.address, timed_out.value.backend) == (a.address, "b")
    queued = gevent.spawn(pool.acquire, 10)
    assert settle(lambda: pool.stats().waiting == 1, 5)
    with pytest.raises(lbpool.PoolExhausted) as shed:
        pool.acquire(timeout=1)
    assert (shed.value.address, shed.value.backend) == (a.address, "b")
    held.release()
    queued.get(timeout=5).release()
    adhoc_held = manager.acquire(adhoc.address)
    with pytest.raises(PoolTimeout) as timed_out:
        manager.acquire(adhoc.address, timeout=0.05)
    assert (timed_out.value.address, timed_out.value.backend) == (adhoc.address, None)
    adhoc_pool = manager.stats().backends[""].servers[adhoc.address]
    assert adhoc_pool.backend is None
    adhoc_held.release()
    waiting = gevent.spawn(pool.acquire, 10)  # a waiter woken by close
    blocker = manager.acquire("b")
    assert settle(lambda: pool.stats().waiting == 1, 5)
    manager.close(timeout=0)
    with pytest.raises(PoolClosed) as closed:
        waiting.get(timeout=5)
    assert (closed.value.address, closed.value.backend) == (a.address, "b")
    with pytest.raises(PoolClosed) as closed:  # the pool itself, closed
        pool.acquire(timeout=1)
    assert (closed.value.address, closed.value.backend) == (a.address, "b")
    with pytest.raises(PoolClosed) as closed:  # the manager as a whole
        manager.acquire("b", timeout=1)
    assert (closed.value.address, closed.value.backend) == (None, None)
    blocker.release()


@pytest.mark.parametrize("bad", [["svc"], {"svc": 1}, {"svc"}], ids=["list", "dict", "set"])
def test_unhashable_name_is_a_clear_type_error_and_changes_nothing(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    bad: object,
) -> None:
    a = echo_server_factory()
    manager = make_manager({"backends": {"svc": {"servers": [a.address]}}})
    before = manager.stats().to_dict()
    for call in (manager.get, manager.acquire):
        with pytest.raises(TypeError, match=r"name must be a str .* got a " + type(bad).__name__):
            call(bad, timeout=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a str"):
        manager.owner(bad, "k")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"name must be a str .* got a " + type(bad).__name__):
        manager.call(bad, lambda conn: None)  # type: ignore[arg-type]
    assert manager.stats().to_dict() == before  # no ad-hoc pool, nothing counted
    with pytest.raises(UnknownBackend):  # hashable but not a name: simply unknown
        manager.get(("127.0.0.1", 1), timeout=1)  # type: ignore[arg-type]
    with manager.get("svc", timeout=5) as conn:
        conn.sendall(b"x")


def test_close_ends_a_borrow_check_in_flight_and_lends_nothing_after(
    make_manager: Callable[..., PoolManager],
) -> None:
    """A caller's borrow check (send/expect, run inline) in flight when ``close(0)``
    returns: the check is ended, the caller gets ``PoolClosed`` and its connection is
    closed -- nothing is lent after close() returned."""
    server = EchoServer(delay=1.0).start()
    try:
        manager = make_manager(
            {
                "backends": {
                    "b": {
                        "servers": [server.address],
                        "pool": {"min_idle": 0, "check_after": 0, "acquire_timeout": 10},
                        "health_check": {"send": "PING\r\n", "expect": "+PONG", "timeout": 5},
                    }
                }
            }
        )
        manager.acquire("b").release()  # one idle connection, checked on its next borrow
        pool = manager.backends["b"].pools[0]
        caller = gevent.spawn(manager.acquire, "b", 10)
        assert settle(lambda: pool.stats().pending == 1, 5)  # its check waits for the reply
        manager.close(timeout=0)
        caller.join(5)
        assert isinstance(caller.exception, PoolClosed), caller.value
        # the failed check's connection retired, and no dial into the closed pool
        # after it (closed["discarded"]: test_pool's copy of this checks the message)
        closed = {reason: n for reason, n in pool.stats().closed.items() if n}
        assert closed == {"unhealthy": 1}, closed
        assert pool.stats().size == 0
    finally:
        server.stop()


def test_get_hands_back_what_the_backend_route_returns(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``get`` passes on what ``Backend.acquire`` returns, unchecked, on the compiled
    path as on the pure one (a test double of the interpreted route keeps working)."""
    a, b = echo_server_factory(), echo_server_factory()
    manager = make_manager({"backends": {"two": {"servers": [a.address, b.address]}}})
    double = object()
    monkeypatch.setattr(Backend, "acquire", lambda self, timeout=None, key=None: double)
    assert manager.get("two") is double
    assert manager.acquire("two", timeout=1) is double


def test_reload_of_none_is_refused_and_changes_nothing(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer
) -> None:
    """``PoolManager(None)`` is an empty config; ``reload(None)`` (a loader that
    returned nothing) removed every backend silently: it is a ``ConfigError`` now, and
    ``reload({})`` says so on purpose."""
    manager = make_manager({"backends": {"b": {"servers": [echo_server.address]}}})
    with pytest.raises(ConfigError, match=r"reload needs a config, got None"):
        manager.reload(None)
    assert list(manager.backends) == ["b"]
    with manager.get("b", timeout=5) as conn:
        conn.sendall(b"x")
        assert recv_exact(conn, 1) == b"x"
    manager.reload({})
    assert list(manager.backends) == []


def test_discard_refuses_what_is_not_an_exception(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer
) -> None:
    """``discard(exc)`` with a non-exception ``exc`` was taken, and counted as an error
    close: a ``TypeError`` naming it, with the connection still the caller's."""
    manager = make_manager({"backends": {"b": {"servers": [echo_server.address]}}})
    conn = manager.get("b", timeout=5)
    with pytest.raises(TypeError) as info:
        conn.discard("not an exception")  # type: ignore[arg-type]
    assert (
        str(info.value) == "discard: exc must be an exception or None, got str 'not an exception'"
    )
    conn.sendall(b"y")  # still borrowed
    assert recv_exact(conn, 1) == b"y"
    conn.discard(ConnectionResetError("gone"))
    stats = manager.stats().backends["b"].servers[echo_server.address]
    assert stats.closed["error"] == 1 and stats.in_use == 0
