"""The Dataset record: a classification dataset split into train and test, as float32 features ready
to be quantized to a model's int8 input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
