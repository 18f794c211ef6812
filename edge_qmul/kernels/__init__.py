"""The int8 kernels, one module per op family, and the registry that maps op names to them.

Each module ends with ``KERNELS = {op name: Kernel(...)}``: prepare, forward, backward, clamp,
macs, backward_bytes, parameter slots and calibration rule (the contract is kernels/contract.py).
The graph, the trainer, calibration and the memory report read this registry only.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections import Counter

import numba
import numba.core.errors
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel  # to start numba's threads (serialized())

from .. import threads as _threads
from ..errors import ModelError
from . import (activation, add, binary, conv, depthwise, fully_connected, lstm, mean, movement, pool,
               quantize, resize, shape, softmax)
from .contract import Backward, Kernel, MemoryQuery

_MODULES = (conv, depthwise, fully_connected, add, binary, activation, pool, mean, shape, movement,
            resize, softmax, quantize, lstm)
# the ops whose weights are a filter or a matrix (calibration's per-channel weights, the plan's size)
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")

# numba's workqueue threading layer, which numba falls back to without OpenMP or TBB (a board
# without libgomp1), aborts the whole process ("Concurrent access has been detected") when two
# Python threads launch parallel regions at once, as the agent's job worker and request thread
# can. Under it, every op's forward and backward run one at a time; under OpenMP or TBB they do not
# wait. EDGE_QMUL_KERNEL_LOCK=off turns the lock off (only to show that it is needed).
_KERNEL_LOCK = threading.RLock()
_serialize: bool | None = None


def serialized() -> bool:
    """Whether kernels run one at a time: numba's threading layer is workqueue (launched here)."""
    global _serialize
    if _serialize is None:
        _numba_parallel._launch_threads()
        _serialize = (numba.threading_layer() == "workqueue"
                      and os.environ.get("EDGE_QMUL_KERNEL_LOCK", "on") != "off")
    return _serialize


def _one_at_a_time_if_needed(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        _threads.update()  # threads from the load (edge_qmul/threads.py)
        if _serialize is False or not serialized():  # one global read once the layer is known
            return fn(*args, **kwargs)
        with _KERNEL_LOCK:
            return fn(*args, **kwargs)
    return call


KERNELS: dict[str, Kernel] = {}
for _m in _MODULES:
    for _name, _k in _m.KERNELS.items():
        if _name in KERNELS:
            raise RuntimeError(f"op {_name} registered twice (kernels.{_m.__name__})")
        KERNELS[_name] = dataclasses.replace(_k, forward=_one_at_a_time_if_needed(_k.forward),
                                             backward=_one_at_a_time_if_needed(_k.backward))

SUPPORTED_OPS = tuple(sorted(KERNELS))


def unsupported_ops(model) -> Counter:
    """Op name -> how many ops of the model the engine has no kernel for."""
    return Counter(op.kind for op in model.ops if op.kind not in KERNELS)


def check_supported(model) -> None:
    """Raise ModelError listing every unsupported op with its count; then prepare every op
    (ModelError naming the first op that fails to prepare)."""
    missing = unsupported_ops(model)
    if missing:
        where = {k: [op.index for op in model.ops if op.kind == k] for k in missing}
        listed = ", ".join(f"{k} x{n} (at index {', '.join(map(str, where[k][:8]))}"
                           f"{', ...' if n > 8 else ''})" for k, n in sorted(missing.items()))
        e = ModelError(f"unsupported ops: {listed} ({sum(missing.values())} of {len(model.ops)} ops); "
                       f"supported: {', '.join(SUPPORTED_OPS)}")
        e.unsupported = where
        raise e
    model._prepared = [prepare(op, model) for op in model.ops]


def prepare(op, model):
    try:
        return KERNELS[op.kind].prepare(op, model)
    except ModelError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError, MemoryError) as e:
        raise ModelError(f"op {op.kind} (index {op.index}): malformed ({type(e).__name__}: {e})") from None


def evaluate(op, params, args: list):
    """The op's output (one array) or outputs (a tuple, for ops with several).

    A malformed model can pass ``prepare`` with op inputs its kernel cannot take (another rank or
    dtype than the op's, an extra input or output, multipliers out of range, sizes beyond memory:
    found by fuzzing .tflite files); what the kernel then raises, or a result that does not match
    the op's outputs, is a ModelError naming the op.
    """
    try:
        result = KERNELS[op.kind].forward(params, *args)
    except ModelError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError,
            numba.core.errors.NumbaError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"op {op.kind} (index {op.index}): its tensors do not fit the op "
                         f"({type(e).__name__}: {first})") from None
    n = len(op.outputs)
    # one output: an array (or, from ops with any number of outputs such as SPLIT, a 1-tuple)
    if not ((isinstance(result, np.ndarray) and n == 1) or
            (isinstance(result, (tuple, list)) and len(result) == n)):
        made = len(result) if isinstance(result, (tuple, list)) else 1
        raise ModelError(f"op {op.kind} (index {op.index}) lists {n} outputs, but its kernel makes {made}")
    return result


def macs(op, model) -> int:
    return KERNELS[op.kind].macs(op, model)


def parameter_slots(kind: str) -> tuple:
    k = KERNELS.get(kind)
    return k.parameters if k is not None else ()


__all__ = ["Backward", "Kernel", "KERNELS", "MemoryQuery", "SUPPORTED_OPS", "check_supported", "evaluate",
           "macs", "parameter_slots", "prepare", "unsupported_ops"]
