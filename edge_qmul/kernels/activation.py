"""Elementwise int8 activations: LOGISTIC, TANH, HARD_SWISH, RELU, RELU6, RELU_N1_TO_1, LEAKY_RELU.

Each maps one int8 input value to one int8 output value, so prepare runs LiteRT's arithmetic once
for each of the 256 input values and the forward is one table gather per element. The table is
filled by the code LiteRT 2.3.0's builtin resolver runs on x86_64 (tflite/kernels/activations.cc):

- LOGISTIC, TANH: Register_LOGISTIC / Register_TANH are the kGenericOptimized kernels. Their int8
  path builds a 256-entry table at prepare (LUTPopulate<int8_t>: float32 math, libm expf / tanhf,
  TfLiteRound) and looks it up at eval; we build the same table with the same float32 steps.
  LOGISTIC requires an output scale of exactly 1/256 (any zero point); TANH accepts any output
  quantization. The converter writes 1/256, -128 and 1/128, 0: ``fixed_quant``.
- HARD_SWISH: optimized_ops::HardSwish has its NEON body under ``__ARM_NEON`` only, so on x86
  every element takes reference_ops::HardSwish (int16 fixed point with HardSwishParams). On
  aarch64 the NEON loops take a sample's first 8 * (size // 8) elements: their doubling high
  multiply floors (vqdmulh) where the reference truncates toward zero, and their rounding shifts
  round ties up (vrshl) where the reference rounds them away from zero; a second table holds them.
- RELU, RELU6, RELU_N1_TO_1: QuantizedReluX -> reference_ops::ReluX: MultiplyByQuantizedMultiplier
  by s_in / s_out (a float32 quotient), then the clamp zp + roundf(bound / s_out).
- LEAKY_RELU: reference_ops::QuantizeLeakyRelu: the identity multiplier where x >= zp, the alpha
  multiplier (its magnitude, negated for a negative alpha) below.

Backward (straight-through at the clamp): the derivative is a function of the int8 input too, so a
second 256-entry table holds f'(s_in * (q - zp_in)) in fixed point (2^-bits units) and the input
error is ``g * d[q]`` in int32, rounded back to int16 by grad.from_accumulator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ModelError
from ..grad import Error, from_accumulator
from ..quant import (QuantParams, activation_range, multiply_by_quantized_multiplier, quantize_multiplier,
                     rounding_divide_by_pot_int16, rounding_shift_right_half_up,
                     saturating_rounding_doubling_high_mul_int16 as _srdhm16, wrap_int16 as _i16)
from .common import libm_float32, output, per_tensor, tensor, vector_split, where
from .contract import Kernel, MemoryQuery, error_bytes

D_MAX = (1 << 15) - 1  # |d[q]| bound of the derivative table: |g * d| < 2^30 fits int32


@dataclass(frozen=True)
class ActivationParams:
    table: np.ndarray       # int8[256]: output for input q at table[q + 128]
    deriv: np.ndarray       # int32[256]: round(f'(s_in * (q - zp_in)) * 2^bits) at deriv[q + 128]
    bits: int
    lo: int                 # the int8 clamp of the output (the trainer's STE mask)
    hi: int
    vector_table: np.ndarray | None = None  # aarch64 HARD_SWISH: the NEON loops' table, for each
                                            # sample's first 8 * (size // 8) elements


# --- libm float32 functions (LiteRT calls std::exp / std::tanh on float: expf / tanhf) ----------

_expf = libm_float32("expf", math.exp)
_tanhf = libm_float32("tanhf", math.tanh)
F1 = np.float32(1.0)


def _sigmoidf(v: np.float32) -> np.float32:
    return np.float32(F1 / np.float32(F1 + _expf(-v)))  # 1.0f / (1.0f + std::exp(-value))


def lut_populate(qi: QuantParams, qo: QuantParams, transform) -> np.ndarray:
    """LUTPopulate<int8_t> (internal/common.h), every step in float32 as LiteRT does it."""
    inverse_scale = np.float32(F1 / np.float32(qo.s))
    s_in, zp_out = np.float32(qi.s), np.float32(qo.zp)
    table = np.empty(256, np.int8)
    for q in range(-128, 128):
        dequantized = np.float32(s_in * np.float32(q - qi.zp))
        rescaled = np.float32(transform(dequantized) * inverse_scale)
        rescaled = np.float32(math.copysign(math.floor(abs(float(rescaled)) + 0.5), rescaled))  # roundf
        quantized = int(np.float32(rescaled + zp_out))  # static_cast<int32_t>: truncation
        table[q + 128] = min(max(quantized, -128), 127)
    return table


# --- integer tables: LiteRT's per-element code run once per int8 value ---------------------------

@njit(cache=True)
def relu_table(zp_in, zp_out, mult, shift, lo, hi):
    """reference_ops::ReluX for q = -128..127."""
    table = np.empty(256, np.int8)
    for q in range(-128, 128):
        v = zp_out + multiply_by_quantized_multiplier(np.int32(q - zp_in), mult, shift)
        table[q + 128] = min(max(v, lo), hi)
    return table


@njit(cache=True)
def leaky_relu_table(zp_in, zp_out, mult_id, shift_id, mult_alpha, shift_alpha, negate):
    """reference_ops::QuantizeLeakyRelu for q = -128..127 (mult_alpha is |multiplier|)."""
    table = np.empty(256, np.int8)
    for q in range(-128, 128):
        x = np.int32(q - zp_in)
        if x >= 0:
            v = zp_out + multiply_by_quantized_multiplier(x, mult_id, shift_id)
        else:
            a = multiply_by_quantized_multiplier(x, mult_alpha, shift_alpha)
            v = zp_out + (-a if negate else a)
        table[q + 128] = min(max(v, -128), 127)
    return table


@njit(cache=True, inline="always")
def _div_trunc(a, b):
    """C integer division (rounds toward zero)."""
    q = abs(a) // b
    return q if a >= 0 else -q


@njit(cache=True, inline="always")
def _sdhm16(a, b):
    """hard_swish.h SaturatingDoublingHighMul: like SQDMULH, truncating."""
    if a == b and a == -32768:
        return 32767
    return _i16(_div_trunc(a * b, 1 << 15))


@njit(cache=True, inline="always")
def _sat_left_shift16(v, amount):
    return min(max(v * (1 << amount), -32768), 32767)


@njit(cache=True)
def hard_swish_table(zp_in, zp_out, out_mult16, out_exp, relu_mult16, relu_exp, neon=False):
    """reference_ops::HardSwish (hard_swish.h) for q = -128..127, int16 steps wrapped as in C;
    ``neon``: optimized_ops::HardSwish's NEON body instead (vqdmulh floors, vrshl rounds half up)."""
    table = np.empty(256, np.int8)
    for q in range(-128, 128):
        hires = _i16(_i16(q - zp_in) * 128)
        preshift_out = _srdhm16(hires, out_mult16)
        reluish = hires
        if relu_exp > 0:
            reluish = _sat_left_shift16(reluish, relu_exp - 1)
        reluish = _srdhm16(reluish, relu_mult16)
        if relu_exp > 0:
            reluish = _sat_left_shift16(reluish, 1)
        if relu_exp < 0:
            reluish = _rshr_up16(reluish, -relu_exp) if neon else rounding_divide_by_pot_int16(reluish, -relu_exp)
        reluish = _i16((reluish + (1 << 15)) >> 1)  # [-1, 1] -> [0, 1]
        if neon:
            v = _rshr_up16(_floor_dhm16(reluish, preshift_out), -out_exp)
        else:
            v = rounding_divide_by_pot_int16(_sdhm16(reluish, preshift_out), -out_exp)
        v = _i16(v + zp_out)
        table[q + 128] = min(max(v, -128), 127)
    return table


@njit(cache=True, inline="always")
def _floor_dhm16(a, b):
    """vqdmulh on int16: floor(2ab / 2^16), saturating only for (-2^15)^2."""
    if a == b and a == -32768:
        return 32767
    return _i16((a * b) >> 15)


@njit(cache=True, inline="always")
def _rshr_up16(x, exponent):
    """vrshl by -exponent on int16 lanes: a rounding right shift, ties toward +inf; none for
    exponent <= 0."""
    if exponent <= 0:
        return x
    return _i16(rounding_shift_right_half_up(x, exponent))


def _int16_multiplier(real: float) -> tuple[int, int]:
    """QuantizeMultiplier then DownScaleInt32ToInt16Multiplier (common.h)."""
    m, e = quantize_multiplier(real)
    if m >= 2**31 - 1 - (1 << 15):
        return 32767, e
    return int(rounding_shift_right_half_up(m, 16)), e


# --- derivative tables ---------------------------------------------------------------------------

def _sigmoid64(r):
    return 0.5 * (1.0 + np.tanh(0.5 * r))


def derivative(kind: str, r: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """f'(r) in float64 for real inputs r (one-sided choices at kinks: the side LiteRT's forward
    takes; a clamped side is masked by the trainer anyway)."""
    if kind == "LOGISTIC":
        s = _sigmoid64(r)
        return s * (1.0 - s)
    if kind == "TANH":
        return 1.0 - np.tanh(r) ** 2
    if kind == "HARD_SWISH":  # x * relu6(x + 3) / 6
        return np.where(r < -3.0, 0.0, np.where(r > 3.0, 1.0, (2.0 * r + 3.0) / 6.0))
    if kind == "RELU":
        return (r > 0.0).astype(np.float64)
    if kind == "RELU6":
        return ((r > 0.0) & (r < 6.0)).astype(np.float64)
    if kind == "RELU_N1_TO_1":
        return ((r > -1.0) & (r < 1.0)).astype(np.float64)
    if kind == "LEAKY_RELU":
        return np.where(r >= 0.0, 1.0, alpha)
    raise ModelError(f"no derivative for {kind}")


def derivative_table(kind: str, qi: QuantParams, alpha: float = 0.0) -> tuple[np.ndarray, int]:
    """d[q + 128] = round(f'(s_in * (q - zp_in)) * 2^bits), bits the most that keeps |d| <= D_MAX."""
    r = float(qi.s) * (np.arange(-128, 128, dtype=np.float64) - qi.zp)
    d = derivative(kind, r, alpha)
    top = float(np.max(np.abs(d)))
    bits = int(np.floor(np.log2(D_MAX / top))) if top > 0 else 0
    bits = min(max(bits, 0), 30)
    return np.clip(np.rint(d * 2.0**bits), -D_MAX, D_MAX).astype(np.int32), bits


# --- prepare -------------------------------------------------------------------------------------

def _tensors(op, model):
    if len(op.inputs) != 1 or len(op.outputs) != 1:
        raise ModelError(f"{where(op)}: expected 1 input and 1 output, got {len(op.inputs)} and "
                         f"{len(op.outputs)}")
    x = tensor(model, op, 0, dtype=np.int8)
    out = output(model, op)
    qi, qo = per_tensor(op, x, "input"), per_tensor(op, out, "output")
    if tuple(x.shape[1:]) != tuple(out.shape[1:]):
        raise ModelError(f"{where(op)}: output shape {list(out.shape)} != input {list(x.shape)}")
    return qi, qo


def prepare(op, model) -> ActivationParams:
    kind = op.kind
    qi, qo = _tensors(op, model)
    lo, hi = -128, 127
    alpha = 0.0
    vector_table = None
    if kind == "LOGISTIC":
        if qo.s != 1.0 / 256:  # SigmoidPrepare: TF_LITE_ENSURE(output->params.scale == 1. / 256)
            raise ModelError(f"{where(op)}: int8 LOGISTIC output must have scale 1/256, got {qo.s}")
        table = lut_populate(qi, qo, _sigmoidf)
    elif kind == "TANH":
        table = lut_populate(qi, qo, _tanhf)
    elif kind == "HARD_SWISH":
        # HardSwishPrepare: float32 scales; the int16 multipliers of hard_swish.h
        hires = np.float32(np.float32(1.0 / 128.0) * np.float32(qi.s))
        out_m, out_e = _int16_multiplier(float(np.float32(hires / np.float32(qo.s))))
        if out_e > 0:
            raise ModelError(f"{where(op)}: HARD_SWISH needs s_in / 128 < s_out "
                             f"(s_in {qi.s}, s_out {qo.s})")
        relu_m, relu_e = _int16_multiplier(float(np.float32(hires / np.float32(3.0 / 32768.0))))
        table = hard_swish_table(qi.zp, qo.zp, out_m, out_e, relu_m, relu_e)
        if model.litert.neon_hard_swish:
            vector_table = hard_swish_table(qi.zp, qo.zp, out_m, out_e, relu_m, relu_e, True)
    elif kind in ("RELU", "RELU6", "RELU_N1_TO_1"):
        # ReluPrepare: input->params.scale / output->params.scale is a float32 quotient
        m, e = quantize_multiplier(float(np.float32(qi.s) / np.float32(qo.s)))
        lo, hi = activation_range(kind, qo)
        table = relu_table(qi.zp, qo.zp, m, e, lo, hi)
    elif kind == "LEAKY_RELU":
        # LeakyReluPrepare: s_in * alpha / s_out and s_in / s_out, both in float32
        alpha = float(np.float32(op.options.get("alpha", 0.0)))
        if not math.isfinite(alpha):
            raise ModelError(f"{where(op)}: LEAKY_RELU alpha must be finite, got {alpha}")
        real_alpha = np.float32(np.float32(qi.s) * np.float32(alpha)) / np.float32(qo.s)
        m_a, e_a = quantize_multiplier(abs(float(real_alpha)))
        m_i, e_i = quantize_multiplier(float(np.float32(qi.s) / np.float32(qo.s)))
        table = leaky_relu_table(qi.zp, qo.zp, m_i, e_i, m_a, e_a, alpha < 0)
    else:
        raise ModelError(f"{where(op)}: not an activation op")
    deriv, bits = derivative_table(kind, qi, alpha)
    return ActivationParams(table, deriv, bits, lo, hi, vector_table)


# --- forward / backward --------------------------------------------------------------------------

@njit(cache=True)
def lookup(x, table):
    """out[i] = table[x[i] + 128] over a flat int8 array (optimized_integer_ops::LookupTable)."""
    out = np.empty(x.size, np.int8)
    for i in range(x.size):
        out[i] = table[np.int32(x[i]) + 128]
    return out


@njit(cache=True)
def scale_by_table(g, x, deriv):
    """acc[i] = g[i] * deriv[x[i] + 128] in int32 (|g| < 2^15, |deriv| < 2^15)."""
    acc = np.empty(g.size, np.int32)
    for i in range(g.size):
        acc[i] = np.int32(g[i]) * deriv[np.int32(x[i]) + 128]
    return acc


def forward(p: ActivationParams, x: np.ndarray) -> np.ndarray:
    if p.vector_table is not None:  # per sample: the NEON loops' elements, then the scalar tail
        rows, vec = vector_split(np.ascontiguousarray(x), 8)
        out = np.empty(rows.shape, np.int8)
        for part, table in ((slice(None, vec), p.vector_table), (slice(vec, None), p.table)):
            block = np.ascontiguousarray(rows[:, part])
            out[:, part] = lookup(block.reshape(-1), table).reshape(block.shape)
        return out.reshape(x.shape)
    return lookup(np.ascontiguousarray(x).reshape(-1), p.table).reshape(x.shape)


def backward(p: ActivationParams, ctx) -> list:
    """dL/dx = dL/dy * f'(x): the clamp-masked output error times the derivative table."""
    if not ctx.wants[0]:
        return [None]
    x = np.ascontiguousarray(ctx.inputs[0])
    e = ctx.error(0)
    if e is None:  # no error reached the output
        return [Error(np.zeros(x.shape, np.int16), 1.0)]
    acc = scale_by_table(np.ascontiguousarray(e.values).reshape(-1), x.reshape(-1), p.deriv)
    return [from_accumulator(acc.reshape(x.shape), e.scale * 2.0 ** -p.bits)]


def clamp(p: ActivationParams) -> tuple[int, int]:
    return p.lo, p.hi


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.outputs[0]].shape))


def backward_bytes(op, model, q: MemoryQuery) -> int:
    """Errors in and out, plus the int32 products before they are rounded to int16."""
    made = 4 * q.elems(op.inputs[0]) if q.wants(op.inputs[0]) else 0
    return error_bytes(op, model, q) + made


def fixed_quant(op, model) -> QuantParams:
    """The output quantization the TFLite int8 spec fixes: sigmoid 1/256, -128; tanh 1/128, 0."""
    if op.kind == "LOGISTIC":
        return QuantParams(np.float32(1.0 / 256), -128)
    return QuantParams(np.float32(1.0 / 128), 0)


def output_bound(op, model, absmax) -> float:
    """|f(x)| <= this for |x| <= absmax(input): calibration's starting scale."""
    a = absmax(op.inputs[0])
    if op.kind == "HARD_SWISH":  # x * relu6(x + 3) / 6: at least -3/8, at most x for x >= 3
        return max(0.375, a if a > 3 else a * (a + 3) / 6)
    if op.kind == "LEAKY_RELU":
        return a * max(1.0, abs(float(op.options.get("alpha", 0.2))))
    if op.kind == "RELU6":
        return min(a, 6.0)
    if op.kind == "RELU_N1_TO_1":
        return min(a, 1.0)
    return a


_computed = Kernel(prepare, forward, backward, clamp, macs, backward_bytes, output_bound=output_bound)
_fixed = Kernel(prepare, forward, backward, clamp, macs, backward_bytes, output_quant="fixed",
                fixed_quant=fixed_quant)

KERNELS = {
    "LOGISTIC": _fixed,
    "TANH": _fixed,
    "HARD_SWISH": _computed,
    "RELU": _computed,
    "RELU6": _computed,
    "RELU_N1_TO_1": _computed,
    "LEAKY_RELU": _computed,
}
