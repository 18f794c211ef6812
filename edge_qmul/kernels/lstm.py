"""UNIDIRECTIONAL_SEQUENCE_LSTM, fully int8 ("8x8_16"): int8 input, weights and output, int16 cell
state, int32 biases; forward bit-exact with LiteRT's builtin kernel, backward by BPTT in integers.

The forward reproduces LiteRT's ``lstm_eval::EvalInteger8x8_16`` (batch-major branch) with the
parameters ``PopulateQuantizedLstmParams8x8_16`` and ``PopulatePrecomputedZPTimesWeightsWithBias``
compute (tflite/kernels/unidirectional_sequence_lstm.cc). On x86 every helper it calls is the
portable one (sse_tensor_utils.h forwards the int8 / int16 LSTM helpers to ``Portable*``), so per
time step and gate:

* ``MatrixBatchVectorMultiplyAccumulate``: acc = bias' + sum(x * w) with the raw int8 input and
  ``bias' = bias - zp * rowsum(w)`` (folded once), then the scalar (double-rounding)
  MultiplyByQuantizedMultiplier to Q3.12, plus what the gate already holds, clamped to int16; the
  input branch first, then the recurrent one (its own multiplier, no bias).
* ``ApplySigmoid`` / ``ApplyTanh``: gemmlowp's int16 fixed-point logistic (Q3.12 in) and tanh
  (Q3.12 for the cell gate, Q(15 + cell_scale) for the cell state), Q0.15 out. They are exact
  functions of an int16, so they are tabulated (65536 entries) from a transcription of gemmlowp.
* ``UpdateLstmCellInteger``: c = RDBPOT(f * c, 15) + RDBPOT(i * g, 30 + cell_scale) (each cast to
  int16, the sum saturated), then ``CwiseClipping`` if cell_clip > 0.
* ``CalculateLstmOutputInteger8x8_16`` (no projection): h = MBQM(o * tanh(c), hidden scale) +
  hidden_zp clamped to int8; h is both the output and the next step's recurrent input.

Supported: the plain LSTM TensorFlow's converter emits (input gate present: no CIFG; no peephole,
projection or layer norm; batch-major input (N, T, F)). The state inputs (slots 18, 19) are
variable tensors; None means LiteRT's reset state (h = its zero point, c = 0). Each sample of the
batch is an independent sequence (LiteRT's batch-major loop runs them one after another).

The backward is backpropagation through time in int64 fixed point: output errors (int16, scale S)
enter with F_BITS fractional bits (unit S * 2^-F_BITS); gate derivatives come from the int16 gate
activations the forward saves (a recomputation for the batch); per-gate weight scales are folded into
Q15 multipliers before the int8 weight products. Weight and bias gradients are int64 sums handed to
``ctx.emit`` with the scale that makes them dL/d(real parameter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..grad import from_accumulator
from ..quant import multiply_by_quantized_multiplier, quantize_multipliers
from .common import tensor, where
from .contract import Kernel, MemoryQuery

# input slots of the op (tflite/kernels/lstm_shared.h, lstm::full)
INPUT, STATE_H, STATE_C = 0, 18, 19
W_INPUT = (1, 2, 3, 4)          # input_to_{input, forget, cell, output}_weights
W_RECURRENT = (5, 6, 7, 8)      # recurrent_to_{input, forget, cell, output}_weights
PEEPHOLE = (9, 10, 11)
BIAS = (12, 13, 14, 15)         # {input, forget, cell, output}_gate_bias
PROJECTION = (16, 17)
LAYER_NORM = (20, 21, 22, 23)
GATES = ("input", "forget", "cell", "output")

PARAMETERS = tuple((s, f"input_to_{g}_weight") for s, g in zip(W_INPUT, GATES)) \
    + tuple((s, f"recurrent_to_{g}_weight") for s, g in zip(W_RECURRENT, GATES)) \
    + tuple((s, f"{g}_gate_bias") for s, g in zip(BIAS, GATES))

GATE_SCALE = 2.0 ** -12      # gates before activation: Q3.12 (no layer norm)
F_BITS = 8                   # fractional bits of the backward's int64 errors below the output error's unit


# --- gemmlowp int16 fixed point (fixedpoint.h, generic scalar code) --------------------------------
# Raw values are int16 held in int64; C's int16 arithmetic wraps, which _wrap16 reproduces.

@njit(cache=True, inline="always")
def _wrap16(v):
    return ((v + 32768) & 0xFFFF) - 32768


@njit(cache=True, inline="always")
def _srdhm16(a, b):
    """SaturatingRoundingDoublingHighMul<int16>: (a*b + nudge) / 2^15, C division (toward zero)."""
    if a == -32768 and b == -32768:
        return 32767
    ab = a * b
    v = ab + (16384 if ab >= 0 else 1 - 16384)
    return v // 32768 if v >= 0 else -((-v) // 32768)


@njit(cache=True, inline="always")
def _rdbpot(x, exponent):
    """RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@njit(cache=True, inline="always")
def _mul_pot16(x, exponent):
    """SaturatingRoundingMultiplyByPOT<exponent> on int16 (also Rescale)."""
    if exponent > 0:
        threshold = (1 << (15 - exponent)) - 1
        if x > threshold:
            return 32767
        if x < -threshold:
            return -32768
        return x << exponent
    if exponent < 0:
        return _rdbpot(x, -exponent)
    return x


@njit(cache=True, inline="always")
def _const16(raw32):
    """GEMMLOWP_CHECKED_FIXEDPOINT_CONSTANT for int16: the int32 constant rounded right by 16."""
    return _rdbpot(raw32, 16)


@njit(cache=True)
def _exp_quarter16(a):
    # exp(x) for x in [-1/4, 0), F0 in and out: Taylor expansion around -1/8
    constant_term = _const16(1895147668)
    one_third = _const16(715827883)
    x = _wrap16(a + (1 << 12))
    x2 = _srdhm16(x, x)
    x3 = _srdhm16(x2, x)
    x4 = _srdhm16(x2, x2)
    x4_over_4 = _mul_pot16(x4, -2)
    poly = _mul_pot16(_wrap16(_srdhm16(_wrap16(x4_over_4 + x3), one_third) + x2), -1)
    return max(-32768, min(32767, constant_term + _srdhm16(constant_term, _wrap16(x + poly))))


@njit(cache=True)
def _exp_negative16(a, integer_bits):
    """exp_on_negative_values: exp(a) for a <= 0 in Q(integer_bits), Q0.15 out."""
    frac = 15 - integer_bits
    one_quarter = 1 << (frac - 2)
    a_mod = _wrap16((a & (one_quarter - 1)) - one_quarter)
    result = _exp_quarter16(_mul_pot16(a_mod, integer_bits))
    remainder = _wrap16(a_mod - a)
    exps = (-2, -1, 0, 1, 2, 3, 4)
    mults = (1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242)
    for k in range(7):
        e = exps[k]
        if integer_bits > e and (remainder & (1 << (frac + e))) != 0:
            result = _srdhm16(result, _const16(mults[k]))
    if integer_bits > 5:
        if a < _const16(-(1 << (36 - integer_bits))):
            result = 0
    if a == 0:
        result = 32767
    return result


@njit(cache=True)
def _newton_reciprocal16(a):
    # the Newton-Raphson loop shared by one_over_one_plus_x_for_x_in_0_1 and
    # one_minus_x_over_one_plus_x_for_x_in_0_1: x ~ 1 / ((1 + a) / 2) in F2, a in F0 (raw values)
    half_denominator = a + 32767  # RoundingHalfSum(a, F0::One()): (sum + sign) / 2, C division
    half_denominator = (half_denominator + (1 if half_denominator >= 0 else -1))
    half_denominator = half_denominator // 2 if half_denominator >= 0 else -((-half_denominator) // 2)
    x = _wrap16(_const16(1515870810) + _srdhm16(half_denominator, _const16(-1010580540)))
    for _ in range(3):
        one_minus = _wrap16((1 << 13) - _srdhm16(half_denominator, x))
        x = _wrap16(x + _mul_pot16(_srdhm16(x, one_minus), 2))
    return x


@njit(cache=True)
def gemmlowp_logistic16(a, integer_bits):
    """gemmlowp::logistic on FixedPoint<int16, integer_bits> -> FixedPoint<int16, 0> (raw)."""
    positive = a > 0
    abs_a = a if positive else _wrap16(-a)
    # one_over_one_plus_x_for_x_in_0_1(exp(-|a|)): Rescale<0>(ExactMulByPot<-1>(x))
    r_pos = _mul_pot16(_newton_reciprocal16(_exp_negative16(_wrap16(-abs_a), integer_bits)), 1)
    if a == 0:
        return 16384
    return r_pos if positive else _wrap16(32767 - r_pos)


@njit(cache=True)
def gemmlowp_tanh16(a, integer_bits):
    """gemmlowp::tanh on FixedPoint<int16, integer_bits> -> FixedPoint<int16, 0> (raw)."""
    negative = a < 0
    n = a if negative else _wrap16(-a)
    # one_minus_x_over_one_plus_x_for_x_in_0_1(exp(2n)): Rescale<0>(x - F2::One())
    t = _mul_pot16(_wrap16(_newton_reciprocal16(_exp_negative16(n, integer_bits + 1)) - (1 << 13)), 2)
    if a == 0:
        return 0
    return _wrap16(-t) if negative else t


@njit(cache=True)
def _table(kind, integer_bits):
    out = np.empty(65536, np.int16)
    for i in range(65536):
        v = i - 32768
        out[i] = gemmlowp_logistic16(v, integer_bits) if kind == 0 else gemmlowp_tanh16(v, integer_bits)
    return out


_TABLES: dict = {}


def activation_table(kind: str, integer_bits: int) -> np.ndarray:
    """int16 -> int16 table of gemmlowp's logistic ("sigmoid") or tanh at ``integer_bits``: entry
    v + 32768 is f(v). Built once per process."""
    key = (kind, integer_bits)
    if key not in _TABLES:
        _TABLES[key] = _table(0 if kind == "sigmoid" else 1, integer_bits)
    return _TABLES[key]


# --- prepare -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LstmParams:
    steps: int
    n_input: int
    n_cell: int
    input_zp: int
    state_zp: int                # output state's zero point (the recurrent input)
    x_mult: np.ndarray           # int32[4]: input-to-gate effective scales (Q3.12 out)
    x_shift: np.ndarray
    h_mult: np.ndarray           # int32[4]: recurrent-to-gate effective scales
    h_shift: np.ndarray
    hidden_mult: int             # o * tanh(c) (Q0.15 x Q0.15) -> int8 hidden
    hidden_shift: int
    hidden_zp: int
    cell_scale: int              # log2 of the cell state's scale
    cell_clip: int               # quantized cell clip (0: none)
    sigmoid: np.ndarray          # tables (activation_table)
    tanh_gate: np.ndarray
    tanh_cell: np.ndarray
    # backward: real scales
    s_input: float
    s_state: float               # the recurrent input's (output state)
    s_output: float              # the output tensor's (its error's unit)
    s_hidden: float              # the hidden intermediate's (what the int8 h means when made)
    s_wx: np.ndarray             # float64[4]
    s_wh: np.ndarray


def _present(op, slot: int) -> bool:
    return slot < len(op.inputs) and op.inputs[slot] >= 0


def _scale(op, t, what: str) -> np.float32:
    if t.quant is None or t.quant.per_channel:
        raise ModelError(f"{where(op)}: {what} {t.name!r} must be quantized per tensor")
    return np.float32(t.quant.s)


def _checked_log2(scale: float) -> int | None:
    """CheckedLog2 (kernel_util.cc): round(log2 x) in float32, None unless within 1e-3 of it."""
    x = np.float32(math.log(scale)) * (np.float32(1.0) / np.float32(math.log(2.0)))
    r = np.float32(round(float(x)) if x >= 0 else -round(-float(x)))
    return int(r) if abs(float(x - r)) < 1e-3 else None


def prepare(op, model) -> LstmParams:
    if len(op.inputs) not in (20, 24):
        raise ModelError(f"{where(op)}: expects 20 or 24 inputs, got {len(op.inputs)}")
    x = tensor(model, op, INPUT, dtype=np.int8, rank=3)
    opts = op.options
    if opts.get("time_major", False):
        raise ModelError(f"{where(op)}: time_major input is not supported (the engine runs batch-first)")
    if opts.get("diagonal_recurrent_tensors", False):
        raise ModelError(f"{where(op)}: diagonal recurrent weights are not supported")
    if not _present(op, W_INPUT[0]) or not _present(op, W_RECURRENT[0]):
        raise ModelError(f"{where(op)}: CIFG (no input gate) is not supported")
    for slots, feature in ((PEEPHOLE, "peephole"), (PROJECTION, "projection"), (LAYER_NORM, "layer norm")):
        if any(_present(op, s) for s in slots):
            raise ModelError(f"{where(op)}: {feature} is not supported")
    n_batch, steps, n_input = x.shape
    wx = [tensor(model, op, s, dtype=np.int8, constant=True, rank=2) for s in W_INPUT]
    wh = [tensor(model, op, s, dtype=np.int8, constant=True, rank=2) for s in W_RECURRENT]
    bias = [tensor(model, op, s, dtype=np.int32, constant=True, rank=1) for s in BIAS]
    n_cell = wx[0].shape[0]
    for w in wx:
        if tuple(w.shape) != (n_cell, n_input):
            raise ModelError(f"{where(op)}: input weight {w.name!r} is {list(w.shape)}, expected {[n_cell, n_input]}")
    for w in wh:  # no projection: the output (recurrent) width is the cell width
        if tuple(w.shape) != (n_cell, n_cell):
            raise ModelError(f"{where(op)}: recurrent weight {w.name!r} is {list(w.shape)}, expected {[n_cell, n_cell]}")
    for b in bias:
        if tuple(b.shape) != (n_cell,):
            raise ModelError(f"{where(op)}: bias {b.name!r} is {list(b.shape)}, expected {[n_cell]}")
    for w in wx + wh:
        if w.quant is None or np.any(w.quant.zero_point != 0):
            raise ModelError(f"{where(op)}: weight {w.name!r} must be quantized with zero point 0")
    h_t = model.tensors[op.inputs[STATE_H]] if _present(op, STATE_H) else None
    c_t = model.tensors[op.inputs[STATE_C]] if _present(op, STATE_C) else None
    if h_t is None or c_t is None:
        raise ModelError(f"{where(op)}: output state and cell state inputs (18, 19) are required")
    if np.dtype(h_t.dtype) != np.int8 or np.dtype(c_t.dtype) != np.int16:
        raise ModelError(f"{where(op)}: only int8 output state with int16 cell state (8x8_16) is supported, "
                         f"got {np.dtype(h_t.dtype).name} / {np.dtype(c_t.dtype).name}")
    if int(np.prod(h_t.shape)) != n_batch * n_cell or int(np.prod(c_t.shape)) != n_batch * n_cell:
        raise ModelError(f"{where(op)}: state tensors must hold {n_batch} x {n_cell} values")
    out = model.tensors[op.outputs[0]]
    if np.dtype(out.dtype) != np.int8:
        raise ModelError(f"{where(op)}: output {out.name!r} is {np.dtype(out.dtype).name}, expected int8")
    if tuple(out.shape) != (n_batch, steps, n_cell):
        raise ModelError(f"{where(op)}: output {out.name!r} is {list(out.shape)}, the op computes "
                         f"{[n_batch, steps, n_cell]}")

    s_in = _scale(op, x, "input")
    s_h = _scale(op, h_t, "output state")
    cell_scale = _checked_log2(float(_scale(op, c_t, "cell state")))
    # ApplyTanh dispatches integer bits 0..6 only (15 + cell_scale); others would leave garbage
    if cell_scale is None or not -15 <= cell_scale <= -9:
        raise ModelError(f"{where(op)}: cell state scale {float(c_t.quant.s)!r} must be a power of two "
                         "between 2^-15 and 2^-9")
    # intermediate 4 (hidden = o * tanh(c)): without projection the converter gives it the output
    # state's quantization; read it from the op when the graph keeps intermediates
    inter = getattr(op, "intermediates", None)
    hidden = model.tensors[inter[4]] if inter is not None and len(inter) > 4 and inter[4] >= 0 else h_t
    s_hidden, hidden_zp = _scale(op, hidden, "hidden intermediate"), int(hidden.quant.zp)

    # effective scales as PopulateQuantizedLstmParams8x8_16 computes them: float32 products and
    # quotients, widened to double by QuantizeMultiplier
    gate = np.float32(GATE_SCALE)
    s_wx = [_scale(op, w, "weight") for w in wx]
    s_wh = [_scale(op, w, "weight") for w in wh]
    x_real = np.array([float(np.float32(np.float32(s * s_in) / gate)) for s in s_wx])
    h_real = np.array([float(np.float32(np.float32(s * s_h) / gate)) for s in s_wh])
    hidden_real = float(np.float32(2.0 ** -15 / float(s_hidden) * 2.0 ** -15))
    x_mult, x_shift = quantize_multipliers(x_real)
    h_mult, h_shift = quantize_multipliers(h_real)
    hm, hs = quantize_multipliers(np.array([hidden_real]))

    clip = float(opts.get("cell_clip", 0.0) or 0.0)
    if clip < 0 or float(opts.get("proj_clip", 0.0) or 0.0) < 0:
        raise ModelError(f"{where(op)}: negative clip")
    q_clip = 0
    if clip > 0:
        v = np.float32(clip) / np.float32(c_t.quant.s)
        q_clip = int(np.float32(min(max(v, np.float32(-32768.0)), np.float32(32767.0))))  # static_cast: toward 0

    return LstmParams(
        steps, n_input, n_cell, int(x.quant.zp), int(h_t.quant.zp), x_mult, x_shift, h_mult, h_shift,
        int(hm[0]), int(hs[0]), hidden_zp, cell_scale, q_clip,
        activation_table("sigmoid", 3), activation_table("tanh", 3), activation_table("tanh", 15 + cell_scale),
        float(s_in), float(s_h), float(_scale(op, out, "output")), float(s_hidden),
        np.array(s_wx, np.float64), np.array(s_wh, np.float64))


# --- forward -----------------------------------------------------------------------------------------

def _weights(inputs):
    """The four input and recurrent weight matrices stacked gate-major (i, f, g, o), and the folded
    biases: input branch bias - zp_x * rowsum(w_x), recurrent branch -zp_h * rowsum(w_h)
    (PrecomputeZeroPointTimesWeightWithBias). Folded at every call: training changes the weights."""
    wx = np.ascontiguousarray(np.stack([inputs[s] for s in W_INPUT]))
    wh = np.ascontiguousarray(np.stack([inputs[s] for s in W_RECURRENT]))
    b = np.stack([inputs[s] for s in BIAS]).astype(np.int32)
    return wx, wh, b


def _states(p: LstmParams, inputs, n: int):
    h0, c0 = inputs[STATE_H], inputs[STATE_C]
    h0 = np.full((n, p.n_cell), p.state_zp, np.int8) if h0 is None else \
        np.ascontiguousarray(np.broadcast_to(np.asarray(h0, np.int8).reshape(-1, p.n_cell), (n, p.n_cell)))
    c0 = np.zeros((n, p.n_cell), np.int16) if c0 is None else \
        np.ascontiguousarray(np.broadcast_to(np.asarray(c0, np.int16).reshape(-1, p.n_cell), (n, p.n_cell)))
    return h0, c0


def _run(p: LstmParams, inputs, save: bool):
    x = np.ascontiguousarray(inputs[INPUT])
    n = x.shape[0]
    wx, wh, b = _weights(inputs)
    h0, c0 = _states(p, inputs, n)
    bx = fold_bias(wx, b, -p.input_zp)
    bh = fold_bias(wh, np.zeros_like(b), -p.state_zp)
    shape = (n, p.steps, 4, p.n_cell) if save else (0, 0, 4, p.n_cell)
    gates = np.empty(shape, np.int16)
    cells = np.empty((n, p.steps + 1, p.n_cell) if save else (0, 0, p.n_cell), np.int16)
    y = lstm_int8(x, wx, wh, bx, bh, p.x_mult, p.x_shift, p.h_mult, p.h_shift, h0, c0,
                  p.sigmoid, p.tanh_gate, p.tanh_cell, p.cell_scale, p.cell_clip,
                  p.hidden_mult, p.hidden_shift, p.hidden_zp, save, gates, cells)
    return y, gates, cells, h0


def forward(p: LstmParams, *inputs) -> np.ndarray:
    """(N, T, F) int8 -> (N, T, H) int8: the output at every step (zero initial state unless given)."""
    return _run(p, inputs, False)[0]


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
                kept = _wrap16(_rdbpot(f * np.int64(c[r]), 15))
                new = _wrap16(_rdbpot(i * cg, 30 + cell_scale))
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


def macs(op, model) -> int:
    x = model.tensors[op.inputs[INPUT]]
    w = model.tensors[op.inputs[W_INPUT[0]]]
    steps, n_input = x.shape[1], x.shape[2]
    n_cell = w.shape[0]
    return steps * 4 * n_cell * (n_input + n_cell) + steps * 4 * n_cell


def clamp(p: LstmParams):
    # the hidden output is clamped to the int8 range by CwiseMul (no fused activation applies)
    return (-128, 127)


# --- backward ----------------------------------------------------------------------------------------

def _fold(scales: np.ndarray) -> tuple[np.ndarray, float]:
    """Q15 multipliers s[g] / max(s) and max(s): the per-gate weight scales folded into the error
    before it meets the int8 weights (their ratio cannot be factored out of a sum over gates)."""
    top = float(np.max(scales))
    return np.minimum(np.round(scales / top * 32768.0), 32768).astype(np.int64), top


def _rescale(real: float) -> tuple[int, int]:
    """(m, shift) with real ~= m / 2^shift and m in [2^14, 2^15): a 16-bit multiplier."""
    mant, e = math.frexp(real)
    m = int(round(mant * 32768.0))
    return m, 15 - e


def backward(p: LstmParams, ctx) -> list:
    inputs = ctx.inputs
    err = ctx.zeros_error(0)
    # recompute the forward for the batch, keeping the int16 gates and cell states of every step
    y, gates, cells, h0 = _run(p, inputs, True)
    wx, wh, _ = _weights(inputs)
    mx, top_x = _fold(p.s_wx)
    mh, top_h = _fold(p.s_wh)
    # the int8 h is read three ways: as the output (s_output), the next step's input (s_state) and
    # what o * tanh(c) was quantized with (s_hidden); the converter makes them one, but dL/dh is
    # carried in units of the hidden one: the output error by s_output / s_hidden (into the unit),
    # the recurrent error by s_state / s_hidden (into its rescale)
    unit = err.scale * 2.0 ** -F_BITS * p.s_output / p.s_hidden   # real dL/d(o tanh c) = value * unit
    m_rec, shift_rec = _rescale(top_h * p.s_state / p.s_hidden)
    dz, dx = lstm_bptt(np.ascontiguousarray(err.values), y, gates, cells, wx, wh, mx, mh, m_rec, shift_rec,
                       p.tanh_cell, p.cell_scale, p.cell_clip, F_BITS)
    if ctx.train:
        x = inputs[INPUT]
        hprev = np.concatenate([h0[:, None, :], y[:, :-1, :]], axis=1)
        for k, rows in enumerate(ctx.groups):
            gx, gh, gb = lstm_grad_params(dz[rows], np.ascontiguousarray(x[rows]), np.ascontiguousarray(hprev[rows]),
                                          p.input_zp, p.state_zp)
            for g, name in enumerate(GATES):
                ctx.emit(k, f"input_to_{name}_weight", gx[g], unit * p.s_input)
                ctx.emit(k, f"recurrent_to_{name}_weight", gh[g], unit * p.s_state)
                ctx.emit(k, f"{name}_gate_bias", gb[g], unit)
    result = [None] * len(ctx.op.inputs)
    if ctx.wants[INPUT]:
        result[INPUT] = from_accumulator(dx, unit * top_x)
    return result


@njit(cache=True, inline="always")
def _mul15(a, q):
    """a * q / 2^15 for an int64 error and a Q15 factor, rounded to nearest (ties up)."""
    return (a * q + 16384) >> 15


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
    half = np.int64(1) << (shift_rec - 1) if shift_rec > 0 else np.int64(0)
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
                dc = dc_next[r] + _mul15(_mul15(dh, o), 32768 - ((th * th + 16384) >> 15))
                if not c_lo < c < c_hi:
                    dc = 0
                # c = f * c_prev + i * g
                di = _mul15(dc, g)
                dg = _mul15(dc, i)
                df = (dc * c_prev + (np.int64(1) << (cshift - 1))) >> cshift
                dc_next[r] = _mul15(dc, f)
                dz[b, t, 0, r] = _mul15(di, (i * (32768 - i) + 16384) >> 15)
                dz[b, t, 1, r] = _mul15(df, (f * (32768 - f) + 16384) >> 15)
                dz[b, t, 2, r] = _mul15(dg, 32768 - ((g * g + 16384) >> 15))
                dz[b, t, 3, r] = _mul15(do, (o * (32768 - o) + 16384) >> 15)
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
                dh_rec[k] = (acc * m_rec + half) >> shift_rec if shift_rec > 0 else acc * m_rec << (-shift_rec)
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


def backward_bytes(op, model, q: MemoryQuery) -> int:
    """Output error in, input error out, plus the recomputed forward's saved gates and cell states
    (int16), the int64 gate errors dz and input error sums, and the weight gradient sums."""
    x = model.tensors[op.inputs[INPUT]]
    n_cell = model.tensors[op.inputs[W_INPUT[0]]].shape[0]
    steps, n_input = x.shape[1], x.shape[2]
    n = q.batch
    out = 2 * q.elems(op.outputs[0])
    made = 2 * q.elems(op.inputs[INPUT]) if q.wants(op.inputs[INPUT]) else 0
    saved = n * steps * n_cell * 2 * 4 + n * (steps + 1) * n_cell * 2 + n * steps * n_cell  # gates, cells, y copy
    sums = n * steps * 4 * n_cell * 8 + n * steps * n_input * 8
    # the weight gradient's (x - zp) and (h - zp) rows, int64, for every step of every sample
    rows = n * steps * (n_input + n_cell) * 8 if q.trained else 0
    params = 8 * 4 * n_cell * (n_input + n_cell + 1) if q.trained else 0
    # a float32 twin saves float32 gates and cells, float32 gate errors, rows and gradients
    q.float32_workspace = 2 * saved + sums // 2 + rows // 2 + params // 2
    return out + made + saved + sums + rows + params


def output_bound(op, model, absmax) -> float:
    return 1.0  # h = o * tanh(c): a sigmoid times a tanh


KERNELS = {"UNIDIRECTIONAL_SEQUENCE_LSTM": Kernel(prepare, forward, backward, clamp, macs, backward_bytes,
                                                   parameters=PARAMETERS, output_quant="computed",
                                                   output_bound=output_bound)}
