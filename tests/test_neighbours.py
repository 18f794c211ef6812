"""The retain set's nearest-neighbour verdict on a forget set (unlearn/neighbours.py): exact votes
against a brute-force loop, the Fisher tail against scipy, and what it changes in oeu and qmul —
nothing on an ordinary forget set, everything on one that carries memorized wrong labels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import fisher_exact

from edge_qmul import ModelError, datasets, metrics, models
from edge_qmul.quant import quantize
from edge_qmul.train import TRAINING_RECIPES, Trainer, fit
from edge_qmul.unlearn import accuracy, unlearn
from edge_qmul.unlearn.neighbours import fisher_greater, neighbour_votes, never_seen


def _votes_by_loop(q, r, yr, k, classes):
    out = np.zeros((len(q), classes), np.int64)
    for i, a in enumerate(q.reshape(len(q), -1).astype(np.int64)):
        d = [(int(np.sum((a - b) ** 2)), j) for j, b in enumerate(r.reshape(len(r), -1).astype(np.int64))]
        for _, j in sorted(d)[:k]:  # ties: the lower retain index
            out[i, yr[j]] += 1
    return out


def test_votes_are_the_exact_k_nearest_with_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    r = rng.integers(-3, 4, size=(60, 2, 3, 1), dtype=np.int8)  # a tiny alphabet: many equal distances
    yr = rng.integers(0, 4, size=60)
    q = rng.integers(-3, 4, size=(25, 2, 3, 1), dtype=np.int8)
    for k in (1, 5, 7):
        assert np.array_equal(neighbour_votes(q, r, yr, k, 4), _votes_by_loop(q, r, yr, k, 4))


def test_fisher_tail_is_scipys():
    for a, n_a, b, n_b in [(30, 60, 2, 140), (3, 130, 3, 142), (0, 10, 5, 10), (10, 10, 0, 10), (131, 360, 121, 399)]:
        want = fisher_exact([[a, n_a - a], [b, n_b - b]], alternative="greater").pvalue
        assert fisher_greater(a, n_a, b, n_b) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_verdict_flags_relabelled_samples_and_ignores_an_absent_class():
    ds = datasets.load("digits", seed=0)
    x, y = (ds.x_train * 16).astype(np.int8), ds.y_train
    idx = np.random.default_rng(1).permutation(len(y))
    f, v, r = idx[:60], idx[60:200], idx[200:]
    plain = never_seen((x[f], y[f]), (x[r], y[r]), (x[v], y[v]), 5, 10)
    assert not plain.significant and plain.p_value > 0.01
    y_noisy = y[f].copy()
    y_noisy[:30] = (y_noisy[:30] + 1) % 10  # memorized wrong labels: what a canary plants
    e = never_seen((x[f], y_noisy), (x[r], y[r]), (x[v], y[v]), 5, 10)
    assert e.significant and e.contradicted[:30].mean() > 0.8
    assert np.mean(e.votes[:30][e.contradicted[:30]] == y[f][:30][e.contradicted[:30]]) > 0.9
    assert 0.3 < e.excess < 0.55 and e.summary()["contradicted"] == int(e.contradicted.sum())
    gone = r[y[r] != 3]  # a class the retain set no longer teaches is not "contradicted"
    three = f[y[f] == 3]
    c = never_seen((x[three], y[three]), (x[gone], y[gone]), (x[v], y[v]), 5, 10)
    assert not c.contradicted.any() and not c.significant


@pytest.fixture(scope="module")
def noisy():
    """A digits CNN trained with a third of its forget set stamped with a corner patch and
    relabelled to one class (a backdoor: memorized wrong labels, as a canary plants them)."""
    ds = datasets.load("digits", seed=0)
    rng = np.random.default_rng(0)
    n = len(ds.y_train)
    val = rng.choice(n, n // 10, replace=False)
    train = np.setdiff1d(np.arange(n), val)
    forget = np.sort(rng.choice(train, 90, replace=False))
    xs, y = ds.x_train.copy(), ds.y_train.copy()
    wrong = forget[:30][ds.y_train[forget[:30]] != 4]
    xs[wrong, :3, :3, :] = xs.max()
    y[wrong] = 4
    model = models.build("digits_cnn", ds.input_shape, 10, seed=0, calib_x=ds.x_train[train[:256]])
    x = quantize(xs, model.tensors[model.core_inputs[0]].quant)
    r = TRAINING_RECIPES["digits"]
    fit(Trainer(model, lr=r["lr"], momentum=r["momentum"], schedule="cosine",
                total_steps=r["epochs"] * -(-len(train) // 32)), x[train], y[train], r["epochs"])
    retain = np.setdiff1d(train, forget)
    return {"model": model, "forget": (x[forget], y[forget]), "retain": (x[retain], y[retain]),
            "validation": (x[val], y[val]), "true": ds.y_train[forget], "wrong": np.isin(forget, wrong)}


@pytest.mark.parametrize("method", ["oeu", "qmul"])
def test_an_ordinary_forget_set_is_unlearned_bit_for_bit_as_without_the_verdict(noisy, method):
    s = noisy
    keep = ~s["wrong"]  # the forget set without its relabelled samples: nothing to contradict
    forget = (s["forget"][0][keep], s["forget"][1][keep])
    cfg = {"stop": False, "max_passes": 2000}
    on = unlearn(s["model"], forget, s["retain"], method=method, validation=s["validation"], config=cfg)
    off = unlearn(s["model"], forget, s["retain"], method=method, validation=s["validation"],
                  config={**cfg, "neighbours": 0})
    assert on.never_seen is not None and not on.never_seen["significant"] and off.never_seen is None
    assert metrics.model_sha256(on.model) == metrics.model_sha256(off.model)


@pytest.mark.parametrize("method", ["oeu", "qmul"])
def test_memorized_wrong_labels_are_moved_to_what_the_neighbours_say(noisy, method):
    s = noisy
    xw, true = s["forget"][0][s["wrong"]], s["true"][s["wrong"]]
    before = accuracy(s["model"], (xw, true))
    result = unlearn(s["model"], s["forget"], s["retain"], method=method, validation=s["validation"])
    assert result.never_seen["significant"] and result.never_seen["contradicted"] >= 25
    # the held-out level does not describe such a set: the rule is off, the budget ends the run
    assert not result.stopped_by_rule and result.history == [] and result.steps > 0
    after = accuracy(result.model, (xw, true))
    assert before < 40 and after > before + 30, (before, after)
    assert accuracy(result.model, s["validation"]) > 85
    # the label the moved samples leave (4) is still taught: its own held-out samples keep it
    xv, yv = s["validation"]
    assert accuracy(result.model, (xv[yv == 4], yv[yv == 4])) > 80


def test_bad_neighbours_config(noisy):
    s = noisy
    with pytest.raises(ModelError, match="neighbours must be >= 0"):
        unlearn(s["model"], s["forget"], s["retain"], method="oeu", validation=s["validation"],
                config={"neighbours": -1})
