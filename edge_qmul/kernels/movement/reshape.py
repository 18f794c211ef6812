"""EXPAND_DIMS, SQUEEZE and TRANSPOSE: the same values in another shape or axis order. Reshapes keep
the batch axis first; TRANSPOSE may move it (kernels/movement's docstring says who may read it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ModelError
from ...grad import Error
from ..common import where
from .checks import (axis_index, batch_axis, check_batch_move, check_shape, const_ints, data_tensor,
                     not_batch, same_quant, wanted)


# --- EXPAND_DIMS, SQUEEZE: reshapes that keep the batch axis first --------------------------------

@dataclass(frozen=True)
class ReshapeParams:
    out_shape: tuple  # without the batch axis
    in_shape: tuple   # without the batch axis


def prepare_expand_dims(op, model) -> ReshapeParams:
    x = data_tensor(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, x, out, "output")
    (axis,) = const_ints(model, op, 1, "axis", 1)
    rank = len(x.shape)
    a = axis_index(op, axis, rank + 1)
    not_batch(op, a, "new axis")
    shape = list(x.shape)
    shape.insert(a, 1)
    check_shape(op, out, shape)
    return ReshapeParams(tuple(out.shape[1:]), tuple(x.shape[1:]))


def prepare_squeeze(op, model) -> ReshapeParams:
    x = data_tensor(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, x, out, "output")
    rank = len(x.shape)
    dims = [int(d) for d in op.options.get("squeeze_dims", [])]
    # No squeeze_dims: every size-1 axis, the batch axis of a batch-1 file included.
    axes = {axis_index(op, d, rank, "squeeze dim") for d in dims} if dims else \
        {i for i, s in enumerate(x.shape) if s == 1}
    for a in sorted(axes):
        not_batch(op, a, "squeeze dim")
        if x.shape[a] != 1:
            raise ModelError(f"{where(op)}: cannot squeeze axis {a} of size {x.shape[a]}")
    check_shape(op, out, [s for i, s in enumerate(x.shape) if i not in axes])
    return ReshapeParams(tuple(out.shape[1:]), tuple(x.shape[1:]))


def forward_reshape(p: ReshapeParams, x: np.ndarray, *_axis) -> np.ndarray:
    return np.ascontiguousarray(x).reshape((x.shape[0],) + p.out_shape)


def backward_reshape(p: ReshapeParams, ctx) -> list:
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is not None and wanted(ctx, 0):
        grads[0] = Error(e.values.reshape((e.values.shape[0],) + p.in_shape), e.scale)
    return grads


# --- TRANSPOSE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransposeParams:
    perm: tuple
    inverse: tuple


def prepare_transpose(op, model) -> TransposeParams:
    x = data_tensor(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, x, out, "output")
    rank = len(x.shape)
    if not 1 <= rank <= 6:
        raise ModelError(f"{where(op)}: rank {rank} (LiteRT transposes 1 to 6 axes)")
    raw = const_ints(model, op, 1, "perm", rank)
    perm = tuple(axis_index(op, p, rank, "perm entry") for p in raw)
    if sorted(perm) != list(range(rank)):
        raise ModelError(f"{where(op)}: perm {raw} is not a permutation of {rank} axes")
    check_shape(op, out, [x.shape[p] for p in perm])
    b = batch_axis(model, op.inputs[0])
    check_batch_move(op, model, None if b is None else perm.index(b))
    return TransposeParams(perm, tuple(int(i) for i in np.argsort(perm)))


def forward_transpose(p: TransposeParams, x: np.ndarray, *_perm) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(p.perm))


def backward_transpose(p: TransposeParams, ctx) -> list:
    e = ctx.error(0)
    if e is None or not wanted(ctx, 0):
        return [None, None]
    return [Error(np.ascontiguousarray(e.values.transpose(p.inverse)), e.scale), None]
