"""A real DNS server for the tests: UDP and TCP on one loopback port, in this hub.

Replies are built by dnspython from ``zone``, a dict the test changes at will:
``{(name, rdtype): [rdata text, ...]}``, e.g. ``{("web.test", "A"): ["10.0.0.1"]}``,
``{("_db._tcp.test", "SRV"): ["10 5 6379 db1.test."]}``. A name with no entry at all
is NXDOMAIN; a name with entries but none of the asked type is an empty NOERROR
answer. SRV replies carry the targets' A/AAAA records in the additional section while
``additional`` is true.

``mode`` overrides the zone for every query: ``"normal"``, ``"servfail"``,
``"refused"``, ``"nxdomain"``, ``"silent"`` (reads the query, never answers: for
timeouts), ``"garbage"`` (answers bytes that do not parse), ``"truncate"`` (over UDP,
an empty reply with TC set; over TCP the full answer), ``"wrong_id"`` (a reply with
another id, which a client must ignore); ``modes`` overrides it per record type
(``{"AAAA": "servfail"}``: a server that mishandles one family). ``queries`` records
``(transport, name, rdtype)`` of every query received.

Nothing is monkey-patched: gevent's ``DatagramServer`` and ``StreamServer``. ``stop()``
closes both sockets and kills the handlers; use it as a context manager.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import gevent
from gevent import socket as gsocket
from gevent.server import DatagramServer, StreamServer

__all__ = ["DNSServer"]

Zone = dict[tuple[str, str], list[str]]


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class DNSServer:
    """See the module docstring. ``address`` is ``127.0.0.1:port`` once started."""

    def __init__(self, zone: Zone | None = None, *, ttl: int = 5) -> None:
        self.zone: Zone = dict(zone or {})
        self.mode = "normal"
        self.modes: dict[str, str] = {}  # per record type, over mode
        self.additional = True
        self.ttl = ttl
        self.queries: list[tuple[str, str, str]] = []
        self._udp: DatagramServer | None = None
        self._tcp: StreamServer | None = None

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> DNSServer:
        """Bind UDP on an ephemeral port, TCP on the same number (retried on a clash)."""
        for _ in range(20):
            udp = DatagramServer(("127.0.0.1", 0), self._on_datagram)
            udp.start()
            port = udp.address[1]
            listener = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
            try:
                listener.bind(("127.0.0.1", port))
            except OSError:
                listener.close()
                udp.stop()
                continue
            listener.listen(16)
            self._udp = udp
            self._tcp = StreamServer(listener, self._on_stream)
            self._tcp.start()
            return self
        raise RuntimeError("no port free for both UDP and TCP")

    def stop(self) -> None:
        for server in (self._tcp, self._udp):
            if server is not None:
                server.stop(timeout=1)
        self._tcp = self._udp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._udp is not None, "not started"
        return int(self._udp.address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- answering --------------------------------------------------------------

    def asked(self, transport: str | None = None) -> list[tuple[str, str, str]]:
        return [q for q in self.queries if transport is None or q[0] == transport]

    def _on_datagram(self, data: bytes, peer: Any) -> None:
        reply = self._reply(data, "udp")
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, peer)

    def _on_stream(self, sock: Any, peer: Any) -> None:
        with contextlib.suppress(OSError), gevent.Timeout(5, False):
            while True:
                head = self._read(sock, 2)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                data = self._read(sock, length)
                if data is None:
                    return
                reply = self._reply(data, "tcp")
                if reply is None:
                    return
                sock.sendall(struct.pack("!H", len(reply)) + reply)

    @staticmethod
    def _read(sock: Any, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _reply(self, data: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((transport, name, rdtype))
        mode = self.modes.get(rdtype, self.mode)
        if mode == "silent":
            return None
        if mode == "garbage":
            return b"\x00\x01garbage"
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if mode == "wrong_id":
            response.id = (query.id + 1) % 65536
            return response.to_wire()
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif mode == "nxdomain" or not any(_key(n) == _key(name) for n, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif mode == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
        else:
            self._answer(response, question.name, rdtype)
        return response.to_wire()

    def _rrset(self, name: dns.name.Name, rdtype: str) -> dns.rrset.RRset | None:
        key = _key(name.to_text())
        texts = [
            t
            for (n, kind), ts in self.zone.items()
            if _key(n) == key and kind == rdtype
            for t in ts
        ]
        if not texts:
            return None
        return dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, texts)

    def _answer(self, response: dns.message.Message, name: dns.name.Name, rdtype: str) -> None:
        cname = self._rrset(name, "CNAME")
        if cname is not None and rdtype != "CNAME":
            response.answer.append(cname)
            name = dns.name.from_text(cname[0].to_text())
        rrset = self._rrset(name, rdtype)
        if rrset is None:
            return
        response.answer.append(rrset)
        if rdtype == "SRV" and self.additional:
            for record in rrset:
                for kind in ("A", "AAAA"):
                    extra = self._rrset(record.target, kind)
                    if extra is not None:
                        response.additional.append(extra)
