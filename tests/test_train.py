"""Integer training: gradients against the float64 fake-quant reference, updates, memory, errors."""
from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest

import reference as R
import test_reference as TR
from conftest import fixture_data, fixture_path
from edge_qmul import ModelError, litert, load_tflite, models, save_tflite
from edge_qmul.quant import quantize
from edge_qmul.train import Trainer, fit, loss_head, train_from_scratch


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def gradient_cosines(model, x8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Integer gradients (dequantized) vs the float64 reference on the same int8 forward values:
    the cosine of every parameter tensor."""
    trainer = Trainer(model, lr=0.01)
    grads = trainer.gradients(x8, labels)
    values = model.run({model.core_inputs[0]: x8}, start_after_interface=True)
    acts = R.dequantized_values(model, values)
    logits = acts[trainer.logits_tensor]
    _, dl = loss_head(logits.reshape(len(x8), -1), labels)
    ref = R.backward(model, acts, dl.reshape(logits.shape))
    assert set(grads.params) == set(ref)
    return {name: cosine(grads[name].real(), ref[name]) for name in grads.params}


def check_gradients(model, x8: np.ndarray, labels: np.ndarray, min_cos: float = 0.99) -> int:
    """Every parameter tensor's gradient within ``min_cos`` of the reference; returns how many."""
    cos = gradient_cosines(model, x8, labels)
    for name, c in cos.items():
        assert c >= min_cos, f"{name}: cosine {c:.5f} with the float64 reference"
    return len(cos)


@pytest.mark.parametrize("case", list(TR.CASES))
def test_op_gradients_match_reference(case):
    model, x_real = TR.build(TR.CASES[case], seed=1)
    x8 = TR.to_int8(model, x_real)
    classes = int(np.prod(model.tensors[R.output_tensor(model)].shape[1:]))
    labels = np.random.default_rng(2).integers(0, classes, len(x8))
    assert check_gradients(model, x8, labels) > 0


@pytest.mark.parametrize("name", ["digits_cnn", "digits_cnn_floatio", "mlp40", "mobilenet_tiny",
                                  "resnet_tiny", "mobilenetv2_035"])
def test_fixture_gradients_match_reference(name):
    model = load_tflite(fixture_path(name))
    x = fixture_data(name)["x"]
    x8 = x if x.dtype == np.int8 else quantize(x, model.tensors[model.core_inputs[0]].quant)
    labels = np.random.default_rng(0).integers(0, 10, len(x8))
    assert check_gradients(model, x8, labels) >= 6


@pytest.mark.parametrize("arch,shape", [("mlp", (8, 8, 1)), ("digits_cnn", (8, 8, 1)),
                                        ("mnist1d_cnn", (1, 40, 1)), ("mobilenet_tiny", (32, 32, 3)),
                                        ("resnet_tiny", (32, 32, 3))])
def test_built_model_gradients_match_reference(arch, shape):
    rng = np.random.default_rng(3)
    model = models.build(arch, shape, 10, seed=0, calib_x=rng.random((64,) + shape).astype(np.float32))
    x8 = quantize(rng.random((16,) + shape).astype(np.float32), model.tensors[model.core_inputs[0]].quant)
    check_gradients(model, x8, rng.integers(0, 10, 16))


def test_grouped_gradients_equal_separate_ones():
    """One forward/backward over two concatenated batches gives each batch its own gradients."""
    model = load_tflite(fixture_path("digits_cnn"))
    d = fixture_data("digits_cnn")
    rng = np.random.default_rng(0)
    xa, xb = d["x"][:20], d["x"][20:52]
    ya, yb = rng.integers(0, 10, 20), rng.integers(0, 10, 32)
    t = Trainer(model, lr=0.01)
    ga, gb = t.gradients_groups([(xa, ya, "ce"), (xb, None, "entropy")])
    sa, sb = t.gradients(xa, ya), t.gradients(xb, None, head="entropy")
    assert ga.loss == pytest.approx(sa.loss) and gb.loss == pytest.approx(sb.loss)
    for grouped, alone in ((ga, sa), (gb, sb)):
        assert set(grouped.params) == set(alone.params)
        for name in alone.params:
            assert cosine(grouped[name].real(), alone[name].real()) > 0.9999, name


def test_loss_heads_against_finite_differences():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 5))
    y = rng.integers(0, 5, 4)
    soft = rng.random((4, 5))
    soft /= soft.sum(axis=1, keepdims=True)
    for head, t in (("ce", y), ("neg_ce", y), ("soft", soft), ("entropy", None)):
        _, g = loss_head(z, t, head)
        eps = 1e-6
        for i, j in [(0, 0), (1, 3), (3, 4)]:
            zp, zm = z.copy(), z.copy()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd = (loss_head(zp, t, head)[0] - loss_head(zm, t, head)[0]) / (2 * eps)
            assert abs(fd - g[i, j]) < 1e-6, head
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(loss_head(z, onehot, "soft")[1], loss_head(z, y, "ce")[1])
    np.testing.assert_allclose(loss_head(z, y, "neg_ce")[1], -loss_head(z, y, "ce")[1])


def _digits(model):
    from edge_qmul import datasets
    ds = datasets.load("digits", seed=0)
    q = model.tensors[model.core_inputs[0]].quant
    return ds, quantize(ds.x_train, q), quantize(ds.x_test, q)


def test_fine_tuning_a_fixture_reaches_litert(tmp_path):
    model = load_tflite(fixture_path("digits_cnn"))
    before = {k: v.copy() for k, v in model.parameters().items()}
    ds, xtr, xte = _digits(model)
    trainer = Trainer(model, lr=0.02, momentum=0.9)
    losses = fit(trainer, xtr, ds.y_train, epochs=2)
    assert losses[-1] < losses[0] * 1.05
    changed = sum(int(np.count_nonzero(before[k] != v)) for k, v in model.parameters().items())
    assert changed > 100
    path = save_tflite(model, tmp_path / "tuned.tflite")
    np.testing.assert_array_equal(litert.run(path.read_bytes(), xte), model.forward(xte))


def test_no_update_vanishes():
    """A learning rate whose per-step change is far below one int8 step still moves the weights."""
    model = load_tflite(fixture_path("digits_cnn"))
    ds, xtr, _ = _digits(model)
    x, y = xtr[:32], ds.y_train[:32]
    probe = Trainer(model.copy(), lr=1.0, trainable="last:1")
    g = probe.gradients(x, y)
    name = "fully_connected_4.weight"
    s_w = model.tensors[model.parameter_tensors()[name]].quant.scale.astype(np.float64)[:, None]
    step_per_lr = np.abs(g[name].real()) / s_w  # int8 steps per unit of learning rate
    lr = 0.05 / float(step_per_lr.max())  # the largest single-step change is 1/20 of an int8 step
    trainer = Trainer(model, lr=lr, trainable="last:1")
    w0 = model.parameters()[name].copy()
    m0 = trainer.master[name].copy()
    trainer.step(x, y)
    assert np.array_equal(model.parameters()[name], w0)  # no int8 weight moved in one step...
    assert not np.array_equal(trainer.master[name], m0)  # ...but the master weights did
    for _ in range(60):
        trainer.step(x, y)
    assert np.count_nonzero(model.parameters()[name] != w0) > 0


def test_pseudo_stochastic_rounding_keeps_sub_unit_updates():
    """Without fractional master bits, round-to-nearest loses updates below half a step; the
    pseudo-stochastic rounding (discarded bits decide) lets a share of them through."""
    moved = {}
    for stochastic in (False, True):
        model = load_tflite(fixture_path("digits_cnn"))
        ds, xtr, _ = _digits(model)
        x, y = xtr[:32], ds.y_train[:32]
        probe = Trainer(model.copy(), lr=1.0, trainable="last:1", frac_bits=0)
        g = probe.gradients(x, y)["fully_connected_4.weight"]
        s_w = model.tensors[model.ops[4].inputs[1]].quant.scale.astype(np.float64)[:, None]
        lr = 0.4 / float((np.abs(g.real()) / s_w).max())  # every step below half an int8 step
        trainer = Trainer(model, lr=lr, trainable="last:1", frac_bits=0, stochastic_rounding=stochastic)
        w0 = model.parameters()["fully_connected_4.weight"].copy()
        trainer.step(x, y)
        moved[stochastic] = int(np.count_nonzero(model.parameters()["fully_connected_4.weight"] != w0))
    assert moved[False] == 0 and moved[True] > 0


def test_freezing_trains_only_chosen_ops():
    model = load_tflite(fixture_path("digits_cnn"))
    ds, xtr, _ = _digits(model)
    before = {k: v.copy() for k, v in model.parameters().items()}
    trainer = Trainer(model, lr=0.05, trainable="last:1")
    assert [model.ops[i].name for i in trainer.trainable_ops] == ["fully_connected_4"]
    fit(trainer, xtr[:256], ds.y_train[:256], epochs=1)
    after = model.parameters()
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same == (not k.startswith("fully_connected_4")), k
    by_name = Trainer(load_tflite(fixture_path("digits_cnn")), trainable=["conv_2d_1", 4])
    assert by_name.trainable_ops == [1, 4]


def test_weight_decay_and_momentum():
    model = load_tflite(fixture_path("mlp40"))
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (32, 40)).astype(np.int8)
    y = rng.integers(0, 10, 32)
    t = Trainer(model, lr=0.05, weight_decay=0.5, trainable="last:1")
    name = "fully_connected_2.weight"
    m0 = np.abs(t.master[name].astype(np.int64)).sum()
    zero = t.gradients(x, y)
    for pg in zero.params.values():
        pg.acc[...] = 0
    for _ in range(5):
        t.apply(zero)
    assert np.abs(t.master[name].astype(np.int64)).sum() < m0  # decay alone shrinks the weights
    t2 = Trainer(load_tflite(fixture_path("mlp40")), lr=0.01, momentum=0.9, trainable="last:1")
    g = t2.gradients(x, y)
    t2.apply(g)
    first = t2.velocity[name].copy()
    for pg in g.params.values():
        pg.acc[...] = 0
    t2.apply(g)  # no gradient: the velocity decays by mu and still moves the weights
    np.testing.assert_allclose(t2.velocity[name], np.round(first * 0.9), atol=1)


def test_cosine_schedule():
    t = Trainer(load_tflite(fixture_path("mlp40")), lr=0.1, schedule="cosine", total_steps=10)
    assert t.learning_rate() == pytest.approx(0.1)
    t.steps = 5
    assert t.learning_rate() == pytest.approx(0.05)
    t.steps = 10
    assert t.learning_rate() == pytest.approx(0.0)


def _model_hash(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.parameters().items()):
        h.update(name.encode())
        h.update(value.tobytes())
    return h.hexdigest()


def test_bad_input_leaves_model_unchanged():
    model = load_tflite(fixture_path("digits_cnn"))
    d = fixture_data("digits_cnn")
    x, y = d["x"][:8], np.arange(8) % 10
    h = _model_hash(model)
    t = Trainer(model, lr=0.05)
    with pytest.raises(ModelError, match=r"label 10 at position 3 is outside \[0, 10\)"):
        t.step(x, np.array([0, 1, 2, 10, 4, 5, 6, 7]))
    with pytest.raises(ModelError, match=r"has shape \(N, 8, 8, 1\)"):
        t.step(x[:, :4], y)
    with pytest.raises(ModelError, match="labels must be 8 integers"):
        t.step(x, y[:5])
    bad = x.astype(np.float32) / 255
    bad[2, 3, 3, 0] = np.nan
    with pytest.raises(ModelError, match="NaN or inf"):
        t.step(bad, y)
    for lr in (0.0, -0.1, float("nan")):
        with pytest.raises(ModelError, match="learning rate"):
            Trainer(model, lr=lr)
    with pytest.raises(ModelError, match="unknown op 'conv_2d_9'"):
        Trainer(model, trainable=["conv_2d_9"])
    with pytest.raises(ModelError, match="unknown loss head"):
        t.gradients(x, y, head="hinge")
    assert _model_hash(model) == h


def _measured_peak(model, x8, y) -> tuple[int, dict]:
    """The real peak of one training step: what tracemalloc saw allocated during the step, plus the
    training state that lives across steps (parameters, master weights, momentum), counted by bytes.

    Only what is allocated during the step is measured rather than the process's whole traced
    memory, which also holds unrelated interpreter state (numba's loaded code, earlier tests)."""
    m = model.copy()
    trainer = Trainer(m, lr=0.01)
    trainer.step(x8, y)  # warm: numba compiled, lazily built state made
    persistent = sum(v.nbytes for v in m.parameters().values()) \
        + sum(v.nbytes for v in trainer.master.values()) + sum(v.nbytes for v in trainer.velocity.values())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        trainer.step(x8, y)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak + persistent, trainer.memory_report(len(x8))


@pytest.mark.parametrize("arch,shape", [("digits_cnn", (8, 8, 1)), ("mobilenet_tiny", (32, 32, 3))])
def test_memory_report_matches_measured_peak(arch, shape):
    rng = np.random.default_rng(0)
    model = models.build(arch, shape, 10, seed=0, calib_x=rng.random((64,) + shape).astype(np.float32))
    x8 = quantize(rng.random((32,) + shape).astype(np.float32), model.tensors[model.core_inputs[0]].quant)
    y = rng.integers(0, 10, 32)
    peak, report = _measured_peak(model, x8, y)
    assert 0.8 <= peak / report["total"] <= 1.2, (peak, report)
    assert peak <= 0.5 * report["float32_total"], (peak, report)
    parts = ("weights", "master_weights", "optimizer_state", "gradients", "saved_activations", "errors_and_sums")
    assert sum(report[k] for k in parts) == report["total"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,target", [("digits", 0.95), ("mnist1d", 0.88)])
def test_training_from_scratch_reaches_target(dataset, target):
    """Integer MACs only, mean of 3 seeds (float32 references: digits 96.9-97.4%, mnist1d 93-94%)."""
    accuracies = [train_from_scratch(dataset, seed=seed)[1] for seed in (0, 1, 2)]
    assert np.mean(accuracies) >= target, accuracies


def test_mean_over_one_cell_gives_a_writable_error():
    """MEAN over 1 x 1 axes (DenseNet / NASNet at small inputs): its input error is masked in place
    by the conv before it, so it must be an array of its own, not a read-only broadcast view."""
    from oplib import GraphBuilder, qp
    rng = np.random.default_rng(0)
    g = GraphBuilder()
    x = g.tensor("x", (1, 1, 1, 4), np.int8, qp(0.05, 0))
    w = g.tensor("w", (4, 1, 1, 4), np.int8, qp([0.02] * 4, [0] * 4), rng.integers(-100, 100, (4, 1, 1, 4)))
    b = g.tensor("b", (4,), np.int32, None, np.zeros(4, np.int32))
    c = g.tensor("c", (1, 1, 1, 4), np.int8, qp(0.1, 0))
    axes = g.tensor("axes", (2,), np.int32, None, np.array([1, 2], np.int32))
    m = g.tensor("m", (1, 4), np.int8, qp(0.1, 0))
    fw = g.tensor("fw", (3, 4), np.int8, qp([0.03] * 3, [0] * 3), rng.integers(-100, 100, (3, 4)))
    y = g.tensor("y", (1, 3), np.int8, qp(0.2, 0))
    g.op("CONV_2D", [x, w, b], [c], padding="VALID", stride_h=1, stride_w=1, activation="NONE",
         dilation_h=1, dilation_w=1)
    g.op("MEAN", [c, axes], [m], keep_dims=False)
    g.op("FULLY_CONNECTED", [m, fw, -1], [y], activation="NONE")
    model = g.model([x], [y])
    x8 = rng.integers(-128, 128, (8, 1, 1, 4)).astype(np.int8)
    assert check_gradients(model, x8, rng.integers(0, 3, 8)) == 3
