"""edge_qmul.metrics on a real int8 MLP trained briefly on digits."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

from edge_qmul import datasets, metrics, models
from edge_qmul.graph import Model, Op, Tensor
from edge_qmul.quant import QuantParams, quantize
from edge_qmul.tflite import to_bytes
from edge_qmul.train import Trainer


def train_mlp(epochs: int = 4, seed: int = 0):
    ds = datasets.load("digits")
    model = models.build("mlp", (8, 8, 1), 10, seed=seed, calib_x=ds.x_train[:256])
    qp = model.tensors[model.core_inputs[0]].quant
    x8, xt8 = quantize(ds.x_train, qp), quantize(ds.x_test, qp)
    trainer = Trainer(model, lr=0.05)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        idx = rng.permutation(len(x8))
        for i in range(0, len(idx), 32):
            b = idx[i:i + 32]
            trainer.step(x8[b], ds.y_train[b])
    return model, x8, ds.y_train, xt8, ds.y_test


@pytest.fixture(scope="module")
def trained():
    return train_mlp()


def numpy_probs(model, x8):
    z = model.forward(x8).astype(np.float64)
    qp = model.tensors[model.core_outputs[0]].quant
    z = (z - qp.zp) * float(qp.s)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_proba(trained):
    model, x8, y, xt8, yt = trained
    p = metrics.predict_proba(model, xt8, batch=50)
    assert p.dtype == np.float64 and p.shape == (len(xt8), 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(p > 0)
    np.testing.assert_allclose(p, numpy_probs(model, xt8), rtol=1e-6, atol=1e-9)
    # batching does not change anything
    np.testing.assert_array_equal(p, metrics.predict_proba(model, xt8, batch=1000))
    assert metrics.predict_proba(model, xt8[:0]).shape == (0, 10)
    with pytest.raises(ValueError, match="batch"):
        metrics.predict_proba(model, xt8, batch=0)
    with pytest.raises(ValueError, match="int8"):
        metrics.predict_proba(model, xt8.astype(np.float32))


def test_accuracy_and_confidence(trained):
    model, x8, y, xt8, yt = trained
    logits = model.forward(xt8)
    expect = 100.0 * np.mean(np.argmax(logits, axis=1) == yt)
    acc = metrics.accuracy(model, xt8, yt)
    assert acc == pytest.approx(expect, abs=1e-12)
    assert acc > 80.0, "the fixture model should have learned something"
    conf = metrics.confidence(model, xt8, yt)
    assert conf.shape == (len(yt),)
    np.testing.assert_allclose(conf, numpy_probs(model, xt8)[np.arange(len(yt)), yt], rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        metrics.accuracy(model, xt8[:3], np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="3 entries"):
        metrics.accuracy(model, xt8[:3], np.array([0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        metrics.accuracy(model, xt8[:0], yt[:0])


def softmax_model() -> tuple[Model, Model]:
    """FULLY_CONNECTED -> SOFTMAX, and the same network without the SOFTMAX."""
    rng = np.random.default_rng(1)
    qin = QuantParams(np.float32(1 / 64), 0)
    qw = QuantParams(np.full(5, 1 / 64, np.float32), np.zeros(5))
    qlog = QuantParams(np.float32(0.1), 3)
    qsm = QuantParams(np.float32(1 / 256), -128)
    w = rng.integers(-127, 128, (5, 6)).astype(np.int8)
    b = rng.integers(-500, 500, 5).astype(np.int32)

    def tensors():
        return [Tensor("x", (1, 6), np.dtype(np.int8), qin),
                Tensor("w", (5, 6), np.dtype(np.int8), qw, w.copy()),
                Tensor("b", (5,), np.dtype(np.int32), QuantParams(qw.scale / 64, np.zeros(5)), b.copy()),
                Tensor("logits", (1, 5), np.dtype(np.int8), qlog),
                Tensor("probs", (1, 5), np.dtype(np.int8), qsm)]

    fc = Op("FULLY_CONNECTED", [0, 1, 2], [3], {"fused_activation_function": "NONE"})
    with_sm = Model(tensors(), [fc, Op("SOFTMAX", [3], [4], {"beta": 1.0})], [0], [4])
    fc2 = Op("FULLY_CONNECTED", [0, 1, 2], [3], {"fused_activation_function": "NONE"})
    without = Model(tensors()[:4], [fc2], [0], [3])
    return with_sm, without


def test_softmax_models_use_the_logits():
    try:
        with_sm, without = softmax_model()
    except Exception as e:  # pragma: no cover - the op options differ from what the kernels expect
        pytest.skip(f"could not build a FULLY_CONNECTED+SOFTMAX model by hand: {e}")
    x = np.random.default_rng(2).integers(-128, 128, (40, 6)).astype(np.int8)
    assert metrics.logits_tensor(with_sm) == 3
    np.testing.assert_array_equal(metrics.predict_proba(with_sm, x), metrics.predict_proba(without, x))


def test_mia_matches_an_independent_svc(trained):
    from sklearn.svm import SVC
    model, x8, y, xt8, yt = trained
    retain, test, forget = (x8[100:], y[100:]), (xt8, yt), (x8[:100], y[:100])
    got = metrics.mia_efficacy(model, retain, test, forget)
    p_tr, p_te, p_f = numpy_probs(model, x8[100:100 + len(yt)]), numpy_probs(model, xt8), numpy_probs(model, x8[:100])
    feat = lambda p, lab: p[np.arange(len(lab)), lab][:, None]  # noqa: E731
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(
        np.concatenate([feat(p_tr, y[100:100 + len(yt)]), feat(p_te, yt)]),
        np.concatenate([np.ones(len(yt)), np.zeros(len(yt))]))
    expect = 100.0 * (1.0 - clf.predict(feat(p_f, y[:100])).mean())
    assert got == pytest.approx(expect, abs=1e-9)
    assert 0.0 <= got <= 100.0
    # deterministic
    assert metrics.mia_efficacy(model, retain, test, forget, seed=5) == got


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_mia_is_at_chance_when_members_and_nonmembers_look_alike(trained, which):
    # Samples the attack never saw: held-out members (retain beyond the first |test|) and held-out
    # non-members (the other half of the test set). For an untrained model, and for a briefly trained
    # one that does not overfit, both come from one confidence distribution, so the attack calls
    # both sets non-members at about the same rate: its balanced accuracy is ~50 %.
    model, x8, y, xt8, yt = trained
    if which == "untrained":
        ds = datasets.load("digits")
        model = models.build("mlp", (8, 8, 1), 10, seed=3, calib_x=ds.x_train[:256])
    h = len(yt) // 2
    retain, test = (x8, y), (xt8[:h], yt[:h])
    eff_nonmembers = metrics.mia_efficacy(model, retain, test, (xt8[h:], yt[h:]))
    eff_members = metrics.mia_efficacy(model, retain, test, (x8[h:2 * h], y[h:2 * h]))
    balanced_attack_accuracy = ((100.0 - eff_members) + eff_nonmembers) / 2
    assert 40.0 <= balanced_attack_accuracy <= 60.0, (eff_members, eff_nonmembers)


def test_mia_with_forget_equal_to_test_is_the_attacks_own_true_negative_rate(trained):
    # forget == test: the efficacy is the share of the attack's own non-member training points it
    # labels non-member (in-sample, so it need not be 50 % even when nothing is learned).
    from sklearn.svm import SVC
    model, x8, y, xt8, yt = trained
    eff = metrics.mia_efficacy(model, (x8, y), (xt8, yt), (xt8, yt))
    c_m = metrics.confidence(model, x8[:len(yt)], y[:len(yt)])
    c_n = metrics.confidence(model, xt8, yt)
    clf = SVC(C=3, gamma="auto").fit(np.concatenate([c_m, c_n])[:, None],
                                     np.r_[np.ones(len(c_m)), np.zeros(len(c_n))])
    assert eff == pytest.approx(100.0 * np.mean(clf.predict(c_n[:, None]) == 0))


def test_mia_errors(trained, monkeypatch):
    model, x8, y, xt8, yt = trained
    with pytest.raises(ValueError, match="forget set holds no samples"):
        metrics.mia_efficacy(model, (x8, y), (xt8, yt), (x8[:0], y[:0]))
    with pytest.raises(ValueError, match="pair"):
        metrics.mia_efficacy(model, x8, (xt8, yt), (x8, y))
    monkeypatch.setitem(sys.modules, "sklearn.svm", None)
    with pytest.raises(ImportError, match=r"edge-qmul\[host\]"):
        metrics.mia_efficacy(model, (x8, y), (xt8, yt), (x8[:10], y[:10]))
    with pytest.warns(RuntimeWarning, match="MIA"):
        m = metrics.evaluate(model, (x8[:50], y[:50]), (x8[50:], y[50:]), (xt8, yt))
    assert m["MIA"] is None and m["TA"] > 0


def test_evaluate(trained):
    model, x8, y, xt8, yt = trained
    forget, retain, test = (x8[:60], y[:60]), (x8[60:], y[60:]), (xt8, yt)
    m = metrics.evaluate(model, forget, retain, test)
    assert set(m) == {"UA", "RA", "TA", "MIA"}
    assert m["UA"] == pytest.approx(100.0 - metrics.accuracy(model, *forget))
    assert m["RA"] == pytest.approx(metrics.accuracy(model, *retain))
    assert m["TA"] == pytest.approx(metrics.accuracy(model, *test))
    assert m["MIA"] == pytest.approx(metrics.mia_efficacy(model, retain, test, forget))
    assert metrics.evaluate(model, forget, retain, test, mia=False)["MIA"] is None


def test_average_gap_and_split():
    m = {"UA": 10.0, "RA": 95.0, "TA": 90.0, "MIA": 20.0}
    r = {"UA": 14.0, "RA": 96.0, "TA": 88.0, "MIA": 30.0}
    assert metrics.average_gap(m, r) == pytest.approx((4 + 1 + 2 + 10) / 4)
    assert metrics.average_gap(m, m) == 0.0
    assert metrics.average_gap(m, r, keys=("RA",)) == pytest.approx(1.0)
    assert metrics.gap_split(m, r) == pytest.approx({"forgetting": 7.0, "utility": 1.5})
    with pytest.raises(ValueError, match="MIA"):
        metrics.average_gap(dict(m, MIA=None), r)
    with pytest.raises(ValueError, match="'TA'"):
        metrics.average_gap({"UA": 1.0}, r, keys=("UA", "TA"))


def test_changed_fraction_and_hash(trained):
    model, x8, y, xt8, yt = trained
    before = model.copy()
    assert metrics.changed_fraction(before, model) == 0.0
    h = metrics.model_sha256(model)
    assert h == hashlib.sha256(to_bytes(model)).hexdigest() and len(h) == 64
    assert metrics.model_sha256(before) == h
    after = model.copy()
    Trainer(after, lr=0.5).step(x8[:64], (y[:64] + 1) % 10)
    frac = metrics.changed_fraction(before, after)
    weights = {k: v for k, v in before.parameters().items() if k.endswith(".weight")}
    expect = sum(int(np.sum(v != after.parameters()[k])) for k, v in weights.items()) / sum(
        v.size for v in weights.values())
    assert 0.0 < frac <= 1.0 and frac == pytest.approx(expect)
    assert metrics.model_sha256(after) != h
    other = models.build("digits_cnn", (8, 8, 1), 10, seed=0)
    with pytest.raises(ValueError, match="different weights"):
        metrics.changed_fraction(before, other)
