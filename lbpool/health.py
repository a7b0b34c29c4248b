"""Is an idle connection still good? A free non-blocking peek, then the configured check.

``peek_alive`` runs on every borrow of a connection idle for ``check_after``, so it
never waits: it looks at what the kernel (or the TLS layer) already holds. A peer that
closed, a socket in error, or bytes nobody asked for (a stream out of step) all mean
the connection must not be handed out. ``check_health`` is the costlier, configured
round trip (send/expect and/or a hook), bounded by ``HealthCheckConfig.timeout``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, cast

import gevent
from gevent import ssl as gssl

from lbpool._net import fmt_seconds, is_closed

if TYPE_CHECKING:
    from lbpool.config import HealthCheckConfig

__all__ = ["Unhealthy", "check_health", "peek_alive"]

_SSL_SOCKETS = (ssl.SSLSocket, gssl.SSLSocket)
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_MAX_LINE = 64 * 1024  # longest reply line read while finishing a line after `expect`


class Unhealthy(Exception):
    """A connection failed its health check; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def is_tls(sock: object) -> bool:
    """Is ``sock`` a TLS socket (stdlib or gevent ``SSLSocket``)? Never yields."""
    return isinstance(sock, _SSL_SOCKETS)


def tls_unread(sock: socket.socket) -> bool:
    """Does the TLS socket ``sock`` hold decrypted bytes nobody read (``pending()``)?
    They sit in the SSL object's buffer, not the kernel's, so the fd never turns
    readable and an idle watcher never sees them. A socket that cannot tell (closed)
    counts as holding some. Never yields; one call into the SSL object."""
    try:
        return cast("ssl.SSLSocket", sock).pending() > 0
    except (OSError, ValueError, AttributeError):
        return True


def peek_alive(sock: socket.socket) -> bool:
    """True when nothing is waiting on an open socket (the idle state we expect).

    Never blocks the hub. Plain sockets are peeked (``MSG_PEEK|MSG_DONTWAIT``) on the
    stdlib socket inside a gevent socket, so "no data yet" comes back at once as
    ``EAGAIN`` (this is on the borrow path, so it is kept to one system call). TLS
    sockets first check ``pending()`` (decrypted bytes already buffered), then try a
    1-byte read with the timeout set to 0 (and restored): protocol records such as
    TLS 1.3 session tickets are absorbed and still count as alive, whereas application
    bytes (consumed here, but the connection is discarded anyway), ``close_notify``
    or EOF count as dead.
    """
    if not isinstance(sock, _SSL_SOCKETS):
        raw = getattr(sock, "_sock", sock)  # gevent's socket wraps a stdlib one
        try:
            raw.recv(1, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return True
        except (OSError, ValueError, AttributeError):
            return False  # reset, closed fd
        return False  # b"" is EOF; any byte is a reply nobody waits for
    try:
        previous = sock.gettimeout()
    except (OSError, ValueError):
        return False
    try:
        sock.settimeout(0.0)
        if sock.pending() > 0:  # an SSL socket here: decrypted bytes already buffered
            return False
        sock.recv(1)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True
    except (OSError, ValueError):
        return False  # reset, closed fd, TLS alert, "read on closed SSL socket"
    finally:
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(previous)
    return False  # b"" is EOF; any byte is a reply nobody waits for


def peek_unread(sock: socket.socket, limit: int = 64) -> bytes:
    """Up to ``limit`` bytes waiting to be read on a plain socket, peeked (left
    unread); ``b""`` at EOF, on an error, and for a TLS socket (it cannot be peeked).
    One non-blocking call; never yields."""
    if isinstance(sock, _SSL_SOCKETS):
        return b""
    raw = getattr(sock, "_sock", sock)
    try:
        return bytes(raw.recv(limit, _PEEK_FLAGS))
    except (OSError, ValueError, AttributeError):
        return b""


def _recv_exact_prefix(sock: socket.socket, want: bytes) -> None:
    """Read exactly ``len(want)`` bytes, failing as soon as they diverge from *want*."""
    buf = b""
    while len(buf) < len(want):
        chunk = sock.recv(len(want) - len(buf))
        if not chunk:
            raise Unhealthy(f"connection closed by peer during health check (got {buf!r})")
        buf += chunk
        if not want.startswith(buf):
            raise Unhealthy(f"unexpected reply {buf + _available(sock)!r} (expected {want!r})")


def _available(sock: socket.socket, limit: int = 64) -> bytes:
    """Whatever more is already there, without waiting: context for an error message
    (the connection is being given up, so consuming it is harmless)."""
    try:
        sock.settimeout(0.0)
        return sock.recv(limit)
    except (OSError, ValueError):
        return b""


def _finish_line(sock: socket.socket) -> None:
    """Consume the rest of the reply line, so the stream is clean for the next user."""
    tail = b""
    while b"\n" not in tail:
        chunk = sock.recv(256)
        if not chunk:
            raise Unhealthy("connection closed by peer during health check")
        tail += chunk
        if len(tail) > _MAX_LINE:
            raise Unhealthy("health check reply line too long")
    if tail.index(b"\n") != len(tail) - 1:
        raise Unhealthy("unexpected bytes after the health check reply")


def _send_expect(sock: socket.socket, send: str, expect: str | None, limit: float) -> None:
    try:
        sock.sendall(send.encode("utf-8"))
        if expect is None:
            return
        want = expect.encode("utf-8")
        _recv_exact_prefix(sock, want)
        if send.endswith("\n") and not want.endswith(b"\n"):
            _finish_line(sock)
    except TimeoutError as exc:
        raise Unhealthy(f"health check timed out after {fmt_seconds(limit)}") from exc
    except (OSError, ValueError) as exc:
        raise Unhealthy(f"health check failed: {exc}") from exc


def check_health(sock: socket.socket, config: HealthCheckConfig) -> None:
    """Run the configured send/expect and then the hook; raise ``Unhealthy`` on failure.

    ``send`` is written (UTF-8); with ``expect``, the reply must start with it
    (``"+PONG"`` matches ``b"+PONG\\r\\n"``). Exactly the reply is consumed: the
    ``expect`` bytes, plus, for a line protocol (``send`` ending in a newline and
    ``expect`` not), the rest of that line; bytes beyond it make the connection
    unhealthy. The hook is called with the socket; any exception from it means
    unhealthy. The whole check is bounded by ``config.timeout`` (a hook that swallows
    the timer and returns late fails it), and the socket's previous timeout is
    restored. A no-op when neither ``send`` nor ``hook`` is set.
    """
    send, expect, hook = config.send, config.expect, config.hook
    if send is None and hook is None:
        return
    limit = config.timeout
    previous = sock.gettimeout()
    timer = gevent.Timeout(limit)
    timer.start()
    try:
        sock.settimeout(limit)
        if send is not None:
            _send_expect(sock, send, expect, limit)
        if hook is not None:
            try:
                hook(sock)
            except Unhealthy:
                raise
            except Exception as exc:
                raise Unhealthy(f"health hook failed: {type(exc).__name__}: {exc}") from exc
            if not timer.pending:  # the timer fired and the hook swallowed it: too late
                raise Unhealthy(f"health check timed out after {fmt_seconds(limit)}")
            if is_closed(sock):  # closed or wrapped (detached) by the hook
                raise Unhealthy("health hook left the socket closed")
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise Unhealthy(f"health check timed out after {fmt_seconds(limit)}") from None
    finally:
        timer.close()
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(previous)
