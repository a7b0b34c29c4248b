"""Prometheus metrics for a ``PoolManager`` (the ``prometheus`` extra).

A custom collector: every scrape takes one ``manager.stats()`` snapshot and exports
each server's ``ServerStats`` with the labels ``backend`` and ``server`` (host:port
pools that are not in the config have ``backend=""``)::

    from prometheus_client import start_http_server
    import lbpool.metrics

    lbpool.metrics.register(manager)          # on prometheus_client's default REGISTRY
    start_http_server(9100)

Exported (``lbpool_`` prefix):

- counters: ``acquired_total``, ``hits_total``, ``misses_total``, ``timeouts_total``,
  ``shed_total``, ``dial_failures_total``, ``breaker_trips_total``,
  ``owner_hits_total`` and ``fallback_hits_total`` (key-affinity backends: served as the
  key's owner, as a fallback), ``waits_total`` (acquisitions that queued),
  ``released_total`` (clean releases; discards are in ``closed_total``),
  ``closed_total{reason}`` (idle, lifetime, unhealthy, error, discarded) and
  ``wait_time_seconds_total`` (time callers spent queued for a connection);
- gauges: ``size``, ``idle``, ``in_use``, ``pending``, ``waiting``, ``max_size``,
  ``max_in_use`` (the peak in use since the pool started),
  ``wait_time_max_seconds`` (the longest single wait so far) and ``breaker_state``
  (0 closed, 1 half_open, 2 open).

- per backend (label ``backend`` only): gauge ``panic`` (1 while the backend is in
  panic mode, ``balance.panic_threshold``: picks ignore health);

- per discovered backend (``discover:``; label ``backend`` only): gauges
  ``discovery_servers`` (servers in the last good answer), ``discovery_up`` (1 while
  the last resolution succeeded, 0 during an outage), ``discovery_last_refresh_timestamp_seconds``
  (UNIX time of the last good answer; absent before one) and the counter
  ``discovery_failures_total`` (failed resolutions);

- per backend (label ``backend`` only; ``""`` for the ad-hoc host:port ones): counters
  ``calls_total`` (``manager.call`` invocations), ``retries_total`` (the retries they
  made) and ``retries_denied_total`` (retries the retry budget refused);

- histogram: ``acquire_wait_seconds`` — every acquisition is one observation (0 when
  it did not queue), bucketed by the pool as it happens (``ServerStats.wait_buckets``).

Importing ``lbpool`` never imports ``prometheus_client``; importing this module does.
A scrape only reads a snapshot, so it is safe from the metrics server's own thread:
there ``manager.stats()`` has the manager's hub take it (a callback, run between two
greenlet steps, so never in the middle of a reload's switch), and the samples are made
in the scrape thread. A scrape in the manager's own thread (``make_wsgi_app`` in a
gevent server) makes its samples in slices of about 2 ms, yielding to the hub between
them.
"""

from __future__ import annotations

from collections.abc import Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import gevent
from greenlet import getcurrent
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.samples import Sample

from lbpool._ownership import get_ident
from lbpool.stats import CLOSE_REASONS, WAIT_BUCKETS, BackendStats, DiscoveryStats, ManagerStats

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from lbpool.manager import PoolManager

__all__ = ["BREAKER_STATE_VALUES", "LbpoolCollector", "register"]

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}

_LABELS = ["backend", "server"]

# A scrape in the manager's own thread makes its samples in slices of about this long
# (seconds of work), yielding to the hub between them, checking the clock every
# _SLICE_SERVERS servers.
_SLICE_SECONDS = 0.002
_SLICE_SERVERS = 50
# The histogram's ``le`` label values (repr, as HistogramMetricFamily users write them)
_LE_KEYS = {le: repr(le) for le in WAIT_BUCKETS}
# Sample's fields after name, labels, value (timestamp, exemplar; native_histogram since
# prometheus_client 0.20): optional, None by default in every release this supports.
_SAMPLE_TAIL = tuple(Sample._field_defaults[f] for f in Sample._fields[3:])
_new_tuple = tuple.__new__


# (ServerStats field, metric name without lbpool_ / _total, help)
_COUNTERS = (
    ("acquired", "acquired", "Connections handed out (hits + misses)."),
    ("hits", "hits", "Acquisitions served by an idle connection."),
    ("misses", "misses", "Acquisitions that dialed a new connection."),
    ("timeouts", "timeouts", "Acquisitions that timed out (PoolTimeout)."),
    ("shed", "shed", "Acquisitions refused at once because max_waiting callers wait."),
    ("dial_failures", "dial_failures", "Dials that failed (refused, timed out, TLS, setup)."),
    ("breaker_trips", "breaker_trips", "Circuit breaker closed -> open transitions."),
    ("owner_hits", "owner_hits", "Key-affinity acquisitions served as the key's owner."),
    ("fallback_hits", "fallback_hits", "Key-affinity acquisitions served as a fallback."),
    ("waits", "waits", "Acquisitions that queued for a connection (served or not)."),
    ("released", "released", "Connections given back cleanly (release, end of a with block)."),
)
# (BackendStats field, metric name without lbpool_ / _total, help): label ``backend`` only
_BACKEND_COUNTERS = (
    ("calls", "calls", "manager.call invocations."),
    ("retries", "retries", "Retries manager.call made after a connection died in flight."),
    ("retries_denied", "retries_denied", "Retries the backend's retry budget refused."),
)
_GAUGES = (
    ("size", "size", "Open connections plus dials in progress."),
    ("idle", "idle", "Idle connections ready to be borrowed."),
    ("in_use", "in_use", "Connections borrowed by callers."),
    ("pending", "pending", "Dials in progress."),
    ("waiting", "waiting", "Callers queued for a connection."),
    ("max_size", "max_size", "The configured max_size of the pool."),
    ("max_in_use", "max_in_use", "The most connections in use at once since the pool started."),
)


class LbpoolCollector:
    """A ``prometheus_client`` collector over one manager's stats."""

    def __init__(self, manager: PoolManager, *, prefix: str = "lbpool") -> None:
        self.manager = manager
        self.prefix = prefix

    def _name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def _snapshot(self) -> ManagerStats:
        # manager.stats() from any thread: from a scrape thread, the manager's hub takes it
        return self.manager.stats()

    def _families(self) -> dict[str, Any]:
        label = _LABELS
        fam: dict[str, Any] = {}
        for field, name, doc in _COUNTERS:
            fam[field] = CounterMetricFamily(self._name(name), doc, labels=label)
        fam["closed"] = CounterMetricFamily(
            self._name("closed"),
            "Connections closed, by reason (idle, lifetime, unhealthy, error, discarded).",
            labels=[*label, "reason"],
        )
        fam["wait_time_total"] = CounterMetricFamily(
            self._name("wait_time_seconds"),
            "Seconds callers spent queued for a connection, in total.",
            labels=label,
        )
        for field, name, doc in _GAUGES:
            fam[field] = GaugeMetricFamily(self._name(name), doc, labels=label)
        fam["wait_time_max"] = GaugeMetricFamily(
            self._name("wait_time_max_seconds"),
            "The longest single wait for a connection so far, in seconds.",
            labels=label,
        )
        fam["breaker_state"] = GaugeMetricFamily(
            self._name("breaker_state"),
            "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
            labels=label,
        )
        fam["acquire_wait"] = HistogramMetricFamily(
            self._name("acquire_wait_seconds"),
            "Time an acquisition waited in the queue for a connection (0 if it did not).",
            labels=label,
        )
        fam["panic"] = GaugeMetricFamily(
            self._name("panic"),
            "1 while the backend is in panic mode (too few eligible servers: picks "
            "ignore health), else 0.",
            labels=["backend"],
        )
        fam["discovery_servers"] = GaugeMetricFamily(
            self._name("discovery_servers"),
            "Servers in the last good DNS answer of a discovered backend.",
            labels=["backend"],
        )
        fam["discovery_up"] = GaugeMetricFamily(
            self._name("discovery_up"),
            "1 while the backend's last DNS resolution succeeded, else 0.",
            labels=["backend"],
        )
        fam["discovery_last_refresh"] = GaugeMetricFamily(
            self._name("discovery_last_refresh_timestamp_seconds"),
            "UNIX time of the backend's last good DNS answer.",
            labels=["backend"],
        )
        fam["discovery_failures"] = CounterMetricFamily(
            self._name("discovery_failures"),
            "Failed DNS resolutions of a discovered backend (the last good set was kept).",
            labels=["backend"],
        )
        for field, name, doc in _BACKEND_COUNTERS:
            fam[field] = CounterMetricFamily(self._name(name), doc, labels=["backend"])
        return fam

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (registering never takes a snapshot)."""
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        """The metric families of one snapshot (``manager.stats()``).

        Called in the manager's own thread (an in-hub scrape), the snapshot is taken in
        one go, then its samples are made in slices of about ``_SLICE_SECONDS`` of work,
        yielding to the hub between them (the snapshot is immutable: no slice can see a
        change). From another OS thread (``start_http_server``), ``manager.stats()``
        has the manager's hub take the snapshot, and the samples are made here.
        """
        fam = self._families()
        stats = self._snapshot()
        may_yield = self._may_yield()
        columns = _Columns(fam)
        deadline = perf_counter() + _SLICE_SECONDS
        for backend_name, backend in stats.backends.items():
            rows = [
                ({"backend": backend_name, "server": address}, vars(server))
                for address, server in backend.servers.items()
            ]
            for start in range(0, len(rows), _SLICE_SERVERS):
                columns.add(rows[start : start + _SLICE_SERVERS])
                if may_yield and perf_counter() >= deadline:
                    gevent.sleep(0)  # let the hub run between slices
                    deadline = perf_counter() + _SLICE_SECONDS
            fam["panic"].add_metric([backend_name], 1.0 if backend.panic else 0.0)
            if backend.discovery is not None:
                self._add_discovery(fam, backend_name, backend.discovery)
            self._add_backend(fam, backend_name, backend)
        yield from fam.values()

    def _may_yield(self) -> bool:
        """Whether this scrape runs in the manager's own thread, in a greenlet that may
        switch (not the hub itself): then it yields between slices."""
        manager = self.manager
        return get_ident() == manager._thread_id and getcurrent() is not manager._hub

    @staticmethod
    def _add_backend(fam: dict[str, Any], backend: str, b: BackendStats) -> None:
        for field, _, _ in _BACKEND_COUNTERS:
            fam[field].add_metric([backend], float(getattr(b, field)))

    @staticmethod
    def _add_discovery(fam: dict[str, Any], backend: str, d: DiscoveryStats) -> None:
        fam["discovery_servers"].add_metric([backend], float(len(d.servers)))
        up = d.last_error is None and d.last_refresh is not None
        fam["discovery_up"].add_metric([backend], 1.0 if up else 0.0)
        if d.last_refresh is not None:
            fam["discovery_last_refresh"].add_metric([backend], d.last_refresh)
        fam["discovery_failures"].add_metric([backend], float(d.failures))


class _Columns:
    """Adds servers' samples to the families, column by column.

    What ``add_metric`` would add, in the same order, but each ``Sample`` made by
    ``tuple.__new__`` (as its own constructor does, without the keyword handling: three
    times faster), and one labels dict shared by a server's samples; rows are
    ``(labels, vars(server_stats))``. Never yields.
    """

    def __init__(self, fam: dict[str, Any]) -> None:
        self.fam = fam
        self.counters = [(fam[f].samples, fam[f].name + "_total", f) for f, _, _ in _COUNTERS]
        self.gauges = [(fam[f].samples, fam[f].name, f) for f, _, _ in _GAUGES]
        self.closed = fam["closed"].samples
        self.closed_name = fam["closed"].name + "_total"

    def add(self, rows: list[tuple[dict[str, str], dict[str, Any]]]) -> None:
        fam, new, tail = self.fam, _new_tuple, _SAMPLE_TAIL
        for out, name, field in self.counters:
            out += [new(Sample, (name, labels, float(d[field]), *tail)) for labels, d in rows]
        closed, closed_name = self.closed, self.closed_name
        for labels, d in rows:
            got = d["closed"].get
            reasons = (*CLOSE_REASONS, *(r for r in d["closed"] if r not in CLOSE_REASONS))
            closed += [
                new(Sample, (closed_name, {**labels, "reason": r}, float(got(r, 0)), *tail))
                for r in reasons
            ]
        self._column("wait_time_total", "_total", rows, "wait_time_total")
        for out, name, field in self.gauges:
            out += [new(Sample, (name, labels, float(d[field]), *tail)) for labels, d in rows]
        self._column("wait_time_max", "", rows, "wait_time_max")
        states = BREAKER_STATE_VALUES
        fam["breaker_state"].samples += [
            new(
                Sample,
                (
                    fam["breaker_state"].name,
                    labels,
                    float(states.get(d["breaker_state"], 2)),
                    *tail,
                ),
            )
            for labels, d in rows
        ]
        hist = fam["acquire_wait"]
        out, keys = hist.samples, _LE_KEYS
        bucket, count, total = hist.name + "_bucket", hist.name + "_count", hist.name + "_sum"
        for labels, d in rows:
            b, srv = labels["backend"], labels["server"]
            out += [
                new(
                    Sample,
                    (
                        bucket,
                        {"backend": b, "server": srv, "le": keys.get(le) or repr(le)},
                        float(n),
                        *tail,
                    ),
                )
                for le, n in d["wait_buckets"].items()
            ]
            n = float(d["wait_count"])
            out.append(new(Sample, (bucket, {"backend": b, "server": srv, "le": "+Inf"}, n, *tail)))
            out.append(new(Sample, (count, labels, n, *tail)))
            out.append(new(Sample, (total, labels, float(d["wait_time_total"]), *tail)))

    def _column(
        self, key: str, suffix: str, rows: list[tuple[dict[str, str], dict[str, Any]]], field: str
    ) -> None:
        family = self.fam[key]
        name, new, tail = family.name + suffix, _new_tuple, _SAMPLE_TAIL
        family.samples += [
            new(Sample, (name, labels, float(d[field]), *tail)) for labels, d in rows
        ]


def register(
    manager: PoolManager, registry: CollectorRegistry = REGISTRY, *, prefix: str = "lbpool"
) -> LbpoolCollector:
    """Register a collector for ``manager`` on ``registry``; returns it (to unregister)."""
    collector = LbpoolCollector(manager, prefix=prefix)
    registry.register(collector)
    return collector
