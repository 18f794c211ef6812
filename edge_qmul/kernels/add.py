"""ADD, int8 with broadcasting: both inputs are brought to a common scale, summed, requantized.

LiteRT's optimized int8 ADD rescales each input in one of three loops that round differently (see
``_loop_schedule``); which loop makes which output element is fixed at prepare time from the file's
shapes, exactly as add.cc / BinaryBroadcastFiveFold schedule it, and the compiled loop follows it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..quant import (activation_range, multiply_by_quantized_multiplier,
                     multiply_by_quantized_multiplier_floor_shift, quantize_multiplier,
                     saturating_rounding_doubling_high_mul)
from ..grad import Error, from_accumulator
from .common import check_one_sample, five_fold, output, per_tensor, tensor, where
from .contract import Backward, Kernel, MemoryQuery

# add.cc: int8 inputs are shifted left by 20 bits before rescaling, so the sum keeps precision.
LEFT_SHIFT = 20


# Which LiteRT loop computes an output element (it decides the rounding of the input rescale):
ELEMENTWISE_VECTOR = 0  # AddElementwiseInt8's 16-wide vector body: srdhm(a << (20 + s), M)
SCALAR = 1              # any scalar loop: RoundingDivideByPOT(srdhm(a << 20, M), -s)
BROADCAST_VECTOR = 2    # AddScalarBroadcast's 8-wide vector body: srdhm(a << 20, M) >> -s (floor)


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
    index1: np.ndarray  # per output element (one sample, flat): flat index into input 0
    index2: np.ndarray  # ... into input 1
    loop: np.ndarray    # per output element: ELEMENTWISE_VECTOR, SCALAR or BROADCAST_VECTOR
    vector_end: int     # same shapes: elements [0, vector_end) take the vector loop, the rest the
                        # scalar tail (add_int8_same); -1 when the inputs broadcast


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
    # LiteRT runs one sample of the file's shapes at a time; so does the element schedule.
    sample = (1,) + tuple(out.shape[1:])
    for t in (a, b):
        check_one_sample(op, tuple(t.shape), sample)
    index1, index2 = (np.ascontiguousarray(np.broadcast_to(
        np.arange(int(np.prod(t.shape)), dtype=np.int64).reshape(t.shape), sample)).reshape(-1)
        for t in (a, b))
    size = int(np.prod(sample))
    loop = _loop_schedule(tuple(a.shape), tuple(b.shape), size)
    same = tuple(a.shape) == tuple(b.shape)
    return AddParams(-qa.zp, -qb.zp, m1, s1, m2, s2, mo, so, qo.zp, lo, hi, tuple(out.shape[1:]),
                     index1, index2, loop, size - size % 16 if same else -1)


def _loop_schedule(shape0: tuple, shape1: tuple, size: int) -> np.ndarray:
    """Which loop of LiteRT's int8 ADD (add.cc EvalAddQuantized, optimized kernel) makes each output.

    Same shapes: AddElementwiseInt8 over the whole tensor, 16 at a time, scalar tail. Otherwise
    reference_ops::ProcessBroadcastShapes folds the shapes into the five-fold pattern y0..y4 and
    BinaryBroadcastFiveFold calls AddElementwiseInt8 on runs of y4 elements (y4 > 1), or
    AddScalarBroadcast on runs of y3 (y4 == 1; 8-wide vector body, scalar tail). Shapes that do not
    fold (kGenericBroadcast) go to reference_integer_ops::BroadcastAdd6DSlow: all scalar.
    """
    loop = np.full(size, SCALAR, np.int8)
    dims = max(len(shape0), len(shape1))
    e0 = (1,) * (dims - len(shape0)) + tuple(shape0)
    e1 = (1,) * (dims - len(shape1)) + tuple(shape1)

    def runs(run: int, lanes: int, kind: int) -> None:
        pos = np.arange(size) % run
        loop[pos < run - run % lanes] = kind

    if e0 == e1:  # kNonBroadcast
        runs(size, 16, ELEMENTWISE_VECTOR)
        return loop
    y = five_fold(e0, e1)
    if y is None:  # kGenericBroadcast, or not broadcastable fast: BroadcastAdd6DSlow
        return loop
    if y[4] > 1:
        runs(y[4], 16, ELEMENTWISE_VECTOR)
    else:
        runs(y[3], 8, BROADCAST_VECTOR)
    return loop


def forward(p: AddParams, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Only an operand of the output's full rank has a batch axis: a lower-rank constant (e.g. a
    # per-channel vector of shape (C,)) broadcasts against the trailing axes, as in LiteRT.
    rank = len(p.out_shape) + 1
    n = max(v.shape[0] for v in (a, b) if v.ndim == rank)
    a2 = np.ascontiguousarray(a).reshape(a.shape[0] if a.ndim == rank else 1, -1)
    b2 = np.ascontiguousarray(b).reshape(b.shape[0] if b.ndim == rank else 1, -1)
    if p.vector_end >= 0 and a2.shape == b2.shape:
        y = add_int8_same(a2, b2, p.vector_end, p.offset1, p.offset2, p.mult1, p.shift1, p.mult2, p.shift2,
                          p.out_mult, p.out_shift, p.out_zero_point, p.act_min, p.act_max)
        return y.reshape((n,) + p.out_shape)
    y = add_int8(a2, b2, n, p.index1, p.index2, p.loop, p.offset1, p.offset2, p.mult1, p.shift1,
                 p.mult2, p.shift2, p.out_mult, p.out_shift, p.out_zero_point, p.act_min, p.act_max)
    return y.reshape((n,) + p.out_shape)


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.outputs[0]].shape))


@njit(cache=True, inline="always")
def _rescale_input(d, mult, shift, loop):
    if loop == 0:
        # AddElementwiseInt8's vector body folds the input's right shift into the left shift:
        # no rounding divide after the multiply. The sum is vshlq_s32's count: negative (an input
        # scale under 2^-20 of the other's, e.g. a zero state) shifts right, truncating; a negative
        # count to << would be undefined (LLVM folded it to garbage when the shift was a literal).
        total = LEFT_SHIFT + shift
        shifted = d << total if total >= 0 else d >> -total
        return saturating_rounding_doubling_high_mul(np.int32(shifted), mult)
    if loop == 2:
        # AddScalarBroadcast's vector body shifts right with vshlq_s32 (truncating: floor).
        return multiply_by_quantized_multiplier_floor_shift(np.int32(d << LEFT_SHIFT), mult, shift)
    # scalar loops: MultiplyByQuantizedMultiplierSmallerThanOneExp (round half away from zero).
    return multiply_by_quantized_multiplier(np.int32(d << LEFT_SHIFT), mult, shift)


@njit(cache=True)
def add_int8(a, b, n, index1, index2, loop, offset1, offset2, mult1, shift1, mult2, shift2,
             out_mult, out_shift, out_zp, act_min, act_max):
    size = loop.shape[0]
    out = np.empty((n, size), np.int8)
    for s in range(n):
        sa = s if a.shape[0] > 1 else 0
        sb = s if b.shape[0] > 1 else 0
        for i in range(size):
            da = np.int32(a[sa, index1[i]]) + offset1
            db = np.int32(b[sb, index2[i]]) + offset2
            ta = _rescale_input(da, mult1, shift1, loop[i])
            tb = _rescale_input(db, mult2, shift2, loop[i])
            v = multiply_by_quantized_multiplier(np.int32(ta + tb), out_mult, out_shift) + out_zp
            out[s, i] = min(max(v, act_min), act_max)
    return out


@njit(cache=True, parallel=True)
def add_int8_same(a, b, vector_end, offset1, offset2, mult1, shift1, mult2, shift2,
                  out_mult, out_shift, out_zp, act_min, act_max):
    # Inputs of one shape (a residual connection): AddElementwiseInt8's schedule without the
    # gather, a vector body and a scalar tail per sample, one sample per task.
    n, size = a.shape
    out = np.empty((n, size), np.int8)
    for s in prange(n):
        ar = a[s]
        br = b[s]
        dst = out[s]
        for i in range(vector_end):
            ta = _rescale_input(np.int32(ar[i]) + offset1, mult1, shift1, 0)
            tb = _rescale_input(np.int32(br[i]) + offset2, mult2, shift2, 0)
            v = multiply_by_quantized_multiplier(np.int32(ta + tb), out_mult, out_shift) + out_zp
            dst[i] = min(max(v, act_min), act_max)
        for i in range(vector_end, size):
            ta = _rescale_input(np.int32(ar[i]) + offset1, mult1, shift1, 1)
            tb = _rescale_input(np.int32(br[i]) + offset2, mult2, shift2, 1)
            v = multiply_by_quantized_multiplier(np.int32(ta + tb), out_mult, out_shift) + out_zp
            dst[i] = min(max(v, act_min), act_max)
    return out


# --- backward ------------------------------------------------------------------------------------

def backward(p: AddParams, ctx: Backward) -> list:
    """The real sum passes its (clamp-masked) error to both inputs unchanged; a broadcast input
    gets the error summed (int64) over the axes it was broadcast along."""
    err = ctx.errors[0]
    g = err.values
    out = [None] * len(ctx.op.inputs)
    for slot in (0, 1):
        if not ctx.wants[slot]:
            continue
        x = ctx.inputs[slot]
        if x.shape == g.shape:
            out[slot] = Error(g.copy(), err.scale)
            continue
        gx = g.astype(np.int64)
        lead = gx.ndim - x.ndim
        gx = gx.sum(axis=tuple(range(lead)), dtype=np.int64) if lead else gx
        axes = tuple(i for i, s in enumerate(x.shape) if s == 1 and gx.shape[i] != 1)
        out[slot] = from_accumulator(gx.sum(axis=axes, keepdims=True, dtype=np.int64) if axes else gx, err.scale)
    return out


def clamp(p: AddParams) -> tuple[int, int]:
    return p.act_min, p.act_max


def backward_bytes(op, model, q: MemoryQuery) -> int:
    return 3 * 2 * q.elems(op.outputs[0])  # the output error and a copy for each input


def output_bound(op, model, absmax) -> float:
    return absmax(op.inputs[0]) + absmax(op.inputs[1])


KERNELS = {"ADD": Kernel(prepare, forward, backward, clamp, macs, backward_bytes, output_bound=output_bound)}
