"""FULLY_CONNECTED, int8, per-tensor or per-channel filter: y[n, o] = requantize(sum (x - zp) * w[o])."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import channel_sum
from ..quant import activation_range, quantize_multipliers, requantize
from . import implicit_dot as _implicit_dot
from . import linear as _linear
from .contract import Kernel
from .common import Requant, check_bias, check_output_shape, output, per_tensor, tensor, where
from .dot_tile import dot_kind
from .gemm import MR, pack_panels, panel_width, row_bases, tile_product


@dataclass(frozen=True)
class FullyConnectedParams:
    rq: Requant
    input_offset: int
    depth: int
    out_shape: tuple
    zero_bias: np.ndarray


def prepare(op, model) -> FullyConnectedParams:
    x = tensor(model, op, 0, dtype=np.int8)
    w = tensor(model, op, 1, dtype=np.int8, constant=True, rank=2)
    out = output(model, op)
    cout, depth = w.shape
    if int(np.prod(x.shape)) % depth:
        raise ModelError(f"{where(op)}: input {list(x.shape)} does not split into rows of {depth}")
    if op.options.get("weights_format", "DEFAULT") != "DEFAULT":
        raise ModelError(f"{where(op)}: shuffled weights are not supported")
    if np.any(w.quant.zero_point != 0):
        raise ModelError(f"{where(op)}: filter {w.name!r} must have zero point 0")
    s_in, s_out = per_tensor(op, x, "input").s, per_tensor(op, out, "output").s
    if w.quant.per_channel:
        if w.quant.scale.size != cout:
            raise ModelError(f"{where(op)}: filter has {w.quant.scale.size} scales for {cout} outputs")
        real = s_in * w.quant.scale.astype(np.float64) / s_out
    else:
        # GetQuantizedConvolutionMultipler: input * filter scale is a float32 product, then double.
        real = np.full(cout, float(np.float32(s_in) * np.float32(w.quant.s)) / s_out)
    mult, shift = quantize_multipliers(real)
    lo, hi = activation_range(op.options.get("activation", "NONE"), out.quant)
    rows = int(np.prod(x.shape)) // depth
    keep = op.options.get("keep_num_dims", False)
    if rows > 1 and not keep:
        # LiteRT folds every leading axis into rows, so the batch axis disappears; the engine runs
        # batches along axis 0 and cannot tell samples apart in that output.
        raise ModelError(f"{where(op)}: input {list(x.shape)} has {rows} rows per sample and "
                         "keep_num_dims is false; only one row per sample (or keep_num_dims) is supported")
    shape = tuple(x.shape[:-1]) + (cout,) if keep else (rows, cout)
    check_output_shape(op, out, shape)
    check_bias(model, op, cout)
    # LiteRT's GEMM: filters (cout x depth) times the invocation's rows as destination columns
    rounding = model.litert.gemm(cout, depth, rows)
    return FullyConnectedParams(Requant(mult, shift, out.quant.zp, lo, hi, rounding), -x.quant.zp, depth,
                                tuple(out.shape[1:]), np.zeros(cout, np.int32))


def forward(p: FullyConnectedParams, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    bias = p.zero_bias if bias is None else bias
    n = x.shape[0]
    r = p.rq
    rows = np.ascontiguousarray(x).reshape(-1, p.depth)
    if rows.shape[0] >= 4 and dot_kind() is not None:  # int8 dot-product tiles (vpdpbusd / sdot)
        y = _implicit_dot.fc_forward(rows, np.ascontiguousarray(w), bias, -p.input_offset, r.multiplier, r.shift,
                                     r.out_zero_point, r.act_min, r.act_max, r.rounding)
        return y.reshape((n,) + p.out_shape)
    # a few rows: one dot product per output; four or more: the tile kernel (each weight pair
    # loaded once serves a panel of rows)
    kernel = fully_connected_int8_gemm if rows.shape[0] >= 4 else fully_connected_int8
    y = kernel(rows, np.ascontiguousarray(w), bias, p.input_offset, r.multiplier, r.shift, r.out_zero_point,
               r.act_min, r.act_max, r.rounding)
    return y.reshape((n,) + p.out_shape)


def macs(op, model) -> int:
    w = model.tensors[op.inputs[1]]
    x = model.tensors[op.inputs[0]]
    return int(np.prod(x.shape)) // w.shape[1] * int(np.prod(w.shape))


@njit(cache=True, parallel=True)
def fully_connected_int8(x, w, bias, input_offset, mult, shift, out_zp, act_min, act_max, rounding):
    rows, depth = x.shape
    cout = w.shape[0]
    out = np.empty((rows, cout), np.int8)
    # int16 (x - zp) times int8 weights, sums truncated to int32 at every step (numba would widen
    # them to int64 otherwise): LLVM makes int16 pair multiply-adds of it (vpmaddwd / smlal).
    for r in prange(rows):
        xv = np.empty(depth, np.int16)
        for k in range(depth):
            xv[k] = np.int16(np.int16(x[r, k]) + input_offset)
        for o in range(cout):
            wr = w[o]
            acc = np.int32(0)
            for k in range(depth):
                acc = np.int32(acc + np.int32(xv[k]) * np.int32(wr[k]))
            out[r, o] = requantize(np.int32(acc + bias[o]), mult[o], shift[o], out_zp, act_min, act_max,
                                   rounding=rounding)
    return out


@njit(cache=True, parallel=True)
def fully_connected_int8_gemm(x, w, bias, input_offset, mult, shift, out_zp, act_min, act_max, rounding):
    # out^T = w . (x - zp)^T through the tile kernel with the int8 weights as its rows, read in
    # place (packing them would cost as much as the product at batch 32); the batch rows are
    # packed into panels (panel_width) instead. The tile is requantized while it is in L1.
    rows, depth = x.shape
    cout = w.shape[0]
    if depth % 2:  # the tile kernel reads k in pairs: rows of an even length
        w_even = np.zeros((cout, depth + 1), np.int8)
        w_even[:, :depth] = w
    else:
        w_even = w
    xs = np.empty((rows, depth), np.int16)
    for r in range(rows):
        for k in range(depth):
            xs[r, k] = np.int16(np.int16(x[r, k]) + input_offset)
    panels = pack_panels(xs, panel_width(rows))
    nr = panels.shape[2] // 2
    out = np.empty((rows, cout), np.int8)
    for block in prange((cout + MR - 1) // MR):
        o0 = block * MR
        tile = np.empty((MR, nr), np.int32)
        bases = np.empty(MR, np.intp)
        one_tap = np.zeros(1, np.intp)
        row_bases(bases, o0, cout, w_even.shape[1])
        for p in range(panels.shape[0]):
            tile_product(w_even, bases, one_tap, panels, p, tile)
            for r in range(min(MR, cout - o0)):
                o = o0 + r
                for j in range(min(nr, rows - p * nr)):
                    out[p * nr + j, o] = requantize(np.int32(tile[r, j] + bias[o]), mult[o], shift[o], out_zp,
                                                    act_min, act_max, rounding=rounding)
    return out


# --- backward ------------------------------------------------------------------------------------

def grad_params(p: FullyConnectedParams, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias gradients of FULLY_CONNECTED (int64 sums of int32 products)."""
    rows = np.ascontiguousarray(x).reshape(-1, p.depth)
    g2 = np.ascontiguousarray(g).reshape(rows.shape[0], -1)
    return fully_connected_grad_weight(rows, g2, p.input_offset), channel_sum(g2)


def grad_input(p: FullyConnectedParams, w: np.ndarray, g_folded: np.ndarray, in_shape: tuple) -> np.ndarray:
    """Input gradient sums (int32) of FULLY_CONNECTED for the samples in ``g_folded``."""
    n = g_folded.shape[0]
    g2 = np.ascontiguousarray(g_folded).reshape(-1, w.shape[0])
    return fully_connected_grad_input(g2, w).reshape((n,) + tuple(in_shape))


FLUSH = 128  # g * (x - zp) < 2^23: 128 such products still fit an int32 sum


@njit(cache=True, parallel=True)
def fully_connected_grad_weight(x, g, input_offset):
    # dW[o, k] = sum_r g[r, o] * (x[r, k] - zp): int32 row sums over k, flushed into the int64
    # total every FLUSH rows. The (x - zp) rows are made once, as int16.
    rows, depth = x.shape
    cout = g.shape[1]
    xs = np.empty((rows, depth), np.int16)
    for r in range(rows):
        for k in range(depth):
            xs[r, k] = np.int16(np.int16(x[r, k]) + input_offset)
    gw = np.zeros((cout, depth), np.int64)
    for o in prange(cout):
        part = np.zeros(depth, np.int32)
        total = gw[o]
        pending = 0
        for r in range(rows):
            gv = np.int32(g[r, o])
            if gv == 0:
                continue
            xr = xs[r]
            for k in range(depth):
                part[k] = np.int32(part[k] + gv * np.int32(xr[k]))
            pending += 1
            if pending == FLUSH:
                for k in range(depth):
                    total[k] += part[k]
                    part[k] = 0
                pending = 0
        for k in range(depth):
            total[k] += part[k]
    return gw


@njit(cache=True, parallel=True)
def fully_connected_grad_input(g, w):
    # dX[r, k] = sum_o g_folded[r, o] * w[o, k], int32 sums (bounded by grad.channel_fold)
    # truncated explicitly.
    rows, cout = g.shape
    depth = w.shape[1]
    gx = np.zeros((rows, depth), np.int32)
    for r in prange(rows):
        dst = gx[r]
        for o in range(cout):
            gv = np.int32(g[r, o])
            if gv == 0:
                continue
            wr = w[o]
            for k in range(depth):
                dst[k] = np.int32(dst[k] + gv * np.int32(wr[k]))
    return gx


KERNELS = {"FULLY_CONNECTED": Kernel(prepare, forward,
                                     _linear.make_backward(grad_params, grad_input, fully_connected=True),
                                     _linear.clamp, macs, _linear.make_backward_bytes(),
                                     parameters=_linear.PARAMETERS,
                             output_bound=_linear.output_bound)}
