"""The float side of a classifier: softmax and the loss heads over real-valued logits (B, C).

The one place floats do arithmetic in training (DESIGN.md §3): B x classes values, from which the
integer backward starts. The metrics read their probabilities from the same softmax. It lives
outside ``edge_qmul.train`` because the metrics, which training's recipes call, need it too.
"""
from __future__ import annotations

import numpy as np

from .errors import ModelError

HEADS = ("ce", "soft", "neg_ce", "entropy")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, C) logits, shifted by each row's max so exp never overflows."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_head(logits: np.ndarray, targets: np.ndarray, head: str = "ce") -> tuple[float, np.ndarray]:
    """Loss (mean over the batch) and dL/dlogits for real-valued logits (B, C).

    ``ce``: cross-entropy to hard labels; ``soft``: cross-entropy to target distributions (B, C);
    ``neg_ce``: negated cross-entropy (gradient ascent); ``entropy``: mean prediction entropy H(p)
    (minimizing it sharpens, so maximizing entropy means applying its gradient with weight < 0).
    """
    z = np.asarray(logits, dtype=np.float64)
    b, c = z.shape
    p = softmax(z)
    logp = np.log(np.maximum(p, 1e-300))
    if head in ("ce", "neg_ce"):
        onehot = np.zeros_like(p)
        onehot[np.arange(b), targets] = 1.0
        loss, d = -float(np.mean(logp[np.arange(b), targets])), (p - onehot) / b
        return (loss, d) if head == "ce" else (-loss, -d)
    if head == "soft":
        t = np.asarray(targets, dtype=np.float64)
        return -float(np.mean(np.sum(t * logp, axis=1))), (p - t) / b
    if head == "entropy":
        h = -np.sum(p * logp, axis=1, keepdims=True)
        return float(np.mean(h)), -p * (logp + h) / b
    raise ModelError(f"unknown loss head {head!r}; known: {', '.join(HEADS)}")
