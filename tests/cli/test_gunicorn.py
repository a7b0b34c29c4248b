"""examples/gunicorn under a real gunicorn: 2 gevent workers, 2,000 requests through the
manager, then SIGTERM: both workers close their managers and exit, the echo servers see
every connection closed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import subprocess
from gevent.pool import Pool as GreenletPool

from lbpool.testing import EchoServer
from tests.support.net import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gunicorn"
GUNICORN = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or shutil.which(
    "gunicorn"
)
pytestmark = pytest.mark.skipif(GUNICORN is None, reason="gunicorn not installed")

CONFIG = """
defaults:
  pool: {{min_idle: 1, max_size: 10, acquire_timeout: 2s}}
  health_check: {{send: "PING\\r\\n", expect: "+PONG"}}
backends:
  cache:
    strategy: least_active
    servers: [{servers}]
"""


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py app:app`` started in the example's folder; its log
    lines are collected by a greenlet."""

    def __init__(self, config_path: str, cwd: Path = EXAMPLE) -> None:
        env = dict(os.environ, LBPOOL_CONFIG=config_path, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE.parents[1]), env.get("PYTHONPATH", "")])
        assert GUNICORN is not None
        self.proc: Any = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "app:app"],
            cwd=str(cwd),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._new = gevent.event.Event()
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.set()
        self._new.set()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match[str]]:
        with gevent.Timeout(timeout, AssertionError(f"{count}x {pattern!r} not seen:\n{self.log}")):
            while True:
                found = [m for m in (re.search(pattern, line) for line in self.lines) if m]
                if len(found) >= count:
                    return found
                if self._reader.dead:
                    raise AssertionError(f"gunicorn exited before {pattern!r}:\n{self.log}")
                self._new.clear()
                self._new.wait(1.0)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._reader.kill()
        self.proc.stdout.close()


@pytest.fixture
def gunicorn_factory() -> Iterator[list[Gunicorn]]:
    started: list[Gunicorn] = []
    yield started
    for g in started:
        g.stop()


def http_get(port: int) -> tuple[int, bytes]:
    """One HTTP/1.0 GET / on a fresh connection; (status, body)."""
    sock = connect(f"127.0.0.1:{port}", timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_gunicorn_gevent_workers_serve_through_the_manager_and_close_it(
    tmp_path: Path, echo_server_factory: Any, gunicorn_factory: list[Gunicorn]
) -> None:
    servers: list[EchoServer] = [echo_server_factory(), echo_server_factory()]
    config = tmp_path / "lbpool.yaml"
    config.write_text(CONFIG.format(servers=", ".join(s.address for s in servers)))
    g = Gunicorn(str(config))
    gunicorn_factory.append(g)
    port = int(g.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[0].group(1))
    ready = g.wait_for(r"lbpool manager ready \(pid (\d+)", count=2)
    workers = {int(m.group(1)) for m in ready}
    assert len(workers) == 2

    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()

    def one(_: int) -> None:
        status, body = http_get(port)
        statuses[status] += 1
        if status == 200:
            served[re.search(r'"server": "([^"]+)"', body.decode()).group(1)] += 1  # type: ignore[union-attr]

    pool = GreenletPool(20)  # 20 requests in flight at most
    with gevent.Timeout(45, AssertionError(f"2,000 requests took too long: {statuses}")):
        for job in [pool.spawn(one, i) for i in range(2000)]:
            job.get()
    assert statuses == {200: 2000}
    assert {k for k, v in served.items() if v} == {s.address for s in servers}
    assert all(s.active > 0 for s in servers)  # the workers' pools hold connections

    g.proc.send_signal(signal.SIGTERM)
    with gevent.Timeout(20, AssertionError(f"gunicorn did not exit:\n{g.log}")):
        code = g.proc.wait()
    g._reader.join(timeout=5)
    assert code == 0, g.log
    closed = {int(m.group(1)) for m in g.wait_for(r"lbpool manager closed \(pid (\d+)", 2)}
    assert closed == workers
    assert "Traceback" not in g.log
    for server in servers:
        server.wait_active(0, timeout=10)  # every connection closed


def test_sighup_serves_changed_application_code(
    tmp_path: Path, echo_server_factory: Any, gunicorn_factory: list[Gunicorn]
) -> None:
    """The master must not import ``app`` (the conf imports it inside the hooks): after
    an edit to app.py and SIGHUP, the new workers serve the new code."""
    example = tmp_path / "example"
    example.mkdir()
    for name in ("app.py", "gunicorn.conf.py"):
        shutil.copy(EXAMPLE / name, example / name)
    server = echo_server_factory()
    config = tmp_path / "lbpool.yaml"
    config.write_text(CONFIG.format(servers=server.address))
    g = Gunicorn(str(config), cwd=example)
    gunicorn_factory.append(g)
    port = int(g.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[0].group(1))
    g.wait_for(r"lbpool manager ready \(pid (\d+)", count=2)
    status, body = http_get(port)
    assert status == 200 and b"reloaded" not in body

    app_py = example / "app.py"
    code = app_py.read_text()
    assert code.count("body = json.dumps({") == 1
    app_py.write_text(code.replace("body = json.dumps({", 'body = json.dumps({"reloaded": 1, '))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for(r"lbpool manager ready \(pid (\d+)", count=4)  # two new workers
    g.wait_for(r"lbpool manager closed \(pid (\d+)", count=2)  # the old ones gone
    for _ in range(10):
        status, body = http_get(port)
        assert status == 200 and b'"reloaded": 1' in body, body
    assert "Traceback" not in g.log
