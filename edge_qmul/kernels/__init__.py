"""The int8 kernels, one module per op family, and the table that maps op names to them.

Each entry: ``prepare(op, model) -> params`` (plain Python: checks, multipliers, geometry), then
``forward(params, *inputs) -> output`` (compiled integer loops), and ``macs(op, model)``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ..errors import ModelError
from . import add, conv, depthwise, fully_connected, mean, pool, quantize, shape, softmax


class Kernel(NamedTuple):
    prepare: Callable
    forward: Callable
    macs: Callable


def _no_macs(op, model) -> int:
    return 0


KERNELS: dict[str, Kernel] = {
    "CONV_2D": Kernel(conv.prepare, conv.forward, conv.macs),
    "DEPTHWISE_CONV_2D": Kernel(depthwise.prepare, depthwise.forward, depthwise.macs),
    "FULLY_CONNECTED": Kernel(fully_connected.prepare, fully_connected.forward, fully_connected.macs),
    "ADD": Kernel(add.prepare, add.forward, add.macs),
    "AVERAGE_POOL_2D": Kernel(pool.prepare, pool.forward_average, pool.macs),
    "MAX_POOL_2D": Kernel(pool.prepare, pool.forward_max, pool.macs),
    "MEAN": Kernel(mean.prepare, mean.forward, mean.macs),
    "PAD": Kernel(shape.prepare_pad, shape.forward_pad, _no_macs),
    "RESHAPE": Kernel(shape.prepare_reshape, shape.forward_reshape, _no_macs),
    "SOFTMAX": Kernel(softmax.prepare, softmax.forward, softmax.macs),
    "QUANTIZE": Kernel(quantize.prepare_quantize, quantize.forward_quantize, _no_macs),
    "DEQUANTIZE": Kernel(quantize.prepare_dequantize, quantize.forward_dequantize, _no_macs),
}

SUPPORTED_OPS = tuple(KERNELS)


def check_supported(model) -> None:
    """Raise ModelError naming the first op outside the supported set, or one that fails to prepare."""
    for op in model.ops:
        if op.kind not in KERNELS:
            raise ModelError(f"unsupported op {op.kind} at index {op.index}; "
                             f"supported: {', '.join(SUPPORTED_OPS)}")
    model._prepared = [prepare(op, model) for op in model.ops]


def prepare(op, model):
    try:
        return KERNELS[op.kind].prepare(op, model)
    except ModelError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"op {op.kind} (index {op.index}): malformed ({type(e).__name__}: {e})") from None


def evaluate(op, params, args: list) -> np.ndarray:
    return KERNELS[op.kind].forward(params, *args)


def macs(op, model) -> int:
    return KERNELS[op.kind].macs(op, model)
