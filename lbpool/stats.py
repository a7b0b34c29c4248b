"""Stats snapshots: plain frozen values, safe to hand to other code and to serialise.

Each server's numbers are taken in one step, so they agree with each other:
``size == idle + in_use + pending``; a snapshot's membership is one config's. A fleet
of more than ``SNAPSHOT_SLICE_POOLS`` servers is snapshotted (``PoolManager.stats``)
and converted (``ManagerStats.to_dict``) in slices of about ``SNAPSHOT_SLICE_SECONDS``
of hub time when called from a greenlet, so no other greenlet stalls behind it.

Cost (a fleet of 1,000 servers is scraped every few seconds, inside the hub): a pool's
numbers are read in one step into one tuple (``Pool._raw``, fields
``lbpool._snapshot.RAW_FIELDS``); its ``ServerStats`` is made from that by
``lbpool._snapshot.server_stats`` (compiled with the hot path) as a complete field
dict, which becomes the instance's ``__dict__`` -- the frozen dataclass ``__init__``
would set its 27 fields one ``object.__setattr__`` at a time, several times slower --
and the Prometheus collector makes its samples from the tuples directly. ``to_dict``
(``lbpool._snapshot.server_dict``) copies that dict instead of ``dataclasses.asdict``
(which deep-copies every value), and makes the histogram's dict from a template. The
classes stay ordinary frozen dataclasses: ``ServerStats(...)``, ``fields()``,
``replace()``, ``==`` and ``repr`` work as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lbpool._pacing import Pacer
from lbpool._snapshot import CLOSE_REASONS, WAIT_BUCKETS, server_dict, server_stats

__all__ = [
    "CLOSE_REASONS",
    "SNAPSHOT_SLICE_POOLS",
    "SNAPSHOT_SLICE_SECONDS",
    "WAIT_BUCKETS",
    "BackendStats",
    "DiscoveryStats",
    "ManagerStats",
    "ServerStats",
]

# Snapshots of more than this many servers are taken (manager.stats) and converted
# (to_dict) in slices of about this much hub time, yielding in between.
SNAPSHOT_SLICE_POOLS = 200
SNAPSHOT_SLICE_SECONDS = 0.002

# CLOSE_REASONS (why connections are closed) and WAIT_BUCKETS (the acquire-wait
# histogram's upper bounds, seconds) are defined in lbpool._snapshot, with what a
# pool's raw capture holds (RAW_FIELDS), compiled with the code that reads them.


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
        if type(self) is ServerStats:  # its __dict__ holds exactly its fields, in order
            return server_dict(self.__dict__)
        return server_dict({f.name: getattr(self, f.name) for f in fields(self)})


_SERVER_FIELDS = tuple(f.name for f in fields(ServerStats))
"""``ServerStats``' field names in declaration order."""


def _server_stats_from_raw(raw: tuple[Any, ...]) -> ServerStats:
    """The ``ServerStats`` of a pool's ``Pool._raw`` capture (fields ``_RAW_FIELDS``;
    ``lbpool._snapshot.server_stats``). Never yields."""
    stats: ServerStats = server_stats(ServerStats, raw)
    return stats


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
