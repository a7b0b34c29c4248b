"""Deterministic cost of the bench's scenarios A and B, counted in CPU instructions.

Run under valgrind's callgrind at two operation counts and difference the totals, so
start-up, imports and the server cancel out, leaving instructions per operation::

    for n in 20000 40000; do
      valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.A.floor.$n \\
        python docs/callgrind_hotpath.py A floor $n
    done
    # (total at 40000 - total at 20000) / 20000 = instructions per acquire+release

Scenarios (the bench's adapters, ``lbpool.cli.bench.peers``):

- ``A kind N``: one greenlet, ``N`` uncontended ``release(acquire())`` cycles, called
  as the bench's scenario A calls them (``manager.get("bench")`` directly, no closure);
- ``B kind N``: 500 greenlets over 10 connections, each ``N`` times ``acquire``,
  ``gevent.sleep(0)``, ``release`` (operations = 500 x N);
- ``C kind N``: 50 greenlets over 10 connections, each ``N`` times ``acquire``, a
  64-byte ``sendall`` and its echo read back (``recv``) through what the adapter's
  ``io`` gives, ``release`` (requests = 50 x N), against an in-process
  ``lbpool.testing.EchoServer`` (the bench's scenario C, untimed).

``kind``: ``floor`` (the FIFO-handoff deque floor), ``lbpool.Pool``, ``manager.get``.
Set ``LBPOOL_PURE_PYTHON=1`` to count the pure-Python path of an install whose hot
path is compiled. Prints the hot path it ran on stderr.
"""

from __future__ import annotations

import sys

import gevent

from lbpool.cli.bench import peers
from lbpool.testing import EchoServer, hot_path


def main() -> None:
    scenario, kind, per = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(f"{scenario} {kind} x{per}: hot path {hot_path()}", file=sys.stderr)
    server = EchoServer()
    server.start()
    try:
        with peers.make_adapter(kind, server.address, 10, 5.0) as adapter:
            acquire, release = adapter.call(), adapter.release
            held = [acquire() for _ in range(10)]  # every connection dialed first
            for lease in held:
                release(lease)
            get, arg = adapter.acquire, adapter.arg  # called as the bench calls them:
            if scenario == "A":  # as _loop0/_loop1, no closure in between
                if arg is None:
                    for _ in range(per):
                        release(get())
                else:
                    for _ in range(per):
                        release(get(arg))
            elif scenario == "B":
                sleep = gevent.sleep

                def worker() -> None:
                    for _ in range(per):  # as the bench's b_worker
                        lease = get() if arg is None else get(arg)
                        sleep(0)
                        release(lease)

                gevent.joinall([gevent.spawn(worker) for _ in range(500)])
            elif scenario == "C":
                io_of, payload = adapter.io, b"e" * 64

                def client() -> None:
                    for _ in range(per):  # as the bench's c_worker
                        lease = get() if arg is None else get(arg)
                        s = io_of(lease)
                        s.sendall(payload)
                        got = s.recv(64)
                        while len(got) < 64:
                            more = s.recv(64 - len(got))
                            if not more:
                                raise ConnectionError("the echo server closed")
                            got += more
                        release(lease)

                gevent.joinall([gevent.spawn(client) for _ in range(50)])
            else:
                raise SystemExit(f"unknown scenario {scenario!r} (A, B or C)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
