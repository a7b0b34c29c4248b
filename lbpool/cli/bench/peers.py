"""The pools ``lbpool bench`` measures, behind one small interface (``Adapter``).

Only ``lbpool.cli.bench`` imports this module, and each peer library is imported only
inside its own factory, so nothing here loads unless the bench runs, and a peer that
is not installed is recorded as missing instead of failing the run.

Every pool hands out connections to the same loopback echo server, dialed the same
way (a gevent socket with ``TCP_NODELAY``), so only the pooling differs:

- ``deque``: the floor, a bare ``collections.deque`` (uncontended only);
- ``floor``: the floor under contention, :class:`FloorPool` (deque + FIFO handoff);
- ``lbpool.Pool`` and ``manager.get``: lbpool itself;
- ``sqlalchemy``: ``QueuePool`` driven generically (``creator`` returns a socket);
- ``gcp``: generic-connection-pool's threading ``ConnectionPool``;
- ``gsocketpool``: ``gsocketpool.Pool``;
- ``dial``: no pool, one fresh connection per request (scenario C's baseline).

SQLAlchemy's and generic-connection-pool's pools wait on ``threading`` locks. In a
gevent process without ``monkey.patch_all()`` such a wait blocks the whole hub, so
the bench gives those modules (and only them, while the peer is alive) the same
cooperative primitives that monkey-patching would: gevent locks and a Condition
built on them (:func:`cooperative_threading`). The bench separately *observes* what
happens without it (``unpatched_handoff_probe``).
"""

from __future__ import annotations

import contextlib
import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import monotonic
from types import ModuleType, SimpleNamespace
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.hub import Waiter, get_hub
from gevent.lock import RLock as _GRLock
from gevent.thread import allocate_lock as _g_allocate_lock
from gevent.thread import get_ident as _g_get_ident

__all__ = [
    "PEERS",
    "REDIS_IMPLS",
    "Adapter",
    "CoopCondition",
    "FloorPool",
    "PeerMissing",
    "connect",
    "cooperative_threading",
    "make_adapter",
    "peer_versions",
    "redis_client",
    "redis_missing",
    "redis_server",
    "timeout_probe",
    "unpatched_handoff_probe",
]

PEERS = ("sqlalchemy", "gcp", "gsocketpool")
_DISTRIBUTIONS = {
    "sqlalchemy": "SQLAlchemy",
    "gcp": "generic-connection-pool",
    "gsocketpool": "gsocketpool",
}


class PeerMissing(Exception):
    """A peer library is not installed (or failed to import)."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def connect(address: str, timeout: float | None = 5.0) -> Any:
    """A connected gevent socket to ``host:port``, ``TCP_NODELAY`` on, left blocking."""
    host, port = _split(address)
    family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
    sock = gsocket.socket(family, gsocket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer's distribution (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


# -- the floor ---------------------------------------------------------------------


class FloorPool:
    """The least a correct greenlet pool must do: a deque of idle items and a FIFO of
    waiters; a release hands the item straight to the oldest waiter.

    The item is committed to that waiter at release time (the waiter wakes on the
    hub's next loop turn, as ``Waiter.switch`` must run in the hub), so nobody can
    overtake it and ``idle`` stays empty while anyone waits. No timeouts, no health,
    no interruption safety: a floor, not a pool.
    """

    __slots__ = ("_hub", "_idle", "_run_callback", "_waiters")

    def __init__(self, items: list[Any]) -> None:
        self._idle: deque[Any] = deque(items)
        self._waiters: deque[Any] = deque()
        self._hub = get_hub()
        self._run_callback = self._hub.loop.run_callback

    def acquire(self) -> Any:
        idle = self._idle
        if idle:  # never non-empty while waiters exist
            return idle.pop()
        waiter = Waiter(self._hub)
        self._waiters.append(waiter)
        return waiter.get()

    def release(self, item: Any) -> None:
        waiters = self._waiters
        if waiters:
            self._run_callback(waiters.popleft().switch, item)
        else:
            self._idle.append(item)

    @property
    def items(self) -> list[Any]:
        return list(self._idle)


# -- cooperative threading primitives for the threading-based peers ----------------


class CoopCondition:
    """``threading.Condition`` whose waits park the greenlet, not the OS thread.

    The same algorithm as the standard library's (FIFO list of per-waiter locks), on
    gevent locks: what ``threading.Condition`` becomes under ``monkey.patch_all()``.
    """

    def __init__(self, lock: Any = None) -> None:
        self._lock: Any = lock if lock is not None else _GRLock()
        self.acquire: Callable[..., bool] = self._lock.acquire
        self.release: Callable[[], None] = self._lock.release
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        save = getattr(self._lock, "_release_save", None)
        if save is not None:
            return save()
        self._lock.release()
        return None

    def _acquire_restore(self, state: Any) -> None:
        restore = getattr(self._lock, "_acquire_restore", None)
        if restore is not None:
            restore(state)
        else:
            self._lock.acquire()

    def wait(self, timeout: float | None = None) -> bool:
        waiter = _g_allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        saved = self._release_save()
        got = False
        try:
            if timeout is None:
                waiter.acquire()
                got = True
            elif timeout > 0:
                got = bool(waiter.acquire(True, timeout))
            else:
                got = bool(waiter.acquire(False))
            return got
        finally:
            self._acquire_restore(saved)
            if not got:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        endtime: float | None = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = monotonic() + waittime
                else:
                    waittime = endtime - monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        waiters = self._waiters
        while waiters and n > 0:
            n -= 1
            with contextlib.suppress(RuntimeError):
                waiters.popleft().release()

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


_COOP_THREADING = SimpleNamespace(
    Lock=_g_allocate_lock,
    RLock=_GRLock,
    Condition=CoopCondition,
    get_ident=_g_get_ident,
)


@contextlib.contextmanager
def cooperative_threading(*modules: ModuleType) -> Iterator[None]:
    """Give ``modules`` gevent-cooperative ``threading`` primitives, then restore."""
    saved = [(m, m.threading) for m in modules]
    try:
        for m in modules:
            m.threading = _COOP_THREADING  # type: ignore[attr-defined]
        yield
    finally:
        for m, original in saved:
            m.threading = original  # type: ignore[attr-defined]


# -- adapters ----------------------------------------------------------------------


@dataclass
class Adapter:
    """One pool under test, reduced to what the scenarios call.

    ``acquire(arg)`` when ``arg`` is not None, else ``acquire()``; ``release(lease)``;
    ``io(lease)`` gives the object with ``sendall``/``recv``; ``call()`` is a
    zero-argument acquire for scenario A's loop, the probes of observed behaviour and
    the warm-up (the contended workers call ``acquire(arg)`` themselves).
    """

    name: str
    acquire: Callable[..., Any]
    release: Callable[[Any], None]
    io: Callable[[Any], Any]
    limit: int
    arg: Any = None
    timeout_kind: str = "per call"  # "per call" | "pool-wide" | "none"
    acquire_timeout: Callable[[float], Any] | None = None  # acquire bounded by t seconds
    notes: list[str] = field(default_factory=list)

    def call(self) -> Callable[[], Any]:
        if self.arg is None:
            return self.acquire
        acquire, arg = self.acquire, self.arg

        def call() -> Any:  # a Python closure, not functools.partial: a Python-to-Python
            return acquire(arg)  # call adds no C stack, which every greenlet switch copies

        return call


def _identity(x: Any) -> Any:
    return x


def _close_sock(sock: Any) -> None:
    sock.close()


@contextlib.contextmanager
def make_adapter(kind: str, address: str, size: int, timeout: float) -> Iterator[Adapter]:
    """The pool ``kind`` over connections to ``address``, ``size`` at most, acquire
    timeout ``timeout`` where it has one; closed (and every socket with it) on exit."""
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ValueError(f"unknown implementation {kind!r}")
    with factory(address, size, timeout) as adapter:
        yield adapter


@contextlib.contextmanager
def _deque(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    socks = [connect(address) for _ in range(size)]
    d: deque[Any] = deque(socks)
    try:
        yield Adapter("deque", d.pop, d.append, _identity, size, timeout_kind="none")
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _floor(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    socks = [connect(address) for _ in range(size)]
    pool = FloorPool(socks)
    try:
        yield Adapter("floor", pool.acquire, pool.release, _identity, size, timeout_kind="none")
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _lbpool_pool(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    from lbpool.config import PoolConfig
    from lbpool.connection import PooledConnection
    from lbpool.pool import Pool

    pool = Pool(address, pool=PoolConfig(max_size=size, acquire_timeout=timeout))
    try:
        yield Adapter(
            "lbpool.Pool",
            pool.acquire,
            PooledConnection.release,
            _identity,
            size,
            acquire_timeout=pool.acquire,
        )
    finally:
        pool.close(1.0)


@contextlib.contextmanager
def _lbpool_manager(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    from lbpool.connection import PooledConnection
    from lbpool.manager import PoolManager

    manager = PoolManager(
        {
            "backends": {
                "bench": {
                    "servers": [address],
                    "pool": {"max_size": size, "acquire_timeout": timeout},
                }
            }
        }
    )

    def bounded(t: float) -> Any:
        return manager.get("bench", t)

    try:
        yield Adapter(
            "manager.get",
            manager.get,
            PooledConnection.release,
            _identity,
            size,
            arg="bench",
            acquire_timeout=bounded,
        )
    finally:
        manager.close(1.0)


def _sqlalchemy_modules() -> tuple[ModuleType, ...]:
    try:
        import sqlalchemy.pool.impl as impl
        import sqlalchemy.util.queue as squeue
    except ImportError as exc:
        raise PeerMissing(f"SQLAlchemy not importable: {exc}") from exc
    return impl, squeue


def _queue_pool(address: str, size: int, timeout: float) -> Any:
    from sqlalchemy.pool import QueuePool

    return QueuePool(
        lambda: connect(address),
        pool_size=size,
        max_overflow=0,
        timeout=timeout,
        reset_on_return=None,
    )


@contextlib.contextmanager
def _sqlalchemy(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    modules = _sqlalchemy_modules()
    with cooperative_threading(*modules):
        pool = _queue_pool(address, size, timeout)
        fairy = pool.connect()
        close = type(fairy).close
        close(fairy)
        try:
            yield Adapter(
                "sqlalchemy",
                pool.connect,
                close,
                _fairy_socket,
                size,
                timeout_kind="pool-wide",
                acquire_timeout=None,
                notes=["QueuePool(creator, pool_size, max_overflow=0, reset_on_return=None)"],
            )
        finally:
            with gevent.Timeout(5.0, False):  # bounded, as _gcp's close (its queue's lock)
                pool.dispose()


def _fairy_socket(fairy: Any) -> Any:
    return fairy.dbapi_connection


def _gcp_modules() -> tuple[ModuleType, ...]:
    try:
        import generic_connection_pool.threading.locks as locks
        import generic_connection_pool.threading.pool as gpool
    except ImportError as exc:
        raise PeerMissing(f"generic-connection-pool not importable: {exc}") from exc
    return gpool, locks


def _gcp_pool(address: str, size: int, timeout: float | None) -> Any:
    from generic_connection_pool.threading import BaseConnectionManager, ConnectionPool

    class _SocketManager(BaseConnectionManager[tuple[str, int], Any]):
        """Creates the same gevent sockets as every other pool here (no liveness peek)."""

        def create(self, endpoint: tuple[str, int], timeout: float | None = None) -> Any:
            return connect(f"{endpoint[0]}:{endpoint[1]}", timeout)

        def dispose(
            self, endpoint: tuple[str, int], conn: Any, timeout: float | None = None
        ) -> None:
            conn.close()

    return ConnectionPool[tuple[str, int], Any](
        _SocketManager(),
        acquire_timeout=timeout,
        min_idle=size,
        max_size=size,
        total_max_size=size,
        idle_timeout=3600.0,
        max_lifetime=7200.0,
    )


def _gcp_close(pool: Any, endpoint: tuple[str, int]) -> None:
    """Close a generic-connection-pool pool, unless a connection is still out.

    Its ``close()`` loops until every connection is back, never yielding while its
    locks are free (0.8.1: the timeout bounds only its lock waits): with one still
    lent, or a slot still reserved by a dial that was killed, it would hold the hub
    for ever, past any ``gevent.Timeout``. Then the idle sockets are taken out and
    closed here, and the pool is dropped: the lent ones are their holders'."""
    free = pool.get_endpoint_pool_size(endpoint, acquired=False)
    if pool.get_endpoint_pool_size(endpoint) == free:
        pool.close(timeout=1.0)
        return
    for _ in range(free):  # each takes an idle one: none dials while one is free
        pool.acquire(endpoint, timeout=0.0).close()


@contextlib.contextmanager
def _gcp(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    modules = _gcp_modules()
    endpoint = _split(address)
    with cooperative_threading(*modules):
        pool = _gcp_pool(address, size, timeout)
        release_to = pool.release

        def release(conn: Any) -> None:
            release_to(conn, endpoint)

        def bounded(t: float) -> Any:
            return pool.acquire(endpoint, timeout=t)

        try:
            yield Adapter(
                "gcp",
                pool.acquire,
                release,
                _identity,
                size,
                arg=endpoint,
                acquire_timeout=bounded,
                notes=["threading.ConnectionPool, min_idle=max_size=total_max_size"],
            )
        finally:
            # bounded: a worker killed at the end of a contended round can leave the
            # pool's lock held, and its close() would wait for it for ever
            with gevent.Timeout(5.0, False):
                _gcp_close(pool, endpoint)


@contextlib.contextmanager
def _gsocketpool(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    try:
        from gsocketpool import Pool as GPool
        from gsocketpool.connection import Connection
    except ImportError as exc:
        raise PeerMissing(f"gsocketpool not importable: {exc}") from exc

    class _Conn(Connection):
        def __init__(self) -> None:
            self.sock: Any = None

        def open(self) -> None:
            self.sock = connect(address)

        def close(self) -> None:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

        def get(self) -> Any:
            return self.sock

        def is_connected(self) -> bool:
            return self.sock is not None

    pool = GPool(_Conn, {}, max_connections=size, reap_expired_connections=False)

    def io(conn: Any) -> Any:
        return conn.sock

    try:
        yield Adapter(
            "gsocketpool",
            pool.acquire,
            pool.release,
            io,
            size,
            timeout_kind="none",
            notes=["no acquire timeout: polls 10 x gevent.sleep(0.1), then PoolExhaustedError"],
        )
    finally:
        for conn in list(pool._pool) + list(pool._using):
            conn.close()
        pool._pool.clear()
        pool._using.clear()


@contextlib.contextmanager
def _dial(address: str, size: int, timeout: float) -> Iterator[Adapter]:
    def dial() -> Any:
        return connect(address, timeout)

    yield Adapter("dial/request", dial, _close_sock, _identity, 0, timeout_kind="per call")


_FACTORIES: dict[str, Callable[[str, int, float], contextlib.AbstractContextManager[Adapter]]] = {
    "deque": _deque,
    "floor": _floor,
    "lbpool.Pool": _lbpool_pool,
    "manager.get": _lbpool_manager,
    "sqlalchemy": _sqlalchemy,
    "gcp": _gcp,
    "gsocketpool": _gsocketpool,
    "dial/request": _dial,
}


# -- probes that need a peer's internals -------------------------------------------


def timeout_probe(kind: str, address: str, size: int, timeout: float) -> dict[str, Any]:
    """Exhaust a pool of ``kind``, then ask for one more bounded by ``timeout``.

    Returns what happened: ``raised`` (exception name or None), ``elapsed`` seconds,
    ``honored`` (an error came within [timeout, timeout + 0.25 s]).
    """
    # QueuePool's timeout is a pool setting, not an argument of connect(): the only
    # way to bound its wait is a pool built with it.
    pool_timeout = timeout if kind == "sqlalchemy" else 60.0
    with make_adapter(kind, address, size, pool_timeout) as ad:
        acquire = ad.call()
        held = [acquire() for _ in range(size)]
        bounded: Callable[[], Any]
        if ad.acquire_timeout is not None:
            fn = ad.acquire_timeout

            def bounded() -> Any:
                return fn(timeout)
        else:
            bounded = acquire  # sqlalchemy: the pool's own timeout; gsocketpool: none
        t0 = monotonic()
        raised: str | None = None
        extra: Any = None
        guard = gevent.Timeout(max(5.0, timeout * 10))
        guard.start()
        try:
            extra = bounded()
        except gevent.Timeout as exc:
            if exc is not guard:
                raise
            raised = "never (gave up after 5 s)"
        except Exception as exc:
            raised = type(exc).__name__
        finally:
            guard.close()
        elapsed = monotonic() - t0
        if extra is not None:
            held.append(extra)
        for lease in held:
            ad.release(lease)
    honored = raised is not None and timeout * 0.9 <= elapsed <= timeout + 0.25
    return {"raised": raised, "elapsed_s": round(elapsed, 4), "honored": honored}


def unpatched_handoff_probe(kind: str, address: str, wait: float = 0.3) -> dict[str, Any]:
    """Without cooperative primitives (no monkey-patching): a pool of one, held; a
    greenlet releases it after 10 ms; does a second caller get it, or does its wait
    block the hub until its own timeout runs out?"""
    if kind == "sqlalchemy":
        _sqlalchemy_modules()
        pool = _queue_pool(address, 1, wait)
        lease = pool.connect()
        close = type(lease).close

        def acquire() -> Any:
            return pool.connect()

        def release(x: Any) -> None:
            close(x)

        def dispose() -> None:
            pool.dispose()

    elif kind == "gcp":
        _gcp_modules()
        endpoint = _split(address)
        gpool = _gcp_pool(address, 1, wait)
        lease = gpool.acquire(endpoint)

        def acquire() -> Any:
            return gpool.acquire(endpoint, timeout=wait)

        def release(x: Any) -> None:
            gpool.release(x, endpoint)

        def dispose() -> None:
            gpool.close(timeout=1.0)

    else:
        raise ValueError(kind)
    releaser = gevent.spawn_later(0.01, release, lease)
    t0 = monotonic()
    got: Any = None
    error: str | None = None
    try:
        got = acquire()
    except Exception as exc:
        error = type(exc).__name__
    elapsed = monotonic() - t0
    releaser.join(1.0)
    if got is not None:
        release(got)
    dispose()
    return {
        "cooperative": got is not None and elapsed < wait / 2,
        "elapsed_s": round(elapsed, 4),
        "error": error,
    }


# -- scenario R: redis-py over lbpool against redis-py's own pools -------------------
#
# redis-py dials with the ``socket`` module and guards its pools with ``threading``
# locks. The bench runs unpatched, so while scenario R runs ``redis.connection`` gets
# what ``monkey.patch_all()`` would give it (gevent's socket module, cooperative
# ``threading``), and ``BlockingConnectionPool`` a gevent ``LifoQueue``: the way
# redis-py runs in a gevent worker. lbpool's pool needs none of it (its sockets are
# gevent's already).

# Each lbpool row has the connections of the redis-py pool it is compared with:
# ``max_size`` the blocking pool's ``max_connections`` (the bench's SIZE), and
# ``max_size`` one per greenlet, which is what the unbounded ``ConnectionPool`` opens.
REDIS_IMPLS = (
    "lbpool.contrib.redis",
    "lbpool.contrib.redis (max_size = greenlets)",
    "redis.ConnectionPool",
    "redis.BlockingConnectionPool",
)


def redis_missing() -> str | None:
    """Why scenario R cannot run here, or None."""
    import shutil

    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'lbpool[redis]')"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (e.g. apt-get install redis-server)"
    return None


@contextlib.contextmanager
def redis_server(timeout: float = 15.0) -> Iterator[str]:
    """A ``redis-server`` on a free loopback port, no persistence; yields its address
    once it says it is ready; stopped (and reaped) on exit."""
    import shutil

    from gevent import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        raise PeerMissing("redis-server is not installed")
    for _ in range(3):
        with socket.socket() as probe:  # bind-then-close: may be taken before redis binds
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        drain = None
        try:
            ready = False
            with gevent.Timeout(timeout, False):
                for line in proc.stdout:
                    if "Ready to accept connections" in line:
                        ready = True
                        break
            if ready:
                drain = gevent.spawn(lambda p=proc: [None for _ in p.stdout])
                yield f"127.0.0.1:{port}"
                return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if drain is not None:
                drain.join(timeout=2)
                drain.kill()
            proc.stdout.close()
    raise RuntimeError("redis-server did not start (3 tries)")


@contextlib.contextmanager
def redis_client(
    kind: str, address: str, size: int, timeout: float, greenlets: int = 0
) -> Iterator[Any]:
    """A ``redis.Redis`` for ``kind`` (one of ``REDIS_IMPLS``) on ``address``:
    ``lbpool.contrib.redis`` and redis-py's ``BlockingConnectionPool`` hold at most
    ``size`` connections; ``lbpool.contrib.redis (max_size = greenlets)`` at most
    ``greenlets``; redis-py's ``ConnectionPool`` is unbounded (bounded, it raises instead
    of waiting; it opens one per greenlet). RESP2 for all."""
    import gevent.queue
    import redis
    import redis.connection

    from lbpool.contrib.redis import ConnectionPool as LbpoolRedisPool
    from lbpool.manager import PoolManager

    host, port = _split(address)
    module: Any = redis.connection  # its ``socket`` is an import, not an export
    blocking_pool: Any = redis.BlockingConnectionPool  # untyped __init__
    saved_socket = module.socket
    manager = None
    pool: Any = None
    with cooperative_threading(redis.connection):
        module.socket = gsocket
        try:
            if kind in REDIS_IMPLS[:2]:
                max_size = size if kind == REDIS_IMPLS[0] else max(greenlets, 1)
                manager = PoolManager(
                    {"backends": {"redis": {"servers": [address], "pool": {
                        "max_size": max_size, "min_idle": 1, "acquire_timeout": timeout}}}}
                )  # fmt: skip
                pool = LbpoolRedisPool(manager, "redis", protocol=2)
            elif kind == REDIS_IMPLS[2]:
                pool = redis.ConnectionPool(host=host, port=port, protocol=2)
            elif kind == REDIS_IMPLS[3]:
                pool = blocking_pool(
                    host=host, port=port, protocol=2, max_connections=size, timeout=timeout,
                    queue_class=gevent.queue.LifoQueue,
                )  # fmt: skip
            else:
                raise ValueError(f"unknown redis implementation {kind!r}")
            client = redis.Redis(connection_pool=pool)
            try:
                yield client
            finally:
                client.close()
                pool.disconnect()
        finally:
            module.socket = saved_socket
            if manager is not None:
                manager.close(timeout=5)
