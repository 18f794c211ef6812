"""Write a Model as a .tflite flatbuffer that LiteRT loads and runs.

The file holds one subgraph with the Model's tensors, ops and buffers, its metadata and signature.
A RESHAPE gets back a constant int32 shape input ([-1, ...] so LiteRT can batch), which the reader
folds away again. Files are written atomically: temp file, fsync, rename, fsync of the directory.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import flatbuffers
import numpy as np
import tflite

from ..errors import ModelError
from ..fsutil import atomic_write
from ..graph import Model, Tensor
from .reader import FILE_IDENTIFIER
from .schema import DEFAULT_VERSIONS, INT_VECTOR, OP_NUMBERS, OPTIONS, TYPE_NUMBERS

SCHEMA_VERSION = 3
BUFFER_ALIGNMENT = 16  # as TensorFlow's converter: lets kernels read int32 biases in place


def _module(name: str):
    return importlib.import_module(f"tflite.{name}")


def _int_vector(b: flatbuffers.Builder, values) -> int:
    return b.CreateNumpyVector(np.asarray(list(values), dtype=np.int32))


def _bytes_vector(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), BUFFER_ALIGNMENT)
    b.head = b.head - len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _options(b: flatbuffers.Builder, kind: str, options: dict) -> tuple[int, int]:
    if kind not in OPTIONS:
        return 0, 0
    table, tag, fields = OPTIONS[kind]
    mod = _module(table)
    # Vector fields are built first: a flatbuffers table cannot be open while a vector is.
    vectors = {key: _int_vector(b, options[key]) for key, _, _, encode in fields
               if encode is INT_VECTOR and key in options}
    getattr(mod, f"{table}Start")(b)
    for key, field, _, encode in fields:
        if key in options:
            getattr(mod, f"{table}Add{field}")(b, vectors[key] if key in vectors else encode(options[key]))
    return tag, getattr(mod, f"{table}End")(b)


def to_bytes(model: Model) -> bytes:
    """Serialize ``model`` to .tflite bytes."""
    tensors = list(model.tensors)
    ops = []
    for op in model.ops:  # RESHAPE takes its target shape as a constant input again
        inputs = list(op.inputs)
        if op.kind == "RESHAPE":
            out = model.tensors[op.outputs[0]]
            shape = np.array((-1,) + tuple(out.shape[1:]), np.int32)
            tensors.append(Tensor(f"{out.name}/shape", (len(shape),), np.dtype(np.int32), None, shape))
            inputs = inputs[:1] + [len(tensors) - 1]
        ops.append((op, inputs))

    b = flatbuffers.Builder(1024 + sum(t.nbytes for t in tensors if t.is_constant) * 2)
    # Buffers: 0 is the empty sentinel; each constant tensor, then each metadata entry, gets one.
    buffer_data = [b""]
    tensor_buffer = []
    for t in tensors:
        if t.is_constant:
            data = np.require(t.data, dtype=t.dtype, requirements="C")  # keeps a scalar 0-d
            if tuple(data.shape) != tuple(t.shape):
                raise ModelError(f"tensor {t.name!r}: data shape {list(data.shape)} != {list(t.shape)}")
            buffer_data.append(data.tobytes())
            tensor_buffer.append(len(buffer_data) - 1)
        else:
            tensor_buffer.append(0)
    metadata_buffers = []
    for name, data in model.metadata.items():
        buffer_data.append(bytes(data))
        metadata_buffers.append((name, len(buffer_data) - 1))

    buffer_offsets = []
    for data in buffer_data:
        vec = _bytes_vector(b, data) if data else None
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffer_offsets.append(tflite.BufferEnd(b))

    tensor_offsets = []
    for t, buf_index in zip(tensors, tensor_buffer):
        if np.dtype(t.dtype) not in TYPE_NUMBERS:
            raise ModelError(f"tensor {t.name!r}: type {np.dtype(t.dtype).name} cannot be written")
        name = b.CreateString(t.name)
        shape = _int_vector(b, t.shape)
        sig = _int_vector(b, t.shape_signature) if t.shape_signature is not None else None
        quant = None
        if t.quant is not None:
            scale = b.CreateNumpyVector(t.quant.scale.astype(np.float32))
            zp = b.CreateNumpyVector(t.quant.zero_point.astype(np.int64))
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zp)
            tflite.QuantizationParametersAddQuantizedDimension(b, t.quant.axis)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if sig is not None:
            tflite.TensorAddShapeSignature(b, sig)
        tflite.TensorAddType(b, TYPE_NUMBERS[np.dtype(t.dtype)])
        tflite.TensorAddBuffer(b, buf_index)
        tflite.TensorAddName(b, name)
        if t.variable:
            tflite.TensorAddIsVariable(b, True)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensor_offsets.append(tflite.TensorEnd(b))

    opcode_index: dict[tuple[str, int], int] = {}
    op_offsets = []
    for op, inputs in ops:
        if op.kind not in OP_NUMBERS:
            raise ModelError(f"op {op.kind} (index {op.index}) cannot be written")
        version = op.version if op.version is not None else DEFAULT_VERSIONS.get(op.kind, 1)
        key = (op.kind, version)
        opcode_index.setdefault(key, len(opcode_index))
        ins, outs = _int_vector(b, inputs), _int_vector(b, op.outputs)
        inter = _int_vector(b, op.intermediates) if op.intermediates else None
        tag, opts = _options(b, op.kind, op.options)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, opcode_index[key])
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if inter is not None:
            tflite.OperatorAddIntermediates(b, inter)
        if tag:
            tflite.OperatorAddBuiltinOptionsType(b, tag)
            tflite.OperatorAddBuiltinOptions(b, opts)
        op_offsets.append(tflite.OperatorEnd(b))

    def table_vector(start, offsets) -> int:
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    sg_name = b.CreateString("main")
    tensors_vec = table_vector(tflite.SubGraphStartTensorsVector, tensor_offsets)
    ops_vec = table_vector(tflite.SubGraphStartOperatorsVector, op_offsets)
    in_vec, out_vec = _int_vector(b, model.inputs), _int_vector(b, model.outputs)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, in_vec)
    tflite.SubGraphAddOutputs(b, out_vec)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    opcode_offsets = []
    for (kind, version), _ in sorted(opcode_index.items(), key=lambda kv: kv[1]):
        code = OP_NUMBERS[kind]
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, version)
        opcode_offsets.append(tflite.OperatorCodeEnd(b))

    metadata_offsets = []
    for name, buf_index in metadata_buffers:
        n = b.CreateString(name)
        tflite.MetadataStart(b)
        tflite.MetadataAddName(b, n)
        tflite.MetadataAddBuffer(b, buf_index)
        metadata_offsets.append(tflite.MetadataEnd(b))

    signature_offsets = []
    if model.signature is not None:
        maps = {}
        for key in ("inputs", "outputs"):
            entries = []
            for name, t in model.signature[key]:
                n = b.CreateString(name)
                tflite.TensorMapStart(b)
                tflite.TensorMapAddName(b, n)
                tflite.TensorMapAddTensorIndex(b, t)
                entries.append(tflite.TensorMapEnd(b))
            start = tflite.SignatureDefStartInputsVector if key == "inputs" else tflite.SignatureDefStartOutputsVector
            maps[key] = table_vector(start, entries)
        sig_key = b.CreateString(model.signature.get("key", "serving_default"))
        tflite.SignatureDefStart(b)
        tflite.SignatureDefAddInputs(b, maps["inputs"])
        tflite.SignatureDefAddOutputs(b, maps["outputs"])
        tflite.SignatureDefAddSignatureKey(b, sig_key)
        tflite.SignatureDefAddSubgraphIndex(b, 0)
        signature_offsets.append(tflite.SignatureDefEnd(b))

    description = b.CreateString(model.description or "edge_qmul")
    opcodes_vec = table_vector(tflite.ModelStartOperatorCodesVector, opcode_offsets)
    subgraphs_vec = table_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = table_vector(tflite.ModelStartBuffersVector, buffer_offsets)
    metadata_vec = table_vector(tflite.ModelStartMetadataVector, metadata_offsets) if metadata_offsets else None
    sig_vec = table_vector(tflite.ModelStartSignatureDefsVector, signature_offsets) if signature_offsets else None
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    if metadata_vec is not None:
        tflite.ModelAddMetadata(b, metadata_vec)
    if sig_vec is not None:
        tflite.ModelAddSignatureDefs(b, sig_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def save_tflite(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (a crash leaves the old file or the new one, whole)."""
    return atomic_write(path, to_bytes(model))
