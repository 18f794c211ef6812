"""CONV_2D and FULLY_CONNECTED forward on the int8 dot-product tiles (dot_tile.py).

Packing is split from running: ``pack_conv`` / ``pack_fc`` run once per weight set and return the
panels ([panel][k quad][column][4] int8) and the int32 per-output-channel correction
(zp_in + A_SHIFT) * sum_k w[o, k]; ``requant_table`` folds the correction into the bias and pads
bias, multiplier and shift to whole panels (as gemm.padded_params does); the ``*_run`` functions
take the panels, that table, the input, the requantization scalars and the int8 output to write
into (a compiled plan makes panels and table once per weights). Each comes
as a parallel variant (a prange over tasks) and a serial one (a plain loop over the same inlined task
body) for small layers, which should not pay for a parallel region.

A (the input) is a byte buffer: x + A_SHIFT (x XOR 0x80 for vpdpbusd, x itself for sdot) placed in an
(N, rows, cols, channels) buffer whose border and spare channels hold zp_in + A_SHIFT (meaning
x - zp_in = 0, LiteRT's padding). A tap is a filter position over the channels rounded up to a
multiple of 4 or, for inputs of fewer than 8 channels, a whole window row of k_w * C_in values rounded
up to a multiple of 4 (three spare border columns keep the over-read inside the buffer).

Use ``ops(kind)`` for a kind's functions (compiled on first call; kind None: the host's dot_kind()).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from . import dot_tile as _dt
from .dot_tile import DotKernels, dot_kind
from .implicit_gemm import position_bases

CHUNK_BYTES = 16 * 1024  # A bytes (taps x tap length) of the positions one conv task handles
WHOLE_ROW_MAX_CHANNELS = 8  # as implicit_gemm: narrower inputs read a window row as one tap


def _round4(n: int) -> int:
    return (n + 3) & ~3


def whole_row(cin: int, k_w: int, dil_w: int) -> bool:
    return k_w > 1 and dil_w == 1 and cin < WHOLE_ROW_MAX_CHANNELS


@dataclass(frozen=True)
class ConvLayout:
    rows: int
    cols: int
    channels: int  # channels per cell of the A buffer
    tap_len: int  # bytes per tap (a multiple of 4)
    offsets: np.ndarray  # intp, one per tap (read-only)


@functools.lru_cache(maxsize=1024)
def conv_layout(in_h: int, in_w: int, cin: int, k_h: int, k_w: int, out_h: int, out_w: int, stride_h: int,
                stride_w: int, dil_h: int, dil_w: int, pad_top: int, pad_left: int) -> ConvLayout:
    """The A buffer's geometry and tap offsets of a convolution (implicit_gemm.border_geometry, for
    byte quads)."""
    rows = max(in_h + pad_top, (out_h - 1) * stride_h + (k_h - 1) * dil_h + 1)
    cols = max(in_w + pad_left, (out_w - 1) * stride_w + (k_w - 1) * dil_w + 1)
    if whole_row(cin, k_w, dil_w):
        cols += 3
        offsets = np.array([ky * dil_h * cols * cin for ky in range(k_h)], np.intp)
        channels, tap_len = cin, _round4(k_w * cin)
    else:
        channels = tap_len = _round4(cin)
        offsets = np.array([(ky * dil_h * cols + kx * dil_w) * channels for ky in range(k_h) for kx in range(k_w)],
                           np.intp)
    offsets.flags.writeable = False
    return ConvLayout(rows, cols, channels, tap_len, offsets)


@njit(cache=True)
def pack_quads(b, nr, run, padded_run):
    """B (N, K) int8, rows being runs of ``run`` values each placed ``padded_run`` (a multiple of 4)
    apart in k -> panels (ceil(N / nr), K' / 4, 4 * nr) int8, [panel][k quad][column][4], zero-padded."""
    n, k = b.shape
    k_out = k // run * padded_run
    kq = (k_out + 3) // 4
    out = np.zeros(((n + nr - 1) // nr, kq, 4 * nr), np.int8)
    src = np.ascontiguousarray(b).reshape(-1)
    if run % 4 == 0 and padded_run == run:  # whole quads: an int32 transpose
        src32 = src.view(np.int32)
        dst32 = out.reshape(-1).view(np.int32)
        for o in range(n):
            base = (o // nr) * kq * nr + o % nr
            for q in range(kq):
                dst32[np.uint64(base + q * nr)] = src32[np.uint64(o * kq + q)]
        return out
    dst = out.reshape(-1)
    for o in range(n):
        base = np.uint64((o // nr) * kq * 4 * nr + 4 * (o % nr))
        for r in range(k // run):
            s0 = np.uint64(o * k + r * run)
            t0 = r * padded_run
            for c in range(run):
                t = t0 + c
                dst[base + np.uint64((t >> 2) * 4 * nr + (t & 3))] = src[s0 + np.uint64(c)]
    return out


@njit(cache=True)
def weight_correction(b, factor):
    """int32 (N,): factor * sum_k b[o, k], wrapped to int32."""
    n, k = b.shape
    out = np.empty(n, np.int32)
    for o in range(n):
        s = 0
        for t in range(k):
            s += np.int64(b[o, t])
        out[o] = np.int32(s * factor)  # wraps
    return out


def _panel_width(kernels: DotKernels, n: int) -> int:
    return kernels.nr_half if n <= kernels.nr_half else kernels.nr


def pack_conv(w: np.ndarray, input_zp: int, dil_w: int = 1, kind: str | None = None):
    """Filters (C_out, KH, KW, C_in) int8 -> (panels int8 (P, KQ, 4 * nr), correction int32 (C_out,))."""
    k = _kernels(kind)
    cout, k_h, k_w, cin = w.shape
    w = np.ascontiguousarray(w)
    if whole_row(cin, k_w, dil_w):
        panels = pack_quads(w.reshape(cout, k_h * k_w * cin), _panel_width(k, cout), k_w * cin, _round4(k_w * cin))
    else:
        panels = pack_quads(w.reshape(cout, k_h * k_w * cin), _panel_width(k, cout), cin, _round4(cin))
    return panels, weight_correction(w.reshape(cout, -1), int(input_zp) + k.a_shift)


def pack_fc(w: np.ndarray, input_zp: int, kind: str | None = None):
    """Weights (C_out, depth) int8 -> (panels int8 (P, ceil(depth / 4), 4 * nr), correction int32 (C_out,))."""
    k = _kernels(kind)
    cout, depth = w.shape
    w = np.ascontiguousarray(w)
    panels = pack_quads(w, _panel_width(k, cout), depth, _round4(depth))
    return panels, weight_correction(w, int(input_zp) + k.a_shift)


def conv_chunk(kind: str | None, positions: int, layout: ConvLayout) -> int:
    """Output positions per conv task: a multiple of MR whose A bytes fit CHUNK_BYTES, and small
    enough that every thread gets two or more tasks."""
    mr = _kernels(kind).mr
    return conv_chunk_for(positions, len(layout.offsets) * layout.tap_len * mr, mr, numba.get_num_threads())


@njit(cache=_dt.LOADING_KIND is None)
def conv_chunk_for(positions, bytes_per_block, mr, threads):
    """conv_chunk for a given thread count, from the A bytes of MR positions (compiled plans)."""
    fit = max(1, CHUNK_BYTES // bytes_per_block)
    share = -(-positions // (2 * mr * max(1, threads)))
    return max(1, min(fit, share)) * mr


def fc_rows_per_task(kind: str | None, rows: int, cout: int) -> int:
    """Rows per FC task (a multiple of MR): all rows when the panels alone give every thread two tasks."""
    k = _kernels(kind)
    return fc_rows_per_task_for(rows, -(-cout // _panel_width(k, cout)), k.mr, numba.get_num_threads())


@njit(cache=_dt.LOADING_KIND is None)
def fc_rows_per_task_for(rows, panels, mr, threads):
    """fc_rows_per_task for a given thread count and number of weight panels (compiled plans)."""
    blocks = -(-rows // mr)
    groups = max(1, min(blocks, -(-2 * max(1, threads) // panels)))
    return -(-blocks // groups) * mr


# The run functions below are compiled for one kind: the host's (numba-cached), or another one when
# ops(kind) loads a copy of this file for it (tests: "generic", "avxvnni"), not cached, so that no
# copy's machine code mixes into numba's cache.
KIND = _dt.LOADING_KIND or _dt.host_kind() or "generic"
_CACHE = _dt.LOADING_KIND is None
_KERNELS = DotKernels(KIND)
MR, NR, SHIFT = _KERNELS.mr, _KERNELS.nr, _KERNELS.a_shift
tile_full, tile_half = _KERNELS.tile, _KERNELS.tile_half
rq_full, rq_half = _KERNELS.requantize, _KERNELS.requantize_half


@njit(cache=_CACHE, inline="always")
def padded(a, n, minus):
    # int32 copy of a (length >= count of outputs) padded with zeros to n, minus ``minus`` if given
    out = np.zeros(n, np.int32)
    m = min(n, a.shape[0])
    for i in range(m):
        out[i] = np.int32(a[i])
    if minus is not None:
        for i in range(minus.shape[0]):
            out[i] = np.int32(out[i] - minus[i])
    return out


@njit(cache=_CACHE, inline="always")
def tile_product(a, bases, offsets, panels, p, tile):
    if panels.shape[2] == 4 * NR:
        tile_full(a, bases, offsets, panels, p, tile)
    else:
        tile_half(a, bases, offsets, panels, p, tile)


@njit(cache=_CACHE, inline="always")
def requantize_block(tile, rows, bias, mult, shift, o0, out, row0, zp, lo, hi, scratch, rounding):
    nr = tile.shape[1]
    cols = min(nr, out.shape[1] - o0)
    dst, r0, c0 = (out, row0, o0) if cols == nr else (scratch, 0, 0)
    if nr == NR:
        rq_full(tile, rows, bias, mult, shift, o0, dst, r0, c0, zp, lo, hi, rounding)
    else:
        rq_half(tile, rows, bias, mult, shift, o0, dst, r0, c0, zp, lo, hi, rounding)
    if cols < nr:
        for r in range(rows):
            for j in range(cols):
                out[row0 + r, o0 + j] = scratch[r, j]


@njit(cache=_CACHE, inline="always")
def input_row(x, buf, row, pad_top, pad_left):
    # image row ``row`` (of n * in_h) of x + SHIFT as bytes into its place in buf
    n, in_h, in_w, cin = x.shape
    _, rows, cols, channels = buf.shape
    b, iy = row // in_h, row % in_h
    src = x.reshape(-1)
    dst = buf.reshape(-1)
    s0 = np.uint64(row * in_w * cin)
    d0 = np.uint64(((b * rows + pad_top + iy) * cols + pad_left) * channels)
    if channels == cin:
        for k in range(in_w * cin):
            dst[d0 + np.uint64(k)] = np.uint8(np.int32(src[s0 + np.uint64(k)]) + SHIFT)
    else:
        for ix in range(in_w):
            for c in range(cin):
                dst[d0 + np.uint64(ix * channels + c)] = np.uint8(np.int32(src[s0 + np.uint64(ix * cin + c)]) + SHIFT)


@njit(cache=_CACHE, inline="always")
def task_scratch(panels):
    # what one task writes besides the output: the int32 tile, an int8 tile for a ragged last
    # panel, the MR row bases, the one tap of an FC row
    nr = panels.shape[2] // 4
    return np.empty((MR, nr), np.int32), np.empty((MR, nr), np.int8), np.empty(MR, np.intp), np.zeros(1, np.intp)


@njit(cache=_CACHE, inline="always")
def conv_task(buf, offsets, panels, table, out, first, count, out_h, out_w, stride_h, stride_w, zp, lo, hi,
              rounding, tile, scratch, bases):
    _, rows, cols, channels = buf.shape
    nr = panels.shape[2] // 4
    bias, mult, shift = table[0], table[1], table[2]
    for i in range(0, count, MR):
        position_bases(bases, first, i, count, out_h, out_w, rows, cols, channels, stride_h, stride_w)
        for p in range(panels.shape[0]):
            tile_product(buf, bases, offsets, panels, p, tile)
            requantize_block(tile, min(MR, count - i), bias, mult, shift, p * nr, out, first + i, zp, lo, hi,
                             scratch, rounding)


@njit(cache=_CACHE)
def requant_table(panels, correction, bias, mult, shift):
    """The int32 (3, panels' columns) table the run functions requantize with: bias - correction,
    multiplier, shift, each padded with zeros to whole panels. Made per call by the per-op path,
    once per weights by a compiled plan."""
    n_pad = panels.shape[0] * (panels.shape[2] // 4)
    table = np.empty((3, n_pad), np.int32)
    table[0] = padded(bias, n_pad, correction)
    table[1] = padded(mult, n_pad, None)
    table[2] = padded(shift, n_pad, None)
    return table


@njit(cache=_CACHE, inline="always")
def conv_input(x, rows, cols, channels, input_zp, pad_top, pad_left):
    # A: the input + SHIFT as bytes in its bordered buffer, the border holding zp_in + SHIFT
    buf = np.full((x.shape[0], rows, cols, channels), np.uint8((input_zp + SHIFT) & 0xFF), np.uint8)
    for row in range(x.shape[0] * x.shape[1]):  # serial: one parallel region per call (the tasks)
        input_row(x, buf, row, pad_top, pad_left)
    return buf


@njit(cache=_CACHE, parallel=True)
def conv_run(x, panels, table, offsets, out, pad_top, pad_left, rows, cols, channels, input_zp, out_zp, act_min,
             act_max, stride_h, stride_w, out_h, out_w, chunk, rounding):
    buf = conv_input(x, rows, cols, channels, input_zp, pad_top, pad_left)
    positions = x.shape[0] * out_h * out_w
    zp, lo, hi = np.int32(out_zp), np.int32(act_min), np.int32(act_max)
    for task in prange((positions + chunk - 1) // chunk):
        first = task * chunk
        tile, scratch, bases, _ = task_scratch(panels)
        conv_task(buf, offsets, panels, table, out, first, min(chunk, positions - first), out_h, out_w, stride_h,
                  stride_w, zp, lo, hi, rounding, tile, scratch, bases)


@njit(cache=_CACHE)
def conv_run_serial(x, panels, table, offsets, out, pad_top, pad_left, rows, cols, channels, input_zp, out_zp,
                    act_min, act_max, stride_h, stride_w, out_h, out_w, rounding):
    buf = conv_input(x, rows, cols, channels, input_zp, pad_top, pad_left)
    positions = x.shape[0] * out_h * out_w
    zp, lo, hi = np.int32(out_zp), np.int32(act_min), np.int32(act_max)
    tile, scratch, bases, _ = task_scratch(panels)
    conv_task(buf, offsets, panels, table, out, 0, positions, out_h, out_w, stride_h, stride_w, zp, lo, hi,
              rounding, tile, scratch, bases)


@njit(cache=_CACHE, inline="always")
def fc_input(x, panels):
    # A: the rows + SHIFT as bytes, each padded with zeros to whole k quads (the panels' zeros there)
    rows, depth = x.shape
    buf = np.zeros((rows, 4 * panels.shape[1]), np.uint8)
    for r in range(rows):
        for k in range(depth):
            buf[r, k] = np.uint8(np.int32(x[r, k]) + SHIFT)
    return buf


@njit(cache=_CACHE, inline="always")
def fc_task(buf, panels, table, out, p, r0, r1, zp, lo, hi, rounding, tile, scratch, bases, one_tap):
    nr = panels.shape[2] // 4
    rows = buf.shape[0]
    row_len = buf.shape[1]
    bias, mult, shift = table[0], table[1], table[2]
    for i in range(r0, r1, MR):
        for r in range(MR):
            bases[r] = min(i + r, rows - 1) * row_len
        tile_product(buf, bases, one_tap, panels, p, tile)
        requantize_block(tile, min(MR, rows - i), bias, mult, shift, p * nr, out, i, zp, lo, hi, scratch,
                         rounding)


@njit(cache=_CACHE, parallel=True)
def fc_run(x, panels, table, out, out_zp, act_min, act_max, rows_per_task, rounding):
    buf = fc_input(x, panels)
    rows = x.shape[0]
    groups = (rows + rows_per_task - 1) // rows_per_task
    zp, lo, hi = np.int32(out_zp), np.int32(act_min), np.int32(act_max)
    for task in prange(panels.shape[0] * groups):
        p, g = task // groups, task % groups
        tile, scratch, bases, one_tap = task_scratch(panels)
        fc_task(buf, panels, table, out, p, g * rows_per_task, min(rows, (g + 1) * rows_per_task), zp, lo, hi,
                rounding, tile, scratch, bases, one_tap)


@njit(cache=_CACHE)
def fc_run_serial(x, panels, table, out, out_zp, act_min, act_max, rounding):
    buf = fc_input(x, panels)
    rows = x.shape[0]
    zp, lo, hi = np.int32(out_zp), np.int32(act_min), np.int32(act_max)
    tile, scratch, bases, one_tap = task_scratch(panels)
    for p in range(panels.shape[0]):
        fc_task(buf, panels, table, out, p, 0, rows, zp, lo, hi, rounding, tile, scratch, bases, one_tap)


@dataclass(frozen=True)
class DotOps:
    kind: str
    kernels: DotKernels
    conv_run: object
    conv_run_serial: object
    fc_run: object
    fc_run_serial: object
    requant_table: object


@functools.lru_cache(maxsize=None)
def _ops(kind: str) -> DotOps:
    if kind == KIND:
        m = sys.modules[__name__]
    else:  # a copy of this module compiled for ``kind``
        spec = importlib.util.spec_from_file_location(f"{__name__}_{kind}", __file__)
        m = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = m
        _dt.LOADING_KIND = kind
        try:
            spec.loader.exec_module(m)
        finally:
            _dt.LOADING_KIND = None
    return DotOps(m.KIND, m._KERNELS, m.conv_run, m.conv_run_serial, m.fc_run, m.fc_run_serial, m.requant_table)


def _kernels(kind: str | None) -> DotKernels:
    return ops(kind).kernels


def ops(kind: str | None = None) -> DotOps:
    """The run functions of a kind (default: the host's dot_kind(); an error if it has none)."""
    kind = kind or dot_kind()
    if kind is None:
        raise RuntimeError("no int8 dot-product kernel on this CPU (or EDGE_QMUL_DOT=off)")
    return _ops(kind)


# --- drivers for the kernels' forward functions ---------------------------------------------------

SERIAL_MACS = 1 << 18  # below this many multiply-adds (~2-4 us on vpdpbusd) a layer runs the serial variant
# (1 << 22 kept mobilenet_tiny and mobilenetv2_035 at batch 32 on one thread: 2 threads 1.3x and 1.5x slower)


def _i32(a):
    return np.ascontiguousarray(a, np.int32)


def conv_forward(x, w, bias, input_zp, win, rq, mult, shift, kind: str | None = None, packed=None,
                 parallel: bool | None = None):
    """CONV_2D forward on the dot tiles: x (N, H, W, C_in) int8, w (C_out, KH, KW, C_in) int8 ->
    (N, out_h, out_w, C_out) int8; win a common.Window, rq a common.Requant (out_zero_point, act_min,
    act_max, rounding); ``packed``: pack_conv's result if the caller keeps it; ``parallel``: None
    chooses by size."""
    o = ops(kind)
    cout, k_h, k_w, cin = w.shape
    v = win
    layout = conv_layout(x.shape[1], x.shape[2], cin, k_h, k_w, v.out_h, v.out_w, v.stride_h, v.stride_w, v.dil_h,
                         v.dil_w, v.pad_top, v.pad_left)
    panels, correction = packed or pack_conv(w, input_zp, v.dil_w, o.kind)
    positions = x.shape[0] * v.out_h * v.out_w
    out = np.empty((positions, cout), np.int8)
    macs = positions * len(layout.offsets) * layout.tap_len * cout
    if parallel is None:
        parallel = macs >= SERIAL_MACS and numba.get_num_threads() > 1
    table = o.requant_table(panels, correction, _i32(bias), _i32(mult), _i32(shift))
    args = (np.ascontiguousarray(x), panels, table, layout.offsets, out, int(v.pad_top), int(v.pad_left), layout.rows,
            layout.cols, layout.channels, int(input_zp), int(rq.out_zero_point), int(rq.act_min), int(rq.act_max),
            int(v.stride_h), int(v.stride_w), int(v.out_h), int(v.out_w))
    if parallel:
        o.conv_run(*args, conv_chunk(o.kind, positions, layout), int(rq.rounding))
    else:
        o.conv_run_serial(*args, int(rq.rounding))
    return out.reshape(x.shape[0], v.out_h, v.out_w, cout)


def fc_forward(rows, w, bias, input_zp, mult, shift, out_zp, act_min, act_max, rounding, kind: str | None = None,
               packed=None, parallel: bool | None = None):
    """FULLY_CONNECTED forward on the dot tiles: rows (M, depth) int8, w (C_out, depth) int8 -> (M, C_out) int8."""
    o = ops(kind)
    cout = w.shape[0]
    panels, correction = packed or pack_fc(w, input_zp, o.kind)
    out = np.empty((rows.shape[0], cout), np.int8)
    if parallel is None:
        parallel = rows.shape[0] * rows.shape[1] * cout >= SERIAL_MACS and numba.get_num_threads() > 1
    table = o.requant_table(panels, correction, _i32(bias), _i32(mult), _i32(shift))
    args = (np.ascontiguousarray(rows), panels, table, out, int(out_zp), int(act_min), int(act_max))
    if parallel:
        o.fc_run(*args, fc_rows_per_task(o.kind, rows.shape[0], cout), int(rounding))
    else:
        o.fc_run_serial(*args, int(rounding))
    return out
