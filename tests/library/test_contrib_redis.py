"""redis-py over lbpool (``lbpool.contrib.redis``) against real ``redis-server``s on
loopback: a primary and two replicas, the handshake in the setup hook, pipelines,
MULTI/EXEC, pubsub, a replica killed under load, and errors mapped to redis-py's."""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lbpool import BackendUnavailable, PoolManager, PoolTimeout
from lbpool.contrib.redis import ConnectionPool, handshake
from lbpool.testing import FaultProxy
from tests.support.leaks import settle
from tests.support.procs import read_child_report
from tests.support.redis_server import RedisServer, RedisServers, needs_redis_server

pytestmark = [pytest.mark.redis, needs_redis_server]

PING = {"send": "PING\r\n", "expect": "+PONG", "timeout": "1s"}
# redis-py 5.x retries a command only on the errors listed in retry_on_error (6+ retries
# the retry's supported errors); giving both works on every version.
RETRY_ONCE: dict[str, Any] = {
    "retry": Retry(NoBackoff(), 1),
    "retry_on_error": [redis.ConnectionError],
}


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    servers = RedisServers(str(tmp_path))
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture
def trio(redis_servers: RedisServers) -> tuple[RedisServer, RedisServer, RedisServer]:
    """A primary and two replicas (``--replicaof``), replication up (checked with WAIT)."""
    primary = redis_servers.start(["--repl-diskless-sync-delay", "0"])
    replicas = [
        redis_servers.start(["--replicaof", "127.0.0.1", str(primary.port)]) for _ in range(2)
    ]
    direct = redis.Redis(host="127.0.0.1", port=primary.port, socket_timeout=15)
    try:
        direct.set("replication:ready", "1")
        assert direct.wait(2, 10_000) == 2, "replicas did not sync within 10 s"
    finally:
        direct.close()
    return primary, replicas[0], replicas[1]


def _config(primary: str, replicas: list[str], **pool: Any) -> dict[str, Any]:
    return {
        "defaults": {
            "pool": {"min_idle": 1, "max_size": 20, "acquire_timeout": "3s", "check_after": 0,
                     **pool},
            "dial": {"timeout": "1s"},
            "breaker": {"failure_threshold": 2, "recovery_timeout": "30s"},
            "health_check": PING,
        },
        "backends": {
            "primary": {"servers": [primary], "setup": handshake()},
            "replicas": {"strategy": "least_active", "servers": replicas, "setup": handshake()},
        },
    }  # fmt: skip


def test_reads_from_replicas_writes_to_primary_pipelines_multi_exec(
    trio: tuple[RedisServer, RedisServer, RedisServer],
    make_manager: Callable[..., PoolManager],
) -> None:
    primary, r1, r2 = trio
    manager = make_manager(_config(primary.address, [r1.address, r2.address]))
    manager.wait_ready(timeout=5)
    writes = redis.Redis(connection_pool=ConnectionPool(manager, "primary"))
    reads = redis.Redis(connection_pool=ConnectionPool(manager, "replicas", decode_responses=True))

    for i in range(20):
        assert writes.set(f"k:{i}", f"v{i}") is True
    assert writes.wait(2, 5_000) == 2
    with pytest.raises(redis.ReadOnlyError):
        reads.set("k:0", "replicas refuse writes")

    def read_all(n: int) -> None:
        for i in range(20):
            assert reads.get(f"k:{i}") == f"v{i}"

    gevent.joinall([gevent.spawn(read_all, n) for n in range(10)], timeout=20, raise_error=True)
    servers = manager.stats().backends["replicas"].servers
    assert all(s.acquired > 10 for s in servers.values())  # least_active used both
    assert all(s.in_use == 0 for s in servers.values())

    pipe = reads.pipeline(transaction=False)
    for i in range(5):
        pipe.get(f"k:{i}")
    assert pipe.execute() == [f"v{i}" for i in range(5)]

    with writes.pipeline() as tx:  # MULTI/EXEC
        tx.incr("counter").incr("counter").set("tx", "done").get("tx")
        assert tx.execute() == [1, 2, True, b"done"]

    def transfer(t: redis.client.Pipeline) -> None:  # WATCH / MULTI / EXEC
        value = int(t.get("counter") or 0)
        t.multi()
        t.set("counter", value + 10)

    assert writes.transaction(transfer, "counter") == [True]
    assert writes.get("counter") == b"12"
    primary_stats = manager.stats().backends["primary"].servers[primary.address]
    assert primary_stats.in_use == 0
    assert primary_stats.closed.get("error", 0) == 0


def test_pubsub_holds_one_connection_for_the_subscription(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    server = redis_servers.start()
    manager = make_manager(_config(server.address, [server.address]))
    client = redis.Redis(connection_pool=ConnectionPool(manager, "primary"))

    def in_use() -> int:
        return manager.stats().backends["primary"].servers[server.address].in_use

    pubsub = client.pubsub()
    pubsub.subscribe("news")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    assert in_use() == 1
    assert client.publish("news", "hello") == 1  # a second connection, given back
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == b"hello"
    assert in_use() == 1
    pubsub.close()
    assert in_use() == 0


def test_handshake_runs_in_the_setup_hook(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    server = redis_servers.start(["--requirepass", "s3cret"])
    settings: dict[str, Any] = {
        "password": "s3cret",
        "db": 3,
        "protocol": 3,
        "client_name": "lbpool-test",
    }
    config = _config(server.address, [server.address], min_idle=2)
    for backend in config["backends"].values():
        backend["setup"] = handshake(**settings)
    manager = make_manager(config)
    manager.wait_ready(timeout=5)  # idle connections: authenticated, PING passes
    client = redis.Redis(
        connection_pool=ConnectionPool(manager, "primary", **settings, decode_responses=True)
    )
    assert client.set("k", "v") is True
    assert client.client_getname() == "lbpool-test"
    info = client.client_info()
    assert (int(info["db"]), int(info["resp"])) == (3, 3)
    stats = manager.stats().backends["primary"].servers[server.address]
    assert (stats.misses, stats.hits, stats.size) == (0, 3, 2)  # the warm ones served
    assert stats.dial_failures == 0
    assert sum(stats.closed.values()) == 0  # every borrow check (check_after 0) passed

    with pytest.raises(ValueError, match="setup hook is handshake"):
        ConnectionPool(manager, "primary", password="s3cret", db=4)
    plain = make_manager({"backends": {"b": {"servers": [server.address]}}})
    with pytest.raises(ValueError, match="no setup hook"):
        ConnectionPool(plain, "b", password="s3cret")
    with pytest.raises(ValueError, match="client-side caching"):
        ConnectionPool(manager, "primary", **settings, cache_config=object())
    with pytest.raises(ValueError, match="host="):
        ConnectionPool(manager, "primary", **settings, host="10.0.0.1")
    bad = make_manager(
        {"backends": {"b": {"servers": [server.address], "setup": handshake(password="wrong")}},
         "defaults": {"pool": {"min_idle": 0}}}
    )  # fmt: skip
    wrong = redis.Redis(connection_pool=ConnectionPool(bad, "b", password="wrong"))
    with pytest.raises(redis.ConnectionError) as info_bad:
        wrong.ping()
    assert isinstance(info_bad.value.__cause__, BackendUnavailable)
    assert "setup hook failed" in str(info_bad.value)


def test_a_network_error_is_discarded_into_lbpool_and_retry_reacquires(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    server = redis_servers.start()
    with FaultProxy(server.address) as proxy:
        manager = make_manager(
            _config(proxy.address, [proxy.address], min_idle=0, check_after="1h")
        )

        def closed() -> dict[str, int]:
            stats = manager.stats().backends["primary"].servers[proxy.address]
            assert stats.in_use == 0
            return {k: v for k, v in stats.closed.items() if v}

        def reset_soon() -> None:
            gevent.sleep(0.2)
            proxy.reset_all()  # mid-command: BLPOP is waiting for its reply

        no_retry = redis.Redis(
            connection_pool=ConnectionPool(manager, "primary", retry=Retry(NoBackoff(), 0))
        )
        assert no_retry.set("k", "1") is True
        resetter = gevent.spawn(reset_soon)
        with pytest.raises(redis.ConnectionError):
            no_retry.blpop(["nothing"], timeout=2)
        resetter.join()
        assert closed() == {"error": 1}

        retried = redis.Redis(connection_pool=ConnectionPool(manager, "primary", **RETRY_ONCE))
        assert retried.get("k") == b"1"  # a fresh dial
        resetter = gevent.spawn(reset_soon)
        assert retried.blpop(["nothing"], timeout=1) is None  # failed once, re-acquired
        resetter.join()
        assert closed() == {"error": 2}

        # Reset while idle (check_after 1h: no borrow check): the idle connection's
        # watcher sees it at once and closes it as unhealthy (not charged); the next
        # command gets another connection.
        proxy.reset_all()
        gevent.sleep(0.05)
        assert no_retry.get("k") == b"1"
        assert closed() == {"error": 2, "unhealthy": 1}


@pytest.mark.parametrize("health_check_interval", [0, 1])
def test_connections_the_server_closed_while_idle_are_replaced_not_lent(
    redis_servers: RedisServers,
    make_manager: Callable[..., PoolManager],
    health_check_interval: int,
) -> None:
    """The server closes idle connections (its ``timeout``, CLIENT KILL, a failover):
    each borrow finds its lease already at EOF, discards it -- not a network error, the
    breaker (threshold 1) stays closed -- and takes another; no command fails."""
    server = redis_servers.start()
    config = _config(server.address, [server.address], min_idle=3, check_after="1h")
    config["defaults"]["breaker"]["failure_threshold"] = 1
    manager = make_manager(config)
    manager.wait_ready(timeout=5)
    client = redis.Redis(
        connection_pool=ConnectionPool(
            manager,
            "primary",
            retry=Retry(NoBackoff(), 0),
            health_check_interval=health_check_interval,
        )
    )
    admin = redis.Redis(host="127.0.0.1", port=server.port, protocol=2)

    def kill_the_others() -> int:
        me = admin.client_id()
        ids = [c["id"] for c in admin.client_list() if int(c["id"]) != me]
        for client_id in ids:
            admin.client_kill_filter(_id=client_id)
        gevent.sleep(0.05)  # the FINs arrive
        return len(ids)

    try:
        assert kill_the_others() >= 3  # the warm idle ones (of both backends)
        for _ in range(5):
            assert client.get("k") is None
            assert client.ping() is True
            assert kill_the_others() >= 1
        stats = manager.stats().backends["primary"].servers[server.address]
        assert stats.breaker_state == "closed" and stats.breaker_trips == 0
        assert stats.closed.get("error", 0) == 0
        # the stale leases: closed by their idle watchers as the kills arrive
        # (unhealthy), or discarded when a lease sees one first
        assert stats.closed["discarded"] + stats.closed["unhealthy"] >= 5
        assert stats.in_use == 0
    finally:
        admin.close()


def test_only_this_connections_own_errors_reach_its_breaker(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    """A disconnect while the caller handles some unrelated OSError charges no breaker;
    an error on the connection's own socket (no ``error=`` from redis-py) does."""
    server = redis_servers.start()
    with FaultProxy(server.address) as proxy:
        config = _config(proxy.address, [proxy.address], min_idle=0, check_after="1h")
        config["defaults"]["breaker"]["failure_threshold"] = 1
        manager = make_manager(config)
        client = redis.Redis(
            connection_pool=ConnectionPool(manager, "primary", retry=Retry(NoBackoff(), 0))
        )

        def stats() -> Any:
            return manager.stats().backends["primary"].servers[proxy.address]

        pubsub = client.pubsub()
        pubsub.subscribe("news")
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        try:
            raise ConnectionResetError("another server's socket")
        except OSError:
            pubsub.close()  # drops its connection: nothing to do with that error
        assert (stats().breaker_state, stats().in_use) == ("closed", 0)
        assert stats().closed.get("error", 0) == 0

        def reset_soon() -> None:
            gevent.sleep(0.2)
            proxy.reset_all()

        resetter = gevent.spawn(reset_soon)
        with pytest.raises(redis.ConnectionError):
            client.blpop(["nothing"], timeout=2)
        resetter.join()
        assert stats().breaker_state == "open"  # the reset of its own socket: heard
        assert stats().closed["error"] == 1


def test_pool_disconnect_with_commands_in_flight_fails_them_as_connection_errors(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    """``pool.disconnect()`` while other greenlets wait in BLPOP: without a retry they
    get ``redis.ConnectionError`` (never a bare ValueError from a parser torn down under
    them); with one they re-acquire and finish. No breaker hears of it."""
    server = redis_servers.start()
    config = _config(server.address, [server.address], min_idle=0)
    config["defaults"]["breaker"]["failure_threshold"] = 1
    manager = make_manager(config)
    outcomes: list[Any] = []
    # the server's own count of clients blocked in BLPOP: sent is not yet blocked
    watcher = ConnectionPool(manager, "primary")
    blocked = redis.Redis(connection_pool=watcher)

    def blpop(client: redis.Redis) -> None:
        try:
            outcomes.append(client.blpop(["nothing"], timeout=2))
        except Exception as exc:
            outcomes.append(exc)

    def all_blocked() -> bool:
        return bool(blocked.info("clients")["blocked_clients"] == 3)

    for retry, expected in (({"retry": Retry(NoBackoff(), 0)}, redis.ConnectionError),
                            (RETRY_ONCE, type(None))):  # fmt: skip
        outcomes.clear()
        pool = ConnectionPool(manager, "primary", **retry)
        client = redis.Redis(connection_pool=pool)
        greenlets = [gevent.spawn(blpop, client) for _ in range(3)]
        assert settle(all_blocked, 10)  # all three wait for their replies
        pool.disconnect()
        gevent.joinall(greenlets, timeout=5, raise_error=True)
        assert [type(o) for o in outcomes] == [expected] * 3, outcomes
        stats = manager.stats().backends["primary"].servers[server.address]
        assert (stats.in_use, stats.breaker_state) == (0, "closed")
        assert stats.closed.get("error", 0) == 0
        assert client.ping() is True


def test_lbpool_failures_become_redis_errors(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    server = redis_servers.start()
    dead = f"127.0.0.1:{server.port}"
    manager = make_manager(_config(server.address, [server.address], min_idle=0, max_size=1))
    client = redis.Redis(connection_pool=ConnectionPool(manager, "primary"))
    pubsub = client.pubsub()
    pubsub.subscribe("x")  # holds the one connection max_size allows
    quick = redis.Redis(
        connection_pool=ConnectionPool(manager, "primary", socket_connect_timeout=0.2)
    )
    with pytest.raises(redis.TimeoutError) as timed_out:
        quick.get("k")
    assert isinstance(timed_out.value.__cause__, PoolTimeout)
    pubsub.close()
    assert quick.get("k") is None

    server.stop()
    gone = make_manager({"backends": {"b": {"servers": [dead], "setup": handshake()}},
                         "defaults": {"pool": {"min_idle": 0}}})  # fmt: skip
    with pytest.raises(redis.ConnectionError) as refused:
        redis.Redis(connection_pool=ConnectionPool(gone, "b")).ping()
    assert isinstance(refused.value.__cause__, BackendUnavailable)
    assert "lbpool backend 'b'" in str(refused.value)


def test_a_replica_killed_under_50_greenlets_loses_no_read(
    trio: tuple[RedisServer, RedisServer, RedisServer],
    make_manager: Callable[..., PoolManager],
) -> None:
    primary, r1, r2 = trio
    manager = make_manager(_config(primary.address, [r1.address, r2.address]))
    writes = redis.Redis(connection_pool=ConnectionPool(manager, "primary"))
    for i in range(50):
        writes.set(f"key:{i}", i)
    assert writes.wait(2, 5_000) == 2
    reads = redis.Redis(connection_pool=ConnectionPool(manager, "replicas", **RETRY_ONCE))
    done = Counter[str]()
    failures: list[BaseException] = []
    killed = gevent.event.Event()

    def reader(n: int) -> None:
        for i in range(60):
            try:
                assert reads.get(f"key:{n}") == str(n).encode()
                done["after" if killed.is_set() else "before"] += 1
            except Exception as exc:
                failures.append(exc)
            if i == 20 and n == 0:
                r2.kill()
                killed.set()
            gevent.sleep(0)  # interleave: each command is its own borrow

    gevent.joinall([gevent.spawn(reader, n) for n in range(50)], timeout=40, raise_error=True)
    assert failures == []
    assert sum(done.values()) == 50 * 60 and done["after"] > 1000
    stats = manager.stats().backends["replicas"].servers
    assert stats[r2.address].breaker_state == "open"
    assert stats[r1.address].in_use == 0 and stats[r2.address].in_use == 0


def test_a_release_discards_unread_replies_and_leaves_the_socket_as_lbpool_set_it(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    """A connection whose parser holds a reply nobody read is discarded at release (no
    system call looks for it); a clean one goes back with lbpool's socket settings (no
    timeout, TCP_NODELAY on) whatever socket_timeout the redis-py side used."""
    server = redis_servers.start()
    manager = make_manager(_config(server.address, [server.address], min_idle=0, check_after="1h"))
    pool = ConnectionPool(manager, "primary", socket_timeout=7)
    client = redis.Redis(connection_pool=pool)
    assert client.get("k") is None
    with manager.acquire("primary") as lease:
        assert lease.sock.gettimeout() is None
        assert lease.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    conn = pool.get_connection()
    conn.send_packed_command(conn.pack_commands([("PING",), ("PING",)]))
    assert conn.read_response() == b"PONG"  # the first reply
    pool.release(conn)  # the second reply is unread (in the parser's buffer or the kernel)
    assert conn.lease is None
    stats = manager.stats().backends["primary"].servers[server.address]
    assert stats.in_use == 0
    assert client.ping() is True  # whichever check found it, no command sees the stray reply
    stats = manager.stats().backends["primary"].servers[server.address]
    assert stats.closed.get("discarded", 0) + stats.closed.get("unhealthy", 0) == 1
    assert stats.closed.get("error", 0) == 0


@pytest.mark.parametrize("socket_timeout", [None, 7.0])
def test_a_timeout_the_redis_side_changes_never_reaches_the_next_borrower(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager], socket_timeout: Any
) -> None:
    """With or without ``socket_timeout``, a timeout set on the socket during the borrow
    (as redis-py's maintenance-notification handler relaxes it, straight on the
    socket) is gone for the next borrower. Found by review: skipping the mark for
    ``socket_timeout=None`` left 7.5 s on the next borrow."""
    server = redis_servers.start()
    manager = make_manager(_config(server.address, [server.address], min_idle=0, check_after="1h"))
    pool = ConnectionPool(manager, "primary", socket_timeout=socket_timeout)
    conn = pool.get_connection()
    conn.send_command("PING")
    assert conn.read_response() == b"PONG"
    conn._sock.settimeout(7.5)  # Connection.update_current_socket_timeout, redis-py 8
    pool.release(conn)
    with manager.acquire("primary") as lease:
        assert lease.sock.gettimeout() is None


def test_a_failing_connect_hook_is_not_retried_as_a_dial_is(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    """As in redis-py, ``retry=`` covers getting the socket (here a lease), not what
    runs on it once connected: a ``redis_connect_func`` that fails with a connection
    error runs once, not once per retry, and the lease goes back."""
    server = redis_servers.start()
    manager = make_manager(_config(server.address, [server.address], min_idle=0))
    pool = ConnectionPool(manager, "primary", retry=Retry(NoBackoff(), 3))
    calls = []

    def refuse(conn: Any) -> None:
        calls.append(conn)
        raise redis.ConnectionError("handshake refused")

    conn = pool.make_connection()
    conn.redis_connect_func = refuse
    with pytest.raises(redis.ConnectionError):
        conn.connect()
    assert len(calls) == 1
    assert conn.lease is None
    stats = manager.stats().backends["primary"].servers[server.address]
    assert stats.in_use == 0


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_starts_its_pool_afresh(
    redis_servers: RedisServers, make_manager: Callable[..., PoolManager]
) -> None:
    """The pool notices a fork by lbpool's fork generation (no ``getpid`` per command):
    the child forgets the wrappers the parent had out and serves its own commands on
    its own connections, the parent's borrowed one left alone."""
    server = redis_servers.start()
    manager = make_manager(
        {"backends": {"r": {"servers": [server.address], "pool": {"max_size": 4}}}}
    )
    pool = ConnectionPool(manager, "r", protocol=2)
    client = redis.Redis(connection_pool=pool)
    assert client.set("fork:k", "v") is True
    held = pool.get_connection()  # out in the parent across the fork
    parent_port = held.lease.sock.getsockname()[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        report = b"\xff"
        try:
            os.close(r)
            ok = client.get("fork:k") == b"v"
            # the parent's wrappers forgotten: one new one, released (no lease)
            wrappers = pool._available_connections
            fresh = not pool._in_use_connections and len(wrappers) == 1
            report = bytes([0 if ok and fresh and wrappers[0].lease is None else 3])
            report += bytes([int(pool._created_connections == 1)])
        finally:
            os.write(w, report)
            os._exit(0)
    os.close(w)
    result = read_child_report(r, pid, 15, size=2)
    assert result == b"\x00\x01", result
    assert held in pool._in_use_connections  # the parent's pool is as it was
    assert held.lease.sock.getsockname()[1] == parent_port
    held.send_command("PING")
    assert held.read_response() == b"PONG"
    pool.release(held)
    assert client.get("fork:k") == b"v"
