"""The paper-style comparison of unlearning methods on the int8 model, in the engine.

    python tools/evaluate.py --dataset digits --forget random:0.1 \
        --methods retrain,ft,rl,ga,qmul,qmul_sl,qmul_agr,oeu --seeds 0,1,2 \
        --json benchmarks/results/unlearn_digits.json --plot benchmarks/results/unlearn_digits.png

Per seed: the dataset's training split loses a stratified 10% validation slice (held out, never
trained on: the stopping rule's reference), the original model is trained from scratch on the rest
(or loaded with --model), the forget set is drawn from that training data (random fraction, or a
whole class), and every method unlearns from the same original model. Metrics follow DESIGN.md §4:
UA, RA, TA, MIA-efficacy, RTE (wall seconds), average gap to Retrain (also split into forgetting =
UA, MIA and utility = RA, TA) and the fraction of int8 weights changed; mean ± std over seeds.

``--tune`` runs the same small search for every method (learning rate x epoch cap) on the given
seeds (use seeds that are not in the reported table) and prints the configuration with the
smallest average gap per method, as JSON for ``--configs``; ``--max-cost 0.1`` keeps only
configurations that take at most 10% of retrain's wall time (the device budget), for every method.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_qmul import datasets, load_tflite, metrics, models  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.train import TRAINING_RECIPES, Trainer, fit  # noqa: E402
from edge_qmul.unlearn import CLASS_FORGETTING, METHODS, make_config, unlearn  # noqa: E402

KEYS = ("UA", "RA", "TA", "MIA")
TUNE_LRS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
TUNE_EPOCHS = (2, 5, 10)


def load_dataset(spec: str, seed: int):
    if spec.startswith("npz:"):
        return datasets.load_npz(spec[4:])
    return datasets.load(spec, seed=seed)


def stratified_split(y: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Indices (held, rest) with ``fraction`` of every class held out."""
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        held.extend(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False))
    held = np.sort(np.array(held))
    return held, np.setdiff1d(np.arange(len(y)), held)


def prepare(dataset: str, forget_spec: str, seed: int, model_path: str | None, arch: str | None,
            log=print) -> dict:
    """Everything one seed needs: splits (int8), the original model, the retain/forget split."""
    ds = load_dataset(dataset, seed)
    rng = np.random.default_rng(seed)
    val_idx, train_idx = stratified_split(ds.y_train, 0.1, rng)
    if model_path:
        model = load_tflite(model_path)
        q = model.tensors[model.core_inputs[0]].quant
        x_all = quantize(ds.x_train, q) if ds.x_train.dtype != np.int8 else ds.x_train
        x_test = quantize(ds.x_test, q) if ds.x_test.dtype != np.int8 else ds.x_test
        train_s = 0.0
    else:
        recipe = TRAINING_RECIPES.get(dataset, TRAINING_RECIPES["digits"])
        arch = arch or recipe["arch"]
        calib = ds.x_train[rng.choice(train_idx, min(256, len(train_idx)), replace=False)]
        model = models.build(arch, ds.input_shape, ds.num_classes, seed=seed, calib_x=calib)
        q = model.tensors[model.core_inputs[0]].quant
        x_all, x_test = quantize(ds.x_train, q), quantize(ds.x_test, q)
        steps = recipe["epochs"] * -(-len(train_idx) // recipe["batch_size"])
        trainer = Trainer(model, lr=recipe["lr"], momentum=recipe["momentum"], schedule="cosine",
                          total_steps=steps)
        t0 = time.perf_counter()
        fit(trainer, x_all[train_idx], ds.y_train[train_idx], recipe["epochs"], recipe["batch_size"], seed=seed)
        train_s = time.perf_counter() - t0
    y_all = ds.y_train
    kind, _, arg = forget_spec.partition(":")
    if kind == "random":
        n_forget = int(round(float(arg or 0.1) * len(train_idx)))
        forget_idx = np.sort(rng.choice(train_idx, n_forget, replace=False))
    elif kind == "class":
        forget_idx = train_idx[y_all[train_idx] == int(arg)]
    else:
        raise SystemExit(f"--forget must be random:FRACTION or class:K, got {forget_spec!r}")
    retain_idx = np.setdiff1d(train_idx, forget_idx)
    test_mask = np.ones(len(ds.y_test), bool)
    if kind == "class":  # utility is measured on the classes that remain
        test_mask = ds.y_test != int(arg)
    split = {
        "model": model,
        "forget": (x_all[forget_idx], y_all[forget_idx]),
        "retain": (x_all[retain_idx], y_all[retain_idx]),
        "validation": (x_all[val_idx], y_all[val_idx]),
        "test": (x_test[test_mask], ds.y_test[test_mask]),
        "class": int(arg) if kind == "class" else None,
        "train_s": train_s,
        "num_classes": ds.num_classes,
    }
    log(f"seed {seed}: train {len(train_idx)} (forget {len(forget_idx)}, retain {len(retain_idx)}), "
        f"validation {len(val_idx)}, test {int(test_mask.sum())}; original trained in {train_s:.1f} s")
    return split


def run_method(split: dict, method: str, config: dict | None) -> dict:
    cfg = dict(config or {})
    if split["class"] is not None and method not in ("retrain", "ft"):
        for key, value in CLASS_FORGETTING.items():  # a forgotten class has no held-out level to meet
            cfg[key] = value
    table = None
    if cfg.get("labels") == "table":  # the host's table: built from the original model on retain data
        from edge_qmul.unlearn.similar_labels import build_table
        if "table" not in split:
            split["table"] = build_table(split["model"], *split["retain"], k=3)
        table = split["table"]
    t0 = time.perf_counter()
    result = unlearn(split["model"], split["forget"], split["retain"], method=method, config=cfg,
                     validation=split["validation"], table=table)
    wall = time.perf_counter() - t0
    m = metrics.evaluate(result.model, split["forget"], split["retain"], split["test"])
    m.update({"RTE_s": wall, "changed": 100.0 * metrics.changed_fraction(split["model"], result.model),
              "steps": result.steps, "stopped_by_rule": result.stopped_by_rule})
    return m


def summarize(per_seed: dict[str, list[dict]]) -> dict:
    out = {}
    retrain = per_seed.get("retrain")
    for method, rows in per_seed.items():
        agg = {}
        for key in KEYS + ("RTE_s", "changed"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            agg[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
        if retrain:
            gaps = [metrics.average_gap(r, rr) for r, rr in zip(rows, retrain)]
            splits = [metrics.gap_split(r, rr) for r, rr in zip(rows, retrain)]
            agg["gap"] = {"mean": float(np.mean(gaps)), "std": float(np.std(gaps))}
            for part in ("forgetting", "utility"):
                vals = [s[part] for s in splits]
                agg[f"gap_{part}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
        out[method] = agg
    return out


def table(summary: dict) -> str:
    def cell(v, digits=2):
        return "-" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = ["| method | UA | RA | TA | MIA | avg gap | gap: forgetting | gap: utility | RTE (s) | changed (%) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, a in summary.items():
        lines.append(f"| {method} | {cell(a['UA'])} | {cell(a['RA'])} | {cell(a['TA'])} | {cell(a['MIA'])} | "
                     f"{cell(a.get('gap'))} | {cell(a.get('gap_forgetting'))} | {cell(a.get('gap_utility'))} | "
                     f"{cell(a['RTE_s'], 3)} | {cell(a['changed'], 1)} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [m for m in summary if m != "retrain" and summary[m].get("gap")]
    forgetting = [summary[m]["gap_forgetting"]["mean"] for m in names]
    utility = [summary[m]["gap_utility"]["mean"] for m in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, forgetting, 0.4, label="gap: forgetting (UA, MIA)")
    ax.bar(xs + 0.2, utility, 0.4, label="gap: utility (RA, TA)")
    ax.set_xticks(xs, names)
    ax.set_ylabel("mean |metric - retrain| (points)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare unlearning methods on the int8 model.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/evaluate.py --dataset digits --json r.json --plot r.png\n"
               "  python tools/evaluate.py --dataset mnist1d --tune --max-cost 0.1 --json tuned.json")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", help="a .tflite to start from instead of training one")
    ap.add_argument("--arch", help="architecture to train (default: the dataset's recipe)")
    ap.add_argument("--forget", default="random:0.1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", type=Path, help="JSON {method: {field: value}} overriding defaults")
    ap.add_argument("--tune", action="store_true", help="search lr x epochs per method on these seeds")
    ap.add_argument("--max-cost", type=float, default=None,
                    help="with --tune: only configurations whose wall time is at most this fraction of "
                         "retrain's (e.g. 0.1), for every method alike")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if "retrain" in methods:  # the reference goes first
        methods = ["retrain"] + [m for m in methods if m != "retrain"]
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = json.loads(args.configs.read_text()) if args.configs else {}
    splits = [prepare(args.dataset, args.forget, s, args.model, args.arch, log=lambda m: print(m, file=sys.stderr))
              for s in seeds]

    if args.tune:
        retrain_rows = [run_method(sp, "retrain", configs.get("retrain")) for sp in splits]
        retrain_s = float(np.mean([r["RTE_s"] for r in retrain_rows]))
        chosen = {}
        for method in methods:
            if method == "retrain":
                continue
            best = None
            for lr, epochs in itertools.product(TUNE_LRS, TUNE_EPOCHS):
                cfg = {**configs.get(method, {}), "lr": lr, "epochs": epochs}
                rows = [run_method(sp, method, cfg) for sp in splits]
                gap = float(np.mean([metrics.average_gap(r, rr) for r, rr in zip(rows, retrain_rows)]))
                cost = float(np.mean([r["RTE_s"] for r in rows])) / retrain_s
                allowed = args.max_cost is None or cost <= args.max_cost
                print(f"tune {method} lr={lr} epochs={epochs}: gap {gap:.2f}, cost {100 * cost:.1f}% of retrain"
                      + ("" if allowed else " (over the cost limit)"), file=sys.stderr, flush=True)
                if allowed and (best is None or gap < best[0]):
                    best = (gap, cfg)
            if best is None:
                print(f"tune {method}: no configuration within the cost limit", file=sys.stderr)
                continue
            chosen[method] = best[1]
            print(f"tune {method}: chose {best[1]} (gap {best[0]:.2f})", file=sys.stderr, flush=True)
        print(json.dumps(chosen, indent=1))
        if args.json:
            args.json.write_text(json.dumps(chosen, indent=1))
        return 0

    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    for seed, sp in zip(seeds, splits):
        for method in methods:
            row = run_method(sp, method, configs.get(method))
            per_seed[method].append(row)
            print(f"seed {seed} {method}: " + ", ".join(f"{k} {row[k]:.2f}" for k in KEYS if row[k] is not None)
                  + f", RTE {row['RTE_s']:.3f} s, changed {row['changed']:.1f}%", file=sys.stderr, flush=True)
    summary = summarize(per_seed)
    setting = {"dataset": args.dataset, "forget": args.forget, "seeds": seeds, "model": args.model,
               "arch": args.arch, "methods": {m: make_config(m, configs.get(m)).to_dict() for m in methods},
               "original_train_s": [sp["train_s"] for sp in splits]}
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setting": setting, "methods": summary, "per_seed": per_seed},
                                        indent=1, default=str))
    if args.plot:
        plot(summary, args.plot, f"{args.dataset}, forget {args.forget}, {len(seeds)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
