"""Plain client sockets for tests (gevent, numeric hosts) and an IPv6 probe."""

from __future__ import annotations

import contextlib
import random
import select
import socket
from collections.abc import Iterator
from typing import Any

from gevent import socket as gsocket

from lbpool.config import Address
from lbpool.testing import EchoServer


def connect(address: str, timeout: float = 2.0) -> Any:
    """A plain gevent client socket to ``host:port`` / ``[v6]:port`` (numeric hosts)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
    sock = gsocket.socket(family, gsocket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (``bind`` to port 0, an outgoing
    ``connect``): ``net.ipv4.ip_local_port_range``, Linux's default when unreadable."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports nothing is bound to now, for a server started on
    them later (the demo's echo servers, redis-server, memcached) or for dials to be
    refused. Chosen at random below the kernel's ephemeral range: a port that was free
    a moment ago and lies in that range can be handed to any socket meanwhile (this
    suite's other worker binds port 0 and connects all the time), one below it only to
    an explicit bind of that number."""
    low = _ephemeral_low()
    first = max(1024, low - 16384)
    if low - first < 4 * n:  # an unusual range: the kernel's choice, as before
        return _kernel_ports(n)
    ports: list[int] = []
    rng = random.Random()
    for port in rng.sample(range(first, low), min(low - first, 200 + 4 * n)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or reserved: try another
        ports.append(port)
        if len(ports) == n:
            return ports
    raise AssertionError(f"no {n} free loopback ports in {first}-{low - 1}")


def _kernel_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One port of ``free_ports``."""
    return free_ports(1)[0]


def dead_address() -> str:
    """``127.0.0.1:port`` where nothing listens: dials are refused."""
    return f"127.0.0.1:{free_port()}"


def ipv6_available() -> bool:
    if not gsocket.has_ipv6:
        return False
    try:
        with gsocket.socket(gsocket.AF_INET6, gsocket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def black_hole_listener() -> Iterator[Address | None]:
    """A loopback address where connects hang: a backlog-0 listener whose accept queue
    is full, so Linux drops every further SYN (deterministic, no routing tricks).
    Yields None when this kernel's queue could not be filled."""
    listener = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    address = Address("127.0.0.1", listener.getsockname()[1])
    try:
        for _ in range(16):
            filler = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.1)
            try:
                filler.connect(address)
            except OSError:  # timed out: the queue is full, SYNs are dropped now
                filler.close()
                break
            fillers.append(filler)
        else:
            yield None
            return
        yield address
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class PeakEchoServer(EchoServer):
    """An ``EchoServer`` that records the most client connections open at once.

    Counted at each accept, from the server's side, and only connections whose client
    has not closed them: a client's close puts its FIN in our socket's queue before
    its next connect() returns (loopback), so a peek that reads EOF tells a connection
    the client closed from one our handler has not yet seen end. Without that, a slot
    freed and redialed at once would look like one connection too many.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak = 0

    def _handle(self, sock: Any, peer: Any) -> None:
        live = 1 + sum(1 for client in list(self._clients) if not _client_closed(client))
        self.peak = max(self.peak, live)
        super()._handle(sock, peer)


def _client_closed(sock: Any) -> bool:
    """Has the peer of server-side ``sock`` closed it (EOF or reset queued)? Never blocks
    (the stdlib ``select`` with timeout 0, not gevent's: nothing here may yield)."""
    try:
        if not select.select([sock.fileno()], [], [], 0)[0]:
            return False  # nothing queued: open
        return bool(sock.recv(1, socket.MSG_PEEK) == b"")
    except (OSError, ValueError):
        return True  # reset, or closed on our side


@contextlib.contextmanager
def listening_addresses(count: int) -> Iterator[list[str]]:
    """``count`` listening loopback sockets as ``host:port`` (a fleet nobody needs to
    talk to: with ``min_idle`` 0 nothing dials them); closed on exit."""
    socks = []
    try:
        for _ in range(count):
            s = gsocket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            socks.append(s)
        yield [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()
