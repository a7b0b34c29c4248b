"""A backend behind DNS whose records change under traffic.

Run: ``python examples/dns_discovery.py`` (ends by itself in about five seconds).

Shows: a ``discover: {srv: ...}`` backend instead of a ``servers:`` list. A small DNS
server runs in this process (UDP on a loopback port; replies built with dnspython,
which lbpool depends on) and serves SRV records for echo servers, also in this process.
Twenty greenlets send requests all along while the records change: a server is added,
DNS goes silent for a second (every resolution times out: the last good set is kept
and traffic goes on), then comes back with one server removed and one replaced. The
removed servers drain: no request fails, and their connections close. The backend's
``discovery`` stats say what DNS answered, when, and what failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from time import monotonic
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import gevent
from gevent.event import Event
from gevent.server import DatagramServer

import lbpool
from lbpool.testing import EchoServer, recv_exact

SERVICE = "_echo._tcp.example.test"
GREENLETS = 20


class TinyDNS:
    """SRV records for ``SERVICE`` (with the targets' A records in the additional
    section), answered over UDP on 127.0.0.1; ``silent`` drops every query."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []  # (target name, port), all on 127.0.0.1
        self.silent = False
        self.server = DatagramServer(("127.0.0.1", 0), self._on_datagram)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.address[1]}"

    def _on_datagram(self, data: bytes, peer: Any) -> None:
        if self.silent:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        a_records = {target: "127.0.0.1" for target, _ in self.records}
        if name == SERVICE and question.rdtype == dns.rdatatype.SRV:
            srv = [f"10 1 {port} {target}." for target, port in self.records]
            if srv:
                response.answer.append(dns.rrset.from_text_list(question.name, 5, "IN", "SRV", srv))
            for target in a_records:
                response.additional.append(
                    dns.rrset.from_text(target + ".", 5, "IN", "A", "127.0.0.1")
                )
        elif name in a_records and question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", "127.0.0.1"))
        elif name != SERVICE and name not in a_records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.server.sendto(response.to_wire(), peer)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")
    servers = [EchoServer().start() for _ in range(4)]
    a, b, c, d = servers
    name = {s.address: n for s, n in zip(servers, "abcd", strict=True)}
    dns_server = TinyDNS()
    dns_server.server.start()

    def publish(*members: EchoServer) -> None:
        dns_server.records = [(f"{name[s.address]}.example.test", s.port) for s in members]
        print(f"DNS now lists: {' '.join(name[s.address] for s in members)}")

    publish(a, b)
    config = {
        "backends": {
            "echo": {
                "discover": {
                    "srv": SERVICE,
                    "refresh": "200ms",  # seconds to minutes in production
                    "timeout": "300ms",
                    "nameservers": [dns_server.address],
                },
                "pool": {"min_idle": 1, "max_size": 8, "acquire_timeout": "2s"},
            }
        }
    }
    manager = lbpool.PoolManager(config)
    manager.wait_ready(timeout=5)  # waits for the first DNS answer, then warms the pools
    served: Counter[str] = Counter()
    failed: list[BaseException] = []
    stop = Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                with manager.get("echo") as conn:
                    conn.settimeout(2)
                    conn.sendall(b"hello\n")
                    recv_exact(conn, 6)
                    served[name[conn.address]] += 1
            except Exception as exc:
                failed.append(exc)
            gevent.sleep(0.001)

    def phase(title: str, seconds: float) -> None:
        before = Counter(served)
        gevent.sleep(seconds)
        now = served - before
        using = " ".join(sorted(name[p.name] for p in manager.backends["echo"].pools))
        split = ", ".join(f"{k} {n}" for k, n in sorted(now.items()))
        print(f"  {title}: pools [{using}], requests served: {split}")

    workers = [gevent.spawn(worker) for _ in range(GREENLETS)]
    start = monotonic()
    phase("start", 0.8)

    publish(a, b, c)
    phase("c added", 0.8)

    dns_server.silent = True
    print("DNS goes silent (every resolution times out)")
    phase("outage", 1.0)
    stats = manager.stats().backends["echo"].discovery
    assert stats is not None
    print(
        f"  discovery during the outage: failures={stats.failures}, last_error={stats.last_error!r}"
    )

    publish(c, d)
    dns_server.silent = False
    print("DNS is back (b removed, a replaced by d)")
    phase("after", 1.0)

    stop.set()
    gevent.joinall(workers, timeout=5)
    for server in (a, b):
        server.wait_active(0, timeout=5)  # drained: their connections are closed
    print(f"a and b: open connections {a.active} and {b.active} (drained and closed)")
    stats = manager.stats().backends["echo"].discovery
    assert stats is not None
    print(
        f"discovery: servers={len(stats.servers)}, last_error={stats.last_error}, "
        f"failures={stats.failures}"
    )
    total = sum(served.values())
    print(f"{total} requests in {monotonic() - start:.1f}s, {len(failed)} failed")
    manager.close()
    dns_server.server.stop()
    for server in servers:
        server.stop()
    print("done")


if __name__ == "__main__":
    main()
