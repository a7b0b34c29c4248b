"""PoolManager.call: fn(conn), retried on a fresh acquisition when the connection dies
in flight -- on real loopback sockets, faults made by FaultProxy.

A fault "in flight" is made the way a server makes it: ``fn`` sends its request, the
proxy resets every connection it carries (``reset_all``), and ``fn``'s read fails with
a reset or EOF (``recv_exact`` raises ``ConnectionResetError`` on EOF).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import gevent
import pytest

from lbpool import (
    BackendUnavailable,
    LbpoolError,
    PoolClosed,
    PooledConnection,
    PoolManager,
    PoolTimeout,
)
from lbpool.testing import EchoServer, FaultProxy, recv_exact

SLACK = 1.0  # scheduling on a loaded 2-core box: a healthy round trip can take 100s of ms


class Cluster:
    """``n`` EchoServers, each behind a FaultProxy; the manager sees the proxies."""

    def __init__(self, n: int) -> None:
        self.servers = [EchoServer().start() for _ in range(n)]
        self.proxies = [FaultProxy(s.address).start() for s in self.servers]
        self.addresses = [p.address for p in self.proxies]
        self.by_address = dict(zip(self.addresses, self.proxies, strict=True))

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture
def cluster_factory() -> Iterator[Callable[[int], Cluster]]:
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        cluster = Cluster(n)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def config(addresses: list[str], strategy: str = "round_robin", **sections: Any) -> Any:
    backend = {
        "strategy": strategy,
        "servers": addresses,
        "pool": {"min_idle": 0, "acquire_timeout": 5},
        "breaker": {"failure_threshold": 1000},  # these tests judge retries, not breakers
        **sections,
    }
    return {"backends": {"b": backend}}


def echo(conn: PooledConnection, data: bytes = b"ping") -> tuple[str, int]:
    conn.settimeout(5)
    conn.sendall(data)
    assert recv_exact(conn, len(data)) == data
    return conn.address, conn.rank


class Script:
    """An ``fn`` whose first ``failures`` attempts die in flight (the proxy resets the
    connection between the request and its reply); records every attempt's server."""

    def __init__(self, cluster: Cluster, manager: PoolManager, failures: int = 1) -> None:
        self.cluster = cluster
        self.manager = manager
        self.failures = failures
        self.seen: list[str] = []
        self.errors: list[BaseException] = []

    def __call__(self, conn: PooledConnection) -> tuple[str, int]:
        self.seen.append(conn.address)
        if len(self.seen) > self.failures:
            return echo(conn)
        conn.settimeout(5)
        conn.sendall(b"ping")
        reset_in_flight(self.manager, self.cluster, conn)
        try:
            recv_exact(conn, 4)
        except OSError as exc:
            self.errors.append(exc)
            raise
        raise AssertionError("the reset connection answered")


def reset_in_flight(manager: PoolManager, cluster: Cluster, conn: PooledConnection) -> None:
    """The server resets ``conn`` (every connection its proxy carries) now. A fresh
    dial may not have reached the proxy's accept yet: wait until the proxy accepted as
    many connections as were dialed to it, so ``conn`` is among those it resets."""
    proxy = cluster.by_address[conn.address]
    dials = sum(s.misses for s in manager.stats().servers() if s.address == conn.address)
    proxy.wait_accepted(dials)
    proxy.reset_all()


def test_call_returns_fn_result_and_releases(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses))
    address, rank = manager.call("b", echo)
    assert address in cluster.addresses and rank == 0
    stats = manager.stats().backends["b"]
    assert (stats.calls, stats.retries, stats.retries_denied) == (1, 0, 0)
    assert sum(s.in_use for s in stats.servers.values()) == 0
    assert sum(s.idle for s in stats.servers.values()) == 1  # released, not discarded


@pytest.mark.parametrize("strategy", ["round_robin", "least_active", "weighted", "random"])
def test_a_reset_in_flight_is_retried_on_another_server(
    make_manager: Callable[..., PoolManager],
    cluster_factory: Callable[[int], Cluster],
    strategy: str,
    no_fd_leak: None,
) -> None:
    cluster = cluster_factory(3)
    manager = make_manager(config(cluster.addresses, strategy))
    for _ in range(12):
        script = Script(cluster, manager)
        address, _ = manager.call("b", script)
        assert len(script.seen) == 2 and len(script.errors) == 1
        assert script.seen[1] != script.seen[0], script.seen  # the failed server avoided
        assert address == script.seen[1]
    stats = manager.stats().backends["b"]
    assert (stats.calls, stats.retries, stats.retries_denied) == (12, 12, 0)
    errors = sum(s.closed["error"] for s in stats.servers.values())
    assert errors == 12  # each dead connection discarded with its error: breakers heard


def test_one_server_retries_on_itself(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(1)
    manager = make_manager(config(cluster.addresses))
    script = Script(cluster, manager)
    assert manager.call("b", script)[0] == cluster.addresses[0]
    assert script.seen == [cluster.addresses[0]] * 2


def test_hashing_retries_the_keys_owner_again(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(3)
    manager = make_manager(config(cluster.addresses, "maglev"))
    owner = manager.owner("b", "user:42")
    script = Script(cluster, manager)
    assert manager.call("b", script, key="user:42") == (owner, 0)
    assert script.seen == [owner, owner]


def test_hashing_retry_goes_to_the_fallback_once_the_owner_tripped(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(3)
    manager = make_manager(
        config(cluster.addresses, "rendezvous", breaker={"failure_threshold": 1})
    )
    owner = manager.owner("b", "user:42")
    script = Script(cluster, manager)
    address, rank = manager.call("b", script, key="user:42")
    assert script.seen[0] == owner and address != owner and rank == 1


def test_hashing_with_fallback_none_raises_the_retrys_error_chained(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(3)
    manager = make_manager(
        config(
            cluster.addresses,
            "ring_hash",
            breaker={"failure_threshold": 1},
            balance={"hash_fallback": "none"},
        )
    )
    script = Script(cluster, manager)
    with pytest.raises(BackendUnavailable) as info:
        manager.call("b", script, key="k")
    assert info.value.__cause__ is script.errors[0]
    assert manager.stats().backends["b"].retries == 1


def test_a_non_network_error_is_not_retried(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses))
    attempts: list[str] = []
    bad = ValueError("a wrong reply")

    def fn(conn: PooledConnection) -> None:
        attempts.append(conn.address)
        echo(conn)
        raise bad

    with pytest.raises(ValueError) as info:
        manager.call("b", fn)
    assert info.value is bad and len(attempts) == 1
    stats = manager.stats().backends["b"]
    assert (stats.calls, stats.retries, stats.retries_denied) == (1, 0, 0)
    server = stats.servers[attempts[0]]
    # discarded as ``with conn:`` discards it: closed, and not a failure of the server
    assert (server.in_use, server.idle, server.closed["error"]) == (0, 0, 1)
    assert server.breaker_state == "closed"


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: PoolTimeout("a nested acquisition"),  # lbpool's own: never a network error
        lambda: BackendUnavailable("other", {}, {}),
        lambda: gevent.Timeout(0.01),  # the caller's own cancellation
    ],
    ids=["PoolTimeout", "BackendUnavailable", "gevent.Timeout"],
)
def test_lbpool_errors_and_cancellation_are_not_retried(
    make_manager: Callable[..., PoolManager],
    cluster_factory: Callable[[int], Cluster],
    make_error: Callable[[], BaseException],
) -> None:
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses))
    attempts = []
    error = make_error()

    def fn(conn: PooledConnection) -> None:
        attempts.append(conn.address)
        raise error

    with pytest.raises(type(error)) as info:
        manager.call("b", fn)
    assert info.value is error and len(attempts) == 1
    assert manager.stats().backends["b"].retries == 0


def test_attempts_counts_every_try(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(3)
    manager = make_manager(config(cluster.addresses, retry={"attempts": 3}))
    script = Script(cluster, manager, failures=5)
    with pytest.raises(OSError) as info:
        manager.call("b", script)
    assert len(script.seen) == 3
    assert info.value is script.errors[-1]  # the last attempt's error, as fn raised it
    assert manager.stats().backends["b"].retries == 2
    # and a call that succeeds on its third try
    script = Script(cluster, manager, failures=2)
    assert manager.call("b", script)[0] == script.seen[2]
    assert manager.stats().backends["b"].retries == 4


def test_attempts_one_never_retries(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses, retry={"attempts": 1}))
    script = Script(cluster, manager)
    with pytest.raises(OSError) as info:
        manager.call("b", script)
    assert info.value is script.errors[0] and len(script.seen) == 1
    stats = manager.stats().backends["b"]
    assert (stats.calls, stats.retries, stats.retries_denied) == (1, 0, 0)


def test_no_retry_starts_after_the_deadline(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    """fn's first attempt outlives the call's timeout: its error propagates, unretried."""
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses))
    cluster.proxies[0].blackhole()
    cluster.proxies[1].blackhole()
    seen: list[str] = []

    def fn(conn: PooledConnection) -> None:
        seen.append(conn.address)
        conn.settimeout(0.5)
        conn.sendall(b"ping")
        conn.recv(4)  # nothing comes back: socket.timeout (an OSError) after 0.5 s

    with pytest.raises(socket.timeout):
        manager.call("b", fn, timeout=0.3)
    assert len(seen) == 1
    stats = manager.stats().backends["b"]
    assert (stats.calls, stats.retries, stats.retries_denied) == (1, 0, 0)


def test_one_deadline_bounds_the_retrys_acquisition(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    """The first attempt takes 0.4 s of a 1 s deadline, then dies; the retry (kept off
    the failed server) must dial the other one, which has gone silent: its dial's setup
    hook would wait out dial.timeout (30 s), but gets only what is left of the call's
    one deadline."""
    cluster = cluster_factory(2)
    manager = make_manager(
        config(
            cluster.addresses,
            dial={"timeout": 30},
            pool={"min_idle": 0, "acquire_timeout": 30},
            setup="tests.support.hooks:setup_ping",
        )
    )
    seen: list[str] = []
    errors: list[BaseException] = []

    def fn(conn: PooledConnection) -> tuple[str, int]:
        seen.append(conn.address)
        if len(seen) > 1:
            return echo(conn)
        other = next(a for a in cluster.addresses if a != conn.address)
        cluster.by_address[other].blackhole()
        gevent.sleep(0.4)  # a slow request, then its server resets it
        conn.settimeout(5)
        conn.sendall(b"ping")
        reset_in_flight(manager, cluster, conn)
        try:
            recv_exact(conn, 4)
        except OSError as exc:
            errors.append(exc)
            raise
        raise AssertionError("the reset connection answered")

    start = monotonic()
    with pytest.raises(LbpoolError) as info:
        manager.call("b", fn, timeout=1.0)
    elapsed = monotonic() - start
    assert len(seen) == 1 and len(errors) == 1
    assert elapsed < 1.0 + SLACK, elapsed  # not dial.timeout (30 s)
    assert isinstance(info.value, (PoolTimeout, BackendUnavailable)), info.value
    assert info.value.__cause__ is errors[0]
    assert manager.stats().backends["b"].retries == 1


def test_ad_hoc_host_port_names_work(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(1)
    manager = make_manager({"defaults": {"pool": {"min_idle": 0}}})
    target = cluster.addresses[0]
    script = Script(cluster, manager)
    assert manager.call(target, script) == (target, 0)
    assert script.seen == [target, target]
    assert manager.call(target, echo) == (target, 0)
    adhoc = manager.stats().backends[""]
    assert (adhoc.calls, adhoc.retries, adhoc.retries_denied) == (2, 1, 0)
    assert manager.stats().to_dict()["backends"][""]["retries"] == 1


def test_stats_are_exact_under_a_scripted_workload(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    cfg = config(cluster.addresses)
    # "tight": no reserve, no share: every retry is denied
    cfg["backends"]["tight"] = {**cfg["backends"]["b"], "retry": {"budget_percent": 0}}
    cfg["backends"]["tight"]["retry"]["min_per_second"] = 0
    manager = make_manager(cfg)
    for _ in range(3):
        manager.call("b", echo)
    for _ in range(2):
        manager.call("b", Script(cluster, manager))
    with pytest.raises(ZeroDivisionError):
        manager.call("b", lambda conn: 1 // 0)
    for _ in range(4):
        with pytest.raises(OSError):
            manager.call("tight", Script(cluster, manager))
    manager.call("tight", echo)
    stats = manager.stats()
    b, tight = stats.backends["b"], stats.backends["tight"]
    assert (b.calls, b.retries, b.retries_denied) == (6, 2, 0)
    assert (tight.calls, tight.retries, tight.retries_denied) == (5, 0, 4)
    data = stats.to_dict()["backends"]
    assert {k: data["tight"][k] for k in ("calls", "retries", "retries_denied")} == {
        "calls": 5,
        "retries": 0,
        "retries_denied": 4,
    }


def test_a_new_manager_can_retry_min_per_second_at_once(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    made = monotonic()
    manager = make_manager(
        config(cluster.addresses, retry={"budget_percent": 0, "min_per_second": 5})
    )
    outcomes = []
    for _ in range(8):
        script = Script(cluster, manager)
        try:
            manager.call("b", script)
            outcomes.append(True)
        except OSError:
            outcomes.append(False)
    elapsed = monotonic() - made
    stats = manager.stats().backends["b"]
    assert outcomes[:5] == [True] * 5  # the reserve is full from the start
    refill = int(5 * elapsed)  # the reserve refills at 5 a second
    assert 5 <= stats.retries <= 5 + refill, (stats, elapsed)
    assert stats.retries + stats.retries_denied == 8
    assert sum(outcomes) == stats.retries


def test_budget_bounds_retries_when_every_request_fails(
    make_manager: Callable[..., PoolManager],
    cluster_factory: Callable[[int], Cluster],
    no_fd_leak: None,
) -> None:
    """Every server resets every request (it accepts, then resets each connection as
    it is used): over a run shorter than the 10 s window (2 s here; the bound holds
    for any span inside one window), retries never exceed budget_percent of calls
    plus min_per_second for each second (and the reserve's first second). Checked
    while the run goes, and at its end."""
    cluster = cluster_factory(3)
    made = monotonic()
    manager = make_manager(
        config(
            cluster.addresses,
            pool={"min_idle": 0, "max_size": 4, "acquire_timeout": 5},
            # every request fails: no breaker may open in the run (calls would then
            # fail at acquisition, unretried), however fast the box runs them
            breaker={"failure_threshold": 10**9},
            retry={"attempts": 3, "budget_percent": 20, "min_per_second": 10},
        )
    )
    for proxy in cluster.proxies:
        proxy.close_after(0)  # every connection is closed once it is used

    def fn(conn: PooledConnection) -> None:
        conn.settimeout(5)
        conn.sendall(b"ping")
        recv_exact(conn, 4)

    made_calls = 0
    unexpected: list[BaseException] = []
    violations: list[str] = []
    stop = monotonic() + 2.0

    def check() -> None:
        s = manager.stats().backends["b"]
        bound = 0.20 * s.calls + 10 * (1 + (monotonic() - made))
        if s.retries > bound:
            violations.append(f"{s.retries} retries > {bound:.1f} after {s.calls} calls")

    def worker() -> None:
        nonlocal made_calls
        while monotonic() < stop:
            made_calls += 1
            try:
                manager.call("b", fn)
                unexpected.append(AssertionError("a call succeeded"))
            except OSError as exc:
                if isinstance(exc, LbpoolError):
                    unexpected.append(exc)
            check()

    gevent.joinall([gevent.spawn(worker) for _ in range(8)], timeout=30)
    s = manager.stats().backends["b"]
    print(
        f"\ncalls={s.calls} retries={s.retries} denied={s.retries_denied} "
        f"elapsed={monotonic() - made:.2f}s"
    )  # shown with -s
    assert not unexpected, unexpected[:3]
    assert not violations, violations[:3]
    assert s.calls == made_calls > 50
    assert s.retries_denied > 0  # the budget did refuse some
    assert s.retries <= 0.20 * s.calls + 10 * (1 + (monotonic() - made))
    # and the retries it allowed were made: without the budget, 2 per call
    assert s.retries + s.retries_denied <= 2 * s.calls


def test_call_checks_its_arguments_before_anything_changes(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(1)
    manager = make_manager(config(cluster.addresses))
    with pytest.raises(TypeError):
        manager.call("b", echo, timeout="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        manager.call("b", echo, key=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as info:
        manager.call("b", 3)  # type: ignore[arg-type]
    assert str(info.value) == "call 'b': fn must be a callable, got int 3"
    with pytest.raises(TypeError) as info:  # an ad-hoc name: no pool is made for it
        manager.call(cluster.servers[0].address, None)  # type: ignore[arg-type]
    assert str(info.value).endswith("fn must be a callable, got None")
    stats = manager.stats()
    assert list(stats.backends) == ["b"]  # no ad-hoc backend ("")
    assert stats.backends["b"].calls == 0
    assert [(s.acquired, s.misses) for s in stats.servers()] == [(0, 0)]  # nothing borrowed
    manager.close()
    with pytest.raises(PoolClosed):
        manager.call("b", echo)


def test_call_without_a_key_on_a_hashing_backend_counts_nothing(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses, strategy="maglev"))
    with pytest.raises(ValueError, match=r"^backend 'b' routes by key \(maglev\): pass key="):
        manager.call("b", echo)
    stats = manager.stats()
    assert stats.backends["b"].calls == 0
    assert sum(s.acquired for s in stats.servers()) == 0
    manager.call("b", echo, key="k")
    assert manager.stats().backends["b"].calls == 1


def test_a_retry_refused_after_a_reload_to_hashing_names_the_network_error(
    make_manager: Callable[..., PoolManager], cluster_factory: Callable[[int], Cluster]
) -> None:
    """``fn`` reloads its round_robin backend to maglev, then its connection dies: the
    retry, which has no key, cannot be made (``ValueError``), and says why it was
    tried: the network error is its ``__cause__``, as for lbpool's own errors."""
    cluster = cluster_factory(2)
    manager = make_manager(config(cluster.addresses))

    def fn(conn: PooledConnection) -> None:
        manager.reload(config(cluster.addresses, "maglev"))
        raise ConnectionResetError("died in flight")

    with pytest.raises(ValueError, match="routes by key") as info:
        manager.call("b", fn)
    assert isinstance(info.value.__cause__, ConnectionResetError)
