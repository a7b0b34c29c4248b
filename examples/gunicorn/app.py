"""A WSGI app whose every request makes a round trip through an lbpool ``PoolManager``.

Run from this folder: ``gunicorn -c gunicorn.conf.py app:app``. ``GET /`` sends
``PING`` to a server of the ``cache`` backend and answers 200 with the reply and the
server that gave it; 503 when the backend cannot serve. The manager is one per worker
process: built by ``open_manager()`` from the ``post_worker_init`` hook (or lazily on
the first request), closed by ``close_manager()`` from ``worker_exit``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import lbpool

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.environ.get("LBPOOL_CONFIG") or os.path.join(HERE, "config.yaml")
BACKEND = os.environ.get("LBPOOL_BACKEND", "cache")

_manager: lbpool.PoolManager | None = None


def open_manager() -> lbpool.PoolManager:
    """This worker's manager, built on first use (in the worker, after the fork)."""
    global _manager
    if _manager is None or _manager.closed:
        _manager = lbpool.PoolManager.from_yaml(CONFIG)
    return _manager


def close_manager() -> None:
    global _manager
    if _manager is not None:
        _manager.close(timeout=5)
        _manager = None


def ping(conn: lbpool.PooledConnection) -> bytes:
    conn.settimeout(2.0)
    conn.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = conn.recv(64)
        if not chunk:
            raise ConnectionError(f"{conn.address} closed the connection")
        reply += chunk
    return reply


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO", "/") != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    try:
        with open_manager().get(BACKEND) as conn:
            reply = ping(conn)
            server = conn.address
    except (lbpool.LbpoolError, OSError) as exc:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{type(exc).__name__}: {exc}\n".encode()]
    body = json.dumps({"reply": reply.decode().strip(), "server": server, "pid": os.getpid()})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode() + b"\n"]
