"""DEPTHWISE_CONV_2D, int8 per-channel, NHWC: output channel c = ic * multiplier + m."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import channel_sum
from ..quant import SHIFT_AFTER_MULTIPLY, requantize
from . import linear as _linear
from .contract import Kernel
from .common import (Requant, Window, check_bias, check_output_shape, conv_requant, output, tensor, where,
                     window, window_macs as macs)


@dataclass(frozen=True)
class DepthwiseParams:
    win: Window
    rq: Requant
    input_offset: int
    depth_multiplier: int
    zero_bias: np.ndarray
    kernel: tuple = (1, 1)  # (KH, KW)


def prepare(op, model) -> DepthwiseParams:
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    w = tensor(model, op, 1, dtype=np.int8, constant=True, rank=4)
    out = output(model, op)
    _, kh, kw, cout = w.shape
    cin = x.shape[3]
    if w.shape[0] != 1 or cout % cin:
        raise ModelError(f"{where(op)}: filter {list(w.shape)} does not fit {cin} input channels")
    o = op.options
    mult = cout // cin
    if o.get("depth_multiplier", mult) not in (mult, 0):
        raise ModelError(f"{where(op)}: depth_multiplier {o['depth_multiplier']} != {cout}/{cin}")
    win = window(op, x.shape[1], x.shape[2], kh, kw, o.get("padding", "VALID"), o.get("stride_h", 1),
                 o.get("stride_w", 1), o.get("dilation_h", 1), o.get("dilation_w", 1))
    check_output_shape(op, out, (1, win.out_h, win.out_w, cout))
    check_bias(model, op, cout)
    if w.quant.per_channel and w.quant.axis != 3:
        raise ModelError(f"{where(op)}: per-channel filter must be quantized along axis 3")
    rq = conv_requant(op, x, w, out, cout, o.get("activation", "NONE"))
    if model.litert.depthwise_3x3_kernel and fast_3x3_kernel(x.shape, kh, kw, mult, win):
        rq = replace(rq, rounding=SHIFT_AFTER_MULTIPLY)
    return DepthwiseParams(win, rq, -x.quant.zp, mult, np.zeros(cout, np.int32), (kh, kw))


def fast_3x3_kernel(in_shape: tuple, kh: int, kw: int, depth_multiplier: int, win: Window) -> bool:
    """Fast3x3FilterKernelSupported (depthwiseconv_3x3_filter_common.h): whether aarch64's LiteRT
    runs its NEON 3x3 kernel. Its per-channel caller passes output_shift 0, so channels with a
    positive shift are not excluded (and are shifted after the multiply there)."""
    _, in_h, in_w, in_d = in_shape
    v = win  # short: the conditions below are LiteRT's, written as it writes them
    if not (kh == 3 and kw == 3 and depth_multiplier == 1 and v.stride_w in (1, 2) and v.stride_h == v.stride_w
            and v.pad_left in (0, 1) and v.pad_top == v.pad_left and in_d % 8 == 0
            and v.dil_h == 1 and v.dil_w == 1):
        return False
    x_end = (v.out_w - 1) * v.stride_w - v.pad_left + 3
    y_end = (v.out_h - 1) * v.stride_h - v.pad_top + 3
    if v.pad_left == 0:
        return x_end <= in_w and y_end <= in_h
    if not (x_end <= in_w + 1 and y_end <= in_h + 1):
        return False
    return in_w == in_h if (in_w == 1 or in_h == 1) else True


def forward(p: DepthwiseParams, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    bias = p.zero_bias if bias is None else bias
    v, r = p.win, p.rq
    return depthwise_int8(x, w, bias, p.input_offset, p.depth_multiplier, r.multiplier, r.shift,
                          r.out_zero_point, r.act_min, r.act_max, v.stride_h, v.stride_w, v.dil_h,
                          v.dil_w, v.pad_top, v.pad_left, v.out_h, v.out_w, r.rounding)


@njit(cache=True, parallel=True)
def depthwise_int8(x, w, bias, input_offset, depth_multiplier, mult, shift, out_zp, act_min, act_max,
                   stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w, rounding):
    # Accumulate a row of output channels per tap so the inner loop runs over contiguous channels.
    # (x - zp) * w fits int16 (|.| <= 255 * 127), so products are int16 lanes widened into int32
    # sums; every step is truncated explicitly, else numba computes in int64 (a quarter of the lanes).
    n, in_h, in_w, cin = x.shape
    _, k_h, k_w, cout = w.shape
    out = np.empty((n, out_h, out_w, cout), np.int8)
    vector_channels = cout - cout % 8
    offset16 = np.int16(input_offset)
    w16 = w[0].astype(np.int16)
    for row in prange(n * out_h):
        b = row // out_h
        oy = row % out_h
        acc = np.empty(cout, np.int32)
        xm = np.empty(cout, np.int16)
        for ox in range(out_w):
            for oc in range(cout):
                acc[oc] = bias[oc]
            for ky in range(k_h):
                iy = oy * stride_h - pad_top + ky * dil_h
                if iy < 0 or iy >= in_h:
                    continue
                for kx in range(k_w):
                    ix = ox * stride_w - pad_left + kx * dil_w
                    if ix < 0 or ix >= in_w:
                        continue
                    # direct indexing throughout: a row view made per tap costs a reference count
                    if depth_multiplier == 1:
                        for oc in range(cout):
                            prod = np.int16(np.int16(np.int16(x[b, iy, ix, oc]) + offset16) * w16[ky, kx, oc])
                            acc[oc] = np.int32(acc[oc] + np.int32(prod))
                    else:
                        for oc in range(cout):
                            xm[oc] = np.int16(np.int16(x[b, iy, ix, oc // depth_multiplier]) + offset16)
                        for oc in range(cout):
                            acc[oc] = np.int32(acc[oc] + np.int32(np.int16(xm[oc] * w16[ky, kx, oc])))
            for oc in range(cout):
                # DepthwiseConvGeneral's Quantize: 8 channels at a time in vector code, the
                # last cout % 8 channels in its scalar loop (the two round ties differently).
                out[b, oy, ox, oc] = requantize(acc[oc], mult[oc], shift[oc], out_zp, act_min, act_max,
                                                oc >= vector_channels, rounding)
    return out


# --- backward ------------------------------------------------------------------------------------

def grad_params(p: DepthwiseParams, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias gradients of DEPTHWISE_CONV_2D (int64 sums of int32 products)."""
    v = p.win
    k_h, k_w = p.kernel
    gw = depthwise_grad_weight(x, g, p.input_offset, p.depth_multiplier, k_h, k_w, v.stride_h,
                               v.stride_w, v.dil_h, v.dil_w, v.pad_top, v.pad_left)
    return gw, channel_sum(g)


def grad_input(p: DepthwiseParams, w: np.ndarray, g_folded: np.ndarray, in_shape: tuple) -> np.ndarray:
    """Input gradient sums (int32) of DEPTHWISE_CONV_2D for the samples in ``g_folded``."""
    v = p.win
    cin = g_folded.shape[-1] // p.depth_multiplier
    return depthwise_grad_input(g_folded, w, in_shape[0], in_shape[1], cin, p.depth_multiplier, v.stride_h,
                                v.stride_w, v.dil_h, v.dil_w, v.pad_top, v.pad_left)


FLUSH = 128  # g * (x - zp) < 2^23: 128 such products still fit an int32 sum


@njit(cache=True, parallel=True)
def depthwise_grad_weight(x, g, input_offset, depth_multiplier, k_h, k_w, stride_h, stride_w,
                          dil_h, dil_w, pad_top, pad_left):
    # dW[0, ky, kx, oc] = sum g[b, oy, ox, oc] * (x[b, iy, ix, oc // M] - zp), one tap per task,
    # contiguous over channels; int32 row sums flushed into the int64 total every FLUSH pixels.
    n, in_h, in_w, _ = x.shape
    _, out_h, out_w, cout = g.shape
    gw = np.zeros((1, k_h, k_w, cout), np.int64)
    offset16 = np.int16(input_offset)
    for t in prange(k_h * k_w):
        ky = t // k_w
        kx = t % k_w
        part = np.zeros(cout, np.int32)
        xm = np.empty(cout, np.int16)
        total = gw[0, ky, kx]
        pending = 0
        for b in range(n):
            for oy in range(out_h):
                iy = oy * stride_h - pad_top + ky * dil_h
                if iy < 0 or iy >= in_h:
                    continue
                for ox in range(out_w):
                    ix = ox * stride_w - pad_left + kx * dil_w
                    if ix < 0 or ix >= in_w:
                        continue
                    if depth_multiplier == 1:
                        for oc in range(cout):
                            part[oc] = np.int32(part[oc] + np.int32(g[b, oy, ox, oc]) *
                                                np.int32(np.int16(np.int16(x[b, iy, ix, oc]) + offset16)))
                    else:
                        for oc in range(cout):
                            xm[oc] = np.int16(np.int16(x[b, iy, ix, oc // depth_multiplier]) + offset16)
                        for oc in range(cout):
                            part[oc] = np.int32(part[oc] + np.int32(g[b, oy, ox, oc]) * np.int32(xm[oc]))
                    pending += 1
                    if pending == FLUSH:
                        for oc in range(cout):
                            total[oc] += part[oc]
                            part[oc] = 0
                        pending = 0
        for oc in range(cout):
            total[oc] += part[oc]
    return gw


@njit(cache=True, parallel=True)
def depthwise_grad_input(g, w, in_h, in_w, cin, depth_multiplier, stride_h, stride_w, dil_h, dil_w,
                         pad_top, pad_left):
    # dX[b, iy, ix, oc // M] += g[b, oy, ox, oc] * w[ky, kx, oc], contiguous over channels, int32
    # sums (bounded by grad.channel_fold) truncated explicitly. One sample per task.
    n, out_h, out_w, cout = g.shape
    _, k_h, k_w, _ = w.shape
    w16 = w[0].astype(np.int16)
    gx = np.zeros((n, in_h, in_w, cin), np.int32)
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
                        if depth_multiplier == 1:
                            for oc in range(cout):
                                gx[b, iy, ix, oc] = np.int32(gx[b, iy, ix, oc] + np.int32(g[b, oy, ox, oc])
                                                             * np.int32(w16[ky, kx, oc]))
                        else:
                            for oc in range(cout):
                                c = oc // depth_multiplier
                                gx[b, iy, ix, c] = np.int32(gx[b, iy, ix, c] + np.int32(g[b, oy, ox, oc])
                                                            * np.int32(w16[ky, kx, oc]))
    return gx


KERNELS = {"DEPTHWISE_CONV_2D": Kernel(prepare, forward, _linear.make_backward(grad_params, grad_input, depthwise=True),
                                       _linear.clamp, macs, _linear.make_backward_bytes(),
                                       parameters=_linear.PARAMETERS,
                             output_bound=_linear.output_bound)}
