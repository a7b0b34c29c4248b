"""The one upkeep loop on its own, with stand-in pools (no sockets)."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest

from lbpool._upkeep import Upkeep
from tests.support.leaks import settle


class FakePool:
    def __init__(self, name: str, due: float, interval: float = 0.01, fail: bool = False) -> None:
        self.name = name
        self.config = SimpleNamespace(upkeep_interval=interval)
        self.due = due
        self.fail = fail
        self.passes = 0

    def run_upkeep(self) -> None:
        self.passes += 1
        if self.fail:
            raise ValueError("bad hook")

    def upkeep_due(self) -> float:
        return self.due


def test_one_failing_pool_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bad, good = FakePool("bad", 0.01, fail=True), FakePool("good", 0.01)
    upkeep = Upkeep(lambda: [bad, good])
    try:  # ticking every upkeep_interval, the failing pool's passes included
        assert settle(lambda: bad.passes >= 3 and good.passes >= 3, 5), (bad.passes, good.passes)
        assert "bad: upkeep failed" in caplog.text
    finally:
        upkeep.stop()
    assert upkeep.greenlet.dead


def test_at_rest_it_sleeps_until_due_and_on_demand_wakes_it() -> None:
    pool = FakePool("p", due=30.0)
    upkeep = Upkeep(lambda: [pool])
    try:
        assert settle(lambda: pool.passes >= 1, 5)
        gevent.sleep(0.05)
        assert pool.passes == 1  # one pass, then at rest for 30 s
        upkeep.on_demand()
        assert settle(lambda: pool.passes >= 2, 5)
        pool.due = 0.01  # busy now: on_demand while ticking is not needed
        upkeep.wake()
        assert settle(lambda: pool.passes >= 5, 5), pool.passes
    finally:
        upkeep.stop()


def test_no_pools_sleeps_until_woken_and_rereads_pools() -> None:
    pools: list[FakePool] = []
    upkeep = Upkeep(lambda: pools)
    try:
        gevent.sleep(0.05)
        pools.append(FakePool("new", due=30.0))
        upkeep.on_demand()  # at rest with nothing to keep
        assert settle(lambda: pools[0].passes >= 1, 5)
        gevent.sleep(0.01)
        assert pools[0].passes == 1
    finally:
        upkeep.stop()


def test_abandon_ends_the_loop_after_its_pass_without_yielding() -> None:
    pool = FakePool("p", due=30.0)
    upkeep = Upkeep(lambda: [pool])
    assert settle(lambda: pool.passes >= 1, 5)
    upkeep.abandon()
    assert not upkeep.greenlet.dead  # not waited for
    assert settle(lambda: upkeep.greenlet.dead, 5)
    assert pool.passes == 1
