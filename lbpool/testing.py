"""Loopback servers for tests and demos: an ``EchoServer`` and a ``FaultProxy``.

Both run on gevent greenlets in the calling thread's hub (no threads, no monkey
patching needed), stop by themselves on context exit, and leave no greenlet or
socket behind after ``stop()``, so tests can assert on fd and greenlet counts.

``EchoServer`` echoes bytes back, answers ``PING\\r\\n`` with ``+PONG\\r\\n`` (so a
``send: "PING\\r\\n"`` / ``expect: "+PONG"`` health check passes against it) and can
misbehave on purpose (``mode``). ``FaultProxy`` sits in front of any server and
injects network faults: latency, a black hole, resets, truncation, refused connects::

    with EchoServer() as server, FaultProxy(server.address) as proxy:
        manager = PoolManager({"backends": {"b": {"servers": [proxy.address]}}})
        proxy.reset_all()   # every open connection through the proxy gets an RST
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from time import monotonic
from types import TracebackType
from typing import Any, Literal

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from lbpool import _hotpath
from lbpool._net import close_quietly, format_address, resolve, split_address, unbracket

__all__ = ["EchoMode", "EchoServer", "FaultProxy", "hot_path", "recv_exact"]

_log = logging.getLogger("lbpool")

EchoMode = Literal["echo", "reset_on_accept", "close_on_accept", "silent"]
_MODES = ("echo", "reset_on_accept", "close_on_accept", "silent")
_PING = b"PING\r\n"
_PONG = b"+PONG\r\n"
_CHUNK = 65536
_STOP_GRACE = 2.0  # seconds given to handler greenlets to exit before stop() gives up


def hot_path() -> str:
    """Which hot path this process runs: ``"compiled"`` when ``lbpool.pool``,
    ``lbpool.connection``, ``lbpool._handoff``, ``lbpool._router`` and
    ``lbpool._snapshot`` (``lbpool._hotpath.COMPILED``) are mypyc extension modules,
    else ``"pure (<why>)"``: why is ``LBPOOL_PURE_PYTHON=1`` (set when lbpool was first
    imported), ``no compiled modules installed`` (installed without a C build), or
    ``partly: <modules> not compiled``. Behaviour is the same either way; only speed
    differs. Never yields."""
    return _hotpath.hot_path()


def recv_exact(sock: Any, size: int) -> bytes:
    """Read exactly ``size`` bytes from a socket or ``PooledConnection``.

    A peer that closes first raises ``ConnectionResetError`` (an ``OSError``, so a
    ``with manager.get(...)`` block discards the connection and tells the breaker).
    """
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            raise ConnectionResetError(f"server closed the connection after {len(got)} bytes")
        got += chunk
    return got


def _reset(sock: Any) -> None:
    """Close with SO_LINGER 0: the kernel sends an RST instead of a FIN -- at once.

    gevent defers closing a socket's descriptor while a greenlet waits on it (the pump
    reading it always does) until the hub's next turn, so the RST would go out only
    then, and a client could still finish a round trip on a connection "reset" before
    it. Detaching drops the event-loop watchers now; the descriptor is closed here.
    """
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        fd = sock.detach()
    except (OSError, ValueError, AttributeError):
        close_quietly(sock)
        return
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _shutdown_close(sock: Any) -> None:
    """FIN now (wakes a greenlet blocked reading it with EOF), then release the fd."""
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)
    close_quietly(sock)


class _Changes:
    """Wake waiters whenever state changes; each change swaps in a fresh Event (no lost wakeups)."""

    def __init__(self) -> None:
        self._event = Event()

    def notify(self) -> None:
        event = self._event
        if event.linkcount():  # nobody waits: nothing to do (keeps the echo path cheap)
            self._event = Event()
            event.set()

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = monotonic() + timeout
        while True:
            event = self._event
            if predicate():
                return
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout:.3g}s waiting for {what}")
            event.wait(remaining)


class _LoopbackServer:
    """Shared life cycle: a StreamServer whose handlers live in one Group we can kill."""

    def __init__(self, host: str, port: int) -> None:
        self._host = unbracket(host)
        self._port = port
        self._server: Any = None
        self._group = Group()
        self._changes = _Changes()
        self._accepted = 0

    # -- life cycle ------------------------------------------------------------

    def _listen(self) -> None:
        server = StreamServer((self._host, self._port), self._handle, spawn=self._group.spawn)
        server.start()  # binds (SO_REUSEADDR is on): restart() can reuse the same port
        self._server = server
        self._port = int(server.server_port)

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _handle(self, sock: Any, peer: Any) -> None:
        raise NotImplementedError

    def _close_connections(self) -> None:
        raise NotImplementedError

    def start(self) -> Any:
        """Start listening (on ``port``, or a free one when 0); returns self."""
        if self._server is None:
            self._listen()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; kill all handler greenlets."""
        self._close_listener()
        self._close_connections()
        self._group.kill(block=True, timeout=_STOP_GRACE)
        gevent.sleep(0)  # let deferred socket closes (gevent cancels waiters first) run
        self._changes.notify()

    def restart(self) -> None:
        """``stop()``, then listen again on the same port."""
        self.stop()
        self._listen()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- introspection ---------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the real one once started with ``port=0``)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), ready for an lbpool config."""
        return format_address(self._host, self._port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def connections_accepted(self) -> int:
        """Connections accepted since construction (across restarts)."""
        return self._accepted

    @property
    def active(self) -> int:
        raise NotImplementedError

    def wait_accepted(self, count: int, timeout: float = 5.0) -> None:
        """Block (cooperatively) until ``connections_accepted >= count``."""
        self._changes.wait_until(
            lambda: self._accepted >= count, timeout, f"{count} accepted connections"
        )

    def wait_active(self, count: int, timeout: float = 5.0) -> None:
        """Block (cooperatively) until exactly ``count`` connections are open."""
        self._changes.wait_until(lambda: self.active == count, timeout, f"{count} open connections")


class EchoServer(_LoopbackServer):
    """A loopback TCP (optionally TLS) echo server for tests and the demo.

    Replies: every chunk received is echoed back, except that a chunk made only of
    ``PING\\r\\n`` commands is answered with one ``+PONG\\r\\n`` each. ``delay`` (seconds)
    is waited before each reply; ``greeting`` is sent on connect. ``mode`` (settable
    at run time; applies to new connections, and ``silent`` also to open ones):

    - ``"echo"``: the behaviour above;
    - ``"reset_on_accept"``: accept, then RST (SO_LINGER 0);
    - ``"close_on_accept"``: accept, then close (FIN);
    - ``"silent"``: accept and read, never answer.

    ``stop()`` closes the listener and every client connection (clients see EOF);
    ``restart()`` is stop + listen again on the same port ("server killed and back").
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay: float = 0.0,
        greeting: bytes | str | None = None,
        mode: EchoMode = "echo",
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(host, port)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self.mode: EchoMode = mode
        self.delay = delay
        self.greeting = greeting.encode() if isinstance(greeting, str) else greeting
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self._clients: set[Any] = set()
        self._received = 0

    def start(self) -> EchoServer:
        """Start listening; returns self (so ``server = EchoServer().start()`` works)."""
        super().start()
        return self

    def __enter__(self) -> EchoServer:
        return self.start()

    @property
    def active(self) -> int:
        """Client connections currently open."""
        return len(self._clients)

    @property
    def bytes_received(self) -> int:
        """Bytes read from all clients so far (TLS: raw handshake bytes not included)."""
        return self._received

    def wait_received(self, count: int, timeout: float = 5.0) -> None:
        """Block (cooperatively) until ``bytes_received >= count``."""
        self._changes.wait_until(
            lambda: self._received >= count, timeout, f"{count} bytes received"
        )

    def _close_connections(self) -> None:
        for sock in list(self._clients):
            _shutdown_close(sock)

    @staticmethod
    def _reply(data: bytes) -> bytes:
        count, rest = divmod(len(data), len(_PING))
        if count and not rest and data == _PING * count:
            return _PONG * count
        return data

    def _handle(self, sock: Any, peer: Any) -> None:
        self._accepted += 1
        conn = sock
        self._clients.add(conn)
        self._changes.notify()
        try:
            mode = self.mode
            if mode == "reset_on_accept":
                _reset(conn)
                return
            if mode == "close_on_accept":
                return
            if self.ssl_context is not None:
                # gevent's SSLSocket works with a plain ssl.SSLContext too, so users
                # need not build gevent contexts.
                wrapped = gssl.SSLSocket(
                    sock=conn,
                    server_side=True,
                    do_handshake_on_connect=False,
                    _context=self.ssl_context,
                )
                self._clients.discard(conn)
                conn = wrapped
                self._clients.add(conn)
                conn.settimeout(self.handshake_timeout)
                conn.do_handshake()
                conn.settimeout(None)
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                data = conn.recv(_CHUNK)
                if not data:
                    break
                self._received += len(data)
                self._changes.notify()
                if self.mode == "silent":
                    continue
                if self.delay > 0:
                    gevent.sleep(self.delay)
                conn.sendall(self._reply(data))
        except (OSError, ValueError) as exc:  # peer gone, stop() closed us, TLS refused
            _log.debug("echo server %s: connection from %s ended: %s", self.address, peer, exc)
        finally:
            self._clients.discard(conn)
            close_quietly(conn)
            self._changes.notify()


class _Link:
    """One proxied connection: the client side, the upstream side, a byte budget."""

    __slots__ = ("budget", "client", "closed", "upstream")

    def __init__(self, client: Any, budget: int | None) -> None:
        self.client = client
        self.upstream: Any = None
        self.budget = budget  # bytes still to deliver to the client; None: no limit
        self.closed = False

    def close(self, reset: bool = False) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                _reset(sock)
            else:
                _shutdown_close(sock)


class FaultProxy(_LoopbackServer):
    """A loopback TCP proxy in front of ``upstream`` that injects faults on command.

    Commands and what they apply to:

    - ``latency(seconds)``: delay every forwarded chunk, both directions (new and open);
    - ``blackhole()``: stall: new connections are accepted but never connected
      upstream; open ones stop forwarding (data is held, TCP backpressure does the rest);
    - ``reset_all()``: RST every open connection, on both sides, now;
    - ``reset_new(True)``: RST new connections right after accept (``False`` to undo);
    - ``close_after(n)``: close each connection (FIN, both sides) once it delivered
      ``n`` more bytes to its client (counted from accept for new ones, from the call
      for open ones): "the server died mid-reply"; ``None`` lifts it;
    - ``reset_every(n)``: RST the connection instead of forwarding every ``n``-th
      request (a chunk from a client, counted across connections): "a server that
      fails one request in n"; ``None`` lifts it;
    - ``refuse()``: close the listener, so connects are refused (open ones live on);
    - ``recover()``: undo all of the above (re-listen on the same port, release held data).

    If the upstream cannot be reached, the client connection is reset.
    """

    def __init__(
        self,
        upstream: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout: float = 2.0,
    ) -> None:
        super().__init__(host, port)
        self.upstream = upstream
        self._upstream = split_address(upstream)
        self.connect_timeout = connect_timeout
        self._links: set[_Link] = set()
        self._latency = 0.0
        self._flowing = Event()
        self._flowing.set()
        self._reset_new = False
        self._close_after: int | None = None
        self._reset_every: int | None = None
        self._requests = 0  # chunks from clients, counted for reset_every

    def start(self) -> FaultProxy:
        """Start listening; returns self."""
        super().start()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    @property
    def active(self) -> int:
        """Proxied connections currently open."""
        return sum(1 for link in self._links if not link.closed)

    def _close_connections(self) -> None:
        for link in list(self._links):
            link.close()

    # -- fault commands --------------------------------------------------------

    def latency(self, seconds: float) -> None:
        """Delay each forwarded chunk by ``seconds`` (0 turns it off)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = seconds

    def blackhole(self) -> None:
        """Stop forwarding anything, on new and open connections, until ``recover()``."""
        self._flowing.clear()

    def reset_all(self) -> None:
        """Send an RST on every open proxied connection (client and upstream side)."""
        for link in list(self._links):
            link.close(reset=True)
        self._changes.notify()

    def reset_new(self, enabled: bool = True) -> None:
        """RST new connections right after accept (while ``enabled``)."""
        self._reset_new = enabled

    def close_after(self, n_bytes: int | None) -> None:
        """Close each connection once it delivered ``n_bytes`` more bytes to its client."""
        if n_bytes is not None and n_bytes < 0:
            raise ValueError("close_after needs n_bytes >= 0 (or None)")
        self._close_after = n_bytes
        for link in list(self._links):
            link.budget = n_bytes
            if n_bytes == 0:
                link.close()
        self._changes.notify()

    def reset_every(self, n: int | None) -> None:
        """RST the connection instead of forwarding every ``n``-th chunk a client sends
        (counted across connections, from this call); ``None`` lifts it."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError("reset_every needs an int n >= 1 (or None)")
        self._reset_every = n
        self._requests = 0

    def refuse(self) -> None:
        """Close the listener: new connects are refused until ``recover()``."""
        self._close_listener()

    def recover(self) -> None:
        """Back to clean forwarding: clear every fault, listen again if refusing."""
        self._latency = 0.0
        self._reset_new = False
        self._close_after = None
        self._reset_every = None
        for link in list(self._links):
            link.budget = None
        self._flowing.set()
        if self._server is None:
            self._listen()

    # -- forwarding ------------------------------------------------------------

    def _connect_upstream(self) -> Any:
        host, port = self._upstream
        sock = None
        try:
            info = resolve(host, port)[0]
            sock = gsocket.socket(info[0], info[1], info[2])
            sock.settimeout(self.connect_timeout)
            sock.connect(info[4])
            sock.settimeout(None)
        except BaseException:
            if sock is not None:
                close_quietly(sock)
            raise
        return sock

    def _handle(self, client: Any, peer: Any) -> None:
        self._accepted += 1
        link = _Link(client, self._close_after)
        self._links.add(link)
        self._changes.notify()
        try:
            if self._reset_new:
                link.close(reset=True)
                return
            if link.budget == 0:
                return
            self._flowing.wait()  # a black hole: accepted, never connected upstream
            if link.closed:
                return
            try:
                link.upstream = self._connect_upstream()
            except OSError as exc:
                _log.debug("fault proxy %s: upstream %s: %s", self.address, self.upstream, exc)
                link.close(reset=True)
                return
            if link.closed:  # reset/stopped while we were connecting
                link.close()
                return
            downstream = self._group.spawn(self._pump, link, link.upstream, client, True)
            self._pump(link, client, link.upstream, False)
            downstream.join()
        finally:
            link.close()
            self._links.discard(link)
            self._changes.notify()

    def _pump(self, link: _Link, src: Any, dst: Any, to_client: bool) -> None:
        """Copy src -> dst chunk by chunk, applying the current faults to each chunk."""
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    with contextlib.suppress(OSError, ValueError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                self._flowing.wait()
                every = self._reset_every
                if every is not None and not to_client:
                    self._requests += 1
                    if self._requests % every == 0:
                        link.close(reset=True)
                        return
                if self._latency > 0:
                    gevent.sleep(self._latency)
                budget = link.budget if to_client else None
                if budget is not None and len(data) >= budget:
                    link.budget = 0
                    if budget:
                        dst.sendall(data[:budget])
                    link.close()
                    return
                if budget is not None:
                    link.budget = budget - len(data)
                dst.sendall(data)
        except (OSError, ValueError) as exc:
            link.close(reset=isinstance(exc, ConnectionResetError))  # pass an RST on as one
