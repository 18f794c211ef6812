"""OEU, beyond the paper: entropy maximization on the forget set, with the forget gradient projected
onto the orthogonal complement of the retain gradient so forgetting does not fight retention."""
from __future__ import annotations

import numpy as np

from ..graph import Model
from ..train import Trainer, combine
from .loop import Split, UnlearnConfig, UnlearnResult, drive


def oeu(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
        progress=None, **_) -> UnlearnResult:
    """Descent on -H(p(x_f)) (ascent on the prediction entropy), projected: with g_H = dH/dtheta,
    G_f = -g_H - (<-g_H, g_r> / |g_r|^2) g_r, update along G_f + g_r."""
    (xf, _), (xr, yr) = forget, retain

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        g_h, g_r = trainer.gradients_groups([(xf[fi], None, "entropy"), (xr[ri], yr[ri], "ce")])
        rr = g_r.norm() ** 2
        c = g_h.dot(g_r) / rr if rr > 0 else 0.0
        trainer.apply(combine([(g_h, -1.0), (g_r, 1.0 + c)]))
        return {"entropy_f": g_h.loss, "loss_r": g_r.loss}

    return drive(model, forget, retain, validation, config, step, progress, "oeu")
