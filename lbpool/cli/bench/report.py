"""How ``lbpool bench`` prints its results: tables (rich when installed, else plain
text), Markdown (for docs/benchmarks.md), strict JSON, and a plot (matplotlib, imported
only for ``--plot``). Measurements and same-run ratios only: no goals, no verdicts."""

from __future__ import annotations

import json
import re
from typing import Any

from lbpool.cli._tables import plain
from lbpool.cli.bench.scenarios import DIAL, FLOOR, LBPOOL, ratio

__all__ = ["jsonable", "print_rich", "render_markdown", "render_plain", "write_plot"]


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "-"
        if digits == 0:
            return f"{x:,.0f}"
        return f"{x:,.{digits}f}"
    return str(x)


def _tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table printed."""
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    scen = result["scenarios"]
    if "A" in scen:
        rows = [
            [
                k,
                _fmt(v["ns_per_op"]),
                _fmt(v["x_floor"], 1),
                _fmt(v["x_deque"], 1),
                _fmt(v.get("x_sqlalchemy"), 3),
            ]
            for k, v in scen["A"]["results"].items()
        ]
        header = ["impl", "ns/op", "x floor", "x bare deque", "x QueuePool"]
        tables.append(("A  uncontended acquire+release", header, rows))
    for sc, title, rate_key, dist_key, ratio_key in (
        ("B", "B  contended: 500 greenlets, max_size 10", "ops_per_s", "wait_us", "p99_x_floor"),
        ("C", "C  echo 64 B: 50 greenlets, pool of 10", "req_per_s", "latency_us", "max_x_floor"),
    ):
        if sc not in scen:
            continue
        rows = []
        for k, v in scen[sc]["results"].items():
            errors = sum(v["errors"].values())
            rows.append(
                [
                    k,
                    _fmt(v[rate_key]),
                    _fmt(v["x_floor"], 2),
                    _fmt(v[dist_key]["p50"], 1),
                    _fmt(v[dist_key]["p99"], 1),
                    _fmt(v[dist_key]["max"], 1),
                    _fmt(v[ratio_key], 2),
                    str(errors),
                    str(v["starved_greenlets"]),
                ]
            )
        what = "wait" if sc == "B" else "latency"
        tables.append(
            (
                title,
                [
                    "impl",
                    "ops/s" if sc == "B" else "req/s",
                    "x floor",
                    f"{what} p50 us",
                    "p99 us",
                    "max us",
                    "p99 x floor" if sc == "B" else "max x floor",
                    "errors",
                    "starved",
                ],
                rows,
            )
        )
    if "D" in scen:
        rows = [
            [k, _fmt(v["10"]), _fmt(v["100"]), _fmt(v["1000"]), _fmt(v["x_1000_vs_10"], 2)]
            for k, v in scen["D"]["results"].items()
        ]
        tables.append(("D  pick cost, ns", ["strategy", "10", "100", "1,000", "1000/10"], rows))
    if "H" in scen:
        rows = [
            [
                k,
                _fmt(v["10"]),
                _fmt(v["100"]),
                _fmt(v["1000"]),
                _fmt(v["x_1000_vs_10"], 2),
                _fmt(v["x_round_robin_1000"], 2),
            ]
            for k, v in scen["H"]["results"].items()
        ]
        tables.append(
            (
                "H  key-affinity pick cost (owner(key)), ns",
                ["strategy", "10", "100", "1,000", "1000/10", "vs round_robin"],
                rows,
            )
        )
        place = scen["H"].get("placement")
        if place:
            rows = [
                [
                    k,
                    _fmt(v["max_over_mean"], 4),
                    _fmt(v["moved_leave"] * 100, 3),
                    _fmt(v["moved_join"] * 100, 3),
                ]
                for k, v in place["results"].items()
            ]
            tables.append(
                (
                    f"H  placement over {place['servers']} servers: balance "
                    f"({place['balance_keys']:,} keys), % keys moved ({place['disruption_keys']:,}"
                    f" keys; ideal {place['ideal_moved'] * 100:.3g}%)",
                    ["strategy", "max/mean", "one leaves %", "one joins %"],
                    rows,
                )
            )
    if "R" in scen:
        r = scen["R"]
        if "skipped" in r:
            tables.append(("R  redis-py GET: skipped", ["why"], [[r["skipped"]]]))
        else:
            rows = [
                [
                    k,
                    _fmt(v["ops_per_s"]),
                    _fmt(v["x_connection_pool"], 3),
                    _fmt(v["x_blocking_pool"], 3),
                    _fmt(v["latency_us"]["p50"], 1),
                    _fmt(v["latency_us"]["p99"], 1),
                    _fmt(v["latency_us"]["max"], 1),
                    _fmt(v["fairness"]["min_share"], 2),
                    _fmt(v["fairness"]["starved"]),
                    _fmt(v["fairness"]["overtakes_per_get"], 2),
                    str(sum(v["errors"].values())),
                ]
                for k, v in r["results"].items()
            ]
            tables.append(
                (
                    f"R  redis-py GET of {r['value_bytes']} B: {r['greenlets']} greenlets "
                    f"({r['note']}); lbpool x the pool with its connections: "
                    f"{_fmt(r['x_blocking_pool'], 3)} Blocking, "
                    f"{_fmt(r['x_connection_pool'], 3)} ConnectionPool",
                    ["pool", "GET/s", "x ConnectionPool", "x Blocking", "p50 us", "p99 us",
                     "max us", "min share", "starved", "overtakes/GET", "errors"],
                    rows,
                )
            )  # fmt: skip
    if "S" in scen:
        sc = scen["S"]
        counts = [str(n) for n in sc["servers"]]
        big, mid, small = counts[-1], counts[-2], counts[0]
        rows = [
            [
                op,
                *(
                    f"{v[n]['ms']:.3g} / {v[n]['hub_ms']:.3g} / {v[n].get('cpu_ms', 0):.3g}"
                    for n in counts
                ),
                _fmt(v[f"x_{big}_over_{mid}"], 2),
                _fmt(v[f"x_{big}_over_{small}"], 2),
            ]
            for op, v in sc["results"].items()
        ]
        total = sc.get("snapshot_total_cpu_ms") or {}
        if total:
            rows.append(
                [
                    "snapshot total (" + " + ".join(sc["snapshot_ops"]) + "), cpu",
                    *(f"{total[n]:.3g}" for n in counts),
                    _fmt(ratio(total[big], total[mid]), 2),
                    _fmt(ratio(total[big], total[small]), 2),
                ]
            )
        tables.append(
            (
                f"S  scale: ms / hub's longest stretch ms / cpu ms, median of {sc['rounds']}"
                f" rounds ({sc['busy_connections']} connections in use)",
                ["operation", *(f"{n} servers" for n in counts), f"{big}/{mid}", f"{big}/{small}"],
                rows,
            )
        )
    if "E" in scen:
        e = scen["E"]
        rows = [[k, json.dumps(v) if isinstance(v, dict) else _fmt(v, 3)] for k, v in e.items()]
        tables.append(("E  failover: 3 servers, one stopped and restarted", ["", "value"], rows))
    obs = result["observations"]
    if obs:
        rows = []
        for k, v in obs.items():
            tmo = v["timeout"]
            tdesc = tmo["kind"]
            if tmo.get("raised"):
                tdesc += f": {tmo['raised']} {tmo['elapsed_s']:.2f}s"
            rows.append(
                [
                    k,
                    f"{v['max_held']}/{v['limit']}",
                    str(v["connections_opened"]),
                    f"{v['overtakes']}/{v['grants']}",
                    f"{v['starved']}/{v['probe_greenlets']}",
                    tdesc,
                    "yes" if v["cooperative_unpatched"] else "no",
                    ", ".join(v["missing"]) or "-",
                ]
            )
        tables.append(
            (
                "Observed behaviour",
                [
                    "impl",
                    "max held",
                    "opened",
                    "overtakes",
                    "starved",
                    "acquire timeout (asked 0.1s)",
                    "coop w/o patching",
                    "missing",
                ],
                rows,
            )
        )
    return tables


def render_plain(result: dict[str, Any]) -> str:
    out: list[str] = [_header(result)]
    for title, header, rows in _tables(result):
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        out.append("")
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        out.append("  ".join("-" * w for w in widths))
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


_NUMERIC = re.compile(r"^[-+]?[\d.,/]+$|^-$")


def render_markdown(result: dict[str, Any]) -> str:
    """The same tables as GitHub-flavoured Markdown (for docs/benchmarks.md)."""
    out: list[str] = [_header(result)]
    for title, header, rows in _tables(result):
        out += ["", f"**{title.strip()}**", ""]
        out.append("| " + " | ".join(header) + " |")
        numeric = [i > 0 and all(_NUMERIC.match(r[i]) for r in rows) for i in range(len(header))]
        out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def _header(result: dict[str, Any]) -> str:
    m = result["meta"]
    mach = m["machine"]
    st = m["settings"]
    peers_txt = ", ".join(f"{k} {v}" if v else f"{k} (missing)" for k, v in m["peers"].items())
    rounds = f"{st['rounds']} round{'s' if st['rounds'] != 1 else ''}"
    quick = " (quick)" if st["quick"] else ""
    return (
        f"lbpool bench: {rounds}{quick}, "
        f"{m['duration_s']:.1f}s; {mach['cpu']}, {mach['nproc']} CPUs, Python {mach['python']}, "
        f"gevent {mach['gevent']}, lbpool {mach.get('hot_path', '?')}; peers: {peers_txt}"
    )


def print_rich(result: dict[str, Any]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the tables to 80
        console = Console(width=170)
    console.print(plain(_header(result)))  # the CPU's name, the peers' versions: as given
    for title, header, rows in _tables(result):
        table = Table(title=plain(title), title_justify="left")
        for i, h in enumerate(header):
            table.add_column(plain(h), justify="left" if i == 0 or h == "missing" else "right")
        for r in rows:
            table.add_row(*(plain(c) for c in r))
        console.print(table)
    return True


def write_plot(result: dict[str, Any], path: str) -> None:
    """Latency/wait distributions (CDFs) and throughput per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples: dict[str, dict[str, list[float]]] = result.get("_samples", {})
    scen = result["scenarios"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for col, (sc, rate_key, label) in enumerate(
        (("B", "ops_per_s", "acquire wait"), ("C", "req_per_s", "request latency"))
    ):
        ax = axes[0][col]
        for kind, vals in samples.get(sc, {}).items():
            if not vals:
                continue
            v = sorted(x * 1e6 for x in vals)
            if len(v) > 4000:
                step = len(v) / 4000
                v = [v[int(i * step)] for i in range(4000)] + [v[-1]]
            ys = [(i + 1) / len(v) for i in range(len(v))]
            ax.plot([max(x, 0.1) for x in v], ys, label=kind)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (us, log)")
        ax.set_ylabel("fraction <= x")
        ax.set_title(f"{sc}: {label} distribution (last round)")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
        ax2 = axes[1][col]
        if sc in scen:
            res = scen[sc]["results"]
            names = list(res)
            vals2 = [res[k][rate_key] for k in names]
            bars = ax2.bar(range(len(names)), vals2, color="tab:blue")
            for k, bar in zip(names, bars, strict=True):
                if k in LBPOOL:
                    bar.set_color("tab:orange")
                elif k in (FLOOR, DIAL):
                    bar.set_color("tab:gray")
            for i, k in enumerate(names):
                starved = res[k].get("starved_greenlets", 0)
                if starved:
                    ax2.annotate(
                        f"{starved} never\nserved",
                        (i, vals2[i] or 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="tab:red",
                    )
            ax2.set_xticks(range(len(names)))
            ax2.set_xticklabels(names, rotation=20, fontsize=8)
            ax2.set_ylabel("ops/s" if sc == "B" else "req/s")
            ax2.set_title(f"{sc}: throughput (median of rounds)")
            ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_header(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonable(x: Any) -> Any:
    """Strict JSON: NaN and infinities (a metric with no data) become null."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
