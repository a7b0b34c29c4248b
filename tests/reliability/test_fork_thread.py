"""Process and thread boundaries at manager level.

Fork (gunicorn ``preload_app``): a child never uses a connection its parent opened --
neither an idle one nor one the parent holds -- and nothing the child does (using the
manager, closing it, exiting) disturbs the parent's connections. The echo servers run in
processes of their own (``ProcessEchoServer``): a server in the test's process would be
copied into the child, which could accept and then close connections the parent dials
meanwhile. "Whose connection" is decided by the client-side port numbers, reported back
over a pipe read with ``gevent.os.nb_read`` (never blocking the parent's hub).

Threads: a manager belongs to the OS thread that made it; any use from a second real OS
thread is refused with an ``LbpoolError`` saying the manager belongs to another thread,
and leaves the manager intact for its own thread. Reading ``stats()`` (a metrics
scrape thread) is allowed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.os
import pytest

from lbpool import LbpoolError, PoolManager
from lbpool.testing import EchoServer, recv_exact
from tests.support.leaks import live_greenlets, settle
from tests.support.procs import ProcessEchoServer, reap_child


def config(addresses: list[str], **pool: Any) -> dict[str, Any]:
    pool_cfg = {"min_idle": 0, "max_size": 4, "acquire_timeout": 2, "upkeep_interval": 0.05}
    pool_cfg.update(pool)
    return {"backends": {"svc": {"servers": addresses, "pool": pool_cfg}}}


def local_port(conn: Any) -> int:
    return int(conn.sock.getsockname()[1])


def round_trip(conn: Any, payload: bytes) -> None:
    conn.settimeout(2)
    conn.sendall(payload)
    assert recv_exact(conn, len(payload)) == payload


@pytest.fixture
def process_echo_servers() -> Iterator[list[ProcessEchoServer]]:
    """Three echo servers, each in a process of its own: a server living in the test's
    process would be copied into the forked child, which could then accept (and, on
    exit, close) connections the parent dials while the child runs."""
    servers: list[ProcessEchoServer] = []
    try:
        for _ in range(3):
            servers.append(ProcessEchoServer())
        yield servers
    finally:
        for server in servers:
            server.stop()


def run_in_child(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child runs ``child()`` and reports its result as JSON; ``os._exit``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            try:
                report = child()
            except BaseException as exc:
                report = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    gevent.os.make_nonblocking(r)
    data = b""
    try:
        with gevent.Timeout(20):  # read without blocking the hub
            while True:
                chunk = gevent.os.nb_read(r, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
        status = reap_child(pid)
    assert status is None or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result["error"]
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("first", ["wait_ready", "stats"])
def test_a_forked_childs_first_wait_ready_or_stats_starts_it_fresh(
    process_echo_servers: list[ProcessEchoServer],
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
    first: str,
) -> None:
    """gunicorn's preload pattern: the parent warms its pools, forks; the child's
    ``wait_ready`` warms the child's own pools (not counting the parent's copies), and
    a ``stats()`` before anything else shows the child's pools, not the parent's."""
    a, _, _ = process_echo_servers
    manager = make_manager(config([a.address], min_idle=2))
    manager.wait_ready(timeout=5)
    parent_ports = {conn.sock.getsockname()[1] for conn in manager.backends["svc"].pools[0]._idle}
    assert len(parent_ports) == 2

    def child() -> dict[str, Any]:
        if first == "stats":
            s = manager.stats().backends["svc"].servers[a.address]
            seen = {"size": s.size, "idle": s.idle}
        manager.wait_ready(timeout=5)
        pool = manager.backends["svc"].pools[0]
        ports = sorted(conn.sock.getsockname()[1] for conn in pool._idle)
        report = {"ports": ports}
        if first == "stats":
            report.update(seen)
        return report

    result = run_in_child(child)
    assert len(result["ports"]) == 2 and not set(result["ports"]) & parent_ports, result
    if first == "stats":  # the child's own pool, before it dialed anything
        assert (result["size"], result["idle"]) == (0, 0), result


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("read", ["stats", "collect"])
def test_a_forked_childs_first_read_from_its_scrape_thread_leaves_it_to_the_forking_thread(
    process_echo_servers: list[ProcessEchoServer],
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
    read: str,
) -> None:
    """gunicorn ``--preload`` with a metrics server started in ``post_fork``: the
    child's first touch of the manager is a scrape from the child's own exporter
    thread. The scrape sees the child's fresh pools, and the manager stays the forking
    thread's (the one thread a child inherits): its next ``get`` works."""
    a, _, _ = process_echo_servers
    manager = make_manager(config([a.address], min_idle=1))
    manager.wait_ready(timeout=5)
    if read == "collect":
        metrics = pytest.importorskip("lbpool.metrics")
        collector = metrics.LbpoolCollector(manager)

    def scrape() -> Any:
        if read == "stats":
            s = manager.stats().backends["svc"].servers[a.address]
            return {"size": s.size, "idle": s.idle}
        families = {f.name: f for f in collector.collect()}
        return {"size": families["lbpool_size"].samples[0].value}

    def child() -> dict[str, Any]:
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(scrape()))
        t.start()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            gevent.sleep(0.005)  # this (the forking) thread's hub serves the read
        t.join(1)
        with manager.get("svc", timeout=5) as conn:
            round_trip(conn, b"child")
        return {"seen": out[0], "owner_is_me": manager._thread_id == threading.get_ident()}

    result = run_in_child(child)
    assert result["owner_is_me"], result
    assert result["seen"]["size"] == 0, result  # the child's own pool, not the parent's


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_childs_scrape_thread_never_claims_the_manager_when_the_hub_is_blocked(
    process_echo_servers: list[ProcessEchoServer],
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
) -> None:
    """As above, but the forking thread blocks outside gevent while its exporter thread
    scrapes: the scrape fails with an ``LbpoolError`` saying so (it may not start the
    manager fresh for itself), and the forking thread still owns the manager."""
    import lbpool._ownership as ownership

    a, _, _ = process_echo_servers
    manager = make_manager(config([a.address], min_idle=1))
    manager.wait_ready(timeout=5)

    def child() -> dict[str, Any]:
        ownership.OWNER_HUB_WAIT = 0.2
        out: list[Any] = []

        def scrape() -> None:
            try:
                manager.stats()
            except LbpoolError as exc:
                out.append(str(exc))

        t = threading.Thread(target=scrape)
        t.start()
        t.join(10)  # blocks this thread and its hub: nothing serves the read
        with manager.get("svc", timeout=5) as conn:
            round_trip(conn, b"child")
        return {"errors": out, "owner_is_me": manager._thread_id == threading.get_ident()}

    result = run_in_child(child)
    assert result["owner_is_me"], result
    assert len(result["errors"]) == 1 and "did not answer" in result["errors"][0], result


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("min_idle", [0, 2], ids=["no_upkeep_refill", "upkeep_refills"])
def test_fork_child_never_uses_parent_connections(
    process_echo_servers: list[ProcessEchoServer],
    make_manager: Callable[..., PoolManager],
    no_fd_leak: None,
    min_idle: int,
) -> None:
    a, b, c = process_echo_servers
    manager = make_manager(config([a.address, b.address], min_idle=min_idle))
    manager.wait_ready(timeout=5)
    held = manager.acquire("svc")
    round_trip(held, b"parent-held")
    warm = [manager.acquire("svc") for _ in range(3)]
    for conn in warm:
        round_trip(conn, b"warm")
    adhoc = manager.acquire(c.address)  # an ad-hoc host:port pool too
    parent_ports = {local_port(held), local_port(adhoc), *(local_port(x) for x in warm)}
    adhoc.release()
    for conn in warm:
        conn.release()
    # the parent's upkeep settles first (refills to min_idle, each counted as pending
    # until it lands): the comparison below is of the fork's effect, not of upkeep
    assert settle(
        lambda: all(
            p.stats().pending == 0 and p.stats().idle >= min_idle
            for p in manager.backends["svc"].pools
        ),
        10,
    )
    before = manager.stats().to_dict()
    idle_ports = {  # every idle connection the parent holds (refills included)
        conn.sock.getsockname()[1] for pool in manager.backends["svc"].pools for conn in pool._idle
    }
    parent_ports |= idle_ports

    def child() -> dict[str, Any]:
        ports, uses = [], []
        for i in range(6):
            with manager.get("svc", timeout=2) as conn:
                ports.append(local_port(conn))
                uses.append(conn.uses)
                round_trip(conn, b"child-%d" % i)
        with manager.get(c.address, timeout=2) as conn:
            ports.append(local_port(conn))
            round_trip(conn, b"child-adhoc")
        manager.close(timeout=1)  # closing in the child must not touch the parent's
        return {"ports": ports, "uses": uses}

    result = run_in_child(child)
    assert set(result["ports"]).isdisjoint(parent_ports), (result, parent_ports)
    # the parent's connections are undisturbed: the held one, and each idle one
    round_trip(held, b"parent-after-fork")
    held.release()
    after_fork = manager.stats().to_dict()
    for name, backend in before["backends"].items():
        for address, server in backend["servers"].items():
            now = after_fork["backends"][name]["servers"][address]
            back = 1 if name == "svc" and address == held.address else 0  # `held` came back
            assert (now["size"], now["idle"]) == (server["size"], server["idle"] + back), (
                address,
                now,
                server,
            )
    reused = []
    for _ in range(len(idle_ports) + 1):
        reused.append(manager.acquire("svc"))
    for conn in reused:
        round_trip(conn, b"parent-reuse")
    assert {local_port(conn) for conn in reused} & idle_ports  # the same sockets, still good
    for conn in reused:
        conn.release()
    with manager.get(c.address) as conn:
        assert conn.uses == 2  # the parent's ad-hoc connection, reused and fine
        round_trip(conn, b"adhoc-after-fork")
    manager.close(timeout=2)


# -- a second OS thread ----------------------------------------------------------------------


def from_other_thread(fn: Callable[..., Any], *args: Any) -> BaseException | None:
    """Call ``fn(*args)`` in a new OS thread; return what it raised (None if nothing)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return outcome[0]


def assert_refused(exc: BaseException | None) -> None:
    assert isinstance(exc, LbpoolError), repr(exc)
    assert "manager belongs to another thread" in str(exc), str(exc)


@pytest.fixture
def manager(echo_server_factory: Callable[..., EchoServer]) -> Any:
    a, b = echo_server_factory(), echo_server_factory()
    mgr = PoolManager(config([a.address, b.address]))
    mgr.test_servers = (a, b)  # type: ignore[attr-defined]
    with mgr.get("svc") as conn:
        round_trip(conn, b"warm")
    yield mgr
    mgr.close(timeout=1)


def test_other_thread_get_and_acquire_refused(manager: PoolManager, no_fd_leak: None) -> None:
    a, _ = manager.test_servers  # type: ignore[attr-defined]
    assert_refused(from_other_thread(manager.get, "svc"))
    assert_refused(from_other_thread(manager.acquire, "svc", 1))
    assert_refused(from_other_thread(manager.get, a.address))  # configured server, ad hoc
    other = EchoServer().start()
    try:
        assert_refused(from_other_thread(manager.get, other.address))  # not yet routed
        assert manager.stats().backends.get("") is None  # no ad-hoc pool was made
    finally:
        other.stop()
    # the owner thread is unaffected
    for _ in range(4):
        with manager.get("svc") as conn:
            round_trip(conn, b"still mine")
    s = manager.stats().backends["svc"].servers
    assert all(x.size == x.idle + x.in_use + x.pending for x in s.values())


def test_other_thread_may_read_stats(manager: PoolManager) -> None:
    """A metrics scrape thread reads stats: allowed, consistent, nothing changed; the
    manager's hub takes the snapshot, so this thread runs its hub meanwhile (a thread
    blocked outside gevent: tests/reliability/test_scrape_thread.py)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(manager.stats().to_dict()))
    t.start()
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        gevent.sleep(0.005)
    t.join(1)
    assert out[0] == manager.stats().to_dict()


def test_other_thread_release_refused_and_connection_kept(manager: PoolManager) -> None:
    conn = manager.acquire("svc")
    exc = from_other_thread(conn.release)
    assert_refused(exc)
    round_trip(conn, b"still usable here")  # the refused release did not cut the handle
    conn.release()
    assert manager.stats().backends["svc"].servers[conn.address].in_use == 0


def test_other_thread_wait_ready_refused(manager: PoolManager) -> None:
    exc = from_other_thread(manager.wait_ready, 1)
    assert_refused(exc)


def test_other_thread_close_refused_and_manager_intact(manager: PoolManager) -> None:
    assert_refused(from_other_thread(manager.close, 1))
    assert not manager.closed
    with manager.get("svc") as conn:
        round_trip(conn, b"still open")
    manager.close(timeout=1)
    assert manager._upkeep.greenlet.dead


def test_other_thread_reload_refused_and_config_unchanged(
    manager: PoolManager, echo_server_factory: Callable[..., EchoServer]
) -> None:
    a, _ = manager.test_servers  # type: ignore[attr-defined]
    c = echo_server_factory()
    old = manager.backends["svc"].config
    new = config([c.address, a.address], max_size=1)
    new["backends"]["svc"]["strategy"] = "least_active"
    assert_refused(from_other_thread(manager.reload, new))
    assert manager.backends["svc"].config == old
    assert manager.stats().backends["svc"].strategy == "round_robin"


def test_manager_closed_by_owner_leaves_no_greenlet(
    echo_server_factory: Callable[..., EchoServer], no_fd_leak: None
) -> None:
    before = len(live_greenlets())
    a = echo_server_factory()
    manager = PoolManager(config([a.address], min_idle=2))
    manager.wait_ready(timeout=5)
    assert_refused(from_other_thread(manager.get, "svc"))
    manager.close(timeout=1)
    a.stop()
    assert settle(lambda: len(live_greenlets()) <= before, 5)


def test_monkey_patched_threads_are_greenlets_and_may_use_the_manager() -> None:
    """DESIGN #12: under monkey-patching a ``threading.Thread`` is a greenlet of the same
    hub, so it shares the manager; only a real OS thread is refused. Run in a fresh
    interpreter, since patching must come before everything else."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        import threading
        import lbpool
        from lbpool.testing import EchoServer

        with EchoServer() as srv:
            config = {"backends": {"b": {"servers": [srv.address],
                                         "pool": {"min_idle": 0, "max_size": 2}}}}
            with lbpool.PoolManager(config) as manager:
                results = []

                def worker(i):
                    with manager.get("b") as conn:
                        conn.sendall(b"t%d" % i)
                        results.append(conn.recv(2))

                threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(10)
                assert sorted(results) == sorted(b"t%d" % i for i in range(8)), results
                st = manager.stats().backends["b"].servers[srv.address]
                assert st.size <= 2 and st.acquired == 8, st
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


# -- work in flight at the fork (DESIGN 21) ---------------------------------------------------


def run_in_child_parent_blocked(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """As ``run_in_child``, but the parent's hub is blocked (a plain blocking read) while
    the child runs: nothing of the parent's moves, so a reply on a socket both processes
    share is there for the child to take -- whatever the child's copies would do to the
    parent's work, they do it, deterministically."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            try:
                report = child()
            except BaseException as exc:
                report = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        while chunk := os.read(r, 65536):  # blocks the parent's hub on purpose
            data += chunk
    finally:
        os.close(r)
        status = reap_child(pid)
    assert status is None or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def pool_counts(pool: Any) -> dict[str, int]:
    st = pool.stats()
    return {
        "size": st.size,
        "idle": st.idle,
        "in_use": st.in_use,
        "pending": st.pending,
        "refilling": pool._refilling,
        "handed": pool._handed,
        "held": pool._held,
    }


def assert_exact(counts: dict[str, int]) -> None:
    assert all(v >= 0 for v in counts.values()), counts
    assert counts["size"] == counts["idle"] + counts["in_use"] + counts["pending"], counts


IN_FLIGHT = [
    "refill_dial_setup_hook",
    "caller_dial_setup_hook",
    "borrow_check",
    "borrow_check_hook",
    "background_check",
    "handoff_to_waiter",
]


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_childs_waiters_are_served_by_its_releases(
    make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    """A child started fresh waits on a queue of its own: its callers queue there, are
    counted there, and its releases hand them connections first come, first served
    (what the wait and the hand-off call on the queue and the hub is bound anew, not
    the parent's). The parent had callers waiting at the fork."""
    server = ProcessEchoServer()
    try:
        manager = make_manager(
            {
                "backends": {
                    "svc": {
                        "servers": [server.address],
                        "pool": {"min_idle": 0, "max_size": 1, "acquire_timeout": 10},
                    }
                }
            }
        )
        pool = manager.backends["svc"].pools[0]
        holder = manager.acquire("svc")
        parent_served: list[int] = []

        def parent_turn(i: int) -> None:
            with manager.get("svc", timeout=10):
                parent_served.append(i)

        parent_waiters = [gevent.spawn(parent_turn, i) for i in range(2)]
        assert settle(lambda: pool.stats().waiting == 2, 10)

        def child() -> dict[str, Any]:
            own = manager.acquire("svc", timeout=5)  # the first use: started fresh
            served: list[int] = []

            def wait_turn(i: int) -> None:
                with manager.get("svc", timeout=5) as conn:
                    round_trip(conn, b"child-%d" % i)
                    served.append(i)

            waiters = [gevent.spawn(wait_turn, i) for i in range(3)]
            queued = settle(lambda: pool.stats().waiting == 3, 5)
            own.release()
            gevent.joinall(waiters, timeout=10)
            return {
                "queued": queued,
                "served": served,
                "errors": [repr(g.exception) for g in waiters if g.exception is not None],
                "counts": pool_counts(pool),
            }

        result = run_in_child_parent_blocked(child)
        assert result["queued"] and result["errors"] == [], result
        assert result["served"] == [0, 1, 2], result
        assert result["counts"]["in_use"] == 0 and result["counts"]["handed"] == 0, result
        assert_exact(result["counts"])
        holder.release()  # the parent's own waiters are served as before the fork
        gevent.joinall(parent_waiters, timeout=10)
        assert [g.exception for g in parent_waiters] == [None, None]
        assert parent_served == [0, 1]
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
@pytest.mark.parametrize("kind", IN_FLIGHT)
def test_fork_child_abandons_work_in_flight_and_parent_finishes_it(
    make_manager: Callable[..., PoolManager], no_fd_leak: None, kind: str
) -> None:
    """Whatever the parent had in flight at the fork -- a refill's or a caller's dial
    (its setup hook waiting for the server's reply), a borrow check (inline, or a hook's
    errand), a background check, a connection handed to a waiter not yet awake -- the
    child's copy is abandoned: it reads nothing from the parent's socket, puts nothing
    into the child's pool (whose counts stay exact), and the parent's work completes
    on a healthy server as if there had been no fork."""
    delay = 0.0 if kind == "handoff_to_waiter" else 0.5  # the reply comes after the fork
    server = ProcessEchoServer(delay=delay)
    try:
        sent = gevent.event.Event()

        def ping(sock: Any) -> None:  # a setup or health hook waiting for the reply
            sock.sendall(b"PING\r\n")
            sent.set()
            if recv_exact(sock, 7) != b"+PONG\r\n":
                raise ConnectionError("bad reply")

        pool_cfg: dict[str, Any] = {"min_idle": 0, "max_size": 2, "acquire_timeout": 10}
        svc: dict[str, Any] = {"servers": [server.address], "pool": pool_cfg}
        svc["dial"] = {"timeout": 10}
        if kind.endswith("setup_hook"):
            svc["setup"] = ping
        if kind == "refill_dial_setup_hook":
            pool_cfg["min_idle"] = 1
        if kind.startswith("borrow_check") or kind == "background_check":
            pool_cfg["check_after"] = 0.0 if kind.startswith("borrow") else 300.0
            check: dict[str, Any] = {"timeout": 10, "interval": 300}
            if kind == "borrow_check_hook":
                check["hook"] = ping
            else:
                check.update(send="PING\r\n", expect="+PONG")
            if kind == "background_check":
                check["interval"] = 0.2
            svc["health_check"] = check
        if kind == "handoff_to_waiter":
            pool_cfg["max_size"] = 1
        manager = make_manager({"backends": {"svc": svc}})
        pool = manager.backends["svc"].pools[0]
        parent_ports: set[int] = set()
        got: list[Any] = []

        def borrow() -> None:
            conn = manager.acquire("svc", timeout=10)
            got.append(conn)

        if kind.startswith("borrow_check") or kind == "background_check":
            warm = manager.acquire("svc")  # one idle connection to check
            parent_ports.add(local_port(warm))
            warm.release()
        task = None
        if kind == "refill_dial_setup_hook":
            assert sent.wait(10)
        elif kind == "caller_dial_setup_hook":
            task = gevent.spawn(borrow)
            assert sent.wait(10)
        elif kind == "borrow_check_hook":
            sent.clear()
            task = gevent.spawn(borrow)
            assert sent.wait(10)
        elif kind in ("borrow_check", "background_check"):
            if kind == "borrow_check":
                task = gevent.spawn(borrow)
            assert settle(lambda: pool.stats().pending == 1, 10)  # the check runs
        else:  # handoff: the waiter is handed the connection, and the fork comes at once
            holder = manager.acquire("svc")
            parent_ports.add(local_port(holder))
            task = gevent.spawn(borrow)
            assert settle(lambda: pool.stats().waiting == 1, 10)
        before = pool_counts(pool)
        if kind == "handoff_to_waiter":
            holder.release()  # handed, the waiter not awake yet: no switch until the fork
        parent_ports |= {local_port(c) for c in pool._idle}

        def child() -> dict[str, Any]:
            gevent.sleep(1.5)  # every copied greenlet runs; the server's reply arrives
            abandoned = pool_counts(pool)
            copies_got = len(got)
            # the copied borrow ended, abandoned as lbpool says: Forked, nothing else
            copy_error = None if task is None else type(task.exception).__name__
            with manager.get("svc", timeout=10) as conn:  # the child's own connection
                port = local_port(conn)
                round_trip(conn, b"child")
            return {
                "abandoned": abandoned,
                "own": pool_counts(pool),
                "port": port,
                "copies_got": copies_got,
                "copy_error": copy_error,
            }

        result = run_in_child_parent_blocked(child)
        assert_exact(result["abandoned"])
        assert_exact(result["own"])
        assert result["own"]["idle"] >= 1, result
        assert result["port"] not in parent_ports, result
        assert result["copies_got"] == 0, result  # the copied borrow was lent nothing
        assert result["copy_error"] == (None if task is None else "Forked"), result
        # the parent's work in flight completes, undisturbed
        if task is not None:
            task.join(15)
            assert task.successful(), task.exception
            conn = got[0]
            round_trip(conn, b"parent")
            conn.release()
        if kind == "refill_dial_setup_hook":
            assert settle(lambda: pool.stats().idle == 1, 15)
            with manager.get("svc", timeout=10) as conn:
                assert conn.uses == 1  # the refill's connection: it got its reply
                round_trip(conn, b"parent")
        if kind == "background_check":
            assert settle(lambda: pool.stats().pending == 0, 15)
            with manager.get("svc", timeout=10) as conn:
                assert local_port(conn) in parent_ports  # the checked one, still good
                round_trip(conn, b"parent")
        st = pool.stats()
        assert st.dial_failures == 0 and st.closed["unhealthy"] == 0, (before, st)
        assert pool.breaker.failure_count == 0
        assert_exact(pool_counts(pool))
        manager.close(timeout=5)
    finally:
        server.stop()


def test_a_forked_child_never_reads_the_parents_dns_reply(
    make_manager: Callable[..., PoolManager], no_fd_leak: None
) -> None:
    """A DNS query in flight at the fork (gunicorn's master refreshing its discovered
    backends): the child's copy of the query's socket was left open, so the child's hub
    ran the copied resolution and took the reply the parent waited for; the parent's
    resolution timed out. The child closes its copies at the fork, its copy of the
    resolution ends without a word, and the parent's succeeds."""
    from tests.support.procs import ProcessDNSServer

    with ProcessDNSServer(delay=0.9) as dns:
        discover: dict[str, Any] = {
            "dns": "web.test:9",
            "refresh": 60,
            # a reply takes 0.9 s; one the child steals leaves the parent its resend, at
            # 1 s, whose reply comes after the 1.85 s budget
            "timeout": 1.85,
            "nameservers": [dns.address],
        }
        manager = make_manager({"backends": {"w": {"discover": discover, "pool": {"min_idle": 0}}}})
        manager.wait_ready(10)
        runner = manager.backends["w"].discovery
        assert runner is not None and runner.failures == 0
        answered = runner.last_refresh
        runner.refresh_now()
        gevent.sleep(0.1)  # the queries are out; their replies come 0.9 s after them

        def child() -> dict[str, Any]:
            gevent.sleep(1.0)  # the child's hub runs, the copied resolution with it
            return {"took_the_reply": runner.last_refresh != answered}

        # the parent's hub held (a master busy with blocking work) while the replies
        # land: the child's hub is the only one reading then
        assert run_in_child_parent_blocked(child) == {"took_the_reply": False}
        assert settle(lambda: runner.last_refresh != answered or runner.failures > 0, 5)
        assert (runner.failures, runner.last_error) == (0, None)
