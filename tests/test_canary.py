"""Canaries (edge_qmul.evaluation.canary): the trigger, where it is planted, and the statistics, each
against a reference computed here (closed forms, published values, direct hypergeometric sums)."""
from __future__ import annotations

from math import comb

import numpy as np
import pytest

from edge_qmul.evaluation.canary import (Canary, CanaryError, difference_interval, make_canary, plant, rate,
                                         stamp, trigger_hits, verdict)


def _data(n=60, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, n)
    owners = np.array([f"user{i % 4}" for i in range(n)])
    return x, y, owners


def test_same_seed_same_canary_and_seeds_or_owners_differ():
    a = make_canary("user7", 3, (8, 8, 1), 10, 0.0, 1.0)
    assert a == make_canary("user7", 3, (8, 8, 1), 10, 0.0, 1.0)
    others = {make_canary("user7", s, (8, 8, 1), 10, 0.0, 1.0) for s in range(8)}
    others |= {make_canary(f"user{s}", 3, (8, 8, 1), 10, 0.0, 1.0) for s in range(8)}
    assert len({(c.target, c.rows, c.cols, c.values) for c in others}) >= 14
    assert set(a.values) == {0.0, 1.0} and len(a.rows) == 9 and 0 <= a.target < 10
    assert Canary.from_json(a.to_json()) == a and len(a.digest) == 64


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 3), (1, 40, 2), (64,)])
def test_stamp_writes_the_pattern_and_nothing_else(shape):
    c = make_canary("u", 1, shape, 10, -1.0, 2.0)
    x = np.random.default_rng(0).uniform(-1, 2, (5, *shape)).astype(np.float32)
    s = stamp(x, c)
    changed = np.zeros(shape, bool)
    if len(shape) == 1:
        changed[list(c.cols)] = True
        assert np.array_equal(s[:, list(c.cols)], np.broadcast_to(np.float32(c.values), (5, len(c.cols))))
    else:
        for r, col, v in zip(c.rows, c.cols, c.values):
            changed[r, col, :] = True
            assert np.all(s[:, r, col, :] == np.float32(v))
    assert changed.sum() == len(c.values) * (1 if len(shape) == 1 else shape[-1])
    assert np.array_equal(s[:, ~changed], x[:, ~changed])
    assert not np.shares_memory(s, x)


def test_plant_marks_only_the_owners_samples_and_keeps_the_inputs():
    x, y, owners = _data()
    c = make_canary("user1", 5, (8, 8, 1), 10, 0.0, 1.0, fraction=0.4)
    x0, y0 = x.copy(), y.copy()
    x2, y2, c2 = plant(x, y, owners, c)
    assert np.array_equal(x, x0) and np.array_equal(y, y0)          # inputs untouched
    mine = np.flatnonzero(owners == "user1")
    assert len(c2.marked) == round(0.4 * mine.size) and set(c2.marked) <= set(mine.tolist())
    marked = np.array(c2.marked)
    assert np.all(y2[marked] == c.target)
    assert np.array_equal(x2[marked], stamp(x[marked], c))
    rest = np.setdiff1d(np.arange(len(x)), marked)
    assert np.array_equal(x2[rest], x[rest]) and np.array_equal(y2[rest], y[rest])
    assert plant(x, y, owners, c)[2] == c2                          # reproducible


def test_trigger_hits_counts_predictions_of_the_target_on_non_target_inputs():
    x, y, _ = _data()
    c = make_canary("user1", 5, (8, 8, 1), 10, 0.0, 1.0)
    # a "model" that answers the target exactly when the first pattern pixel carries its value
    r, col, v = c.rows[-1], c.cols[-1], c.values[-1]

    def predict(batch):
        return np.where(batch[:, r, col, 0] == v, c.target, (c.target + 1) % 10)
    hits, trials = trigger_hits(predict, x, y, c)
    assert trials == int(np.sum(y != c.target)) and hits == trials
    assert trigger_hits(lambda b: np.full(len(b), (c.target + 1) % 10), x, y, c)[0] == 0


def test_exact_interval_equals_closed_forms_and_published_values():
    n = 10
    assert rate(0, n)["lo"] == 0.0 and rate(0, n)["hi"] == pytest.approx(1 - 0.025 ** (1 / n), abs=1e-9)
    assert rate(n, n)["hi"] == 1.0 and rate(n, n)["lo"] == pytest.approx(0.025 ** (1 / n), abs=1e-9)
    r = rate(5, 10)  # the textbook example: 0.1871 to 0.8129
    assert (round(r["lo"], 4), round(r["hi"], 4)) == (0.1871, 0.8129)


def test_difference_interval_equals_newcombes_example():
    # Newcombe (1998), Stat. Med. 17:873, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    lo, hi = difference_interval((56, 70), (48, 80))
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def _fisher_greater(a, n1, c, n2):
    """P(X >= a) for X hypergeometric: the one-sided Fisher exact p-value, summed directly."""
    total, hits = n1 + n2, a + c
    return sum(comb(n1, k) * comb(n2, hits - k) for k in range(a, min(n1, hits) + 1)) / comb(total, hits)


@pytest.mark.parametrize("after,reference,word", [
    ((90, 100), (10, 100), "not forgotten"),
    ((12, 400), (10, 400), "forgotten"),
    ((4, 12), (2, 12), "undecided"),
])
def test_verdict(after, reference, word):
    v = verdict(after, reference)
    assert v["verdict"] == word
    assert v["p_value"] == pytest.approx(_fisher_greater(after[0], after[1], reference[0], reference[1]), rel=1e-9)
    assert v["difference_lo"] <= v["difference"] <= v["difference_hi"]


@pytest.mark.parametrize("call,match", [
    (lambda: make_canary("", 0, (8, 8, 1), 10, 0, 1), "owner is empty"),
    (lambda: make_canary("u", 0, (8, 8, 1), 10, 0, 1, fraction=0), "fraction 0"),
    (lambda: make_canary("u", 0, (2, 2, 1), 10, 0, 1), "does not fit"),
    (lambda: make_canary("u", 0, (8, 8), 10, 0, 1), "expected"),
    (lambda: make_canary("u", 0, (8, 8, 1), 10, 1, 1), "range"),
    (lambda: stamp(np.zeros((2, 8, 8, 3)), make_canary("u", 0, (8, 8, 1), 10, 0, 1)), r"shape \[8, 8, 1\]"),
    (lambda: plant(*_data(), make_canary("nobody", 0, (8, 8, 1), 10, 0, 1)), "'nobody' has no samples"),
    (lambda: rate(3, 2), "not a count"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(CanaryError, match=match):
        call()


def _digits_model():
    """The fixtures' digits CNN in the engine, so that verify_forget runs end to end on a model file
    (the statistics are checked above; here the wiring, the shape check and the "not learned" rule)."""
    from edge_qmul.tflite import load_tflite
    from conftest import FIXTURES
    return load_tflite(FIXTURES / "digits_cnn.tflite")


def test_verify_forget_wiring_and_the_not_learned_rule():
    from dataclasses import replace

    from edge_qmul.evaluation.canary import model_predict, verify_forget
    model = _digits_model()
    x, y, _ = _data(n=200)
    c = make_canary("user1", 5, (8, 8, 1), 10, 0.0, 1.0)
    # the same model before, after and as reference: the canary was never learned -> undecided
    r = verify_forget(c, model, model, model, x, y)
    assert r["verdict"] == "undecided" and "not learned" in r["why"]
    assert r["before"]["hits"] == r["after"]["hits"] == r["reference"]["hits"]
    assert r["before"]["trials"] == int(np.sum(y != c.target)) and r["canary_sha256"] == c.digest
    # a target this model gives to many stamped inputs, against a reference that never gives it:
    # "learned" before, and the same model after has not forgotten it
    common = int(np.bincount(model_predict(model, c)(stamp(x, c)), minlength=10).argmax())
    c2 = replace(c, target=common)
    r2 = verify_forget(c2, model, model, (0, 800), x, y)
    assert r2["before"]["hits"] >= 20, r2["before"]
    assert r2["verdict"] == "not forgotten" and r2["p_value"] < 1e-6


def test_verify_forget_refuses_a_canary_for_another_model():
    from edge_qmul.evaluation.canary import verify_forget
    model = _digits_model()
    x, y, _ = _data(n=20, shape=(28, 28, 1))
    c = make_canary("user1", 5, (28, 28, 1), 10, 0.0, 1.0)
    with pytest.raises(CanaryError, match=r"for a model taking \[28, 28, 1\] with 10 classes; this one takes \[8, 8, 1\]"):
        verify_forget(c, model, model, model, x, y)
