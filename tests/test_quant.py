"""Every fixed-point primitive and rounding shift of quant.py against an exact definition computed
with Python integers and fractions.Fraction (hypothesis over the whole int32 or int16 range and every
shift); which primitive each op uses is pinned against LiteRT by the op tests, not here."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from edge_qmul.quant import (SHIFT_AFTER_MULTIPLY, SINGLE_ROUNDING, QuantParams, activation_range, dequantize,
                             multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_floor_shift,
                             multiply_by_quantized_multiplier_neon, multiply_by_quantized_multiplier_single,
                             multiply_then_shift_left, quantize, quantize_multiplier, requantize,
                             rounding_divide_by_pot, rounding_divide_by_pot_int16, rounding_shift_right_half_up,
                             saturating_rounding_doubling_high_mul, saturating_rounding_doubling_high_mul_int16,
                             wrap_int16)

int32 = st.integers(-(2**31), 2**31 - 1)
int16 = st.integers(-(2**15), 2**15 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)


def _round_half_away(q: Fraction) -> int:
    return int(math.floor(abs(q) + Fraction(1, 2))) * (1 if q >= 0 else -1)


def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


def _srdhm(a: int, b: int) -> int:
    return 2**31 - 1 if a == b == -(2**31) else _round_half_up(Fraction(a * b, 2**31))


def _saturate32(v: int) -> int:
    return min(max(v, -(2**31)), 2**31 - 1)


@settings(deadline=None, max_examples=300)
@given(int32, int32)
@example(-(2**15), 2**15)      # -0.5: gemmlowp's nudge + truncation round ties toward +inf
@example(-3 * 2**15, 2**15)    # -1.5 -> -1
@example(2**15, 2**15)         # 0.5 -> 1
@example(-(2**31), -(2**31))   # the one overflow, saturated
def test_srdhm_is_rounded_doubled_high_product(a, b):
    expected = 2**31 - 1 if a == b == -(2**31) else _round_half_up(Fraction(a * b, 2**31))
    assert saturating_rounding_doubling_high_mul(np.int32(a), np.int32(b)) == expected


@settings(deadline=None, max_examples=300)
@given(int32, st.integers(0, 31))
@example(-3, 1)  # -1.5 -> -2: away from zero, unlike the vector shift
@example(3, 1)
def test_rounding_divide_by_pot_rounds_half_away(x, e):
    assert rounding_divide_by_pot(np.int32(x), np.int32(e)) == _round_half_away(Fraction(x, 2**e))


@settings(deadline=None, max_examples=300)
@given(st.integers(-(2**20), 2**20), st.integers(2**30, 2**31 - 1), st.integers(-20, 0))
def test_the_two_requantizations_differ_only_on_negative_ties(x, m, shift):
    high = saturating_rounding_doubling_high_mul(np.int32(x), np.int32(m))
    a = multiply_by_quantized_multiplier(np.int32(x), np.int32(m), np.int32(shift))
    b = multiply_by_quantized_multiplier_neon(np.int32(x), np.int32(m), np.int32(shift))
    assert a == _round_half_away(Fraction(int(high), 2**-shift))
    assert b == _round_half_up(Fraction(int(high), 2**-shift))


@settings(deadline=None, max_examples=500)
@given(st.integers(-(2**24), 2**24), st.integers(2**30, 2**31 - 1), st.integers(-31, 5))
@example(-(2**15), 2**30, 0)    # -0.25 at shift 0: ruy arm64 still rounds (by one bit), -> 0
@example(-3 * 2**16, 2**30, -1)  # exactly -0.75 * 2 / 2 ... a tie after the product: half up
@example(2**24, 2**31 - 1, 5)   # the largest left shift that does not wrap
def test_single_rounding_is_one_rounding_of_the_exact_product(x, m, shift):
    """ruy's arm64 epilogue (sqdmulh, srshl) rounds x * m / 2^(31 - shift) once, ties toward +inf,
    where it does not wrap (|x| < 2^(30 - shift))."""
    got = multiply_by_quantized_multiplier_single(np.int32(x), np.int32(m), np.int32(shift))
    assert got == _round_half_up(Fraction(x * m, 2 ** (31 - shift)))


@pytest.mark.parametrize("real", [1e-12, 2.0**-33, 0.0003, 0.25, 0.5, 0.7, 0.999999999999, 1.0, 1.5, 3.0])
def test_quantize_multiplier_represents_real(real):
    m, shift = quantize_multiplier(real)
    if real < 2.0**-32:
        assert (m, shift) == (0, 0)  # flushed to zero like LiteRT
        return
    assert 2**30 <= m < 2**31
    assert abs(m * 2.0 ** (shift - 31) - real) <= 2.0 ** (shift - 32)


def test_quantize_multiplier_mantissa_rounding_carries():
    # A mantissa that rounds up to 2^31 must renormalize to 2^30 and bump the shift.
    m, shift = quantize_multiplier(1.0 - 2.0**-40)
    assert (m, shift) == (2**30, 1)


def test_activation_ranges():
    q = QuantParams([6 / 255], [-128])
    assert activation_range("NONE", q) == (-128, 127)
    assert activation_range("RELU", q) == (-128, 127)
    assert activation_range("RELU6", q) == (-128, 127)
    q = QuantParams([0.05], [10])
    assert activation_range("RELU", q) == (10, 127)
    assert activation_range("RELU6", q) == (10, 127)
    q = QuantParams([0.1], [-20])
    assert activation_range("RELU6", q) == (-20, 40)


def test_quantize_rounds_half_away_and_saturates():
    q = QuantParams([0.5], [0])
    x = np.array([0.25, -0.25, 0.75, -0.75, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(quantize(x, q), [1, -1, 2, -2, 127, -128])
    np.testing.assert_array_equal(dequantize(np.array([-128, 0, 127], np.int8), q), [-64.0, 0.0, 63.5])


@settings(deadline=None, max_examples=300)
@given(int16, int16)
@example(-(2**14), 1)           # -0.5 -> 0: ties toward +inf
@example(2**14, 1)              # 0.5 -> 1
@example(-(2**15), -(2**15))    # the one overflow, saturated
def test_srdhm_int16_is_rounded_doubled_high_product(a, b):
    expected = 2**15 - 1 if a == b == -(2**15) else _round_half_up(Fraction(a * b, 2**15))
    assert saturating_rounding_doubling_high_mul_int16(a, b) == expected


@settings(deadline=None, max_examples=300)
@given(int16, st.integers(0, 15))
@example(-3, 1)  # -1.5 -> -2
@example(-(2**15), 15)
def test_rounding_divide_by_pot_int16_rounds_half_away(x, e):
    assert rounding_divide_by_pot_int16(x, e) == _round_half_away(Fraction(x, 2**e))


@settings(deadline=None, max_examples=100)
@given(int16, st.integers(16, 31))
def test_rounding_divide_by_pot_int16_keeps_cs_wrapped_mask(x, e):
    """From exponent 16 on, C's cast of the mask to int16 gives -1: every x >= 0 -> 1, x < 0 -> -1."""
    assert rounding_divide_by_pot_int16(x, e) == (1 if x >= 0 else -1)


@settings(deadline=None, max_examples=500)
@given(int32, st.integers(0, 31))
@example(-3, 1)                  # -1.5 -> -1: ties toward +inf, unlike RoundingDivideByPOT
@example(2**31 - 1, 1)           # no overflow in int32 lanes near INT32_MAX
@example(-(2**31), 31)
def test_rounding_shift_right_half_up_in_int32_lanes(x, r):
    got = rounding_shift_right_half_up(np.int32(x), np.int32(r))
    assert got == _round_half_up(Fraction(x, 2**r))


@settings(deadline=None, max_examples=500)
@given(int64, st.integers(0, 63))
@example(2**63 - 1, 1)
@example(-(2**63), 63)
def test_rounding_shift_right_half_up_in_int64(x, r):
    assert rounding_shift_right_half_up(np.int64(x), r) == _round_half_up(Fraction(x, 2**r))


@settings(deadline=None, max_examples=300)
@given(int32, st.integers(2**30, 2**31 - 1), st.integers(-31, 0))
def test_scalar_and_vector_requantization_over_int32(x, m, shift):
    """The two double-rounding forms over every int32 accumulator and right shift."""
    high = _srdhm(x, m)
    assert multiply_by_quantized_multiplier(np.int32(x), np.int32(m), np.int32(shift)) == \
        _round_half_away(Fraction(high, 2**-shift))
    assert multiply_by_quantized_multiplier_neon(np.int32(x), np.int32(m), np.int32(shift)) == \
        _round_half_up(Fraction(high, 2**-shift))


@settings(deadline=None, max_examples=300)
@given(int32, st.integers(2**30, 2**31 - 1), st.integers(-31, 0))
def test_floor_shift_requantization_truncates(x, m, shift):
    got = multiply_by_quantized_multiplier_floor_shift(np.int32(x), np.int32(m), np.int32(shift))
    assert got == math.floor(Fraction(_srdhm(x, m), 2**-shift))


@settings(deadline=None, max_examples=300)
@given(int32, st.integers(2**30, 2**31 - 1), st.integers(1, 31))
def test_shift_after_multiply_saturates_the_left_shift(x, m, shift):
    got = multiply_then_shift_left(np.int32(x), np.int32(m), np.int32(shift))
    assert got == _saturate32(_srdhm(x, m) * 2**shift)


@settings(deadline=None, max_examples=300)
@given(int16)
def test_wrap_int16_is_cs_conversion(v):
    for w in (v, v + 2**16, v - 2**16, v + 5 * 2**16):
        assert wrap_int16(w) == v


@settings(deadline=None, max_examples=300)
@given(st.integers(-(2**24), 2**24), st.integers(2**30, 2**31 - 1), st.integers(-31, 5), st.integers(-128, 127),
       st.sampled_from([0, SINGLE_ROUNDING, SHIFT_AFTER_MULTIPLY]), st.booleans())
def test_requantize_is_the_chosen_rounding_offset_and_clamped(acc, m, shift, zp, rounding, scalar_tail):
    args = np.int32(acc), np.int32(m), np.int32(shift)
    if rounding == SINGLE_ROUNDING:
        v = multiply_by_quantized_multiplier_single(*args)
    elif rounding == SHIFT_AFTER_MULTIPLY and shift > 0:
        v = multiply_then_shift_left(*args)
    elif scalar_tail:
        v = multiply_by_quantized_multiplier(*args)
    else:
        v = multiply_by_quantized_multiplier_neon(*args)
    got = requantize(*args, np.int32(zp), np.int32(-128), np.int32(127), scalar_tail, rounding)
    assert got == min(max(int(v) + zp, -128), 127)
