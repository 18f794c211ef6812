"""The int16 matrix product the kernels share: C[i, o] = sum_t A[i, t] * B[o, t], int32.

A holds rows of int16 (activations minus their zero point, or int16 errors), B int8 weights or
int16 values. B is packed into panels of panel_width(N) columns once per call
(``tile.pack_panels``); each MR x width block of C is then one call of the register-blocked tile
kernel of that width (``tile_product``)
into a small int32 tile, which the caller's epilogue reads while it is still in L1: the plain
product here copies it out, the convolution and FC kernels requantize it straight to int8.
Sums are exact int32; callers guarantee the true sums fit int32.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .tile import (MR, NR, NR_HALF, NR_QUARTER, pack_panels, requantize_tile, requantize_tile_half,
                   requantize_tile_quarter, tile_kernel, tile_kernel_half, tile_kernel_quarter)

__all__ = ["MR", "NR", "gemm_i16", "gemm_panels", "pack_panels", "panel_width", "even_rows", "padded_params",
           "requantize_block", "row_bases", "tile_product"]


@njit(cache=True)
def even_rows(a):
    """``a`` if its rows already lie in buffers of an even number of int16s, else a zero-padded
    (M, K + 1) copy: the tile kernel reads k in pairs."""
    m, k = a.shape
    if k % 2 == 0 and a.strides[1] == 2:
        return a
    out = np.zeros((m, k + 1), np.int16)
    out[:, :k] = a
    return out


@njit(cache=True, inline="always")
def row_bases(bases, i, m, row_length):
    """bases[r] = start of row min(i + r, m - 1) (rows past the last repeat it: computed, not stored)."""
    for r in range(MR):
        bases[r] = min(i + r, m - 1) * row_length


@njit(cache=True)
def panel_width(n):
    """Columns per panel for a product with ``n`` columns: the narrowest tile that holds them, or
    the widest (a 32-column panel for 8 output channels would be three-quarters zeros)."""
    if n <= NR_QUARTER:
        return NR_QUARTER
    if n <= NR_HALF:
        return NR_HALF
    return NR


@njit(cache=True, inline="always")
def tile_product(a, bases, offsets, panels, p, tile):
    """The tile kernel of the panels' width (tile: int32 (MR, width))."""
    width = panels.shape[2] // 2
    if width == NR:
        tile_kernel(a, bases, offsets, panels, p, tile)
    elif width == NR_HALF:
        tile_kernel_half(a, bases, offsets, panels, p, tile)
    else:
        tile_kernel_quarter(a, bases, offsets, panels, p, tile)


@njit(cache=True)
def gemm_panels(a, panels, c):
    """c[i, o] = sum_t a[i, t] * B[o, t] for B packed by pack_panels; a's rows hold an even
    number of int16s (see even_rows)."""
    m = a.shape[0]
    n = c.shape[1]
    nr = panels.shape[2] // 2
    tile = np.empty((MR, nr), np.int32)
    bases = np.empty(MR, np.intp)
    one_tap = np.zeros(1, np.intp)
    for i in range(0, m, MR):
        rows = min(MR, m - i)
        row_bases(bases, i, m, a.strides[0] // 2)
        for p in range(panels.shape[0]):
            tile_product(a, bases, one_tap, panels, p, tile)
            o0 = p * nr
            for r in range(rows):
                for j in range(min(nr, n - o0)):
                    c[i + r, o0 + j] = tile[r, j]


@njit(cache=True)
def gemm_i16(a, b, c):
    """c[i, o] = sum_t a[i, t] * b[o, t] for a (M, K) int16, b (N, K) int8 or int16, c (M, N) int32.

    The plain product, without an epilogue: the kernels call the tile kernel themselves (to
    requantize or scatter each tile in place); tests check packing and tiles end to end here."""
    gemm_panels(even_rows(a), pack_panels(b, panel_width(b.shape[0])), c)


def padded_params(*params: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-channel int32 arrays (bias, multiplier, shift) padded with zeros to whole panels of NR,
    so the vector epilogue can read a last, partial panel's parameters."""
    out = []
    for a in params:
        n = -(-a.shape[0] // NR) * NR
        if n == a.shape[0] and a.dtype == np.int32 and a.flags.c_contiguous:
            out.append(a)
        else:
            padded = np.zeros(n, np.int32)
            padded[:a.shape[0]] = a
            out.append(padded)
    return tuple(out)


@njit(cache=True, inline="always")
def requantize_block(tile, rows, bias, mult, shift, o0, out, row0, out_zp, act_min, act_max, scratch, rounding):
    """out[row0 + r, o0 + j] = requantize(tile[r, j] + bias[o0 + j], ..., rounding) in int32 vector lanes
    (tile.requantize_tile of the tile's width); bias, mult and shift padded to whole panels
    (padded_params). A last, partial panel goes through ``scratch`` (int8, the tile's shape) and
    only its columns are copied out."""
    nr = tile.shape[1]
    cols = min(nr, out.shape[1] - o0)
    zp, lo, hi = np.int32(out_zp), np.int32(act_min), np.int32(act_max)
    dst, r0, c0 = (out, row0, o0) if cols == nr else (scratch, 0, 0)
    if nr == NR:
        requantize_tile(tile, rows, bias, mult, shift, o0, dst, r0, c0, zp, lo, hi, rounding)
    elif nr == NR_HALF:
        requantize_tile_half(tile, rows, bias, mult, shift, o0, dst, r0, c0, zp, lo, hi, rounding)
    else:
        requantize_tile_quarter(tile, rows, bias, mult, shift, o0, dst, r0, c0, zp, lo, hi, rounding)
    if cols < nr:
        for r in range(rows):
            for j in range(cols):
                out[row0 + r, o0 + j] = scratch[r, j]
