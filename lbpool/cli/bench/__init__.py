"""``lbpool bench``: lbpool against a floor and its peers, in one gevent process, on loopback.

``main`` parses the flags, ``run`` runs the scenarios (``scenarios``) over interleaved
rounds against the pools of ``peers`` and summarises them: each number is the median
over rounds, each ratio the median of *same-round* ratios. ``report`` prints them
(tables, Markdown, JSON, a plot). The bench reports measurements and ratios only; the
project's goals for them are in docs/benchmarks.md.

Nothing in the library imports this package; the peer libraries are imported only
when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from time import monotonic
from typing import Any

import gevent

from lbpool.cli.bench import peers, report
from lbpool.cli.bench.scenarios import (
    ACQUIRE_TIMEOUT,
    DIAL,
    FLOOR,
    FLOOR_A,
    HASHING,
    MANAGER,
    OPT_IN,
    POOL,
    QUICK,
    SCENARIOS,
    SERVER_COUNTS,
    SIZE,
    SQLA,
    STRATEGIES,
    Settings,
    b_worker,
    c_worker,
    contended_round,
    h_tables,
    make_members,
    measure_a,
    measure_d,
    measure_h_picks,
    measure_h_placement,
    median,
    observe,
    profile_hot_paths,
    progress,
    ratio,
    rounded,
    scenario_e,
    scenario_r,
    scenario_s,
    warm,
)
from lbpool.testing import EchoServer, hot_path

__all__ = ["QUICK", "SCENARIOS", "Settings", "main", "run", "settings_from_args"]

# -- the run -----------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "gevent": getattr(gevent, "__version__", "?"),
        "platform": platform.platform(),
        "hot_path": hot_path(),
    }


def _available_peers(address: str, enabled: bool) -> tuple[list[str], dict[str, str]]:
    if not enabled:
        return [], dict.fromkeys(peers.PEERS, "disabled (--no-peers)")
    ok: list[str] = []
    missing: dict[str, str] = {}
    for kind in peers.PEERS:
        try:
            with peers.make_adapter(kind, address, 1, 1.0):
                pass
        except peers.PeerMissing as exc:
            missing[kind] = str(exc)
        except Exception as exc:  # installed but unusable here: say so, go on
            missing[kind] = f"{type(exc).__name__}: {exc}"
        else:
            ok.append(kind)
    return ok, missing


@contextlib.contextmanager
def _quiet_lbpool_logs() -> Iterator[None]:
    logger = logging.getLogger("lbpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def run(
    settings: Settings, *, verbose: bool = False, command: str = "lbpool bench"
) -> dict[str, Any]:
    """Run the bench; returns JSON-ready results (plus ``_samples`` for plotting)."""
    s = settings
    t_start = monotonic()
    server = EchoServer().start()
    address = server.address
    try:
        peer_ok, peer_missing = _available_peers(address, s.peers)
        a_impls = [FLOOR_A, FLOOR, POOL, MANAGER, *peer_ok]
        b_impls = [FLOOR, POOL, MANAGER, *peer_ok]
        c_impls = [FLOOR, POOL, MANAGER, *peer_ok, DIAL]
        per_round: dict[str, dict[str, list[Any]]] = {sc: {} for sc in SCENARIOS}
        samples: dict[str, dict[str, list[float]]] = {"B": {}, "C": {}}
        rng = random.Random(1)
        wants_members = {"D", "H"} & set(s.scenarios)
        members = {n: make_members(n, rng) for n in SERVER_COUNTS} if wants_members else {}
        tables = h_tables() if "H" in s.scenarios else {}
        payload = b"x" * s.payload
        failed: dict[str, str] = {}  # peers that broke mid-run: dropped, with the reason

        def measure(sc: str, kind: str, fn: Callable[[peers.Adapter], Any]) -> None:
            if kind in failed:
                return
            try:
                with peers.make_adapter(kind, address, SIZE, ACQUIRE_TIMEOUT) as ad:
                    value = fn(ad)
            except Exception as exc:
                if kind not in peers.PEERS:
                    raise
                failed[kind] = f"scenario {sc}: {type(exc).__name__}: {exc}"
                progress(verbose, f"  {kind} failed, dropped: {failed[kind]}")
                for rounds in per_round.values():
                    rounds.pop(kind, None)
                return
            if isinstance(value, dict) and "_samples" in value:
                samples[sc][kind] = value.pop("_samples")
            per_round[sc].setdefault(kind, []).append(value)

        def b_round(ad: peers.Adapter) -> dict[str, Any]:
            warm(ad)
            return contended_round(ad, s.b_greenlets, s.b_seconds, b_worker)

        def c_round(ad: peers.Adapter) -> dict[str, Any]:
            warm(ad)
            budget = [s.c_dial_max] if ad.name == DIAL else None
            out = contended_round(ad, s.c_greenlets, s.c_seconds, c_worker, ad.io, payload, budget)
            gevent.sleep(0.01)  # let the server's handlers of closed sockets end
            return out

        for r in range(s.rounds):
            progress(verbose, f"round {r + 1}/{s.rounds}")
            if "A" in s.scenarios:
                for kind in _rotate(a_impls, r):
                    measure("A", kind, lambda ad: measure_a(ad, s.a_seconds))
            if "B" in s.scenarios:
                for kind in _rotate(b_impls, r):
                    measure("B", kind, b_round)
            if "C" in s.scenarios:
                for kind in _rotate(c_impls, r):
                    measure("C", kind, c_round)
            if "D" in s.scenarios:
                for key, ns in measure_d(members, s.d_seconds).items():
                    per_round["D"].setdefault(key, []).append(ns)
            if "H" in s.scenarios:
                for key, ns in measure_h_picks(tables, members, s.d_seconds).items():
                    per_round["H"].setdefault(key, []).append(ns)
        peer_missing.update(failed)
        peer_ok = [k for k in peer_ok if k not in failed]
        e_result: dict[str, Any] | None = None
        if "E" in s.scenarios:
            progress(verbose, "scenario E (failover)")
            with _quiet_lbpool_logs():  # the breaker's warnings are the point here
                e_result = scenario_e(s, verbose)
        r_result: dict[str, Any] | None = None
        if "R" in s.scenarios:
            progress(verbose, "scenario R (redis-py GET over lbpool and redis-py's pools)")
            with _quiet_lbpool_logs():
                r_result = scenario_r(s, verbose)
        s_result: dict[str, Any] | None = None
        if "S" in s.scenarios:
            progress(verbose, "scenario S (scale: 10, 100, 1,000 servers)")
            with _quiet_lbpool_logs():
                s_result = scenario_s(s, verbose)
        h_placement = None
        if "H" in s.scenarios:
            progress(verbose, "scenario H (key placement: balance, disruption)")
            h_placement = measure_h_placement(s)
        observations: dict[str, Any] = {}
        if {"B", "C"} & set(s.scenarios):
            progress(verbose, "observing behaviour (limit, order, timeout, cooperation)")
            for kind in [FLOOR, POOL, MANAGER, *peer_ok]:
                observations[kind] = observe(kind, address, server, s)
        profile_text = profile_hot_paths(address, s) if s.profile else None
    finally:
        server.stop()

    scen = _summarise(per_round, s)
    if e_result is not None:
        scen["E"] = e_result
    if h_placement is not None:
        scen["H"]["placement"] = h_placement
    if r_result is not None:
        scen["R"] = r_result
    if s_result is not None:
        scen["S"] = s_result
    result: dict[str, Any] = {
        "meta": {
            "command": command,
            "settings": {k: v for k, v in asdict(s).items() if k != "profile"},
            "machine": _machine(),
            "peers": peers.peer_versions(),
            "peers_missing": peer_missing,
            "pool_max_size": SIZE,
            "duration_s": 0.0,
        },
        "scenarios": scen,
        "observations": observations,
    }
    if profile_text is not None:
        result["profile"] = profile_text
    result["meta"]["duration_s"] = round(monotonic() - t_start, 2)
    result["_samples"] = samples
    return result


def _same_round(
    values: Sequence[Any], refs: Sequence[Any], get: Callable[[Any], float], digits: int = 3
) -> float:
    """Median over rounds of value/reference, each pair from the same round."""
    return rounded(
        median([ratio(get(v), get(r)) for v, r in zip(values, refs, strict=True)]), digits
    )


def _num(x: Any) -> float:
    return float(x)


def _summarise(per_round: dict[str, dict[str, list[Any]]], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if per_round["A"]:
        rounds_a = per_round["A"]
        a: dict[str, Any] = {}
        for kind, vals in rounds_a.items():
            row: dict[str, Any] = {
                "ns_per_op": rounded(median(vals), 1),
                "rounds": [round(v, 1) for v in vals],
                # the floor, as in every scenario: a deque with FIFO handoff to waiters
                "x_floor": _same_round(vals, rounds_a[FLOOR], _num, 2),
                # and against the bare pop/append, the lowest any Python code can go
                "x_deque": _same_round(vals, rounds_a[FLOOR_A], _num, 2),
            }
            if SQLA in rounds_a:
                row["x_sqlalchemy"] = _same_round(vals, rounds_a[SQLA], _num)
            a[kind] = row
        out["A"] = {"unit": "ns per acquire+release", "floor": FLOOR, "results": a}
    for sc, rate_key, dist_key in (("B", "ops_per_s", "wait_us"), ("C", "req_per_s", "latency_us")):
        rounds = per_round[sc]
        if not rounds:
            continue
        floor_r = rounds[FLOOR]
        res: dict[str, Any] = {}
        for kind, rs in rounds.items():
            rate = [x["ops_per_s"] for x in rs]
            row = {
                rate_key: rounded(median(rate), 0),
                dist_key: {
                    q: rounded(median([x["dist"][q] for x in rs]), 1) for q in ("p50", "p99", "max")
                },
                "x_floor": _same_round(rs, floor_r, _rate),
                "p99_x_floor": _same_round(rs, floor_r, _p99),
                "max_x_floor": _same_round(rs, floor_r, _max),
                "errors": _sum_errors(rs),
                "starved_greenlets": max(x["starved"] for x in rs),
                "still_waiting_at_end": max(x["still_waiting"] for x in rs),
                "rounds": [rounded(v, 0) for v in rate],
                # per round: operations completed by the deadline, greenlets that got none
                "ops_by_round": [x["ops"] for x in rs],
                "starved_by_round": [x["starved"] for x in rs],
            }
            for ref, key in ((SQLA, "x_sqlalchemy"), (DIAL, "x_dial")):
                if ref in rounds and kind != ref:
                    row[key] = _same_round(rs, rounds[ref], _rate, 2)
            res[kind] = row
        out[sc] = {
            "greenlets": s.b_greenlets if sc == "B" else s.c_greenlets,
            "max_size": SIZE,
            "floor": FLOOR,
            "results": res,
        }
        if sc == "C":
            out[sc]["payload_bytes"] = s.payload
    if per_round["D"]:
        rounds_d = per_round["D"]
        d: dict[str, Any] = {}
        for name in (FLOOR_A, *STRATEGIES):
            row = {str(n): rounded(median(rounds_d[f"{name}/{n}"]), 1) for n in SERVER_COUNTS}
            row["x_1000_vs_10"] = _same_round(
                rounds_d[f"{name}/1000"], rounds_d[f"{name}/10"], _num, 2
            )
            d[name] = row
        out["D"] = {"unit": "ns per pick", "floor": f"{FLOOR_A} popleft/append", "results": d}
    if per_round["H"]:
        rounds_h = per_round["H"]
        h: dict[str, Any] = {}
        for name in ("round_robin", *HASHING):
            row = {str(n): rounded(median(rounds_h[f"{name}/{n}"]), 1) for n in SERVER_COUNTS}
            row["x_1000_vs_10"] = _same_round(
                rounds_h[f"{name}/1000"], rounds_h[f"{name}/10"], _num, 2
            )
            row["x_round_robin_1000"] = _same_round(
                rounds_h[f"{name}/1000"], rounds_h["round_robin/1000"], _num, 2
            )
            h[name] = row
        out["H"] = {"unit": "ns per owner(key) pick", "floor": "round_robin", "results": h}
    return out


def _rate(x: dict[str, Any]) -> float:
    return float(x["ops_per_s"])


def _p99(x: dict[str, Any]) -> float:
    return float(x["dist"]["p99"])


def _max(x: dict[str, Any]) -> float:
    return float(x["dist"]["max"])


def _sum_errors(rs: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for x in rs:
        for k, v in x["errors"].items():
            total[k] = total.get(k, 0) + v
    return total


# -- entry point -------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lbpool bench",
        description="Benchmark lbpool against a floor and peer pools (gevent, loopback).",
    )
    p.add_argument("--quick", action="store_true", help="a ~15 s run (2 short rounds)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=(
            "comma-separated subset of A,B,C,D,E,H (default: all of them), and R: redis-py "
            "GET over lbpool vs redis-py's pools (needs redis-py and redis-server; only "
            "when named)"
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw distributions and throughput")
    p.add_argument("--no-peers", action="store_true", help="skip SQLAlchemy and other peers")
    p.add_argument("--profile", action="store_true", help="add cProfile listings of hot paths")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    base = QUICK if ns.quick else Settings()
    wanted = tuple(x.strip().upper() for x in ns.scenarios.split(",") if x.strip())
    known = (*SCENARIOS, *OPT_IN)
    bad = [x for x in wanted if x not in known]
    if bad or not wanted:
        raise ValueError(
            f"--scenarios: unknown {', '.join(bad) or '(none)'}; choose from {','.join(known)}"
        )
    rounds = base.rounds if ns.rounds is None else ns.rounds
    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    return replace(
        base,
        rounds=rounds,
        scenarios=tuple(x for x in known if x in wanted),
        peers=not ns.no_peers,
        profile=ns.profile,
    )


def main(argv: list[str] | None = None) -> int:
    """``lbpool bench [--quick] [--rounds N] [--scenarios A,B] [--json] [--plot F.png]``."""
    try:
        ns = _parse(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        settings = settings_from_args(ns)
    except ValueError as exc:
        print(f"lbpool bench: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["lbpool bench", *(sys.argv[1:] if argv is None else argv)])
    result = run(settings, verbose=not ns.quiet and not ns.json, command=command)
    if ns.plot:
        report.write_plot(result, ns.plot)
    public = report.jsonable({k: v for k, v in result.items() if not k.startswith("_")})
    if ns.json:
        sys.stdout.write(json.dumps(public, indent=2, allow_nan=False) + "\n")
    elif ns.markdown:
        print(report.render_markdown(public))
    else:
        if not report.print_rich(public):
            print(report.render_plain(public))
        if "profile" in public:
            print(public["profile"])
        if ns.plot:
            print(f"plot written to {ns.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
