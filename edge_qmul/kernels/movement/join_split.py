"""CONCATENATION, PACK, UNPACK, SPLIT and SPLIT_V: pieces joined along an axis or cut out of it.

The backward cuts the output error into the inputs' pieces (CONCATENATION, PACK), or joins the
outputs' errors back along the axis at the largest of their scales (UNPACK, SPLIT, SPLIT_V).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ModelError
from ...grad import Error
from ..common import where
from .checks import (axis_index, batch_axis, broadcast_batch, check_batch_move, check_shape, common_scale,
                     const_ints, data_tensor, input_batch, not_batch, same_quant, wanted, zeros_at)


# --- CONCATENATION -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConcatParams:
    axis: int
    sizes: tuple   # extent of each input along the axis
    batch: int     # the batch axis of the data inputs (0 unless all inputs are constants)


def prepare_concatenation(op, model) -> ConcatParams:
    if not op.inputs:
        raise ModelError(f"{where(op)}: no inputs")
    out = data_tensor(model, op, op.outputs[0], "output")
    xs = [data_tensor(model, op, t, f"input {i}") for i, t in enumerate(op.inputs)]
    if op.options.get("activation", "NONE") != "NONE":
        raise ModelError(f"{where(op)}: fused activation {op.options['activation']} "
                         "(LiteRT's CONCATENATION accepts NONE only)")
    for i, x in enumerate(xs):
        same_quant(op, out, x, f"input {i}")
    rank = len(xs[0].shape)
    if rank == 0:
        raise ModelError(f"{where(op)}: scalars cannot be concatenated along a batch")
    axis = axis_index(op, int(op.options.get("axis", 0)), rank)
    not_batch(op, axis)
    for i, x in enumerate(xs):
        if len(x.shape) != rank or any(a != b for d, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if d != axis):
            raise ModelError(f"{where(op)}: input {i} {list(x.shape)} does not fit input 0 "
                             f"{list(xs[0].shape)} outside axis {axis}")
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    check_shape(op, out, shape)
    b = input_batch(op, model, range(len(op.inputs)))
    if b not in (None, 0):
        raise ModelError(f"{where(op)}: an input holds the batch at axis {b}")
    return ConcatParams(axis, tuple(x.shape[axis] for x in xs), 0)


def forward_concatenation(p: ConcatParams, *xs) -> np.ndarray:
    return np.concatenate(broadcast_batch(list(xs), p.batch), axis=p.axis)


def backward_concatenation(p: ConcatParams, ctx) -> list:
    """Each input gets its slice of the error, at the error's scale (the copy has gradient 1)."""
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is None:
        return grads
    start = 0
    for i, size in enumerate(p.sizes):
        if wanted(ctx, i):
            index = [slice(None)] * e.values.ndim
            index[p.axis] = slice(start, start + size)
            grads[i] = Error(np.ascontiguousarray(e.values[tuple(index)]), e.scale)
        start += size
    return grads


# --- PACK, UNPACK --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackParams:
    axis: int
    batch: int | None  # batch axis of the inputs (None: all constant)


def prepare_pack(op, model) -> PackParams:
    out = data_tensor(model, op, op.outputs[0], "output")
    count = int(op.options.get("values_count", len(op.inputs)))
    if count != len(op.inputs) or count < 1:
        raise ModelError(f"{where(op)}: values_count {count} but {len(op.inputs)} inputs")
    xs = [data_tensor(model, op, t, f"input {i}") for i, t in enumerate(op.inputs)]
    for i, x in enumerate(xs):
        same_quant(op, out, x, f"input {i}")
        if tuple(x.shape) != tuple(xs[0].shape):
            raise ModelError(f"{where(op)}: input {i} {list(x.shape)} != input 0 {list(xs[0].shape)}")
    rank = len(xs[0].shape)
    axis = axis_index(op, int(op.options.get("axis", 0)), rank + 1)
    shape = list(xs[0].shape)
    shape.insert(axis, count)
    check_shape(op, out, shape)
    b = input_batch(op, model, range(count))  # None: all constants, the output is one too
    check_batch_move(op, model, None if b is None else b + (axis <= b))
    return PackParams(axis, b)


def forward_pack(p: PackParams, *xs) -> np.ndarray:
    xs = list(xs)
    if p.batch is not None:
        xs = broadcast_batch(xs, p.batch)
    return np.stack(xs, axis=p.axis)


def backward_pack(p: PackParams, ctx) -> list:
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is None:
        return grads
    for i in range(len(grads)):
        if wanted(ctx, i):
            grads[i] = Error(np.ascontiguousarray(np.take(e.values, i, axis=p.axis)), e.scale)
    return grads


@dataclass(frozen=True)
class UnpackParams:
    axis: int
    num: int
    batch: int  # batch axis of the input (outputs: batch - (axis < batch))


def prepare_unpack(op, model) -> UnpackParams:
    x = data_tensor(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    rank = len(x.shape)
    axis = axis_index(op, int(op.options.get("axis", 0)), rank)
    num = int(op.options.get("num", x.shape[axis]))
    if num != x.shape[axis] or num != len(op.outputs):
        raise ModelError(f"{where(op)}: num {num}, axis {axis} of size {x.shape[axis]}, "
                         f"{len(op.outputs)} outputs")
    b = batch_axis(model, op.inputs[0])
    b = 0 if b is None else b
    if axis == b:
        raise ModelError(f"{where(op)}: unpacks the batch axis {b}")
    shape = [s for i, s in enumerate(x.shape) if i != axis]
    for t in op.outputs:
        out = data_tensor(model, op, t, "output")
        same_quant(op, x, out, "output")
        check_shape(op, out, shape)
    for t in op.outputs:
        check_batch_move(op, model, b - (axis < b), t)
    return UnpackParams(axis, num, b)


def forward_unpack(p: UnpackParams, x: np.ndarray) -> tuple:
    return tuple(np.ascontiguousarray(np.take(x, i, axis=p.axis)) for i in range(p.num))


def _joined(ctx, axis: int, batch: int, stack: bool) -> Error | None:
    """The output errors stacked (UNPACK) or concatenated (SPLIT) along ``axis``, zeros where no
    error reached an output, at the largest of their scales; ``batch``: the outputs' batch axis."""
    errs = [ctx.error(k) for k in range(len(ctx.op.outputs))]
    present = [e for e in errs if e is not None]
    if not present:
        return None
    n = present[0].values.shape[batch]
    values = iter(common_scale(present)[0])
    parts = [next(values) if e is not None else zeros_at(ctx.model, ctx.op.outputs[k], n, batch)
             for k, e in enumerate(errs)]
    joined = np.stack(parts, axis=axis) if stack else np.concatenate(parts, axis=axis)
    return Error(joined, max(e.scale for e in present))


def backward_unpack(p: UnpackParams, ctx) -> list:
    """The output errors stacked back along the unpacked axis."""
    if not wanted(ctx, 0):
        return [None]
    return [_joined(ctx, p.axis, p.batch - (p.axis < p.batch), stack=True)]


# --- SPLIT, SPLIT_V ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitParams:
    axis: int
    bounds: tuple  # (start, stop) of each output along the axis
    data: int      # the data input's slot (SPLIT: 1, SPLIT_V: 0)


def _split_outputs(op, model, x, axis: int, sizes: list[int]) -> None:
    if len(op.outputs) != len(sizes):
        raise ModelError(f"{where(op)}: {len(op.outputs)} outputs for {len(sizes)} splits")
    for t, size in zip(op.outputs, sizes):
        out = data_tensor(model, op, t, "output")
        same_quant(op, x, out, "output")
        shape = list(x.shape)
        shape[axis] = size
        check_shape(op, out, shape)
    if batch_axis(model, op.inputs[_data_slot(op)]) not in (None, 0):
        raise ModelError(f"{where(op)}: its input holds the batch away from axis 0")


def _data_slot(op) -> int:
    return 1 if op.kind == "SPLIT" else 0


def _bounds(sizes) -> tuple:
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return tuple(zip(edges[:-1], edges[1:]))


def prepare_split(op, model) -> SplitParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes axis and input ({len(op.inputs)} inputs)")
    x = data_tensor(model, op, op.inputs[1], "input 1")
    (axis,) = const_ints(model, op, 0, "axis", 1)
    axis = axis_index(op, axis, len(x.shape))
    not_batch(op, axis)
    num = int(op.options.get("num_splits", len(op.outputs)))
    if num < 1 or x.shape[axis] % num:
        raise ModelError(f"{where(op)}: axis {axis} of size {x.shape[axis]} does not split in {num}")
    sizes = [x.shape[axis] // num] * num
    _split_outputs(op, model, x, axis, sizes)
    return SplitParams(axis, _bounds(sizes), 1)


def prepare_split_v(op, model) -> SplitParams:
    if len(op.inputs) != 3:
        raise ModelError(f"{where(op)}: takes input, size_splits and axis ({len(op.inputs)} inputs)")
    x = data_tensor(model, op, op.inputs[0], "input 0")
    sizes = const_ints(model, op, 1, "size_splits")
    if model.tensors[op.inputs[1]].shape and len(model.tensors[op.inputs[1]].shape) != 1:
        raise ModelError(f"{where(op)}: size_splits must be a vector")
    (axis,) = const_ints(model, op, 2, "axis", 1)
    axis = axis_index(op, axis, len(x.shape))
    not_batch(op, axis)
    num = int(op.options.get("num_splits", len(sizes)))
    if num != len(sizes):
        raise ModelError(f"{where(op)}: num_splits {num} but {len(sizes)} sizes")
    free = [i for i, s in enumerate(sizes) if s == -1]
    fixed = sum(s for s in sizes if s != -1)
    if len(free) > 1 or any(s < -1 for s in sizes) or fixed > x.shape[axis] \
            or (not free and fixed != x.shape[axis]):
        raise ModelError(f"{where(op)}: size_splits {sizes} do not split axis {axis} of size {x.shape[axis]}")
    if free:
        sizes[free[0]] = x.shape[axis] - fixed
    _split_outputs(op, model, x, axis, sizes)
    return SplitParams(axis, _bounds(sizes), 0)


def forward_split(p: SplitParams, *inputs) -> tuple:
    x = inputs[p.data]
    index = [slice(None)] * x.ndim
    outs = []
    for a, b in p.bounds:
        index[p.axis] = slice(a, b)
        outs.append(np.ascontiguousarray(x[tuple(index)]))
    return tuple(outs)


def backward_split(p: SplitParams, ctx) -> list:
    """The output errors concatenated back along the split axis."""
    grads = [None] * len(ctx.op.inputs)
    if wanted(ctx, p.data):
        grads[p.data] = _joined(ctx, p.axis, 0, stack=False)
    return grads
