"""A sharded memcached cache over three real ``memcached`` processes, routed by key.

Run: ``python examples/memcached_sharded.py`` (needs ``memcached`` on PATH, Debian
package ``memcached``; ends by itself in a few seconds and stops the servers it started).

Shows: a ``maglev`` backend, so each key lives on one server (its owner) and every
request for it goes there: ``manager.get("cache", key=key)`` with the memcached text
protocol spoken over the borrowed connection. 10,000 keys are SET, then read back by
many greenlets; midway one memcached is killed. Its keys fall back to their next server
in the key's own order (``conn.rank`` 1): a cache miss there, refilled the way a
cache-aside client does; no other key moves and no request fails (a request whose
connection died is retried once by ``manager.call`` on a fresh acquisition, which falls back).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from collections import Counter
from time import monotonic
from typing import Any

import gevent
from gevent import subprocess
from gevent.event import Event

import lbpool

CONFIG = """
defaults:
  pool: {{min_idle: 1, max_size: 8, acquire_timeout: 2s, check_after: 0s}}
  dial: {{timeout: 500ms}}
  breaker: {{failure_threshold: 1, recovery_timeout: 30s}}
backends:
  cache:
    strategy: maglev          # key-affinity: get() needs key=
    balance: {{hash_fallback: next}}
    servers: [{servers}]
"""

KEYS = 10_000
GREENLETS = 20
KILL_AFTER = 3_000  # GETs done before one server is killed


# ------------------------------------------------------------------ memcached text protocol


class Reader:
    """Reads one reply; a request/response protocol never over-reads."""

    def __init__(self, conn: lbpool.PooledConnection) -> None:
        self.conn = conn
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data


def mc_set(conn: lbpool.PooledConnection, key: str, value: bytes) -> None:
    conn.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value))
    reply = Reader(conn).line()
    if reply != b"STORED":
        raise ValueError(f"set {key}: {reply!r}")


def mc_get(conn: lbpool.PooledConnection, key: str) -> bytes | None:
    conn.sendall(b"get %s\r\n" % key.encode())
    reader = Reader(conn)
    line = reader.line()
    if line == b"END":
        return None
    parts = line.split()
    if len(parts) != 4 or parts[0] != b"VALUE":
        raise ValueError(f"get {key}: {line[:60]!r}")  # out of step: discard the connection
    value = reader.exact(int(parts[3]))
    if reader.line() != b"END":
        raise ValueError(f"get {key}: no END")
    return value


RETRIED = Counter[str]()


def request(manager: lbpool.PoolManager, key: str, fn: Any, *args: Any) -> tuple[Any, str, int]:
    """``fn(conn, key, *args)`` on the key's server: (result, server, rank). A dead
    connection is discarded (its breaker hears of it) and the request retried once by
    ``manager.call``, on the key's owner again or, if it tripped, its fallback."""
    died: list[BaseException] = []

    def attempt(conn: lbpool.PooledConnection) -> tuple[Any, str, int]:
        if died:
            RETRIED[type(died[-1]).__name__] += 1
        conn.settimeout(2.0)
        try:
            return fn(conn, key, *args), conn.address, conn.rank
        except OSError as exc:
            died.append(exc)
            raise

    return manager.call("cache", attempt, key=key)


# ------------------------------------------------------------------ memcached processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Memcached:
    """``memcached`` on a loopback port, 64 MB, TCP only; ready once it accepts."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> Memcached:
        binary = shutil.which("memcached") or "memcached"
        for _ in range(attempts):
            self.port = _free_port()
            args = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64"]
            if os.geteuid() == 0:
                args += ["-u", "root"]  # memcached refuses to run as root without it
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = monotonic() + 10
            while self.proc.poll() is None and monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    gevent.sleep(0.02)  # not listening yet
            self.stop()  # exited (port taken between choosing and binding?) or too slow
        raise RuntimeError("memcached did not start")

    def kill(self) -> None:
        """SIGKILL: the way a crashed server goes (the kernel closes its sockets)."""
        self.proc.kill()
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# ------------------------------------------------------------------ the example


def main() -> int:
    logging.basicConfig(level=logging.ERROR, format="log %(levelname)s %(name)s: %(message)s")
    if shutil.which("memcached") is None:
        print("memcached is not installed (e.g. apt-get install memcached)")
        return 2
    workdir = tempfile.mkdtemp(prefix="lbpool-memcached-")
    servers: list[Memcached] = []
    try:
        servers = [Memcached().start() for _ in range(3)]
        print("memcached servers: " + ", ".join(s.address for s in servers), flush=True)
        path = os.path.join(workdir, "memcached.yaml")
        with open(path, "w") as handle:
            handle.write(CONFIG.format(servers=", ".join(s.address for s in servers)))
        keys = [f"user:{i}" for i in range(KEYS)]

        with lbpool.PoolManager.from_yaml(path) as manager:
            manager.wait_ready(timeout=5)
            owners = {key: manager.owner("cache", key) for key in keys}

            # 1. SET every key: each goes to its owner
            stored: Counter[str] = Counter()

            def setter(part: list[str]) -> None:
                for key in part:
                    _, address, rank = request(manager, key, mc_set, key.encode())
                    assert (address, rank) == (owners[key], 0), key
                    stored[address] += 1

            jobs = [gevent.spawn(setter, keys[n::GREENLETS]) for n in range(GREENLETS)]
            gevent.joinall(jobs, timeout=60, raise_error=True)
            share = ", ".join(f"{s.address} {stored[s.address]}" for s in servers)
            print(f"set {sum(stored.values())}/{KEYS} keys, each on its owner: {share}")

            # 2. GET every key; one server is killed after KILL_AFTER gets
            victim = servers[0]
            killed = Event()
            done = Counter[str]()
            moved_others: list[str] = []
            fallbacks: Counter[int] = Counter()

            def getter(part: list[str]) -> None:
                for key in part:
                    value, address, rank = request(manager, key, mc_get)
                    if owners[key] == victim.address and rank:  # only after the kill
                        fallbacks[rank] += 1
                        if value is None:  # a cache miss on the fallback: fill it there
                            request(manager, key, mc_set, key.encode())
                            done["refilled"] += 1
                        else:
                            done["hit"] += 1
                    elif address != owners[key] or rank != 0:
                        moved_others.append(key)
                    else:
                        assert value == key.encode(), (key, value)
                        done["hit"] += 1
                    if sum(done.values()) == KILL_AFTER and not killed.is_set():
                        killed.set()
                        victim.kill()
                        print(f"killed memcached {victim.address} after {KILL_AFTER} GETs")

            jobs = [gevent.spawn(getter, keys[n::GREENLETS]) for n in range(GREENLETS)]
            gevent.joinall(jobs, timeout=60, raise_error=True)
            total = sum(done.values())
            print(
                f"get {total}/{KEYS} ok: hits {done['hit']}, misses refilled on a "
                f"fallback {done['refilled']}, failed 0, retried once {sum(RETRIED.values())}"
            )
            ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(fallbacks.items()))
            print(f"keys of the killed server served by a fallback: {ranks}")
            print(f"other keys that moved: {len(moved_others)}")
            st = manager.stats().backends["cache"].servers
            for s in servers:
                x = st[s.address]
                print(
                    f"  {s.address}: owner_hits {x.owner_hits}, fallback_hits "
                    f"{x.fallback_hits}, breaker {x.breaker_state}"
                )
            assert total == KEYS and not moved_others
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("memcached processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
