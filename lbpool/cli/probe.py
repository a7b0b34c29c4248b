"""``lbpool probe CONFIG``: dial every server concurrently, run its health check, print
a table of state and dial latency; exit 1 when any server is down."""

from __future__ import annotations

import argparse
from time import monotonic

import gevent

from lbpool.cli._tables import print_table
from lbpool.cli.check import load_or_report
from lbpool.config import BackendConfig, ServerConfig
from lbpool.dial import dial
from lbpool.errors import DialError
from lbpool.health import Unhealthy, check_health, peek_alive

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


def run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 2
    jobs = []
    limit = 0.0
    for name, bcfg in config.backends.items():
        limit = max(limit, bcfg.dial.timeout + bcfg.health_check.timeout)
        for server in bcfg.servers:
            jobs.append(gevent.spawn(_probe_one, name, server, bcfg))
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
    return 1 if down else 0
