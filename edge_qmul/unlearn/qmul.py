"""Q-MUL (Tong et al., ICCV 2025, arXiv 2503.13917), reconstructed from its abstract, README and its
follow-up (OEU): Similar Labels + Adaptive Gradient Reweighting, and the two ablations.

Each piece is a named function so the exact published rule can replace it:
- ``similar_labels``: a forgotten sample is relabelled with a semantically close wrong class — per
  sample the original model's best wrong class, or the host's similar-label table's choice —
  instead of a random one, so the push away from the true class is small and plausible;
- ``baselines.agr_weights``: the forget and retain gradients are computed separately each step and
  weighted so that both contribute equally. DESIGN.md's rule, w_f = |g_r| / (|g_f| + |g_r|),
  w_r = |g_f| / (|g_f| + |g_r|) (``agr="harmonic"``), shrinks the step to nothing on a model that
  fits its retain set; the default ``agr="mean"`` gives both terms the mean norm instead (same
  direction). Measured on the tuning seeds: mean is better for qmul and qmul_agr on both datasets
  (benchmarks/README.md).
"""
from __future__ import annotations

import numpy as np

from ..graph import Model
from ..train import Trainer, combine
from . import similar_labels as sl
from .baselines import agr_weights, random_wrong_labels
from .loop import Split, UnlearnConfig, UnlearnResult, drive, estimate_never_seen
from .neighbours import NeverSeen


def similar_labels(model: Model, forget: Split, config: UnlearnConfig, table=None) -> np.ndarray:
    """Substitute targets for the forget set: int labels, or (N, C) soft targets (table, soft mode)."""
    x, y = forget
    if config.labels == "table":
        if table is None:
            raise ValueError("labels='table' needs a similar-label table")
        return sl.assign_from_table(table, y, mode=config.table_mode, seed=config.seed)
    return sl.assign_from_model(model, x, y)


def with_votes(targets: np.ndarray, estimate: NeverSeen | None) -> np.ndarray:
    """``targets`` with the samples the retain set contradicts (when significant) moved to their
    neighbours' label (one-hot rows for soft targets): what a model that never saw them predicts."""
    if estimate is None or not estimate.significant:
        return targets
    moved = estimate.contradicted
    out = np.array(targets, copy=True)
    if out.ndim == 2:
        out[moved] = 0.0
        out[np.flatnonzero(moved), estimate.votes[moved]] = 1.0
    else:
        out[moved] = estimate.votes[moved]
    return out


def _run(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
         targets: np.ndarray, reweight: bool, progress, method: str,
         estimate: NeverSeen | None = None) -> UnlearnResult:
    (xf, _), (xr, yr) = forget, retain
    head = "soft" if targets.ndim == 2 else "ce"

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        g_f, g_r = trainer.gradients_groups([(xf[fi], targets[fi], head), (xr[ri], yr[ri], "ce")])
        w_f, w_r = agr_weights(g_f, g_r, config.agr) if reweight else (1.0, 1.0)
        trainer.apply(combine([(g_f, w_f), (g_r, w_r)]))
        return {"loss_f": g_f.loss, "loss_r": g_r.loss, "w_f": w_f}

    # similar labels from the model cost one forward pass over the forget set (a table costs none)
    label_pass = len(xf) if method in ("qmul", "qmul_sl") and config.labels != "table" else 0
    return drive(model, forget, retain, validation, config, step, progress, method, label_pass,
                 estimate=estimate)


def qmul(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
         progress=None, table=None, num_classes: int = 0, **_) -> UnlearnResult:
    """Similar Labels + Adaptive Gradient Reweighting (forget samples the retain set contradicts:
    their neighbours' label, :func:`with_votes`)."""
    estimate = estimate_never_seen(forget, retain, validation, config, num_classes)
    targets = with_votes(similar_labels(model, forget, config, table), estimate)
    return _run(model, forget, retain, validation, config, targets, True, progress, "qmul", estimate)


def qmul_sl(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
            progress=None, table=None, **_) -> UnlearnResult:
    """Ablation: Similar Labels only (forget and retain gradients summed with equal weights)."""
    targets = similar_labels(model, forget, config, table)
    return _run(model, forget, retain, validation, config, targets, False, progress, "qmul_sl")


def qmul_agr(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
             progress=None, num_classes: int = 0, **_) -> UnlearnResult:
    """Ablation: random labels with Adaptive Gradient Reweighting."""
    targets = random_wrong_labels(forget[1], num_classes, config.seed)
    return _run(model, forget, retain, validation, config, targets, True, progress, "qmul_agr")
