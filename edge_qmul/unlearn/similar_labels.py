"""Similar labels for Q-MUL: which wrong class a forgotten sample is relabelled with.

Two sources (DESIGN.md §4):

- the original model itself, per sample: ``y_sim = argmax_{c != y} p_0(c | x)``
  (:func:`assign_from_model`);
- a class-to-class table computed on the host (:func:`build_table`, :class:`SimilarLabelTable`),
  shipped to the device as JSON: for each class c, its top-k most similar other classes with weights
  that sum to 1. The similarity of c to c' is the mean, over samples of true class c, of the
  original model's probability p(c' | x). The table gives hard labels (the most similar class, or one
  drawn by weight) or soft targets (:func:`assign_from_table`).

A table records the SHA-256 of the model it was computed with; :func:`check_table` refuses a table
made for another model (unless told otherwise) and always refuses one with another class count.

JSON layout (version 1)::

    {"version": 1, "class_names": ["0", "1", ...], "k": 3, "model_sha256": "<hex>" | null,
     "data": "<where the table's samples came from>",
     "similar": [[[8, 0.52], [1, 0.31], [9, 0.17]],   # class 0: [class, weight] pairs
                 ...]}
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..fsutil import atomic_write
from ..graph import Model

__all__ = ["TableError", "SimilarLabelTable", "TABLE_VERSION", "MODES", "build_table",
           "similarity_matrix", "confused_pairs", "assign_from_table", "assign_from_model",
           "check_table"]

TABLE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MODES = ("top1", "soft", "sample")
WEIGHT_TOLERANCE = 1e-6
_FIELDS = ("version", "class_names", "similar", "model_sha256", "data", "k")
_REQUIRED = ("version", "class_names", "similar", "k")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TableError(ValueError):
    """A similar-label table is malformed, or does not fit the model it is used with."""


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _validate(version, class_names, similar, model_sha256, data, k, where: str):
    """Check every field; return them normalized (ints, floats, lists). Raises TableError."""
    if not _is_int(version):
        raise TableError(f"{where}: 'version' must be an integer, got {version!r}")
    if int(version) not in SUPPORTED_VERSIONS:
        raise TableError(f"{where}: unknown version {version!r}; this edge_qmul reads version(s) "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
        raise TableError(f"{where}: 'class_names' must be a list of strings")
    num = len(class_names)
    if num < 2:
        raise TableError(f"{where}: 'class_names' must name at least 2 classes, got {num}")
    if len(set(class_names)) != num:
        dup = sorted({n for n in class_names if list(class_names).count(n) > 1})
        raise TableError(f"{where}: 'class_names' repeats {', '.join(map(repr, dup))}")
    if not _is_int(k):
        raise TableError(f"{where}: 'k' must be an integer, got {k!r}")
    if not 1 <= int(k) <= num - 1:
        raise TableError(f"{where}: 'k' must be in [1, {num - 1}] for {num} classes, got {k}")
    if model_sha256 is not None and not (isinstance(model_sha256, str) and _SHA256.match(model_sha256)):
        raise TableError(f"{where}: 'model_sha256' must be null or 64 lowercase hex digits, "
                         f"got {model_sha256!r}")
    if not isinstance(data, str):
        raise TableError(f"{where}: 'data' must be a string, got {type(data).__name__}")
    if not isinstance(similar, (list, tuple)):
        raise TableError(f"{where}: 'similar' must be a list with one entry per class")
    if len(similar) != num:
        raise TableError(f"{where}: 'similar' has {len(similar)} rows for {num} classes")
    rows = []
    for c, row in enumerate(similar):
        at = f"{where}: class {c} ({class_names[c]!r})"
        if not isinstance(row, (list, tuple)):
            raise TableError(f"{at}: expected a list of [class, weight] pairs, got {type(row).__name__}")
        if not 1 <= len(row) <= int(k):
            raise TableError(f"{at}: lists {len(row)} similar classes; expected 1 to k={k}")
        seen: set[int] = set()
        out_row = []
        for entry in row:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise TableError(f"{at}: entry {entry!r} is not a [class, weight] pair")
            other, w = entry
            if not _is_int(other):
                raise TableError(f"{at}: class index {other!r} is not an integer")
            other = int(other)
            if not 0 <= other < num:
                raise TableError(f"{at}: class index {other} is out of range [0, {num})")
            if other == c:
                raise TableError(f"{at}: lists itself as a similar class")
            if other in seen:
                raise TableError(f"{at}: lists class {other} twice")
            seen.add(other)
            if not _is_number(w) or not math.isfinite(float(w)) or float(w) <= 0:
                raise TableError(f"{at}: weight {w!r} of class {other} must be a positive number")
            out_row.append([other, float(w)])
        total = math.fsum(w for _, w in out_row)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise TableError(f"{at}: weights sum to {total:.9g}, not 1 (tolerance {WEIGHT_TOLERANCE})")
        rows.append(out_row)
    return int(version), list(class_names), rows, model_sha256, data, int(k)


@dataclass
class SimilarLabelTable:
    """Per class, its top-k most similar other classes as [class, weight] pairs (weights sum to 1).

    Validated on construction: an invalid table raises :class:`TableError` and never exists.
    """

    class_names: list[str]
    similar: list[list[list]]
    k: int
    model_sha256: str | None = None
    data: str = ""
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        self._set(_validate(self.version, self.class_names, self.similar, self.model_sha256,
                            self.data, self.k, "similar-label table"))

    def _set(self, fields) -> None:
        (self.version, self.class_names, self.similar, self.model_sha256, self.data,
         self.k) = fields

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def row(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Class ``c``'s similar classes (int64) and weights (float64), in table order."""
        r = self.similar[int(c)]
        return (np.array([o for o, _ in r], dtype=np.int64), np.array([w for _, w in r], dtype=np.float64))

    def most_similar(self) -> np.ndarray:
        """(C,) int64: for each class, its highest-weight similar class (ties: the first listed)."""
        out = np.empty(self.num_classes, dtype=np.int64)
        for c in range(self.num_classes):
            others, w = self.row(c)
            out[c] = others[int(np.argmax(w))]
        return out

    def soft_matrix(self) -> np.ndarray:
        """(C, C) float64: row c holds class c's weights, 0 elsewhere (and on the diagonal)."""
        m = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)
        for c in range(self.num_classes):
            others, w = self.row(c)
            m[c, others] = w
        return m

    # --- serialization ---
    def to_dict(self) -> dict:
        return {"version": self.version, "class_names": list(self.class_names),
                "similar": [[[o, w] for o, w in row] for row in self.similar],
                "model_sha256": self.model_sha256, "data": self.data, "k": self.k}

    @classmethod
    def from_dict(cls, d: Any, source: str = "similar-label table") -> "SimilarLabelTable":
        """Build from a parsed JSON object; any problem is a TableError naming ``source`` and the
        field or class."""
        if not isinstance(d, dict):
            raise TableError(f"{source}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise TableError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")
        missing = [f for f in _REQUIRED if f not in d]
        if missing:
            raise TableError(f"{source}: missing field(s) {', '.join(map(repr, missing))}")
        fields = _validate(d["version"], d["class_names"], d["similar"], d.get("model_sha256"),
                           d.get("data", ""), d["k"], source)
        table = cls.__new__(cls)
        table._set(fields)
        return table

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (sorted keys, indented), atomically."""
        _validate(self.version, self.class_names, self.similar, self.model_sha256, self.data,
                  self.k, "similar-label table")  # the fields may have been edited since
        return atomic_write(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SimilarLabelTable":
        """Read and validate a table written by :meth:`save` (or by a host tool)."""
        path = Path(path)
        raw = path.read_bytes()
        try:
            d = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            # ValueError: bad UTF-8 or JSON, and also an integer of over 4,300 digits (Python's
            # int-from-string limit); RecursionError: arrays nested thousands deep
            raise TableError(f"{path}: not a JSON similar-label table: {type(e).__name__}: "
                             f"{str(e)[:200]}") from None
        return cls.from_dict(d, source=str(path))


# --- building a table ------------------------------------------------------------------------------

def similarity_matrix(model: Model, x_int8: np.ndarray, y: np.ndarray,
                      class_names: list[str] | None = None) -> np.ndarray:
    """(C, C) float64: row c is the mean of p(. | x) over samples of true class c (diagonal kept).

    A class without samples is a TableError naming it.
    """
    p = metrics.predict_proba(model, x_int8)
    num = p.shape[1]
    y = metrics.check_labels(y, len(p), num, "similarity_matrix")
    counts = np.bincount(y, minlength=num)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        names = class_names if class_names is not None and len(class_names) == num else None
        listed = ", ".join(f"{c} ({names[c]!r})" if names else str(c) for c in empty)
        raise TableError(f"no samples of class(es) {listed}: every class needs samples to build a "
                         f"similar-label table")
    s = np.zeros((num, num), dtype=np.float64)
    np.add.at(s, y, p)
    return s / counts[:, None]


def build_table(model: Model, x_int8: np.ndarray, y: np.ndarray, k: int = 3,
                class_names: list[str] | None = None, data: str = "") -> SimilarLabelTable:
    """Similar-label table from the model's probabilities on (x_int8, y): for class c, its k
    classes c' != c with the highest mean p(c' | x) over samples of class c, weights normalized.

    The table records the model's SHA-256 and ``data`` (a description of the samples).
    """
    num = model.num_classes
    if class_names is None:
        class_names = [str(c) for c in range(num)]
    class_names = list(class_names)
    if len(class_names) != num:
        raise TableError(f"build_table: {len(class_names)} class names for a model with {num} classes")
    if not _is_int(k) or not 1 <= int(k) <= num - 1:
        raise TableError(f"build_table: k must be an integer in [1, {num - 1}], got {k!r}")
    s = similarity_matrix(model, x_int8, y, class_names)
    rows = []
    for c in range(num):
        v = s[c].copy()
        v[c] = -np.inf
        order = np.argsort(-v, kind="stable")[:int(k)]
        order = order[v[order] > 0]  # softmax underflow could leave exact zeros; weights must be > 0
        if order.size == 0:
            raise TableError(f"build_table: class {c} ({class_names[c]!r}) puts no probability on "
                             f"any other class")
        w = v[order] / v[order].sum()
        rows.append([[int(o), float(x)] for o, x in zip(order, w)])
    return SimilarLabelTable(class_names=class_names, similar=rows, k=int(k),
                             model_sha256=metrics.model_sha256(model), data=str(data))


def confused_pairs(table_or_probs: "SimilarLabelTable | np.ndarray", n: int = 10
                   ) -> list[tuple[int, int, float]]:
    """The ``n`` most confused (class, similar class, score) pairs, highest score first.

    Takes a :class:`SimilarLabelTable` (score = table weight) or a square (C, C) class-similarity
    matrix such as :func:`similarity_matrix` (score = entry; the diagonal is ignored). Ties are
    ordered by class, then similar class.
    """
    if isinstance(table_or_probs, SimilarLabelTable):
        entries = [(c, int(o), float(w)) for c, row in enumerate(table_or_probs.similar) for o, w in row]
    else:
        m = np.asarray(table_or_probs, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confused_pairs: expected a SimilarLabelTable or a square (C, C) matrix, "
                             f"got shape {m.shape}")
        entries = [(a, b, float(m[a, b])) for a in range(m.shape[0]) for b in range(m.shape[1]) if a != b]
    if not _is_int(n) or n < 0:
        raise ValueError(f"confused_pairs: n must be a non-negative integer, got {n!r}")
    entries.sort(key=lambda e: (-e[2], e[0], e[1]))
    return entries[:int(n)]


# --- assigning similar labels ----------------------------------------------------------------------

def assign_from_table(table: SimilarLabelTable, labels: np.ndarray, mode: str = "top1",
                      seed: int = 0) -> np.ndarray:
    """Similar labels for samples of true class ``labels`` from ``table``.

    ``top1``: each class's highest-weight similar class (int64 (N,)); ``sample``: one similar class
    drawn by weight per sample with ``np.random.default_rng(seed)`` (int64 (N,)); ``soft``: the
    table row as a float64 (N, C) target distribution (0 on the true class, rows sum to 1).
    """
    if mode not in MODES:
        raise ValueError(f"assign_from_table: unknown mode {mode!r}; known: {', '.join(MODES)}")
    num = table.num_classes
    y = metrics.check_labels(labels, None, num, "assign_from_table")
    if mode == "top1":
        return table.most_similar()[y]
    if mode == "soft":
        m = table.soft_matrix()
        m /= m.sum(axis=1, keepdims=True)  # exact row sums (the table allows 1e-6)
        return m[y]
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    for c in range(num):  # in class order, so the draw depends only on seed and labels
        idx = np.flatnonzero(y == c)
        if idx.size:
            others, w = table.row(c)
            out[idx] = rng.choice(others, size=idx.size, p=w / w.sum())
    return out


def assign_from_model(model: Model, x_int8: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample, the original model's most probable wrong class: argmax_{c != y} p(c | x)
    (int64 (N,); ties go to the lower class)."""
    p = metrics.predict_proba(model, x_int8)
    if p.shape[1] < 2:
        raise ValueError("assign_from_model: the model has fewer than 2 classes")
    y = metrics.check_labels(y, len(p), p.shape[1], "assign_from_model")
    p[np.arange(len(y)), y] = -np.inf
    return np.argmax(p, axis=1).astype(np.int64)


def check_table(table: SimilarLabelTable, model_sha256: str | None, num_classes: int,
                allow_model_mismatch: bool = False) -> None:
    """Refuse a table that does not fit the model: another class count always; another (or no
    recorded) model hash unless ``allow_model_mismatch``."""
    if table.num_classes != int(num_classes):
        raise TableError(f"similar-label table has {table.num_classes} classes but the model has "
                         f"{num_classes}")
    if allow_model_mismatch:
        return
    if table.model_sha256 is None:
        raise TableError("similar-label table records no model hash, so it cannot be checked against "
                         "the model (allow a model mismatch to use it anyway)")
    if model_sha256 is None or table.model_sha256 != model_sha256:
        raise TableError(f"similar-label table was built for model {table.model_sha256[:12]}..., "
                         f"not for this model {str(model_sha256)[:12]}... "
                         f"(allow a model mismatch to use it anyway)")
