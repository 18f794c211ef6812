"""MEAN of an int8 tensor over any set of non-batch axes (global average pooling, Conv1D's mean
over time, ...).

LiteRT's reduce.cc (EvalMean, kGenericOptimized) takes one of two integer paths for int8:

- keep_dims=True on a 4-D input over axes {1, 2}: optimized_integer_ops::Mean (float32-derived
  bias and multiplier, a 16-channel vector loop plus a scalar tail, each with its own rounding);
- everything else (keep_dims=False, other axes, other ranks, equal or different in/out
  quantization alike): reference_ops::QuantizedMeanOrSum (an int32 sum per output, the count folded
  into the multiplier in fixed point, MultiplyByQuantizedMultiplier with two roundings).

Both are reproduced here, each with the arithmetic of its source. The batch axis is never reduced:
samples are independent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import Error
from ..quant import (multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_neon,
                     quantize_multiplier)
from .common import output, per_tensor, tensor, where
from .contract import Backward, Kernel


@dataclass(frozen=True)
class MeanParams:
    spatial: bool     # optimized_integer_ops::Mean (keep_dims, 4-D, axes {1, 2}) else QuantizedMeanOrSum
    input_zero_point: int
    out_zero_point: int
    bias: int         # spatial path: output zero point minus the rescaled input zero point
    multiplier: int
    shift: int
    out_shape: tuple  # without the batch axis
    perm: tuple | None  # transpose (batch first) bringing the reduced axes together, None if they are
    fold: tuple       # one sample as (outer, reduced, inner) after ``perm``
    kept_shape: tuple  # one sample's shape with the reduced axes set to 1 (for the backward)
    count: int        # elements averaged into one output


def resolve_axes(op, model, rank: int) -> list[int]:
    """The axes tensor as LiteRT's ResolveAxis reads it: negatives wrapped, duplicates dropped, in order."""
    data = np.asarray(tensor(model, op, 1, dtype=np.int32, constant=True).data).reshape(-1)
    axes: list[int] = []
    for a in data.tolist():
        a = int(a)
        if not -rank <= a < rank:
            raise ModelError(f"{where(op)}: axis {a} is out of range for rank {rank}")
        a %= rank
        if a not in axes:
            axes.append(a)
    if 0 in axes:
        raise ModelError(f"{where(op)}: MEAN over the batch axis is not supported (samples are independent)")
    return axes


def prepare(op, model) -> MeanParams:
    x = tensor(model, op, 0, dtype=np.int8)
    out = output(model, op)
    rank = len(x.shape)
    axes = resolve_axes(op, model, rank)
    keep = bool(op.options.get("keep_dims", False))
    dims = list(x.shape)
    kept = tuple(1 if i in axes else d for i, d in enumerate(dims))
    shape = kept if keep else tuple(d for i, d in enumerate(dims) if i not in axes)
    if tuple(out.shape[1:]) != shape[1:]:
        raise ModelError(f"{where(op)}: output {list(out.shape)} != {list(shape)}")
    qi, qo = per_tensor(op, x, "input"), per_tensor(op, out, "output")
    count = int(np.prod([dims[a] for a in axes], dtype=np.int64))
    perm, fold = _layout(dims, axes)
    spatial = keep and rank == 4 and sorted(axes) == [1, 2]
    f32 = np.float32
    if spatial:
        # optimized_integer_ops::Mean, all in float32.
        temp = f32(f32(qi.zp) * f32(qi.s)) / f32(qo.s)
        temp = temp + f32(0.5) if temp > 0 else temp - f32(0.5)
        bias = qo.zp - int(temp)
        real = f32(qi.s) / (f32(count) * f32(qo.s))
        mult, shift = quantize_multiplier(float(real))
    else:
        # QuantizedMeanOrSum: multiplier for in/out scale, then divided by the count in fixed point.
        mult, shift = quantize_multiplier(float(qi.s) / float(qo.s))
        k = min(count.bit_length() - 1, 32, 31 + shift)
        mult = (mult << k) // count if k >= 0 else (mult >> -k) // count
        shift -= k
        bias = 0
    return MeanParams(spatial, qi.zp, qo.zp, bias, int(mult), int(shift), shape[1:], perm, fold,
                      kept[1:], count)


def _layout(dims: list, axes: list) -> tuple:
    """How one sample folds to (outer, reduced, inner): directly when the reduced axes are adjacent
    (global pooling, a mean over time), else after a transpose that moves them last."""
    red = sorted(axes)
    size = lambda ax: int(np.prod([dims[a] for a in ax], dtype=np.int64))  # noqa: E731
    if not red:
        return None, (size(range(1, len(dims))), 1, 1)
    if red == list(range(red[0], red[-1] + 1)):
        return None, (size(range(1, red[0])), size(red), size(range(red[-1] + 1, len(dims))))
    rest = [a for a in range(1, len(dims)) if a not in red]
    return (0, *rest, *red), (size(rest), size(red), 1)


def forward(p: MeanParams, x: np.ndarray, *_axis) -> np.ndarray:
    n = x.shape[0]
    if p.spatial:
        y = mean_keep_dims_int8(x, p.bias, p.multiplier, p.shift)
    else:
        v = np.ascontiguousarray(x.transpose(p.perm)) if p.perm is not None else np.ascontiguousarray(x)
        y = mean_reduce_int8(v.reshape((n,) + p.fold), p.input_zero_point, p.out_zero_point,
                             p.multiplier, p.shift, p.count)
    return y.reshape((n,) + p.out_shape)


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.inputs[0]].shape))


@njit(cache=True, parallel=True)
def mean_keep_dims_int8(x, bias, multiplier, shift):
    # Raw int8 sum (the zero point lives in ``bias``); channels in blocks of 16 take the vector
    # rounding, the remaining c % 16 the scalar one.
    n, h, w, c = x.shape
    vector_channels = c - c % 16
    out = np.empty((n, c), np.int8)
    for b in prange(n):
        for ch in range(c):
            acc = np.int32(0)
            for iy in range(h):
                for ix in range(w):
                    acc += np.int32(x[b, iy, ix, ch])
            if ch < vector_channels:
                v = multiply_by_quantized_multiplier_neon(np.int32(acc), multiplier, shift)
            else:
                v = multiply_by_quantized_multiplier(np.int32(acc), multiplier, shift)
            out[b, ch] = min(max(v + bias, -128), 127)
    return out


@njit(cache=True, parallel=True)
def mean_reduce_int8(x, in_zp, out_zp, multiplier, shift, count):
    # x: (n, outer, reduced, inner). int32 sums as temp_sum holds them, the zero point taken out once.
    n, outer, red, inner = x.shape
    out = np.empty((n, outer, inner), np.int8)
    for b in prange(n):
        acc = np.empty(inner, np.int32)
        for o in range(outer):
            acc[:] = 0
            for r in range(red):
                for i in range(inner):
                    acc[i] += np.int32(x[b, o, r, i])
            for i in range(inner):
                v = multiply_by_quantized_multiplier(np.int32(acc[i] - in_zp * count), multiplier, shift) + out_zp
                out[b, o, i] = min(max(v, -128), 127)
    return out


# --- backward ------------------------------------------------------------------------------------

def backward(p: MeanParams, ctx: Backward) -> list:
    """The error broadcast to every averaged cell; 1/count joins the scale (no arithmetic)."""
    if not ctx.wants[0]:
        return [None, None]
    err, x = ctx.zeros_error(0), ctx.inputs[0]
    n = err.values.shape[0]
    g = err.values.reshape((n,) + p.kept_shape)
    # a copy, never a view: the error is masked in place by the op upstream (over 1 x 1 axes the
    # broadcast is a read-only view of the output error itself)
    return [Error(np.broadcast_to(g, x.shape).copy(), err.scale / p.count), None]


def clamp(p: MeanParams) -> tuple[int, int]:
    return -128, 127


def output_bound(op, model, absmax) -> float:
    return absmax(op.inputs[0])  # a mean never leaves its inputs' range


KERNELS = {"MEAN": Kernel(prepare, forward, backward, clamp, macs, output_bound=output_bound)}
