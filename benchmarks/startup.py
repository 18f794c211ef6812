"""Start-up benchmark: how long a new process takes to reach its first training step.

    python benchmarks/startup.py [--json OUT] [--repeats N]

For each model a fresh Python process imports edge_qmul, loads the .tflite, builds a Trainer and
runs one training step (batch 32). The wall time is measured by this script around the whole
child process (interpreter start-up included), and the child also reports the time from its first
statement to the end of the step. numba's cache is warmed by one unmeasured run first (the target
is a warm cache: a board compiles once, at installation or its first job). Medians of --repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import time
t0 = time.perf_counter()
import numpy as np
from edge_qmul import load_tflite
from edge_qmul.train import Trainer
model = load_tflite({path!r})
shape = (32,) + tuple(model.tensors[model.core_inputs[0]].shape[1:])
trainer = Trainer(model, lr=0.01)
trainer.step(np.zeros(shape, np.int8), np.zeros(32, np.int64))
print(time.perf_counter() - t0)
"""
MODELS = ("digits_cnn", "mobilenet_tiny", "mobilenetv2_035")


def run_child(path: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD.format(path=str(path))], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    return time.perf_counter() - t0, float(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python benchmarks/startup.py --json benchmarks/results/startup.json")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    for name in MODELS:
        path = ROOT / "tests" / "fixtures" / f"{name}.tflite"
        run_child(path)  # warm numba's cache for this model's kernels
        walls, inner = zip(*(run_child(path) for _ in range(args.repeats)))
        rows.append({"model": name, "process_wall_s": statistics.median(walls),
                     "import_to_first_step_s": statistics.median(inner)})
        print(f"{name}: new process to first training step {rows[-1]['process_wall_s']:.2f} s "
              f"(from the first import: {rows[-1]['import_to_first_step_s']:.2f} s), median of {args.repeats}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
