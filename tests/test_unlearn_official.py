"""qmul_official, the released Q-MUL recipe (MU-Q-MUL Classification/unlearn/RL_min.py), and rl with
SalUn's fresh random labels per batch, on the digits model of test_unlearn.py."""
from __future__ import annotations

import numpy as np
import pytest

from edge_qmul import ModelError, metrics
from edge_qmul.unlearn import DEFAULTS, accuracy, unlearn
from edge_qmul.unlearn.official import (closest_wrong_labels, official_weights, released_labels,
                                        tensor_norm_sum)
from test_unlearn import setup  # noqa: F401  (the module fixture: a trained digits CNN and its splits)

# digits forgets with the released recipe only at a larger step than lr 0.01 (w_f = R / (F + R) is
# ~0.005 on a model that fits its retain set); 16-sample forget batches (129 forget samples)
FORGETS = {"lr": 0.2, "batch_size": 16, "epochs": 10}

# hand-made probability table: rows 0-2 the model is right (true class largest), row 3 it is wrong
P = np.array([[0.05, 0.10, 0.60, 0.20, 0.05],   # y=2: second best 3 (above y)
              [0.10, 0.25, 0.05, 0.55, 0.05],   # y=3: second best 1 (below y)
              [0.50, 0.05, 0.05, 0.10, 0.30],   # y=0: second best 4 (above y)
              [0.60, 0.30, 0.05, 0.03, 0.02]])  # y=1: p_y=0.3, closest is class 2 (|0.05-0.3|=0.25)
Y = np.array([2, 3, 0, 1])


def test_defaults_are_the_released_recipe():
    cfg = DEFAULTS["qmul_official"]
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.retain_batch_size, cfg.momentum, cfg.weight_decay,
            cfg.stop, cfg.labels) == (0.01, 10, 256, 256, 0.9, 5e-4, False, "model")


def test_intended_rule_is_the_closest_wrong_class():
    np.testing.assert_array_equal(closest_wrong_labels(P, Y), [3, 1, 4, 2])


def test_released_rule_reproduces_the_slips():
    # logits log(P): softmax gives back P, and |z_c - p_y| with z_c < 0 < p_y ranks classes by p_c,
    # so the released rule sees the best wrong class, then takes its index in the vector without y
    z = np.log(P)
    got = released_labels(z, Y)
    np.testing.assert_array_equal(got, [2, 1, 3, 0])
    assert got[0] == Y[0]  # second best y + 1 becomes y itself: the true label
    # row 3: the logits-vs-probability distance picks class 0 (the argmax), not the closest class 2
    assert closest_wrong_labels(P, Y)[3] == 2 and got[3] == 0
    # labels computed over a shuffled order, written back in dataset order
    order = np.array([2, 0, 3, 1])
    np.testing.assert_array_equal(released_labels(z, Y, order), released_labels(z[order], Y[order]))
    np.testing.assert_array_equal(released_labels(z, Y, order), [3, 2, 0, 1])


def test_reweighting_rule():
    assert official_weights(3.0, 1.0) == (0.25, 0.75)
    assert official_weights(1.0, 3.0) == (0.75, 0.25)
    with pytest.raises(ModelError, match="not finite"):
        official_weights(float("nan"), 1.0)
    with pytest.raises(ModelError, match="vanished"):
        official_weights(0.0, 0.0)


def test_runs_forgets_and_keeps_retain(setup):
    m, f, r, v = setup["model"], setup["forget"], setup["retain"], setup["validation"]
    before = metrics.model_sha256(m)
    fa0, ra0 = accuracy(m, f), accuracy(m, r)
    result = unlearn(m, f, r, method="qmul_official", config=FORGETS, validation=v)
    assert metrics.model_sha256(m) == before
    fa, ra = accuracy(result.model, f), accuracy(result.model, r)
    assert fa < fa0 - 10, (fa0, fa)
    assert ra > 85 and ra0 - ra < fa0 - fa, (ra0, ra)
    assert not result.stopped_by_rule and len(result.history) == 10
    assert all(0 < h["w_f"] < 1 and h["w_f"] + h["w_r"] == pytest.approx(1) for h in result.history)
    assert all(h["labels_equal_true"] == 0 for h in result.history)
    nf, nr = len(f[0]), len(r[0])
    # per epoch: reweighting (forward + backward over both sets) then one training pass over both;
    # similar labels: a forward pass over the forget set
    assert result.sample_passes == {"train": 10 * 2 * (nf + nr), "forward": 10 * nf}
    assert result.steps == 10 * (-(-nf // 16) + -(-nr // 256))


def test_deterministic(setup):
    m, f, r = setup["model"], setup["forget"], setup["retain"]
    cfg = {"epochs": 2, "lr": 0.05, "labels": "released"}
    a = unlearn(m, f, r, method="qmul_official", config=cfg).model
    b = unlearn(m, f, r, method="qmul_official", config=cfg).model
    assert metrics.model_sha256(a) == metrics.model_sha256(b)
    assert metrics.changed_fraction(m, a) > 0


def test_default_recipe_and_stopping_rule(setup):
    m, f, r, v = setup["model"], setup["forget"], setup["retain"], setup["validation"]
    result = unlearn(m, f, r, method="qmul_official", config={"epochs": 1}, validation=v)
    # a set smaller than the 256 batch is cut in the project's batches of 32
    assert (result.history[0]["batch_f"], result.history[0]["batch_r"]) == (32, 256)
    assert result.history[0]["w_f"] < 0.1  # a model that fits its retain set: forget term tiny
    # the retrain-free rule, on demand: a target already met stops before any step
    stopped = unlearn(m, f, r, method="qmul_official", config={"stop": True, "target_acc": 100.0})
    assert stopped.stopped_by_rule and stopped.steps == 0
    assert stopped.sample_passes == {"train": 0, "forward": len(f[0])}
    with pytest.raises(ModelError, match="labels must be one of"):
        unlearn(m, f, r, method="qmul_official", config={"labels": "table"})


@pytest.mark.parametrize("lr", [10.0, 1e4])
def test_divergence_raises_and_leaves_the_model_alone(setup, lr):
    m, f, r = setup["model"], setup["forget"], setup["retain"]
    before = metrics.model_sha256(m)
    with pytest.raises(ModelError, match="qmul_official diverged"):
        unlearn(m, f, r, method="qmul_official", config={"lr": lr, "epochs": 2})
    assert metrics.model_sha256(m) == before


def test_tensor_norm_sum_is_a_sum_of_tensor_norms(setup):
    from edge_qmul.train import Trainer
    m, (x, y) = setup["model"].copy(), setup["retain"]
    g = Trainer(m).gradients(x[:32], (y[:32] + 1) % 10)
    per = [np.linalg.norm(pg.real()) for pg in g.params.values()]
    assert tensor_norm_sum(g) == pytest.approx(sum(per))
    assert tensor_norm_sum(g) > g.norm()


def test_rl_fresh_labels(setup):
    m, f, r = setup["model"], setup["forget"], setup["retain"]
    cfg = {"epochs": 2, "stop": False}
    fixed = unlearn(m, f, r, method="rl", config={**cfg, "rl_labels": "fixed"}).model
    fresh = unlearn(m, f, r, method="rl", config={**cfg, "rl_labels": "fresh"})
    assert fresh.steps > 0 and metrics.changed_fraction(m, fresh.model) > 0
    assert metrics.model_sha256(fresh.model) != metrics.model_sha256(fixed)
    assert accuracy(fresh.model, r) > 50
    again = unlearn(m, f, r, method="rl", config={**cfg, "rl_labels": "fresh"}).model
    assert metrics.model_sha256(again) == metrics.model_sha256(fresh.model)
    assert DEFAULTS["rl"].rl_labels == "fresh"  # SalUn's, as measured in benchmarks/README.md
    with pytest.raises(ModelError, match="rl_labels"):
        unlearn(m, f, r, method="rl", config={"rl_labels": "sometimes"})
