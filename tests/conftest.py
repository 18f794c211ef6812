"""Shared fixtures: the real TensorFlow-converted int8 models and LiteRT's outputs for them."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

# Compiled plans (edge_qmul/plan) are built when a test asks (tests/test_plan.py), not at every
# model's third forward: compiling one costs seconds per model, and the tests load hundreds.
os.environ.setdefault("EDGE_QMUL_PLAN", "explicit")
# Tests run the thread counts they set, whatever the machine's load (tests/test_load_threads.py
# tests the engine's default, threads that follow the load).
os.environ.setdefault("EDGE_QMUL_THREADS", "fixed")
# A run started in the background by a non-interactive shell (`pytest ... &`, as .ci/run starts the
# emulated board) inherits SIGINT ignored, and so would every program it starts: their Ctrl-C tests
# would then see the signal do nothing. A handler here is reset to the default in each child.
signal.signal(signal.SIGINT, signal.default_int_handler)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_MODELS = ["digits_cnn", "digits_cnn_floatio", "mlp40", "mobilenet_tiny", "resnet_tiny",
                  "mobilenetv2_035"]


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.tflite"


def litert_data(npz: Path) -> dict[str, np.ndarray]:
    """A model's recorded inputs and LiteRT outputs. ``y_builtin`` is what LiteRT's builtin kernels
    compute on the platform the tests run on: the file's own (recorded on x86_64), or on an aarch64
    machine the outputs recorded under the emulated Cortex-A76 (tests/fixtures/litert_aarch64)."""
    from edge_qmul.arithmetic import host_platform
    with np.load(npz) as d:
        data = {k: d[k] for k in d.files}
    if host_platform() == "aarch64":
        group = "zoo" if npz.parent.name == "zoo" else "fixtures"
        with np.load(FIXTURES / "litert_aarch64" / group / npz.name) as rec:
            assert np.array_equal(rec["x"], data["x"]), f"{npz.name}: recorded inputs differ"
            data["y_builtin"] = rec["y_per_sample"]
        data.pop("y_xnnpack", None)  # recorded with x86's XNNPACK
    return data


def fixture_data(name: str) -> dict[str, np.ndarray]:
    return litert_data(FIXTURES / f"{name}.npz")


@pytest.fixture(params=FIXTURE_MODELS)
def fixture_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """A digits CNN trained in the engine on the training split minus a held-out validation slice
    (the slice the unlearning stopping rule compares with), shared by the store / CLI / bridge tests.
    Returns the dataset, the validation mask, the model and its .tflite path."""
    from edge_qmul import datasets, models, save_tflite
    from edge_qmul.quant import quantize
    from edge_qmul.train import Trainer, fit
    root = tmp_path_factory.mktemp("trained_digits")
    ds = datasets.load("digits", seed=0)
    rng = np.random.default_rng(0)
    n = len(ds.y_train)
    val = np.zeros(n, bool)
    val[rng.choice(n, n // 10, replace=False)] = True
    model = models.build("digits_cnn", ds.input_shape, 10, seed=0, calib_x=ds.x_train[~val][:256])
    q = model.tensors[model.core_inputs[0]].quant
    fit(Trainer(model, lr=0.05, momentum=0.9), quantize(ds.x_train[~val], q), ds.y_train[~val], epochs=8)
    path = save_tflite(model, root / "model.tflite")
    return {"ds": ds, "val": val, "model": model, "path": path}
