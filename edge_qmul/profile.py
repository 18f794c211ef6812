"""Latency and memory measurement: wall time and real peak bytes per phase.

tracemalloc sees numpy's and numba's array allocations (both go through Python's allocator hooks),
so the peak it reports is what the arrays of a phase really took, not an estimate.
"""
from __future__ import annotations

import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PhaseStats:
    wall_s: float = 0.0
    peak_bytes: int = 0  # above what was allocated when the phase began
    calls: int = 0


@dataclass
class Profiler:
    """Collects wall time and tracemalloc peak per named phase; ``peak_bytes`` over everything."""

    phases: dict[str, PhaseStats] = field(default_factory=dict)
    peak_bytes: int = 0
    _base: int = 0
    _owns_tracing: bool = False

    def __enter__(self) -> "Profiler":
        self._owns_tracing = not tracemalloc.is_tracing()
        if self._owns_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = max(self.peak_bytes, tracemalloc.get_traced_memory()[1] - self._base)
        if self._owns_tracing:
            tracemalloc.stop()

    @contextmanager
    def phase(self, name: str):
        """Time a phase; its peak is measured relative to the memory in use when it started."""
        tracing = tracemalloc.is_tracing()
        if tracing:
            self.peak_bytes = max(self.peak_bytes, tracemalloc.get_traced_memory()[1] - self._base)
            tracemalloc.reset_peak()
            start_mem = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            st = self.phases.setdefault(name, PhaseStats())
            st.wall_s += dt
            st.calls += 1
            if tracing:
                cur, peak = tracemalloc.get_traced_memory()
                st.peak_bytes = max(st.peak_bytes, peak - start_mem)
                self.peak_bytes = max(self.peak_bytes, peak - self._base)

    def report(self) -> dict:
        return {"peak_bytes": self.peak_bytes,
                "phases": {k: {"wall_s": v.wall_s, "peak_bytes": v.peak_bytes, "calls": v.calls}
                           for k, v in self.phases.items()}}


@contextmanager
def _nothing(name: str):
    yield


def phase_or_nothing(profiler: Profiler | None, name: str):
    return profiler.phase(name) if profiler is not None else _nothing(name)
