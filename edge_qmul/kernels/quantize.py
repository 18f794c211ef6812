"""QUANTIZE (float32 -> int8, int8 -> int8) and DEQUANTIZE (int8 -> float32) at interfaces.

LiteRT's optimized kernels run 8 (or 16) elements at a time in vector code and finish the rest in a
scalar loop, and the two round differently; per sample, the first ``size - size % 8`` elements take
the vector arithmetic. These ops sit at the float interface, where floats are the point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ModelError
from ..quant import (QuantParams, multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_neon,
                     quantize_multiplier, round_half_away)
from ..grad import Error
from .common import output, per_tensor, tensor, vector_split, where
from .contract import Backward, Kernel


@dataclass(frozen=True)
class QuantizeParams:
    out_q: QuantParams
    from_float: bool
    in_zero_point: int = 0
    multiplier: int = 0
    shift: int = 0


def prepare_quantize(op, model) -> QuantizeParams:
    x = tensor(model, op, 0)
    out = output(model, op)
    qo = per_tensor(op, out, "output")
    if np.dtype(x.dtype) == np.float32:
        return QuantizeParams(qo, True)
    if np.dtype(x.dtype) == np.int8:
        qi = per_tensor(op, x, "input")
        mult, shift = quantize_multiplier(float(qi.s) / float(qo.s))
        return QuantizeParams(qo, False, qi.zp, mult, shift)
    raise ModelError(f"{where(op)}: QUANTIZE from {np.dtype(x.dtype).name} is not supported")


def forward_quantize(p: QuantizeParams, x: np.ndarray) -> np.ndarray:
    flat, vec = vector_split(x, 8 if p.from_float else 16)
    if not p.from_float:
        y = requantize_int8(flat, vec, p.in_zero_point, p.multiplier, p.shift, p.out_q.zp)
        return y.reshape(x.shape)
    scale, zp = float(p.out_q.s), p.out_q.zp
    out = np.empty(flat.shape, np.int64)
    # AffineQuantize vector part: float32 multiply by float32(1/scale), round half to even.
    inv = np.float32(1.0 / scale)
    out[:, :vec] = np.rint(flat[:, :vec].astype(np.float32) * inv).astype(np.int64)
    # scalar tail: double division, std::round.
    out[:, vec:] = round_half_away(flat[:, vec:].astype(np.float64) / scale)
    return np.clip(out + zp, -128, 127).astype(np.int8).reshape(x.shape)


@dataclass(frozen=True)
class DequantizeParams:
    in_q: QuantParams
    fma: bool = False  # the vector part as one fused multiply-add (aarch64's LiteRT)


def prepare_dequantize(op, model) -> DequantizeParams:
    x = tensor(model, op, 0, dtype=np.int8)
    output(model, op, dtype=np.float32)
    return DequantizeParams(per_tensor(op, x, "input"), model.litert.dequantize_fma)


def forward_dequantize(p: DequantizeParams, x: np.ndarray) -> np.ndarray:
    flat, vec = vector_split(x, 8)
    scale, zp = float(p.in_q.s), p.in_q.zp
    out = np.empty(flat.shape, np.float32)
    # vector part: float32 q * scale + float32(-zp * scale). aarch64 fuses it (vfmaq_f32): in
    # float64 the product and the sum are exact (both are multiples of ulp(scale) below 2^34 of
    # them), so one rounding to float32 is the FMA's. x86 (SSE, no FMA) rounds the product first.
    if p.fma:
        out[:, :vec] = (flat[:, :vec].astype(np.float64) * np.float64(np.float32(scale))
                        + np.float64(np.float32(-zp * scale))).astype(np.float32)
    else:
        out[:, :vec] = flat[:, :vec].astype(np.float32) * np.float32(scale) + np.float32(-zp * scale)
    out[:, vec:] = (scale * (flat[:, vec:].astype(np.float64) - zp)).astype(np.float32)
    return out.reshape(x.shape)


@njit(cache=True)
def requantize_int8(x, vector_size, in_zp, multiplier, shift, out_zp):
    n, size = x.shape
    out = np.empty((n, size), np.int8)
    for b in range(n):
        for i in range(size):
            d = np.int32(np.int32(x[b, i]) - in_zp)
            if i < vector_size:
                v = multiply_by_quantized_multiplier_neon(d, multiplier, shift) + out_zp
            else:
                v = multiply_by_quantized_multiplier(d, multiplier, shift) + out_zp
            out[b, i] = min(max(v, -128), 127)
    return out


def backward_quantize(p: QuantizeParams, ctx: Backward) -> list:
    """An int8 -> int8 QUANTIZE inside the core keeps the real value: the error passes unchanged."""
    if p.from_float or not ctx.wants[0]:
        return [None]
    err = ctx.errors[0]
    return [Error(err.values.copy(), err.scale)]


def clamp_quantize(p: QuantizeParams) -> tuple[int, int]:
    return -128, 127


KERNELS = {
    "QUANTIZE": Kernel(prepare_quantize, forward_quantize, backward_quantize, clamp_quantize),
    "DEQUANTIZE": Kernel(prepare_dequantize, forward_dequantize),
}
