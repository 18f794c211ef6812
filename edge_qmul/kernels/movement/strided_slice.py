"""STRIDED_SLICE: LiteRT's slice specification (masks, ellipsis, new axes, offset) resolved once into
a numpy index per axis; the batch axis must stay whole. The backward puts the error back where the
slice read and zeros elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ModelError
from ...grad import Error
from ..common import where
from .checks import check_shape, const_ints, data_tensor, same_quant, wanted


@dataclass(frozen=True)
class SliceParams:
    eff_shape: tuple   # input shape with the new axes inserted (batch axis included)
    index: tuple       # per effective axis after the batch: a slice
    out_shape: tuple   # without the batch axis


def _strided_slice_spec(in_shape, begin, end, strides, o: dict):
    """LiteRT's BuildStridedSliceParams (strided_slice.cc): ellipsis and new axes resolved into
    per-axis starts, stops, strides and begin/end/shrink masks over the effective shape."""
    ell, new = int(o.get("ellipsis_mask", 0)), int(o.get("new_axis_mask", 0))
    bm, em, sm = int(o.get("begin_mask", 0)), int(o.get("end_mask", 0)), int(o.get("shrink_axis_mask", 0))
    count, dims = len(begin), len(in_shape)
    num_add = sum(1 for i in range(count) if not (ell >> i) & 1 and (new >> i) & 1)
    eff = dims + num_add
    eff_ell = eff_new = 0
    ell_start, expanded, i = eff, 0, 0
    while i < eff:
        if (ell >> i) & 1:
            ell_start = i
            ell_end = max(i + 1, min(i + 1 + num_add + dims - count, eff))
            expanded = ell_end - ell_start - 1
            while i < ell_end:
                eff_ell |= 1 << i
                i += 1
            continue
        if (new >> (i - expanded)) & 1:
            eff_new |= 1 << i
        i += 1
    start, stop, stride = [0] * eff, [0] * eff, [1] * eff
    b_mask = e_mask = s_mask = 0
    shape = [0] * eff
    added_ell = added_axes = 0
    for i in range(eff):
        if (eff_ell >> i) & 1:
            added_ell = max(0, i - ell_start)
            b_mask, e_mask = b_mask | 1 << i, e_mask | 1 << i
            shape[i] = in_shape[i - added_axes]
        elif (eff_new >> i) & 1:
            stop[i] = 1
            shape[i] = 1
            added_axes += 1
        elif i >= count + expanded:
            b_mask, e_mask = b_mask | 1 << i, e_mask | 1 << i
            shape[i] = in_shape[i - added_axes]
        else:
            k = i - added_ell
            start[i], stop[i], stride[i] = begin[k], end[k], strides[k]
            b_mask |= ((bm >> k) & 1) << i
            e_mask |= ((em >> k) & 1) << i
            s_mask |= ((sm >> k) & 1) << i
            shape[i] = in_shape[i - added_axes]
    return shape, start, stop, stride, b_mask, e_mask, s_mask, eff_new


def _clamp(v: int, lo: int, hi: int) -> int:
    return hi if v > hi else lo if v < lo else v


def _axis_range(size, start, stop, stride, begin_bit, end_bit, shrink, offset):
    """reference_ops StartForAxis / EndForAxis: the indices LiteRT's loop visits along one axis,
    and the extent ResizeOutputTensor declares for it (None for a shrunk axis)."""
    s = start + size if start < 0 else start
    s = _clamp(s, 0, size) if stride > 0 else _clamp(s, -1, size - 1)
    if begin_bit:
        s = 0 if stride > 0 else size - 1
    if shrink:
        e = s if s >= size else s + 1
    else:
        e = stop + s if offset else stop
        e = e + size if e < 0 else e
        e = _clamp(e, 0, size) if stride > 0 else _clamp(e, -1, size - 1)
        if end_bit:
            e = size if stride > 0 else -1
    visited = range(s, e, stride)
    if shrink:
        return visited, None
    extent = (stop if offset else e - s)
    if (extent < 0) != (stride < 0):
        extent = 0
    elif stride < 0:
        extent = int((extent + 1) / stride) + 1  # C division truncates toward zero
    else:
        extent = 0 if extent == 0 else (extent - 1) // stride + 1
    return visited, extent


def _as_slice(r: range) -> slice:
    if len(r) == 0:
        return slice(0, 0)
    stop = r[-1] + r.step
    return slice(r[0], None if stop < 0 else stop, r.step)


def prepare_strided_slice(op, model) -> SliceParams:
    x = data_tensor(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = data_tensor(model, op, op.outputs[0], "output")
    same_quant(op, x, out, "output")
    if len(op.inputs) != 4:
        raise ModelError(f"{where(op)}: takes input, begin, end and strides ({len(op.inputs)} inputs)")
    begin = const_ints(model, op, 1, "begin")
    end = const_ints(model, op, 2, "end", len(begin))
    strides = const_ints(model, op, 3, "strides", len(begin))
    if not 0 < len(begin) <= 31:
        raise ModelError(f"{where(op)}: {len(begin)} slice indices (LiteRT takes 1 to 31)")
    if any(s == 0 or s == -(2**31) for s in strides):
        raise ModelError(f"{where(op)}: strides {strides} must be non-zero")
    o = op.options
    offset = bool(o.get("offset", False))
    if offset and (o.get("ellipsis_mask", 0) or o.get("new_axis_mask", 0) or len(begin) != len(x.shape)):
        # ResizeOutputTensor reads end[] by effective axis: only a plain spec has a defined shape.
        raise ModelError(f"{where(op)}: offset slices need one index per axis and no ellipsis/new axes")
    ell, new_bits = int(o.get("ellipsis_mask", 0)), int(o.get("new_axis_mask", 0))
    if bin(ell & ((1 << len(begin)) - 1)).count("1") > 1:
        raise ModelError(f"{where(op)}: more than one ellipsis in ellipsis_mask {ell}")
    added = sum(1 for i in range(len(begin)) if (new_bits >> i) & 1 and not (ell >> i) & 1)
    if len(begin) > len(x.shape) + added:
        # LiteRT would ignore the extra indices (or stretch an empty ellipsis over an axis)
        raise ModelError(f"{where(op)}: {len(begin)} slice indices for rank {len(x.shape)} "
                         f"with {added} new axes")
    shape, start, stop, stride, bm, em, sm, new = _strided_slice_spec(tuple(x.shape), begin, end, strides, o)
    visited, declared = [], []
    for i, size in enumerate(shape):
        r, extent = _axis_range(size, start[i], stop[i], stride[i], (bm >> i) & 1, (em >> i) & 1,
                                (sm >> i) & 1, offset)
        if extent is None and len(r) != 1:
            raise ModelError(f"{where(op)}: shrink axis {i} index {start[i]} is outside 0..{size - 1}")
        if extent is not None and extent != len(r):
            raise ModelError(f"{where(op)}: axis {i} is declared {extent} long but the slice visits "
                             f"{len(r)} elements (LiteRT would leave the rest unwritten)")
        visited.append(r)
        if extent is not None:
            declared.append(extent)
    check_shape(op, out, declared)
    # Axis 0 must stay the whole batch axis: not a new axis, not shrunk, every element once.
    if (new & 1) or (sm & 1) or len(visited[0]) != shape[0] or (shape[0] > 1 and visited[0].step != 1):
        raise ModelError(f"{where(op)}: slices the batch axis (begin {begin[0]}, end {end[0]}, "
                         f"stride {strides[0]}, masks {dict(o)})")
    return SliceParams(tuple(shape), tuple(_as_slice(r) for r in visited[1:]), tuple(out.shape[1:]))


def forward_strided_slice(p: SliceParams, x: np.ndarray, *_indices) -> np.ndarray:
    v = x.reshape((x.shape[0],) + p.eff_shape[1:])[(slice(None),) + p.index]
    return np.ascontiguousarray(v).reshape((x.shape[0],) + p.out_shape)


def backward_strided_slice(p: SliceParams, ctx) -> list:
    """The error goes back where the slice read, zeros elsewhere."""
    e = ctx.error(0)
    if e is None or not wanted(ctx, 0):
        return [None] * 4
    n = e.values.shape[0]
    g = np.zeros((n,) + p.eff_shape[1:], np.int16)
    view = g[(slice(None),) + p.index]
    view[...] = e.values.reshape(view.shape)
    x_shape = ctx.model.tensors[ctx.op.inputs[0]].shape
    return [Error(g.reshape((n,) + tuple(x_shape[1:])), e.scale), None, None, None]
