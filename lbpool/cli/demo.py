"""``lbpool demo``: pools, breakers and failover, watched live on loopback echo servers.

The demo starts an ``EchoServer`` for every server of the config, builds a
``PoolManager`` and drives echo requests from many greenlets. A quarter of the way in
it kills one server (its clients see EOF), a little past half way it brings it back on
the same port, so the breaker opening, the traffic moving to the other servers, the
half-open trial and the recovery can all be watched. It ends by itself with a summary.

The client side is the pattern we recommend (see ``echo_request``): lbpool fails over
between servers while *acquiring*; a request whose connection dies *in flight* is
retried by ``manager.call`` on a fresh acquisition, after discarding the dead
connection (which also tells that server's breaker). Done that way, no request fails
while another server could serve it.

What the demo shows, the live table and the summary, is ``_demo_report``'s: this
module writes a ``Record`` as the run goes, and that module reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from time import monotonic

import gevent
from gevent.event import Event

from lbpool.cli import _demo_report as report
from lbpool.cli._demo_report import Outage, Record
from lbpool.cli._tables import rich_console
from lbpool.config import Config, load_config
from lbpool.connection import PooledConnection
from lbpool.errors import ConfigError, LbpoolError
from lbpool.hashing import HASH_STRATEGIES
from lbpool.manager import PoolManager
from lbpool.testing import EchoServer

__all__ = ["DEFAULT_CONFIG", "echo_request", "run"]

# The same settings as the repository's config.yaml, for when ./config.yaml is missing.
DEFAULT_CONFIG = """\
# lbpool demo: the built-in example config (the repository's config.yaml, shortened).
defaults:
  pool:
    min_idle: 2
    max_size: 20
    max_waiting: 0
    acquire_timeout: 2s
    idle_timeout: 5m
    max_lifetime: 30m
    lifetime_jitter: 0.1
    check_after: 1s
    upkeep_interval: 500ms
    leak_threshold: null
  dial: {timeout: 500ms, tcp_nodelay: true, keepalive: true, tls: null}
  breaker: {failure_threshold: 3, recovery_timeout: 2s, max_recovery_timeout: 4s}
  health_check: {send: null, expect: null, hook: null, timeout: 500ms, interval: 5s}
backends:
  cache:
    strategy: least_active
    servers: [127.0.0.1:17001, 127.0.0.1:17002, 127.0.0.1:17003]
    pool: {check_after: 0s}
  api:
    strategy: weighted
    servers:
      - {address: 127.0.0.1:17004, weight: 3}
      - {address: 127.0.0.1:17005, weight: 1}
    health_check: {send: "PING\\r\\n", expect: "+PONG"}
    setup: null
"""

_IO_TIMEOUT = 1.0  # seconds a request may take on an acquired connection
_KILL_AT = 0.25  # fractions of the duration
_RESTART_AT = 0.55
_PHASES = ("before", "down", "after")
_MAX_LATENCIES = 2_000_000
_KEYS = 1_000  # key-affinity backends: each request's key is one of "user:0".."user:999"

_log = logging.getLogger("lbpool")


# ------------------------------------------------------------------ the client pattern


class ServerClosed(ConnectionError):
    """The server closed the connection in the middle of a request."""

    def __init__(self) -> None:
        super().__init__("server closed the connection")


def _recv_exact(conn: PooledConnection, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = conn.recv(size - got)
        if not chunk:
            raise ServerClosed()
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def echo_request(
    manager: PoolManager,
    backend: str,
    payload: bytes,
    *,
    io_timeout: float = _IO_TIMEOUT,
    on_retry: Callable[[BaseException], object] | None = None,
    key: str | None = None,
) -> str:
    """Send ``payload``, read the echo; return the address of the server that answered.
    ``key``: the request's key, which a key-affinity backend (``maglev``, ``ring_hash``,
    ``rendezvous``) requires and routes by (the key's owner, or its fallback).

    Through ``manager.call``: errors while *acquiring* (``BackendUnavailable``,
    ``PoolTimeout``...) are final: lbpool already tried every eligible server within
    the deadline. A network error on the acquired connection (the server died under
    us) discards it, which closes it and counts against that server's breaker, and
    the request is retried on a fresh acquisition (the backend's ``retry`` config:
    once, within the retry budget); ``on_retry`` hears the error that killed the
    previous attempt as the retry starts. A wrong reply is a bug, not retried.
    """
    died: list[BaseException] = []

    def attempt(conn: PooledConnection) -> str:
        if died and on_retry is not None:
            on_retry(died[-1])
        conn.settimeout(io_timeout)
        try:
            conn.sendall(payload)
            reply = _recv_exact(conn, len(payload))
        except OSError as exc:  # reset, broken pipe, EOF, timeout: this connection is dead
            died.append(exc)
            raise
        if reply != payload:
            raise ValueError(f"{conn.address}: echo mismatch: {reply[:32]!r}")
        return conn.address

    return manager.call(backend, attempt, key=key)


def _kind(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, LbpoolError):
        return name
    return f"{name}: {text}" if text and len(text) < 60 else name


# ------------------------------------------------------------------ the demo


class Demo:
    def __init__(
        self, config: Config, source: str, duration: float, workers: int, live: bool
    ) -> None:
        self.config = config
        self.source = source
        self.duration = duration
        self.n_workers = workers
        self.live = live
        self.stop = Event()
        self.servers: dict[str, EchoServer] = {}
        self.rec = Record(start=monotonic(), duration=duration, workers=workers)
        self.manager: PoolManager | None = None
        for name, backend in config.backends.items():
            for server in backend.servers:
                self.rec.served[(name, str(server.address))] = [0, 0, 0]
        # Key-affinity backends route by key: their requests carry one of _KEYS keys.
        self.keyed = {n for n, b in config.backends.items() if b.strategy in HASH_STRATEGIES}
        for name, backend in config.backends.items():
            if len(backend.servers) >= 2:
                self.rec.outage = Outage(name, str(backend.servers[1].address))
                break

    # -- servers -------------------------------------------------------------------
    def start_servers(self) -> str | None:
        """Start an EchoServer per distinct address; an error message on failure."""
        for backend in self.config.backends.values():
            for server in backend.servers:
                address = str(server.address)
                if address in self.servers:
                    continue
                echo = EchoServer(server.address.host, server.address.port)
                try:
                    echo.start()
                except OSError as exc:
                    self.stop_servers()
                    reason = exc.strerror or str(exc)
                    return (
                        f"cannot listen on {address}: {reason}. The demo runs its own echo "
                        f"servers on the config's (loopback) addresses: is another demo "
                        f"running, or is the port in use? Change the ports in {self.source}."
                    )
                self.servers[address] = echo
        return None

    def stop_servers(self) -> None:
        for echo in self.servers.values():
            echo.stop()

    # -- breakers ------------------------------------------------------------------
    def watch_breakers(self, manager: PoolManager) -> None:
        """Hear every breaker transition through the manager's listener hook."""
        pools = {(n, p.name): p for n, b in manager.backends.items() for p in b.pools}

        def listener(backend: str, address: str, old: str, new: str) -> None:
            key = (backend, address)
            pool = pools.get(key)
            last = pool.breaker.last_failure if pool is not None else None
            reason = getattr(last, "reason", last)  # a DialError's text, sans address
            detail = f" (last error: {reason})" if new == "open" and last else ""
            self.rec.transition(key, old, new, detail)

        manager.add_breaker_listener(listener)

    # -- traffic -------------------------------------------------------------------
    def could_serve(self, backend: str, key: str | None = None) -> bool:
        """Was there a live server with a closed breaker that this request could use?
        A key-affinity backend with ``hash_fallback: none`` serves a key from its owner
        only: then that server."""
        assert self.manager is not None
        pools = self.manager.backends[backend].pools
        if key is not None and self.config.backends[backend].balance.hash_fallback == "none":
            owner = self.manager.owner(backend, key)
            pools = [pool for pool in pools if pool.name == owner]
        return any(pool.name not in self.rec.down and pool.breaker.is_closed for pool in pools)

    def worker(self, index: int) -> None:
        assert self.manager is not None
        manager = self.manager
        rec = self.rec
        rng = random.Random(index)
        names = list(self.config.backends)
        seq = 0

        def retried(exc: BaseException) -> None:
            rec.retried[_kind(exc)] += 1

        while not self.stop.is_set():
            seq += 1
            backend = names[(index + seq) % len(names)]
            payload = b"%d:%d:" % (index, seq) + rng.randbytes(rng.randint(8, 56))
            key = f"user:{rng.randrange(_KEYS)}" if backend in self.keyed else None
            began = monotonic()
            phase = rec.phase  # counted in the phase the request started in
            try:
                address = echo_request(manager, backend, payload, on_retry=retried, key=key)
            except (LbpoolError, OSError, ValueError) as exc:
                if self.stop.is_set() and manager.closed:
                    return
                rec.failed[_kind(exc)] += 1
                if self.could_serve(backend, key):
                    rec.failed_while_failover += 1
                    rec.event(f"request to {backend} failed while failover could serve: {exc}")
                self.stop.wait(0.05)  # do not spin on a backend that cannot serve
                continue
            elapsed = monotonic() - began
            rec.ok += 1
            if len(rec.latencies) < _MAX_LATENCIES:
                rec.latencies.append(elapsed)
            counts = rec.served.get((backend, address))
            if counts is not None:
                counts[phase] += 1
            self.stop.wait(rng.random() * 0.003)  # think time: paced, watchable traffic

    def chaos(self) -> None:
        """Kill one server a quarter of the way in; bring it back a little past half way."""
        outage = self.rec.outage
        if outage is None:
            self.rec.event("no backend has two servers: nothing to kill, no failover to show")
            return
        echo = self.servers[outage.address]
        if self.stop.wait(max(0.0, self.duration * _KILL_AT - self.rec.now())):
            return
        echo.stop()  # listener closed, every client connection dropped (clients see EOF)
        self.rec.down.add(outage.address)
        outage.killed_at = self.rec.now()
        self.rec.phase = 1
        self.rec.event(f"killed {outage.address} ({outage.backend}): its clients see EOF")
        if self.stop.wait(max(0.0, self.duration * _RESTART_AT - self.rec.now())):
            return
        try:
            echo.start()  # the same port again
        except OSError as exc:
            outage.restart_error = exc.strerror or str(exc)
            self.rec.event(f"could not restart {outage.address}: {outage.restart_error}")
            return
        self.rec.down.discard(outage.address)
        outage.restarted_at = self.rec.now()
        self.rec.phase = 2
        self.rec.event(f"restarted {outage.address}: back once its breaker's trial succeeds")

    def display(self) -> None:
        assert self.manager is not None
        if self.live:
            from rich.live import Live

            console = rich_console()
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    stats = self.manager.stats()
                    live.update(report.render(self.rec, stats), refresh=True)
                    if self.stop.wait(0.25):
                        live.update(report.render(self.rec, self.manager.stats()), refresh=True)
                        return
        shown = 0
        while True:
            stopping = self.stop.wait(1.0)
            stats = self.manager.stats()
            new = min(self.rec.n_events - shown, len(self.rec.events))
            if new > 0:
                for t, text in list(self.rec.events)[-new:]:
                    print(f"  {t:5.1f}s  {text}", flush=True)
            shown = self.rec.n_events
            if stopping:
                return
            print(report.plain_line(self.rec, stats), flush=True)

    # -- run -----------------------------------------------------------------------
    def run(self) -> int:
        error = self.start_servers()
        if error is not None:
            print(f"lbpool demo: {error}", file=sys.stderr)
            return 1
        greenlets: list[gevent.Greenlet] = []
        try:
            manager = PoolManager(self.config)
            self.manager = manager
            try:
                manager.wait_ready(timeout=5.0)  # pools, DNS answers and first key tables
            except LbpoolError as exc:
                print(f"lbpool demo: pools not ready: {exc}", file=sys.stderr)
                return 1
            self.rec.start = monotonic()
            self.watch_breakers(manager)
            self.rec.event(
                f"{len(self.servers)} echo servers up; {self.n_workers} client greenlets start"
            )
            outage = self.rec.outage
            if not self.live:
                print(
                    f"lbpool demo: {self.source}, {self.duration:g}s, {self.n_workers} workers"
                    + (
                        f"; {outage.address} is killed at "
                        f"{self.duration * _KILL_AT:.1f}s and back at "
                        f"{self.duration * _RESTART_AT:.1f}s"
                        if outage
                        else ""
                    ),
                    flush=True,
                )
            greenlets = [gevent.spawn(self.worker, i) for i in range(self.n_workers)]
            chaos = gevent.spawn(self.chaos)
            display = gevent.spawn(self.display)
            greenlets += [chaos, display]
            with _interrupts(self.on_interrupt):
                self.stop.wait(self.duration)
                self.stop.set()
                gevent.joinall(greenlets, timeout=_IO_TIMEOUT + 3.0)
            self.rec.final_stats = manager.stats()
        finally:
            self.stop.set()
            gevent.killall(greenlets, block=True, timeout=2.0)
            if self.manager is not None:
                self.manager.close(timeout=3.0)
            self.stop_servers()
        report.summary(self.rec)
        return 1 if self.rec.failed_while_failover else 0

    def on_interrupt(self) -> None:
        if not self.stop.is_set():
            self.rec.interrupted = True
            self.rec.event("interrupted: stopping")
            self.stop.set()


@contextlib.contextmanager
def _interrupts(callback: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C (and SIGTERM) call ``callback`` in a greenlet instead of raising."""
    handles = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # not the main thread: no handler, Ctrl-C raises KeyboardInterrupt as usual
        with contextlib.suppress(ValueError, OSError):
            handles.append(gevent.signal_handler(signum, callback))
    try:
        yield
    finally:
        for handle in handles:
            handle.cancel()


class _EventLog(logging.Handler):
    """lbpool's own warnings go to the demo's event feed, not over the live table."""

    def __init__(self, rec: Callable[[], Record]) -> None:
        super().__init__(logging.WARNING)
        self._rec = rec

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("breaker "):  # the listener reports transitions already
            return
        self._rec().event(message.splitlines()[0])


def _load(path: str | None) -> tuple[Config, str] | None:
    """The config and its name; None after printing the problems."""
    if path is None:
        path = "config.yaml"
        if not os.path.exists(path):
            import yaml

            from lbpool.config import parse_config

            return parse_config(yaml.safe_load(DEFAULT_CONFIG), "<built-in>"), "built-in config"
    try:
        return load_config(path), path
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        return None


def run(
    config_path: str | None = None,
    duration: float = 12.0,
    workers: int = 50,
    live: bool | None = None,
) -> int:
    """Run the demo; the exit code (0 ok, 1 a request failed that failover could serve,
    or the servers could not start; 2 an invalid config)."""
    loaded = _load(config_path)
    if loaded is None:
        return 2
    config, source = loaded
    if live is None:
        live = sys.stdout.isatty()
    if live:
        try:
            import rich.live  # noqa: F401
        except ImportError:
            live = False
    demo = Demo(config, source, duration, workers, live)
    handler = _EventLog(lambda: demo.rec)
    propagate = _log.propagate
    _log.addHandler(handler)
    _log.propagate = False
    try:
        return demo.run()
    finally:
        _log.removeHandler(handler)
        _log.propagate = propagate
