"""A Redis client over three real ``redis-server`` processes on loopback ports.

Run: ``python examples/redis_client.py`` (needs ``redis-server`` on PATH; ends by
itself in a few seconds and stops the servers it started).

Shows: a YAML config with a ``PING``/``+PONG`` health check; SET/GET with the RESP
protocol through ``manager.get("redis")`` from many greenlets; the servers are
independent (nothing is replicated), so each key lives where its SET went, counted
with ``DBSIZE`` through ad-hoc ``host:port`` pools; then one server is killed and the
client carries on: a request whose connection died is retried once, the dead server's
breaker opens, and the others take the traffic.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from collections import Counter
from typing import Any

import gevent
from gevent import subprocess

import lbpool

CONFIG = """
defaults:
  pool: {{min_idle: 1, max_size: 8, acquire_timeout: 2s, check_after: 1s}}
  dial: {{timeout: 500ms}}
  breaker: {{failure_threshold: 2, recovery_timeout: 30s}}
  health_check:
    send: "PING\\r\\n"      # checked on borrow after check_after idle, and every interval
    expect: "+PONG"
    timeout: 500ms
    interval: 5s
backends:
  redis:
    strategy: round_robin
    servers: [{servers}]
"""

GREENLETS = 10
KEYS_EACH = 30


# ------------------------------------------------------------------ RESP, minimal


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server: the connection itself is fine."""


def encode(*args: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    """Reads exactly one reply; a request/response protocol never over-reads."""

    def __init__(self, conn: lbpool.PooledConnection) -> None:
        self.conn = conn
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.conn.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> Any:
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ValueError(f"not RESP: {line[:40]!r}")  # out of step: discard the connection


def call(conn: lbpool.PooledConnection, *args: str | bytes | int) -> Any:
    conn.sendall(encode(*args))
    reader = _Reader(conn)
    value = reader.reply()
    if reader.buf:
        raise ValueError("bytes after the reply: stream out of step")
    return value


RETRIED: Counter[str] = Counter()  # commands retried once, by the error that killed the first


def command(manager: lbpool.PoolManager, target: str, *args: str | bytes | int) -> tuple[str, Any]:
    """Run one command on ``target`` (a backend or host:port); returns (server, reply).

    A dead connection is discarded (which tells its server's breaker) and the command
    retried once by ``manager.call`` on a fresh acquisition; error replies are raised
    after release.
    """
    died: list[BaseException] = []

    def attempt(conn: lbpool.PooledConnection) -> tuple[str, Any]:
        if died:
            RETRIED[type(died[-1]).__name__] += 1
        conn.settimeout(2.0)
        try:
            return conn.address, call(conn, *args)
        except OSError as exc:
            died.append(exc)
            raise

    address, value = manager.call(target, attempt)
    if isinstance(value, RedisError):
        raise value
    return address, value


# ------------------------------------------------------------------ redis-server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """``redis-server`` on a loopback port, no persistence; ready once it says so."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: Any = None
        self._drain: Any = None

    def start(self, attempts: int = 3) -> RedisProcess:
        for _ in range(attempts):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.workdir,
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "notice",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            output = []
            with gevent.Timeout(10, TimeoutError(f"redis-server on {self.port} not ready")):
                for line in self.proc.stdout:  # cooperative reads: gevent.subprocess
                    output.append(line)
                    if "Ready to accept connections" in line:
                        self._drain = gevent.spawn(self._discard_output)
                        return self
            self.proc.wait(timeout=5)  # it exited (port taken between choosing and binding?)
            if "in use" not in "".join(output):
                raise RuntimeError("redis-server failed:\n" + "".join(output[-10:]))
        raise RuntimeError("redis-server: no free port found")

    def _discard_output(self) -> None:
        for _ in self.proc.stdout:
            pass

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the way a crashed server goes (the kernel closes its sockets)."""
        self.proc.kill()
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._drain is not None:
            self._drain.join(timeout=2)
            self._drain.kill()
        self.proc.stdout.close()


# ------------------------------------------------------------------ the example


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="log %(levelname)s %(name)s: %(message)s")
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (e.g. apt-get install redis-server)")
        return 2
    workdir = tempfile.mkdtemp(prefix="lbpool-redis-")
    servers: list[RedisProcess] = []
    try:
        servers = [RedisProcess(workdir).start() for _ in range(3)]
        print("redis-servers: " + ", ".join(s.address for s in servers), flush=True)
        path = os.path.join(workdir, "redis.yaml")
        with open(path, "w") as handle:
            handle.write(CONFIG.format(servers=", ".join(s.address for s in servers)))

        with lbpool.PoolManager.from_yaml(path) as manager:
            manager.wait_ready(timeout=5)
            served: Counter[str] = Counter()

            def client(n: int) -> None:
                for i in range(KEYS_EACH):
                    key, value = f"key:{n}:{i}", f"value {n}/{i}"
                    # SET and GET on one borrowed connection: the same server.
                    with manager.get("redis") as conn:
                        assert call(conn, "SET", key, value) == "OK"
                        got = call(conn, "GET", key)
                        served[conn.address] += 1
                    assert got == value.encode(), (key, got)

            jobs = [gevent.spawn(client, n) for n in range(GREENLETS)]
            gevent.joinall(jobs, timeout=30, raise_error=True)
            total = GREENLETS * KEYS_EACH
            print(f"SET/GET ok: {sum(served.values())}/{total} keys, from {GREENLETS} greenlets")

            stored = 0
            for server in servers:
                # A host:port gets its own (ad-hoc) pool: handy for per-server commands.
                _, size = command(manager, server.address, "DBSIZE")
                stored += size
                print(f"  {server.address}: {served[server.address]} SETs, DBSIZE {size}")
            print(f"keys stored across the servers: {stored} (each key on one server)")

            victim = servers[2]
            victim.kill()
            print(f"killed redis-server {victim.address} (SIGKILL)", flush=True)
            after: Counter[str] = Counter()
            for _ in range(30):
                address, _count = command(manager, "redis", "INCR", "counter")
                after[address] += 1
            share = ", ".join(f"{a} {n}" for a, n in sorted(after.items()))
            retried = sum(RETRIED.values())
            print(f"after the kill: 30/30 INCR ok ({share}); retried once: {retried}")
            s = manager.stats().backends["redis"].servers[victim.address]
            print(f"breaker of {victim.address}: {s.breaker_state} (trips {s.breaker_trips})")
            assert victim.address not in after
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("redis-server processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
