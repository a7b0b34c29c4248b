"""Plain client sockets for tests (gevent, numeric hosts) and an IPv6 probe."""

from __future__ import annotations

import contextlib
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
