"""Two Python threads running kernels at once, under each numba threading layer this machine has.

The agent runs a job in one thread while its request thread may run the model too. numba's
workqueue layer (its fallback when OpenMP is missing, as on a board without libgomp1) aborts the
process when two threads launch parallel regions at once; the engine then runs kernels one at a
time (kernels.serialized). Each case runs in a fresh process, since a process has one layer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys, threading
import numpy as np
import numba
from edge_qmul import load_tflite
from edge_qmul.kernels import serialized
from edge_qmul.train import Trainer

model = load_tflite("tests/fixtures/mobilenet_tiny.tflite")
rng = np.random.default_rng(0)
x = rng.integers(-128, 128, (8,) + tuple(model.tensors[model.core_inputs[0]].shape[1:])).astype(np.int8)
want = model.forward(x)
print("layer", numba.threading_layer(), "serialized", serialized(), flush=True)
errors = []

def predict():
    for _ in range(ROUNDS):
        if not np.array_equal(model.forward(x), want):
            errors.append("forward differs")

def train():
    trainee = model.copy()
    trainer = Trainer(trainee, lr=0.01)
    y = np.arange(8) % 10
    for _ in range(ROUNDS // 4):
        trainer.step(x, y)

threads = [threading.Thread(target=predict), threading.Thread(target=train), threading.Thread(target=predict)]
for t in threads: t.start()
for t in threads: t.join()
print("errors", errors, flush=True)
sys.exit(1 if errors else 0)
"""


def _available(layer: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", "from numba.np.ufunc import parallel; "
                            "parallel._launch_threads(); import numba; print(numba.threading_layer())"],
                           env={**os.environ, "NUMBA_THREADING_LAYER": layer}, capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    return probe.returncode == 0 and probe.stdout.strip() == layer


def _run(layer: str, rounds: int, lock: str = "on") -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2",
           "EDGE_QMUL_KERNEL_LOCK": lock}
    return subprocess.run([sys.executable, "-c", SCRIPT.replace("ROUNDS", str(rounds))], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_two_threads_run_kernels_at_once(layer):
    if not _available(layer):
        pytest.skip(f"numba's {layer} threading layer is not available here")
    r = _run(layer, 40)
    assert r.returncode == 0, f"{layer}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert f"layer {layer} serialized {layer == 'workqueue'}" in r.stdout
    assert "errors []" in r.stdout


@pytest.mark.slow
def test_workqueue_without_the_lock_aborts():
    """The lock is what keeps the workqueue layer alive (numba's own abort, seen without it)."""
    if not _available("workqueue"):
        pytest.skip("numba's workqueue threading layer is not available here")
    r = _run("workqueue", 400, lock="off")
    assert r.returncode != 0 and "Concurrent access has been detected" in (r.stdout + r.stderr), \
        f"exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-1500:]}"
