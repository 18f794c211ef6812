"""Reading .npz files: a whole dataset (x_train, y_train, x_test, y_test) as a Dataset, or one batch
of a device's samples (x, y, owners) quantized to int8 for the store.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..quant import QuantParams, quantize
from .dataset import Dataset
from .samples import SampleBatch, SampleError


def open_npz(path: str | os.PathLike):
    """An .npz archive opened without pickle (use it as a context manager), or ValueError
    "<path>: not a readable .npz file (...)" / "<path>: not an .npz archive of named arrays"."""
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive of named arrays")
    return f


def sample_keys(files) -> tuple[str | None, str | None]:
    """The keys of a samples file's features and labels: x / y, else x_train / y_train (None if absent)."""
    xk = "x" if "x" in files else "x_train" if "x_train" in files else None
    yk = "y" if "y" in files else "y_train" if "y_train" in files else None
    return xk, yk


def npz_samples(path: str | os.PathLike, quant: QuantParams, owner: str | None = None,
                owner_key: str | None = None) -> SampleBatch:
    """The samples of an .npz as int8: features under ``x`` (or ``x_train``), labels under ``y``
    (``y_train``); owners are ``owner`` for all, or the array under ``owner_key`` (default key
    ``owners`` if present). Float features are quantized with ``quant`` (LiteRT's rounding); int8
    features are taken as they are; ``class_names`` in the file are returned. Anything wrong raises
    SampleError naming the file and the key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SampleError(f"{where}: no such file")
    try:
        f = open_npz(path)
    except ValueError as e:
        raise SampleError(str(e)) from None
    with f:
        files = list(f.files)
        if not files:
            raise SampleError(f"{where}: not an .npz archive of named arrays")
        xk, yk = sample_keys(files)
        if xk is None or yk is None:
            raise SampleError(f"{where}: needs keys x and y (or x_train and y_train); found {', '.join(files)}")
        try:
            x, y = f[xk], f[yk]
            if owner is not None and owner_key is not None:
                raise SampleError(f"{where}: pass owner or owner_key, not both")
            if owner is None:
                owner_key = owner_key or ("owners" if "owners" in files else None)
                if owner_key is None:
                    raise SampleError(f"{where}: no owner: pass owner= (one owner for all samples) or "
                                      "owner_key= (the key of a per-sample owners array)")
                if owner_key not in files:
                    raise SampleError(f"{where}: owner_key {owner_key!r} is not in the file "
                                      f"(keys: {', '.join(files)})")
                owners = f[owner_key]
                if owners.shape != (len(x),):
                    raise SampleError(f"{where}: {owner_key} has shape {owners.shape}, expected ({len(x)},)")
                owners = [str(o) for o in owners.tolist()]
            else:
                owners = owner
            names = [str(c) for c in f["class_names"].tolist()] if "class_names" in files else None
        except SampleError:
            raise
        except Exception as e:
            raise SampleError(f"{where}: cannot read arrays ({type(e).__name__}: {e})") from None
    if x.ndim < 2:
        raise SampleError(f"{where}: {xk} must be (N, *sample_shape), got shape {x.shape}")
    if len(x) == 0:
        raise SampleError(f"{where}: {xk} holds no samples")
    if y.shape != (len(x),):
        raise SampleError(f"{where}: {yk} has shape {y.shape}, expected ({len(x)},) to match {xk}")
    if not isinstance(quant, QuantParams):
        raise SampleError(f"quant must be a QuantParams, got {type(quant).__name__}")
    if x.dtype == np.int8:
        q = x
    elif np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise SampleError(f"{where}: {xk} holds NaN or inf")
        q = quantize(x, quant, np.int8)
    else:
        raise SampleError(f"{where}: {xk} is {x.dtype}; give float features (quantized here) or int8 "
                          "samples already quantized")
    return SampleBatch(q, y, owners, names, xk)


def load_npz(path: str | os.PathLike, name: str | None = None,
             class_names: list[str] | None = None) -> Dataset:
    """A dataset saved as .npz with keys x_train, y_train, x_test, y_test (optional class_names).

    Features become float32, labels int64; ``num_classes`` is the largest label + 1 (or the number
    of class names). Missing keys, mismatched lengths or bad labels raise ValueError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    required = ("x_train", "y_train", "x_test", "y_test")
    with open_npz(path) as f:
        missing = [k for k in required if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; "
                             f"an npz dataset needs {', '.join(required)} (found: {', '.join(f.files) or 'none'})")
        arrays = {k: f[k] for k in required}
        if class_names is None and "class_names" in f.files:
            class_names = [str(c) for c in f["class_names"].tolist()]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2:
            raise ValueError(f"{path}: x_{split} must be (N, ...) with a batch axis, got shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{path}: y_{split} must be a 1-D label vector, got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)} labels")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{path}: x_{split} must be numeric, got {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                pass
            else:
                raise ValueError(f"{path}: y_{split} must hold integer class labels, got {y.dtype}")
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: y_{split} holds negative labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{path}: x_train samples are {arrays['x_train'].shape[1:]}, "
                         f"x_test samples {arrays['x_test'].shape[1:]}")
    x_tr, x_te = (np.ascontiguousarray(arrays[k], dtype=np.float32) for k in ("x_train", "x_test"))
    if not (np.all(np.isfinite(x_tr)) and np.all(np.isfinite(x_te))):
        raise ValueError(f"{path}: features hold NaN or inf")
    y_tr, y_te = (arrays[k].astype(np.int64) for k in ("y_train", "y_test"))
    top = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    if class_names is not None:
        if len(class_names) < top:
            raise ValueError(f"{path}: {len(class_names)} class names for labels up to {top - 1}")
        num_classes = len(class_names)
    else:
        num_classes = top
        class_names = [str(c) for c in range(num_classes)]
    lo = float(min(x_tr.min(initial=0.0), 0.0))
    hi = float(max(x_tr.max(initial=0.0), 0.0))
    return Dataset(name or path.stem, x_tr, y_tr, x_te, y_te, num_classes, list(class_names),
                   f"loaded from {path}", input_range=(lo, hi))
