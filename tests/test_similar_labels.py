"""Similar-label tables and per-sample similar labels, on a real int8 MLP trained briefly on digits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_qmul import datasets, metrics, models
from edge_qmul.quant import quantize
from edge_qmul.train import Trainer
from edge_qmul.unlearn.similar_labels import (SimilarLabelTable, TableError, assign_from_model,
                                              assign_from_table, build_table, check_table,
                                              confused_pairs, similarity_matrix)


@pytest.fixture(scope="module")
def trained():
    ds = datasets.load("digits")
    model = models.build("mlp", (8, 8, 1), 10, seed=0, calib_x=ds.x_train[:256])
    qp = model.tensors[model.core_inputs[0]].quant
    x8, xt8 = quantize(ds.x_train, qp), quantize(ds.x_test, qp)
    trainer = Trainer(model, lr=0.05)
    rng = np.random.default_rng(0)
    for _ in range(4):
        idx = rng.permutation(len(x8))
        for i in range(0, len(idx), 32):
            trainer.step(x8[idx[i:i + 32]], ds.y_train[idx[i:i + 32]])
    return model, x8, ds.y_train, xt8, ds.y_test


@pytest.fixture(scope="module")
def table(trained):
    model, x8, y, *_ = trained
    return build_table(model, x8, y, k=3, data="digits train split, seed 0")


def test_build_table(trained, table):
    model, x8, y, *_ = trained
    assert table.version == 1 and table.k == 3 and table.num_classes == 10
    assert table.class_names == [str(c) for c in range(10)]
    assert table.model_sha256 == metrics.model_sha256(model)
    assert table.data == "digits train split, seed 0"
    # independent computation: mean probability of every other class over samples of class c
    p = metrics.predict_proba(model, x8)
    for c in range(10):
        s = p[y == c].mean(axis=0)
        s[c] = -1
        top = np.argsort(-s, kind="stable")[:3]
        others, w = table.row(c)
        assert list(others) == list(top)
        np.testing.assert_allclose(w, s[top] / s[top].sum(), rtol=1e-12)
        assert c not in others and np.all(w > 0) and abs(w.sum() - 1) < 1e-12
        assert np.all(np.diff(w) <= 0)  # highest weight first
    sim = similarity_matrix(model, x8, y)
    np.testing.assert_allclose(sim.sum(axis=1), 1.0)
    assert np.all(np.diag(sim) > 0.3)  # the trained model is right most of the time


def test_build_table_errors(trained):
    model, x8, y, *_ = trained
    keep = (y != 3) & (y != 7)
    with pytest.raises(TableError, match=r"class\(es\) 3 \('three'\), 7 \('seven'\)"):
        names = [str(c) for c in range(10)]
        names[3], names[7] = "three", "seven"
        build_table(model, x8[keep], y[keep], class_names=names)
    with pytest.raises(TableError, match="k must be"):
        build_table(model, x8, y, k=10)
    with pytest.raises(TableError, match="k must be"):
        build_table(model, x8, y, k=0)
    with pytest.raises(TableError, match="3 class names"):
        build_table(model, x8, y, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="outside"):
        build_table(model, x8[:2], np.array([0, 12]))


def test_round_trip_through_json(table, tmp_path):
    path = table.save(tmp_path / "table.json")
    text = path.read_text()
    assert text.endswith("\n") and "\n  " in text  # indented
    d = json.loads(text)
    assert list(d) == sorted(d)  # sorted keys
    assert d["version"] == 1 and len(d["similar"]) == 10
    back = SimilarLabelTable.load(path)
    assert back == table
    assert back.to_dict() == table.to_dict()
    assert SimilarLabelTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    # no temp files left behind
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_round_trip_without_model_hash(tmp_path):
    t = SimilarLabelTable(class_names=["a", "b", "c"], similar=[[[1, 1.0]], [[2, 0.5], [0, 0.5]],
                                                                   [[0, 0.25], [1, 0.75]]], k=2)
    assert t.model_sha256 is None and t.data == ""
    assert SimilarLabelTable.load(t.save(tmp_path / "t.json")) == t


def _good() -> dict:
    return {"version": 1, "class_names": ["a", "b", "c"], "k": 2, "model_sha256": "ab" * 32,
            "data": "test", "similar": [[[1, 0.75], [2, 0.25]], [[0, 1.0]], [[1, 0.5], [0, 0.5]]]}


def _with(**changes) -> dict:
    d = _good()
    d.update(changes)
    return d


def _row(c: int, row) -> dict:
    d = _good()
    d["similar"][c] = row
    return d


BAD = {
    "unknown version": (_with(version=2), r"unknown version 2"),
    "version type": (_with(version="1"), r"'version' must be an integer"),
    "version bool": (_with(version=True), r"'version' must be an integer"),
    "class_names type": (_with(class_names="abc"), r"'class_names' must be a list of strings"),
    "class_names entries": (_with(class_names=["a", 1, "c"]), r"'class_names' must be a list of strings"),
    "class_names repeat": (_with(class_names=["a", "b", "a"]), r"'class_names' repeats 'a'"),
    "one class": (_with(class_names=["a"], similar=[[]], k=1), r"at least 2 classes"),
    "k type": (_with(k=2.0), r"'k' must be an integer"),
    "k range": (_with(k=3), r"'k' must be in \[1, 2\]"),
    "hash": (_with(model_sha256="xyz"), r"'model_sha256'"),
    "data type": (_with(data=5), r"'data' must be a string"),
    "similar type": (_with(similar={"0": []}), r"'similar' must be a list"),
    "row count": (_with(similar=[[[1, 1.0]], [[0, 1.0]]]), r"'similar' has 2 rows for 3 classes"),
    "row type": (_row(1, "0"), r"class 1 \('b'\): expected a list"),
    "empty row": (_row(1, []), r"class 1 \('b'\): lists 0 similar classes"),
    "too many": (_row(2, [[0, 0.5], [1, 0.25], [1, 0.25]]), r"class 2 \('c'\): lists 3 similar classes"),
    "pair shape": (_row(1, [[0, 0.5, 1]]), r"class 1 \('b'\): entry .* is not a \[class, weight\] pair"),
    "index type": (_row(1, [["a", 1.0]]), r"class 1 \('b'\): class index 'a' is not an integer"),
    "index float": (_row(1, [[0.0, 1.0]]), r"class 1 \('b'\): class index 0.0 is not an integer"),
    "index range": (_row(1, [[3, 1.0]]), r"class 1 \('b'\): class index 3 is out of range \[0, 3\)"),
    "negative index": (_row(1, [[-1, 1.0]]), r"class 1 \('b'\): class index -1 is out of range"),
    "itself": (_row(2, [[2, 0.5], [0, 0.5]]), r"class 2 \('c'\): lists itself"),
    "duplicate": (_row(0, [[1, 0.5], [1, 0.5]]), r"class 0 \('a'\): lists class 1 twice"),
    "zero weight": (_row(0, [[1, 1.0], [2, 0.0]]), r"class 0 \('a'\): weight 0.0 of class 2 must be a positive"),
    "negative weight": (_row(0, [[1, 1.5], [2, -0.5]]), r"weight -0.5 of class 2 must be a positive"),
    "weight type": (_row(0, [[1, "1"]]), r"weight '1' of class 1 must be a positive"),
    "weight sum": (_row(0, [[1, 0.6], [2, 0.3]]), r"class 0 \('a'\): weights sum to 0.9.*not 1"),
    "weight sum barely": (_row(0, [[1, 0.75 + 2e-6], [2, 0.25]]), r"weights sum to"),
    "unknown field": (_with(extra=1), r"unknown field\(s\) 'extra'"),
    "missing field": ({k: v for k, v in _good().items() if k != "similar"}, r"missing field\(s\) 'similar'"),
}


def test_good_table_loads(tmp_path):
    p = tmp_path / "good.json"
    p.write_text(json.dumps(_good()))
    t = SimilarLabelTable.load(p)
    assert t.similar[0] == [[1, 0.75], [2, 0.25]] and t.model_sha256 == "ab" * 32
    # within the 1e-6 tolerance
    p.write_text(json.dumps(_row(0, [[1, 0.75 + 5e-7], [2, 0.25]])))
    SimilarLabelTable.load(p)


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors(case, tmp_path):
    d, pattern = BAD[case]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(TableError, match=pattern) as e:
        SimilarLabelTable.load(p)
    assert str(p) in str(e.value)


def test_not_json_and_constructor_validation(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(TableError, match="not a JSON similar-label table"):
        SimilarLabelTable.load(p)
    p.write_text("[1, 2]")
    with pytest.raises(TableError, match="expected a JSON object"):
        SimilarLabelTable.load(p)
    with pytest.raises(TableError, match="lists itself"):
        SimilarLabelTable(class_names=["a", "b"], similar=[[[0, 1.0]], [[0, 1.0]]], k=1)
    t = SimilarLabelTable(class_names=["a", "b"], similar=[[[1, 1.0]], [[0, 1.0]]], k=1)
    t.similar[0] = [[1, 0.5]]  # edited after construction: save refuses it and writes nothing
    with pytest.raises(TableError, match="weights sum"):
        t.save(tmp_path / "edited.json")
    assert not (tmp_path / "edited.json").exists()
    assert issubclass(TableError, ValueError)


def test_confused_pairs(trained, table):
    model, x8, y, *_ = trained
    pairs = confused_pairs(table, n=5)
    assert len(pairs) == 5
    scores = [s for _, _, s in pairs]
    assert scores == sorted(scores, reverse=True)
    all_entries = sorted((w for row in table.similar for _, w in row), reverse=True)
    assert scores == pytest.approx(all_entries[:5])
    assert all(a != b for a, b, _ in pairs)
    sim = similarity_matrix(model, x8, y)
    top = confused_pairs(sim, n=3)
    off = sim.copy()
    np.fill_diagonal(off, -1)
    a, b = np.unravel_index(np.argmax(off), off.shape)
    assert top[0][:2] == (a, b) and top[0][2] == pytest.approx(off[a, b])
    assert len(confused_pairs(sim, n=1000)) == 90
    with pytest.raises(ValueError, match="square"):
        confused_pairs(np.zeros((3, 4)))


def test_assign_from_table(table):
    y = np.random.default_rng(1).integers(0, 10, 500)
    top1 = assign_from_table(table, y, "top1")
    assert top1.dtype == np.int64 and top1.shape == y.shape
    assert np.all(top1 != y)
    assert all(top1[i] == table.similar[y[i]][0][0] for i in range(len(y)))
    sampled = assign_from_table(table, y, "sample", seed=3)
    assert np.all(sampled != y)
    assert all(sampled[i] in [o for o, _ in table.similar[y[i]]] for i in range(len(y)))
    np.testing.assert_array_equal(sampled, assign_from_table(table, y, "sample", seed=3))
    assert not np.array_equal(sampled, top1)  # draws follow the weights, not only the top class
    soft = assign_from_table(table, y, "soft")
    assert soft.shape == (500, 10) and soft.dtype == np.float64
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(soft[np.arange(500), y] == 0) and np.all(soft >= 0)
    for i in range(5):
        others, w = table.row(y[i])
        np.testing.assert_allclose(soft[i, others], w)
    with pytest.raises(ValueError, match="unknown mode"):
        assign_from_table(table, y, "random")
    with pytest.raises(ValueError, match="outside"):
        assign_from_table(table, np.array([0, 10]))
    with pytest.raises(ValueError, match="1-D"):
        assign_from_table(table, np.zeros((2, 2), np.int64))


def test_sampling_follows_the_weights():
    t = SimilarLabelTable(class_names=["a", "b", "c"], similar=[[[1, 0.8], [2, 0.2]], [[0, 1.0]],
                                                               [[0, 1.0]]], k=2)
    draws = assign_from_table(t, np.zeros(20000, np.int64), "sample", seed=0)
    assert set(np.unique(draws)) == {1, 2}
    assert np.mean(draws == 1) == pytest.approx(0.8, abs=0.02)


def test_assign_from_model(trained):
    model, x8, y, xt8, yt = trained
    sim = assign_from_model(model, xt8, yt)
    assert sim.dtype == np.int64 and sim.shape == yt.shape
    assert np.all(sim != yt)
    p = metrics.predict_proba(model, xt8)
    p[np.arange(len(yt)), yt] = -1
    np.testing.assert_array_equal(sim, np.argmax(p, axis=1))
    # also when the model's top class is the true one (most samples) and when it is not
    right = np.argmax(metrics.predict_proba(model, xt8), axis=1) == yt
    assert right.any() and (~right).any()
    with pytest.raises(ValueError, match="entries"):
        assign_from_model(model, xt8[:3], yt[:2])


def test_check_table(trained, table):
    model, *_ = trained
    h = metrics.model_sha256(model)
    check_table(table, h, 10)
    with pytest.raises(TableError, match="10 classes but the model has 5"):
        check_table(table, h, 5)
    with pytest.raises(TableError, match="10 classes but the model has 5"):
        check_table(table, h, 5, allow_model_mismatch=True)
    with pytest.raises(TableError, match="built for model"):
        check_table(table, "0" * 64, 10)
    check_table(table, "0" * 64, 10, allow_model_mismatch=True)
    no_hash = SimilarLabelTable.from_dict(dict(table.to_dict(), model_sha256=None))
    with pytest.raises(TableError, match="records no model hash"):
        check_table(no_hash, h, 10)
    check_table(no_hash, h, 10, allow_model_mismatch=True)
