"""Intervals over seeds: a percentile bootstrap of the mean, and of a paired difference."""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def bootstrap_mean(values, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Mean of ``values`` (one per seed) with a 95% percentile-bootstrap interval (seeds resampled
    with replacement; a fixed generator, so the interval is reproducible)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": int(v.size)}


def paired_difference(a, b, seed: int = 0) -> dict:
    """Mean of a - b over seeds where both exist (the same seed's runs paired), with its interval,
    and a verdict: ``"lower"`` when the whole interval is below 0, ``"higher"`` above, else
    ``"undecided"``."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    out = bootstrap_mean([x - y for x, y in pairs], seed)
    if out["mean"] is None:
        out["verdict"] = "n/a"
    elif out["hi"] < 0:
        out["verdict"] = "lower"
    elif out["lo"] > 0:
        out["verdict"] = "higher"
    else:
        out["verdict"] = "undecided"
    return out
