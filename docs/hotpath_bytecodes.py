"""Bytecodes executed per uncontended ``Pool.acquire().release()`` cycle, per line.

A noise-free proxy for the hot path's Python cost (docs/benchmarks.md, issue #18):
``sys.settrace`` with opcode events over 1,000 cycles against a loopback echo server.
Run from the repository: ``PYTHONPATH=. python docs/hotpath_bytecodes.py``.
"""

from __future__ import annotations

import collections
import linecache
import sys
from types import FrameType
from typing import Any

import lbpool.pool
from lbpool.config import PoolConfig
from lbpool.pool import Pool
from lbpool.testing import EchoServer

CYCLES = 1000
HOT = ("acquire", "_return", "release", "__init__")


def main() -> None:
    server = EchoServer()
    server.start()
    pool = Pool(server.address, pool=PoolConfig(max_size=10, acquire_timeout=5))
    acquire = pool.acquire
    for _ in range(100):  # dialed and warm
        acquire().release()
    lines: collections.Counter[tuple[str, str, int]] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        if event == "opcode" and code.co_name in HOT:
            lines[(code.co_filename, code.co_name, frame.f_lineno)] += 1
        return tracer

    sys.settrace(tracer)
    for _ in range(CYCLES):
        acquire().release()
    sys.settrace(None)
    pool.close()
    server.stop()
    total = sum(lines.values()) / CYCLES
    print(f"{total:.0f} bytecodes per cycle ({lbpool.pool.__file__})")
    for (path, name, line), n in sorted(lines.items()):
        text = linecache.getline(path, line).strip()
        print(f"{n / CYCLES:5.1f}  {name:9s} {path.rsplit('/', 1)[-1]}:{line:<5d} {text}")


if __name__ == "__main__":
    main()
