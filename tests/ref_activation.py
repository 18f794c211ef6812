"""Float64 reference of the elementwise activations (tests only): exact real function, unclipped,
and its exact derivative at the same real input (the STE backward of tests/reference.py)."""
from __future__ import annotations

import numpy as np

from reference import register


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _alpha(op) -> float:
    return float(np.float32(op.options.get("alpha", 0.0)))


def value(kind: str, x: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    if kind == "LOGISTIC":
        return _sigmoid(x)
    if kind == "TANH":
        return np.tanh(x)
    if kind == "HARD_SWISH":
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    if kind == "RELU":
        return np.maximum(x, 0.0)
    if kind == "RELU6":
        return np.clip(x, 0.0, 6.0)
    if kind == "RELU_N1_TO_1":
        return np.clip(x, -1.0, 1.0)
    if kind == "LEAKY_RELU":
        return np.where(x >= 0.0, x, alpha * x)
    raise NotImplementedError(kind)


def slope(kind: str, x: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """d value / dx; at a kink, the side the int8 forward takes (x >= 0 is the identity side)."""
    one, zero = np.ones_like(x), np.zeros_like(x)
    if kind == "LOGISTIC":
        s = _sigmoid(x)
        return s * (1.0 - s)
    if kind == "TANH":
        return 1.0 - np.tanh(x) ** 2
    if kind == "HARD_SWISH":
        return np.where(x < -3.0, zero, np.where(x > 3.0, one, (2.0 * x + 3.0) / 6.0))
    if kind == "RELU":
        return np.where(x > 0.0, one, zero)
    if kind == "RELU6":
        return np.where((x > 0.0) & (x < 6.0), one, zero)
    if kind == "RELU_N1_TO_1":
        return np.where((x > -1.0) & (x < 1.0), one, zero)
    if kind == "LEAKY_RELU":
        return np.where(x >= 0.0, one, alpha * one)
    raise NotImplementedError(kind)


KINDS = ("LOGISTIC", "TANH", "HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU")


def forward(model, op, xs):
    return [value(op.kind, np.asarray(xs[0], np.float64), _alpha(op))]


def backward(model, op, xs, ys, gs):
    if gs[0] is None:
        return [None]
    return [np.asarray(gs[0], np.float64) * slope(op.kind, np.asarray(xs[0], np.float64), _alpha(op))]


for _kind in KINDS:
    register(_kind, forward, backward)
