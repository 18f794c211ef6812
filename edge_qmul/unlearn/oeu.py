"""OEU, beyond the paper: entropy maximization on the forget set, with the forget gradient projected
onto the orthogonal complement of the retain gradient so forgetting does not fight retention.

Forget samples the retain set contradicts (unlearn/neighbours.py, when significant: a planted
canary, mislabelled samples) are not made uncertain but moved to their neighbours' label: what a
model that never saw them predicts."""
from __future__ import annotations

import numpy as np

from ..graph import Model
from ..train import Trainer, combine
from .loop import Split, UnlearnConfig, UnlearnResult, drive, estimate_never_seen


# The weight of the moved samples' cross-entropy: measured on the canary benchmark (digits and
# mnist5k, benchmarks/README.md "canary.py"): 1 left 2-3% of a canary's trigger on mnist5k where
# retraining leaves 0.6%; 4 took it to 0.2-1.8% with test accuracy within ~1 point of before.
MOVED_WEIGHT = 4.0


def oeu(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
        progress=None, num_classes: int = 0, **_) -> UnlearnResult:
    """Descent on -H(p(x_f)) (ascent on the prediction entropy), projected: with g_H = dH/dtheta,
    G_f = -g_H - (<-g_H, g_r> / |g_r|^2) g_r, update along G_f + g_r.

    With a significant neighbour verdict the forget set is one that only memorization explains in
    part: its contradicted samples are moved instead (their cross-entropy to the neighbours' label,
    weighted MOVED_WEIGHT, not projected: like g_r it teaches what a model without the forget set
    knows) and the others are left to the retain term. Measured (benchmarks/README.md): making
    them uncertain as well cost 1-8 points of test accuracy and, when the rule fired mid-way, left
    more of the canary."""
    (xf, _), (xr, yr) = forget, retain
    estimate = estimate_never_seen(forget, retain, validation, config, num_classes)
    moved = estimate.contradicted if estimate is not None and estimate.significant else None

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        if moved is None:  # the published step
            g_h, g_r = trainer.gradients_groups([(xf[fi], None, "entropy"), (xr[ri], yr[ri], "ce")])
            rr = g_r.norm() ** 2
            c = g_h.dot(g_r) / rr if rr > 0 else 0.0
            trainer.apply(combine([(g_h, -1.0), (g_r, 1.0 + c)]))
            return {"entropy_f": g_h.loss, "loss_r": g_r.loss}
        fv = fi[moved[fi]]
        if len(fv) == 0:
            g_r = trainer.gradients(xr[ri], yr[ri])
            trainer.apply(g_r)
            return {"loss_r": g_r.loss}
        g_v, g_r = trainer.gradients_groups([(xf[fv], estimate.votes[fv], "ce"), (xr[ri], yr[ri], "ce")])
        trainer.apply(combine([(g_v, MOVED_WEIGHT), (g_r, 1.0)]))
        return {"loss_moved": g_v.loss, "loss_r": g_r.loss}

    return drive(model, forget, retain, validation, config, step, progress, "oeu", estimate=estimate)
