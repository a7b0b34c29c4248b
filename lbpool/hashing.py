"""Key-affinity placement: which of a backend's servers owns a key, and who is next.

The hashing strategies of DESIGN.md "Key-affinity routing" (Envoy calls this family
its *hashing* load balancers; the config says ``hash_fallback``), one table class each:

- ``maglev`` (:class:`Maglev`): the lookup table of Eisenbud et al., "Maglev: A Fast
  and Reliable Software Network Load Balancer", NSDI 2016, section 3.4, with Envoy's
  weighted population (``source/extensions/load_balancing_policies/maglev/maglev_lb.cc``).
  O(1) pick: one murmur3 of the key, one table index.
- ``ring_hash`` (:class:`RingHash`): libketama's continuum (last.fm, ``ketama.c``):
  keys land where libketama puts them, so a fleet moving from a ketama client keeps
  its cache. O(log points) pick: one MD5 of the key, one bisect.
- ``rendezvous`` (:class:`Rendezvous`): highest random weight, as pymemcache's
  ``HashClient`` (``pymemcache.client.rendezvous.RendezvousHash``) places keys.
  O(servers) pick: one murmur3 per server.

A table is built from the members' ``(address, weight)`` pairs when membership
changes, never on the hot path, and is immutable afterwards. Per pick it answers
``owner(key)`` (an index into the list it was built from) and ``order(key)`` (the
owner, then the key's fallbacks, each member exactly once). Eligibility is the
caller's: a breaker opening does not rebuild anything; the caller walks ``order(key)``
and skips ineligible indices, so only that server's keys move, and they come back
when it does.

Keys are ``str`` or ``bytes``: bytes as given, str as its UTF-8 encoding (so a str and
its UTF-8 bytes are the same key); anything else is a ``TypeError``, and a str with no
UTF-8 encoding (a lone surrogate) a ``ValueError``. mmh3 is only ever given bytes. Every hash is
MD5, BLAKE2b or murmur3 of those bytes, never Python's ``hash()``, so placement is the
same in every process, machine and Python version.

Building the large tables (maglev: a table of ``MAGLEV_TABLE_SIZE`` slots; ring_hash:
160 points per server, sorted) takes longer than a hub may be blocked, so builders take
``pause``: a callable run between bounded chunks of work (the manager passes
``gevent.sleep`` so upkeep and acquisitions keep running during a rebuild). Lookups
never yield and never allocate more than the key's bytes and a small iterator.

murmur3 comes from the C-backed ``mmh3`` package, imported when the first maglev or
rendezvous table is built, so ``import lbpool`` does not load it.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeAlias

if TYPE_CHECKING:
    Hash32: TypeAlias = Callable[[bytes, int, bool], int]

__all__ = [
    "HASH_STRATEGIES",
    "KETAMA_POINTS",
    "MAGLEV_TABLE_SIZE",
    "HashTable",
    "Key",
    "Maglev",
    "Rendezvous",
    "RingHash",
    "build_table",
    "pymemcache_node",
]

Key: TypeAlias = str | bytes
Pause: TypeAlias = Callable[[], object] | None

# Maglev slots. A prime (the permutations need it), large enough that one server of
# 100 leaving moves <= 1.5% of keys (65,537 moves ~1.56%) and balance stays <= 1.05;
# measured in tests/library/test_hashing.py and docs (131,071 = 2**17 - 1).
MAGLEV_TABLE_SIZE = 131_071
# libketama: 40 MD5 digests per server at equal weight, 4 points per digest.
KETAMA_DIGESTS = 40
KETAMA_POINTS = 4 * KETAMA_DIGESTS
_TWO32 = 4294967296.0
# Units of work (maglev slot probes, ring points made or sorted) between pause() calls:
# ~1 ms of CPython at most (ring_hash's MD5s are the slowest unit), so a build paused by
# the manager never holds the hub for long.
_CHUNK = 512


def _load_mmh3() -> Hash32:
    """``mmh3.hash`` (murmur3 x86 32-bit; unsigned with ``signed=False``), imported late."""
    import mmh3

    return mmh3.hash


def _key_bytes(key: Key) -> bytes:
    """The bytes every strategy hashes: bytes as given, str as UTF-8.

    A str that has no UTF-8 encoding (a lone surrogate such as ``"\\ud800"``, which
    ``json.loads`` makes from untrusted input) is a ``ValueError``: its type is right,
    its value is not a key. Never pass a str to mmh3 (5.3.1 crashes the process on one).
    """
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        try:
            return key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"key must be encodable as UTF-8: {exc.reason} at index {exc.start} of {key!a}"
            ) from None
    if isinstance(key, bytes):
        return bytes(key)
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


def _check_members(servers: Sequence[tuple[str, int]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    addresses = tuple(str(a) for a, _ in servers)
    weights = tuple(w for _, w in servers)
    if len(set(addresses)) != len(addresses):
        dupes = sorted({a for a in addresses if addresses.count(a) > 1})
        raise ValueError(f"duplicate server addresses: {', '.join(dupes)}")
    for address, weight in zip(addresses, weights, strict=True):
        if type(weight) is not int or weight < 1:
            raise ValueError(f"weight of {address} must be an int >= 1, got {weight!r}")
    return addresses, weights


class HashTable(ABC):
    """Key placement over a fixed membership: ``owner(key)`` and ``order(key)``.

    Built from ``servers``, a sequence of ``(address, weight)`` with addresses as
    configured (``host:port``) and weights ints >= 1; indices returned by lookups are
    positions in that sequence. Duplicate addresses or bad weights raise ``ValueError``.
    An empty membership builds an empty table: ``order`` yields nothing and ``owner``
    raises ``LookupError`` (check ``len(table)`` first).
    """

    __slots__ = ("_addresses", "_n", "_weights")

    strategy: ClassVar[str]

    def __init__(self, servers: Sequence[tuple[str, int]], *, pause: Pause = None) -> None:
        self._addresses, self._weights = _check_members(servers)
        self._n = len(self._addresses)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The members' addresses, in the order the table was built from."""
        return self._addresses

    @property
    def weights(self) -> tuple[int, ...]:
        return self._weights

    def __len__(self) -> int:
        return self._n

    @abstractmethod
    def owner(self, key: Key) -> int:
        """Index of the member that owns ``key``; never yields. ``LookupError`` if empty."""

    @abstractmethod
    def order(self, key: Key) -> Iterator[int]:
        """The owner's index, then the key's fallbacks: every member exactly once.

        Lazy: the common case (owner eligible, or one fallback) costs a step or two.
        """

    def _empty(self) -> LookupError:
        return LookupError(f"{self.strategy} table has no servers")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.strategy} over {self._n} servers>"


class Maglev(HashTable):
    """Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4, pseudocode 1).

    Each member gets a permutation of the ``size`` slots (prime): ``offset`` and
    ``skip`` from BLAKE2b-128 of its address (the paper's h1, h2; Envoy uses xxHash64,
    so tables are not Envoy's slot for slot); members take turns claiming their next
    free preferred slot until the table is full. Weights as Envoy's weighted maglev:
    in turn ``t`` (1, 2, ...) a member of weight ``w`` claims a slot only while
    ``t * w >= its target``, the target growing by the largest weight at each claim,
    so slots are shared in proportion to weight. Members are visited in address order,
    so the table does not depend on the order servers are listed in.

    ``owner(key)``: ``table[murmur3_32(key, seed 0) % size]``.

    ``order(key)`` (the documented per-key fallback order): the owner, then the table
    probed from the key's slot with a per-key stride ``skip = murmur3_32(key, seed 1)
    % (size - 1) + 1``: slots ``(h + i * skip) % size`` for i = 1, 2, ..., yielding
    each member the first time it appears. Because ``size`` is prime the probe visits
    every slot, so every member holding a slot is reached; members holding none (only
    possible with extreme weights) follow in address order. A failed owner's keys thus
    spread over the others in proportion to their slots, like keys of a slightly
    different hash, and other keys do not move. Stable across processes (all hashes are
    of bytes, the table depends only on the set of (address, weight)).

    Build: ``size`` slot claims plus probes, about 0.1-0.3 s in CPython at
    ``MAGLEV_TABLE_SIZE``; ``pause`` runs every ``_CHUNK`` probes. With unequal weights
    a member is visited only at the turns it claims in (a heap by next eligible turn),
    so large weight ratios cost no more (1,000 servers, one of weight 10,000: 0.3 s).
    """

    __slots__ = ("_hash", "_rest", "_size", "_table")
    strategy = "maglev"

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        pause: Pause = None,
        size: int = MAGLEV_TABLE_SIZE,
    ) -> None:
        super().__init__(servers, pause=pause)
        if size < 2 or not _is_prime(size):
            raise ValueError(f"maglev table size must be a prime, got {size}")
        self._size = size
        self._hash = _load_mmh3()
        self._table: list[int] = self._populate(pause) if self._n else []
        held = set(self._table)
        self._rest = tuple(
            sorted((i for i in range(self._n) if i not in held), key=self._addresses.__getitem__)
        )

    @property
    def size(self) -> int:
        """Number of slots (a prime)."""
        return self._size

    def slots(self) -> list[int]:
        """Slots held per member (index -> count): the table's shares, for stats and tests."""
        counts = [0] * self._n
        for i in self._table:
            counts[i] += 1
        return counts

    def _populate(self, pause: Pause) -> list[int]:
        m = self._size
        members = sorted(range(self._n), key=self._addresses.__getitem__)
        offsets: list[int] = []
        skips: list[int] = []
        for i in members:
            d = hashlib.blake2b(self._addresses[i].encode("utf-8"), digest_size=16).digest()
            offsets.append(int.from_bytes(d[:8], "little") % m)
            skips.append(int.from_bytes(d[8:], "little") % (m - 1) + 1)
        weights = [self._weights[i] for i in members]
        if min(weights) == max(weights):
            return self._fill_in_turns(members, offsets, skips, pause)
        return self._fill_weighted(members, offsets, skips, weights, pause)

    def _claim(
        self, table: list[int], c: int, skip: int, budget: int, pause: Pause
    ) -> tuple[int, int, int]:
        """Walk a member's permutation from slot ``c`` to its next free slot: (slot,
        steps taken, budget left), pausing inside long walks (the last free slots)."""
        m = self._size
        k = 0
        while table[c] >= 0:
            k += 1
            c += skip
            if c >= m:
                c -= m
            budget -= 1
            if budget <= 0:
                budget = _CHUNK
                if pause is not None:
                    pause()
        return c, k, budget

    def _fill_in_turns(
        self, members: list[int], offsets: list[int], skips: list[int], pause: Pause
    ) -> list[int]:
        """Equal weights: every member claims one slot per turn, in address order."""
        m = self._size
        nexts = [0] * len(members)
        table = [-1] * m
        filled = 0
        budget = _CHUNK
        while True:
            for j, i in enumerate(members):
                c, k, budget = self._claim(
                    table, (offsets[j] + nexts[j] * skips[j]) % m, skips[j], budget, pause
                )
                table[c] = i
                nexts[j] += k + 1
                filled += 1
                if filled == m:
                    return table
                budget -= 1
                if budget <= 0:
                    budget = _CHUNK
                    if pause is not None:
                        pause()

    def _fill_weighted(
        self,
        members: list[int],
        offsets: list[int],
        skips: list[int],
        weights: list[int],
        pause: Pause,
    ) -> list[int]:
        """Envoy's weighted turns: in turn ``t`` a member of weight ``w`` claims a slot
        while ``t * w >= target`` (its target grows by the largest weight per claim);
        members visit in address order within a turn, once each.

        Each member is visited only at a turn where it claims: a heap of (the next turn
        it is eligible in, its address rank), so members that sit a turn out cost
        nothing and turns nobody claims in are jumped over (with weights 1 and 10,000,
        the light members claim once per 10,000 turns). Popping (turn, rank) in order is
        exactly the turn-by-turn, address-order visit, so the table is the one the
        turn loop builds; integers throughout (the next turn is ``ceil(target / w)``,
        and at least the turn after this one).
        """
        m = self._size
        max_w = max(weights)
        nexts = [0] * len(members)
        targets = [0] * len(members)
        table = [-1] * m
        heap = [(1, j) for j in range(len(members))]  # sorted: already a heap
        budget = _CHUNK
        pop = heapq.heappop
        push = heapq.heappush
        for _ in range(m):
            turn, j = pop(heap)
            c, k, budget = self._claim(
                table, (offsets[j] + nexts[j] * skips[j]) % m, skips[j], budget, pause
            )
            table[c] = members[j]
            nexts[j] += k + 1
            target = targets[j] = targets[j] + max_w
            w = weights[j]
            push(heap, (max(turn + 1, -(-target // w)), j))
            budget -= 1
            if budget <= 0:
                budget = _CHUNK
                if pause is not None:
                    pause()
        return table

    def owner(self, key: Key) -> int:
        table = self._table
        if not table:
            raise self._empty()
        return table[self._hash(_key_bytes(key), 0, False) % self._size]

    def order(self, key: Key) -> Iterator[int]:
        if not self._n:
            return iter(())
        kb = _key_bytes(key)
        return self._order(kb, self._table[self._hash(kb, 0, False) % self._size])

    def _order(self, key: bytes, first: int) -> Iterator[int]:
        n = self._n
        yield first
        if n == 1:
            return
        m = self._size
        table = self._table
        seen = {first}
        left = n - 1 - len(self._rest)
        pos = self._hash(key, 0, False) % m
        skip = self._hash(key, 1, False) % (m - 1) + 1
        probes = m - 1
        while left and probes:
            probes -= 1
            pos += skip
            if pos >= m:
                pos -= m
            i = table[pos]
            if i not in seen:
                seen.add(i)
                left -= 1
                yield i
        yield from self._rest


class RingHash(HashTable):
    """libketama's continuum (last.fm ``ketama.c``), placing keys exactly as it does.

    Each member contributes ``ks`` MD5 digests of ``"<address>-<k>"`` (k = 0 .. ks-1),
    each digest 4 points: its bytes 4h..4h+3 read little-endian. ``ks`` is libketama's
    formula evaluated as its C does (``float pct = (float)w / (float)total; ks =
    floorf(pct * 40.0 * (float)n)``, single-precision rounding included): 40 digests
    (160 points) at equal weights, except for the few fleet sizes where the float path
    gives 39 (61, 122, 237, ... servers; the C program agrees, uhashring's integer
    formula does not). A key's hash is the first 4 bytes of MD5(key), little-endian;
    its owner is the first point at or clockwise after it (libketama's search: a hash
    equal to a point belongs to that point), wrapping to the first point. Points that
    collide keep the member listed first (glibc's stable qsort).

    ``order(key)``: the owner, then the next distinct members clockwise; members with
    no points (only with extreme weights) follow in address order.

    Build: one MD5 per 4 points and a bucketed sort; ``pause`` runs between chunks.
    """

    __slots__ = ("_owners", "_points", "_rest")
    strategy = "ring_hash"

    def __init__(self, servers: Sequence[tuple[str, int]], *, pause: Pause = None) -> None:
        super().__init__(servers, pause=pause)
        self._points, self._owners = self._continuum(pause)
        total = sum(self._weights)
        self._rest = tuple(
            sorted(
                (i for i, w in enumerate(self._weights) if not ketama_digests(w, total, self._n)),
                key=self._addresses.__getitem__,
            )
        )

    @property
    def points(self) -> int:
        """Points on the continuum."""
        return len(self._points)

    def _continuum(self, pause: Pause) -> tuple[list[int], list[int]]:
        n = self._n
        if not n:
            return [], []
        total = sum(self._weights)
        shift = max(1, (n - 1).bit_length())
        # A point is (hash << shift) | member: sorting these ints sorts by hash, ties by
        # member index, i.e. stably in list order. Bucketed by the hash's top 8 bits so
        # no single sort of the whole ring blocks the hub.
        buckets: list[list[int]] = [[] for _ in range(256)]
        md5 = hashlib.md5
        budget = _CHUNK
        for i, (address, weight) in enumerate(zip(self._addresses, self._weights, strict=True)):
            prefix = address.encode("utf-8") + b"-"
            for k in range(ketama_digests(weight, total, n)):
                d = md5(prefix + str(k).encode("ascii")).digest()
                for h in range(0, 16, 4):
                    p = int.from_bytes(d[h : h + 4], "little")
                    buckets[p >> 24].append((p << shift) | i)
                budget -= 4  # points
                if budget <= 0:
                    budget = _CHUNK
                    if pause is not None:
                        pause()
        mask = (1 << shift) - 1
        points: list[int] = []
        owners: list[int] = []
        done = 0
        for bucket in buckets:
            bucket.sort()
            points.extend(v >> shift for v in bucket)
            owners.extend(v & mask for v in bucket)
            done += len(bucket)
            bucket.clear()  # free as we go, not all at once on return
            if done >= _CHUNK:
                done = 0
                if pause is not None:
                    pause()
        return points, owners

    def owner(self, key: Key) -> int:
        points = self._points
        if not points:
            raise self._empty()
        h = int.from_bytes(hashlib.md5(_key_bytes(key)).digest()[:4], "little")
        return self._owners[self._at(h)]

    def _at(self, h: int) -> int:
        """Position of the first point >= h, wrapping: libketama's ketama_get_server."""
        pos = bisect_left(self._points, h)
        return 0 if pos == len(self._points) else pos

    def order(self, key: Key) -> Iterator[int]:
        if not self._n:
            return iter(())
        h = int.from_bytes(hashlib.md5(_key_bytes(key)).digest()[:4], "little")
        return self._order(h)

    def _order(self, h: int) -> Iterator[int]:
        points = self._points
        owners = self._owners
        total = len(points)
        pos = self._at(h)
        left = self._n - len(self._rest)
        seen: set[int] = set()
        for step in range(total):
            i = owners[(pos + step) % total]
            if i not in seen:
                seen.add(i)
                yield i
                left -= 1
                if not left:
                    break
        yield from self._rest


class Rendezvous(HashTable):
    """Highest random weight, placing keys exactly as pymemcache's ``HashClient``.

    A member's score for a key is ``murmur3_32("<node>-<key>", seed 0)`` (unsigned);
    the owner has the highest score, and on a tie the greatest node name, as
    ``pymemcache.client.rendezvous.RendezvousHash.get_node``. The node is the name
    pymemcache's ``HashClient`` gives a server, ``"%s:%s" % (host, port)``: the address
    as configured, except that an IPv6 host loses its brackets (``[::1]:11211`` is
    ``::1:11211``, see :func:`pymemcache_node`), so an IPv6 fleet keeps its cache.
    pymemcache hashes the str ``f"{node}-{key}"``: identical for ASCII str keys (and
    for bytes here, which pymemcache would hash as ``"b'...'"``); its pure-Python
    murmur3 reads characters, not UTF-8 bytes, so non-ASCII keys place differently
    there. pymemcache has no weights: with equal weights the scores are its integers;
    with unequal weights a score is ``w / -ln(u)``, ``u = (h + 0.5) / 2**32``
    (logarithmic weighted rendezvous, Schindelhauer and Schomaker 2005), so shares
    follow the weights and the order for equal weights is unchanged.

    ``order(key)``: members by descending score (ties: descending node name).

    Build: trivial. Pick: one murmur3 per member, O(servers).
    """

    __slots__ = ("_by_address", "_hash", "_prefixes", "_scale")
    strategy = "rendezvous"

    def __init__(self, servers: Sequence[tuple[str, int]], *, pause: Pause = None) -> None:
        super().__init__(servers, pause=pause)
        self._hash = _load_mmh3()
        # Scanned in descending node name order, so the first best score is the tie winner.
        nodes = [pymemcache_node(a) for a in self._addresses]
        by_address = sorted(range(self._n), key=nodes.__getitem__, reverse=True)
        self._by_address = tuple(by_address)
        self._prefixes = tuple(nodes[i].encode("utf-8") + b"-" for i in by_address)
        weights = self._weights
        self._scale: tuple[int, ...] | None = (
            tuple(weights[i] for i in by_address) if len(set(weights)) > 1 else None
        )

    def _scores(self, key: Key) -> list[float]:
        kb = _key_bytes(key)
        h = self._hash
        scores: list[float] = [h(p + kb, 0, False) for p in self._prefixes]
        if self._scale is None:
            return scores
        log = math.log
        return [w / -log((s + 0.5) / _TWO32) for w, s in zip(self._scale, scores, strict=True)]

    def owner(self, key: Key) -> int:
        if not self._n:
            raise self._empty()
        scores = self._scores(key)
        return self._by_address[scores.index(max(scores))]

    def order(self, key: Key) -> Iterator[int]:
        if not self._n:
            return iter(())
        scores = self._scores(key)
        ranked = sorted(range(self._n), key=scores.__getitem__, reverse=True)  # stable
        by_address = self._by_address
        return (by_address[r] for r in ranked)


def pymemcache_node(address: str) -> str:
    """The name pymemcache's ``HashClient`` hashes for ``address`` (``host:port``):
    ``"%s:%s" % (host, port)`` of its parsed ``(host, port)``, so an IPv6 host has no
    brackets: ``[::1]:11211`` -> ``::1:11211``; other addresses are unchanged."""
    if address.startswith("["):
        host, sep, port = address[1:].rpartition("]:")
        if sep:
            return f"{host}:{port}"
    return address


def ketama_digests(weight: int, total: int, n: int) -> int:
    """libketama's digests per server, ``floorf(pct * 40.0 * (float)n)``, as C computes it.

    ``pct`` is a C float (IEEE single): the quotient of two floats. The product is a
    double (40.0 is a double literal) and ``floorf`` takes it back to single first.
    Each step is rounded here as there (double rounding is exact for + - * /).
    """
    pct = _f32(_f32(weight) / _f32(total))
    return math.floor(_f32(pct * float(KETAMA_DIGESTS) * _f32(n)))


_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """``x`` rounded to the nearest IEEE single, as a C ``(float)`` cast does."""
    return float(_F32.unpack(_F32.pack(x))[0])


def _is_prime(n: int) -> bool:
    if n < 4:
        return n >= 2
    if n % 2 == 0:
        return False
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


HASH_STRATEGIES: dict[str, type[HashTable]] = {
    cls.strategy: cls for cls in (Maglev, RingHash, Rendezvous)
}


def build_table(
    strategy: str, servers: Sequence[tuple[str, int]], *, pause: Pause = None
) -> HashTable:
    """A table of the named hashing strategy over ``servers`` (``(address, weight)``).

    ``pause`` is called between bounded chunks of a long build (pass ``gevent.sleep``
    to keep the hub responsive). ``ValueError`` for an unknown strategy, duplicate
    addresses or weights below 1.
    """
    try:
        cls = HASH_STRATEGIES[strategy]
    except KeyError:
        known = ", ".join(sorted(HASH_STRATEGIES))
        raise ValueError(f"unknown hashing strategy {strategy!r} (known: {known})") from None
    return cls(servers, pause=pause)
