"""Shared fixtures: loopback echo servers, TLS certificates, fd-leak and greenlet checks.

Nothing here monkey-patches: lbpool is gevent-native and the tests use gevent sockets
directly. One fixture is autouse, ``_closes_what_it_made``: every manager, pool, server
and proxy a test makes is closed when the test ends, whatever its outcome, and a test
that passed but left one open, or left an lbpool greenlet running, fails -- so a leak
is reported once, by the test that caused it, and never spills into the next test.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import trustme

from lbpool.config import Address
from lbpool.manager import PoolManager
from lbpool.pool import Pool
from lbpool.testing import EchoServer, _LoopbackServer
from tests.support.leaks import (
    fd_count,
    mark_greenlet_baseline,
    new_lbpool_greenlets,
    open_fds,
    recording_spawn,
    settle,
)
from tests.support.net import black_hole_listener
from tests.support.procs import ProcessEchoServer
from tests.support.tls import TLSCerts

_FD_BASELINE = pytest.StashKey[tuple[int, dict[str, str]]]()


@pytest.fixture
def no_fd_leak(request: pytest.FixtureRequest) -> None:
    """Fail the test if it ends with an fd open that was not open when it started.

    The baseline is taken when this fixture is set up; the check runs after *every*
    fixture of the test has been torn down (see ``pytest_runtest_teardown`` below), so
    it does not matter where ``no_fd_leak`` sits in the argument list: servers made by
    a factory fixture are stopped before the count is compared.
    """
    gevent.sleep(0)  # creates the hub and its loop: their fds are not the test's
    gc.collect()
    request.node.stash[_FD_BASELINE] = (fd_count(), open_fds())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Only acts for tests that requested ``no_fd_leak``."""
    result = yield
    recorded = item.stash.get(_FD_BASELINE, None)
    if recorded is None:
        return result
    del item.stash[_FD_BASELINE]
    baseline, before = recorded

    def new_fds() -> dict[str, str]:  # 0-2: pytest's capture swaps them between phases
        return {
            fd: target
            for fd, target in open_fds().items()
            if before.get(fd) != target and fd not in ("0", "1", "2")
        }

    # compared by what each fd points at, not by count: a fixture's sockets made before
    # the baseline and closed at teardown would otherwise hide as many leaked ones
    if not settle(lambda: not new_fds()):
        pytest.fail(f"fd leak: {baseline} fds before, {fd_count()} after; new: {new_fds()}")
    return result


_OUTCOME = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.passed
    return report


def _is_open(thing: object) -> bool:
    if isinstance(thing, _LoopbackServer):
        return thing.listening
    return not thing.closed  # type: ignore[attr-defined]


def _close(thing: object) -> None:
    if isinstance(thing, _LoopbackServer):
        thing.stop()
    else:
        thing.close(timeout=1)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _closes_what_it_made(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Track every PoolManager, Pool, EchoServer and FaultProxy the test constructs; at
    teardown (after the test's own fixtures) close what is still open, then compare
    lbpool's greenlets with the baseline taken here. A test that passed and left either
    behind fails with a message naming what; a test that failed already is only cleaned
    up, so its failure is reported once."""
    made: list[object] = []
    for cls in (PoolManager, Pool, _LoopbackServer):
        original = cls.__init__

        def tracked(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            __original(self, *args, **kwargs)
            if not any(m is self for m in made):
                made.append(self)

        monkeypatch.setattr(cls, "__init__", tracked)
    monkeypatch.setattr(gevent, "spawn", recording_spawn)
    mark_greenlet_baseline()
    yield
    left_open = [thing for thing in made if _is_open(thing)]
    errors = []
    for thing in reversed(left_open):  # managers before the servers they use
        try:
            _close(thing)
        except BaseException as exc:  # close the rest whatever one of them raises
            errors.append(f"closing {type(thing).__name__} raised {exc!r}")
    made.clear()

    settle(lambda: not new_lbpool_greenlets(), 2.0)
    stray = new_lbpool_greenlets()
    gevent.killall(stray, block=True, timeout=2)
    if request.node.stash.get(_OUTCOME, False):
        problems = []
        if left_open:
            problems.append("left open: " + ", ".join(type(t).__name__ for t in left_open))
        if stray:
            problems.append(f"lbpool greenlets left running: {stray}")
        problems.extend(errors)
        if problems:
            pytest.fail("; ".join(problems) + " (closed by the conftest finalizer)")


@pytest.fixture
def make_manager() -> Iterator[Callable[..., PoolManager]]:
    """``make(config)`` -> a PoolManager, closed at teardown whatever the test's outcome
    (the autouse finalizer above would close a forgotten one too, and fail the test)."""
    made: list[PoolManager] = []

    def make(config: Any = None) -> PoolManager:
        manager = PoolManager(config)
        made.append(manager)
        return manager

    yield make
    for manager in reversed(made):
        manager.close(timeout=2)


@pytest.fixture
def process_echo_server() -> Iterator[ProcessEchoServer]:
    """An echo server in a process of its own, for tests that fork (see procs.py)."""
    with ProcessEchoServer() as server:
        yield server


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    """A started loopback ``EchoServer``, stopped at teardown."""
    with EchoServer() as server:
        yield server


@pytest.fixture
def echo_server_factory() -> Iterator[Callable[..., EchoServer]]:
    """``make(**EchoServer kwargs)`` -> a started server; all are stopped at teardown."""
    servers: list[EchoServer] = []

    def make(**kwargs: Any) -> EchoServer:
        server = EchoServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    """One trustme CA with server and client certificates for the whole session."""
    root = tmp_path_factory.mktemp("tls")
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert("127.0.0.1", "::1", "localhost", key_type=trustme.KeyType.ECDSA)
    client = ca.issue_cert("client@lbpool.test", key_type=trustme.KeyType.ECDSA)
    other = trustme.CA(key_type=trustme.KeyType.ECDSA)

    def write(name: str, blob: Any) -> str:
        path = Path(root, name)
        blob.write_to_path(str(path))
        return str(path)

    return TLSCerts(
        ca=ca,
        ca_file=write("ca.pem", ca.cert_pem),
        server=server,
        client_cert_file=write("client.pem", client.cert_chain_pems[0]),
        client_key_file=write("client.key", client.private_key_pem),
        other_ca_file=write("other-ca.pem", other.cert_pem),
    )


@pytest.fixture
def tls_echo_server(tls_certs: TLSCerts) -> Iterator[EchoServer]:
    """A started TLS ``EchoServer`` (certificate from ``tls_certs``), stopped at teardown."""
    with EchoServer(ssl_context=tls_certs.server_context()) as server:
        yield server


@pytest.fixture(scope="module")
def black_hole() -> Iterator[Address]:
    """A loopback address where connects never complete (``black_hole_listener``)."""
    with black_hole_listener() as address:
        if address is None:
            pytest.skip("could not fill a listen queue on this kernel")
        yield address
