"""The ``lbpool`` command: check, probe, demo, bench wiring, ``python -m lbpool``."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from time import monotonic
from typing import Any

import gevent
import pytest
import yaml

import lbpool
from lbpool.cli import demo, main
from lbpool.testing import EchoServer
from tests.support.dns_server import DNSServer
from tests.support.leaks import live_greenlets, settle
from tests.support.net import free_port, free_ports, ipv6_available
from tests.support.tls import TLSCerts, broken_tls_files

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "lbpool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )


def demo_config(path: Path, ports: list[int], **breaker: Any) -> Path:
    """The repository's config.yaml with its loopback ports swapped for ``ports``."""
    text = (REPO / "config.yaml").read_text()
    for old, new in zip(range(17001, 17006), ports, strict=True):
        assert f"127.0.0.1:{old}" in text
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    for key, value in breaker.items():
        text = re.sub(rf"(\n    {key}: )\S+", rf"\g<1>{value}", text, count=1)
    path.write_text(text)
    return path


# ------------------------------------------------------------------ python -m lbpool


def test_python_m_lbpool_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("check", "probe", "demo", "bench"):
        assert command in result.stdout
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    assert "--duration" in result.stdout and "--config" in result.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_core_package_imports_neither_rich_nor_prometheus() -> None:
    code = (
        "import sys, lbpool, lbpool.pool, lbpool.manager, lbpool.testing, lbpool.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('rich', 'prometheus_client')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ check


def test_check_prints_the_normalized_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "backends:\n"
        "  cache:\n"
        "    servers: [127.0.0.1:7001, {address: 127.0.0.1:7002, weight: 2}]\n"
        "    pool: {max_size: 20}\n"
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    cache = data["backends"]["cache"]
    assert cache["strategy"] == "round_robin"
    assert cache["pool"]["max_size"] == 20
    assert cache["pool"]["min_idle"] == 1  # the other pool defaults, filled in
    assert cache["pool"]["acquire_timeout"] == 5.0
    assert cache["breaker"] == {
        "failure_threshold": 5,
        "recovery_timeout": 30.0,
        "max_recovery_timeout": 300.0,
        "failure_rate": None,  # off unless configured
    }
    assert cache["servers"][0] == {"address": "127.0.0.1:7001", "weight": 1}
    assert data["defaults"]["dial"]["timeout"] == 2.0
    assert data["defaults"]["health_check"]["interval"] == 30.0
    # what check prints is itself a valid config, equal to the original
    assert lbpool.parse_config(data) == lbpool.load_config(path)


def test_check_prints_the_key_affinity_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "defaults:\n"
        "  balance: {hash_fallback: none}\n"
        "backends:\n"
        "  sessions:\n"
        "    strategy: maglev\n"
        "    servers: [127.0.0.1:7101, 127.0.0.1:7102]\n"
        "    balance: {hash_fallback: next}\n"
        "  cache:\n"
        "    strategy: rendezvous\n"
        "    servers: [127.0.0.1:7001]\n"
    )
    assert main(["check", str(path)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    defaults = {"panic_threshold": 0.5, "slow_start": None}  # the rest of balance, filled in
    assert data["defaults"]["balance"] == {"hash_fallback": "none", **defaults}
    assert data["backends"]["sessions"]["strategy"] == "maglev"
    assert data["backends"]["sessions"]["balance"] == {"hash_fallback": "next", **defaults}
    assert data["backends"]["cache"]["balance"] == {"hash_fallback": "none", **defaults}


def test_check_reports_every_mistake_with_line_and_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "defaults:\n"
        "  pool:\n"
        "    max_size: 0\n"  # 3
        "backends:\n"
        "  cache:\n"
        "    strategy: fastest\n"  # 6
        "    servers:\n"
        "      - 127.0.0.1:7001\n"
        "    breaker:\n"
        "      failure_treshold: 3\n"  # 10: a typo
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    found = {}
    for line in lines:
        m = re.match(rf"^{re.escape(str(path))}:(\d+): ([\w.]+): (.+)$", line)
        assert m, line
        found[m.group(2)] = int(m.group(1))
    assert found == {
        "defaults.pool.max_size": 3,
        "backends.cache.strategy": 6,
        "backends.cache.breaker.failure_treshold": 10,
    }


def test_check_reports_each_broken_tls_file_with_its_setting(
    tmp_path: Path, tls_certs: TLSCerts
) -> None:
    broken = broken_tls_files(str(tmp_path), tls_certs)
    path = tmp_path / "tls.yaml"
    path.write_text(
        "defaults:\n"
        "  dial:\n"
        f"    tls: {{ca_file: {broken.not_pem}}}\n"  # 3
        "backends:\n"
        "  cache:\n"
        "    servers: [127.0.0.1:7001]\n"
        "    dial:\n"
        "      tls:\n"
        f"        ca_file: {tls_certs.ca_file}\n"
        f"        cert_file: {tls_certs.client_cert_file}\n"
        f"        key_file: {broken.other_key}\n"  # 11: the key of another certificate
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{path}:3: defaults.dial.tls.ca_file: ")
    assert broken.not_pem in lines[0]
    assert lines[1].startswith(f"{path}:11: backends.cache.dial.tls.key_file: ")
    assert broken.other_key in lines[1]


def test_check_accepts_a_valid_tls_config(
    tmp_path: Path, tls_certs: TLSCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tls.yaml"
    path.write_text(
        "defaults:\n"
        "  dial:\n"
        "    tls:\n"
        f"      ca_file: {tls_certs.ca_file}\n"
        f"      cert_file: {tls_certs.client_cert_file}\n"
        f"      key_file: {tls_certs.client_key_file}\n"
        "backends:\n"
        "  cache: {servers: [127.0.0.1:7001]}\n"
    )
    assert main(["check", str(path)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["backends"]["cache"]["dial"]["tls"]["key_file"] == tls_certs.client_key_file


def test_check_missing_file_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("check", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr


def test_check_malformed_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("backends:\n  cache: [unclosed\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:")


def test_check_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 2  # a directory
    assert str(tmp_path) in capsys.readouterr().err


def test_repository_config_is_valid_and_matches_the_built_in_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", str(REPO / "config.yaml")]) == 0
    capsys.readouterr()
    repo = lbpool.load_config(REPO / "config.yaml")
    builtin = lbpool.parse_config(yaml.safe_load(demo.DEFAULT_CONFIG))
    assert repo == builtin
    assert set(repo.backends) == {"cache", "api"}
    assert repo.backends["cache"].strategy == "least_active"
    assert len(repo.backends["cache"].servers) == 3
    assert repo.backends["api"].strategy == "weighted"
    assert repo.backends["cache"].breaker.recovery_timeout <= 5


# ------------------------------------------------------------------ probe


@pytest.fixture
def two_servers() -> Iterator[list[EchoServer]]:
    with EchoServer() as a, EchoServer() as b:
        yield [a, b]


def probe_config(tmp_path: Path, addresses: list[str], *, health: bool = True) -> Path:
    path = tmp_path / "probe.yaml"
    data: dict[str, Any] = {
        "defaults": {"dial": {"timeout": "1s"}},
        "backends": {"svc": {"servers": addresses}},
    }
    if health:
        data["backends"]["svc"]["health_check"] = {"send": "PING\r\n", "expect": "+PONG"}
    path.write_text(yaml.safe_dump(data))
    return path


def rows_of(out: str, address: str) -> list[str]:
    return [line for line in out.splitlines() if address in line]


def test_probe_all_up(
    tmp_path: Path, two_servers: list[EchoServer], capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = [s.address for s in two_servers]
    code = main(["probe", str(probe_config(tmp_path, addresses))])
    out = capsys.readouterr().out
    assert code == 0, out
    for address in addresses:
        (row,) = rows_of(out, address)
        assert re.search(r"\bup\b", row), row
        assert "+PONG" in row
        assert re.search(r"\b\d+\.\d\b", row), row  # dial latency in ms
    assert "2 of 2 servers up" in out


def test_probe_one_down(
    tmp_path: Path, two_servers: list[EchoServer], capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)
    dead = f"127.0.0.1:{port}"
    addresses = [two_servers[0].address, dead]
    code = main(["probe", str(probe_config(tmp_path, addresses))])
    out = capsys.readouterr().out
    assert code == 1, out
    (row,) = rows_of(out, dead)
    assert re.search(r"\bdown\b", row) and "refused" in row, row
    (row,) = rows_of(out, two_servers[0].address)
    assert re.search(r"\bup\b", row), row
    assert "1 down" in out


def test_probe_reports_a_failed_health_check_as_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with EchoServer(mode="silent") as silent:
        path = tmp_path / "p.yaml"
        path.write_text(
            "backends:\n  svc:\n"
            f"    servers: [{silent.address}]\n"
            '    health_check: {send: "PING\\r\\n", expect: "+PONG", timeout: 200ms}\n'
        )
        assert main(["probe", str(path)]) == 1
    (row,) = rows_of(capsys.readouterr().out, silent.address)
    assert "down" in row and "check failed" in row


def test_probe_plain_text_without_rich(
    tmp_path: Path,
    two_servers: list[EchoServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "rich", None)
    addresses = [s.address for s in two_servers]
    assert main(["probe", str(probe_config(tmp_path, addresses, health=False))]) == 0
    out = capsys.readouterr().out
    assert "backend  server" in out  # the plain table's header
    assert "no health check configured" in out


def discovery_probe_config(tmp_path: Path, nameserver: str) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(
        "backends:\n  fleet:\n"
        "    discover: {srv: _echo._tcp.fleet.test, timeout: 500ms,"
        f" nameservers: [{nameserver}]}}\n"
        "    dial: {timeout: 1s}\n"
    )
    return path


def test_probe_resolves_discovered_backends(
    tmp_path: Path, two_servers: list[EchoServer], capsys: pytest.CaptureFixture[str]
) -> None:
    with DNSServer() as dns:
        dns.zone[("_echo._tcp.fleet.test", "SRV")] = [
            f"10 1 {s.port} s{i}.fleet.test." for i, s in enumerate(two_servers)
        ]
        for i in range(2):
            dns.zone[(f"s{i}.fleet.test", "A")] = ["127.0.0.1"]
        code = main(["probe", str(discovery_probe_config(tmp_path, dns.address))])
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = [line for line in out.splitlines() if "srv _echo._tcp.fleet.test" in line]
    assert "ok" in row and "2:" in row, row
    for server in two_servers:
        assert server.address in row
        assert any(re.search(r"\bup\b", r) for r in rows_of(out, server.address) if r != row)
    assert "2 of 2 servers up" in out


def test_probe_unresolved_discovery_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with DNSServer() as dns:
        dns.mode = "servfail"
        code = main(["probe", str(discovery_probe_config(tmp_path, dns.address))])
    out = capsys.readouterr().out
    assert code == 1, out
    (row,) = [line for line in out.splitlines() if "srv _echo._tcp.fleet.test" in line]
    assert "failed" in row and "SERVFAIL" in row, row
    assert "did not resolve" in out


# Backend names rich would read as markup (a trailing backslash: as an escape) if
# handed a bare str. A name cannot hold ':' (nor so an emoji code, ``:smile:``).
ODD_NAMES = ("[/b]", "[bold]x[/bold]", "dir\\", "[red]")


def table_row(out: str, *cells: str) -> str:
    """The line of a table whose first cells are ``cells``, exactly as given."""
    pattern = r"^\s*" + r"\s+".join(re.escape(c) for c in cells) + r"(\s|$)"
    found = [line for line in out.splitlines() if re.search(pattern, line)]
    assert found, f"no row {cells} in:\n{out}"
    return found[0]


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_probe_prints_names_and_ipv6_addresses_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rich reads a bare str as markup: ``[::1]`` vanished as a style and ``[/b]`` crashed
    the command with a MarkupError traceback."""
    with EchoServer(host="::1") as up:
        dead = f"[::1]:{free_port()}"
        path = tmp_path / "p.yaml"
        check = {"send": ":smile: [/i]\n", "expect": ":smile: [/i]"}  # echoed back
        backends = {
            name: {"servers": [up.address, dead], "health_check": check} for name in ODD_NAMES
        }
        path.write_text(yaml.safe_dump({"backends": backends}))
        code = main(["probe", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out  # the dead server is down
    for name in ODD_NAMES:
        row = table_row(out, name, up.address)
        assert re.search(r"\bup\b", row) and "ok: :smile: [/i] -> :smile: [/i]" in row, row
        assert re.search(r"\bdown\b", table_row(out, name, dead))
    assert f"{len(ODD_NAMES)} of {2 * len(ODD_NAMES)} servers up" in out


def test_probe_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("backends: {svc: {servers: []}}\n")
    assert main(["probe", str(path)]) == 2
    assert "backends.svc.servers" in capsys.readouterr().err


# ------------------------------------------------------------------ bench wiring


def test_bench_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    class FakeBench:
        @staticmethod
        def main(argv: list[str] | None) -> int:
            seen.append(argv)
            return 0

    monkeypatch.setitem(sys.modules, "lbpool.cli.bench", FakeBench)
    assert main(["bench", "--quick", "-n", "3", "--help"]) == 0
    assert seen == [["--quick", "-n", "3", "--help"]]


def test_bench_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lbpool.cli.bench", None)  # import fails as if absent
    assert main(["bench", "--quick"]) == 2
    assert "bench is not available" in capsys.readouterr().err


# ------------------------------------------------------------------ the client pattern


def test_echo_request_retries_once_on_a_fresh_connection() -> None:
    """A connection that dies in flight is discarded (counted for the breaker) and the
    request goes out again on a new acquisition, which lands on a live server."""
    with EchoServer(delay=0.3) as slow, EchoServer() as fast:
        config = {
            "backends": {"b": {"strategy": "round_robin", "servers": [slow.address, fast.address]}}
        }
        with lbpool.PoolManager(config) as manager:
            manager.wait_ready(timeout=5)
            retried: list[BaseException] = []
            job = gevent.spawn(demo.echo_request, manager, "b", b"hello", on_retry=retried.append)
            slow.wait_received(5, timeout=5)  # the request is in flight on `slow`
            slow.stop()  # its client sees EOF before any reply
            assert job.get(timeout=5) == fast.address
            assert len(retried) == 1 and isinstance(retried[0], ConnectionError)
            stats = manager.stats().backends["b"].servers[slow.address]
            assert stats.closed["error"] == 1


# ------------------------------------------------------------------ demo


def test_demo_runs_shows_failover_and_fails_no_request(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "demo.yaml", free_ports(5), recovery_timeout="1s")
    began = monotonic()
    result = run_cli(
        "demo", "--config", str(config), "--duration", "6", "--workers", "30", timeout=40
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert monotonic() - began < 20
    assert "Traceback" not in result.stderr
    assert re.search(r"requests: [\d,]+ total, [\d,]+ ok, 0 failed", out), out
    assert "breaker opened: yes" in out
    assert "traffic moved: yes" in out
    m = re.search(r"cache (127\.0\.0\.1:\d+): closed -> open@", out)
    assert m, out
    assert "recovered: yes" in out, out  # 1 s recovery: back well before the end
    assert "half_open" in out
    assert re.search(r"latency: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "result: OK" in out
    assert re.search(r"\[ *\d+\.\ds/6s", out)  # plain periodic lines (not a TTY)


@pytest.mark.usefixtures("no_fd_leak")
def test_demo_in_process_leaves_nothing_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every greenlet, server and socket of the demo is gone when it returns."""
    ports = free_ports(5)
    config = demo_config(tmp_path / "demo.yaml", ports, recovery_timeout="500ms")
    before = set(live_greenlets())
    argv = ["demo", "--config", str(config), "--duration", "3", "--workers", "10", "--live"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "breaker opened: yes" in out and "result: OK" in out
    assert re.search(r"lbpool demo +3\.0s/3s", out), out  # the live table's last frame
    assert settle(lambda: not (set(live_greenlets()) - before)), set(live_greenlets()) - before
    for port in ports:  # every echo server is closed
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_demo_prints_names_and_ipv6_addresses_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The live table and the summary show backend names and IPv6 addresses as given."""
    ports = free_ports(5)
    first, *others = ODD_NAMES
    backends: dict[str, Any] = {first: {"servers": [f"[::1]:{p}" for p in ports[:2]]}}
    for name, port in zip(others, ports[2:], strict=True):
        backends[name] = {"servers": [f"[::1]:{port}"]}
    path = tmp_path / "demo.yaml"
    path.write_text(
        yaml.safe_dump(
            {"defaults": {"breaker": {"recovery_timeout": "500ms"}}, "backends": backends}
        )
    )
    argv = ["demo", "--config", str(path), "--duration", "2", "--workers", "5", "--live"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    live, summary = out.split("lbpool demo summary")
    for name, config in backends.items():
        for address in config["servers"]:
            table_row(live, name, address)  # the live table's last frame
            table_row(summary, name, address)  # requests per server
    assert f"outage: [::1]:{ports[1]} ({first}) killed" in summary


def keyed_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: dict[str, Any]
) -> tuple[int, str, list[str]]:
    """The demo (2 s, plain output) on one key-affinity backend of three servers: its
    exit code, output and server addresses."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    path = tmp_path / "demo.yaml"
    config = {
        "defaults": {"breaker": {"recovery_timeout": "500ms"}},
        "backends": {"sessions": {**backend, "servers": addresses}},
    }
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0  # what the demo runs, check calls valid
    capsys.readouterr()
    argv = ["demo", "--config", str(path), "--duration", "2", "--workers", "10", "--no-live"]
    code = main(argv)
    return code, capsys.readouterr().out, addresses


@pytest.mark.parametrize("strategy", ["maglev", "ring_hash", "rendezvous"])
def test_demo_sends_keys_to_a_key_affinity_backend(
    strategy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Such a backend needs key=: without one every request failed (exit 1)."""
    code, out, addresses = keyed_demo(tmp_path, capsys, {"strategy": strategy})
    assert code == 0, out
    assert re.search(r"requests: [\d,]+ total, [\d,]+ ok, 0 failed", out), out
    assert "traffic moved: yes" in out, out  # the killed server's keys went elsewhere
    summary = out.split("lbpool demo summary")[1]
    killed = addresses[1]  # the demo kills the second server of the first backend
    assert f"outage: {killed} (sessions) killed" in summary
    for address in addresses:  # the keys spread the traffic over the servers
        if address != killed:  # (a loaded machine may serve few before the kill)
            total = table_row(summary, "sessions", address).split()[5]
            assert int(total.replace(",", "")) > 0, summary


def test_demo_starts_its_clock_once_the_key_table_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first key table is built in the background (maglev's: 0.1-0.4 s here, more
    on a loaded machine): the demo waits for it before its clock starts, so requests
    are served before the kill rather than stalled through it."""
    from lbpool import _affinity

    build = _affinity.build_table

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        gevent.sleep(1.0)
        return build(*args, **kwargs)

    monkeypatch.setattr(_affinity, "build_table", slow_build)
    code, out, addresses = keyed_demo(tmp_path, capsys, {"strategy": "maglev"})
    assert code == 0, out
    summary = out.split("lbpool demo summary")[1]
    for address in addresses:
        before = table_row(summary, "sessions", address).split()[2]
        assert int(before.replace(",", "")) > 0, summary
    assert "traffic moved: yes" in out, out


def test_demo_key_affinity_without_fallback_fails_only_what_no_server_could_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hash_fallback: none``: a key whose owner is down fails by design, not while
    failover could have served it."""
    backend = {"strategy": "maglev", "balance": {"hash_fallback": "none"}}
    code, out, _ = keyed_demo(tmp_path, capsys, backend)
    assert code == 0, out
    m = re.search(r"requests: [\d,]+ total, [\d,]+ ok, ([\d,]+) failed", out)
    assert m and int(m[1].replace(",", "")) > 0, out  # the down owner's keys
    assert "BackendUnavailable" in out and "result: OK" in out, out


def _read_lines(stream: Any, sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)
    sink.put("")


def test_demo_ctrl_c_stops_with_the_summary_so_far(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "demo.yaml", free_ports(5))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lbpool",
            "demo",
            "--config",
            str(config),
            "--duration",
            "60",
            "--workers",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        seen = []
        deadline = monotonic() + 20
        while True:  # the first periodic line: traffic is flowing
            line = lines.get(timeout=max(0.1, deadline - monotonic()))
            seen.append(line)
            assert line, "".join(seen)
            if line.startswith("[ 1.0s"):
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        reader.join(timeout=5)
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        out = "".join(seen + rest)
        assert "interrupted" in out
        assert re.search(r"requests: [\d,]+ total, [\d,]+ ok, 0 failed", out), out
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_demo_port_taken_fails_clearly(tmp_path: Path) -> None:
    ports = free_ports(5)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", ports[3]))
    blocker.listen()
    try:
        config = demo_config(tmp_path / "demo.yaml", ports)
        result = run_cli("demo", "--config", str(config), "--duration", "5", timeout=20)
    finally:
        blocker.close()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{ports[3]}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_without_config_yaml_uses_the_built_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.yaml here
    loaded = demo._load(None)
    assert loaded is not None
    config, source = loaded
    assert source == "built-in config"
    assert config == lbpool.load_config(REPO / "config.yaml")
    (tmp_path / "config.yaml").write_text("backends: {x: {servers: [127.0.0.1:1]}}\n")
    loaded = demo._load(None)
    assert loaded is not None and loaded[1] == "config.yaml"  # ./config.yaml when present


def test_demo_with_an_invalid_or_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("demo", "--config", str(tmp_path / "missing.yaml"), "--duration", "1")
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
