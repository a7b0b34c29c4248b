"""What ``lbpool demo`` shows: the live table (or a plain line), and the summary.

``Record`` is everything the demo observes while it runs; ``lbpool.cli.demo`` writes
it, and the functions here only read it (with a ``ManagerStats`` snapshot for the
live view). Data flows one way: ``demo`` imports this module, never the reverse.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from lbpool.cli._tables import plain, print_table, rich_table
from lbpool.stats import ManagerStats

__all__ = ["Key", "Outage", "Record", "headline", "plain_line", "render", "rows", "summary"]

Key = tuple[str, str]  # (backend, address)


@dataclass
class Outage:
    backend: str
    address: str
    killed_at: float | None = None
    restarted_at: float | None = None
    restart_error: str | None = None


@dataclass
class Record:
    """Everything the demo observes: the demo writes it, this module only reads it."""

    start: float
    duration: float
    workers: int
    ok: int = 0
    phase: int = 0
    served: dict[Key, list[int]] = field(default_factory=dict)
    retried: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failed_while_failover: int = 0
    latencies: list[float] = field(default_factory=list)
    events: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=500))
    transitions: dict[Key, list[tuple[float, str]]] = field(default_factory=dict)
    n_events: int = 0  # events ever recorded (the deque keeps the latest)
    down: set[str] = field(default_factory=set)  # addresses whose echo server is stopped
    outage: Outage | None = None  # the server the demo kills, once chosen
    interrupted: bool = False  # Ctrl-C or SIGTERM ended the run early
    final_stats: ManagerStats | None = None  # the manager's stats just before it closed

    def now(self) -> float:
        return monotonic() - self.start

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))
        self.n_events += 1

    def transition(self, key: Key, old: str, new: str, detail: str = "") -> None:
        seq = self.transitions.setdefault(key, [(0.0, old)])
        if seq[-1][1] != old:  # a step we did not see (sampling): keep the chain honest
            seq.append((self.now(), old))
        seq.append((self.now(), new))
        self.event(f"breaker {key[1]} ({key[0]}): {old} -> {new}{detail}")


_EVENTS_SHOWN = 6  # the latest events under the live table

_HEADERS = (
    "backend",
    "server",
    "up",
    "breaker",
    "in use",
    "idle",
    "requests",
    "share",
    "dial fails",
)


def rows(rec: Record, stats: ManagerStats) -> list[list[str]]:
    """One row per server: its state now and its share of the requests so far."""
    out = []
    for name, backend in stats.backends.items():
        total = sum(sum(c) for (b, _), c in rec.served.items() if b == name) or 1
        for address, s in backend.servers.items():
            served = sum(rec.served.get((name, address), [0]))
            out.append(
                [
                    name,
                    address,
                    "DOWN" if address in rec.down else "up",
                    s.breaker_state,
                    str(s.in_use),
                    str(s.idle),
                    f"{served:,}",
                    f"{100 * served / total:.0f}%",
                    str(s.dial_failures),
                ]
            )
    return out


def headline(rec: Record) -> str:
    t = min(rec.now(), rec.duration)
    rate = rec.ok / t if t > 0 else 0.0
    failed = sum(rec.failed.values())
    retried = sum(rec.retried.values())
    return (
        f"{t:4.1f}s/{rec.duration:.0f}s  requests {rec.ok:,} ({rate:,.0f}/s)  "
        f"retried {retried}  failed {failed}"
    )


def render(rec: Record, stats: ManagerStats) -> Any:
    """The live view (rich): the table, a progress bar, the latest events."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    table = rich_table("lbpool demo " + headline(rec), tight=True)
    for header in _HEADERS:
        right = header not in ("backend", "server", "up", "breaker")
        table.add_column(header, justify="right" if right else "left", no_wrap=True)
    for row in rows(rec, stats):
        style = {"open": "red", "half_open": "yellow"}.get(row[3], "")
        if row[2] == "DOWN":
            style = "bold red"
        table.add_row(*(plain(cell) for cell in row), style=style)
    bar = ProgressBar(total=rec.duration, completed=min(rec.now(), rec.duration))
    events = [
        Text(f"{t:5.1f}s  {text}", no_wrap=True, overflow="ellipsis")
        for t, text in list(rec.events)[-_EVENTS_SHOWN:]
    ]
    return Group(table, bar, *events)


def plain_line(rec: Record, stats: ManagerStats) -> str:
    """The live view without rich: one line per second."""
    parts = []
    for name, backend in stats.backends.items():
        servers = " ".join(
            f"{address}={'DOWN/' if address in rec.down else ''}{s.breaker_state}"
            for address, s in backend.servers.items()
        )
        parts.append(f"{name}[{servers}]")
    return f"[{headline(rec)}] " + " ".join(parts)


def pool_usage(stats: ManagerStats) -> str:
    """One line on how hard the pools were pressed: acquisitions that queued, that
    dialed on the request path, and the most connections one server had in use."""
    servers = stats.servers()
    acquired = sum(s.acquired for s in servers)
    waits = sum(s.waits for s in servers)
    dialed = sum(s.misses for s in servers)
    peak = max(servers, key=lambda s: s.max_in_use, default=None)
    share = f" ({100 * waits / acquired:.1f}%)" if acquired else ""
    top = f"; most in use at once: {peak.max_in_use} of {peak.max_size}" if peak else ""
    return (
        f"pools: {acquired:,} acquisitions, {waits:,} waited for a connection{share}, "
        f"{dialed:,} dialed on the request path{top}"
    )


def summary(rec: Record) -> None:
    """Print the run's outcome: totals, errors, latency, requests per server, breaker
    transitions, and whether the outage was survived."""
    elapsed = min(rec.now(), rec.duration) if not rec.interrupted else rec.now()
    failed = sum(rec.failed.values())
    retried = sum(rec.retried.values())
    out: list[str] = [""]
    head = "interrupted: the summary so far" if rec.interrupted else "summary"
    out.append(f"lbpool demo {head} ({elapsed:.1f}s, {rec.workers} workers)")
    rate = rec.ok / elapsed if elapsed > 0 else 0.0
    out.append(
        f"requests: {rec.ok + failed:,} total, {rec.ok:,} ok, {failed} failed, {rate:,.0f}/s"
    )

    def kinds(counter: Counter[str]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in counter.most_common()) or "none"

    out.append(f"errors by kind (failed requests): {kinds(rec.failed)}")
    tail = "; every retry succeeded on a fresh connection" if retried and not failed else ""
    out.append(
        f"retried once after a connection died in flight: {retried} ({kinds(rec.retried)}){tail}"
    )
    if rec.latencies:
        lat = sorted(rec.latencies)

        def pct(p: float) -> str:
            return f"{lat[min(len(lat) - 1, int(p * len(lat)))] * 1000:.2f} ms"

        out.append(f"latency: p50 {pct(0.50)}, p99 {pct(0.99)}, max {lat[-1] * 1000:.2f} ms")
    for line in out:
        print(line)

    rows = []
    for (backend, address), counts in rec.served.items():
        total = sum(sum(c) for (b, _), c in rec.served.items() if b == backend) or 1
        served = sum(counts)
        rows.append(
            [
                backend,
                address,
                *(f"{c:,}" for c in counts),
                f"{served:,}",
                f"{100 * served / total:.1f}%",
            ]
        )
    print_table(
        ["backend", "server", "before", "down", "after", "total", "share"],
        rows,
        title="requests per server: before the kill, while down, after the restart; "
        "share of its backend",
    )

    print("breaker transitions:")
    changed = False
    for (backend, address), seq in rec.transitions.items():
        changed = True
        chain = " -> ".join(f"{state}@{t:.1f}s" if t else state for t, state in seq)
        print(f"  {backend} {address}: {chain}")
    if not changed:
        print("  none: every breaker stayed closed")
    trips = 0
    if rec.final_stats is not None:
        trips = sum(s.breaker_trips for s in rec.final_stats.servers())
    print(f"breaker trips (closed -> open): {trips}")
    if rec.final_stats is not None:
        print(pool_usage(rec.final_stats))

    outage = rec.outage
    if outage is not None and outage.killed_at is not None:
        key = (outage.backend, outage.address)
        states = [state for _, state in rec.transitions.get(key, [])]
        opened = "open" in states
        back = (
            f"back at {outage.restarted_at:.1f}s"
            if outage.restarted_at is not None
            else (
                f"restart failed: {outage.restart_error}"
                if outage.restart_error
                else "not restarted before the end"
            )
        )
        print(
            f"outage: {outage.address} ({outage.backend}) killed at {outage.killed_at:.1f}s, {back}"
        )
        print(f"breaker opened: {'yes' if opened else 'no'}")
        others = {
            address: counts[1]
            for (b, address), counts in rec.served.items()
            if b == outage.backend and address != outage.address
        }
        moved = sum(others.values())
        spread = ", ".join(f"{a} {n:,}" for a, n in others.items())
        if moved:
            print(
                f"traffic moved: yes: while {outage.address} was down, {outage.backend} "
                f"requests went to {spread}"
            )
        else:
            print(
                f"traffic moved: no {outage.backend} request was served while "
                f"{outage.address} was down"
            )
        after = rec.served[key][2]
        closed_again = bool(states) and states[-1] == "closed" and opened
        print(
            f"recovered: {'yes' if closed_again and after else 'no'} "
            f"({outage.address} served {after:,} requests after it came back; "
            f"breaker now {states[-1] if states else 'closed'})"
        )
    if rec.failed_while_failover:
        print(
            f"result: FAILED: {rec.failed_while_failover} requests failed while "
            f"failover could have served them"
        )
    elif failed:
        print(
            f"result: OK: no request failed while failover could serve "
            f"({failed} failed when no server could serve them)"
        )
    else:
        print("result: OK: zero failed requests; no request failed while failover could serve")
    sys.stdout.flush()
