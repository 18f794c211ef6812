"""What the sample importers return: a batch of int8 samples with labels and owners, ready for
``Store.add``, and the error they raise on bad input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SampleError(ValueError):
    """A samples file or image folder is wrong. The message names what and where."""


@dataclass
class SampleBatch:
    """N int8 samples quantized with the model's input parameters.

    ``labels`` are as the source gives them (``Store.add`` checks them); ``owners`` is one owner for
    all samples or one per sample; ``class_names`` is None when the source names no classes; ``what``
    is how error messages name the features (the .npz key, or "images").
    """

    x: np.ndarray
    labels: np.ndarray
    owners: str | list[str]
    class_names: list[str] | None
    what: str
