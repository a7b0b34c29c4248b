"""Plain client sockets for tests (gevent, numeric hosts) and an IPv6 probe."""

from __future__ import annotations

from typing import Any

from gevent import socket as gsocket


def connect(address: str, timeout: float = 2.0) -> Any:
    """A plain gevent client socket to ``host:port`` / ``[v6]:port`` (numeric hosts)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
    sock = gsocket.socket(family, gsocket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


def ipv6_available() -> bool:
    if not gsocket.has_ipv6:
        return False
    try:
        with gsocket.socket(gsocket.AF_INET6, gsocket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
