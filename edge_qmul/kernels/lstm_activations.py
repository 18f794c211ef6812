"""gemmlowp's int16 fixed-point logistic and tanh (fixedpoint.h, generic scalar code), tabulated.

LiteRT's integer LSTM applies them to int16 gate pre-activations (Q3.12, or Q(15 + cell scale) for
the cell state): exact functions of an int16, so each is a 65536-entry table built once per process
from this transcription. Raw values are int16 held in int64; C's int16 arithmetic wraps
(quant.wrap_int16), and the rounding primitives are quant.py's.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant import (rounding_divide_by_pot, saturating_rounding_doubling_high_mul_int16 as _srdhm16,
                     wrap_int16 as _wrap16)


@njit(cache=True, inline="always")
def _mul_pot16(x, exponent):
    """SaturatingRoundingMultiplyByPOT<exponent> on int16 (also Rescale)."""
    if exponent > 0:
        threshold = (1 << (15 - exponent)) - 1
        if x > threshold:
            return 32767
        if x < -threshold:
            return -32768
        return x << exponent
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    return x


@njit(cache=True, inline="always")
def _const16(raw32):
    """GEMMLOWP_CHECKED_FIXEDPOINT_CONSTANT for int16: the int32 constant rounded right by 16."""
    return rounding_divide_by_pot(raw32, 16)


@njit(cache=True)
def _exp_quarter16(a):
    # exp(x) for x in [-1/4, 0), F0 in and out: Taylor expansion around -1/8
    constant_term = _const16(1895147668)
    one_third = _const16(715827883)
    x = _wrap16(a + (1 << 12))
    x2 = _srdhm16(x, x)
    x3 = _srdhm16(x2, x)
    x4 = _srdhm16(x2, x2)
    x4_over_4 = _mul_pot16(x4, -2)
    poly = _mul_pot16(_wrap16(_srdhm16(_wrap16(x4_over_4 + x3), one_third) + x2), -1)
    return max(-32768, min(32767, constant_term + _srdhm16(constant_term, _wrap16(x + poly))))


@njit(cache=True)
def _exp_negative16(a, integer_bits):
    """exp_on_negative_values: exp(a) for a <= 0 in Q(integer_bits), Q0.15 out."""
    frac = 15 - integer_bits
    one_quarter = 1 << (frac - 2)
    a_mod = _wrap16((a & (one_quarter - 1)) - one_quarter)
    result = _exp_quarter16(_mul_pot16(a_mod, integer_bits))
    remainder = _wrap16(a_mod - a)
    exps = (-2, -1, 0, 1, 2, 3, 4)
    mults = (1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242)
    for k in range(7):
        e = exps[k]
        if integer_bits > e and (remainder & (1 << (frac + e))) != 0:
            result = _srdhm16(result, _const16(mults[k]))
    if integer_bits > 5:
        if a < _const16(-(1 << (36 - integer_bits))):
            result = 0
    if a == 0:
        result = 32767
    return result


@njit(cache=True)
def _newton_reciprocal16(a):
    # the Newton-Raphson loop shared by one_over_one_plus_x_for_x_in_0_1 and
    # one_minus_x_over_one_plus_x_for_x_in_0_1: x ~ 1 / ((1 + a) / 2) in F2, a in F0 (raw values)
    half_denominator = a + 32767  # RoundingHalfSum(a, F0::One()): (sum + sign) / 2, C division
    half_denominator = (half_denominator + (1 if half_denominator >= 0 else -1))
    half_denominator = half_denominator // 2 if half_denominator >= 0 else -((-half_denominator) // 2)
    x = _wrap16(_const16(1515870810) + _srdhm16(half_denominator, _const16(-1010580540)))
    for _ in range(3):
        one_minus = _wrap16((1 << 13) - _srdhm16(half_denominator, x))
        x = _wrap16(x + _mul_pot16(_srdhm16(x, one_minus), 2))
    return x


@njit(cache=True)
def gemmlowp_logistic16(a, integer_bits):
    """gemmlowp::logistic on FixedPoint<int16, integer_bits> -> FixedPoint<int16, 0> (raw)."""
    positive = a > 0
    abs_a = a if positive else _wrap16(-a)
    # one_over_one_plus_x_for_x_in_0_1(exp(-|a|)): Rescale<0>(ExactMulByPot<-1>(x))
    r_pos = _mul_pot16(_newton_reciprocal16(_exp_negative16(_wrap16(-abs_a), integer_bits)), 1)
    if a == 0:
        return 16384
    return r_pos if positive else _wrap16(32767 - r_pos)


@njit(cache=True)
def gemmlowp_tanh16(a, integer_bits):
    """gemmlowp::tanh on FixedPoint<int16, integer_bits> -> FixedPoint<int16, 0> (raw)."""
    negative = a < 0
    n = a if negative else _wrap16(-a)
    # one_minus_x_over_one_plus_x_for_x_in_0_1(exp(2n)): Rescale<0>(x - F2::One())
    t = _mul_pot16(_wrap16(_newton_reciprocal16(_exp_negative16(n, integer_bits + 1)) - (1 << 13)), 2)
    if a == 0:
        return 0
    return _wrap16(-t) if negative else t


@njit(cache=True)
def _table(kind, integer_bits):
    out = np.empty(65536, np.int16)
    for i in range(65536):
        v = i - 32768
        out[i] = gemmlowp_logistic16(v, integer_bits) if kind == 0 else gemmlowp_tanh16(v, integer_bits)
    return out


_TABLES: dict = {}


def activation_table(kind: str, integer_bits: int) -> np.ndarray:
    """int16 -> int16 table of gemmlowp's logistic ("sigmoid") or tanh at ``integer_bits``: entry
    v + 32768 is f(v). Built once per process."""
    key = (kind, integer_bits)
    if key not in _TABLES:
        _TABLES[key] = _table(0 if kind == "sigmoid" else 1, integer_bits)
    return _TABLES[key]
