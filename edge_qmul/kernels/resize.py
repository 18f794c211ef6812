"""RESIZE_NEAREST_NEIGHBOR and RESIZE_BILINEAR, int8 NHWC: values are moved or interpolated, never
requantized (the output keeps the input's quantization).

Which LiteRT 2.3.0 code each op reproduces (x86_64 builtin kernels):

- RESIZE_NEAREST_NEIGHBOR (resize_nearest_neighbor.cc, kGenericOptimized): with neither
  align_corners nor half_pixel_centers, optimized_ops::ResizeNearestNeighbor picks the source index
  in 16-bit fixed point, ``min((i * ((in << 16) / out + 1)) >> 16, in - 1)``; otherwise
  reference_ops::GetNearestNeighbor in float32 (floor, or std::round under align_corners).
- RESIZE_BILINEAR (resize_bilinear.cc): optimized_ops::ResizeBilinear for int8 forwards to
  reference_ops::ResizeBilinearInteger: a 10-bit fixed-point source coordinate per output row and
  column, int64 products of the four neighbours with 20-bit weights, rounded half away from zero
  (TFLITE_SINGLE_ROUNDING off). Under half_pixel_centers the first coordinates are negative and
  LiteRT keeps the negative fraction as a weight (both taps then read the same cell: still exact).

Both ops are separable: prepare turns the geometry into per-row and per-column tables (source
index, and for bilinear the second index and the 10-bit fraction), so the compiled loops only index.
The backward is the transpose of the same integer map: a scatter-add of the output error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .. import grad as G
from ..errors import ModelError
from ..quant import rounding_divide_by_pot
from .common import check_output_shape, output, per_tensor, tensor, where
from .contract import Backward, Kernel, MemoryQuery

ONE = 1 << 10  # ResizeBilinearInteger's fixed-point 1.0 of a coordinate


@dataclass(frozen=True)
class NearestParams:
    rows: np.ndarray  # per output row: source row (int64)
    cols: np.ndarray  # per output column: source column
    ratio: float      # s_out / s_in: d(real out) / d(real in) of a copied value (1 when equal)


@dataclass(frozen=True)
class BilinearParams:
    y0: np.ndarray    # per output row: upper source row, lower source row, 10-bit fraction
    y1: np.ndarray
    fy: np.ndarray
    x0: np.ndarray    # per output column: the same
    x1: np.ndarray
    fx: np.ndarray
    ratio: float


def _geometry(op, model):
    """Checks shared by both ops; returns (in_h, in_w, out_h, out_w, align_corners, half_pixel, ratio)."""
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    size = tensor(model, op, 1, dtype=np.int32, constant=True)
    out = output(model, op)
    qi, qo = per_tensor(op, x, "input"), per_tensor(op, out, "output")
    hw = np.asarray(size.data).reshape(-1)
    if hw.size != 2 or np.any(hw <= 0):
        raise ModelError(f"{where(op)}: size must hold two positive values, got {hw.tolist()}")
    out_h, out_w = int(hw[0]), int(hw[1])
    check_output_shape(op, out, (x.shape[0], out_h, out_w, x.shape[3]))
    align = bool(op.options.get("align_corners", False))
    half = bool(op.options.get("half_pixel_centers", False))
    return x.shape[1], x.shape[2], out_h, out_w, align, half, float(qo.s) / float(qi.s)


# --- RESIZE_NEAREST_NEIGHBOR ---------------------------------------------------------------------

def nearest_indices(in_size: int, out_size: int, align: bool, half: bool) -> np.ndarray:
    """The source index of each output index, as LiteRT computes it."""
    i = np.arange(out_size, dtype=np.int64)
    if not align and not half:
        # optimized_ops: 16 fractional bits, +1 so that 1/3 does not truncate to 0
        scale = (in_size << 16) // out_size + 1
        return np.minimum((i * scale) >> 16, in_size - 1)
    # reference_ops::GetNearestNeighbor: every step in float32
    f32 = np.float32
    scale = f32(in_size - 1) / f32(out_size - 1) if align and out_size > 1 else f32(in_size) / f32(out_size)
    v = (i.astype(f32) + f32(0.5 if half else 0.0)) * scale
    idx = np.floor(v)
    if align:  # std::round, ties away from zero (v >= 0; v - floor(v) is exact, v + 0.5 might not be)
        idx = idx + (v - idx >= f32(0.5))
    idx = np.minimum(idx.astype(np.int64), in_size - 1)
    return np.maximum(idx, 0) if half else idx


def prepare_nearest(op, model) -> NearestParams:
    in_h, in_w, out_h, out_w, align, half, ratio = _geometry(op, model)
    return NearestParams(nearest_indices(in_h, out_h, align, half), nearest_indices(in_w, out_w, align, half),
                         ratio)


def forward_nearest(p: NearestParams, x: np.ndarray, *_size) -> np.ndarray:
    return resize_nearest_int8(x, p.rows, p.cols)


@njit(cache=True, parallel=True)
def resize_nearest_int8(x, rows, cols):
    n, _, _, c = x.shape
    out = np.empty((n, rows.size, cols.size, c), np.int8)
    for b in prange(n):
        for oy in range(rows.size):
            for ox in range(cols.size):
                out[b, oy, ox, :] = x[b, rows[oy], cols[ox], :]
    return out


@njit(cache=True, parallel=True)
def nearest_grad_input(g, rows, cols, in_h, in_w):
    # Each output cell copied one input cell: its error goes back there (int32: few cells meet).
    n, out_h, out_w, c = g.shape
    gx = np.zeros((n, in_h, in_w, c), np.int32)
    for b in prange(n):
        for oy in range(out_h):
            for ox in range(out_w):
                for ch in range(c):
                    gx[b, rows[oy], cols[ox], ch] += g[b, oy, ox, ch]
    return gx


def _backward(ctx: Backward, grad_input, ratio: float, frac_bits: int = 0) -> list:
    """The input's error (the size input has none): ``grad_input(g, in_h, in_w)`` gives the integer
    sums of a block of output errors ``g``, in units of the output error's scale times ``ratio``
    times 2^-frac_bits."""
    if not ctx.wants[0]:
        return [None, None]
    err, (_, in_h, in_w, _) = ctx.zeros_error(0), ctx.inputs[0].shape
    g = err.values
    return [G.from_blocks(lambda a, b: grad_input(g[a:b], in_h, in_w), g.shape[0], ctx.inputs[0].shape[1:],
                          err.scale * ratio * 2.0 ** -frac_bits, ctx.block), None]


def backward_nearest(p: NearestParams, ctx: Backward) -> list:
    return _backward(ctx, lambda g, in_h, in_w: nearest_grad_input(g, p.rows, p.cols, in_h, in_w), p.ratio)


# --- RESIZE_BILINEAR -----------------------------------------------------------------------------

def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def bilinear_taps(in_size: int, out_size: int, align: bool, half: bool):
    """ComputeInterpolationValuesInteger for every output index: (lower, upper, 10-bit fraction)."""
    if align and out_size > 1:
        scale_10 = (ONE * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
    else:
        scale_10 = (ONE * in_size + out_size // 2) // out_size
    lo, hi, frac = (np.empty(out_size, np.int64) for _ in range(3))
    for i in range(out_size):
        v = i * scale_10 + scale_10 // 2 - (1 << 9) if half else i * scale_10
        lo[i] = max(_c_div(v, ONE), 0)
        hi[i] = min(_c_div(v + ONE - 1, ONE), in_size - 1)
        frac[i] = v - ONE * lo[i]  # negative near the start under half_pixel_centers, as in LiteRT
    return lo, hi, frac


def prepare_bilinear(op, model) -> BilinearParams:
    in_h, in_w, out_h, out_w, align, half, ratio = _geometry(op, model)
    if align and half:
        raise ModelError(f"{where(op)}: align_corners and half_pixel_centers cannot both be set")
    y0, y1, fy = bilinear_taps(in_h, out_h, align, half)
    x0, x1, fx = bilinear_taps(in_w, out_w, align, half)
    if y0.max() > in_h - 1 or x0.max() > in_w - 1:
        # the 10-bit scale, rounded up, walks past the last row (e.g. 2 -> 99): LiteRT's kernel then
        # reads outside the input (only the upper tap is clamped), so there is no result to match
        raise ModelError(f"{where(op)}: resize {in_h}x{in_w} -> {out_h}x{out_w}: LiteRT's int8 kernel "
                         "reads outside the input at this ratio (its 10-bit scale rounds up)")
    return BilinearParams(y0, y1, fy, x0, x1, fx, ratio)


def forward_bilinear(p: BilinearParams, x: np.ndarray, *_size) -> np.ndarray:
    return resize_bilinear_int8(x, p.y0, p.y1, p.fy, p.x0, p.x1, p.fx)


@njit(cache=True, inline="always")
def _tap_weights(fy, fx, oy, ox):
    """The 20-bit weights of output cell (oy, ox)'s taps (y0, x0), (y1, x0), (y0, x1), (y1, x1)."""
    ty, by = ONE - fy[oy], fy[oy]
    lx, rx = ONE - fx[ox], fx[ox]
    return ty * lx, by * lx, ty * rx, by * rx


@njit(cache=True, parallel=True)
def resize_bilinear_int8(x, y0, y1, fy, x0, x1, fx):
    n, _, _, c = x.shape
    out_h, out_w = y0.size, x0.size
    out = np.empty((n, out_h, out_w, c), np.int8)
    for b in prange(n):
        for oy in range(out_h):
            for ox in range(out_w):
                w00, w10, w01, w11 = _tap_weights(fy, fx, oy, ox)
                for ch in range(c):
                    acc = (np.int64(x[b, y0[oy], x0[ox], ch]) * w00 + np.int64(x[b, y1[oy], x0[ox], ch]) * w10
                           + np.int64(x[b, y0[oy], x1[ox], ch]) * w01 + np.int64(x[b, y1[oy], x1[ox], ch]) * w11)
                    # LiteRT: (acc +- 2^19) / 2^20 in int64 C division, half away from zero. |acc| <=
                    # 128 * 2^22 (the taps' |weights| sum to at most 2048^2, a negative fraction
                    # included): int32 holds it
                    out[b, oy, ox, ch] = rounding_divide_by_pot(np.int32(acc), 20)
    return out


@njit(cache=True, parallel=True)
def bilinear_grad_input(g, y0, y1, fy, x0, x1, fx, in_h, in_w):
    # The transpose of the forward's integer map: each output error goes to its four taps with the
    # same 20-bit weights (int64: a 15-bit error times a weight up to ~2^21).
    n, out_h, out_w, c = g.shape
    gx = np.zeros((n, in_h, in_w, c), np.int64)
    for b in prange(n):
        for oy in range(out_h):
            for ox in range(out_w):
                w00, w10, w01, w11 = _tap_weights(fy, fx, oy, ox)
                for ch in range(c):
                    v = np.int64(g[b, oy, ox, ch])
                    gx[b, y0[oy], x0[ox], ch] += v * w00
                    gx[b, y1[oy], x0[ox], ch] += v * w10
                    gx[b, y0[oy], x1[ox], ch] += v * w01
                    gx[b, y1[oy], x1[ox], ch] += v * w11
    return gx


def backward_bilinear(p: BilinearParams, ctx: Backward) -> list:
    # the weights are 20-bit fixed point (ONE * ONE)
    return _backward(ctx, lambda g, in_h, in_w: bilinear_grad_input(g, p.y0, p.y1, p.fy, p.x0, p.x1, p.fx,
                                                                    in_h, in_w), p.ratio, 20)


# --- contract --------------------------------------------------------------------------------------

def macs_bilinear(op, model) -> int:
    return 4 * int(np.prod(model.tensors[op.outputs[0]].shape))


def _sums_bytes(width: int):
    def backward_bytes(op, model, q: MemoryQuery) -> int:
        """The output error, the input error, and the input sums of one block of samples."""
        x_e = q.elems(op.inputs[0])
        sums = width * x_e * min(q.block, q.batch) // q.batch
        return 2 * q.elems(op.outputs[0]) + (2 * x_e + sums if q.wants(op.inputs[0]) else 0)
    return backward_bytes


KERNELS = {
    "RESIZE_NEAREST_NEIGHBOR": Kernel(prepare_nearest, forward_nearest, backward_nearest,
                                      backward_bytes=_sums_bytes(4), output_quant="input"),
    "RESIZE_BILINEAR": Kernel(prepare_bilinear, forward_bilinear, backward_bilinear, macs=macs_bilinear,
                              backward_bytes=_sums_bytes(8), output_quant="input"),
}
