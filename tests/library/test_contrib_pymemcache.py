"""pymemcache over lbpool (``lbpool.contrib.pymemcache``) against three real
``memcached`` processes on loopback: keys placed exactly as pymemcache's ``HashClient``
places them, every method, a server killed under greenlets (its keys fall back, no
error reaches a caller), a network error mid-reply (discarded, retried once), and
lbpool's errors as pymemcache-style ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from gevent.event import Event
from gevent.server import StreamServer
from pymemcache.client.base import Client as BaseClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheUnexpectedCloseError,
)
from pymemcache.serde import pickle_serde

from lbpool import BackendUnavailable, LbpoolError, PoolManager, PoolTimeout, UnknownBackend
from lbpool.contrib.pymemcache import Client, MemcacheConnectionError, MemcacheTimeoutError
from tests.support.memcached_server import Memcached, MemcachedServers, needs_memcached
from tests.support.net import free_port

pytestmark = [pytest.mark.memcached, needs_memcached]

VERSION_CHECK = {"send": "version\r\n", "expect": "VERSION", "timeout": "2s"}


@pytest.fixture
def memcached_trio() -> Iterator[list[Memcached]]:
    servers = MemcachedServers()
    try:
        yield [servers.start() for _ in range(3)]
    finally:
        servers.stop_all()


def _config(addresses: list[str], **backend: Any) -> dict[str, Any]:
    return {
        "defaults": {
            "pool": {"min_idle": 1, "max_size": 8, "acquire_timeout": "10s"},
            "dial": {"timeout": "2s"},
            "breaker": {"failure_threshold": 3, "recovery_timeout": "60s"},
            "health_check": VERSION_CHECK,
        },
        "backends": {"cache": {"strategy": "rendezvous", "servers": addresses, **backend}},
    }


def _hash_client(servers: list[Memcached], **kwargs: Any) -> HashClient:
    return HashClient([("127.0.0.1", s.port) for s in servers], timeout=10, **kwargs)


def _served(manager: PoolManager) -> dict[str, tuple[int, int]]:
    st = manager.stats().backends["cache"].servers
    return {a: (s.owner_hits, s.fallback_hits) for a, s in st.items()}


def test_10000_keys_placed_as_hashclient_places_them(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    manager = make_manager(_config([s.address for s in memcached_trio]))
    mc = Client(manager, "cache", timeout=10)
    keys = [f"user:{i}" for i in range(10_000)]
    hc = _hash_client(memcached_trio)
    try:
        # placement: the client's owner is HashClient's node for every key
        node = {f"127.0.0.1:{s.port}": s.address for s in memcached_trio}
        assert [mc.server_for(k) for k in keys] == [node[hc.hasher.get_node(k)] for k in keys]
        # data: written by lbpool (half one by one, half in batches), read back by a real
        # HashClient, which asks only the server it places each key on
        for k in keys[:5_000]:
            assert mc.set(k, k.encode(), noreply=False) is True
        assert mc.set_many({k: k.encode() for k in keys[5_000:]}, noreply=False) == []
        found = hc.get_many(keys)
        assert found == {k: k.encode() for k in keys}
        # and the other way: HashClient writes, lbpool reads
        hc.set_many({k: b"hc:" + k.encode() for k in keys[:2_000]}, noreply=False)
        assert mc.get_many(keys[:2_000]) == {k: b"hc:" + k.encode() for k in keys[:2_000]}
        # each server holds exactly the keys HashClient gives it
        per_server = Counter(hc.hasher.get_node(k) for k in keys)
        for s in memcached_trio:
            direct = BaseClient(("127.0.0.1", s.port), timeout=10)
            try:
                items = int(direct.stats()[b"curr_items"])
            finally:
                direct.close()
            assert items == per_server[f"127.0.0.1:{s.port}"]
        assert all(fallback == 0 for _, fallback in _served(manager).values())
    finally:
        hc.close()


def test_every_method(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    manager = make_manager(_config([s.address for s in memcached_trio]))
    mc = Client(manager, "cache", timeout=10, default_noreply=False)

    assert mc.get("missing") is None and mc.get("missing", b"d") == b"d"
    assert mc.set("a", b"1") is True and mc.get("a") == b"1"
    assert mc.add("a", b"2") is False and mc.add("b", b"2") is True
    assert mc.replace("a", b"3") is True and mc.replace("nope", b"x") is False
    assert mc.append("a", b"4") is True and mc.prepend("a", b"0") is True
    assert mc.get("a") == b"034"
    assert mc.append("nope", b"x") is False

    value, token = mc.gets("a")
    assert value == b"034" and token.isdigit()
    assert mc.gets("nope") == (None, None)
    assert mc.cas("a", b"5", token) is True
    assert mc.cas("a", b"6", token) is False  # changed since
    assert mc.cas("nope", b"6", token) is None
    assert mc.get("a") == b"5"

    assert mc.incr("n", 1) is None  # not set
    mc.set("n", b"10")
    assert mc.incr("n", 5) == 15 and mc.decr("n", 20) == 0

    assert mc.touch("a", 100) is True and mc.touch("nope", 100) is False
    assert mc.delete("a") is True and mc.delete("a") is False and mc.get("a") is None

    many = {f"m:{i}": f"v{i}".encode() for i in range(300)}
    assert mc.set_many(many) == []
    assert mc.get_many([*many, "m:none"]) == many
    cas_many = mc.gets_many(list(many)[:10])
    assert {k: v for k, (v, _) in cas_many.items()} == {k: many[k] for k in list(many)[:10]}
    assert mc.delete_many(list(many)[:100]) is True
    assert mc.get_many(list(many)) == {k: many[k] for k in list(many)[100:]}
    assert mc.get_multi(["m:150"]) == {"m:150": b"v150"}

    mc["x"] = b"y"
    assert mc["x"] == b"y"
    del mc["x"]
    with pytest.raises(KeyError):
        mc["x"]

    # noreply (pymemcache's default for writes): sent, nothing read, connection kept
    quiet = Client(manager, "cache", timeout=10)
    assert quiet.set("q", b"1") is True and quiet.get("q") == b"1"
    assert quiet.delete("q") is True and quiet.get("q") is None

    # bytes keys and their str are one key (same server, same memcached key)
    assert mc.set(b"bk", b"1") is True and mc.get("bk") == b"1"

    # pymemcache's key check, before anything is borrowed
    acquired = sum(s.acquired for s in manager.stats().backends["cache"].servers.values())
    for bad in ("has space", "x" * 300):
        with pytest.raises(MemcacheIllegalInputError):
            mc.get(bad)
        with pytest.raises(MemcacheIllegalInputError):
            mc.set_many({"fine": b"1", bad: b"2"})
    after = sum(s.acquired for s in manager.stats().backends["cache"].servers.values())
    assert after == acquired
    # a refused value: nothing was sent, the connection is kept
    with pytest.raises(MemcacheIllegalInputError):
        mc.set("k", b"v", expire="soon")  # type: ignore[arg-type]
    servers = manager.stats().backends["cache"].servers.values()
    assert sum(s.closed.get("discarded", 0) + s.closed.get("error", 0) for s in servers) == 0
    assert mc.retries == 0


def test_serde_and_key_prefix_route_as_hashclient(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager]
) -> None:
    """Keys are routed without the prefix (as HashClient routes them) and stored with it;
    values go through the serde."""
    manager = make_manager(_config([s.address for s in memcached_trio]))
    mc = Client(manager, "cache", timeout=10, key_prefix=b"app:", serde=pickle_serde)
    hc = _hash_client(memcached_trio, key_prefix=b"app:", serde=pickle_serde)
    try:
        values = {f"obj:{i}": {"i": i, "tags": ["a", i]} for i in range(500)}
        assert mc.set_many(values, noreply=False) == []
        assert hc.get_many(list(values)) == values
        assert mc.get("obj:7") == {"i": 7, "tags": ["a", 7]}
    finally:
        hc.close()


def test_server_killed_under_greenlets_keys_fall_back_no_error(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    """20 greenlets read 10,000 keys cache-aside (a miss is refilled); one memcached is
    SIGKILLed a third of the way through. No caller sees an error; the dead server's
    keys are served by their next server by rendezvous score -- where a HashClient
    without that server puts them -- and no other key moves."""
    manager = make_manager(_config([s.address for s in memcached_trio]))
    mc = Client(manager, "cache", timeout=10)
    keys = [f"user:{i}" for i in range(10_000)]
    assert mc.set_many({k: k.encode() for k in keys}, noreply=False) == []
    victim, survivors = memcached_trio[0], memcached_trio[1:]
    victim_keys = {k for k in keys if mc.server_for(k) == victim.address}
    assert 2_000 < len(victim_keys) < 4_700

    killed = Event()
    done = Counter[str]()
    errors: list[BaseException] = []
    wrong: list[str] = []

    def reader(part: list[str]) -> None:
        for key in part:
            try:
                if done["gets"] == 3_000 and not killed.is_set():
                    killed.set()
                    victim.kill()
                value = mc.get(key)
                done["gets"] += 1
                if value is None:
                    if key not in victim_keys or not killed.is_set():
                        wrong.append(key)
                    mc.set(key, b"refilled:" + key.encode(), noreply=False)
                    done["refilled"] += 1
                elif value != key.encode() and value != b"refilled:" + key.encode():
                    wrong.append(key)
            except BaseException as exc:
                errors.append(exc)
                raise

    jobs = [gevent.spawn(reader, keys[n::20]) for n in range(20)]
    gevent.joinall(jobs, timeout=120)
    assert all(job.dead for job in jobs), "readers did not finish within 120 s"
    assert errors == [] and wrong == []
    assert killed.is_set() and done["gets"] == len(keys)
    assert done["refilled"] > 0  # the victim's keys read after the kill were misses

    stats = manager.stats().backends["cache"].servers
    assert stats[victim.address].breaker_state == "open"
    assert sum(stats[s.address].fallback_hits for s in survivors) >= done["refilled"]
    # each refilled key sits where HashClient without the victim places it
    hc = _hash_client(survivors)
    try:
        again = hc.get_many(sorted(victim_keys))
        refilled = {k for k, v in again.items() if v == b"refilled:" + k.encode()}
        assert len(refilled) == done["refilled"]
        # and reading every key again: no error, no other key moved (all are hits now)
        assert mc.get_many(keys) == {
            k: (b"refilled:" if k in victim_keys else b"") + k.encode()
            for k in keys
            if k not in victim_keys or k in refilled
        }
    finally:
        hc.close()


# -- a network error on a borrowed connection --------------------------------------


class _CutOnce:
    """A memcached stand-in answering ``get`` with one 5-byte value; the first
    ``cut`` connections are closed in the middle of their first reply."""

    def __init__(self, cut: int) -> None:
        self.cut = cut
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, sock: Any, _addr: Any) -> None:
        self.connections += 1
        n = self.connections
        reader = sock.makefile("rb")
        try:
            for line in reader:
                if line.startswith(b"version"):
                    sock.sendall(b"VERSION 1.6.0\r\n")
                    continue
                key = line.split()[1]
                if n <= self.cut:
                    sock.sendall(b"VALUE " + key + b" 0 5\r\nab")
                    return  # the server died mid-reply
                sock.sendall(b"VALUE " + key + b" 0 5\r\nhello\r\nEND\r\n")
        finally:
            reader.close()
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=2)


@pytest.fixture
def cut_server_factory() -> Iterator[Callable[[int], _CutOnce]]:
    made: list[_CutOnce] = []

    def make(cut: int) -> _CutOnce:
        server = _CutOnce(cut)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def _single(address: str, **defaults: Any) -> dict[str, Any]:
    return {
        "defaults": {"pool": {"min_idle": 0, "max_size": 2, "acquire_timeout": "5s"}, **defaults},
        "backends": {"cache": {"strategy": "rendezvous", "servers": [address]}},
    }


def test_network_error_mid_reply_discards_and_retries_once(
    cut_server_factory: Callable[[int], _CutOnce], make_manager: Callable[..., PoolManager]
) -> None:
    server = cut_server_factory(1)
    manager = make_manager(_single(server.address))
    mc = Client(manager, "cache", timeout=5)
    assert mc.get("k") == b"hello"  # the first connection was cut; the retry served it
    assert server.connections == 2 and mc.retries == 1
    st = manager.stats().backends["cache"].servers[server.address]
    assert st.closed["error"] == 1  # discarded with the network error: the breaker heard
    assert st.idle == 1  # the retry's connection went back clean


def test_second_network_error_is_raised_as_pymemcache_raised_it(
    cut_server_factory: Callable[[int], _CutOnce], make_manager: Callable[..., PoolManager]
) -> None:
    server = cut_server_factory(10)
    manager = make_manager(_single(server.address))
    mc = Client(manager, "cache", timeout=5)
    with pytest.raises(MemcacheUnexpectedCloseError):
        mc.get("k")
    assert server.connections == 2 and mc.retries == 1  # tried exactly twice
    assert Client(manager, "cache", timeout=5, ignore_exc=True).get("k", b"d") == b"d"


# -- lbpool's errors -----------------------------------------------------------------


def test_no_server_can_serve_is_memcache_connection_error(
    make_manager: Callable[..., PoolManager],
) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there
    manager = make_manager(_single(dead[0], dial={"timeout": "1s"}))
    manager.reload({**_single(dead[0]), "backends": {"cache": {
        "strategy": "rendezvous", "servers": dead}}})  # fmt: skip
    mc = Client(manager, "cache", timeout=5)
    with pytest.raises(MemcacheConnectionError) as info:
        mc.get("k")
    err = info.value
    assert isinstance(err, MemcacheError) and isinstance(err, OSError)
    assert isinstance(err, LbpoolError) and isinstance(err.__cause__, BackendUnavailable)
    with pytest.raises(MemcacheConnectionError):
        mc.set_many({"a": 1, "b": 2})
    lenient = Client(manager, "cache", ignore_exc=True)
    assert lenient.get("k", b"d") == b"d" and lenient.set("k", b"v") is False
    assert lenient.get_many(["a", "b"]) == {} and sorted(lenient.set_many({"a": 1, "b": 2})) == [
        "a",
        "b",
    ]


def test_owner_down_with_hash_fallback_none(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager]
) -> None:
    config = _config([s.address for s in memcached_trio], balance={"hash_fallback": "none"})
    manager = make_manager(config)
    mc = Client(manager, "cache", timeout=5)
    victim = memcached_trio[0]
    key = next(k for k in (f"k{i}" for i in range(1000)) if mc.server_for(k) == victim.address)
    other = next(k for k in (f"k{i}" for i in range(1000)) if mc.server_for(k) != victim.address)
    victim.kill()
    with pytest.raises(MemcacheConnectionError) as info:
        mc.get(key)
    assert isinstance(info.value.__cause__, BackendUnavailable)
    assert mc.set(other, b"1", noreply=False) is True  # other servers' keys unaffected


def test_pool_timeout_is_memcache_timeout_error(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager]
) -> None:
    config = _config([memcached_trio[0].address])
    config["defaults"]["pool"] = {"min_idle": 0, "max_size": 1}
    manager = make_manager(config)
    mc = Client(manager, "cache", timeout=5, connect_timeout=0.2)
    # the only connection, held
    with manager.get("cache", key="k"), pytest.raises(MemcacheTimeoutError) as info:
        mc.get("k")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, MemcacheError)
    assert isinstance(info.value.__cause__, PoolTimeout)
    assert mc.get("k") is None  # free again


def test_constructor_refuses(
    memcached_trio: list[Memcached], make_manager: Callable[..., PoolManager]
) -> None:
    address = memcached_trio[0].address
    manager = make_manager(
        {"backends": {"rr": {"servers": [address]}, "cache": {"strategy": "maglev",
                                                               "servers": [address]}}}
    )  # fmt: skip
    with pytest.raises(ValueError, match="routes by round_robin"):
        Client(manager, "rr")
    with pytest.raises(UnknownBackend):
        Client(manager, "nope")
    for kwargs in ({"servers": [address]}, {"use_pooling": True}, {"retry_attempts": 1},
                   {"tls_context": None}, {"hasher": object}):  # fmt: skip
        with pytest.raises(ValueError, match="lbpool"):
            Client(manager, "cache", **kwargs)
    assert Client(manager, "cache").set("k", b"v", noreply=False) is True  # maglev works too


def test_from_servers_owns_its_manager(memcached_trio: list[Memcached], no_fd_leak: None) -> None:
    servers = [("127.0.0.1", s.port) for s in memcached_trio]
    with Client.from_servers(servers, timeout=5) as mc:
        assert mc.manager.backends["memcached"].strategy == "rendezvous"
        mc.set_many({f"k{i}": i for i in range(100)}, noreply=False)
        hc = HashClient(servers, timeout=5)
        try:
            assert hc.get_many([f"k{i}" for i in range(100)]) == {
                f"k{i}": str(i).encode() for i in range(100)
            }
        finally:
            hc.close()
    assert mc.manager.closed
    assert repr(mc).startswith("<lbpool.contrib.pymemcache.Client backend='memcached'")
