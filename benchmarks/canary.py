"""Canary verification of forgetting over seeds (issue 19): is a person's trigger gone after a forget?

    python benchmarks/canary.py --dataset digits --seeds 10 [--owner user7] [--methods qmul,ft]
                                [--json benchmarks/results/canary_digits.json] [--markdown]

Per seed, everything the product does, on the host:

1. ``tools/train_base.py``'s ``prepare`` with ``--canary OWNER``: the dataset's recipe, 20 simulated
   owners, a trigger in half of OWNER's training samples; and the same run without the canary (clean
   test accuracy with and without it);
2. each method of ``--methods`` forgets OWNER's training samples (the device's job: the engine's
   ``unlearn`` with the saved similar-label table and the validation slice);
3. the gold standard: the recipe retrained from scratch without OWNER;
4. ``verify_forget``: the trigger's success rate on the test inputs (true label not the target)
   before, after each forget and for the retrained model, with exact intervals; the verdict of each
   forget against the retrained model's rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from edge_qmul import load_tflite, metrics  # noqa: E402
from edge_qmul.evaluation.canary import load_canary, verify_forget  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.unlearn import DEFAULT_METHOD, unlearn  # noqa: E402
from edge_qmul.unlearn.similar_labels import SimilarLabelTable  # noqa: E402
import train_base  # noqa: E402


def one_seed(dataset: str, seed: int, owner: str, methods: list[str], work: Path, config: dict | None = None) -> dict:
    """Every figure of one seed (see the module docstring)."""
    quiet = lambda m: None  # noqa: E731
    t0 = time.perf_counter()
    plain = train_base.prepare(work / f"plain{seed}", dataset=dataset, seed=seed, say=quiet)
    out = work / f"canary{seed}"
    manifest = train_base.prepare(out, dataset=dataset, seed=seed, say=quiet, canary=(owner,))
    canary, _ = load_canary(out / "canaries.json", owner)
    base = load_tflite(out / "model.tflite")
    q = base.tensors[base.core_inputs[0]].quant
    with np.load(out / "samples_train.npz") as t, np.load(out / "samples_validation.npz") as v:
        x, y, who = t["x"], t["y"], t["owners"].astype(str)
        validation = (quantize(v["x"], q), v["y"])
    mine = who == owner
    forget, retain = (quantize(x[mine], q), y[mine]), (quantize(x[~mine], q), y[~mine])
    table = SimilarLabelTable.load(out / "table.json")
    data = train_base.load_builtin(dataset, seed)  # its test split: the held-out inputs
    data.x, data.y = x, y
    retrained, _ = train_base.train_model(data, ~mine, manifest["model"]["arch"], None, seed, quiet)
    x_test8 = quantize(data.x_test, q)
    row = {"seed": seed, "marked": len(canary.marked), "owner_samples": int(mine.sum()),
           "target": canary.target, "test_acc_canary": manifest["accuracy_percent"]["test"],
           "test_acc_plain": plain["accuracy_percent"]["test"],
           "test_acc_retrained": metrics.accuracy(retrained, x_test8, data.y_test), "methods": {}}
    for method in methods:
        t1 = time.perf_counter()
        result = unlearn(base, forget, retain, method=method, validation=validation, table=table, config=config)
        after = result.model
        v = verify_forget(canary, base, after, retrained, data.x_test, data.y_test)
        row["methods"][method] = {"verdict": v["verdict"], "before": v["before"], "after": v["after"],
                                  "reference": v["reference"], "p_value": v["p_value"],
                                  "difference_hi": v["difference_hi"], "forget_s": round(time.perf_counter() - t1, 2),
                                  "steps": result.steps, "stopped_by_rule": result.stopped_by_rule,
                                  "test_acc_after": metrics.accuracy(after, x_test8, data.y_test)}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def summary(rows: list[dict], methods: list[str]) -> dict:
    """Medians and ranges over seeds, and how many seeds gave each verdict."""
    def pct(values):
        return {"median": round(100 * statistics.median(values), 1), "min": round(100 * min(values), 1),
                "max": round(100 * max(values), 1)}
    out = {"seeds": len(rows),
           "test_acc_canary_minus_plain": [round(r["test_acc_canary"] - r["test_acc_plain"], 2) for r in rows]}
    out["before"] = pct([r["methods"][methods[0]]["before"]["rate"] for r in rows])
    out["retrained"] = pct([r["methods"][methods[0]]["reference"]["rate"] for r in rows])
    for m in methods:
        verdicts = [r["methods"][m]["verdict"] for r in rows]
        out[m] = {"after": pct([r["methods"][m]["after"]["rate"] for r in rows]),
                  "verdicts": {w: verdicts.count(w) for w in sorted(set(verdicts))},
                  "after_within_retrained_interval": sum(
                      r["methods"][m]["reference"]["lo"] <= r["methods"][m]["after"]["rate"]
                      <= r["methods"][m]["reference"]["hi"] for r in rows),
                  "after_at_or_below_retrained_upper": sum(
                      r["methods"][m]["after"]["rate"] <= r["methods"][m]["reference"]["hi"] for r in rows),
                  "test_acc_after_minus_retrained": [
                      round(r["methods"][m]["test_acc_after"] - r["test_acc_retrained"], 1) for r in rows]}
    return out


def markdown(rows: list[dict], methods: list[str]) -> str:
    head = "| seed | marked | test acc (canary / none / retrained) | before | retrained | " + \
        " | ".join(f"{m} after (test acc) | {m} verdict" for m in methods) + " |"
    lines = [head, "|" + "---|" * (5 + 2 * len(methods))]
    for r in rows:
        m0 = r["methods"][methods[0]]
        cells = [str(r["seed"]), f"{r['marked']} of {r['owner_samples']}",
                 f"{r['test_acc_canary']:.1f} / {r['test_acc_plain']:.1f} / {r['test_acc_retrained']:.1f}",
                 f"{100 * m0['before']['rate']:.1f}%", f"{100 * m0['reference']['rate']:.1f}% "
                 f"({100 * m0['reference']['lo']:.1f}-{100 * m0['reference']['hi']:.1f})"]
        for m in methods:
            a = r["methods"][m]
            cells += [f"{100 * a['after']['rate']:.1f}% ({a['test_acc_after']:.1f})", a["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits", choices=sorted(train_base.TRAINING_RECIPES))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--owner", default="user7")
    ap.add_argument("--methods", default=f"{DEFAULT_METHOD},ft")
    ap.add_argument("--config", type=json.loads, default=None,
                    help='overrides for every method\'s configuration, JSON (e.g. \'{"stop": false}\')')
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    with tempfile.TemporaryDirectory(prefix="canary_bench_") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows.append(one_seed(args.dataset, seed, args.owner, methods, Path(tmp), args.config))
            r = rows[-1]
            print(f"seed {seed}: " + ", ".join(
                f"{m} {r['methods'][m]['verdict']} (before {100 * r['methods'][m]['before']['rate']:.1f}%, "
                f"after {100 * r['methods'][m]['after']['rate']:.1f}%, retrained "
                f"{100 * r['methods'][m]['reference']['rate']:.1f}%)" for m in methods) + f" [{r['wall_s']} s]",
                flush=True)
    result = {"dataset": args.dataset, "owner": args.owner, "methods": methods, "config": args.config, "rows": rows,
              "summary": summary(rows, methods),
              "command": "python benchmarks/canary.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(result["summary"], indent=1))
    if args.markdown:
        print(markdown(rows, methods))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
