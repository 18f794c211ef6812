"""Training from scratch in the engine (integer MACs only): test accuracy, mean of 3 seeds.

    python benchmarks/train_accuracy.py [--json OUT] [--seeds 0,1,2]

digits: digits_cnn on scikit-learn's digits, stratified 20% held-out split (seed = split seed).
mnist1d: mnist1d_cnn (1xK convolutions, 32 channels) on mnist1d's own test set.
Settings are the defaults of ``edge_qmul.train.TRAINING_RECIPES``, the same the tests use.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_qmul.train import TRAINING_RECIPES, train_from_scratch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: python benchmarks/train_accuracy.py --json benchmarks/results/train_accuracy.json")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for dataset in TRAINING_RECIPES:
        accs, times = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            _, acc = train_from_scratch(dataset, seed=seed)
            times.append(time.perf_counter() - t0)
            accs.append(acc)
            print(f"{dataset} seed {seed}: test accuracy {100 * acc:.2f}% ({times[-1]:.1f} s)", flush=True)
        rows.append({"dataset": dataset, **TRAINING_RECIPES[dataset], "seeds": seeds,
                     "test_accuracy": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                     "wall_s_median": float(np.median(times))})
    print("\n| dataset | architecture | epochs | test accuracy (mean ± std, 3 seeds) | wall time / run (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['arch']} | {r['epochs']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f}% "
              f"| {r['wall_s_median']:.1f} s |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
