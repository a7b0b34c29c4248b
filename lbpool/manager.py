"""PoolManager and Backend: route each acquisition across a backend's servers.

A ``Backend`` is a named group of per-server ``Pool``s and a balancer; the manager
maps names (and ad-hoc ``host:port`` strings, like urllib3's PoolManager) to
backends, runs one upkeep greenlet for all pools, and applies live reloads.

Membership: a backend's servers are its ``servers:`` list, or (``discover:``) the last
good DNS answer of its ``Discovery`` runner (one greenlet per discovered backend,
owned by the manager); then, with ``subset:``, the subset of them this process uses
(``lbpool.subset``, recomputed whenever the membership changes). Each good answer is
applied by ``Backend._apply`` and ``PoolManager._drain``, the path ``reload`` takes:
new servers get pools (warmed by the upkeep), removed ones drain, unchanged ones keep
their connections and breakers. A failed resolution changes nothing. Until the first
answer a discovered backend has no server: ``acquire`` waits for the first resolution
within its deadline, then raises ``BackendUnavailable`` naming the discovery error.

Resilience policies (``balance:``), both off the hot path while every breaker is
closed and no server is warming:

* panic mode (``panic_threshold``, Envoy's panic threshold): while fewer than that
  share of a backend's servers are eligible, picks ignore health (a second balancer
  of the same strategy over ``ignoring_health(pools)``; key-affinity backends walk the
  key's own order ignoring health, as Envoy's ring_hash and maglev do) and a dial to
  an open server goes through as its breaker's verdict (``PANIC_DIAL``). Which
  breakers are not closed is tracked from their transitions (``_not_closed``), so a
  pick costs one truth test until one opens.
* slow start (``slow_start``, Envoy's slow start, aggression 1): a server that joins
  (reload, discovery) or whose breaker closes is *warming* for ``window``; the
  strategy's pick of a warming server stands with probability
  ``max(min_weight, elapsed / window)``, else the pick moves on to another server, so
  its share grows linearly to its full share. Not for key-affinity strategies (a
  ``ConfigError``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from time import monotonic as _monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, SupportsFloat, TypeVar, Union

import gevent
from gevent.event import Event

from lbpool import _ownership
from lbpool import stats as _stats_config  # SNAPSHOT_SLICE_*: read at each snapshot
from lbpool._affinity import KeyOrder, Placement, check_key, is_hashing
from lbpool._args import valid_callable
from lbpool._ownership import ThreadBound, get_ident, read_from_any_thread
from lbpool._pacing import Pacer
from lbpool._router import Router, _check_name, acquire_direct, backend_for
from lbpool._snapshot import server_stats
from lbpool._upkeep import Upkeep
from lbpool._waiters import valid_timeout
from lbpool.balance import Balancer, eligible, ignoring_health, make_balancer
from lbpool.breaker import Breaker
from lbpool.config import BackendConfig, Config, ServerConfig, load_config, parse_config
from lbpool.config import parse_address as _parse_address
from lbpool.connection import PooledConnection, _is_network_error
from lbpool.discovery import Discovery, Servers
from lbpool.errors import (
    BackendUnavailable,
    ConfigError,
    ConfigProblem,
    DialError,
    DiscoveryError,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    UnknownBackend,
)
from lbpool.hashing import Key
from lbpool.pool import Pool
from lbpool.retry import RetryBudget
from lbpool.stats import BackendStats, DiscoveryStats, ManagerStats, ServerStats
from lbpool.subset import subset

_log = logging.getLogger("lbpool")
_probe = random.Random()  # where a full server looks for one that can serve

ConfigSource = Union[Config, Mapping[str, Any], str, "os.PathLike[str]", None]
T = TypeVar("T")
_B = TypeVar("_B")  # a snapshot's per-backend value
Raw = tuple[Any, ...]
"""A server's numbers in one tuple (``Pool._raw``; fields ``lbpool._snapshot.RAW_FIELDS``)."""
Hits = dict[str, tuple[int, int]]
"""A key-affinity backend's ``(owner_hits, fallback_hits)`` by address."""
RawBackend = tuple[BackendStats, list[Raw], Hits]
"""A backend for the Prometheus collector (``PoolManager._raw_snapshot``): its
``BackendStats`` without servers, its servers' ``Pool._raw`` tuples, and its
key-affinity ``(owner_hits, fallback_hits)`` by address (empty for other strategies)."""
BreakerChange = Callable[[str, str, str, str], None]
"""A breaker listener: ``(backend, server address, old state, new state)``."""

_S = TypeVar("_S")  # a snapshot's value per server (a ServerStats, a Raw)

# a ServerStats from a capture and its key-affinity hits (compiled: lbpool._snapshot)
_server_stats: Final[Callable[[Raw, int, int], ServerStats]] = functools.partial(
    server_stats, ServerStats
)


def _raw_only(raw: Raw, owner: int, fallback: int) -> Raw:
    """The collector's value per server: the capture itself (its hits go apart)."""
    return raw


_NOTHING: frozenset[int] = frozenset()
_NO_ERRORS: Mapping[Pool, BaseException] = {}
_MAX_ADHOC_ALIASES = 4096
# stats(): a sliced snapshot starts over at most this many times if a reload lands in
# a pause (the slicing itself: lbpool.stats.SNAPSHOT_SLICE_POOLS / _SECONDS)
_SNAPSHOT_ATTEMPTS = 3
# breaker listeners running now (they run inside a pool's step, which must not yield:
# a snapshot taken from one is not sliced)
_in_listener = 0
_DRAIN_TIMEOUT = 300.0  # a removed server's in-use connections get this long to come back


class Picker(Protocol):
    """Which server an acquisition tries next: a ``Balancer``, or the key's ``KeyOrder``."""

    def pick(self, exclude: AbstractSet[int] = ...) -> int | None: ...


def _balancing(strategy: str) -> str:
    """The balancer a backend keeps: its own, or (key-affinity) an unused round_robin."""
    return "round_robin" if is_hashing(strategy) else strategy


def _tuning(config: BackendConfig) -> tuple[Any, ...]:
    """What ``Pool.reconfigure`` and ``Breaker.reconfigure`` take from a backend config."""
    return (config.pool, config.dial, config.health_check, config.setup, config.breaker)


def _discard(fresh: Mapping[str, Pool]) -> None:
    """Close pools made ahead but never used: never yields (no connection, no greenlet)."""
    for pool in fresh.values():
        pool.close(0)


def _close_all(
    pools: list[Pool], timeout: float | None, keep: Callable[[gevent.Greenlet], object]
) -> None:
    """Close ``pools`` (lending stopped already), pausing every slice (``Pacer``): each
    with nothing in use at once (the bulk of a big fleet: no greenlet each); each other
    one in a greenlet of its own, given to ``keep`` at once, that closes its idle
    connections now and in-use ones as they come back, the rest after ``timeout``."""
    pause = Pacer()
    for pool in pools:
        if pool.active == 0:
            pool.close(0)  # idle connections only: never yields
        else:
            keep(gevent.spawn(pool.close, timeout))
        pause()


def _coerce_config(config: ConfigSource) -> Config:
    if config is None:
        return parse_config({})
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return parse_config(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise ConfigError(
        [
            ConfigProblem(
                "<config>",
                None,
                "",
                "expected a mapping, a lbpool.Config or a path to a YAML file, "
                f"got {type(config).__name__}",
            )
        ]
    )


class Backend:
    """A named group of servers and the strategy that spreads acquisitions over them."""

    def __init__(
        self,
        name: str,
        config: BackendConfig,
        *,
        adhoc: bool = False,
        listeners: list[BreakerChange] | None = None,
        on_demand: Callable[[Pool], object] | None = None,
        on_unused: Callable[[Pool], object] | None = None,
        budget: RetryBudget | None = None,
        owner: ThreadBound | None = None,
    ) -> None:
        self.name = name
        self._owner = owner  # its manager: a snapshot from another thread is read there
        self.config = config
        self.adhoc = adhoc
        self._on_unused = on_unused  # an ad-hoc backend's: its pool unused for idle_timeout
        self.aliases: list[str] = []  # an ad-hoc backend's other spellings, cached by the manager
        self.uses_seen = -1  # an ad-hoc backend's acquisitions when last looked at for eviction
        self._listeners = listeners if listeners is not None else []
        self._on_demand = on_demand
        self.pools: list[Pool] = []
        self.closed = False  # set by the manager's close(): waiters then get PoolClosed
        self.closed_event = Event()  # set with it: wakes a wait for discovery's first answer
        self._only: Pool | None = None  # the one server of a one-server backend
        # the same when no key routes it (no placement): while its breaker is closed,
        # an acquisition goes straight to it -- nothing to pick, no panic (its one
        # server is closed), no warming (nobody else to take a share); the path that
        # PoolManager.get (also named acquire) inlines
        self._direct: Pool | None = None
        self._label = f"backend {name!r}"  # where a bad timeout is named
        self._balancer: Balancer = make_balancer(_balancing(config.strategy), [])
        # panic mode's balancer: the same strategy over the pools with health ignored
        self._panic_balancer: Balancer = self._balancer
        # pools whose breaker is not closed, kept from breaker transitions: while it is
        # empty, there is no panic and a pick costs nothing more
        self._not_closed: list[Pool] = []
        # slow start: warming pool -> when it joined or its breaker closed (monotonic)
        self._warming: dict[Pool, float] = {}
        # key-affinity strategies: the key's owner, then its fallbacks (_affinity.py)
        self._placement: Placement | None = None
        self._index: dict[Pool, int] = {}  # pool -> its position in pools, swapped with it
        # the membership before subsetting: config.servers, or (discover:) the last good
        # DNS answer -- kept across a reload that switches to discover until it answers
        self._base: tuple[ServerConfig, ...] = config.servers
        self.discovery: Discovery | None = None  # discover: the manager's runner for it
        self.discovery_error: DiscoveryError | None = None  # its last failure, as raised
        # set (and replaced by a fresh one) on every change of pools or runner: wakes a
        # wait for discovery's first answer, which then looks again (a reload may have
        # given servers, or a new runner whose events the waiter was not watching)
        self.changed = Event()
        # call()'s retry budget and counters; ad-hoc backends share the manager's one
        self.budget = budget if budget is not None else RetryBudget(config.retry)

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def _where(self) -> tuple[str | None, str | None]:
        """``(address, backend)`` of this backend's errors: an ad-hoc ``host:port`` names
        its server and no backend; a configured backend its name and no one server."""
        return (self.name, None) if self.adhoc else (None, self.name)

    def _new_pool(self, server: ServerConfig, cfg: BackendConfig) -> Pool:
        pool = Pool(
            server.address,
            pool=cfg.pool,
            dial=cfg.dial,
            health_check=cfg.health_check,
            breaker=Breaker(str(server.address), cfg.breaker, listener=self._breaker_changed),
            setup=cfg.setup,
            backend=None if self.adhoc else self.name,
            weight=server.weight,
            upkeep=False,
        )
        pool.owner_kind = "manager"
        if self._on_demand is not None:
            pool.on_demand = functools.partial(self._on_demand, pool)
        pool.on_unused = self._on_unused
        return pool

    def _breaker_changed(self, breaker: Breaker, old: str, new: str) -> None:
        self._not_closed = [p for p in self.pools if not p.breaker.is_closed]
        if new == "closed" and self.config.balance.slow_start is not None:
            for pool in self.pools:  # a recovered server warms up again
                if pool.breaker is breaker:
                    self._warming[pool] = _monotonic()
        global _in_listener
        _in_listener += 1  # called from inside a pool's step: stats() there must not yield
        try:
            for listener in list(self._listeners):
                try:
                    listener("" if self.adhoc else self.name, breaker.name, old, new)
                except Exception:
                    _log.exception("breaker listener failed")
        finally:
            _in_listener -= 1

    def _fresh_pools(self, config: BackendConfig, pause: Pacer) -> dict[str, Pool]:
        """The pools ``_apply(config)`` will add, made ahead of it, with a ``pause`` after
        each (so it may yield): nobody sees them until ``_apply``. Interrupted, it closes
        what it made (fresh pools: nothing to wait for)."""
        have = {p.name for p in self.pools}
        fresh: dict[str, Pool] = {}
        try:
            base = config.servers if config.discover is None else self._base
            for server in self._subset(base, config):
                address = str(server.address)
                if address not in have and address not in fresh:
                    fresh[address] = self._new_pool(server, config)
                    pause()
        except BaseException:
            _discard(fresh)
            raise
        return fresh

    def _apply(self, config: BackendConfig, fresh: dict[str, Pool] | None = None) -> list[Pool]:
        """Make the pools match ``config`` (taking new ones from ``fresh``, made by
        ``_fresh_pools``); returns the pools that were removed. Never yields."""
        prev, self.config = self.config, config
        if prev.retry != config.retry:
            self.budget.reconfigure(config.retry)
        # a server kept under unchanged settings needs no re-tuning (a reload of a big
        # fleet that only adds or removes servers then switches in a few milliseconds)
        same = prev is config or _tuning(prev) == _tuning(config)
        if config.discover is None:
            self._base = config.servers
        old = {p.name: p for p in self.pools}
        fresh = dict(fresh or {})
        pools: list[Pool] = []
        for server in self._subset(self._base, config):
            address = str(server.address)
            pool = old.pop(address, None)
            if pool is None:
                pool = fresh.pop(address, None) or self._new_pool(server, config)
            elif not same or pool.weight != server.weight:
                pool.reconfigure(
                    pool=config.pool,
                    dial=config.dial,
                    health_check=config.health_check,
                    setup=config.setup,
                    weight=server.weight,
                )
                pool.breaker.reconfigure(config.breaker)
            pools.append(pool)
        self._follow_slow_start(config, pools)
        # one assignment each, no switch in between: callers see old or new, never half
        self.pools = pools
        self._index = {pool: i for i, pool in enumerate(pools)}
        self._only = pools[0] if len(pools) == 1 else None
        self._balancer = make_balancer(_balancing(config.strategy), pools)
        self._panic_balancer = (
            make_balancer(_balancing(config.strategy), ignoring_health(pools))
            if config.balance.panic_threshold
            else self._balancer
        )
        self._not_closed = [p for p in pools if not p.breaker.is_closed]
        self._follow_placement(config, pools)
        self._direct = self._only if self._placement is None else None
        _discard(fresh)  # made for a server that a reload in between added already
        self.notify_change()
        return list(old.values())

    def notify_change(self) -> None:
        """Wake whoever waits on ``changed`` (they look again); never yields."""
        changed, self.changed = self.changed, Event()
        changed.set()

    def _follow_slow_start(self, config: BackendConfig, pools: list[Pool]) -> None:
        """Slow start: servers that join a backend that had servers warm up from now;
        removed ones stop warming. Never yields."""
        if config.balance.slow_start is None:
            self._warming.clear()
            return
        if self._warming:
            kept = set(pools)
            self._warming = {p: t for p, t in self._warming.items() if p in kept}
        if self.pools:  # the first membership (construction, DNS's first answer): no ramp
            now = _monotonic()
            had = set(self.pools)
            for pool in pools:
                if pool not in had:
                    self._warming[pool] = now

    def in_panic(self) -> bool:
        """Panic mode: fewer than ``balance.panic_threshold`` of the servers are
        eligible (breaker closed, or half-open with its trial free). Never yields;
        costs one truth test while every breaker is closed."""
        bad = self._not_closed
        if not bad:
            return False
        share = self.config.balance.panic_threshold
        n = len(self.pools)
        if not share or not n:
            return False
        ok = n - len(bad)
        for pool in bad:
            if eligible(pool.breaker):
                ok += 1
        return ok < share * n

    def _warmed(self, idx: int, exclude: AbstractSet[int]) -> int:
        """Slow start: the strategy picked ``idx``; a warming server keeps the pick with
        probability ``max(min_weight, elapsed / window)`` (Envoy's slow start mode with
        aggression 1), else another server takes it. Never yields."""
        pool = self.pools[idx]
        since = self._warming.get(pool)
        slow = self.config.balance.slow_start
        if since is None or slow is None:
            return idx
        elapsed = (_monotonic() - since) / slow.window
        if elapsed >= 1.0:
            del self._warming[pool]  # warm: full share from now on
            return idx
        if _probe.random() < max(slow.min_weight, elapsed):
            return idx
        other = self._balancer.pick({*exclude, idx})
        return idx if other is None else other

    def _subset(
        self, servers: tuple[ServerConfig, ...], config: BackendConfig
    ) -> tuple[ServerConfig, ...]:
        """The servers this process uses under ``config``: all of them, or (``subset:``)
        its subset."""
        sub = config.subset
        if sub is None or sub.size >= len(servers):
            return servers
        pairs = [(str(server.address), server.weight) for server in servers]
        kept = {address for address, _ in subset(pairs, sub.size, sub.client_id)}
        return tuple(server for server in servers if str(server.address) in kept)

    def _discovered(self, servers: Servers) -> bool:
        """Take a good DNS answer as the membership; False if it is the one in use.
        Never yields (``_apply`` follows, by the manager)."""
        found: list[ServerConfig] = []
        for address, weight in servers:
            try:
                found.append(ServerConfig.model_validate({"address": address, "weight": weight}))
            except ValueError:  # pydantic's ValidationError is one
                raise ValueError(
                    f"DNS gave {address!r} (weight {weight}), which is not a usable server"
                ) from None
        base = tuple(found)
        if base == self._base and self.pools:
            return False
        self._base = base
        return True

    def _await_discovery(self, timeout: float | None) -> float:
        """No server yet, discovery has not answered: wait for its first resolution
        within the deadline; the time left. A change meanwhile (a reload giving
        servers, or another runner) wakes the wait, which looks again within the same
        deadline. ``BackendUnavailable`` naming the discovery error when it failed (or
        had not ended by the deadline)."""
        limit = self.config.pool.acquire_timeout if timeout is None else timeout
        deadline = _monotonic() + limit
        while True:
            left = max(0.0, deadline - _monotonic())
            if self.closed:
                raise PoolClosed(f"backend {self.name!r}: the manager is closed", *self._where())
            discovery = self.discovery
            if self.pools or discovery is None:  # served, or no longer discovered
                return left
            if discovery.attempted.is_set() or left <= 0:
                break
            # the first resolution of this runner is under way
            changed = self.changed
            gevent.wait([discovery.attempted, changed, self.closed_event], timeout=left, count=1)
        error = self.discovery_error
        if discovery.last_error is None or error is None:
            error = DiscoveryError(
                "timeout",
                f"{discovery.target}: no answer yet within {limit:.3g}s "
                "(the first resolution is still running)",
            )
        raise BackendUnavailable(self.name, {"discovery": error}, {"discovery": "no answer"})

    def _follow_placement(self, config: BackendConfig, pools: list[Pool]) -> None:
        """Key-affinity: keep the placement in step with ``pools``; never yields (a
        changed membership is rebuilt in the background, see _affinity.py)."""
        if not is_hashing(config.strategy):
            if self._placement is not None:
                self._placement.stop()
                self._placement = None
            return
        if self._placement is None:
            self._placement = Placement(self.name, self._members)
        self._placement.update(config.strategy, pools, config.balance.hash_fallback)

    def _members(self) -> dict[Pool, int]:
        """Key-affinity pickers' view of the pools now (even after a strategy switch)."""
        return self._index

    def stop_rebuilds(self) -> None:
        """End a key table build in progress (closing, or the backend was removed)."""
        if self._placement is not None:
            self._placement.stop()

    def first_table(self) -> Event | None:
        """Key-affinity: the event set once the first key table over real servers is in
        place (a discovered backend has none before its first answer), until then; else
        (built, or not a hashing backend) None. Never yields."""
        placement = self._placement
        return None if placement is None else placement.first_table()

    def owner(self, key: Key) -> str:
        """The key's owner by placement (breakers ignored), ``host:port``; no borrow.
        A discovered backend with no servers yet waits for its first answer, as
        ``acquire`` does (``BackendUnavailable`` naming the discovery error)."""
        placement = self._placement
        if placement is None:
            raise ValueError(
                f"backend {self.name!r} does not route by key (strategy {self.strategy})"
            )
        check_key(key)
        limit = self.config.pool.acquire_timeout
        start = _monotonic()
        if not self.pools and self.discovery is not None:  # DNS has not answered yet
            self._await_discovery(limit)
            placement = self._placement
            if placement is None:  # a reload meanwhile: no longer by key
                return self.owner(key)
        owner = placement.owner(key, start + limit, limit)
        if owner is None:  # no members (not reached once discovery answered)
            why = LookupError(f"backend {self.name!r} has no servers")
            raise BackendUnavailable(self.name, {"servers": why}, {"servers": "none"})
        return owner

    def acquire(
        self, timeout: SupportsFloat | None = None, key: Key | None = None
    ) -> PooledConnection:
        """Borrow from the server the strategy picks; fail over when a dial fails or the
        server is full. One deadline, ``timeout``, bounds the whole of it.

        A key-affinity backend needs ``key`` (``ValueError`` without one) and tries the
        key's owner, then its fallbacks (``hash_fallback``); other strategies ignore it.
        """
        if timeout is not None:  # before anything changes, on every path
            timeout = valid_timeout(timeout, self._label)
        pool = self._direct
        if pool is not None and pool.breaker.is_closed:  # _acquire's one-server path
            handle: PooledConnection = acquire_direct(self, pool, timeout)
            return handle
        placement = self._placement
        if placement is not None:  # a missing key is refused before any wait
            placement.need_key(key)
        if not self.pools and self.discovery is not None:  # DNS has not answered yet
            timeout = self._await_discovery(timeout)
            placement = self._placement  # a reload may have come in the meantime
        if placement is None:
            return self._acquire(timeout, None)
        start = _monotonic()
        limit = self.config.pool.acquire_timeout if timeout is None else timeout
        order = placement.order(key, start + limit, limit)
        try:
            conn = self._acquire(limit - (_monotonic() - start), order)
        except BackendUnavailable as exc:
            if placement.fallback == "none":
                raise order.unavailable(exc) from None
            raise
        return order.served(conn)

    def _picker(self, picker: KeyOrder | None, panic: bool) -> Picker:
        """The balancer (panic: the one that ignores health), or the key's order."""
        if picker is None:
            return self._panic_balancer if panic else self._balancer
        picker.panic = panic
        return picker

    def _acquire(
        self, timeout: float | None, picker: KeyOrder | None, avoid: Pool | None = None
    ) -> PooledConnection:
        """Borrow from the server ``picker`` names (None: the balancer, read at each
        pick, as a reload may replace it); fail over when a dial fails or the server is
        full (a full server is not a failed one: its breaker is not charged). One
        deadline, ``timeout``, bounds the whole of it. ``avoid`` (a retry's failed
        server) is picked first only when no other server is eligible."""
        start = _monotonic()
        pool = self._only
        panic = False
        if pool is None or not pool.breaker.is_closed:  # one closed server: no pick needed
            if self._not_closed and self.in_panic():  # an empty list while all are closed
                panic = True
                chooser: Picker = self._picker(picker, True)
            else:
                chooser = self._balancer if picker is None else picker
            idx = None if avoid is None else chooser.pick(self._other_than(avoid))
            if idx is None:
                idx = chooser.pick(_NOTHING)
            if not panic and self._warming and picker is None and idx is not None:
                idx = self._warmed(idx, _NOTHING)
            if idx is None:
                return self._failover(start, timeout, {}, picker)
            pool = self.pools[idx]
            if picker is None and not pool.can_serve_now():  # a key keeps to its owner
                pool = self._instead_of_full(idx, pool)
        try:
            if panic:
                return pool.acquire(timeout, panic=True)
            return pool.acquire(timeout)
        except (DialError, PoolClosed, PoolExhausted) as exc:
            return self._failover(start, timeout, {pool: exc}, picker)

    def _other_than(self, pool: Pool) -> AbstractSet[int]:
        """The pick exclusion that keeps away from ``pool`` (if it is still a member)."""
        i = self._index.get(pool)
        return _NOTHING if i is None else frozenset((i,))

    def call(
        self,
        fn: Callable[[PooledConnection], T],
        key: Key | None = None,
        timeout: SupportsFloat | None = None,
    ) -> T:
        """``fn(conn)`` on a borrowed connection, retried on a fresh one when the
        connection died in flight; see ``PoolManager.call``."""
        if timeout is not None:  # before anything is counted
            timeout = valid_timeout(timeout, self._label)
        placement = self._placement
        if placement is not None:  # a key-affinity backend's missing key: before the count
            placement.need_key(key)
        budget = self.budget
        budget.called()
        limit = self.config.pool.acquire_timeout if timeout is None else timeout
        deadline = _monotonic() + limit
        conn = self.acquire(limit, key)
        tries = 1
        while True:
            try:
                with conn:  # released after fn returns; discarded (with the error) if it raises
                    return fn(conn)
            except Exception as exc:
                # retried: a network error (the connection died in flight), while attempts,
                # the deadline and the budget allow; the budget is asked last, so it only
                # counts retries that would otherwise have been made
                if not _is_network_error(exc) or tries >= self.config.retry.attempts or self.closed:
                    raise
                left = deadline - _monotonic()
                if left <= 0 or not budget.try_retry():
                    raise
                tries += 1
                try:
                    conn = self._acquire_again(left, key, conn)
                except Exception as again:  # the retry could not be made: say why it was
                    # (lbpool's errors; a ValueError if a reload made the backend route
                    # by key and this call has none)
                    raise again from exc

    def _acquire_again(
        self, timeout: float, key: Key | None, failed: PooledConnection
    ) -> PooledConnection:
        """A retry's acquisition: a key-affinity backend asks for the key again (its
        owner, or its fallback per ``hash_fallback`` if the owner can no longer serve);
        the other strategies avoid the server that just failed when another is
        eligible."""
        if self._placement is not None or not self.pools:
            return self.acquire(timeout, key)
        owner = failed._owner
        return self._acquire(timeout, None, owner if isinstance(owner, Pool) else None)

    def _instead_of_full(
        self, idx: int, full: Pool, tried: Mapping[Pool, BaseException] = _NO_ERRORS
    ) -> Pool:
        """``full`` could only queue the caller: another eligible server (not in
        ``tried``) that can serve at once, if one of two probed at random can, else
        ``full`` -- unless every slot of ``full`` is a dial in progress: a queue there
        is served only by dials that may never complete (a black hole holds them for
        ``dial.timeout``), so the caller queues instead on a probed server with open
        connections, whose releases will come.

        The probe leaves the strategy's own state alone (asking the balancer would
        move a round-robin cursor, and every caller would then queue on one server),
        and its cost does not grow with the backend. Never yields."""
        pools = self.pools
        others = len(pools) - 1
        if others < 1:
            return full
        queue_at = full
        first = _probe.randrange(others)
        # two distinct others (with two, both): the second a random step past the first
        probes = (
            (first, (first + 1 + _probe.randrange(others - 1)) % others) if others > 1 else (first,)
        )
        for j in probes:
            pool = pools[j + 1 if j >= idx else j]
            if pool in tried or not eligible(pool.breaker):
                continue
            if pool.can_serve_now():
                return pool
            if queue_at is full and not pool.only_dialing() and full.only_dialing():
                queue_at = pool
        return queue_at

    def _failover(
        self,
        start: float,
        timeout: float | None,
        errors: dict[Pool, BaseException],
        picker: KeyOrder | None,
    ) -> PooledConnection:
        limit = self.config.pool.acquire_timeout if timeout is None else timeout
        deadline = start + limit
        while True:
            pools = self.pools  # re-read: a reload may have swapped them
            tried = {i for i, p in enumerate(pools) if p in errors}
            panic = self.in_panic()
            idx = self._picker(picker, panic).pick(tried)
            if idx is None:
                if self.closed:
                    raise PoolClosed(
                        f"backend {self.name!r}: the manager is closed", *self._where()
                    )
                shed = [e for e in errors.values() if isinstance(e, PoolExhausted)]
                if shed and len(shed) == len(errors):
                    raise shed[-1]  # every server full, none failed
                raise self._unavailable(errors)
            pool = pools[idx]
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise PoolTimeout(
                    f"backend {self.name!r}: no connection within {limit:.3g}s "
                    f"(failed: {', '.join(p.name for p in errors) or 'none'})",
                    *self._where(),
                )
            if self._warming and picker is None and not panic:
                idx = self._warmed(idx, tried)
                pool = pools[idx]
            if picker is None and not pool.can_serve_now():  # as in _acquire
                pool = self._instead_of_full(idx, pool, errors)
            try:
                if panic:
                    return pool.acquire(remaining, panic=True)
                return pool.acquire(remaining)
            except (DialError, PoolClosed, PoolExhausted) as exc:
                errors[pool] = exc

    def _unavailable(self, errors: Mapping[Pool, BaseException]) -> BackendUnavailable:
        by_addr: dict[str, BaseException | None] = {}
        states: dict[str, str] = {}
        retry: dict[str, float] = {}
        for pool in self.pools:
            br = pool.breaker
            states[pool.name] = br.state
            retry[pool.name] = br.retry_in()
            err = errors.get(pool)
            by_addr[pool.name] = err if err is not None else br.last_failure
        return BackendUnavailable(self.name, by_addr, states, retry)

    def _raw_stats(self, raws: dict[str, Raw], hits: Hits) -> RawBackend:
        """``stats`` for the Prometheus collector: this backend's own numbers (a
        ``BackendStats`` without servers), its servers' ``Pool._raw`` captures (in the
        order of ``pools``) and, for a key-affinity backend, ``(owner_hits,
        fallback_hits)`` by address (``PoolManager._capture``). Never yields."""
        return (self.stats({}), list(raws.values()), hits)

    def _stats_view(self, servers: dict[str, ServerStats], hits: Hits) -> BackendStats:
        """``stats`` as ``PoolManager._capture``'s view (the hits are in ``servers``)."""
        return self.stats(servers)

    def _take(
        self, make: Callable[[Raw, int, int], _S], interrupted: Callable[[], bool] | None
    ) -> tuple[dict[str, _S], Hits] | None:
        """Every server's ``make(its Pool._raw capture, owner_hits, fallback_hits)`` by
        address, in the order of ``pools``, and a key-affinity backend's hits by
        address: a server's tally is read in the same step as its capture (each hit is
        counted with its acquisition, with no yield between, so a server's hits never
        exceed its ``acquired``). ``interrupted()`` is asked before each server (it may
        pause): True gives None. Without it, never yields."""
        servers: dict[str, _S] = {}
        hits: Hits = {}
        for pool in self.pools:
            if interrupted is not None and interrupted():
                return None
            raw = pool._raw()
            placement = self._placement  # a key-affinity backend's (read at each step)
            tally = None if placement is None else placement.tallies.get(pool.name)
            if tally is None:
                servers[pool.name] = make(raw, 0, 0)
            else:
                pair = hits[pool.name] = (tally.owner, tally.fallback)
                servers[pool.name] = make(raw, *pair)
        return servers, hits

    def _stats_now(self) -> BackendStats:
        """``stats()`` in the owner thread: every server taken now, in one go."""
        taken = self._take(_server_stats, None)
        assert taken is not None  # nothing interrupts it
        return self.stats(taken[0])

    def stats(self, servers: dict[str, ServerStats] | None = None) -> BackendStats:
        """This backend's numbers; ``servers``: its servers' stats, already taken (in
        the order of ``pools``: ``PoolManager._capture``), else taken now, in one go
        (from another OS thread, by the manager's own hub, as ``PoolManager.stats``:
        ``read_from_any_thread``). Never yields."""
        if servers is None:
            if self._owner is not None:
                return read_from_any_thread(self._owner, self._stats_now)
            return self._stats_now()
        d = self.discovery
        discovery = None
        if d is not None:
            discovery = DiscoveryStats(
                servers=tuple(address for address, _ in d.servers),
                last_refresh=d.last_refresh,
                last_error=d.last_error,
                failures=d.failures,
            )
        budget = self.budget
        return BackendStats(
            name=self.name,
            strategy=self.strategy,
            servers=servers,
            discovery=discovery,
            calls=budget.calls,
            retries=budget.retries,
            retries_denied=budget.retries_denied,
            panic=self.in_panic(),
        )


_DNS, _TABLE, _POOL = "dns", "table", "pool"


# wait_ready looks at what it waits for at least this often (seconds)
_READY_POLL: Final = 0.1


class _Unready:
    """One thing ``wait_ready`` waits for: a backend's first DNS answer or first key
    table, or a pool's ``min_idle``; read live at each look."""

    __slots__ = ("backend", "kind", "pool")

    def __init__(self, backend: Backend, pool: Pool | None, kind: str) -> None:
        self.backend = backend
        self.pool = pool
        self.kind = kind

    def event(self) -> Event | None:
        """None if ready (or nothing to wait for any more); else what to wait on, which
        a change sets. A pool's dials towards ``min_idle`` are started. Never yields."""
        if self.pool is not None:
            return self.pool.readiness()
        if self.kind == _TABLE:
            return self.backend.first_table()
        discovery = self.backend.discovery  # a reload may have given it another runner
        if discovery is None or discovery.answered.is_set():
            return None
        return discovery.answered

    def why(self, limit: float) -> str:
        """What is not ready, for ``PoolTimeout``'s message."""
        if self.pool is not None:
            return self.pool._not_ready(limit)
        name = self.backend.name
        if self.kind == _TABLE:
            if not self.backend.pools:  # discovered, before its first answer
                discovery = self.backend.discovery
                error = discovery.last_error if discovery is not None else None
                return (
                    f"backend {name!r}: no key table within {limit:.3g}s (no servers yet: "
                    f"{error or 'the first resolution is still running'})"
                )
            return (
                f"backend {name!r}: no key table within {limit:.3g}s "
                f"(its first {self.backend.strategy} table is still being built)"
            )
        discovery = self.backend.discovery
        error = discovery.last_error if discovery is not None else None
        return (
            f"backend {name!r}: discovery has no answer: "
            f"{error or 'the first resolution is still running'}"
        )


class PoolManager(Router):
    """Maps backend names and ad-hoc ``host:port`` strings to pools of connections."""

    def __init__(self, config: ConfigSource = None) -> None:
        self.config = _coerce_config(config)
        self._backends: dict[str, Backend] = {}
        self._adhoc: dict[str, Backend] = {}  # every spelling of an ad-hoc name -> its backend
        # the ad-hoc backends by canonical name, oldest first (adhoc.max_pools bounds it)
        self._adhoc_order: OrderedDict[str, Backend] = OrderedDict()
        # pools a reload removed, closing as their connections come back; the greenlets
        # that close them (one per reload, and one per pool with connections in use)
        self._draining: set[Pool] = set()
        self._drainers: set[gevent.Greenlet] = set()
        self._reloads = 0  # reload calls begun: a reload applies only if none after it has
        self._applied = 0  # the reload whose config is in place
        self._listeners: list[BreakerChange] = []
        self._closing = False
        self._closed = False
        self._closing_pools: list[Pool] = []
        self._closed_event = Event()  # set by close(): wakes wait_ready
        self._retired: list[Discovery] = []  # stopped without waiting: close() joins them
        # call()'s retry budget for every ad-hoc host:port (their stats' backend "")
        self._adhoc_budget = RetryBudget(self.config.defaults.retry)
        self._bind_to_current_thread()
        # one greenlet keeps every pool; a pool's acquisition that had to wait or dial
        # wakes it (on_demand) when at rest, as do new pools, reload and close
        self._upkeep = Upkeep(self._all_pools)
        self._on_demand = self._upkeep.on_demand
        # a big fleet's pools are made in slices (Pacer): nobody can see this manager yet
        pause = Pacer()
        made: list[tuple[Backend, dict[str, Pool]]] = []
        try:
            for name, bcfg in self.config.backends.items():
                backend = Backend(
                    name, bcfg, listeners=self._listeners, on_demand=self._on_demand, owner=self
                )
                made.append((backend, backend._fresh_pools(bcfg, pause)))
        except BaseException:  # interrupted: leave nothing behind
            for _, fresh in made:
                _discard(fresh)
            self._upkeep.stop()
            raise
        for backend, fresh in made:
            backend._apply(backend.config, fresh)
            self._backends[backend.name] = backend
            self._follow_dns(backend)
        # the upkeep greenlet may have run its first pass in one of the pauses above,
        # before any backend was registered: a pass over every pool now (min_idle)
        self._upkeep.wake()

    def add_breaker_listener(self, listener: BreakerChange) -> None:
        """Call ``listener(backend, address, old, new)`` on every breaker state change
        (ad-hoc ``host:port`` pools report backend ``""``); its errors are logged."""
        self._listeners.append(listener)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> PoolManager:
        return cls(load_config(path))

    # -- routing ------------------------------------------------------------------
    @property
    def backends(self) -> Mapping[str, Backend]:
        return dict(self._backends)

    if TYPE_CHECKING:  # the public types; the method is Router.get (lbpool/_router.py)

        def get(
            self, name: str, timeout: SupportsFloat | None = None, key: Key | None = None
        ) -> PooledConnection:
            """Borrow a connection to ``name`` (a backend, or an ad-hoc ``host:port``)
            within ``timeout`` seconds (default: the backend's ``acquire_timeout``); use
            as ``with manager.get("cache") as conn:``, or give it back with
            ``release()``/``discard()``. ``acquire`` is the same method.

            ``key`` (str, as UTF-8, or bytes): required by key-affinity backends
            (``maglev``, ``ring_hash``, ``rendezvous``), ignored by the others. A bad
            ``key``, ``timeout`` or ``name`` raises ``TypeError``/``ValueError`` naming
            it before anything changes (no ad-hoc pool is made, no wait begins).
            """
            ...

    else:
        get = Router.get  # compiled (mypyc): no interpreted frame between caller and pool
    acquire = get  # one method, two names: ``with manager.get(...)``, ``acquire()``/``release()``

    def call(
        self,
        name: str,
        fn: Callable[[PooledConnection], T],
        *,
        key: Key | None = None,
        timeout: SupportsFloat | None = None,
    ) -> T:
        """Return ``fn(conn)`` on a connection borrowed from ``name`` (a backend or an
        ad-hoc ``host:port``; ``key`` as for ``get``), retrying when the connection
        dies in flight. For idempotent requests: a retried request may have reached
        the server before its connection died.

        - ``fn`` returns: the connection is released, its result returned.
        - ``fn`` raises a network error (``OSError`` -- reset, EOF as
          ``ConnectionError``, ``socket.timeout`` -- that is not one of lbpool's own
          errors): the connection is discarded with it (the server's breaker hears of
          it) and ``fn`` is called again on a fresh acquisition while the backend's
          ``retry.attempts`` (tries in all, the first included), the deadline and its
          retry budget (``retry.budget_percent`` of calls over 10 s plus
          ``retry.min_per_second``; ``lbpool.retry``) allow. The retry avoids the
          server that just failed when another is eligible; a key-affinity backend
          asks for the key again (its owner, or its fallback per ``hash_fallback``).
          Otherwise the error propagates, the same exception object. If a retry's
          acquisition fails, its error (``BackendUnavailable``, ``PoolTimeout`` ...)
          propagates, its ``__cause__`` the network error.
        - ``fn`` raises anything else (a ``gevent.Timeout`` or kill included: the
          caller's own cancellation): the connection is discarded as ``with conn:``
          discards it, and the exception propagates; never retried.

        One deadline, ``timeout`` (None: the backend's ``acquire_timeout``), starts
        at the call and bounds every acquisition; time spent in ``fn`` counts against
        it, and no retry starts after it passed. ``fn``'s own I/O is bounded by the
        socket timeout it sets. Counted per backend in stats: ``calls``,
        ``retries``, ``retries_denied``.

        Checked before anything changes (no ad-hoc pool made, no call counted, nothing
        borrowed): ``fn`` not callable is a ``TypeError``; a bad ``key`` or ``timeout``
        as for ``get``; no ``key`` for a key-affinity backend a ``ValueError``.
        """
        # before anything changes (an ad-hoc pool made, a call counted, a borrow)
        valid_callable(fn, "fn", f"call {name!r}", optional=False)
        if key is not None:
            check_key(key)
        if timeout is not None:
            timeout = valid_timeout(timeout, f"call {name!r}")
        if get_ident() != self._thread_id:  # another OS thread, or a forked child
            self._check_owner()
        backend: Backend = backend_for(self, name)
        return backend.call(fn, key, timeout)

    def owner(self, name: str, key: Key) -> str:
        """The key's owner in backend ``name`` by placement, ``host:port``: breakers are
        ignored and nothing is borrowed (``conn.address`` says who actually served).
        ``ValueError`` if the backend does not route by key. Waits, within the
        backend's ``acquire_timeout``, only for what a first ``get`` would: a discovered
        backend's first DNS answer (else ``BackendUnavailable`` naming the DNS error)
        and its first key table (built in the background at construction or reload;
        else ``PoolTimeout``). ``PoolClosed`` once the manager is closed;
        ``LbpoolError`` from another OS thread (the table it may wait for is built by
        this manager's hub)."""
        self._check_owner()
        if self._closing:
            raise PoolClosed("the manager is closed")
        check_key(key)
        _check_name(name)
        backend = self._backends.get(name)
        if backend is None:
            raise UnknownBackend(name, list(self._backends))
        owner = backend.owner(key)
        if self._closing:  # closed while it waited for the table
            raise PoolClosed("the manager is closed")
        return owner

    def _route_other(self, name: str, timeout: object = None) -> Backend:
        """The ad-hoc backend for a ``host:port`` name, made on first use; a bad
        ``timeout`` (if given) is refused before a pool is made, named by backend as
        the caller's check after routing would name it."""
        if self._closing:
            raise PoolClosed("the manager is closed")
        self._check_owner()
        try:
            address = _parse_address(name)
        except ValueError:
            raise UnknownBackend(name, list(self._backends)) from None
        key = str(address)
        backend = self._adhoc.get(key)
        if backend is None:
            if timeout is not None:
                valid_timeout(timeout, f"backend {key!r}")
            self._make_room()
            backend = Backend(
                key,
                self._adhoc_config(key),
                adhoc=True,
                listeners=self._listeners,
                on_demand=self._on_demand,
                on_unused=self._unused_adhoc,
                budget=self._adhoc_budget,
                owner=self,
            )
            backend._apply(backend.config)
            self._adhoc[key] = backend
            self._adhoc_order[key] = backend
            self._hand_over()  # its server's old pool may still drain
            for pool in backend.pools:
                self._upkeep.schedule(pool)  # a pass for it alone: warm it to min_idle
        if name != key and len(self._adhoc) < _MAX_ADHOC_ALIASES:  # other spellings,
            self._adhoc[name] = backend  # cached; bounded, as names may come from untrusted input
            backend.aliases.append(name)
        return backend

    def _make_room(self) -> None:
        """Before a new ad-hoc name: at ``adhoc.max_pools`` names, forget the least
        recently used one with nothing in use (second chance: one used since it was
        last looked at goes to the back). If every one is in use, the bound is
        exceeded for now rather than fail a caller. Never yields."""
        order = self._adhoc_order
        for _ in range(len(order)):
            if len(order) < self.config.adhoc.max_pools:
                return
            key, backend = next(iter(order.items()))
            uses = sum(p._hits + p._misses + p._timeouts + p._shed for p in backend.pools)
            busy = any(p.active or p._waiters for p in backend.pools)
            if busy or uses != backend.uses_seen:
                backend.uses_seen = uses
                order.move_to_end(key)
                continue
            self._forget_adhoc(backend)

    def _unused_adhoc(self, pool: Pool) -> None:
        """Upkeep found ad-hoc ``pool`` unused for its ``idle_timeout``: close and forget
        its name. Never yields."""
        backend = self._adhoc_order.get(pool.name)
        if backend is not None and pool in backend.pools:
            self._forget_adhoc(backend)
        else:  # not ours any more (a race with close or a reload): stop keeping it
            self._upkeep.forget(pool)

    def _forget_adhoc(self, backend: Backend) -> None:
        """Drop an ad-hoc name and its spellings; its pools stop lending now and drain
        (nothing in use: they close at once). Never yields."""
        self._adhoc_order.pop(backend.name, None)
        for name in [backend.name, *backend.aliases]:
            if self._adhoc.get(name) is backend:
                del self._adhoc[name]
        backend.closed = True
        backend.closed_event.set()
        for pool in backend.pools:
            self._upkeep.forget(pool)
        _log.debug("ad-hoc pool %s forgotten (unused, or adhoc.max_pools reached)", backend.name)
        self._retire_pools(list(backend.pools))

    def _adhoc_config(self, address: str) -> BackendConfig:
        d = self.config.defaults
        return BackendConfig.model_validate(
            {
                "servers": [{"address": address}],
                "pool": d.pool,
                "dial": d.dial,
                "breaker": d.breaker,
                "health_check": d.health_check,
                "balance": d.balance,
                "retry": d.retry,
            }
        )

    # -- upkeep -------------------------------------------------------------------
    def _all_pools(self) -> list[Pool]:
        seen: dict[int, Pool] = {}
        for backend in [*self._backends.values(), *self._adhoc.values()]:
            for pool in backend.pools:
                seen[id(pool)] = pool
        return list(seen.values())

    def wait_ready(self, timeout: SupportsFloat | None = 5.0) -> None:
        """Block until the current config is ready: every discovered backend has its
        first DNS answer, every key-affinity backend its first key table, every pool
        ``min_idle`` connections open. A reload or DNS answer meanwhile is followed (a
        server no longer configured is not waited for; a new one is). ``timeout`` bounds
        the whole wait (None: no limit); then ``PoolTimeout`` names all that is still
        not ready. ``PoolClosed`` if the manager closes. It waits in the caller's
        greenlet and spawns nothing, so however it ends nothing is left behind."""
        if timeout is not None:
            timeout = valid_timeout(timeout, "wait_ready")
        self._check_owner()
        deadline = None if timeout is None else _monotonic() + timeout
        membership: list[Any] | None = None
        pending: deque[_Unready] = deque()
        while True:
            if self._closing:
                raise PoolClosed("the manager is closed")
            if membership is None or not self._same_membership(membership):
                membership, pending = self._unready()  # may pause: look again
                continue
            event = None
            while pending and (event := pending[0].event()) is None:
                pending.popleft()  # ready now (or gone): each is waited for once
            if event is None:
                return
            left = None if deadline is None else deadline - _monotonic()
            if left is not None and left <= 0:
                why = [u.why(timeout or 0.0) for u in pending if u.event() is not None]
                raise PoolTimeout("not ready: " + "; ".join(why))
            backend = pending[0].backend  # a change of its membership or runner, its
            # removal (reload, an ad-hoc name forgotten) or close() wakes the wait too.
            # Looked at again every _READY_POLL s at least: a pool made ready by its
            # callers' connections (lent straight from their dials, given back to the
            # idle stack) sets no event, as the release path must not pay for one
            poll = _READY_POLL if left is None else min(left, _READY_POLL)
            gevent.wait(
                [event, backend.changed, backend.closed_event, self._closed_event],
                timeout=poll,
                count=1,
            )

    def _unready(self) -> tuple[list[Any], deque[_Unready]]:
        """The membership now, and what of it is not ready: discovered backends with no
        answer yet, first key tables being built, pools short of ``min_idle`` (each
        starts its dials now, so they all fill at once). A big fleet is read in slices:
        the caller checks the membership again."""
        membership = self._membership()
        found: deque[_Unready] = deque()
        for backend in list(self._backends.values()):
            discovery = backend.discovery
            if discovery is not None and not discovery.answered.is_set():
                found.append(_Unready(backend, None, _DNS))
            if backend.first_table() is not None:
                found.append(_Unready(backend, None, _TABLE))
        pause = Pacer()
        for backend in [*self._backends.values(), *self._adhoc_order.values()]:
            for pool in backend.pools:
                pause()
                if not pool.is_ready() and pool.readiness() is not None:  # dials now
                    found.append(_Unready(backend, pool, _POOL))
        return membership, found

    # -- stats --------------------------------------------------------------------
    def stats(self) -> ManagerStats:
        """Every backend's and server's numbers. The membership is one config's (never
        a mix across a reload or a discovery answer) and each server's numbers are
        taken in one step, so they agree (``size == idle + in_use + pending``).

        Up to ``lbpool.stats.SNAPSHOT_SLICE_POOLS`` (200) pools it is taken in one go
        and never yields. A bigger fleet's snapshot, taken from a greenlet, yields to
        the hub about every ``SNAPSHOT_SLICE_SECONDS`` (2 ms) so no caller stalls
        behind it; if the membership changed meanwhile it starts over (twice at most,
        then one go). Servers then are read at slightly different instants, as any
        Prometheus scrape's series are. From another OS thread (a metrics scrape thread), the
        manager's own hub takes it, in a greenlet of its own, never in the middle of a
        reload's switch (``read_from_any_thread``: the owner thread must run its hub
        within 2 s, or the snapshot is read directly)."""
        return read_from_any_thread(self, self._stats)

    def _stats(self) -> ManagerStats:
        """``stats()``: in slices when the fleet is big and the caller, in the owner
        thread, may yield; else in one go (the hub itself, a breaker listener, or a
        scrape thread reading directly after the owner's hub did not answer)."""
        return self._paced(self._stats_in_slices, self._stats_at_once)

    def _raw_snapshot(self) -> dict[str, RawBackend]:
        """What the Prometheus collector exports, from any thread, taken as ``stats()``
        is (one config's membership, each server in one step, sliced alike, by the
        owner's hub): by backend name (``""``: the ad-hoc pools), ``Backend._raw_stats``.
        Each server's numbers are ``Pool._raw``'s tuple, not a ``ServerStats``: the
        collector's samples are made from those directly."""
        return read_from_any_thread(self, self._raw_stats)

    def _raw_stats(self) -> dict[str, RawBackend]:
        def in_slices(pause: Pacer) -> dict[str, RawBackend] | None:
            return self._capture(_raw_only, Backend._raw_stats, self._adhoc_raw, pause)

        def at_once() -> dict[str, RawBackend]:
            return self._capture(_raw_only, Backend._raw_stats, self._adhoc_raw, None) or {}

        return self._paced(in_slices, at_once)

    def _paced(self, in_slices: Callable[[Pacer], T | None], at_once: Callable[[], T]) -> T:
        """``in_slices(pause)`` when the fleet is big and the caller, in the owner thread,
        may yield (starting over while it returns None, ``_SNAPSHOT_ATTEMPTS`` at most);
        else, or then, ``at_once()``."""
        if (
            self._pool_count() > _stats_config.SNAPSHOT_SLICE_POOLS
            and get_ident() == self._thread_id
            and not _in_listener
        ):
            for _ in range(_SNAPSHOT_ATTEMPTS):
                pause = Pacer(slice_seconds=_stats_config.SNAPSHOT_SLICE_SECONDS)
                if not pause.pauses:  # in the hub itself: one go
                    break
                snapshot = in_slices(pause)
                if snapshot is not None:
                    return snapshot
        return at_once()

    def _pool_count(self) -> int:
        return sum(len(b.pools) for b in self._backends.values()) + len(self._adhoc_order)

    def _membership(self) -> list[Any]:
        """What a snapshot's consistency rests on: each backend with its pool list (a
        reload or discovery answer swaps a backend's list, never edits it), and the
        ad-hoc backends. Never yields."""
        return [*((b, b.pools) for b in self._backends.values()), *self._adhoc_order.values()]

    def _stats_in_slices(self, pause: Pacer) -> ManagerStats | None:
        """The snapshot, yielding between servers once a slice has gone by; None if the
        membership changed during a pause (the caller starts over)."""
        backends = self._capture(_server_stats, Backend._stats_view, self._adhoc_stats, pause)
        return None if backends is None else ManagerStats(backends=backends)

    def _capture(
        self,
        make: Callable[[Raw, int, int], _S],
        view: Callable[[Backend, dict[str, _S], Hits], _B],
        adhoc_view: Callable[[dict[str, _S]], _B],
        pause: Pacer | None,
    ) -> dict[str, _B] | None:
        """Every server's ``make(its Pool._raw capture, owner_hits, fallback_hits)``
        by backend (``Backend._take``: a server's hits read in the same step as the
        rest), each backend made ``view(backend, servers by address, its key-affinity
        hits by address)``; the ad-hoc pools together, ``adhoc_view(servers)``, under
        ``""``. With ``pause``, yields between servers once a slice has gone by and
        returns None if the membership changed during a pause (the caller starts
        over); a backend's own numbers are read with its last server, and nothing
        yields between the last check and the return. Without, in one go: never
        yields."""
        interrupted: Callable[[], bool] | None = None
        if pause is not None:
            membership = self._membership()

            def interrupted() -> bool:  # paused, and a reload or an answer landed meanwhile
                return pause() and not self._same_membership(membership)

        backends: dict[str, _B] = {}
        for name, backend in list(self._backends.items()):
            taken = backend._take(make, interrupted)
            if taken is None:
                return None
            backends[name] = view(backend, *taken)
        adhoc: dict[str, _S] = {}
        for backend in list(self._adhoc_order.values()):
            taken = backend._take(make, interrupted)  # round_robin: no hits
            if taken is None:
                return None
            adhoc.update(taken[0])
        if interrupted is not None and not self._same_membership(membership):  # (no pause)
            return None
        if adhoc:
            backends[""] = adhoc_view(adhoc)
        return backends

    def _same_membership(self, membership: list[Any]) -> bool:
        now = self._membership()
        return len(now) == len(membership) and all(
            a is b or (type(a) is tuple and a[0] is b[0] and a[1] is b[1])
            for a, b in zip(now, membership, strict=True)
        )

    def _adhoc_stats(self, servers: dict[str, ServerStats]) -> BackendStats:
        budget = self._adhoc_budget
        return BackendStats(
            name="",
            strategy="round_robin",
            servers=servers,
            calls=budget.calls,
            retries=budget.retries,
            retries_denied=budget.retries_denied,
        )

    def _adhoc_raw(self, raws: dict[str, Raw]) -> RawBackend:
        return (self._adhoc_stats({}), list(raws.values()), {})

    def _stats_at_once(self) -> ManagerStats:
        """The snapshot in one go. Never yields."""
        backends = self._capture(_server_stats, Backend._stats_view, self._adhoc_stats, None)
        return ManagerStats(backends=backends or {})

    # -- reload -------------------------------------------------------------------
    def reload(self, config: ConfigSource) -> None:
        """Apply a new config live: add, drain removed servers, re-tune the rest.

        ``config`` as for ``PoolManager`` but not None (``ConfigError``: ``{}`` removes
        every backend); an invalid one is a ``ConfigError`` and changes nothing.

        Callers in flight keep working: a removed server stops taking acquisitions
        (its waiters fail over to the backend's other servers, and none is handed its
        connection) and its in-use connections close as they come back.

        A big reload (hundreds of new servers) makes its new pools in slices, yielding
        to the hub between them; the switch itself is one step that never yields, so
        callers see the old membership or the new one, never a mix. Of reloads that
        overlap so, the one called last wins (an earlier one returns without applying).
        """
        self._check_owner()
        if self._closing:
            raise PoolClosed("the manager is closed")
        if config is None:  # PoolManager(None) is an empty config; a reload's None a slip
            raise ConfigError(
                [
                    ConfigProblem(
                        "<config>",
                        None,
                        "",
                        "reload needs a config, got None (to remove every backend, pass {})",
                    )
                ]
            )
        new = _coerce_config(config)
        self._reloads += 1
        mine = self._reloads
        pause = Pacer()
        made: list[tuple[Backend, dict[str, Pool]]] = []
        try:
            for name, bcfg in new.backends.items():
                backend = self._backends.get(name) or Backend(
                    name, bcfg, listeners=self._listeners, on_demand=self._on_demand, owner=self
                )  # a new backend is not seen before the switch
                made.append((backend, backend._fresh_pools(bcfg, pause)))
        except BaseException:
            for _, fresh in made:
                _discard(fresh)
            raise
        if self._closing or self._applied > mine:  # closed, or a later reload applied
            for _, fresh in made:
                _discard(fresh)
            if self._closing:
                raise PoolClosed("the manager is closed")
            return
        # the switch: from here on nothing yields
        self._applied = mine
        removed: list[Pool] = []
        for name in list(self._backends):
            if name not in new.backends:
                self._backends[name].stop_rebuilds()
                self._retire(self._backends[name])
                self._backends[name].notify_change()  # wakes a wait_ready waiting on it
                removed.extend(self._backends.pop(name).pools)
        for backend, fresh in made:
            current = self._backends.get(backend.name)
            if current is not None:  # (an earlier reload may have added it while we made ours)
                backend = current
            self._backends[backend.name] = backend
            removed.extend(backend._apply(new.backends[backend.name], fresh))
            self._follow_dns(backend)
        for key, backend in list(self._adhoc.items()):
            if key == backend.name:
                removed.extend(backend._apply(self._adhoc_config(key)))
        self.config = new
        self._adhoc_budget.reconfigure(new.defaults.retry)
        self._retire_pools(removed)  # in the same step: no waiter is handed a removed server
        self._upkeep.wake()

    def _drain(self, pools: list[Pool]) -> None:
        """Close removed ``pools`` (lending stopped) off the caller's path: one greenlet
        closes the idle ones in slices; a pool with connections in use closes them as
        they come back, for up to ``_DRAIN_TIMEOUT``. Never yields."""
        self._draining = {p for p in self._draining if not p._closed}  # forget closed ones
        if pools:
            self._draining.update(pools)
            self._keep_drainer(gevent.spawn(self._drain_all, pools))  # one, not one a pool
        self._hand_over()

    def _hand_over(self) -> None:
        """DESIGN 22, ``max_size`` per server across reloads: each draining pool's slots
        (connections still in use, dials in flight) count against the pool that serves
        its server now -- same backend, same address; a server removed and added back
        gets a fresh pool, which opens only what the draining one leaves free, and
        each slot that comes back is its again (``Pool._bequeath``). Run after every
        membership change (reload, discovery answer, a new ad-hoc name, a fork's
        subset redrawn), so the link follows the server to its newest pool. Never
        yields; costs one pass over the draining pools (few: they close as their
        connections come back)."""
        if not self._draining:
            return
        serving: dict[str, dict[str, Pool]] = {}  # backend -> address -> its pool
        for old in self._draining:
            if old._closed:
                continue
            heir: Pool | None = None
            if old.backend is None:  # an ad-hoc host:port
                adhoc = self._adhoc_order.get(old.name)
                heir = adhoc.pools[0] if adhoc is not None and adhoc.pools else None
            elif old.backend in self._backends:
                if old.backend not in serving:
                    pools = self._backends[old.backend].pools
                    serving[old.backend] = {p.name: p for p in pools}
                heir = serving[old.backend].get(old.name)
            if heir is old or (heir is not None and heir._closing):
                heir = None
            if heir is not old._heir:
                old._bequeath(heir)

    def _drain_all(self, pools: list[Pool]) -> None:
        _close_all(pools, _DRAIN_TIMEOUT, self._keep_drainer)

    def _keep_drainer(self, g: gevent.Greenlet) -> None:
        self._drainers.add(g)
        g.link(self._drainers.discard)

    def _retire_pools(self, removed: list[Pool]) -> None:
        """Pools a membership change removed: lending stops now (no waiter is handed a
        removed server), then they drain. Never yields."""
        for pool in removed:
            pool.stop_lending()
        self._drain(removed)

    # -- discovery ----------------------------------------------------------------
    def _follow_dns(self, backend: Backend) -> None:
        """Give ``backend`` the discovery runner its config asks for (a new one when the
        target or the nameservers changed: it keeps serving the servers it has until the
        new one answers), or none. Never yields."""
        want = backend.config.discover
        runner = backend.discovery
        if want is None:
            self._retire(backend)
            return
        nameservers = want.parsed_nameservers()
        if runner is not None and (runner.target, runner.nameservers) == (
            want.target,
            nameservers,
        ):
            if (runner.refresh, runner.timeout) != (want.refresh, want.timeout):
                runner.refresh, runner.timeout = want.refresh, want.timeout
                runner.refresh_now()  # the new period starts now, not after the old one
            return
        self._retire(backend)
        self._start_discovery(backend)

    def _start_discovery(self, backend: Backend, inherit: Discovery | None = None) -> None:
        want = backend.config.discover
        assert want is not None
        runner = Discovery(
            want.target,
            refresh=want.refresh,
            timeout=want.timeout,
            nameservers=want.parsed_nameservers(),
            name=backend.name,
        )
        if inherit is not None:  # a forked child: the parent's last good set, until ours
            runner.servers, runner.last_refresh = inherit.servers, inherit.last_refresh
            for flag in ("answered", "attempted"):
                if getattr(inherit, flag).is_set():
                    getattr(runner, flag).set()

        def answer(servers: Servers) -> None:
            self._discovered(backend, runner, servers)

        def error(exc: DiscoveryError) -> None:
            if backend.discovery is runner:
                backend.discovery_error = exc
            self._discovered(backend, runner, None)

        runner.on_answer, runner.on_error = answer, error
        backend.discovery, backend.discovery_error = runner, None
        backend.notify_change()
        runner.start()

    def _retire(self, backend: Backend) -> None:
        """Stop ``backend``'s runner without waiting (close() joins it); whoever waits
        for its answer is woken to look again. Never yields."""
        runner, backend.discovery = backend.discovery, None
        if runner is not None:
            backend.notify_change()
            runner.stop(block=False)
            self._retired = [r for r in self._retired if r.running]
            self._retired.append(runner)

    def _discovered(self, backend: Backend, runner: Discovery, servers: Servers | None) -> None:
        """A resolution of ``runner`` ended (``servers`` None: it failed, the last good
        set stays): apply a good answer as ``reload`` applies a server list."""
        if self._closing or backend.discovery is not runner:
            return  # a runner retired by reload, close or a fork: its answer is stale
        if self._fork_gen != _ownership._fork_generation:
            self._check_owner()  # a forked child: start fresh, with a runner of its own
            return
        if servers is None or not backend._discovered(servers):
            return
        self._retire_pools(backend._apply(backend.config))
        self._upkeep.wake()  # new pools: warm them to min_idle

    def _start_fresh_after_fork(self) -> None:
        """In a forked child: resolve with runners of our own (the parent's, copied
        into this process, are stopped); a random subset is drawn again (this process
        has its own seed). The pools start fresh themselves, on first use."""
        super()._start_fresh_after_fork()
        for backend in list(self._backends.values()):
            inherited = backend.discovery
            if inherited is not None:
                backend.discovery = None
                inherited.stop(block=False)
                self._start_discovery(backend, inherit=inherited)
            sub = backend.config.subset
            if sub is not None and sub.client_id is None:
                self._retire_pools(backend._apply(backend.config))
        self._upkeep.wake()

    # -- closing ------------------------------------------------------------------
    def close(self, timeout: SupportsFloat | None = 5.0) -> None:
        """Refuse new acquisitions, wake waiters, close idle connections now and in-use
        ones as they return; after ``timeout`` close the rest. Leaves no greenlet.

        Calling it again after it finished is harmless; after it was interrupted (a
        ``gevent.Timeout``, a kill) it picks up where it stopped."""
        if self._closed:
            return
        if timeout is not None:
            timeout = valid_timeout(timeout, "close")
        self._check_owner()
        if not self._closing:
            self._closing = True
            self._closing_pools = self._all_pools()
            self._closed_event.set()
            for backend in [*self._backends.values(), *self._adhoc.values()]:
                backend.closed = True
                backend.closed_event.set()
                backend.stop_rebuilds()
                self._retire(backend)
            self._backends.clear()
            self._adhoc.clear()
            self._adhoc_order.clear()
        self._upkeep.stop()  # dies at once: its handlers never block
        for pool in self._closing_pools:  # waiters everywhere fail at once
            pool.stop_lending()
        for runner in self._retired:
            runner.stop()  # a resolution in flight closes its socket
        self._retired.clear()
        closers: list[gevent.Greenlet] = []
        try:
            _close_all(self._closing_pools, timeout, closers.append)
            gevent.joinall(closers)
        finally:
            gevent.killall(closers, block=True)  # only if we were interrupted
        gevent.killall(list(self._drainers), block=True)
        for pool in list(self._draining):
            pool.close(0)  # what the drain had not closed yet, now
        self._draining.clear()
        self._drainers.clear()
        self._closed = True

    def _refusal(self, used_from: int) -> str:
        return "this manager belongs to another thread; use one manager per OS thread"

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> PoolManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PoolManager backends={sorted(self._backends)} adhoc={len(self._adhoc)}>"
