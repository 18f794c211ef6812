"""MEAN over the spatial axes of an int8 NHWC tensor (global average pooling).

LiteRT takes two different integer paths (reduce.cc): keep_dims=True goes to
optimized_integer_ops::Mean (float-derived bias and multiplier, 16-channel vector loop plus scalar
tail), keep_dims=False to reference_ops::QuantizedMeanOrSum (the count folded into the multiplier).
Both are reproduced here, each with the arithmetic of its source.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..quant import (multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_neon,
                     quantize_multiplier)
from .common import output, per_tensor, tensor, where


@dataclass(frozen=True)
class MeanParams:
    keep_dims: bool
    input_zero_point: int
    out_zero_point: int
    bias: int  # keep_dims path: output zero point minus the rescaled input zero point
    multiplier: int
    shift: int
    out_shape: tuple


def prepare(op, model) -> MeanParams:
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    axis_t = tensor(model, op, 1, constant=True)
    out = output(model, op)
    axes = sorted({int(a) % 4 for a in np.asarray(axis_t.data).reshape(-1)})
    if axes != [1, 2]:
        raise ModelError(f"{where(op)}: MEAN is supported over axes [1, 2] (H and W), got {axes}")
    keep = bool(op.options.get("keep_dims", False))
    shape = (1, 1, 1, x.shape[3]) if keep else (1, x.shape[3])
    if tuple(out.shape[1:]) != shape[1:]:
        raise ModelError(f"{where(op)}: output {list(out.shape)} != {list(shape)}")
    qi, qo = per_tensor(op, x, "input"), per_tensor(op, out, "output")
    count = x.shape[1] * x.shape[2]
    f32 = np.float32
    if keep:
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
    return MeanParams(keep, qi.zp, qo.zp, bias, int(mult), int(shift), shape[1:])


def forward(p: MeanParams, x: np.ndarray, *_axis) -> np.ndarray:
    if p.keep_dims:
        y = mean_keep_dims_int8(x, p.bias, p.multiplier, p.shift)
    else:
        y = mean_reduce_int8(x, p.input_zero_point, p.out_zero_point, p.multiplier, p.shift)
    return y.reshape((x.shape[0],) + p.out_shape)


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
def mean_reduce_int8(x, in_zp, out_zp, multiplier, shift):
    n, h, w, c = x.shape
    count = h * w
    out = np.empty((n, c), np.int8)
    for b in prange(n):
        for ch in range(c):
            acc = np.int32(0)
            for iy in range(h):
                for ix in range(w):
                    acc += np.int32(x[b, iy, ix, ch])
            v = multiply_by_quantized_multiplier(np.int32(acc - in_zp * count), multiplier, shift) + out_zp
            out[b, ch] = min(max(v, -128), 127)
    return out


# --- backward ------------------------------------------------------------------------------------

def backward(p: MeanParams, x: np.ndarray, g: np.ndarray):
    """dX of MEAN over H, W: the error broadcast to every cell; 1/(H*W) joins the scale."""
    n, h, w, c = x.shape
    gx = np.ascontiguousarray(np.broadcast_to(g.reshape(n, 1, 1, c), (n, h, w, c)))
    return gx, 1.0 / (h * w)
