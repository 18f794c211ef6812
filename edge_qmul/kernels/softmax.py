"""SOFTMAX int8 -> int8."""
from __future__ import annotations

from ..errors import ModelError
from .common import where


def prepare(op, model):
    raise ModelError(f"{where(op)}: SOFTMAX is not implemented yet")


def forward(p, x):
    raise NotImplementedError


def macs(op, model) -> int:
    return 0
