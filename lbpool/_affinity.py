"""Key-affinity routing: a hashing backend's placement, and each acquisition's key order.

The manager's acquire/failover loop asks a *picker* for the next server to try
(``pick(exclude) -> index into Backend.pools or None``). For the balancing strategies the
picker is the backend's ``Balancer``; for the hashing strategies (``lbpool.hashing``) it
is a :class:`KeyOrder`, made per acquisition from the backend's :class:`Placement`: the
key's owner first, then -- with ``balance.hash_fallback: next`` -- the key's next servers
in its own order, each at most once, skipping servers that are not eligible (breaker
open, a half-open trial in flight) or no longer members (removed by a reload). Nothing
about a breaker rebuilds a table, so a server whose breaker opens loses exactly its own
keys (each to its next server, ``rank`` 1), and gets them back when it closes.

Rebuilds. A ``Placement`` holds ``(table, pools)`` -- a ``HashTable`` and the snapshot of
the pools it was built from -- and swaps the pair in one assignment when a build
finishes. Small builds run inline in ``update``; the others in a build loop greenlet
that is never killed by a membership change: each build finishes and swaps, and the
loop then builds the latest membership (changes coalesce). maglev's table takes
0.1-0.3 s of CPU, so the build pauses (``lbpool._pacing``) for a full turn of the hub's loop
every few milliseconds. Until a new table is in place acquisitions use the old one over
the backend's current pools (``members()``, read live, so a removed server is skipped
at once and a stopped placement never names a stale position), then the current members
it does not know, by rendezvous score. Only a backend's very first table has nothing
before it: an acquisition or ``owner()`` then waits for it, within its deadline.

Counting. ``served(conn)`` sets ``conn.rank`` (0 the owner, 1+ a fallback) and adds one to
that server's ``owner_hits`` or ``fallback_hits``: two ints in a preallocated ``Tally``,
no allocation per acquisition.

Which calls yield: ``Placement.update``, ``stop``, ``first_table``, ``served``,
``KeyOrder.pick`` never; ``Placement.order`` and ``owner`` only while a backend's first
table is being built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from time import monotonic as _monotonic
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from lbpool._pacing import Pacer
from lbpool.balance import eligible
from lbpool.errors import BackendUnavailable, LbpoolError, PoolTimeout
from lbpool.hashing import HASH_STRATEGIES, HashTable, Key, _key_bytes, build_table

if TYPE_CHECKING:
    from lbpool.connection import PooledConnection
    from lbpool.pool import Pool

    # (a table member is still current, the other members' rendezvous table, they)
    _Extras = tuple[bool, HashTable | None, tuple[Pool, ...]]

__all__ = ["KeyOrder", "Placement", "Tally", "check_key", "is_hashing"]

_log = logging.getLogger("lbpool")


def is_hashing(strategy: str) -> bool:
    """Is ``strategy`` a key-affinity (hashing) strategy?"""
    return strategy in HASH_STRATEGIES


def check_key(key: object) -> None:
    """Refuse a bad ``key`` before anything changes; never yields, and allocates only to
    check a non-ASCII str.

    ``TypeError`` unless ``key`` is None, str or bytes; ``ValueError`` for a str with no
    UTF-8 encoding (a lone surrogate): the type is right, the value is not a key (as
    ``str.encode`` itself says, with ``UnicodeEncodeError``, a ``ValueError``).
    """
    if key is None or type(key) is bytes:
        return
    if isinstance(key, str):
        if not key.isascii():
            _key_bytes(key)
        return
    if not isinstance(key, bytes):
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


class Tally:
    """One server's acquisitions served as the key's owner and as a fallback."""

    __slots__ = ("fallback", "owner")

    def __init__(self) -> None:
        self.owner = 0
        self.fallback = 0


# Builds done inline, in ``update`` (never yielding), because they finish within one
# ``SLICE_SECONDS`` and so would not have paused anyway; the new table then routes at
# once, with no pending window. rendezvous: one prefix per server, ~0.5 ms at 1,000
# servers: always. ring_hash: ~0.2 ms per server (40 MD5s, 160 points to sort), so up
# to 16 servers (~3-4 ms). maglev: >= ~100 ms at any size (its 131,071 slots), never.
# An empty membership has nothing to build.
_INLINE_RING_HASH_SERVERS = 16

_Table = tuple[HashTable, tuple["Pool", ...]]


def _inline(strategy: str, servers: int) -> bool:
    return (
        not servers
        or strategy == "rendezvous"
        or (strategy == "ring_hash" and servers <= _INLINE_RING_HASH_SERVERS)
    )


class Placement:
    """A hashing backend's table over a snapshot of its pools, rebuilt off the hot path.

    ``members()`` is the backend's live ``pool -> position in Backend.pools`` map: the
    placement reads it at each step, so an acquisition that began before a reload (even
    one that switched the backend to another strategy and stopped this placement) only
    ever names a current server, by its current position.
    """

    def __init__(self, backend: str, members: Callable[[], Mapping[Pool, int]]) -> None:
        self.backend = backend
        self.fallback = "next"  # balance.hash_fallback
        self._members = members
        # (table, the pools it was built from): one value, swapped in one assignment
        self._current: _Table | None = None
        self._signature: tuple[str, tuple[tuple[str, int], ...]] | None = None
        self._wanted: tuple[str, tuple[Pool, ...]] = ("", ())  # the latest membership
        self._wanted_gen = 0  # bumped by every change of membership or strategy
        self._current_gen = 0  # the change the current table was built for
        self._builder: gevent.Greenlet[..., None] | None = None
        self._built = Event()  # set once the first table is in place, or on stop()
        self._stopped = False
        # (current, members(), (a table member is still current, the others' table,
        # the others)): the servers the table does not know, cached per reload
        self._extras: tuple[object, object, _Extras] | None = None
        self.tallies: dict[str, Tally] = {}  # address -> counts, for the current members

    # -- membership (never yields) -----------------------------------------------
    def update(self, strategy: str, pools: Sequence[Pool], fallback: str) -> None:
        """Follow ``Backend.pools``; rebuild if the membership or strategy changed.

        A running build is never killed: it finishes and swaps its table in (closer to
        the config than the one before it), and the build loop then builds the latest
        membership, coalescing every change made meanwhile. Small builds run inline.
        """
        self.fallback = fallback
        self.tallies = {p.name: self.tallies.get(p.name) or Tally() for p in pools}
        signature = (strategy, tuple((p.name, p.weight) for p in pools))
        if signature == self._signature:
            return
        self._signature = signature
        self._wanted_gen += 1
        self._wanted = (strategy, tuple(pools))
        if not pools and self._current is None:
            # no servers yet (a discovered backend before its first answer): no table,
            # so callers and wait_ready wait for the first one over real servers (an
            # empty one counted as built: keys went by a stand-in order until then)
            return
        if _inline(strategy, len(pools)):
            self._build(self._wanted_gen, strategy, self._wanted[1], None)
        elif self._builder is None and not self._stopped:
            self._builder = gevent.spawn(self._build_loop)

    def _build_loop(self) -> None:
        try:
            while not self._stopped and self._current_gen < self._wanted_gen:
                gen = self._wanted_gen
                strategy, pools = self._wanted
                if not self._build(gen, strategy, pools, Pacer()):
                    return  # logged; the next change tries again
        finally:
            if self._builder is gevent.getcurrent():
                self._builder = None

    def _build(self, gen: int, strategy: str, pools: tuple[Pool, ...], pause: Pacer | None) -> bool:
        try:
            table = build_table(strategy, [(p.name, p.weight) for p in pools], pause=pause)
        except Exception:  # the config was validated: a bug, but never a dead backend
            _log.exception("backend %r: building the %s table failed", self.backend, strategy)
            return False
        if gen > self._current_gen and not self._stopped:  # not overtaken by an inline one
            self._current = (table, pools)  # acquisitions see the old pair or the new one
            self._current_gen = gen
            self._built.set()
        return True

    @property
    def building(self) -> bool:
        """Is a (re)build in progress?"""
        return self._builder is not None

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait until no build is in progress (tests, benchmarks); True if none is."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        return self._builder is None

    def first_table(self) -> Event | None:
        """While the first table is being built, the event set once it is in place (or
        on ``stop()``); None once there is one, or after ``stop()``. Never yields."""
        return self._built if self._current is None and not self._stopped else None

    def stop(self) -> None:
        """End a build in progress (the backend is closing, gone, or no longer hashing);
        waiters for a first table wake at once. Never yields."""
        self._stopped = True
        self._built.set()
        if self._builder is not None:
            self._builder.kill(block=False)
            self._builder = None

    def _table(self, deadline: float, limit: float) -> _Table | None:
        """The current pair; None only once stopped without a table (then the key's
        order is over the current members alone)."""
        current = self._current
        if current is None and not self._stopped:  # the first table is being built
            self._built.wait(max(0.0, deadline - _monotonic()))
            current = self._current
            if current is None and not self._stopped:
                raise PoolTimeout(
                    f"backend {self.backend!r}: no key table within {limit:.3g}s",
                    None,
                    self.backend,
                )
        return current

    def _others(self, current: _Table | None) -> _Extras:
        """For the current pair and members: is any table member still current, and the
        current members the table does not know (with their rendezvous table)."""
        members = self._members()
        cached = self._extras
        if cached is not None and cached[0] is current and cached[1] is members:
            return cached[2]
        known: Set[Pool] = frozenset(current[1]) if current is not None else frozenset()
        others = tuple(p for p in members if p not in known)
        live = any(p in members for p in known)
        table = build_table("rendezvous", [(p.name, p.weight) for p in others]) if others else None
        result = (live, table, others)
        self._extras = (current, members, result)
        return result

    def _walk(self, key: Key, current: _Table | None) -> Iterator[Pool]:
        """The key's servers, each once: the table's order over its pools; then, if the
        walk gets that far (a wait in between may have seen a reload), a newer table's
        order, and the current members no table walked knows (a reload added them and
        their table is pending) by rendezvous score of the key, so a key whose old
        servers are all gone is still served. Callers check membership at use."""
        if current is not None and self._others(current)[0]:
            table, pools = current
            for i in table.order(key):
                yield pools[i]
        seen: set[Pool] = set(current[1]) if current is not None else set()
        while True:  # again only if a reload came while the caller was away
            latest = self._current
            if latest is not None and latest is not current:
                current = latest
                table, pools = latest
                for i in table.order(key):
                    if pools[i] not in seen:
                        seen.add(pools[i])
                        yield pools[i]
            members = self._members()
            _, others_table, others = self._others(current)
            if others_table is not None:
                for i in others_table.order(key):
                    if others[i] not in seen:
                        seen.add(others[i])
                        yield others[i]
            if self._current is current and self._members() is members:
                return

    # -- per acquisition ----------------------------------------------------------
    def order(self, key: Key | None, deadline: float, limit: float) -> KeyOrder:
        """The picker for one acquisition of ``key``; ``ValueError`` without a key."""
        key = self.need_key(key)
        check_key(key)
        current = self._table(deadline, limit)
        return KeyOrder(self, self._walk(key, current), 1 if self.fallback == "none" else -1)

    def need_key(self, key: Key | None) -> Key:
        """``key``, or ``ValueError`` if it is None: this backend routes by key. Never
        yields."""
        if key is None:
            raise ValueError(
                f"backend {self.backend!r} routes by key ({self._strategy()}): "
                "pass key= (str or bytes)"
            )
        return key

    def owner(self, key: Key, deadline: float, limit: float) -> str | None:
        """The key's owner by placement (breakers ignored): the first current member in
        the key's order -- the table's owner, unless a reload changed the membership and
        the new table is not in place yet. None only with no members."""
        check_key(key)
        current = self._table(deadline, limit)
        members = self._members()
        for pool in self._walk(key, current):
            if pool in members:
                return pool.name
        return None

    def _strategy(self) -> str:
        return self._signature[0] if self._signature is not None else "hashing"


class KeyOrder:
    """One acquisition's picker: the key's servers in its own order, each once.

    ``pick(exclude)`` walks forward through the key's order (never back: a server skipped
    or tried is not offered again within this acquisition) and returns the next server
    that is a member *now*, not in ``exclude`` and eligible (or any, with ``panic``
    set), as its position in the backend's pools now (read at the pick, in the same
    step as the caller reads ``Backend.pools``). Servers no longer members are passed
    over uncounted: the rank and ``limit`` (1 for ``hash_fallback: none``, -1 for no
    limit) count current members, so the owner is what ``owner()`` says.
    """

    __slots__ = ("_left", "_placement", "_rank", "_seen", "_walk", "owner", "panic")

    def __init__(self, placement: Placement, walk: Iterator[Pool], limit: int) -> None:
        self._placement = placement
        self._walk = walk
        self._left = limit
        self._seen = 0  # current members of the key's order walked so far
        self._rank = 0  # the position of the last server offered
        self.owner: Pool | None = None  # the key's owner, once walked
        # the backend is in panic mode: breakers are ignored (the key's owner is tried
        # even when open, as Envoy's ring_hash and maglev do in panic)
        self.panic = False

    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        index = self._placement._members()  # live: a reload may have changed the pools
        for pool in self._walk:
            j = index.get(pool)
            if j is None:
                continue
            if not self._left:
                return None
            self._left -= 1
            rank = self._seen
            self._seen = rank + 1
            if rank == 0:
                self.owner = pool
            if j in exclude or not (self.panic or eligible(pool.breaker)):
                continue
            self._rank = rank
            return j
        return None

    def served(self, conn: PooledConnection) -> PooledConnection:
        """Mark ``conn`` with its rank and count it; never yields, never allocates."""
        rank = self._rank
        conn.rank = rank
        tally = self._placement.tallies.get(conn.address)
        if tally is not None:
            if rank:
                tally.fallback += 1
            else:
                tally.owner += 1
        return conn

    def unavailable(self, exc: BackendUnavailable) -> BackendUnavailable:
        """``hash_fallback: none``: the owner could not serve; say which and why."""
        owner = self.owner
        if owner is None:
            return exc
        br = owner.breaker
        address = owner.name
        if owner not in self._placement._members():
            err: BaseException | None = LbpoolError("removed from the backend by a reload")
        else:
            err = exc.errors.get(address) or br.last_failure
            if err is None and not eligible(br):
                err = LbpoolError(f"breaker {br.state}, trial in flight")
        err = err or LbpoolError("cannot serve")
        note = LbpoolError(f"the key's owner (hash_fallback: none): {err}")
        return BackendUnavailable(
            self._placement.backend, {address: note}, {address: br.state}, {address: br.retry_in()}
        )
