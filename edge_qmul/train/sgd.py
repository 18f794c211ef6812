"""The integer SGD step: compiled loops that update int8 weights (through their fixed-point master
copies) and int32 biases in place, with weight decay, momentum and the weight quantizer's STE.

The step for channel c is -lr * g_real / s_w[c] in int8 steps, applied to the int32 gradient as
one fixed-point multiplier per channel (the Trainer computes the multipliers once per update).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant import rounding_shift_right_half_up
from .gradients import round_scaled


@njit(cache=True)
def sgd_weights(master, acc, weight, mult, shift, stride, count, sign, stochastic, limit, frac_bits,
                decay_mult, decay_shift, velocity, mu_q15, lo, hi):
    """One SGD step on master weights in place, and the int8 weights derived from them.

    STE of the weight quantizer: no update where round(master / 2^F) is clipped (|master| >= limit).
    Weight decay pulls master toward 0 by lr * wd; momentum keeps an int32 velocity (mu in Q15).
    """
    # element i belongs to channel (i // stride) % count: walk the runs of one channel in order
    # instead of dividing per element (the division kept this loop scalar)
    for block in range(master.size // (stride * count)):
        for c in range(count):
            mc = mult[c]
            sc = shift[c]
            start = (block * count + c) * stride
            for i in range(start, start + stride):
                m = np.int64(master[i])
                d = np.int64(0)
                if -limit <= m < limit:
                    d = sign * round_scaled(acc[i], mc, sc, stochastic)
                if decay_mult != 0:
                    d += sign * round_scaled(m, decay_mult, decay_shift, False)
                if velocity.size:
                    v = rounding_shift_right_half_up(np.int64(velocity[i]) * mu_q15, 15) + d
                    v = min(max(v, -(2**31)), 2**31 - 1)
                    velocity[i] = v
                    d = v
                m = min(max(m + d, lo), hi)
                master[i] = m
                weight[i] = min(max(rounding_shift_right_half_up(m, frac_bits), -127), 127)


@njit(cache=True)
def sgd_bias(bias, acc, mult, shift, stride, count, sign, stochastic, velocity, mu_q15):
    """One SGD step on int32 biases in place (their scale s_in * s_w is fine enough for no master);
    element c belongs to channel (c // stride) % count."""
    for c in range(bias.size):
        ch = (c // stride) % count
        d = sign * round_scaled(acc[c], mult[ch], shift[ch], stochastic)
        if velocity.size:
            v = rounding_shift_right_half_up(np.int64(velocity[c]) * mu_q15, 15) + d
            v = min(max(v, -(2**31)), 2**31 - 1)
            velocity[c] = v
            d = v
        bias[c] = min(max(np.int64(bias[c]) + d, -(2**31)), 2**31 - 1)
