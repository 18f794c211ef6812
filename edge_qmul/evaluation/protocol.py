"""One seed of one setting: the splits, the original model, retraining, and a method's run observed
at several work budgets at once.

Per seed: the dataset's training split loses a stratified 10% validation slice (held out, never
trained on: the stopping rule's reference), the original model is trained from scratch on the rest
with the dataset's recipe, the forget set is drawn from that training data (a random fraction, or a
whole class), and every method starts from the same original int8 model. Retrain is the same recipe
on the retain set (fresh weights): its training sample-passes are the unit of every budget.

Budgets are observed, not re-run: a method with a constant learning rate follows the same
trajectory whatever its ``max_passes``, and stops before the first step that would pass it; so one
run up to the largest budget, snapshotted after every step, gives the model a run with each smaller
budget would return (``tests/test_evaluation.py`` checks this bit for bit). ``qmul_official``'s
cosine schedule depends on its epoch count, so it is run once per budget, with the whole epochs
that fit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import datasets, metrics, models
from ..errors import ModelError
from ..graph import Model
from ..quant import quantize
from ..train import TRAINING_RECIPES, fit_recipe
from ..unlearn import CLASS_FORGETTING, make_config, unlearn

PROTOCOLS = ("fixed", "rule")  # the paper's fixed work, or ours: the retrain-free stopping rule
UNBOUNDED_EPOCHS = 1_000_000   # with a budget, the budget ends the run, not the epoch cap


@dataclass(frozen=True)
class Setting:
    """A dataset and what to forget: ``random:0.1`` (a random 10% of the training data) or
    ``class:3``."""

    name: str
    dataset: str
    forget: str
    arch: str | None = None

    @property
    def kind(self) -> str:
        return self.forget.partition(":")[0]

    def recipe(self) -> dict:
        recipe = dict(TRAINING_RECIPES[self.dataset])
        if self.arch:
            recipe["arch"] = self.arch
        return recipe


def stratified_split(y: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Indices (held, rest) with ``fraction`` of every class held out."""
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        held.extend(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False))
    held = np.sort(np.array(held))
    return held, np.setdiff1d(np.arange(len(y)), held)


def prepare(setting: Setting, seed: int, log=print) -> dict:
    """Everything one seed needs: the int8 splits, the original model (trained with the recipe)."""
    ds = datasets.load(setting.dataset, seed=seed)
    recipe = setting.recipe()
    rng = np.random.default_rng(seed)
    val_idx, train_idx = stratified_split(ds.y_train, 0.1, rng)
    calib = ds.x_train[rng.choice(train_idx, min(256, len(train_idx)), replace=False)]
    model = models.build(recipe["arch"], ds.input_shape, ds.num_classes, seed=seed, calib_x=calib)
    q = model.tensors[model.core_inputs[0]].quant
    x_all, x_test = quantize(ds.x_train, q), quantize(ds.x_test, q)
    t0 = time.perf_counter()
    fit_recipe(model, recipe, x_all[train_idx], ds.y_train[train_idx], seed)
    train_s = time.perf_counter() - t0
    y_all = ds.y_train
    kind, _, arg = setting.forget.partition(":")
    if kind == "random":
        n_forget = int(round(float(arg or 0.1) * len(train_idx)))
        forget_idx = np.sort(rng.choice(train_idx, n_forget, replace=False))
    elif kind == "class":
        forget_idx = train_idx[y_all[train_idx] == int(arg)]
    else:
        raise ValueError(f"setting {setting.name}: forget must be random:FRACTION or class:K, got {setting.forget!r}")
    retain_idx = np.setdiff1d(train_idx, forget_idx)
    test_mask = np.ones(len(ds.y_test), bool)
    if kind == "class":  # utility is measured on the classes that remain
        test_mask = ds.y_test != int(arg)
    log(f"{setting.name} seed {seed}: train {len(train_idx)} (forget {len(forget_idx)}, retain "
        f"{len(retain_idx)}), validation {len(val_idx)}, test {int(test_mask.sum())}; original "
        f"trained in {train_s:.1f} s")
    return {"setting": setting, "seed": seed, "model": model,
            "forget": (x_all[forget_idx], y_all[forget_idx]),
            "retain": (x_all[retain_idx], y_all[retain_idx]),
            "validation": (x_all[val_idx], y_all[val_idx]),
            "test": (x_test[test_mask], ds.y_test[test_mask]),
            "train_s": train_s}


def measure(split: dict, model: Model) -> dict:
    """UA, RA, TA, MIA (DESIGN.md §4), the validation accuracy, and the % of int8 weights changed."""
    m = metrics.evaluate(model, split["forget"], split["retain"], split["test"])
    m["VA"] = metrics.accuracy(model, *split["validation"])
    m["changed"] = 100.0 * metrics.changed_fraction(split["model"], model)
    return m


def retrain(split: dict) -> tuple[dict, Model]:
    """Retrain with the original's own recipe (epochs, lr, momentum, batch, cosine): (row, model)."""
    recipe = split["setting"].recipe()
    cfg = {"lr": recipe["lr"], "epochs": recipe["epochs"], "momentum": recipe["momentum"],
           "retain_batch_size": recipe["batch_size"], "stop": False, "seed": split["seed"]}
    result = unlearn(split["model"], split["forget"], split["retain"], "retrain", cfg)
    row = measure(split, result.model)
    row.update(wall_s=result.wall_s, passes=result.sample_passes, steps=result.steps, stopped_by_rule=False,
               original_VA=metrics.accuracy(split["model"], *split["validation"]))
    return row, result.model


def retrain_row(split: dict) -> dict:
    """retrain()'s row."""
    return retrain(split)[0]


def method_config(split: dict, method: str, protocol: str, config: dict | None) -> dict:
    """The run's configuration: ``config`` over the method's defaults, the protocol's stopping rule
    (a forgotten class has no held-out level to meet: its target is 0%), the run's seed."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    # the budget is the suite's (max_passes, of the recipe's retraining), never the product's default
    cfg = {**(config or {}), "stop": protocol == "rule", "seed": split["seed"], "budget": None}
    if protocol == "fixed":  # no rule: its interval is moot, pinned so the record is not the default's
        cfg.setdefault("check_every", 2)
    if protocol == "rule" and split["setting"].kind == "class":
        cfg["target_acc"] = CLASS_FORGETTING["target_acc"]
    return cfg


def official_epoch_passes(split: dict) -> int:
    """Sample-passes of one qmul_official epoch without rule checks: the label pass (forward over
    the forget set), the reweighting pass and the training pass (forget + retain, each)."""
    nf, nr = len(split["forget"][0]), len(split["retain"][0])
    return nf + 2 * (nf + nr)


def run_budgets(split: dict, method: str, protocol: str, config: dict | None,
                budgets: list[int]) -> dict[int, dict]:
    """``method`` with ``config`` under ``protocol``, as a run capped at each budget (sample-passes)
    would end: {budget: row}. A row is the measures of the model, its sample-passes, steps, wall
    seconds from the run's start to that state, and whether the stopping rule had fired."""
    budgets = sorted(set(int(b) for b in budgets))
    if method == "qmul_official":
        out = {}
        for b in budgets:
            epochs = b // official_epoch_passes(split)
            if epochs < 1:  # the published recipe works in whole epochs: none fits this budget
                out[b] = None
                continue
            cfg = {**method_config(split, method, protocol, config), "epochs": int(epochs), "max_passes": b}
            out[b] = _observed(split, method, cfg, [b])[b]
        return out
    cfg = {**method_config(split, method, protocol, config), "epochs": UNBOUNDED_EPOCHS,
           "max_passes": max(budgets)}
    return _observed(split, method, cfg, budgets)


def run_unbounded(split: dict, method: str, protocol: str, config: dict | None) -> dict:
    """One run with the configuration's own epoch cap and no budget (the published recipe)."""
    cfg = method_config(split, method, protocol, config)
    return _observed(split, method, cfg, [None])[None]


def _observed(split: dict, method: str, cfg: dict, budgets: list) -> dict:
    snaps: dict = {}
    state = {"steps": 0}

    def progress(info: dict) -> None:
        state["steps"] += 1
        state["passes"] = dict(info["passes"])
        used = info["sample_passes"]
        fits = [b for b in budgets if b is None or used <= b]
        if fits:
            snap = (info["model"].copy(), dict(info["passes"]), state["steps"], time.perf_counter() - state["t0"])
            for b in fits:
                snaps[b] = snap
    state["t0"] = time.perf_counter()
    try:
        result = unlearn(split["model"], split["forget"], split["retain"], method, cfg,
                         validation=split["validation"], progress=progress)
    except ModelError as e:
        if "diverged" not in str(e):
            raise
        return {b: _diverged(split, method, cfg, state, str(e)) for b in budgets}
    out = {}
    for b in budgets:
        if b is None or _used(result.sample_passes) <= b:  # the run ended within this budget
            model, passes, steps, wall = result.model, result.sample_passes, result.steps, result.wall_s
            stopped = result.stopped_by_rule
        elif b in snaps:  # the state after the last step that fitted
            (model, passes, steps, wall), stopped = snaps[b], False
        else:  # not one step fitted: the run with this budget (its checks before the first step)
            alone = unlearn(split["model"], split["forget"], split["retain"], method, {**cfg, "max_passes": b},
                            validation=split["validation"])
            model, passes, steps, wall, stopped = (alone.model, alone.sample_passes, alone.steps, alone.wall_s,
                                                   alone.stopped_by_rule)
        row = measure(split, model)
        row.update(passes=passes, steps=steps, wall_s=wall, stopped_by_rule=bool(stopped),
                   config=_config_record(method, cfg))
        out[b] = row
    return out


def _diverged(split: dict, method: str, cfg: dict, state: dict, message: str) -> dict:
    """A run the divergence guard stopped: on a device the request fails and the model stays as it
    was (unlearn works on a copy), so it is scored as the original model, with the work it spent."""
    row = measure(split, split["model"])
    row.update(passes=state.get("passes", {"train": 0, "forward": 0}), steps=state["steps"],
               wall_s=time.perf_counter() - state["t0"], stopped_by_rule=False, diverged=message,
               config=_config_record(method, cfg))
    return row


def _config_record(method: str, cfg: dict) -> dict:
    """The run's whole configuration as recorded (every field but the trainable-ops selector)."""
    return {k: v for k, v in make_config(method, cfg).to_dict().items() if k != "trainable"}


def _used(passes: dict) -> int:
    return int(passes["train"] + passes["forward"])


def gap(row: dict, retrain: dict) -> dict:
    """Average gap to retrain over UA, RA, TA, MIA, and its forgetting (UA, MIA) and utility halves."""
    if row is None:
        return {"gap": None, "gap_forgetting": None, "gap_utility": None}
    split = metrics.gap_split(row, retrain)
    return {"gap": metrics.average_gap(row, retrain), "gap_forgetting": split["forgetting"],
            "gap_utility": split["utility"]}
