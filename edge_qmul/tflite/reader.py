"""Read a .tflite flatbuffer into a Model.

Checks everything before building anything, so bad input raises ModelError and never leaves a
half-built Model: the file identifier, vector lengths against the file size, tensor and buffer
indices, buffer sizes against shapes, and (through Model) every op's support and parameters.
Shape arithmetic (Keras' Flatten, UpSampling2D, an LSTM's initial state) is evaluated on the file's
static shapes and folded away (fold.py).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import tflite

from ..arithmetic import arithmetic
from ..errors import ModelError
from ..graph import Model, Op, Tensor
from ..quant import QuantParams
from .fold import fold_constants
from .schema import INT_VECTOR, OP_CODES, OPTIONS, TENSOR_TYPES

FILE_IDENTIFIER = b"TFL3"
MAX_TENSOR_BYTES = 1 << 31  # one sample's tensor: far above any model an edge device runs


def load_tflite(src: str | os.PathLike | bytes | bytearray | memoryview, litert: str | None = None) -> Model:
    """Read a .tflite model (a path or the file's bytes) into a :class:`Model`.

    ``litert`` names the platform whose LiteRT the model's arithmetic reproduces (``x86_64``,
    ``aarch64``; default: ``$EDGE_QMUL_LITERT``, else this machine's; see arithmetic.py).
    Raises ModelError naming the problem for anything that is not a well-formed int8 model of the
    supported op set.
    """
    litert = arithmetic(litert)  # a bad name fails before the file is read
    if isinstance(src, (bytes, bytearray, memoryview)):
        buf, origin = bytes(src), "<bytes>"
    else:
        origin = str(src)
        try:
            buf = Path(src).read_bytes()
        except OSError as e:
            raise ModelError(f"{origin}: cannot read ({e.strerror or e})") from None
    try:
        parts = _parse(buf)
    except ModelError as e:
        raise ModelError(f"{origin}: {e}") from None
    except (IndexError, ValueError, TypeError, AttributeError, OverflowError, UnicodeDecodeError) as e:
        # flatbuffers raises these when offsets point outside the buffer.
        raise ModelError(f"{origin}: not a valid .tflite flatbuffer ({type(e).__name__}: {e})") from None
    except Exception as e:  # struct.error and friends from corrupted offsets
        raise ModelError(f"{origin}: not a valid .tflite flatbuffer ({type(e).__name__}: {e})") from None
    try:
        return Model(*parts, litert=litert)
    except ModelError as e:
        raise e.prefixed(origin) from None


def _length(n: int, buf: bytes, what: str, elem_bytes: int = 4) -> int:
    # A corrupted length would make us loop for a very long time: no vector can outgrow the file.
    if n < 0 or n * elem_bytes > len(buf):
        raise ModelError(f"{what}: vector length {n} does not fit a {len(buf)}-byte file")
    return n


def _parse(buf: bytes) -> tuple:
    if len(buf) < 8:
        raise ModelError(f"file is {len(buf)} bytes, too short for a .tflite flatbuffer")
    if buf[4:8] != FILE_IDENTIFIER:
        raise ModelError(f"file identifier is {buf[4:8]!r}, expected {FILE_IDENTIFIER!r}: not a .tflite model")
    root = int.from_bytes(buf[0:4], "little")
    if root + 4 > len(buf):
        raise ModelError(f"root offset {root} points past the end of the {len(buf)}-byte file (truncated?)")
    m = tflite.Model.GetRootAsModel(buf, 0)
    n_sub = _length(m.SubgraphsLength(), buf, "subgraphs")
    if n_sub < 1:
        raise ModelError("model has no subgraph")
    sg = m.Subgraphs(0)
    opcodes = []
    for i in range(_length(m.OperatorCodesLength(), buf, "operator codes")):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = OP_CODES.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(oc.CustomCode() or b'').decode(errors='replace')}"
        opcodes.append((name, oc.Version()))
    buffers = []
    for i in range(_length(m.BuffersLength(), buf, "buffers")):
        b = m.Buffers(i)
        if b.Offset() > 1:  # data stored after the flatbuffer (models over 2 GB)
            off, size = b.Offset(), b.Size()
            if off + size > len(buf):
                raise ModelError(f"buffer {i}: data at [{off}, {off + size}) lies past the end of the file")
            buffers.append(buf[off:off + size])
        elif b.DataLength():
            _length(b.DataLength(), buf, f"buffer {i}", 1)
            buffers.append(b.DataAsNumpy().tobytes())
        else:
            buffers.append(b"")

    tensors = [_read_tensor(sg.Tensors(i), i, buffers, buf)
               for i in range(_length(sg.TensorsLength(), buf, "tensors"))]
    nt = len(tensors)

    def index_list(vec: np.ndarray | int, what: str) -> list[int]:
        idx = [] if isinstance(vec, int) else [int(v) for v in vec]
        for v in idx:
            if v < -1 or v >= nt:
                raise ModelError(f"{what} refers to tensor {v}, but the model has {nt} tensors")
        return idx

    inputs = index_list(sg.InputsAsNumpy(), "subgraph inputs")
    outputs = index_list(sg.OutputsAsNumpy(), "subgraph outputs")
    ops = []
    for i in range(_length(sg.OperatorsLength(), buf, "operators")):
        o = sg.Operators(i)
        if o.OpcodeIndex() >= len(opcodes):
            raise ModelError(f"operator {i} uses opcode {o.OpcodeIndex()}, but only {len(opcodes)} exist")
        kind, version = opcodes[o.OpcodeIndex()]
        op_in = index_list(o.InputsAsNumpy(), f"op {kind} (index {i}) inputs")
        op_out = index_list(o.OutputsAsNumpy(), f"op {kind} (index {i}) outputs")
        if not op_out or any(t < 0 for t in op_out):
            raise ModelError(f"op {kind} (index {i}) has outputs {op_out}; every op needs at least one, "
                             "each a tensor")
        inter = index_list(o.IntermediatesAsNumpy(), f"op {kind} (index {i}) intermediates") \
            if o.IntermediatesLength() else []
        ops.append(Op(kind, op_in, op_out, _read_options(o, kind, i), version, i, inter))

    _check_order(tensors, ops, inputs, outputs)
    ops = fold_constants(tensors, ops, outputs)
    metadata = {}
    for i in range(_length(m.MetadataLength(), buf, "metadata")):
        md = m.Metadata(i)
        if md.Buffer() < len(buffers):
            metadata[(md.Name() or b"").decode(errors="replace")] = buffers[md.Buffer()]
    signature = None
    if m.SignatureDefsLength() > 0:
        s = m.SignatureDefs(0)
        signature = {
            "key": (s.SignatureKey() or b"serving_default").decode(),
            "inputs": [((s.Inputs(j).Name() or b"").decode(), s.Inputs(j).TensorIndex())
                       for j in range(_length(s.InputsLength(), buf, "signature inputs"))],
            "outputs": [((s.Outputs(j).Name() or b"").decode(), s.Outputs(j).TensorIndex())
                        for j in range(_length(s.OutputsLength(), buf, "signature outputs"))],
        }
    description = (m.Description() or b"").decode(errors="replace")
    return _compact(tensors, ops, inputs, outputs, metadata, description, signature)


def _read_tensor(t, i: int, buffers: list[bytes], buf: bytes) -> Tensor:
    name = (t.Name() or b"").decode(errors="replace") or f"tensor_{i}"
    ttype = t.Type()
    if ttype not in TENSOR_TYPES:
        raise ModelError(f"tensor {i} ({name!r}) has unsupported type {ttype}")
    dtype = TENSOR_TYPES[ttype]
    shape = tuple(int(s) for s in (t.ShapeAsNumpy() if t.ShapeLength() else []))
    _length(len(shape), buf, f"tensor {i} shape")
    sig = tuple(int(s) for s in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else None
    if any(s < 0 for s in shape):
        raise ModelError(f"tensor {i} ({name!r}) has a negative dimension {list(shape)}")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_TENSOR_BYTES:
        # e.g. a dimension of 2**31 - 1: kernels would try to allocate terabytes (found by fuzzing)
        raise ModelError(f"tensor {i} ({name!r}) of shape {list(shape)} holds over {MAX_TENSOR_BYTES >> 30} GiB")
    quant = None
    q = t.Quantization()
    if q is not None and q.ScaleLength() > 0:
        _length(q.ScaleLength(), buf, f"tensor {i} scales")
        scale = q.ScaleAsNumpy().astype(np.float32)
        zp = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(scale.size, np.int64)
        zp = np.asarray(zp, np.int64)
        if zp.size == 1 and scale.size > 1:
            zp = np.repeat(zp, scale.size)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ModelError(f"tensor {i} ({name!r}) has a non-positive or non-finite scale")
        quant = QuantParams(scale, zp, int(q.QuantizedDimension()))
        if quant.per_channel and (quant.axis >= len(shape) or shape[quant.axis] != scale.size):
            raise ModelError(f"tensor {i} ({name!r}): {scale.size} scales along axis {quant.axis} "
                             f"do not fit shape {list(shape)}")
    data = None
    b = t.Buffer()
    if b >= len(buffers):
        raise ModelError(f"tensor {i} ({name!r}) refers to buffer {b}, but the model has {len(buffers)}")
    if b > 0 and buffers[b]:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(buffers[b]) != nbytes:
            raise ModelError(f"tensor {i} ({name!r}) is {dtype.name}{list(shape)} = {nbytes} bytes, "
                             f"but its buffer holds {len(buffers[b])}")
        data = np.frombuffer(buffers[b], dtype=dtype).reshape(shape).copy()
    return Tensor(name, shape, dtype, quant, data, sig, bool(t.IsVariable()))


def _read_options(o, kind: str, index: int) -> dict:
    if kind not in OPTIONS:
        return {}
    table, tag, fields = OPTIONS[kind]
    if o.BuiltinOptionsType() != tag or o.BuiltinOptions() is None:
        return {}
    cls = getattr(importlib.import_module(f"tflite.{table}"), table)
    opt = cls()
    tab = o.BuiltinOptions()
    opt.Init(tab.Bytes, tab.Pos)
    out = {}
    for key, field, decode, _ in fields:
        if decode is INT_VECTOR:  # e.g. SqueezeOptions.squeeze_dims; absent reads as []
            n = _length(getattr(opt, f"{field}Length")(), tab.Bytes, f"op {kind} (index {index}) {key}")
            out[key] = [int(getattr(opt, field)(j)) for j in range(n)]
        else:
            out[key] = decode(getattr(opt, field)())
    return out


def _check_order(tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int]) -> None:
    # variable tensors (an LSTM's state) hold zeros until an op writes them
    known = set(inputs) | {i for i, t in enumerate(tensors) if t.is_constant or t.variable}
    for op in ops:
        for i in op.inputs:
            if i >= 0 and i not in known and op.kind != "SHAPE":
                raise ModelError(f"op {op.kind} (index {op.index}) reads tensor {i} ({tensors[i].name!r}) "
                                 "before any op writes it")
        known.update(op.outputs)
    computed = {t for op in ops for t in op.outputs}
    for t in outputs:
        if t not in known:
            raise ModelError(f"model output {t} ({tensors[t].name!r}) is never computed")
        if t not in computed:  # a constant, state or input tensor as an output (found by fuzzing)
            raise ModelError(f"model output {t} ({tensors[t].name!r}) is a constant or an input: no op "
                             "computes it")


def _compact(tensors, ops, inputs, outputs, metadata, description, signature) -> tuple:
    """Drop tensors no op or interface uses and renumber the rest, in their original order."""
    used = set(inputs) | set(outputs)
    for op in ops:
        used.update(i for i in op.inputs if i >= 0)
        used.update(op.outputs)
        used.update(op.intermediates)
    order = sorted(used)
    remap = {old: new for new, old in enumerate(order)}
    for op in ops:
        op.inputs = [remap[i] if i >= 0 else -1 for i in op.inputs]
        op.outputs = [remap[i] for i in op.outputs]
        op.intermediates = [remap[i] for i in op.intermediates]
    if signature is not None:
        for key in ("inputs", "outputs"):
            signature[key] = [(n, remap[t]) for n, t in signature[key] if t in remap]
    return ([tensors[i] for i in order], ops, [remap[i] for i in inputs],
            [remap[i] for i in outputs], metadata, description, signature)
