"""Low-level network helpers shared by the library: one home for each.

Address wording (``host:port``, ``[v6]:port``), name resolution (numeric hosts skip
the resolver's thread hop; names go through gevent's, bounded), quiet closing of a
socket that may already be broken, and the duration wording of network messages.

Imports nothing from lbpool. Nothing here yields except ``resolve`` of a name.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
from typing import Any

import gevent
from gevent import socket as gsocket

__all__ = [
    "AddrInfo",
    "ResolveTimeout",
    "close_quietly",
    "fmt_seconds",
    "format_address",
    "resolve",
    "split_address",
    "unbracket",
]

AddrInfo = tuple[int, int, int, str, Any]


class ResolveTimeout(Exception):
    """Raised by ``resolve``'s own timer; distinct from any caller's ``gevent.Timeout``."""


def format_address(host: str, port: int) -> str:
    """``host:port``, or ``[v6]:port`` for an IPv6 host (given without brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unbracket(host: str) -> str:
    """``[::1]`` -> ``::1``; any other host unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``, leniently (no host check).

    The strict parser a user's config goes through is ``lbpool.config.parse_address``.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port or [v6]:port, got {text!r}")
    return unbracket(host), int(port)


def resolve(host: str, port: int, timeout: float | None = None) -> list[AddrInfo]:
    """Stream addresses for ``host:port``. Numeric hosts skip the resolver (no thread
    hop, never yields); names go through gevent's, bounded by ``timeout`` (then
    ``ResolveTimeout``)."""
    try:
        return list(
            _socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        )
    except socket.gaierror:
        pass
    with gevent.Timeout(timeout, ResolveTimeout):
        infos: list[AddrInfo] = gsocket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    return infos


def is_closed(sock: Any) -> bool:
    """True when ``sock`` was closed (its fd may live on in a ``makefile()`` object)
    or has no file descriptor any more: detached (a plain socket wrapped by
    ``SSLContext.wrap_socket``). Never yields."""
    if getattr(sock, "_closed", False):  # closed, its fd kept by a makefile() object
        return True
    try:
        return bool(sock.fileno() < 0)
    except (OSError, ValueError, AttributeError):
        return True


def close_quietly(sock: Any) -> None:
    """Close ``sock`` (None is fine); a socket already broken has nothing more to release."""
    if sock is None:
        return
    with contextlib.suppress(Exception):
        sock.close()


def fmt_seconds(seconds: float) -> str:
    """A duration as network error messages word it: ``0.25s``, ``2s``."""
    return f"{seconds:.3g}s"
