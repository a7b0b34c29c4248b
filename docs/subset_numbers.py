"""Subset balance and churn: 300 clients, 100 servers, k=10 (docs/reliability.md)."""

import random
import statistics
from collections import Counter

from lbpool.subset import deterministic_subset, random_subset

M, N, K = 300, 100, 10
servers = [f"10.0.{i // 250}.{i % 250 + 1}:11211" for i in range(N)]


def spread(subsets):
    load = Counter(a for s in subsets for a in s)
    counts = [load.get(a, 0) for a in servers]
    return min(counts), max(counts), max(counts) / statistics.mean(counts)


det = [deterministic_subset(servers, K, c) for c in range(M)]
lo, hi, ratio = spread(det)
print(f"deterministic: min {lo} max {hi} largest/mean {ratio:.2f}")

seeds = [random.Random(c).randbytes(16) for c in range(M)]  # one process seed per client
rnd = [random_subset(servers, K, s) for s in seeds]
lo, hi, ratio = spread(rnd)
print(f"random (rendezvous on a per-process seed): min {lo} max {hi} largest/mean {ratio:.2f}")
trials = 200
ratios = []
for t in range(trials):
    rng = random.Random(1000 + t)
    ratios.append(spread([rng.sample(servers, K) for _ in range(M)])[2])
rnd_ratios = []
for t in range(trials):
    rng = random.Random(5000 + t)
    ss = [rng.randbytes(16) for _ in range(M)]
    rnd_ratios.append(spread([random_subset(servers, K, s) for s in ss])[2])
print(
    f"independent uniform choice, {trials} trials: largest/mean mean "
    f"{statistics.mean(ratios):.2f} (range {min(ratios):.2f}..{max(ratios):.2f})"
)
print(
    f"lbpool random, {trials} trials: largest/mean mean {statistics.mean(rnd_ratios):.2f} "
    f"(range {min(rnd_ratios):.2f}..{max(rnd_ratios):.2f})"
)


def churn(before, after):
    return sum(1 for x, y in zip(before, after, strict=False) if set(x) != set(y)) / len(before)


added = [*servers, "10.0.9.9:11211"]
removed = servers[:57] + servers[58:]
for label, other in (("added", added), ("removed", removed)):
    d2 = [deterministic_subset(other, K, c) for c in range(M)]
    r2 = [random_subset(other, K, s) for s in seeds]
    print(
        f"one server {label}: deterministic {churn(det, d2):.0%} of clients change subset, "
        f"random {churn(rnd, r2):.0%}"
    )
# deterministic, where len // k does not change (105 -> 106 servers)
base = servers + [f"10.0.8.{i}:11211" for i in range(1, 6)]
b0 = [deterministic_subset(base, K, c) for c in range(M)]
b1 = [deterministic_subset([*base, "10.0.9.9:11211"], K, c) for c in range(M)]
b2 = [deterministic_subset(base[:-1], K, c) for c in range(M)]
print(
    f"105 servers, one added (len//k stays 10): deterministic {churn(b0, b1):.0%}; "
    f"one removed: {churn(b0, b2):.0%}"
)
