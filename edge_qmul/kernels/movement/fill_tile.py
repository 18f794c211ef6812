"""FILL and TILE: values repeated. FILL's output is the file's batch-1 shape whatever the input (the
ops reading it broadcast it over the batch); TILE's backward sums the error over the copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ModelError
from ...grad import Error, from_accumulator
from ..common import where
from ..contract import error_bytes
from .checks import check_shape, const_ints, data_tensor, same_quant, wanted


# --- FILL ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FillParams:
    shape: tuple  # the file's shape, batch 1 included
    value: np.ndarray  # 0-d, the value's dtype


def prepare_fill(op, model) -> FillParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes dims and value ({len(op.inputs)} inputs)")
    if len(model.tensors[op.inputs[0]].shape) != 1:
        raise ModelError(f"{where(op)}: dims must be a vector")
    dims = const_ints(model, op, 0, "dims")
    if any(d < 0 for d in dims):
        raise ModelError(f"{where(op)}: dims {dims} must be >= 0")
    v = data_tensor(model, op, op.inputs[1], "value")
    if not v.is_constant or len(v.shape) != 0:
        raise ModelError(f"{where(op)}: the value {v.name!r} must be a constant scalar")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, v, out, "output")
    check_shape(op, out, dims)
    return FillParams(tuple(dims), np.asarray(v.data, dtype=v.dtype).reshape(()))


def forward_fill(p: FillParams, *_inputs) -> np.ndarray:
    # The same for every sample: the file's batch-1 shape, which readers broadcast over the batch.
    return np.full(p.shape, p.value, dtype=p.value.dtype)


def backward_none(p, ctx) -> list:
    """Constant inputs only (FILL): no error to pass on."""
    return [None] * len(ctx.op.inputs)


# --- TILE ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileParams:
    reps: tuple       # multiples, batch axis included (1 there)
    in_shape: tuple   # without the batch axis


def prepare_tile(op, model) -> TileParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes input and multiples ({len(op.inputs)} inputs)")
    x = data_tensor(model, op, op.inputs[0], "input 0")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, x, out, "output")
    reps = const_ints(model, op, 1, "multiples", len(x.shape))
    if any(r < 0 for r in reps):
        raise ModelError(f"{where(op)}: multiples {reps} must be >= 0")
    if not reps or reps[0] != 1:
        raise ModelError(f"{where(op)}: multiples {reps} must be 1 on the batch axis")
    check_shape(op, out, [s * r for s, r in zip(x.shape, reps)])
    return TileParams(tuple(reps), tuple(x.shape[1:]))


def forward_tile(p: TileParams, x: np.ndarray, *_multiples) -> np.ndarray:
    return np.ascontiguousarray(np.tile(x, p.reps))


def backward_tile(p: TileParams, ctx) -> list:
    """Every input element was copied to each tile: its error is the sum over the tiles (int64,
    then rounded back to int16 with the shift joining the scale)."""
    e = ctx.error(0)
    if e is None or not wanted(ctx, 0):
        return [None, None]
    if all(r == 1 for r in p.reps):
        return [Error(e.values, e.scale), None]
    n = e.values.shape[0]
    split = [n]
    for r, s in zip(p.reps[1:], p.in_shape):
        split += [r, s]
    acc = e.values.reshape(split).sum(axis=tuple(range(1, len(split), 2)), dtype=np.int64)
    if acc.size == 0:
        return [Error(np.zeros((n,) + p.in_shape, np.int16), e.scale), None]
    return [from_accumulator(acc, e.scale), None]


def tile_backward_bytes(op, model, q) -> int:
    """The default errors plus the int64 sum over the tiles."""
    return error_bytes(op, model, q) + 8 * q.elems(op.inputs[0])
