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


def oeu(model: Model, forget: Split, retain: Split, validation: Split | None, config: UnlearnConfig,
        progress=None, num_classes: int = 0, **_) -> UnlearnResult:
    """Descent on -H(p(x_f)) (ascent on the prediction entropy), projected: with g_H = dH/dtheta,
    G_f = -g_H - (<-g_H, g_r> / |g_r|^2) g_r, update along G_f + g_r. With a significant
    neighbour verdict, the contradicted rows of a forget batch leave -g_H (weighted by the share
    that stays) for their mean cross-entropy to the neighbours' label, added whole and not
    projected: like g_r it teaches what a model without the forget set knows, so it does not
    fight retention (measured: projecting it, or weighting it by its share, left more of a canary;
    benchmarks/README.md "canary.py")."""
    (xf, _), (xr, yr) = forget, retain
    estimate = estimate_never_seen(forget, retain, validation, config, num_classes)
    moved = estimate.contradicted if estimate is not None and estimate.significant else np.zeros(len(xf), bool)
    votes = estimate.votes if estimate is not None else None

    def step(trainer: Trainer, fi: np.ndarray, ri: np.ndarray) -> dict:
        fh, fv = fi[~moved[fi]], fi[moved[fi]]
        if len(fv) == 0:  # the published step
            g_h, g_r = trainer.gradients_groups([(xf[fi], None, "entropy"), (xr[ri], yr[ri], "ce")])
            g_f, g_v = [(g_h, -1.0)], []
        else:
            parts = [(xf[fh], None, "entropy")] if len(fh) else []
            *g_h, g_vote, g_r = trainer.gradients_groups(
                parts + [(xf[fv], votes[fv], "ce"), (xr[ri], yr[ri], "ce")])
            g_f = [(g_h[0], -len(fh) / len(fi))] if len(fh) else []
            g_v = [(g_vote, 1.0)]
        rr = g_r.norm() ** 2
        # minus G_f's coefficient on g_r: G_f + c g_r is orthogonal to g_r (G_f = sum of w * g)
        c = -sum(w * g.dot(g_r) for g, w in g_f) / rr if rr > 0 else 0.0
        trainer.apply(combine(g_f + g_v + [(g_r, 1.0 + c)]))
        return {"loss_r": g_r.loss, **({"entropy_f": g_f[0][0].loss} if g_f else {}),
                **({"loss_moved": g_v[0][0].loss} if g_v else {})}

    return drive(model, forget, retain, validation, config, step, progress, "oeu", estimate=estimate)
