"""Data movement: CONCATENATION, STRIDED_SLICE, EXPAND_DIMS, SQUEEZE, TRANSPOSE, PACK, UNPACK, SPLIT,
SPLIT_V, FILL, TILE. Values are copied, never computed, so the outputs equal LiteRT's bit for bit.

LiteRT's int8 CONCATENATION, PACK, UNPACK and FILL refuse inputs whose scale or zero point differ
from the output's (concatenation.cc: "no re-scaling needed for Int8"; its fused activation must be
NONE), so no op here requantizes: every op checks that its data tensors share one quantization.

Arrays are batch-first (axis 0 is the batch; the file's tensors have batch 1) and an op applies the
file's axes literally to them. That also covers the one place Keras moves the batch axis: an
unrolled RNN transposes (batch, time, features) to (time, batch, features) and UNPACKs the time
axis (the pieces are batch-first again), or PACKs per-step outputs along axis 0 and transposes back.
``batch_axis`` follows where the batch sits; a tensor whose batch is not at axis 0 may only be read
by TRANSPOSE, UNPACK or PACK, and must not be a model output (ModelError otherwise).

FILL's output does not depend on the input: it is the file's shape (batch 1), and the ops reading
it broadcast it over the batch. Constant operands of CONCATENATION and PACK broadcast likewise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..grad import Error, from_accumulator, rounding_shift_int16
from .common import where
from .contract import Kernel

DTYPES = (np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.float32))
# Ops that apply their axes literally whatever the batch position (see the module docstring).
BATCH_MOVERS = ("TRANSPOSE", "UNPACK", "PACK")


# --- shared checks -------------------------------------------------------------------------------

def _data(model, op, t: int, what: str):
    """A data tensor of the op (input or output): a supported dtype, int8 with quantization."""
    if t < 0:
        raise ModelError(f"{where(op)}: {what} is missing")
    x = model.tensors[t]
    if np.dtype(x.dtype) not in DTYPES:
        raise ModelError(f"{where(op)}: {what} ({x.name!r}) is {np.dtype(x.dtype).name}; "
                         "int8, int32 or float32 expected")
    if np.dtype(x.dtype) == np.int8 and x.quant is None:
        raise ModelError(f"{where(op)}: int8 tensor {x.name!r} has no quantization parameters")
    return x


def _same(op, x, y, what: str) -> None:
    """Same dtype and quantization: the op copies values, it cannot rescale them."""
    if np.dtype(x.dtype) != np.dtype(y.dtype):
        raise ModelError(f"{where(op)}: {what} {y.name!r} is {np.dtype(y.dtype).name}, "
                         f"input {x.name!r} is {np.dtype(x.dtype).name}")
    if x.quant != y.quant:
        raise ModelError(f"{where(op)}: {what} {y.name!r} must share the quantization of {x.name!r} "
                         f"({y.quant} vs {x.quant}); LiteRT copies values without rescaling")


def _const_ints(model, op, slot: int, what: str, count: int | None = None) -> list[int]:
    """A constant int32/int64 input as a list of Python ints (a scalar gives one entry)."""
    if slot >= len(op.inputs) or op.inputs[slot] < 0:
        raise ModelError(f"{where(op)}: {what} (input {slot}) is missing")
    t = model.tensors[op.inputs[slot]]
    if not t.is_constant:
        raise ModelError(f"{where(op)}: {what} (input {slot}, {t.name!r}) must be a constant")
    if np.dtype(t.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ModelError(f"{where(op)}: {what} ({t.name!r}) is {np.dtype(t.dtype).name}, int32 or int64 expected")
    if len(t.shape) > 1:
        raise ModelError(f"{where(op)}: {what} ({t.name!r}) must be a scalar or a vector")
    values = [int(v) for v in np.asarray(t.data).reshape(-1)]
    if count is not None and len(values) != count:
        raise ModelError(f"{where(op)}: {what} has {len(values)} entries, expected {count}")
    return values


def _axis(op, axis: int, rank: int, what: str = "axis") -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise ModelError(f"{where(op)}: {what} {axis} is out of range for rank {rank}")
    return a


def _check_shape(op, out, shape) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ModelError(f"{where(op)}: output {out.name!r} is declared {list(out.shape)}, "
                         f"the op computes {list(shape)}")


def _not_batch(op, axis: int, what: str = "axis") -> None:
    if axis == 0:
        raise ModelError(f"{where(op)}: {what} 0 is the batch axis; the engine runs samples along it")


def batch_axis(model, t: int) -> int | None:
    """Where the batch lies in the engine's array of tensor ``t``: 0, or where a TRANSPOSE, PACK or
    UNPACK moved it; None for a constant (no batch)."""
    if model.tensors[t].is_constant:
        return None
    producer = next((op for op in model.ops if t in op.outputs), None)
    if producer is None or producer.kind not in BATCH_MOVERS:
        return 0
    ins = [i for i in producer.inputs if i >= 0]
    if producer.kind == "TRANSPOSE":
        b = batch_axis(model, ins[0])
        if b is None:
            return None
        perm = [p % len(model.tensors[ins[0]].shape) for p in np.asarray(model.tensors[ins[1]].data).reshape(-1)]
        return perm.index(b)
    if producer.kind == "UNPACK":
        b = batch_axis(model, ins[0])
        if b is None:
            return None
        axis = producer.options.get("axis", 0) % len(model.tensors[ins[0]].shape)
        return b - (axis < b)
    bs = [b for b in (batch_axis(model, i) for i in ins) if b is not None]  # PACK
    if not bs:
        return None
    axis = producer.options.get("axis", 0) % (len(model.tensors[ins[0]].shape) + 1)
    return bs[0] + (axis <= bs[0])


def _check_batch_move(op, model, b_out: int | None, t: int | None = None) -> None:
    """Output ``t`` (default: output 0) holds the batch at ``b_out``: unless that is 0 (or None, no
    batch), only a batch mover may read it (module docstring)."""
    if b_out in (None, 0):
        return
    t = op.outputs[0] if t is None else t
    if model.tensors[t].shape[b_out] != 1:
        raise ModelError(f"{where(op)}: moves the batch axis to {b_out}, where the file's dimension is "
                         f"{model.tensors[t].shape[b_out]}, not 1")
    if t in model.outputs:
        raise ModelError(f"{where(op)}: moves the batch axis to {b_out}; it cannot be a model output")
    for c in model.ops:
        if t in c.inputs and c.kind not in BATCH_MOVERS:
            raise ModelError(f"{where(op)}: moves the batch axis to {b_out}, but {where(c)} reads it; "
                             f"only {', '.join(BATCH_MOVERS)} can read a tensor whose batch is not axis 0")


def _input_batch(op, model, slots) -> int | None:
    """The batch axis shared by the op's data inputs (None if they are all constants)."""
    bs = {batch_axis(model, op.inputs[s]) for s in slots} - {None}
    if len(bs) > 1:
        raise ModelError(f"{where(op)}: inputs hold the batch at different axes {sorted(bs)}")
    return bs.pop() if bs else None


def _broadcast_batch(xs: list, axis: int) -> list:
    """Stretch batch-1 operands (constants, FILL results) to the batch of the others."""
    n = max(x.shape[axis] for x in xs)
    out = []
    for x in xs:
        if x.shape[axis] != n:
            shape = list(x.shape)
            shape[axis] = n
            x = np.broadcast_to(x, shape)
        out.append(x)
    return out


def _zeros_at(model, t: int, n: int, b: int) -> np.ndarray:
    """A zero int16 error of tensor ``t`` with ``n`` samples along batch axis ``b``."""
    shape = list(model.tensors[t].shape)
    shape[b] = n
    return np.zeros(shape, np.int16)


def _common_scale(errors: list[Error]) -> tuple[list[np.ndarray], float]:
    """Errors brought to the largest of their scales: a rounding right shift where the ratio is a
    power of two (the usual case: scales are powers of two times a shared factor), else a Q15
    multiplier (Q30, int64 product) with rounding. Ties round toward +inf, as in grad.py."""
    top = max(e.scale for e in errors)
    out = []
    for e in errors:
        v = np.ascontiguousarray(e.values)
        ratio = e.scale / top
        if ratio == 1.0:
            out.append(v)
            continue
        mant, exp = np.frexp(ratio)
        if mant == 0.5:  # ratio = 2^(exp - 1): a rounding shift
            r = 1 - int(exp)
            out.append(np.zeros_like(v) if r > 16 else rounding_shift_int16(v.reshape(-1), r).reshape(v.shape))
        else:
            m = int(round(ratio * (1 << 30)))
            out.append(((v.astype(np.int64) * m + (1 << 29)) >> 30).astype(np.int16))
    return out, top


def _wanted(ctx, slot: int) -> bool:
    return slot < len(ctx.wants) and bool(ctx.wants[slot]) and ctx.op.inputs[slot] >= 0 \
        and not ctx.model.tensors[ctx.op.inputs[slot]].is_constant


def _data_quant(slot: int):
    """fixed_quant for an op whose data input is not input 0 (SPLIT, FILL): copy that input's."""
    def fixed(op, model):
        return model.tensors[op.inputs[slot]].quant
    return fixed


# --- CONCATENATION -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConcatParams:
    axis: int
    sizes: tuple   # extent of each input along the axis
    batch: int     # the batch axis of the data inputs (0 unless all inputs are constants)


def prepare_concatenation(op, model) -> ConcatParams:
    if not op.inputs:
        raise ModelError(f"{where(op)}: no inputs")
    out = _data(model, op, op.outputs[0], "output")
    xs = [_data(model, op, t, f"input {i}") for i, t in enumerate(op.inputs)]
    if op.options.get("activation", "NONE") != "NONE":
        raise ModelError(f"{where(op)}: fused activation {op.options['activation']} "
                         "(LiteRT's CONCATENATION accepts NONE only)")
    for i, x in enumerate(xs):
        _same(op, out, x, f"input {i}")
    rank = len(xs[0].shape)
    if rank == 0:
        raise ModelError(f"{where(op)}: scalars cannot be concatenated along a batch")
    axis = _axis(op, int(op.options.get("axis", 0)), rank)
    _not_batch(op, axis)
    for i, x in enumerate(xs):
        if len(x.shape) != rank or any(a != b for d, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if d != axis):
            raise ModelError(f"{where(op)}: input {i} {list(x.shape)} does not fit input 0 "
                             f"{list(xs[0].shape)} outside axis {axis}")
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    _check_shape(op, out, shape)
    b = _input_batch(op, model, range(len(op.inputs)))
    if b not in (None, 0):
        raise ModelError(f"{where(op)}: an input holds the batch at axis {b}")
    return ConcatParams(axis, tuple(x.shape[axis] for x in xs), 0)


def forward_concatenation(p: ConcatParams, *xs) -> np.ndarray:
    return np.concatenate(_broadcast_batch(list(xs), p.batch), axis=p.axis)


def backward_concatenation(p: ConcatParams, ctx) -> list:
    """Each input gets its slice of the error, at the error's scale (the copy has gradient 1)."""
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is None:
        return grads
    start = 0
    for i, size in enumerate(p.sizes):
        if _wanted(ctx, i):
            index = [slice(None)] * e.values.ndim
            index[p.axis] = slice(start, start + size)
            grads[i] = Error(np.ascontiguousarray(e.values[tuple(index)]), e.scale)
        start += size
    return grads


# --- STRIDED_SLICE -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceParams:
    eff_shape: tuple   # input shape with the new axes inserted (batch axis included)
    index: tuple       # per effective axis after the batch: a slice
    out_shape: tuple   # without the batch axis


def _strided_slice_spec(in_shape, begin, end, strides, o: dict):
    """LiteRT's BuildStridedSliceParams (strided_slice.cc): ellipsis and new axes resolved into
    per-axis starts, stops, strides and begin/end/shrink masks over the effective shape."""
    ell, new = int(o.get("ellipsis_mask", 0)), int(o.get("new_axis_mask", 0))
    bm, em, sm = int(o.get("begin_mask", 0)), int(o.get("end_mask", 0)), int(o.get("shrink_axis_mask", 0))
    count, dims = len(begin), len(in_shape)
    num_add = sum(1 for i in range(count) if not (ell >> i) & 1 and (new >> i) & 1)
    eff = dims + num_add
    eff_ell = eff_new = 0
    ell_start, expanded, i = eff, 0, 0
    while i < eff:
        if (ell >> i) & 1:
            ell_start = i
            ell_end = max(i + 1, min(i + 1 + num_add + dims - count, eff))
            expanded = ell_end - ell_start - 1
            while i < ell_end:
                eff_ell |= 1 << i
                i += 1
            continue
        if (new >> (i - expanded)) & 1:
            eff_new |= 1 << i
        i += 1
    start, stop, stride = [0] * eff, [0] * eff, [1] * eff
    b_mask = e_mask = s_mask = 0
    shape = [0] * eff
    added_ell = added_axes = 0
    for i in range(eff):
        if (eff_ell >> i) & 1:
            added_ell = max(0, i - ell_start)
            b_mask, e_mask = b_mask | 1 << i, e_mask | 1 << i
            shape[i] = in_shape[i - added_axes]
        elif (eff_new >> i) & 1:
            stop[i] = 1
            shape[i] = 1
            added_axes += 1
        elif i >= count + expanded:
            b_mask, e_mask = b_mask | 1 << i, e_mask | 1 << i
            shape[i] = in_shape[i - added_axes]
        else:
            k = i - added_ell
            start[i], stop[i], stride[i] = begin[k], end[k], strides[k]
            b_mask |= ((bm >> k) & 1) << i
            e_mask |= ((em >> k) & 1) << i
            s_mask |= ((sm >> k) & 1) << i
            shape[i] = in_shape[i - added_axes]
    return shape, start, stop, stride, b_mask, e_mask, s_mask, eff_new


def _clamp(v: int, lo: int, hi: int) -> int:
    return hi if v > hi else lo if v < lo else v


def _axis_range(size, start, stop, stride, begin_bit, end_bit, shrink, offset):
    """reference_ops StartForAxis / EndForAxis: the indices LiteRT's loop visits along one axis,
    and the extent ResizeOutputTensor declares for it (None for a shrunk axis)."""
    s = start + size if start < 0 else start
    s = _clamp(s, 0, size) if stride > 0 else _clamp(s, -1, size - 1)
    if begin_bit:
        s = 0 if stride > 0 else size - 1
    if shrink:
        e = s if s >= size else s + 1
    else:
        e = stop + s if offset else stop
        e = e + size if e < 0 else e
        e = _clamp(e, 0, size) if stride > 0 else _clamp(e, -1, size - 1)
        if end_bit:
            e = size if stride > 0 else -1
    visited = range(s, e, stride)
    if shrink:
        return visited, None
    extent = (stop if offset else e - s)
    if (extent < 0) != (stride < 0):
        extent = 0
    elif stride < 0:
        extent = int((extent + 1) / stride) + 1  # C division truncates toward zero
    else:
        extent = 0 if extent == 0 else (extent - 1) // stride + 1
    return visited, extent


def _as_slice(r: range) -> slice:
    if len(r) == 0:
        return slice(0, 0)
    stop = r[-1] + r.step
    return slice(r[0], None if stop < 0 else stop, r.step)


def prepare_strided_slice(op, model) -> SliceParams:
    x = _data(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, x, out, "output")
    if len(op.inputs) != 4:
        raise ModelError(f"{where(op)}: takes input, begin, end and strides ({len(op.inputs)} inputs)")
    begin = _const_ints(model, op, 1, "begin")
    end = _const_ints(model, op, 2, "end", len(begin))
    strides = _const_ints(model, op, 3, "strides", len(begin))
    if not 0 < len(begin) <= 31:
        raise ModelError(f"{where(op)}: {len(begin)} slice indices (LiteRT takes 1 to 31)")
    if any(s == 0 or s == -(2**31) for s in strides):
        raise ModelError(f"{where(op)}: strides {strides} must be non-zero")
    o = op.options
    offset = bool(o.get("offset", False))
    if offset and (o.get("ellipsis_mask", 0) or o.get("new_axis_mask", 0) or len(begin) != len(x.shape)):
        # ResizeOutputTensor reads end[] by effective axis: only a plain spec has a defined shape.
        raise ModelError(f"{where(op)}: offset slices need one index per axis and no ellipsis/new axes")
    ell, new_bits = int(o.get("ellipsis_mask", 0)), int(o.get("new_axis_mask", 0))
    if bin(ell & ((1 << len(begin)) - 1)).count("1") > 1:
        raise ModelError(f"{where(op)}: more than one ellipsis in ellipsis_mask {ell}")
    added = sum(1 for i in range(len(begin)) if (new_bits >> i) & 1 and not (ell >> i) & 1)
    if len(begin) > len(x.shape) + added:
        # LiteRT would ignore the extra indices (or stretch an empty ellipsis over an axis)
        raise ModelError(f"{where(op)}: {len(begin)} slice indices for rank {len(x.shape)} "
                         f"with {added} new axes")
    shape, start, stop, stride, bm, em, sm, new = _strided_slice_spec(tuple(x.shape), begin, end, strides, o)
    visited, declared = [], []
    for i, size in enumerate(shape):
        r, extent = _axis_range(size, start[i], stop[i], stride[i], (bm >> i) & 1, (em >> i) & 1,
                                (sm >> i) & 1, offset)
        if extent is None and len(r) != 1:
            raise ModelError(f"{where(op)}: shrink axis {i} index {start[i]} is outside 0..{size - 1}")
        if extent is not None and extent != len(r):
            raise ModelError(f"{where(op)}: axis {i} is declared {extent} long but the slice visits "
                             f"{len(r)} elements (LiteRT would leave the rest unwritten)")
        visited.append(r)
        if extent is not None:
            declared.append(extent)
    _check_shape(op, out, declared)
    # Axis 0 must stay the whole batch axis: not a new axis, not shrunk, every element once.
    if (new & 1) or (sm & 1) or len(visited[0]) != shape[0] or (shape[0] > 1 and visited[0].step != 1):
        raise ModelError(f"{where(op)}: slices the batch axis (begin {begin[0]}, end {end[0]}, "
                         f"stride {strides[0]}, masks {dict(o)})")
    return SliceParams(tuple(shape), tuple(_as_slice(r) for r in visited[1:]), tuple(out.shape[1:]))


def forward_strided_slice(p: SliceParams, x: np.ndarray, *_indices) -> np.ndarray:
    v = x.reshape((x.shape[0],) + p.eff_shape[1:])[(slice(None),) + p.index]
    return np.ascontiguousarray(v).reshape((x.shape[0],) + p.out_shape)


def backward_strided_slice(p: SliceParams, ctx) -> list:
    """The error goes back where the slice read, zeros elsewhere."""
    e = ctx.error(0)
    if e is None or not _wanted(ctx, 0):
        return [None] * 4
    n = e.values.shape[0]
    g = np.zeros((n,) + p.eff_shape[1:], np.int16)
    view = g[(slice(None),) + p.index]
    view[...] = e.values.reshape(view.shape)
    x_shape = ctx.model.tensors[ctx.op.inputs[0]].shape
    return [Error(g.reshape((n,) + tuple(x_shape[1:])), e.scale), None, None, None]


# --- EXPAND_DIMS, SQUEEZE: reshapes that keep the batch axis first --------------------------------

@dataclass(frozen=True)
class ReshapeParams:
    out_shape: tuple  # without the batch axis
    in_shape: tuple   # without the batch axis


def prepare_expand_dims(op, model) -> ReshapeParams:
    x = _data(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, x, out, "output")
    (axis,) = _const_ints(model, op, 1, "axis", 1)
    rank = len(x.shape)
    a = _axis(op, axis, rank + 1)
    _not_batch(op, a, "new axis")
    shape = list(x.shape)
    shape.insert(a, 1)
    _check_shape(op, out, shape)
    return ReshapeParams(tuple(out.shape[1:]), tuple(x.shape[1:]))


def prepare_squeeze(op, model) -> ReshapeParams:
    x = _data(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, x, out, "output")
    rank = len(x.shape)
    dims = [int(d) for d in op.options.get("squeeze_dims", [])]
    # No squeeze_dims: every size-1 axis, the batch axis of a batch-1 file included.
    axes = {_axis(op, d, rank, "squeeze dim") for d in dims} if dims else \
        {i for i, s in enumerate(x.shape) if s == 1}
    for a in sorted(axes):
        _not_batch(op, a, "squeeze dim")
        if x.shape[a] != 1:
            raise ModelError(f"{where(op)}: cannot squeeze axis {a} of size {x.shape[a]}")
    _check_shape(op, out, [s for i, s in enumerate(x.shape) if i not in axes])
    return ReshapeParams(tuple(out.shape[1:]), tuple(x.shape[1:]))


def forward_reshape(p: ReshapeParams, x: np.ndarray, *_axis) -> np.ndarray:
    return np.ascontiguousarray(x).reshape((x.shape[0],) + p.out_shape)


def backward_reshape(p: ReshapeParams, ctx) -> list:
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is not None and _wanted(ctx, 0):
        grads[0] = Error(e.values.reshape((e.values.shape[0],) + p.in_shape), e.scale)
    return grads


# --- TRANSPOSE -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransposeParams:
    perm: tuple
    inverse: tuple


def prepare_transpose(op, model) -> TransposeParams:
    x = _data(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, x, out, "output")
    rank = len(x.shape)
    if not 1 <= rank <= 6:
        raise ModelError(f"{where(op)}: rank {rank} (LiteRT transposes 1 to 6 axes)")
    raw = _const_ints(model, op, 1, "perm", rank)
    perm = tuple(_axis(op, p, rank, "perm entry") for p in raw)
    if sorted(perm) != list(range(rank)):
        raise ModelError(f"{where(op)}: perm {raw} is not a permutation of {rank} axes")
    _check_shape(op, out, [x.shape[p] for p in perm])
    b = batch_axis(model, op.inputs[0])
    _check_batch_move(op, model, None if b is None else perm.index(b))
    return TransposeParams(perm, tuple(int(i) for i in np.argsort(perm)))


def forward_transpose(p: TransposeParams, x: np.ndarray, *_perm) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(p.perm))


def backward_transpose(p: TransposeParams, ctx) -> list:
    e = ctx.error(0)
    if e is None or not _wanted(ctx, 0):
        return [None, None]
    return [Error(np.ascontiguousarray(e.values.transpose(p.inverse)), e.scale), None]


# --- PACK, UNPACK --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackParams:
    axis: int
    batch: int | None  # batch axis of the inputs (None: all constant)


def prepare_pack(op, model) -> PackParams:
    out = _data(model, op, op.outputs[0], "output")
    count = int(op.options.get("values_count", len(op.inputs)))
    if count != len(op.inputs) or count < 1:
        raise ModelError(f"{where(op)}: values_count {count} but {len(op.inputs)} inputs")
    xs = [_data(model, op, t, f"input {i}") for i, t in enumerate(op.inputs)]
    for i, x in enumerate(xs):
        _same(op, out, x, f"input {i}")
        if tuple(x.shape) != tuple(xs[0].shape):
            raise ModelError(f"{where(op)}: input {i} {list(x.shape)} != input 0 {list(xs[0].shape)}")
    rank = len(xs[0].shape)
    axis = _axis(op, int(op.options.get("axis", 0)), rank + 1)
    shape = list(xs[0].shape)
    shape.insert(axis, count)
    _check_shape(op, out, shape)
    b = _input_batch(op, model, range(count))  # None: all constants, the output is one too
    _check_batch_move(op, model, None if b is None else b + (axis <= b))
    return PackParams(axis, b)


def forward_pack(p: PackParams, *xs) -> np.ndarray:
    xs = list(xs)
    if p.batch is not None:
        xs = _broadcast_batch(xs, p.batch)
    return np.stack(xs, axis=p.axis)


def backward_pack(p: PackParams, ctx) -> list:
    e = ctx.error(0)
    grads = [None] * len(ctx.op.inputs)
    if e is None:
        return grads
    for i in range(len(grads)):
        if _wanted(ctx, i):
            grads[i] = Error(np.ascontiguousarray(np.take(e.values, i, axis=p.axis)), e.scale)
    return grads


@dataclass(frozen=True)
class UnpackParams:
    axis: int
    num: int
    batch: int  # batch axis of the input (outputs: batch - (axis < batch))


def prepare_unpack(op, model) -> UnpackParams:
    x = _data(model, op, op.inputs[0] if op.inputs else -1, "input 0")
    rank = len(x.shape)
    axis = _axis(op, int(op.options.get("axis", 0)), rank)
    num = int(op.options.get("num", x.shape[axis]))
    if num != x.shape[axis] or num != len(op.outputs):
        raise ModelError(f"{where(op)}: num {num}, axis {axis} of size {x.shape[axis]}, "
                         f"{len(op.outputs)} outputs")
    b = batch_axis(model, op.inputs[0])
    b = 0 if b is None else b
    if axis == b:
        raise ModelError(f"{where(op)}: unpacks the batch axis {b}")
    shape = [s for i, s in enumerate(x.shape) if i != axis]
    for t in op.outputs:
        out = _data(model, op, t, "output")
        _same(op, x, out, "output")
        _check_shape(op, out, shape)
    for t in op.outputs:
        _check_batch_move(op, model, b - (axis < b), t)
    return UnpackParams(axis, num, b)


def forward_unpack(p: UnpackParams, x: np.ndarray) -> tuple:
    return tuple(np.ascontiguousarray(np.take(x, i, axis=p.axis)) for i in range(p.num))


def _joined(ctx, axis: int, batch: int, stack: bool) -> Error | None:
    """The output errors stacked (UNPACK) or concatenated (SPLIT) along ``axis``, zeros where no
    error reached an output, at the largest of their scales; ``batch``: the outputs' batch axis."""
    errs = [ctx.error(k) for k in range(len(ctx.op.outputs))]
    present = [e for e in errs if e is not None]
    if not present:
        return None
    n = present[0].values.shape[batch]
    values = iter(_common_scale(present)[0])
    parts = [next(values) if e is not None else _zeros_at(ctx.model, ctx.op.outputs[k], n, batch)
             for k, e in enumerate(errs)]
    joined = np.stack(parts, axis=axis) if stack else np.concatenate(parts, axis=axis)
    return Error(joined, max(e.scale for e in present))


def backward_unpack(p: UnpackParams, ctx) -> list:
    """The output errors stacked back along the unpacked axis."""
    if not _wanted(ctx, 0):
        return [None]
    return [_joined(ctx, p.axis, p.batch - (p.axis < p.batch), stack=True)]


# --- SPLIT, SPLIT_V ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitParams:
    axis: int
    bounds: tuple  # (start, stop) of each output along the axis
    data: int      # the data input's slot (SPLIT: 1, SPLIT_V: 0)


def _split_outputs(op, model, x, axis: int, sizes: list[int]) -> None:
    if len(op.outputs) != len(sizes):
        raise ModelError(f"{where(op)}: {len(op.outputs)} outputs for {len(sizes)} splits")
    for t, size in zip(op.outputs, sizes):
        out = _data(model, op, t, "output")
        _same(op, x, out, "output")
        shape = list(x.shape)
        shape[axis] = size
        _check_shape(op, out, shape)
    if batch_axis(model, op.inputs[_data_slot(op)]) not in (None, 0):
        raise ModelError(f"{where(op)}: its input holds the batch away from axis 0")


def _data_slot(op) -> int:
    return 1 if op.kind == "SPLIT" else 0


def _bounds(sizes) -> tuple:
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return tuple(zip(edges[:-1], edges[1:]))


def prepare_split(op, model) -> SplitParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes axis and input ({len(op.inputs)} inputs)")
    x = _data(model, op, op.inputs[1], "input 1")
    (axis,) = _const_ints(model, op, 0, "axis", 1)
    axis = _axis(op, axis, len(x.shape))
    _not_batch(op, axis)
    num = int(op.options.get("num_splits", len(op.outputs)))
    if num < 1 or x.shape[axis] % num:
        raise ModelError(f"{where(op)}: axis {axis} of size {x.shape[axis]} does not split in {num}")
    sizes = [x.shape[axis] // num] * num
    _split_outputs(op, model, x, axis, sizes)
    return SplitParams(axis, _bounds(sizes), 1)


def prepare_split_v(op, model) -> SplitParams:
    if len(op.inputs) != 3:
        raise ModelError(f"{where(op)}: takes input, size_splits and axis ({len(op.inputs)} inputs)")
    x = _data(model, op, op.inputs[0], "input 0")
    sizes = _const_ints(model, op, 1, "size_splits")
    if model.tensors[op.inputs[1]].shape and len(model.tensors[op.inputs[1]].shape) != 1:
        raise ModelError(f"{where(op)}: size_splits must be a vector")
    (axis,) = _const_ints(model, op, 2, "axis", 1)
    axis = _axis(op, axis, len(x.shape))
    _not_batch(op, axis)
    num = int(op.options.get("num_splits", len(sizes)))
    if num != len(sizes):
        raise ModelError(f"{where(op)}: num_splits {num} but {len(sizes)} sizes")
    free = [i for i, s in enumerate(sizes) if s == -1]
    fixed = sum(s for s in sizes if s != -1)
    if len(free) > 1 or any(s < -1 for s in sizes) or fixed > x.shape[axis] \
            or (not free and fixed != x.shape[axis]):
        raise ModelError(f"{where(op)}: size_splits {sizes} do not split axis {axis} of size {x.shape[axis]}")
    if free:
        sizes[free[0]] = x.shape[axis] - fixed
    _split_outputs(op, model, x, axis, sizes)
    return SplitParams(axis, _bounds(sizes), 0)


def forward_split(p: SplitParams, *inputs) -> tuple:
    x = inputs[p.data]
    index = [slice(None)] * x.ndim
    outs = []
    for a, b in p.bounds:
        index[p.axis] = slice(a, b)
        outs.append(np.ascontiguousarray(x[tuple(index)]))
    return tuple(outs)


def backward_split(p: SplitParams, ctx) -> list:
    """The output errors concatenated back along the split axis."""
    grads = [None] * len(ctx.op.inputs)
    if _wanted(ctx, p.data):
        grads[p.data] = _joined(ctx, p.axis, 0, stack=False)
    return grads


# --- FILL ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FillParams:
    shape: tuple  # the file's shape, batch 1 included
    value: np.ndarray  # 0-d, the value's dtype


def prepare_fill(op, model) -> FillParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes dims and value ({len(op.inputs)} inputs)")
    if len(model.tensors[op.inputs[0]].shape) != 1:
        raise ModelError(f"{where(op)}: dims must be a vector")
    dims = _const_ints(model, op, 0, "dims")
    if any(d < 0 for d in dims):
        raise ModelError(f"{where(op)}: dims {dims} must be >= 0")
    v = _data(model, op, op.inputs[1], "value")
    if not v.is_constant or len(v.shape) != 0:
        raise ModelError(f"{where(op)}: the value {v.name!r} must be a constant scalar")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, v, out, "output")
    _check_shape(op, out, dims)
    return FillParams(tuple(dims), np.asarray(v.data, dtype=v.dtype).reshape(()))


def forward_fill(p: FillParams, *_inputs) -> np.ndarray:
    # The same for every sample: the file's batch-1 shape, which readers broadcast over the batch.
    return np.full(p.shape, p.value, dtype=p.value.dtype)


def backward_none(p, ctx) -> list:
    """Constant inputs only (FILL): no error to pass on."""
    return [None] * len(ctx.op.inputs)


# --- TILE ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileParams:
    reps: tuple       # multiples, batch axis included (1 there)
    in_shape: tuple   # without the batch axis


def prepare_tile(op, model) -> TileParams:
    if len(op.inputs) != 2:
        raise ModelError(f"{where(op)}: takes input and multiples ({len(op.inputs)} inputs)")
    x = _data(model, op, op.inputs[0], "input 0")
    out = _data(model, op, op.outputs[0], "output")
    _same(op, x, out, "output")
    reps = _const_ints(model, op, 1, "multiples", len(x.shape))
    if any(r < 0 for r in reps):
        raise ModelError(f"{where(op)}: multiples {reps} must be >= 0")
    if not reps or reps[0] != 1:
        raise ModelError(f"{where(op)}: multiples {reps} must be 1 on the batch axis")
    _check_shape(op, out, [s * r for s, r in zip(x.shape, reps)])
    return TileParams(tuple(reps), tuple(x.shape[1:]))


def forward_tile(p: TileParams, x: np.ndarray, *_multiples) -> np.ndarray:
    return np.ascontiguousarray(np.tile(x, p.reps))


def backward_tile(p: TileParams, ctx) -> list:
    """Every input element was copied to each tile: its error is the sum over the tiles (int64,
    then rounded back to int16 with the shift joining the scale)."""
    e = ctx.error(0)
    if e is None or not _wanted(ctx, 0):
        return [None, None]
    if all(r == 1 for r in p.reps):
        return [Error(e.values, e.scale), None]
    n = e.values.shape[0]
    split = [n]
    for r, s in zip(p.reps[1:], p.in_shape):
        split += [r, s]
    acc = e.values.reshape(split).sum(axis=tuple(range(1, len(split), 2)), dtype=np.int64)
    if acc.size == 0:
        return [Error(np.zeros((n,) + p.in_shape, np.int16), e.scale), None]
    return [from_accumulator(acc, e.scale), None]


def tile_backward_bytes(op, model, q) -> int:
    """The default errors plus the int64 sum over the tiles."""
    from .contract import error_bytes
    return error_bytes(op, model, q) + 8 * q.elems(op.inputs[0])


# --- registry ------------------------------------------------------------------------------------

def _movement(prepare, forward, backward, **kw) -> Kernel:
    kw.setdefault("output_quant", "input")
    return Kernel(prepare=prepare, forward=forward, backward=backward, **kw)


KERNELS = {
    "CONCATENATION": _movement(prepare_concatenation, forward_concatenation, backward_concatenation),
    "STRIDED_SLICE": _movement(prepare_strided_slice, forward_strided_slice, backward_strided_slice),
    "EXPAND_DIMS": _movement(prepare_expand_dims, forward_reshape, backward_reshape),
    "SQUEEZE": _movement(prepare_squeeze, forward_reshape, backward_reshape),
    "TRANSPOSE": _movement(prepare_transpose, forward_transpose, backward_transpose),
    "PACK": _movement(prepare_pack, forward_pack, backward_pack),
    "UNPACK": _movement(prepare_unpack, forward_unpack, backward_unpack),
    "SPLIT": _movement(prepare_split, forward_split, backward_split, output_quant="fixed",
                       fixed_quant=_data_quant(1)),
    "SPLIT_V": _movement(prepare_split_v, forward_split, backward_split),
    "FILL": _movement(prepare_fill, forward_fill, backward_none, output_quant="fixed",
                      fixed_quant=_data_quant(1)),
    "TILE": _movement(prepare_tile, forward_tile, backward_tile, backward_bytes=tile_backward_bytes),
}
