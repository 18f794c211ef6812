"""Unlearning metrics on the deployed int8 model: UA, RA, TA, MIA-efficacy, gaps, weight change.

The protocol follows OPTML-Group's Unlearn-Sparse / SalUn evaluation code (``evaluation/SVC_MIA.py``
and its call in ``main_forget.py``):

- UA = 100 - accuracy on the forget set D_f; RA = accuracy on the retain set D_r; TA = accuracy on
  the test set. All in percent.
- MIA-efficacy: an RBF SVC (``C=3, gamma="auto"``) is fitted on the confidence feature ``p[y]`` of
  the first |test| retain samples (members, label 1) and of the test samples (non-members, label 0);
  the efficacy is the share of forget samples it calls non-members, in percent.
- Average gap to Retrain: mean |m - m_retrain| over UA, RA, TA, MIA.

Device side: numpy and the engine only. scikit-learn (for the SVC) is imported when the MIA is
computed, and its absence is a clear ImportError naming the ``host`` extra.

Probabilities are the float64 softmax of the dequantized int8 logits. When the model ends in an int8
SOFTMAX op, its *input* (the logits, ``Model.logits_tensor``) is used, as training does, so
confidences are not flattened to the 1/256 grid of int8 probabilities. Accuracy is the top-1 of the
model's own int8 output, the class LiteRT running the .tflite answers.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Sequence

import numpy as np

from .graph import Model
from .losses import softmax
from .quant import dequantize
from .tflite import to_bytes

__all__ = ["predict_proba", "accuracy", "confidence", "mia_efficacy", "evaluate", "average_gap",
           "gap_split", "changed_fraction", "model_sha256", "logits_tensor", "METRIC_KEYS"]

METRIC_KEYS: tuple[str, ...] = ("UA", "RA", "TA", "MIA")
SVC_PARAMS = {"C": 3, "gamma": "auto", "kernel": "rbf"}


# --- probabilities ---------------------------------------------------------------------------------

def logits_tensor(model: Model) -> int:
    """Index of the logits tensor (``Model.logits_tensor``)."""
    return model.logits_tensor


def _run(model: Model, x_int8: np.ndarray, batch: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One engine pass in batches: class probabilities, float64 (N, C), from the logits, and the
    predicted class, int64 (N,), the argmax of the model's int8 output (ties to the lower class)."""
    if not (isinstance(batch, (int, np.integer)) and not isinstance(batch, bool) and batch >= 1):
        raise ValueError(f"{where}: batch must be a positive integer, got {batch!r}")
    num_classes = model.num_classes
    x_int8 = np.asarray(x_int8)
    core_in, core_out = model.core_inputs[0], model.core_outputs[0]
    if x_int8.ndim == len(model.tensors[core_in].shape) and len(x_int8) == 0:
        return np.zeros((0, num_classes), dtype=np.float64), np.zeros(0, dtype=np.int64)
    t = model.logits_tensor
    qp = model.tensors[t].quant
    if qp is None:
        raise ValueError(f"{where}: logits tensor {model.tensors[t].name!r} is not quantized")
    x_int8 = model._check_batch(x_int8, core_in, where)
    probs, preds = [], []
    for i in range(0, len(x_int8), int(batch)):
        xb = x_int8[i:i + int(batch)]
        values = model.run({core_in: xb}, start_after_interface=True)
        probs.append(softmax(dequantize(values[t], qp).astype(np.float64).reshape(len(xb), -1)))
        preds.append(values[core_out].reshape(len(xb), -1).argmax(axis=1))
    return np.concatenate(probs, axis=0), np.concatenate(preds).astype(np.int64)


def predict_proba(model: Model, x_int8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class probabilities, float64 (N, C): softmax of the dequantized int8 logits.

    ``x_int8`` is a batch of int8 core inputs (what ``model.forward`` takes). An empty batch gives
    a (0, C) array.
    """
    return _run(model, x_int8, batch, "predict_proba")[0]


def check_labels(y, n: int | None, num_classes: int, where: str) -> np.ndarray:
    """Labels as int64, checked: 1-D, ``n`` entries (if given), integers in [0, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or (n is not None and len(y) != n):
        want = "a 1-D array" if n is None else f"a 1-D array of {n} entries"
        raise ValueError(f"{where}: labels must be {want}, got shape {y.shape}")
    n = len(y)
    if n and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {y.dtype}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise ValueError(f"{where}: label {int(bad[0])} is outside [0, {num_classes})")
    return y



def _scored(model: Model, x_int8, y, where: str, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, predicted classes, checked labels) of one pass over (x_int8, y)."""
    p, pred = _run(model, x_int8, batch, where)
    return p, pred, check_labels(y, len(p), p.shape[1], where)


def _percent_correct(pred: np.ndarray, y: np.ndarray, where: str) -> float:
    if len(y) == 0:
        raise ValueError(f"{where}: no samples to measure accuracy on")
    return float(100.0 * np.mean(pred == y))


def accuracy(model: Model, x_int8: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy in percent: the argmax of the model's int8 output (the class LiteRT answers;
    ties go to the lower class) against the labels ``y``."""
    _, pred, y = _scored(model, x_int8, y, "accuracy", batch)
    return _percent_correct(pred, y, "accuracy")


def confidence(model: Model, x_int8: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The probability of the true class, p[y], float64 (N,)."""
    p, _, y = _scored(model, x_int8, y, "confidence")
    return p[np.arange(len(y)), y]


# --- membership inference --------------------------------------------------------------------------

def _import_svc():
    try:  # scikit-learn is optional (the host extra): only the MIA needs it
        from sklearn.svm import SVC
    except ImportError as e:
        raise ImportError("the MIA-efficacy metric needs scikit-learn, a host-side dependency: "
                          "pip install 'edge-qmul[host]'") from e
    return SVC


def _mia_from_conf(shadow_train: np.ndarray, shadow_test: np.ndarray, target: np.ndarray,
                   seed: int) -> float:
    if len(shadow_train) == 0 or len(shadow_test) == 0:
        raise ValueError("mia_efficacy: the retain and test sets must both hold samples")
    if len(target) == 0:
        raise ValueError("mia_efficacy: the forget set holds no samples")
    SVC = _import_svc()
    x = np.concatenate([shadow_train, shadow_test]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(shadow_train)), np.zeros(len(shadow_test))])
    # random_state only matters for probability estimates, which are not used: the fit is
    # deterministic; it is passed so that the whole metric is a function of its arguments.
    clf = SVC(random_state=seed, **SVC_PARAMS)
    clf.fit(x, labels)
    pred = clf.predict(np.asarray(target, dtype=np.float64).reshape(-1, 1))
    return float(100.0 * np.mean(pred == 0))


def _as_set(s, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(s, (tuple, list)) and len(s) == 2):
        raise ValueError(f"{where}: expected an (x_int8, y) pair")
    return s[0], s[1]


def mia_efficacy(model: Model, retain, test, forget, seed: int = 0) -> float:
    """MIA-efficacy in percent: share of ``forget`` that the SVC attack calls non-members.

    ``retain``, ``test``, ``forget`` are (x_int8, y) pairs. Members are the first |test| retain
    samples (all of them when the retain set is smaller), non-members the test samples; the feature
    is the true-class confidence p[y]. Higher means the forget set looks more like unseen data.
    """
    xr, yr = _as_set(retain, "mia_efficacy: retain")
    xt, yt = _as_set(test, "mia_efficacy: test")
    xf, yf = _as_set(forget, "mia_efficacy: forget")
    n = len(np.asarray(yt))
    _import_svc()  # fail before any inference when scikit-learn is missing
    shadow_train = confidence(model, np.asarray(xr)[:n], np.asarray(yr)[:n])
    shadow_test = confidence(model, xt, yt)
    target = confidence(model, xf, yf)
    return _mia_from_conf(shadow_train, shadow_test, target, seed)


# --- the whole evaluation --------------------------------------------------------------------------

def evaluate(model: Model, forget, retain, test, mia: bool = True, seed: int = 0) -> dict:
    """UA, RA, TA (percent) and MIA-efficacy (percent, or None when ``mia`` is False or scikit-learn
    is missing) of ``model`` on the (x_int8, y) sets ``forget``, ``retain``, ``test``."""
    sets = {}
    for name, s in (("forget", forget), ("retain", retain), ("test", test)):
        x, y = _as_set(s, f"evaluate: {name}")
        sets[name] = _scored(model, x, y, f"evaluate: {name} set")
    conf = {k: p[np.arange(len(y)), y] for k, (p, _, y) in sets.items()}
    correct = {k: _percent_correct(pred, y, f"evaluate: {k} set") for k, (_, pred, y) in sets.items()}
    out = {"UA": 100.0 - correct["forget"], "RA": correct["retain"], "TA": correct["test"],
           "MIA": None}
    if mia:
        try:
            _import_svc()
        except ImportError as e:
            warnings.warn(f"MIA-efficacy skipped: {e}", RuntimeWarning, stacklevel=2)
        else:
            n = len(conf["test"])
            out["MIA"] = _mia_from_conf(conf["retain"][:n], conf["test"], conf["forget"], seed)
    return out


def _gap(m: dict, m_retrain: dict, keys: Sequence[str]) -> float:
    keys = list(keys)
    if not keys:
        raise ValueError("average_gap: no metric keys given")
    diffs = []
    for k in keys:
        for label, d in (("metrics", m), ("retrain metrics", m_retrain)):
            if k not in d:
                raise ValueError(f"average_gap: {label} have no {k!r}")
            if d[k] is None:
                raise ValueError(f"average_gap: {label} hold no value for {k!r} "
                                 f"(pass keys=... without it)")
        diffs.append(abs(float(m[k]) - float(m_retrain[k])))
    return float(np.mean(diffs))


def average_gap(m: dict, m_retrain: dict, keys: Sequence[str] = METRIC_KEYS) -> float:
    """Mean over ``keys`` of |m[k] - m_retrain[k]| (the 'Avg. Gap' of Unlearn-Sparse / SalUn)."""
    return _gap(m, m_retrain, keys)


def gap_split(m: dict, m_retrain: dict) -> dict[str, float]:
    """The average gap in two halves: forgetting (UA, MIA) and utility (RA, TA)."""
    return {"forgetting": _gap(m, m_retrain, ("UA", "MIA")),
            "utility": _gap(m, m_retrain, ("RA", "TA"))}


# --- the model itself ------------------------------------------------------------------------------

def changed_fraction(before: Model, after: Model) -> float:
    """Fraction of int8 weight entries (every ``.weight`` parameter) that differ between models."""
    pb, pa = before.parameters(), after.parameters()
    names = sorted(k for k in pb if k.endswith(".weight"))
    names_after = sorted(k for k in pa if k.endswith(".weight"))
    if names != names_after:
        raise ValueError(f"changed_fraction: the models have different weights: "
                         f"{', '.join(names)} vs {', '.join(names_after)}")
    changed = total = 0
    for k in names:
        if pb[k].shape != pa[k].shape:
            raise ValueError(f"changed_fraction: weight {k!r} is {list(pb[k].shape)} before and "
                             f"{list(pa[k].shape)} after")
        changed += int(np.count_nonzero(pb[k] != pa[k]))
        total += int(pb[k].size)
    return changed / total if total else 0.0


def model_sha256(model: Model) -> str:
    """SHA-256 (hex) of the model's .tflite bytes."""
    return hashlib.sha256(to_bytes(model)).hexdigest()
