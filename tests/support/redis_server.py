"""``redis-server`` processes on loopback for tests (the same way
``examples/redis_client.py`` starts its own): no persistence, ready once it says so,
always stopped by the fixture that made them (``RedisServers.stop_all``)."""

from __future__ import annotations

import shutil
from typing import Any

import gevent
import pytest
from gevent import subprocess

from tests.support.net import free_port

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server not installed (apt-get install redis-server)"
)


class RedisServer:
    """One ``redis-server`` on ``127.0.0.1``; ``extra`` args e.g. ``["--replicaof", ...]``."""

    def __init__(self, workdir: str, extra: list[str] | None = None) -> None:
        self.workdir = workdir
        self.extra = list(extra or [])
        self.port = 0
        self.proc: Any = None
        self._drain: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> RedisServer:
        assert REDIS_SERVER is not None
        for _ in range(attempts):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
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
                    "--dbfilename",
                    f"dump-{self.port}.rdb",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "notice",
                    *self.extra,
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
            self.proc.stdout.close()
            if "in use" not in "".join(output):
                raise RuntimeError("redis-server failed:\n" + "".join(output[-10:]))
        raise RuntimeError("redis-server: no free port found")

    def _discard_output(self) -> None:
        for _ in self.proc.stdout:
            pass

    def kill(self) -> None:
        """SIGKILL: the way a crashed server goes (the kernel closes its sockets)."""
        if self.proc is not None and self.proc.poll() is None:
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
        self.proc = None


class RedisServers:
    """A factory of servers sharing one work directory; ``stop_all`` ends every one."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.started: list[RedisServer] = []

    def start(self, extra: list[str] | None = None) -> RedisServer:
        server = RedisServer(self.workdir, extra)
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()
