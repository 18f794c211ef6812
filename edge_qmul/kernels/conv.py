"""CONV_2D, int8 per-channel, NHWC: y = requantize(sum (x - zp_in) * w + bias)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..quant import requantize
from .common import (Requant, Window, check_output_shape, conv_requant, output, tensor, where, window,
                     window_macs as macs)


@dataclass(frozen=True)
class ConvParams:
    win: Window
    rq: Requant
    input_offset: int
    zero_bias: np.ndarray


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
    return ConvParams(win, rq, -x.quant.zp, np.zeros(cout, np.int32))


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
