"""The kernels' thread count, chosen from the load: one thread while other programs keep the CPUs busy.

numba's OpenMP layer (GNU libgomp) makes every thread wait at the end of each parallel region for
the others. When another process holds a core, a region waits for the scheduler to hand that core
back: benchmarks/contention.py measured a 2-thread digits forward at 124 ms beside one spinning
process against 32 us on one thread alone (3,860x), and the same cliff beside a second engine or
LiteRT. OMP_WAIT_POLICY=passive removes the cliff but made the engine 2.2-2.4x slower on an idle
machine; a thread count that follows the load costs nothing when the machine is idle.

Before a kernel runs (at most every ``PERIOD`` seconds) the CPU time other processes used since the
last look is read from /proc/stat (the machine's busy time minus this process's own); every CPU
they keep more than half busy is given up. The ceiling is the thread count numba was last told by
someone else (``numba.set_num_threads``, ``NUMBA_NUM_THREADS``, ``serve --threads``).
EDGE_QMUL_THREADS=fixed leaves the thread count alone. numba's thread count belongs to the calling
thread, so is this state.
"""
from __future__ import annotations

import math
import os
import threading
import time

import numba

PERIOD = 0.25  # seconds between looks at /proc/stat
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_state = threading.local()


def machine_busy_seconds() -> float | None:
    """CPU seconds every process has spent busy since boot (/proc/stat's first line), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks) - idle) / _HZ


class OtherBusy:
    """How many CPUs other processes (and the hypervisor, as steal) kept busy between ``start()``
    and ``value()``: the machine's busy CPU time minus this process's own, over the wall time
    (this process's spinning threads count as its own). NaN where /proc/stat cannot be read."""

    def start(self) -> "OtherBusy":
        self.s0, self.t0, self.p0 = machine_busy_seconds(), time.perf_counter(), time.process_time()
        return self

    def value(self) -> float:
        s1, wall = machine_busy_seconds(), time.perf_counter() - self.t0
        if self.s0 is None or s1 is None or wall <= 0:
            return float("nan")
        return max(0.0, (s1 - self.s0) - (time.process_time() - self.p0)) / wall


def threads_for(other_cpus: float, ceiling: int) -> int:
    """Threads to run beside other processes that keep ``other_cpus`` CPUs busy: one fewer per CPU
    they hold more than half, never fewer than one nor more than ``ceiling``."""
    return max(1, min(ceiling, ceiling - math.ceil(other_cpus - 0.5)))


def set_threads(n: int) -> None:
    """Set the calling thread's kernel threads and make ``n`` the ceiling the load rule works under.
    (A plain ``numba.set_num_threads`` is seen as a new ceiling too, except when it sets the very
    count the rule had chosen: the two cannot be told apart.)"""
    numba.set_num_threads(n)
    _state.__dict__.update(ceiling=n, chosen=n)


def update() -> None:
    """Follow the load (cheap when called often: one clock read between looks)."""
    now = time.monotonic()
    s = _state.__dict__
    if now < s.get("next", 0.0):
        return
    s["next"] = now + PERIOD
    if os.environ.get("EDGE_QMUL_THREADS", "auto") != "auto":
        return
    busy, own = machine_busy_seconds(), time.process_time()
    current = numba.get_num_threads()
    if current != s.get("chosen"):  # someone else set it since: that is the ceiling now
        s["ceiling"] = current
    last = s.get("last")
    s["last"] = (now, busy, own)
    if busy is None or last is None or now - last[0] <= 0:
        return
    other = max(0.0, (busy - last[1]) - (own - last[2])) / (now - last[0])
    chosen = threads_for(other, s["ceiling"])
    if chosen != current:
        numba.set_num_threads(chosen)
    s["chosen"] = chosen


__all__ = ["PERIOD", "OtherBusy", "machine_busy_seconds", "set_threads", "threads_for", "update"]
