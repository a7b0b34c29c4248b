"""lbpool.metrics: the Prometheus collector, scraped as real exposition text."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

import lbpool
from lbpool.stats import CLOSE_REASONS
from lbpool.testing import EchoServer, recv_exact
from tests.support.leaks import settle

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import lbpool._scrape  # noqa: E402
import lbpool.metrics  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def view(text: bytes) -> list[tuple[Any, ...]]:
    """An exposition as Prometheus reads it: each family's name, type and help, and its
    samples (name, sorted labels, value) in order. lbpool writes its own families'
    lines (``lbpool._families``), so its text is compared with prometheus_client's by
    what it says, not byte for byte (prometheus_client may change its spelling)."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(s.name, sorted(s.labels.items()), s.value) for s in family.samples],
        )
        for family in text_string_to_metric_families(text.decode())
    ]


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[n]``: how many ``Sample``s lbpool's lazy families made since (set it to 0)."""
    import lbpool._families

    count = [0]
    real = lbpool._families._new_sample

    def counting(fields: tuple[Any, ...]) -> Any:
        count[0] += 1
        return real(fields)

    monkeypatch.setattr(lbpool._families, "_new_sample", counting)
    return count


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def echo(manager: lbpool.PoolManager, target: str, data: bytes = b"ping") -> None:
    with manager.get(target, timeout=2) as conn:
        conn.sendall(data)
        assert recv_exact(conn, len(data)) == data


@pytest.fixture
def servers() -> Iterator[list[EchoServer]]:
    with EchoServer() as a, EchoServer() as b:
        yield [a, b]


@pytest.fixture
def manager(servers: list[EchoServer]) -> Iterator[lbpool.PoolManager]:
    config = {
        "defaults": {"pool": {"min_idle": 0}, "breaker": {"failure_threshold": 2}},
        "backends": {"cache": {"servers": [s.address for s in servers]}},
    }
    with lbpool.PoolManager(config) as m:
        yield m


def test_exposition_matches_stats(manager: lbpool.PoolManager, servers: list[EchoServer]) -> None:
    for _ in range(10):
        echo(manager, "cache")
    echo(manager, servers[0].address)  # an ad-hoc host:port pool: backend ""
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    text = generate_latest(registry).decode()
    samples = parse(text)
    stats = manager.stats()
    for address, s in stats.backends["cache"].servers.items():
        labels = {"backend": "cache", "server": address}
        assert value(samples, "lbpool_acquired_total", **labels) == s.acquired
        assert value(samples, "lbpool_hits_total", **labels) == s.hits
        assert value(samples, "lbpool_misses_total", **labels) == s.misses
        assert value(samples, "lbpool_idle", **labels) == s.idle
        assert value(samples, "lbpool_size", **labels) == s.size
        assert value(samples, "lbpool_in_use", **labels) == 0
        assert value(samples, "lbpool_waiting", **labels) == 0
        assert value(samples, "lbpool_pending", **labels) == 0
        assert value(samples, "lbpool_max_size", **labels) == 10
        assert value(samples, "lbpool_breaker_state", **labels) == 0
        assert value(samples, "lbpool_breaker_trips_total", **labels) == 0
        assert value(samples, "lbpool_wait_time_seconds_total", **labels) == 0
        assert value(samples, "lbpool_waits_total", **labels) == s.waits == 0
        assert value(samples, "lbpool_released_total", **labels) == s.released == s.acquired
        assert value(samples, "lbpool_max_in_use", **labels) == s.max_in_use == 1
        for reason in ("idle", "lifetime", "unhealthy", "error", "discarded"):
            assert value(samples, "lbpool_closed_total", reason=reason, **labels) == 0
    assert sum(s.acquired for s in stats.backends["cache"].servers.values()) == 10
    adhoc = {"backend": "", "server": servers[0].address}
    assert value(samples, "lbpool_acquired_total", **adhoc) == 1
    # types as Prometheus sees them
    assert "# TYPE lbpool_acquired_total counter" in text
    assert "# TYPE lbpool_in_use gauge" in text
    assert "# TYPE lbpool_closed_total counter" in text
    assert "# TYPE lbpool_breaker_state gauge" in text
    assert "# TYPE lbpool_waits_total counter" in text
    assert "# TYPE lbpool_released_total counter" in text
    assert "# TYPE lbpool_max_in_use gauge" in text


def test_breaker_state_trips_and_close_reasons(
    manager: lbpool.PoolManager, servers: list[EchoServer]
) -> None:
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    echo(manager, "cache")
    conn = manager.acquire("cache")
    conn.discard(ValueError("app error"))  # closed: error (not a network error)
    dead = servers[1]
    dead.stop()
    for _ in range(6):  # dials to the dead server fail; failover serves every request
        echo(manager, "cache")
    samples = parse(generate_latest(registry).decode())
    labels = {"backend": "cache", "server": dead.address}
    assert value(samples, "lbpool_breaker_state", **labels) == 2  # open
    assert value(samples, "lbpool_breaker_trips_total", **labels) == 1
    assert value(samples, "lbpool_dial_failures_total", **labels) >= 2
    total_errors = sum(
        value(samples, "lbpool_closed_total", reason="error", backend="cache", server=s.address)
        for s in servers
    )
    assert total_errors == 1


def test_wait_time_is_exported(servers: list[EchoServer]) -> None:
    config = {"backends": {"one": {"servers": [servers[0].address], "pool": {"max_size": 1}}}}
    with lbpool.PoolManager(config) as manager:
        registry = CollectorRegistry()
        lbpool.metrics.register(manager, registry)
        conn = manager.acquire("one")
        waiter = gevent.spawn(manager.acquire, "one", 2.0)
        gevent.sleep(0.05)  # the waiter must wait a measurable time: that is the point
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "lbpool_waiting", backend="one", server=servers[0].address) == 1
        conn.release()
        waiter.get(timeout=2).release()
        samples = parse(generate_latest(registry).decode())
        labels = {"backend": "one", "server": servers[0].address}
        assert value(samples, "lbpool_wait_time_seconds_total", **labels) >= 0.04
        assert value(samples, "lbpool_wait_time_max_seconds", **labels) >= 0.04
        # the histogram: two acquisitions, one immediate (0 s), one waited >= 0.04 s
        assert value(samples, "lbpool_acquire_wait_seconds_count", **labels) == 2
        assert value(samples, "lbpool_acquire_wait_seconds_bucket", le="0.001", **labels) == 1
        assert value(samples, "lbpool_acquire_wait_seconds_bucket", le="0.025", **labels) == 1
        assert value(samples, "lbpool_acquire_wait_seconds_bucket", le="10.0", **labels) == 2
        assert value(samples, "lbpool_acquire_wait_seconds_bucket", le="+Inf", **labels) == 2
        assert value(samples, "lbpool_acquire_wait_seconds_sum", **labels) >= 0.04
        # the usage counters: one wait, two clean releases, one in use at most
        assert value(samples, "lbpool_waits_total", **labels) == 1
        assert value(samples, "lbpool_released_total", **labels) == 2
        assert value(samples, "lbpool_max_in_use", **labels) == 1


def test_register_does_not_take_a_snapshot() -> None:
    class Broken:
        def stats(self) -> lbpool.ManagerStats:
            raise AssertionError("collect() ran at registration")

    registry = CollectorRegistry(auto_describe=True)
    collector = lbpool.metrics.register(Broken(), registry)  # type: ignore[arg-type]
    registry.unregister(collector)


def test_scrape_over_http_thread_server(manager: lbpool.PoolManager) -> None:
    """prometheus_client's own HTTP server (a real thread) reads the snapshot safely."""
    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    httpd, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = httpd.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    samples = parse(text)
    acquired = sum(v for (name, _), v in samples.items() if name == "lbpool_acquired_total")
    assert acquired == 1


def test_lbpool_http_server_serves_written_lines_from_a_thread(
    manager: lbpool.PoolManager, made: list[int]
) -> None:
    """``lbpool.metrics.start_http_server``: a real thread serving lbpool's app, on IPv4
    and IPv6 loopback; the text says what prometheus_client's says, no ``Sample`` is
    made for lbpool's families, gzip when asked, and the server stops when shut down."""
    import gzip
    import socket

    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    hosts = ["127.0.0.1"]
    if socket.has_ipv6:
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
            hosts.append("::1")
        except OSError:
            pass
    for host in hosts:
        httpd, thread = lbpool.metrics.start_http_server(0, addr=host, registry=registry)
        try:
            assert thread.daemon and thread.is_alive()
            # the hub keeps turning: the manager's hub takes the snapshot for the thread
            head, body = get(httpd.server_port, "/metrics", "Accept-Encoding: gzip", host=host)
            assert head.startswith("HTTP/1.0 200") and "gzip" in head.lower(), head
            assert made[0] == 0
            assert view(gzip.decompress(body)) == view(generate_latest(registry))
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
        assert not thread.is_alive()
        made[0] = 0
    with pytest.raises(OSError):  # the port is taken: the bind's own error
        taken = gsocket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            lbpool.metrics.start_http_server(taken.getsockname()[1], "127.0.0.1", registry)
        finally:
            taken.close()


def test_scrape_over_gevent_wsgi(manager: lbpool.PoolManager) -> None:
    """The gevent way: make_wsgi_app on a pywsgi server in the pools' own hub."""
    for _ in range(3):
        echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    server = WSGIServer(("127.0.0.1", 0), make_wsgi_app(registry), log=None)
    server.start()
    try:
        sock = gsocket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        try:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        finally:
            sock.close()
    finally:
        server.stop(timeout=2)
    head, _, body = b"".join(chunks).decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") or head.startswith("HTTP/1.0 200"), head
    samples = parse(body)
    acquired = sum(v for (name, _), v in samples.items() if name == "lbpool_acquired_total")
    assert acquired == 3


def test_importing_lbpool_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, lbpool\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "import lbpool.metrics\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_call_counters_are_exported_per_backend(
    manager: lbpool.PoolManager, servers: list[EchoServer]
) -> None:
    def fail(conn: lbpool.PooledConnection) -> None:
        raise ConnectionResetError("the connection died in flight")  # a network error

    manager.call("cache", lambda conn: echo_on(conn))
    with pytest.raises(ConnectionResetError):
        manager.call("cache", fail)  # tried twice (attempts: 2)
    manager.call(servers[0].address, lambda conn: echo_on(conn))
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    text = generate_latest(registry).decode()
    samples = parse(text)
    stats = manager.stats()
    assert (stats.backends["cache"].calls, stats.backends["cache"].retries) == (2, 1)
    for backend in ("cache", ""):
        b = stats.backends[backend]
        assert value(samples, "lbpool_calls_total", backend=backend) == b.calls
        assert value(samples, "lbpool_retries_total", backend=backend) == b.retries
        assert value(samples, "lbpool_retries_denied_total", backend=backend) == b.retries_denied
    assert value(samples, "lbpool_calls_total", backend="") == 1
    assert "# TYPE lbpool_retries_denied_total counter" in text


def echo_on(conn: lbpool.PooledConnection, data: bytes = b"ping") -> None:
    conn.sendall(data)
    assert recv_exact(conn, len(data)) == data


class ReferenceCollector(lbpool.metrics.LbpoolCollector):
    """The plain way: ``manager.stats()``'s ``ServerStats``, exported one server at a
    time with ``add_metric``: what the collector's raw, column-wise path must equal."""

    def collect(self) -> Iterator[Any]:
        fam = self._families()
        stats = self.manager.stats()
        for name, backend in stats.backends.items():
            for address, s in backend.servers.items():
                labels = [name, address]
                for field, _, _ in lbpool.metrics._COUNTERS + lbpool.metrics._GAUGES:
                    fam[field].add_metric(labels, float(getattr(s, field)))
                for reason in CLOSE_REASONS:
                    fam["closed"].add_metric([*labels, reason], float(s.closed[reason]))
                fam["wait_time_total"].add_metric(labels, s.wait_time_total)
                fam["wait_time_max"].add_metric(labels, s.wait_time_max)
                states = lbpool.metrics.BREAKER_STATE_VALUES
                fam["breaker_state"].add_metric(labels, float(states[s.breaker_state]))
                buckets = [(repr(le), float(n)) for le, n in s.wait_buckets.items()]
                fam["acquire_wait"].add_metric(
                    labels, [*buckets, ("+Inf", float(s.wait_count))], s.wait_time_total
                )
            fam["panic"].add_metric([name], 1.0 if backend.panic else 0.0)
            if backend.discovery is not None:
                self._add_discovery(fam, name, backend.discovery)
            self._add_backend(fam, name, backend)
        yield from fam.values()


@contextlib.contextmanager
def queued(servers: list[EchoServer]) -> Iterator[tuple[lbpool.PoolManager, list[Any], Any]]:
    """A manager of one-connection pools with key-affinity hits (3 keys), an ad-hoc
    pool (backend ""), both "cache" connections held and a waiter queued for one:
    (manager, held connections, the waiter's greenlet)."""
    config = {
        "defaults": {"pool": {"min_idle": 0, "max_size": 1}},
        "backends": {
            "cache": {"servers": [s.address for s in servers]},
            "keyed": {"servers": [s.address for s in servers], "strategy": "maglev"},
        },
    }
    with lbpool.PoolManager(config) as manager:
        for key in (b"a", b"b", b"c"):
            with manager.get("keyed", key=key, timeout=5):
                pass
        echo(manager, servers[0].address)  # ad-hoc: backend ""
        held = [manager.acquire("cache", timeout=5) for _ in servers]
        waiter = gevent.spawn(manager.acquire, "cache", 5)
        assert settle(lambda: sum(s.waiting for s in manager.stats().servers()) == 1, 5)
        yield manager, held, waiter


@pytest.mark.parametrize("servers_a_slice", [1, 3, 100])
def test_the_raw_column_path_exports_what_add_metric_would(
    servers: list[EchoServer], monkeypatch: pytest.MonkeyPatch, servers_a_slice: int
) -> None:
    """Mid-borrow, with a waiter, a discard, a key-affinity backend (owner hits) and an
    ad-hoc pool: the same families, samples (name, labels, value, in order) and
    exposition text as ``add_metric`` over ``manager.stats()``, and lbpool's written
    lines say the same; with slices of one server (a backend cut in two), of three (a
    backend that does not fit starts the next) and of all five (three backends)."""
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SECONDS", 1e9)  # no yield between the two
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", servers_a_slice)
    with queued(servers) as (manager, held, waiter):
        try:
            written = CollectorRegistry()
            written.register(lbpool.metrics.LbpoolCollector(manager))
            new, ref = lbpool.metrics.LbpoolCollector(manager), ReferenceCollector(manager)
            text = lbpool.metrics.generate_latest(written)
            got, expected = list(new.collect()), list(ref.collect())
            assert [f.name for f in got] == [f.name for f in expected]
            for f, e in zip(got, expected, strict=True):
                assert f.samples == e.samples, f.name
            owner = next(f for f in got if f.name == "lbpool_owner_hits")
            assert sum(s.value for s in owner.samples) == 3
            a, b = CollectorRegistry(), CollectorRegistry()
            a.register(new)
            b.register(ref)
            assert generate_latest(a) == generate_latest(b)
            assert view(text) == view(generate_latest(b))
            slices = new._line_templates._now  # (runs, addresses) -> templates
            sizes = sorted(len(addresses) for _, addresses in slices)
            assert sizes == {1: [1] * 5, 3: [2, 3], 100: [5]}[servers_a_slice]
        finally:
            held[0].discard(ValueError("done"))  # the waiter gets a fresh one
            waiter.get(timeout=5).release()
            for conn in held[1:]:
                conn.release()
        got, expected = list(new.collect()), list(ref.collect())
        assert [f.samples for f in got] == [f.samples for f in expected]


def test_a_collector_subclass_feeding_its_own_numbers_is_written_as_the_encoder_writes(
    servers: list[EchoServer],
) -> None:
    """A subclass whose snapshot hands other number types (float counts) and a pool's
    wait counts as a list: lbpool's lines, compiled or not, are what prometheus_client's
    encoder writes for the same samples (the compiled histogram once refused them)."""
    from lbpool._snapshot import RAW_FIELDS

    hits, counts = RAW_FIELDS.index("hits"), RAW_FIELDS.index("wait_counts")

    class OwnNumbers(lbpool.metrics.LbpoolCollector):
        def _snapshot(self) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, (backend, raws, owned) in super()._snapshot().items():
                changed = []
                for raw in raws:
                    fields = list(raw)
                    fields[hits] = float(fields[hits]) + 0.5
                    if fields[counts] is not None:
                        fields[counts] = list(fields[counts])
                    changed.append(tuple(fields))
                out[name] = (backend, changed, owned)
            return out

    with queued(servers) as (manager, held, waiter):
        try:
            registry = CollectorRegistry()
            registry.register(OwnNumbers(manager))
            ours = lbpool.metrics.generate_latest(registry)
            assert ours == generate_latest(registry)
            assert b'lbpool_hits_total{backend="cache",server=' in ours
            assert b".5\n" in ours  # the float counts went in as floats
        finally:
            held[0].discard(ValueError("done"))  # the waiter gets a fresh one
            waiter.get(timeout=5).release()
            for conn in held[1:]:
                conn.release()


# -- lbpool's own lines (lbpool._families) ----------------------------------------------


def test_go_float_numbers_and_escape_write_the_text_format() -> None:
    """Values as the text format (Go's float64 form) writes them, whole numbers from the
    table and the rest one by one; label values escaped."""
    from lbpool._families import escape, go_float, number_bytes

    cases = {
        0: "0.0",
        7: "7.0",
        4095: "4095.0",
        4096: "4096.0",
        999999: "999999.0",
        1234567: "1.234567e+06",
        10**6: "1e+06",
        0.25: "0.25",
        1.5e-7: "1.5e-07",
        1e16: "1e+16",
        -3.0: "-3.0",
        float("inf"): "+Inf",
        float("-inf"): "-Inf",
        True: "1.0",
    }
    for number, text in cases.items():
        assert go_float(number) == text, number
    ends = [f"{t}\n".encode() for t in cases.values()]  # a line's end, ASCII
    assert number_bytes(list(cases)) == ends
    assert number_bytes([1, 2, 3]) == [b"1.0\n", b"2.0\n", b"3.0\n"]  # all from the table
    assert number_bytes((5000, 999999, 4)) == [b"5000.0\n", b"999999.0\n", b"4.0\n"]
    assert number_bytes((5000, 10**6)) == [b"5000.0\n", b"1e+06\n"]
    assert number_bytes((5000, -1)) == [b"5000.0\n", b"-1.0\n"]
    assert number_bytes((5000, 0.5)) == [b"5000.0\n", b"0.5\n"]
    assert number_bytes([float("nan"), 1]) == [b"NaN\n", b"1.0\n"]
    assert number_bytes(()) == []
    assert escape("plain:1") == "plain:1"
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_the_text_path_writes_lines_without_making_samples(
    servers: list[EchoServer], made: list[int]
) -> None:
    """``lbpool.metrics.generate_latest`` writes the per-server families' lines from the
    snapshot's columns (no ``Sample`` made), saying what prometheus_client says when it
    formats the same families' samples: with waits in the histogram, key-affinity hits,
    an ad-hoc pool and a discarded connection. Other formats, and families whose
    samples were already read, still go through prometheus_client's encoder."""
    with queued(servers) as (manager, held, waiter):
        gevent.sleep(0.003)  # the waiter's wait passes the first buckets
        held[0].discard(ValueError("done"))
        waiter.get(timeout=5).release()
        for conn in held[1:]:
            conn.release()
        registry = CollectorRegistry()
        lbpool.metrics.register(manager, registry)
        ours = lbpool.metrics.generate_latest(registry)
        assert made[0] == 0
        theirs = generate_latest(registry)  # prometheus_client reads the samples
        assert made[0] > 0
        assert view(ours) == view(theirs)
        text = ours.decode()
        address = servers[0].address
        assert f'lbpool_max_size{{backend="cache",server="{address}"}} 1.0\n' in text
        assert 'lbpool_closed_total{backend="cache",reason="discarded",server=' in text
        assert (
            f'lbpool_acquire_wait_seconds_bucket{{backend="",le="+Inf",server="{address}"}}' in text
        )
        waits = parse(text)
        served = [
            v
            for (name, labels), v in waits.items()
            if name == "lbpool_acquire_wait_seconds_bucket" and ("le", "0.001") in labels
        ]
        assert len(served) == 5 and sum(s.acquired for s in manager.stats().servers()) > sum(served)
        # a family whose samples were read is formatted by the encoder, from them
        families = list(lbpool.metrics.LbpoolCollector(manager).collect())
        size = next(f for f in families if f.name == "lbpool_size")
        assert size.lazy and len(size.samples) == 5 and not size.lazy
        made[0] = 0
        once = lbpool._scrape._expose(generate_latest, lbpool._scrape._Metrics(families))
        assert made[0] == 0  # the others were still written as lines
        assert view(once) == view(theirs)
        # OpenMetrics: from the samples, prometheus_client's bytes
        from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

        encoder, _ = prometheus_client.exposition.choose_encoder(
            "application/openmetrics-text; version=1.0.0"
        )
        assert lbpool._scrape._expose(encoder, registry) == openmetrics(registry)


def test_escaping_that_rewrites_names_goes_through_the_encoder(
    manager: lbpool.PoolManager,
) -> None:
    """An ``escaping`` that rewrites even legacy names (prometheus_client 0.23's DOTS):
    prometheus_client's own bytes; the schemes that keep them write the lines."""
    from prometheus_client.openmetrics import exposition as om

    import lbpool._scrape as scrape

    if not hasattr(om, "DOTS"):
        pytest.skip("this prometheus_client has no escaping schemes")
    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    dots = lbpool.metrics.generate_latest(registry, escaping=om.DOTS)
    assert dots == generate_latest(registry, escaping=om.DOTS)
    assert not scrape._writes_lines(partial(generate_latest, escaping=om.DOTS))
    assert scrape._writes_lines(partial(generate_latest, escaping=om.VALUES))
    values = lbpool.metrics.generate_latest(registry, escaping=om.VALUES)
    assert view(values) == view(generate_latest(registry, escaping=om.VALUES))
    assert scrape._writes_lines(partial(generate_latest, escaping=om.ALLOWUTF8))
    assert scrape._writes_lines(generate_latest)
    assert not scrape._writes_lines(partial(generate_latest, registry))
    utf8 = lbpool.metrics.generate_latest(registry, escaping=om.ALLOWUTF8)
    assert view(utf8) == view(generate_latest(registry, escaping=om.ALLOWUTF8))


def unread_families(manager: lbpool.PoolManager) -> dict[str, Any]:
    """One fresh collect()'s families by name, none of their samples read."""
    return {f.name: f for f in lbpool.metrics.LbpoolCollector(manager).collect()}


def test_a_lazy_family_copies_pickles_and_is_read_whole_by_overlapping_readers(
    manager: lbpool.PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy or a pickle of an unread family makes its samples first (the copy shares
    them; nothing doubles); two greenlets reading one family while the first pauses
    between slices, or two threads, each get the whole list; a family read first in a
    greenlet and then in a thread with no hub makes no hub there."""
    import copy
    import pickle
    import threading

    from gevent._hub_local import get_hub_if_exists

    for _ in range(4):
        echo(manager, "cache")
    expected = {f.name: f.samples for f in unread_families(manager).values()}
    assert sum(s.value for s in expected["lbpool_acquired"]) == 4
    families = unread_families(manager)
    size = families["lbpool_size"]
    copied = copy.copy(size)
    assert copied.samples == size.samples == expected["lbpool_size"]
    assert len(size.samples) == len(expected["lbpool_size"]) == 2
    wait = unread_families(manager)["lbpool_acquire_wait_seconds"]
    assert pickle.loads(pickle.dumps(wait)) == wait
    assert wait.samples == expected["lbpool_acquire_wait_seconds"]

    monkeypatch.setattr(lbpool.metrics, "_SLICE_SECONDS", 0.0)  # every slice pauses
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", 1)
    families = unread_families(manager)
    closed = families["lbpool_closed"]
    readers = [gevent.spawn(lambda: closed.samples) for _ in range(2)]
    got = [r.get(timeout=10) for r in readers]
    assert got[0] is got[1] and got[0] == expected["lbpool_closed"]
    from_threads: list[Any] = []
    hubs: list[Any] = []
    hits = families["lbpool_hits"]

    def read() -> None:
        # after one read here: (hits, misses) per thread
        from_threads.append((hits.samples, families["lbpool_misses"].samples))
        hubs.append(get_hub_if_exists())

    assert families["lbpool_acquired"].samples  # first read: in this greenlet
    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # the manager's hub keeps turning
            gevent.sleep(0.005)
    both = (expected["lbpool_hits"], expected["lbpool_misses"])
    assert from_threads == [both, both]
    assert hubs == [None, None]


def test_a_reader_that_loses_the_race_to_another_thread_reads_the_winners_list(
    manager: lbpool.PoolManager,
) -> None:
    """Another thread makes and publishes a family's samples between a reader's two
    looks at the family (made deterministic: the family's ``__dict__`` runs that
    thread's whole read inside the first look). The late reader returns the published
    list, and a writer of lines that finds the samples made meanwhile leaves the
    family to the encoder; both used to raise ``KeyError('_source')``."""
    import threading

    from lbpool._scrape import _written

    echo(manager, "cache")
    expected = unread_families(manager)["lbpool_size"].samples

    class Interleaved(dict[str, Any]):
        """On the first look at ``key``: the old value, after another thread's read."""

        def __init__(self, state: dict[str, Any], family: Any, key: str) -> None:
            super().__init__(state)
            self.family, self.key, self.other, self.raced = family, key, [], False

        def get(self, key: str, default: Any = None) -> Any:
            value = super().get(key, default)
            if key == self.key and not self.raced:
                self.raced = True  # once: the other thread's own looks go through
                other = threading.Thread(target=lambda: self.other.append(self.family.samples))
                other.start()
                other.join(10)
            return value

    family = unread_families(manager)["lbpool_size"]
    family.__dict__ = Interleaved(family.__dict__, family, "_samples")
    assert family.samples == expected and family.__dict__.other == [expected]
    assert family.samples is family.__dict__.other[0]  # the winner's list, kept
    family = unread_families(manager)["lbpool_size"]
    family.__dict__ = Interleaved(family.__dict__, family, "_source")  # in `lazy`
    assert _written(generate_latest, family, lbpool._scrape.Pacer(pauses=False)) is None
    assert family.__dict__.other == [expected] and not family.lazy


def test_a_subclass_with_plain_families_gets_their_samples(manager: lbpool.PoolManager) -> None:
    """A subclass whose ``_families`` makes prometheus_client's plain families (not
    lazy): the samples are added to them, as before families were lazy, and both
    expositions agree."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Plain(lbpool.metrics.LbpoolCollector):
        def _families(self) -> dict[str, Any]:
            fam = super()._families()
            for key, family in list(fam.items()):
                if isinstance(family, lbpool._families.LazyFamily):
                    kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
                    if family.type in kind:
                        plain = kind[family.type](family.name, family.documentation, labels=[])
                        plain._labelnames = family._labelnames
                        fam[key] = plain
            return fam

    echo(manager, "cache")
    plain = {f.name: f for f in Plain(manager).collect()}
    assert not isinstance(plain["lbpool_size"], lbpool._families.LazyFamily)
    lazy = {f.name: f.samples for f in unread_families(manager).values()}
    assert {name: f.samples for name, f in plain.items()} == lazy
    registry = CollectorRegistry()
    registry.register(Plain(manager))
    assert view(lbpool.metrics.generate_latest(registry)) == view(generate_latest(registry))


def test_a_value_the_text_format_cannot_write_is_an_error_naming_the_family(
    manager: lbpool.PoolManager,
) -> None:
    """As prometheus_client's encoder names the metric it failed on (the last of the
    error's args), so does a written family."""
    import lbpool._families as families

    echo(manager, "cache")
    family = unread_families(manager)["lbpool_size"]
    slices, rows, pacer, _ = family._source

    def broken(piece: Any) -> Any:
        names, extra, values = rows(piece)
        return names, extra, [object()] * len(values)

    family.attach(slices, broken, pacer)
    with pytest.raises(TypeError) as caught:
        lbpool._scrape._expose(generate_latest, lbpool._scrape._Metrics([family]))
    assert caught.value.args[-1] is family
    assert "lbpool_size" in str(caught.value)  # its repr does not make its samples again
    assert isinstance(family, families.LazyFamily)


def test_a_family_written_from_odd_labels_says_what_the_encoder_says() -> None:
    """A slice whose backend and addresses hold a ``%`` (an IPv6 zone, a backend's
    name), a double quote, a backslash or a line feed: the written lines (a template
    with a slot per value) say what prometheus_client's encoder says of the same
    samples, first and second time (the template kept), one sample per server or
    several; a row of the wrong length is an error that names the backend."""
    from lbpool._families import ServerSlice
    from lbpool._pacing import Pacer

    addresses = ("[fe80::1%eth0]:11211", 'q"uo\\te:1', "l\nf%s:2", "100%%:3")
    piece = ServerSlice('b%d"\\n', addresses, {"v": [0, 5000, 0.25, 10**7]})
    values = piece.col["v"]

    def one(p: ServerSlice) -> Any:
        return ("odd_gauge",), (None,), p.col["v"]

    def three(p: ServerSlice) -> Any:
        extra = (("reason", "a%sb"), None, ("reason", 'x"'))
        return ("odd_gauge",) * 3, extra, [v for v in p.col["v"] for _ in range(3)]

    for rows in (one, three):
        family = lbpool.metrics._LazyGauge("odd_gauge", "Odd.", labels=["backend", "server"])
        family.attach([piece], rows, lambda: Pacer(pauses=False))
        text = [family.text_lines(Pacer(pauses=False)) for _ in range(2)]
        assert text[0] == text[1] and len(piece.templates) == 1 + (rows is three)
        family.samples  # noqa: B018 (made: the encoder formats them)
        expected = generate_latest(lbpool._scrape._Metrics([family]))
        header = lbpool._scrape._header(generate_latest, "odd_gauge", family)
        assert view(header + b"".join(text[0] or [])) == view(expected)
        assert len(view(expected)[0][3]) == len(values) * (3 if rows is three else 1)

    family = lbpool.metrics._LazyGauge("odd_gauge", "Odd.", labels=["backend", "server"])
    family.attach([piece], lambda p: (("odd_gauge",), (None,), [1, 2]), Pacer)
    with pytest.raises(ValueError, match="2 values for 4 servers of backend 'b%d"):
        family.text_lines(Pacer(pauses=False))


def test_every_slot_writes_its_value_as_prometheus_client_does() -> None:
    """Each value in a written line is what prometheus_client writes for the same
    sample (``floatToGoString``), whichever way the slice's values go in: a column of
    floats written by the template (``%r``), of ints below 1e6 (``%d``), whole numbers
    from the table, values beyond it (an exponent), a float the text format writes
    otherwise (NaN, infinities), a float subclass that bytes formatting would take as
    raw bytes, mixed columns, one sample per server or several."""
    from prometheus_client.utils import floatToGoString

    from lbpool._families import ServerSlice
    from lbpool._pacing import Pacer

    class BytesLike(float):  # a value bytes formatting would take as it is (numpy's)
        def __bytes__(self) -> bytes:
            return b"\x88"

    columns = {
        "floats": [0.25, 1.5e-05, 3.0, 123456.789],
        "counts": [0, 7, 4095, 1],
        "below_1e6": [4096, 999999, 0, 5000],
        "beyond_the_table": [4096, 999999, 10**6, 1234567],
        "bytes_like": [BytesLike(5000), 1, 2, BytesLike(0.5)],
        "zeros": [-0.0, 0.5, 0.0, -0.0],  # kept floats' ends: neither zero kept
        "odd_floats": [1e7, float("nan"), float("inf"), -2.5],
        "mixed": [True, 0.5, 5000, 2],
    }
    piece = ServerSlice("b", ("a:1", "a:2", "a:3", "a:4"), columns)
    layouts = [[name] for name in columns] + [
        ["counts", "floats", "beyond_the_table"],  # floats beside table misses
        ["floats", "counts", "floats"],
        ["odd_floats", "floats", "mixed"],
        ["below_1e6", "bytes_like", "floats", "counts"],
        ["counts", "bytes_like", "floats"],
        ["zeros", "floats", "zeros"],
    ]
    for layout in layouts:
        k = len(layout)

        def rows(p: ServerSlice, layout: list[str] = layout, k: int = k) -> Any:
            values = [p.col[name][i] for i in range(len(p.addresses)) for name in layout]
            return ("odd",) * k, tuple(("col", f"{j}") for j in range(k)), values

        family = lbpool.metrics._LazyGauge("odd", "Odd.", labels=["backend", "server"])
        family.attach([piece], rows, lambda: Pacer(pauses=False))
        twice = [family.text_lines(Pacer(pauses=False)) or [] for _ in range(2)]  # kept
        for text in twice:
            written = [line.rpartition(" ")[2] for line in b"".join(text).decode().splitlines()]
            assert written == [floatToGoString(s.value) for s in family.samples], layout


def test_per_backend_families_are_written_as_prometheus_client_writes_them() -> None:
    """lbpool's per-backend families (one sample a backend) are written by lbpool: the
    same bytes as prometheus_client's encoder, odd backend names and values included;
    a family it cannot write so (a sample with a timestamp, another sample's name, a
    label name outside the legacy set) is left to the encoder, and says the same."""
    from prometheus_client.samples import Sample

    from lbpool._pacing import Pacer

    def families() -> list[Any]:
        gauge = lbpool.metrics._WrittenGauge("odd_gauge", "Odd %s.", labels=["backend"])
        for i, backend in enumerate(['q"uo\\te', "l\nf", "100%", "", "ünï"]):
            gauge.add_metric([backend], [0.0, 0.5, 10**7, float("nan"), 1.7e9][i])
        counter = lbpool.metrics._WrittenCounter("odd", "Odd.", labels=["backend"])
        counter.add_metric(["a"], 3.0)
        counter.add_metric(["b"], float("inf"))
        return [gauge, counter]

    for family in families():
        lines = family.text_lines(Pacer(pauses=False))
        expected = generate_latest(lbpool._scrape._Metrics([family]))
        header = lbpool._scrape._header(generate_latest, family.name, family)
        assert header + b"".join(lines) == expected
    registry = CollectorRegistry()
    registry.register(lbpool._scrape._Metrics(families()))
    assert lbpool.metrics.generate_latest(registry) == generate_latest(registry)

    gauge, counter = families()
    gauge.add_metric(["t"], 1.0, timestamp=5)
    counter.add_metric(["c"], 1.0, created=2.0)  # an odd_created sample
    utf8 = lbpool.metrics._WrittenGauge("g", "G.", labels=[])
    utf8.samples.append(Sample("g", {"ünï": "x"}, 1.0))
    many = lbpool.metrics._WrittenGauge("many", "Many.", labels=["backend"])
    for i in range(1100):  # paced: a check every 512 samples, and after the last
        many.add_metric([f"b{i}"], float(i))
    checks: list[int] = []
    lines = many.text_lines(lambda: checks.append(1))
    assert len(checks) == 3 and lines is not None and b"".join(lines).count(b"\n") == 1100
    reserved = lbpool.metrics._WrittenGauge("r", "R.", labels=["__x"])  # quoted under UTF-8
    reserved.add_metric(["1"], 1.0)
    for family in (gauge, counter, utf8, reserved):
        assert family.text_lines(Pacer(pauses=False)) is None, family.name
        registry = CollectorRegistry()
        registry.register(lbpool._scrape._Metrics([family]))
        assert lbpool.metrics.generate_latest(registry) == generate_latest(registry)


def test_a_backend_keeps_its_lines_when_the_slices_around_it_move(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slices of three servers over backends of one, two and two: when the first backend
    grows, the slices after it change, but the last backend's lines are the same run
    templates (joined into the new slices, not made again), and the text is what
    prometheus_client says."""
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", 3)
    with contextlib.ExitStack() as stack:
        echo_servers = [stack.enter_context(EchoServer()) for _ in range(6)]
        a = [e.address for e in echo_servers]

        def config(first: int) -> dict[str, Any]:
            backends = {"a": a[:first], "b": a[3:5], "c": a[5:6] + a[2:3]}
            return {
                "defaults": {"pool": {"min_idle": 0}},
                "backends": {name: {"servers": servers} for name, servers in backends.items()},
            }

        manager = stack.enter_context(lbpool.PoolManager(config(1)))
        collector = lbpool.metrics.LbpoolCollector(manager)
        registry = CollectorRegistry()
        registry.register(collector)

        def scrape() -> dict[Any, Any]:  # the runs' templates, after a scrape
            assert view(lbpool.metrics.generate_latest(registry)) == view(generate_latest(registry))
            return dict(collector._line_templates._runs_now)

        before = scrape()
        slices_before = set(collector._line_templates._now)
        manager.reload(config(2))
        after = scrape()
        assert set(collector._line_templates._now) != slices_before  # the slices moved
        c = ("c", (a[5], a[2]))
        assert after[c] is before[c] and after[c]  # c's run templates kept, and used


def test_line_templates_follow_the_fleet(servers: list[EchoServer]) -> None:
    """A collector keeps each slice's line templates from one scrape to the next, and
    its text follows the fleet: a server added or removed by a reload is in the next
    scrape's lines or gone from them, and the templates of slices no scrape uses any
    more are let go (two scrapes later)."""
    with EchoServer() as third:
        addresses = [s.address for s in servers]
        config = {
            "defaults": {"pool": {"min_idle": 0}},
            "backends": {"cache": {"servers": addresses}},
        }
        with lbpool.PoolManager(config) as manager:
            collector = lbpool.metrics.LbpoolCollector(manager)
            registry = CollectorRegistry()
            registry.register(collector)
            templates = collector._line_templates

            def kept() -> set[str]:  # the addresses of the slices whose templates are kept
                both = (templates._now, templates._before)
                return {
                    a
                    for generation in both
                    for _, slice_addresses in generation
                    for a in slice_addresses
                }

            def scrape() -> set[str]:  # the servers in the text, checked against the encoder's
                echo(manager, "cache")
                text = lbpool.metrics.generate_latest(registry)
                assert view(text) == view(generate_latest(registry))
                return {
                    s.labels["server"]
                    for f in text_string_to_metric_families(text.decode())
                    for s in f.samples
                    if "server" in s.labels
                }

            assert scrape() == set(addresses) == kept()
            first = dict(templates._now)
            assert scrape() == set(addresses)
            assert all(templates._now[key] is made for key, made in first.items())  # kept
            manager.reload(
                {**config, "backends": {"cache": {"servers": [*addresses, third.address]}}}
            )
            assert scrape() == {*addresses, third.address}
            manager.reload(
                {**config, "backends": {"cache": {"servers": [addresses[1], third.address]}}}
            )
            for _ in range(2):
                assert scrape() == {addresses[1], third.address}
            assert kept() == {addresses[1], third.address}


def test_a_wsgi_body_is_chunks_of_the_text_not_one_join() -> None:
    """The body of a big scrape: chunks of about ``_BODY_CHUNK`` bytes whose
    concatenation is the text."""
    registry = CollectorRegistry()
    registry.register(Many(20000))
    pieces = lbpool._scrape._expose_pieces(generate_latest, registry)
    body = lbpool._scrape._coalesced(pieces)
    assert b"".join(body) == generate_latest(registry)
    assert len(body) > 1 and all(len(c) >= lbpool._scrape._BODY_CHUNK for c in body[:-1])
    assert lbpool._scrape._coalesced([]) == []


# -- paced exposition (lbpool.metrics.generate_latest, make_wsgi_app) -------------------


def slice_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 0 s: every check of a scrape's pacers (the collector's, the
    exposition's) pauses, whatever the machine's speed."""
    monkeypatch.setattr(lbpool.metrics, "_SLICE_SECONDS", 0.0)
    monkeypatch.setattr(lbpool._scrape, "_SLICE_SECONDS", 0.0)


class Many:
    """A collector of one gauge family with ``n`` samples (not lbpool's: the paced
    exposition paces any registry's formatting)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def collect(self) -> Iterator[Any]:
        family = prometheus_client.core.GaugeMetricFamily("many", "Many samples.", labels=["i"])
        for i in range(self.n):
            family.add_metric([f'{i}"\\\n'], float(i))  # label escaping too
        yield family


def mixed_registry(manager: lbpool.PoolManager) -> CollectorRegistry:
    """lbpool's collector beside prometheus_client's own metric kinds (a counter with
    its ``_created`` samples, a histogram, an info) and a big plain family."""
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    counter = prometheus_client.Counter("requests", "Requests.", ["path"], registry=registry)
    counter.labels("/a").inc(3)
    prometheus_client.Histogram("latency_seconds", "Latency.", registry=registry).observe(0.3)
    prometheus_client.Info("build", "Build.", registry=registry).info({"version": "1"})
    registry.register(Many(500))
    return registry


def test_paced_exposition_is_prometheus_clients_text(
    manager: lbpool.PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes as ``prometheus_client.generate_latest``: paced at every check in
    a greenlet, in the hub (never paced) and in an OS thread with no hub."""
    import threading

    for _ in range(3):
        echo(manager, "cache")
    registry = mixed_registry(manager)
    expected = generate_latest(registry)
    slice_all(monkeypatch)  # every check pauses
    got = gevent.spawn(lbpool.metrics.generate_latest, registry).get(timeout=30)
    assert view(got) == view(expected)
    in_hub = gevent.event.AsyncResult()
    gevent.get_hub().loop.run_callback(lambda: in_hub.set(lbpool.metrics.generate_latest(registry)))
    assert view(in_hub.get(timeout=30)) == view(expected)
    from_thread: list[bytes] = []
    thread = threading.Thread(
        target=lambda: from_thread.append(lbpool.metrics.generate_latest(registry))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while thread.is_alive():  # the manager's hub takes the snapshot: keep it turning
        assert time.monotonic() < deadline, "the scrape thread did not finish in 30 s"
        gevent.sleep(0.01)
    thread.join()
    assert len(from_thread) == 1 and view(from_thread[0]) == view(expected)


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every check of the exposition's pacers pauses (slices of 0 s); the list grows by
    one per pause taken: 1 for a check, 2 for a ``pause_now`` (a big metric's own
    pauses)."""
    taken: list[int] = []

    class Counting(lbpool._scrape.Pacer):
        def __call__(self) -> bool:
            paused = super().__call__()
            if paused:
                taken.append(1)
            return paused

        def pause_now(self) -> bool:
            paused = super().pause_now()
            if paused:
                taken.append(2)  # before a big metric's lines are joined
            return paused

    monkeypatch.setattr(lbpool._scrape, "Pacer", Counting)
    slice_all(monkeypatch)
    return taken


def test_paced_exposition_lets_the_hub_turn(pauses: list[int]) -> None:
    """Formatting a big registry in a greenlet pauses while it goes, once per
    ``_EXPOSE_EVERY`` samples (a ticker gets turns during it), where
    prometheus_client's own ``generate_latest`` formats in one go."""
    from tests.library.test_snapshots import turns_during

    registry = CollectorRegistry()
    registry.register(Many(4000))
    turns, text = turns_during(lambda: lbpool.metrics.generate_latest(registry))
    assert text == generate_latest(registry)
    assert pauses.count(1) >= 4000 // lbpool._scrape._EXPOSE_EVERY, len(pauses)
    # one big metric: a pause before its lines are joined, one before its samples go
    assert pauses.count(2) == 2
    assert turns >= len(pauses), turns
    pauses.clear()  # a metric under _BIG_METRIC samples: no pause of its own
    small = CollectorRegistry()
    small.register(Many(lbpool._scrape._BIG_METRIC - 1))
    assert gevent.spawn(lbpool.metrics.generate_latest, small).get(timeout=30)
    assert pauses.count(2) == 0 and pauses.count(1) >= 10


def test_written_lines_pause_once_a_slice_of_servers(
    manager: lbpool.PoolManager, pauses: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing lbpool's families checks the scrape's pacer after each slice of
    servers: with slices of one server instead of one slice, every written family
    pauses once more per extra server (here: one more per family)."""
    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    written = sum(isinstance(f, lbpool._families.LazyFamily) for f in registry.collect())
    assert written == 23
    taken = []
    for servers_a_slice in (50, 1):  # one slice of the 2 servers, then two
        monkeypatch.setattr(lbpool.metrics, "_SLICE_SERVERS", servers_a_slice)
        pauses.clear()
        text = gevent.spawn(lbpool.metrics.generate_latest, registry).get(timeout=30)
        assert view(text) == view(generate_latest(registry))
        taken.append(pauses.count(1))
    assert taken[1] - taken[0] >= written, taken


def get(
    port: int, path: str, *headers: str, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[str, bytes]:
    """One HTTP/1.0 request to a local server, over a gevent socket (the hub keeps
    turning while it waits): (head, body)."""
    sock = gsocket.create_connection((host, port), timeout=10)
    try:
        extra = "".join(f"{h}\r\n" for h in headers)
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: x\r\n{extra}\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


@pytest.fixture
def wsgi_server() -> Iterator[Any]:
    started: list[WSGIServer] = []

    def start(app: Any) -> int:
        server = WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        started.append(server)
        return int(server.server_port)

    yield start
    for server in started:
        server.stop(timeout=2)


def test_paced_wsgi_app_answers_as_prometheus_clients(
    manager: lbpool.PoolManager, wsgi_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over gevent's WSGI server, paced at every check: the text format, gzip (the
    client accepts it: same text once decompressed), OpenMetrics by ``Accept``,
    ``name[]`` filtering, ``OPTIONS`` and 405 as prometheus_client's app answers them."""
    import gzip

    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

    echo(manager, "cache")
    registry = mixed_registry(manager)
    slice_all(monkeypatch)
    ours = wsgi_server(lbpool.metrics.make_wsgi_app(registry))
    theirs = wsgi_server(make_wsgi_app(registry, disable_compression=True))
    text = generate_latest(registry)

    head, body = get(ours, "/metrics")
    assert head.startswith("HTTP/1.1 200") and view(body) == view(text), head
    assert "content-encoding" not in head.lower()
    head, body = get(ours, "/metrics", "Accept-Encoding: gzip")
    assert "content-encoding: gzip" in head.lower(), head
    assert view(gzip.decompress(body)) == view(text)
    openmetrics = "Accept: application/openmetrics-text; version=1.0.0"
    head, body = get(ours, "/metrics", openmetrics)
    assert body == openmetrics_latest(registry)
    assert head.lower().count("application/openmetrics-text") == 1, head
    filtered = "/metrics?name[]=lbpool_size&name[]=lbpool_in_use"
    for path, extra in ((filtered, ()), ("/metrics", (openmetrics,))):  # from samples
        assert get(ours, path, *extra)[1] == get(theirs, path, *extra)[1], path
    assert view(get(ours, "/", "Accept: x")[1]) == view(get(theirs, "/", "Accept: x")[1])
    families = {f.name for f in text_string_to_metric_families(get(ours, filtered)[1].decode())}
    assert families == {"lbpool_size", "lbpool_in_use"}
    for method in ("OPTIONS", "POST"):
        head, body = get(ours, "/metrics", method=method)
        their_head, their_body = get(theirs, "/metrics", method=method)
        assert head.split("\r\n")[0] == their_head.split("\r\n")[0] and body == their_body
    head, body = get(ours, "/metrics", "Accept-Encoding: gzip", method="POST")
    assert head.startswith("HTTP/1.1 405") and b"405" in body  # an error is not compressed


def test_paced_wsgi_app_lets_the_hub_turn_while_compressing(
    wsgi_server: Any, monkeypatch: pytest.MonkeyPatch, pauses: list[int]
) -> None:
    """A gzip scrape of a big registry: compression pauses once per ``_GZIP_CHUNK``
    bytes compressed (a ticker gets turns during the request), and the body is the
    text."""
    import gzip

    from tests.library.test_snapshots import turns_during

    registry = CollectorRegistry()
    registry.register(Many(4000))
    text = generate_latest(registry)
    port = wsgi_server(lbpool.metrics.make_wsgi_app(registry))
    monkeypatch.setattr(lbpool._scrape, "_EXPOSE_EVERY", 10**9)  # only compression pauses
    monkeypatch.setattr(lbpool._scrape, "_GZIP_CHUNK", 1024)
    turns, (_, body) = turns_during(lambda: get(port, "/metrics", "Accept-Encoding: gzip"))
    assert gzip.decompress(body) == text
    assert len(pauses) >= len(text) // 1024, (len(pauses), len(text))
    assert turns >= len(pauses), turns


def test_a_format_whose_pieces_do_not_concatenate_is_made_in_one_go() -> None:
    """An encoder whose per-output part is not a trailer (here a count of the metrics
    at the end) cannot be made one metric at a time: the whole registry in one go, the
    same bytes. A collector's own metric objects are left as they were."""
    family = prometheus_client.core.GaugeMetricFamily("kept", "Kept.", labels=["i"])
    for i in range(3):
        family.add_metric([str(i)], float(i))

    class Persistent:
        def collect(self) -> Iterator[Any]:
            yield family

    registry = CollectorRegistry()
    registry.register(Persistent())
    registry.register(Many(5))

    def counting(source: Any) -> bytes:
        metrics = list(source.collect())
        lines = [f"{m.name} {len(list(m.samples))}\n" for m in metrics]
        return "".join([*lines, f"# {len(metrics)} metrics\n"]).encode()

    assert lbpool._scrape._expose(counting, registry) == b"kept 3\nmany 5\n# 2 metrics\n"
    # the first piece is a big metric alone: the rest of the registry is read on
    big_first = CollectorRegistry()
    big_first.register(Many(lbpool._scrape._BATCH))
    big_first.register(Persistent())
    expected = f"many {lbpool._scrape._BATCH}\nkept 3\n# 2 metrics\n".encode()
    assert lbpool._scrape._expose(counting, big_first) == expected

    def changing(source: Any) -> bytes:  # its per-output part changes with the metrics
        names = [m.name for m in source.collect()]
        end = "#END\n" if all(n.startswith("m") for n in names) else "#X\n"
        return "".join([*(f"{n}\n" for n in names), end]).encode()

    with pytest.raises(RuntimeError, match="lbpool: the exposition format changed"):
        lbpool._scrape._expose(changing, big_first)
    assert type(family.samples) is list and len(family.samples) == 3
    text = lbpool.metrics.generate_latest(registry)
    assert text == generate_latest(registry) and type(family.samples) is list


def test_paced_exposition_errors_and_odd_metrics_are_prometheus_clients() -> None:
    """A sample prometheus_client cannot format (a label value that is not a str): the
    same error, naming the collector's own metric, not a paced copy; a metric-like
    object that cannot be copied (frozen), or whose samples have no length (a
    generator), is formatted unpaced, the same bytes."""
    import dataclasses

    from prometheus_client.samples import Sample

    bad = prometheus_client.core.GaugeMetricFamily("bad", "Bad.", labels=["l"])
    for i in range(lbpool._scrape._BATCH):  # a big metric: encoded alone, from a copy
        bad.add_metric([str(i)], float(i))
    bad.samples.append(Sample("bad", {"l": 1}, 1.0))  # type: ignore[dict-item]

    class Bad:
        def collect(self) -> Iterator[Any]:
            yield bad

    registry = CollectorRegistry()
    registry.register(Bad())
    errors = []
    for expose in (generate_latest, lbpool.metrics.generate_latest):
        with pytest.raises(Exception) as caught:
            gevent.spawn(expose, registry).get(timeout=30)
        errors.append(caught.value)
    theirs, ours = errors
    assert type(ours) is type(theirs) and ours.args[-1] is bad is theirs.args[-1]

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        name: str
        documentation: str
        type: str
        unit: str
        samples: tuple[Any, ...]

    frozen = Frozen("x", "X.", "gauge", "", tuple(Sample("x", {}, float(i)) for i in range(200)))

    class Odd:
        def collect(self) -> Iterator[Any]:
            yield frozen

    class Streamed:  # samples with no length: a generator
        name, documentation, type, unit = "y", "Y.", "gauge", ""

        @property
        def samples(self) -> Iterator[Any]:
            return (Sample("y", {}, float(i)) for i in range(3))

    odd = CollectorRegistry()
    odd.register(Odd())
    assert lbpool.metrics.generate_latest(odd) == generate_latest(odd)
    streamed = CollectorRegistry()
    streamed.register(type("S", (), {"collect": lambda self: iter([Streamed()])})())
    assert gevent.spawn(lbpool.metrics.generate_latest, streamed).get(timeout=30) == (
        generate_latest(streamed)
    )


def test_paced_wsgi_app_falls_back_when_the_app_wants_more_than_a_registry(
    manager: lbpool.PoolManager, wsgi_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (future) prometheus_client app that asks its registry for more than
    ``collect``/``restricted_registry``: the stand-in cannot answer, so that app over the
    real registry serves the request, unpaced, rather than every scrape failing."""
    real = lbpool._scrape._exposition.make_wsgi_app

    def newer(registry: Any, disable_compression: bool = False) -> Any:
        app = real(registry, disable_compression=disable_compression)

        def asks_more(environ: dict[str, Any], start_response: Any) -> Any:
            registry.get_target_info()  # a CollectorRegistry method the stand-in lacks
            return app(environ, start_response)

        return asks_more

    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    monkeypatch.setattr(lbpool._scrape._exposition, "make_wsgi_app", newer)
    port = wsgi_server(lbpool.metrics.make_wsgi_app(registry))
    head, body = get(port, "/metrics")
    assert head.startswith("HTTP/1.1 200"), head
    assert body == generate_latest(registry)  # prometheus_client's own app: its text


def test_paced_wsgi_app_reads_a_lazy_apps_body_and_closes_a_replaced_one(
    manager: lbpool.PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that starts its response only as its body is read (WSGI allows it): the
    body is read first, then the exposition made here replaces it, and the replaced
    body is closed; an app that never starts a response is an lbpool error saying so."""
    real = lbpool._scrape._exposition.make_wsgi_app
    closed: list[bool] = []

    class Body:
        def __init__(self, environ: dict[str, Any], start_response: Any, app: Any) -> None:
            self.args = (environ, start_response, app)

        def __iter__(self) -> Iterator[bytes]:
            environ, start_response, app = self.args
            yield from app(environ, start_response)

        def close(self) -> None:
            closed.append(True)

    def lazy(registry: Any, disable_compression: bool = False) -> Any:
        app = real(registry, disable_compression=disable_compression)
        return lambda environ, start_response: Body(environ, start_response, app)

    echo(manager, "cache")
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    started: list[str] = []
    monkeypatch.setattr(lbpool._scrape._exposition, "make_wsgi_app", lazy)
    app = lbpool.metrics.make_wsgi_app(registry)
    body = app(dict(environ), lambda status, headers, exc_info=None: started.append(status))
    assert started == ["200 OK"] and closed == [True]
    assert view(b"".join(body)) == view(generate_latest(registry))

    def silent(registry: Any, disable_compression: bool = False) -> Any:
        return lambda environ, start_response: []

    monkeypatch.setattr(lbpool._scrape._exposition, "make_wsgi_app", silent)
    with pytest.raises(RuntimeError, match="lbpool: prometheus_client's WSGI app started"):
        lbpool.metrics.make_wsgi_app(registry)(dict(environ), lambda *a: None)
