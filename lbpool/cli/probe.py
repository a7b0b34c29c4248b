"""``lbpool probe CONFIG``: resolve every discovered backend (``discover:``) and print
the servers each answer gave, then dial every server concurrently, run its health
check, print a table of state and dial latency; exit 1 when any server is down or a
discovered backend does not resolve."""

from __future__ import annotations

import argparse
from time import monotonic

import gevent

from lbpool.cli._tables import print_table
from lbpool.cli.check import load_or_report
from lbpool.config import BackendConfig, Config, ServerConfig
from lbpool.dial import dial
from lbpool.discovery import resolve
from lbpool.errors import DialError, DiscoveryError
from lbpool.health import Unhealthy, check_health, peek_alive
from lbpool.subset import subset

__all__ = ["run"]


def _probe_one(
    backend: str, server: ServerConfig, bcfg: BackendConfig
) -> tuple[str, str, bool, str, str]:
    address = str(server.address)
    start = monotonic()
    try:
        sock = dial(server.address, bcfg.dial, setup=bcfg.setup)
    except DialError as exc:
        return backend, address, False, "-", f"dial failed: {exc.reason}"
    latency = f"{(monotonic() - start) * 1000:.1f}"
    try:
        hc = bcfg.health_check
        if not peek_alive(sock):
            return backend, address, False, latency, "closed by peer or unexpected bytes"
        if hc.send is None and hc.hook is None:
            return backend, address, True, latency, "connected (no health check configured)"
        try:
            check_health(sock, hc)
        except Unhealthy as exc:
            return backend, address, False, latency, f"check failed: {exc.reason}"
        parts = []
        if hc.send is not None:
            sent = hc.send.strip()
            parts.append(f"{sent} -> {hc.expect}" if hc.expect is not None else f"sent {sent}")
        if hc.hook is not None:
            parts.append(f"hook {hc.hook}")
        return backend, address, True, latency, "ok: " + ", ".join(parts)
    finally:
        sock.close()


def _resolve_one(bcfg: BackendConfig) -> tuple[ServerConfig, ...]:
    d = bcfg.discover
    assert d is not None
    found = resolve(d.target, nameservers=d.parsed_nameservers(), timeout=d.timeout)
    return tuple(ServerConfig.model_validate({"address": a, "weight": w}) for a, w in found)


def _discover(config: Config) -> tuple[dict[str, tuple[ServerConfig, ...]], int]:
    """Resolve every discovered backend concurrently and print what each answer gave;
    the servers per backend (the subset this process would use, when one is set) and
    how many backends failed to resolve."""
    discovered = {name: b for name, b in config.backends.items() if b.discover is not None}
    if not discovered:
        return {}, 0
    jobs = {name: gevent.spawn(_resolve_one, b) for name, b in discovered.items()}
    limit = max(b.discover.timeout for b in discovered.values() if b.discover is not None)
    gevent.joinall(list(jobs.values()), timeout=limit + 5.0)
    gevent.killall(list(jobs.values()), block=True, timeout=1.0)
    servers: dict[str, tuple[ServerConfig, ...]] = {}
    rows: list[list[str]] = []
    failed = 0
    for name, job in jobs.items():
        bcfg = discovered[name]
        target = str(bcfg.discover.target) if bcfg.discover is not None else "?"
        if job.successful() and isinstance(job.value, tuple):
            found: tuple[ServerConfig, ...] = job.value
            used = found
            if bcfg.subset is not None and bcfg.subset.size < len(found):
                pairs = [(str(s.address), s.weight) for s in found]
                keep = {a for a, _ in subset(pairs, bcfg.subset.size, bcfg.subset.client_id)}
                used = tuple(s for s in found if str(s.address) in keep)
            servers[name] = used
            listed = ", ".join(
                str(s.address) + (f" (weight {s.weight})" if s.weight != 1 else "") for s in found
            )
            note = f"; subset of {len(used)} probed" if used is not found else ""
            rows.append([name, target, "ok", f"{len(found)}: {listed}{note}"])
        else:
            failed += 1
            exc = job.exception
            why = str(exc) if isinstance(exc, DiscoveryError) else repr(exc) if exc else "timed out"
            rows.append([name, target, "failed", why])
    print_table(["backend", "discover", "state", "servers"], rows, title="lbpool probe: discovery")
    return servers, failed


def run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 2
    resolved, unresolved = _discover(config)
    jobs = []
    limit = 0.0
    for name, bcfg in config.backends.items():
        limit = max(limit, bcfg.dial.timeout + bcfg.health_check.timeout)
        for server in resolved.get(name, bcfg.servers):
            jobs.append(gevent.spawn(_probe_one, name, server, bcfg))
    if not jobs and unresolved:
        print(f"{unresolved} discovered backend(s) did not resolve; no server to probe")
        return 1
    if not jobs:
        print(f"{args.config}: no backends configured; nothing to probe")
        return 0
    deadline = monotonic() + limit + 5.0  # each step is bounded; this bounds the lot
    while not all(job.dead for job in jobs):  # joinall may return early on a stray switch
        remaining = deadline - monotonic()
        if remaining <= 0:
            break
        gevent.joinall(jobs, timeout=remaining)
    gevent.killall(jobs, block=True, timeout=1.0)
    rows: list[list[str]] = []
    down = 0
    for job in jobs:
        if job.successful() and isinstance(job.value, tuple):  # a killed job's value
            backend, address, up, latency, result = job.value  # is its GreenletExit
        else:
            backend, address, up, latency = "?", "?", False, "-"
            result = f"probe failed: {job.exception!r}" if job.exception else "probe timed out"
        down += not up
        rows.append([backend, address, "up" if up else "down", latency, result])
    print_table(["backend", "server", "state", "dial ms", "check"], rows, title="lbpool probe")
    total = len(rows)
    print(f"{total - down} of {total} servers up" + (f", {down} down" if down else ""))
    if unresolved:
        print(f"{unresolved} discovered backend(s) did not resolve")
    return 1 if down or unresolved else 0
