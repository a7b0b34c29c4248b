"""lbpool.subset: the SRE book's deterministic subsetting and the per-process random
subset -- balance across clients, stability, and how few clients a membership change
moves (the figures printed here are the ones docs/internals.md quotes)."""

from __future__ import annotations

import os
import random
import statistics
from collections import Counter
from collections.abc import Callable

import pytest

from lbpool import subset as subset_module
from lbpool.subset import (
    deterministic_subset,
    process_seed,
    random_subset,
    stable_shuffle,
    subset,
)
from tests.support.procs import reap_child


def servers(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250}:6379" for i in range(n)]


def clients_per_server(subsets: list[list[str]], addresses: list[str]) -> list[int]:
    counts = Counter(a for s in subsets for a in s)
    return [counts.get(a, 0) for a in addresses]


def test_the_sre_book_algorithm_step_by_step() -> None:
    addresses = servers(12)
    size, client_id = 3, 9
    subset_count = 12 // 3  # 4 subsets per round
    round_ = client_id // subset_count  # clients 8..11 are round 2
    shuffled = stable_shuffle(sorted(addresses), round_)
    subset_id = client_id % subset_count
    expected = shuffled[subset_id * size : subset_id * size + size]
    assert deterministic_subset(addresses, size, client_id) == expected


def test_the_shuffle_is_pinned() -> None:
    """The order every client of a round must agree on, on any host, Python or process:
    a change here would split a fleet running two lbpool versions."""
    assert stable_shuffle(["a", "b", "c", "d", "e"], 0) == stable_shuffle(
        ["e", "d", "c", "b", "a"], 0
    )
    assert stable_shuffle(["a", "b", "c", "d", "e"], 0) == ["e", "c", "b", "a", "d"]
    assert stable_shuffle(["a", "b", "c", "d", "e"], 1) == ["d", "a", "c", "b", "e"]


def test_input_order_does_not_matter_and_size_caps() -> None:
    addresses = servers(20)
    shuffled = random.Random(5).sample(addresses, len(addresses))
    for client_id in range(10):
        assert deterministic_subset(addresses, 4, client_id) == deterministic_subset(
            shuffled, 4, client_id
        )
    assert sorted(deterministic_subset(addresses, 50, 3)) == sorted(addresses)
    assert sorted(random_subset(addresses, 20)) == sorted(addresses)
    with pytest.raises(ValueError, match="size"):
        deterministic_subset(addresses, 0, 1)
    with pytest.raises(ValueError, match="client_id"):
        deterministic_subset(addresses, 3, -1)
    with pytest.raises(ValueError, match="duplicate"):
        random_subset(["a:1", "a:1"], 1)


@pytest.mark.parametrize(
    ("n", "size", "clients"),
    [(100, 10, 300), (100, 10, 37), (12, 3, 40), (30, 5, 6), (9, 9, 5), (64, 8, 1000)],
)
def test_deterministic_balance_within_one_client_when_size_divides(
    n: int, size: int, clients: int
) -> None:
    addresses = servers(n)
    subsets = [deterministic_subset(addresses, size, c) for c in range(clients)]
    assert all(len(s) == size and len(set(s)) == size for s in subsets)
    counts = clients_per_server(subsets, addresses)
    assert max(counts) - min(counts) <= 1, counts
    if clients % (n // size) == 0:
        assert max(counts) == min(counts) == clients * size // n


def test_the_issue_figure_300_clients_100_servers_size_10() -> None:
    addresses = servers(100)
    counts = clients_per_server(
        [deterministic_subset(addresses, 10, c) for c in range(300)], addresses
    )
    assert set(counts) == {30}


@pytest.mark.parametrize(("n", "size"), [(10, 3), (103, 10), (100, 7), (12, 5)])
def test_deterministic_spread_when_size_does_not_divide(n: int, size: int) -> None:
    """Each round leaves ``n % size`` servers out, a different few each round: within
    one round the spread is still <= 1; over many rounds it grows slowly (recorded)."""
    addresses = servers(n)
    subset_count = n // size
    one_round = [deterministic_subset(addresses, size, c) for c in range(subset_count)]
    counts = clients_per_server(one_round, addresses)
    assert max(counts) - min(counts) <= 1
    clients = subset_count * 100
    counts = clients_per_server(
        [deterministic_subset(addresses, size, c) for c in range(clients)], addresses
    )
    mean = statistics.mean(counts)
    print(
        f"n={n} size={size} clients={clients}: max-min {max(counts) - min(counts)}, "
        f"max/mean {max(counts) / mean:.3f}"
    )
    assert max(counts) / mean < 1.15  # a few percent in practice


def churn(
    pick: Callable[[list[str], int], list[str]], before: list[str], after: list[str], clients: int
) -> tuple[float, float]:
    """(share of clients whose subset changed, servers replaced per client on average)."""
    changed = replaced = 0
    for c in range(clients):
        old, new = set(pick(before, c)), set(pick(after, c))
        changed += old != new
        replaced += len(old - new)
    return changed / clients, replaced / clients


def test_membership_change_moves_few_clients() -> None:
    seeds = [random.Random(i).randbytes(16) for i in range(300)]

    def det(a: list[str], c: int) -> list[str]:
        return deterministic_subset(a, 10, c)

    def rnd(a: list[str], c: int) -> list[str]:
        return random_subset(a, 10, seeds[c])

    base = servers(105)  # 10 subsets per round, before and after one change
    added, removed = servers(106), base[:52] + base[53:]
    figures = {}
    for name, pick in (("deterministic", det), ("random", rnd)):
        figures[name, "add"] = churn(pick, base, added, 300)
        figures[name, "remove"] = churn(pick, base, removed, 300)
    # The regrouping case: 100 -> 99 servers changes len // size from 10 to 9.
    figures["deterministic", "regroup"] = churn(det, servers(100), servers(99), 300)
    for key, (share, replaced) in figures.items():
        print(f"{key}: {share:.0%} of clients change, {replaced:.2f} servers each")
    # Deterministic, same subset_count: about half the clients, one server each.
    for change in ("add", "remove"):
        share, replaced = figures["deterministic", change]
        assert share < 0.7 and replaced == share
        # Rendezvous: only subsets the server enters or leaves, ~size/n of them.
        share, replaced = figures["random", change]
        assert share < 0.2 and replaced == share
    assert figures["deterministic", "regroup"][0] > 0.9  # the SRE scheme's known cost


def test_random_subset_is_stable_per_process_and_spread_like_uniform_choice() -> None:
    addresses = servers(100)
    assert random_subset(addresses, 10) == random_subset(list(reversed(addresses)), 10)
    assert process_seed() == process_seed()
    rng = random.Random(15)
    ratios_rendezvous, ratios_uniform = [], []
    for _ in range(20):
        subsets = [random_subset(addresses, 10, rng.randbytes(16)) for _ in range(300)]
        counts = clients_per_server(subsets, addresses)
        ratios_rendezvous.append(max(counts) / statistics.mean(counts))
        uniform = [rng.sample(addresses, 10) for _ in range(300)]
        counts = clients_per_server(uniform, addresses)
        ratios_uniform.append(max(counts) / statistics.mean(counts))
    r, u = statistics.mean(ratios_rendezvous), statistics.mean(ratios_uniform)
    print(f"largest/mean clients per server: rendezvous {r:.2f}, independent uniform {u:.2f}")
    assert abs(r - u) < 0.15


def test_a_forked_child_draws_its_own_seed() -> None:
    parent = process_seed()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its seed and leave at once
        try:
            os.write(write, process_seed())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64)
    finally:
        os.close(read)
        reap_child(pid)
    assert len(child) == 16 and child != parent
    assert process_seed() == parent


def test_a_copied_seed_is_redrawn_when_the_pid_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = process_seed()
    monkeypatch.setattr(subset_module, "_seed", (os.getpid() + 1, seed))
    assert process_seed() != seed


def test_subset_keeps_weights_and_order() -> None:
    pairs = [(a, i + 1) for i, a in enumerate(servers(12))]
    kept = subset(pairs, 3, client_id=4)
    assert len(kept) == 3 and all(p in pairs for p in kept)
    assert kept == [p for p in pairs if p in kept]
    assert {a for a, _ in kept} == set(deterministic_subset(servers(12), 3, 4))
    assert {a for a, _ in subset(pairs, 3)} == set(random_subset(servers(12), 3))
