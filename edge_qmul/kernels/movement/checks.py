"""What every data-movement op shares: tensor checks (dtype, one quantization, constant operands,
axes, declared shapes), where the batch axis sits, batch broadcasting of constant operands, and the
common scale that output errors are joined at. Every op here copies values and never rescales them.
"""
from __future__ import annotations

import numpy as np

from ...errors import ModelError
from ...grad import Error, rounding_shift_int16
from ..common import where
from ..contract import Kernel

DTYPES = (np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.float32))
# Ops that apply their axes literally whatever the batch position (kernels/movement's docstring).
BATCH_MOVERS = ("TRANSPOSE", "UNPACK", "PACK")


# --- shared checks -------------------------------------------------------------------------------

def data_tensor(model, op, t: int, what: str):
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


def same_quant(op, x, y, what: str) -> None:
    """Same dtype and quantization: the op copies values, it cannot rescale them."""
    if np.dtype(x.dtype) != np.dtype(y.dtype):
        raise ModelError(f"{where(op)}: {what} {y.name!r} is {np.dtype(y.dtype).name}, "
                         f"input {x.name!r} is {np.dtype(x.dtype).name}")
    if x.quant != y.quant:
        raise ModelError(f"{where(op)}: {what} {y.name!r} must share the quantization of {x.name!r} "
                         f"({y.quant} vs {x.quant}); LiteRT copies values without rescaling")


def const_ints(model, op, slot: int, what: str, count: int | None = None) -> list[int]:
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


def axis_index(op, axis: int, rank: int, what: str = "axis") -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise ModelError(f"{where(op)}: {what} {axis} is out of range for rank {rank}")
    return a


def check_shape(op, out, shape) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ModelError(f"{where(op)}: output {out.name!r} is declared {list(out.shape)}, "
                         f"the op computes {list(shape)}")


def not_batch(op, axis: int, what: str = "axis") -> None:
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


def check_batch_move(op, model, b_out: int | None, t: int | None = None) -> None:
    """Output ``t`` (default: output 0) holds the batch at ``b_out``: unless that is 0 (or None, no
    batch), only a batch mover may read it (kernels/movement's docstring)."""
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


def input_batch(op, model, slots) -> int | None:
    """The batch axis shared by the op's data inputs (None if they are all constants)."""
    bs = {batch_axis(model, op.inputs[s]) for s in slots} - {None}
    if len(bs) > 1:
        raise ModelError(f"{where(op)}: inputs hold the batch at different axes {sorted(bs)}")
    return bs.pop() if bs else None


def broadcast_batch(xs: list, axis: int) -> list:
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


def zeros_at(model, t: int, n: int, b: int) -> np.ndarray:
    """A zero int16 error of tensor ``t`` with ``n`` samples along batch axis ``b``."""
    shape = list(model.tensors[t].shape)
    shape[b] = n
    return np.zeros(shape, np.int16)


def common_scale(errors: list[Error]) -> tuple[list[np.ndarray], float]:
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
            out.append(rounding_shift_int16(v.reshape(-1).astype(np.int64) * m, 30).reshape(v.shape))
    return out, top


def wanted(ctx, slot: int) -> bool:
    return slot < len(ctx.wants) and bool(ctx.wants[slot]) and ctx.op.inputs[slot] >= 0 \
        and not ctx.model.tensors[ctx.op.inputs[slot]].is_constant


def data_quant(slot: int):
    """fixed_quant for an op whose data input is not input 0 (SPLIT, FILL): copy that input's."""
    def fixed(op, model):
        return model.tensors[op.inputs[slot]].quant
    return fixed


def movement_kernel(prepare, forward, backward, **kw) -> Kernel:
    """A data-movement op's registry entry: its output keeps its input's quantization by default."""
    kw.setdefault("output_quant", "input")
    return Kernel(prepare=prepare, forward=forward, backward=backward, **kw)
