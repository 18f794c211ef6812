"""The implicit-GEMM addressing of a convolution: output positions times filter taps read in place.

No im2col: each output position's window is a list of taps, each a run of channels at a fixed offset
from the window's corner in an NHWC buffer (the input itself, or a zero-bordered int16 copy when
padding or an odd channel count needs one). The tile kernel (gemm.tile_product) walks those taps for
MR positions at once. CONV_2D's forward requantizes each tile (``conv2d_int8_implicit``); its input
gradient at stride 1 is the same walk over the zero-bordered error with the flipped filters, keeping
the int32 sums (``conv2d_int32_implicit``).
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from .common import Window
from .gemm import MR, panel_width, requantize_block, tile_product
from .tile import pack_runs

# Every CONV_2D forward is an implicit GEMM: the tile kernel walks each output position's taps in
# the input itself (unpadded, even channel count) or in a zero-bordered int16 copy, never an
# im2col. Measured against im2col chunks on the 1- and 3-channel first layers too (where every
# tap's run is padded to 2 or 4 channels): 1.3-2.4x faster at batch 32, alike at batch 1.
CHUNK_BYTES = 16 * 1024  # input bytes (taps x channels x 2) of the positions one task handles


def positions_per_task(positions: int, bytes_per_position: int) -> int:
    """Output positions per task: a multiple of MR whose A rows fit CHUNK_BYTES, and small enough
    that every thread gets two or more tasks (three uneven tasks on two threads: measured 1.0x)."""
    return positions_per_task_for(positions, bytes_per_position, numba.get_num_threads())


@njit(cache=True)
def positions_per_task_for(positions, bytes_per_position, threads):
    """positions_per_task for a given thread count (compiled plans pass it: a compiled function
    that calls numba.get_num_threads() is not cached)."""
    fit = max(1, CHUNK_BYTES // (bytes_per_position * MR))
    share = -(-positions // (2 * MR * max(1, threads)))
    return max(1, min(fit, share)) * MR


# Inputs with fewer channels than this (the first layers: 1-3 channels) read each window row as one
# run of k_w * C_in values instead of k_w runs of C_in padded to an even length: fewer, longer
# tap loops and no padding products.
WHOLE_ROW_MAX_CHANNELS = 8


@functools.lru_cache(maxsize=1024)
def border_geometry(in_h: int, in_w: int, cin: int, v: Window, k_h: int, k_w: int):
    """(rows, cols, channels, tap length, tap offsets) of the zero-bordered int16 input the
    implicit GEMM reads: a border wide enough for every tap of every output position. A tap is one
    filter position (ky, kx) over channels padded to an even count (the tile kernel reads pairs),
    or, for narrow inputs, a whole window row (ky): k_w * C_in consecutive values, rounded up to an
    even count by reading one value past the row (times a zero weight; a spare border column keeps
    that read inside the buffer). Zero in the border is exactly LiteRT's padding (the pad value is
    the input zero point). Computed once per layer shape; the offsets array is read-only."""
    rows = max(in_h + v.pad_top, (v.out_h - 1) * v.stride_h + (k_h - 1) * v.dil_h + 1)
    cols = max(in_w + v.pad_left, (v.out_w - 1) * v.stride_w + (k_w - 1) * v.dil_w + 1)
    if k_w > 1 and v.dil_w == 1 and cin < WHOLE_ROW_MAX_CHANNELS:
        cols += 1
        run = k_w * cin
        offsets = tap_offsets(k_h, 1, v.dil_h, 1, cols, cin)
        offsets.flags.writeable = False
        return rows, cols, cin, run + (run & 1), offsets
    channels = cin + (cin & 1)
    offsets = tap_offsets(k_h, k_w, v.dil_h, v.dil_w, cols, channels)
    offsets.flags.writeable = False
    return rows, cols, channels, channels, offsets


def tap_offsets(k_h: int, k_w: int, dil_h: int, dil_w: int, cols: int, channels: int) -> np.ndarray:
    """Where each filter tap (ky, kx) starts relative to an output position's corner, in elements of
    an NHWC buffer with ``cols`` columns of ``channels``: the implicit GEMM's per-tap offsets."""
    return np.array([(ky * dil_h * cols + kx * dil_w) * channels for ky in range(k_h) for kx in range(k_w)],
                    np.intp)


@njit(cache=True, parallel=True)
def offset_into_border(x, input_offset, pad_top, pad_left, rows, cols, channels):
    """x + input_offset as int16, placed at (pad_top, pad_left) in a zero (N, rows, cols, channels)
    buffer: the convolution's input (int8, offset -zp) or, in the input gradient, its error (int16,
    offset 0)."""
    # flat unsigned indices: numba then emits no negative-index fix-up and LLVM vectorizes the copy
    # (4-D indices: 0.8 ns per element, measured; row views instead: their reference counts are
    # atomics that the two threads fight over, 2.7x slower at 2 threads than at 1)
    n, in_h, in_w, cin = x.shape
    out = np.zeros((n, rows, cols, channels), np.int16)
    offset = np.int16(input_offset)
    src = x.reshape(-1)
    dst = out.reshape(-1)
    for row in prange(n * in_h):
        b, iy = row // in_h, row % in_h
        s0 = np.uint64(row * in_w * cin)
        d0 = np.uint64(((b * rows + pad_top + iy) * cols + pad_left) * channels)
        if channels == cin:  # one contiguous run per input row (narrow inputs: 1-3 channels)
            for k in range(in_w * cin):
                dst[d0 + np.uint64(k)] = np.int16(src[s0 + np.uint64(k)]) + offset
        else:
            for ix in range(in_w):
                for c in range(cin):
                    dst[d0 + np.uint64(ix * channels + c)] = np.int16(src[s0 + np.uint64(ix * cin + c)]) + offset
    return out



@njit(cache=True)
def pack_filters(w, channels):
    """The filters (C_out, KH, KW, C_in) packed as panels of panel_width(C_out) columns, C_in
    zero-padded to ``channels`` per tap."""
    cout, k_h, k_w, cin = w.shape
    return pack_runs(w.reshape(cout, k_h * k_w * cin), panel_width(cout), cin, channels)


@njit(cache=True)
def conv2d_int8_implicit(x, w, input_offset, pad_top, pad_left, rows, cols, channels, tap_len, offsets, bias,
                         mult, shift, out_zp, act_min, act_max, stride_h, stride_w, out_h, out_w, chunk,
                         rounding):
    # The filters packed, then the tile kernel over the input read in place when nothing pads it
    # (no border, an even channel count: the int8 input itself, widened on load, with the input
    # offset folded into the bias as LiteRT does: sum (x + off) w = sum x w + off sum w), or over
    # a zero-bordered int16 copy of x + off otherwise. (One call from Python for all of it.)
    n, in_h, in_w, cin = x.shape
    cout, k_h, k_w, _ = w.shape
    if tap_len == channels:  # a tap per filter position
        panels = pack_filters(w, channels)
    else:  # a tap per window row (border_geometry)
        panels = pack_filters(w.reshape(cout, k_h, 1, k_w * cin), tap_len)
    if rows == in_h and cols == in_w and channels == cin:
        folded = bias.copy()
        taps = w.shape[1] * w.shape[2] * cin
        flat = w.reshape(w.shape[0], taps)
        for o in range(w.shape[0]):
            s = 0
            for t in range(taps):
                s += flat[o, t]
            folded[o] = np.int32(folded[o] + input_offset * s)
        return implicit_tiles(x, offsets, panels, folded, mult, shift, out_zp, act_min, act_max, stride_h,
                               stride_w, out_h, out_w, w.shape[0], chunk, rounding)
    x16 = offset_into_border(x, input_offset, pad_top, pad_left, rows, cols, channels)
    return implicit_tiles(x16, offsets, panels, bias, mult, shift, out_zp, act_min, act_max, stride_h,
                           stride_w, out_h, out_w, w.shape[0], chunk, rounding)


@njit(cache=True, inline="always")
def position_bases(bases, first, i, count, out_h, out_w, rows, cols, channels, stride_h, stride_w):
    """bases[r] = where output position first + i + r (the last one repeated past count) reads its
    window's corner in an (N, rows, cols, channels) buffer, for the block's len(bases) rows (MR here,
    implicit_dot's MR there). One division for the block, then the next positions by increments (a
    division per row cost more than the tile kernel: measured)."""
    pos = first + i
    b = pos // (out_h * out_w)
    oy = (pos // out_w) % out_h
    ox = pos % out_w
    for r in range(bases.shape[0]):
        bases[r] = ((b * rows + oy * stride_h) * cols + ox * stride_w) * channels
        if i + r + 1 < count:  # rows past the last position repeat it
            b, oy, ox = next_position(b, oy, ox, out_h, out_w)


@njit(cache=True, inline="always")
def next_position(b, oy, ox, out_h, out_w):
    """The output position after (b, oy, ox) in (b, oy, ox) order, without a division."""
    ox += 1
    if ox == out_w:
        ox = 0
        oy += 1
        if oy == out_h:
            oy = 0
            b += 1
    return b, oy, ox


@njit(cache=True, parallel=True)
def implicit_tiles(a, offsets, panels, bias, mult, shift, out_zp, act_min, act_max, stride_h, stride_w,
                    out_h, out_w, cout, chunk, rounding):
    # One task per `chunk` output positions: per MR positions the tile kernel reads each one's taps
    # straight from `a` (N, rows, cols, channels), and the tile is requantized while it is in L1.
    n, rows, cols, channels = a.shape
    positions = n * out_h * out_w
    out = np.empty((positions, cout), np.int8)
    for task in prange((positions + chunk - 1) // chunk):
        first = task * chunk
        count = min(chunk, positions - first)
        nr = panels.shape[2] // 2
        tile = np.empty((MR, nr), np.int32)
        scratch = np.empty((MR, nr), np.int8)
        bases = np.empty(MR, np.intp)
        for i in range(0, count, MR):
            position_bases(bases, first, i, count, out_h, out_w, rows, cols, channels, stride_h, stride_w)
            for p in range(panels.shape[0]):
                tile_product(a, bases, offsets, panels, p, tile)
                requantize_block(tile, min(MR, count - i), bias, mult, shift, p * nr, out, first + i,
                                 out_zp, act_min, act_max, scratch, rounding)
    return out



@njit(cache=True, parallel=True)
def conv2d_int32_implicit(x16, offsets, panels, out_h, out_w, cout):
    # conv2d_int8_implicit without requantization: the int32 sums themselves (stride 1)
    n, rows, cols, channels = x16.shape
    positions = n * out_h * out_w
    out = np.empty((positions, cout), np.int32)
    chunk = 8 * MR
    for task in prange((positions + chunk - 1) // chunk):
        first = task * chunk
        count = min(chunk, positions - first)
        nr = panels.shape[2] // 2
        tile = np.empty((MR, nr), np.int32)
        bases = np.empty(MR, np.intp)
        for i in range(0, count, MR):
            position_bases(bases, first, i, count, out_h, out_w, rows, cols, channels, 1, 1)
            for p in range(panels.shape[0]):
                tile_product(x16, bases, offsets, panels, p, tile)
                o0 = p * nr
                for r in range(min(MR, count - i)):
                    for j in range(min(nr, cout - o0)):
                        out[first + i + r, o0 + j] = tile[r, j]
    return out

