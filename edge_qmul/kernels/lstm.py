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

This module checks and prepares the op and runs both directions; the gemmlowp tables live in
lstm_activations.py, the compiled time-step loops of both directions in lstm_cell.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..grad import from_accumulator
from ..quant import quantize_multipliers
from .common import tensor, where
from .contract import Kernel, MemoryQuery
from .lstm_activations import activation_table
from .lstm_cell import fold_bias, lstm_bptt, lstm_grad_params, lstm_int8

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
