"""A borrow starts clean (DESIGN 16), on real loopback sockets.

Each test is one way a borrow could inherit something from an earlier one: a socket
timeout or blocking mode a previous borrower set (through the handle, or on the raw
socket), a ``makefile()`` object that outlives its borrow (after release, after the
manager closed), bytes or EOF that arrived while the connection sat idle (handed to
the next borrower as its "reply"); and the size accounting of a connection under a
borrow or background check (``size == idle + in_use + pending`` at every instant).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.monkey
import gevent.socket
import pytest
from gevent.event import Event

from lbpool import PoolManager
from lbpool.config import HealthCheckConfig, PoolConfig
from lbpool.pool import Pool
from lbpool.testing import EchoServer, _LoopbackServer, recv_exact

BOUND = 5.0  # generous: the suite must pass on a starved box


def _until(predicate: Callable[[], bool], timeout: float = BOUND) -> bool:
    """Poll with hub turns until ``predicate()`` or ``timeout``; its last verdict."""
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.002)
    return predicate()


def _one_server_manager(make: Callable[..., PoolManager], address: str, **pool: Any) -> Any:
    config = {"min_idle": 0, "max_size": 1, **pool}
    return make({"backends": {"svc": {"servers": [address], "pool": config}}})


def _server_stats(manager: PoolManager, address: str) -> Any:
    return manager.stats().backends["svc"].servers[address]


# -- timeouts and blocking mode -----------------------------------------------------


def _set_short_timeout(conn: Any, how: str) -> None:
    if how == "handle.settimeout":
        conn.settimeout(0.05)
    elif how == "sock.settimeout":
        conn.sock.settimeout(0.05)
    else:  # "sock.setblocking": a non-blocking socket left behind
        conn.sock.setblocking(False)


@pytest.mark.parametrize("how", ["handle.settimeout", "sock.settimeout", "sock.setblocking"])
@pytest.mark.parametrize("path", ["idle", "handoff"])
def test_a_timeout_set_by_one_borrower_never_reaches_the_next(
    make_manager: Callable[..., PoolManager],
    echo_server_factory: Callable[..., EchoServer],
    how: str,
    path: str,
    no_fd_leak: None,
) -> None:
    """A sets a 50 ms timeout (or non-blocking mode) and releases; B, who set nothing,
    talks to a healthy server that answers in 0.3 s: B gets its reply, and the server's
    breaker sees no failure. ``path``: the connection goes idle between them, or is
    handed straight to B waiting in the queue."""
    server = echo_server_factory(delay=0.3)
    manager = _one_server_manager(make_manager, server.address)
    a = manager.acquire("svc")
    _set_short_timeout(a, how)
    waiter = None
    if path == "handoff":
        waiter = gevent.spawn(manager.acquire, "svc", timeout=BOUND)
        assert _until(lambda: _server_stats(manager, server.address).waiting == 1)
    a.release()
    b = waiter.get(timeout=BOUND) if waiter is not None else manager.acquire("svc")
    with b:
        assert b.uses == 2  # the same connection A had
        assert b.sock.gettimeout() is None
        b.sendall(b"hello\n")
        assert recv_exact(b, 6) == b"hello\n"
    stats = _server_stats(manager, server.address)
    assert stats.breaker_state == "closed"
    assert stats.closed["error"] == 0


def test_tcp_nodelay_turned_off_on_the_raw_socket_is_restored(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    """The pool sets TCP_NODELAY (dial.tcp_nodelay, on by default): a borrower that
    turns it off on ``.sock`` does not leave the next one with Nagle's delays."""
    manager = _one_server_manager(make_manager, echo_server.address)
    with manager.get("svc") as a:
        a.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    with manager.get("svc") as b:
        assert b.uses == 2
        assert b.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_socket_closed_by_its_borrower_is_not_lent_again(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    manager = _one_server_manager(make_manager, echo_server.address)
    with manager.get("svc") as a:
        a.sock.close()
    with manager.get("svc") as b:
        assert b.uses == 1  # a new connection
        b.sendall(b"x")
        assert recv_exact(b, 1) == b"x"
    assert _server_stats(manager, echo_server.address).closed["discarded"] == 1


# -- makefile() objects end with the borrow -----------------------------------------


def test_a_makefile_object_stops_at_release(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    """A's file object, kept past its release, can neither write into B's stream nor
    read B's replies."""
    manager = _one_server_manager(make_manager, echo_server.address)
    a = manager.acquire("svc")
    f = a.makefile("rwb")
    f.write(b"mine\n")
    f.flush()
    assert f.readline() == b"mine\n"
    a.release()
    assert f.closed
    with pytest.raises(ValueError):
        f.write(b"stale\n")
    with pytest.raises(ValueError):
        f.flush()
    with pytest.raises(ValueError):
        f.readline()
    before = echo_server.bytes_received
    with manager.get("svc") as b:
        assert b.uses == 2
        b.sendall(b"theirs\n")
        assert recv_exact(b, 7) == b"theirs\n"
    assert echo_server.bytes_received == before + 7
    f.close()  # harmless


def test_a_text_makefile_works_within_its_borrow(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    manager = _one_server_manager(make_manager, echo_server.address)
    with manager.get("svc") as conn:
        f = conn.makefile("rw", encoding="ascii", newline="")
        f.write("PING\r\n")
        f.flush()
        assert f.readline() == "+PONG\r\n"
    assert f.closed
    with pytest.raises(ValueError):
        f.write("x")


@pytest.mark.parametrize("released", [True, False], ids=["released", "held"])
def test_a_makefile_object_is_dead_after_manager_close(
    make_manager: Callable[..., PoolManager],
    echo_server: EchoServer,
    released: bool,
    no_fd_leak: None,
) -> None:
    """After ``manager.close()`` a file object from an earlier borrow (released, or
    still held and force-closed) works no more, and no descriptor stays open for it."""
    manager = _one_server_manager(make_manager, echo_server.address)
    conn = manager.acquire("svc")
    f = conn.makefile("rwb")
    if released:
        conn.release()
    manager.close(timeout=0.05)
    with pytest.raises((ValueError, OSError)):
        f.write(b"after close\n")
        f.flush()
    _until(lambda: echo_server.active == 0)
    assert echo_server.active == 0  # the connection really closed


def test_a_raw_makefile_cannot_keep_the_socket_open_after_close(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    """``conn.sock.makefile()`` (the raw socket's own) holds an io reference that would
    keep the descriptor open past the pool's close: the pool closes it for good."""
    manager = _one_server_manager(make_manager, echo_server.address)
    with manager.get("svc") as conn:
        f = conn.sock.makefile("rwb")
    manager.close(timeout=1)
    with pytest.raises(OSError):
        f.write(b"after close\n")
        f.flush()
    assert _until(lambda: echo_server.active == 0)


# -- bytes or EOF while idle ---------------------------------------------------------


class PushServer(_LoopbackServer):
    """Answers each line with ``OK\\r\\n``; then, ``push_after`` seconds later, either
    sends ``PUSH\\r\\n`` nobody asked for or (``close_after_reply``) closes."""

    def __init__(self, push_after: float = 0.02, close_after_reply: bool = False) -> None:
        super().__init__("127.0.0.1", 0)
        self.push_after = push_after
        self.close_after_reply = close_after_reply
        self.pushed = Event()
        self._clients: set[Any] = set()

    @property
    def active(self) -> int:
        return len(self._clients)

    def _close_connections(self) -> None:
        for sock in list(self._clients):
            sock.close()

    def _handle(self, sock: Any, peer: Any) -> None:
        self._accepted += 1
        self._clients.add(sock)
        try:
            while True:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = sock.recv(1)
                    if not chunk:
                        return
                    line += chunk
                sock.sendall(b"OK\r\n")
                gevent.sleep(self.push_after)
                if self.close_after_reply:
                    sock.shutdown(socket.SHUT_RDWR)
                    self.pushed.set()
                    return
                sock.sendall(b"PUSH\r\n")
                self.pushed.set()
        except OSError:
            pass
        finally:
            self._clients.discard(sock)
            sock.close()


@pytest.fixture
def push_server() -> Iterator[PushServer]:
    with PushServer() as server:
        yield server


@pytest.fixture
def closing_server() -> Iterator[PushServer]:
    with PushServer(close_after_reply=True) as server:
        yield server


@pytest.mark.parametrize("kind", ["bytes", "eof"])
def test_a_connection_stirred_while_idle_is_never_lent(
    make_manager: Callable[..., PoolManager],
    push_server: PushServer,
    closing_server: PushServer,
    kind: str,
    no_fd_leak: None,
) -> None:
    """The server writes a line nobody asked for (or closes) after its reply; the next
    borrower, within ``check_after``, gets a fresh connection and its own reply; the
    stirred one is closed as unhealthy, not charged."""
    server = push_server if kind == "bytes" else closing_server
    # check_after 60 s: the borrow's peek never looks, so this is the idle watcher's
    # work alone (with the default 1 s the next borrower, 0.1 s later, is not checked)
    manager = _one_server_manager(make_manager, server.address, check_after=60)
    with manager.get("svc") as a:
        a.sendall(b"GET a\n")
        assert recv_exact(a, 4) == b"OK\r\n"
    assert server.pushed.wait(BOUND)
    _until(lambda: _server_stats(manager, server.address).idle == 0, 2.0)
    with manager.get("svc") as b:
        b.sendall(b"GET b\n")
        assert recv_exact(b, 4) == b"OK\r\n"
        assert b.uses == 1  # not the stirred connection
    stats = _server_stats(manager, server.address)
    assert stats.closed["unhealthy"] == 1
    assert stats.misses == 2 and stats.hits == 0
    assert stats.breaker_state == "closed"
    assert stats.size == stats.idle + stats.in_use + stats.pending


def test_a_quiet_idle_connection_is_reused_in_lifo_order(
    make_manager: Callable[..., PoolManager], echo_server: EchoServer, no_fd_leak: None
) -> None:
    """The idle watchers change nothing for a connection left alone: still reused, last
    in first out, across many borrows."""
    manager = _one_server_manager(make_manager, echo_server.address, max_size=2)
    a = manager.acquire("svc")
    b = manager.acquire("svc")
    a_sock, b_sock = a.sock, b.sock
    a.release()
    b.release()
    for _ in range(50):
        with manager.get("svc") as conn:
            assert conn.sock is b_sock  # the last released comes first
            conn.sendall(b"ping")
            assert recv_exact(conn, 4) == b"ping"
    gevent.sleep(0.05)  # give the hub turns: a quiet socket never fires its watcher
    stats = _server_stats(manager, echo_server.address)
    assert (stats.idle, stats.closed["unhealthy"]) == (2, 0)
    with manager.get("svc") as x, manager.get("svc") as y:
        assert {id(x.sock), id(y.sock)} == {id(a_sock), id(b_sock)}


def test_idle_watcher_refills_min_idle(echo_server: EchoServer, no_fd_leak: None) -> None:
    """A standalone pool whose idle connection is closed by the server drops it at once
    and its upkeep dials a replacement to keep ``min_idle``."""
    pool = Pool(echo_server.address, pool=PoolConfig(min_idle=1, max_size=2))
    pool.wait_ready(BOUND)
    first = pool._idle[0]
    echo_server.wait_accepted(1, BOUND)  # dialed is not accepted yet: on a starved box
    echo_server._close_connections()  # the server drops every client (FIN)
    assert _until(lambda: pool.stats().closed["unhealthy"] == 1)
    assert _until(lambda: len(pool._idle) == 1 and pool._idle[0] is not first)
    pool.close()


# -- a checked connection is counted ------------------------------------------------


@pytest.mark.parametrize("where", ["borrow", "background"])
def test_a_connection_under_check_counts_as_pending(
    echo_server_factory: Callable[..., EchoServer], where: str, no_fd_leak: None
) -> None:
    """Mid-check (a send/expect against a server that answers in 0.3 s), the checked
    connection is counted: size 1 == idle 0 + in_use 0 + pending 1."""
    server = echo_server_factory(delay=0.3)
    check = HealthCheckConfig(send="PING\r\n", expect="+PONG", interval=0.05)
    pool = Pool(
        server.address,
        pool=PoolConfig(min_idle=0, max_size=1, check_after=0),
        health_check=check,
        upkeep=False,
    )
    pool.acquire(BOUND).release()
    received = server.bytes_received
    if where == "borrow":
        g = gevent.spawn(pool.acquire, BOUND)
    else:
        gevent.sleep(0.06)  # past health_check.interval
        g = gevent.spawn(pool.run_upkeep)
    server.wait_received(received + 6, BOUND)  # the check's PING is in flight
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (1, 0, 0, 1), s
    result = g.get(timeout=BOUND)
    if result is not None:
        result.release()
    # a background check is an errand of its own (upkeep never waits on a server):
    # the pass returns at once, the verdict follows
    assert _until(lambda: pool.stats().pending == 0)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.pending) == (1, 1, 0, 0), s
    pool.close()


# -- stirred while code held the hub ------------------------------------------------

_blocking_sleep = gevent.monkey.get_original("time", "sleep")


@pytest.fixture
def plain_listener() -> Iterator[socket.socket]:
    """A stdlib (blocking) listener the test drives by hand: its side of a connection
    can write while the hub is held, which no server running on the hub can."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(BOUND)
    yield listener
    listener.close()


@pytest.mark.parametrize("kind", ["bytes", "eof", "quiet"])
def test_a_connection_stirred_while_the_hub_is_held_is_never_lent(
    plain_listener: socket.socket, kind: str, no_fd_leak: None
) -> None:
    """The server writes (or closes) while code holds the hub, so the idle watcher has
    had no poll to see it; the borrow right after peeks instead, and lends a fresh
    connection. A quiet connection is still reused (the peek finds nothing)."""
    host, port = plain_listener.getsockname()
    pool = Pool(
        f"{host}:{port}",
        pool=PoolConfig(min_idle=0, max_size=2, check_after=60),  # no borrow check
        upkeep=False,
    )
    first = pool.acquire(BOUND)
    server_side, _ = plain_listener.accept()
    try:
        first.release()
        gevent.sleep(0.01)  # the hub polls once: the watcher is armed and quiet
        if kind == "bytes":
            server_side.sendall(b"PUSH\r\n")
        elif kind == "eof":
            server_side.shutdown(socket.SHUT_WR)
        _blocking_sleep(0.05)  # CPU-bound code: no hub turn between the write and the borrow
        second = pool.acquire(BOUND)
        if kind == "quiet":
            assert second.uses == 2  # the same connection, lent again
        else:
            assert second.uses == 1  # a fresh connection, not the stirred one
            plain_listener.accept()[0].close()
        second.release()
        s = pool.stats()
        assert s.closed["unhealthy"] == (0 if kind == "quiet" else 1)
        assert s.breaker_state == "closed"
        assert s.size == s.idle + s.in_use + s.pending
    finally:
        pool.close()
        server_side.close()


def test_hub_lag_follows_the_loops_last_poll() -> None:
    """``hub_lag`` reads the loop's own clock: small right after a hub turn, at least a
    stretch of code that held the hub after it; ``inf`` for a loop it cannot read."""
    from lbpool._hublag import hub_lag

    lag = hub_lag(gevent.get_hub().loop)
    gevent.sleep(0.001)
    _blocking_sleep(0.05)
    held = lag()
    assert held >= 0.05
    gevent.sleep(0.001)
    assert lag() < held  # the hub polled since

    class Unreadable:
        def update_now(self) -> None:
            raise RuntimeError("no clock")

    assert hub_lag(Unreadable())() == float("inf")


@pytest.mark.parametrize("order", ["idle_first", "waker_first"])
def test_a_borrower_woken_by_the_same_poll_is_not_lent_the_stirred_connection(
    plain_listener: socket.socket, order: str, no_fd_leak: None
) -> None:
    """Code holds the hub while an idle connection gets EOF and another socket gets the
    byte a greenlet waits for: the next poll sees both, and the woken greenlet may run
    before the idle watcher does (libev runs a poll's watchers last in, first out).
    It must not be lent the connection that poll found stirred."""
    host, port = plain_listener.getsockname()
    pool = Pool(f"{host}:{port}", pool=PoolConfig(min_idle=0, max_size=2), upkeep=False)
    wake_local, wake_peer = socket.socketpair()
    server_side: socket.socket | None = None
    got: dict[str, Any] = {}

    def borrower() -> None:
        gevent.socket.wait_read(wake_local.fileno(), timeout=BOUND)
        conn = pool.acquire(BOUND)
        got["uses"] = conn.uses
        conn.release()

    try:
        pool.acquire(BOUND).release()
        server_side, _ = plain_listener.accept()
        gevent.sleep(0.01)  # the connection rests, watched
        g = gevent.spawn(borrower)
        gevent.sleep(0.005)  # parked on its socket
        if order == "idle_first":
            server_side.close()
            wake_peer.send(b"y")
        else:
            wake_peer.send(b"y")
            server_side.close()
        _blocking_sleep(0.02)  # the hub is held: both arrive before its next poll
        g.get(timeout=BOUND)
        assert got["uses"] == 1  # a fresh connection
        plain_listener.accept()[0].close()
    finally:
        pool.close()
        wake_local.close()
        wake_peer.close()
        if server_side is not None:
            server_side.close()
