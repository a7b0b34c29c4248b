"""An echo client over two backends, on its own loopback echo servers.

Run: ``python examples/echo_client.py`` (ends by itself in a second or two).

Shows: a config given as data; ``with manager.get("backend") as conn``; many
greenlets sharing the pools; how ``least_active`` and ``weighted`` spread the load;
an ad-hoc ``host:port`` pool; and what ``BackendUnavailable`` says when every server
of a backend is gone.
"""

from __future__ import annotations

import logging
from collections import Counter

import gevent

import lbpool
from lbpool.testing import EchoServer

GREENLETS = 20
REQUESTS_EACH = 50


def echo(manager: lbpool.PoolManager, backend: str, message: bytes) -> tuple[str, bytes]:
    """One request/response; returns (server address, reply)."""
    with manager.get(backend, timeout=2.0) as conn:
        conn.settimeout(2.0)
        conn.sendall(message)
        reply = b""
        while len(reply) < len(message):
            chunk = conn.recv(len(message) - len(reply))
            if not chunk:
                raise ConnectionError("server closed the connection")
            reply += chunk
        return conn.address, reply


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="log %(levelname)s %(name)s: %(message)s")
    cache_servers = [EchoServer().start() for _ in range(3)]
    api_servers = [EchoServer().start() for _ in range(2)]
    config = {
        "defaults": {
            # check_after 0: every borrowed connection is peeked first (a non-blocking
            # syscall), so one whose server went away is never handed out.
            "pool": {"min_idle": 1, "max_size": 8, "check_after": 0},
            "breaker": {"failure_threshold": 2},
        },
        "backends": {
            "cache": {
                "strategy": "least_active",
                "servers": [s.address for s in cache_servers],
            },
            "api": {
                "strategy": "weighted",
                "servers": [
                    {"address": api_servers[0].address, "weight": 2},
                    {"address": api_servers[1].address, "weight": 1},
                ],
            },
        },
    }
    served: Counter[tuple[str, str]] = Counter()
    ok = 0
    try:
        with lbpool.PoolManager(config) as manager:
            manager.wait_ready(timeout=5)

            def client(n: int) -> None:
                nonlocal ok
                for i in range(REQUESTS_EACH):
                    backend = "cache" if (n + i) % 2 else "api"
                    message = f"hello {n}/{i}\n".encode()
                    address, reply = echo(manager, backend, message)
                    assert reply == message, (reply, message)
                    served[(backend, address)] += 1
                    ok += 1

            jobs = [gevent.spawn(client, n) for n in range(GREENLETS)]
            gevent.joinall(jobs, timeout=30, raise_error=True)
            print(f"replies ok: {ok}/{GREENLETS * REQUESTS_EACH}")
            for (name, address), count in sorted(served.items()):
                print(f"  {name:5} {address:21} {count:4} requests")

            # A host:port that is not in the config gets its own pool (default settings).
            adhoc = cache_servers[0].address
            address, reply = echo(manager, adhoc, b"ad hoc\n")
            print(f"ad-hoc pool {adhoc}: {reply!r}")

            stats = manager.stats()
            for name, backend_stats in stats.backends.items():
                for address, s in backend_stats.servers.items():
                    print(
                        f"  stats {name or '(ad hoc)':8} {address:21} acquired={s.acquired} "
                        f"hits={s.hits} misses={s.misses} idle={s.idle} "
                        f"breaker={s.breaker_state}"
                    )

            # Every api server gone: the acquisition fails over across both, then says why.
            for server in api_servers:
                server.stop()
            try:
                echo(manager, "api", b"anyone?\n")
            except lbpool.BackendUnavailable as exc:
                print(f"BackendUnavailable: {exc}")
    finally:
        for server in cache_servers + api_servers:
            server.stop()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
