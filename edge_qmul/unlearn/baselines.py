"""The baselines of the Q-MUL comparison, in the same engine and with the same data:
Retrain (from scratch on the retain set, the gold standard), FT (fine-tune on the retain set),
RL (random labels on the forget set, with the retain set), GA (gradient ascent on the forget set)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError
from ..graph import Model
from ..models import reinitialize
from ..train import Trainer, combine
from .loop import Split, UnlearnConfig, UnlearnResult, drive, drive_retain_only


def random_wrong_labels(y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """A uniformly random label other than the true one, per sample (fixed for the whole run)."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, size=len(y))
    return (np.asarray(y) + shift) % num_classes


def retrain(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
            progress=None, **_) -> UnlearnResult:
    """Fresh weights on the same graph, calibrated and trained on the retain set only (cosine
    schedule, momentum): what the model would be had it never seen the forget set."""
    rng = np.random.default_rng(config.seed)
    xr, yr = retain
    calib = xr[rng.choice(len(xr), min(256, len(xr)), replace=False)]
    reinitialize(model, calib, seed=config.seed)
    steps = config.epochs * -(-len(xr) // config.retain_batch_size)
    trainer = Trainer(model, lr=config.lr, momentum=config.momentum, schedule="cosine",
                      total_steps=steps, trainable=config.trainable)
    # sample_passes counts the training; the calibration's forward passes (each op up to three
    # times over <= 256 retain samples) are not in it
    return drive_retain_only(model, retain, config, trainer, progress, "retrain")


def ft(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
       progress=None, **_) -> UnlearnResult:
    """Fine-tune on the retain set: forgetting only by catastrophic interference."""
    return drive_retain_only(model, retain, config, None, progress, "ft")


def rl(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
       progress=None, num_classes: int = 0, **_) -> UnlearnResult:
    """Random labels: cross-entropy toward a random wrong class on the forget batch, plus the
    retain batch's cross-entropy, summed with equal weights.

    ``rl_labels="fixed"``: one random wrong class per sample for the whole run; ``"fresh"``: SalUn's
    rule (OPTML-Group/Unlearn-Saliency, Classification/unlearn/RL.py, CIFAR-10 branch): labels drawn
    uniformly over ALL classes (the true one included) for every batch."""
    (xf, yf), (xr, yr) = forget, retain
    if config.rl_labels not in ("fixed", "fresh"):
        raise ModelError(f"rl: rl_labels must be 'fixed' or 'fresh', got {config.rl_labels!r}")
    y_rand = random_wrong_labels(yf, num_classes, config.seed)
    fresh = np.random.default_rng([config.seed, 1]) if config.rl_labels == "fresh" else None

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        y_f = fresh.integers(0, num_classes, size=len(fi)) if fresh is not None else y_rand[fi]
        g_f, g_r = trainer.gradients_groups([(xf[fi], y_f, "ce"), (xr[ri], yr[ri], "ce")])
        trainer.apply(combine([(g_f, 1.0), (g_r, 1.0)]))
        return {"loss_f": g_f.loss, "loss_r": g_r.loss}

    return drive(model, forget, retain, validation, config, step, progress, "rl")


def ga(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
       progress=None, **_) -> UnlearnResult:
    """Gradient ascent on the forget set's cross-entropy (no retain term)."""

    xf, yf = forget

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        g_f = trainer.gradients(xf[fi], yf[fi], head="neg_ce")
        trainer.apply(g_f)
        return {"loss_f": -g_f.loss}

    return drive(model, forget, retain, validation, config, step, progress, "ga", uses_retain=False)


def agr_weights(g_f, g_r, rule: str = "harmonic") -> tuple[float, float]:
    """Adaptive Gradient Reweighting: weights that make the forget and retain terms contribute
    equally to the update (norms are scalar reductions of the int32 sums).

    ``harmonic`` (DESIGN.md §4): w_f = |g_r| / (|g_f| + |g_r|), w_r = |g_f| / (|g_f| + |g_r|): each
    term's norm becomes |g_f||g_r| / (|g_f| + |g_r|), which vanishes when either gradient does.
    ``mean``: each term rescaled to the mean norm (|g_f| + |g_r|) / 2 — the same direction, a step
    that does not vanish on a model that already fits its retain set (|g_r| ~ 0).
    """
    nf, nr = g_f.norm(), g_r.norm()
    total = nf + nr
    if total == 0.0 or not math.isfinite(total):
        return 0.5, 0.5
    if rule == "mean":
        if nf == 0.0 or nr == 0.0:
            return (1.0, 0.0) if nr == 0.0 else (0.0, 1.0)
        return total / (2 * nf), total / (2 * nr)
    return nr / total, nf / total
