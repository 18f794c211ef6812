"""load -> save -> load keeps every tensor and output; edited weights reach LiteRT unchanged."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import fixture_data, fixture_path
from edge_qmul import ModelError, load_tflite, save_tflite
from edge_qmul import litert
from edge_qmul.tflite import to_bytes


def _same_model(a, b) -> None:
    assert len(a.tensors) == len(b.tensors)
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.name, ta.shape, ta.dtype, ta.quant, ta.shape_signature) == \
            (tb.name, tb.shape, tb.dtype, tb.quant, tb.shape_signature)
        assert (ta.data is None) == (tb.data is None)
        if ta.data is not None:
            assert ta.data.dtype == tb.data.dtype
            np.testing.assert_array_equal(ta.data, tb.data)
    assert [(o.kind, o.inputs, o.outputs, o.options, o.version) for o in a.ops] == \
        [(o.kind, o.inputs, o.outputs, o.options, o.version) for o in b.ops]
    assert (a.inputs, a.outputs, a.metadata, a.signature) == (b.inputs, b.outputs, b.metadata, b.signature)


def test_round_trip_identical(fixture_name, tmp_path):
    a = load_tflite(fixture_path(fixture_name))
    path = save_tflite(a, tmp_path / "m.tflite")
    b = load_tflite(path)
    _same_model(a, b)
    d = fixture_data(fixture_name)
    np.testing.assert_array_equal(b.predict(d["x"]), d["y_builtin"])
    # LiteRT runs the written file and agrees too
    np.testing.assert_array_equal(litert.run(path.read_bytes(), d["x"]), d["y_builtin"])
    # writing is deterministic: a second save gives the same bytes
    assert to_bytes(b) == path.read_bytes()


def test_edited_weights_reach_litert(fixture_name, tmp_path):
    model = load_tflite(fixture_path(fixture_name))
    original = model.copy()
    rng = np.random.default_rng(0)
    params = model.parameters()
    for name, value in params.items():
        if name.endswith(".weight"):
            step = rng.integers(-3, 4, size=value.shape)
            model.set_parameter(name, np.clip(value.astype(np.int64) + step, -127, 127).astype(np.int8))
        else:
            model.set_parameter(name, (value.astype(np.int64) + rng.integers(-50, 51, size=value.shape))
                                .astype(np.int32))
    d = fixture_data(fixture_name)
    y = model.predict(d["x"])
    # The edit changed what the model computes (mobilenetv2_035's outputs are saturated to one
    # constant row, so look at every tensor, not only the output).
    before = original.run({original.inputs[0]: d["x"]})
    after = model.run({model.inputs[0]: d["x"]})
    assert any(not np.array_equal(before[t], after[t]) for t in before)
    path = save_tflite(model, tmp_path / "edited.tflite")
    np.testing.assert_array_equal(litert.run(path.read_bytes(), d["x"]), y)
    np.testing.assert_array_equal(load_tflite(path).predict(d["x"]), y)


def test_set_parameter_checks_shape_and_dtype():
    model = load_tflite(fixture_path("digits_cnn"))
    name = next(iter(model.parameters()))
    before = model.parameters()[name].copy()
    with pytest.raises(ModelError, match="conv_2d_0.weight"):
        model.set_parameter(name, before.astype(np.int32))
    with pytest.raises(ModelError, match="unknown parameter"):
        model.set_parameter("nope.weight", before)
    np.testing.assert_array_equal(model.parameters()[name], before)


def test_save_is_atomic_and_leaves_no_temp(tmp_path, monkeypatch):
    model = load_tflite(fixture_path("mlp40"))
    target = tmp_path / "m.tflite"
    save_tflite(model, target)
    good = target.read_bytes()

    real_replace = os.replace

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_tflite(model, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_bytes() == good  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]  # no temp left behind
