"""The waiter queue on its own: FIFO handing, named outcomes, one timer."""

from __future__ import annotations

from time import monotonic

import gevent
from gevent.hub import get_hub

from lbpool._waiters import BROKEN, CLOSED, PERMIT, TIMED_OUT, WAITING, Outcome, WaitQueue


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
