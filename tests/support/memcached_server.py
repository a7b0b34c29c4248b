"""``memcached`` processes on loopback for tests (as ``examples/memcached_sharded.py``
starts its own): TCP only, 64 MB, ready once it accepts a connection, always stopped by
the fixture that made them (``MemcachedServers.stop_all``)."""

from __future__ import annotations

import os
import shutil
import socket
from time import monotonic
from typing import Any

import gevent
import pytest
from gevent import subprocess

from tests.support.net import free_port

MEMCACHED = shutil.which("memcached")
needs_memcached = pytest.mark.skipif(
    MEMCACHED is None, reason="memcached not installed (apt-get install memcached)"
)


class Memcached:
    """One ``memcached`` on ``127.0.0.1``; ``kill()`` is a crash (SIGKILL)."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 3, timeout: float = 15.0) -> Memcached:
        assert MEMCACHED is not None
        errors = []
        for _ in range(attempts):
            self.port = free_port()  # bind-then-close: another process may take it first
            args = [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64"]
            if os.geteuid() == 0:
                args += ["-u", "root"]  # memcached refuses to run as root without it
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            # memcached says nothing when it listens (-vv would, then log every command):
            # readiness is a connect that succeeds, tried until the process exits or the
            # bound runs out.
            deadline = monotonic() + timeout
            while self.proc.poll() is None and monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                except OSError:
                    gevent.sleep(0.02)
                else:
                    return self
            self.stop()
            errors.append(self._stderr)  # exited: the port taken between choosing and binding?
        raise RuntimeError(f"memcached did not start: {errors}")

    _stderr = ""

    def kill(self) -> None:
        """SIGKILL: the way a crashed server goes (the kernel closes its sockets)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()  # a test's cache keeps nothing worth a graceful exit (~1 s)
            self.proc.wait(timeout=10)
        with gevent.Timeout(5, False):
            self._stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc = None


class MemcachedServers:
    """A factory of servers; ``stop_all`` ends every one it started."""

    def __init__(self) -> None:
        self.started: list[Memcached] = []

    def start(self) -> Memcached:
        server = Memcached()
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()
