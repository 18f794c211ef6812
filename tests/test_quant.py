"""The fixed-point primitives against exact big-integer definitions, and pinned against LiteRT."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from edge_qmul.quant import (QuantParams, activation_range, dequantize, multiply_by_quantized_multiplier,
                             multiply_by_quantized_multiplier_neon, multiply_by_quantized_multiplier_single,
                             quantize, quantize_multiplier,
                             rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

int32 = st.integers(-(2**31), 2**31 - 1)


def _round_half_away(q: Fraction) -> int:
    return int(math.floor(abs(q) + Fraction(1, 2))) * (1 if q >= 0 else -1)


def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


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
