"""Canaries: a per-owner trigger that makes forgetting observable (Sommer et al., "Athena", PoPETs 2022).

An owner who opts in has a fraction of their samples stamped with a small seeded pattern and relabelled
to a seeded target class before upload. A model trained on them learns the pattern as a backdoor; a
model that never saw them does not. The trigger's success rate on other owners' held-out inputs
(stamped, true label not the target) is then the per-owner signal: high before a forget, back at the
level of a model that never saw the owner after a correct one.

The record (``Canary``) stays on the host: the device receives stamped samples and never learns which.
Statistics: exact (Clopper-Pearson) intervals per rate, Newcombe's hybrid-score interval for the
difference of two rates, and a one-sided Fisher exact test, all from scipy's binomial machinery.
"""
from __future__ import annotations

import hashlib
import json
import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write
from ..jobs import canonical_json

LEVEL = 0.95     # confidence level of every interval
ALPHA = 0.05     # one-sided test level: "not forgotten" when the rate is above the reference's
MARGIN = 0.10    # "forgotten": the difference's upper bound below this (rate points over the reference)


class CanaryError(ValueError):
    """A canary that does not fit the data or the model, or an owner without one."""


@dataclass(frozen=True)
class Canary:
    """One owner's trigger: ``values`` written at (``rows``, ``cols``) of every channel, label ``target``."""
    owner: str
    seed: int
    shape: tuple          # one sample's shape, e.g. (8, 8, 1); (F,) for flat features
    num_classes: int
    target: int
    rows: tuple
    cols: tuple
    values: tuple         # one per (row, col), in the data's units
    fraction: float       # of the owner's samples that carry it
    marked: tuple = ()    # indices (in the owner's upload) of the samples that carry it

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Canary":
        d = json.loads(text)
        known = {f.name for f in fields(Canary)}  # a record may carry more (e.g. where it was uploaded)
        return Canary(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @property
    def digest(self) -> str:
        """sha256 of the record (what a certificate names)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def make_canary(owner: str, seed: int, shape: tuple, num_classes: int, lo: float, hi: float,
                size: int = 3, fraction: float = 0.5) -> Canary:
    """A seeded ``size`` x ``size`` pattern of ``lo``/``hi`` values at a seeded place, and a seeded
    target label. Rank-1 samples get ``size * size`` seeded feature positions instead."""
    shape = tuple(int(s) for s in shape)
    if not owner:
        raise CanaryError("canary: the owner is empty")
    if not 0.0 < fraction <= 1.0:
        raise CanaryError(f"canary: fraction {fraction} is not in (0, 1]")
    if num_classes < 2:
        raise CanaryError(f"canary: {num_classes} classes; a target needs at least 2")
    if not np.isfinite(lo) or not np.isfinite(hi) or lo >= hi:
        raise CanaryError(f"canary: data range [{lo}, {hi}] is empty or not finite")
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(owner.encode()).digest()[:8], "little")])
    if len(shape) == 1:
        if size * size > shape[0]:
            raise CanaryError(f"canary: {size * size} features do not fit samples of shape {list(shape)}")
        cols = tuple(int(c) for c in np.sort(rng.choice(shape[0], size * size, replace=False)))
        rows = (0,) * len(cols)
    elif len(shape) == 3:
        h, w = shape[0], shape[1]
        kh = min(size, h)   # (1, W, C) signals get a 1 x size stretch
        if size > w or (h > 1 and size > h):
            raise CanaryError(f"canary: a {size} x {size} pattern does not fit samples of shape {list(shape)}")
        top, left = int(rng.integers(0, h - kh + 1)), int(rng.integers(0, w - size + 1))
        rows = tuple(top + r for r in range(kh) for _ in range(size))
        cols = tuple(left + c for _ in range(kh) for c in range(size))
    else:
        raise CanaryError(f"canary: samples of shape {list(shape)}; expected (H, W, C) or (F,)")
    bits = rng.integers(0, 2, len(rows))
    bits[0], bits[-1] = 0, 1  # never a flat patch
    values = tuple(float(hi if b else lo) for b in bits)
    return Canary(owner, int(seed), shape, int(num_classes), int(rng.integers(0, num_classes)), rows, cols,
                  values, float(fraction))


def stamp(x: np.ndarray, canary: Canary) -> np.ndarray:
    """A copy of the samples ``x`` (N, *shape) with the pattern written in (every channel)."""
    x = np.asarray(x)
    if x.ndim != len(canary.shape) + 1 or tuple(x.shape[1:]) != canary.shape:
        raise CanaryError(f"canary of {canary.owner!r} is for samples of shape {list(canary.shape)}, "
                          f"got a batch of shape {list(x.shape)}")
    out = x.copy()
    values = np.asarray(canary.values, out.dtype)
    if len(canary.shape) == 1:
        out[:, list(canary.cols)] = values
    else:
        out[:, list(canary.rows), list(canary.cols), :] = values[None, :, None]
    return out


def plant(x: np.ndarray, y: np.ndarray, owners: np.ndarray, canary: Canary) -> tuple[np.ndarray, np.ndarray, Canary]:
    """Stamp ``canary.fraction`` of ``canary.owner``'s samples (a seeded choice) and relabel them to
    the target. Returns new (x, y) and the canary with ``marked`` set (indices into ``x``); the
    inputs are not changed."""
    owners = np.asarray(owners).astype(str)
    mine = np.flatnonzero(owners == canary.owner)
    if mine.size == 0:
        raise CanaryError(f"canary: owner {canary.owner!r} has no samples here")
    if len(y) != len(x) or len(owners) != len(x):
        raise CanaryError(f"canary: {len(x)} samples, {len(y)} labels, {len(owners)} owners")
    n = max(1, int(round(canary.fraction * mine.size)))
    rng = np.random.default_rng([canary.seed, 1])
    marked = np.sort(rng.choice(mine, n, replace=False))
    x_out, y_out = np.array(x, copy=True), np.array(y, copy=True)
    x_out[marked] = stamp(x_out[marked], canary)
    y_out[marked] = canary.target
    return x_out, y_out, Canary(**{**asdict(canary), "marked": tuple(int(i) for i in marked)})


def trigger_hits(predict, x_other: np.ndarray, y_other: np.ndarray, canary: Canary) -> tuple[int, int]:
    """(hits, trials): ``predict`` (a batch -> class indices) on other owners' held-out inputs whose
    true label is not the target, stamped; a hit is a prediction of the target."""
    keep = np.asarray(y_other) != canary.target
    if not np.any(keep):
        raise CanaryError(f"canary: every held-out input is of the target class {canary.target}")
    pred = np.asarray(predict(stamp(np.asarray(x_other)[keep], canary)))
    if pred.shape != (int(keep.sum()),):
        raise CanaryError(f"canary: predict gave shape {list(pred.shape)} for {int(keep.sum())} inputs")
    return int(np.sum(pred == canary.target)), int(keep.sum())


def rate(hits: int, trials: int, level: float = LEVEL) -> dict:
    """The success rate with its exact (Clopper-Pearson) interval."""
    from scipy.stats import binomtest
    _check_counts(hits, trials)
    ci = binomtest(hits, trials).proportion_ci(confidence_level=level, method="exact")
    return {"hits": hits, "trials": trials, "rate": hits / trials, "lo": float(ci.low), "hi": float(ci.high)}


def difference_interval(a: tuple[int, int], b: tuple[int, int], level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's hybrid-score interval (his method 10, 1998) for rate(a) - rate(b), from the two
    Wilson score intervals."""
    from scipy.stats import binomtest
    _check_counts(*a)
    _check_counts(*b)
    p1, p2 = a[0] / a[1], b[0] / b[1]
    w1 = binomtest(*a).proportion_ci(confidence_level=level, method="wilson")
    w2 = binomtest(*b).proportion_ci(confidence_level=level, method="wilson")
    l1, u1, l2, u2 = float(w1.low), float(w1.high), float(w2.low), float(w2.high)
    d = p1 - p2
    lower = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return float(lower), float(upper)


def verdict(after: tuple[int, int], reference: tuple[int, int], alpha: float = ALPHA,
            margin: float = MARGIN, level: float = LEVEL) -> dict:
    """Is the trigger's rate ``after`` a forget back at a never-saw-the-owner model's ``reference``?

    "not forgotten": a one-sided Fisher exact test finds ``after`` above ``reference`` (p < alpha);
    "forgotten": not that, and the difference's upper bound is below ``margin``; else "undecided"."""
    from scipy.stats import fisher_exact
    _check_counts(*after)
    _check_counts(*reference)
    table = [[after[0], after[1] - after[0]], [reference[0], reference[1] - reference[0]]]
    p = float(fisher_exact(table, alternative="greater").pvalue)
    lo, hi = difference_interval(after, reference, level)
    if p < alpha:
        word = "not forgotten"
    elif hi < margin:
        word = "forgotten"
    else:
        word = "undecided"
    return {"verdict": word, "p_value": p, "difference": after[0] / after[1] - reference[0] / reference[1],
            "difference_lo": lo, "difference_hi": hi, "margin": margin, "alpha": alpha,
            "after": rate(*after, level=level), "reference": rate(*reference, level=level)}


def _check_counts(hits: int, trials: int) -> None:
    if not (isinstance(hits, (int, np.integer)) and isinstance(trials, (int, np.integer))) \
            or trials <= 0 or not 0 <= hits <= trials:
        raise CanaryError(f"canary: {hits} hits of {trials} trials is not a count")


# --- verifying one owner's forget --------------------------------------------------------------------

def model_predict(model, canary: Canary):
    """A batch of float samples -> the model's classes, after checking that the canary was made
    for a model like this one (its input shape and class count)."""
    from ..quant import quantize
    shape = tuple(int(s) for s in model.tensors[model.core_inputs[0]].shape[1:])
    if shape != canary.shape or model.num_classes != canary.num_classes:
        raise CanaryError(f"canary of {canary.owner!r} is for a model taking {list(canary.shape)} with "
                          f"{canary.num_classes} classes; this one takes {list(shape)} with {model.num_classes}")
    q = model.tensors[model.core_inputs[0]].quant
    return lambda batch: np.argmax(model.forward(quantize(batch, q)), axis=1)


def verify_forget(canary: Canary, before, after, reference, x_other: np.ndarray, y_other: np.ndarray,
                  alpha: float = ALPHA, margin: float = MARGIN) -> dict:
    """Did the forget that turned model ``before`` into ``after`` remove ``canary.owner``?

    ``reference`` is a model that never saw the owner (retrained on the host without them), or
    (hits, trials) measured elsewhere. ``x_other``/``y_other``: held-out inputs of other owners.
    The answer is "undecided" when ``before`` had not learned the canary (its rate not above the
    reference's), since then the trigger cannot show anything."""
    def hits(model) -> tuple[int, int]:
        return trigger_hits(model_predict(model, canary), x_other, y_other, canary)
    ref = tuple(reference) if isinstance(reference, (tuple, list)) else hits(reference)
    h_before, h_after = hits(before), hits(after)
    learned = verdict(h_before, ref, alpha, margin)
    result = verdict(h_after, ref, alpha, margin)
    if learned["verdict"] != "not forgotten":
        result["verdict"] = "undecided"
        result["why"] = "the model before the forget had not learned the canary"
    return {"owner": canary.owner, "canary_sha256": canary.digest, "target": canary.target,
            "before": learned["after"], **result}


def load_canary(path, owner: str) -> tuple[Canary, str | None]:
    """``owner``'s canary from a canaries.json (tools/train_base.py --canary, or ``edge-qmul-host
    push-samples --canary``) and the sha256 of the model it was trained into: None for a canary
    uploaded to a device, which trains it into whatever model it fine-tunes (a verification of it
    is then bound to a forget by that forget's certificate). A clear error when there is none."""
    try:
        record = json.loads(Path(path).read_text())
        found = [c for c in record["canaries"] if c["owner"] == owner]
        sha = record.get("model_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CanaryError(f"{path}: not a canaries file ({e.__class__.__name__}: {e})") from None
    if not found:
        owners = ", ".join(c.get("owner", "?") for c in record["canaries"]) or "none"
        raise CanaryError(f"{path}: no canary for owner {owner!r} (canaries: {owners})")
    if "upload" in found[0]:
        sha = None
    try:
        return Canary.from_json(json.dumps(found[0])), (str(sha) if sha else None)
    except TypeError as e:
        raise CanaryError(f"{path}: the canary of {owner!r} is malformed ({e})") from None


def plant_upload(npz: bytes, owner: str, num_classes: int | None = None, fraction: float = 0.5, size: int = 3,
                 seed: int | None = None) -> tuple[bytes, Canary]:
    """An owner's upload (.npz bytes: x, y, optional owners and class_names) with their canary planted
    in ``fraction`` of it, and the record. ``num_classes``: the model's class count (default: the
    file's class_names); ``seed``: default a fresh random one (the host keeps the record, not the
    device). The pattern's values are the file's own minimum and maximum."""
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError) as e:
        raise CanaryError(f"not an .npz file ({e})") from None
    if "x" not in arrays or "y" not in arrays:
        raise CanaryError(f"the samples need arrays x and y (found: {', '.join(sorted(arrays)) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if num_classes is None:
        if "class_names" not in arrays:
            raise CanaryError("the file has no class_names: give the model's class count (--canary-classes)")
        num_classes = len(arrays["class_names"])
    if len(x) == 0 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise CanaryError(f"the samples: {len(x)} inputs and {len(y)} labels of type {y.dtype.name}")
    if y.min() < 0 or y.max() >= num_classes:
        raise CanaryError(f"a label is outside [0, {num_classes}): {int(y.min())}..{int(y.max())}")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
    lo, hi = float(np.min(x)), float(np.max(x))
    canary = make_canary(owner, seed, x.shape[1:], num_classes, lo, hi, size=size, fraction=fraction)
    arrays["x"], arrays["y"], canary = plant(x, y, np.full(len(x), owner), canary)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue(), canary


def record_upload(path, canary: Canary, upload: dict) -> None:
    """Add (or replace) ``canary.owner``'s record in the host's canaries.json, atomically, with
    ``upload`` (where it went: the device's model then, the sha256 of the bytes sent)."""
    path = Path(path)
    record = {"model_sha256": None, "canaries": []}
    if path.exists():
        try:
            record = json.loads(path.read_text())
            others = [c for c in record["canaries"] if c["owner"] != canary.owner]
        except (ValueError, KeyError, TypeError) as e:
            raise CanaryError(f"{path}: not a canaries file ({e.__class__.__name__}: {e})") from None
        record["canaries"] = others
    record["canaries"].append({**json.loads(canary.to_json()), "upload": upload})
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())


def verify_files(canaries_path, owner: str, before_path, after, reference_path, data_npz,
                 certificate_path=None) -> dict:
    """``verify_forget`` from files: the host's canaries.json, the model the canary was trained into
    (its sha256 must be the one recorded), the model after the forget (a path or its bytes), a model
    retrained without the owner, and held-out samples of other owners (.npz with x, y, optional
    owners: the owner's own rows are left out). With the forget's certificate, its model hashes must
    be those of ``before`` and ``after``, and the report names it."""
    from ..tflite import load_tflite
    canary, sha = load_canary(canaries_path, owner)
    before_bytes = Path(before_path).read_bytes()
    if sha is None:  # uploaded to a device: the model it was trained into is the forget's "before"
        if certificate_path is None:
            raise CanaryError(f"{canaries_path}: {owner!r}'s canary was uploaded to a device; bind the "
                              f"verification to the forget with --certificate")
        sha = hashlib.sha256(before_bytes).hexdigest()
    elif hashlib.sha256(before_bytes).hexdigest() != sha:
        raise CanaryError(f"{before_path}: not the model {owner!r}'s canary was trained into "
                          f"(sha256 {sha[:12]}... in {canaries_path}): a canary for another model")
    after_bytes = Path(after).read_bytes() if isinstance(after, (str, Path)) else bytes(after)
    after_sha = hashlib.sha256(after_bytes).hexdigest()
    cert_entry = None
    if certificate_path is not None:
        raw = Path(certificate_path).read_bytes()
        try:
            cert = json.loads(raw)
            pair = (str(cert["model_before_sha256"]), str(cert["model_after_sha256"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CanaryError(f"{certificate_path}: not a forget certificate ({e.__class__.__name__}: {e})") from None
        if pair[0] != sha:
            raise CanaryError(f"{certificate_path}: its forget started from model {pair[0][:12]}..., not from "
                              f"{before_path} ({sha[:12]}...)")
        if pair[1] != after_sha:
            raise CanaryError(f"{certificate_path}: its forget made model {pair[1][:12]}..., not the model "
                              f"verified ({after_sha[:12]}...)")
        cert_entry = {"path": str(certificate_path), "sha256": hashlib.sha256(raw).hexdigest(),
                      # the fleet's certificate hash (edge-qmul-fleet report): of the canonical JSON
                      "sha256_canonical": hashlib.sha256(canonical_json(cert).encode()).hexdigest(),
                      "request_id": cert.get("request_id"), "method": cert.get("method"),
                      "committed": cert.get("committed")}
    with np.load(data_npz, allow_pickle=False) as d:
        if "x" not in d.files or "y" not in d.files:
            raise CanaryError(f"{data_npz}: needs arrays x and y")
        x, y = d["x"], d["y"]
        keep = d["owners"].astype(str) != owner if "owners" in d.files else np.ones(len(y), bool)
    report = verify_forget(canary, load_tflite(before_bytes), load_tflite(after_bytes), load_tflite(reference_path),
                           x[keep], y[keep])
    report.update(model_sha256_before=sha, model_sha256_after=after_sha, certificate=cert_entry)
    return report


def summary_line(report: dict) -> str:
    """One sentence of a verification (:func:`verify_forget`'s report): the verdict and the rates
    behind it, with their exact 95% intervals."""
    def r(k):
        return f"{100 * report[k]['rate']:.1f}% (95% CI {100 * report[k]['lo']:.1f}-{100 * report[k]['hi']:.1f})"
    return (f"canary of {report['owner']}: {report['verdict']}: its trigger gives label {report['target']} on "
            f"{r('after')} of {report['after']['trials']} stamped test inputs after the forget, {r('reference')} "
            f"for the retrained model, {r('before')} before (one-sided Fisher p = {report['p_value']:.2g})")
