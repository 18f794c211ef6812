"""Shape arithmetic folded at load, for the model's fixed input shape.

Converters emit small integer subgraphs that compute shapes at run time: Keras' Flatten (SHAPE ->
STRIDED_SLICE -> PACK -> RESHAPE), Keras 3's UpSampling2D (SHAPE -> STRIDED_SLICE -> MUL ->
CONCATENATION -> RESIZE size), an LSTM's initial state (SHAPE -> ... -> PACK -> FILL dims). The
engine runs the file's shapes (batch along axis 0), so each such value is a constant: every op
whose inputs are all known integer values and whose outputs are integer, unquantized tensors is
evaluated here in numpy, whatever op it is (of those below), and dropped from the graph. Ops that
read a folded value read it as a constant; RESHAPE takes its target from its output tensor.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError


def _slice_1d(v, begin, end, strides, o: dict) -> np.ndarray:
    if v.ndim != 1 or o.get("ellipsis_mask") or o.get("new_axis_mask"):
        raise ValueError("only 1-D shape vectors without ellipsis or new-axis masks are folded")
    b = None if o.get("begin_mask", 0) & 1 else int(begin[0])
    e = None if o.get("end_mask", 0) & 1 else int(end[0])
    if o.get("shrink_axis_mask", 0) & 1:
        return np.asarray(v[int(begin[0])])
    return v[b:e:int(strides[0])]


def _squeeze(v, o: dict) -> np.ndarray:
    dims = o.get("squeeze_dims") or None
    return np.squeeze(v, axis=tuple(dims) if dims else None)


# op -> numpy evaluation (op options, input values, output tensor) -> value
FOLDERS = {
    "STRIDED_SLICE": lambda o, a, out: _slice_1d(*a[:4], o),
    "PACK": lambda o, a, out: np.stack(a, axis=o.get("axis", 0)),
    "CONCATENATION": lambda o, a, out: np.concatenate([np.atleast_1d(v) for v in a], axis=o.get("axis", 0)),
    "FILL": lambda o, a, out: np.full(tuple(int(d) for d in np.ravel(a[0])), a[1]),
    "ADD": lambda o, a, out: a[0] + a[1],
    "SUB": lambda o, a, out: a[0] - a[1],
    "MUL": lambda o, a, out: a[0] * a[1],
    "FLOOR_DIV": lambda o, a, out: np.floor_divide(a[0], a[1]),
    "MAXIMUM": lambda o, a, out: np.maximum(a[0], a[1]),
    "MINIMUM": lambda o, a, out: np.minimum(a[0], a[1]),
    "GATHER": lambda o, a, out: np.take(a[0], a[1], axis=o.get("axis", 0)),
    "EXPAND_DIMS": lambda o, a, out: np.expand_dims(a[0], int(np.ravel(a[1])[0])),
    "SQUEEZE": lambda o, a, out: _squeeze(a[0], o),
    "RESHAPE": lambda o, a, out: np.reshape(a[0], out.shape),
    "CAST": lambda o, a, out: a[0],
    "REDUCE_PROD": lambda o, a, out: np.prod(a[0], axis=tuple(int(v) for v in np.ravel(a[1]))),
    "SLICE": lambda o, a, out: a[0][tuple(slice(int(b), None if int(s) < 0 else int(b) + int(s))
                                          for b, s in zip(np.ravel(a[1]), np.ravel(a[2])))],
}
INTEGER = (np.dtype(np.int32), np.dtype(np.int64))


def _reshape_target(in_shape: tuple, shape: np.ndarray, where: str) -> tuple:
    """RESHAPE's output shape for a static input shape: one -1 takes what is left."""
    dims = [int(d) for d in np.ravel(shape)]
    size = int(np.prod(in_shape))
    known = int(np.prod([d for d in dims if d != -1]))
    if dims.count(-1) > 1 or (dims.count(-1) == 1 and (known == 0 or size % known)) \
            or (dims.count(-1) == 0 and known != size) or any(d < -1 for d in dims):
        raise ModelError(f"{where}: cannot reshape {list(in_shape)} to {dims}")
    return tuple(size // known if d == -1 else d for d in dims)


def fold_constants(tensors: list, ops: list, outputs: list[int]) -> list:
    """Evaluate the shape arithmetic of ``ops`` (see the module docstring); returns the ops kept."""
    value: dict[int, np.ndarray] = {i: t.data for i, t in enumerate(tensors)
                                    if t.is_constant and np.dtype(t.dtype) in INTEGER}
    folded: set[int] = set()
    kept = []
    for op in ops:
        where = f"op {op.kind} (index {op.index})"
        outs = [tensors[t] for t in op.outputs]
        integer_out = all(np.dtype(t.dtype) in INTEGER and t.quant is None for t in outs)
        if op.kind == "SHAPE" or (op.kind in FOLDERS and integer_out and len(op.outputs) == 1
                                  and all(i in value for i in op.inputs if i >= 0)):
            if any(t in outputs for t in op.outputs):
                raise ModelError(f"{where}: a shape computation cannot be a model output")
            if op.kind == "SHAPE":
                v = np.array(tensors[op.inputs[0]].shape)
            else:
                try:
                    v = FOLDERS[op.kind](op.options, [value[i] for i in op.inputs if i >= 0], outs[0])
                except (ValueError, IndexError, TypeError) as e:
                    raise ModelError(f"{where}: cannot fold this shape computation ({e})") from None
            v = np.asarray(v).astype(outs[0].dtype)
            if outs[0].shape and v.size == int(np.prod(outs[0].shape)):
                v = v.reshape(outs[0].shape)
            value[op.outputs[0]] = v
            folded.add(op.outputs[0])
            continue
        if op.kind == "RESHAPE" and len(op.inputs) > 1:
            shape_in = op.inputs[1]
            if shape_in >= 0:
                if shape_in not in value:
                    raise ModelError(f"{where}: its shape is computed at run time from data")
                # the converter can store a stale static shape on the output (Keras 3's
                # UpSampling2D: [1, 1, 16, 64] for a computed [1, 16, 16, 64]); LiteRT uses the
                # computed one, and so does the engine
                out = tensors[op.outputs[0]]
                target = _reshape_target(tensors[op.inputs[0]].shape, value[shape_in], where)
                if target != tuple(out.shape):
                    out.shape = target
            op.inputs = op.inputs[:1]
        for i in set(op.inputs) & folded:
            t = tensors[i]
            v = np.asarray(value[i]).astype(t.dtype)
            if v.size != int(np.prod(t.shape)):
                raise ModelError(f"{where}: folded input {t.name!r} has {v.size} values for shape {list(t.shape)}")
            t.data = v.reshape(t.shape)
        kept.append(op)
    return kept
