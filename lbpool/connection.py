"""PooledConnection: the handle a caller holds for one borrow of a pooled socket.

A new handle is made for every borrow and is cut from its socket on ``release()`` or
``discard()``: a stale reference can then never write into a socket that now belongs
to another caller; every use raises ``ConnectionReleased`` instead. File objects made
by the handle's ``makefile()`` read and write through the handle, so they stop with it
(they report themselves closed: ``ValueError`` like any closed file).

A borrow starts clean (DESIGN 16): a borrower who changed the socket's timeout (the
handle's ``settimeout``) or had the raw socket in hand (``.sock``) marks the connection
``dirty``, and the pool restores what it set before the next borrow. A clean borrow
pays nothing for it.
"""

from __future__ import annotations

import contextlib
import io
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, SupportsFloat, SupportsIndex, cast

from gevent import Timeout as _GeventTimeout

from lbpool._args import Text, valid_int
from lbpool._args import got as _got
from lbpool._borrowio import _BorrowIO
from lbpool._net import close_quietly
from lbpool.errors import ConnectionReleased, LbpoolError
from lbpool.health import is_tls

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer
    from typing_extensions import Self

    # the owner's type, for the checker and for the compiled build: both modules are
    # compiled together, so ``release()`` calls ``Pool._return`` directly (C to C)
    from lbpool.pool import Pool


# ``_Conn.dirty`` bits: what a borrower may have changed on the socket
TIMEOUT_CHANGED = 1  # the handle's settimeout()
SOCK_EXPOSED = 2  # the raw socket was handed out (``.sock``): anything may have changed


class _Conn:
    """One open socket owned by a pool, across all its borrows.

    ``watcher``: the pool's read watcher on the socket (a gevent ``io`` watcher, made
    on the first rest), active exactly while the connection sits idle, so bytes or
    EOF arriving then are seen at once. ``dirty``: what the current borrower changed
    (``TIMEOUT_CHANGED``, ``SOCK_EXPOSED``), for the pool to restore on return.
    ``gen``: the pool's settings generation it was dialed (or its lifetime last
    worked out) under (``Pool._outdated``).
    """

    __slots__ = (
        "checked_at",
        "created_at",
        "dirty",
        "era",
        "expires_at",
        "gen",
        "last_used_at",
        "sock",
        "tls",
        "uses",
        "watcher",
    )

    def __init__(
        self, sock: socket.socket, now: float, expires_at: float, era: int = 0, gen: int = 0
    ) -> None:
        self.sock = sock
        self.tls = is_tls(sock)  # a TLS socket: its unread bytes are looked for on return
        # the breaker's ``closes`` when it was dialed: an error on a connection from
        # before the breaker last closed is evidence about the old outage, not counted
        self.era = era
        self.created_at = now
        self.last_used_at = now
        self.checked_at = now
        self.expires_at = expires_at
        self.gen = gen
        self.uses = 0
        self.dirty = 0
        self.watcher: Any = None

    def close(self) -> None:
        """Stop the watcher and close the socket for good: a file object made on the
        raw socket (``conn.sock.makefile()``) would otherwise keep the descriptor open
        (the socket's io references) and go on working; it gets ``OSError`` instead."""
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            watcher.stop()
            watcher.close()
        sock: Any = self.sock
        close_quietly(sock)
        real_close = getattr(sock, "_real_close", None)
        if real_close is not None and getattr(sock, "_io_refs", 0) > 0:
            with contextlib.suppress(Exception):
                real_close()


# a copy would be a second handle its release() does not cut (DESIGN 16)
_NOT_COPIED = "a PooledConnection is one borrow: it cannot be copied or pickled"


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

    # no "__weakref__": the compiled (mypyc) class cannot have one, and both paths
    # behave the same
    __slots__ = ("_conn", "_owner", "acquired_at", "rank", "stack")

    stack: str | None  # where it was acquired; set only when leak detection is on

    def __init__(self, owner: Pool, conn: _Conn, now: float) -> None:
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
        raise ConnectionReleased(f"{self.address}: connection used after release or discard")

    # -- identity and bookkeeping -------------------------------------------------
    @property
    def sock(self) -> socket.socket:
        """The raw socket (gevent's, or its SSL socket). What a borrower changes on it
        (timeout, blocking mode, ``TCP_NODELAY``) is restored when the borrow ends;
        other socket options it sets stay. Never close it: ``discard()`` does."""
        conn = self._live()
        conn.dirty |= SOCK_EXPOSED
        return conn.sock

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
    # less on every send and receive; their numbers are typed with protocols, which
    # the compiled build does not check: the socket checks them, with its own message,
    # the same in both builds, see lbpool._args)
    def sendall(self, data: ReadableBuffer, flags: SupportsIndex = 0) -> None:
        conn = self._conn
        if conn is None:
            self._refuse()
        conn.sock.sendall(data, cast(Any, flags))

    def send(self, data: ReadableBuffer, flags: SupportsIndex = 0) -> int:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.send(data, cast(Any, flags))

    def recv(self, bufsize: SupportsIndex, flags: SupportsIndex = 0) -> bytes:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.recv(cast(Any, bufsize), cast(Any, flags))

    def recv_into(self, buffer: Any, nbytes: SupportsIndex = 0, flags: SupportsIndex = 0) -> int:
        conn = self._conn
        if conn is None:
            self._refuse()
        return conn.sock.recv_into(buffer, cast(Any, nbytes), cast(Any, flags))

    def makefile(
        self,
        mode: Text = "r",
        buffering: SupportsIndex | None = None,
        *,
        encoding: Text | None = None,
        errors: Text | None = None,
        newline: Text | None = None,
    ) -> Any:
        """A file object on this borrow, as ``socket.makefile`` (modes ``r``, ``w``,
        ``b`` combined), whose reads and writes go through the handle: once the borrow
        ends it is closed (``ValueError``, as any closed file) and can never touch
        the socket again, whoever borrows it next. Flush before releasing: bytes
        still buffered then are dropped.

        ``mode`` a str, ``buffering`` an integer or None, ``encoding``, ``errors`` and
        ``newline`` a str or None (for a text file), else ``TypeError`` naming the
        argument; an unknown mode letter is a ``ValueError``."""
        self._live()
        if not isinstance(mode, str):
            raise TypeError(f"makefile: mode must be a str such as 'rb', got {_got(mode)}")
        for name, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"makefile: {name} must be a str or None, got {_got(value)}")
        size = -1
        if buffering is not None:
            size = valid_int(buffering, "buffering must be an int or None", "makefile")
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        reading, writing, binary = "r" in mode, "w" in mode, "b" in mode
        if not reading and not writing:
            reading = True
        raw = _BorrowIO(self, ("r" if reading else "") + ("w" if writing else ""))
        if size < 0:
            size = io.DEFAULT_BUFFER_SIZE
        if size == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, size)
        elif reading:
            buffer = io.BufferedReader(raw, size)
        else:
            buffer = io.BufferedWriter(raw, size)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, cast(Any, encoding), cast(Any, errors), cast(Any, newline))
        text.mode = mode  # type: ignore[misc]
        return text

    def settimeout(self, value: SupportsFloat | None) -> None:
        """Set the socket's timeout for this borrow (seconds, 0 non-blocking, None
        blocking); the next borrow starts with the pool's (None) again."""
        conn = self._live()
        conn.sock.settimeout(cast(Any, value))
        conn.dirty |= TIMEOUT_CHANGED

    def _timed_sock(self, value: float | None) -> socket.socket:
        """``settimeout(value)``, then the raw socket *without* marking it exposed: for
        lbpool's own adapters (``lbpool.contrib.redis``) whose code on the socket
        changes nothing but its timeout, so the return restores the timeout and skips
        re-setting ``TCP_NODELAY`` (a ``setsockopt`` system call per borrow)."""
        conn = self._live()
        conn.sock.settimeout(value)
        # marked even for None: the adapter may change the timeout on the socket later
        # (redis-py's maintenance handler relaxes it directly), and the return restores it
        conn.dirty |= TIMEOUT_CHANGED
        return conn.sock

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
        ``exc`` that is not an exception is a ``TypeError``, with nothing changed.
        """
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"discard: exc must be an exception or None, got {_got(exc)}")
        conn = self._conn
        if conn is not None:
            self._conn = None
            try:
                self._owner._discard(conn, exc)
            except LbpoolError:  # refused (another OS thread): nothing changed, keep it
                self._conn = conn
                raise

    def __copy__(self) -> NoReturn:
        raise TypeError(_NOT_COPIED)

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError(_NOT_COPIED)

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(_NOT_COPIED)

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
