"""AVERAGE_POOL_2D and MAX_POOL_2D, int8 NHWC (input and output share scale and zero point)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..quant import activation_range
from .. import grad as G
from .contract import Backward, Kernel, MemoryQuery
from .common import Window, check_output_shape, output, tensor, where, window


@dataclass(frozen=True)
class PoolParams:
    win: Window
    filter_h: int
    filter_w: int
    act_min: int
    act_max: int


def prepare(op, model) -> PoolParams:
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    out = output(model, op)
    if x.quant != out.quant:
        raise ModelError(f"{where(op)}: input and output must share scale and zero point")
    o = op.options
    fh, fw = o.get("filter_h", 1), o.get("filter_w", 1)
    win = window(op, x.shape[1], x.shape[2], fh, fw, o.get("padding", "VALID"), o.get("stride_h", 1),
                 o.get("stride_w", 1))
    check_output_shape(op, out, (1, win.out_h, win.out_w, x.shape[3]))
    lo, hi = activation_range(o.get("activation", "NONE"), out.quant)
    return PoolParams(win, fh, fw, lo, hi)


def forward_average(p: PoolParams, x: np.ndarray) -> np.ndarray:
    v = p.win
    return average_pool_int8(x, p.filter_h, p.filter_w, v.stride_h, v.stride_w, v.pad_top, v.pad_left,
                             v.out_h, v.out_w, p.act_min, p.act_max)


def forward_max(p: PoolParams, x: np.ndarray) -> np.ndarray:
    v = p.win
    return max_pool_int8(x, p.filter_h, p.filter_w, v.stride_h, v.stride_w, v.pad_top, v.pad_left,
                         v.out_h, v.out_w, p.act_min, p.act_max)


def macs(op, model) -> int:
    out = model.tensors[op.outputs[0]]
    return int(np.prod(out.shape[1:])) * op.options.get("filter_h", 1) * op.options.get("filter_w", 1)


@njit(cache=True)
def _rounded_div(acc, count):
    # LiteRT: (acc +- count/2) / count with C division (truncation): rounds half away from zero.
    if acc > 0:
        return (acc + count // 2) // count
    return -((-acc + count // 2) // count)


@njit(cache=True, parallel=True)
def average_pool_int8(x, filter_h, filter_w, stride_h, stride_w, pad_top, pad_left, out_h, out_w,
                      act_min, act_max):
    # Only cells inside the input count: padding never enters the sum or the divisor.
    n, in_h, in_w, c = x.shape
    out = np.empty((n, out_h, out_w, c), np.int8)
    for row in prange(n * out_h):
        b = row // out_h
        oy = row % out_h
        y0 = max(oy * stride_h - pad_top, 0)
        y1 = min(oy * stride_h - pad_top + filter_h, in_h)
        acc = np.empty(c, np.int32)  # channels innermost: contiguous, vectorized
        for ox in range(out_w):
            x0 = max(ox * stride_w - pad_left, 0)
            x1 = min(ox * stride_w - pad_left + filter_w, in_w)
            count = (y1 - y0) * (x1 - x0)
            acc[:] = 0
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    for ch in range(c):
                        acc[ch] += np.int32(x[b, iy, ix, ch])
            for ch in range(c):
                v = _rounded_div(acc[ch], count) if count > 0 else 0
                out[b, oy, ox, ch] = min(max(v, act_min), act_max)
    return out


@njit(cache=True, parallel=True)
def max_pool_int8(x, filter_h, filter_w, stride_h, stride_w, pad_top, pad_left, out_h, out_w,
                  act_min, act_max):
    n, in_h, in_w, c = x.shape
    out = np.empty((n, out_h, out_w, c), np.int8)
    for row in prange(n * out_h):
        b = row // out_h
        oy = row % out_h
        y0 = max(oy * stride_h - pad_top, 0)
        y1 = min(oy * stride_h - pad_top + filter_h, in_h)
        m = np.empty(c, np.int8)  # channels innermost: contiguous, vectorized
        for ox in range(out_w):
            x0 = max(ox * stride_w - pad_left, 0)
            x1 = min(ox * stride_w - pad_left + filter_w, in_w)
            m[:] = -128
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    for ch in range(c):
                        m[ch] = max(m[ch], x[b, iy, ix, ch])
            for ch in range(c):
                out[b, oy, ox, ch] = min(max(m[ch], act_min), act_max)
    return out


# --- backward ------------------------------------------------------------------------------------

def average_fraction_bits(p: PoolParams, error_bits: int) -> int:
    """Bits of the Q-format 1/count multiplier: as many as keep the int32 sum of all the windows
    overlapping one input cell (each |g| < 2^error_bits times 2^bits) from overflowing."""
    v = p.win
    overlap = -(-p.filter_h // v.stride_h) * -(-p.filter_w // v.stride_w)
    return max(0, min(15, 30 - error_bits - int(np.ceil(np.log2(overlap)))))


def grad_input_average(p: PoolParams, x: np.ndarray, g: np.ndarray, frac_bits: int) -> np.ndarray:
    """dX sums (int32) of AVERAGE_POOL_2D for the samples in ``g``: each output error spread over
    its valid cells, times round(2^frac_bits / count); the input error's scale is 2^-frac_bits
    times g's."""
    v = p.win
    return average_pool_grad_input(g, x.shape[1], x.shape[2], p.filter_h, p.filter_w, v.stride_h,
                                   v.stride_w, v.pad_top, v.pad_left, frac_bits)


def grad_input_max(p: PoolParams, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """dX sums (int32) of MAX_POOL_2D: each output error goes to the first maximal valid cell of
    its window (``x`` holds the same samples as ``g``)."""
    v = p.win
    return max_pool_grad_input(x, g, p.filter_h, p.filter_w, v.stride_h, v.stride_w, v.pad_top,
                               v.pad_left)


@njit(cache=True, parallel=True)
def average_pool_grad_input(g, in_h, in_w, filter_h, filter_w, stride_h, stride_w, pad_top, pad_left,
                            frac_bits):
    n, out_h, out_w, c = g.shape
    gx = np.zeros((n, in_h, in_w, c), np.int32)
    for b in prange(n):
        for oy in range(out_h):
            y0 = max(oy * stride_h - pad_top, 0)
            y1 = min(oy * stride_h - pad_top + filter_h, in_h)
            for ox in range(out_w):
                x0 = max(ox * stride_w - pad_left, 0)
                x1 = min(ox * stride_w - pad_left + filter_w, in_w)
                count = (y1 - y0) * (x1 - x0)
                if count == 0:
                    continue
                inv = ((1 << frac_bits) + count // 2) // count
                for iy in range(y0, y1):
                    for ix in range(x0, x1):
                        for ch in range(c):
                            gx[b, iy, ix, ch] += np.int32(g[b, oy, ox, ch]) * inv
    return gx


@njit(cache=True, parallel=True)
def max_pool_grad_input(x, g, filter_h, filter_w, stride_h, stride_w, pad_top, pad_left):
    n, in_h, in_w, c = x.shape
    _, out_h, out_w, _ = g.shape
    gx = np.zeros((n, in_h, in_w, c), np.int32)
    for b in prange(n):
        for oy in range(out_h):
            y0 = max(oy * stride_h - pad_top, 0)
            y1 = min(oy * stride_h - pad_top + filter_h, in_h)
            for ox in range(out_w):
                x0 = max(ox * stride_w - pad_left, 0)
                x1 = min(ox * stride_w - pad_left + filter_w, in_w)
                for ch in range(c):
                    best = -129
                    by = -1
                    bx = -1
                    for iy in range(y0, y1):
                        for ix in range(x0, x1):
                            if x[b, iy, ix, ch] > best:  # strict: the first maximum wins
                                best = x[b, iy, ix, ch]
                                by = iy
                                bx = ix
                    if by >= 0:
                        gx[b, by, bx, ch] += g[b, oy, ox, ch]
    return gx


def _backward(input_sums):
    def backward(p: PoolParams, ctx: Backward) -> list:
        if not ctx.wants[0]:
            return [None]
        err = ctx.errors[0]
        x, g = ctx.inputs[0], err.values
        sums, factor = input_sums(p)
        return [G.from_blocks(lambda a, b: sums(x[a:b], g[a:b]), g.shape[0], x.shape[1:],
                              err.scale * factor, ctx.block)]
    return backward


def _average_sums(p: PoolParams):
    bits = average_fraction_bits(p, G.ERROR_BITS)
    return (lambda x, g: grad_input_average(p, x, g, bits)), 2.0 ** -bits


def _max_sums(p: PoolParams):
    return (lambda x, g: grad_input_max(p, x, g)), 1.0


def clamp(p: PoolParams) -> tuple[int, int]:
    return p.act_min, p.act_max


def backward_bytes(op, model, q: MemoryQuery) -> int:
    """The output error, the input error, and int32 input sums a block of samples at a time."""
    x_e = q.elems(op.inputs[0])
    return 2 * q.elems(op.outputs[0]) + (2 * x_e + 6 * x_e * q.block // q.batch if q.wants(op.inputs[0]) else 0)


KERNELS = {
    "AVERAGE_POOL_2D": Kernel(prepare, forward_average, _backward(_average_sums), clamp, macs, backward_bytes,
                              output_quant="input"),
    "MAX_POOL_2D": Kernel(prepare, forward_max, _backward(_max_sums), clamp, macs, backward_bytes,
                          output_quant="input"),
}
