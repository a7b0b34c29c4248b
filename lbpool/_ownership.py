"""One OS thread, one process: the owner check pools and the manager share.

A pool (and the manager) belongs to the OS thread that made it -- its gevent hub is
that thread's -- and to one process. ``ThreadBound`` records the real OS thread id
(``_thread.get_ident`` as it was before monkey-patching: once ``threading`` is
patched every greenlet has its own "thread" id, which is exactly what we must not
compare) and the fork generation. An at-fork hook bumps the generation and poisons
every bound object's thread id, so a forked child's first use goes down
``_check_owner``, which starts the object fresh; a use from another OS thread is
refused with an ``LbpoolError``.

Reads from another OS thread (a metrics scrape served by ``start_http_server``'s
thread) go through ``read_from_any_thread``: the owner's hub runs the read in a
greenlet of its own, so it never interleaves with a step of the owner's own work (a
reload's switch, an acquisition half done).

Imports only ``lbpool.errors``. Nothing here yields but the reads it is given.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import gevent
from gevent._hub_local import get_hub_if_exists
from gevent.hub import get_hub
from gevent.monkey import get_original

from lbpool.errors import LbpoolError

__all__ = ["Forked", "ThreadBound", "fork_generation", "get_ident", "read_from_any_thread"]

T = TypeVar("T")

get_ident: Callable[[], int] = get_original("_thread", "get_ident")
"""The real OS thread id, even when ``threading`` is monkey-patched."""
_allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")

OWNER_HUB_WAIT = 2.0
"""How long (seconds) ``read_from_any_thread`` waits for the owner's hub to answer."""

_fork_generation = 0  # bumped in every forked child
_fork_thread = 0  # in a forked child: the OS thread that forked, the one it inherited
_fork_hub: Any = None  # that thread's hub, if it had one when it forked
_bound: weakref.WeakSet[ThreadBound] = weakref.WeakSet()  # poisoned at fork


class Forked(LbpoolError):
    """Raised in a forked child to a copy of work its parent had in flight (a dial, a
    check, a wait), which the child abandons: it never continues the parent's work."""


def fork_generation() -> int:
    """How many forks this process descends from: work in flight compares the value it
    started with, to find out it is a forked child's copy. Never yields."""
    return _fork_generation


def _after_fork_in_child() -> None:
    """Send every bound object's next use down ``_check_owner``, which starts it fresh;
    let each abandon, now, what its parent had in flight (``_at_fork_in_child``)."""
    global _fork_generation, _fork_thread, _fork_hub
    _fork_generation += 1
    _fork_thread = get_ident()  # the hook runs in the thread that forked
    _fork_hub = get_hub_if_exists()  # never makes one here
    for obj in list(_bound):
        obj._thread_id = -1
        obj._at_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ThreadBound:
    """Base for objects used from one OS thread of one process.

    Hot paths compare ``get_ident() != self._thread_id`` inline and call
    ``_check_owner()`` only when that differs (another thread, or a forked child,
    whose id was poisoned to -1). Never yields.
    """

    _thread_id: int  # the owner's OS thread id; -1 after a fork until started fresh
    _fork_gen: int  # the fork generation it was bound in
    _hub: Any  # the owner thread's gevent hub

    def _bind_to_current_thread(self) -> None:
        self._thread_id = get_ident()
        self._fork_gen = _fork_generation
        self._hub = get_hub()
        _bound.add(self)

    def _check_owner(self) -> None:
        """Start fresh in a forked child; refuse another OS thread."""
        if self._fork_gen != _fork_generation:
            self._start_fresh_after_fork()
        elif get_ident() != self._thread_id:
            raise LbpoolError(self._refusal(get_ident()))

    def _start_fresh_after_fork(self) -> None:
        """In a forked child: forget what the parent held. The default only rebinds."""
        self._bind_to_current_thread()

    def _at_fork_in_child(self) -> None:
        """Called in a forked child right after the fork, before any greenlet runs, so
        nothing copied from the parent can resume on the parent's sockets. Must not
        yield (no greenlet may switch inside ``os.fork``). The default does nothing."""

    def _refusal(self, used_from: int) -> str:
        """The wrong-thread message."""
        return (
            f"this object belongs to another thread (made in OS thread {self._thread_id}, "
            f"used from {used_from}); use one per OS thread"
        )


def _fresh_then(obj: ThreadBound, read: Callable[[], T]) -> T:
    """In a forked child, in the forking thread's hub: start ``obj`` fresh unless it
    has been already, then ``read()``."""
    if obj._fork_gen != _fork_generation:
        obj._check_owner()
    return read()


def read_from_any_thread(obj: ThreadBound, read: Callable[[], T]) -> T:
    """``read()`` as ``obj``'s owner thread sees it, from any thread.

    In the owner thread call it here; in a forked child, whose forking thread owns
    everything the child inherited, first start ``obj`` fresh (``_check_owner``: the
    parent's connections are not the child's), then call it -- from the forking
    thread here, from another thread of the child (an exporter started after the
    fork) in the forking thread's hub, as below, so that thread keeps ``obj``; if that
    hub does not answer, ``LbpoolError``. From another OS thread, have the owner's hub
    run it in a greenlet of its own (started by ``loop.run_callback_threadsafe``;
    ``read`` may pace itself with short pauses, as a big ``manager.stats()`` does) and
    wait up to ``OWNER_HUB_WAIT`` seconds for the answer on a real lock (never the
    caller's hub: this thread may have none). If the hub does not answer in time (the owner thread
    blocked outside gevent, or gone), ``read`` is called here after all, as before:
    then it is only as consistent as a read racing the owner can be, and a
    ``RuntimeError`` from a dict changed mid-iteration is retried twice. Exceptions of
    ``read`` are raised to the caller. In the owner thread ``read`` runs as it is.
    """
    hub, job = obj._hub, read
    if obj._fork_gen != _fork_generation:  # a forked child's first look at obj
        if get_ident() == _fork_thread or _fork_hub is None:
            obj._check_owner()  # start fresh, as any use does: obj is this thread's now
            return read()
        # another thread of the child (an exporter started after the fork): the thread
        # that forked keeps what it inherited, so its hub starts obj fresh and reads
        hub, job = _fork_hub, partial(_fresh_then, obj, read)
    elif get_ident() == obj._thread_id:
        return read()
    done = _allocate_lock()
    done.acquire()
    outcome: list[tuple[bool, Any]] = []
    abandoned = False

    def in_hub() -> None:
        if abandoned:
            return
        try:
            outcome.append((True, job()))
        except BaseException as exc:  # handed to the waiting thread, raised there
            outcome.append((False, exc))
        finally:
            done.release()

    def start() -> None:  # a hub callback: the read gets a greenlet, so it may pace itself
        if not abandoned:
            gevent.spawn(in_hub)

    try:
        hub.loop.run_callback_threadsafe(start)
    except Exception:  # the owner's loop is destroyed: nobody else reads or writes
        pass
    else:
        if done.acquire(timeout=OWNER_HUB_WAIT):
            ok, value = outcome[0]
            if ok:
                return cast(T, value)
            raise value
        abandoned = True
    if obj._fork_gen != _fork_generation:  # not started fresh: only its owner may do that
        raise LbpoolError(
            f"{type(obj).__name__}: read from another thread of a forked child, whose "
            f"forking thread's hub did not answer within {OWNER_HUB_WAIT:g}s"
        )
    for _ in range(2):
        try:
            return read()
        except RuntimeError:  # a dict changed size under us: the owner is running
            continue
    return read()
