"""lbpool.testing: EchoServer and FaultProxy, observed from real client sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any

import gevent
import pytest

from lbpool.testing import EchoServer, FaultProxy
from tests.support.leaks import live_greenlets, settle
from tests.support.net import connect, ipv6_available
from tests.support.tls import TLSCerts

pytestmark = pytest.mark.timeout(10)


def recv_exactly(sock: Any, size: int, timeout: float = 2.0) -> bytes:
    got = b""
    with gevent.Timeout(timeout):
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                break
            got += chunk
    return got


def recv_until_eof(sock: Any, timeout: float = 2.0) -> bytes:
    got = b""
    with gevent.Timeout(timeout):
        while chunk := sock.recv(4096):
            got += chunk
    return got


def echoes(sock: Any, payload: bytes = b"hello") -> bool:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def stays_quiet(sock: Any, seconds: float = 0.15) -> bool:
    """Nothing arrives for ``seconds`` (asserting an absence needs a time bound)."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


@pytest.fixture
def client() -> Iterator[Callable[[str], Any]]:
    """``open(address)`` -> a connected client socket; all closed at teardown."""
    socks: list[Any] = []

    def open_(address: str) -> Any:
        sock = connect(address)
        socks.append(sock)
        return sock

    yield open_
    for sock in socks:
        sock.close()


# -- EchoServer ---------------------------------------------------------------------


def test_echo_ping_and_counters(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer() as server:
        assert server.address == f"127.0.0.1:{server.port}" and server.port > 0
        sock = client(server.address)
        assert echoes(sock, b"any bytes \x00\xff")
        sock.sendall(b"PING\r\n")
        assert recv_exactly(sock, 7) == b"+PONG\r\n"
        sock.sendall(b"PING\r\nPING\r\n")
        assert recv_exactly(sock, 14) == b"+PONG\r\n+PONG\r\n"
        assert echoes(sock, b"PING but not alone\r\n")
        server.wait_active(1)
        assert server.connections_accepted == 1
        sock.close()
        server.wait_active(0)
        assert server.bytes_received > 0


def test_greeting_and_delay(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer(greeting="hi\r\n", delay=0.1) as server:
        sock = client(server.address)
        assert recv_exactly(sock, 4) == b"hi\r\n"
        started = monotonic()
        assert echoes(sock)
        assert monotonic() - started >= 0.09


def test_stop_closes_listener_and_clients(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    baseline = len(live_greenlets())
    server = EchoServer().start()
    sock = client(server.address)
    assert echoes(sock)
    server.stop()
    assert recv_until_eof(sock) == b""  # the server's side is closed
    with pytest.raises(ConnectionRefusedError):
        connect(server.address)
    assert server.active == 0 and not server.listening
    assert settle(lambda: len(live_greenlets()) <= baseline)


def test_restart_keeps_the_port_and_drops_clients(
    no_fd_leak: None, echo_server: EchoServer, client: Callable[[str], Any]
) -> None:
    port = echo_server.port
    old = client(echo_server.address)
    assert echoes(old)
    echo_server.restart()
    assert echo_server.port == port
    assert recv_until_eof(old) == b""
    new = client(echo_server.address)
    assert echoes(new)
    assert echo_server.connections_accepted == 2


def test_context_exit_leaves_no_greenlet(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    baseline = len(live_greenlets())
    with EchoServer(mode="silent") as server:
        for _ in range(3):
            client(server.address).sendall(b"x")
        server.wait_received(3)
        assert len(live_greenlets()) >= baseline + 3
    assert settle(lambda: len(live_greenlets()) <= baseline)


def test_reset_on_accept(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer(mode="reset_on_accept") as server:
        sock = client(server.address)
        with pytest.raises(ConnectionResetError), gevent.Timeout(2):
            sock.recv(1)


def test_close_on_accept(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer(mode="close_on_accept") as server:
        assert recv_until_eof(client(server.address)) == b""


def test_silent_reads_but_never_answers(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer() as server:
        sock = client(server.address)
        assert echoes(sock)
        server.mode = "silent"  # applies to open connections too
        sock.sendall(b"PING\r\n")
        server.wait_received(5 + 6)
        assert stays_quiet(sock)


def test_invalid_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        EchoServer(mode="explode")  # type: ignore[arg-type]


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_echo(no_fd_leak: None, client: Callable[[str], Any]) -> None:
    with EchoServer(host="::1") as server:
        assert server.address == f"[::1]:{server.port}"
        assert echoes(client(server.address))


def test_tls_echo(no_fd_leak: None, tls_certs: TLSCerts, tls_echo_server: EchoServer) -> None:
    raw = connect(tls_echo_server.address)
    sock = tls_certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        assert echoes(sock)
    finally:
        sock.close()


# -- FaultProxy ---------------------------------------------------------------------


@pytest.fixture
def proxy(echo_server: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo_server.address) as fault_proxy:
        yield fault_proxy


def test_proxy_forwards(
    no_fd_leak: None, echo_server: EchoServer, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    assert proxy.upstream == echo_server.address
    sock = client(proxy.address)
    assert echoes(sock, b"x" * 200_000)
    proxy.wait_active(1)
    assert proxy.connections_accepted == 1 and echo_server.connections_accepted == 1


def test_latency_applies_to_open_connections(
    no_fd_leak: None, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    sock = client(proxy.address)
    assert echoes(sock)
    proxy.latency(0.3)
    started = monotonic()
    assert echoes(sock)
    assert monotonic() - started >= 0.59  # once each way
    proxy.recover()
    started = monotonic()
    assert echoes(sock)
    assert monotonic() - started < 0.3  # no added latency (with room for a loaded box)


def test_blackhole_stalls_new_and_open_connections(
    no_fd_leak: None, echo_server: EchoServer, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    open_sock = client(proxy.address)
    assert echoes(open_sock)
    proxy.blackhole()
    new_sock = client(proxy.address)  # the connect itself succeeds ...
    proxy.wait_accepted(2)
    open_sock.sendall(b"held")
    new_sock.sendall(b"also held")
    assert stays_quiet(open_sock) and stays_quiet(new_sock)  # ... but nothing comes back
    assert echo_server.connections_accepted == 1  # the new one never reached upstream
    proxy.recover()
    assert recv_exactly(open_sock, 4) == b"held"
    assert recv_exactly(new_sock, 9) == b"also held"


def test_reset_all(
    no_fd_leak: None, echo_server: EchoServer, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    socks = [client(proxy.address) for _ in range(3)]
    assert all(echoes(sock) for sock in socks)
    proxy.reset_all()
    for sock in socks:
        with pytest.raises(ConnectionResetError), gevent.Timeout(2):
            sock.recv(1)
    echo_server.wait_active(0)  # the upstream side was reset too
    proxy.wait_active(0)
    assert echoes(client(proxy.address))  # new connections are fine


def test_reset_new(no_fd_leak: None, proxy: FaultProxy, client: Callable[[str], Any]) -> None:
    old = client(proxy.address)
    assert echoes(old)
    proxy.reset_new(True)
    fresh = client(proxy.address)
    with pytest.raises(ConnectionResetError), gevent.Timeout(2):
        fresh.recv(1)
    assert echoes(old)  # open connections are untouched
    proxy.reset_new(False)
    assert echoes(client(proxy.address))


def test_close_after(no_fd_leak: None, proxy: FaultProxy, client: Callable[[str], Any]) -> None:
    open_sock = client(proxy.address)
    assert echoes(open_sock)
    proxy.close_after(5)
    open_sock.sendall(b"0123456789")
    assert recv_until_eof(open_sock) == b"01234"  # the server "died" mid-reply
    new_sock = client(proxy.address)
    new_sock.sendall(b"abcdefgh")
    assert recv_until_eof(new_sock) == b"abcde"
    proxy.close_after(None)
    assert echoes(client(proxy.address), b"0123456789")


def test_refuse_and_recover_on_the_same_port(
    no_fd_leak: None, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    port = proxy.port
    open_sock = client(proxy.address)
    assert echoes(open_sock)
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.address)
    assert echoes(open_sock)  # open connections live on
    proxy.recover()
    assert proxy.port == port
    assert echoes(client(proxy.address))


def test_upstream_down_resets_clients(
    no_fd_leak: None, echo_server: EchoServer, client: Callable[[str], Any]
) -> None:
    with FaultProxy(echo_server.address) as proxy:
        echo_server.stop()
        sock = client(proxy.address)
        with pytest.raises(ConnectionResetError), gevent.Timeout(2):
            sock.recv(1)


def test_upstream_close_reaches_the_client(
    no_fd_leak: None, echo_server: EchoServer, proxy: FaultProxy, client: Callable[[str], Any]
) -> None:
    sock = client(proxy.address)
    assert echoes(sock)
    echo_server.restart()
    assert recv_until_eof(sock) == b""


def test_proxy_stop_leaves_nothing(
    no_fd_leak: None, echo_server: EchoServer, client: Callable[[str], Any]
) -> None:
    baseline = len(live_greenlets())
    proxy = FaultProxy(echo_server.address).start()
    flowing = client(proxy.address)
    assert echoes(flowing)
    proxy.blackhole()
    stalled = client(proxy.address)
    proxy.wait_accepted(2)
    flowing.sendall(b"stuck in a pump")
    proxy.stop()
    assert recv_until_eof(flowing) == b""
    assert recv_until_eof(stalled) == b""
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.address)
    assert settle(lambda: len(live_greenlets()) <= baseline)
    echo_server.wait_active(0)


def test_bad_upstream_address() -> None:
    with pytest.raises(ValueError, match="host:port"):
        FaultProxy("no-port")


def test_recv_exact_reads_all_and_fails_on_early_close() -> None:
    from gevent import socket as gsocket

    from lbpool.testing import recv_exact

    with EchoServer() as srv, gsocket.create_connection(("127.0.0.1", srv.port), 2) as sock:
        sock.sendall(b"abc")
        sock.sendall(b"defg")
        assert recv_exact(sock, 7) == b"abcdefg"
    with (
        EchoServer(mode="close_on_accept") as closing,
        gsocket.create_connection(("127.0.0.1", closing.port), 2) as sock,
        pytest.raises(ConnectionResetError),
    ):
        recv_exact(sock, 1)
