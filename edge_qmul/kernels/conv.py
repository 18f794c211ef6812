"""CONV_2D, int8 per-channel, NHWC: y = requantize(sum (x - zp_in) * w + bias)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..grad import channel_sum
from ..quant import requantize
from .common import (Requant, Window, check_output_shape, conv_requant, output, tensor, where, window,
                     window_macs as macs)


@dataclass(frozen=True)
class ConvParams:
    win: Window
    rq: Requant
    input_offset: int
    zero_bias: np.ndarray
    kernel: tuple = (1, 1)  # (KH, KW)


def prepare(op, model) -> ConvParams:
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    w = tensor(model, op, 1, dtype=np.int8, constant=True, rank=4)
    out = output(model, op)
    cout, kh, kw, cin = w.shape
    if x.shape[3] != cin:
        from ..errors import ModelError
        raise ModelError(f"{where(op)}: input has {x.shape[3]} channels, filter expects {cin}")
    o = op.options
    win = window(op, x.shape[1], x.shape[2], kh, kw, o.get("padding", "VALID"), o.get("stride_h", 1),
                 o.get("stride_w", 1), o.get("dilation_h", 1), o.get("dilation_w", 1))
    check_output_shape(op, out, (1, win.out_h, win.out_w, cout))
    rq = conv_requant(op, x, w, out, cout, o.get("activation", "NONE"))
    return ConvParams(win, rq, -x.quant.zp, np.zeros(cout, np.int32), (kh, kw))


def forward(p: ConvParams, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    bias = p.zero_bias if bias is None else bias
    v, r = p.win, p.rq
    return conv2d_int8(x, w, bias, p.input_offset, r.multiplier, r.shift, r.out_zero_point, r.act_min,
                       r.act_max, v.stride_h, v.stride_w, v.dil_h, v.dil_w, v.pad_top, v.pad_left,
                       v.out_h, v.out_w)


@njit(cache=True, parallel=True)
def conv2d_int8(x, w, bias, input_offset, mult, shift, out_zp, act_min, act_max,
                stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w):
    # im2col one output pixel at a time: the patch holds (x - zp_in) as int32, and cells outside the
    # input stay 0, which is what LiteRT's padding means (the pad value is the input zero point).
    # |patch| <= 255 and |w| <= 127, so K < 2^31 / 32385 = 66k taps cannot overflow the int32 sum.
    n, in_h, in_w, cin = x.shape
    cout, k_h, k_w, _ = w.shape
    taps = k_h * k_w * cin
    w2 = w.reshape(cout, taps)
    out = np.empty((n, out_h, out_w, cout), np.int8)
    for row in prange(n * out_h):
        b = row // out_h
        oy = row % out_h
        patch = np.zeros(taps, np.int32)
        for ox in range(out_w):
            k = 0
            for ky in range(k_h):
                iy = oy * stride_h - pad_top + ky * dil_h
                for kx in range(k_w):
                    ix = ox * stride_w - pad_left + kx * dil_w
                    if 0 <= iy < in_h and 0 <= ix < in_w:
                        for c in range(cin):
                            patch[k + c] = np.int32(x[b, iy, ix, c]) + input_offset
                    else:
                        for c in range(cin):
                            patch[k + c] = 0
                    k += cin
            for oc in range(cout):
                acc = np.int32(0)
                for t in range(taps):
                    acc += patch[t] * np.int32(w2[oc, t])
                out[b, oy, ox, oc] = requantize(np.int32(acc + bias[oc]), mult[oc], shift[oc],
                                                out_zp, act_min, act_max)
    return out


# --- backward ------------------------------------------------------------------------------------

def grad_params(p: ConvParams, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias gradients of CONV_2D from the clamp-masked output error values ``g``:
    int64 sums of int32 products, dW = sum g * (x - zp_in), db = sum g (scales attached by the caller)."""
    v = p.win
    k_h, k_w = p.kernel
    gw = conv2d_grad_weight(x, g, p.input_offset, k_h, k_w, v.stride_h, v.stride_w, v.dil_h, v.dil_w,
                            v.pad_top, v.pad_left)
    return gw, channel_sum(g)


def grad_input(p: ConvParams, w: np.ndarray, g_folded: np.ndarray, in_shape: tuple) -> np.ndarray:
    """Input gradient sums (int32) of CONV_2D for the samples in ``g_folded`` (errors with the
    per-channel filter scales folded in, see grad.channel_fold)."""
    v = p.win
    return conv2d_grad_input(g_folded, w, in_shape[0], in_shape[1], v.stride_h, v.stride_w, v.dil_h, v.dil_w,
                             v.pad_top, v.pad_left)


@njit(cache=True, parallel=True)
def conv2d_grad_weight(x, g, input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left):
    # One output channel per thread: dW[oc] += g[b, oy, ox, oc] * (x[b, iy, ix, :] - zp_in).
    # |g| <= 2^15 and |x - zp| <= 255: each product fits int32; sums are int64 (no overflow for any
    # batch or image size).
    n, in_h, in_w, cin = x.shape
    _, out_h, out_w, cout = g.shape
    gw = np.zeros((cout, k_h, k_w, cin), np.int64)
    for oc in prange(cout):
        for b in range(n):
            for oy in range(out_h):
                for ox in range(out_w):
                    gv = np.int32(g[b, oy, ox, oc])
                    if gv == 0:
                        continue
                    for ky in range(k_h):
                        iy = oy * stride_h - pad_top + ky * dil_h
                        if iy < 0 or iy >= in_h:
                            continue
                        for kx in range(k_w):
                            ix = ox * stride_w - pad_left + kx * dil_w
                            if ix < 0 or ix >= in_w:
                                continue
                            for c in range(cin):
                                gw[oc, ky, kx, c] += gv * (np.int32(x[b, iy, ix, c]) + input_offset)
    return gw


@njit(cache=True, parallel=True)
def conv2d_grad_input(g, w, in_h, in_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left):
    # Scatter each output error through the filter: dX[b, iy, ix, :] += g[b, oy, ox, oc] * w[oc, ky, kx, :].
    # Padding cells receive nothing (they were constants). One sample per thread.
    n, out_h, out_w, cout = g.shape
    _, k_h, k_w, cin = w.shape
    gx = np.zeros((n, in_h, in_w, cin), np.int32)  # bounded by grad.channel_fold
    for b in prange(n):
        for oy in range(out_h):
            for ox in range(out_w):
                for ky in range(k_h):
                    iy = oy * stride_h - pad_top + ky * dil_h
                    if iy < 0 or iy >= in_h:
                        continue
                    for kx in range(k_w):
                        ix = ox * stride_w - pad_left + kx * dil_w
                        if ix < 0 or ix >= in_w:
                            continue
                        for oc in range(cout):
                            gv = np.int32(g[b, oy, ox, oc])
                            if gv == 0:
                                continue
                            for c in range(cin):
                                gx[b, iy, ix, c] += gv * np.int32(w[oc, ky, kx, c])
    return gx
