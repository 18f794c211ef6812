"""Float64 reference of UNIDIRECTIONAL_SEQUENCE_LSTM (tests only), registered with tests/reference.py.

Real values, no rounding: dequantized weights and biases (``xs`` per input slot), exact sigmoid / tanh
gates, and only the clamps the int8 kernel has:

* the cell state at the int16 range (or the quantized cell clip): ``c`` in [lo, hi] * 2^cell_scale;
* the hidden value ``o * tanh(c)``, quantized without rounding to ``q = hh / s_hidden + zp_hidden``
  and clipped to [-128, 127]: ``q`` is the op's output (``s_out * (q - zp_out)``) and the next
  step's recurrent input (``s_state * (q - zp_state)``); the converter makes the three quantizations
  one.

The backward is BPTT of that function with the straight-through estimator at the clamps (the
gradient passes where the value is strictly inside).

Signatures (reference.register):
  forward(model, op, xs) -> [y]            y: (N, T, H) real output
  backward(model, op, xs, ys, gs) -> (grads, pgrads)
      grads: one entry per input slot (the input's gradient in slot 0, the parameter slots'
      gradients as arrays, None elsewhere); pgrads: {suffix: gradient} with the kernel's parameter
      suffixes (``input_to_forget_weight``, ``cell_gate_bias``, ...).
"""
from __future__ import annotations

import numpy as np

import reference
from edge_qmul.kernels import lstm

TOL = 1e-9  # "strictly inside" a clamp, relative to the quantization step


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _quant(model, op):
    """(s_hidden, zp_hidden, s_state, zp_state, s_out, zp_out, cell lo, cell hi) of the op."""
    h_t = model.tensors[op.inputs[lstm.STATE_H]]
    c_t = model.tensors[op.inputs[lstm.STATE_C]]
    out = model.tensors[op.outputs[0]]
    inter = getattr(op, "intermediates", None)
    hid = model.tensors[inter[4]] if inter is not None and len(inter) > 4 and inter[4] >= 0 else h_t
    s_c = float(c_t.quant.s)
    clip = float(op.options.get("cell_clip", 0.0) or 0.0)
    if clip > 0:
        q = int(np.float32(min(max(np.float32(clip) / np.float32(s_c), -32768.0), 32767.0)))
        lo, hi = -q * s_c, q * s_c
    else:
        lo, hi = -32768 * s_c, 32767 * s_c
    return (float(hid.quant.s), hid.quant.zp, float(h_t.quant.s), h_t.quant.zp,
            float(out.quant.s), out.quant.zp, lo, hi)


def _run(model, op, xs):
    """The forward with everything the backward needs."""
    s_hid, zp_hid, s_st, zp_st, s_out, zp_out, c_lo, c_hi = _quant(model, op)
    x = np.asarray(xs[0], np.float64)
    n, steps, _ = x.shape
    wx = [np.asarray(xs[s], np.float64) for s in lstm.W_INPUT]
    wh = [np.asarray(xs[s], np.float64) for s in lstm.W_RECURRENT]
    bias = [np.asarray(xs[s], np.float64) for s in lstm.BIAS]
    n_cell = wx[0].shape[0]
    h = np.zeros((n, n_cell)) if xs[lstm.STATE_H] is None else np.broadcast_to(xs[lstm.STATE_H], (n, n_cell)).astype(np.float64)
    c = np.zeros((n, n_cell)) if xs[lstm.STATE_C] is None else np.broadcast_to(xs[lstm.STATE_C], (n, n_cell)).astype(np.float64)
    tape = []
    ys = np.empty((n, steps, n_cell))
    for t in range(steps):
        z = [x[:, t] @ wx[g].T + bias[g] + h @ wh[g].T for g in range(4)]
        i, f, g, o = _sigmoid(z[0]), _sigmoid(z[1]), np.tanh(z[2]), _sigmoid(z[3])
        c_raw = f * c + i * g
        c_new = np.clip(c_raw, c_lo, c_hi)
        c_in = (c_raw > c_lo) & (c_raw < c_hi)
        tc = np.tanh(c_new)
        q_raw = o * tc / s_hid + zp_hid
        q = np.clip(q_raw, -128, 127)
        q_in = (q_raw > -128 + TOL) & (q_raw < 127 - TOL)
        tape.append((x[:, t], h, c, i, f, g, o, c_in, tc, q_in, c_raw))
        ys[:, t] = s_out * (q - zp_out)
        h = s_st * (q - zp_st)
        c = c_new
    return ys, tape, (wx, wh, s_hid, s_st, s_out)


def forward(model, op, xs) -> list:
    return [_run(model, op, xs)[0]]


def backward(model, op, xs, ys, gs):
    _, tape, (wx, wh, s_hid, s_st, s_out) = _run(model, op, xs)
    gy = np.zeros_like(np.asarray(ys[0], np.float64)) if gs[0] is None else np.asarray(gs[0], np.float64)
    n, steps, n_cell = gy.shape
    dwx = [np.zeros_like(w) for w in wx]
    dwh = [np.zeros_like(w) for w in wh]
    db = [np.zeros(n_cell) for _ in range(4)]
    dx = np.zeros(np.shape(xs[0]))
    dh_rec = np.zeros((n, n_cell))   # dL/d(real recurrent input h_t) from step t + 1
    dc_next = np.zeros((n, n_cell))
    for t in range(steps - 1, -1, -1):
        xt, h_prev, c_prev, i, f, g, o, c_in, tc, q_in, _ = tape[t]
        dq = (gy[:, t] * s_out + dh_rec * s_st) * q_in        # dL/dq
        dhh = dq / s_hid                                      # dL/d(o * tanh c)
        dc = (dc_next + dhh * o * (1 - tc ** 2)) * c_in
        dz = [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g ** 2), dhh * tc * o * (1 - o)]
        dc_next = dc * f
        dh_rec = np.zeros((n, n_cell))
        for k in range(4):
            dwx[k] += dz[k].T @ xt
            dwh[k] += dz[k].T @ h_prev
            db[k] += dz[k].sum(axis=0)
            dx[:, t] += dz[k] @ wx[k]
            dh_rec += dz[k] @ wh[k]
    grads = [None] * len(op.inputs)
    grads[0] = dx
    pgrads = {}
    for k, name in enumerate(lstm.GATES):
        for slot, suffix, value in ((lstm.W_INPUT[k], f"input_to_{name}_weight", dwx[k]),
                                    (lstm.W_RECURRENT[k], f"recurrent_to_{name}_weight", dwh[k]),
                                    (lstm.BIAS[k], f"{name}_gate_bias", db[k])):
            grads[slot] = value
            pgrads[suffix] = value
    return grads, pgrads


reference.register("UNIDIRECTIONAL_SEQUENCE_LSTM", forward, backward)
