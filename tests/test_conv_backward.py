"""CONV_2D's integer backward kernels against int64 numpy references written from the definition:

    dW[oc, ky, kx, c] = sum_{b, oy, ox} g[b, oy, ox, oc] * (x - zp)[b, oy*s - pad + ky*d, ox*s - pad + kx*d, c]
    dX[b, iy, ix, c]  = sum over the (oy, ox, ky, kx) that read (iy, ix) of g[b, oy, ox, oc] * w[oc, ky, kx, c]

Every path is hit: few input channels (no im2col), the tile kernel's weight gradient with one and
two tasks and chunk tails, the implicit-GEMM input gradient (stride 1) and the direct one
(strides); products at the int16 x 9-bit extremes."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from edge_qmul.kernels import conv
from edge_qmul.kernels.common import Window


def _geometry(h, w, k_h, k_w, stride, dil, pad):
    out_h = (h + 2 * pad - (k_h - 1) * dil - 1) // stride + 1
    out_w = (w + 2 * pad - (k_w - 1) * dil - 1) // stride + 1
    return Window(stride, stride, dil, dil, pad, pad, out_h, out_w)


def _reference(x, g, w, zp, v: Window):
    n, h, wd, cin = x.shape
    cout, k_h, k_w, _ = w.shape
    xs = x.astype(np.int64) - zp
    gw = np.zeros(w.shape, np.int64)
    gx = np.zeros(x.shape, np.int64)
    g64, w64 = g.astype(np.int64), w.astype(np.int64)
    for ky in range(k_h):
        for kx in range(k_w):
            for oy in range(v.out_h):
                iy = oy * v.stride_h - v.pad_top + ky * v.dil_h
                if not 0 <= iy < h:
                    continue
                for ox in range(v.out_w):
                    ix = ox * v.stride_w - v.pad_left + kx * v.dil_w
                    if not 0 <= ix < wd:
                        continue
                    gw[:, ky, kx, :] += g64[:, oy, ox, :].T @ xs[:, iy, ix, :]
                    gx[:, iy, ix, :] += g64[:, oy, ox, :] @ w64[:, ky, kx, :]
    return gw, gx


CASES = [  # n, h, w, cin, cout, k, stride, dilation, pad
    (2, 7, 6, 3, 9, 3, 1, 1, 1),     # few input channels
    (3, 6, 6, 8, 11, 3, 2, 2, 2),    # stride 2: direct input gradient
    (1, 5, 5, 16, 40, 1, 1, 1, 0),   # 1x1, partial panel
    (2, 9, 7, 12, 33, 3, 1, 1, 0),   # VALID
    (1, 8, 8, 9, 8, 5, 2, 1, 2),     # odd channels
    (5, 9, 9, 13, 70, 3, 1, 2, 2),   # dilated, two panels, chunk tails
    (4, 6, 5, 10, 5, 3, 1, 1, 1),    # few output channels: the narrowest panel
    (32, 8, 8, 16, 32, 3, 2, 1, 0),  # the digits CNN's second layer
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_conv_backward_matches_int64_reference(case, threads):
    n, h, w, cin, cout, k, stride, dil, pad = case
    v = _geometry(h, w, k, k, stride, dil, pad)
    rng = np.random.default_rng(sum(case) + threads)
    zp = int(rng.integers(-128, 128))
    x = rng.integers(-128, 128, (n, h, w, cin)).astype(np.int8)
    x.reshape(-1)[:5] = [-128, 127, -128, 127, zp]
    g = rng.integers(-32767, 32768, (n, v.out_h, v.out_w, cout)).astype(np.int16)
    # input gradients take errors folded so that int32 sums cannot overflow (grad.channel_fold)
    g_in = (g // (1 << 5)).astype(np.int16)
    wt = rng.integers(-127, 128, (cout, k, k, cin)).astype(np.int8)
    p = conv.ConvParams(v, None, -zp, np.zeros(cout, np.int32), (k, k))
    want_gw, _ = _reference(x, g, wt, zp, v)
    _, want_gx = _reference(x, g_in, wt, zp, v)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for patch_bytes in (1, conv.PATCH_BYTES, 1 << 24):  # one task, the default, every thread
            gw, gb = conv.grad_params(p, x, g, patch_bytes=patch_bytes)
            np.testing.assert_array_equal(gw, want_gw)
        np.testing.assert_array_equal(gb, g.astype(np.int64).sum(axis=(0, 1, 2)))
        gx = conv.grad_input(p, wt, g_in, (h, w, cin))
        assert gx.dtype == np.int32
        np.testing.assert_array_equal(gx, want_gx)
        # the trainer's way: filters prepared once, samples in blocks
        run = conv.grad_input_prepared(p, wt, (h, w, cin))
        blocks = np.concatenate([run(g_in[i:i + 2]) for i in range(0, n, 2)])
        np.testing.assert_array_equal(blocks, want_gx)
    finally:
        numba.set_num_threads(previous)


def test_weight_gradient_plan_respects_the_budget():
    tasks, workspace = conv.grad_weight_plan(32, 32 * 16, 32, 144, 16, conv.PATCH_BYTES)
    assert tasks == 1 and workspace <= 2 * conv.PATCH_BYTES
    tasks, _ = conv.grad_weight_plan(32, 32 * 256, 16, 144, 16, 1 << 24)
    assert tasks == min(2, numba.get_num_threads())
