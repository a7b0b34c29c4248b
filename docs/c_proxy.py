"""Bench C in alternating turns: what the handle's socket proxies cost (issue #18).

Run from outside the repository's root (so ``PYTHONPATH`` can pick the build)::

    python docs/c_proxy.py [TURNS] [SECONDS]      # default 30 turns of 0.5 s

The bench's scenario C (50 greenlets over 10 connections, each ``acquire``, a 64-byte
``sendall`` and its echo read back, ``release``; ``lbpool.cli.bench.scenarios.c_worker``)
against one in-process echo server, three ways, in turns, all in one process:

- ``floor``: the bench's floor pool, raw gevent sockets;
- ``proxy``: ``lbpool.Pool``, I/O through the handle (``conn.sendall``, ``conn.recv``),
  as the bench and a caller do;
- ``raw``: ``lbpool.Pool``, I/O on the pooled socket itself, past the handle (an
  internal attribute: for this measurement only, it skips the handle's stale-borrow
  check).

It prints each one's median req/s and the median of its turns' ratios to the floor's
turn of the same round: ``proxy`` against ``raw`` is what the proxies cost.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import gevent

from lbpool.cli.bench import peers, scenarios
from lbpool.testing import EchoServer, hot_path

GREENLETS = 50
PAYLOAD = b"x" * 64


def _raw(lease: Any) -> Any:
    return lease._conn.sock


def main() -> None:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    print(f"hot path: {hot_path()}; {turns} turns of {seconds} s")
    rates: dict[str, list[float]] = {}
    server = EchoServer().start()
    try:
        with (
            peers.make_adapter("floor", server.address, 10, 5.0) as floor,
            peers.make_adapter("lbpool.Pool", server.address, 10, 5.0) as pool,
        ):
            ways = (("floor", floor, floor.io), ("proxy", pool, pool.io), ("raw", pool, _raw))
            for i in range(turns):
                for name, ad, io_of in ways[i % 3 :] + ways[: i % 3]:
                    scenarios.warm(ad)
                    out = scenarios.contended_round(
                        ad, GREENLETS, seconds, scenarios.c_worker, io_of, PAYLOAD, None
                    )
                    rates.setdefault(name, []).append(out["ops_per_s"])
                    gevent.sleep(0.01)  # the server's handlers of closed sockets end
    finally:
        server.stop()
    for name, values in rates.items():
        ratio = statistics.median(a / b for a, b in zip(values, rates["floor"], strict=True))
        print(f"{name:6} {statistics.median(values):9.0f} req/s  {ratio:.3f}x floor")


if __name__ == "__main__":
    main()
