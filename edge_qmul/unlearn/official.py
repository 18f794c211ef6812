"""Q-MUL as released: the official recipe (Tong et al., ICCV 2025; Green-Edge-AI-Group/MU-Q-MUL,
``Classification/unlearn/RL_min.py``, the CIFAR-10 / SVHN branch), on the integer engine.

Each epoch, from the current model:

1. Similar labels: every forgotten sample is relabelled with the closest wrong class,
   ``argmin_{c != y} |p_c - p_y|`` (the second-best class when the model is right)
   (``labels="model"``, the intended rule). ``labels="released"`` reproduces the released code
   instead (``get_min_distance_labels`` and its caller): the distance is taken between the LOGITS and
   p_y, the argmin is taken in the vector with y removed and used as a class index (one too low for
   classes above y, so it can even name y itself), and the labels are computed over a shuffled pass
   and written back in dataset order (each sample gets another sample's label).
2. Adaptive Gradient Reweighting (``adjust_weights_based_on_gradients``): F = mean over all forget
   batches of the SUM over parameter tensors of each tensor's L2 gradient norm (cross-entropy toward
   the substitute labels), R = the same over all retain batches with their true labels;
   w_f = R / (F + R), w_r = F / (F + R).
3. A pass over the forget set (loss w_f * CE toward the substitute labels), then a pass over the
   whole retain set (loss w_r * CE), one SGD step per batch.

SGD with momentum and weight decay (the loss weight scales the gradient, not the decay, as in
``torch.optim.SGD``), cosine learning rate stepped once per epoch (``CosineAnnealingLR(T_max=epochs)``),
fixed epochs. Gradients are the Trainer's integer gradients; the weights w_f, w_r are floats that
only rescale a gradient's scale (no integer arithmetic changes). The retrain-free stopping rule is
available with ``stop=True`` (off by default: the paper runs fixed epochs).

Where it differs from the released code: the Trainer's momentum buffer holds lr * (g + wd * w), not
torch's g + wd * w (the same within an epoch, the lr being constant there); int32 biases get no
weight decay; a set smaller than the batch is cut in batches of 32 (torch would make it one batch);
only the CIFAR-10 / SVHN branch is reproduced (CIFAR-100 / TinyImageNet mix both sets in one
shuffled loader with per-sample weights); no saliency mask.

Divergence guard: a non-finite loss or gradient norm, gradients that vanish altogether, or trainable
weights driven onto the int8 rails raise ModelError; the method then returns nothing (unlearn()
works on a copy, so the model passed in is untouched).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import ModelError
from ..graph import Model
from ..losses import softmax
from ..quant import dequantize
from ..train import Gradients, ParamGrad, Trainer
from ..train.gradients import sum_squares
from .loop import Split, StoppingRule, UnlearnConfig, UnlearnResult, report, within_budget

LABEL_RULES = ("model", "released")
# the project's batch sizes, used for a set smaller than the requested batch (digits, mnist1d: a
# 256-sample batch would be the whole forget set, one step per epoch)
PROJECT_BATCH = 32
# a trainable tensor with more than this fraction of its int8 weights on the rails (+-127) beyond
# what it had at the start has diverged (a trained tensor has about one per channel there)
SATURATION_LIMIT = 0.25


# --- similar labels ----------------------------------------------------------------------------

def closest_wrong_labels(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The intended rule: per row, ``argmin_{c != y} |p_c - p_y|`` (ties to the lower class).
    When the model is right (p_y largest) that is the second-best class."""
    p = np.asarray(p, dtype=np.float64)
    rows = np.arange(len(y))
    d = np.abs(p - p[rows, y][:, None])
    d[rows, y] = np.inf
    return np.argmin(d, axis=1).astype(np.int64)


def released_labels(outputs: np.ndarray, y: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """What the released ``get_min_distance_labels`` computes (RL_min.py lines 48-78), given the
    model's outputs (logits) and labels in dataset order:

    - distance ``|z_c - p_y|``: logits minus the true class's softmax probability (line 59);
    - ``argmin`` over the distance vector with y masked OUT (line 72): its index is used as a class,
      so a closest class c > y becomes c - 1 (and c = y + 1 becomes y, the true label);
    - with ``order`` (the shuffled loader's sample order, RL_min.py line 159), labels are computed
      in that order and written back in dataset order (line 167): sample k gets the label computed
      for sample ``order[k]``.
    """
    z = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(y)
    if order is not None:
        z, y = z[order], y[order]
    rows = np.arange(len(y))
    d = np.abs(z - softmax(z)[rows, y][:, None])
    d[rows, y] = np.inf
    c = np.argmin(d, axis=1)  # the first minimum among c != y, as torch.argmin on the masked vector
    return (c - (c > y)).astype(np.int64)  # its position in the vector without y


def _logits(model: Model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Dequantized logits (N, C) of the int8 core, float64."""
    t = model.logits_tensor
    q = model.tensors[t].quant
    core_in = model.core_inputs[0]
    out = []
    for s in range(0, len(x), batch):
        z = model.run({core_in: x[s:s + batch]}, start_after_interface=True)[t]
        out.append(dequantize(z, q).astype(np.float64).reshape(len(z), -1))
    return np.concatenate(out)


# --- Adaptive Gradient Reweighting -----------------------------------------------------------------

def tensor_norm_sum(g: Gradients) -> float:
    """sum over parameter tensors of each tensor's L2 norm (the released code's ``grad_norm``,
    RL_min.py lines 94-98) — not the L2 norm of the whole gradient (Gradients.norm)."""
    return float(sum(math.sqrt(sum_squares(pg.acc.reshape(-1))) * abs(pg.scale) for pg in g.params.values()))


def official_weights(f: float, r: float) -> tuple[float, float]:
    """w_f = R / (F + R), w_r = F / (F + R) (RL_min.py lines 129-136: both branches are the same)."""
    total = f + r
    if not math.isfinite(total):
        raise ModelError(f"qmul_official diverged: gradient norms are not finite (forget {f!r}, retain {r!r})")
    if total == 0.0:
        raise ModelError("qmul_official diverged: forget and retain gradients both vanished "
                         "(the model no longer responds to its inputs)")
    return r / total, f / total


def _scaled(g: Gradients, w: float) -> Gradients:
    """w * g, by the float scales only (the int32 sums are unchanged)."""
    return Gradients({n: ParamGrad(pg.acc, pg.scale * w) for n, pg in g.items()}, loss=g.loss * w,
                     batch=g.batch)


# --- the method --------------------------------------------------------------------------------

def _batch(requested: int, n: int) -> int:
    return requested if requested <= n else min(PROJECT_BATCH, n)


def _batches(order: np.ndarray, size: int):
    for s in range(0, len(order), size):
        yield order[s:s + size]


class _Guard:
    """Refuse a run that diverges (checked on every gradient and after every pass)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.start = self._saturation()

    def _saturation(self) -> dict[str, float]:
        out = {}
        model = self.trainer.model
        for name, t in self.trainer.trainable_tensors().items():
            w = model.tensors[t].data
            if w.dtype == np.int8:
                out[name] = float(np.mean(np.abs(w.astype(np.int16)) >= 127))
        return out

    def gradient(self, g: Gradients, what: str) -> float:
        norm = tensor_norm_sum(g)
        if not (math.isfinite(g.loss) and math.isfinite(norm)):
            raise ModelError(f"qmul_official diverged: {what} loss {g.loss!r}, gradient norm {norm!r}")
        return norm

    def weights(self, where: str) -> None:
        for name, frac in self._saturation().items():
            if frac - self.start.get(name, 0.0) > SATURATION_LIMIT:
                raise ModelError(
                    f"qmul_official diverged {where}: {100 * frac:.0f}% of {name}'s int8 weights are on "
                    f"the rails (+-127), {100 * self.start.get(name, 0.0):.0f}% at the start; lower the "
                    f"learning rate (lr={self.trainer.lr:g} this epoch)")


def qmul_official(model: Model, forget: Split, retain: Split, validation: Split | None,
                  config: UnlearnConfig, progress=None, **_) -> UnlearnResult:
    """The official Q-MUL recipe (module docstring); works on ``model`` in place."""
    if config.labels not in LABEL_RULES:
        raise ModelError(f"qmul_official: labels must be one of {', '.join(LABEL_RULES)}, got {config.labels!r}")
    t0 = time.perf_counter()
    (xf, yf), (xr, yr) = forget, retain
    nf, nr = len(xf), len(xr)
    bf, br = _batch(config.batch_size, nf), _batch(config.retain_batch_size, nr)
    trainer = Trainer(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                      trainable=config.trainable, block_bytes=256 * 1024)
    guard = _Guard(trainer)
    rng = np.random.default_rng(config.seed)
    passes = {"train": 0, "forward": 0}
    history: list[dict] = []
    steps, stopped = 0, False
    steps_per_epoch = -(-nf // bf) + -(-nr // br)

    rule = StoppingRule(model, forget, validation, config, history)
    use_rule = rule.active

    def result() -> UnlearnResult:
        return UnlearnResult(model, "qmul_official", config, time.perf_counter() - t0, steps, stopped,
                             history, sample_passes=both())

    def both() -> dict:
        return {"train": passes["train"], "forward": passes["forward"] + rule.forward}

    if use_rule and rule.check(model, steps):
        stopped = True
        return result()

    def used() -> int:
        return passes["train"] + passes["forward"] + rule.forward

    for epoch in range(config.epochs):
        # CosineAnnealingLR(T_max=epochs), stepped after each epoch: constant within the epoch
        trainer.lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
        # an epoch starts only if its label and reweighting passes fit the budget
        if not within_budget(config, used(), 2 * nf + nr):
            break

        # 1. similar labels from the current model
        if config.labels == "released":
            targets = released_labels(_logits(model, xf), yf, order=rng.permutation(nf))
        else:
            targets = closest_wrong_labels(softmax(_logits(model, xf)), yf)
        passes["forward"] += nf

        # 2. Adaptive Gradient Reweighting over every forget and retain batch
        norms = {}
        for what, (x, y, size) in (("forget", (xf, targets, bf)), ("retain", (xr, yr, br))):
            vals = [guard.gradient(trainer.gradients(x[b], y[b], head="ce"), f"{what} (reweighting)")
                    for b in _batches(rng.permutation(len(x)), size)]
            passes["train"] += len(x)
            norms[what] = float(np.mean(vals))
        w_f, w_r = official_weights(norms["forget"], norms["retain"])

        # 3. a pass over the forget set, then one over the whole retain set
        losses = {"forget": [], "retain": []}
        for what, (x, y, size, w) in (("forget", (xf, targets, bf, w_f)), ("retain", (xr, yr, br, w_r))):
            for b in _batches(rng.permutation(len(x)), size):
                checks = use_rule and (steps + 1) % config.check_every == 0
                if not within_budget(config, used(), len(b) + (nf if checks else 0)):
                    stopped = None  # out of budget
                    break
                g = trainer.gradients(x[b], y[b], head="ce")
                guard.gradient(g, what)
                trainer.apply(_scaled(g, w))
                passes["train"] += len(b)
                losses[what].append(g.loss)
                steps += 1
                if checks:
                    guard.weights(f"in epoch {epoch}")
                    stopped = rule.check(model, steps)
                report(progress, {"phase": "qmul_official", "epoch": epoch, "step": steps - epoch * steps_per_epoch,
                                  "steps": steps_per_epoch, "epochs": config.epochs, "pass": what,
                                  "loss": g.loss, "w": w}, model, both(), config.max_passes)
                if stopped:
                    break
            if stopped is not False:
                break
            guard.weights(f"in epoch {epoch} ({what} pass)")
        history.append({"epoch": epoch, "lr": trainer.lr, "norm_f": norms["forget"], "norm_r": norms["retain"],
                        "w_f": w_f, "w_r": w_r, "batch_f": bf, "batch_r": br,
                        "loss_f": float(np.mean(losses["forget"])) if losses["forget"] else None,
                        "loss_r": float(np.mean(losses["retain"])) if losses["retain"] else None,
                        "labels_equal_true": int(np.sum(targets == yf))})
        if stopped is not False:
            break
    stopped = bool(stopped)
    return result()
