"""The compiled loops of the int8 LSTM: the forward over every time step, and backpropagation
through time with the weight and bias gradient sums (kernels/lstm.py prepares and calls them).

Forward arithmetic as LiteRT's ``lstm_eval::EvalInteger8x8_16`` (kernels/lstm.py's docstring); the
backward works in int64 fixed point, each product with a Q15 factor rounded half up.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quant import (multiply_by_quantized_multiplier, rounding_divide_by_pot, rounding_shift_right_half_up,
                     wrap_int16 as _wrap16)


# --- forward -----------------------------------------------------------------------------------------

@njit(cache=True)
def fold_bias(w, bias, zero_point):
    # bias[g, r] + zero_point * sum_k w[g, r, k], int32 (MatrixScalarMultiplyAccumulate)
    out = np.empty(bias.shape, np.int32)
    for g in range(w.shape[0]):
        for r in range(w.shape[1]):
            s = np.int32(0)
            for k in range(w.shape[2]):
                s += np.int32(w[g, r, k])
            out[g, r] = np.int32(bias[g, r] + s * np.int32(zero_point))
    return out


@njit(cache=True, inline="always")
def _clamp16(v):
    return max(-32768, min(32767, v))


@njit(cache=True, parallel=True)
def lstm_int8(x, wx, wh, bx, bh, x_mult, x_shift, h_mult, h_shift, h0, c0, sigmoid, tanh_gate, tanh_cell,
              cell_scale, cell_clip, hidden_mult, hidden_shift, hidden_zp, save, gates_out, cells_out):
    n, steps, n_input = x.shape
    n_cell = wx.shape[1]
    y = np.empty((n, steps, n_cell), np.int8)
    for b in prange(n):
        h = h0[b].copy()
        c = c0[b].copy()
        if save:
            cells_out[b, 0] = c
        gate = np.empty((4, n_cell), np.int16)
        for t in range(steps):
            xt = x[b, t]
            for g in range(4):
                for r in range(n_cell):
                    # input branch (gate starts at 0), then the recurrent branch accumulates onto it
                    # int32 sums as LiteRT's (they cannot wrap for int8 products of these widths)
                    acc = np.int64(bx[g, r])
                    for k in range(n_input):
                        acc += np.int64(xt[k]) * np.int64(wx[g, r, k])
                    v = _clamp16(np.int64(multiply_by_quantized_multiplier(np.int32(acc), x_mult[g], x_shift[g])))
                    acc = np.int64(bh[g, r])
                    for k in range(n_cell):
                        acc += np.int64(h[k]) * np.int64(wh[g, r, k])
                    v = _clamp16(np.int64(multiply_by_quantized_multiplier(np.int32(acc), h_mult[g], h_shift[g])) + v)
                    if g == 2:
                        gate[g, r] = tanh_gate[v + 32768]
                    else:
                        gate[g, r] = sigmoid[v + 32768]
            for r in range(n_cell):
                i, f, cg, o = np.int64(gate[0, r]), np.int64(gate[1, r]), np.int64(gate[2, r]), np.int64(gate[3, r])
                kept = _wrap16(rounding_divide_by_pot(f * np.int64(c[r]), 15))
                new = _wrap16(rounding_divide_by_pot(i * cg, 30 + cell_scale))
                cr = _clamp16(kept + new)
                if cell_clip > 0:
                    cr = max(-cell_clip, min(cell_clip, cr))
                c[r] = cr
                th = np.int32(tanh_cell[cr + 32768])
                v = np.int64(multiply_by_quantized_multiplier(np.int32(o) * th, hidden_mult, hidden_shift)) + hidden_zp
                h[r] = max(-128, min(127, v))
            y[b, t] = h
            if save:
                gates_out[b, t] = gate
                cells_out[b, t + 1] = c
    return y


# --- backward ----------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _mul15(a, q):
    """a * q / 2^15 for an int64 error and a Q15 factor, rounded to nearest (ties up)."""
    return rounding_shift_right_half_up(a * q, 15)


@njit(cache=True, parallel=True)
def lstm_bptt(dy, y, gates, cells, wx, wh, mx, mh, m_rec, shift_rec, tanh_cell, cell_scale, cell_clip, f_bits):
    """Backpropagation through time, int64 errors in units of the output error's scale / 2^f_bits.

    Returns dz (N, T, 4, H): dL/d(real gate pre-activation), and the input error sums (N, T, F) in
    units of (unit * max s_wx). Errors stop where the forward clamped: the hidden output at the int8
    bounds, the cell state at the int16 bounds or the cell clip."""
    n, steps, n_cell = y.shape
    n_input = wx.shape[2]
    dz = np.zeros((n, steps, 4, n_cell), np.int64)
    dx = np.zeros((n, steps, n_input), np.int64)
    c_lo = -cell_clip if cell_clip > 0 else -32768
    c_hi = cell_clip if cell_clip > 0 else 32767
    cshift = -cell_scale
    for b in prange(n):
        dh_rec = np.zeros(n_cell, np.int64)     # dL/dh from step t + 1's gates
        dc_next = np.zeros(n_cell, np.int64)    # dL/dc through step t + 1's forget gate
        folded = np.empty((4, n_cell), np.int64)
        for t in range(steps - 1, -1, -1):
            for r in range(n_cell):
                i = np.int64(gates[b, t, 0, r])
                f = np.int64(gates[b, t, 1, r])
                g = np.int64(gates[b, t, 2, r])
                o = np.int64(gates[b, t, 3, r])
                c = np.int64(cells[b, t + 1, r])
                c_prev = np.int64(cells[b, t, r])
                dh = (np.int64(dy[b, t, r]) << f_bits) + dh_rec[r]
                if not -128 < y[b, t, r] < 127:
                    dh = 0
                th = np.int64(tanh_cell[c + 32768])
                # h = o * tanh(c)
                do = _mul15(dh, th)
                dc = dc_next[r] + _mul15(_mul15(dh, o), 32768 - _mul15(th, th))
                if not c_lo < c < c_hi:
                    dc = 0
                # c = f * c_prev + i * g
                di = _mul15(dc, g)
                dg = _mul15(dc, i)
                df = rounding_shift_right_half_up(dc * c_prev, cshift)
                dc_next[r] = _mul15(dc, f)
                dz[b, t, 0, r] = _mul15(di, _mul15(i, 32768 - i))
                dz[b, t, 1, r] = _mul15(df, _mul15(f, 32768 - f))
                dz[b, t, 2, r] = _mul15(dg, 32768 - _mul15(g, g))
                dz[b, t, 3, r] = _mul15(do, _mul15(o, 32768 - o))
            # input error: sum over gates of w_x^T dz, each gate's weight scale folded in first
            for k in range(n_input):
                dx[b, t, k] = 0
            for gi in range(4):
                for r in range(n_cell):
                    folded[gi, r] = _mul15(dz[b, t, gi, r], mh[gi])
                    v = _mul15(dz[b, t, gi, r], mx[gi])
                    if v == 0:
                        continue
                    for k in range(n_input):
                        dx[b, t, k] += v * np.int64(wx[gi, r, k])
            # recurrent error for step t - 1, back in units of the error: times max(s_wh)
            for k in range(n_cell):
                acc = np.int64(0)
                for gi in range(4):
                    for r in range(n_cell):
                        acc += folded[gi, r] * np.int64(wh[gi, r, k])
                dh_rec[k] = rounding_shift_right_half_up(acc * m_rec, shift_rec) if shift_rec >= 0 \
                    else acc * m_rec << (-shift_rec)
    return dz, dx


@njit(cache=True, parallel=True)
def lstm_grad_params(dz, x, hprev, x_zp, h_zp):
    """Weight and bias gradient sums (int64): dW_x[g] = sum dz[g] (x - zp_x)^T over samples and
    steps, dW_h[g] likewise with the previous hidden state, db[g] = sum dz[g]."""
    n, steps, _, n_cell = dz.shape
    n_input = x.shape[2]
    rows = n * steps
    # (x - zp) and (h - zp) rows made once; each (gate, cell) row of the gradient sums over rows
    xc = np.empty((rows, n_input), np.int64)
    hc = np.empty((rows, n_cell), np.int64)
    d2 = dz.reshape(rows, 4 * n_cell)
    for b in range(n):
        for t in range(steps):
            for k in range(n_input):
                xc[b * steps + t, k] = np.int64(x[b, t, k]) - x_zp
            for k in range(n_cell):
                hc[b * steps + t, k] = np.int64(hprev[b, t, k]) - h_zp
    gx = np.zeros((4 * n_cell, n_input), np.int64)
    gh = np.zeros((4 * n_cell, n_cell), np.int64)
    gb = np.zeros(4 * n_cell, np.int64)
    for gr in prange(4 * n_cell):
        ax = np.zeros(n_input, np.int64)
        ah = np.zeros(n_cell, np.int64)
        s = np.int64(0)
        for row in range(rows):
            d = d2[row, gr]
            if d == 0:
                continue
            s += d
            xr = xc[row]
            hr = hc[row]
            for k in range(n_input):
                ax[k] += d * xr[k]
            for k in range(n_cell):
                ah[k] += d * hr[k]
        gx[gr] = ax
        gh[gr] = ah
        gb[gr] = s
    return gx.reshape(4, n_cell, n_input), gh.reshape(4, n_cell, n_cell), gb.reshape(4, n_cell)
