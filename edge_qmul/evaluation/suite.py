"""The whole comparison for one setting: tune every method at every budget on the tuning seeds,
then evaluate the chosen configurations on the evaluation seeds, with intervals.

A suite file (``benchmarks/unlearn_suite.json``) names the settings, the methods, the budgets
(fractions of retrain's training sample-passes), the seeds and the search; ``tools/evaluate.py
--suite`` runs it and ``report`` writes the tables. Everything is a function of the suite file and
the code: integer training is deterministic, so a rerun gives the same numbers (the slow test
``tests/test_eval_reproducible.py`` holds one seed of one setting to them).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol, stats
from .protocol import PROTOCOLS, Setting

# a method without the retrain-free rule runs the same under both protocols (run once)
RULELESS = ("ft",)
METRICS = ("UA", "RA", "TA", "MIA", "VA", "gap", "gap_forgetting", "gap_utility", "changed", "wall_s",
           "passes_train", "passes_forward", "passes_fraction")


@dataclass
class Suite:
    """What to run (the suite file's fields)."""

    settings: list[Setting]
    methods: list[str]
    budgets: list[float]
    tuning_seeds: list[int]
    eval_seeds: list[int]
    lrs: list[float]
    check_every: list[int]
    base: dict = field(default_factory=dict)       # per-method fixed fields (e.g. rl: fresh labels)
    reference: str = "qmul"                         # the claim's method: paired intervals against it
    default: str = "oeu"                            # the product default: paired intervals against it
    class_default: str | None = None                # the product default for a whole class (labelled)
    table_budget: float = 0.1

    @classmethod
    def load(cls, path: Path) -> "Suite":
        raw = json.loads(Path(path).read_text())
        settings = [Setting(**s) for s in raw.pop("settings")]
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        return cls(settings=settings, **raw)

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"no setting {name!r} in the suite; known: {', '.join(s.name for s in self.settings)}")

    def candidates(self, method: str, prot: str) -> list[dict]:
        """The search: learning rate, and for the rule protocol how often the rule checks."""
        base = dict(self.base.get(method, {}))
        checks = self.check_every if prot == "rule" and method not in RULELESS else [None]
        out = []
        for lr in self.lrs:
            for ce in checks:
                out.append({**base, "lr": lr, **({"check_every": ce} if ce is not None else {})})
        return out


def _runs(split: dict, method: str, config: dict, prot: str, fracs: list[float], retrain_passes: int) -> dict:
    budgets = {f: int(f * retrain_passes) for f in fracs}
    rows = protocol.run_budgets(split, method, prot, config, list(budgets.values()))
    return {f: rows[b] for f, b in budgets.items()}


def _finish(row: dict | None, retrain: dict, retrain_passes: int) -> dict | None:
    if row is None:
        return None
    row = {**row, **protocol.gap(row, retrain)}
    row["passes_train"], row["passes_forward"] = row["passes"]["train"], row["passes"]["forward"]
    row["passes_fraction"] = (row["passes_train"] + row["passes_forward"]) / retrain_passes
    return row


def tune(suite: Suite, setting: Setting, log=print) -> dict:
    """{method: {protocol: {budget: {"config", "gap", "candidates"}}}}: per budget, the candidate
    with the smallest mean gap over the tuning seeds (the test set only enters through the gap's TA,
    as in the papers; the evaluation seeds are never used)."""
    gaps: dict = {}
    for seed in suite.tuning_seeds:
        split = protocol.prepare(setting, seed, log)
        retrain = protocol.retrain_row(split)
        rp = retrain["passes"]["train"]
        for method in suite.methods:
            for prot in PROTOCOLS:
                if prot == "rule" and method in RULELESS:
                    continue
                for ci, cand in enumerate(suite.candidates(method, prot)):
                    t0 = time.perf_counter()
                    found = {f: protocol.gap(row, retrain)["gap"]
                             for f, row in _runs(split, method, cand, prot, suite.budgets, rp).items()}
                    for f, g in found.items():
                        gaps.setdefault((method, prot, f, ci), []).append(g)
                    log(f"tune {setting.name} seed {seed} {method} {prot} {cand}: "
                        + ", ".join(f"{f:g}: {'-' if g is None else round(g, 2)}" for f, g in found.items())
                        + f" ({time.perf_counter() - t0:.1f} s)")
    tuned: dict = {}
    for method in suite.methods:
        for prot in PROTOCOLS:
            src = "fixed" if prot == "rule" and method in RULELESS else prot
            cands = suite.candidates(method, src)
            for f in suite.budgets:
                scored = []
                for ci, cand in enumerate(cands):
                    vals = gaps[(method, src, f, ci)]
                    mean = None if any(v is None for v in vals) else sum(vals) / len(vals)
                    scored.append({"config": cand, "gap": mean})
                ok = [s for s in scored if s["gap"] is not None]
                best = min(ok, key=lambda s: s["gap"]) if ok else None
                tuned.setdefault(method, {}).setdefault(prot, {})[str(f)] = {
                    "config": best and best["config"], "gap": best and best["gap"], "candidates": scored}
    return tuned


def evaluate(suite: Suite, setting: Setting, tuned: dict, seeds: list[int] | None = None, log=print) -> dict:
    """Per evaluation seed: the original, retrain, every method at every budget under both
    protocols with its tuned configuration, and qmul_official as published (its own 10 epochs)."""
    per_seed = []
    for seed in (suite.eval_seeds if seeds is None else seeds):
        t_seed = time.perf_counter()
        split = protocol.prepare(setting, seed, log)
        retrain = protocol.retrain_row(split)
        rp = retrain["passes"]["train"]
        original = _finish({**protocol.measure(split, split["model"]), "passes": {"train": 0, "forward": 0},
                            "wall_s": 0.0, "steps": 0, "stopped_by_rule": False}, retrain, rp)
        record = {"seed": seed, "original_train_s": split["train_s"],
                  "retrain": _finish(retrain, retrain, rp), "original": original, "methods": {}}
        for method in suite.methods:
            for prot in PROTOCOLS:
                if prot == "rule" and method in RULELESS:
                    record["methods"][method]["rule"] = record["methods"][method]["fixed"]
                    continue
                by_config: dict = {}
                for f in suite.budgets:
                    cfg = tuned[method][prot][str(f)]["config"]
                    if cfg is not None:
                        by_config.setdefault(json.dumps(cfg, sort_keys=True), []).append(f)
                rows = {str(f): None for f in suite.budgets}
                for key, fracs in by_config.items():
                    for f, row in _runs(split, method, json.loads(key), prot, fracs, rp).items():
                        rows[str(f)] = _finish(row, retrain, rp)
                record["methods"].setdefault(method, {})[prot] = rows
        for prot in PROTOCOLS:  # the published recipe, no budget
            row = protocol.run_unbounded(split, "qmul_official", prot, suite.base.get("qmul_official"))
            record["methods"].setdefault("qmul_official_published", {})[prot] = {"published": _finish(row, retrain, rp)}
        per_seed.append(record)
        log(f"evaluate {setting.name} seed {seed}: done in {time.perf_counter() - t_seed:.1f} s; gaps at "
            f"{suite.table_budget:g}: " + ", ".join(
                f"{m}/{p} {r[str(suite.table_budget)]['gap']:.2f}" for m, ps in record["methods"].items()
                for p, r in ps.items() if r.get(str(suite.table_budget))))
    return {"per_seed": per_seed, "summary": summarize(suite, per_seed)}


def _series(per_seed: list[dict], method: str, prot: str, budget: str, key: str) -> list:
    out = []
    for rec in per_seed:
        if method in ("retrain", "original"):
            row = rec[method]
        else:
            row = rec["methods"].get(method, {}).get(prot, {}).get(budget)
        out.append(None if row is None else row.get(key))
    return out


def summarize(suite: Suite, per_seed: list[dict]) -> dict:
    """Mean and 95% bootstrap interval of every metric; for the gap, paired intervals of the
    difference against the reference method and the product default at the same budget and protocol."""
    out: dict = {}
    for ref in ("retrain", "original"):
        out[ref] = {k: stats.bootstrap_mean(_series(per_seed, ref, "", "", k)) for k in METRICS}
    methods = list(per_seed[0]["methods"]) if per_seed else []
    for method in methods:
        for prot in PROTOCOLS:
            budgets = list(per_seed[0]["methods"][method][prot])
            for b in budgets:
                cell = {k: stats.bootstrap_mean(_series(per_seed, method, prot, b, k)) for k in METRICS}
                gaps = _series(per_seed, method, prot, b, "gap")
                for name, other in (("vs_reference", suite.reference), ("vs_default", suite.default)):
                    if other in per_seed[0]["methods"] and b in per_seed[0]["methods"][other][prot]:
                        cell[name] = stats.paired_difference(gaps, _series(per_seed, other, prot, b, "gap"))
                stopped = [r["methods"][method][prot][b]["stopped_by_rule"] for r in per_seed
                           if r["methods"][method][prot][b] is not None]
                cell["stopped_by_rule"] = f"{sum(stopped)}/{len(stopped)}"
                diverged = [r for r in per_seed if (r["methods"][method][prot][b] or {}).get("diverged")]
                if diverged:  # scored as the original model (the request fails on a device)
                    cell["diverged"] = f"{len(diverged)}/{len(per_seed)}"
                out.setdefault(method, {}).setdefault(prot, {})[b] = cell
    # the stopping target: the original's held-out accuracy against retrain's forget accuracy
    target_minus_retrain_fa = [rec["retrain"]["original_VA"] - (100.0 - rec["retrain"]["UA"]) for rec in per_seed]
    retrain_va_minus_fa = [rec["retrain"]["VA"] - (100.0 - rec["retrain"]["UA"]) for rec in per_seed]
    out["stopping_target"] = {"original_VA_minus_retrain_FA": stats.bootstrap_mean(target_minus_retrain_fa),
                              "retrain_VA_minus_retrain_FA": stats.bootstrap_mean(retrain_va_minus_fa)}
    return out
