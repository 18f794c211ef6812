"""Quantization parameters and the fixed-point arithmetic of LiteRT's int8 kernels.

Everything that turns a float scale into integers, and every rounding variant, lives here; kernels
call these helpers and never re-derive them (TFLite reference kernels do the same through
``MultiplyByQuantizedMultiplier``). Each variant is named after the LiteRT code it reproduces.

tests/test_quant.py checks each integer primitive against an exact definition in Python integers
and fractions (hypothesis, over the whole int32 or int16 range and every shift): both SRDHMs are
round-half-up of a*b / 2^31 (2^15) with the one saturation; the RoundingDivideByPOTs round half
away from zero (int16: with C's wrapped mask from exponent 16 on); ``rounding_shift_right_half_up``
rounds half up in int32 lanes and in int64; the requantizations are those roundings of the SRDHM
(floor for the floor-shift form, saturated left shift after the multiply, one rounding of the exact
product for ruy's single-rounding form), and ``requantize`` offsets and clamps the one it selects.
It also checks quantize_multiplier, activation_range and quantize/dequantize on examples. It does
not compare with LiteRT: which variant each op uses (per platform: arithmetic.py) is pinned against
LiteRT by the op tests (test_random_ops.py, tests/test_ops_*.py, test_fixtures.py) and the aarch64
recordings (test_litert_profiles.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .errors import ModelError

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# requantize's ``rounding``: which epilogue a LiteRT build runs (arithmetic.py picks per platform)
DOUBLE_ROUNDING = 0  # SRDHM, then a rounding right shift (x86; LiteRT's custom GEMV everywhere)
SINGLE_ROUNDING = 1  # ruy arm64: sqdmulh, then a rounding right shift: one rounding in all
SHIFT_AFTER_MULTIPLY = 2  # aarch64's 3x3 depthwise kernel: sqrdmulh, then sqrshl (left shifts last)


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``.

    ``scale`` and ``zero_point`` hold one entry (per tensor) or one per slice along ``axis``
    (per channel). Scales are float32 as stored in the .tflite file; LiteRT widens them to double
    only where its own code does, and so do we.
    """

    scale: np.ndarray = field(repr=False)
    zero_point: np.ndarray = field(repr=False)
    axis: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "zero_point", np.asarray(self.zero_point, dtype=np.int64).reshape(-1))
        if self.scale.size != self.zero_point.size:
            raise ModelError(
                f"quantization has {self.scale.size} scales but {self.zero_point.size} zero points")

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    @property
    def s(self) -> float:
        """The single (per-tensor) scale as a Python float (float32 value)."""
        if self.per_channel:
            raise ModelError("per-channel quantization has no single scale")
        return float(self.scale[0])

    @property
    def zp(self) -> int:
        """The single (per-tensor) zero point."""
        return int(self.zero_point[0])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, QuantParams) and self.axis == other.axis
                and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def __repr__(self) -> str:
        if self.per_channel:
            return f"QuantParams(per-channel x{self.scale.size}, axis={self.axis})"
        return f"QuantParams(scale={self.s:.6g}, zero_point={self.zp})"


def quantize(x: np.ndarray, qp: QuantParams, dtype=np.int8) -> np.ndarray:
    """Float -> integer the way LiteRT's QUANTIZE does: round(x / scale) half away from zero."""
    info = np.iinfo(dtype)
    shape = [1] * np.ndim(x)
    if qp.per_channel:
        shape[qp.axis] = -1
    scale = qp.scale.reshape(shape) if shape else qp.scale[0]
    zp = qp.zero_point.reshape(shape) if shape else qp.zero_point[0]
    with np.errstate(over="ignore"):  # a huge feature over a small scale is inf: clipped next
        v = np.asarray(x, dtype=np.float32) / scale
    # Into int64's range before the cast: beyond it, x86 casts any float to INT64_MIN, so 1e30 and
    # -1e30 both came out at one end of the int8 range (found by fuzzing sample uploads).
    q = round_half_away(np.clip(v, -2.0**40, 2.0**40)) + zp
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, qp: QuantParams) -> np.ndarray:
    """Integer -> float32 as LiteRT's DEQUANTIZE: scale * (q - zero_point), in float32."""
    shape = [1] * np.ndim(q)
    if qp.per_channel:
        shape[qp.axis] = -1
    scale = qp.scale.reshape(shape) if shape else qp.scale[0]
    zp = qp.zero_point.reshape(shape) if shape else qp.zero_point[0]
    return ((np.asarray(q, dtype=np.int32) - zp.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's std::round (TfLiteRound): ties away from zero, unlike numpy's round-half-even."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: real = q * 2^(shift - 31), q in [2^30, 2^31).

    Returns (quantized_multiplier, shift) with shift > 0 meaning a left shift. frexp is exact, and
    the mantissa is rounded with std::round (ties away from zero), as quantization_util.cc does.
    """
    if real_multiplier == 0.0:
        return 0, 0
    if not math.isfinite(real_multiplier) or real_multiplier < 0:
        raise ModelError(f"invalid requantization multiplier {real_multiplier!r}")
    q, shift = math.frexp(real_multiplier)
    q_fixed = int(math.floor(abs(q) * (1 << 31) + 0.5))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:  # too small to represent: LiteRT flushes it to zero
        return 0, 0
    return q_fixed, shift


def quantize_multipliers(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` over an array of multipliers (float64 in), compiled; the same
    arithmetic element by element (frexp is exact; the mantissa rounds half away from zero)."""
    real = np.ascontiguousarray(real, dtype=np.float64).reshape(-1)
    q = np.empty(real.size, np.int32)
    shift = np.empty(real.size, np.int32)
    bad = _quantize_multipliers(real, q, shift)
    if bad >= 0:
        raise ModelError(f"invalid requantization multiplier {float(real[bad])!r}")
    return q, shift


@njit(cache=True)
def _quantize_multipliers(real, q_out, shift_out) -> int:
    # returns the index of the first negative or non-finite multiplier, or -1
    for i in range(real.size):
        r = real[i]
        if not (r >= 0.0) or r == np.inf:
            return i
        if r == 0.0:
            q_out[i] = 0
            shift_out[i] = 0
            continue
        m, e = math.frexp(r)
        q_fixed = math.floor(abs(m) * 2147483648.0 + 0.5)
        if q_fixed == 2147483648.0:
            q_fixed = 1073741824.0
            e += 1
        if e < -31:  # too small to represent: LiteRT flushes it to zero
            q_out[i] = 0
            shift_out[i] = 0
        else:
            q_out[i] = np.int32(q_fixed)
            shift_out[i] = np.int32(e)
    return -1


def activation_range(activation: str, qp: QuantParams, dtype=np.int8) -> tuple[int, int]:
    """CalculateActivationRangeQuantized: the int8 clamp of a fused NONE / RELU / RELU6.

    The bounds are quantized with std::round of the float32 value divided by the float32 scale.
    """
    info = np.iinfo(dtype)
    lo, hi = info.min, info.max
    scale, zp = np.float32(qp.s), qp.zp

    def q(v: float) -> int:
        return zp + int(round_half_away(np.float32(v) / scale))

    if activation == "RELU":
        lo = max(lo, q(0.0))
    elif activation == "RELU6":
        lo, hi = max(lo, q(0.0)), min(hi, q(6.0))
    elif activation == "RELU_N1_TO_1":
        lo, hi = max(lo, q(-1.0)), min(hi, q(1.0))
    elif activation != "NONE":
        raise ModelError(f"unsupported fused activation {activation}")
    return lo, hi


# --- integer primitives (gemmlowp / TFLite common.h), compiled -----------------------------------

@njit(cache=True, inline="always")
def saturating_rounding_doubling_high_mul(a: np.int32, b: np.int32) -> np.int32:
    """gemmlowp SaturatingRoundingDoublingHighMul: round(a*b / 2^31); its nudge and C truncation
    round ties toward +inf (-0.5 -> 0, 0.5 -> 1); only (-2^31)^2 saturates.

    Written without branches so that LLVM vectorizes the loops that call it.
    """
    # trunc((ab + nudge) / 2^31) with gemmlowp's sign-dependent nudge equals floor((ab + 2^30) / 2^31)
    # for every product: one add and one arithmetic shift
    q = np.int32((np.int64(a) * np.int64(b) + np.int64(1 << 30)) >> 31)
    return INT32_MAX if (a == INT32_MIN) & (b == INT32_MIN) else q


@njit(cache=True, inline="always")
def saturating_rounding_doubling_high_mul_int16(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul on int16 (fixedpoint.h's scalar code): the nudge,
    then C's truncating division by 2^15: round(a*b / 2^15), ties toward +inf; only (-2^15)^2
    saturates. The LSTM's gemmlowp logistic and tanh, and HARD_SWISH, multiply this way."""
    if a == -32768 and b == -32768:
        return 32767
    ab = a * b
    v = ab + (16384 if ab >= 0 else 1 - 16384)
    return v // 32768 if v >= 0 else -((-v) // 32768)


@njit(cache=True, inline="always")
def rounding_divide_by_pot(x: np.int32, exponent: np.int32) -> np.int32:
    """gemmlowp RoundingDivideByPOT on int32: x / 2^exponent rounded half away from zero
    (exponent 0..31). The scalar requantization's final shift (C's ``>>`` then a correction)."""
    mask = np.int32((1 << exponent) - 1)
    remainder = np.int32(x & mask)
    threshold = np.int32((mask >> 1) + (1 if x < 0 else 0))
    return np.int32((x >> exponent) + (1 if remainder > threshold else 0))


@njit(cache=True, inline="always")
def wrap_int16(v):
    """Conversion to int16_t: wraps."""
    return ((v + 32768) & 0xFFFF) - 32768


@njit(cache=True, inline="always")
def rounding_divide_by_pot_int16(x, exponent):
    """gemmlowp RoundingDivideByPOT on int16 lanes (hard_swish.h): x / 2^exponent rounded half away
    from zero for exponent 0..15. Its mask ``(1 << exponent) - 1`` is cast to int16 as C does, so
    from 16 on the mask is -1 and the result is 1 for x >= 0, -1 for x < 0, as LiteRT's."""
    mask = wrap_int16((1 << exponent) - 1)
    remainder = wrap_int16(x & mask)
    threshold = wrap_int16((mask >> 1) + (1 if x < 0 else 0))
    return wrap_int16((x >> exponent) + (1 if remainder > threshold else 0))


@njit(cache=True, inline="always")
def rounding_shift_right_half_up(x, r):
    """x / 2^r rounded to nearest, ties toward +inf: floor((x + 2^(r-1)) / 2^r), x itself for r = 0.

    NEON's vrshl / arm64's srshl by -r, and the rounding shift of every integer error and gradient.
    Written as two shifts instead of an add and a shift so that it cannot overflow in x's own width
    (int32 lanes near INT32_MAX); r from 0 to the width minus one.
    """
    return (x >> r) + ((x >> max(r - 1, 0)) & np.int32(r > 0))


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier(x: np.int32, multiplier: np.int32, shift: np.int32) -> np.int32:
    """TFLite common.h MultiplyByQuantizedMultiplier (TFLITE_SINGLE_ROUNDING off: two roundings).

    Used by LiteRT's reference and depthwise/add/pool kernels.
    """
    left = shift if shift > 0 else 0
    right = -shift if shift < 0 else 0
    return rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(np.int32(x * (1 << left)), multiplier), right)


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier_neon(x: np.int32, multiplier: np.int32, shift: np.int32) -> np.int32:
    """The vector form of MultiplyByQuantizedMultiplier: vqrdmulh, then vrshl (ties toward +inf).

    LiteRT's builtin CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED requantize this way on x86 too
    (NEON intrinsics emulated over SSE); it differs from the scalar form only on negative ties
    (tests/test_quant.py: exactly there).
    """
    left = max(shift, 0)
    right = max(-shift, 0)
    y = saturating_rounding_doubling_high_mul(np.int32(x << left), multiplier)
    return np.int32(rounding_shift_right_half_up(y, right))


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier_floor_shift(x: np.int32, multiplier: np.int32,
                                                 shift: np.int32) -> np.int32:
    """vqrdmulh, then vshlq_s32 by a negative amount: a truncating (floor) right shift, no rounding.

    LiteRT's AddScalarBroadcast vector body rescales both ADD inputs this way (shift <= 0 there).
    """
    left = shift if shift > 0 else 0
    right = -shift if shift < 0 else 0
    return np.int32(saturating_rounding_doubling_high_mul(np.int32(x * (1 << left)), multiplier) >> right)


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier_single(x: np.int32, multiplier: np.int32, shift: np.int32) -> np.int32:
    """ruy's arm64 kernels: ``sshl`` by ``shift + right``, ``sqdmulh`` (a floor), ``srshl`` by
    ``right = max(-shift, 1)``: one rounding of x * m / 2^(31 - shift), ties toward +inf.

    What LiteRT's CONV_2D and FULLY_CONNECTED compute on aarch64 (arithmetic.SINGLE_ROUNDING). The
    left shift wraps in int32 one bit earlier than the double-rounding form's, as ruy's does.
    """
    right = max(-shift, 1)
    shifted = np.int32(x << (shift + right))
    y = np.int32((np.int64(shifted) * np.int64(multiplier)) >> 31)
    if shifted == INT32_MIN and multiplier == INT32_MIN:
        y = np.int32(INT32_MAX)
    return np.int32(rounding_shift_right_half_up(y, right))


@njit(cache=True, inline="always")
def multiply_then_shift_left(x: np.int32, multiplier: np.int32, shift: np.int32) -> np.int32:
    """``sqrdmulh`` then ``sqrshl`` by a positive shift: SRDHM(x, m) * 2^shift, saturated to int32
    (aarch64's 3x3 DEPTHWISE_CONV_2D kernel; elsewhere the left shift comes before the multiply)."""
    v = np.int64(saturating_rounding_doubling_high_mul(x, multiplier)) << shift
    return np.int32(min(max(v, np.int64(INT32_MIN)), np.int64(INT32_MAX)))


@njit(cache=True, inline="always")
def requantize(acc: np.int32, multiplier: np.int32, shift: np.int32, out_zero_point: np.int32,
               act_min: np.int32, act_max: np.int32, scalar_tail: bool = False, rounding: int = 0) -> np.int8:
    """The shared epilogue of conv / depthwise / fully-connected: scale, offset, clamp to int8.

    LiteRT's vector loops round the final shift half-up; ``scalar_tail`` selects the scalar
    leftover loop's rounding (half away from zero) for the elements those loops finish one by one.
    ``rounding`` SINGLE_ROUNDING is ruy's arm64 epilogue instead; SHIFT_AFTER_MULTIPLY the aarch64
    3x3 depthwise kernel's, which applies a left shift after the multiply.
    """
    if rounding == SINGLE_ROUNDING:
        v = multiply_by_quantized_multiplier_single(acc, multiplier, shift)
    elif rounding == SHIFT_AFTER_MULTIPLY and shift > 0:
        v = multiply_then_shift_left(acc, multiplier, shift)
    elif scalar_tail:
        v = multiply_by_quantized_multiplier(acc, multiplier, shift)
    else:
        v = multiply_by_quantized_multiplier_neon(acc, multiplier, shift)
    # int32 addition, wrapping as LiteRT's does (reachable only for |v| near 2^31)
    return np.int8(min(max(np.int32(v + out_zero_point), act_min), act_max))
