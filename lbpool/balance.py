"""Balancing strategies: which of a backend's servers the next acquisition goes to.

A balancer holds a snapshot of its members (objects with ``active``, ``weight`` and
``breaker``) and reads their attributes live on each pick. ``pick(exclude)`` returns the
index of an *eligible* member not in ``exclude`` (the servers this acquisition already
tried), or None when there is none. Eligible means the breaker is closed, or half-open
with no trial in flight (the caller then claims the trial with ``allow_dial()``); the
common case costs one attribute read, ``breaker.is_closed``.

On reload, build a new balancer with ``make_balancer``: there is no ``update``; a new
balancer restarts its rotation, which is harmless.

Panic mode (``balance.panic_threshold``, as Envoy's panic threshold) picks with the same
strategy over ``ignoring_health(members)``: the same members seen through a view whose
breaker always reads closed, so a pick there ignores health and the picks over healthy
members cost nothing more.

Picks never yield, so a balancer is safe among greenlets of one hub. Every loop is
bounded by the number of members (or a fixed number of random draws), so a pick never
spins, whatever the breakers and ``exclude`` say.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence, Set
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from lbpool.breaker import Breaker

__all__ = [
    "P2C_THRESHOLD",
    "STRATEGIES",
    "Balancer",
    "LeastActive",
    "Member",
    "RandomChoice",
    "RoundRobin",
    "Weighted",
    "eligible",
    "ignoring_health",
    "make_balancer",
]

HALF_OPEN = "half_open"

# least_active scans exactly up to this many members; above it, power of two choices.
P2C_THRESHOLD = 8
# Random draws before least_active / random give up sampling and scan: many ineligible.
_P2C_DRAWS = 8
_RANDOM_DRAWS = 4
# Longest precomputed weighted schedule (entries); larger weight sums walk in O(n).
_MAX_SCHEDULE = 10_000


class Member(Protocol):
    """What a balancer needs of a server (the Pool satisfies it)."""

    @property
    def active(self) -> int: ...  # connections in use + dials pending

    @property
    def weight(self) -> int: ...

    @property
    def breaker(self) -> Breaker: ...


def _trial_open(breaker: Breaker) -> bool:
    """The slow half of eligibility, for a breaker that is not closed."""
    return breaker.state == HALF_OPEN and not breaker.trial_in_flight


def eligible(breaker: Breaker) -> bool:
    """May a new acquisition be routed to this breaker's server?"""
    return breaker.is_closed or _trial_open(breaker)


class _AlwaysClosed:
    """A breaker stand-in that reads closed: what a panic-mode pick sees."""

    __slots__ = ()
    is_closed = True
    state = "closed"
    trial_in_flight = False


_ALWAYS_CLOSED = _AlwaysClosed()


class _HealthBlind:
    """A member seen with its breaker ignored (panic mode); activity and weight live."""

    __slots__ = ("_member",)

    def __init__(self, member: Member) -> None:
        self._member = member

    @property
    def active(self) -> int:
        return self._member.active

    @property
    def weight(self) -> int:
        return self._member.weight

    @property
    def breaker(self) -> Breaker:
        return _ALWAYS_CLOSED  # type: ignore[return-value]  # duck-typed: is_closed, state


def ignoring_health(members: Sequence[Member]) -> list[Member]:
    """``members`` (same order) whose breakers read closed: build a panic-mode balancer
    on them, and its picks ignore health while activity and weights stay live."""
    return [_HealthBlind(m) for m in members]


class Balancer(ABC):
    """Base: a snapshot of the members, and ``pick``."""

    __slots__ = ("_members", "_n", "_random")

    strategy: ClassVar[str]

    def __init__(self, members: Sequence[Member], rng: random.Random | None = None) -> None:
        self._members: tuple[Member, ...] = tuple(members)
        self._n = len(self._members)
        self._random: Callable[[], float] = (rng or random).random  # random.random: global

    @property
    def members(self) -> tuple[Member, ...]:
        return self._members

    def __len__(self) -> int:
        return self._n

    @abstractmethod
    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        """Index of an eligible member not in ``exclude``, or None when there is none."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.strategy} over {self._n} members>"


class RoundRobin(Balancer):
    """Cycle through eligible members; O(1) per pick while they are all eligible."""

    __slots__ = ("_next",)
    strategy = "round_robin"

    def __init__(self, members: Sequence[Member], rng: random.Random | None = None) -> None:
        super().__init__(members, rng)
        self._next = 0

    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        members = self._members
        n = self._n
        i = self._next
        left = n
        while left:
            left -= 1
            j = i
            i += 1
            if i == n:
                i = 0
            if j in exclude:
                continue
            b = members[j].breaker
            if b.is_closed or _trial_open(b):
                self._next = i
                return j
        return None


class LeastActive(Balancer):
    """Fewest active connections, ties round-robin.

    Up to ``P2C_THRESHOLD`` members a scan is cheapest and exact. Above it, power of two
    choices (two distinct random eligible members, take the less active) keeps the cost
    per pick constant and the load within a few connections of even; only when random
    draws keep landing on ineligible or excluded members does it fall back to a scan.
    """

    __slots__ = ("_next",)
    strategy = "least_active"

    def __init__(self, members: Sequence[Member], rng: random.Random | None = None) -> None:
        super().__init__(members, rng)
        self._next = 0

    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        n = self._n
        if n <= P2C_THRESHOLD:
            return self._scan(exclude)
        members = self._members
        rnd = self._random
        first = -1
        draws = _P2C_DRAWS
        while draws:
            draws -= 1
            i = int(rnd() * n)  # < n for any n below 2**53
            if i == first or i in exclude:
                continue
            b = members[i].breaker
            if not (b.is_closed or _trial_open(b)):
                continue
            if first < 0:
                first = i
                continue
            return first if members[first].active <= members[i].active else i
        if first >= 0:  # only one eligible member found among the draws
            return first
        return self._scan(exclude)

    def _scan(self, exclude: Set[int]) -> int | None:
        """Exact: the first least-active eligible member in rotation order from ``_next``."""
        members = self._members
        n = self._n
        i = self._next
        best = -1
        best_active = 0
        left = n
        while left:
            left -= 1
            j = i
            i += 1
            if i == n:
                i = 0
            if j in exclude:
                continue
            m = members[j]
            b = m.breaker
            if b.is_closed or _trial_open(b):
                a = m.active
                if best < 0 or a < best_active:
                    best = j
                    best_active = a
                    if a <= 0:  # nothing can beat it; first in rotation wins the tie
                        break
        if best < 0:
            return None
        self._next = best + 1 if best + 1 < n else 0
        return best


class Weighted(Balancer):
    """Smooth weighted round-robin, as nginx: spreads a heavy member's turns out.

    Each pick adds every eligible member's weight to its current value, takes the
    largest (first on ties) and subtracts the eligible total from it. Weights {5,1,1}
    give a a b a c a a. Ineligible and excluded members neither gain nor lose.

    That is O(n) a pick, so while every member is eligible the same sequence is
    replayed from a schedule computed once (one period: the sum of the weights, up to
    ``_MAX_SCHEDULE``), which is O(1); the live O(n) walk runs only around open
    breakers and exclusions.
    """

    __slots__ = ("_current", "_pos", "_schedule")
    strategy = "weighted"

    def __init__(self, members: Sequence[Member], rng: random.Random | None = None) -> None:
        super().__init__(members, rng)
        self._current = [0] * self._n
        self._schedule = self._precompute()
        self._pos = 0

    def _precompute(self) -> list[int]:
        weights = [m.weight for m in self._members]
        total = sum(weights)
        if not weights or total > _MAX_SCHEDULE:
            return []
        current = [0] * len(weights)
        schedule = []
        for _ in range(total):
            best = 0
            for i, w in enumerate(weights):
                current[i] += w
                if current[i] > current[best]:
                    best = i
            current[best] -= total
            schedule.append(best)
        return schedule

    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        schedule = self._schedule
        if schedule and not exclude:
            pos = self._pos
            i = schedule[pos]
            if self._members[i].breaker.is_closed:
                self._pos = pos + 1 if pos + 1 < len(schedule) else 0
                return i
        return self._walk(exclude)

    def _walk(self, exclude: Set[int]) -> int | None:
        members = self._members
        current = self._current
        total = 0
        best = -1
        best_current = 0
        for i in range(self._n):
            if i in exclude:
                continue
            m = members[i]
            b = m.breaker
            if not (b.is_closed or _trial_open(b)):
                continue
            w = m.weight
            c = current[i] + w
            current[i] = c
            total += w
            if best < 0 or c > best_current:
                best = i
                best_current = c
        if best < 0:
            return None
        current[best] = best_current - total
        return best


class RandomChoice(Balancer):
    """Uniform over eligible members: rejection sampling, then an exact draw.

    Each branch is uniform over the eligible set, so the whole is; the scan only runs
    when a few draws in a row hit ineligible or excluded members.
    """

    __slots__ = ()
    strategy = "random"

    def pick(self, exclude: Set[int] = frozenset()) -> int | None:
        n = self._n
        if not n:
            return None
        members = self._members
        rnd = self._random
        draws = _RANDOM_DRAWS
        while draws:
            draws -= 1
            i = int(rnd() * n)
            if i in exclude:
                continue
            b = members[i].breaker
            if b.is_closed or _trial_open(b):
                return i
        candidates = [i for i in range(n) if i not in exclude and eligible(members[i].breaker)]
        if not candidates:
            return None
        return candidates[int(rnd() * len(candidates))]


STRATEGIES: dict[str, type[Balancer]] = {
    cls.strategy: cls for cls in (RoundRobin, LeastActive, Weighted, RandomChoice)
}


def make_balancer(
    strategy: str, members: Sequence[Member], *, rng: random.Random | None = None
) -> Balancer:
    """A balancer of the named strategy over ``members`` (``rng``: for reproducible tests)."""
    try:
        cls = STRATEGIES[strategy]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown strategy {strategy!r} (known: {known})") from None
    return cls(members, rng)
