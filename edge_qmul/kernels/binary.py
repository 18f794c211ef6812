"""MUL and SUB, int8 with broadcasting (numpy rules, up to rank 6), bit-exact with LiteRT's builtins.

Which LiteRT code each loop reproduces (mul.cc / sub.cc EvalQuantized, x86 build, NEON emulated):

- MUL: optimized_integer_ops::Mul (same shapes) or BroadcastMulDispatch -> BinaryBroadcastFiveFold
  (MulElementwise on runs of y4, or MulSimpleBroadcast on runs of y3) or, for shapes that do not
  fold, reference_integer_ops::BroadcastMul6DSlow. Every element is
  ``MultiplyByQuantizedMultiplier((a - za) * (b - zb), M, shift) + z_out``, clamped; the rounding is
  the same in every loop. The 16-wide vector bodies differ from the scalar loops only on overflow:
  they saturate the rescaled product to int16 (vqmovn_s32) and add the zero point in int16,
  wrapping (vaddq_s16), before saturating to int8; the scalar loops clamp the int32 sum.
  ``_vector_lanes`` marks the elements the vector bodies make.
- SUB: int8 always takes reference_ops::Sub / BroadcastQuantSubSlow (no optimized int8 path), one
  scalar loop with ADD's arithmetic: each input shifted left by 20 and rescaled to twice the larger
  scale (MultiplyByQuantizedMultiplierSmallerThanOneExp, half away from zero), the difference
  requantized the same way. An input's rescale depends on its int8 value only, so it is computed
  once per value at prepare time (``_input_table``) and looked up.

Batch: LiteRT runs the file's shapes (batch 1) one sample at a time; the loops run one sample per
task. The error backward (STE) is in ``backward``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import Error, from_accumulator
from ..quant import activation_range, multiply_by_quantized_multiplier, quantize_multiplier
from .common import check_one_sample, five_fold, output, per_tensor, tensor, where
from .contract import Backward, Kernel, MemoryQuery

MAX_RANK = 6      # LiteRT's broadcast kernels (kMaxMulBroadcastDim, BroadcastBinaryOpSimple)
LEFT_SHIFT = 20   # sub.cc: int8 inputs are shifted left by 20 bits before rescaling
LANES = 16        # MulElementwise / MulSimpleBroadcast vector bodies: 16 int8 per iteration


@dataclass(frozen=True)
class BinaryParams:
    kind: str           # "MUL" or "SUB"
    offset1: int        # -zero point of input 0
    offset2: int        # -zero point of input 1
    table1: np.ndarray  # SUB: input 0's rescale per int8 value (int32, 256), ADD's scheme
    table2: np.ndarray  # SUB: input 1's; MUL: both empty
    out_mult: int
    out_shift: int
    out_zero_point: int
    act_min: int
    act_max: int
    out_shape: tuple    # output shape without the batch axis
    size: int           # output elements per sample
    index1: np.ndarray  # per output element (one sample, flat): flat index into input 0 (int32);
    index2: np.ndarray  # ... into input 1; both empty when the inputs have the output's shape
    vector: np.ndarray  # MUL with broadcasting, per output element: made by a 16-wide vector body
    vector_end: int     # MUL, same shapes: elements [0, vector_end) are made by the vector body
    scale1: float       # input scales, for the MUL backward
    scale2: float


def prepare(op, model) -> BinaryParams:
    a = tensor(model, op, 0, dtype=np.int8)
    b = tensor(model, op, 1, dtype=np.int8)
    out = output(model, op)
    qa, qb, qo = (per_tensor(op, t, n) for t, n in ((a, "input 0"), (b, "input 1"), (out, "output")))
    sa, sb, so = tuple(a.shape), tuple(b.shape), tuple(out.shape)
    if max(len(sa), len(sb), len(so)) > MAX_RANK:
        raise ModelError(f"{where(op)}: rank above {MAX_RANK} is not supported")
    try:
        shape = np.broadcast_shapes(sa, sb)
    except ValueError:
        raise ModelError(f"{where(op)}: shapes {list(sa)} and {list(sb)} do not broadcast") from None
    if len(shape) != len(so) or tuple(shape[1:]) != so[1:]:
        raise ModelError(f"{where(op)}: output {list(so)} != broadcast shape {list(shape)}")
    for slot, t in ((0, a), (1, b)):
        # The engine's batch axis is axis 0 of the output; an activation of lower rank would put
        # its batch axis elsewhere.
        if not t.is_constant and len(t.shape) != len(so):
            raise ModelError(f"{where(op)}: input {slot} ({t.name!r}) is not a constant and has rank "
                             f"{len(t.shape)}, below the output's {len(so)}")
    lo, hi = activation_range(op.options.get("activation", "NONE"), qo)
    kind = op.kind
    table1 = table2 = np.empty(0, np.int32)
    if kind == "MUL":
        # mul.cc: the scales are multiplied and divided in float32, then widened to double.
        real = np.float32(np.float32(qa.s) * np.float32(qb.s)) / np.float32(qo.s)
        mo, sh = quantize_multiplier(float(real))
    else:
        # sub.cc PrepareGeneralSubOp (ADD's arithmetic): 2 * max in float32, ratios in double.
        twice_max = float(np.float32(2) * max(np.float32(qa.s), np.float32(qb.s)))
        table1 = _input_table(-qa.zp, *quantize_multiplier(float(qa.s) / twice_max))
        table2 = _input_table(-qb.zp, *quantize_multiplier(float(qb.s) / twice_max))
        mo, sh = quantize_multiplier(twice_max / float(np.float32(1 << LEFT_SHIFT) * np.float32(qo.s)))
        if sh > 0:
            # An output multiplier >= 1: LiteRT 2.3.0 aborts (a CHECK in
            # QuantizeMultiplierSmallerThanOneExp) or, above 1, rescales with a negative
            # RoundingDivideByPOT exponent (undefined behaviour: +-1 on x86).
            raise ModelError(f"{where(op)}: output scale {qo.s:g} is at or below 2^-19 of the larger "
                             "input scale; LiteRT cannot run it")
    size = int(np.prod(so[1:], dtype=np.int64))
    same = sa == sb == so
    sample = (1,) + so[1:]
    if same:
        index1 = index2 = np.empty(0, np.int32)
    else:  # LiteRT runs one sample of the file's shapes at a time; so do the gathers.
        for s in (sa, sb):
            check_one_sample(op, s, sample)
        index1, index2 = (np.ascontiguousarray(np.broadcast_to(
            np.arange(int(np.prod(s, dtype=np.int64)), dtype=np.int32).reshape(s), sample)).reshape(-1)
            for s in (sa, sb))
    vector = _vector_lanes(sa, sb, size) if kind == "MUL" and not same else np.empty(0, np.bool_)
    return BinaryParams(kind, -qa.zp, -qb.zp, table1, table2, mo, sh, qo.zp, lo, hi, so[1:], size,
                        index1, index2, vector, size - size % LANES, float(qa.s), float(qb.s))


def _vector_lanes(shape0: tuple, shape1: tuple, size: int) -> np.ndarray:
    """Which output elements of one sample LiteRT's int8 MUL makes in a 16-wide vector body.

    Same shapes: MulElementwise over the whole tensor. Otherwise ProcessBroadcastShapes folds the
    shapes into y0..y4 and BinaryBroadcastFiveFold calls MulElementwise on runs of y4 (y4 > 1) or
    MulSimpleBroadcast on runs of y3 (y4 == 1); each has a 16-wide body and a scalar tail per run.
    Shapes that do not fold go to BroadcastMul6DSlow: all scalar.
    """
    vector = np.zeros(size, np.bool_)
    dims = max(len(shape0), len(shape1))
    e0 = (1,) * (dims - len(shape0)) + tuple(shape0)
    e1 = (1,) * (dims - len(shape1)) + tuple(shape1)

    def runs(run: int) -> np.ndarray:
        vector[np.arange(size) % run < run - run % LANES] = True
        return vector

    if e0 == e1:
        return runs(size)
    y = five_fold(e0, e1)
    if y is None:
        return vector
    return runs(y[4] if y[4] > 1 else y[3])


def forward(p: BinaryParams, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Only an operand of the output's full rank has a batch axis, and a constant's leading 1 is
    # broadcast: a per-channel constant of shape (C,) or (1, 1, 1, C) meets every sample.
    rank = len(p.out_shape) + 1
    full = [v.shape[0] for v in (a, b) if v.ndim == rank]
    n = max(full) if full else 1
    a2 = np.ascontiguousarray(a).reshape(a.shape[0] if a.ndim == rank else 1, -1)
    b2 = np.ascontiguousarray(b).reshape(b.shape[0] if b.ndim == rank else 1, -1)
    if p.kind == "MUL":
        y = mul_int8(a2, b2, n, p.size, p.index1, p.index2, p.vector, p.vector_end, p.offset1, p.offset2,
                     p.out_mult, p.out_shift, p.out_zero_point, p.act_min, p.act_max)
    else:
        y = sub_int8(a2, b2, n, p.size, p.index1, p.index2, p.table1, p.table2, p.out_mult, p.out_shift,
                     p.out_zero_point, p.act_min, p.act_max)
    return y.reshape((n,) + p.out_shape)


@njit(cache=True, inline="always")
def _mul(x, y, offset1, offset2, out_mult, out_shift, out_zp, act_min, act_max, vector):
    r = multiply_by_quantized_multiplier(np.int32((np.int32(x) + offset1) * (np.int32(y) + offset2)),
                                         out_mult, out_shift)
    if vector:
        # vqmovn_s32 saturates to int16, vaddq_s16 adds the zero point wrapping in int16
        v = ((min(max(r, -32768), 32767) + out_zp + 32768) & 0xFFFF) - 32768
    else:
        v = np.int32(r + out_zp)
    return min(max(v, act_min), act_max)


@njit(cache=True)
def _input_table(offset, mult, shift):
    """SUB's rescale of one input, (q + offset) << 20 times mult / 2^-shift, for each of the 256
    int8 values: it depends on the value only, so the loops look it up."""
    t = np.empty(256, np.int32)
    for q in range(-128, 128):
        # MultiplyByQuantizedMultiplierSmallerThanOneExp is MultiplyByQuantizedMultiplier for the
        # shifts <= 0 quantize_multiplier gives these multipliers (< 1)
        t[q + 128] = multiply_by_quantized_multiplier(np.int32((q + offset) << LEFT_SHIFT), mult, shift)
    return t


@njit(cache=True, inline="always")
def _sub(x, y, table1, table2, out_mult, out_shift, out_zp, act_min, act_max):
    d = np.int32(table1[np.int32(x) + 128] - table2[np.int32(y) + 128])
    v = multiply_by_quantized_multiplier(d, out_mult, out_shift) + out_zp
    return min(max(v, act_min), act_max)


# One sample per task. An operand without a batch axis has one row (step 0). Same shapes (no
# index arrays) read both rows in order; otherwise each output element gathers its two inputs.

@njit(cache=True, inline="always")
def _rows(a, b, smp):
    """Sample ``smp``'s rows of ``a`` and ``b`` (row 0 of an operand without a batch axis)."""
    step_a = 1 if a.shape[0] > 1 else 0
    step_b = 1 if b.shape[0] > 1 else 0
    return a[smp * step_a], b[smp * step_b]


@njit(cache=True, parallel=True)
def mul_int8(a, b, n, size, index1, index2, vector, vector_end, offset1, offset2, out_mult, out_shift,
             out_zp, act_min, act_max):
    out = np.empty((n, size), np.int8)
    same = index1.shape[0] == 0
    for smp in prange(n):
        ar, br = _rows(a, b, smp)
        dst = out[smp]
        if same:  # MulElementwise: 16-wide body, scalar tail
            for i in range(vector_end):
                dst[i] = _mul(ar[i], br[i], offset1, offset2, out_mult, out_shift, out_zp,
                              act_min, act_max, True)
            for i in range(vector_end, size):
                dst[i] = _mul(ar[i], br[i], offset1, offset2, out_mult, out_shift, out_zp,
                              act_min, act_max, False)
        else:
            for i in range(size):
                dst[i] = _mul(ar[index1[i]], br[index2[i]], offset1, offset2, out_mult, out_shift, out_zp,
                              act_min, act_max, vector[i])
    return out


@njit(cache=True, parallel=True)
def sub_int8(a, b, n, size, index1, index2, table1, table2, out_mult, out_shift, out_zp, act_min, act_max):
    out = np.empty((n, size), np.int8)
    same = index1.shape[0] == 0
    for smp in prange(n):
        ar, br = _rows(a, b, smp)
        dst = out[smp]
        if same:
            for i in range(size):
                dst[i] = _sub(ar[i], br[i], table1, table2, out_mult, out_shift, out_zp, act_min, act_max)
        else:
            for i in range(size):
                dst[i] = _sub(ar[index1[i]], br[index2[i]], table1, table2, out_mult, out_shift, out_zp,
                              act_min, act_max)
    return out


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.outputs[0]].shape))


def clamp(p: BinaryParams) -> tuple[int, int]:
    return p.act_min, p.act_max


# --- backward ------------------------------------------------------------------------------------

def _unbroadcast(acc: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum (int64) an output-shaped array over the axes an operand of ``shape`` was broadcast along:
    the leading axes it lacks (the batch axis included) and its axes of size 1."""
    if acc.shape == tuple(shape):
        return acc
    lead = acc.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape)
                                      if s == 1 and acc.shape[lead + i] != 1)
    return acc.sum(axis=axes, dtype=np.int64).reshape(shape)


def backward(p: BinaryParams, ctx: Backward) -> list:
    """STE backward. SUB: the error passes to input 0 and, negated, to input 1. MUL: d a = g * real(b)
    and d b = g * real(a), in integers g * (q - zero point) (|g| < 2^15, |q - zp| < 2^9: int32) with
    the other input's scale joining the error scale. A broadcast input's error is summed (int64) over
    its broadcast axes (and the batch when it has no batch axis)."""
    err = ctx.errors[0]
    out = [None] * len(ctx.op.inputs)
    if err is None:
        return out
    g = err.values
    for slot in (0, 1):
        if not ctx.wants[slot]:
            continue
        x = ctx.inputs[slot]
        if p.kind == "SUB":
            if x.shape == g.shape:
                out[slot] = Error(-g if slot else g.copy(), err.scale)
            else:
                acc = _unbroadcast(g, x.shape)
                out[slot] = from_accumulator(-acc if slot else acc, err.scale)
            continue
        # the other input's q - zero point, in [-255, 255]: int16; numpy widens per chunk
        offset, scale = (p.offset2, p.scale2) if slot == 0 else (p.offset1, p.scale1)
        other = np.add(ctx.inputs[1 - slot], np.int16(offset), dtype=np.int16)
        prod = np.multiply(g, other, dtype=np.int32)
        out[slot] = from_accumulator(_unbroadcast(prod, x.shape), err.scale * scale)
    return out


def backward_bytes(op, model, q: MemoryQuery) -> int:
    """The int16 output error and input errors, and the transients of one input at a time: for MUL
    the other input's int16 offsets and the int32 products (at most the output's size each), and
    int64 sums over broadcast axes (the input's size). An upper bound for SUB (no products)."""
    out = q.elems(op.outputs[0])
    wanted = [q.elems(t) for t in op.inputs if t >= 0 and q.wants(t)]
    if not wanted:
        return 2 * out
    return 2 * out + 2 * sum(wanted) + (2 + 4) * out + 8 * max(wanted)


def output_bound(op, model, absmax) -> float:
    """|a * b| <= max|a| max|b|; |a - b| <= max|a| + max|b| (calibration's starting scale)."""
    a, b = absmax(op.inputs[0]), absmax(op.inputs[1])
    return a * b if op.kind == "MUL" else a + b


KERNELS = {
    "MUL": Kernel(prepare, forward, backward, clamp, macs, backward_bytes, output_bound=output_bound),
    "SUB": Kernel(prepare, forward, backward, clamp, macs, backward_bytes, output_bound=output_bound),
}
