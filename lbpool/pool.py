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
import logging
import os
import random
import socket
import traceback
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Any, cast

import gevent
from gevent.event import Event

from lbpool._net import close_quietly
from lbpool._ownership import ThreadBound, get_ident
from lbpool._upkeep import Upkeep
from lbpool._waiters import (
    BROKEN,
    CLOSED,
    PERMIT,
    TIMED_OUT,
    WAITING,
    Waiter,
    WaitQueue,
    valid_timeout,
)
from lbpool.breaker import PANIC_DIAL, Breaker
from lbpool.config import Address, BreakerConfig, DialConfig, HealthCheckConfig, PoolConfig
from lbpool.config import parse_address as _parse_address
from lbpool.connection import PooledConnection, _Conn, _is_network_error
from lbpool.dial import dial as _dial
from lbpool.errors import DialError, PoolClosed, PoolExhausted, PoolTimeout
from lbpool.health import Unhealthy, check_health, peek_alive
from lbpool.stats import CLOSE_REASONS, WAIT_BUCKETS, ServerStats

_log = logging.getLogger("lbpool")
# checked_at of a connection the server's failure made suspect: checked before reuse
_SUSPECT = float("-inf")

SetupHook = Callable[[socket.socket], object]


def _nothing() -> None:
    """``on_demand`` of a pool no upkeep keeps."""


# The longest an at-rest pool's upkeep sleeps before looking again anyway.
_MAX_REST = 60.0
# How long past its budget a caller waits for a dial errand before calling it overrun
# (scheduling slack: a dial that ran out of time is reaching its verdict by then).
_OVERRUN_GRACE = 0.25


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
    first out, so the coldest ones age out above ``min_idle``.
    """

    def __init__(
        self,
        address: Address | str,
        *,
        pool: PoolConfig | None = None,
        dial: DialConfig | None = None,
        health_check: HealthCheckConfig | None = None,
        breaker: Breaker | None = None,
        setup: SetupHook | None = None,
        backend: str | None = None,
        weight: int = 1,
        upkeep: bool = True,
    ) -> None:
        self.address = address if isinstance(address, Address) else _parse_address(address)
        self.name = str(self.address)
        self.backend = backend
        self.weight = weight
        self.owner_kind = "pool"  # named in the wrong-thread error; "manager" when managed
        self.breaker = breaker if breaker is not None else Breaker(self.name, BreakerConfig())
        self._set_config(
            pool or PoolConfig(), dial or DialConfig(), health_check or HealthCheckConfig(), setup
        )

        self._idle: deque[_Conn] = deque()
        self._busy: dict[_Conn, PooledConnection] = {}
        self._size = 0  # open connections + reserved dial slots
        self._pending = 0  # reserved dial slots: dials in progress or about to start
        # connections under a check, or got by an errand (a dial or check in its own
        # greenlet) for a caller not awake yet: counted as pending in stats
        self._held = 0
        self._handed = 0  # connections handed to a waiter that has not woken yet
        self._refilling = 0  # of which: upkeep refills
        self._closing = False
        self._closed = False
        self._drained = Event()
        self._changed = Event()  # a connection became idle or a refill ended
        # called by an acquisition that had to wait or dial: wakes an upkeep at rest
        # (this pool's own, or the manager's, which sets it)
        self.on_demand: Callable[[], object] = _nothing
        self._dialers: set[gevent.Greenlet] = set()  # refills and errands: close() kills them
        self._last_dial_error: BaseException | None = None
        self._reset_counters()
        self._bind_to_current_thread()
        self._waiters = WaitQueue(self._hub)  # FIFO, with one timer for the earliest deadline
        self._upkeep: Upkeep | None = None  # a managed pool's is the manager's
        if upkeep:
            self._start_upkeep()

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
        self._max_size = pool.max_size
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
        weight: int = 1,
    ) -> None:
        """Apply new settings in place: nothing in use is touched.

        A smaller ``max_size`` closes idle connections beyond it now and in-use ones
        as they come back; a larger one lets waiters dial at once.
        """
        self._check_owner()
        self._set_config(pool, dial, health_check, setup)
        self.weight = weight
        while self._size > self._max_size and self._idle:
            self._retire(self._idle.popleft(), "discarded")
        self._hand_on()  # a larger max_size: waiters may dial now

    def _expiry(self, now: float) -> float:
        cfg = self.config
        return now + cfg.max_lifetime * (1.0 - random.random() * cfg.lifetime_jitter)

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
        self._closed_by = dict.fromkeys(CLOSE_REASONS, 0)

    # -- ownership: one OS thread, one process ------------------------------------
    # (ThreadBound: _check_owner refuses another OS thread, starts fresh after a fork)
    def _refusal(self, used_from: int) -> str:
        return (
            f"{self.name}: this {self.owner_kind} belongs to another thread (made in OS "
            f"thread {self._thread_id}, used from {used_from}); use one per OS thread"
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
        for conn in inherited:
            conn.close()
        self._size = self._pending = self._refilling = self._handed = self._held = 0
        self._drained = Event()
        self._changed = Event()
        self._reset_counters()
        self._bind_to_current_thread()
        self._waiters = WaitQueue(self._hub)  # the parent's waiters are not ours
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

    def get(self, timeout: float | None = None) -> PooledConnection:
        """Acquire now; the handle releases itself at the end of a ``with`` block."""
        return self.acquire(timeout)

    def acquire(self, timeout: float | None = None, *, panic: bool = False) -> PooledConnection:
        """Borrow a connection within ``timeout`` (default: ``acquire_timeout``).

        One deadline bounds all of it: each borrow check gets at most the time left
        (and past the deadline no further idle connection is taken), the wait, the
        dial with its setup hook (and, for a half-open trial, its check).

        ``panic`` (the manager's panic mode, ``balance.panic_threshold``): dial even if
        the breaker refuses; that dial is the breaker's verdict (``PANIC_DIAL``).
        """
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._check_owner()
        if timeout is not None:  # checked first, on every path: nothing has changed yet
            timeout = valid_timeout(timeout, self.name)
        if self._closing:
            raise PoolClosed(f"{self.name}: pool is closed")
        idle = self._idle
        if idle and not self.breaker.is_closed:
            self._drop_idle()  # not while the breaker is not closed: a trial is a dial
        deadline = 0.0  # made on the first borrow check (the uncontended path needs none)
        while idle:
            conn = idle.pop()
            now = _monotonic()
            if now >= conn.expires_at:
                self._retire(conn, "lifetime")
                continue
            if now - conn.checked_at >= self._check_after:
                if not deadline:
                    deadline = now + (self._acquire_timeout if timeout is None else timeout)
                elif now >= deadline:
                    idle.append(conn)  # unchecked, untouched: past the deadline, not taken
                    break
                if not self._borrow_check(conn, deadline - now):
                    continue
            self._hits += 1
            conn.uses += 1  # _lend, inlined (bench A); test_fast_acquire_matches_lend
            handle = PooledConnection(self, conn, now)
            self._busy[conn] = handle
            if self._leak_threshold is not None:
                handle.stack = "".join(traceback.format_stack()[:-1])
            return handle
        return self._acquire_slow(timeout, deadline, panic)

    def _acquire_slow(
        self, timeout: float | None, deadline: float, panic: bool = False
    ) -> PooledConnection:
        if self._closing:  # closed during a borrow check
            raise PoolClosed(f"{self.name}: pool is closed")
        self.on_demand()  # no idle connection: the pool is busy, upkeep should watch it
        start = _monotonic()
        if not deadline:
            deadline = start + (self._acquire_timeout if timeout is None else timeout)
        elif start >= deadline:  # borrow checks used up the time
            self._timeouts += 1
            raise PoolTimeout(f"{self.name}: acquire deadline passed during borrow checks")
        if self._size < self._max_size and not self._waiters:
            self._reserve()
            return self._lend_new(deadline, panic)
        if self._max_waiting and len(self._waiters) >= self._max_waiting:
            self._shed += 1
            raise PoolExhausted(
                f"{self.name}: {len(self._waiters)} callers already wait "
                f"(max_waiting {self._max_waiting}); shed"
            )
        return self._wait(start, deadline, panic)

    def _wait(self, start: float, deadline: float, panic: bool = False) -> PooledConnection:
        w = self._waiters.join(deadline)
        try:
            outcome = w.wait()
        except BaseException:
            self._abandon(w)
            raise
        now = _monotonic()
        waited = now - start
        self._wait_total += waited
        if waited > self._wait_max:
            self._wait_max = waited
        self._wait_counts[bisect_left(WAIT_BUCKETS, waited)] += 1
        if isinstance(outcome, _Conn):  # the common case: a connection handed over
            conn = outcome
            self._handed -= 1
            if self._closing:  # handed before a close began (a reload removed the server)
                self._retire(conn, "discarded")
                raise PoolClosed(f"{self.name}: pool closed while waiting")
            self._waits_served += 1
            self._hits += 1
            conn.uses += 1  # _lend, inlined (contended path); test_fast_wake_matches_lend
            handle = PooledConnection(self, conn, now)
            self._busy[conn] = handle
            if self._leak_threshold is not None:
                handle.stack = "".join(traceback.format_stack()[:-1])
            return handle
        if outcome is TIMED_OUT:  # the timer took it off the queue
            self._timeouts += 1
            raise PoolTimeout(
                f"{self.name}: no connection within {deadline - start:.3g}s "
                f"({len(self._busy)} in use, {self._max_size} max, {len(self._waiters)} waiting)"
            )
        if outcome is PERMIT:
            if self._closing:  # as above: dial nothing for a pool that is closing
                self._unreserve()
                raise PoolClosed(f"{self.name}: pool closed while waiting")
            lent = self._lend_new(deadline, panic)
            self._waits_served += 1
            return lent
        if outcome is BROKEN:
            raise DialError(self.name, "circuit breaker opened while waiting")
        raise PoolClosed(f"{self.name}: pool closed while waiting")  # outcome is CLOSED

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
        if self._leak_threshold is not None:
            handle.stack = "".join(traceback.format_stack()[:-2])
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
            elif panic:
                trial = PANIC_DIAL
            else:
                self._unreserve()
                raise DialError(
                    self.name,
                    f"circuit breaker {breaker.state}, retry in {breaker.retry_in():.1f}s",
                )
        if remaining <= 0:
            if trial:
                breaker.abandon_trial(trial)
            self._unreserve()
            self._timeouts += 1
            raise PoolTimeout(f"{self.name}: acquire deadline passed before a dial could start")
        if remaining >= self._verdict_time(trial) and not self._hooked(trial):
            conn = self._open(trial)
        else:
            conn = self._dial_errand(trial, remaining)
        if self._closing:
            self._retire(conn, "discarded")
            raise PoolClosed(f"{self.name}: pool closed while dialing")
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
        g = gevent.spawn(self._run_dial_errand, errand, trial)
        self._dialers.add(g)
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
                f"(the dial goes on, up to dial.timeout {self.dial_config.timeout:.3g}s)"
            )
        if isinstance(result, gevent.GreenletExit):  # killed by close()
            raise PoolClosed(f"{self.name}: pool closed while dialing")
        raise cast(BaseException, result)

    def _await_errand(self, errand: _Errand, g: gevent.Greenlet, remaining: float) -> object:
        """The errand's result, or None if it is still running after ``remaining`` (it is
        then detached: it hands on what it gets). Interrupted: detached likewise."""
        try:
            g.join(remaining)
        except BaseException:
            self._detach(errand, g)
            raise
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

    def _run_dial_errand(self, errand: _Errand, trial: int) -> object:
        try:
            try:
                conn = self._open(trial)
            except DialError as exc:
                return exc
            if errand.detached:
                self._hand_on(conn)
                return None
            self._held += 1  # until its caller wakes and takes it
            return conn
        finally:
            self._dialers.discard(gevent.getcurrent())

    def _open(self, trial: int) -> _Conn:
        """Dial into a slot reserved in ``_size`` and ``_pending``, within ``dial.timeout``;
        any failure frees it.

        A failed dial counts against the breaker and gets the server's idle connections
        checked; a successful one ends a streak of dial failures. A half-open trial
        (``trial``: its token) closes the breaker only once the configured check passes
        on the new connection; an interrupted one gives back the trial.
        """
        try:
            sock = _dial(self.address, self.dial_config, setup=self._setup)
        except BaseException as exc:
            failed = isinstance(exc, DialError)
            if failed:
                self._dial_failures += 1
                self._last_dial_error = exc
            elif trial:
                self.breaker.abandon_trial(trial)
            self._unreserve(exc if failed else None, trial, dial=True)
            raise
        if trial and self._check_configured:
            self._check_trial(sock, trial)
        self._pending -= 1
        breaker = self.breaker
        if trial:  # a half-open trial's token, or PANIC_DIAL: closes the breaker
            breaker.record_success(trial)
        elif breaker._failure_count:
            breaker.record_dial_success()
        if breaker.rate is not None:  # failure_rate: a successful dial is a success
            breaker.count_success()
        now = _monotonic()
        return _Conn(sock, now, self._expiry(now), breaker.closes)

    def _check_trial(self, sock: socket.socket, trial: int) -> None:
        """The configured check on a half-open trial's new connection: its verdict."""
        try:
            check_health(sock, self.health_config)
        except (Unhealthy, OSError) as exc:
            close_quietly(sock)
            self._dial_failures += 1
            err = DialError(self.name, f"trial connection failed its health check: {exc}")
            self._last_dial_error = err
            self._unreserve(exc, trial, dial=True)
            raise err from exc
        except BaseException:
            close_quietly(sock)
            self.breaker.abandon_trial(trial)
            self._unreserve()
            raise

    # -- giving back ----------------------------------------------------------------
    def _return(self, conn: _Conn) -> None:
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._check_owner()
        try:
            del self._busy[conn]
        except KeyError:  # force-closed by close(), or inherited across fork
            conn.close()
            return
        now = _monotonic()
        checked = conn.checked_at  # _SUSPECT: in use when the server failed us
        conn.last_used_at = conn.checked_at = now
        breaker = self.breaker
        if breaker._failure_count:  # a clean use ends a streak of failures
            breaker.record_success(None)  # None: not a half-open trial's verdict
        rate = breaker.rate  # failure_rate: a clean use is a success (breaker closed)
        if rate is not None and breaker.is_closed:
            rate.success()
        if now >= conn.expires_at:
            self._retire(conn, "lifetime")
        elif self._closing or self._size > self._max_size:
            self._retire(conn, "discarded")
        elif (checked == _SUSPECT or not self._check_after) and not peek_alive(conn.sock):
            # reset while in use (a reply read before the RST does not make it alive),
            # or check_after 0 ("check every reuse"), which a hand-off is too
            self._retire(conn, "unhealthy")
        elif self._waiters:  # _hand_on, inlined (bench A); test_fast_return_matches_hand_on
            w = self._waiters.popleft()
            self._handed += 1
            w.outcome = conn
            self._hub.loop.run_callback(w.switch, None)
        else:
            self._idle.append(conn)

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
        if failure is not None:  # counted before the slot moves: a listener sees exact stats
            # trial None: an error on a connection in use cannot end a trial in flight
            self.breaker.record_failure(failure, trial or None, dial=dial)
            self._suspect_idle()
        self._hand_on()

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
            if waiters:
                self._handed += 1  # in use from now on, though its waiter is not awake yet
                waiters.hand(conn)
            else:
                self._idle.append(conn)
                self._changed.set()
        while waiters and self._size < self._max_size:
            self._reserve()
            waiters.hand(PERMIT)

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
            self._held += 1
            try:
                failure = self._run_check(conn)
            except BaseException:
                self._held -= 1
                self._retire(conn, "unhealthy")
                raise
            self._held -= 1
            if failure is not None:
                self._retire(conn, "unhealthy", failure)
                return False
        conn.checked_at = _monotonic()
        return True

    def _run_check(self, conn: _Conn) -> BaseException | None:
        """The configured check, bounded by ``health_check.timeout``: its failure or None."""
        try:
            check_health(conn.sock, self.health_config)
        except (Unhealthy, OSError) as exc:
            _log.info("%s: health check failed: %s", self.name, exc)
            return exc
        return None

    def _check_errand(self, conn: _Conn, remaining: float) -> bool:
        errand = _Errand()
        self._held += 1  # until the check's verdict, or its caller takes it
        g = gevent.spawn(self._run_check_errand, errand, conn)
        self._dialers.add(g)
        # no longer than the check should take: one still running is overrunning (its
        # hook swallowed the timer); it goes on alone to its verdict
        wait = min(remaining, self.health_config.timeout + _OVERRUN_GRACE)
        if self._await_errand(errand, g, wait) is conn:
            self._held -= 1
            return True
        return False

    def _run_check_errand(self, errand: _Errand, conn: _Conn) -> _Conn | None:
        try:
            try:
                failure = self._run_check(conn)
            except BaseException:
                self._held -= 1
                self._retire(conn, "unhealthy")
                raise
            if failure is not None:
                self._held -= 1
                self._retire(conn, "unhealthy", failure)
                return None
            conn.checked_at = _monotonic()
            if errand.detached:
                self._held -= 1
                self._hand_on(conn)
                return None
            return conn  # still held: its caller takes it
        finally:
            self._dialers.discard(gevent.getcurrent())

    # -- upkeep -------------------------------------------------------------------
    def _start_upkeep(self) -> None:
        """A standalone pool's own upkeep greenlet (lbpool._upkeep, as the manager's)."""
        self._upkeep = Upkeep(lambda: (self,))
        self.on_demand = self._upkeep.on_demand

    def upkeep_due(self) -> float:
        """Seconds until upkeep has something to do here.

        While the pool is busy (connections lent, callers waiting, dials running, fewer
        than ``min_idle`` idle) that is every ``upkeep_interval``. At rest it is the
        next idle connection's expiry or check, so an idle pool costs no wake-ups; the
        first acquisition that has to wait or dial calls ``on_demand`` and upkeep resumes.
        """
        cfg = self.config
        if self._closing:
            return float("inf")
        if (
            self._busy
            or self._waiters
            or self._pending
            or self._held
            or len(self._idle) < cfg.min_idle
        ):
            return cfg.upkeep_interval
        interval = self.health_config.interval
        expire_idle = len(self._idle) > cfg.min_idle
        due = min(interval, cfg.idle_timeout, _MAX_REST)
        now = _monotonic()
        for conn in self._idle:
            due = min(due, conn.expires_at - now, conn.checked_at + interval - now)
            if expire_idle:
                due = min(due, conn.last_used_at + cfg.idle_timeout - now)
        return max(due, cfg.upkeep_interval)

    def run_upkeep(self) -> None:
        """One pass: expire idle and old connections, check idle ones, warn of leaks,
        refill to ``min_idle``. Called by the pool's own greenlet or the manager's."""
        self._check_owner()
        if self._closing:
            return
        now = _monotonic()
        self._expire_idle(now)
        self._warn_leaks(now)
        self._check_idle(now)
        self.fill()

    def _expire_idle(self, now: float) -> None:
        cfg = self.config
        keep: deque[_Conn] = deque()
        idle = self._idle
        # oldest first: the bottom of the LIFO stack
        while idle:
            conn = idle.popleft()
            if now >= conn.expires_at:
                self._retire(conn, "lifetime")
            elif (
                now - conn.last_used_at >= cfg.idle_timeout
                and len(idle) + len(keep) >= cfg.min_idle
            ):
                self._retire(conn, "idle")
            else:
                keep.append(conn)
        idle.extend(keep)

    def _check_idle(self, now: float) -> None:
        """Check each idle connection not checked for ``health_check.interval``; one at
        a time and off the stack, so no caller can borrow it mid-check."""
        interval = self.health_config.interval
        for conn in [c for c in self._idle if now - c.checked_at >= interval]:
            if self._closing:
                return
            try:
                self._idle.remove(conn)
            except ValueError:  # borrowed meanwhile
                continue
            if self._borrow_check(conn):
                self._hand_on(conn)

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
        """Start concurrent dials up to ``min_idle`` idle connections; returns how many."""
        if self._closing:
            return 0
        need = self.config.min_idle - len(self._idle) - self._refilling
        need = min(need, self._max_size - self._size)
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
            g = gevent.spawn(self._refill_one, trial)
            self._dialers.add(g)
            started += 1
            if trial:
                break
        return started

    def _refill_one(self, trial: int) -> None:
        try:
            try:
                conn = self._open(trial)
            except DialError as exc:
                _log.debug("%s: refill dial failed: %s", self.name, exc)
                return
            self._hand_on(conn)
        finally:
            self._refilling -= 1
            self._dialers.discard(gevent.getcurrent())
            self._changed.set()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``min_idle`` connections are open; ``PoolTimeout`` otherwise."""
        self._check_owner()
        limit = self._acquire_timeout if timeout is None else valid_timeout(timeout, self.name)
        deadline = _monotonic() + limit
        while len(self._idle) + len(self._busy) < self.config.min_idle:
            if self._closing:
                raise PoolClosed(f"{self.name}: pool is closed")
            self._changed.clear()
            self.fill()
            remaining = deadline - _monotonic()
            if remaining <= 0 or not self._changed.wait(remaining):
                err = self._last_dial_error
                last = f"; last dial error: {err}" if err else ""
                raise PoolTimeout(
                    f"{self.name}: {len(self._idle)} of min_idle {self.config.min_idle} "
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

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new acquisitions, wake waiters with ``PoolClosed``, close idle
        connections now and in-use ones as they come back; after ``timeout`` close
        the rest. Returns as soon as everything is closed. A second call is a no-op."""
        if self._closed:
            return
        if timeout is not None:
            timeout = valid_timeout(timeout, self.name)
        self._check_owner()  # refuses another OS thread; starts fresh in a forked child
        self._closing = True
        current = gevent.getcurrent()
        if self._upkeep is not None:
            self._upkeep.stop()
        self.stop_lending()
        dialers = [g for g in self._dialers if g is not current]
        if dialers:
            gevent.killall(dialers, block=True)
        self._note_drained()
        if self._size > 0:
            self._drained.wait(timeout)
        for conn in list(self._busy):
            _log.warning("%s: closing a connection still in use at close()", self.name)
            del self._busy[conn]
            self._retire(conn, "discarded")
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closing

    # -- stats --------------------------------------------------------------------
    def stats(self) -> ServerStats:
        breaker = self.breaker
        acquired = self._hits + self._misses
        observed = acquired - self._waits_served  # acquisitions that did not queue: 0 s
        buckets: dict[float, int] = {}
        for le, count in zip(WAIT_BUCKETS, self._wait_counts[:-1], strict=True):
            observed += count
            buckets[le] = observed
        return ServerStats(
            address=self.name,
            backend=self.backend,
            size=self._size,
            idle=len(self._idle),
            in_use=len(self._busy) + self._handed,
            pending=self._pending + self._held,
            waiting=len(self._waiters),
            acquired=acquired,
            hits=self._hits,
            misses=self._misses,
            timeouts=self._timeouts,
            shed=self._shed,
            dial_failures=self._dial_failures,
            closed=dict(self._closed_by),
            wait_time_total=self._wait_total,
            wait_time_max=self._wait_max,
            breaker_state=breaker.state,
            breaker_trips=breaker.trips,
            max_size=self._max_size,
            draining=self._closing,
            wait_count=observed + self._wait_counts[-1],
            wait_buckets=buckets,
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
