"""RESHAPE and PAD: data movement only, no arithmetic on values."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..grad import Error
from .common import output, tensor, where
from .contract import Backward, Kernel, MemoryQuery


@dataclass(frozen=True)
class ReshapeParams:
    out_shape: tuple  # without the batch axis


def prepare_reshape(op, model) -> ReshapeParams:
    x = tensor(model, op, 0)
    out = output(model, op, dtype=x.dtype)
    if x.quant != out.quant:
        raise ModelError(f"{where(op)}: input and output must share quantization")
    if int(np.prod(x.shape)) != int(np.prod(out.shape)) or x.shape[:1] != out.shape[:1]:
        raise ModelError(f"{where(op)}: cannot reshape {list(x.shape)} to {list(out.shape)} "
                         "keeping the batch axis")
    return ReshapeParams(tuple(out.shape[1:]))


def forward_reshape(p: ReshapeParams, x: np.ndarray, *_shape) -> np.ndarray:
    return x.reshape((x.shape[0],) + p.out_shape)


@dataclass(frozen=True)
class PadParams:
    pads: tuple  # ((before, after), ...) per axis, batch axis included
    value: int


def prepare_pad(op, model) -> PadParams:
    x = tensor(model, op, 0, dtype=np.int8)
    paddings = tensor(model, op, 1, constant=True)
    out = output(model, op)
    pads = np.asarray(paddings.data).astype(np.int64).reshape(-1, 2)
    if pads.shape[0] != len(x.shape) or np.any(pads < 0):
        raise ModelError(f"{where(op)}: paddings {pads.tolist()} do not fit rank {len(x.shape)}")
    if pads[0].any():
        raise ModelError(f"{where(op)}: padding the batch axis is not supported")
    if x.quant != out.quant:
        raise ModelError(f"{where(op)}: input and output must share quantization")
    shape = tuple(int(s + a + b) for s, (a, b) in zip(x.shape, pads))
    if shape[1:] != tuple(out.shape[1:]):
        raise ModelError(f"{where(op)}: output {list(out.shape)} != padded shape {list(shape)}")
    # The pad value of a quantized PAD is the output zero point: real 0.0.
    return PadParams(tuple(map(tuple, pads.tolist())), out.quant.zp)


def forward_pad(p: PadParams, x: np.ndarray, *_paddings) -> np.ndarray:
    return np.pad(x, p.pads, mode="constant", constant_values=p.value)


# --- backward (no arithmetic either) -------------------------------------------------------------

def backward_reshape(p: ReshapeParams, ctx: Backward) -> list:
    if not ctx.wants[0]:
        return [None] * len(ctx.op.inputs)
    err = ctx.errors[0]
    return [Error(err.values.reshape(ctx.inputs[0].shape), err.scale)] + [None] * (len(ctx.op.inputs) - 1)


def backward_pad(p: PadParams, ctx: Backward) -> list:
    if not ctx.wants[0]:
        return [None, None]
    err, x = ctx.errors[0], ctx.inputs[0]
    index = tuple(slice(a, a + s) for (a, _), s in zip(p.pads[1:], x.shape[1:]))
    return [Error(np.ascontiguousarray(err.values[(slice(None),) + index]), err.scale), None]


def view_bytes(op, model, q: MemoryQuery) -> int:
    return 2 * q.elems(op.outputs[0])  # the input error is a view of the output error


KERNELS = {
    "RESHAPE": Kernel(prepare_reshape, forward_reshape, backward_reshape, backward_bytes=view_bytes,
                      output_quant="input"),
    "PAD": Kernel(prepare_pad, forward_pad, backward_pad, output_quant="input"),
}
