"""DNS discovery: a backend's servers from A/AAAA or SRV records, re-read every refresh.

``resolve(target, nameservers=..., timeout=...)`` asks the nameservers itself: queries
are built and replies parsed by dnspython (``dns.message``), and carried over gevent
sockets (UDP, then TCP when a reply comes back truncated), so a resolution only ever
waits on gevent sockets: it never blocks the hub and needs no monkey patching (neither
dnspython's own ``dns.query`` nor the system resolver is used: both would block the
hub in an unpatched process). dnspython is imported by the first resolution, not by
``import lbpool``.

What a resolution returns is the shape of a static ``servers:`` list: a sorted,
de-duplicated tuple of ``(address, weight)``, address ``host:port`` or ``[v6]:port``.

- ``dns: name:port``: every A and AAAA address of ``name``, with that port, weight 1.
  Both queries are made; either may be empty, not both.
- ``srv: _service._proto.name``: the SRV records of the lowest priority, each target
  resolved to its A/AAAA addresses (from the reply's additional section when it
  carries them, else by querying the same nameservers), with the record's port and
  weight. Weight 0 ("pick rarely", RFC 2782) becomes 1, lbpool's minimum weight; an
  address reached through two records keeps the larger weight. A target ``.`` (the
  service is not offered) is skipped; so is a record with port 0 (no server listens
  there), and a target that does not exist (NXDOMAIN) or has no address, as a stale
  record pointing at a deleted host must not block every later update. An answer
  left with no usable target fails (``empty``). Any other failure of a target fails
  the resolution, except that of one address family when the other gave addresses
  (A and AAAA are asked at once; see ``_addresses``).

Names are checked as dnspython encodes them (``dns.name.from_text``: IDNA, label and
name lengths) when the target is parsed, so a name no query could carry is a config
error, not a failure at every refresh. Names are absolute: no search list is applied
(write the full name, e.g. ``redis.default.svc.cluster.local``). CNAME chains in a reply
are followed.

Nameservers: ``host:port`` IP literals (a bare IP means port 53); by default the
system's (``/etc/resolv.conf``, read by dnspython at each resolution; none there
means ``127.0.0.1:53``, as for the C library). ``timeout`` bounds the whole
resolution, every query included. Each query tries the nameservers in order, each
getting an equal share of the budget left (a UDP query is sent again every second
of its share); a nameserver that answers (even NXDOMAIN or an empty answer: those
are final) is asked first for the rest of that resolution; a timeout, an
unreachable nameserver, an error rcode or a malformed reply moves on to the next.
Failures raise ``DiscoveryError(kind, message)`` (``lbpool.errors``); the message
names the target, the query and what each nameserver tried did.

``Discovery`` is the runner a discovered backend owns: one greenlet resolving at once,
then every ``refresh`` (during an outage too), keeping the last good answer.

Contracts: ``resolve`` may yield (it waits on sockets); ``Discovery.start``,
``refresh_now`` and the attributes never yield; ``stop`` may (it joins the greenlet);
``wait`` may.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from lbpool._net import close_quietly, fmt_seconds, format_address, split_address
from lbpool._ownership import Forked, fork_generation
from lbpool.errors import DiscoveryError

if TYPE_CHECKING:
    import dns.message
    import dns.name

__all__ = [
    "Discovery",
    "DiscoveryError",
    "Nameserver",
    "Servers",
    "Target",
    "parse_nameservers",
    "parse_target",
    "resolve",
    "system_nameservers",
]

_log = logging.getLogger("lbpool")
_T = TypeVar("_T")

Nameserver = tuple[str, int]  # (IP literal without brackets, port)
Servers = tuple[tuple[str, int], ...]  # ((address, weight), ...), sorted, no duplicates

_RESEND = 1.0  # seconds: a UDP query unanswered this long is sent again (same id)
_EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: large answers come back truncated
_MAX_UDP = 65535

# Every query's socket while it is open: a forked child closes its copies at once, so
# a resolution copied from the parent cannot read the parent's reply (the child's hub
# would run it, and take the datagram the parent waits for).
_in_flight: set[gsocket.socket] = set()


def _close_inherited() -> None:
    """After a fork, in the child: close our copies of the queries' sockets (closing a
    copy sends nothing; the parent's are untouched). Never yields."""
    for sock in list(_in_flight):
        close_quietly(sock)
    _in_flight.clear()


os.register_at_fork(after_in_child=_close_inherited)


@dataclass(frozen=True)
class Target:
    """What to resolve: ``dns`` (``name`` and ``port``) or ``srv`` (``name`` only)."""

    kind: Literal["dns", "srv"]
    name: str  # without the trailing dot
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "dns":
            return f"dns {self.name}:{self.port}"
        return f"srv {self.name}"


def parse_target(*, dns: str | None = None, srv: str | None = None) -> Target:
    """Exactly one of ``dns="name:port"`` or ``srv="_service._proto.name"`` -> a
    ``Target``; ``ValueError`` with a message fit for a config problem otherwise."""
    if (dns is None) == (srv is None):
        raise ValueError("give exactly one of dns (name:port) or srv (_service._proto.name)")
    if dns is not None:
        host, sep, port = dns.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"dns: expected name:port with a port 1..65535, got {dns!r}")
        return Target("dns", _check_name(host, "dns"), int(port))
    assert srv is not None
    name = _check_name(srv, "srv")
    labels = name.split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
        raise ValueError(f"srv: expected _service._proto.name, got {srv!r}")
    return Target("srv", name)


def _check_name(text: str, field: str) -> str:
    name = text.strip().rstrip(".")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"{field}: {text!r} is an address, not a name (list it in servers)")
    if not name or any(not label or len(label) > 63 for label in name.split(".")):
        raise ValueError(f"{field}: {text!r} is not a valid DNS name")
    if len(name) > 253:
        raise ValueError(f"{field}: {text!r} is longer than 253 characters")
    # Encoded as every query will encode it (IDNA for non-ASCII labels; the wire
    # limits of 63 per label and 255 in all): a name dnspython refuses is refused here.
    import dns.name

    try:
        dns.name.from_text(name + ".")
    except Exception as exc:  # IDNAException, LabelTooLong, NameTooLong, ...
        raise ValueError(
            f"{field}: {text!r} is not a valid DNS name ({type(exc).__name__})"
        ) from None
    return name


def parse_nameservers(texts: Iterable[str]) -> tuple[Nameserver, ...]:
    """``["10.0.0.2:53", "[fd00::53]:5353", "10.0.0.3"]`` -> ``(host, port)`` pairs.

    Hosts must be IP literals (a nameserver named by a name would need a resolver to
    be found); a bare IP means port 53. ``ValueError`` names the bad entry.
    """
    found: list[Nameserver] = []
    for text in texts:
        try:
            ipaddress.ip_address(text)
            host, port = text, 53
        except ValueError:
            try:
                host, port = split_address(text)
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                raise ValueError(
                    f"nameserver {text!r}: expected an IP address, ip:port or [v6]:port"
                ) from None
        if not 1 <= port <= 65535:
            raise ValueError(f"nameserver {text!r}: port must be 1..65535")
        found.append((host, port))
    if not found:
        raise ValueError("nameservers: give at least one, or leave it out for the system's")
    return tuple(found)


def system_nameservers() -> tuple[Nameserver, ...]:
    """The system's nameservers (``/etc/resolv.conf``, read by dnspython), port 53; with
    none configured, ``127.0.0.1:53`` (the C library's default). Reads a file."""
    import dns.resolver

    try:
        configured = dns.resolver.Resolver(configure=True).nameservers
    except dns.resolver.NoResolverConfiguration:
        configured = []
    found: list[Nameserver] = []
    for entry in configured:
        if isinstance(entry, str):
            found.append((entry, 53))
        else:  # a dns.nameserver.Nameserver (dnspython >= 2.4)
            address = getattr(entry, "address", None)
            port = getattr(entry, "port", 53)
            if isinstance(address, str) and isinstance(port, int):
                found.append((address, port))
    return tuple(found) or (("127.0.0.1", 53),)


# -- one resolution ----------------------------------------------------------------


def resolve(
    target: Target,
    *,
    nameservers: Sequence[Nameserver] | None = None,
    timeout: float = 5.0,
) -> Servers:
    """Resolve ``target`` within ``timeout`` seconds (the whole resolution); see the
    module docstring. Raises ``DiscoveryError``. May yield. SRV targets skipped are
    logged at INFO."""
    servers, skipped = _resolve(target, nameservers, timeout)
    if skipped:
        _log.info("discovery %s: skipped SRV targets: %s", target, ", ".join(skipped))
    return servers


def _resolve(
    target: Target, nameservers: Sequence[Nameserver] | None, timeout: float
) -> tuple[Servers, tuple[str, ...]]:
    """``resolve``, and the SRV targets it skipped (``"host:port (why)"``), sorted."""
    if timeout <= 0:
        raise ValueError("timeout must be > 0")
    ask = _Asker(tuple(nameservers) if nameservers else system_nameservers(), timeout)
    skipped: list[str] = []
    try:
        if target.kind == "dns":
            assert target.port is not None
            found = {(a, 1) for a in _addresses(ask, target.name, target.port)}
        else:
            found = _srv(ask, target, skipped)
    except DiscoveryError as exc:
        raise DiscoveryError(exc.kind, f"{target}: {exc.message}") from None
    return _ordered(found), tuple(sorted(set(skipped)))


def _ordered(found: Iterable[tuple[str, int]]) -> Servers:
    """Sorted by (IP version, numeric address, port); one entry per address (the
    largest weight)."""
    best: dict[str, int] = {}
    for address, weight in found:
        best[address] = max(weight, best.get(address, 0))

    def key(address: str) -> tuple[int, int, int]:
        host, port = split_address(address)
        ip = ipaddress.ip_address(host)
        return (ip.version, int(ip), port)

    return tuple((a, best[a]) for a in sorted(best, key=key))


def _addresses(ask: _Asker, name: str, port: int) -> list[str]:
    """Every A and AAAA address of ``name`` as ``host:port``; ``empty`` if neither has
    one. Both are asked at once, within the one deadline. NXDOMAIN propagates. When one
    family's query fails otherwise (timeout, SERVFAIL, NOTIMP: resolvers that mishandle
    AAAA are common) and the other's gives addresses, those are the answer, as Go's
    resolver does by default (its ``StrictErrors`` off); with none, the failure
    propagates."""
    aaaa = gevent.spawn(_records_or_error, ask, name, "AAAA")
    try:
        results = [_records_or_error(ask, name, "A"), aaaa.get()]
    finally:
        aaaa.kill()  # an interrupted resolution (stop, a timeout) leaves no query behind
    found: list[str] = []
    failed: DiscoveryError | None = None
    for result in results:
        if isinstance(result, DiscoveryError):
            if result.kind == "nxdomain":
                raise result
            failed = failed or result
        elif isinstance(result, BaseException):
            raise result
        else:
            found += (format_address(ip, port) for ip in result)
    if failed is not None:
        if not found:
            raise failed
        _log.debug("discovery: %s; using the other family's %d addresses", failed, len(found))
    if not found:
        raise DiscoveryError("empty", f"no A or AAAA record for {name}")
    return found


def _records_or_error(ask: _Asker, name: str, rdtype: str) -> list[str] | Exception:
    """``ask.records(name, rdtype)``, or the exception it raised (returned, so a query
    run in a greenlet of its own never ends in gevent's error report)."""
    try:
        return ask.records(name, rdtype)
    except Exception as exc:
        return exc


def _srv(ask: _Asker, target: Target, skipped: list[str]) -> set[tuple[str, int]]:
    """The addresses of ``target``'s SRV records; what it skips goes to ``skipped``."""
    import dns.rdatatype
    from dns.rdtypes.IN.SRV import SRV

    response = ask.query(target.name, "SRV")
    records = [r for r in ask.answer(response, target.name, "SRV") if isinstance(r, SRV)]
    if not records:
        raise DiscoveryError("empty", f"no SRV record for {target.name}")
    lowest = min(r.priority for r in records)
    chosen = [r for r in records if r.priority == lowest and r.target.to_text() != "."]
    if not chosen:
        raise DiscoveryError("empty", "the service is not offered (SRV target '.')")
    # Addresses the reply carried along (additional section), by owner name.
    carried: dict[str, list[str]] = {}
    for rrset in response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            key = rrset.name.to_text(omit_final_dot=True).lower()
            carried.setdefault(key, []).extend(r.address for r in rrset)
    found: set[tuple[str, int]] = set()
    for record in chosen:
        host = record.target.to_text(omit_final_dot=True)
        if not 1 <= record.port <= 65535:  # port 0: nothing to connect to
            skipped.append(f"{host}:{record.port} (port 0)")
            continue
        weight = max(1, record.weight)  # 0 ("rarely") -> lbpool's minimum weight
        ips = carried.get(host.lower())
        if ips:
            found.update((format_address(ip, record.port), weight) for ip in ips)
            continue
        try:
            addresses = _addresses(ask, host, record.port)
        except DiscoveryError as exc:
            if exc.kind not in ("nxdomain", "empty"):
                raise
            skipped.append(f"{host} ({exc.kind})")
            continue
        found.update((address, weight) for address in addresses)
    if not found:
        raise DiscoveryError("empty", f"no usable SRV target: {', '.join(skipped)}")
    return found


class _Asker:
    """The nameservers and the deadline of one resolution."""

    def __init__(self, nameservers: Sequence[Nameserver], timeout: float) -> None:
        if not nameservers:
            raise ValueError("no nameserver to ask")
        self.order = list(nameservers)
        self.timeout = timeout
        self.deadline = monotonic() + timeout
        self.generation = fork_generation()  # a forked child's copy stops asking

    def records(self, name: str, rdtype: str) -> list[str]:
        """The addresses of an A or AAAA query (NODATA: [])."""
        response = self.query(name, rdtype)
        return [r.address for r in self.answer(response, name, rdtype)]

    def answer(self, response: dns.message.Message, name: str, rdtype: str) -> list[Any]:
        """The rdatas answering the question (CNAMEs followed); [] for NODATA."""
        import dns.message

        what = f"{rdtype} {name}"
        if not isinstance(response, dns.message.QueryMessage):
            raise DiscoveryError("malformed", f"{what}: the reply is not a query response")
        try:
            rrset = response.resolve_chaining().answer
        except Exception as exc:  # ChainTooLong, FormError, ...: a reply we cannot use
            raise DiscoveryError(
                "malformed", f"{what}: unusable reply ({type(exc).__name__})"
            ) from None
        return list(rrset) if rrset is not None else []

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """The reply (NOERROR) of the first nameserver that gives a final one, asked in
        order within the budget left. NXDOMAIN raises ``nxdomain``; when none gives a
        final reply the error names each nameserver's failure."""
        import dns.message
        import dns.rcode

        what = f"{rdtype} {name}"
        query = dns.message.make_query(
            name.rstrip(".") + ".", rdtype, use_edns=0, payload=_EDNS_PAYLOAD
        )
        failures: list[DiscoveryError] = []
        for i, ns in enumerate(list(self.order)):
            if fork_generation() != self.generation:  # a forked child's copy: ask no more
                raise Forked(f"{what}: the process forked while this was asked")
            remaining = self.deadline - monotonic()
            if remaining <= 0:
                break
            share = remaining / (len(self.order) - i)
            where = format_address(*ns)
            try:
                response = _exchange(ns, query, monotonic() + share)
            except DiscoveryError as exc:
                failures.append(DiscoveryError(exc.kind, f"{where} {exc.message}"))
                continue
            rcode = response.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                self._prefer(ns)
                raise DiscoveryError("nxdomain", f"{what}: no such name (NXDOMAIN from {where})")
            if rcode != dns.rcode.NOERROR:
                text = dns.rcode.to_text(rcode)
                failures.append(DiscoveryError("rcode", f"{where} answered {text}"))
                continue
            self._prefer(ns)
            return response
        untried = len(self.order) - len(failures)
        if untried:
            failures.append(
                DiscoveryError(
                    "timeout",
                    f"{untried} nameserver(s) not asked: "
                    f"the {fmt_seconds(self.timeout)} budget ran out",
                )
            )
        kinds = {f.kind for f in failures}
        kind = kinds.pop() if len(kinds) == 1 else failures[-1].kind
        raise DiscoveryError(kind, f"{what}: " + "; ".join(f.message for f in failures))

    def _prefer(self, ns: Nameserver) -> None:
        if self.order[0] != ns:
            self.order.remove(ns)
            self.order.insert(0, ns)


def _exchange(ns: Nameserver, query: dns.message.Message, deadline: float) -> dns.message.Message:
    """One query to one nameserver by ``deadline``: UDP, then TCP if truncated.
    Raises ``DiscoveryError`` (``timeout``, ``unreachable``, ``malformed``)."""
    import dns.flags

    response = _udp(ns, query, deadline)
    if response.flags & dns.flags.TC:
        response = _tcp(ns, query, deadline)
    return response


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _parse(query: dns.message.Message, wire: bytes) -> dns.message.Message | None:
    """The reply to ``query`` in ``wire``; None when it answers another query (a stray
    or late datagram); ``malformed`` when it does not parse."""
    import dns.message

    try:
        response = dns.message.from_wire(wire, ignore_trailing=True)
    except Exception as exc:  # untrusted bytes: any parser error is a malformed reply
        raise DiscoveryError(
            "malformed", f"sent a malformed reply ({type(exc).__name__})"
        ) from None
    try:
        matches = query.is_response(response)
    except Exception:  # dnspython raises for a mismatched question section
        matches = False
    return response if matches else None


def _udp(ns: Nameserver, query: dns.message.Message, deadline: float) -> dns.message.Message:
    wire = query.to_wire()
    budget = deadline - monotonic()
    sock = gsocket.socket(_family(ns[0]), socket.SOCK_DGRAM)
    _in_flight.add(sock)
    try:
        # Connected: the kernel drops datagrams from other sources, and an ICMP port
        # unreachable surfaces as ConnectionRefusedError on the next recv.
        sock.connect(ns)
        sock.send(wire)
        resend = monotonic() + _RESEND
        while True:
            now = monotonic()
            if now >= deadline:
                raise DiscoveryError("timeout", f"gave no reply within {fmt_seconds(budget)}")
            if now >= resend:
                sock.send(wire)
                resend = now + _RESEND
            sock.settimeout(min(deadline, resend) - now)
            try:
                data = sock.recv(_MAX_UDP)
            except TimeoutError:
                continue
            response = _parse(query, data)
            if response is not None:
                return response
    except ConnectionRefusedError:
        raise DiscoveryError("unreachable", "is unreachable (port closed)") from None
    except OSError as exc:
        raise DiscoveryError("unreachable", f"is unreachable ({exc})") from None
    finally:
        _in_flight.discard(sock)
        close_quietly(sock)


def _tcp(ns: Nameserver, query: dns.message.Message, deadline: float) -> dns.message.Message:
    """The same query over TCP (two-byte length framing, RFC 1035 4.2.2)."""
    wire = query.to_wire()
    sock = gsocket.socket(_family(ns[0]), socket.SOCK_STREAM)
    _in_flight.add(sock)
    try:
        sock.settimeout(max(0.0, deadline - monotonic()))
        sock.connect(ns)
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", _recv_exact(sock, 2, deadline))
        response = _parse(query, _recv_exact(sock, length, deadline))
        if response is None:
            raise DiscoveryError("malformed", "answered another query over TCP")
        return response
    except TimeoutError:
        raise DiscoveryError("timeout", "gave no reply over TCP in time") from None
    except OSError as exc:
        raise DiscoveryError("unreachable", f"is unreachable over TCP ({exc})") from None
    finally:
        _in_flight.discard(sock)
        close_quietly(sock)


def _recv_exact(sock: gsocket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise DiscoveryError("malformed", "closed the TCP reply short")
        data += chunk
    return data


# -- the runner --------------------------------------------------------------------


class Discovery:
    """Resolves ``target`` at once, then every ``refresh`` seconds, on one greenlet.

    Every good answer goes to ``on_answer(servers)`` (identical ones too: applying
    one is the callback's to make idempotent); every failure to ``on_error(exc)``,
    the last good answer being kept. An answer ``on_answer`` raises for could not be
    applied: it counts as a failed resolution (``malformed``, the exception named in
    ``last_error``, logged like any failure) and the next answer tries again. An
    exception from ``on_error`` is logged on ``lbpool`` and the loop goes on.
    ``refresh`` is measured from the start of one resolution to the next. Failures
    log a WARNING when an outage starts and DEBUG while it lasts; skipped SRV
    targets a WARNING when that set changes, DEBUG otherwise.

    State (read any time; written only by the loop): ``servers`` (the last good
    answer, set once ``on_answer`` took it; () before the first), ``last_refresh``
    (UNIX time of the last good answer, or None), ``last_error`` (the last failure's
    message, None since a good answer), ``failures`` (failed resolutions since
    start). ``attempted`` is set once the first resolution ended (either way),
    ``answered`` once a good answer came: ``wait(timeout)`` waits for the latter.
    """

    def __init__(
        self,
        target: Target,
        *,
        refresh: float,
        timeout: float,
        nameservers: Sequence[Nameserver] | None = None,
        on_answer: Callable[[Servers], object] | None = None,
        on_error: Callable[[DiscoveryError], object] | None = None,
        name: str = "",
    ) -> None:
        if refresh <= 0 or timeout <= 0:
            raise ValueError("refresh and timeout must be > 0")
        self.target = target
        self.refresh = refresh
        self.timeout = timeout
        self.nameservers = tuple(nameservers) if nameservers else None  # None: system's
        self.on_answer = on_answer
        self.on_error = on_error
        self.name = name or str(target)
        self.servers: Servers = ()
        self.last_refresh: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        self.attempted = Event()
        self.answered = Event()
        self._wake = Event()  # refresh_now: cut the sleep short
        self._skipped: tuple[str, ...] = ()  # SRV targets the last answer skipped
        self._greenlet: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<Discovery {self.name} [{state}] servers={len(self.servers)} "
            f"failures={self.failures} last_error={self.last_error!r}>"
        )

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def start(self) -> Discovery:
        """Start the loop (its first resolution runs as soon as the hub turns). Never
        yields; a second call while running does nothing."""
        if not self.running:
            self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self, block: bool = True) -> None:
        """Kill the loop and wait for it (a resolution in flight closes its socket).
        May yield; calling it twice is harmless. ``block=False`` never yields: the
        loop dies at the hub's next turn (the way to stop it from its own callback)."""
        greenlet = self._greenlet
        if greenlet is None:
            return
        if block and greenlet is not gevent.getcurrent():
            greenlet.kill(block=True)
            self._greenlet = None
        else:  # kept: a later blocking stop() joins it
            greenlet.kill(block=False)

    def refresh_now(self) -> None:
        """Resolve again now instead of at the next tick. Never yields."""
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for the first good answer; True if there is one."""
        return bool(self.answered.wait(timeout))

    def resolve_once(self) -> None:
        """One resolution, applied to the state and passed to the callbacks. May yield.
        A forked child's copy of a resolution in flight at the fork (its socket closed
        by the fork hook) ends here, with no callback and no log."""
        generation = fork_generation()
        try:
            servers, skipped = _resolve(self.target, self.nameservers, self.timeout)
        except DiscoveryError as exc:
            if fork_generation() != generation:
                return
            self._failed(exc)
            return
        except Exception as exc:  # a bug, not DNS: still keep the last good set
            if fork_generation() != generation:
                return
            self._failed(
                DiscoveryError("malformed", f"{self.target}: internal error: {exc!r}"), exc
            )
            return
        if fork_generation() != generation:  # answered before our copy was closed
            return
        if skipped:
            level = logging.WARNING if skipped != self._skipped else logging.DEBUG
            _log.log(level, "discovery %s: skipped SRV targets: %s", self.name, ", ".join(skipped))
        self._skipped = skipped
        if self.on_answer is not None:
            try:
                self.on_answer(servers)
            except Exception as exc:  # e.g. an address the pools refuse: a failed refresh
                self._failed(
                    DiscoveryError(
                        "malformed",
                        f"{self.target}: the answer could not be applied: "
                        f"{type(exc).__name__}: {exc}",
                    ),
                    exc,
                )
                return
        if self.last_error is not None:
            _log.info("discovery %s: resolving again (%d servers)", self.name, len(servers))
        self.servers = servers
        self.last_refresh = time.time()
        self.last_error = None
        self.answered.set()
        self.attempted.set()

    def _failed(self, exc: DiscoveryError, cause: BaseException | None = None) -> None:
        # WARNING when an outage starts, DEBUG while it lasts: one line per refresh
        # would flood the log for as long as DNS is down. An unexpected ``cause`` (a
        # bug) carries its traceback on that first line only.
        level = logging.WARNING if self.last_error is None else logging.DEBUG
        _log.log(
            level,
            "discovery %s: %s (keeping %d servers)",
            self.name,
            exc,
            len(self.servers),
            exc_info=cause if level == logging.WARNING else None,
        )
        self.failures += 1
        self.last_error = str(exc)
        self.attempted.set()
        if self.on_error is not None:
            self._call(self.on_error, exc)

    def _call(self, callback: Callable[[_T], object], arg: _T) -> None:
        try:
            callback(arg)
        except Exception:
            _log.exception("discovery %s: callback %r raised", self.name, callback)

    def _run(self) -> None:
        while True:
            started = monotonic()
            self.resolve_once()
            self._wake.wait(max(0.0, started + self.refresh - monotonic()))
            self._wake.clear()
