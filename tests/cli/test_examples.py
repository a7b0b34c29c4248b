"""Every example runs as a real subprocess, ends by itself (or on a signal), and does
what it says."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import monotonic
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# The examples import the lbpool of this checkout (not another one installed in the venv).
ENV = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
)


def run_example(name: str, *args: str, timeout: float = 45.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


class Running:
    """An example started in the background; its stdout lines arrive on a queue."""

    def __init__(self, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = monotonic() + timeout
        while True:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.seen)}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"exited before {pattern!r}:\n{''.join(self.seen)}{err}")
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self, signum: int = signal.SIGINT, timeout: float = 15.0) -> tuple[int, str]:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, "".join(self.seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.close()


def get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


# ------------------------------------------------------------------ echo_client.py


def test_echo_client() -> None:
    result = run_example("echo_client.py")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "replies ok: 1000/1000" in out
    served = re.findall(r"^  (cache|api)\s+(\S+)\s+(\d+) requests$", out, re.M)
    assert len(served) == 5
    api = sorted(int(n) for b, _, n in served if b == "api")
    assert api == [167, 333]  # weighted 2:1, smooth: exact
    cache = [int(n) for b, _, n in served if b == "cache"]
    assert sum(cache) == 500 and min(cache) > 100  # least_active spreads the load
    assert re.search(r"ad-hoc pool \S+: b'ad hoc\\n'", out)
    assert "BackendUnavailable: backend 'api': no server could serve" in out
    assert out.count("connection refused") == 2
    assert out.rstrip().endswith("done")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ dns_discovery.py


def test_dns_discovery() -> None:
    result = run_example("dns_discovery.py")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"^  c added: pools \[a b c\], requests served: .*\bc [1-9]", out, re.M), out
    assert re.search(r"^  outage: pools \[a b c\]", out, re.M), out
    assert re.search(r"failures=[1-9]\d*, last_error='srv .*no reply", out), out
    assert re.search(r"^  after: pools \[c d\], requests served: .*\bd [1-9]", out, re.M), out
    assert "a and b: open connections 0 and 0" in out
    assert "discovery: servers=2, last_error=None" in out
    assert re.search(r"^\d+ requests in [\d.]+s, 0 failed$", out, re.M), out
    assert out.rstrip().endswith("done")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ wsgi_app.py


def test_wsgi_app_serves_real_http(running: list[Running]) -> None:
    app = Running("wsgi_app.py", "--port", "0", "--duration", "60")
    running.append(app)
    port = int(app.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    app.wait_for(r"serving for")  # its own self-test is done
    base = f"http://127.0.0.1:{port}"

    def one(i: int) -> tuple[int, Any]:
        return get(f"{base}/echo?msg=hello-{i}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(30)))
    servers = set()
    for i, (status, body) in enumerate(results):
        assert status == 200
        assert body["reply"] == f"hello-{i}"
        servers.add(body["server"])
    assert len(servers) == 2  # round_robin over both echo servers

    status, stats = get(f"{base}/stats")
    assert status == 200
    echo = stats["backends"]["echo"]["servers"]
    assert sum(s["acquired"] for s in echo.values()) >= 30 + 4
    assert all(s["in_use"] == 0 for s in echo.values())

    code, out = app.stop(signal.SIGINT)
    assert code == 0, out
    assert "stopped cleanly" in out
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ------------------------------------------------------------------ redis_client.py


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_client() -> None:
    result = run_example("redis_client.py", timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    m = re.search(r"redis-servers: (\S+), (\S+), (\S+)$", out, re.M)
    assert m, out
    addresses = list(m.groups())
    assert "SET/GET ok: 300/300 keys" in out
    sizes = [int(n) for n in re.findall(r"DBSIZE (\d+)", out)]
    assert len(sizes) == 3 and sum(sizes) == 300 and min(sizes) > 0
    assert "keys stored across the servers: 300" in out
    assert re.search(r"after the kill: 30/30 INCR ok", out)
    assert re.search(rf"breaker of {re.escape(addresses[2])}: open \(trips 1\)", out)
    assert out.rstrip().endswith("redis-server processes stopped")
    for address in addresses:  # every redis-server it started is gone
        host, _, port = address.rpartition(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()


# ------------------------------------------------------------------ memcached_sharded.py


@pytest.mark.memcached
@pytest.mark.skipif(shutil.which("memcached") is None, reason="memcached not installed")
def test_memcached_sharded() -> None:
    result = run_example("memcached_sharded.py", timeout=90)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    m = re.search(r"memcached servers: (\S+), (\S+), (\S+)$", out, re.M)
    assert m, out
    addresses = list(m.groups())
    m = re.search(r"set 10000/10000 keys, each on its owner: (.+)$", out, re.M)
    assert m, out
    shares = [int(n) for n in re.findall(r":\d+ (\d+)", m.group(1))]
    assert len(shares) == 3 and sum(shares) == 10000 and min(shares) > 2500
    assert f"killed memcached {addresses[0]} after 3000 GETs" in out
    m = re.search(
        r"get 10000/10000 ok: hits \d+, misses refilled on a fallback (\d+), failed 0", out
    )
    assert m, out
    refilled = int(m.group(1))
    assert 0 < refilled < shares[0]  # the victim's keys read after the kill, and only those
    assert f"keys of the killed server served by a fallback: rank 1: {refilled}" in out
    assert "other keys that moved: 0" in out
    assert re.search(
        rf"{re.escape(addresses[0])}: owner_hits \d+, fallback_hits 0, breaker open", out
    )
    assert out.rstrip().endswith("memcached processes stopped")
    for address in addresses:  # every memcached it started is gone
        port = address.rpartition(":")[2]
        assert not _memcached_running(port), address


def _memcached_running(port: str) -> bool:
    """Is a memcached process started with ``-p port`` still running? (A connect to
    the port proves nothing: another test may have bound the freed port since.)"""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if os.path.basename(args[0]).startswith(b"memcached") and b"-p" in args:
            i = args.index(b"-p")
            if args[i + 1 : i + 2] == [port.encode()]:
                return True
    return False


# ------------------------------------------------------------------ prometheus_exporter.py


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            values[name] = float(number)
    return values


def test_prometheus_exporter(running: list[Running]) -> None:
    pytest.importorskip("prometheus_client")
    app = Running("prometheus_exporter.py", "--port", "0", "--duration", "60")
    running.append(app)
    port = int(app.wait_for(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    app.wait_for(r"serving for")
    first = _scrape(port)
    acquired = {k: v for k, v in first.items() if k.startswith("lbpool_acquired_total{")}
    assert len(acquired) == 2
    assert all('backend="echo"' in k and 'server="127.0.0.1:' in k for k in acquired)
    assert sum(acquired.values()) > 0
    assert [v for k, v in first.items() if k.startswith("lbpool_breaker_state{")] == [0.0, 0.0]
    assert any(k.startswith("lbpool_closed_total{") and 'reason="idle"' in k for k in first)
    # the clients keep going: counters only grow
    deadline = monotonic() + 10
    while True:
        later = _scrape(port)
        grown = sum(later[k] for k in acquired)
        if grown > sum(acquired.values()):
            break
        assert monotonic() < deadline, "lbpool_acquired_total did not grow"
    code, out = app.stop(signal.SIGTERM)
    assert code == 0, out
    assert "stopped cleanly" in out
