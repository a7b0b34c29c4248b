"""redis-py over lbpool: every connection a ``redis.Redis`` uses is borrowed from a backend.

Usage (redis-py 5.x through 8.x)::

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from lbpool.contrib.redis import ConnectionPool, handshake

    manager = lbpool.PoolManager({"backends": {"replicas": {
        "strategy": "least_active",
        "servers": ["10.0.0.2:6379", "10.0.0.3:6379"],
        "setup": handshake(password="s3cret", db=1),      # or "myapp.hooks:replicas"
        "health_check": {"send": "PING\\r\\n", "expect": "+PONG"},
    }}})
    pool = ConnectionPool(manager, "replicas", password="s3cret", db=1,
                          retry=Retry(NoBackoff(), 1))
    r = redis.Redis(connection_pool=pool)

How redis-py's pool protocol maps onto lbpool
---------------------------------------------
A redis-py ``Connection`` here is a light wrapper that holds an lbpool lease
(a ``PooledConnection``) only between ``get_connection`` and ``release``:

- ``get_connection(...)`` (any signature redis-py has used: ``(command_name, *keys,
  **options)`` up to 5.2, no arguments since 5.3) takes a free wrapper and calls its
  ``connect()``, which acquires from the backend (``manager.acquire(backend, timeout=
  socket_connect_timeout or the backend's acquire_timeout)``); balancing, breakers and
  failover choose the server. As redis-py's own pool checks ``can_read()`` after
  connecting, a lease whose socket is already readable (the server closed it while it
  sat idle, or bytes are waiting) is discarded -- the breaker hears only of a socket
  error, not of an EOF -- and another taken (a bounded number of times).
- ``release(conn)`` gives the lease back to lbpool (``release()``), unless the wrapper's
  parser holds unread bytes or it was marked for reconnect: then it is discarded. Like
  redis-py's own pools, the release makes no system call; bytes or an EOF still in the
  kernel are found by the next borrow's check (above) or lbpool's idle watcher.
- ``conn.disconnect()`` -- what redis-py does on a network error, a timeout, an
  interrupted read, or to drop a pubsub/monitor connection -- discards the lease
  (``discard(exc)``, with the network error when there was one: the ``error`` redis-py
  passes, or what the connection's own read/write raised; so the server's breaker hears
  of it) and never closes the socket itself: lbpool owns it. From another greenlet,
  while the owner is reading or writing, it only shuts the socket down: the owner's
  command fails with ``redis.ConnectionError`` (or is retried) and its greenlet drops
  the lease.
- redis-py's retry (``retry=Retry(...)`` in the pool's kwargs) calls ``disconnect()``
  then reconnects the same wrapper: the reconnect is a new acquisition, so a retried
  command goes to whichever server lbpool picks now (failover within a backend).
- lbpool's failures become redis-py's: ``PoolTimeout`` -> ``redis.TimeoutError``;
  ``BackendUnavailable``, ``DialError``, ``PoolExhausted``, ``PoolClosed`` ->
  ``redis.ConnectionError`` (each ``from`` the lbpool error), so ``retry`` and callers'
  ``except redis.ConnectionError`` handle them.

The handshake
-------------
AUTH (username/password or ``credential_provider``), HELLO for ``protocol=3``, CLIENT
SETNAME, CLIENT SETINFO and SELECT run once per new socket in lbpool's ``setup`` hook,
not per borrow: ``handshake(**connection_kwargs)`` builds that hook from the same kwargs
the pool is given, and runs redis-py's own handshake code on the socket. Idle
connections are therefore authenticated and pass a ``PING``/``+PONG`` health check. The
pool refuses (``ValueError``) a backend whose ``setup`` is a ``handshake`` with other
settings, or a backend with no ``setup`` when its kwargs need one (auth, db,
protocol 3, client name). Settings compare with ``==``: a ``credential_provider`` is
equal only to itself (unless its class defines ``__eq__``), so give the hook and the
pool the same provider object. redis-py 8 speaks RESP3 unless told otherwise: a backend
without a ``setup`` hook -- a bare ``host:port`` always is one -- needs ``protocol=2``
in the pool's kwargs (and no auth, db or client name).

Not covered
-----------
- Client-side caching (``cache``/``cache_config``): refused with ``ValueError``.
- Sentinel and Cluster: they manage their own pools and topology.
- Unix sockets, ``host``/``port``/``connection_class``: the servers are the backend's.
- Dial options (TLS, keepalive, nodelay, connect timeout) come from lbpool's ``dial``
  config; redis-py's ``socket_keepalive*``/``ssl*`` kwargs are not used.

Behaviour to know
-----------------
- A pubsub (``r.pubsub()``) and ``r.monitor()`` hold one connection for the
  subscription's life; ``single_connection_client=True`` holds one for the client's.
- redis-py's retry backoff sleeps with ``time.sleep``: cooperative only when the
  process is monkey patched (gunicorn's gevent worker is); ``NoBackoff()`` never sleeps.
- ``disconnect()``/``close()`` on this pool drop only the connections redis-py has
  borrowed; lbpool's idle connections belong to the manager (``manager.close()``).
- Greenlet-safe within the manager's thread, like the manager itself.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import redis.connection
from gevent import Timeout as _GeventTimeout
from gevent import getcurrent
from gevent import ssl as _gssl
from gevent.monkey import get_original
from redis._parsers import Encoder, _RESP2Parser, _RESP3Parser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from lbpool._ownership import fork_generation
from lbpool.errors import (
    BackendUnavailable,
    DialError,
    LbpoolError,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
)
from lbpool.health import peek_alive
from lbpool.manager import PoolManager

__all__ = ["Connection", "ConnectionPool", "Handshake", "handshake"]

# The Connection kwargs redis-py's handshake (on_connect) reads; the rest (timeouts,
# retry, encoding, parser) matter only to the borrowing side.
_HANDSHAKE_KEYS = (
    "db",
    "username",
    "password",
    "credential_provider",
    "protocol",
    "client_name",
    "lib_name",
    "lib_version",
    "driver_info",
)
_SECRET_KEYS = ("password", "credential_provider")
# Kwargs whose job lbpool does, or that this pool does not cover: refused, with why.
_REFUSED = {
    "host": "the servers are the lbpool backend's",
    "port": "the servers are the lbpool backend's",
    "path": "unix sockets are not covered",
    "unix_socket_path": "unix sockets are not covered",
    "connection_class": "the connections are lbpool.contrib.redis.Connection",
    "cache": "client-side caching is not covered",
    "cache_config": "client-side caching is not covered",
}


def _maint_disabled() -> dict[str, Any]:
    """``maint_notifications_config=<disabled>`` on redis-py versions that have it (6.4+):
    maintenance notifications would move connections between servers behind lbpool."""
    try:
        module = importlib.import_module("redis.maint_notifications")
    except ImportError:
        return {}
    config_class = getattr(module, "MaintNotificationsConfig", None)
    return {} if config_class is None else {"maint_notifications_config": config_class(False)}


def _is_resp3(protocol: object) -> bool:
    return str(protocol) == "3"


def _shown(settings: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}=<redacted>" if k in _SECRET_KEYS else f"{k}={v!r}" for k, v in settings.items()
    )


def _session(settings: Mapping[str, Any], protocol: int) -> dict[str, Any]:
    """The settings that make a different server session: auth, database, name, and the
    RESP version when it is 3 (redis-py 8 speaks RESP3 by default: HELLO 3 is needed
    even when ``protocol`` is not given)."""
    out = {
        k: v
        for k, v in settings.items()
        if k in ("db", "username", "password", "credential_provider", "client_name")
        and v not in (None, "", 0)
    }
    if _is_resp3(protocol):
        out["protocol"] = 3
    return out


class Handshake:
    """An lbpool ``setup`` hook: redis-py's connection handshake on each new socket.

    Built by ``handshake(**connection_kwargs)``. Called by lbpool with the new socket
    (its timeout already set to what is left of the dial's deadline); runs AUTH / HELLO /
    CLIENT SETNAME / CLIENT SETINFO / SELECT exactly as redis-py's ``on_connect`` does
    for these settings, then leaves the socket to lbpool. Raises what redis-py raises
    (``redis.AuthenticationError``, ``redis.ConnectionError``, ``OSError`` ...): lbpool
    then fails that dial (``DialError``) and charges the server's breaker.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings: dict[str, Any] = dict(settings)
        # Hook(...) names a callable by __module__/__qualname__: make that readable.
        self.__qualname__ = self.__name__ = f"handshake({_shown(self.settings)})"
        probe = self._connection()  # bad settings fail here, not at the first dial
        # What the handshake establishes, with redis-py's defaults resolved (protocol).
        self.session = _session(self.settings, probe.protocol)
        probe.disconnect()

    def _connection(self) -> redis.connection.Connection:
        return redis.connection.Connection(
            host="lbpool-setup", port=0, **_maint_disabled(), **self.settings
        )

    def __call__(self, sock: Any) -> None:
        conn = self._connection()  # fresh each time: it holds per-socket parser state
        conn._sock = sock
        try:
            conn.on_connect()
        finally:
            # Detach without closing: lbpool owns the socket (and closes it on failure).
            conn._sock = None
            conn._parser.on_disconnect()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Handshake):
            return NotImplemented
        return self.settings == other.settings

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.settings)))

    def __repr__(self) -> str:
        return f"<lbpool.contrib.redis.{self.__qualname__}>"


def handshake(**connection_kwargs: Any) -> Handshake:
    """The ``setup`` hook for a backend used through ``ConnectionPool(**connection_kwargs)``.

    Give it the same kwargs as the pool (extra ones -- timeouts, retry, decoding -- are
    ignored; a ``credential_provider`` must be the very same object as the pool's:
    providers compare by identity). In a dict config pass the hook itself
    (``"setup": handshake(db=1)``); from YAML name a module-level one
    (``setup: "myapp.redis_hooks:sessions"`` where
    ``sessions = handshake(password=..., db=1)``). Raises ``ValueError``/``redis.
    RedisError`` for settings redis-py itself refuses (e.g. ``protocol=4``).
    """
    return Handshake({k: v for k, v in connection_kwargs.items() if k in _HANDSHAKE_KEYS})


def _network_error(exc: BaseException | None) -> BaseException | None:
    """What ``discard`` should hear for ``exc``: the ``OSError`` behind a redis
    connection/timeout error (so lbpool counts it against the server), else ``exc``."""
    if exc is None or isinstance(exc, (OSError, _GeventTimeout)):
        return exc
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        seen: set[int] = set()
        cause: BaseException | None = exc
        while cause is not None and id(cause) not in seen and len(seen) < 16:
            if isinstance(cause, OSError):
                return cause
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        # e.g. "Connection closed by server.": the parser saw EOF
        kind = TimeoutError if isinstance(exc, RedisTimeoutError) else ConnectionError
        return kind(str(exc))
    return exc  # not a network error: discarded, the breaker not charged


# How many leases one connect() takes, at most, when each one turns out closed by the
# server while it sat idle (see Connection._connect).
_STALE_LIMIT = 10
_SSL_SOCKETS = (ssl.SSLSocket, _gssl.SSLSocket)
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
# The stdlib's poll, even in a monkey-patched process: polled with timeout 0 only, so it
# never blocks the hub; gevent's cooperative one would go through the hub for nothing.
_poll_class: Callable[[], Any] | None = (
    get_original("select", "poll") if hasattr(select, "poll") else None
)
_POLLIN = getattr(select, "POLLIN", 1)
# What this redis-py has (per-session state a new socket starts afresh, in redis-py 8;
# connections marked for reconnect): looked up once, not per borrow.
_HAS_HIMPORT = hasattr(redis.connection.Connection, "_reset_himport_state")
_HAS_SHOULD_RECONNECT = hasattr(redis.connection.Connection, "should_reconnect")


def _stale(sock: Any) -> tuple[bool, OSError | None]:
    """Is a just-borrowed socket unusable, and was that a network error?

    What redis-py's own pool checks with ``can_read()`` after connecting: a socket
    that is readable before any command was sent is dead (EOF: the server closed it
    while idle -- its ``timeout``, ``CLIENT KILL``, a restart) or out of step (bytes
    nobody asked for). Neither is a network failure of the server; an error on the
    socket (a reset) is, and is returned. Never blocks: a non-blocking peek."""
    if isinstance(sock, _SSL_SOCKETS):
        return (not peek_alive(sock), None)
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps a stdlib one
    try:
        raw.recv(1, _PEEK)
    except (BlockingIOError, InterruptedError):
        return (False, None)  # nothing waiting: the idle state we expect
    except OSError as exc:
        return (True, exc)
    except (ValueError, AttributeError):
        return (True, None)  # closed
    return (True, None)  # b"": EOF; a byte: a reply nobody waits for


def _unread(parser: Any) -> bool:
    """Has ``parser`` buffered bytes nobody has read? redis-py's Python parsers keep
    them in a ``SocketBuffer`` (checked without I/O); another parser (hiredis) is asked
    ``can_read(0)``, which may also look at the socket."""
    unread = getattr(getattr(parser, "_buffer", None), "unread_bytes", None)
    if unread is not None:
        return bool(unread())
    return bool(parser.can_read(0))


class Connection(redis.connection.Connection):
    """A redis-py connection whose socket is an lbpool lease, held while borrowed.

    ``connect()`` acquires from the backend (a new lease each time, so a reconnect may
    land on another server); ``disconnect()`` discards the lease into lbpool (never
    closes the socket itself); ``ConnectionPool.release`` returns it. ``host``/``port``
    say which server the current lease is on (the backend name and 0 between leases).
    """

    def __init__(
        self,
        manager: PoolManager,
        backend: str,
        **kwargs: Any,
    ) -> None:
        self._manager = manager
        self._backend = backend
        self._lease: Any = None  # the PooledConnection while connected
        # The greenlet inside this connection's socket I/O (read_response,
        # send_packed_command, can_read), if any; see read_response.
        self._io_greenlet: Any = None
        # A lease redis-py disconnected inside that I/O without saying why: the I/O call
        # discards it with the exception it raises (see disconnect).
        self._dropped: Any = None
        # The lease's socket was shut down by another greenlet's disconnect(): the
        # errors its owner then meets are ours, not the server's.
        self._shut = False
        # The server the current lease is on, as _host_error says it (redis-py asks
        # for it on every read): worked out once per server address, not per lease.
        self._address = ""
        self._lease_host = backend
        self._lease_port = 0
        self._where = f"lbpool backend {backend!r}"
        # A poll object for the last socket peeked (see _stale_lease).
        self._poll: Any = None
        self._poll_fd = -1
        super().__init__(host=backend, port=0, **kwargs)
        # socket_connect_timeout (None unless given) bounds each acquisition; None: the
        # backend's acquire_timeout.
        self._acquire_timeout: float | None = kwargs.get("socket_connect_timeout")
        self._resp3 = _is_resp3(self.protocol)

    @property
    def lease(self) -> Any:
        """The lbpool ``PooledConnection`` this connection holds, or None."""
        return self._lease

    def repr_pieces(self) -> list[tuple[str, Any]]:
        pieces: list[tuple[str, Any]] = [("backend", self._backend)]
        if self._lease is not None:
            pieces.append(("server", f"{self.host}:{self.port}"))
        pieces.append(("db", self.db))
        return pieces

    def _host_error(self) -> str:
        if self._lease is not None:
            return self._where
        return f"lbpool backend {self._backend!r}"

    def connect(self) -> None:
        """Borrow a lease unless this connection holds one; redis-py's pools call this
        on every ``get_connection``. What redis-py's ``connect()`` does: the socket (here
        a lease) through its retry (``retry=`` in the pool's kwargs: a failed
        acquisition is retried, with ``disconnect(error)`` between tries), then, once,
        the parser (``on_connect``, or the client's ``redis_connect_func``) and the
        connect callbacks (pubsub's resubscribe); without the closures it builds per
        call."""
        if self._sock:
            return
        self._sock = self.retry.call_with_retry(self._lease_socket, self.disconnect)
        try:
            if self.redis_connect_func is None:
                self._attach_parser()
            else:  # redis-py calls it with the connection (its annotation says none)
                connect_func: Any = self.redis_connect_func
                connect_func(self)
        except RedisError:
            self.disconnect()
            raise
        if self._connect_callbacks:
            self._connect_callbacks = [ref for ref in self._connect_callbacks if ref()]
            for ref in self._connect_callbacks:
                callback = ref()
                if callback:
                    callback(self)

    def _lease_socket(self) -> Any:
        """One try of the retried part of ``connect()``: a lease's socket, lbpool's
        errors said as redis-py says its dial's."""
        try:
            return self._connect()
        except TimeoutError as exc:  # socket.timeout: as redis-py maps its dial's errors
            raise RedisTimeoutError("Timeout connecting to server") from exc
        except OSError as exc:
            raise RedisConnectionError(self._error_message(exc)) from exc

    def _stale_lease(self, sock: Any) -> tuple[bool, OSError | None]:
        """``_stale(sock)``, answered by a zero-timeout ``poll`` of the socket when it
        is plain and not readable: the common case costs that one system call and no
        exception (the ``MSG_PEEK`` of ``_stale`` raises and catches ``BlockingIOError``
        for "nothing waiting"). A readable socket (EOF, bytes or an error) is then
        classified by ``_stale``'s peek; a TLS one goes to ``_stale`` directly."""
        if _poll_class is None or isinstance(sock, _SSL_SOCKETS):
            return _stale(sock)
        try:
            fd = sock.fileno()
        except (OSError, ValueError, AttributeError):
            return (True, None)  # closed
        if fd < 0:
            return (True, None)
        poll = self._poll
        if fd != self._poll_fd:
            if poll is None:
                poll = self._poll = _poll_class()
            elif self._poll_fd >= 0:
                poll.unregister(self._poll_fd)
            self._poll_fd = -1
            poll.register(fd, _POLLIN)  # an error or hang-up is reported as well
            self._poll_fd = fd
        if not poll.poll(0):
            return (False, None)
        return _stale(sock)  # EOF, bytes or an error: which one

    def _connect(self) -> Any:
        """Borrow a socket from the backend; redis-py calls this from ``connect()``.

        A lease whose socket is already readable (the server closed it while it sat
        idle, or bytes are waiting) is discarded and another one taken -- redis-py's
        pool makes the same ``can_read()`` check after connecting. Only a socket error
        charges the server's breaker; an EOF or stray bytes do not. A freshly dialed
        one that is not clean, or ``_STALE_LIMIT`` stale ones in a row, fail the
        connect (``redis.ConnectionError``)."""
        for _ in range(_STALE_LIMIT):
            started = time.monotonic()
            try:
                lease = self._manager.acquire(self._backend, timeout=self._acquire_timeout)
            except PoolTimeout as exc:
                raise RedisTimeoutError(f"{self._host_error()}: {exc}") from exc
            except (BackendUnavailable, DialError, PoolClosed, PoolExhausted) as exc:
                raise RedisConnectionError(f"{self._host_error()}: {exc}") from exc
            try:
                # redis-py changes nothing on the socket but its timeout: the return
                # restores that, and need not re-set TCP_NODELAY (a system call).
                sock = lease._timed_sock(self.socket_timeout)
                stale, error = self._stale_lease(sock)
                if not stale:
                    break
                fresh = lease.created_at >= started  # dialed for us (lbpool's clock)
            except BaseException as exc:
                lease.discard(exc)
                raise
            address = lease.address
            lease.discard(error)
            if fresh:
                raise RedisConnectionError(
                    f"{address} (lbpool backend {self._backend!r}): a new connection was "
                    f"not ready (closed or unread bytes) right after its setup"
                ) from error
        else:
            raise RedisConnectionError(
                f"{self._host_error()}: {_STALE_LIMIT} connections in a row were closed by "
                f"the server while idle"
            )
        self._lease = lease
        self._shut = False
        address = lease.address
        if address != self._address:
            host, _, port = address.rpartition(":")
            self._lease_host, self._lease_port = host, int(port)
            self._where = f"{address} (lbpool backend {self._backend!r})"
            self._address = address
        self.host = self._lease_host
        self.port = self._lease_port
        return sock

    def on_connect(self) -> None:
        """Nothing to say to the server: lbpool's setup hook (``handshake``) did it once,
        when the socket was dialed. Only the parser attaches to the new socket."""
        self._attach_parser()

    def on_connect_check_health(self, check_health: bool = True) -> None:  # redis-py 7.1+
        self._attach_parser()

    def _attach_parser(self) -> None:
        if _HAS_HIMPORT:  # redis-py 8: per-session state
            self._reset_himport_state()
        if self._resp3 and isinstance(self._parser, _RESP2Parser):
            self.set_parser(_RESP3Parser)  # as redis-py's on_connect does (5.x)
        self._parser.on_connect(self)

    # -- this connection's own socket I/O --------------------------------------------
    # redis-py's read/write paths call ``self.disconnect()`` inside ``except OSError``
    # without passing the error; the error then surfaces as the exception these calls
    # raise. So a lease disconnected inside them, without an ``error``, is discarded by
    # the call itself with what it raises -- never with whatever exception some caller
    # happens to be handling (``sys.exc_info()``), which may be about anything else.
    # Each of the three is written out (not one helper taking the call): they run on
    # every command.
    def _settle(self, exc: BaseException | None) -> None:
        lease, self._dropped = self._dropped, None
        if lease is not None:
            lease.discard(None if exc is None else _network_error(exc))

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        outer, self._io_greenlet = self._io_greenlet, getcurrent()
        try:
            return super().read_response(*args, **kwargs)
        except BaseException as exc:
            self._settle(exc)
            raise
        finally:
            self._io_greenlet = outer
            if self._dropped is not None:
                self._settle(None)

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        outer, self._io_greenlet = self._io_greenlet, getcurrent()
        try:
            super().send_packed_command(*args, **kwargs)
        except BaseException as exc:
            self._settle(exc)
            raise
        finally:
            self._io_greenlet = outer
            if self._dropped is not None:
                self._settle(None)

    def can_read(self, *args: Any, **kwargs: Any) -> bool:
        outer, self._io_greenlet = self._io_greenlet, getcurrent()
        try:
            return bool(super().can_read(*args, **kwargs))
        except BaseException as exc:
            self._settle(exc)
            raise
        finally:
            self._io_greenlet = outer
            if self._dropped is not None:
                self._settle(None)

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        """Drop the lease: discarded into lbpool with the error that caused this, so a
        network error reaches the server's breaker. That error is the ``error`` redis-py
        passes, or, when redis-py passes none from inside this connection's own I/O,
        the exception that I/O call raises (see ``read_response``). Otherwise none: a disconnect
        while some unrelated exception is being handled charges no breaker.

        Called from another greenlet while this connection's owner is inside its I/O
        (``ConnectionPool.disconnect()`` with commands in flight), it only shuts the
        socket down: tearing the parser down under a blocked read would fail that read
        with a bare ``ValueError``. The owner's read then ends with a
        ``redis.ConnectionError`` (retried if its retry says so), and the owner
        disconnects itself; the lease is discarded as no fault of the server."""
        lease = self._lease
        if lease is not None and self._io_greenlet not in (None, getcurrent()):
            self._shut = True
            with contextlib.suppress(OSError, ValueError, LbpoolError):
                lease.sock.shutdown(socket.SHUT_RDWR)
            return
        self._lease = None
        shut, self._shut = self._shut, False
        self._sock = None  # lbpool owns the socket: redis-py must not close it
        try:
            super().disconnect(*args, **kwargs)  # parser and flags only: no socket
        finally:
            if lease is not None:
                self.host, self.port = self._backend, 0
                error = kwargs.get("error")
                if error is None and args and isinstance(args[0], BaseException):
                    error = args[0]  # redis-py 5: connect's retry passes it positionally
                if shut:
                    lease.discard(None)  # we shut it down: the server did nothing wrong
                elif error is None and self._io_greenlet is getcurrent():
                    self._dropped = lease  # the I/O call under way discards it
                else:
                    lease.discard(_network_error(error))

    def _give_back(self) -> None:
        """The pool's ``release``: return the lease, or discard it when the stream is
        not clean (bytes the parser read that nobody asked for) or redis-py asked for a
        reconnect. Bytes (or an EOF) still in the kernel are not looked for here -- no
        system call on the release path, as redis-py's own pools make none: the next
        borrow's peek (``_connect``), or lbpool's idle watcher, finds them."""
        lease = self._lease
        if lease is None:
            return
        try:
            dirty = (
                self._shut
                or _unread(self._parser)
                or (_HAS_SHOULD_RECONNECT and self.should_reconnect())
            )
        except Exception:  # EOF or a socket error while looking
            dirty = True
        if dirty:
            self.disconnect()
            return
        self._lease = None
        self._sock = None
        self.host, self.port = self._backend, 0
        self._parser.on_disconnect()
        lease.release()


class ConnectionPool(redis.ConnectionPool):
    """A redis-py connection pool over one lbpool backend; ``redis.Redis(connection_pool=
    pool)`` accepts it.

    ``ConnectionPool(manager, backend, **connection_kwargs)``: ``backend`` is a backend
    name of ``manager`` (or a ``host:port``: it has no ``setup`` hook, so on redis-py 8,
    which speaks RESP3 by default, give ``protocol=2``, and no auth, db or client name);
    ``connection_kwargs`` are redis-py's
    connection kwargs (``db``, ``username``, ``password``, ``credential_provider``,
    ``protocol``, ``client_name``, ``decode_responses``, ``encoding``, ``socket_timeout``,
    ``socket_connect_timeout`` (bounds each acquisition), ``retry``, ``retry_on_timeout``,
    ``retry_on_error``, ``health_check_interval`` ...).

    Raises ``ValueError`` for kwargs lbpool's backend owns or this pool does not cover
    (``host``, ``port``, unix sockets, ``connection_class``, client-side caching) and
    when the backend's ``setup`` hook does not do the handshake these kwargs need (see
    ``handshake``). The pool holds no sockets of its own: connection counts, limits and
    waiting are the backend's (``max_size``, ``acquire_timeout``, ``max_waiting``).
    """

    def __init__(self, manager: PoolManager, backend: str, **connection_kwargs: Any) -> None:
        for key, why in _REFUSED.items():
            if key in connection_kwargs:
                raise ValueError(f"lbpool.contrib.redis.ConnectionPool: {key}=: {why}")
        maint = connection_kwargs.get("maint_notifications_config")
        if maint is not None and getattr(maint, "enabled", False) is True:
            raise ValueError(
                "lbpool.contrib.redis.ConnectionPool: maintenance notifications are not "
                "covered (lbpool chooses the servers)"
            )
        self.manager = manager
        self.backend = backend
        self._check_setup(connection_kwargs)
        kwargs = {**_maint_disabled(), **connection_kwargs}
        if kwargs.get("maint_notifications_config") is None:
            kwargs.pop("maint_notifications_config", None)
        super().__init__(connection_class=Connection, **kwargs)

    def _check_setup(self, connection_kwargs: Mapping[str, Any]) -> None:
        needed = handshake(**connection_kwargs).session
        config = getattr(self.manager, "config", None)
        backends = getattr(config, "backends", None) or {}
        backend_config = backends.get(self.backend)
        hook = getattr(backend_config, "setup", None)
        func = getattr(hook, "func", hook)
        where = f"lbpool.contrib.redis.ConnectionPool({self.backend!r})"
        if isinstance(func, Handshake):
            if func.session != needed:
                raise ValueError(
                    f"{where}: the backend's setup hook is {func.__qualname__} but the "
                    f"pool's kwargs need handshake({_shown(needed)}): give both the same "
                    f"settings"
                )
        elif func is None and needed:
            raise ValueError(
                f"{where}: {_shown(needed)} need a handshake on each new socket (redis-py "
                f"{redis.__version__} speaks RESP{needed.get('protocol', 2)} with these "
                f"kwargs), but the backend has no setup hook: configure setup: "
                f"handshake(...) from lbpool.contrib.redis, with the pool's kwargs, on "
                f"backend {self.backend!r}"
            )
        # Another callable: the user's own handshake, trusted.

    # -- redis-py's pool protocol ----------------------------------------------------
    def reset(self) -> None:
        # Free wrappers hold no sockets; in-use ones hold leases lbpool looks after
        # (after a fork the child's pools start fresh).
        self._created_connections = 0
        self._available_connections: list[Connection] = []
        self._in_use_connections: set[Connection] = set()
        self.pid = os.getpid()
        self._generation = fork_generation()

    def _checkpid(self) -> None:
        # A fork bumps lbpool's fork generation (os.register_at_fork): compared without
        # the getpid() system call redis-py's pools make twice per command.
        if self._generation != fork_generation():
            self.reset()

    def make_connection(self) -> Connection:
        """A new wrapper (no socket yet; ``connect()`` borrows one)."""
        self._created_connections += 1
        kwargs = dict(self.connection_kwargs)
        return Connection(self.manager, self.backend, **kwargs)

    def get_connection(
        self, command_name: str | None = None, *keys: Any, **options: Any
    ) -> Connection:
        """A connected ``Connection`` holding a lease from the backend.

        Accepts every signature redis-py has called it with (the command name, keys and
        options up to 5.2; nothing since 5.3) and ignores them. Raises
        ``redis.ConnectionError`` / ``redis.TimeoutError`` (from the lbpool error) when
        no lease can be had, after the connection's retry policy; nothing is kept.
        """
        self._checkpid()
        try:
            connection = self._available_connections.pop()
        except IndexError:
            connection = self.make_connection()
        self._in_use_connections.add(connection)
        try:
            connection.connect()
        except BaseException:
            self._in_use_connections.discard(connection)
            connection.disconnect()
            self._available_connections.append(connection)
            raise
        return connection

    def release(self, connection: Any) -> None:
        """Give the connection's lease back to lbpool (``release``; ``discard`` when its
        stream is not clean). A connection this pool did not hand out is ignored."""
        self._checkpid()
        if connection not in self._in_use_connections:
            return
        self._in_use_connections.discard(connection)
        try:
            connection._give_back()
        finally:
            self._available_connections.append(connection)

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Discard the leases of connections redis-py holds (``inuse_connections``);
        free connections hold none. lbpool's idle connections are the manager's.

        Safe with commands in flight in other greenlets: their sockets are shut down,
        so each such command fails with ``redis.ConnectionError`` (or is retried on a
        new lease), and its greenlet discards the lease (see ``Connection.disconnect``).
        """
        self._checkpid()
        if inuse_connections:
            for connection in list(self._in_use_connections):
                connection.disconnect()

    def close(self) -> None:
        self.disconnect()

    def set_retry(self, retry: Retry) -> None:
        self.connection_kwargs.update({"retry": retry})
        for connection in (*self._available_connections, *self._in_use_connections):
            connection.retry = retry

    def get_encoder(self) -> Encoder:
        kwargs = self.connection_kwargs
        return Encoder(
            encoding=kwargs.get("encoding", "utf-8"),
            encoding_errors=kwargs.get("encoding_errors", "strict"),
            decode_responses=kwargs.get("decode_responses", False),
        )

    def __repr__(self) -> str:
        return (
            f"<lbpool.contrib.redis.ConnectionPool backend={self.backend!r} "
            f"[{len(self._in_use_connections)} borrowed, "
            f"{len(self._available_connections)} free wrappers]>"
        )
