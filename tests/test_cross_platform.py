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
from edge_qmul import load_tflite, metrics
from edge_qmul.train import Trainer, fit
from edge_qmul.unlearn import unlearn

PROFILES = ("x86_64", "aarch64")
# recorded on x86_64 (both profiles), and checked inside the emulated Cortex-A76
DIGESTS = {
    "train": {"x86_64": "edb932cca9ecec2b2dfaa8e36f248e0c42ac0360d007f11f724ef4bebcf5d2eb",
              "aarch64": "807983bea0bc75115a8e6f5353573fe925111b01d0fa24d71f267f3f0362ee9e"},
    "forget": {"x86_64": "3f4bdcffd59fa44a281cffc22010734a445faebeedae53aa94a5e398892565df",
               "aarch64": "db4947685bc6e15d3eacf1c5bb2493ea4ad3cf954d0edd618bd537e640c2bcd2"},
}


def _data(model, n: int = 192):
    """Seeded int8 inputs and labels (a board has no scikit-learn for the digits data set; the
    bytes, not the accuracy, are what is compared)."""
    rng = np.random.default_rng(0)
    shape = (n,) + tuple(model.tensors[model.core_inputs[0]].shape[1:])
    return rng.integers(-128, 128, shape).astype(np.int8), rng.integers(0, 10, n)


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
