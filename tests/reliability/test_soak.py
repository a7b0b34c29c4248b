"""Soak: 1,000 greenlets through one PoolManager for minutes, under random faults.

Four EchoServers, each behind a FaultProxy; a fault driver keeps injecting latency,
black holes, resets (of open and of new connections), refused connects, kills and
recoveries (at most two servers faulty at a time); a reload driver re-shapes the backend
every few seconds (servers removed and re-added, max_size and strategy changed). The
clients use the contract's pattern (``with``; on OSError, one retry on a fresh
acquisition).

Run it (it is marked slow, so the default run skips it)::

    LBPOOL_SOAK_SECONDS=60 .venv/bin/python -m pytest -m slow tests/reliability/test_soak.py -s

Environment: ``LBPOOL_SOAK_SECONDS`` (default 120), ``LBPOOL_SOAK_GREENLETS`` (1000),
``LBPOOL_SOAK_REPORT`` (a path: the report is also written there as JSON),
``LBPOOL_SOAK_SEED`` (the fault schedule's random seed).

Asserted: no acquisition waited longer than its timeout + ``WAIT_SLACK``; no reply was
ever out of step; every failure is one of the expected kinds (``BackendUnavailable``,
``PoolTimeout``, or an OSError on the retry); afterwards the fd count and the greenlet
count are back to where they started.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent.event import Event

from lbpool import BackendUnavailable, PoolManager, PoolTimeout
from lbpool.testing import EchoServer, FaultProxy, recv_exact
from tests.support.leaks import fd_count, live_greenlets, settle

SECONDS = float(os.environ.get("LBPOOL_SOAK_SECONDS", "120"))
GREENLETS = int(os.environ.get("LBPOOL_SOAK_GREENLETS", "1000"))
SEED = int(os.environ.get("LBPOOL_SOAK_SEED", "20240601"))
N_SERVERS = 4
ACQUIRE_TIMEOUT = 2.0
WAIT_SLACK = 0.5
IO_TIMEOUT = 1.0
FAULTS = ["latency", "blackhole", "reset_all", "reset_new", "refuse", "kill"]


def soak_config(addresses: list[str], max_size: int, strategy: str) -> dict[str, Any]:
    return {
        "backends": {
            "svc": {
                "strategy": strategy,
                "servers": addresses,
                "pool": {
                    "min_idle": 2,
                    "max_size": max_size,
                    "acquire_timeout": ACQUIRE_TIMEOUT,
                    "check_after": 0.2,
                    "idle_timeout": 5,
                    "max_lifetime": 20,
                    "upkeep_interval": 0.2,
                },
                "dial": {"timeout": 0.5},
                "setup": "tests.support.hooks:setup_ping",
                "breaker": {
                    "failure_threshold": 3,
                    "recovery_timeout": 0.5,
                    "max_recovery_timeout": 4,
                },
                "health_check": {"interval": 2},
            }
        }
    }


class Soak:
    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.servers = [EchoServer().start() for _ in range(N_SERVERS)]
        self.proxies = [FaultProxy(s.address, connect_timeout=0.5).start() for s in self.servers]
        self.addresses = [p.address for p in self.proxies]
        self.faulty: dict[int, str] = {}
        self.manager = PoolManager(soak_config(self.addresses, 40, "least_active"))
        self.stop_event = Event()
        self.seq = 0
        self.requests = 0
        self.ok = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.max_wait = 0.0
        self.waits: list[float] = []
        self.served_by: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.reloads = 0
        self.transitions: Counter[str] = Counter()
        self.manager.add_breaker_listener(
            lambda _b, _a, old, new: self.transitions.update([f"{old}->{new}"])
        )

    # -- the clients -------------------------------------------------------------------
    def _acquire(self) -> Any:
        t0 = monotonic()
        try:
            return self.manager.acquire("svc", timeout=ACQUIRE_TIMEOUT)
        finally:
            waited = monotonic() - t0
            self.max_wait = max(self.max_wait, waited)
            if len(self.waits) < 200_000:
                self.waits.append(waited)

    def _round_trip(self, conn: Any) -> None:
        self.seq += 1
        payload = b"soak-%d\n" % self.seq
        conn.settimeout(IO_TIMEOUT)
        conn.sendall(payload)
        got = recv_exact(conn, len(payload))
        if got != payload:
            raise AssertionError(f"out of step: sent {payload!r}, got {got!r}")

    def request(self) -> None:
        self.requests += 1
        for attempt in (1, 2):
            try:
                conn = self._acquire()
            except (BackendUnavailable, PoolTimeout) as exc:
                self.errors[type(exc).__name__] += 1
                return
            try:
                with conn:
                    self._round_trip(conn)
            except OSError as exc:
                if attempt == 1:
                    self.retries += 1
                    continue
                self.errors[f"{type(exc).__name__} (after retry)"] += 1
                return
            self.ok += 1
            self.served_by[conn.address] += 1
            return

    def client(self) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop_event.is_set():
            try:
                self.request()
            except Exception as exc:
                self.unexpected.append(repr(exc))
                self.errors[f"UNEXPECTED {type(exc).__name__}"] += 1
            gevent.sleep(rng.uniform(0.0, 0.02))  # think time

    # -- the chaos ------------------------------------------------------------------------
    def inject(self) -> None:
        rng = self.rng
        if self.faulty and (len(self.faulty) >= 2 or rng.random() < 0.4):
            i = rng.choice(sorted(self.faulty))
            self.recover(i)
            return
        i = rng.choice([j for j in range(N_SERVERS) if j not in self.faulty])
        fault = rng.choice(FAULTS)
        proxy = self.proxies[i]
        self.faulty[i] = fault
        self.faults[fault] += 1
        if fault == "latency":
            proxy.latency(rng.uniform(0.01, 0.2))
        elif fault == "blackhole":
            proxy.blackhole()
        elif fault == "reset_all":
            proxy.reset_all()
            proxy.reset_new(True)
        elif fault == "reset_new":
            proxy.reset_new(True)
        elif fault == "refuse":
            proxy.refuse()
        else:
            proxy.stop()

    def recover(self, i: int) -> None:
        proxy = self.proxies[i]
        if self.faulty.pop(i, None) == "kill":
            proxy.start()
        proxy.recover()
        self.faults["recover"] += 1

    def fault_driver(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.5, 2.0)):
            self.inject()

    def reload_driver(self) -> None:
        while not self.stop_event.wait(5.0):
            rng = self.rng
            keep = sorted(rng.sample(range(N_SERVERS), rng.randint(2, N_SERVERS)))
            cfg = soak_config(
                [self.addresses[i] for i in keep],
                rng.randint(20, 60),
                rng.choice(["round_robin", "least_active", "weighted", "random"]),
            )
            self.manager.reload(cfg)
            self.reloads += 1

    def run(self, seconds: float) -> None:
        drivers = [gevent.spawn(self.fault_driver), gevent.spawn(self.reload_driver)]
        clients = [gevent.spawn(self.client) for _ in range(GREENLETS)]
        self.stop_event.wait(seconds)
        self.stop_event.set()
        gevent.joinall(drivers + clients, timeout=ACQUIRE_TIMEOUT + 2 * IO_TIMEOUT + 10)
        assert all(g.dead for g in drivers + clients)
        for i in sorted(self.faulty):
            self.recover(i)
        self.manager.reload(soak_config(self.addresses, 40, "least_active"))

    def close(self) -> None:
        self.manager.close(timeout=5)
        for proxy in self.proxies:
            proxy.stop()
        for server in self.servers:
            server.stop()


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 120)
def test_soak(no_fd_leak: None) -> None:
    gevent.sleep(0)
    fds_start = fd_count()
    greenlets_start = len(live_greenlets())
    soak = Soak()
    started = monotonic()
    try:
        soak.run(SECONDS)
    finally:
        stats = soak.manager.stats().to_dict()["backends"]["svc"]["servers"]
        soak.close()
    elapsed = monotonic() - started
    settle(lambda: fd_count() <= fds_start, 10)
    settle(lambda: len(live_greenlets()) <= greenlets_start, 10)
    waits = sorted(soak.waits)
    report = {
        "seconds": round(elapsed, 1),
        "greenlets": GREENLETS,
        "servers": N_SERVERS,
        "seed": SEED,
        "requests": soak.requests,
        "ok": soak.ok,
        "retries": soak.retries,
        "errors": dict(soak.errors),
        "requests_per_second": round(soak.requests / elapsed),
        "acquire_wait_max": round(soak.max_wait, 3),
        "acquire_wait_p50": round(waits[len(waits) // 2], 4) if waits else None,
        "acquire_wait_p99": round(waits[int(len(waits) * 0.99)], 4) if waits else None,
        "acquire_timeout": ACQUIRE_TIMEOUT,
        "faults": dict(soak.faults),
        "reloads": soak.reloads,
        "breaker_transitions": dict(soak.transitions),
        "served_by": dict(soak.served_by),
        "dial_failures": sum(s["dial_failures"] for s in stats.values()),
        "fds": {"start": fds_start, "end": fd_count()},
        "greenlets_alive": {"start": greenlets_start, "end": len(live_greenlets())},
    }
    print("\nsoak report:\n" + json.dumps(report, indent=2))
    path = os.environ.get("LBPOOL_SOAK_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2)

    assert soak.unexpected == [], soak.unexpected[:10]
    assert soak.max_wait <= ACQUIRE_TIMEOUT + WAIT_SLACK, soak.max_wait
    assert soak.ok > soak.requests * 0.5, report
    assert report["fds"]["end"] <= fds_start, report["fds"]
    assert report["greenlets_alive"]["end"] <= greenlets_start, report["greenlets_alive"]
