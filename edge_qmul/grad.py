"""Integer errors: gradients w.r.t. activations as int16 values times a per-tensor scale.

An error tensor holds ``values`` (int16, |v| <= ERROR_MAX) and ``scale`` (a float, bookkeeping
only): the real gradient is ``values * scale``. int8 would underflow (gradients are heavy-tailed:
most entries are far below the batch's max-abs, and a deep net's early layers see the product of
every rounding above them), so errors use int16's 15 magnitude bits. Every product with an int8
weight or a (x - zero_point) of 9 bits stays far inside int32; where many such products meet in one
int32 sum, the folded error gives up low bits first (channel_fold).

Backward kernels accumulate in wider integers; ``from_accumulator`` brings such a sum back to an
error by a rounding right shift chosen from its max-abs, so rescaling costs a shift, never a multiply.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .quant import rounding_shift_right_half_up

ERROR_BITS = 15                          # magnitude bits of an error value
ERROR_MAX = (1 << ERROR_BITS) - 1        # 32767: int16


@dataclass
class Error:
    """dL/d(real activation) = values * scale, values int16 in [-ERROR_MAX, ERROR_MAX]."""

    values: np.ndarray
    scale: float

    def real(self) -> np.ndarray:
        return self.values.astype(np.float64) * self.scale


@njit(cache=True)
def shift_for(max_abs, bits=ERROR_BITS):
    """Smallest right shift that brings ``max_abs`` to at most 2^bits - 1."""
    r = 0
    while (max_abs >> r) >= (1 << bits):
        r += 1
    return r


def from_accumulator(acc: np.ndarray, scale: float) -> Error:
    """Round an integer accumulator (any width) to an int16 error; the shift joins the scale."""
    values = np.empty(np.shape(acc), np.int16)
    r = round_into(np.ascontiguousarray(acc).reshape(-1), values.reshape(-1), ERROR_BITS)
    return Error(values, float(scale) * 2.0 ** r)


def from_blocks(compute, n: int, shape: tuple, scale: float, block: int) -> Error:
    """An error for ``n`` samples built ``block`` samples at a time, so the int32 sums of only one
    block exist at once. ``compute(start, stop)`` returns the integer sums of those samples.

    Each block is rounded to int16 with its own shift; blocks are then aligned to the largest
    shift (a second rounding for the others, at most one unit of the final scale).
    """
    values = np.empty((n,) + tuple(shape), np.int16)
    flat = values.reshape(n, -1)
    shifts = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        shifts.append(round_into(compute(start, stop).reshape(-1), flat[start:stop].reshape(-1), ERROR_BITS))
    top = max(shifts) if shifts else 0
    for i, start in enumerate(range(0, n, block)):
        if shifts[i] < top:
            part = flat[start:start + block].reshape(-1)
            part[...] = rounding_shift_int16(part, top - shifts[i])
    return Error(values, float(scale) * 2.0 ** top)


@njit(cache=True)
def round_into(acc, out, bits):
    """out[:] = acc rounded right by the smallest shift that fits ``bits`` magnitude bits (ties
    toward +inf); returns the shift. One pass for the max-abs, one for the rounding."""
    r = shift_for(max_abs(acc), bits)
    if r == 0:
        for i in range(acc.size):
            out[i] = np.int16(acc[i])
        return 0
    for i in range(acc.size):
        out[i] = np.int16(rounding_shift_right_half_up(np.int64(acc[i]), r))
    return r


def from_float(g: np.ndarray) -> Error:
    """Quantize a float gradient (the loss head's) with a power-of-two scale from its max-abs."""
    g = np.asarray(g, dtype=np.float64)
    max_abs = float(np.max(np.abs(g))) if g.size else 0.0
    if max_abs == 0.0 or not np.isfinite(max_abs):
        return Error(np.zeros(g.shape, np.int16), 1.0)
    scale = 2.0 ** np.ceil(np.log2(max_abs / ERROR_MAX))
    values = np.clip(np.rint(g / scale), -ERROR_MAX, ERROR_MAX).astype(np.int16)
    return Error(values, float(scale))


@njit(cache=True)
def max_abs(a) -> int:
    """max |a| without a temporary array."""
    m = 0
    for i in range(a.size):
        v = abs(np.int64(a[i]))
        if v > m:
            m = v
    return m


@njit(cache=True)
def channel_sum(g):
    """sum of g over every axis but the last, in int64 (a bias gradient), without a widened copy."""
    c = g.shape[-1]
    flat = g.reshape(-1, c)
    out = np.zeros(c, np.int64)
    for i in range(flat.shape[0]):
        for j in range(c):
            out[j] += flat[i, j]
    return out


@njit(cache=True)
def rounding_shift_int16(acc, r):
    """acc >> r rounded to nearest (ties toward +inf), as int16."""
    out = np.empty(acc.size, np.int16)
    for i in range(acc.size):
        out[i] = np.int16(rounding_shift_right_half_up(np.int64(acc[i]), r))
    return out


@njit(cache=True)
def clamp_mask(g, y, lo, hi):
    """The STE of a clamp, in place: keep the error only where the forward value was strictly
    inside (lo, hi)."""
    gf = g.reshape(-1)
    yf = y.reshape(-1)
    for i in range(gf.size):
        if not lo < yf[i] < hi:
            gf[i] = 0
    return g


@njit(cache=True)
def fold_channel_scale(g, multiplier_q15, shift):
    """round(g[..., c] * m[c] / 2^shift) with m in Q15 (m <= 1): per-channel filter scales folded
    into the error before it meets the int8 filter (their ratio cannot be factored out of the sum)."""
    c = g.shape[-1]
    flat = g.reshape(-1, c)
    out = np.empty(flat.shape, np.int16)  # m <= 1 and shift >= 15: |result| <= |g|
    for i in range(flat.shape[0]):
        for j in range(c):
            out[i, j] = np.int16(rounding_shift_right_half_up(np.int32(flat[i, j]) * multiplier_q15[j], shift))
    return out.reshape(g.shape)


def channel_fold(scales: np.ndarray, terms: int) -> tuple[np.ndarray, int, float]:
    """Q15 multipliers m[c] = s[c] / max(s), the shift for fold_channel_scale, and the scale the
    folded error carries.

    ``terms`` bounds how many products of a folded error and an int8 weight meet in one input
    gradient (C_out * KH * KW for a conv). The folded error keeps all of the error's bits when an
    int32 sum of that many products allows it, and drops low bits (a larger shift) when not.
    """
    s = np.asarray(scales, dtype=np.float64)
    top = float(s.max())
    m = np.minimum(np.round(s / top * (1 << 15)).astype(np.int32), 1 << 15)
    room = int(np.floor(np.log2((2**31 - 1) / (127 * max(int(terms), 1)))))  # magnitude bits allowed
    shift = 15 + max(0, ERROR_BITS - room)
    return m, shift, top * 2.0 ** (shift - 15)
