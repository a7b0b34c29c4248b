"""Serve ``/metrics`` for a PoolManager that carries traffic.

Run: ``python examples/prometheus_exporter.py [--port 0] [--duration 10]``. It starts
two loopback echo servers, a manager over them, a few client greenlets, and serves
Prometheus metrics (``lbpool.metrics``) with a ``gevent.pywsgi`` server, so scrapes
are greenlets in the same hub as the pools: no thread, no monkey patching. It prints
``serving metrics on http://127.0.0.1:PORT/metrics``, scrapes itself once to show a
few lines, and stops after ``--duration`` seconds or on Ctrl-C / SIGTERM.

In your own app: ``lbpool.metrics.register(manager)`` and, for a gevent app, mount
``lbpool.metrics.make_wsgi_app()`` (prometheus_client's app answering, lbpool's
lines written, paced: a big fleet's scrape never holds the hub for long), or
``lbpool.metrics.start_http_server(9100)`` (a daemon thread) when threads are fine.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry

import lbpool
import lbpool.metrics
from lbpool.testing import EchoServer

CLIENTS = 5


def scrape(port: int) -> str:
    """GET /metrics over a gevent socket (cooperative, unlike plain urllib here)."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks).decode().partition("\r\n\r\n")[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to serve")
    args = parser.parse_args()

    echo_servers = [EchoServer().start() for _ in range(2)]
    config = {
        "backends": {
            "echo": {"strategy": "least_active", "servers": [s.address for s in echo_servers]}
        }
    }
    stop = Event()
    manager = lbpool.PoolManager(config)
    registry = CollectorRegistry()
    lbpool.metrics.register(manager, registry)
    server = WSGIServer(("127.0.0.1", args.port), lbpool.metrics.make_wsgi_app(registry), log=None)

    def client(n: int) -> None:
        message = b"metrics %d\n" % n
        while not stop.is_set():
            try:
                with manager.get("echo", timeout=1) as conn:
                    conn.settimeout(2)
                    conn.sendall(message)
                    reply = b""
                    while len(reply) < len(message):
                        chunk = conn.recv(64)
                        if not chunk:
                            raise ConnectionError("server closed the connection")
                        reply += chunk
            except (lbpool.LbpoolError, OSError) as exc:
                print(f"client {n}: {exc}", flush=True)
            stop.wait(0.01)  # ~100 requests/s per client

    clients = [gevent.spawn(client, n) for n in range(CLIENTS)]
    try:
        server.start()
        print(f"serving metrics on http://127.0.0.1:{server.server_port}/metrics", flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, stop.set)
        stop.wait(1.0)
        for line in scrape(server.server_port).splitlines():
            if line.startswith(("lbpool_acquired_total", "lbpool_in_use", "lbpool_breaker_state")):
                print("  " + line)
        print(f"serving for {args.duration:g}s (Ctrl-C to stop)", flush=True)
        stop.wait(args.duration)
    finally:
        stop.set()
        gevent.joinall(clients, timeout=3)
        gevent.killall(clients)
        server.stop(timeout=2)
        manager.close(timeout=2)
        for echo in echo_servers:
            echo.stop()
    print("stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
