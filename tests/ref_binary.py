"""Float64 references of MUL and SUB (tests only): the exact real product / difference, unclipped,
and its STE backward (the output gradient arrives already masked by the clamp).

Operands broadcast with numpy's rules; a broadcast operand's gradient is summed over the axes it
was broadcast along, including leading axes it lacks (the batch axis of a constant).
"""
from __future__ import annotations

import numpy as np

import reference


def forward(model, op, xs) -> list:
    a, b = (np.asarray(x, np.float64) for x in xs[:2])
    return [a * b if op.kind == "MUL" else a - b]


def backward(model, op, xs, ys, gs) -> list:
    g = gs[0]
    if g is None:
        return [None, None]
    a, b = (np.asarray(x, np.float64) for x in xs[:2])
    if op.kind == "MUL":
        ga, gb = g * b, g * a
    else:
        ga, gb = g, -g
    return [reference.unbroadcast(ga, a.shape), reference.unbroadcast(gb, b.shape)]


reference.register("MUL", forward, backward)
reference.register("SUB", forward, backward)
