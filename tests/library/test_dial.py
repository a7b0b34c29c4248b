"""dial(): v4/v6, TCP options, timeouts, TLS verification, setup hooks, interruption."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any

import gevent
import pytest
import trustme
from gevent import socket as gsocket
from gevent.event import Event

import lbpool.dial
from lbpool.config import Address, DialConfig, TLSConfig
from lbpool.dial import TLSSetupError, dial, make_ssl_context
from lbpool.errors import DialError
from lbpool.health import peek_alive
from lbpool.testing import EchoServer, recv_exact
from tests.support.net import free_port, ipv6_available
from tests.support.tls import TLSCerts, broken_tls_files

pytestmark = pytest.mark.timeout(10)


def addr(server: EchoServer) -> Address:
    return Address(server.host, server.port)


def roundtrip(sock: Any, payload: bytes = b"hello lbpool") -> None:
    sock.sendall(payload)
    with gevent.Timeout(2):
        assert recv_exact(sock, len(payload)) == payload


# -- plain TCP ------------------------------------------------------------------


def test_dial_ipv4_sets_options_and_blocking_mode(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    sock = dial(addr(echo_server), DialConfig())
    try:
        assert sock.gettimeout() is None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        roundtrip(sock)
    finally:
        sock.close()


def test_dial_options_can_be_turned_off(echo_server: EchoServer, no_fd_leak: None) -> None:
    sock = dial(addr(echo_server), DialConfig(tcp_nodelay=False, keepalive=False))
    try:
        assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        sock.close()


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def _keepalive_sockopt(sock: Any, setting: str) -> int:
    option = lbpool.dial._keepalive_option(setting)
    if option is None:
        pytest.skip(f"this platform has no socket option for dial.{setting}")
    value: int = sock.getsockopt(socket.IPPROTO_TCP, option)
    return value


@pytest.mark.parametrize("tls", [False, True])
def test_keepalive_tuning_reaches_the_socket(
    echo_server: EchoServer,
    tls_echo_server: EchoServer,
    tls_certs: TLSCerts,
    tls: bool,
    no_fd_leak: None,
) -> None:
    config = DialConfig(keepalive_idle=61, keepalive_interval=7.2, keepalive_count=4)
    server = echo_server
    if tls:
        config = DialConfig(
            keepalive_idle=61,
            keepalive_interval=7.2,
            keepalive_count=4,
            tls=TLSConfig(ca_file=tls_certs.ca_file),
        )
        server = tls_echo_server
    sock = dial(addr(server), config)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert _keepalive_sockopt(sock, "keepalive_idle") == 61
        assert _keepalive_sockopt(sock, "keepalive_interval") == 8  # whole seconds, up
        assert _keepalive_sockopt(sock, "keepalive_count") == 4
        roundtrip(sock)
    finally:
        sock.close()


def test_keepalive_tuning_left_unset_keeps_the_os_default(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    with gsocket.socket() as fresh:
        defaults = {s: _keepalive_sockopt(fresh, s) for s in lbpool.dial._KEEPALIVE_OPTIONS}
    sock = dial(addr(echo_server), DialConfig(keepalive_count=3))
    try:
        assert _keepalive_sockopt(sock, "keepalive_count") == 3
        assert _keepalive_sockopt(sock, "keepalive_idle") == defaults["keepalive_idle"]
        assert _keepalive_sockopt(sock, "keepalive_interval") == defaults["keepalive_interval"]
    finally:
        sock.close()


def test_keepalive_tuning_missing_on_the_platform_is_logged_once(
    echo_server: EchoServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_fd_leak: None,
) -> None:
    # a platform without TCP_KEEPCNT: the dial succeeds, the setting is reported once
    monkeypatch.setitem(lbpool.dial._KEEPALIVE_OPTIONS, "keepalive_count", ("TCP_NO_SUCH_OPT",))
    monkeypatch.setattr(lbpool.dial, "_warned", set())
    config = DialConfig(keepalive_idle=30, keepalive_count=4)
    with caplog.at_level("WARNING", logger="lbpool"):
        for _ in range(3):
            sock = dial(addr(echo_server), config)
            try:
                assert _keepalive_sockopt(sock, "keepalive_idle") == 30
                roundtrip(sock)
            finally:
                sock.close()
    notes = [r for r in caplog.records if "keepalive_count" in r.getMessage()]
    assert len(notes) == 1
    assert "TCP_NO_SUCH_OPT" in notes[0].getMessage()
    assert not [r for r in caplog.records if "keepalive_idle" in r.getMessage()]


def test_dial_ipv6(no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]) -> None:
    server = echo_server_factory(host="::1")
    assert server.address == f"[::1]:{server.port}"
    sock = dial(Address("::1", server.port), DialConfig())
    try:
        assert sock.family == socket.AF_INET6
        roundtrip(sock)
    finally:
        sock.close()


def test_refused_is_a_dial_error_with_cause(no_fd_leak: None) -> None:
    port = free_port()
    with pytest.raises(DialError) as info:
        dial(Address("127.0.0.1", port), DialConfig())
    err = info.value
    assert err.address == f"127.0.0.1:{port}"
    assert err.reason == "connection refused"
    assert str(err) == f"127.0.0.1:{port}: connection refused"
    assert isinstance(err.__cause__, ConnectionRefusedError)


def test_connect_timeout_uses_the_smaller_timeout(black_hole: Address, no_fd_leak: None) -> None:
    started = monotonic()
    with pytest.raises(DialError) as info:
        dial(black_hole, DialConfig(timeout=5), timeout=0.2)
    elapsed = monotonic() - started
    assert 0.15 <= elapsed < 1.5
    assert info.value.reason == "connect timed out after 0.2s"
    assert isinstance(info.value.__cause__, TimeoutError)


def test_connect_timeout_from_config(black_hole: Address, no_fd_leak: None) -> None:
    with pytest.raises(DialError, match=r"connect timed out after 0\.15s"):
        dial(black_hole, DialConfig(timeout=0.15), timeout=10)


def test_no_time_left_fails_at_once(echo_server: EchoServer, no_fd_leak: None) -> None:
    with pytest.raises(DialError, match="timed out") as info:
        dial(addr(echo_server), DialConfig(), timeout=0)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert echo_server.connections_accepted == 0


def test_unresolvable_host(no_fd_leak: None) -> None:
    # "cannot resolve host: ..." (NXDOMAIN), or "name resolution timed out" without DNS.
    with pytest.raises(DialError, match="resol") as info:
        dial(Address("no-such-host.invalid", 80), DialConfig(timeout=1))
    assert info.value.__cause__ is not None


# -- setup hook ------------------------------------------------------------------


def test_setup_hook_runs_once_on_the_socket(echo_server: EchoServer, no_fd_leak: None) -> None:
    seen: list[tuple[Any, float | None]] = []

    def setup(sock: Any) -> None:
        seen.append((sock, sock.gettimeout()))
        roundtrip(sock, b"AUTH secret\r\n")

    sock = dial(addr(echo_server), DialConfig(timeout=1.5), setup=setup)
    try:
        assert len(seen) == 1 and seen[0][0] is sock
        hook_timeout = seen[0][1]
        assert hook_timeout is not None and 0 < hook_timeout <= 1.5  # bounded by the dial
        assert sock.gettimeout() is None
        assert peek_alive(sock)  # the hook's exchange left the stream clean
    finally:
        sock.close()


@pytest.mark.parametrize("how", ["close", "wrap", "close_with_file"])
def test_setup_hook_that_leaves_the_socket_closed_fails_the_dial(
    echo_server: EchoServer, how: str, no_fd_leak: None
) -> None:
    """A hook that closes the socket, or wraps it (STARTTLS-style: ``wrap_socket``
    detaches the socket it is given) and returns: a dial that has nothing to lend. It
    was lent (fd -1), and crashed the pool's idle watcher."""
    kept: list[Any] = []

    def setup(sock: Any) -> None:
        if how == "close":
            sock.close()
        elif how == "close_with_file":  # the fd lives on in the file object, for now
            kept.append(sock.makefile("rb"))
            sock.close()
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            kept.append(
                ctx.wrap_socket(sock, server_hostname="localhost", do_handshake_on_connect=False)
            )

    try:
        with pytest.raises(DialError) as info:
            dial(addr(echo_server), DialConfig(), setup=setup)
        assert info.value.reason == (
            "setup hook failed: it left the socket closed (the hook cannot close, wrap or "
            "replace the socket it is given)"
        )
        assert not info.value.local
    finally:
        for wrapped in kept:
            wrapped.close()


def test_setup_hook_failure_closes_the_socket(echo_server: EchoServer, no_fd_leak: None) -> None:
    boom = RuntimeError("boom")

    def setup(sock: Any) -> None:
        raise boom

    with pytest.raises(DialError) as info:
        dial(addr(echo_server), DialConfig(), setup=setup)
    assert info.value.reason == "setup hook failed: RuntimeError: boom"
    assert info.value.__cause__ is boom
    echo_server.wait_active(0, timeout=2)  # the server saw our side close


def test_setup_hook_base_exception_propagates_unchanged(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    class Stop(BaseException):
        pass

    def setup(sock: Any) -> None:
        raise Stop

    with pytest.raises(Stop):
        dial(addr(echo_server), DialConfig(), setup=setup)
    echo_server.wait_active(0, timeout=2)


def test_setup_hook_that_hangs_is_bounded(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    silent = echo_server_factory(mode="silent")

    def setup(sock: Any) -> None:
        sock.sendall(b"AUTH\r\n")
        sock.recv(64)  # the silent server never answers

    with pytest.raises(DialError, match="setup hook failed: TimeoutError"):
        dial(addr(silent), DialConfig(timeout=0.2), setup=setup)


# -- TLS -------------------------------------------------------------------------


def tls_config(**kwargs: Any) -> DialConfig:
    return DialConfig(timeout=2, tls=TLSConfig(**kwargs))


def test_tls_success_with_ca_file(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    sock: Any = dial(addr(tls_echo_server), tls_config(ca_file=tls_certs.ca_file))
    try:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert sock.gettimeout() is None
        roundtrip(sock)
        assert peek_alive(sock)
    finally:
        sock.close()


def test_tls_verification_is_on_by_default(tls_echo_server: EchoServer, no_fd_leak: None) -> None:
    # No ca_file: the system store does not know the test CA.
    with pytest.raises(DialError) as info:
        dial(addr(tls_echo_server), tls_config())
    assert info.value.reason.startswith("TLS handshake failed: certificate verify failed: ")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    tls_echo_server.wait_active(0, timeout=2)


def test_tls_unknown_ca_refused(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    with pytest.raises(DialError, match="certificate verify failed"):
        dial(addr(tls_echo_server), tls_config(ca_file=tls_certs.other_ca_file))


def test_tls_hostname_mismatch_refused(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, no_fd_leak: None
) -> None:
    config = tls_config(ca_file=tls_certs.ca_file, server_hostname="wrong.example")
    with pytest.raises(DialError, match="certificate verify failed: Hostname mismatch"):
        dial(addr(tls_echo_server), config)


def test_tls_ip_host_is_checked_against_the_ip(
    tls_certs: TLSCerts, no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_certs.ca.issue_cert("localhost", key_type=trustme.KeyType.ECDSA).configure_cert(ctx)
    server = echo_server_factory(ssl_context=ctx)
    with pytest.raises(DialError, match="IP address mismatch"):
        dial(addr(server), tls_config(ca_file=tls_certs.ca_file))
    # Naming the host the certificate is for makes the same server acceptable.
    sock = dial(addr(server), tls_config(ca_file=tls_certs.ca_file, server_hostname="localhost"))
    try:
        roundtrip(sock)
    finally:
        sock.close()


def test_tls_client_certificate(
    tls_certs: TLSCerts, no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    server = echo_server_factory(ssl_context=tls_certs.server_context(require_client_cert=True))
    config = tls_config(
        ca_file=tls_certs.ca_file,
        cert_file=tls_certs.client_cert_file,
        key_file=tls_certs.client_key_file,
    )
    sock = dial(addr(server), config)
    try:
        roundtrip(sock)  # the server only answers once it accepted our certificate
    finally:
        sock.close()


def test_tls_verify_false_accepts_unknown_ca(tls_echo_server: EchoServer, no_fd_leak: None) -> None:
    sock = dial(addr(tls_echo_server), tls_config(verify=False))
    try:
        roundtrip(sock)
    finally:
        sock.close()


def test_tls_against_plain_server_fails_cleanly(echo_server: EchoServer, no_fd_leak: None) -> None:
    with pytest.raises(DialError, match="TLS handshake failed") as info:
        dial(addr(echo_server), tls_config(verify=False))
    assert isinstance(info.value.__cause__, OSError)


def test_tls_handshake_timeout(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    silent = echo_server_factory(mode="silent")
    config = DialConfig(timeout=0.2, tls=TLSConfig(verify=False))
    with pytest.raises(DialError, match=r"TLS handshake timed out after 0\.2s"):
        dial(addr(silent), config)


def test_tls_context_is_built_once_per_config(tls_certs: TLSCerts) -> None:
    first = make_ssl_context(TLSConfig(ca_file=tls_certs.ca_file))
    again = make_ssl_context(TLSConfig(ca_file=tls_certs.ca_file))
    assert first is again
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    loose = make_ssl_context(TLSConfig(verify=False))
    assert loose is not first
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


def test_a_tls_context_that_cannot_be_built_fails_the_dial_before_connecting(
    tls_certs: TLSCerts, tls_echo_server: EchoServer, tmp_path: Any, no_fd_leak: None
) -> None:
    # a CA file valid when the config was validated, gone when the context is built
    # again (evicted from the cache): a local mistake, no connection is made for it
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(Path(tls_certs.ca_file).read_bytes())
    config = tls_config(ca_file=str(ca_file))
    ca_file.unlink()
    lbpool.dial._forget_contexts()
    accepted = tls_echo_server.connections_accepted
    with pytest.raises(DialError) as info:
        dial(addr(tls_echo_server), config)
    assert info.value.local
    assert "TLS configuration error" in info.value.reason
    assert "dial.tls.ca_file" in info.value.reason and str(ca_file) in info.value.reason
    assert tls_echo_server.connections_accepted == accepted
    assert isinstance(info.value.__cause__, TLSSetupError)
    assert info.value.__cause__.setting == "ca_file"


def test_server_failures_are_not_local(tls_certs: TLSCerts, tls_echo_server: EchoServer) -> None:
    # a server whose certificate does not verify: the server's fault, not local
    with pytest.raises(DialError) as info:
        dial(addr(tls_echo_server), tls_config(ca_file=tls_certs.other_ca_file))
    assert not info.value.local


def test_make_ssl_context_names_the_setting_at_fault(tls_certs: TLSCerts, tmp_path: Any) -> None:
    broken = broken_tls_files(str(tmp_path), tls_certs)
    client = {"ca_file": tls_certs.ca_file, "cert_file": tls_certs.client_cert_file}
    cases = [
        ({"ca_file": broken.missing}, "ca_file", broken.missing),
        ({"ca_file": broken.garbled}, "ca_file", broken.garbled),
        (
            {**client, "cert_file": broken.garbled, "key_file": tls_certs.client_key_file},
            "cert_file",
            broken.garbled,
        ),
        (client, "cert_file", tls_certs.client_cert_file),
        ({**client, "key_file": broken.other_key}, "key_file", broken.other_key),
        ({**client, "key_file": broken.encrypted_key}, "key_file", broken.encrypted_key),
        ({"server_hostname": "a..b"}, "server_hostname", "a..b"),
    ]
    for settings, setting, named in cases:
        # the model refuses these, so build the stand-in a caller could still pass
        tls = TLSConfig.model_construct(**{**TLSConfig().model_dump(), **settings})
        lbpool.dial._forget_contexts()
        with pytest.raises(TLSSetupError) as info:
            make_ssl_context(tls)
        assert info.value.setting == setting, (settings, info.value)
        assert named in info.value.problem, (settings, info.value)
        assert str(info.value).startswith(f"dial.tls.{setting}: ")


# -- interruption: nothing leaks, the interrupt propagates unchanged -------------


def test_gevent_timeout_mid_connect(black_hole: Address, no_fd_leak: None) -> None:
    timer = gevent.Timeout(0.05)
    with pytest.raises(gevent.Timeout) as info, timer:
        dial(black_hole, DialConfig(timeout=5))
    assert info.value is timer


def test_kill_mid_connect(black_hole: Address, no_fd_leak: None) -> None:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            dial(black_hole, DialConfig(timeout=5))
        except BaseException as exc:
            raised.append(exc)
            raise

    g = gevent.spawn(run)
    gevent.sleep(0)  # the greenlet runs until it waits in connect()
    g.kill(block=True, timeout=2)
    assert g.dead
    assert len(raised) == 1 and isinstance(raised[0], gevent.GreenletExit)


def test_kill_mid_handshake(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    silent = echo_server_factory(mode="silent")
    g = gevent.spawn(dial, addr(silent), DialConfig(timeout=5, tls=TLSConfig(verify=False)))
    silent.wait_received(1, timeout=2)  # our ClientHello arrived: we wait for ServerHello
    g.kill(block=True, timeout=2)
    assert g.dead and isinstance(g.value, gevent.GreenletExit)
    silent.wait_active(0, timeout=2)


def test_gevent_timeout_mid_handshake(
    no_fd_leak: None, echo_server_factory: Callable[..., EchoServer]
) -> None:
    silent = echo_server_factory(mode="silent")
    timer = gevent.Timeout(0.1)
    with pytest.raises(gevent.Timeout) as info, timer:
        dial(addr(silent), DialConfig(timeout=5, tls=TLSConfig(verify=False)))
    assert info.value is timer
    silent.wait_active(0, timeout=2)


def test_kill_in_setup_hook(echo_server: EchoServer, no_fd_leak: None) -> None:
    entered = Event()

    def setup(sock: Any) -> None:
        entered.set()
        Event().wait()  # forever, until killed

    g = gevent.spawn(dial, addr(echo_server), DialConfig(), setup=setup)
    assert entered.wait(timeout=2)
    g.kill(block=True, timeout=2)
    assert g.dead
    echo_server.wait_active(0, timeout=2)


# -- the setup hook within the dial's budget; several addresses (DESIGN 14, 18) ---------


def test_setup_hook_blocked_off_the_socket_fails_the_dial_on_time(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    never = Event()

    def setup(sock: Any) -> None:
        never.wait(30)  # not the socket: its timeout cannot bound this

    start = monotonic()
    with pytest.raises(DialError, match="setup hook") as info:
        dial(addr(echo_server), DialConfig(timeout=0.3), setup=setup)
    assert monotonic() - start < 0.3 + 0.5
    assert isinstance(info.value.__cause__, TimeoutError)


def test_caller_timeout_inside_setup_hook_propagates(
    echo_server: EchoServer, no_fd_leak: None
) -> None:
    """The dial's own timer is turned into a DialError; a caller's gevent.Timeout is not."""
    never = Event()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
        dial(addr(echo_server), DialConfig(timeout=5), setup=lambda sock: never.wait(30))


def two_addresses(first: Address, second: Address) -> list[Any]:
    return [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (first.host, first.port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (second.host, second.port)),
    ]


def test_unreachable_first_address_costs_the_attempt_delay_not_the_budget(
    echo_server: EchoServer,
    black_hole: Address,
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    infos = two_addresses(black_hole, addr(echo_server))
    monkeypatch.setattr(lbpool.dial, "resolve", lambda host, port, timeout=None: infos)
    start = monotonic()
    sock = dial(Address("two.example", 1), DialConfig(timeout=2))
    took = monotonic() - start
    assert lbpool.dial.ATTEMPT_DELAY - 0.05 < took < lbpool.dial.ATTEMPT_DELAY + 0.5
    roundtrip(sock)
    sock.close()  # the loser (the black-hole attempt) was closed by dial: no_fd_leak


def test_refused_first_address_starts_the_next_at_once(
    echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    infos = two_addresses(Address("127.0.0.1", free_port()), addr(echo_server))
    monkeypatch.setattr(lbpool.dial, "resolve", lambda host, port, timeout=None: infos)
    monkeypatch.setattr(lbpool.dial, "ATTEMPT_DELAY", 3.0)  # a wait would be unmistakable
    start = monotonic()
    sock = dial(Address("two.example", 1), DialConfig(timeout=5))
    assert monotonic() - start < 1.5  # the refusal started the next at once
    roundtrip(sock)
    sock.close()


def test_every_address_unreachable_times_out_within_the_budget(
    black_hole: Address, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    infos = two_addresses(black_hole, black_hole)
    monkeypatch.setattr(lbpool.dial, "resolve", lambda host, port, timeout=None: infos)
    start = monotonic()
    with pytest.raises(DialError, match="timed out"):
        dial(Address("two.example", 1), DialConfig(timeout=0.5))
    assert monotonic() - start < 0.5 + 0.5


def test_configs_differing_only_in_server_hostname_load_their_files_once(
    tls_certs: TLSCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """70 backends, each its own ``server_hostname``, one CA file: validating them built
    70 contexts (~45 ms each, past a 64-entry cache: every reload again, seconds in the
    hub). The files' context is shared; each name is only checked against it."""
    from lbpool.config import parse_config

    builds = count_context_builds(monkeypatch)
    backends = {
        f"b{i}": {
            "servers": [f"127.0.0.1:{7000 + i}"],
            "dial": {"tls": {"ca_file": tls_certs.ca_file, "server_hostname": f"h{i}.example"}},
        }
        for i in range(70)
    }
    first = parse_config({"backends": backends})
    again = parse_config({"backends": backends})
    assert builds == [(tls_certs.ca_file, None, None, True)]
    tls = [b.dial.tls for c in (first, again) for b in c.backends.values()]
    assert len({id(make_ssl_context(t)) for t in tls if t is not None}) == 1


def count_context_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """From now on, the files of every context built (none cached before)."""
    lbpool.dial._forget_contexts()
    builds: list[tuple[Any, ...]] = []
    build = lbpool.dial._context_of_files

    def counted(*files: Any) -> ssl.SSLContext:
        builds.append(files)
        return build(*files)

    monkeypatch.setattr(lbpool.dial, "_context_of_files", counted)
    return builds


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` anew as rotation tools do: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    fresh.replace(path)


def test_rotated_tls_files_are_used_by_the_next_dial(
    tls_certs: TLSCerts,
    tls_echo_server: EchoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    """A CA file replaced on disk (certificate rotation) is loaded by the next dial, no
    reload needed, as redis-py and urllib3 read their files per connection; the cached
    context served every dial before (it was loaded once, however many dials)."""
    builds = count_context_builds(monkeypatch)
    ca_file = tmp_path / "ca.pem"
    replace_file(ca_file, Path(tls_certs.other_ca_file).read_bytes())  # the wrong CA
    config = tls_config(ca_file=str(ca_file))
    with pytest.raises(DialError) as info:
        dial(addr(tls_echo_server), config)
    assert not info.value.local  # the server's certificate does not verify
    replace_file(ca_file, Path(tls_certs.ca_file).read_bytes())  # rotated: the right CA
    for _ in range(3):
        sock: Any = dial(addr(tls_echo_server), config)
        roundtrip(sock)
        sock.close()
    assert len(builds) == 2  # once per version of the file, not per dial
    replace_file(ca_file, Path(tls_certs.other_ca_file).read_bytes())
    with pytest.raises(DialError):
        dial(addr(tls_echo_server), config)
    assert len(builds) == 3
    assert len(lbpool.dial._contexts) == 1  # each version replaced the one before


def test_a_rotated_file_that_cannot_be_loaded_keeps_the_last_context(
    tls_certs: TLSCerts,
    tls_echo_server: EchoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    """A CA file rotated into garbage (a half-written file, a mistake): dials keep the
    context last loaded from it, with one warning naming the setting and the file (again
    every ``FALLBACK_WARN_EVERY`` s), try to load the broken file once, not at every
    dial (~20 ms of the hub each with the system's CAs), and load the file again once
    it changed again."""
    builds = count_context_builds(monkeypatch)
    ca_file = tmp_path / "ca.pem"
    replace_file(ca_file, Path(tls_certs.ca_file).read_bytes())
    tls = TLSConfig(ca_file=str(ca_file))
    config = DialConfig(timeout=2, tls=tls)
    before = make_ssl_context(tls)
    replace_file(ca_file, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with caplog.at_level("WARNING", logger="lbpool"):
        for _ in range(3):
            sock: Any = dial(addr(tls_echo_server), config)
            roundtrip(sock)
            sock.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "dial.tls.ca_file" in warnings[0] and str(ca_file) in warnings[0]
    assert len(builds) == 2  # the good file, then the broken one once
    with pytest.raises(TLSSetupError) as info:  # what make_ssl_context (validation) says
        make_ssl_context(tls)
    assert info.value.setting == "ca_file" and str(ca_file) in info.value.problem
    assert len(builds) == 2
    monkeypatch.setattr(lbpool.dial, "FALLBACK_WARN_EVERY", 0.0)
    with caplog.at_level("WARNING", logger="lbpool"):
        dial(addr(tls_echo_server), config).close()
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2
    replace_file(ca_file, Path(tls_certs.other_ca_file).read_bytes())  # changed again
    with pytest.raises(DialError) as info:  # loaded: the other CA verifies nothing
        dial(addr(tls_echo_server), config)
    assert not info.value.local
    assert make_ssl_context(tls) is not before


def test_a_failed_load_is_tried_again_a_second_later(
    tls_certs: TLSCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that failed for the process's sake (a full fd table: EMFILE) is not
    remembered for ever when the files do not change: believed for ``_RETRY_FAILED``
    s (no load at every dial meanwhile), then tried again."""
    tls = TLSConfig.model_construct(**{**TLSConfig().model_dump(), "ca_file": tls_certs.ca_file})
    builds = count_context_builds(monkeypatch)
    build = lbpool.dial._context_of_files
    failing = [True]

    def once_failing(*files: Any) -> ssl.SSLContext:
        if failing[0]:
            failing[0] = False
            raise TLSSetupError("ca_file", "cannot read it: too many open files")
        return build(*files)

    monkeypatch.setattr(lbpool.dial, "_context_of_files", once_failing)
    clock = [1000.0]
    monkeypatch.setattr(lbpool.dial, "monotonic", lambda: clock[0])
    with pytest.raises(TLSSetupError, match="too many open files"):
        make_ssl_context(tls)
    clock[0] += lbpool.dial._RETRY_FAILED * 0.9
    with pytest.raises(TLSSetupError, match="too many open files"):  # remembered
        make_ssl_context(tls)
    assert not failing[0] and builds == []  # the wrapper above the counter ran once
    clock[0] += lbpool.dial._RETRY_FAILED * 0.2
    make_ssl_context(tls)  # tried again: the files are fine
    assert builds == [(tls_certs.ca_file, None, None, True)]
