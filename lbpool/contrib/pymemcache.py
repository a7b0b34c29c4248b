"""pymemcache over lbpool: a ``HashClient``-like client whose keys are routed by an
lbpool key-affinity backend and whose protocol is spoken by pymemcache's own code.

Usage (pymemcache 3.5 through 4.x)::

    import lbpool
    from lbpool.contrib.pymemcache import Client

    manager = lbpool.PoolManager({"backends": {"cache": {
        "strategy": "rendezvous",        # keys placed exactly as pymemcache's HashClient
        "servers": ["10.0.0.2:11211", "10.0.0.3:11211", "10.0.0.4:11211"],
        "health_check": {"send": "version\\r\\n", "expect": "VERSION"},
    }}})
    mc = Client(manager, "cache", timeout=1.0)
    mc.set("user:42", b"...")
    mc.get("user:42")                    # b"..." (or None)
    mc.get_many(["user:1", "user:2"])    # {"user:1": b"...", ...}: one round trip per server

    # or, when nothing else shares the manager:
    mc = Client.from_servers(["10.0.0.2:11211", ("10.0.0.3", 11211)], timeout=1.0)
    ...
    mc.close()                           # closes the manager it made

How it works
------------
Each operation borrows a connection from the backend with ``manager.acquire(backend,
key=key)`` -- the key's owner by the backend's strategy (``rendezvous``: murmur3 of
``"<host:port>-<key>"``, the highest score wins, exactly as pymemcache's
``RendezvousHash``; ``ring_hash``: libketama's continuum; ``maglev``), or, when the owner
cannot serve (breaker open, dial failed, removed), the key's next server by
``balance.hash_fallback: next`` (``none``: the error below) -- then runs pymemcache's
``base.Client`` method on it: a ``base.Client`` whose ``sock`` is the borrowed
connection for that one call (the attribute its operations read; its ``close()``, which
pymemcache calls whenever the stream is left in an unknown state, marks the connection
for discard instead of closing lbpool's socket). The connection then goes back to lbpool:
``release()`` after a clean reply, ``discard()`` otherwise. Keys are routed without
``key_prefix``, as ``HashClient`` routes them.

- A network error on the borrowed socket (``OSError``, ``socket.timeout``,
  ``MemcacheUnexpectedCloseError``: the server closed it) discards the connection with
  that error, so the server's breaker hears of it, and the operation is retried once on
  a fresh acquisition -- the owner again if it can serve, else the key's fallback. A
  retried ``incr``/``decr``/``append``/``prepend`` whose first reply was lost after the
  server applied it is applied twice, and a retried ``add``/``cas`` then answers
  ``False``: the same trade pymemcache's ``RetryingClient`` makes. A second network
  error is raised as pymemcache raised it.
- Before a borrowed socket is used, a non-blocking peek makes sure the server did not
  close it while it sat idle (a restart, its idle timeout); such a connection is
  discarded, not charged to the breaker, and another taken.
- Multi-key operations (``get_many``, ``gets_many``, ``set_many``, ``delete_many``) group
  the keys by owner (``manager.owner``) and send each group in one round trip, one group
  after another. A group whose owner cannot serve is split: each of its keys goes to its
  own fallback.
- Memcached's own answers keep pymemcache's exceptions (``MemcacheClientError``,
  ``MemcacheServerError``, ``MemcacheIllegalInputError`` ...); the connection is kept
  when pymemcache left the stream clean.

Errors
------
When no connection can be had, lbpool's error is raised as one of these, each ``from``
the lbpool error, and each catchable as pymemcache's ``MemcacheError``, as the
``OSError`` pymemcache raises for a socket failure, and as ``lbpool.LbpoolError``:

- ``MemcacheConnectionError`` (also ``ConnectionError``): ``BackendUnavailable`` (no
  server of the backend could serve the key: breakers open, dials failed; with
  ``hash_fallback: none``, the key's owner could not), ``DialError``, ``PoolExhausted``
  (``max_waiting`` callers already wait), ``PoolClosed`` (the manager is closed).
- ``MemcacheTimeoutError`` (also ``TimeoutError``): ``PoolTimeout``, no connection within
  ``connect_timeout`` (default: the backend's ``acquire_timeout``).

With ``ignore_exc=True`` every operation returns its default instead of raising (as
``HashClient`` does): a miss for reads, ``False`` for writes, the keys not stored for
``set_many``.

Not covered
-----------
``stats``, ``version``, ``flush_all``, ``quit``, ``shutdown``, ``raw_command`` and
``cache_memlimit`` speak to one server, not to a key's: use ``pymemcache.Client`` on
``manager.get(backend_server_address)`` connections, or a ``base.Client`` of your own.
Dial options (``connect_timeout`` aside: it bounds each acquisition), TLS, keepalive and
``no_delay`` are lbpool's ``dial`` config; pooling, retries and dead-server handling
are lbpool's (``pool``, ``breaker``, ``balance``): those ``HashClient`` kwargs are
refused with ``ValueError`` saying where each one's job is done. A bytes key is routed
as its bytes (a str key as its UTF-8 bytes: ``"k"`` and ``b"k"`` go to the same server,
which stores them as one key), where ``HashClient`` would hash a bytes key's ``repr``;
ASCII str keys are placed exactly as ``HashClient`` places them.

Greenlet-safe within the manager's thread, like the manager itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from gevent import Timeout as _GeventTimeout
from pymemcache.client.base import Client as _BaseClient
from pymemcache.client.base import check_key_helper
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from lbpool.connection import PooledConnection
from lbpool.errors import (
    BackendUnavailable,
    DialError,
    LbpoolError,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    UnknownBackend,
)
from lbpool.hashing import HASH_STRATEGIES, Key
from lbpool.health import peek_alive
from lbpool.manager import PoolManager

__all__ = ["Client", "MemcacheConnectionError", "MemcacheTimeoutError"]

T = TypeVar("T")


class MemcacheConnectionError(MemcacheError, LbpoolError, ConnectionError):
    """No connection for the key: ``BackendUnavailable``, ``DialError``,
    ``PoolExhausted`` or ``PoolClosed`` from lbpool (its ``__cause__``)."""


class MemcacheTimeoutError(MemcacheError, LbpoolError, TimeoutError):
    """No connection for the key within the acquire timeout (``PoolTimeout``, its
    ``__cause__``)."""


# HashClient / base.Client kwargs whose job lbpool does: refused, with where it is done.
_REFUSED = {
    "server": "the servers are the lbpool backend's",
    "servers": "the servers are the lbpool backend's (see Client.from_servers)",
    "hasher": "keys are placed by the backend's strategy (rendezvous: as RendezvousHash)",
    "socket_module": "lbpool dials with gevent's sockets",
    "socket_keepalive": "TCP keepalive is lbpool's dial config (dial.keepalive*)",
    "no_delay": "TCP_NODELAY is lbpool's dial config (dial.tcp_nodelay)",
    "tls_context": "TLS is lbpool's dial config (dial.tls)",
    "use_pooling": "connections are always pooled by lbpool (pool config)",
    "max_pool_size": "pool sizes are lbpool's pool config (pool.max_size)",
    "pool_idle_timeout": "idle connections are lbpool's pool config (pool.idle_timeout)",
    "lock_generator": "lbpool pools are greenlet-safe",
    "retry_attempts": "failing servers are judged by lbpool's breaker config",
    "retry_timeout": "failing servers are judged by lbpool's breaker config",
    "dead_timeout": "a dead server's breaker reopens after breaker.recovery_timeout",
}
# How many borrowed connections in a row one operation discards, at most, because the
# server had closed them while they sat idle.
_STALE_LIMIT = 10


def _network_error(exc: BaseException) -> BaseException | None:
    """What ``discard`` should hear when ``exc`` ended an operation: the network error
    (``OSError``, or a ``ConnectionError`` for pymemcache's "the server closed it"), or
    None when ``exc`` says nothing about the server."""
    if isinstance(exc, LbpoolError):
        return None
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, MemcacheUnexpectedCloseError):
        return ConnectionError(f"the server closed the connection ({exc!r})")
    return None


def _node(server: Any) -> str:
    """``host:port`` for a server given as pymemcache takes it (``"host:port"``,
    ``("host", port)``); IPv6 hosts bracketed, as lbpool's config writes them."""
    if isinstance(server, str):
        return server
    host, port = server
    host = str(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


class _Borrowed(_BaseClient):
    """pymemcache's ``base.Client`` speaking over an lbpool connection it never owns.

    ``sock`` is set to the borrowed ``PooledConnection`` for one operation (pymemcache
    uses only its ``sendall`` and ``recv``; a stale reference would raise
    ``ConnectionReleased``, never write into a socket lent to someone else).
    ``close()``, which pymemcache calls when it gives up on a stream, only drops the
    reference and marks the connection ``dirty``: lbpool then discards it.
    """

    sock: Any  # the PooledConnection during an operation, else None

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        super().__init__(("lbpool", 0), ignore_exc=False, **kwargs)
        self.dirty = False

    def _connect(self) -> None:
        # pymemcache reconnects only when ``sock`` is None: never while we lend it one.
        raise MemcacheConnectionError("lbpool.contrib.pymemcache: no borrowed connection")

    def close(self) -> None:
        self.sock = None
        self.dirty = True


class _Moved:
    """The key group's owner could not serve: split the group (see ``Client._batch``)."""


_MOVED = _Moved()


class Client:
    """A memcached client over one lbpool key-affinity backend, ``HashClient``'s methods.

    ``Client(manager, backend, **client_kwargs)``: ``backend`` names a backend of
    ``manager`` whose strategy routes by key (``rendezvous``, ``ring_hash`` or
    ``maglev``; ``ValueError`` otherwise, ``UnknownBackend`` for a name that is not
    configured). ``client_kwargs`` are pymemcache's: ``serde`` (or ``serializer``/
    ``deserializer``), ``key_prefix``, ``default_noreply``, ``allow_unicode_keys``,
    ``encoding``; ``timeout`` (seconds, each borrowed socket's send/recv timeout; None:
    none); ``connect_timeout`` (seconds, bounds each acquisition, failover included;
    None: the backend's ``acquire_timeout``); ``ignore_exc`` (see the module's Errors).
    Kwargs whose job lbpool does (``servers``, ``hasher``, ``use_pooling``,
    ``retry_attempts``, ``dead_timeout``, ``tls_context`` ...) raise ``ValueError``.

    ``retries`` counts operations tried a second time after a network error. The
    client holds no sockets: each operation borrows one and gives it back before
    returning. ``close()`` closes the manager only when ``from_servers`` made it.
    """

    def __init__(
        self,
        manager: PoolManager,
        backend: str,
        *,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        ignore_exc: bool = False,
        **client_kwargs: Any,
    ) -> None:
        for name, why in _REFUSED.items():
            if name in client_kwargs:
                raise ValueError(f"lbpool.contrib.pymemcache.Client: {name}=: {why}")
        found = manager.backends.get(backend)
        if found is None:
            raise UnknownBackend(backend, list(manager.backends))
        if found.strategy not in HASH_STRATEGIES:
            raise ValueError(
                f"lbpool.contrib.pymemcache.Client: backend {backend!r} routes by "
                f"{found.strategy}, not by key: give it strategy: rendezvous (as "
                f"pymemcache's HashClient), ring_hash or maglev"
            )
        self.manager = manager
        self.backend = backend
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ignore_exc = ignore_exc
        self._kwargs = dict(client_kwargs)
        # Checks the kwargs now (a bad serde or key_prefix fails here, not at first use).
        probe = _Borrowed(self._kwargs)
        self.key_prefix: bytes = probe.key_prefix
        self.allow_unicode_keys: bool = probe.allow_unicode_keys
        self._spare: list[_Borrowed] = [probe]  # protocol objects between operations
        self._owns_manager = False
        # operations tried a second time after a network error (see the module doc)
        self.retries = 0

    @classmethod
    def from_servers(
        cls,
        servers: Sequence[Any],
        *,
        strategy: str = "rendezvous",
        backend_config: Mapping[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> Client:
        """A client with a manager of its own over ``servers`` (``"host:port"`` or
        ``("host", port)``, as ``HashClient`` takes them), closed by ``close()``.

        The backend (named ``"memcached"``) has ``strategy`` (``rendezvous``: keys where
        ``HashClient`` puts them), a ``version``/``VERSION`` health check, and whatever
        ``backend_config`` adds or overrides (``pool``, ``dial``, ``breaker``,
        ``balance`` ... sections as in lbpool's config). ``ConfigError`` for a bad one.
        """
        config: dict[str, Any] = {
            "strategy": strategy,
            "servers": [_node(s) for s in servers],
            "health_check": {"send": "version\r\n", "expect": "VERSION"},
            **(backend_config or {}),
        }
        manager = PoolManager({"backends": {"memcached": config}})
        try:
            client = cls(manager, "memcached", **client_kwargs)
        except BaseException:
            manager.close()
            raise
        client._owns_manager = True
        return client

    # -- borrowing ------------------------------------------------------------------
    def _borrow(self, key: Key) -> PooledConnection:
        """A connection from the key's server (its owner, or its fallback), checked
        clean. Raises ``MemcacheConnectionError``/``MemcacheTimeoutError``."""
        for _ in range(_STALE_LIMIT):
            try:
                lease = self.manager.acquire(self.backend, timeout=self.connect_timeout, key=key)
            except PoolTimeout as exc:
                raise MemcacheTimeoutError(f"lbpool backend {self.backend!r}: {exc}") from exc
            except (BackendUnavailable, DialError, PoolExhausted, PoolClosed) as exc:
                raise MemcacheConnectionError(f"lbpool backend {self.backend!r}: {exc}") from exc
            try:
                alive = peek_alive(lease.sock)
                if alive:
                    lease.settimeout(self.timeout)
                    return lease
            except BaseException as exc:
                lease.discard(exc)
                raise
            lease.discard(None)  # closed by the server while idle: not a failure of it
        raise MemcacheConnectionError(
            f"lbpool backend {self.backend!r}: {_STALE_LIMIT} connections in a row were "
            f"closed by the server while idle"
        )

    def _call(self, key: Key, op: Callable[[_Borrowed], T], owner: str | None = None) -> Any:
        """``op`` on a ``base.Client`` over a connection from ``key``'s server; a
        network error discards that connection and ``op`` is tried once more on a fresh
        one. With ``owner``: ``_MOVED`` (nothing sent) when that server cannot serve."""
        for attempt in (1, 2):
            lease = self._borrow(key)
            if owner is not None and lease.address != owner:
                lease.release()  # unused: another server serves the key now
                return _MOVED
            inner = self._spare.pop() if self._spare else _Borrowed(self._kwargs)
            inner.sock = lease
            inner.dirty = False
            try:
                result = op(inner)
            except BaseException as exc:
                inner.sock = None
                self._spare.append(inner)
                network = _network_error(exc)
                if network is not None:
                    lease.discard(network)
                    if attempt == 1:
                        self.retries += 1
                        continue
                elif isinstance(exc, Exception) and not inner.dirty:
                    lease.release()  # refused before a byte was sent (a bad key, value)
                else:
                    # the stream is in an unknown state (pymemcache gave up on it, or
                    # the caller was interrupted mid-reply: gevent.Timeout, kill)
                    lease.discard(exc if isinstance(exc, _GeventTimeout) else None)
                raise
            inner.sock = None
            self._spare.append(inner)
            if inner.dirty:
                lease.discard(None)
            else:
                lease.release()
            return result
        raise AssertionError("unreachable")

    def _one(self, key: Key, op: Callable[[_Borrowed], T], default: Any) -> Any:
        self._check(key)
        try:
            return self._call(key, op)
        except Exception:
            if self.ignore_exc:
                return default
            raise

    def _check(self, key: Key) -> None:
        """pymemcache's key check (type, length, no spaces), before anything is borrowed."""
        check_key_helper(key, self.allow_unicode_keys, self.key_prefix)

    def _batch(self, keys: Iterable[Key], op: Callable[..., Any]) -> list[tuple[list[Key], Any]]:
        """``op(client, keys=group)`` for each group of ``keys`` with one owner, one round
        trip each; a group whose owner cannot serve is split into one-key groups, each
        served by its key's fallback. Returns ``(group, result or the exception)``; the
        exception only with ``ignore_exc``."""
        groups: dict[str, list[Key]] = {}
        for key in keys:
            self._check(key)
            groups.setdefault(self.manager.owner(self.backend, key), []).append(key)
        out: list[tuple[list[Key], Any]] = []
        for owner, group in groups.items():
            try:
                result = self._call(group[0], partial(op, keys=group), owner)
            except Exception as exc:
                if not self.ignore_exc:
                    raise
                out.append((group, exc))
                continue
            if result is not _MOVED:
                out.append((group, result))
                continue
            for key in group:
                try:
                    out.append(([key], self._call(key, partial(op, keys=[key]))))
                except Exception as exc:
                    if not self.ignore_exc:
                        raise
                    out.append(([key], exc))
        return out

    def server_for(self, key: Key) -> str:
        """The key's owner, ``host:port``, by placement (breakers ignored; nothing
        borrowed). A fallback serves it while the owner cannot."""
        return self.manager.owner(self.backend, key)

    # -- reads ----------------------------------------------------------------------
    def get(self, key: Key, default: Any = None) -> Any:
        """The value, or ``default`` when the key is not set."""
        return self._one(key, lambda c: c.get(key, default=default), default)

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, cas)``, or ``(default, cas_default)`` when the key is not set."""
        miss = (default, cas_default)
        return self._one(  # type: ignore[no-any-return]
            key, lambda c: c.gets(key, default=default, cas_default=cas_default), miss
        )

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """``{key: value}`` for the keys that are set (one round trip per server)."""
        found: dict[Key, Any] = {}
        for _, result in self._batch(keys, lambda c, keys: c.get_many(keys)):
            if not isinstance(result, BaseException):
                found.update(result)
        return found

    get_multi = get_many

    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, Any]]:
        """``{key: (value, cas)}`` for the keys that are set."""
        found: dict[Key, tuple[Any, Any]] = {}
        for _, result in self._batch(keys, lambda c, keys: c.gets_many(keys)):
            if not isinstance(result, BaseException):
                found.update(result)
        return found

    # -- writes ---------------------------------------------------------------------
    def set(
        self,
        key: Key,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        """Store ``value``; True (always True with ``noreply``, pymemcache's default)."""
        return bool(
            self._one(
                key, lambda c: c.set(key, value, expire=expire, noreply=noreply, flags=flags), False
            )
        )

    def set_many(
        self,
        values: Mapping[Key, Any],
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> list[Key]:
        """Store each value (one round trip per server); returns the keys not stored."""
        failed: list[Key] = []
        for group, result in self._batch(
            values,
            lambda c, keys: c.set_many(
                {k: values[k] for k in keys}, expire=expire, noreply=noreply, flags=flags
            ),
        ):
            failed.extend(group if isinstance(result, BaseException) else result)
        return failed

    set_multi = set_many

    def add(
        self,
        key: Key,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        """Store only if the key is not set; False when it was (with ``noreply``: True)."""
        return bool(
            self._one(
                key, lambda c: c.add(key, value, expire=expire, noreply=noreply, flags=flags), False
            )
        )

    def replace(
        self,
        key: Key,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        """Store only if the key is set; False when it was not (with ``noreply``: True)."""
        return bool(
            self._one(
                key,
                lambda c: c.replace(key, value, expire=expire, noreply=noreply, flags=flags),
                False,
            )
        )

    def append(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None) -> bool:
        """Append to the stored value (True; with a reply, False if the key is not set)."""
        return bool(
            self._one(key, lambda c: c.append(key, value, expire=expire, noreply=noreply), False)
        )

    def prepend(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None) -> bool:
        """Prepend to the stored value (True; with a reply, False if the key is not set)."""
        return bool(
            self._one(key, lambda c: c.prepend(key, value, expire=expire, noreply=noreply), False)
        )

    def cas(
        self,
        key: Key,
        value: Any,
        cas: int | str | bytes,
        expire: int = 0,
        noreply: bool = False,
        flags: int | None = None,
    ) -> bool | None:
        """Store if the key's cas token is still ``cas``: True stored, False changed
        since, None the key is not set."""
        return self._one(  # type: ignore[no-any-return]
            key,
            lambda c: c.cas(key, value, cas, expire=expire, noreply=noreply, flags=flags),
            False,
        )

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete the key; True (with a reply: False if it was not set)."""
        return bool(self._one(key, lambda c: c.delete(key, noreply=noreply), False))

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key (one round trip per server); True, as pymemcache returns."""
        self._batch(keys, lambda c, keys: c.delete_many(keys, noreply=noreply))
        return True

    delete_multi = delete_many

    def incr(self, key: Key, value: int, noreply: bool = False) -> int | None:
        """Add ``value`` to the stored number: the new value, None if the key is not set."""
        return self._one(key, lambda c: c.incr(key, value, noreply=noreply), None)  # type: ignore[no-any-return]

    def decr(self, key: Key, value: int, noreply: bool = False) -> int | None:
        """Subtract ``value`` (memcached stops at 0): the new value, None if not set."""
        return self._one(key, lambda c: c.decr(key, value, noreply=noreply), None)  # type: ignore[no-any-return]

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry; True (with a reply: False if the key is not set)."""
        return bool(self._one(key, lambda c: c.touch(key, expire=expire, noreply=noreply), False))

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value, noreply=True)

    def __delitem__(self, key: Key) -> None:
        self.delete(key, noreply=True)

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Close the manager if ``from_servers`` made it; otherwise nothing: the
        connections belong to the manager (``manager.close()``)."""
        if self._owns_manager:
            self.manager.close()

    disconnect_all = close

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<lbpool.contrib.pymemcache.Client backend={self.backend!r} "
            f"[{len(self._spare)} spare protocol objects]>"
        )
