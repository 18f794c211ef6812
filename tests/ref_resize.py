"""Float64 references of RESIZE_NEAREST_NEIGHBOR and RESIZE_BILINEAR (tests only).

The op's definition (TensorFlow's resize with align_corners / half_pixel_centers) in float64 on real
values, not LiteRT's fixed-point coordinates: the engine's integer forward and backward are checked
against the ideal op. The int8 op moves or interpolates stored values without requantizing, so with
different input and output quantization the real map is ``y = (s_out / s_in) * resize(x) +
s_out * (z_in - z_out)``; the backward is the transposed interpolation times s_out / s_in.
"""
from __future__ import annotations

import numpy as np

import reference


def _geometry(model, op):
    x_t, y_t = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
    align = bool(op.options.get("align_corners", False))
    half = bool(op.options.get("half_pixel_centers", False))
    ratio = float(y_t.quant.s) / float(x_t.quant.s)
    offset = float(y_t.quant.s) * (x_t.quant.zp - y_t.quant.zp)
    return x_t.shape[1:3], y_t.shape[1:3], align, half, ratio, offset


def _scale(n_in: int, n_out: int, align: bool) -> float:
    return (n_in - 1) / (n_out - 1) if align and n_out > 1 else n_in / n_out


def nearest_index(n_in: int, n_out: int, align: bool, half: bool) -> np.ndarray:
    v = (np.arange(n_out) + (0.5 if half else 0.0)) * _scale(n_in, n_out, align)
    idx = np.floor(v + 0.5) if align else np.floor(v)
    return np.clip(idx.astype(np.int64), 0, n_in - 1)


def linear_matrix(n_in: int, n_out: int, align: bool, half: bool) -> np.ndarray:
    """(n_out, n_in) interpolation weights along one axis."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        v = ((i + 0.5) * _scale(n_in, n_out, align) - 0.5) if half else i * _scale(n_in, n_out, align)
        lo = min(max(int(np.floor(v)), 0), n_in - 1)
        hi = min(int(np.ceil(v)), n_in - 1)
        f = min(max(v - lo, 0.0), 1.0)  # outside the input the edge value extends
        m[i, lo] += 1.0 - f
        m[i, max(hi, lo)] += f
    return m


def _matrices(model, op):
    (ih, iw), (oh, ow), align, half, ratio, offset = _geometry(model, op)
    if op.kind == "RESIZE_NEAREST_NEIGHBOR":
        my, mx = np.eye(ih)[nearest_index(ih, oh, align, half)], np.eye(iw)[nearest_index(iw, ow, align, half)]
    else:
        my, mx = linear_matrix(ih, oh, align, half), linear_matrix(iw, ow, align, half)
    return my, mx, ratio, offset


def forward(model, op, xs):
    my, mx, ratio, offset = _matrices(model, op)
    y = np.einsum("yh,xw,nhwc->nyxc", my, mx, np.asarray(xs[0], np.float64))
    return [ratio * y + offset]


def backward(model, op, xs, ys, gs):
    if gs[0] is None:
        return [None, None]
    my, mx, ratio, _ = _matrices(model, op)
    return [ratio * np.einsum("yh,xw,nyxc->nhwc", my, mx, np.asarray(gs[0], np.float64)), None]


reference.register("RESIZE_NEAREST_NEIGHBOR", forward, backward)
reference.register("RESIZE_BILINEAR", forward, backward)
