"""Stats snapshots: plain frozen values, safe to hand to other code and to serialise.

Each server's numbers are taken in one step, so they agree with each other:
``size == idle + in_use + pending``; a snapshot's membership is one config's. A fleet
of more than ``SNAPSHOT_SLICE_POOLS`` servers is snapshotted (``PoolManager.stats``)
and converted (``ManagerStats.to_dict``) in slices of about ``SNAPSHOT_SLICE_SECONDS``
of hub time when called from a greenlet, so no other greenlet stalls behind it.

Cost (a fleet of 1,000 servers is scraped every few seconds, inside the hub): a pool's
numbers are read in one step into one tuple (``Pool._raw``, fields ``_RAW_FIELDS``);
its ``ServerStats`` is made from that by ``_server_stats_from_raw`` as a complete
field dict, which becomes the instance's ``__dict__`` -- the frozen dataclass
``__init__`` would set its 27 fields one ``object.__setattr__`` at a time, several
times slower -- and the Prometheus collector makes its samples from the tuples
directly. ``to_dict`` copies that dict instead of ``dataclasses.asdict`` (which
deep-copies every value). Dicts keyed by the buckets' floats are made from dict
templates (``dict.fromkeys`` of a dict reuses the stored hashes; a float's is computed
each time). The classes stay ordinary frozen dataclasses: ``ServerStats(...)``,
``fields()``, ``replace()``, ``==`` and ``repr`` work as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from itertools import accumulate as _accumulate
from typing import Any

from lbpool._pacing import Pacer

# Snapshots of more than this many servers are taken (manager.stats) and converted
# (to_dict) in slices of about this much hub time, yielding in between.
SNAPSHOT_SLICE_POOLS = 200
SNAPSHOT_SLICE_SECONDS = 0.002

CLOSE_REASONS = ("idle", "lifetime", "unhealthy", "error", "discarded")
# Upper bounds (seconds) of the acquire-wait histogram's buckets.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# to_dict's JSON keys of the buckets (str(le)), made once
_LE_KEYS = {le: str(le) for le in WAIT_BUCKETS}
_LE_STRS = tuple(_LE_KEYS.values())
_LE_TEMPLATE = dict.fromkeys(_LE_STRS)  # dict.fromkeys(_LE_TEMPLATE, n): stored hashes
# the buckets' keys as a dict: dict.fromkeys of a dict reuses its stored hashes (a
# float's hash is computed each time: dict.fromkeys(WAIT_BUCKETS, n) costs 4-5x more)
_BUCKET_KEYS = dict.fromkeys(WAIT_BUCKETS)

# What ``Pool._raw`` captures, in order: a pool's numbers in one tuple, from which
# ``_server_stats_from_raw`` makes its ServerStats and the Prometheus collector its
# samples. ``closed``: a copy of the pool's counts keyed by CLOSE_REASONS;
# ``waits_served``: queued acquisitions that got a connection; ``wait_counts``: queued
# waits per bucket (the last past WAIT_BUCKETS[-1]), None while none ever queued.
_RAW_FIELDS = (
    "address",
    "backend",
    "size",
    "idle",
    "in_use",
    "pending",
    "waiting",
    "hits",
    "misses",
    "timeouts",
    "shed",
    "dial_failures",
    "closed",
    "wait_time_total",
    "wait_time_max",
    "breaker_state",
    "breaker_trips",
    "max_size",
    "draining",
    "waits_served",
    "wait_counts",
    "max_in_use",
    "waits",
    "released",
)


@dataclass(frozen=True)
class ServerStats:
    """One server's pool: sizes now, counters since the pool started."""

    address: str
    backend: str | None
    size: int
    idle: int
    in_use: int
    pending: int
    waiting: int
    acquired: int
    hits: int
    misses: int
    timeouts: int
    shed: int
    dial_failures: int
    closed: Mapping[str, int]
    wait_time_total: float
    wait_time_max: float
    breaker_state: str
    breaker_trips: int
    max_size: int = 0
    draining: bool = False
    # Acquire-wait histogram: every acquisition is one observation (0 when it did not
    # queue); ``wait_buckets[le]`` counts those that waited at most ``le`` seconds.
    wait_count: int = 0
    wait_buckets: Mapping[float, int] = field(default_factory=dict)
    # Key-affinity backends: acquisitions this server served as the key's owner and as
    # a fallback (another server owned the key); 0 for the other strategies.
    owner_hits: int = 0
    fallback_hits: int = 0
    # Since the pool started: the most connections in use at once; acquisitions that
    # queued for a connection (served or not); clean releases (``release()``, the end
    # of a ``with`` block). Discards are counted in ``closed``.
    max_in_use: int = 0
    waits: int = 0
    released: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Every field, in declaration order, as plain JSON-serialisable data: ``closed``
        a dict, ``wait_buckets`` keyed by ``str(le)``. Never yields."""
        data = self.__dict__.copy()  # a frozen dataclass keeps exactly its fields there
        data["closed"] = dict(self.closed)
        buckets = self.wait_buckets
        if tuple(buckets) == WAIT_BUCKETS:  # a pool's: keys the same floats, in order
            counts = tuple(buckets.values())
            if counts.count(counts[0]) == len(counts):  # never queued: one count
                data["wait_buckets"] = dict.fromkeys(_LE_TEMPLATE, counts[0])
            else:  # str keys keep their hashes: no float hashed again
                data["wait_buckets"] = dict(zip(_LE_STRS, counts, strict=True))
        else:
            keys = _LE_KEYS
            data["wait_buckets"] = {
                keys[le] if le in keys else str(le): n for le, n in buckets.items()
            }
        return data


_SERVER_FIELDS = tuple(f.name for f in fields(ServerStats))
"""``ServerStats``'s field names in declaration order (what ``_server_stats`` needs)."""


def _server_stats(values: dict[str, Any]) -> ServerStats:
    """A ``ServerStats`` whose ``__dict__`` is ``values`` (taken over, not copied).

    ``values`` must hold every field of ``_SERVER_FIELDS``, in that order, and nothing
    else (tests check ``Pool.stats`` against ``ServerStats(**values)``); the caller
    gives it up. Skips the dataclass ``__init__``: one step instead of 27. Never yields.
    """
    stats = object.__new__(ServerStats)
    object.__setattr__(stats, "__dict__", values)
    return stats


def _server_stats_from_raw(raw: tuple[Any, ...]) -> ServerStats:
    """The ``ServerStats`` of a pool's ``Pool._raw`` capture (fields ``_RAW_FIELDS``):
    ``acquired`` is hits + misses; the histogram is cumulative, every acquisition that
    did not queue observed at 0 s. Takes the capture's ``closed`` copy over. Never
    yields."""
    (
        address,
        backend,
        size,
        idle,
        in_use,
        pending,
        waiting,
        hits,
        misses,
        timeouts,
        shed,
        dial_failures,
        closed,
        wait_total,
        wait_max,
        breaker_state,
        breaker_trips,
        max_size,
        draining,
        served,
        counts,
        max_in_use,
        waits,
        released,
    ) = raw
    acquired = hits + misses
    observed = acquired - served  # acquisitions that did not queue: 0 s
    if counts is None:  # no acquisition ever queued (most pools of a big fleet): all at 0 s
        buckets = dict.fromkeys(_BUCKET_KEYS, observed)
        wait_count = observed
    else:  # cumulative: [observed, observed + counts[0], ..., every one]
        cumulative = list(_accumulate(counts, initial=observed))
        buckets = dict(zip(WAIT_BUCKETS, cumulative[1:-1], strict=True))
        wait_count = cumulative[-1]
    return _server_stats(
        {
            "address": address,
            "backend": backend,
            "size": size,
            "idle": idle,
            "in_use": in_use,
            "pending": pending,
            "waiting": waiting,
            "acquired": acquired,
            "hits": hits,
            "misses": misses,
            "timeouts": timeouts,
            "shed": shed,
            "dial_failures": dial_failures,
            "closed": closed,
            "wait_time_total": wait_total,
            "wait_time_max": wait_max,
            "breaker_state": breaker_state,
            "breaker_trips": breaker_trips,
            "max_size": max_size,
            "draining": draining,
            "wait_count": wait_count,
            "wait_buckets": buckets,
            "owner_hits": 0,
            "fallback_hits": 0,
            "max_in_use": max_in_use,
            "waits": waits,
            "released": released,
        }
    )


def _server_stats_with(stats: ServerStats, **changes: Any) -> ServerStats:
    """``dataclasses.replace(stats, **changes)`` without the dataclass ``__init__``;
    ``changes`` must name fields. Never yields."""
    values = dict(stats.__dict__)
    values.update(changes)
    return _server_stats(values)


@dataclass(frozen=True)
class DiscoveryStats:
    """A discovered backend's DNS state (``discover:``; see ``lbpool.discovery``)."""

    servers: tuple[str, ...]  # the last good answer, host:port (before any subset)
    last_refresh: float | None  # UNIX time of the last good answer; None before one
    last_error: str | None  # the last failure's message; None since a good answer
    failures: int  # failed resolutions since start

    def to_dict(self) -> dict[str, Any]:
        return {
            "servers": list(self.servers),
            "last_refresh": self.last_refresh,
            "last_error": self.last_error,
            "failures": self.failures,
        }


@dataclass(frozen=True)
class BackendStats:
    """A backend: its strategy and its servers' stats, keyed by address;
    ``discovery``: its DNS state, None for a backend with a static server list;
    ``panic``: in panic mode now (``balance.panic_threshold``).

    ``calls``, ``retries``, ``retries_denied``: ``manager.call`` invocations, the
    retries they made, and the retries the backend's retry budget refused (counts
    since start; for the ad-hoc ``""`` backend, over every host:port called)."""

    name: str
    strategy: str
    servers: Mapping[str, ServerStats] = field(default_factory=dict)
    discovery: DiscoveryStats | None = None
    calls: int = 0
    retries: int = 0
    retries_denied: int = 0
    # panic mode now: fewer than balance.panic_threshold of the servers are eligible,
    # so picks ignore health (a dial to an open server is its verdict)
    panic: bool = False

    def to_dict(self, pause: Callable[[], object] | None = None) -> dict[str, Any]:
        """Plain JSON-serialisable data; ``pause`` is called between servers (see
        ``ManagerStats.to_dict``)."""
        if pause is None:
            servers = {addr: s.to_dict() for addr, s in self.servers.items()}
        else:
            servers = {}
            for addr, s in self.servers.items():
                pause()
                servers[addr] = s.to_dict()
        return {
            "strategy": self.strategy,
            "servers": servers,
            "discovery": None if self.discovery is None else self.discovery.to_dict(),
            "calls": self.calls,
            "retries": self.retries,
            "retries_denied": self.retries_denied,
            "panic": self.panic,
        }


@dataclass(frozen=True)
class ManagerStats:
    """Every backend; host:port pools that are not configured sit under the key ``""``."""

    backends: Mapping[str, BackendStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data of the same shape. A snapshot is immutable, so
        a big one's conversion (over ``SNAPSHOT_SLICE_POOLS`` servers), called from a
        greenlet, yields to the hub about every ``SNAPSHOT_SLICE_SECONDS``: the result
        is the same whenever it is made."""
        pause: Callable[[], object] | None = None
        if sum(len(b.servers) for b in self.backends.values()) > SNAPSHOT_SLICE_POOLS:
            pause = Pacer(slice_seconds=SNAPSHOT_SLICE_SECONDS)
        return {"backends": {name: b.to_dict(pause) for name, b in self.backends.items()}}

    def servers(self) -> list[ServerStats]:
        """Every server's stats, flattened, in backend then address order."""
        return [s for b in self.backends.values() for s in b.servers.values()]
