"""Shared preparation for the kernels: padding geometry, per-channel multipliers, tensor checks.

Prepare-time code (plain Python): it turns a .tflite op's options and scales into the integer
parameters that the compiled loops take, so the hot path touches integers only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..quant import QuantParams, activation_range, quantize_multipliers


def where(op) -> str:
    return f"op {op.kind} (index {op.index})"


def tensor(model, op, slot: int, *, dtype=None, constant: bool | None = None, rank: int | None = None,
           optional: bool = False):
    """The tensor in input ``slot`` of ``op``, checked; None if optional and absent."""
    if slot >= len(op.inputs) or op.inputs[slot] < 0:
        if optional:
            return None
        raise ModelError(f"{where(op)}: input {slot} is missing")
    t = model.tensors[op.inputs[slot]]
    if dtype is not None and np.dtype(t.dtype) != np.dtype(dtype):
        raise ModelError(f"{where(op)}: input {slot} ({t.name!r}) is {np.dtype(t.dtype).name}, "
                         f"expected {np.dtype(dtype).name}"
                         + ("; the model is not int8-quantized" if np.dtype(t.dtype) == np.float32 else ""))
    if constant is True and not t.is_constant:
        raise ModelError(f"{where(op)}: input {slot} ({t.name!r}) must be a constant")
    if rank is not None and len(t.shape) != rank:
        raise ModelError(f"{where(op)}: input {slot} ({t.name!r}) has rank {len(t.shape)}, expected {rank}")
    if t.quant is None and np.dtype(t.dtype) in (np.dtype(np.int8),):
        raise ModelError(f"{where(op)}: int8 tensor {t.name!r} has no quantization parameters")
    return t


def output(model, op, dtype=np.int8):
    t = model.tensors[op.outputs[0]]
    if np.dtype(t.dtype) != np.dtype(dtype):
        raise ModelError(f"{where(op)}: output {t.name!r} is {np.dtype(t.dtype).name}, "
                         f"expected {np.dtype(dtype).name}"
                         + ("; the model is not int8-quantized" if np.dtype(t.dtype) == np.float32 else ""))
    if t.quant is None and np.dtype(dtype) == np.dtype(np.int8):
        raise ModelError(f"{where(op)}: int8 output {t.name!r} has no quantization parameters")
    return t


def vector_split(x: np.ndarray, lanes: int) -> tuple[np.ndarray, int]:
    """``x`` as (samples, elements) and how many leading elements of each sample LiteRT's vector
    loops take (``lanes`` at a time); the rest its scalar tail finishes one by one."""
    flat = x.reshape(x.shape[0], -1)
    size = flat.shape[1]
    return flat, size - size % lanes


def per_tensor(op, t, what: str) -> QuantParams:
    if t.quant.per_channel:
        raise ModelError(f"{where(op)}: {what} {t.name!r} must be quantized per tensor")
    return t.quant


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry (conv, depthwise, pooling) for one spatial axis pair."""

    stride_h: int
    stride_w: int
    dil_h: int
    dil_w: int
    pad_top: int
    pad_left: int
    out_h: int
    out_w: int


def window(op, in_h: int, in_w: int, k_h: int, k_w: int, padding: str, stride_h: int, stride_w: int,
           dil_h: int = 1, dil_w: int = 1) -> Window:
    """TFLite's ComputePaddingHeightWidth: SAME pads (total // 2) before, the rest after."""
    if stride_h < 1 or stride_w < 1 or dil_h < 1 or dil_w < 1:
        raise ModelError(f"{where(op)}: strides and dilations must be >= 1")
    eff_h, eff_w = (k_h - 1) * dil_h + 1, (k_w - 1) * dil_w + 1
    if padding == "SAME":
        out_h, out_w = -(-in_h // stride_h), -(-in_w // stride_w)
        pad_h = max((out_h - 1) * stride_h + eff_h - in_h, 0)
        pad_w = max((out_w - 1) * stride_w + eff_w - in_w, 0)
        top, left = pad_h // 2, pad_w // 2
    elif padding == "VALID":
        out_h, out_w = (in_h - eff_h + stride_h) // stride_h, (in_w - eff_w + stride_w) // stride_w
        top = left = 0
    else:
        raise ModelError(f"{where(op)}: unsupported padding {padding!r}")
    if out_h < 1 or out_w < 1:
        raise ModelError(f"{where(op)}: window {k_h}x{k_w} does not fit input {in_h}x{in_w}")
    return Window(stride_h, stride_w, dil_h, dil_w, top, left, out_h, out_w)


def window_macs(op, model) -> int:
    """MACs of a conv-like op for one sample: each output pixel applies the whole filter once
    (a depthwise filter (1, KH, KW, C) counts KH*KW per channel, as it should)."""
    w = model.tensors[op.inputs[1]]
    out = model.tensors[op.outputs[0]]
    return int(np.prod(out.shape[1:3])) * int(np.prod(w.shape))


def check_output_shape(op, out, shape: tuple) -> None:
    if tuple(out.shape[1:]) != tuple(shape[1:]):
        raise ModelError(f"{where(op)}: output {out.name!r} is declared {list(out.shape)}, "
                         f"the op computes {list(shape)}")


def check_one_sample(op, shape: tuple, sample: tuple) -> None:
    """An element-wise op's input must broadcast to one sample of its output (LiteRT runs one
    sample at a time): checked before any index array is built, since a mutated dimension (found by
    fuzzing .tflite files) made a gather table of a billion entries before the shapes were refused."""
    try:
        ok = np.broadcast_shapes(tuple(shape), tuple(sample)) == tuple(sample)
    except ValueError:
        ok = False
    if not ok:
        raise ModelError(f"{where(op)}: an input of shape {list(shape)} does not broadcast to one sample "
                         f"{list(sample)} of the output")


def check_bias(model, op, channels: int) -> None:
    """The optional bias (input 2) of a conv-like op: int32, one value per output channel. The
    compiled loops read ``bias[c]`` for every channel unchecked: a shorter bias (found by fuzzing
    .tflite files) read and corrupted memory past its end."""
    b = tensor(model, op, 2, dtype=np.int32, optional=True)
    if b is not None and tuple(b.shape) != (channels,):
        raise ModelError(f"{where(op)}: bias {b.name!r} has shape {list(b.shape)}, expected [{channels}] "
                         "(one per output channel)")


@dataclass(frozen=True)
class Requant:
    """Per-output-channel requantization: multiplier, shift, output zero point, clamp."""

    multiplier: np.ndarray
    shift: np.ndarray
    out_zero_point: int
    act_min: int
    act_max: int
    rounding: int = 0  # quant.requantize's: DOUBLE_ROUNDING, SINGLE_ROUNDING, SHIFT_AFTER_MULTIPLY


def conv_requant(op, x, w, out, channels: int, activation: str) -> Requant:
    """Multipliers for a conv-like op: s_in * s_w[c] / s_out per channel, in double.

    PopulateConvolutionQuantizationParams widens each float32 scale to double before multiplying;
    a per-tensor filter scale is broadcast to every channel.
    """
    s_in = float(per_tensor(op, x, "input").s)
    s_out = float(per_tensor(op, out, "output").s)
    s_w = w.quant.scale.astype(np.float64)
    if s_w.size not in (1, channels):
        raise ModelError(f"{where(op)}: filter {w.name!r} has {s_w.size} scales for {channels} channels")
    if np.any(w.quant.zero_point != 0):
        raise ModelError(f"{where(op)}: filter {w.name!r} must have zero point 0")
    real = s_in * np.broadcast_to(s_w, (channels,)) / s_out
    mult, shift = quantize_multipliers(real)
    lo, hi = activation_range(activation, out.quant)
    return Requant(mult, shift, out.quant.zp, lo, hi)


def five_fold(e0: tuple, e1: tuple) -> list | None:
    """reference_ops::ProcessBroadcastShapes: the fivefold sizes y0..y4 of two shapes of one rank,
    or None for kGenericBroadcast. Input "a" is the one broadcast along the innermost differing axis."""
    dims = len(e0)
    first = None
    for i in range(dims - 1, -1, -1):
        if e0[i] != e1[i]:
            first = True if e0[i] == 1 else False if e1[i] == 1 else None
            break
    if first is None:
        return None
    sa, sb = (e0, e1) if first else (e1, e0)
    y = [1, 1, 1, 1, 1]
    i = dims - 1
    # (slot, condition, which shape's size counts) in ProcessBroadcastShapes' order
    for slot, cond, src in ((4, lambda i: sa[i] == sb[i], sb), (3, lambda i: sa[i] == 1, sb),
                            (2, lambda i: sa[i] == sb[i], sa), (1, lambda i: sb[i] == 1, sa),
                            (0, lambda i: sa[i] == sb[i], sb)):
        while i >= 0 and cond(i):
            y[slot] *= src[i]
            i -= 1
    return None if i >= 0 else y


def libm_float32(name: str, fallback):
    """A libm float32 function (``expf``, ``tanhf``) as LiteRT's kernels call it through std::exp /
    std::tanh on float; without libm (unusual), ``fallback``'s float64 result rounded to float32
    (at most 1 ulp from glibc)."""
    path = ctypes.util.find_library("m")
    try:
        f = getattr(ctypes.CDLL(path), name) if path else None
    except (OSError, AttributeError):
        f = None
    if f is None:
        return lambda v: np.float32(fallback(float(v)))
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda v: np.float32(f(float(v)))
