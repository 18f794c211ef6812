"""The 'mnist1d' dataset: MNIST-1D (Greydanus 2020) generated locally by the ``mnist1d`` package with
its default arguments, laid out (N, 1, 40, 1), and cached on disk because generating it takes seconds.

The arrays are cached in ``$EDGE_QMUL_CACHE`` (default ``$XDG_CACHE_HOME/edge_qmul``, i.e.
``~/.cache/edge_qmul``) as ``mnist1d-<key>.npz``, where ``<key>`` hashes the generator's arguments and
the package version. The file is written atomically (temp file, fsync, rename), so a crash never
leaves a half-written cache; delete it to regenerate.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write
from .dataset import Dataset


def cache_dir() -> Path:
    """Where generated datasets are cached: $EDGE_QMUL_CACHE, else $XDG_CACHE_HOME/edge_qmul,
    else ~/.cache/edge_qmul."""
    env = os.environ.get("EDGE_QMUL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge_qmul"


def _import_mnist1d():
    try:  # mnist1d is a host-side dependency, needed only for this dataset
        import mnist1d
        from mnist1d import data as mdata
    except ImportError as e:
        raise ImportError("the 'mnist1d' dataset needs the mnist1d package, a host-side dependency: "
                          "pip install 'edge-qmul[host]'") from e
    return mnist1d, mdata


def _mnist1d_arrays() -> dict[str, np.ndarray]:
    mnist1d, mdata = _import_mnist1d()
    args = mdata.get_dataset_args()
    key_args = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    version = getattr(mnist1d, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("mnist1d")
        except Exception:  # pragma: no cover
            version = "unknown"
    key = hashlib.sha256(json.dumps({"args": key_args, "version": version}, sort_keys=True)
                         .encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    keys = ("x_train", "y_train", "x_test", "y_test")
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in keys}
            if (len(arrays["x_train"]) == len(arrays["y_train"])
                    and len(arrays["x_test"]) == len(arrays["y_test"])):
                return arrays
        except Exception:  # unreadable cache: regenerate it below
            pass

    # make_dataset reseeds numpy's and random's global generators; keep the caller's state intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = mdata.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {"x_train": np.asarray(d["x"], np.float32), "y_train": np.asarray(d["y"], np.int64),
              "x_test": np.asarray(d["x_test"], np.float32), "y_test": np.asarray(d["y_test"], np.int64)}
    try:
        _atomic_savez(path, arrays)
    except OSError:  # a read-only home still gets the data, only uncached
        pass
    return arrays


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_mnist1d() -> Dataset:
    """4000 / 1000 train / test signals (the package's own split), standardized, (N, 1, 40, 1)."""
    a = _mnist1d_arrays()
    x_tr = np.ascontiguousarray(a["x_train"].reshape(-1, 1, a["x_train"].shape[-1], 1))
    x_te = np.ascontiguousarray(a["x_test"].reshape(-1, 1, a["x_test"].shape[-1], 1))
    return Dataset("mnist1d", x_tr, a["y_train"].astype(np.int64), x_te, a["y_test"].astype(np.int64),
                   num_classes=10, class_names=[str(c) for c in range(10)],
                   description=("MNIST-1D (Greydanus 2020): 40-sample 1-D signals of the digits 0-9 under "
                                "padding, shear, translation and noise, standardized; generated locally "
                                "with mnist1d's default arguments; its own 4000/1000 split; "
                                "layout (N, 1, 40, 1)"),
                   input_range=(float(x_tr.min()), float(x_tr.max())))
