"""``lbpool bench`` runs end to end and reports complete, sane results.

These tests check structure and behaviour the bench observes of lbpool itself (it
never holds more than max_size, serves waiters in order, honours a timeout); they
never assert speed, which depends on the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gevent
import greenlet
import pytest

from lbpool.cli import bench
from lbpool.cli.bench import report

# The shared quick run measures for fixed times and builds 1,000-server tables: on a
# loaded 2-core machine (CI with CPU hogs) it takes well over the default 60 s.
pytestmark = pytest.mark.timeout(300)

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
LBPOOL = ("lbpool.Pool", "manager.get")


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(argv)
    return code, out.getvalue(), err.getvalue()


# The quick run's own bound: past it the child prints where every thread is (the
# traceback names a stall) and exits; the fixture then fails with that, not a hang.
QUICK_BOUND = 240
_QUICK = """
import faulthandler, sys
faulthandler.dump_traceback_later({bound}, exit=True)
from lbpool.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path | None]:
    """One ``lbpool bench --quick --json`` run (about 15 s unloaded) shared by the tests
    below, in a process of its own, as a user runs it: what this worker ran before
    (its heap, its greenlets) cannot slow or disturb it."""
    plot = tmp_path_factory.mktemp("bench") / "bench.png" if HAVE_MATPLOTLIB else None
    argv = ["bench", "--quick", "--json"] + (["--plot", str(plot)] if plot else [])
    proc = subprocess.run(
        [sys.executable, "-c", _QUICK.format(bound=QUICK_BOUND), *argv],
        capture_output=True,
        text=True,
        timeout=QUICK_BOUND + 30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout), plot  # strict JSON: json.loads would accept NaN


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _no_nan(x: Any) -> None:
    if isinstance(x, float):
        assert math.isfinite(x)
    elif isinstance(x, dict):
        for v in x.values():
            _no_nan(v)
    elif isinstance(x, list):
        for v in x:
            _no_nan(v)


def test_quick_json_structure(quick: tuple[dict[str, Any], Path | None]) -> None:
    result, _ = quick
    assert set(result) >= {"meta", "scenarios", "observations"}
    assert "targets" not in result  # measurements and ratios only: goals are in the docs
    _no_nan(result)
    meta = result["meta"]
    assert meta["settings"]["quick"] is True
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["python"]
    assert set(meta["peers"]) == {"sqlalchemy", "gcp", "gsocketpool"}
    assert set(result["scenarios"]) == {"A", "B", "C", "D", "E", "H"}


def test_scenario_a(quick: tuple[dict[str, Any], Path | None]) -> None:
    a = quick[0]["scenarios"]["A"]["results"]
    assert {"deque", "floor", *LBPOOL} <= set(a)
    for row in a.values():
        assert _finite_positive(row["ns_per_op"])
        assert _finite_positive(row["x_floor"])
        assert _finite_positive(row["x_deque"])
        assert len(row["rounds"]) == 2
    assert a["floor"]["x_floor"] == 1.0  # the FIFO-handoff deque, as in every scenario
    assert a["deque"]["x_deque"] == 1.0


@pytest.mark.parametrize(
    "sc, rate, dist", [("B", "ops_per_s", "wait_us"), ("C", "req_per_s", "latency_us")]
)
def test_contended_scenarios(
    quick: tuple[dict[str, Any], Path | None], sc: str, rate: str, dist: str
) -> None:
    res = quick[0]["scenarios"][sc]["results"]
    assert {"floor", *LBPOOL} <= set(res)
    if sc == "C":
        assert "dial/request" in res
    for kind, row in res.items():
        assert _finite_positive(row[rate]), kind
        d = row[dist]
        assert 0 <= d["p50"] <= d["p99"] <= d["max"], kind
        assert isinstance(row["errors"], dict)
    greenlets = quick[0]["scenarios"][sc]["greenlets"]
    for kind in ("floor", *LBPOOL):  # behaviour, not speed: nobody errors or starves
        assert res[kind]["errors"] == {}, kind
        # FIFO serves every greenlet in a round with grants enough for all of them; a
        # round the machine starved of CPU (seen: 14 operations in 0.15 s, four CPU hogs
        # on two cores, the floor too) proves nothing either way
        rounds = zip(res[kind]["ops_by_round"], res[kind]["starved_by_round"], strict=True)
        assert all(starved == 0 for ops, starved in rounds if ops >= 3 * greenlets), kind


def test_scenario_d(quick: tuple[dict[str, Any], Path | None]) -> None:
    d = quick[0]["scenarios"]["D"]["results"]
    assert set(d) == {"deque", "round_robin", "least_active", "weighted", "random"}
    for row in d.values():
        for n in ("10", "100", "1000"):
            assert _finite_positive(row[n])
        assert _finite_positive(row["x_1000_vs_10"])


def test_scenario_h(quick: tuple[dict[str, Any], Path | None]) -> None:
    h = quick[0]["scenarios"]["H"]
    assert set(h["results"]) == {"round_robin", "maglev", "ring_hash", "rendezvous"}
    for row in h["results"].values():
        for n in ("10", "100", "1000"):
            assert _finite_positive(row[n])
        assert _finite_positive(row["x_1000_vs_10"])
        assert _finite_positive(row["x_round_robin_1000"])
    assert h["results"]["round_robin"]["x_round_robin_1000"] == 1.0
    place = h["placement"]
    assert place["servers"] == 100 and place["balance_keys"] == 20_000  # fewer under --quick
    assert set(place["results"]) == {"maglev", "ring_hash", "rendezvous"}
    for row in place["results"].values():
        assert 1.0 <= row["max_over_mean"] < 2.0
        assert 0 < row["min_over_mean"] <= 1.0
        # one of 100 leaving or joining moves about 1% of keys (maglev: a little more)
        assert 0.002 < row["moved_leave"] < 0.03
        assert 0.002 < row["moved_join"] < 0.03


def test_table_output_hashing_scenario() -> None:
    code, out, _ = _main(["--scenarios", "H", "--rounds", "1", "--quick", "-q"])
    assert code == 0
    assert "key-affinity pick cost" in out and "one leaves %" in out
    assert "Targets" not in out and "met" not in out


def test_scenario_e(quick: tuple[dict[str, Any], Path | None]) -> None:
    e = quick[0]["scenarios"]["E"]
    assert e["servers"] == 3
    assert e["requests_ok"] > 0
    assert e["outage_s"] > 0
    assert e["requests_failed"] == e["failed_in_flight_at_kill"] + e["failed_after_kill"]
    assert e["breaker_trips"] >= 1  # the stopped server's breaker did open
    assert e["spread_after_return_s"] is None or e["spread_after_return_s"] >= 0


def test_observations_of_lbpool(quick: tuple[dict[str, Any], Path | None]) -> None:
    obs = quick[0]["observations"]
    for kind in ("floor", *LBPOOL):
        o = obs[kind]
        assert o["max_held"] <= o["limit"] == 10
        assert o["connections_opened"] <= o["limit"]
        assert o["grants"] > 0
        assert o["overtakes"] == 0 and o["fifo"] is True
        assert o["starved"] == 0
        assert o["cooperative_unpatched"] is True
    for kind in LBPOOL:
        t = obs[kind]["timeout"]
        assert t["honored"] is True and t["raised"] == "PoolTimeout"
        assert obs[kind]["missing"] == []
    for kind, o in obs.items():
        assert isinstance(o["missing"], list), kind


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_written(quick: tuple[dict[str, Any], Path | None]) -> None:
    plot = quick[1]
    assert plot is not None and plot.exists()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output_single_scenario() -> None:
    code, out, _ = _main(["--scenarios", "d", "--rounds", "1", "--quick", "-q"])
    assert code == 0
    assert "pick cost" in out
    assert "Targets" not in out and "met" not in out  # no goals in the command's output


def test_plain_renderer_covers_every_table() -> None:
    result = bench.run(replace(bench.QUICK, scenarios=("D",), rounds=1))
    text = report.render_plain(report.jsonable({k: v for k, v in result.items() if k[0] != "_"}))
    assert "D  pick cost" in text and "round_robin" in text
    assert "Targets" not in text


def test_rich_tables_print_text_as_given() -> None:
    """The header (the CPU's name, the peers) and the cells are text, not rich markup:
    ``[/b]`` in a CPU's name crashed the report with a MarkupError."""
    odd = "[/b] C:\\dir\\ :smile: [::1]"
    machine = {"cpu": odd, "nproc": 2, "python": "3.11", "gevent": "24", "hot_path": "x"}
    result = {
        "meta": {
            "machine": machine,
            "settings": {"rounds": 1, "quick": True},
            "peers": {"gcp": None},
            "duration_s": 1.0,
        },
        "scenarios": {
            "D": {"results": {odd: {"10": 1.0, "100": 2.0, "1000": 3.0, "x_1000_vs_10": 3.0}}}
        },
        "observations": {},
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report.print_rich(result)
    text = out.getvalue()
    assert f"; {odd}, 2 CPUs" in text
    assert any(f" {odd} " in line and "3.00" in line for line in text.splitlines()), text


def test_bad_arguments() -> None:
    assert _main(["--scenarios", "Z"])[0] == 2
    assert _main(["--rounds", "0"])[0] == 2
    assert _main(["--no-such-flag"])[0] == 2


def test_core_does_not_import_bench() -> None:
    code = (
        "import sys, lbpool, lbpool.pool, lbpool.manager, lbpool.balance; "
        "bad = [m for m in ('lbpool.cli', 'lbpool.cli.bench', 'lbpool.cli.bench.peers', "
        "'matplotlib', 'sqlalchemy', "
        "'generic_connection_pool', 'gsocketpool') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_peer_that_breaks_mid_run_is_dropped_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lbpool.cli.bench import peers

    real = peers._FACTORIES["gsocketpool"]
    calls = {"n": 0}

    @contextlib.contextmanager
    def flaky(address: str, size: int, timeout: float) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:  # fine when probed for availability, broken once measured
            raise RuntimeError("boom")
        with real(address, size, timeout) as ad:
            yield ad

    monkeypatch.setitem(peers._FACTORIES, "gsocketpool", flaky)
    result = bench.run(replace(bench.QUICK, scenarios=("A",), rounds=2))
    assert "gsocketpool" not in result["scenarios"]["A"]["results"]
    assert "boom" in result["meta"]["peers_missing"]["gsocketpool"]
    assert "lbpool.Pool" in result["scenarios"]["A"]["results"]


def test_scenario_r_redis_py_is_opt_in_and_reports_each_pool() -> None:
    """``--scenarios R``: redis-py GETs over lbpool.contrib.redis (with the blocking
    pool's connections, and with one per greenlet as the unbounded ConnectionPool
    opens), redis-py's ConnectionPool and BlockingConnectionPool, same run; not part of
    the default set. Each row says how fairly the greenlets were served."""
    assert "R" not in bench.Settings().scenarios and "R" not in bench.QUICK.scenarios
    code, out, _ = _main(["--scenarios", "R", "--rounds", "1", "--quick", "--json"])
    assert code == 0
    r = json.loads(out)["scenarios"]["R"]
    if "skipped" in r:  # redis-py or redis-server missing: said so, not failed
        assert "not installed" in r["skipped"]
        pytest.skip(r["skipped"])
    assert set(r["results"]) == {
        "lbpool.contrib.redis",
        "lbpool.contrib.redis (max_size = greenlets)",
        "redis.ConnectionPool",
        "redis.BlockingConnectionPool",
    }
    for kind, row in r["results"].items():
        assert _finite_positive(row["ops_per_s"]), kind
        assert row["errors"] == {}, kind
        assert _finite_positive(row["x_connection_pool"]) and _finite_positive(
            row["x_blocking_pool"]
        )
        fair = row["fairness"]
        assert 0 <= fair["min_share"] <= 1 <= fair["max_share"], kind
        assert 0 <= fair["starved"] < r["greenlets"], kind
        assert fair["overtakes_per_get"] >= 0 and fair["max_overtaken"] >= 0, kind
    # the headline ratios compare pools with the same connections
    lb = r["results"]["lbpool.contrib.redis"]
    wide = r["results"]["lbpool.contrib.redis (max_size = greenlets)"]
    assert r["x_blocking_pool"] == lb["x_blocking_pool"]
    assert r["x_connection_pool"] == wide["x_connection_pool"]
    assert r["greenlets"] == 50 and r["value_bytes"] == 100


def test_overtakes_counts_gets_finished_ahead_of_earlier_ones() -> None:
    from lbpool.cli.bench.scenarios import _overtakes

    assert _overtakes([]) == (0.0, 0)
    # in order: nobody overtakes
    assert _overtakes([(0, 1), (1, 2), (2, 3)]) == (0.0, 0)
    # the first one waits while the two after it finish: overtaken twice
    assert _overtakes([(0, 10), (1, 2), (2, 3)]) == (2 / 3, 2)
    # ties in the end order are not overtakes
    assert _overtakes([(0, 5), (1, 5)]) == (0.0, 0)


def test_scenario_r_skips_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from lbpool.cli.bench import peers

    monkeypatch.setattr(peers, "redis_missing", lambda: "redis-server is not installed (test)")
    code, out, _ = _main(["--scenarios", "R", "--rounds", "1", "--quick", "-q"])
    assert code == 0
    assert "skipped" in out and "redis-server is not installed (test)" in out


def test_scenario_s_scale_is_opt_in_and_reports_every_operation() -> None:
    assert "S" not in bench.Settings().scenarios and "S" not in bench.QUICK.scenarios
    result = bench.run(replace(bench.QUICK, scenarios=("S",), rounds=1))
    sc = result["scenarios"]["S"]
    assert sc["servers"] == [10, 100, 1000] and sc["rounds"] == 1
    ops = {"create", "wait_ready", "upkeep_pass", "stats", "to_dict", "collect", "adhoc_get"}
    assert set(sc["results"]) == ops | {"expose_first", "expose", "expose_unpaced"}
    for row in sc["results"].values():
        for n in ("10", "100", "1000"):
            assert row[n]["ms"] >= 0 and row[n]["hub_ms"] >= 0 and row[n]["cpu_ms"] >= 0
        assert row["x_1000_over_100"] > 0 and row["x_1000_over_10"] > 0
    # one round: the snapshot total is that round's stats + to_dict + expose cpu_ms
    assert sc["snapshot_ops"] == ["stats", "to_dict", "expose"]
    for n in ("10", "100", "1000"):
        parts = sum(sc["results"][op][n]["cpu_ms"] for op in sc["snapshot_ops"])
        assert sc["snapshot_total_cpu_ms"][n] == pytest.approx(parts, abs=0.01)
    json.dumps(report.jsonable(result["scenarios"]))  # --json can write it
    text = report.render_markdown(report.jsonable(result))
    assert "S  scale" in text and "upkeep_pass" in text and "snapshot total" in text


def test_s_timed_counts_only_the_operations_own_run_time() -> None:
    """cpu_ms sums the operation's greenlet's stretches (not the pauses between them,
    where others run) and puts the previous greenlet trace function back."""
    from lbpool.cli.bench.scenarios import _s_timed

    events: list[str] = []

    def previous(event: str, args: Any) -> None:
        events.append(event)

    def work() -> int:
        for _ in range(3):
            gevent.sleep(0.02)  # a pause: another greenlet's (the ticker's) turn
        return 7

    greenlet.settrace(previous)
    try:
        wall, hub, cpu, value = _s_timed(work)
        assert greenlet.gettrace() is previous  # restored
    finally:
        greenlet.settrace(None)
    assert value == 7
    assert events  # the previous trace function was called meanwhile
    assert 0 <= cpu < wall  # the 60 ms of sleeps are not the operation's run time
    assert hub >= 0


class _Leases:
    """acquire/release that count what is out; ``io`` a socket whose send never ends."""

    def __init__(self) -> None:
        self.out = 0

    def acquire(self, arg: object = None) -> object:
        self.out += 1
        return object()

    def release(self, lease: object) -> None:
        self.out -= 1

    def io(self, lease: object) -> Any:
        class _Stuck:
            def sendall(self, data: bytes) -> None:
                gevent.sleep(60)

        return _Stuck()


@pytest.mark.parametrize("kind", ["B", "C"])
def test_a_worker_killed_holding_a_lease_gives_it_back(kind: str) -> None:
    """``contended_round`` kills the workers still busy past its grace: one killed
    between its acquire and its release (B: in its ``sleep(0)``; C: in its I/O) gives
    the lease back, so the pool is whole when the adapter closes it (a peer's close
    waited for it: generic-connection-pool's spun for ever, holding the hub)."""
    from lbpool.cli.bench.scenarios import _Run, b_worker, c_worker

    leases = _Leases()
    run = _Run(time.perf_counter() + 60, [0], [0.0], [], {})
    if kind == "B":
        worker = gevent.spawn(b_worker, 0, run, leases.acquire, None, leases.release)
    else:
        worker = gevent.spawn(
            c_worker, 0, run, leases.acquire, None, leases.release, leases.io, b"x", None
        )
    gevent.sleep(0)  # B: in its sleep(0) holding one; C: stuck in sendall holding one
    assert leases.out == 1
    worker.kill(block=True, timeout=5)
    assert worker.dead
    assert leases.out == 0


def test_the_gcp_adapter_closes_with_a_connection_still_lent(echo_server: Any) -> None:
    """generic-connection-pool's ``close()`` loops, never yielding, until every
    connection is back: the adapter must not call it with one lent (the bench's quick
    run once hung there for its whole 240 s bound). In a process of its own, bounded."""
    pytest.importorskip("generic_connection_pool")
    code = (
        "import sys, gevent\n"
        "from lbpool.cli.bench import peers\n"
        "with peers.make_adapter('gcp', sys.argv[1], 4, 1.0) as ad:\n"
        "    lent = ad.acquire(ad.arg)\n"
        "print('closed')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, echo_server.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "closed", proc.stderr[-3000:]
