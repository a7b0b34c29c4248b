"""lbpool.discovery against a real DNS server on loopback (tests/support/dns_server.py):
A/AAAA and SRV answers, every failure kind, bounded timeouts, nameserver failover,
truncation to TCP, the runner loop, and a hub that keeps turning meanwhile."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from time import monotonic

import gevent
import pytest
from gevent.event import Event

import lbpool.discovery
from lbpool.discovery import (
    Discovery,
    DiscoveryError,
    Servers,
    Target,
    parse_nameservers,
    parse_target,
    resolve,
    system_nameservers,
)
from tests.support.dns_server import DNSServer, Zone
from tests.support.leaks import new_lbpool_greenlets


def base_zone() -> Zone:
    return {
        ("web.test", "A"): ["10.0.0.2", "10.0.0.1"],
        ("web.test", "AAAA"): ["fd00::1"],
        ("v4only.test", "A"): ["10.0.0.9"],
        ("v6only.test", "AAAA"): ["fd00::9"],
        ("alias.test", "CNAME"): ["web.test."],
        ("txtonly.test", "TXT"): ['"no address here"'],
        ("_db._tcp.test", "SRV"): [
            "10 0 6379 db1.test.",
            "10 5 6380 db2.test.",
            "20 9 6381 backup.test.",
        ],
        ("db1.test", "A"): ["10.1.0.1"],
        ("db1.test", "AAAA"): ["fd00::11"],
        ("db2.test", "A"): ["10.1.0.2"],
        ("backup.test", "A"): ["10.1.0.3"],
    }


@pytest.fixture
def dns_servers() -> Iterator[Callable[..., DNSServer]]:
    """``make(zone=None)`` -> a started DNSServer; all are stopped at teardown."""
    made: list[DNSServer] = []

    def make(zone: Zone | None = None) -> DNSServer:
        server = DNSServer(base_zone() if zone is None else zone).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def dns_server(dns_servers: Callable[..., DNSServer]) -> DNSServer:
    return dns_servers()


def ask(server: DNSServer, timeout: float = 1.0, **target: str) -> Servers:
    return resolve(
        parse_target(**target), nameservers=parse_nameservers([server.address]), timeout=timeout
    )


# -- parsing --------------------------------------------------------------------


def test_parse_target_and_nameservers() -> None:
    assert parse_target(dns="web.test:80") == Target("dns", "web.test", 80)
    assert parse_target(dns="web.test.:80") == Target("dns", "web.test", 80)
    assert parse_target(srv="_db._tcp.test") == Target("srv", "_db._tcp.test")
    assert str(parse_target(srv="_db._tcp.test")) == "srv _db._tcp.test"
    for bad, match in [
        ({"dns": "web.test"}, "name:port"),
        ({"dns": "web.test:0"}, "name:port"),
        ({"dns": "10.0.0.1:80"}, "an address"),
        ({"dns": "a..b:80"}, "not a valid DNS name"),
        ({"srv": "db.test"}, "_service._proto.name"),
        ({}, "exactly one"),
        ({"dns": "a:1", "srv": "_a._tcp.b"}, "exactly one"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_target(**bad)
    assert parse_nameservers(["10.0.0.2", "10.0.0.3:5353", "[::1]:53", "::1"]) == (
        ("10.0.0.2", 53),
        ("10.0.0.3", 5353),
        ("::1", 53),
        ("::1", 53),
    )
    with pytest.raises(ValueError, match=r"ns\.example"):
        parse_nameservers(["ns.example:53"])
    with pytest.raises(ValueError, match="at least one"):
        parse_nameservers([])


def test_system_nameservers_come_from_resolv_conf() -> None:
    found = system_nameservers()
    assert found and all(port == 53 or 1 <= port <= 65535 for _, port in found)


def test_the_error_pickles() -> None:
    exc = DiscoveryError("timeout", "dns web.test:80: no reply")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.kind, str(back)) == ("timeout", "dns web.test:80: no reply")


def test_import_lbpool_does_not_import_dnspython() -> None:
    code = "import sys, lbpool, lbpool.discovery, lbpool.subset; sys.exit('dns' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- answers --------------------------------------------------------------------


def test_a_and_aaaa_are_merged_sorted_with_the_port(
    dns_server: DNSServer, no_fd_leak: None
) -> None:
    assert ask(dns_server, dns="web.test:8080") == (
        ("10.0.0.1:8080", 1),
        ("10.0.0.2:8080", 1),
        ("[fd00::1]:8080", 1),
    )
    assert {(q[1], q[2]) for q in dns_server.queries} == {("web.test", "A"), ("web.test", "AAAA")}
    # Either family may be empty.
    assert ask(dns_server, dns="v4only.test:1") == (("10.0.0.9:1", 1),)
    assert ask(dns_server, dns="v6only.test:1") == (("[fd00::9]:1", 1),)
    # A CNAME chain is followed.
    assert ask(dns_server, dns="alias.test:80") == ask(dns_server, dns="web.test:80")


@pytest.mark.parametrize(
    ("family", "mode"),
    [(family, mode) for family in ("A", "AAAA") for mode in ("servfail", "refused", "silent")],
)
def test_one_family_failing_leaves_the_others_addresses(
    dns_server: DNSServer, family: str, mode: str, no_fd_leak: None
) -> None:
    """A nameserver that mishandles one family (AAAA dropped, SERVFAIL or REFUSED for
    it): the other family's addresses are the answer, as Go's resolver gives by
    default; the whole resolution failed, so a backend never got servers, or stayed
    frozen on its last set. Both failing (or the other empty) is still a failure."""
    dns_server.modes[family] = mode
    other = "[fd00::1]:80" if family == "A" else "10.0.0.1:80"
    start = monotonic()
    assert other in dict(ask(dns_server, timeout=1.5, dns="web.test:80"))
    if mode != "silent":  # a failing family does not make the answer wait for the budget
        assert monotonic() - start < 1.4
    only_failing = "v4only.test:80" if family == "A" else "v6only.test:80"
    with pytest.raises(DiscoveryError):  # its own family failed, the other is empty
        ask(dns_server, timeout=1.5, dns=only_failing)
    dns_server.modes["A" if family == "AAAA" else "AAAA"] = mode
    with pytest.raises(DiscoveryError):
        ask(dns_server, timeout=1.5, dns="web.test:80")


def test_srv_lowest_priority_weights_and_additional_addresses(dns_server: DNSServer) -> None:
    expected = (
        ("10.1.0.1:6379", 1),  # weight 0 -> lbpool's minimum, 1
        ("10.1.0.2:6380", 5),
        ("[fd00::11]:6379", 1),
    )  # backup.test (priority 20) is not taken
    assert ask(dns_server, srv="_db._tcp.test") == expected
    assert [q[1:] for q in dns_server.queries] == [("_db._tcp.test", "SRV")]  # additional used

    dns_server.additional = False  # now each target is asked for, on the same server
    dns_server.queries.clear()
    assert ask(dns_server, srv="_db._tcp.test") == expected
    assert sorted(q[1:] for q in dns_server.queries) == [
        ("_db._tcp.test", "SRV"),
        ("db1.test", "A"),
        ("db1.test", "AAAA"),
        ("db2.test", "A"),
        ("db2.test", "AAAA"),
    ]


def test_srv_targets_that_do_not_resolve_are_skipped(dns_server: DNSServer) -> None:
    dns_server.additional = False
    dns_server.zone[("_db._tcp.test", "SRV")].append("10 3 7000 gone.test.")
    assert ("10.1.0.2:6380", 5) in ask(dns_server, srv="_db._tcp.test")
    dns_server.zone[("_db._tcp.test", "SRV")] = ["10 3 7000 gone.test."]
    with pytest.raises(DiscoveryError) as info:
        ask(dns_server, srv="_db._tcp.test")
    assert info.value.kind == "empty" and "gone.test (nxdomain)" in str(info.value)
    dns_server.zone[("_db._tcp.test", "SRV")] = ["0 0 0 ."]
    with pytest.raises(DiscoveryError, match="not offered") as info:
        ask(dns_server, srv="_db._tcp.test")
    assert info.value.kind == "empty"


# -- failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "name", "kind", "words"),
    [
        ("servfail", "web.test", "rcode", "answered SERVFAIL"),
        ("refused", "web.test", "rcode", "answered REFUSED"),
        ("nxdomain", "web.test", "nxdomain", "no such name (NXDOMAIN"),
        ("normal", "missing.test", "nxdomain", "no such name"),
        ("normal", "txtonly.test", "empty", "no A or AAAA record for txtonly.test"),
        ("garbage", "web.test", "malformed", "malformed reply"),
        ("silent", "web.test", "timeout", "gave no reply within"),
        ("wrong_id", "web.test", "timeout", "gave no reply within"),
    ],
)
def test_each_failure_has_its_kind_and_words(
    dns_server: DNSServer, no_fd_leak: None, mode: str, name: str, kind: str, words: str
) -> None:
    dns_server.mode = mode
    with pytest.raises(DiscoveryError) as info:
        ask(dns_server, timeout=0.3, dns=f"{name}:80")
    assert info.value.kind == kind
    assert str(info.value).startswith(f"dns {name}:80: ")
    assert words in str(info.value) and kind in DiscoveryError.KINDS


def test_srv_failure_kinds(dns_server: DNSServer) -> None:
    with pytest.raises(DiscoveryError) as info:
        ask(dns_server, srv="_none._tcp.test")
    assert info.value.kind == "nxdomain"
    dns_server.zone[("_empty._tcp.test", "TXT")] = ['"x"']
    with pytest.raises(DiscoveryError) as info:
        ask(dns_server, srv="_empty._tcp.test")
    assert info.value.kind == "empty" and "no SRV record" in str(info.value)


def test_an_unreachable_nameserver(dns_servers: Callable[..., DNSServer]) -> None:
    server = dns_servers()
    address = server.address
    server.stop()  # nobody on that port now: ICMP port unreachable
    with pytest.raises(DiscoveryError) as info:
        resolve(
            parse_target(dns="web.test:80"), nameservers=parse_nameservers([address]), timeout=1
        )
    assert info.value.kind == "unreachable", info.value


def test_a_timeout_bounds_the_whole_resolution(
    dns_servers: Callable[..., DNSServer], no_fd_leak: None
) -> None:
    silent = [dns_servers(), dns_servers()]
    for server in silent:
        server.mode = "silent"
    nameservers = parse_nameservers([s.address for s in silent])
    for target, timeout in (
        (parse_target(dns="web.test:80"), 0.6),
        (parse_target(srv="_db._tcp.test"), 1.5),
    ):
        started = monotonic()
        with pytest.raises(DiscoveryError) as info:
            resolve(target, nameservers=nameservers, timeout=timeout)
        elapsed = monotonic() - started
        assert timeout - 0.05 <= elapsed < timeout + 0.5
        assert info.value.kind == "timeout"
        assert all(s.address in str(info.value) for s in silent)
    # The budget is shared: each silent server was asked (and re-asked each second).
    assert all(server.asked("udp") for server in silent)


def test_a_second_nameserver_answers_when_the_first_is_silent(
    dns_servers: Callable[..., DNSServer],
) -> None:
    first, second = dns_servers(), dns_servers()
    first.mode = "silent"
    started = monotonic()
    found = resolve(
        parse_target(dns="web.test:80"),
        nameservers=parse_nameservers([first.address, second.address]),
        timeout=1.0,
    )
    assert len(found) == 3
    assert monotonic() - started < 1.0
    # A and AAAA were asked at once: each waited out its half of the budget on the
    # first, then asked the second, which answered.
    assert sorted(first.asked()) == [("udp", "web.test", "A"), ("udp", "web.test", "AAAA")]
    assert sorted(q[2] for q in second.asked()) == ["A", "AAAA"]


def test_an_error_rcode_moves_on_but_nxdomain_is_final(
    dns_servers: Callable[..., DNSServer],
) -> None:
    first, second = dns_servers(), dns_servers()
    nameservers = parse_nameservers([first.address, second.address])
    first.mode = "servfail"
    assert len(resolve(parse_target(dns="web.test:80"), nameservers=nameservers, timeout=1)) == 3
    first.mode = "nxdomain"
    with pytest.raises(DiscoveryError) as info:
        resolve(parse_target(dns="web.test:80"), nameservers=nameservers, timeout=1)
    assert info.value.kind == "nxdomain"


def test_a_truncated_reply_is_asked_again_over_tcp(dns_server: DNSServer, no_fd_leak: None) -> None:
    dns_server.mode = "truncate"
    assert ask(dns_server, dns="web.test:80") == (
        ("10.0.0.1:80", 1),
        ("10.0.0.2:80", 1),
        ("[fd00::1]:80", 1),
    )
    assert sorted(dns_server.queries) == [  # each family: UDP, truncated, then TCP
        ("tcp", "web.test", "A"),
        ("tcp", "web.test", "AAAA"),
        ("udp", "web.test", "A"),
        ("udp", "web.test", "AAAA"),
    ]
    assert len(ask(dns_server, srv="_db._tcp.test")) == 3


def test_resolving_never_blocks_the_hub(dns_server: DNSServer) -> None:
    dns_server.mode = "silent"
    gaps: list[float] = []
    stop = Event()

    def ticker() -> None:
        last = monotonic()
        while not stop.is_set():
            gevent.sleep(0.005)
            now = monotonic()
            gaps.append(now - last)
            last = now

    tick = gevent.spawn(ticker)
    try:
        with pytest.raises(DiscoveryError):
            ask(dns_server, timeout=1.0, dns="web.test:80")
    finally:
        stop.set()
        tick.join(timeout=1)
    print(f"ticks {len(gaps)}, longest gap {max(gaps) * 1000:.1f} ms")
    assert len(gaps) > 50
    assert max(gaps) < 0.2


# -- the runner -----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.answers: list[Servers] = []
        self.errors: list[DiscoveryError] = []
        self.changed = Event()

    def on_answer(self, servers: Servers) -> None:
        self.answers.append(servers)
        self.changed.set()

    def on_error(self, exc: DiscoveryError) -> None:
        self.errors.append(exc)
        self.changed.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
        deadline = monotonic() + timeout
        while not predicate():
            left = deadline - monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            self.changed.wait(left)
        return True


def runner(
    server: DNSServer, recorder: Recorder, target: Target | None = None, **kwargs: float
) -> Discovery:
    return Discovery(
        parse_target(dns="web.test:80") if target is None else target,
        refresh=kwargs.get("refresh", 0.1),
        timeout=kwargs.get("timeout", 0.2),
        nameservers=parse_nameservers([server.address]),
        on_answer=recorder.on_answer,
        on_error=recorder.on_error,
    )


def run_logged(
    discovery: Discovery,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    until: Callable[[], bool],
) -> None:
    """Run ``discovery`` with lbpool's log captured until ``until()`` (``recorder``'s
    bounded wait), then stop it whatever happened."""
    with caplog.at_level(logging.DEBUG, logger="lbpool"):
        discovery.start()
        try:
            assert recorder.wait_for(until)
        finally:
            discovery.stop()


def test_the_runner_follows_the_zone_and_keeps_the_last_good_set(
    dns_server: DNSServer, no_fd_leak: None
) -> None:
    recorder = Recorder()
    discovery = runner(dns_server, recorder)
    assert discovery.servers == () and discovery.last_refresh is None
    assert not discovery.wait(0)
    discovery.start()
    try:
        assert discovery.wait(2) and discovery.attempted.is_set()
        first = discovery.servers
        assert len(first) == 3 and recorder.answers[0] == first
        assert discovery.last_error is None and discovery.failures == 0
        assert discovery.last_refresh is not None

        # A zone change is picked up by the next refresh.
        dns_server.zone[("web.test", "A")] = ["10.0.0.1", "10.0.0.3"]
        assert recorder.wait_for(lambda: ("10.0.0.3:80", 1) in discovery.servers)
        changed = discovery.servers

        # An outage keeps the last good set and counts failures.
        dns_server.mode = "servfail"
        assert recorder.wait_for(lambda: discovery.failures >= 3)
        assert discovery.servers == changed
        assert discovery.last_error is not None and "SERVFAIL" in discovery.last_error
        assert all(e.kind == "rcode" for e in recorder.errors)
        refreshed_before = discovery.last_refresh

        # Recovery clears the error; the failure count stays.
        dns_server.mode = "normal"
        failures = discovery.failures
        assert recorder.wait_for(lambda: discovery.last_error is None)
        assert discovery.failures >= failures
        assert discovery.last_refresh is not None and refreshed_before is not None
        assert discovery.last_refresh > refreshed_before
        assert discovery.servers == changed
    finally:
        discovery.stop()
    assert not discovery.running
    assert new_lbpool_greenlets() == []
    discovery.stop()  # twice is harmless


def test_a_first_failure_is_waited_for_and_told(dns_server: DNSServer) -> None:
    dns_server.mode = "nxdomain"
    recorder = Recorder()
    discovery = runner(dns_server, recorder, refresh=5).start()
    try:
        assert discovery.attempted.wait(2)
        assert not discovery.answered.is_set() and discovery.servers == ()
        assert discovery.failures == 1 and "NXDOMAIN" in (discovery.last_error or "")
        dns_server.mode = "normal"
        discovery.refresh_now()
        assert discovery.wait(2) and len(discovery.servers) == 3
    finally:
        discovery.stop()


def test_stop_during_a_resolution_leaves_nothing(dns_server: DNSServer, no_fd_leak: None) -> None:
    dns_server.mode = "silent"
    discovery = runner(dns_server, Recorder(), timeout=5).start()
    assert dns_server_asked(dns_server)
    started = monotonic()
    discovery.stop()
    assert monotonic() - started < 0.5
    assert new_lbpool_greenlets() == []


def dns_server_asked(server: DNSServer, timeout: float = 2.0) -> bool:
    deadline = monotonic() + timeout
    while not server.queries and monotonic() < deadline:
        gevent.sleep(0.01)
    return bool(server.queries)


def test_the_runner_survives_its_callbacks(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    answered = Event()

    def bad_answer(servers: Servers) -> None:
        calls.append("answer")
        if len(calls) >= 3:
            answered.set()
        raise RuntimeError("apply failed")

    discovery = Discovery(
        parse_target(dns="web.test:80"),
        refresh=0.05,
        timeout=0.2,
        nameservers=parse_nameservers([dns_server.address]),
        on_answer=bad_answer,
        on_error=lambda exc: 1 / 0,
    )
    with caplog.at_level(logging.WARNING, logger="lbpool"):
        discovery.start()
        try:
            assert answered.wait(3)
            dns_server.mode = "refused"
            deadline = monotonic() + 3
            while "REFUSED" not in (discovery.last_error or "") and monotonic() < deadline:
                gevent.sleep(0.02)
            assert discovery.failures >= 2 and discovery.running
        finally:
            discovery.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "lbpool"]
    assert any("callback" in m and "raised" in m for m in messages)
    # an answer on_answer raises for is a failed resolution (the outage's one WARNING)
    assert any("could not be applied" in m and "apply failed" in m for m in messages)
    assert "REFUSED" in (discovery.last_error or "") and discovery.servers == ()
    assert "Discovery dns web.test:80 [stopped]" in repr(discovery)


def test_srv_records_with_port_0_are_dropped(dns_server: DNSServer) -> None:
    dns_server.zone[("_db._tcp.test", "SRV")] = ["10 1 6379 db1.test.", "10 1 0 db1.test."]
    assert ask(dns_server, srv="_db._tcp.test") == (("10.1.0.1:6379", 1), ("[fd00::11]:6379", 1))
    dns_server.zone[("_db._tcp.test", "SRV")] = ["10 1 0 db1.test."]
    with pytest.raises(DiscoveryError) as info:  # no usable target: a failed resolution
        ask(dns_server, srv="_db._tcp.test")
    assert info.value.kind == "empty" and "port 0" in str(info.value)


def test_names_dnspython_cannot_encode_are_refused() -> None:
    # (which unicode names IDNA refuses depends on the dnspython release and on whether
    # the idna package is installed; a label over 63 octets and an empty label are
    # refused by every release)
    long_label = "a" * 64
    bad_names = [
        {"dns": f"{long_label}.test:80"},
        {"srv": f"_a._tcp.{long_label}.test"},
        {"dns": "a..test:80"},
    ]
    for bad in bad_names:
        with pytest.raises(ValueError, match="not a valid DNS name"):
            parse_target(**bad)
    assert parse_target(dns="b\u00fccher.test:80").name == "b\u00fccher.test"  # IDNA encodes it


def test_an_answer_that_cannot_be_applied_is_a_failed_resolution(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()

    def refuse(servers: Servers) -> None:
        raise ValueError("not a usable server")

    discovery = runner(dns_server, recorder, refresh=0.05)
    discovery.on_answer = refuse
    run_logged(discovery, recorder, caplog, lambda: len(recorder.errors) >= 3)
    assert not discovery.answered.is_set() and discovery.attempted.is_set()
    assert discovery.servers == () and discovery.failures >= 3
    assert "could not be applied" in (discovery.last_error or "")
    assert "not a usable server" in (discovery.last_error or "")
    assert all(e.kind == "malformed" for e in recorder.errors)
    records = [r for r in caplog.records if r.name == "lbpool"]
    assert not [r for r in records if r.levelno >= logging.ERROR]
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1  # once per outage


def test_an_unexpected_resolution_error_warns_once_per_outage(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug, not DNS")

    monkeypatch.setattr(lbpool.discovery, "_resolve", broken)
    # every resolution raises a non-DNS error
    discovery = runner(dns_server, recorder, Target("dns", "a.test", 80), refresh=0.05)
    run_logged(discovery, recorder, caplog, lambda: len(recorder.errors) >= 3)
    assert "internal error" in (discovery.last_error or "")
    records = [r for r in caplog.records if r.name == "lbpool"]
    assert not [r for r in records if r.levelno >= logging.ERROR]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is not None  # one traceback, not a storm


def test_skipped_srv_targets_warn_once(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.zone[("_db._tcp.test", "SRV")] = ["10 1 6379 db1.test.", "10 1 0 db1.test."]
    recorder = Recorder()
    target = parse_target(srv="_db._tcp.test")
    discovery = runner(dns_server, recorder, target, refresh=0.05, timeout=0.5)
    run_logged(discovery, recorder, caplog, lambda: len(recorder.answers) >= 3)
    assert discovery.servers == (("10.1.0.1:6379", 1), ("[fd00::11]:6379", 1))
    assert discovery.last_error is None
    warned = [r for r in caplog.records if r.name == "lbpool" and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "port 0" in warned[0].getMessage()
