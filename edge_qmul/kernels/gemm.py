"""The int16 matrix product the convolution kernels share: C[i, o] = sum_t A[i, t] * B[o, t], int32.

Both operands are rows of int16 (activations minus their zero point, int8 weights or int16
errors), so every product fits int32 and LLVM turns the inner loop into pair multiply-adds
(vpmaddwd / vpdpwssd on x86, smlal on ARM). A block of 4 rows of A x 4 rows of B keeps 16 int32
sums in registers and shares each load four ways: measured against 1x1 .. 4x4 blocks on
MobileNetV2 / ResNet-18 shapes (benchmarks/README.md), 4x4 was fastest. Sums are truncated to
int32 at every step (numba would widen int32 products to int64, a quarter of the lanes); callers
guarantee the true sums fit int32.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def gemm_i16(a, b, c):
    """c[i, o] = sum_t a[i, t] * b[o, t] for a (M, K), b (N, K) int16 and c (M, N) int32."""
    m, k = a.shape
    n = b.shape[0]
    if n < 4:
        for i in range(m):
            for o in range(n):
                s = np.int32(0)
                for t in range(k):
                    s = np.int32(s + np.int32(a[i, t]) * np.int32(b[o, t]))
                c[i, o] = s
        return
    for i in range(0, m, 4):
        # past the last row: copies of it, computed and written before the real row (same value)
        i1 = min(i + 1, m - 1)
        i2 = min(i + 2, m - 1)
        i3 = min(i + 3, m - 1)
        p0, p1, p2, p3 = a[i], a[i1], a[i2], a[i3]
        for o0 in range(0, n, 4):
            o = min(o0, n - 4)  # the last block may overlap the one before it
            w0, w1, w2, w3 = b[o], b[o + 1], b[o + 2], b[o + 3]
            s00 = s01 = s02 = s03 = np.int32(0)
            s10 = s11 = s12 = s13 = np.int32(0)
            s20 = s21 = s22 = s23 = np.int32(0)
            s30 = s31 = s32 = s33 = np.int32(0)
            for t in range(k):
                u0 = np.int32(p0[t])
                u1 = np.int32(p1[t])
                u2 = np.int32(p2[t])
                u3 = np.int32(p3[t])
                v0 = np.int32(w0[t])
                v1 = np.int32(w1[t])
                v2 = np.int32(w2[t])
                v3 = np.int32(w3[t])
                s00 = np.int32(s00 + u0 * v0)
                s01 = np.int32(s01 + u0 * v1)
                s02 = np.int32(s02 + u0 * v2)
                s03 = np.int32(s03 + u0 * v3)
                s10 = np.int32(s10 + u1 * v0)
                s11 = np.int32(s11 + u1 * v1)
                s12 = np.int32(s12 + u1 * v2)
                s13 = np.int32(s13 + u1 * v3)
                s20 = np.int32(s20 + u2 * v0)
                s21 = np.int32(s21 + u2 * v1)
                s22 = np.int32(s22 + u2 * v2)
                s23 = np.int32(s23 + u2 * v3)
                s30 = np.int32(s30 + u3 * v0)
                s31 = np.int32(s31 + u3 * v1)
                s32 = np.int32(s32 + u3 * v2)
                s33 = np.int32(s33 + u3 * v3)
            c[i3, o], c[i3, o + 1], c[i3, o + 2], c[i3, o + 3] = s30, s31, s32, s33
            c[i2, o], c[i2, o + 1], c[i2, o + 2], c[i2, o + 3] = s20, s21, s22, s23
            c[i1, o], c[i1, o + 1], c[i1, o + 2], c[i1, o + 3] = s10, s11, s12, s13
            c[i, o], c[i, o + 1], c[i, o + 2], c[i, o + 3] = s00, s01, s02, s03
