"""A Prometheus scrape from the exporter's own OS thread, racing reloads.

``prometheus_client.start_http_server`` serves scrapes from a real OS thread (in a
process that is not monkey-patched). The collector's ``manager.stats()`` then has the
manager's hub take the snapshot (``lbpool._ownership.read_from_any_thread``), so it is
never read while a reload is half switched: every scrape shows one applied config's
servers, never a mix, and every scrape succeeds.

The tests are not monkey-patched: ``threading.Thread`` is a real OS thread here.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from lbpool import PoolManager
from tests.support.leaks import fd_count, settle
from tests.support.net import listening_addresses

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import lbpool.metrics  # noqa: E402

BACKENDS = ("a", "b", "c", "d")
PER_BACKEND = 40
RELOADS = 100  # bounded in count ...
RELOAD_SECONDS = 12.0  # ... and in time


@pytest.fixture
def addresses() -> Iterator[list[str]]:
    """Listening loopback sockets (nothing dials them: min_idle 0, no traffic)."""
    with listening_addresses(3 * PER_BACKEND) as addresses:
        yield addresses


def configs(addresses: list[str]) -> list[dict[str, Any]]:
    """Three configs whose memberships differ in every backend (a mix is visible)."""
    out = []
    for k in range(3):
        servers = addresses[k * PER_BACKEND : (k + 1) * PER_BACKEND]
        backends = {
            name: {"servers": servers[i::2] if (i + k) % 2 else servers[: PER_BACKEND // 2 + i]}
            for i, name in enumerate(BACKENDS)
        }
        out.append({"defaults": {"pool": {"min_idle": 0}}, "backends": backends})
    return out


def membership(config: dict[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset(
        (name, address) for name, b in config["backends"].items() for address in b["servers"]
    )


def scraped_membership(text: str) -> frozenset[tuple[str, str]]:
    for family in text_string_to_metric_families(text):
        if family.name == "lbpool_size":
            return frozenset((s.labels["backend"], s.labels["server"]) for s in family.samples)
    raise AssertionError("no lbpool_size family in the scrape")


class Scraper:
    """Scrapes ``registry`` in a real OS thread until stopped; keeps what it saw."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.seen: list[frozenset[tuple[str, str]]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()  # not monkey-patched: a real OS-thread event
        self.thread = threading.Thread(target=self.run, name="scraper", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = generate_latest(self.registry).decode()
                self.seen.append(scraped_membership(text))
            except BaseException as exc:
                self.errors.append(exc)
                return


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """A GIL switch every 10 us, so the scrape thread interleaves with the hub's work at
    many more points than by default (5 ms): a read racing a reload would show."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def test_scrape_thread_never_sees_a_half_applied_reload(
    make_manager: Callable[..., PoolManager],
    addresses: list[str],
    fast_switching: None,
    no_fd_leak: None,
) -> None:
    cfgs = configs(addresses)
    allowed = {membership(c) for c in cfgs}
    assert len(allowed) == 3
    manager = make_manager(cfgs[0])
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    scraper = Scraper(registry)
    scraper.thread.start()
    try:
        deadline = time.monotonic() + RELOAD_SECONDS
        reloads = 0
        while reloads < RELOADS and time.monotonic() < deadline and not scraper.errors:
            reloads += 1
            manager.reload(cfgs[reloads % 3])
            gevent.sleep(0.001)  # the hub runs: the scrape thread's requests are served
        # a few scrapes of the last config, served while the hub idles
        seen_before = len(scraper.seen)
        wait_until = time.monotonic() + 10
        while len(scraper.seen) < seen_before + 2 and time.monotonic() < wait_until:
            gevent.sleep(0.01)
    finally:
        scraper.stop.set()
        while scraper.thread.is_alive() and time.monotonic() < wait_until + 10:
            gevent.sleep(0.01)  # its last scrape needs the hub
        scraper.thread.join(1)
    assert not scraper.thread.is_alive()
    assert scraper.errors == []
    assert len(scraper.seen) >= 3, len(scraper.seen)
    mixed = [m for m in scraper.seen if m not in allowed]
    assert mixed == [], f"{len(mixed)} of {len(scraper.seen)} scrapes saw a mix"
    assert scraper.seen[-1] == membership(cfgs[reloads % 3])
    manager.close(timeout=5)


def test_stats_from_another_thread_is_taken_by_the_hub(
    make_manager: Callable[..., PoolManager], addresses: list[str]
) -> None:
    """The snapshot is taken in the manager's thread (the hub runs the read), and an
    error raised there reaches the reading thread."""
    manager = make_manager(configs(addresses)[0])
    taken_in: list[int] = []
    original = manager._stats

    def spy() -> Any:
        taken_in.append(threading.get_ident())
        return original()

    manager._stats = spy  # type: ignore[method-assign]
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(manager.stats()))
    t.start()
    while t.is_alive():
        gevent.sleep(0.005)  # the owner runs its hub, as any gevent app does
    t.join(1)
    assert taken_in == [threading.get_ident()]  # the owner thread, not the reader
    assert out[0].to_dict() == manager.stats().to_dict()

    def boom() -> Any:
        raise ValueError("raised in the hub")

    manager._stats = boom  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def read() -> None:
        try:
            manager.stats()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    while t.is_alive():
        gevent.sleep(0.005)
    t.join(1)
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_stats_from_another_thread_while_the_owner_blocks_falls_back(
    make_manager: Callable[..., PoolManager],
    addresses: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An owner thread that does not run its hub (blocked outside gevent) does not hang
    the reader: after ``OWNER_HUB_WAIT`` the snapshot is read directly."""
    import lbpool._ownership

    monkeypatch.setattr(lbpool._ownership, "OWNER_HUB_WAIT", 0.2)
    manager = make_manager(configs(addresses)[1])
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(manager.stats()))
    t.start()
    t.join(10)  # a real, blocking join: this thread's hub does not run meanwhile
    assert not t.is_alive()
    assert out[0].to_dict() == manager.stats().to_dict()
    gevent.sleep(0.01)  # the abandoned callback runs now and does nothing


def test_reads_from_threads_without_a_hub_make_none(
    make_manager: Callable[..., PoolManager],
    addresses: list[str],
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    """A big snapshot read directly from a scrape thread (the owner's hub did not
    answer) and a big snapshot's ``to_dict`` in a plain thread are not paced: pacing
    there would make that thread a gevent hub and loop that nothing ever closes (two
    descriptors per scrape, as ``start_http_server`` runs each scrape in a new thread)."""
    import lbpool._ownership
    import lbpool.stats

    monkeypatch.setattr(lbpool._ownership, "OWNER_HUB_WAIT", 0.05)
    # every fleet is big, and every server ends a slice: a pause wherever one may be
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_POOLS", 2)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_SECONDS", 0.0)
    manager = make_manager(configs(addresses)[1])
    snapshot = manager.stats()
    expected = snapshot.to_dict()
    out: list[Any] = []
    gc.collect()
    before = fd_count()  # here, not no_fd_leak's: the fixtures' sockets would hide a leak
    for _ in range(3):
        out.clear()
        t = threading.Thread(target=lambda: out.append(manager.stats().to_dict()))
        t.start()
        t.join(10)  # blocks this thread's hub: the reader falls back to a direct read
        assert not t.is_alive() and out == [expected]
        t = threading.Thread(target=lambda: out.append(snapshot.to_dict()))
        t.start()
        t.join(10)
        assert not t.is_alive() and out[1] == expected
        gevent.sleep(0.01)  # the abandoned callbacks run now and do nothing
    assert settle(lambda: fd_count() <= before), (before, fd_count())


def test_a_collect_in_a_thread_whose_owner_blocks_falls_back_and_makes_no_hub(
    make_manager: Callable[..., PoolManager],
    addresses: list[str],
    monkeypatch: pytest.MonkeyPatch,
    no_fd_leak: None,
) -> None:
    """The collector's own snapshot (``_raw_snapshot``) from a scrape thread whose
    owner's hub does not answer is read directly, in one go: the same samples as a
    scrape in the owner's thread, and no hub or loop made in the scrape thread."""
    import lbpool._ownership
    import lbpool.stats

    monkeypatch.setattr(lbpool._ownership, "OWNER_HUB_WAIT", 0.05)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_POOLS", 2)
    monkeypatch.setattr(lbpool.stats, "SNAPSHOT_SLICE_SECONDS", 0.0)
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", 5)
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SECONDS", 0.0)
    manager = make_manager(configs(addresses)[1])
    collector = lbpool.metrics.LbpoolCollector(manager)
    expected = [(f.name, f.samples) for f in collector.collect()]
    out: list[Any] = []
    gc.collect()
    before = fd_count()
    for _ in range(3):
        out.clear()
        t = threading.Thread(
            target=lambda: out.append([(f.name, f.samples) for f in collector.collect()])
        )
        t.start()
        t.join(10)  # blocks this thread's hub: the scrape falls back to a direct read
        assert not t.is_alive() and out == [expected]
        gevent.sleep(0.01)  # the abandoned callback runs now and does nothing
    assert settle(lambda: fd_count() <= before), (before, fd_count())
