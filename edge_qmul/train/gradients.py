"""Integer gradients: a parameter's int32 sum with one float scale, a batch's set of them, and
their weighted combination in integers.

Each gradient is ``acc * scale`` with acc int32. Combining gradients of different scales (a
forget and a retain term, a projection, two errors meeting at a residual) brings them to a common
scale by fixed-point multipliers and sums in wider integers; floats touch only the scales and
scalar reductions (norms, dot products).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from numba import njit

from .. import grad as G
from ..quant import quantize_multiplier, rounding_shift_right_half_up


@dataclass
class ParamGrad:
    """Gradient of a real-valued parameter: ``acc * scale``, acc int32."""

    acc: np.ndarray
    scale: float

    def real(self) -> np.ndarray:
        return self.acc.astype(np.float64) * self.scale


@dataclass
class Gradients:
    """Per-parameter integer gradients of one batch, with the loss they came from."""

    params: dict[str, ParamGrad] = field(default_factory=dict)
    loss: float = 0.0
    batch: int = 0

    def __getitem__(self, name: str) -> ParamGrad:
        return self.params[name]

    def __iter__(self):
        return iter(self.params)

    def items(self):
        return self.params.items()

    def norm(self) -> float:
        """L2 norm of the real-valued gradient over all parameters (a scalar reduction)."""
        total = 0.0
        for pg in self.params.values():
            total += sum_squares(pg.acc.reshape(-1)) * pg.scale ** 2
        return math.sqrt(total)

    def dot(self, other: "Gradients") -> float:
        """<self, other> over the real-valued gradients (for projections, e.g. OEU)."""
        total = 0.0
        for name, pg in self.params.items():
            if name in other.params:
                o = other.params[name]
                total += float(np.dot(pg.acc.astype(np.float64).ravel(), o.acc.astype(np.float64).ravel())) \
                    * pg.scale * o.scale
        return total


@njit(cache=True)
def sum_squares(a) -> float:
    total = 0.0
    for i in range(a.size):
        v = np.float64(a[i])
        total += v * v
    return total


def combine(terms: Iterable[tuple[Gradients, float]]) -> Gradients:
    """sum of weight * gradients, per parameter, in integers: each term is brought to a common
    scale by a fixed-point multiplier (12 bits of headroom), summed in int64, returned as int32.

    Weights are scalars (e.g. Adaptive Gradient Reweighting's w_f, w_r, or a projection
    coefficient); a parameter missing from a term counts as zero there.
    """
    terms = [(g, float(w)) for g, w in terms if w != 0.0]
    out = Gradients(loss=sum(w * g.loss for g, w in terms), batch=max((g.batch for g, _ in terms), default=0))
    names = []
    for g, _ in terms:
        names += [n for n in g.params if n not in names]
    for name in names:
        parts = [(g.params[name], w) for g, w in terms if name in g.params]
        top = max(abs(w) * pg.scale for pg, w in parts)
        if top == 0.0:
            out.params[name] = ParamGrad(np.zeros_like(parts[0][0].acc), 1.0)
            continue
        target = top / (1 << 12)
        acc = np.zeros(parts[0][0].acc.size, np.int64)
        for pg, w in parts:
            m, s = quantize_multiplier(abs(w) * pg.scale / target)
            _accumulate_scaled(acc, pg.acc.reshape(-1), m, s, 1 if w > 0 else -1)
        out.params[name] = to_int32(acc.reshape(parts[0][0].acc.shape), target)
    return out


def to_int32(acc: np.ndarray, scale: float) -> ParamGrad:
    """An int64 sum as an int32 accumulator: shift right (rounding) only if it does not fit."""
    out, r = _narrow_to_int32(np.ascontiguousarray(acc).reshape(-1))
    return ParamGrad(out.reshape(acc.shape), scale * 2.0 ** r)


@njit(cache=True)
def _narrow_to_int32(acc):
    # one compiled call per parameter (it runs for every parameter of every step): the max-abs,
    # the smallest shift that leaves 30 magnitude bits, the rounding shift and the narrowing
    r = G.shift_for(G.max_abs(acc), 30)
    out = np.empty(acc.size, np.int32)
    for i in range(acc.size):
        out[i] = np.int32(rounding_shift_right_half_up(np.int64(acc[i]), r))
    return out, r


def combine_errors(a: G.Error, b: G.Error) -> G.Error:
    """a + b for errors with different scales (a tensor read by two ops, e.g. a residual): both
    rescaled by fixed-point multipliers to a common scale with 8 bits of headroom and summed in
    int32 (|each| <= 2^23), then rounded back to an error."""
    target = max(a.scale, b.scale) / (1 << 8)
    ma, sa = quantize_multiplier(a.scale / target)
    mb, sb = quantize_multiplier(b.scale / target)
    acc = _sum_rescaled(a.values.reshape(-1), ma, sa, b.values.reshape(-1), mb, sb)
    return G.from_accumulator(acc.reshape(a.values.shape), target)


@njit(cache=True, inline="always")
def round_scaled(a, multiplier, shift, stochastic):
    """a * multiplier * 2^(shift - 31) as an integer, symmetric in sign.

    Round to nearest, or pseudo-stochastic: of the discarded bits, the upper half is compared with
    the lower half (no RNG), so the chance of rounding up tracks the discarded fraction.
    """
    p = np.int64(a) * np.int64(multiplier)
    neg = p < 0
    if neg:
        p = -p
    total = 31 - shift
    if total <= 0:
        r = p << (-total)
    elif stochastic and total >= 2:
        half = total // 2
        d = p & ((np.int64(1) << total) - 1)
        r = (p >> total) + (1 if (d >> (total - half)) > (d & ((np.int64(1) << half) - 1)) else 0)
    else:
        r = rounding_shift_right_half_up(p, total)
    return -r if neg else r


@njit(cache=True)
def _accumulate_scaled(acc, a, multiplier, shift, sign):
    for i in range(a.size):
        acc[i] += sign * round_scaled(a[i], multiplier, shift, False)


@njit(cache=True)
def _sum_rescaled(a, ma, sa, b, mb, sb):
    out = np.empty(a.size, np.int32)
    for i in range(a.size):
        out[i] = round_scaled(a[i], ma, sa, False) + round_scaled(b[i], mb, sb, False)
    return out
