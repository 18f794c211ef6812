"""SOFTMAX int8 -> int8 over the last axis (a loss head / interface op: float32 is allowed here).

LiteRT's x86 builtin (optimized_ops::Softmax) looks exp(-s_in * beta * (max - x)) up in a 256-entry
float32 table made with libm's expf, sums in float32 left to right, scales by 1 / (sum * s_out) and
rounds with std::round. The table is built once at prepare time with the same expf, through ctypes.

LiteRT's aarch64 build (clang, TFLITE_SOFTMAX_USE_UINT16_LUT) runs SoftmaxInt8LUT instead: the
table holds round(expf(.) * 65535) as integers, a row's sum is an integer, 1 / (sum * s_out)
becomes a quantized multiplier (QuantizeMultiplier) and each entry is requantized with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ModelError
from ..quant import QuantParams, _quantize_multipliers, multiply_by_quantized_multiplier
from .common import libm_float32, output, per_tensor, tensor, where
from .contract import Kernel


_expf = libm_float32("expf", math.exp)


@dataclass(frozen=True)
class SoftmaxParams:
    table: np.ndarray  # float32[256]: table[255 - d] = expf(-s_in * beta * d)
    out_scale: np.float32
    out_zero_point: int
    table16: np.ndarray | None = None  # int32[256], aarch64's SoftmaxInt8LUT: table16[255 - d]


def prepare(op, model) -> SoftmaxParams:
    x = tensor(model, op, 0, dtype=np.int8)
    out = output(model, op)
    qi, qo = per_tensor(op, x, "input"), per_tensor(op, out, "output")
    if qo.zp != -128 or abs(qo.s - 1 / 256) > 0.001 / 256:
        raise ModelError(f"{where(op)}: int8 SOFTMAX output must have scale 1/256 and zero point -128, "
                         f"got {qo.s} and {qo.zp}")
    if tuple(x.shape[1:]) != tuple(out.shape[1:]):
        raise ModelError(f"{where(op)}: output shape {list(out.shape)} != input {list(x.shape)}")
    beta = np.float32(op.options.get("beta", 1.0))
    scale = np.float32(-np.float32(qi.s) * beta)
    table = np.empty(256, np.float32)
    for v in range(256):
        table[255 - v] = _expf(np.float32(scale * np.float32(v)))
    table16 = uint16_exp_table(np.float32(np.float32(qi.s) * beta)) if model.litert.softmax_uint16_table else None
    return SoftmaxParams(table, np.float32(qo.s), qo.zp, table16)


def uint16_exp_table(scale: np.float32) -> np.ndarray:
    """PopulateSoftmaxUInt8LookupTable: entry v = min(65535, (int)(expf(scale * (v - 255)) * 65535 + 0.5)),
    the float product rounded to float32, the + 0.5 in double, then truncated."""
    table = np.empty(256, np.int32)
    for v in range(256):
        e = np.float32(_expf(np.float32(scale * np.float32(v - 255))) * np.float32(65535))
        table[v] = min(65535, int(float(e) + 0.5))
    return table


def forward(p: SoftmaxParams, x: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    if p.table16 is not None:
        return softmax_int8_uint16_table(flat, p.table16, p.out_scale, p.out_zero_point).reshape(x.shape)
    return softmax_int8(flat, p.table, p.out_scale, p.out_zero_point).reshape(x.shape)


def macs(op, model) -> int:
    return int(np.prod(model.tensors[op.inputs[0]].shape))


@njit(cache=True, inline="always")
def _row_max(x, r):
    m = np.int32(-128)
    for j in range(x.shape[1]):
        if x[r, j] > m:
            m = np.int32(x[r, j])
    return m


@njit(cache=True)
def softmax_int8(x, table, out_scale, out_zp):
    rows, n = x.shape
    out = np.empty((rows, n), np.int8)
    for r in range(rows):
        m = _row_max(x, r)
        s = np.float32(0.0)
        for j in range(n):
            s = np.float32(s + table[255 - m + x[r, j]])
        inv = np.float32(np.float32(1.0) / np.float32(s * out_scale))
        for j in range(n):
            prob = np.float32(table[255 - m + x[r, j]] * inv)
            # std::round for prob >= 0; in float64 so that prob + 0.5 itself does not round.
            q = np.int32(np.floor(np.float64(prob) + 0.5))
            out[r, j] = min(max(q + out_zp, -128), 127)
    return out


@njit(cache=True)
def softmax_int8_uint16_table(x, table16, out_scale, out_zp):
    # SoftmaxInt8LUT: integer sums of the uint16 table, then 1 / (sum * s_out) as a quantized
    # multiplier applied to every entry (the vector and scalar forms agree: entries are >= 0)
    rows, n = x.shape
    out = np.empty((rows, n), np.int8)
    real = np.empty(1, np.float64)
    mult = np.empty(1, np.int32)
    shift = np.empty(1, np.int32)
    for r in range(rows):
        m = _row_max(x, r)
        s = np.int32(0)
        for j in range(n):
            s = np.int32(s + table16[255 - m + x[r, j]])
        real[0] = np.float64(np.float32(np.float32(1.0) / np.float32(np.float32(s) * out_scale)))
        _quantize_multipliers(real, mult, shift)
        for j in range(n):
            q = multiply_by_quantized_multiplier(np.int32(table16[255 - m + x[r, j]]), mult[0], shift[0])
            out[r, j] = min(max(q + out_zp, -128), 127)
    return out


def softmax_quant(op, model):
    """int8 SOFTMAX's output quantization is fixed by LiteRT: scale 1/256, zero point -128."""
    return QuantParams(np.array([1 / 256], np.float32), np.array([-128], np.int64), 0)


# No backward: the trainer's loss head works on the logits a final SOFTMAX reads.
KERNELS = {"SOFTMAX": Kernel(prepare, forward, macs=macs, output_quant="fixed", fixed_quant=softmax_quant)}
