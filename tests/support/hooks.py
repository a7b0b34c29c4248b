"""Hook functions named by import string in test configs (``tests.support.hooks:setup_ok``).

Config hooks are resolved by import at load time, so they must live in an importable
module rather than inside a test function.
"""

from __future__ import annotations

from typing import Any

from lbpool.testing import recv_exact

NOT_CALLABLE = 42


def setup_ok(sock: Any) -> None:
    """A setup hook that accepts every socket."""


def setup_fail(sock: Any) -> None:
    """A setup hook that fails every dial."""
    raise RuntimeError("setup failed")


def health_ok(sock: Any) -> None:
    """A health hook that finds every connection healthy."""


def health_fail(sock: Any) -> None:
    """A health hook that finds every connection unhealthy."""
    raise RuntimeError("unhealthy")


def setup_ping(sock: Any) -> None:
    """Prove the server answers before the connection counts as ready (like an
    AUTH/SELECT on connect): a dial to a black-holed or resetting server then fails in
    the dial, bounded by its timeout."""
    sock.sendall(b"PING\r\n")
    want = b"+PONG\r\n"
    got = recv_exact(sock, len(want))
    if got != want:
        raise ConnectionError(f"bad setup reply {got!r}")


# Sockets each "select a database" setup hook made ready (a stand-in for a redis
# ``SELECT n`` on connect): a test tells which hook set a connection up by finding its
# socket here. Tests clear them when done.
SELECTED: dict[str, list[Any]] = {"db1": [], "db2": []}


def setup_db1(sock: Any) -> None:
    """A setup hook that "selects db 1": records the socket in ``SELECTED["db1"]``."""
    SELECTED["db1"].append(sock)


def setup_db2(sock: Any) -> None:
    """A setup hook that "selects db 2": records the socket in ``SELECTED["db2"]``."""
    SELECTED["db2"].append(sock)


def health_close(sock: Any) -> None:
    """A health hook that closes the socket and returns as if all were well."""
    sock.close()
