"""CONV_2D, int8 per-channel, NHWC: y = requantize(sum (x - zp_in) * w + bias), and its backward.

The forward and the stride-1 input gradient run through the implicit GEMM (implicit_gemm.py); the
weight gradient stages im2col rows of a few positions at a time for the tile kernel (or, for inputs
of a few channels, sums straight over output channels); the other input gradients scatter each
position's patch gradient back through its window.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numba
import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import channel_sum
from . import implicit_dot as _implicit_dot
from . import linear as _linear
from .contract import Kernel
from .common import (Requant, Window, check_bias, check_output_shape, conv_requant, output, tensor, where,
                     window, window_macs as macs)
from .dot_tile import dot_kind
from .gemm import MR, padded_params, panel_width, row_bases, tile_product
from .implicit_gemm import (border_geometry, conv2d_int8_implicit, conv2d_int32_implicit, next_position,
                            offset_into_border, pack_filters, positions_per_task, tap_offsets)


@dataclass(frozen=True)
class ConvParams:
    win: Window
    rq: Requant
    input_offset: int
    zero_bias: np.ndarray
    kernel: tuple = (1, 1)  # (KH, KW)
    panel_requant: tuple = ()  # (multiplier, shift) padded to whole panels (gemm.padded_params)


def prepare(op, model) -> ConvParams:
    x = tensor(model, op, 0, dtype=np.int8, rank=4)
    w = tensor(model, op, 1, dtype=np.int8, constant=True, rank=4)
    out = output(model, op)
    cout, kh, kw, cin = w.shape
    if x.shape[3] != cin:
        raise ModelError(f"{where(op)}: input has {x.shape[3]} channels, filter expects {cin}")
    o = op.options
    win = window(op, x.shape[1], x.shape[2], kh, kw, o.get("padding", "VALID"), o.get("stride_h", 1),
                 o.get("stride_w", 1), o.get("dilation_h", 1), o.get("dilation_w", 1))
    check_output_shape(op, out, (1, win.out_h, win.out_w, cout))
    check_bias(model, op, cout)
    rq = conv_requant(op, x, w, out, cout, o.get("activation", "NONE"))
    # LiteRT multiplies filters (cout x kh*kw*cin) by the im2col of one invocation's positions
    rq = replace(rq, rounding=model.litert.gemm(cout, kh * kw * cin, win.out_h * win.out_w))
    return ConvParams(win, rq, -x.quant.zp, np.zeros(cout, np.int32), (kh, kw),
                      padded_params(rq.multiplier, rq.shift))


def forward(p: ConvParams, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    bias = p.zero_bias if bias is None else bias
    v, r = p.win, p.rq
    if dot_kind() is not None:  # int8 dot-product tiles (vpdpbusd / sdot)
        return _implicit_dot.conv_forward(x, w, bias, -p.input_offset, v, r, r.multiplier, r.shift)
    cout, k_h, k_w, cin = w.shape
    positions = x.shape[0] * v.out_h * v.out_w
    rows, cols, channels, tap_len, offsets = border_geometry(x.shape[1], x.shape[2], cin, v, k_h, k_w)
    bias_p, = padded_params(bias)
    mult_p, shift_p = p.panel_requant or padded_params(r.multiplier, r.shift)
    out = conv2d_int8_implicit(x, w, p.input_offset, v.pad_top, v.pad_left, rows, cols, channels, tap_len,
                               offsets, bias_p, mult_p, shift_p, r.out_zero_point, r.act_min, r.act_max,
                               v.stride_h, v.stride_w, v.out_h, v.out_w,
                               positions_per_task(positions, 2 * len(offsets) * tap_len), r.rounding)
    return out.reshape(x.shape[0], v.out_h, v.out_w, cout)


# --- backward ------------------------------------------------------------------------------------

def grad_params(p: ConvParams, x: np.ndarray, g: np.ndarray, patch_bytes: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias gradients of CONV_2D from the clamp-masked output error values ``g``:
    int64 sums of int32 products, dW = sum g * (x - zp_in), db = sum g (scales attached by the caller).
    ``patch_bytes`` bounds the workspace (default PATCH_BYTES; grad_weight_plan)."""
    v = p.win
    k_h, k_w = p.kernel
    gw = conv2d_grad_weight(x, g, p.input_offset, k_h, k_w, v.stride_h, v.stride_w, v.dil_h, v.dil_w,
                            v.pad_top, v.pad_left, patch_bytes or PATCH_BYTES)
    return gw, channel_sum(g)


def grad_input(p: ConvParams, w: np.ndarray, g_folded: np.ndarray, in_shape: tuple) -> np.ndarray:
    """Input gradient sums (int32) of CONV_2D for the samples in ``g_folded`` (errors with the
    per-channel filter scales folded in, see grad.channel_fold)."""
    return grad_input_prepared(p, w, in_shape)(g_folded)


def grad_input_prepared(p: ConvParams, w: np.ndarray, in_shape: tuple):
    """``grad_input`` as a function of the error alone, the filters prepared once for every block
    of samples the trainer passes (grad.from_blocks)."""
    v = p.win
    cout, k_h, k_w, cin = w.shape
    in_h, in_w = in_shape[0], in_shape[1]
    # stride 1: a convolution of the zero-bordered error with the flipped filters (implicit GEMM
    # through the tile kernel); the corner where the error starts inside that border:
    top, left = (k_h - 1) * v.dil_h - v.pad_top, (k_w - 1) * v.dil_w - v.pad_left
    if not (v.stride_h == 1 and v.stride_w == 1 and top >= 0 and left >= 0):
        return lambda g: conv2d_grad_input(g, w, in_h, in_w, v.stride_h, v.stride_w, v.dil_h, v.dil_w,
                                           v.pad_top, v.pad_left)
    rows = max(in_h + (k_h - 1) * v.dil_h, top + v.out_h)
    cols = max(in_w + (k_w - 1) * v.dil_w, left + v.out_w)
    channels = cout + (cout & 1)
    panels = pack_filters(np.ascontiguousarray(w[:, ::-1, ::-1, :].transpose(3, 1, 2, 0)), channels)
    offsets = tap_offsets(k_h, k_w, v.dil_h, v.dil_w, cols, channels)

    def run(g: np.ndarray) -> np.ndarray:
        g16 = offset_into_border(g, 0, top, left, rows, cols, channels)
        return conv2d_int32_implicit(g16, offsets, panels, in_h, in_w, cin).reshape(g.shape[0], in_h, in_w, cin)
    return run


# Weight-gradient products g * (x - zp) reach 2^15 * 255 < 2^23: 128 of them still fit an int32
# sum, so sums run in int32 vector lanes and are flushed into the int64 total every FLUSH rows.
FLUSH = 128


PATCH_BYTES = 32 * 1024  # workspace budget of the weight gradient (staging rows, panels, task totals)
GW_CHUNK = 64  # positions per tile-kernel call in the weight gradient (<= FLUSH: int32 sums stay exact)


def grad_weight_plan(n: int, positions: int, cout: int, taps: int, cin: int,
                     patch_bytes: int = PATCH_BYTES) -> tuple[int, int]:
    """(tasks, workspace bytes) of CONV_2D's weight gradient: as many parallel tasks as threads,
    samples and the budget allow (each task beyond the first needs its own int64 totals), and the
    bytes they hold besides the int64 result. Trainer.memory_report counts the same bytes."""
    if cin <= FEW_CHANNELS:  # conv2d_grad_weight_few: int32 rows + int64 totals per task, then a sum
        per_task = 12 * taps * cout
        tasks = max(1, min(n, numba.get_num_threads(), patch_bytes // per_task))
        return tasks, tasks * per_task + 8 * taps * cout
    chunks = (positions + GW_CHUNK - 1) // GW_CHUNK
    nr = int(panel_width(taps))
    staging = 2 * ((GW_CHUNK + 1) * taps + ((taps + nr - 1) // nr) * GW_CHUNK * nr + cout * GW_CHUNK)
    totals = 8 * cout * taps
    tasks = max(1, min(chunks, numba.get_num_threads(), (patch_bytes + totals) // (staging + totals)))
    return tasks, tasks * staging + (tasks * totals if tasks > 1 else 0)


def conv2d_grad_weight(x, g, input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left,
                       patch_bytes: int = PATCH_BYTES):
    """dW[oc, tap] = sum over positions of g[pos, oc] * patch[pos, tap] (int64)."""
    n, out_h, out_w, cout = g.shape
    cin = x.shape[3]
    taps = k_h * k_w * cin
    tasks, _ = grad_weight_plan(n, n * out_h * out_w, cout, taps, cin, patch_bytes)
    if cin <= FEW_CHANNELS:
        gw_t = conv2d_grad_weight_few(x, np.ascontiguousarray(g), input_offset, k_h, k_w, stride_h, stride_w,
                                      dil_h, dil_w, pad_top, pad_left, tasks)
        return np.ascontiguousarray(gw_t.T).reshape(cout, k_h, k_w, cin)
    gw = conv2d_grad_weight_tiled(x, np.ascontiguousarray(g).reshape(-1, cout), input_offset, k_h, k_w, stride_h,
                                  stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w, tasks)
    return gw.reshape(cout, k_h, k_w, cin)


@njit(cache=True, parallel=True)
def conv2d_grad_weight_tiled(x, g, input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left,
                             out_h, out_w, tasks):
    # One task per thread over every tasks-th chunk of positions; a task beyond the first sums into
    # its own int64 totals, added up at the end.
    cout = g.shape[1]
    taps = k_h * k_w * x.shape[3]
    gw = np.zeros((cout, taps), np.int64)
    geometry = (input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w)
    if tasks == 1:  # (a prange would allocate the task's workspace in every thread, idle ones too)
        _grad_weight_chunks(x, g, geometry, 0, 1, gw)
        return gw
    totals = np.zeros((tasks - 1, cout, taps), np.int64)
    for task in prange(tasks):
        _grad_weight_chunks(x, g, geometry, task, tasks, gw if task == 0 else totals[task - 1])
    for task in range(tasks - 1):
        for c in range(cout):
            for t in range(taps):
                gw[c, t] += totals[task, c, t]
    return gw


@njit(cache=True, inline="always")
def _patch_positions(x, first, count, patch, input_offset, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left,
                     out_h, out_w, k_h, k_w):
    # im2col for the output positions first .. first + count (b, oy, ox flattened) into patch's
    # first rows: patch[i, tap] = x - zp_in as int16; cells outside the input are 0, which is what
    # LiteRT's padding means (the pad value is the input zero point). Flat unsigned indices: no
    # negative-index fix-ups in the copy loops (and no row views, whose reference counts cost).
    _, in_h, in_w, cin = x.shape
    src = x.reshape(-1)
    dst = patch.reshape(-1)
    width = patch.shape[1]
    offset = np.int16(input_offset)
    b = first // (out_h * out_w)
    oy = (first // out_w) % out_h
    ox = first % out_w
    for i in range(count):
        x0 = ox * stride_w - pad_left
        k = np.uint64(i * width)
        for ky in range(k_h):
            iy = oy * stride_h - pad_top + ky * dil_h
            for kx in range(k_w):
                ix = x0 + kx * dil_w
                if 0 <= iy < in_h and 0 <= ix < in_w:
                    s0 = np.uint64(((b * in_h + iy) * in_w + ix) * cin)
                    for c in range(cin):
                        dst[k + np.uint64(c)] = np.int16(src[s0 + np.uint64(c)]) + offset
                else:
                    for c in range(cin):
                        dst[k + np.uint64(c)] = 0
                k += np.uint64(cin)
        b, oy, ox = next_position(b, oy, ox, out_h, out_w)


@njit(cache=True)
def _grad_weight_chunks(x, g, geometry, task, tasks, total):
    # dW += g^T . patches through the tile kernel, GW_CHUNK positions at a time: their im2col rows
    # interleaved in pairs into panels of panel_width(taps) taps, g's rows for them transposed (output channels
    # become tile rows), and each int32 tile added into the int64 total (exact: <= FLUSH products).
    input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w = geometry
    positions, cout = g.shape
    taps = k_h * k_w * x.shape[3]
    nr = panel_width(taps)
    n_panels = (taps + nr - 1) // nr
    patch = np.empty((GW_CHUNK + 1, taps), np.int16)
    panels = np.zeros((n_panels, GW_CHUNK // 2, 2 * nr), np.int16)
    g_t = np.zeros((cout, GW_CHUNK), np.int16)
    gt_flat = g_t.reshape(-1)
    panels_flat = panels.reshape(-1)
    patch_flat = patch.reshape(-1)
    g_flat = g.reshape(-1)
    tile = np.empty((MR, nr), np.int32)
    bases = np.empty(MR, np.intp)
    one_tap = np.zeros(1, np.intp)
    for chunk in range(task, (positions + GW_CHUNK - 1) // GW_CHUNK, tasks):
        first = chunk * GW_CHUNK
        count = min(GW_CHUNK, positions - first)
        _patch_positions(x, first, count, patch, input_offset, stride_h, stride_w, dil_h, dil_w, pad_top,
                         pad_left, out_h, out_w, k_h, k_w)
        if count & 1:  # the last pair's other half: a zero error times a zero patch row
            for t in range(taps):
                patch[count, t] = 0
            for c in range(cout):
                g_t[c, count] = 0
        for pair in range((count + 1) // 2):  # flat unsigned indices, as in _patch_positions
            s0 = np.uint64(2 * pair * taps)
            for p in range(n_panels):
                d0 = np.uint64((p * (GW_CHUNK // 2) + pair) * 2 * nr)
                for j in range(min(nr, taps - p * nr)):
                    t = np.uint64(p * nr + j)
                    panels_flat[d0 + np.uint64(2 * j)] = patch_flat[s0 + t]
                    panels_flat[d0 + np.uint64(2 * j + 1)] = patch_flat[s0 + np.uint64(taps) + t]
        for c in range(cout):  # flat unsigned indices: the strided gather vectorizes
            row = np.uint64(c * GW_CHUNK)
            for pos in range(count):
                gt_flat[row + np.uint64(pos)] = g_flat[np.uint64((first + pos) * cout + c)]
        used = panels[:, :(count + 1) // 2]
        for i in range(0, cout, MR):
            row_bases(bases, i, cout, GW_CHUNK)
            for p in range(n_panels):
                tile_product(g_t, bases, one_tap, used, p, tile)
                for r in range(min(MR, cout - i)):
                    for j in range(min(nr, taps - p * nr)):
                        total[i + r, p * nr + j] += tile[r, j]


FEW_CHANNELS = 4  # inputs this narrow (an image's channels): no im2col, vectors over output channels


@njit(cache=True, parallel=True)
def conv2d_grad_weight_few(x, g, input_offset, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left,
                           tasks):
    # dW[tap, oc] += (x - zp)[b, iy, ix, c] * g[b, oy, ox, oc], contiguous over output channels; each
    # task takes every tasks-th sample into its own int32 rows (flushed to int64 every FLUSH
    # positions), and the tasks' totals are summed at the end.
    n, in_h, in_w, cin = x.shape
    _, out_h, out_w, cout = g.shape
    taps = k_h * k_w * cin
    totals = np.zeros((tasks, taps, cout), np.int64)
    for task in prange(tasks):
        part = np.zeros((taps, cout), np.int32)
        total = totals[task]
        pending = 0
        for b in range(task, n, tasks):
            for oy in range(out_h):
                for ox in range(out_w):
                    k = 0
                    for ky in range(k_h):
                        iy = oy * stride_h - pad_top + ky * dil_h
                        for kx in range(k_w):
                            ix = ox * stride_w - pad_left + kx * dil_w
                            if 0 <= iy < in_h and 0 <= ix < in_w:
                                for c in range(cin):
                                    u = np.int32(x[b, iy, ix, c]) + input_offset
                                    if u != 0:  # (direct indexing: a row view per tap costs a refcount)
                                        for oc in range(cout):
                                            part[k + c, oc] = np.int32(part[k + c, oc] + u * np.int32(g[b, oy, ox, oc]))
                            k += cin
                    pending += 1
                    if pending == FLUSH:
                        for t in range(taps):
                            for oc in range(cout):
                                total[t, oc] += part[t, oc]
                                part[t, oc] = 0
                        pending = 0
        for t in range(taps):
            for oc in range(cout):
                total[t, oc] += part[t, oc]
    gw = np.zeros((taps, cout), np.int64)
    for task in range(tasks):
        for t in range(taps):
            for oc in range(cout):
                gw[t, oc] += totals[task, t, oc]
    return gw


@njit(cache=True, parallel=True)
def conv2d_grad_input(g, w, in_h, in_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left):
    # Per output position: the patch gradient d[tap] = sum_oc g[oc] * w[oc, tap] (contiguous over
    # taps), then scattered back through the window. Padding cells receive nothing (they were
    # constants). One sample per task (windows of one sample overlap). Int32 sums, bounded by
    # grad.channel_fold; truncated explicitly so numba does not widen them to int64.
    n, out_h, out_w, cout = g.shape
    _, k_h, k_w, cin = w.shape
    taps = k_h * k_w * cin
    w2 = w.reshape(cout, taps)
    gx = np.zeros((n, in_h, in_w, cin), np.int32)
    for b in prange(n):
        d = np.empty(taps, np.int32)
        for oy in range(out_h):
            for ox in range(out_w):
                for t in range(taps):
                    d[t] = 0
                nonzero = False
                # (indexed directly: a row view per position or tap costs a reference count)
                for oc in range(0, cout - cout % 4, 4):  # four filters per pass over d
                    g0 = np.int32(g[b, oy, ox, oc])
                    g1 = np.int32(g[b, oy, ox, oc + 1])
                    g2 = np.int32(g[b, oy, ox, oc + 2])
                    g3 = np.int32(g[b, oy, ox, oc + 3])
                    if g0 == 0 and g1 == 0 and g2 == 0 and g3 == 0:
                        continue
                    nonzero = True
                    for t in range(taps):
                        d[t] = np.int32(d[t] + g0 * np.int32(w2[oc, t]) + g1 * np.int32(w2[oc + 1, t])
                                        + g2 * np.int32(w2[oc + 2, t]) + g3 * np.int32(w2[oc + 3, t]))
                for oc in range(cout - cout % 4, cout):
                    gv = np.int32(g[b, oy, ox, oc])
                    if gv == 0:
                        continue
                    nonzero = True
                    for t in range(taps):
                        d[t] = np.int32(d[t] + gv * np.int32(w2[oc, t]))
                if not nonzero:
                    continue
                k = 0
                for ky in range(k_h):
                    iy = oy * stride_h - pad_top + ky * dil_h
                    for kx in range(k_w):
                        ix = ox * stride_w - pad_left + kx * dil_w
                        if 0 <= iy < in_h and 0 <= ix < in_w:
                            for c in range(cin):
                                gx[b, iy, ix, c] = np.int32(gx[b, iy, ix, c] + d[k + c])
                        k += cin
    return gx


KERNELS = {"CONV_2D": Kernel(prepare, forward, _linear.make_backward(grad_params, grad_input_prepared, conv=True),
                             _linear.clamp, macs, _linear.make_backward_bytes(grad_weight_plan),
                             parameters=_linear.PARAMETERS,
                             output_bound=_linear.output_bound)}
