"""Pool: one server's connections, its waiters, sizing, health and lifetime.

Every count is kept so that ``size == idle + in_use + pending`` at every switch point,
and every path a greenlet can be interrupted on (``gevent.Timeout``, ``GreenletExit``
while waiting, dialing or checking) gives back what it held: a connection handed to
a waiter that died is passed on, a reserved dial slot is freed, a half-dialed socket
is closed. That is the known failure of pools under gevent, designed out here.

One deadline bounds an acquisition: waiting, each borrow check (at most the time left),
the dial with its setup hook. Work that may outlast the deadline (a dial, a configured
check) runs as an errand in its own greenlet, so the caller leaves on time while the
work reaches its verdict for the breaker; what the errand gets is handed on.

Where state changes (none of these yields): a slot leaves only through ``_slot_gone``
(via ``_retire`` for a connection, ``_unreserve`` for a dial slot); capacity reaches
waiters only through ``_hand_on`` (and its inlined copy in ``_return``). The waiter
queue, its outcomes and its timer are ``lbpool._waiters``; the upkeep loop is
``lbpool._upkeep``; the owner check is ``lbpool._ownership``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import traceback
from collections.abc import Callable
from time import monotonic
from typing import Any, Final, SupportsFloat, SupportsIndex, cast

import gevent
from gevent.event import Event
from gevent.exceptions import InvalidSwitchError
from greenlet import getcurrent

from lbpool import _args, _hublag, _ownership
from lbpool._args import Flag, Text
from lbpool._demand import DemandWindow
from lbpool._handoff import Waiter
from lbpool._hublag import hub_lag
from lbpool._net import close_quietly
from lbpool._ownership import (
    Forked,
    ThreadBound,
    fork_generation,
    read_from_any_thread,
)
from lbpool._snapshot import CLOSE_REASONS, WAIT_BUCKETS, server_stats
from lbpool._upkeep import Upkeep
from lbpool._waiters import (
    BROKEN,
    CLOSED,
    PERMIT,
    TIMED_OUT,
    WAITING,
    Outcome,
    WaitQueue,
    valid_timeout,
)
from lbpool.breaker import PANIC_DIAL, Breaker
from lbpool.config import Address, BreakerConfig, DialConfig, HealthCheckConfig, PoolConfig
from lbpool.config import parse_address as _parse_address
from lbpool.connection import (
    SOCK_EXPOSED,
    PooledConnection,
    _Conn,
    _is_network_error,
)
from lbpool.dial import dial as _dial
from lbpool.errors import DialError, PoolClosed, PoolExhausted, PoolTimeout
from lbpool.health import Unhealthy, check_health, peek_alive, peek_unread, tls_unread
from lbpool.stats import ServerStats

_READ = 1  # libev/libuv EV_READ, for the idle connections' watchers

_log = logging.getLogger("lbpool")
# checked_at of a connection the server's failure made suspect: checked before reuse
_SUSPECT: Final = float("-inf")
# after a dial that failed on this side (DialError.local), how long refills wait (s)
_LOCAL_BACKOFF: Final = 1.0

# What the hot path calls or reads, bound once as ``Final`` names: the compiled build
# keeps those in C statics, where any other module global costs a dict lookup per use
# (and a method named on an object, a lookup by name: hence ``_run_callback`` below).
_monotonic: Final = monotonic
get_ident: Final = _ownership.get_ident
_WAITING: Final = WAITING
_WATCH_LAG: Final = _hublag.WATCH_LAG
_getcurrent: Final = getcurrent
# typed as a variable-length tuple, not the 13-float tuple it is: mypyc keeps a
# fixed-length tuple of floats unboxed and would box it afresh on every use
_WAIT_BUCKETS: Final[tuple[float, ...]] = WAIT_BUCKETS


def _wait_bucket(waited: float) -> int:
    """The histogram bucket of a wait of ``waited`` seconds: the index of the first
    ``WAIT_BUCKETS`` bound at or above it (``len(WAIT_BUCKETS)`` past the last), as
    ``bisect.bisect_left``. A scan from the smallest: waits are mostly short, so it
    stops after a few native float compares, where bisect made a generic
    ``PySequence_GetItem`` and rich compare for each of its four probes (bench B)."""
    i = 0
    for bound in _WAIT_BUCKETS:
        if waited <= bound:
            return i
        i += 1
    return i


SetupHook = Callable[[socket.socket], object]


_THIS_FILE = __file__  # the .py on the pure path; compiled, its frames do not exist


def _check_settings(
    pool: object, dial: object, health_check: object, setup: object, where: str
) -> None:
    """``TypeError`` unless each of ``Pool()``'s and ``reconfigure()``'s settings is
    its config class (or None), and ``setup`` a callable (or None)."""
    _args.check_type(pool, PoolConfig, "pool must be a PoolConfig", where)
    _args.check_type(dial, DialConfig, "dial must be a DialConfig", where)
    what = "health_check must be a HealthCheckConfig"
    _args.check_type(health_check, HealthCheckConfig, what, where)
    _args.valid_callable(setup, "setup", where)


# DialConfig's fields that only bound the making of a connection and leave nothing on it
# (the socket comes back blocking whatever ``dial.timeout`` was): a reload that changes
# only these retires nothing. Every other field -- TCP options, keepalive, TLS, and any
# field added later -- shapes the connection (``_shape``).
_DIAL_BOUNDS: Final = ("timeout",)


def _shape(dial: DialConfig, setup: object) -> tuple[object, ...]:
    """What a connection is made with, beyond its address (a pool's is fixed; the
    name is resolved afresh by every dial): the dial settings that shape it and the
    ``setup`` hook (a config ``Hook`` is equal to one with the same import string and
    function; any other callable only to itself). ``reconfigure`` retires the
    connections made under a different one (``Pool._outdated``)."""
    return (tuple((k, v) for k, v in dial if k not in _DIAL_BOUNDS), setup)


def _caller_stack() -> str:
    """The acquiring caller's stack (for the leak warning), ending in the caller's own
    frame: this module's frames are left out (the compiled build has none to show)."""
    frames = traceback.extract_stack()
    end = len(frames)
    while end and frames[end - 1].filename == _THIS_FILE:
        end -= 1
    return "".join(traceback.format_list(frames[:end]))


def _nothing() -> None:
    """``on_demand`` of a pool no upkeep keeps."""


# The longest an at-rest pool with idle connections goes without an upkeep pass.
_MAX_REST = 60.0
# Refill dials in flight per pool: like HikariCP or database/sql, connections are added
# a few at a time (each that succeeds starts the next), so a large min_idle neither
# floods the hub with greenlets nor keeps dialing a server whose breaker opened.
_REFILL_DIALS = 4
# Background health checks in flight per pool (each an errand with its own deadline,
# health_check.timeout): a server whose connections stop answering ties up at most
# these, and never the upkeep loop.
_BACKGROUND_CHECKS = 2
# How long past its budget a caller waits for a dial errand before calling it overrun
# (scheduling slack: a dial that ran out of time is reaching its verdict by then).
_OVERRUN_GRACE = 0.25
# close(): how long greenlets of the pool's own get to die when killed, if close's
# timeout leaves no time (0, used up) or sets none; one still running then is abandoned
_KILL_GRACE = 0.5


class _Errand:
    """A dial or check run in its own greenlet for a caller who may not wait for its
    end. ``detached``: the caller has gone, so the errand hands on what it gets."""

    __slots__ = ("detached",)

    def __init__(self) -> None:
        self.detached = False


class Pool(ThreadBound):
    """The connections to one server.

    ``max_size`` bounds open connections plus dials in progress. Waiters are served
    first come, first served, by direct handoff. Idle connections are reused last in,
    first out, so the coldest ones age out above ``min_idle``; at most ``max_idle`` are
    kept (a connection coming back beyond it is closed at once, reason ``idle``).
    ``min_idle: auto`` keeps as many open as the recent peak in use (``lbpool._demand``).
    """

    # ThreadBound's fields, declared here too: compiled (mypyc), they are then fields of
    # the instance's own struct; a Python base's are looked up by name, and the hot
    # path reads ``_thread_id`` on every acquire and return
    _thread_id: int
    _fork_gen: int
    _hub: Any

    def __init__(
        self,
        address: Address | Text,
        *,
        pool: PoolConfig | None = None,
        dial: DialConfig | None = None,
        health_check: HealthCheckConfig | None = None,
        breaker: Breaker | None = None,
        setup: SetupHook | None = None,
        backend: Text | None = None,
        weight: SupportsIndex = 1,
        upkeep: Flag = True,
    ) -> None:
        """A pool of connections to ``address``: an ``Address`` or a ``host:port``
        string. ``pool``, ``dial`` and ``health_check``: its settings (the configs'
        defaults for None); ``breaker``: its circuit breaker (a new one with
        ``BreakerConfig()``'s settings for None); ``setup``: called with each new
        socket; ``backend``: the name its stats carry (a str or None); ``weight``: its
        share for the ``weighted`` strategy (an integer >= 1); ``upkeep``: if true,
        start its own upkeep greenlet (a managed pool's is the manager's). A value of
        the wrong type raises ``TypeError`` naming it (``lbpool._args``), an address
        string that does not parse ``ValueError``, before anything is made or
        started."""
        if not isinstance(address, (Address, str)):
            raise TypeError(
                f"address must be a 'host:port' string or an Address, got {_args.got(address)}"
            )
        self.address = address if isinstance(address, Address) else _parse_address(address)
        self.name = str(self.address)
        _check_settings(pool, dial, health_check, setup, self.name)
        _args.check_type(breaker, Breaker, "breaker must be a Breaker", self.name)
        _args.check_type(backend, str, "backend must be a str", self.name)
        start_upkeep = _args.truth(upkeep, "upkeep", self.name)
        self.backend = cast("str | None", backend)
        self.weight = _args.valid_weight(weight, self.name)
        self.owner_kind = "pool"  # named in the wrong-thread error; "manager" when managed
        self.breaker = breaker if breaker is not None else Breaker(self.name, BreakerConfig())
        # DESIGN 22: slots still held at this server by pools a reload removed (draining);
        # they count against max_size here until they come back (_inherit, _bequeath)
        self._inherited = 0
        # a draining pool: the pool now serving its server, told as each slot comes back
        self._heir: Pool | None = None
        self._heir_gen = 0  # the fork generation the link was made in (a child drops it)
        # settings generations (``_outdated``): bumped by a reconfigure that changes how
        # connections are made or how long they live; each connection carries the one it
        # was dialed under (``_Conn.gen``). ``_shaped_gen``: the generation of the last
        # change of how they are made: a connection dialed before it is retired
        self._gen = 0
        self._shaped_gen = 0
        self._set_config(
            pool or PoolConfig(), dial or DialConfig(), health_check or HealthCheckConfig(), setup
        )

        self._idle: list[_Conn] = []  # a LIFO stack, oldest first (a list: C calls compiled)
        self._busy: dict[_Conn, PooledConnection] = {}
        self._size = 0  # open connections + reserved dial slots
        self._pending = 0  # reserved dial slots: dials in progress or about to start
        # connections under a check, or got by an errand (a dial or check in its own
        # greenlet) for a caller not awake yet: counted as pending in stats
        self._held = 0
        self._handed = 0  # connections handed to a waiter that has not woken yet
        self._refilling = 0  # of which: upkeep refills
        # background checks in flight (errands), at most _BACKGROUND_CHECKS: connections
        # upkeep took off the idle stack, counted as idle by everything that sizes the
        # pool (_resting), so a check round never dials their replacements
        self._checking = 0
        self._closing = False
        self._closed = False
        self._drained = Event()
        # a connection became idle, a refill or a background check ended
        self._changed = Event()
        # called by an acquisition that had to wait or dial: wakes an upkeep at rest
        # (this pool's own, or the manager's, which sets it)
        self.on_demand: Callable[[], object] = _nothing
        self._dialers: set[gevent.Greenlet] = set()  # refills and errands: close() kills them
        # what each own greenlet holds, given back if close() kills it before it ran or
        # abandons it (see _spawn_own); a greenlet's entry goes when its body has ended
        self._own: dict[gevent.Greenlet, Callable[[], None]] = {}
        # own greenlets that refused to die at close(): what they held is given back,
        # so their bodies account for nothing more (_given_up)
        self._abandoned: set[gevent.Greenlet] = set()
        # sockets of dials and checks in flight, whoever runs them (a caller, an errand,
        # upkeep): close() closes them, ending the dial or check at once; a forked child
        # closes its copies, so nothing copied from the parent reads the parent's replies
        self._in_flight: set[Any] = set()
        self._last_dial_error: BaseException | None = None
        # when a dial last failed on this side (DialError.local), or a connection was
        # stirred right after its dial, unused: fill() waits _LOCAL_BACKOFF s after it,
        # as no breaker opens to stop it
        self._local_failure_at = -_LOCAL_BACKOFF
        self._on_stirred = self._stirred  # bound once: the idle watchers' callback
        self._greeting_warned = False  # warned of a connection stirred before first use
        # an ad-hoc pool's: called by upkeep once the pool is unused for idle_timeout
        # (the manager then closes and forgets it); None: kept for good
        self.on_unused: Callable[[Pool], object] | None = None
        self._uses_seen = 0  # acquisitions counted when upkeep last looked ...
        self._used_at = _monotonic()  # ... and when it last saw a change, or use in progress
        self._reset_counters()
        self._bind_to_current_thread()
        self._bind_hub()
        self._upkeep: Upkeep | None = None  # a managed pool's is the manager's
        if start_upkeep:
            self._start_upkeep()

    def _bind_hub(self) -> None:
        """A new waiter queue (FIFO, one timer for the earliest deadline) on this
        thread's hub, and what the hot path calls on them bound once: a bound method
        called is a direct call, where one named on the object is a lookup by name on
        each call (the hub's, in its instance dict and its class: bench B)."""
        hub = self._hub
        self._waiters = waiters = WaitQueue(hub)
        self._join_queue: Callable[[Waiter], None] = waiters.append
        self._pop_waiter: Callable[[], Waiter] = waiters.popleft
        self._switch_out: Callable[[], object] = hub.switch  # park: run the hub
        self._hub_lag = hub_lag(hub.loop)  # seconds since the hub last polled
        self._run_callback: Callable[..., Any] = hub.loop.run_callback

    # -- configuration ------------------------------------------------------------
    def _set_config(
        self,
        pool: PoolConfig,
        dial: DialConfig,
        health_check: HealthCheckConfig,
        setup: SetupHook | None,
    ) -> None:
        self.config = pool
        self.dial_config = dial
        self.health_config = health_check
        self._setup = setup
        self._max_size = pool.max_size - self._inherited  # the slots this pool may open
        # idle never exceeds max_size anyway, so "no limit" costs the same compare
        self._max_idle = pool.max_size if pool.max_idle is None else pool.max_idle
        self._auto = pool.min_idle == "auto"
        self._min_idle = 0 if pool.min_idle == "auto" else pool.min_idle
        # min_idle auto: one bucket of the demand window per idle_timeout (> 0)
        self._demand_span = max(pool.idle_timeout, pool.upkeep_interval)
        self._max_waiting = pool.max_waiting
        self._acquire_timeout = pool.acquire_timeout
        self._check_after = pool.check_after
        self._leak_threshold = pool.leak_threshold
        self._check_configured = health_check.send is not None or health_check.hook is not None

    def reconfigure(
        self,
        *,
        pool: PoolConfig,
        dial: DialConfig,
        health_check: HealthCheckConfig,
        setup: SetupHook | None = None,
        weight: SupportsIndex = 1,
    ) -> None:
        """Apply new settings in place: nothing in use is touched.

        A smaller ``max_size`` closes idle connections beyond it now and in-use ones
        as they come back; a larger one lets waiters dial at once. Arguments are
        checked as ``Pool()``'s (``TypeError``/``ValueError``) before anything changes;
        ``pool``, ``dial`` and ``health_check`` are required.

        A change of how connections are made (``dial`` but its ``timeout``: TCP options,
        keepalive, TLS; the ``setup`` hook) starts a new generation: idle connections
        made the old way close now, in-use ones (and dials in flight) as they come back,
        all counted in ``closed`` as ``lifetime``; upkeep refills ``min_idle`` with new
        ones, a few dials at a time. A change of ``max_lifetime`` or ``lifetime_jitter``
        works out every connection's expiry again from its creation: idle ones past it
        close now, in-use ones as they come back. Nothing else retires a connection.
        """
        self._check_owner()
        _check_settings(pool, dial, health_check, setup, self.name)
        weight = _args.valid_weight(weight, self.name)
        if pool is None or dial is None or health_check is None:
            raise TypeError(f"{self.name}: reconfigure needs pool, dial and health_check")
        was, shape = self.config, _shape(self.dial_config, self._setup)
        self._set_config(pool, dial, health_check, setup)
        self._demand.span = self._demand_span
        self.weight = weight
        reshaped = _shape(dial, setup) != shape
        if (
            reshaped
            or pool.max_lifetime != was.max_lifetime
            or pool.lifetime_jitter != was.lifetime_jitter
        ):
            self._gen += 1
            if reshaped:
                self._shaped_gen = self._gen
            self._renew_idle()
        self._retire_oldest(self._size - self._max_size, "discarded")
        self._retire_oldest(len(self._idle) - self._max_idle, "idle")
        self._hand_on()  # a larger max_size: waiters may dial now

    def _expiry(self, now: float) -> float:
        cfg = self.config
        return now + cfg.max_lifetime * (1.0 - random.random() * cfg.lifetime_jitter)

    def _outdated(self, conn: _Conn, now: float) -> bool:
        """For a connection of an older settings generation (``conn.gen != _gen``: the
        one integer compare every path that pools or lends it makes first): must it be
        retired now? Yes if it was made the old way (its dial began before the last
        change of how connections are made). Else only its lifetime settings changed:
        its expiry is worked out again from its creation under the current ones, it
        joins the current generation, and it must go if that expiry has passed. Every
        path that checks a lifetime (release, a handoff, idle reuse, upkeep) sees the
        same expiry: idle connections are brought up to date by ``reconfigure`` itself,
        and none of an older generation is put back on the idle stack. Never yields."""
        if conn.gen < self._shaped_gen:
            return True
        conn.expires_at = self._expiry(conn.created_at)
        conn.gen = self._gen
        return now >= conn.expires_at

    def _renew_idle(self) -> None:
        """``reconfigure`` began a new generation: retire the idle connections it
        outdates (reason ``lifetime``), keep the rest in their order. Never yields."""
        now = _monotonic()
        idle = self._idle
        looked_at = idle[:]  # taken off at once, as in _expire_idle
        idle.clear()
        keep: list[_Conn] = []
        for conn in looked_at:
            if self._outdated(conn, now):
                self._retire(conn, "lifetime")
            else:
                keep.append(conn)
        idle.extend(keep)

    def _reset_counters(self) -> None:
        self._hits = 0
        self._misses = 0
        self._timeouts = 0
        self._shed = 0
        self._dial_failures = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._wait_counts = [0] * (len(WAIT_BUCKETS) + 1)  # queued waits, by bucket
        self._waits_served = 0
        self._waits = 0  # acquisitions that queued (served, timed out or failed)
        self._released = 0  # clean releases: handles given back with release()
        # most connections in use at once (lent + handed) since the demand window's
        # current bucket began; with _demand.seen, the peak since start. Bumped where
        # in use grows (a borrow, a dial lent, a handoff to a waiter): an int compare.
        self._peak = 0
        self._demand = DemandWindow(self._demand_span, _monotonic())
        self._closed_by = dict.fromkeys(CLOSE_REASONS, 0)

    # -- ownership: one OS thread, one process ------------------------------------
    # (ThreadBound: _check_owner refuses another OS thread, starts fresh after a fork)
    def _refusal(self, used_from: int) -> str:
        return (
            f"{self.name}: this {self.owner_kind} belongs to another thread (made in OS "
            f"thread {self._thread_id}, used from {used_from}); use one per OS thread"
        )

    def _at_fork_in_child(self) -> None:
        """Right after a fork, in the child: close our copies of every socket someone may
        be blocked on -- dials and checks in flight, connections lent (a request in
        flight) -- so a greenlet copied from the parent wakes with an error instead of
        reading the parent's reply. Closing a copy sends nothing (no ``shutdown``): the
        parent's sockets are untouched. What those greenlets do next is cut short by
        ``_forked_since`` before it touches this pool. Never yields."""
        for sock in list(self._in_flight):
            close_quietly(sock)
        self._in_flight.clear()
        for conn in self._busy:
            conn.close()

    def _forked_since(self, generation: int) -> bool:
        """Is this a forked child's copy of work started in ``generation``? Never yields."""
        return generation != fork_generation()

    def _forked(self, conn: _Conn | None = None) -> Forked:
        """Abandon a copy of the parent's work: close our copy of ``conn`` (sends
        nothing) and touch nothing else; the error to raise. Never yields."""
        if conn is not None:
            conn.close()
        return Forked(
            f"{self.name}: the process forked while this was in flight; a child never "
            "continues its parent's dials, checks or waits"
        )

    def _start_fresh_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without disturbing them.

        Closing our copy of a descriptor sends nothing to the server (no shutdown), so
        the parent's connection stays intact; the child dials its own from now on.
        """
        inherited = list(self._idle) + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        self._dialers.clear()
        self._own = {}
        self._abandoned = set()
        self._in_flight.clear()
        for conn in inherited:
            conn.close()
        self._size = self._pending = self._refilling = self._handed = self._held = 0
        self._checking = self._uses_seen = 0
        self._heir, self._inherited = None, 0  # the parent's draining pools are not ours
        self._max_size = self.config.max_size
        self._drained = Event()
        self._changed = Event()
        self._reset_counters()
        self._bind_to_current_thread()
        self._bind_hub()  # the parent's waiters are not ours
        if self._upkeep is not None and not self._closing:
            self._upkeep.abandon()  # the parent's loop, inherited: ends after its pass
            self._start_upkeep()
        _log.debug("%s: pool started fresh after fork (pid %d)", self.name, os.getpid())

    # -- acquiring ----------------------------------------------------------------
    @property
    def active(self) -> int:
        """Connections in use plus dials in progress: the load a balancer compares."""
        return len(self._busy) + self._pending + self._handed + self._held

    def can_serve_now(self) -> bool:
        """Could an acquisition be served without queueing (an idle connection, or a
        free slot to dial into with nobody ahead)? Never yields."""
        return bool(self._idle) or (self._size < self._max_size and not self._waiters)

    def only_dialing(self) -> bool:
        """Is every slot a dial in progress (no connection open, so nothing can come back
        to a queue here but what those dials bring)? A server whose connects never
        complete looks like this; the manager queues a caller here only if no other
        server is better placed. Never yields."""
        return self._size > 0 and self._pending >= self._size

    def get(self, timeout: SupportsFloat | None = None) -> PooledConnection:
        """Acquire now; the handle releases itself at the end of a ``with`` block."""
        return self.acquire(timeout)

    def acquire(
        self, timeout: SupportsFloat | None = None, *, panic: Flag = False
    ) -> PooledConnection:
        """Borrow a connection within ``timeout`` (default: ``acquire_timeout``).

        One deadline bounds all of it: each borrow check gets at most the time left
        (and past the deadline no further idle connection is taken), the wait, the
        dial with its setup hook (and, for a half-open trial, its check).

        ``panic`` (the manager's panic mode, ``balance.panic_threshold``): if true, dial
        even if the breaker refuses; that dial is the breaker's verdict (``PANIC_DIAL``).

        ``timeout`` is typed ``SupportsFloat``, not ``float``, on every public method
        here: mypyc's compiled build would convert a ``float`` argument (``True`` to
        1.0) or refuse it unnamed before ``valid_timeout`` names what is wrong.
        """
        # Every call from here to the wait is a direct C call on the compiled path: a
        # call into Python puts its arguments' array in this frame, and so on the stack
        # a greenlet switch copies (bench B)
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._owner_check()
        if timeout is not None:  # checked first, on every path: nothing has changed yet
            timeout = self._checked_timeout(timeout)
        dial_anyway = False if panic is False else self._truth(panic)  # asked once, now
        if self._closing:
            raise self._closed_error()
        deadline = 0.0  # made by a borrow check, if one ran
        if self._idle:
            got = self._acquire_idle(timeout, dial_anyway)
            if isinstance(got, PooledConnection):
                return got
            deadline = got  # no idle connection was fit to lend
            if self._closing:  # closed during a borrow check
                raise self._closed_error()
        # No idle connection to lend: dial into a free slot, or queue and wait for a
        # connection handed over, a slot, or the deadline. In this frame, not a call
        # (bench B): compiled, every native frame below a wait is C stack that each
        # greenlet switch copies out and back; what raises is made by helpers (an
        # f-string's temporaries are frame slots).
        waiters = self._waiters
        if not waiters:  # with waiters, the first of them told upkeep already
            self.on_demand()  # no idle connection: the pool is busy, upkeep should watch it
        start = _monotonic()
        if not deadline:
            deadline = start + (self._acquire_timeout if timeout is None else timeout)
        elif start >= deadline:  # borrow checks used up the time
            raise self._checks_timed_out()
        if self._size < self._max_size and not waiters:
            self._reserve()
            return self._lend_new(deadline, dial_anyway)
        if self._max_waiting and len(waiters) >= self._max_waiting:
            raise self._shed_error()
        # the fork generation this acquisition started in (the owner check made it the
        # pool's); a fork while it waits poisons _thread_id or, once someone started the
        # pool fresh, changes _fork_gen: two native reads, no global (bench B)
        generation = self._fork_gen
        self._waits += 1
        # WaitQueue.join, inlined (bench B); test_fast_join_matches_join. Waiter is a
        # native class of this build: a direct C call, its fields C struct members
        w = Waiter(self._hub, _WAITING, deadline)
        self._enqueue(w)
        if deadline < waiters._timer_at:
            self._arm_timer(deadline)
        # Waiter.wait, inlined (bench B): the waiter is new, so none waits on it and no
        # wake-up came yet. The greenlet is forgotten however the wait ends, as in
        # Waiter.get
        w.greenlet = _getcurrent()
        try:
            self._switch_out()
        except BaseException:
            w.greenlet = None
            if self._forked_since(generation):
                raise self._forked() from None
            self._abandon(w)
            raise
        w.greenlet = None
        return self._woken(w, start, deadline, generation, dial_anyway)

    def _truth(self, panic: object) -> bool:
        """``acquire``'s ``panic`` as a bool (``TypeError`` if asking raises): a call
        out of its frame."""
        return _args.truth(panic, "panic", self.name)

    def _woken(
        self, w: Waiter, start: float, deadline: float, generation: int, panic: bool
    ) -> PooledConnection:
        """``acquire``'s wait ended (``w`` woken, its greenlet forgotten): the
        connection handed over, or what the outcome says. A call after the switch, so
        its temporaries are not in the waiting frame (bench B)."""
        outcome = w.outcome  # object: narrowed below (a connection), else an Outcome
        if self._thread_id < 0 or self._fork_gen != generation:  # copied into a forked child
            raise self._forked(outcome if isinstance(outcome, _Conn) else None)
        if outcome is _WAITING:  # a switch into this greenlet that was not the pool's
            raise self._invalid_switch(w)
        now = _monotonic()
        waited = now - start
        self._wait_total += waited
        if waited > self._wait_max:
            self._wait_max = waited
        self._wait_counts[_wait_bucket(waited)] += 1
        if isinstance(outcome, _Conn):  # the common case: a connection handed over
            conn = outcome
            self._handed -= 1
            if self._closing:  # handed before a close began (a reload removed the server)
                raise self._closed_while_waiting(conn)
            self._waits_served += 1
            self._hits += 1
            conn.uses += 1  # _lend, inlined (contended path); test_fast_wake_matches_lend
            handle = PooledConnection(self, conn, now)
            self._busy[conn] = handle
            if self._leak_threshold is not None:
                handle.stack = _caller_stack()
            return handle
        return self._wait_ended(cast(Outcome, outcome), start, deadline, panic)

    def _owner_check(self) -> None:
        """``_check_owner`` (``ThreadBound``'s, interpreted), called out of
        ``acquire``'s frame."""
        self._check_owner()

    def _checked_timeout(self, timeout: SupportsFloat) -> float:
        """``valid_timeout`` naming this pool, called out of ``acquire``'s frame."""
        return valid_timeout(timeout, self.name)

    def _enqueue(self, w: Waiter) -> None:
        """``w`` joins the wait queue (its bound ``append``), out of ``acquire``'s
        frame."""
        self._join_queue(w)

    def _arm_timer(self, deadline: float) -> None:
        """The wait queue's timer, armed for ``deadline``, out of ``acquire``'s frame."""
        self._waiters._arm(deadline)

    def _closed_error(self, why: str = "pool is closed") -> PoolClosed:
        """``PoolClosed`` naming this pool and ``why``."""
        return PoolClosed(f"{self.name}: {why}", self.name, self.backend)

    def _acquire_idle(self, timeout: float | None, panic: bool) -> PooledConnection | float:
        """``acquire`` with idle connections: the most recently rested that is fit to
        lend, checked within the time left; when none is, the deadline a borrow check
        made (0.0 if none ran), for ``acquire`` to wait or dial within."""
        idle = self._idle
        if not self.breaker.is_closed:
            self._drop_idle()  # not while the breaker is not closed: a trial is a dial
        deadline = 0.0  # made on the first borrow check (the uncontended path needs none)
        while idle:
            conn = idle.pop()
            watcher = conn.watcher  # active while it rested; stopped below on every path
            now = _monotonic()
            if now >= conn.expires_at:
                watcher.stop()
                self._retire(conn, "lifetime")
                continue
            rested = now - conn.checked_at  # since its last check or return
            if rested >= self._check_after:
                watcher.stop()  # off the idle stack: its check reads the socket
                if not deadline:
                    deadline = now + (self._acquire_timeout if timeout is None else timeout)
                elif now >= deadline:
                    self._rest(conn)  # unchecked, untouched: past the deadline, not taken
                    break
                if not self._borrow_check(conn, deadline - now):
                    continue
                if self._closing:  # closed while we checked: lend nothing after close()
                    self._retire(conn, "discarded")
                    raise self._closed_error("pool closed during a borrow check")
                if conn.gen != self._gen and self._outdated(conn, _monotonic()):
                    self._retire(conn, "lifetime")  # a reconfigure during its check
                    continue
            elif rested > _WATCH_LAG and (self._hub_lag() > _WATCH_LAG or watcher.pending):
                # its watcher cannot vouch for it: code held the hub (no poll lately), or
                # the last poll saw bytes or EOF and woke this borrower before the
                # watcher's callback ran (libev runs a poll's watchers one by one)
                watcher.stop()
                if not peek_alive(conn.sock):
                    _log.debug("%s: idle connection received bytes or EOF; closed", self.name)
                    self._retire(conn, "unhealthy")
                    continue
            else:
                watcher.stop()  # off the idle stack: no longer watched (_rest starts it)
            self._hits += 1
            conn.uses += 1  # _lend, inlined (bench A); test_fast_acquire_matches_lend
            handle = PooledConnection(self, conn, now)
            busy = self._busy
            busy[conn] = handle
            in_use = len(busy) + self._handed
            if in_use > self._peak:
                self._peak = in_use
            if self._leak_threshold is not None:
                handle.stack = _caller_stack()
            return handle
        return deadline

    def _invalid_switch(self, w: Waiter) -> InvalidSwitchError:
        """A wait woken by a switch that was not the pool's (nothing handed, no
        timer): it leaves the queue as an interrupted wait does, so nothing is handed
        to it later and lost, and fails as gevent's own waits do."""
        self._abandon(w)
        return InvalidSwitchError(
            f"{self.name}: the wait for a connection was woken by a switch that was not "
            "the pool's; the wait is given up"
        )

    def _checks_timed_out(self) -> PoolTimeout:
        self._timeouts += 1
        return PoolTimeout(
            f"{self.name}: acquire deadline passed during borrow checks", self.name, self.backend
        )

    def _shed_error(self) -> PoolExhausted:
        self._shed += 1
        return PoolExhausted(
            f"{self.name}: {len(self._waiters)} callers already wait "
            f"(max_waiting {self._max_waiting}); shed",
            self.name,
            self.backend,
        )

    def _closed_while_waiting(self, conn: _Conn) -> PoolClosed:
        """A connection handed over as the pool began to close: retired, not lent."""
        self._retire(conn, "discarded")
        return self._closed_error("pool closed while waiting")

    def _wait_ended(
        self, outcome: Outcome, start: float, deadline: float, panic: bool
    ) -> PooledConnection:
        """A wait that ended without a connection handed over (the rarer outcomes,
        out of ``acquire``: a compiled function's C stack frame is what a greenlet
        switch copies, so the waiting frame is kept small)."""
        if outcome is TIMED_OUT:  # the timer took it off the queue
            self._timeouts += 1
            draining = (
                f", {self._inherited} of them still held by a pool a reload replaced"
                if self._inherited > 0
                else ""
            )
            raise PoolTimeout(
                f"{self.name}: no connection within {deadline - start:.3g}s "
                f"({len(self._busy)} in use, {self.config.max_size} max{draining}, "
                f"{len(self._waiters)} waiting)",
                self.name,
                self.backend,
            )
        if outcome is PERMIT:
            if self._closing:  # as above: dial nothing for a pool that is closing
                self._unreserve()
                raise self._closed_error("pool closed while waiting")
            lent = self._lend_new(deadline, panic)
            self._waits_served += 1
            return lent
        if outcome is BROKEN:
            raise DialError(self.name, "circuit breaker opened while waiting")
        raise self._closed_error("pool closed while waiting")  # outcome is CLOSED

    def _abandon(self, w: Waiter) -> None:
        """A waiter was interrupted: leave no trace, pass on whatever it was handed."""
        outcome = w.outcome
        if outcome is WAITING:
            with contextlib.suppress(ValueError):  # a parent's waiter, after a fork
                self._waiters.remove(w)
        elif outcome is PERMIT:
            self._unreserve()
        elif isinstance(outcome, _Conn):
            self._handed -= 1
            self._hand_on(outcome)
        # CLOSED, BROKEN, TIMED_OUT: nothing was handed, nothing to pass on

    def _lend(self, conn: _Conn, now: float) -> PooledConnection:
        conn.uses += 1
        handle = PooledConnection(self, conn, now)
        self._busy[conn] = handle
        self._note_in_use()
        if self._leak_threshold is not None:
            handle.stack = _caller_stack()
        return handle

    def _lend_new(self, deadline: float, panic: bool = False) -> PooledConnection:
        """Dial into a slot already counted in ``_size`` and lend the result."""
        conn = self._dial_reserved(deadline - _monotonic(), panic)
        self._misses += 1
        return self._lend(conn, conn.created_at)

    # -- dialing ------------------------------------------------------------------
    def _dial_reserved(self, remaining: float, panic: bool = False) -> _Conn:
        """For an acquisition: ask the breaker, mind the deadline, then ``_open``.

        A dial that may outlast the caller's deadline runs in its own greenlet (an
        errand): the caller waits for it at most ``remaining`` and, if it gives up, the
        dial goes on to its verdict -- a failure counts against the breaker, a
        connection is handed on -- so a server whose connects never complete is judged
        on ``dial.timeout`` whatever its callers' deadlines. ``panic``: a dial the
        breaker refuses goes through anyway, as its verdict (token ``PANIC_DIAL``).
        """
        breaker = self.breaker
        trial = 0
        if not breaker.is_closed:
            if breaker.allow_dial():
                trial = breaker.trial_token
            elif panic and breaker.panic_may_dial:
                trial = PANIC_DIAL
            else:
                self._unreserve()
                last = breaker.last_failure
                raise DialError(
                    self.name,
                    f"circuit breaker {breaker.state}, retry in {breaker.retry_in():.1f}s"
                    + ("" if last is None else f" (last failure: {last})"),
                )
        if remaining <= 0:
            if trial:
                breaker.abandon_trial(trial)
            self._unreserve()
            self._timeouts += 1
            raise PoolTimeout(
                f"{self.name}: acquire deadline passed before a dial could start",
                self.name,
                self.backend,
            )
        if remaining >= self._verdict_time(trial) and not self._hooked(trial):
            conn = self._open(trial)
        else:
            conn = self._dial_errand(trial, remaining)
        if self._closing:
            self._retire(conn, "discarded")
            raise self._closed_error("pool closed while dialing")
        return conn

    def _hooked(self, trial: int) -> bool:
        """Does this dial run user code (the ``setup`` hook; a trial's health ``hook``)?
        Such code may catch the timer that bounds it (``except BaseException``) and run
        on, so it never runs in the caller's greenlet: always as an errand."""
        return self._setup is not None or (trial != 0 and self.health_config.hook is not None)

    def _verdict_time(self, trial: int) -> float:
        """The longest a dial (with a trial's check) takes to reach its verdict."""
        limit = self.dial_config.timeout
        if trial and self._check_configured:
            limit += self.health_config.timeout
        return limit

    def _dial_errand(self, trial: int, remaining: float) -> _Conn:
        """Dial in an errand greenlet; wait for it at most ``remaining`` -- and no
        longer than its verdict should take: a dial still running then is overrunning
        (a hook swallowed its timer), so the caller leaves with a ``DialError`` and
        fails over while time is left. The errand goes on alone to its own verdict (a
        hook that returns late is a failed dial, counted then), so nothing is counted
        twice."""
        errand = _Errand()
        g = self._spawn_own(
            functools.partial(self._undo_dial, trial), self._run_dial_errand, errand, trial
        )
        verdict = self._verdict_time(trial) + _OVERRUN_GRACE
        result = self._await_errand(errand, g, min(remaining, verdict))
        if isinstance(result, _Conn):
            self._held -= 1
            return result
        if isinstance(result, DialError):
            raise result
        if result is None and remaining > verdict:  # overrunning: it goes on alone
            raise DialError(
                self.name,
                f"dial overran dial.timeout {self.dial_config.timeout:.3g}s "
                "(a hook did not return in time); it goes on alone",
            )
        if result is None:  # still dialing: it goes on alone
            self._timeouts += 1
            raise PoolTimeout(
                f"{self.name}: acquire deadline passed while dialing "
                f"(the dial goes on, up to dial.timeout {self.dial_config.timeout:.3g}s)",
                self.name,
                self.backend,
            )
        if isinstance(result, gevent.GreenletExit):  # killed by close()
            raise self._closed_error("pool closed while dialing")
        raise cast(BaseException, result)

    def _await_errand(self, errand: _Errand, g: gevent.Greenlet, remaining: float) -> object:
        """The errand's result, or None if it is still running after ``remaining`` (it is
        then detached: it hands on what it gets). Interrupted: detached likewise."""
        generation = fork_generation()
        try:
            g.join(remaining)
        except BaseException:
            if self._forked_since(generation):
                raise self._forked() from None
            self._detach(errand, g)
            raise
        if self._forked_since(generation):  # a caller copied into a forked child
            value = g.value if g.dead and g.successful() else None
            raise self._forked(value if isinstance(value, _Conn) else None)
        if g.dead:
            return g.value if g.successful() else g.exception
        errand.detached = True
        return None

    def _detach(self, errand: _Errand, g: gevent.Greenlet) -> None:
        """Its caller is gone: the errand hands on its result itself, or, finished
        already, its result (a connection, held for the caller) is handed on here.
        Never yields."""
        if not g.dead:
            errand.detached = True
        elif g.successful() and isinstance(g.value, _Conn):
            self._held -= 1
            self._hand_on(g.value)

    def _spawn_own(
        self, undo: Callable[[], None], run: Callable[..., Any], *args: Any
    ) -> gevent.Greenlet:
        """Start a greenlet of the pool's own (an errand, a refill, a background check),
        kept in ``_dialers`` for ``close()`` to kill. ``undo`` gives back what was
        reserved for it (a slot, a trial, a connection off the idle stack) should it be
        killed before it ever ran (gevent then never runs its body, so its own
        ``finally`` cannot) or refuse to die (a hook that swallows ``GreenletExit``):
        ``close()`` then abandons it, and ``_given_up`` keeps its body from giving
        back anything twice. What it holds does not change kind while it can yield (a
        dial's slot, a check's connection), so one ``undo`` serves its whole life.
        Never yields."""
        g = gevent.spawn(self._run_own, run, args)
        self._dialers.add(g)
        self._own[g] = undo
        return g

    def _run_own(self, run: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return run(*args)
        finally:  # its body has accounted for what it held
            self._own.pop(gevent.getcurrent(), None)

    def _given_up(self) -> bool:
        """Is this greenlet one ``close()`` abandoned (what it held given back already)?
        Its body then closes what it gets and counts nothing. Never yields."""
        return bool(self._abandoned) and gevent.getcurrent() in self._abandoned

    def _undo_dial(self, trial: int) -> None:
        if trial:
            self.breaker.abandon_trial(trial)
        self._unreserve()

    def _undo_refill(self, trial: int) -> None:
        self._refilling -= 1
        self._undo_dial(trial)

    def _undo_check(self, conn: _Conn, background: bool) -> None:
        self._check_over(background)
        self._retire(conn, "unhealthy")

    def _check_over(self, background: bool) -> None:
        """A check's connection is no longer held for it: counted before its verdict
        moves the connection (a background check's failure then shows as a refill need
        when its slot goes). Never yields."""
        self._held -= 1
        if background:
            self._checking -= 1

    def _run_dial_errand(self, errand: _Errand, trial: int) -> object:
        try:
            try:
                conn = self._open(trial, errand=True)
            except (DialError, Forked, PoolClosed) as exc:
                return exc
            if errand.detached:
                self._hand_on(conn)
                return None
            self._held += 1  # until its caller wakes and takes it
            return conn
        finally:
            self._dialers.discard(gevent.getcurrent())

    def _open(self, trial: int, errand: bool = False) -> _Conn:
        """Dial into a slot reserved in ``_size`` and ``_pending``, within ``dial.timeout``;
        any failure frees it.

        A failed dial counts against the breaker and gets the server's idle connections
        checked; a successful one ends a streak of dial failures. A half-open trial
        (``trial``: its token) closes the breaker only once the configured check passes
        on the new connection; an interrupted one gives back the trial.

        ``errand``: this greenlet is the pool's own (a refill, a dial errand), so
        nothing but ``close()`` interrupts it from outside: whatever else a hook raises
        (``gevent.Timeout`` of its own, ``GreenletExit``) is a failed dial, a
        ``DialError`` (DESIGN 20).
        """
        generation = fork_generation()
        gen = self._gen  # the settings this dial is made with, read in the same step
        try:
            try:
                sock = _dial(
                    self.address, self.dial_config, setup=self._setup, track=self._in_flight
                )
            except DialError:
                raise
            except BaseException as exc:
                if not errand or self._closing or self._forked_since(generation):
                    raise
                raise DialError(
                    self.name, f"setup hook raised {type(exc).__name__}: {exc}"
                ) from exc
        except BaseException as exc:
            if self._forked_since(generation):  # the parent's dial, copied: abandon it
                raise self._forked() from exc
            if self._given_up():  # close() gave back its slot and trial already
                raise
            # a dial ended by close() (which closed its socket) is no verdict on the
            # server, nor is one that failed here before reaching it (``local``: a TLS
            # context that cannot be built): counted as failed dials, not by the breaker
            failed = isinstance(exc, DialError) and not self._closing
            if failed:
                self._dial_failures += 1
                self._last_dial_error = exc
            verdict = failed and not cast(DialError, exc).local
            if failed and not verdict:
                self._local_failure_at = _monotonic()
            if trial and not verdict:
                self.breaker.abandon_trial(trial)
            self._unreserve(exc if verdict else None, trial, dial=True)
            if isinstance(exc, DialError) and self._closing:
                raise self._closed_error("pool closed while dialing") from exc
            raise
        if self._forked_since(generation):  # it connected in the child: not ours either
            close_quietly(sock)
            raise self._forked()
        if trial and self._check_configured:
            self._check_trial(sock, trial, generation, errand)
        if self._given_up():  # close() gave back its slot and trial: nothing to lend
            close_quietly(sock)
            raise self._closed_error("pool closed while dialing")
        self._pending -= 1
        breaker = self.breaker
        if trial:  # a half-open trial's token, or PANIC_DIAL: closes the breaker
            breaker.record_success(trial)
        elif breaker._failure_count:
            breaker.record_dial_success()
        # failure_rate counts request outcomes: a successful dial is none (it would
        # dilute a server that accepts every connection and fails every request)
        now = _monotonic()
        return _Conn(sock, now, self._expiry(now), breaker.closes, gen)

    def _check_trial(
        self, sock: socket.socket, trial: int, generation: int, errand: bool = False
    ) -> None:
        """The configured check on a half-open trial's new connection: its verdict (a
        failure is a failed dial; an interruption gives the trial back). ``errand``: as
        for ``_open``, whatever a hook raises is a failed check."""
        self._in_flight.add(sock)
        try:
            try:
                check_health(sock, self.health_config)
            except (Unhealthy, OSError):
                raise
            except BaseException as exc:
                if not errand or self._closing or self._forked_since(generation):
                    raise
                raise Unhealthy(f"health hook raised {type(exc).__name__}: {exc}") from exc
        except BaseException as exc:
            self._in_flight.discard(sock)
            close_quietly(sock)
            if self._forked_since(generation):
                raise self._forked() from None
            if self._given_up():  # close() gave back its slot and trial already
                raise
            if not isinstance(exc, (Unhealthy, OSError)):  # interrupted
                self.breaker.abandon_trial(trial)
                self._unreserve()
                raise
            self._dial_failures += 1
            err = DialError(self.name, f"trial connection failed its health check: {exc}")
            self._last_dial_error = err
            self._unreserve(exc, trial, dial=True)
            raise err from exc
        self._in_flight.discard(sock)
        if self._forked_since(generation):
            close_quietly(sock)
            raise self._forked()

    # -- giving back ----------------------------------------------------------------
    def _return(self, conn: _Conn) -> None:
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._check_owner()
        try:
            del self._busy[conn]
        except KeyError:  # force-closed by close(), or inherited across fork
            conn.close()
            return
        self._released += 1
        if conn.dirty and not self._clean(conn):
            return
        now = _monotonic()
        checked = conn.checked_at  # _SUSPECT: in use when the server failed us
        conn.last_used_at = conn.checked_at = now
        breaker = self.breaker
        if not breaker.quiet:  # closed, no streak, no rate window: nothing to tell it
            if breaker._failure_count:  # a clean use ends a streak of failures
                breaker.record_success(None)  # None: not a half-open trial's verdict
            rate = breaker.rate  # failure_rate: a clean use is a success (breaker closed)
            if rate is not None and breaker.is_closed:
                rate.success()
        if now >= conn.expires_at or (conn.gen != self._gen and self._outdated(conn, now)):
            self._retire(conn, "lifetime")  # over its lifetime, or outdated by a reconfigure
        elif self._closing or self._size > self._max_size:
            self._retire(conn, "discarded")
        elif (checked == _SUSPECT or not self._check_after) and not peek_alive(conn.sock):
            # reset while in use (a reply read before the RST does not make it alive),
            # or check_after 0 ("check every reuse"), which a hand-off is too
            self._retire(conn, "unhealthy")
        elif conn.tls and tls_unread(conn.sock):
            # its borrower left bytes unread, decrypted already: the idle watcher would
            # never see them (the fd is not readable), the next borrower would get them
            self._retire(conn, "unhealthy")
        elif self._waiters:  # _hand_on, inlined (bench A); test_fast_return_matches_hand_on
            w = self._pop_waiter()
            self._handed += 1
            w.outcome = conn
            self._run_callback(w, None)  # w(None) is w.switch(None), no bound method made
        elif len(self._idle) < self._max_idle:
            self._rest(conn)  # a direct C call on the compiled path
        else:  # max_idle kept already: close it now rather than after idle_timeout
            self._retire(conn, "idle")

    def _clean(self, conn: _Conn) -> bool:
        """Undo what a borrower changed (DESIGN 16): the socket's timeout back to the
        pool's (None: blocking, cooperative); a socket that was handed out raw also gets
        the pool's ``TCP_NODELAY`` again. False (and the connection retired) when the
        socket is broken or was closed under its borrower. Only for a ``dirty`` one: a
        clean borrow pays nothing."""
        dirty = conn.dirty
        conn.dirty = 0
        sock = conn.sock
        try:
            if sock.fileno() < 0:
                raise OSError("socket closed by its borrower")
            sock.settimeout(None)
            if (
                dirty & SOCK_EXPOSED
                and self.dial_config.tcp_nodelay
                and sock.family in (socket.AF_INET, socket.AF_INET6)
            ):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError) as exc:
            _log.debug("%s: returned connection could not be reset: %s", self.name, exc)
            self._retire(conn, "discarded")
            return False
        return True

    def _rest(self, conn: _Conn) -> None:
        """Put ``conn`` on the idle stack, watched: bytes or EOF arriving while it
        rests retire it (``_stirred``). Never yields."""
        self._idle.append(conn)
        try:
            conn.watcher.start(self._on_stirred, conn)
        except AttributeError:
            if conn.watcher is not None:  # not its first rest: some other fault
                raise
            self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        """Make ``conn``'s read watcher (on its first rest) and start it."""
        watcher = conn.watcher = self._hub.loop.io(conn.sock.fileno(), _READ)
        watcher.start(self._on_stirred, conn)

    def _stirred(self, conn: _Conn) -> None:
        """The read watcher of an idle connection fired (run by the hub): the server
        sent bytes nobody asked for, closed, or reset, so it must not be lent (DESIGN
        16; as Go's HTTP transport keeps a read on every idle connection). A peek
        (one non-blocking call) tells a spurious wake-up or a TLS protocol record (a
        session ticket, absorbed) from that. Not charged to the breaker: servers close
        idle connections routinely. Never yields."""
        if get_ident() != self._thread_id:  # a forked child's inherited watcher
            with contextlib.suppress(Exception):
                self._check_owner()  # starts fresh: closes what the parent held
            return
        if peek_alive(conn.sock):
            return
        try:
            self._idle.remove(conn)
        except ValueError:  # not idle after all: nothing to do but stop watching
            if conn.watcher is not None:
                conn.watcher.stop()
            return
        unread = b""
        now = _monotonic()
        if conn.uses == 0 and now - conn.created_at < _LOCAL_BACKOFF:
            # stirred as soon as it was dialed (a greeting, a refusal, not a server's
            # idle timeout): its refill would be too, so pace them
            self._local_failure_at = now
            if not self._greeting_warned:
                unread = peek_unread(conn.sock)
        self._retire(conn, "unhealthy")
        self.on_demand()  # min_idle may need a refill
        # logged from a greenlet of its own: a handler may yield (gevent locks under
        # monkey-patching, a socket handler), which this hub callback must not do
        if unread:
            self._greeting_warned = True  # once per pool
            gevent.spawn(
                _log.warning,
                "%s: a new connection received %r unprompted before its first use and "
                "was closed, as its refills will be: if the server speaks first (a "
                "greeting, as SMTP, FTP or MySQL send), the backend's setup hook must read "
                "it; else the server is refusing connections (at its client limit?)",
                self.name,
                unread,
            )
        else:  # not even the level is looked at here (it may take logging's lock)
            gevent.spawn(_log.debug, "%s: idle connection received bytes or EOF; closed", self.name)

    def _discard(self, conn: _Conn, exc: BaseException | None) -> None:
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._check_owner()
        if self._busy.pop(conn, None) is None:
            conn.close()
            return
        failure = exc if _is_network_error(exc) else None
        if failure is not None and conn.era != self.breaker.closes:
            # dialed before the breaker last closed (a trial or a panic dial closed it):
            # its error is the old outage's, already judged; not a new failure
            self._suspect_idle()
            failure = None
        self._retire(conn, "discarded" if exc is None else "error", failure)

    def _suspect_idle(self) -> None:
        """The server just failed us: check each idle connection before its next use,
        and each one in use when it comes back (before it is handed to a waiter),
        however recently it was used (a dead server's idle sockets look fine until
        someone reads from them). If that failure opened the breaker, the server is
        given up for now: idle connections close and waiters are told to fail over."""
        if not self.breaker.is_closed:
            self._drop_idle()
            self._waiters.hand_all(BROKEN)
            return
        for conn in self._idle:
            conn.checked_at = _SUSPECT
        for conn in self._busy:  # a reply read before a reset does not make it alive
            conn.checked_at = _SUSPECT

    def _retire_oldest(self, count: int, reason: str) -> None:
        """Close the ``count`` (if positive; at most all) oldest idle connections, the
        bottom of the stack: taken off in one slice, not one ``pop(0)`` each (quadratic
        in a large pool). Each retirement frees a slot; none adds an idle one."""
        idle = self._idle
        if count <= 0 or not idle:
            return
        doomed = idle[:count]
        del idle[:count]
        for conn in doomed:
            self._retire(conn, reason)

    def _drop_idle(self) -> None:
        idle = self._idle
        while idle:
            self._retire(idle.pop(), "unhealthy")

    # -- the one place slots and connections change hands (none of these yields) ----
    def _reserve(self) -> None:
        """Count a dial slot before dialing into it: ``max_size`` bounds dials too."""
        self._size += 1  # the only increment: every slot enters through here
        self._pending += 1

    def _retire(self, conn: _Conn, reason: str, failure: BaseException | None = None) -> None:
        """Close ``conn`` (out of ``_idle``/``_busy`` already), count ``reason``, free its
        slot; ``failure`` (a network error) goes to the breaker first; then the slot is
        handed on."""
        self._closed_by[reason] += 1
        conn.close()
        self._slot_gone(failure)

    def _unreserve(
        self, failure: BaseException | None = None, trial: int = 0, *, dial: bool = False
    ) -> None:
        """A reserved dial slot (counted in ``_size`` and ``_pending``) is given back
        unused or failed; ``failure`` goes to the breaker (as the outcome of half-open
        trial ``trial``, if not 0; ``dial``: a failed dial); then the slot is handed on."""
        self._pending -= 1
        self._slot_gone(failure, trial, dial)

    def _slot_gone(self, failure: BaseException | None, trial: int = 0, dial: bool = False) -> None:
        self._size -= 1  # the only decrement: every slot leaves through here
        if self._heir is not None:  # a draining pool: the slot is its heir's again
            self._pass_slot()
        if failure is not None and not self._closing:  # counted before the slot moves: a
            # listener sees exact stats (a closing pool's verdicts no longer matter)
            # trial None: an error on a connection in use cannot end a trial in flight
            self.breaker.record_failure(failure, trial or None, dial=dial)
            self._suspect_idle()
        self._hand_on()
        if not self._closing and self._refill_need() > 0:
            self.on_demand()  # below what upkeep keeps: a refill (a pass now if at rest)

    def _hand_on(self, conn: _Conn | None = None) -> None:
        """The one place capacity goes to waiters: ``conn`` (unlent) to the oldest
        waiter, else onto the idle stack; then each free slot, as a permit to dial,
        to the next waiters. While closing: ``conn`` is retired instead, and the
        drain is noted."""
        if self._closing:
            if conn is not None:
                self._retire(conn, "idle")  # comes back here with conn None
            else:
                self._note_drained()
            return
        waiters = self._waiters
        if conn is not None:
            if conn.gen != self._gen and self._outdated(conn, _monotonic()):
                self._retire(conn, "lifetime")  # comes back here with conn None
                return
            if waiters:
                self._handed += 1  # in use from now on, though its waiter is not awake yet
                waiters.hand(conn)
                self._note_in_use()
            elif len(self._idle) < self._max_idle:
                self._rest(conn)
                self._changed.set()
            else:  # max_idle kept already (comes back here with conn None)
                self._retire(conn, "idle")
                return
        while waiters and self._size < self._max_size:
            self._reserve()
            waiters.hand(PERMIT)

    # -- a server removed and added back (DESIGN 22; none of these yields) ----------
    def _bequeath(self, heir: Pool | None) -> None:
        """A draining pool (lending stopped): count its open slots (connections still in
        use, dials in flight) against ``heir``'s ``max_size``, the pool now serving the
        same server (None: none does), until each comes back. Replaces an earlier heir.

        Why count rather than revive this pool: a stopped pool has already failed its
        waiters and killed its dials, and its closer is waiting on it; handing it back
        to callers would race all of that. A fresh pool that counts what is still out
        keeps ``max_size`` with one integer and one link. Never yields."""
        self._check_owner()
        if heir is not None:
            heir._check_owner()  # a forked child starts fresh before counting anything
        old, self._heir, self._heir_gen = self._heir, heir, fork_generation()
        if old is not None and not self._forked_since(self._heir_gen):
            old._inherit(-self._size)
        if heir is not None:
            heir._inherit(self._size)

    def _pass_slot(self) -> None:
        """One of a draining pool's slots came back: its heir may open one more."""
        heir = self._heir
        assert heir is not None
        if self._forked_since(self._heir_gen):  # a forked child's copy: the heir starts fresh
            self._heir = None
            return
        heir._inherit(-1)

    def _inherit(self, slots: int) -> None:
        """``slots`` more (fewer, if negative) held at our server by draining pools. More:
        idle connections beyond what is left close now (in-use ones as they come back);
        fewer: waiters get the freed slots to dial into, and a refill may start."""
        self._inherited += slots
        self._max_size = self.config.max_size - self._inherited
        if slots > 0:
            self._retire_oldest(self._size - self._max_size, "discarded")
            return
        self._hand_on()
        if not self._closing and self._refill_need() > 0:
            self.on_demand()

    def _note_in_use(self) -> None:
        """In use just grew (off the fast path): keep the peak. Never yields."""
        in_use = len(self._busy) + self._handed
        if in_use > self._peak:
            self._peak = in_use

    # -- health -------------------------------------------------------------------
    def _borrow_check(self, conn: _Conn, remaining: float | None = None) -> bool:
        """Check a connection taken off the idle stack; close it if it fails.

        The peek finds a peer that closed (servers close idle connections routinely:
        not charged) or sent unexpected bytes. A configured check that fails counts
        against the breaker, as an error on a connection in use. For a caller (with
        ``remaining``, its time left) the check runs as an errand when it may outlast
        the caller (``remaining`` shorter than its timeout) or runs a hook (which may
        swallow the check's timer); the caller waits for it at most ``remaining`` and
        the check's timeout; if it gives up, the check goes on to its verdict. The
        connection belongs to no one while it is checked, so an interruption closes it
        and frees its slot rather than losing it.
        """
        if not peek_alive(conn.sock):
            _log.debug("%s: idle connection found closed or dirty", self.name)
            self._retire(conn, "unhealthy")
            return False
        if self._check_configured:
            if remaining is not None and (
                remaining < self.health_config.timeout or self.health_config.hook is not None
            ):  # may outlast the caller; a hook may swallow the check's timer and run on
                return self._check_errand(conn, remaining)
            generation = fork_generation()
            self._held += 1
            try:
                failure = self._run_check(conn)
            except BaseException:
                if self._forked_since(generation):
                    raise self._forked(conn) from None
                self._held -= 1
                self._retire(conn, "unhealthy")
                raise
            if self._forked_since(generation):  # a check copied into a forked child
                raise self._forked(conn)
            self._held -= 1
            if failure is not None:
                self._retire(conn, "unhealthy", failure)
                return False
        conn.checked_at = _monotonic()
        return True

    def _run_check(self, conn: _Conn) -> BaseException | None:
        """The configured check, bounded by ``health_check.timeout``: its failure or None.
        Its socket is in flight meanwhile (``close()`` ends the check by closing it)."""
        sock = conn.sock
        self._in_flight.add(sock)
        try:
            check_health(sock, self.health_config)
        except (Unhealthy, OSError) as exc:
            _log.info("%s: health check failed: %s", self.name, exc)
            return exc
        finally:
            self._in_flight.discard(sock)
        return None

    def _check_errand(self, conn: _Conn, remaining: float) -> bool:
        errand = _Errand()
        self._held += 1  # until the check's verdict, or its caller takes it
        g = self._spawn_own(
            functools.partial(self._undo_check, conn, False), self._run_check_errand, errand, conn
        )
        # no longer than the check should take: one still running is overrunning (its
        # hook swallowed the timer); it goes on alone to its verdict
        wait = min(remaining, self.health_config.timeout + _OVERRUN_GRACE)
        if self._await_errand(errand, g, wait) is conn:
            self._held -= 1
            return True
        return False

    def _run_check_errand(
        self, errand: _Errand, conn: _Conn, background: bool = False
    ) -> _Conn | None:
        """A check in a greenlet of the pool's own: nothing but ``close()`` interrupts
        it from outside, so whatever else a hook raises (``gevent.Timeout`` of its own,
        ``GreenletExit``) fails the check (DESIGN 20). Copied into a forked child, it
        is abandoned. ``background``: upkeep's check (counted in ``_checking`` too)."""
        generation = fork_generation()
        try:
            try:
                failure = self._run_check(conn)
            except BaseException as exc:
                if self._forked_since(generation):
                    self._forked(conn)
                    return None
                if self._given_up():  # close() closed its connection and gave back its slot
                    raise
                if self._closing:  # killed by close()
                    self._check_over(background)
                    self._retire(conn, "unhealthy")
                    raise
                _log.info("%s: health hook raised %s", self.name, type(exc).__name__)
                failure = Unhealthy(f"health hook raised {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            if self._forked_since(generation):  # copied into a forked child: abandon
                self._forked(conn)
                return None
            if self._given_up():  # close() closed its connection and gave back its slot
                return None
            if failure is not None:
                self._check_over(background)
                self._retire(conn, "unhealthy", failure)
                return None
            conn.checked_at = _monotonic()
            if errand.detached:
                self._check_over(background)
                self._hand_on(conn)
                return None
            return conn  # still held: its caller takes it
        finally:
            self._dialers.discard(gevent.getcurrent())

    # -- upkeep -------------------------------------------------------------------
    def _start_upkeep(self) -> None:
        """A standalone pool's own upkeep greenlet (lbpool._upkeep, as the manager's)."""
        upkeep = self._upkeep = Upkeep(lambda: (self,))
        self.on_demand = lambda: upkeep.on_demand(self)

    def upkeep_due(self) -> float:
        """Seconds until upkeep has something to do here (infinite: nothing until an
        acquisition calls ``on_demand``).

        While the pool is busy (connections lent, callers waiting, dials or checks
        running, fewer than ``min_idle`` idle) that is every ``upkeep_interval``. At
        rest it is the next idle connection's expiry or check (an ad-hoc pool's: also
        the end of its ``idle_timeout`` unused; for ``min_idle: auto``, the end of the
        demand bucket whose close may shrink the pool), so an idle pool costs no
        wake-ups; the first acquisition that has to wait or dial calls ``on_demand``
        and upkeep resumes.
        """
        cfg = self.config
        if self._closing:
            return float("inf")
        if self._busy or self._waiters or self._pending or self._held or self._refill_need() > 0:
            return cfg.upkeep_interval
        now = _monotonic()
        due = float("inf")
        if self.on_unused is not None:
            due = self._used_at + cfg.idle_timeout - now
        if self._auto and self._demand.can_fall(self._peak):
            due = min(due, self._demand.next_roll - now)
        if self._idle:
            interval = self.health_config.interval
            expire_idle = self._above_min_idle()
            due = min(due, interval, cfg.idle_timeout, _MAX_REST)
            for conn in self._idle:
                due = min(due, conn.expires_at - now, conn.checked_at + interval - now)
                if expire_idle:
                    due = min(due, conn.last_used_at + cfg.idle_timeout - now)
        return max(due, cfg.upkeep_interval)

    def run_upkeep(self) -> None:
        """One pass: expire idle and old connections, start checks of idle ones, warn
        of leaks, start refills to ``min_idle``; an ad-hoc pool unused for its
        ``idle_timeout`` is handed to ``on_unused`` instead. Never waits on the server
        (checks and dials are errands). Called by the pool's own greenlet or the
        manager's."""
        self._check_owner()
        if self._closing:
            return
        now = _monotonic()
        if self.on_unused is not None and self._unused(now):
            self.on_unused(self)
            return
        if self._auto:  # close the demand buckets that ended: the target may fall
            self._peak = self._demand.roll(self._peak, len(self._busy) + self._handed, now)
        try:
            self._expire_idle(now)
            self._warn_leaks(now)
            self._check_idle(now)
        except Forked:  # a pass copied into a forked child: the child's own comes next
            return
        self.fill()

    def _unused(self, now: float) -> bool:
        """Has nobody tried to acquire here, nor held a connection, for ``idle_timeout``?
        (Acquisitions are counted anyway; comparing counts costs the borrow path nothing.)"""
        uses = self._hits + self._misses + self._timeouts + self._shed
        if uses != self._uses_seen or self.active or self._waiters:
            self._uses_seen = uses
            self._used_at = now
            return False
        return now - self._used_at >= self.config.idle_timeout

    # -- what the upkeep keeps: min_idle idle, or (auto) the recent peak open ----------
    def _auto_target(self) -> int:
        """``min_idle: auto``: connections to keep open -- the recent peak in use
        (``lbpool._demand``: over the last 3 to 4 ``idle_timeout``), at least 1, at most
        ``max_size``. Never yields."""
        return min(max(1, self._demand.recent(self._peak)), self._max_size)

    def _resting(self) -> int:
        """Idle connections, with those upkeep has out for a background check (they
        come back to the idle stack if they pass): what everything that sizes the pool
        counts as idle. A check that fails frees its slot (``_slot_gone``), and the
        need for its replacement appears then. Never yields."""
        return len(self._idle) + self._checking

    def _refill_need(self) -> int:
        """Dials the upkeep should start now (breaker aside): up to ``min_idle`` idle,
        or (auto) up to the target open; never beyond ``max_size`` or ``max_idle``.
        Connections out for a background check count as idle, dials of refills as
        idle to be."""
        idle = self._resting() + self._refilling
        need = self._auto_target() - self._size if self._auto else self._min_idle - idle
        return min(need, self._max_size - self._size, self._max_idle - idle)

    def _above_min_idle(self) -> bool:
        """Could an idle connection be closed for idling without going below what the
        upkeep keeps?"""
        if self._auto:
            return self._size > self._auto_target()
        return self._resting() > self._min_idle

    def _expire_idle(self, now: float) -> None:
        cfg = self.config
        keep: list[_Conn] = []
        idle = self._idle
        auto = self._auto
        target = self._auto_target() if auto else 0
        checking = self._checking  # out for a check: idle too, kept towards min_idle
        looked_at = idle[:]  # oldest first: the bottom of the LIFO stack
        idle.clear()  # (taken off at once: one pop(0) each is quadratic in a large pool)
        left = len(looked_at)  # not looked at yet
        for conn in looked_at:
            left -= 1
            if now >= conn.expires_at:
                self._retire(conn, "lifetime")
            elif now - conn.last_used_at >= cfg.idle_timeout and (
                self._size > target if auto else left + len(keep) + checking >= self._min_idle
            ):
                self._retire(conn, "idle")
            else:
                keep.append(conn)
        idle.extend(keep)

    def _check_idle(self, now: float) -> None:
        """Check each idle connection not checked for ``health_check.interval``: the
        free peek here; a configured check off the stack (no caller can borrow it
        mid-check) as an errand, at most ``_BACKGROUND_CHECKS`` at a time, each bounded
        by ``health_check.timeout``. The rest wait for a later pass. Never yields."""
        interval = self.health_config.interval
        for conn in [c for c in self._idle if now - c.checked_at >= interval]:
            if self._closing:
                return
            if not peek_alive(conn.sock):
                with contextlib.suppress(ValueError):
                    self._idle.remove(conn)
                    _log.debug("%s: idle connection found closed or dirty", self.name)
                    self._retire(conn, "unhealthy")
                continue
            if not self._check_configured:
                conn.checked_at = now
                continue
            if self._checking >= _BACKGROUND_CHECKS:
                continue
            try:
                self._idle.remove(conn)
            except ValueError:  # borrowed meanwhile
                continue
            conn.watcher.stop()  # off the idle stack: its check reads the socket
            self._held += 1  # until the check's verdict
            self._checking += 1
            errand = _Errand()
            errand.detached = True  # nobody waits: it hands on what passes
            self._spawn_own(
                functools.partial(self._undo_check, conn, True),
                self._background_check,
                errand,
                conn,
            )

    def _background_check(self, errand: _Errand, conn: _Conn) -> None:
        """Upkeep's check of an idle connection; its verdict ends its ``_checking``
        count (``_check_over``) before the connection moves, so one that fails is
        replaced. Then wakes ``wait_ready``, whose count it was in."""
        try:
            self._run_check_errand(errand, conn, True)
        finally:
            self._changed.set()

    def _warn_leaks(self, now: float) -> None:
        threshold = self._leak_threshold
        if threshold is None:
            return
        for handle in list(self._busy.values()):
            stack = getattr(handle, "stack", None)
            if stack is not None and now - handle.acquired_at >= threshold:
                _log.warning(
                    "%s: connection held for %.1fs (leak_threshold %.1fs); acquired at:\n%s",
                    self.name,
                    now - handle.acquired_at,
                    threshold,
                    stack,
                )
                handle.stack = None  # warn once per borrow

    def fill(self) -> int:
        """Start dials towards ``min_idle`` idle connections (``auto``: towards the
        recent peak in use, open), within ``max_size`` and ``max_idle``, at most
        ``_REFILL_DIALS`` in flight (each that succeeds starts the next; none while the
        breaker is open but for its one half-open trial); returns how many it started.
        None for ``_LOCAL_BACKOFF`` s after a dial failed on this side (a TLS context
        that cannot be built) or a connection was stirred (bytes or EOF) within
        ``_LOCAL_BACKOFF`` s of its dial, unused (a greeting no setup hook reads, a
        refusal): no breaker opens to pace those retries. Never yields."""
        if self._closing or _monotonic() - self._local_failure_at < _LOCAL_BACKOFF:
            return 0
        need = min(self._refill_need(), _REFILL_DIALS - self._refilling)
        started = 0
        breaker = self.breaker
        for _ in range(max(need, 0)):
            trial = 0
            if not breaker.is_closed:
                if not breaker.allow_dial():
                    break
                trial = breaker.trial_token
            self._reserve()
            self._refilling += 1
            self._spawn_own(functools.partial(self._undo_refill, trial), self._refill_one, trial)
            started += 1
            if trial:
                break
        return started

    def _refill_one(self, trial: int) -> None:
        ok = False
        generation = fork_generation()
        try:
            try:
                conn = self._open(trial, errand=True)
            except (DialError, PoolClosed) as exc:
                _log.debug("%s: refill dial failed: %s", self.name, exc)
                return
            except Forked:  # the parent's refill, copied into a forked child: abandoned
                return
            self._hand_on(conn)
            ok = True
        finally:
            if not self._forked_since(generation):  # a child's pool counts only its own
                if not self._given_up():  # an abandoned one's was given back by close()
                    self._refilling -= 1
                self._dialers.discard(gevent.getcurrent())
                self._changed.set()
        if ok:
            self.fill()  # the next, a few at a time (a failure waits for the next pass)

    def _ready_target(self) -> int:
        """Open connections ``wait_ready`` waits for: ``min_idle``, or (auto) the
        target as far as ``max_idle`` lets the idle ones reach it."""
        if not self._auto:
            return self._min_idle
        return min(self._auto_target(), len(self._busy) + self._handed + self._max_idle)

    def is_ready(self) -> bool:
        """``min_idle`` connections are open now (what ``wait_ready`` waits for); False
        in a forked child not yet started fresh (what it holds is the parent's) or in
        another OS thread. Never yields."""
        if get_ident() != self._thread_id:  # -1 after a fork until started fresh
            return False
        return self._ready_count() >= self._ready_target()

    def _ready_count(self) -> int:
        """Open connections ``wait_ready`` counts: idle (those out for a background
        check included) and in use. Never yields."""
        return self._resting() + len(self._busy)

    def readiness(self) -> Event | None:
        """For a caller that waits on many pools at once (``PoolManager.wait_ready``):
        None if ``min_idle`` connections are open (or the pool is closing: nothing to
        wait for); else start the dials towards it and return the event the next change
        sets (a connection became idle, a refill ended), cleared now. Starts fresh in a
        forked child. Never yields."""
        self._check_owner()
        if self._closing or self.is_ready():
            return None
        self._changed.clear()
        self.fill()
        return self._changed

    def wait_ready(self, timeout: SupportsFloat | None = None) -> None:
        """Block until ``min_idle`` connections are open (``auto``: its current target,
        at least 1); ``PoolTimeout`` otherwise."""
        self._check_owner()
        limit = self._acquire_timeout if timeout is None else valid_timeout(timeout, self.name)
        deadline = _monotonic() + limit
        while self._ready_count() < self._ready_target():
            if self._closing:
                raise self._closed_error()
            self._changed.clear()
            self.fill()
            remaining = deadline - _monotonic()
            if remaining <= 0 or not self._changed.wait(remaining):
                raise PoolTimeout(self._not_ready(limit), self.name, self.backend)

    def _not_ready(self, limit: float) -> str:
        """Why ``wait_ready(limit)`` timed out: what is open of what it waits for, and
        the last dial error. Never yields."""
        err = self._last_dial_error
        last = f"; last dial error: {err}" if err else ""
        want = f"auto ({self._ready_target()})" if self._auto else self._min_idle
        return (
            f"{self.name}: {self._resting()} of min_idle {want} "
            f"connections ready within {limit:.3g}s{last}"
        )

    # -- closing ------------------------------------------------------------------
    def _note_drained(self) -> None:
        if self._closing and self._size == 0:
            self._drained.set()

    def stop_lending(self) -> None:
        """Close's first step, never yielding: refuse new acquisitions, hand nothing more
        to anyone (a connection that comes back is closed; a waiter already handed one
        but not awake yet closes it instead of using it), wake waiters with
        ``PoolClosed``, close idle connections. A manager takes it in the same step as a
        reload removes the server, so its waiters fail over at once; ``close`` does the
        rest (dials in flight, in-use connections)."""
        self._check_owner()
        self._closing = True
        self._waiters.hand_all(CLOSED)
        self._waiters.stop_timer()
        while self._idle:
            self._retire(self._idle.pop(), "idle")

    def close(self, timeout: SupportsFloat | None = 5.0) -> None:
        """Refuse new acquisitions, wake waiters with ``PoolClosed``, close idle
        connections now and in-use ones as they come back; after ``timeout`` close
        the rest. Returns as soon as everything is closed, and within ``timeout``
        (DESIGN 10): dials and checks in flight end at once (their sockets closed);
        a greenlet of the pool's own that will not die when killed (a hook that
        swallows ``GreenletExit``) is abandoned after what is left of ``timeout``
        (``_KILL_GRACE`` if none is left or set), what it held given back. A second
        call is a no-op."""
        if self._closed:
            return
        if timeout is not None:
            timeout = valid_timeout(timeout, self.name)
        self._check_owner()  # refuses another OS thread; starts fresh in a forked child
        deadline = None if timeout is None else _monotonic() + timeout
        self._closing = True
        current = gevent.getcurrent()
        if self._upkeep is not None:
            self._upkeep.stop()
        self.stop_lending()
        for sock in list(self._in_flight):  # every dial or check in flight: ended now
            close_quietly(sock)
        dialers = [g for g in self._dialers if g is not current]
        if dialers:
            gevent.killall(dialers, block=False)
            left = 0.0 if deadline is None else deadline - _monotonic()
            gevent.joinall(dialers, timeout=left if left > 0 else _KILL_GRACE)
        # what is still here never ran (killed before it started) or will not die
        stuck = [g for g in self._own if g is not current and not g.dead]
        if stuck:
            _log.warning(
                "%s: %d greenlet(s) of the pool (a dial or check running a hook) did not "
                "end when close() killed them; abandoned, their sockets closed",
                self.name,
                len(stuck),
            )
            self._abandoned.update(stuck)
        for g, undo in list(self._own.items()):
            if g is not current:
                del self._own[g]
                undo()  # give back its slot, trial or connection
        self._note_drained()
        if self._size > 0:
            self._drained.wait(None if deadline is None else max(deadline - _monotonic(), 0))
        for conn in list(self._busy):
            _log.warning("%s: closing a connection still in use at close()", self.name)
            del self._busy[conn]
            # its socket is closed: its holder (and its makefile objects) get an OSError,
            # as from any connection that dropped mid-request, which ``with`` discards
            self._retire(conn, "discarded")
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closing

    # -- stats --------------------------------------------------------------------
    def stats(self) -> ServerStats:
        """This pool's numbers now, taken in one go (``size == idle + in_use +
        pending``). From another OS thread, the pool's own hub takes it
        (``read_from_any_thread``). Never yields."""
        return read_from_any_thread(self, self._stats)

    def _stats(self) -> ServerStats:
        """``stats()`` in the owner thread. Never yields."""
        stats: ServerStats = server_stats(ServerStats, self._raw())
        return stats

    def _raw(self) -> tuple[Any, ...]:
        """This pool's numbers, read in one step into one tuple (fields in the order of
        ``lbpool._snapshot.RAW_FIELDS``): what ``ServerStats`` (``_snapshot.server_stats``)
        and the Prometheus collector are made from. ``closed`` is a copy, the wait
        counts a tuple (None while no acquisition ever queued: every one at 0 s). In
        the owner thread. Never yields."""
        if self._fork_gen != _ownership._fork_generation:  # a forked child's first look
            self._check_owner()  # starts fresh: the parent's connections are not ours
        breaker = self.breaker
        seen, peak = self._demand.seen, self._peak
        return (
            self.name,
            self.backend,
            self._size,
            len(self._idle),
            len(self._busy) + self._handed,
            self._pending + self._held,
            len(self._waiters),
            self._hits,
            self._misses,
            self._timeouts,
            self._shed,
            self._dial_failures,
            self._closed_by.copy(),
            self._wait_total,
            self._wait_max,
            breaker.state,
            breaker.trips,
            self.config.max_size,
            self._closing,
            self._waits_served,
            tuple(self._wait_counts) if self._waits else None,  # no wait: no count moved
            seen if seen > peak else peak,
            self._waits,
            self._released,
        )

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name} size={self._size} idle={len(self._idle)} "
            f"in_use={len(self._busy)} waiting={len(self._waiters)}>"
        )

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
