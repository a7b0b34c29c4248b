"""PooledConnection: the handle a caller holds for one borrow of a pooled socket.

A new handle is made for every borrow and is cut from its socket on ``release()`` or
``discard()``: a stale reference can then never write into a socket that now belongs
to another caller; every use raises ``ConnectionReleased`` instead.
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from gevent import Timeout as _GeventTimeout

from lbpool._net import close_quietly
from lbpool.errors import ConnectionReleased, LbpoolError

if TYPE_CHECKING:
    from typing_extensions import Self


class _Owner(Protocol):
    name: str
    backend: str | None

    def _return(self, conn: _Conn) -> None: ...
    def _discard(self, conn: _Conn, exc: BaseException | None) -> None: ...


class _Conn:
    """One open socket owned by a pool, across all its borrows."""

    __slots__ = ("checked_at", "created_at", "era", "expires_at", "last_used_at", "sock", "uses")

    def __init__(self, sock: socket.socket, now: float, expires_at: float, era: int = 0) -> None:
        self.sock = sock
        # the breaker's ``closes`` when it was dialed: an error on a connection from
        # before the breaker last closed is evidence about the old outage, not counted
        self.era = era
        self.created_at = now
        self.last_used_at = now
        self.checked_at = now
        self.expires_at = expires_at
        self.uses = 0

    def close(self) -> None:
        close_quietly(self.sock)


def _is_network_error(exc: BaseException | None) -> bool:
    """Errors that say something about the server (count against its breaker).

    lbpool's own errors never do, although some are ``OSError``s for the callers'
    sake (``PoolTimeout`` a ``TimeoutError``, ``BackendUnavailable`` a
    ``ConnectionError``): raised inside a ``with`` block they speak of another pool
    (a nested acquisition), not of the server of the connection being discarded."""
    return isinstance(exc, (OSError, _GeventTimeout)) and not isinstance(exc, LbpoolError)


class PooledConnection:
    """One borrow of a pooled connection; also a context manager that gives it back.

    A clean exit of ``with`` releases it; an exception discards it (its stream state
    is unknown) and, for a network error, counts against the server's breaker.
    """

    __slots__ = ("__weakref__", "_conn", "_owner", "acquired_at", "rank", "stack")

    stack: str | None  # where it was acquired; set only when leak detection is on

    def __init__(self, owner: _Owner, conn: _Conn, now: float) -> None:
        self._owner = owner
        self._conn: _Conn | None = conn
        self.acquired_at = now
        # key-affinity backends: 0 when the key's owner served, 1+ when a fallback did
        # (its place in the key's order); 0 for every other strategy and ad-hoc pools
        self.rank = 0

    @property
    def address(self) -> str:
        """The server, as ``host:port``."""
        return self._owner.name

    @property
    def backend(self) -> str | None:
        """The backend it was acquired through; None for an ad-hoc ``host:port``."""
        return self._owner.backend

    def _live(self) -> _Conn:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn

    def _refuse(self) -> NoReturn:
        raise ConnectionReleased(f"{self.address}: connection used after release")

    # -- identity and bookkeeping -------------------------------------------------
    @property
    def sock(self) -> socket.socket:
        return self._live().sock

    @property
    def created_at(self) -> float:
        return self._live().created_at

    @property
    def last_used_at(self) -> float:
        return self._live().last_used_at

    @property
    def uses(self) -> int:
        return self._live().uses

    @property
    def released(self) -> bool:
        return self._conn is None

    # -- socket proxies -----------------------------------------------------------
    # (the I/O proxies read ``_conn`` inline rather than through ``_live()``: one frame
    # less on every send and receive)
    def sendall(self, data: bytes, flags: int = 0) -> None:
        conn = self._conn
        if conn is None:
            self._refuse()
        conn.sock.sendall(data, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.send(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.recv_into(buffer, nbytes, flags)

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        sock: Any = self._live().sock
        return sock.makefile(mode, *args, **kwargs)

    def settimeout(self, value: float | None) -> None:
        self._live().sock.settimeout(value)

    # -- giving it back -----------------------------------------------------------
    def release(self) -> None:
        """Return the connection to its pool; a second call is a no-op."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            try:
                self._owner._return(conn)
            except LbpoolError:  # refused (another OS thread): nothing changed, keep it
                self._conn = conn
                raise

    def discard(self, exc: BaseException | None = None) -> None:
        """Close the connection instead of returning it; ``exc`` says why.

        A network error (``OSError``, timeouts, SSL errors) counts as a failure of
        the server for its breaker; other exceptions do not. A second call is a no-op.
        """
        conn = self._conn
        if conn is not None:
            self._conn = None
            try:
                self._owner._discard(conn, exc)
            except LbpoolError:  # refused (another OS thread): nothing changed, keep it
                self._conn = conn
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            if exc_type is None:
                self.release()
            else:
                self.discard(exc if exc is not None else exc_type())

    def __repr__(self) -> str:
        state = "released" if self._conn is None else f"uses={self._conn.uses}"
        return f"<PooledConnection {self.address} backend={self.backend!r} {state}>"
