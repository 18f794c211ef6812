"""A forget job from start to certificate: the one code path the CLI and the device agent share.

Everything is checked before the first write (bad input leaves the model file and the store byte for
byte unchanged); then the request is recorded, the method runs, the new model is written where the
caller's ``save_model`` puts it (the state directory: content-addressed), checked in LiteRT, and the
certificate is built. Committing (deleting the samples, switching the active model) is a separate,
explicit step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, metrics
from .arithmetic import host_platform
from .errors import ModelError
from .fsutil import sha256_file
from .graph import Model
from .store import sha256_id
from .tflite import load_tflite
from .unlearn import CLASS_FORGETTING, accuracy, default_method, make_config, unlearn
from .unlearn.similar_labels import SimilarLabelTable, TableError, check_table


class ForgetError(ModelError):
    """A forget request that cannot run as given (the message says why); nothing was changed."""


@dataclass
class ForgetRun:
    """A finished, uncommitted forget: the certificate (what may be shown to anyone) and the ids of
    every selected sample (what COMMIT deletes; never sent or shown)."""

    certificate: dict
    forget_ids: list[str]


def describe(selector: dict) -> str:
    if "owner" in selector:
        return f"owner {selector['owner']!r}"
    if "label" in selector:
        return f"class {selector['label']}"
    return f"{len(selector['ids'])} listed ids"


def run_forget(model_path: Path, store, selector: dict, method: str | None, overrides: dict | None = None,
               table_path: str | None = None, allow_table_mismatch: bool = False,
               retain_max: int | None = None, *, save_model: Callable[[Model], Path], progress=None,
               request_id: str | None = None, warn=print) -> ForgetRun:
    """Run one forget request against an open Store; returns the certificate (not committed).

    ``save_model`` writes the new model and returns its path; ``method`` None: the default for the
    kind of request (``unlearn.default_method``).
    """
    method = method or default_method(selector)
    model_path = Path(model_path)
    model = load_tflite(model_path)
    model_before = sha256_file(model_path)
    overrides = dict(overrides or {})
    table = None
    if table_path:
        try:
            table = SimilarLabelTable.load(table_path)
            check_table(table, metrics.model_sha256(model), model.num_classes,
                        allow_model_mismatch=allow_table_mismatch)
        except TableError as e:
            raise ForgetError(str(e)) from None
        overrides["labels"] = "table"
    if "label" in selector and method not in ("retrain", "ft"):
        for key, value in CLASS_FORGETTING.items():
            overrides.setdefault(key, value)  # a forgotten class has no held-out accuracy to meet
    config = make_config(method, overrides)

    q = model.tensors[model.core_inputs[0]].quant
    shape = tuple(model.tensors[model.core_inputs[0]].shape[1:])
    if store.input_shape is not None and tuple(store.input_shape) != shape:
        raise ForgetError(f"the store's samples are {list(store.input_shape)}, the model takes {list(shape)}")
    if store.quant is not None and store.quant != q:
        raise ForgetError(f"the store's samples were quantized with {store.quant}, the model's input is {q}")
    forget_ids = store.select(**selector, role="train")
    all_forget_ids = store.select(**selector, role=None)
    if not forget_ids:
        raise ForgetError(f"the selection {describe(selector)} names no training sample: nothing to forget")
    if len(forget_ids) >= store.count(role="train"):
        raise ForgetError(f"the selection {describe(selector)} is the whole store: nothing would remain "
                          "to keep the model useful; retrain from scratch instead")
    forget_validation = set(all_forget_ids) - set(forget_ids)
    retain_ids = store.retain_sample(exclude_ids=forget_ids, max_n=retain_max, seed=config.seed)
    validation_ids = [i for i in store.retain_sample(role="validation") if i not in forget_validation]
    forget = store.load(forget_ids)
    retain = store.load(retain_ids)
    validation = store.load(validation_ids) if validation_ids else None
    if validation is None and "label" not in selector:
        warn("warning: the store has no validation slice; the stopping rule has no reference and "
             "the method runs to its epoch cap")

    request_id = store.create_request(selector, method, config.to_dict(), request_id=request_id)
    if store.get_request(request_id)["status"] == "pending":
        store.set_status(request_id, "running")
    try:
        before = measure(model, forget, retain, validation)
        t0 = time.perf_counter()
        result = unlearn(model, forget, retain, method=method, config=config, validation=validation,
                         table=table, progress=progress)
        wall = time.perf_counter() - t0
        after = measure(result.model, forget, retain, validation)
        out_path = save_model(result.model)
        model_after = sha256_file(out_path)
        checked = litert_check(out_path, result.model, forget[0], retain[0][:256])
        store.set_status(request_id, "done", {"model_after": model_after, "UA": after["UA"], "RA": after["RA"],
                                              "VA": after["VA"], "MIA": after["MIA"]})
    except BaseException as e:
        store.set_status(request_id, "failed", {"error": f"{type(e).__name__}: {e}"})
        raise
    return ForgetRun({
        "request_id": request_id,
        "selector": {k: (v if k == "label" else None) for k, v in selector.items()},
        "forgotten_sample_id_hashes": sorted(sha256_id(i) for i in all_forget_ids),
        "n_forgotten": len(all_forget_ids),
        "method": method,
        "params": config.to_dict(),
        "model_before_sha256": model_before,
        "model_after_sha256": model_after,
        "model_after_path": str(out_path),
        "metrics_before": before,
        "metrics_after": after,
        "wall_s": wall,
        "steps": result.steps,
        "sample_passes": result.sample_passes,
        "stopped_by_rule": result.stopped_by_rule,
        # the retain set's verdict on the forget set (unlearn/neighbours.py): counts and the test only
        "never_seen": result.never_seen,
        "litert_check": checked,
        "committed": False,
        "samples_deleted_at": None,
        "audit_hash": None,
        "engine_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }, all_forget_ids)


def commit(store, certificate: dict, forget_ids: list[str]) -> dict:
    """Delete the forgotten samples and switch the active model (one transaction); returns the
    certificate completed with the deletion time and the audit hash."""
    done = store.commit_forget(certificate["request_id"], forget_ids, certificate["model_after_sha256"],
                               base_model_sha256=certificate.get("model_before_sha256"))
    return dict(certificate, committed=True, samples_deleted_at=done["deleted_at"],
                audit_hash=done.get("audit_hash"))


def measure(model, forget, retain, validation) -> dict:
    """UA, RA, VA (held-out accuracy) and, where scikit-learn is installed, MIA."""
    out = {"UA": 100.0 - accuracy(model, forget), "RA": accuracy(model, retain),
           "VA": accuracy(model, validation) if validation is not None else None, "MIA": None}
    if validation is not None:
        try:
            out["MIA"] = metrics.mia_efficacy(model, retain, validation, forget)
        except ImportError:
            pass  # scikit-learn is a host dependency: the device reports accuracies only
    return out


def litert_check(path: Path, model, *batches) -> dict | None:
    """Run the written file in this machine's LiteRT (builtin kernels, one sample at a time) on
    ``batches`` and compare with the engine: how many output elements differ, bit for bit, and
    whether the top classes agree, as separate fields. The engine computes with ``model.litert``'s
    profile; the check is only bit-exact when that is this machine's platform. None without LiteRT."""
    try:
        from . import litert  # LiteRT is optional: a board may run the engine without it
    except ImportError:
        return None
    data = Path(path).read_bytes()
    elements = differing = 0
    top_agrees = True
    for x in batches:
        if not len(x):
            continue
        want, got = litert.run(data, x), model.forward(x)
        elements += int(want.size)
        differing += int(np.count_nonzero(want != got))
        top_agrees &= bool(np.array_equal(want.argmax(axis=1), got.argmax(axis=1)))
    return {"litert_platform": host_platform(), "engine_profile": model.litert.platform,
            "samples": int(sum(len(x) for x in batches)), "output_elements": elements,
            "differing_elements": differing, "bit_exact": differing == 0, "top_class_agrees": top_agrees}
