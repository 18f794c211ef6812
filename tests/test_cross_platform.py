"""Integer training and unlearning give the same bytes on every ISA: what a board computes, a host
computes too, given the board's arithmetic profile.

Each test runs a fixed job under both LiteRT profiles and compares the written model's SHA-256
with a committed digest. On x86 that checks the x86 engine computing the aarch64 profile; inside
the emulated Cortex-A76 of ``make test-arm64`` the same tests check native aarch64 against the same
digests (no floats, no thread-dependent sums on these paths, so the bytes must agree).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_path
from edge_qmul import datasets, load_tflite, metrics
from edge_qmul.quant import quantize
from edge_qmul.train import Trainer, fit
from edge_qmul.unlearn import unlearn

PROFILES = ("x86_64", "aarch64")
# recorded on x86_64 (both profiles), and checked inside the emulated Cortex-A76
DIGESTS = {
    "train": {"x86_64": "a9c21e9612b07fa7c1e54a77ce0ae7a214a4be3b95226184adb5944de37d5830",
              "aarch64": "032f264d431417d4db4edba5301aa13cca8eb010441c1fc5de2ace7434193058"},
    "forget": {"x86_64": "d7b01705dd9329f0dc7fb98b63e56994365092f5b4fad4d72da762123ae1e73b",
               "aarch64": "67d0113b4d6d8edc211fdaf48342fef17c85488947a6606d9a103810c638f721"},
}


def _data(model, n: int = 192):
    ds = datasets.load("digits", seed=0)
    q = model.tensors[model.core_inputs[0]].quant
    return quantize(ds.x_train[:n], q), ds.y_train[:n]


@pytest.mark.parametrize("litert", PROFILES)
def test_training_is_deterministic_across_platforms(litert):
    """Two epochs of integer SGD on the TensorFlow-converted digits CNN."""
    model = load_tflite(fixture_path("digits_cnn"), litert=litert)
    x, y = _data(model)
    fit(Trainer(model, lr=0.05, momentum=0.9), x, y, epochs=2)
    assert metrics.model_sha256(model) == DIGESTS["train"][litert]


@pytest.mark.parametrize("litert", PROFILES)
def test_forget_job_is_deterministic_across_platforms(litert):
    """The default owner method, a fixed number of steps, on the same model and data."""
    model = load_tflite(fixture_path("digits_cnn"), litert=litert)
    x, y = _data(model)
    forget, retain = (x[:24], y[:24]), (x[24:], y[24:])
    result = unlearn(model, forget, retain, config={"epochs": 2, "stop": False})
    assert metrics.model_sha256(result.model) == DIGESTS["forget"][litert]
    # the two profiles really compute differently on this model (else the test proves little)
    assert DIGESTS["forget"]["x86_64"] != DIGESTS["forget"]["aarch64"]
