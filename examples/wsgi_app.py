"""A gevent WSGI app whose handlers call ``manager.get("echo")``.

Run: ``python examples/wsgi_app.py [--port 0] [--duration 15]``. It starts two
loopback echo servers, a ``PoolManager`` over them and a ``gevent.pywsgi`` server,
prints ``listening on http://127.0.0.1:PORT``, calls itself a few times to show it
works, and serves until ``--duration`` runs out or Ctrl-C / SIGTERM. Try::

    curl 'http://127.0.0.1:PORT/echo?msg=hello'
    curl  http://127.0.0.1:PORT/stats

Monkey patching comes first, before anything else is imported: this is how apps run
under gunicorn's or uWSGI's gevent workers. lbpool itself does not need it (it uses
gevent sockets directly), but the rest of a typical app (urllib, requests, database
drivers) does. One manager per process, made after the fork in a preforking server.
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (imports after monkey patching, on purpose)
import argparse
import json
import signal
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer

import lbpool
from lbpool.testing import EchoServer

StartResponse = Callable[..., Any]


def echo_once(manager: lbpool.PoolManager, message: bytes) -> tuple[str, bytes]:
    """One request/response through the pool; ``manager.call`` retries it on a fresh
    connection if the connection died in flight (an echo is safe to repeat)."""

    def exchange(conn: lbpool.PooledConnection) -> tuple[str, bytes]:
        conn.settimeout(2.0)
        conn.sendall(message)
        reply = b""
        while len(reply) < len(message):
            chunk = conn.recv(len(message) - len(reply))
            if not chunk:
                raise ConnectionError("server closed the connection")
            reply += chunk
        return conn.address, reply

    return manager.call("echo", exchange, timeout=1.0)


def make_app(
    manager: lbpool.PoolManager,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        try:
            if path == "/echo":
                message = query.get("msg", ["hello"])[0].encode()
                address, reply = echo_once(manager, message)
                body = json.dumps({"server": address, "reply": reply.decode()}).encode()
                status = "200 OK"
            elif path == "/stats":
                body = json.dumps(manager.stats().to_dict()).encode()
                status = "200 OK"
            else:
                body = b'{"try": ["/echo?msg=hello", "/stats"]}'
                status = "404 Not Found"
        except lbpool.LbpoolError as exc:  # no server could serve within the timeout
            body = json.dumps({"error": type(exc).__name__, "detail": str(exc)}).encode()
            status = "503 Service Unavailable"
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds to serve")
    args = parser.parse_args()

    echo_servers = [EchoServer().start() for _ in range(2)]
    config = {
        "defaults": {"pool": {"min_idle": 2, "max_size": 10, "acquire_timeout": "1s"}},
        "backends": {
            "echo": {"strategy": "round_robin", "servers": [s.address for s in echo_servers]}
        },
    }
    manager = lbpool.PoolManager(config)
    server = WSGIServer(("127.0.0.1", args.port), make_app(manager), log=None)
    server.start()
    port = server.server_port
    print(f"listening on http://127.0.0.1:{port}", flush=True)

    stop = Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop.set)
    try:
        # Call ourselves (urllib is cooperative: monkey-patched) to show it works.
        jobs = [
            gevent.spawn(
                lambda i=i: urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/echo?msg=hi-{i}", timeout=5
                ).read()
            )
            for i in range(4)
        ]
        gevent.joinall(jobs, timeout=10)
        for job in jobs:
            print(f"self-test: {job.value.decode() if job.successful() else job.exception}")
        print(f"serving for {args.duration:g}s (Ctrl-C to stop)", flush=True)
        stop.wait(args.duration)
    finally:
        server.stop(timeout=2)
        manager.close(timeout=2)
        for echo in echo_servers:
            echo.stop()
    print("stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
