"""``run_queue_wait()``: how long this thread has waited for a CPU, runnable but not
running (Linux's ``/proc/thread-self/schedstat``, its second field, in seconds).

A test that bounds a wall-clock gap (to catch code that blocks the hub in a system
call, which CPU time would not show) subtracts the wait that fell in the gap: with CPU
hogs or another test process on the same cores, the scheduler can leave a runnable
thread off the CPU for tens of milliseconds, and that is not lbpool holding the hub.
Where the file is absent (not Linux, or a kernel without scheduler statistics), it
reads 0.0: nothing is subtracted.
"""

from __future__ import annotations

_PATH = "/proc/thread-self/schedstat"


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable and waiting for a CPU, since it started
    (0.0 where the kernel does not say)."""
    try:
        with open(_PATH) as f:
            fields = f.read().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0
