"""The waiter queue on its own: FIFO handing, named outcomes, one timer; and the
waiter's hand-off (lbpool._handoff) keeping gevent's Waiter guarantees."""

from __future__ import annotations

from time import monotonic
from typing import Any

import gevent
import greenlet
import pytest
from gevent.event import Event
from gevent.exceptions import ConcurrentObjectUseError
from gevent.hub import get_hub

from lbpool._waiters import BROKEN, CLOSED, PERMIT, TIMED_OUT, WAITING, Outcome, WaitQueue
from tests.support.interrupt import throw_now


def _park(queue: WaitQueue, deadline: float, got: list[tuple[int, object]], n: int) -> None:
    got.append((n, queue.join(deadline).wait()))


def test_outcomes_are_named_and_waiting_until_decided() -> None:
    queue = WaitQueue(get_hub())
    w = queue.join(float("inf"))
    assert w.outcome is WAITING
    assert [repr(o) for o in (WAITING, PERMIT, CLOSED, BROKEN, TIMED_OUT)] == [
        "WAITING",
        "PERMIT",
        "CLOSED",
        "BROKEN",
        "TIMED_OUT",
    ]
    assert all(isinstance(o, Outcome) for o in (PERMIT, CLOSED, BROKEN, TIMED_OUT))
    queue.hand(PERMIT)
    assert w.outcome is PERMIT  # decided at once, before the wake-up runs
    assert not queue


def test_hand_serves_oldest_first_and_never_switches() -> None:
    queue = WaitQueue(get_hub())
    got: list[tuple[int, object]] = []
    waiters = [gevent.spawn(_park, queue, float("inf"), got, n) for n in range(3)]
    gevent.sleep(0)
    assert len(queue) == 3
    first = object()
    queue.hand(first)  # type: ignore[arg-type]  # any object: the queue does not look
    queue.hand(PERMIT)
    assert got == []  # handing only schedules the wake-ups
    queue.hand_all(CLOSED)
    gevent.joinall(waiters, timeout=5)
    assert got == [(0, first), (1, PERMIT), (2, CLOSED)]


def test_the_switch_value_is_not_a_channel() -> None:
    queue = WaitQueue(get_hub())
    w = queue.join(float("inf"))
    w.outcome = BROKEN
    w.switch("ignored")  # stored by gevent's Waiter, never read
    assert w.wait() is BROKEN


def test_one_timer_times_out_each_waiter_at_its_deadline() -> None:
    queue = WaitQueue(get_hub())
    got: list[tuple[int, object]] = []
    now = monotonic()
    late = gevent.spawn(_park, queue, now + 0.2, got, 1)
    never = gevent.spawn(_park, queue, float("inf"), got, 2)
    early = gevent.spawn(_park, queue, now + 0.05, got, 0)
    gevent.sleep(0)
    assert queue._timer_at == now + 0.05  # armed for the earliest, not per wait
    gevent.joinall([early], timeout=5)
    assert got == [(0, TIMED_OUT)]
    assert queue._timer_at == now + 0.2  # re-armed for the next one
    gevent.joinall([late], timeout=5)
    assert got == [(0, TIMED_OUT), (1, TIMED_OUT)]
    assert queue._timer is None  # a waiter with no deadline needs no timer
    assert len(queue) == 1
    queue.hand_all(CLOSED)
    gevent.joinall([never], timeout=5)
    assert got[-1] == (2, CLOSED)
    queue.stop_timer()


def test_stop_timer_leaves_waiters_queued() -> None:
    queue = WaitQueue(get_hub())
    got: list[tuple[int, object]] = []
    g = gevent.spawn(_park, queue, monotonic() + 0.01, got, 0)
    gevent.sleep(0)
    queue.stop_timer()
    gevent.sleep(0.05)
    assert got == [] and len(queue) == 1
    queue.hand_all(CLOSED)
    gevent.joinall([g], timeout=5)
    assert got == [(0, CLOSED)]


# -- the hand-off: gevent's Waiter guarantees (lbpool._handoff) --------------------------


class _Interrupt(Exception):
    pass


def test_a_wake_up_for_an_interrupted_wait_switches_into_nothing() -> None:
    """A waiter is handed an outcome (its wake-up scheduled) and interrupted before the
    wake-up runs; its greenlet goes on to wait for something else. The stale wake-up
    must find no greenlet: switching into this one would end its new wait early."""
    queue = WaitQueue(get_hub())
    w = queue.join(float("inf"))
    moved_on = Event()

    def run() -> bool:
        with pytest.raises(_Interrupt):
            w.get()
        return moved_on.wait(timeout=5)

    g = gevent.spawn(run)
    gevent.sleep(0)  # parked in w.get()
    queue.hand(PERMIT)  # the wake-up is scheduled, not run
    throw_now(g, _Interrupt())  # g now waits on moved_on; the hub ran the stale wake-up
    assert not g.ready()  # its new wait goes on
    moved_on.set()
    assert g.get(timeout=5) is True


def test_a_second_greenlet_waiting_on_one_waiter_raises() -> None:
    queue = WaitQueue(get_hub())
    w = queue.join(float("inf"))
    first = gevent.spawn(w.wait)
    gevent.sleep(0)  # parked

    def second() -> None:
        with pytest.raises(ConcurrentObjectUseError):
            w.get()

    gevent.spawn(second).get(timeout=5)
    assert not first.ready()  # the first still waits, and is woken as ever
    queue.hand(CLOSED)
    assert first.get(timeout=5) is CLOSED


def test_switch_outside_the_hub_raises_and_leaves_the_waiter_waiting() -> None:
    queue = WaitQueue(get_hub())
    w = queue.join(float("inf"))
    g = gevent.spawn(w.wait)
    gevent.sleep(0)  # parked
    with pytest.raises(AssertionError):
        w.switch(None)  # from this greenlet, not the hub's
    assert not g.ready()
    queue.hand(BROKEN)
    assert g.get(timeout=5) is BROKEN


def test_an_error_out_of_the_wake_up_goes_to_the_hubs_handle_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A woken greenlet that dies with an error raises it in its parent, the hub, out of
    the wake-up's switch: the waiter gives it to ``hub.handle_error`` and the hub goes on."""
    hub = get_hub()
    queue = WaitQueue(hub)
    w = queue.join(float("inf"))
    seen: list[Any] = []
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, value, tb: seen.append(kind))

    def run() -> None:
        w.get()
        raise _Interrupt

    g = greenlet.greenlet(run, parent=hub)
    hub.loop.run_callback(greenlet.getcurrent().switch)  # back here once g parks
    g.switch()
    queue.hand(PERMIT)
    gevent.sleep(0)  # the hub runs the wake-up
    assert seen == [_Interrupt] and g.dead
