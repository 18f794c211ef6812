"""Serial twins of parallel kernels: the same source compiled without ``parallel=True``.

A parallel region costs 1-4 us to open and close (measured: an empty prange at 1 thread 1.4 us,
at 2 threads 3.8 us), more than a small layer's whole work at batch 1, and numba opens one even
with one thread. A compiled plan therefore calls a twin of each kernel for small work: the kernel's
own Python function, recompiled with ``prange`` meaning ``range``. The twin's globals name the twins
of the parallel kernels it calls, so nothing under it opens a region either. One source, two
compilations: the twin cannot drift from the kernel.
"""
from __future__ import annotations

import types

from numba import njit
from numba.core.registry import CPUDispatcher

_TWINS: dict[int, CPUDispatcher] = {}


def _calls_parallel(dispatcher: CPUDispatcher, seen: set[int]) -> bool:
    """Whether the kernel is parallel or calls (through globals) one that is."""
    if id(dispatcher) in seen:
        return False
    seen.add(id(dispatcher))
    if dispatcher.targetoptions.get("parallel"):
        return True
    g = dispatcher.py_func.__globals__
    return any(isinstance(g.get(name), CPUDispatcher) and _calls_parallel(g[name], seen)
               for name in _names(dispatcher.py_func.__code__))


def _names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the code of functions nested in it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def serial(dispatcher: CPUDispatcher) -> CPUDispatcher:
    """The serial twin of a numba kernel (the kernel itself when nothing under it is parallel).

    The twin is cached on disk like the kernel (``cache=True``) under its own name,
    ``<qualname>__serial``, so the two compilations never share a cache entry."""
    twin = _TWINS.get(id(dispatcher))
    if twin is not None:
        return twin
    if not _calls_parallel(dispatcher, set()):
        _TWINS[id(dispatcher)] = dispatcher
        return dispatcher
    py = dispatcher.py_func
    g = dict(py.__globals__)
    for name in _names(py.__code__):
        value = g.get(name)
        if isinstance(value, CPUDispatcher):
            g[name] = serial(value)
    fn = types.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__)
    fn.__qualname__ = py.__qualname__ + "__serial"
    fn.__module__ = py.__module__
    fn.__doc__ = py.__doc__
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("parallel", "nopython")}
    twin = njit(cache=True, **options)(fn)
    _TWINS[id(dispatcher)] = twin
    return twin
