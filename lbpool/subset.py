"""Subsetting: each client process uses at most ``size`` of a backend's servers.

Two modes, both pure functions of the membership (never yield, no I/O):

``deterministic_subset(addresses, size, client_id)`` -- the SRE book's deterministic
subsetting (Site Reliability Engineering, ch. 20, "Load Balancing in the
Datacenter")::

    subset_count = len(backends) // size
    round = client_id // subset_count       # clients of one round share one shuffle
    shuffled = shuffle(backends, seed=round)
    subset_id = client_id % subset_count
    subset = shuffled[subset_id * size:(subset_id + 1) * size]

The backends are the addresses in sorted order (so input order never matters).
The shuffle is this module's own, stable by construction across Python versions,
processes and hosts: the backends ordered by ``blake2b(f"{round}:{address}")``
(8-byte digest, address as tiebreak) -- a uniformly random permutation per round,
seeded by the round alone. ``random.Random(round).shuffle`` is not used: Python
documents only ``random()`` as reproducible across versions, not ``shuffle``; and a
hash order moves few clients when a server joins or leaves within the same
``subset_count`` (the newcomer slides into one place of each round's order, instead
of every round's order being reshuffled).

Balance: when ``size`` divides the number of servers, each round hands every server to
exactly one client, so over clients 0..M-1 (any M) the clients per server differ by
at most one. When it does not, each round leaves ``len % size`` servers out -- a
different few each round -- so the spread grows slowly with the number of rounds
(measured in tests/library/test_subset.py; documented in docs/reliability.md).
Churn: while ``len // size`` is unchanged, an added or removed server changes about
half the clients' subsets, by one server each; when ``len // size`` changes, rounds
regroup and most subsets change (the SRE scheme's known cost).

``random_subset(addresses, size, seed=None)`` -- the ``size`` addresses with the
highest ``blake2b(address, key=seed)`` (rendezvous hashing on a per-process id):
stable for the life of the process, a different draw per process. A joining server
enters a subset only if it ranks in its top ``size``; a leaving one changes only the
subsets it was in. The default seed is ``process_seed()``: 16 random bytes drawn per
process, drawn again in a forked child (``os.register_at_fork``, and a pid check for
forks that skip the hooks).

``subset(servers, size, client_id=None)`` applies either to ``(address, weight)``
pairs (the shape of a ``servers:`` list or a discovery answer): weights ride along,
they do not bias the choice. ``size >= len(servers)`` keeps every server.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence

__all__ = ["deterministic_subset", "process_seed", "random_subset", "subset"]


def _check(addresses: Sequence[str], size: int) -> list[str]:
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    ordered = sorted(addresses)
    if len(set(ordered)) != len(ordered):
        raise ValueError("duplicate address in the servers to subset")
    return ordered


def stable_shuffle(addresses: Sequence[str], seed: int) -> list[str]:
    """The addresses in the order of ``blake2b(f"{seed}:{address}")`` (ties: address):
    a uniformly random permutation for each seed, the same everywhere."""

    def key(address: str) -> tuple[bytes, str]:
        digest = hashlib.blake2b(f"{seed}:{address}".encode(), digest_size=8).digest()
        return (digest, address)

    return sorted(addresses, key=key)


def deterministic_subset(addresses: Sequence[str], size: int, client_id: int) -> list[str]:
    """The SRE book's subset of ``client_id`` (int >= 0), in the round's shuffled
    order; every address when ``size >= len(addresses)``."""
    if client_id < 0:
        raise ValueError(f"client_id must be >= 0, got {client_id}")
    ordered = _check(addresses, size)
    if size >= len(ordered):
        return ordered
    subset_count = len(ordered) // size
    round_ = client_id // subset_count
    shuffled = stable_shuffle(ordered, round_)
    subset_id = client_id % subset_count
    start = subset_id * size
    return shuffled[start : start + size]


_seed: tuple[int, bytes] | None = None  # (pid that drew it, the seed)


def _forget_seed() -> None:
    global _seed
    _seed = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_seed)


def process_seed() -> bytes:
    """16 random bytes, drawn once per process (a forked child draws its own)."""
    global _seed
    pid = os.getpid()
    if _seed is None or _seed[0] != pid:
        _seed = (pid, secrets.token_bytes(16))
    return _seed[1]


def random_subset(addresses: Sequence[str], size: int, seed: bytes | None = None) -> list[str]:
    """The ``size`` addresses ranking highest by ``blake2b(address, key=seed)``
    (default ``process_seed()``), highest first."""
    ordered = _check(addresses, size)
    key = process_seed() if seed is None else seed

    def score(address: str) -> bytes:
        return hashlib.blake2b(address.encode(), key=key[:64], digest_size=8).digest()

    return sorted(ordered, key=lambda a: (score(a), a), reverse=True)[:size]


def subset(
    servers: Sequence[tuple[str, int]], size: int, client_id: int | None = None
) -> list[tuple[str, int]]:
    """The ``(address, weight)`` pairs kept, in the order given: deterministic with a
    ``client_id``, the process's random subset without."""
    addresses = [address for address, _ in servers]
    if client_id is None:
        kept = set(random_subset(addresses, size))
    else:
        kept = set(deterministic_subset(addresses, size, client_id))
    return [pair for pair in servers if pair[0] in kept]
