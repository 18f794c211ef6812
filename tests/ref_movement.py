"""Float64 references of the data-movement ops (kernels/movement/), for tests/reference.py.

Written from the TFLite op definitions with plain numpy, independently of the engine's kernels:
each op runs on one sample at a time (the file's batch-1 shapes, as LiteRT runs them) and the
samples are joined along the output's batch axis. STRIDED_SLICE is numpy indexing built from the
TF spec (ellipsis, new axis, shrink, begin/end masks, offset).

The backward of every op is the same: the op applied to the *positions* of its input elements says
where each output element came from, and each output gradient is added back to its origin.
"""
from __future__ import annotations

import numpy as np

from reference import register
from edge_qmul.kernels.movement import batch_axis

KINDS = ("CONCATENATION", "STRIDED_SLICE", "EXPAND_DIMS", "SQUEEZE", "TRANSPOSE", "PACK", "UNPACK",
         "SPLIT", "SPLIT_V", "FILL", "TILE")
DATA_SLOTS = {"SPLIT": (1,), "SPLIT_V": (0,), "FILL": (), "STRIDED_SLICE": (0,), "EXPAND_DIMS": (0,),
              "SQUEEZE": (0,), "TRANSPOSE": (0,), "UNPACK": (0,), "TILE": (0,)}  # default: every slot


def _ints(model, op, slot: int) -> list[int]:
    return [int(v) for v in np.asarray(model.tensors[op.inputs[slot]].data).reshape(-1)]


def _slice_index(model, op, shape: tuple) -> tuple:
    """The numpy index of a STRIDED_SLICE spec: TF semantics, with LiteRT's reading of a shrunk
    axis (begin_mask selects its first element; an index out of range is clamped into it)."""
    begin, end, strides = (_ints(model, op, s) for s in (1, 2, 3))
    o = op.options
    bits = {k: [(o.get(k, 0) >> j) & 1 for j in range(len(begin))]
            for k in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask", "begin_mask", "end_mask")}
    kinds = ["ellipsis" if bits["ellipsis_mask"][j] else "new" if bits["new_axis_mask"][j] else "axis"
             for j in range(len(begin))]
    span = len(shape) - kinds.count("axis")  # input axes the ellipsis stands for
    index, axis = [], 0
    for j, (b, e, s) in enumerate(zip(begin, end, strides)):
        if kinds[j] == "ellipsis":
            index.append(Ellipsis)
            axis += span
            continue
        if kinds[j] == "new":
            index.append(np.newaxis)
            continue
        size = shape[axis]
        axis += 1
        if bits["shrink_axis_mask"][j]:
            b = 0 if bits["begin_mask"][j] else min(max(b + size if b < 0 else b, 0), size - 1)
            index.append(b)
            continue
        if o.get("offset", False):  # end is a length from begin (no ellipsis / new axes here)
            b = b + size if b < 0 else b
            e = b + e
        index.append(slice(None if bits["begin_mask"][j] else b, None if bits["end_mask"][j] else e, s))
    return tuple(index)


def _one_sample(model, op, xs: list) -> list:
    """The op on batch-1 operands (the file's shapes): a list of outputs."""
    kind, o = op.kind, op.options
    if kind == "CONCATENATION":
        return [np.concatenate(xs, axis=o.get("axis", 0))]
    if kind == "PACK":
        return [np.stack(xs, axis=o.get("axis", 0))]
    if kind == "UNPACK":
        x = xs[0]
        return [np.take(x, k, axis=o.get("axis", 0)) for k in range(x.shape[o.get("axis", 0)])]
    if kind == "SPLIT":
        return np.split(xs[1], o.get("num_splits", len(op.outputs)), axis=_ints(model, op, 0)[0])
    if kind == "SPLIT_V":
        x, sizes, axis = xs[0], _ints(model, op, 1), _ints(model, op, 2)[0]
        if -1 in sizes:
            sizes[sizes.index(-1)] = x.shape[axis] - (sum(sizes) + 1)
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    if kind == "STRIDED_SLICE":
        return [xs[0][_slice_index(model, op, xs[0].shape)]]
    if kind == "EXPAND_DIMS":
        return [np.expand_dims(xs[0], _ints(model, op, 1)[0])]
    if kind == "SQUEEZE":
        dims = o.get("squeeze_dims", [])
        return [np.squeeze(xs[0], axis=tuple(dims) if dims else None)]
    if kind == "TRANSPOSE":
        return [np.transpose(xs[0], _ints(model, op, 1))]
    if kind == "TILE":
        return [np.tile(xs[0], _ints(model, op, 1))]
    if kind == "FILL":
        return [np.full(_ints(model, op, 0), xs[1], dtype=np.float64)]
    raise NotImplementedError(kind)


def _data_slots(op) -> tuple:
    return DATA_SLOTS.get(op.kind, tuple(range(len(op.inputs))))


def _per_sample(model, op, xs: list) -> list:
    """Run the op sample by sample and join the samples along each output's batch axis."""
    slots = [s for s in _data_slots(op) if not model.tensors[op.inputs[s]].is_constant]
    if not slots:  # constants only (FILL): one batch-1 result
        return _one_sample(model, op, xs)
    n = max(np.asarray(xs[s]).shape[batch_axis(model, op.inputs[s])] for s in slots)
    per = []
    for i in range(n):
        args = list(xs)
        for s in slots:
            b = batch_axis(model, op.inputs[s])
            args[s] = np.take(xs[s], [i], axis=b)
        per.append(_one_sample(model, op, args))
    return [np.concatenate([p[k] for p in per], axis=batch_axis(model, t)) for k, t in enumerate(op.outputs)]


def forward(model, op, xs: list) -> list:
    """Float64 outputs of a movement op (``xs``: real values per input slot)."""
    return [np.asarray(y, dtype=np.float64) for y in _per_sample(model, op, [np.asarray(x) for x in xs])]


def backward(model, op, xs: list, ys: list, gs: list) -> list:
    """Per input slot, the sum of the output gradients that came from each element (None for
    constants and non-data slots)."""
    slots = [s for s in _data_slots(op) if not model.tensors[op.inputs[s]].is_constant]
    if not slots:  # constants only (FILL)
        return [None] * len(op.inputs)
    ids, offset = list(xs), 0
    for s in slots:  # positions, numbered across the data inputs
        size = np.asarray(xs[s]).size
        ids[s] = np.arange(offset, offset + size, dtype=np.float64).reshape(np.shape(xs[s]))
        offset += size
    for s in range(len(ids)):
        if s in _data_slots(op) and s not in slots:  # a constant operand: no position
            ids[s] = np.full(np.shape(xs[s]), -1.0)
    total = np.zeros(offset, np.float64)
    for where, g in zip(_per_sample(model, op, ids), gs):
        if g is None:
            continue
        where = np.asarray(where).reshape(-1).astype(np.int64)
        keep = where >= 0
        np.add.at(total, where[keep], np.asarray(g, np.float64).reshape(-1)[keep])
    grads: list = [None] * len(op.inputs)
    offset = 0
    for s in slots:
        size = np.asarray(xs[s]).size
        grads[s] = total[offset:offset + size].reshape(np.shape(xs[s]))
        offset += size
    return grads


for _kind in KINDS:
    register(_kind, forward, backward)
