"""ADD, int8 with broadcasting: both inputs are brought to a common scale, summed, requantized."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ModelError
from ..quant import (activation_range, multiply_by_quantized_multiplier, quantize_multiplier,
                     saturating_rounding_doubling_high_mul)
from .common import output, per_tensor, tensor, where

# add.cc: int8 inputs are shifted left by 20 bits before rescaling, so the sum keeps precision.
LEFT_SHIFT = 20


@dataclass(frozen=True)
class AddParams:
    offset1: int
    offset2: int
    mult1: int
    shift1: int
    mult2: int
    shift2: int
    out_mult: int
    out_shift: int
    out_zero_point: int
    act_min: int
    act_max: int
    out_shape: tuple


def prepare(op, model) -> AddParams:
    a = tensor(model, op, 0, dtype=np.int8)
    b = tensor(model, op, 1, dtype=np.int8)
    out = output(model, op)
    qa, qb, qo = (per_tensor(op, t, n) for t, n in ((a, "input 0"), (b, "input 1"), (out, "output")))
    try:
        shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except ValueError:
        raise ModelError(f"{where(op)}: shapes {list(a.shape)} and {list(b.shape)} do not broadcast") from None
    if tuple(shape[1:]) != tuple(out.shape[1:]):
        raise ModelError(f"{where(op)}: output {list(out.shape)} != broadcast shape {list(shape)}")
    # The float steps follow add.cc: the max is taken in float32 and doubled, then widened to double.
    twice_max = float(np.float32(2) * max(np.float32(qa.s), np.float32(qb.s)))
    m1, s1 = quantize_multiplier(float(qa.s) / twice_max)
    m2, s2 = quantize_multiplier(float(qb.s) / twice_max)
    mo, so = quantize_multiplier(twice_max / float(np.float32(1 << LEFT_SHIFT) * np.float32(qo.s)))
    lo, hi = activation_range(op.options.get("activation", "NONE"), qo)
    return AddParams(-qa.zp, -qb.zp, m1, s1, m2, s2, mo, so, qo.zp, lo, hi, tuple(out.shape[1:]))


def forward(p: AddParams, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(a.shape[0], b.shape[0])
    shape = (n,) + p.out_shape
    a2 = np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(n, -1)
    b2 = np.ascontiguousarray(np.broadcast_to(b, shape)).reshape(n, -1)
    y = add_int8(a2, b2, p.offset1, p.offset2, p.mult1, p.shift1, p.mult2, p.shift2, p.out_mult,
                 p.out_shift, p.out_zero_point, p.act_min, p.act_max)
    return y.reshape(shape)


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.outputs[0]].shape))


@njit(cache=True)
def add_int8(a, b, offset1, offset2, mult1, shift1, mult2, shift2, out_mult, out_shift, out_zp,
             act_min, act_max):
    # AddElementwiseInt8 runs 16 elements at a time, folding each input's right shift into the left
    # shift (no rounding divide after the input multiply); the last size % 16 go through the scalar
    # loop, which rounds that divide half away from zero.
    n, size = a.shape
    vector_size = size - size % 16
    out = np.empty((n, size), np.int8)
    for s in range(n):
        for i in range(size):
            da = np.int32(a[s, i]) + offset1
            db = np.int32(b[s, i]) + offset2
            if i < vector_size:
                sa = saturating_rounding_doubling_high_mul(np.int32(da << (LEFT_SHIFT + shift1)), mult1)
                sb = saturating_rounding_doubling_high_mul(np.int32(db << (LEFT_SHIFT + shift2)), mult2)
            else:
                sa = multiply_by_quantized_multiplier(np.int32(da << LEFT_SHIFT), mult1, shift1)
                sb = multiply_by_quantized_multiplier(np.int32(db << LEFT_SHIFT), mult2, shift2)
            v = multiply_by_quantized_multiplier(np.int32(sa + sb), out_mult, out_shift) + out_zp
            out[s, i] = min(max(v, act_min), act_max)
    return out
