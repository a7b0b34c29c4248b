"""``PoolManager.get``'s routing, compiled: the native base class ``Router``.

``PoolManager`` (lbpool/manager.py, interpreted) subclasses ``Router``; compiled with
mypyc (setup.py's ``COMPILED``), ``get`` -- also named ``acquire`` -- then runs with no
interpreted frame between the caller and the compiled pool: the name's lookup, the
owner check and a one-server backend's direct path (``Backend._direct``) are C, and
its ``Pool.acquire`` a direct C call. Everything else it calls is the manager's
(``_route_other``, ``Backend.acquire``, ``Backend._failover``), as before.

The arguments and the result are typed ``Any``: compiled code checks a parameter's
declared type at entry, with mypyc's message, and a result's on return; lbpool's own
checks (``check_key``, ``valid_timeout``, ``_check_name``) must name a bad argument,
and what ``Backend.acquire`` returns is passed on unchecked, as the interpreted
``get`` did. ``PoolManager`` declares the public types.

What a native base changes for ``PoolManager`` (compiled only): the fields declared
here are struct fields, typed and never deleted (``mock.patch.object`` on one cannot
undo itself: pytest's ``monkeypatch.setattr`` can), and a subclass cannot also
inherit a base with its own instance layout (non-empty ``__slots__``,
``threading.local``).

``Router`` allows interpreted subclasses (``mypyc_attr``, which mypyc reads from the
source: ``lbpool._hotpath`` imports it from ``mypy_extensions`` only for the type
checker, so lbpool imports without it): ``PoolManager`` is one, and its overrides
(``_route_other``) are found by name. The fields ``get`` reads
(``_thread_id``, ``_backends``, ``_adhoc``) are declared here, so compiled they are
fields of the instance's struct; ``ThreadBound``'s fork hook writes ``_thread_id``
through the same attribute. Under ``LBPOOL_PURE_PYTHON=1`` this is a plain class.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from lbpool import _ownership
from lbpool._affinity import check_key
from lbpool._hotpath import mypyc_attr
from lbpool._ownership import ThreadBound
from lbpool._waiters import valid_timeout
from lbpool.errors import DialError, LbpoolError, PoolClosed, PoolExhausted

# what a one-server backend's failed acquisition fails over on (acquire_direct, Router.get)
_FAILS_OVER: Final = (DialError, PoolClosed, PoolExhausted)

if TYPE_CHECKING:
    from lbpool.manager import Backend
    from lbpool.pool import Pool

# What get calls on every call, bound once as ``Final`` names (as lbpool/pool.py does):
# compiled, each is a C static, not a lookup in the module's dict
_monotonic: Final = monotonic
get_ident: Final = _ownership.get_ident


def _check_name(name: object) -> None:
    """A backend name is a str (a configured name, or a ``host:port``); an unhashable
    one is a ``TypeError`` naming the argument, raised before anything changes (a
    hashable non-str is simply unknown: ``UnknownBackend``). Never yields."""
    try:
        hash(name)
    except TypeError:
        raise TypeError(
            f"name must be a str (a backend name or 'host:port'), got a {type(name).__name__}"
        ) from None


@mypyc_attr(allow_interpreted_subclasses=True)
class Router(ThreadBound):
    """The base of ``PoolManager``: its ``get``. Its fields are ``PoolManager``'s, set
    by ``PoolManager.__init__`` (and ``ThreadBound``)."""

    # ThreadBound's fields, declared here too (as Pool does): compiled, they are fields
    # of the instance's struct, read by get on every call
    _thread_id: int
    _fork_gen: int
    _hub: Any
    _backends: dict[str, Backend]
    _adhoc: dict[str, Backend]  # every spelling of an ad-hoc name -> its backend

    def _route_other(self, name: Any, timeout: object = None) -> Any:
        """The ad-hoc backend for a ``host:port`` name: ``PoolManager``'s (``name``
        any object: compiled, a ``str`` here would be checked, with mypyc's message,
        before the manager's own check)."""
        raise NotImplementedError

    def get(self, name: Any, timeout: Any = None, key: Any = None) -> Any:
        """Borrow a connection to ``name``: ``PoolManager.get`` (also ``acquire``), whose
        declaration in lbpool/manager.py documents it. Returns a ``PooledConnection``,
        typed ``Any`` here so the compiled build does not check what an interpreted
        path (``Backend.acquire``, a test double of it) hands back."""
        # Its calls into Python are made by the functions below it: compiled, such a
        # call's argument array is in this frame, on the stack every greenlet switch
        # below it copies out and back (bench B)
        if key is not None:
            _check_key(key)
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            _owner_check(self)
        backend: Any = backend_for(self, name, timeout)  # Any: its results pass unchecked
        pool: Pool | None = backend._direct
        if pool is not None and pool.breaker.is_closed:
            # Backend.acquire's one-server path, without its frame; the other paths
            # check the timeout in Backend.acquire
            if timeout is not None:
                timeout = _valid_timeout(timeout, backend._label)
            # acquire_direct, inlined: one native frame fewer below a wait (bench B)
            start = _monotonic()
            try:
                return pool.acquire() if timeout is None else pool.acquire(timeout)
            except LbpoolError as exc:  # one class to match: a smaller frame (bench B)
                if not isinstance(exc, _FAILS_OVER):
                    raise
                return fail_over(backend, pool, start, timeout, exc)
        return _backend_acquire(backend, timeout, key)


# Router.get's calls into Python (interpreted functions and methods), each out of its
# frame (see there)
def _check_key(key: Any) -> None:
    check_key(key)


def _owner_check(router: Router) -> None:
    router._check_owner()


def _valid_timeout(timeout: Any, label: str) -> float:
    return valid_timeout(timeout, label)


def _backend_acquire(backend: Any, timeout: Any, key: Any) -> Any:
    return backend.acquire(timeout, key)


def backend_for(router: Router, name: Any, timeout: object = None) -> Any:
    """The backend ``name`` routes to in ``router``: a configured one, a known ad-hoc
    ``host:port``, else ``router._route_other`` (which checks ``timeout`` before it
    makes a pool). An unhashable ``name`` is a ``TypeError`` naming it. Used by
    ``Router.get`` and ``PoolManager.call``; a function, not a method: compiled, a
    method call on a class that allows interpreted subclasses is a lookup by name."""
    try:  # a Backend is always true: "is None" is "or" without asking it
        backend = router._backends.get(name)
        if backend is None:
            backend = router._adhoc.get(name)
            if backend is None:
                backend = router._route_other(name, timeout)
    except TypeError:
        _check_name(name)  # an unhashable name: say so, naming the argument
        raise
    return backend


def acquire_direct(route: Any, pool: Pool, timeout: float | None) -> Any:
    """A one-server backend's path (``Backend._direct``; ``route`` is the ``Backend``):
    ``pool.acquire(timeout)`` (``timeout`` already checked), its breaker closed, so
    there is nothing to pick, no panic and no warming. A failed acquisition
    (``DialError``, ``PoolClosed``, ``PoolExhausted``) fails over through
    ``route._failover`` with what is left of the one deadline, which starts before the
    pool's acquire. Called by ``Router.get`` and ``Backend.acquire``."""
    start = _monotonic()
    try:  # no argument at all is the cheapest call into the compiled pool
        return pool.acquire() if timeout is None else pool.acquire(timeout)
    except _FAILS_OVER as exc:
        return fail_over(route, pool, start, timeout, exc)


def fail_over(route: Any, pool: Pool, start: float, timeout: float | None, exc: Exception) -> Any:
    """A one-server backend's failed acquisition: ``route._failover`` with what is
    left of the deadline that began at ``start``. A call out of ``Router.get``, whose
    frame is below every wait (bench B)."""
    return route._failover(start, timeout, {pool: exc}, None)
