"""TLS through the manager: a backend whose ``dial.tls`` points at a trustme CA.

Verification is on by default (no ``ca_file`` means the system store, which does not
trust the test CA); a certificate for another name is refused; client certificates
work for servers that demand them; round trips, reuse and the borrow check work on TLS
connections; every failed dial surfaces as a ``DialError`` inside
``BackendUnavailable``, with the TLS reason in its message.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent import ssl as gssl
from gevent.event import Event

import lbpool.dial
from lbpool import BackendUnavailable, ConfigError, DialError, PoolClosed, PoolManager
from lbpool.config import parse_config
from lbpool.testing import EchoServer, recv_exact
from tests.support.interrupt import no_switch
from tests.support.leaks import settle
from tests.support.tls import TLSCerts, broken_tls_files


def config(address: str, tls: dict[str, Any] | None, **pool: Any) -> dict[str, Any]:
    pool_cfg = {"min_idle": 0, "max_size": 2, "acquire_timeout": 3}
    pool_cfg.update(pool)
    return {
        "backends": {
            "secure": {
                "servers": [address],
                "pool": pool_cfg,
                "dial": {"timeout": 2, "tls": tls},
                "breaker": {"failure_threshold": 3, "recovery_timeout": 60},
            }
        }
    }


def round_trip(conn: Any, payload: bytes) -> None:
    conn.settimeout(3)
    conn.sendall(payload)
    assert recv_exact(conn, len(payload)) == payload


def dial_error(exc: BackendUnavailable, address: str) -> DialError:
    err = exc.errors[address]
    assert isinstance(err, DialError), repr(err)
    return err


@pytest.fixture
def mtls_server_factory(tls_certs: TLSCerts) -> Iterator[Any]:
    made: list[EchoServer] = []

    def make(max_version: ssl.TLSVersion | None = None) -> EchoServer:
        ctx = tls_certs.server_context(require_client_cert=True)
        if max_version is not None:
            ctx.maximum_version = max_version
        server = EchoServer(ssl_context=ctx).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# -- dial.tls settings no context can be built from: local mistakes ------------------


def two_server_config(addresses: list[str], tls: dict[str, Any] | None) -> dict[str, Any]:
    """The shape of the report: tls in defaults, a backend of two servers."""
    return {
        "defaults": {
            "dial": {"timeout": 2, "tls": tls},
            "pool": {"min_idle": 0},
            "breaker": {"failure_threshold": 2, "recovery_timeout": 60},
        },
        "backends": {"c": {"servers": addresses}},
    }


def test_a_broken_tls_file_fails_construction_and_reload_changes_nothing(
    tls_certs: TLSCerts,
    echo_server_factory: Any,
    tmp_path: Any,
    no_fd_leak: None,
) -> None:
    a, b = echo_server_factory(), echo_server_factory()
    broken = broken_tls_files(str(tmp_path), tls_certs)
    bad = two_server_config([a.address, b.address], {"ca_file": broken.missing})
    with pytest.raises(ConfigError) as info:
        PoolManager(bad)
    assert "defaults.dial.tls.ca_file" in str(info.value) and broken.missing in str(info.value)
    assert a.connections_accepted == b.connections_accepted == 0
    with PoolManager(two_server_config([a.address, b.address], None)) as manager:
        before = manager.config
        per_backend = two_server_config([a.address, b.address], None)
        per_backend["backends"]["c"]["dial"] = {
            "tls": {**tls_client(tls_certs), "key_file": broken.other_key}
        }
        for config_ in (bad, per_backend):
            with pytest.raises(ConfigError) as info:
                manager.reload(config_)
        assert "backends.c.dial.tls.key_file" in str(info.value)
        assert broken.other_key in str(info.value)
        assert manager.config is before  # the invalid reload changed nothing
        for _ in range(4):
            with manager.get("c", timeout=3) as conn:
                round_trip(conn, b"plain")
        servers = manager.stats().backends["c"].servers.values()
        assert [s.breaker_state for s in servers] == ["closed", "closed"]
        assert sum(s.dial_failures for s in servers) == 0


def tls_client(tls_certs: TLSCerts) -> dict[str, Any]:
    return {
        "ca_file": tls_certs.ca_file,
        "cert_file": tls_certs.client_cert_file,
        "key_file": tls_certs.client_key_file,
    }


def test_a_tls_context_that_fails_at_dial_time_opens_no_breaker(
    tls_certs: TLSCerts, tmp_path: Any, no_fd_leak: None
) -> None:
    """A CA file valid at validation, gone when the context must be built again (the
    cache evicted it): every dial fails on this side, before connecting, saying which
    setting and file; no breaker hears of it, so the fixed file works at once."""
    ca_file = tmp_path / "ca.pem"
    ca_pem = Path(tls_certs.ca_file).read_bytes()
    ca_file.write_bytes(ca_pem)
    with (
        EchoServer(ssl_context=tls_certs.server_context()) as a,
        EchoServer(ssl_context=tls_certs.server_context()) as b,
        PoolManager(two_server_config([a.address, b.address], {"ca_file": str(ca_file)})) as m,
    ):
        ca_file.unlink()
        lbpool.dial._forget_contexts()
        for _ in range(6):  # three times the failure_threshold, on each server
            with pytest.raises(BackendUnavailable) as info:
                m.get("c", timeout=1)
            for address in (a.address, b.address):
                err = dial_error(info.value, address)
                assert err.local, err
                assert "dial.tls.ca_file" in err.reason and str(ca_file) in err.reason
        servers = m.stats().backends["c"].servers.values()
        assert [s.breaker_state for s in servers] == ["closed", "closed"]
        assert [s.dial_failures for s in servers] == [6, 6]  # counted, not charged
        assert a.connections_accepted == b.connections_accepted == 0  # never connected
        ca_file.write_bytes(ca_pem)  # fixed: no recovery_timeout to wait out
        for i in range(4):
            with m.get("c", timeout=3) as conn:
                round_trip(conn, b"fixed-%d" % i)


def test_round_trips_and_reuse_with_the_right_ca(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    cfg = config(tls_echo_server.address, {"ca_file": tls_certs.ca_file}, check_after=0)
    with PoolManager(cfg) as manager:
        for i in range(5):
            with manager.get("secure") as conn:
                assert isinstance(conn.sock, gssl.SSLSocket)  # cooperative TLS
                assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
                round_trip(conn, b"secret-%d" % i)
                assert conn.uses == i + 1  # peeked on every borrow (check_after 0), reused
        s = manager.stats().backends["secure"].servers[tls_echo_server.address]
        assert (s.misses, s.hits, s.dial_failures, s.breaker_state) == (1, 4, 0, "closed")


def test_dead_tls_connection_is_replaced_on_borrow(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    cfg = config(tls_echo_server.address, {"ca_file": tls_certs.ca_file}, check_after=0)
    with PoolManager(cfg) as manager:
        with manager.get("secure") as conn:
            round_trip(conn, b"one")
        tls_echo_server.restart()  # drops every client
        with manager.get("secure") as conn:
            assert conn.uses == 1  # the dead one was found by the peek and replaced
            round_trip(conn, b"two")
        s = manager.stats().backends["secure"].servers[tls_echo_server.address]
        assert s.closed["unhealthy"] == 1


def test_verification_is_on_by_default(tls_echo_server: EchoServer, no_fd_leak: None) -> None:
    # no ca_file: the system trust store, which has never heard of the test CA
    with (
        PoolManager(config(tls_echo_server.address, {})) as manager,
        pytest.raises(BackendUnavailable) as info,
    ):
        manager.get("secure")
    err = dial_error(info.value, tls_echo_server.address)
    assert "certificate verify failed" in str(err), str(err)
    assert isinstance(err.__cause__, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(info.value)  # said in the summary too


def test_a_ca_that_signed_nothing_is_refused(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    cfg = config(tls_echo_server.address, {"ca_file": tls_certs.other_ca_file})
    with PoolManager(cfg) as manager, pytest.raises(BackendUnavailable) as info:
        manager.get("secure")
    assert "certificate verify failed" in str(dial_error(info.value, tls_echo_server.address))


def test_hostname_mismatch_is_refused(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    tls = {"ca_file": tls_certs.ca_file, "server_hostname": "not-this-server.example"}
    with PoolManager(config(tls_echo_server.address, tls)) as manager:
        with pytest.raises(BackendUnavailable) as info:
            manager.get("secure")
        s = manager.stats().backends["secure"].servers[tls_echo_server.address]
        assert s.dial_failures == 1
    err = dial_error(info.value, tls_echo_server.address)
    assert "certificate verify failed" in str(err) and "ostname" in str(err), str(err)


def test_server_hostname_override_that_matches_works(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    tls = {"ca_file": tls_certs.ca_file, "server_hostname": "localhost"}
    with (
        PoolManager(config(tls_echo_server.address, tls)) as manager,
        manager.get("secure") as conn,
    ):
        round_trip(conn, b"by name")


def test_verify_false_accepts_any_certificate(
    tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    manager = PoolManager(config(tls_echo_server.address, {"verify": False}))
    with manager, manager.get("secure") as conn:
        round_trip(conn, b"unverified")


def test_a_client_certificate_from_a_yaml_config_works_end_to_end(
    tls_certs: TLSCerts, mtls_server_factory: Any, tmp_path: Any, no_fd_leak: None
) -> None:
    server = mtls_server_factory()
    path = tmp_path / "lbpool.yaml"
    path.write_text(
        "defaults:\n"
        "  dial:\n"
        "    tls:\n"
        f"      ca_file: {tls_certs.ca_file}\n"
        f"      cert_file: {tls_certs.client_cert_file}\n"
        f"      key_file: {tls_certs.client_key_file}\n"
        "      server_hostname: localhost\n"
        "  pool: {min_idle: 0}\n"
        "backends:\n"
        f"  secure: {{servers: ['{server.address}']}}\n"
    )
    with PoolManager.from_yaml(path) as manager:
        for i in range(3):
            with manager.get("secure", timeout=3) as conn:
                assert isinstance(conn.sock, gssl.SSLSocket)
                round_trip(conn, b"yaml-mutual-%d" % i)


def test_client_certificate_works(
    tls_certs: TLSCerts, mtls_server_factory: Any, no_fd_leak: None
) -> None:
    server = mtls_server_factory()
    tls = {
        "ca_file": tls_certs.ca_file,
        "cert_file": tls_certs.client_cert_file,
        "key_file": tls_certs.client_key_file,
    }
    with PoolManager(config(server.address, tls)) as manager:
        for i in range(3):
            with manager.get("secure") as conn:
                round_trip(conn, b"mutual-%d" % i)
        s = manager.stats().backends["secure"].servers[server.address]
        assert (s.misses, s.hits, s.dial_failures) == (1, 2, 0)


def test_missing_client_certificate_tls12_fails_the_dial(
    tls_certs: TLSCerts, mtls_server_factory: Any, no_fd_leak: None
) -> None:
    """Up to TLS 1.2 the server's verdict on the client certificate is part of the
    handshake: the dial fails, the breaker hears of it."""
    server = mtls_server_factory(max_version=ssl.TLSVersion.TLSv1_2)
    with PoolManager(config(server.address, {"ca_file": tls_certs.ca_file})) as manager:
        with pytest.raises(BackendUnavailable) as info:
            manager.get("secure")
        s = manager.stats().backends["secure"].servers[server.address]
        assert s.dial_failures == 1
    assert "TLS handshake failed" in str(dial_error(info.value, server.address))


def test_missing_client_certificate_tls13_fails_on_first_use(
    tls_certs: TLSCerts, mtls_server_factory: Any, no_fd_leak: None
) -> None:
    """In TLS 1.3 the client's handshake completes before the server checks the client
    certificate: the refusal arrives as an alert on first use. The ``with`` discards that
    connection and counts the SSL error against the server's breaker."""
    server = mtls_server_factory()
    with PoolManager(config(server.address, {"ca_file": tls_certs.ca_file})) as manager:
        conn = manager.get("secure")
        assert conn.sock.version() == "TLSv1.3"
        with pytest.raises(ssl.SSLError), conn:
            round_trip(conn, b"who am I")
        pool = manager.backends["secure"].pools[0]
        s = pool.stats()
        assert (s.size, s.closed["error"]) == (0, 1)
        assert pool.breaker.failure_count == 1


def test_tls_release_and_discard_never_yield(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    """Closing a TLS connection on release (over its lifetime) or discard sends no
    close_notify and never switches greenlets, like the plain case."""
    cfg = config(
        tls_echo_server.address,
        {"ca_file": tls_certs.ca_file},
        max_lifetime=0,
        lifetime_jitter=0,
    )
    with PoolManager(cfg) as manager:
        first, second = manager.acquire("secure"), manager.acquire("secure")
        round_trip(first, b"a")
        round_trip(second, b"b")
        no_switch(first.release)  # over lifetime: closed on release
        no_switch(lambda: second.discard(ssl.SSLError("bad record mac")))
        s = manager.stats().backends["secure"].servers[tls_echo_server.address]
        assert (s.size, s.closed["lifetime"], s.closed["error"]) == (0, 1, 1)


def test_tls_server_restarted_mid_traffic(
    tls_certs: TLSCerts, echo_server_factory: Any, no_fd_leak: None
) -> None:
    """Two TLS servers; one is restarted under traffic: with one retry on a fresh
    acquisition, no request fails, and nothing leaks."""
    servers = [echo_server_factory(ssl_context=tls_certs.server_context()) for _ in range(2)]
    cfg = {
        "backends": {
            "secure": {
                "servers": [s.address for s in servers],
                "pool": {"min_idle": 1, "max_size": 4, "check_after": 0, "acquire_timeout": 2},
                "dial": {"timeout": 1, "tls": {"ca_file": tls_certs.ca_file}},
                "breaker": {"failure_threshold": 2, "recovery_timeout": 0.1},
            }
        }
    }
    failures: list[BaseException] = []
    served: list[str] = []
    stop = Event()

    def worker(manager: PoolManager, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            for attempt in (1, 2):
                try:
                    with manager.get("secure") as conn:
                        round_trip(conn, b"w%d-%d" % (n, i))
                    served.append(conn.address)
                    break
                except OSError as exc:
                    if attempt == 2:
                        failures.append(exc)
                except Exception as exc:
                    failures.append(exc)
                    break
            gevent.sleep(0.002)

    with PoolManager(cfg) as manager:
        workers = [gevent.spawn(worker, manager, n) for n in range(8)]
        gevent.sleep(0.2)
        servers[0].restart()  # every client of it dropped, listening again at once
        count = len(served)
        assert settle(lambda: served[count:].count(servers[0].address) >= 5, 5)
        stop.set()
        gevent.joinall(workers, timeout=5)
        assert all(g.dead for g in workers)
    assert failures == []


def test_close_ends_a_tls_handshake_in_flight(
    tls_certs: TLSCerts,
    make_manager: Any,
    echo_server_factory: Any,
    no_fd_leak: None,
) -> None:
    """``close(timeout=0)`` while a caller's dial is in its TLS handshake (the server
    accepts TCP, reads the ClientHello and never answers): the handshake's socket is
    closed at once, so the caller gets ``PoolClosed`` now, not after ``dial.timeout``
    (10 s here), and no fd is left."""
    silent = echo_server_factory(mode="silent")  # plain TCP: the handshake never ends
    cfg = config(silent.address, {"ca_file": tls_certs.ca_file}, acquire_timeout=30)
    cfg["backends"]["secure"]["dial"]["timeout"] = 10
    manager = make_manager(cfg)
    caller = gevent.spawn(manager.acquire, "secure")
    silent.wait_received(1, timeout=5)  # the ClientHello is in: the caller is handshaking
    assert not caller.ready()
    started = monotonic()
    manager.close(timeout=0)
    caller.join(15)
    ended = monotonic() - started
    assert caller.ready()
    assert isinstance(caller.exception, PoolClosed), repr(caller.exception)
    assert ended < 1.0, f"the caller ended {ended:.2f} s after close() (dial.timeout 10 s)"


@pytest.mark.parametrize("path", ["idle", "handoff"])
def test_tls_bytes_a_borrower_left_unread_never_reach_the_next(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, path: str, no_fd_leak: None
) -> None:
    """A reads 3 bytes of a 10-byte reply and releases: the other 7 sit decrypted in
    the SSL object's buffer (``pending()``), where the idle watcher never sees them
    (the fd is not readable) and, within ``check_after``, no borrow peek looks. The
    connection is closed on return (``unhealthy``); B, next (from the idle stack or
    waiting in the queue), gets a fresh connection and only its own reply."""
    cfg = config(tls_echo_server.address, {"ca_file": tls_certs.ca_file}, max_size=1)
    cfg["backends"]["secure"]["pool"]["check_after"] = 60
    with PoolManager(cfg) as manager:
        a = manager.acquire("secure")
        a.settimeout(3)
        a.sendall(b"0123456789")
        assert recv_exact(a, 3) == b"012"
        assert a._conn is not None
        a.settimeout(None)  # only the unread bytes differ from a clean borrow
        assert settle(lambda: a._conn is not None and a._conn.sock.pending() == 7, 3)
        waiter = None
        if path == "handoff":
            waiter = gevent.spawn(manager.acquire, "secure", timeout=5)
            assert settle(
                lambda: (
                    manager.stats().backends["secure"].servers[tls_echo_server.address].waiting == 1
                ),
                3,
            )
        a.release()
        b = waiter.get(timeout=5) if waiter is not None else manager.acquire("secure")
        with b:
            assert b.uses == 1  # not A's connection
            round_trip(b, b"abc")
        s = manager.stats().backends["secure"].servers[tls_echo_server.address]
        assert s.closed["unhealthy"] == 1
        assert s.breaker_state == "closed"
        assert s.size == s.idle + s.in_use + s.pending


def test_a_local_dial_failure_paces_the_refills(
    tls_certs: TLSCerts, tmp_path: Any, no_fd_leak: None
) -> None:
    """A local failure opens no breaker, so nothing stopped ``wait_ready`` and upkeep
    from dialing again at once: 844 failed dials in 0.5 s (found by review). Refills
    now wait a second after one."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(Path(tls_certs.ca_file).read_bytes())
    with EchoServer(ssl_context=tls_certs.server_context()) as server:
        cfg = two_server_config([server.address], {"ca_file": str(ca_file)})
        idle = parse_config(cfg)
        cfg["defaults"]["pool"]["min_idle"] = 1
        wants_one = parse_config(cfg)  # parsed (validated) while the file is there
        with PoolManager(idle) as manager:
            ca_file.unlink()
            lbpool.dial._forget_contexts()  # as an eviction: built again at the dial
            manager.reload(wants_one)  # min_idle 1: refills begin, and fail here
            with pytest.raises(lbpool.PoolTimeout):
                manager.wait_ready(1.5)
            (stats,) = manager.stats().backends["c"].servers.values()
            assert 1 <= stats.dial_failures <= 4, stats.dial_failures
            assert stats.breaker_state == "closed"
