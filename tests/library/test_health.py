"""peek_alive() and check_health() against real loopback servers (plain and TLS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import gevent
import gevent.select
import pytest

from lbpool.config import Address, DialConfig, HealthCheckConfig, TLSConfig
from lbpool.dial import dial
from lbpool.health import Unhealthy, check_health, peek_alive
from lbpool.testing import EchoServer, FaultProxy, recv_exact
from tests.support.tls import TLSCerts

pytestmark = pytest.mark.timeout(10)

PING = HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=1)


def health(**fields: Any) -> HealthCheckConfig:
    """A config from plain values (hooks as import strings or callables, as in YAML)."""
    return HealthCheckConfig.model_validate(fields)


def open_to(server: EchoServer | FaultProxy, tls: TLSConfig | None = None) -> Any:
    return dial(Address(server.host, server.port), DialConfig(timeout=2, tls=tls))


def wait_readable(sock: Any, timeout: float = 2.0) -> bool:
    """Wait until the kernel has something for us (data, FIN or RST) — an event, not a sleep."""
    readable, _, _ = gevent.select.select([sock], [], [], timeout)
    return bool(readable)


def roundtrip(sock: Any, payload: bytes = b"still in step") -> None:
    sock.sendall(payload)
    with gevent.Timeout(2):
        assert recv_exact(sock, len(payload)) == payload


@pytest.fixture
def conn(echo_server: EchoServer) -> Iterator[Any]:
    sock = open_to(echo_server)
    yield sock
    sock.close()


def runs_without_yielding(func: Callable[[], object]) -> bool:
    """True when ``func`` never switched to the hub (a greenlet spawned before it stayed
    unstarted): the check cannot stall a caller's greenlet or anyone else's."""
    ran: list[bool] = []
    other = gevent.spawn(ran.append, True)
    try:
        func()
        return not ran
    finally:
        other.kill()


# -- peek_alive --------------------------------------------------------------------


def test_idle_connection_is_alive(no_fd_leak: None, conn: Any) -> None:
    roundtrip(conn)
    conn.settimeout(3.0)
    assert peek_alive(conn)
    assert conn.gettimeout() == 3.0  # restored
    assert runs_without_yielding(lambda: peek_alive(conn))
    roundtrip(conn)  # the peek consumed nothing


def test_peer_close_is_detected(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(mode="close_on_accept")
    sock = open_to(server)
    try:
        assert wait_readable(sock)  # the FIN arrived
        assert not peek_alive(sock)
    finally:
        sock.close()


def test_server_stop_is_detected(no_fd_leak: None, echo_server: EchoServer) -> None:
    sock = open_to(echo_server)
    try:
        echo_server.wait_active(1)
        echo_server.stop()
        assert wait_readable(sock)
        assert not peek_alive(sock)
    finally:
        sock.close()


def test_unexpected_bytes_are_detected_without_consuming_them(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(greeting=b"surprise")
    sock = open_to(server)
    try:
        assert wait_readable(sock)
        assert not peek_alive(sock)
        assert sock.recv(64) == b"surprise"  # plain sockets are only peeked
    finally:
        sock.close()


def test_reset_is_detected(no_fd_leak: None, echo_server: EchoServer) -> None:
    with FaultProxy(echo_server.address) as proxy:
        sock = open_to(proxy)
        try:
            roundtrip(sock)
            proxy.reset_all()
            assert wait_readable(sock)
            assert not peek_alive(sock)
        finally:
            sock.close()


def test_closed_socket_is_not_alive(no_fd_leak: None, conn: Any) -> None:
    conn.close()
    assert not peek_alive(conn)


def test_tls_idle_connection_is_alive_after_session_tickets(
    no_fd_leak: None, tls_certs: TLSCerts, tls_echo_server: EchoServer
) -> None:
    sock = open_to(tls_echo_server, TLSConfig(ca_file=tls_certs.ca_file))
    try:
        # TLS 1.3 servers send session tickets after the handshake: raw bytes wait on
        # the socket, yet nothing is wrong with the connection.
        wait_readable(sock, timeout=0.5)
        assert peek_alive(sock)
        assert runs_without_yielding(lambda: peek_alive(sock))
        roundtrip(sock)
        assert peek_alive(sock)
    finally:
        sock.close()


def test_tls_peer_close_is_detected(
    no_fd_leak: None, tls_certs: TLSCerts, tls_echo_server: EchoServer
) -> None:
    sock = open_to(tls_echo_server, TLSConfig(ca_file=tls_certs.ca_file))
    try:
        roundtrip(sock)
        tls_echo_server.stop()
        assert wait_readable(sock)
        assert not peek_alive(sock)
    finally:
        sock.close()


def test_tls_unexpected_bytes_are_detected(
    no_fd_leak: None, tls_certs: TLSCerts, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(ssl_context=tls_certs.server_context(), greeting=b"hi")
    sock = open_to(server, TLSConfig(ca_file=tls_certs.ca_file))
    try:
        deadline = monotonic() + 2
        # Tickets may come first; the greeting record follows them.
        while peek_alive(sock) and monotonic() < deadline:
            assert wait_readable(sock, timeout=2)
        assert not peek_alive(sock)
    finally:
        sock.close()


# -- check_health --------------------------------------------------------------------


def test_nothing_configured_is_a_no_op(no_fd_leak: None, conn: Any) -> None:
    conn.close()
    check_health(conn, HealthCheckConfig())  # does not even touch the socket


def test_send_expect_prefix_passes_and_leaves_the_stream_clean(no_fd_leak: None, conn: Any) -> None:
    conn.settimeout(7.0)
    check_health(conn, PING)
    assert conn.gettimeout() == 7.0
    assert peek_alive(conn)  # "\r\n" after "+PONG" was consumed too
    roundtrip(conn)


def test_send_expect_whole_line(no_fd_leak: None, conn: Any) -> None:
    check_health(conn, HealthCheckConfig(send="PING\r\n", expect="+PONG\r\n"))
    assert peek_alive(conn)
    roundtrip(conn)


def test_send_expect_without_lines(no_fd_leak: None, conn: Any) -> None:
    # Not a line protocol (no newline): exactly len(expect) bytes are read.
    check_health(conn, HealthCheckConfig(send="ping?", expect="ping?"))
    assert peek_alive(conn)
    roundtrip(conn)


def test_send_without_expect_only_writes(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(mode="silent")
    sock = open_to(server)
    try:
        check_health(sock, HealthCheckConfig(send="NOOP\r\n"))
        server.wait_received(6)
    finally:
        sock.close()


def test_wrong_reply_is_unhealthy(no_fd_leak: None, conn: Any) -> None:
    with pytest.raises(Unhealthy) as info:
        check_health(conn, HealthCheckConfig(send="PING\r\n", expect="+OK"))
    assert info.value.reason == "unexpected reply b'+PONG\\r\\n' (expected b'+OK')"


def test_bytes_after_the_reply_are_unhealthy(no_fd_leak: None, conn: Any) -> None:
    # The echo sends back both lines: the second one is nobody's reply.
    config = HealthCheckConfig(send="+PONG\r\nextra\r\n", expect="+PONG")
    with pytest.raises(Unhealthy, match="unexpected bytes after"):
        check_health(conn, config)


def test_silent_server_times_out_within_the_bound(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(mode="silent")
    sock = open_to(server)
    try:
        started = monotonic()
        with pytest.raises(Unhealthy, match=r"timed out after 0\.2s"):
            check_health(sock, HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=0.2))
        assert monotonic() - started < 1.0
        assert sock.gettimeout() is None  # restored
    finally:
        sock.close()


def test_peer_gone_is_unhealthy(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(mode="close_on_accept")
    sock = open_to(server)
    try:
        assert wait_readable(sock)
        with pytest.raises(Unhealthy, match=r"closed by peer|health check failed"):
            check_health(sock, PING)
    finally:
        sock.close()


def test_hook_pass_and_fail(no_fd_leak: None, conn: Any) -> None:
    check_health(conn, health(hook="tests.support.hooks:health_ok"))
    with pytest.raises(Unhealthy) as info:
        check_health(conn, health(hook="tests.support.hooks:health_fail"))
    assert info.value.reason == "health hook failed: RuntimeError: unhealthy"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_hook_runs_after_send_expect_with_the_socket(no_fd_leak: None, conn: Any) -> None:
    calls: list[Any] = []

    def hook(sock: Any) -> None:
        assert peek_alive(sock)  # the send/expect reply was consumed before the hook
        calls.append(sock)

    check_health(conn, health(send="PING\r\n", expect="+PONG", hook=hook))
    assert calls == [conn]


def test_hook_raising_unhealthy_keeps_its_reason(no_fd_leak: None, conn: Any) -> None:
    def hook(sock: Any) -> None:
        raise Unhealthy("replica lagging")

    with pytest.raises(Unhealthy, match=r"^replica lagging$"):
        check_health(conn, health(hook=hook))


def test_hanging_hook_is_bounded(no_fd_leak: None, conn: Any) -> None:
    def hook(sock: Any) -> None:
        gevent.sleep(30)

    started = monotonic()
    with pytest.raises(Unhealthy, match=r"timed out after 0\.1s"):
        check_health(conn, health(hook=hook, timeout=0.1))
    assert monotonic() - started < 1.0


def test_callers_gevent_timeout_is_not_swallowed(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(mode="silent")
    sock = open_to(server)
    try:
        timer = gevent.Timeout(0.05)
        with pytest.raises(gevent.Timeout) as info, timer:
            check_health(sock, HealthCheckConfig(send="PING\r\n", expect="+PONG", timeout=5))
        assert info.value is timer
        assert sock.gettimeout() is None
    finally:
        sock.close()


def test_tls_send_expect(
    no_fd_leak: None, tls_certs: TLSCerts, tls_echo_server: EchoServer
) -> None:
    sock = open_to(tls_echo_server, TLSConfig(ca_file=tls_certs.ca_file))
    try:
        check_health(sock, PING)
        assert peek_alive(sock)
        roundtrip(sock)
    finally:
        sock.close()
