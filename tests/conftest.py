"""Shared fixtures: the real TensorFlow-converted int8 models and LiteRT's outputs for them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_MODELS = ["digits_cnn", "digits_cnn_floatio", "mlp40", "mobilenet_tiny", "resnet_tiny",
                  "mobilenetv2_035"]


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.tflite"


def fixture_data(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(params=FIXTURE_MODELS)
def fixture_name(request) -> str:
    return request.param
