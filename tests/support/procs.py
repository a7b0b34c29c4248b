"""Loopback servers that live in a process of their own.

A test that forks (gunicorn-style preload) must not keep its servers in the process it
forks: the child would carry a copy of every listener and of every accepted socket, and
could accept -- then close, on exit -- a connection the parent dialed meanwhile. A
``ProcessEchoServer`` runs ``lbpool.testing.EchoServer`` in a child interpreter, so
there is exactly one listener, owned by a process that never forks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import TracebackType

import gevent
from gevent.subprocess import PIPE, Popen

_SERVER = textwrap.dedent(
    """
    import sys, gevent
    from gevent.fileobject import FileObjectThread
    from lbpool.testing import EchoServer

    server = EchoServer(delay=float(sys.argv[1])).start()
    print(server.address, flush=True)
    # stop when the test closes our stdin (or dies): never outlive it
    FileObjectThread(sys.stdin.buffer).read()
    server.stop()
    """
)


class ProcessEchoServer:
    """An ``EchoServer`` on ``127.0.0.1:0`` in a child process (``delay``: seconds it
    waits before each reply); ``stop()`` ends it.

    The child exits by itself when its stdin closes, so a test process that dies takes
    its servers with it.
    """

    _script = _SERVER  # the child's program: prints its address, serves until stdin closes

    def __init__(self, start_timeout: float = 20.0, delay: float = 0.0) -> None:
        self._proc = Popen(
            [sys.executable, "-c", self._script, str(delay)],
            stdin=PIPE,
            stdout=PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            with gevent.Timeout(start_timeout, TimeoutError("server process did not start")):
                line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("server process exited before listening")
        except BaseException:
            self.stop()
            raise
        self.address = line.decode().strip()
        self.port = int(self.address.rsplit(":", 1)[1])

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc.returncode is not None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> ProcessEchoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_DNS_SERVER = textwrap.dedent(
    """
    import socket, sys, threading, time
    import dns.message, dns.rrset

    delay = float(sys.argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print("127.0.0.1:%d" % sock.getsockname()[1], flush=True)

    def answer(data, peer):
        time.sleep(delay)
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        if question.rdtype == 1:  # A: 127.0.0.1; AAAA: an empty answer
            reply.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", "127.0.0.1"))
        sock.sendto(reply.to_wire(), peer)

    def serve():
        while True:
            data, peer = sock.recvfrom(4096)
            threading.Thread(target=answer, args=(data, peer), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    sys.stdin.read()  # stop when the test closes our stdin (or dies)
    """
)


class ProcessDNSServer(ProcessEchoServer):
    """A UDP DNS server on ``127.0.0.1:0`` in a child process (dnspython): every A
    question is answered ``127.0.0.1`` (AAAA: empty) after ``delay`` seconds, each in a
    thread of its own. In a process of its own for the same reason as the echo server:
    a test that forks must not copy the server's socket into the child."""

    _script = _DNS_SERVER


def reap_child(pid: int) -> int | None:
    """``os.waitpid(pid, 0)``'s status of a forked child, or None when it was reaped
    already: once a test in this process used ``gevent.subprocess`` (servers in
    processes of their own do), gevent's SIGCHLD watcher reaps every child that exits,
    and a plain ``waitpid`` then fails with ``ECHILD``. Callers judge the child by what
    it reported (a pipe), and by the status when there is one."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def read_child_report(r: int, pid: int, timeout: float, size: int | None = None) -> bytes:
    """What a forked child wrote to the pipe ``r`` (its read end; closed here), read
    without blocking the hub until EOF or ``size`` bytes, bounded by ``timeout``; then
    the child is reaped (``reap_child``)."""
    import gevent.os

    gevent.os.make_nonblocking(r)
    data = b""
    try:
        with gevent.Timeout(timeout):
            while size is None or len(data) < size:
                chunk = gevent.os.nb_read(r, 65536 if size is None else size - len(data))
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
        reap_child(pid)
    return data
