"""The 'digits' dataset: scikit-learn's 8x8 handwritten digits as NHWC images in [0, 1], with a
stratified 80/20 train/test split drawn by seed.
"""
from __future__ import annotations

import numpy as np

from .dataset import Dataset


def load_digits(seed: int) -> Dataset:
    """1797 images (N, 8, 8, 1), pixel / 16; 1437 train / 360 test, stratified, ``random_state=seed``."""
    try:  # scikit-learn is a host-side dependency, needed only for this dataset
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn, a host-side dependency: "
                          "pip install 'edge-qmul[host]'") from e
    d = sklearn_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[..., None]  # (N, 8, 8, 1) in [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return Dataset("digits", np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te,
                   num_classes=10, class_names=[str(c) for c in range(10)],
                   description=("scikit-learn digits: 8x8 grayscale handwritten digits 0-9 (UCI optdigits "
                                f"test set), pixels / 16 in [0, 1]; stratified 80/20 split, seed {seed}"),
                   input_range=(0.0, 1.0))
