"""Prometheus metrics for a ``PoolManager`` (the ``prometheus`` extra).

A custom collector: every scrape takes one snapshot, as ``manager.stats()`` does (one
config's membership, each server's numbers in one step), and exports each server's
numbers -- what its ``ServerStats`` says, made from the pool's raw counters
(``Pool._raw``) without building one, so a subclass's ``stats()`` override is not
consulted -- with the labels ``backend`` and ``server`` (host:port pools that are
not in the config have ``backend=""``)::

    import lbpool.metrics

    lbpool.metrics.register(manager)          # on prometheus_client's default REGISTRY
    lbpool.metrics.start_http_server(9100)    # a daemon thread serving make_wsgi_app()

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
there the manager's hub takes it (``read_from_any_thread``, as for ``manager.stats()``:
in a greenlet started by a hub callback, so never in the middle of a reload's switch).

The per-server families are lazy (``lbpool._families``): they hold the snapshot's
columns and make their samples only when something reads ``samples``
(prometheus_client's own ``generate_latest`` and server, OpenMetrics, ``name[]``
filtering): the same samples, in the same order. ``generate_latest``,
``make_wsgi_app`` and ``start_http_server`` here write those families' lines of the
text format from the columns instead, into line templates the collector keeps
from one scrape to the next (``lbpool._families.LineTemplates``; about 19x less CPU
than prometheus_client's formatting of the samples at 1,000 servers), and format every
other metric with prometheus_client's own encoder. In a greenlet of the manager's
thread (a gevent WSGI server, or a monkey-patched process, where a "thread" is a
greenlet), the work pauses about every 2 ms (``lbpool._pacing.Pacer``; see
``lbpool._scrape``)::

    from gevent.pywsgi import WSGIServer

    WSGIServer(("", 9100), lbpool.metrics.make_wsgi_app()).start()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from itertools import chain
from itertools import repeat as _repeat
from operator import add as _add
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from lbpool._families import (
    LazyFamily,
    LineTemplates,
    Rows,
    ServerSlice,
    WrittenFamily,
    make_samples,
)
from lbpool._ownership import get_ident
from lbpool._pacing import Pacer
from lbpool._scrape import generate_latest, make_wsgi_app, start_http_server
from lbpool._snapshot import RAW_FIELDS as _RAW_FIELDS
from lbpool._snapshot import histogram_values
from lbpool.stats import (
    CLOSE_REASONS,
    WAIT_BUCKETS,
    BackendStats,
    DiscoveryStats,
)

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from lbpool.manager import PoolManager, RawBackend

__all__ = [
    "BREAKER_STATE_VALUES",
    "LbpoolCollector",
    "generate_latest",
    "make_wsgi_app",
    "register",
    "start_http_server",
]

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}

_LABELS = ["backend", "server"]

# A scrape in the manager's own thread makes its samples in slices of about this long
# (seconds), pausing between them (Pacer), checking the clock every _SLICE_SERVERS
# servers (a slice of servers, one backend's or several small ones' in a row: each
# family's work is per slice, so 1,000 servers in backends of 10 cost what they cost
# in backends of 100; 100 servers' 16-line histogram take ~0.15 ms here).
_SLICE_SECONDS = 0.002
_SLICE_SERVERS = 100
# The histogram's ``le`` label values (repr, as HistogramMetricFamily users write them)
_LE_KEYS = {le: repr(le) for le in WAIT_BUCKETS}
# the histogram's ``le`` label values per server: the buckets', then +Inf
_LE_LABELS = (*(_LE_KEYS[le] for le in WAIT_BUCKETS), "+Inf")
# a pool's closed counts (keyed by CLOSE_REASONS, Pool._raw) in the order of CLOSE_REASONS
_CLOSED_VALUES = itemgetter(*CLOSE_REASONS)
_NO_HITS = (0, 0)
_chain = chain.from_iterable


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


class _LazyCounter(LazyFamily, CounterMetricFamily):
    """A counter family whose samples come from a scrape's slices (``LazyFamily``)."""


class _LazyGauge(LazyFamily, GaugeMetricFamily):
    """A gauge family whose samples come from a scrape's slices (``LazyFamily``)."""


class _LazyHistogram(LazyFamily, HistogramMetricFamily):
    """A histogram family whose samples come from a scrape's slices (``LazyFamily``)."""


class _WrittenGauge(WrittenFamily, GaugeMetricFamily):
    """A per-backend gauge family whose text lines lbpool writes (``WrittenFamily``)."""


class _WrittenCounter(WrittenFamily, CounterMetricFamily):
    """A per-backend counter family whose text lines lbpool writes (``WrittenFamily``)."""


class LbpoolCollector:
    """A ``prometheus_client`` collector over one manager's stats."""

    def __init__(self, manager: PoolManager, *, prefix: str = "lbpool") -> None:
        self.manager = manager
        self.prefix = prefix
        # the per-server families' lines without their values, from one scrape to the
        # next (lbpool._families.LineTemplates)
        self._line_templates = LineTemplates()

    def _name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def _snapshot(self) -> dict[str, RawBackend]:
        # from any thread: from a scrape thread, the manager's hub takes it (as stats())
        return self.manager._raw_snapshot()

    def _families(self) -> dict[str, Any]:
        label = _LABELS
        fam: dict[str, Any] = {}
        for field, name, doc in _COUNTERS:
            fam[field] = _LazyCounter(self._name(name), doc, labels=label)
        fam["closed"] = _LazyCounter(
            self._name("closed"),
            "Connections closed, by reason (idle, lifetime, unhealthy, error, discarded).",
            labels=[*label, "reason"],
        )
        fam["wait_time_total"] = _LazyCounter(
            self._name("wait_time_seconds"),
            "Seconds callers spent queued for a connection, in total.",
            labels=label,
        )
        for field, name, doc in _GAUGES:
            fam[field] = _LazyGauge(self._name(name), doc, labels=label)
        fam["wait_time_max"] = _LazyGauge(
            self._name("wait_time_max_seconds"),
            "The longest single wait for a connection so far, in seconds.",
            labels=label,
        )
        fam["breaker_state"] = _LazyGauge(
            self._name("breaker_state"),
            "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
            labels=label,
        )
        fam["acquire_wait"] = _LazyHistogram(
            self._name("acquire_wait_seconds"),
            "Time an acquisition waited in the queue for a connection (0 if it did not).",
            labels=label,
        )
        fam["panic"] = _WrittenGauge(
            self._name("panic"),
            "1 while the backend is in panic mode (too few eligible servers: picks "
            "ignore health), else 0.",
            labels=["backend"],
        )
        fam["discovery_servers"] = _WrittenGauge(
            self._name("discovery_servers"),
            "Servers in the last good DNS answer of a discovered backend.",
            labels=["backend"],
        )
        fam["discovery_up"] = _WrittenGauge(
            self._name("discovery_up"),
            "1 while the backend's last DNS resolution succeeded, else 0.",
            labels=["backend"],
        )
        fam["discovery_last_refresh"] = _WrittenGauge(
            self._name("discovery_last_refresh_timestamp_seconds"),
            "UNIX time of the backend's last good DNS answer.",
            labels=["backend"],
        )
        fam["discovery_failures"] = _WrittenCounter(
            self._name("discovery_failures"),
            "Failed DNS resolutions of a discovered backend (the last good set was kept).",
            labels=["backend"],
        )
        for field, name, doc in _BACKEND_COUNTERS:
            fam[field] = _WrittenCounter(self._name(name), doc, labels=["backend"])
        return fam

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (registering never takes a snapshot)."""
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        """The metric families of one snapshot, taken as ``manager.stats()`` is (one
        config's membership, each server's numbers in one step, sliced alike), but of
        each pool's raw numbers (``Pool._raw``): no ``ServerStats`` is made.

        The per-server families are lazy (``lbpool._families``): each holds the
        snapshot's columns and makes its samples when its ``samples`` is first read
        (the list ``add_metric`` would have made, in the same order), or, exposed by
        ``lbpool.metrics.generate_latest`` or ``make_wsgi_app`` in the text format, is
        written as text without them. Samples made in the manager's own thread (an
        in-hub scrape) are made a slice of servers at a time, with a short timed pause
        once ``_SLICE_SECONDS`` of work went by (``lbpool._pacing.Pacer``: the hub's
        loop takes a full turn; the snapshot is immutable: no pause can see a change).
        From another OS thread (``start_http_server``), the manager's hub takes the
        snapshot, and the samples are made in that thread.
        """
        fam = self._families()
        # made before the snapshot, which pauses on its own: the first check after it
        # pauses at once (its last slice and the next work are not one stretch)
        pause = Pacer(pauses=self._may_yield(), slice_seconds=_SLICE_SECONDS)
        snapshot = self._snapshot()
        templates = self.__dict__.get("_line_templates")
        if templates is None:  # a subclass that did not call __init__
            templates = self.__dict__.setdefault("_line_templates", LineTemplates())
        templates.turn()
        slices: list[ServerSlice] = []
        # a slice: up to _SLICE_SERVERS servers in snapshot order, of one backend or of
        # several small ones in a row (a family's work per slice, not per backend); a
        # backend that fits in a slice is never cut (its run's line templates stay the
        # same when a backend before it changes size: LineTemplates)
        runs: list[tuple[str, int]] = []
        raw: list[tuple[Any, ...]] = []
        owned: list[tuple[int, int]] = []
        for backend_name, (backend, raws, hits) in snapshot.items():
            if raw and len(raw) + len(raws) > _SLICE_SERVERS:
                slices.append(_server_slice(runs, raw, owned, templates))
                runs, raw, owned = [], [], []
                pause()
            start = 0
            while start < len(raws):
                part = raws[start : start + _SLICE_SERVERS - len(raw)]
                start += len(part)
                runs.append((backend_name, len(part)))
                raw += part
                owned += (
                    [hits.get(r[0], _NO_HITS) for r in part] if hits else [_NO_HITS] * len(part)
                )
                if len(raw) == _SLICE_SERVERS:
                    slices.append(_server_slice(runs, raw, owned, templates))
                    runs, raw, owned = [], [], []
                    pause()  # a timed pause once a slice has gone by: the hub's full turn
            fam["panic"].add_metric([backend_name], 1.0 if backend.panic else 0.0)
            if backend.discovery is not None:
                self._add_discovery(fam, backend_name, backend.discovery)
            self._add_backend(fam, backend_name, backend)
        if raw:
            slices.append(_server_slice(runs, raw, owned, templates))
        self._attach(fam, slices)
        for key in list(fam):  # each family let go once yielded: none outlives its use
            yield fam.pop(key)

    def _attach(self, fam: dict[str, Any], slices: list[ServerSlice]) -> None:
        """Give each per-server family its rows over ``slices``: a ``LazyFamily`` keeps
        them for later; any other family (a subclass's ``_families`` may make plain
        ones) gets its samples now, paced, as before families were lazy."""
        made: list[tuple[Any, Pacer]] = []

        def pacer() -> Pacer:
            # one pacer for the families read one after another in one greenlet (a
            # stretch spans the end of one and the start of the next); a reader in
            # another greenlet or thread gets its own (pausing only where it may)
            here = getcurrent()
            last = made[-1] if made else None
            if last is None or last[0] is not here:
                last = (here, self._pacer())
                made[:] = [last]
            return last[1]

        def give(family: Any, rows: Callable[[ServerSlice], Rows]) -> None:
            if isinstance(family, LazyFamily):
                family.attach(slices, rows, pacer)
            else:
                family.samples[:] = make_samples(slices, rows, pacer(), family.samples)

        for field, _, _ in _COUNTERS:
            family = fam[field]
            give(family, partial(_one_column, family.name + "_total", field))
        family = fam["closed"]
        give(family, partial(_closed_rows, family.name + "_total"))
        family = fam["wait_time_total"]
        give(family, partial(_one_column, family.name + "_total", "wait_time_total"))
        for field, _, _ in _GAUGES:
            family = fam[field]
            give(family, partial(_one_column, family.name, field))
        family = fam["wait_time_max"]
        give(family, partial(_one_column, family.name, "wait_time_max"))
        family = fam["breaker_state"]
        give(family, partial(_one_column, family.name, "breaker_value"))
        family = fam["acquire_wait"]
        give(family, partial(_histogram_rows, family.name))

    def _pacer(self) -> Pacer:
        """A pacer for making samples where they are read: pausing only in a greenlet
        of the manager's own thread."""
        return Pacer(pauses=self._may_yield(), slice_seconds=_SLICE_SECONDS)

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


def _server_slice(
    runs: list[tuple[str, int]],
    raws: list[tuple[Any, ...]],
    owned: list[tuple[int, int]],
    templates: LineTemplates,
) -> ServerSlice:
    """One slice of servers, of the backends ``runs`` (``ServerSlice.runs``), from their
    ``Pool._raw`` tuples (fields ``lbpool._snapshot.RAW_FIELDS``) transposed by ``zip``
    into columns, with the derived ones: ``acquired``, ``owner_hits`` and
    ``fallback_hits`` (from ``owned``: each server's key-affinity pair) and
    ``breaker_value``; its line templates from ``templates``."""
    col: dict[str, Any] = dict(zip(_RAW_FIELDS, zip(*raws, strict=True), strict=True))
    addresses = col["address"]
    col["acquired"] = list(map(_add, col["hits"], col["misses"]))
    col["owner_hits"], col["fallback_hits"] = zip(*owned, strict=True)
    states = BREAKER_STATE_VALUES.get
    col["breaker_value"] = list(map(states, col["breaker_state"], _repeat(2)))
    return ServerSlice(runs, addresses, col, templates.for_slice(runs, addresses))


_PLAIN: tuple[None] = (None,)
_REASONS = tuple(("reason", r) for r in CLOSE_REASONS)
# the histogram's rows per server: a bucket per WAIT_BUCKETS, +Inf, then count and sum
_LE_ROWS = (*(("le", le) for le in _LE_LABELS), None, None)


def _one_column(name: str, field: str, piece: ServerSlice) -> Rows:
    """One sample per server: ``name`` with the server's labels, the column's value."""
    return (name,), _PLAIN, piece.col[field]


def _closed_rows(name: str, piece: ServerSlice) -> Rows:
    """Five samples per server, one per close reason (label ``reason``)."""
    values = list(_chain(map(_CLOSED_VALUES, piece.col["closed"])))
    return (name,) * len(CLOSE_REASONS), _REASONS, values


def _histogram_rows(name: str, piece: ServerSlice) -> Rows:
    """Sixteen samples per server: 13 buckets and +Inf (label ``le``; cumulative, every
    acquisition that did not queue observed at 0 s), ``_count`` and ``_sum``."""
    col = piece.col
    values = histogram_values(
        col["acquired"], col["waits_served"], col["wait_counts"], col["wait_time_total"]
    )
    names = (
        *(name + "_bucket",) * (len(WAIT_BUCKETS) + 1),
        name + "_count",
        name + "_sum",
    )
    return names, _LE_ROWS, values


def register(
    manager: PoolManager, registry: CollectorRegistry = REGISTRY, *, prefix: str = "lbpool"
) -> LbpoolCollector:
    """Register a collector for ``manager`` on ``registry``; returns it (to unregister)."""
    collector = LbpoolCollector(manager, prefix=prefix)
    registry.register(collector)
    return collector
