"""Calibration: the int8 scales and zero points of a model's tensors, from real values.

Weights are quantized symmetric per output channel (:func:`quantize_weights`), inputs asymmetric over
their real range (:func:`input_quant`), and every activation from what the engine's own kernels
produce on calibration inputs (:func:`calibrate`, the model builders' last step and the start of
retraining from scratch).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ModelError
from .graph import Model
from .kernels import KERNELS, WEIGHTED_OPS, check_supported, evaluate, prepare
from .quant import INT8_MAX, INT8_MIN, QuantParams, dequantize, quantize, round_half_away

_INT32 = np.iinfo(np.int32)


def input_quant(lo: float, hi: float) -> QuantParams:
    """Asymmetric int8 quantization covering [lo, hi] (widened to include 0).

    [0, 1] gives scale 1/255, zero point -128, as TensorFlow's converter does for image inputs.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"input range [{lo}, {hi}] is not finite")
    if hi - lo <= 0:
        hi = lo + 1.0
    return _asymmetric(lo, hi)


def _asymmetric(lo: float, hi: float) -> QuantParams:
    scale = np.float32((hi - lo) / 255.0)
    zp = int(round_half_away(np.float64(INT8_MIN) - np.float64(lo) / np.float64(scale)))
    zp = int(np.clip(zp, INT8_MIN, INT8_MAX))
    return QuantParams(np.array([scale], np.float32), np.array([zp]))


def _activation_quant(lo: float, hi: float, activation: str) -> QuantParams:
    """Output quantization for a measured real range, given the fused activation."""
    if activation in ("RELU", "RELU6"):
        hi = max(hi, 0.0)
        if activation == "RELU6":
            hi = min(hi, 6.0)
        hi = max(hi, 1e-8)
        return QuantParams(np.array([np.float32(hi / 255.0)], np.float32), np.array([INT8_MIN]))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 1e-8:
        lo, hi = -1e-8, 1e-8
    return _asymmetric(lo, hi)


def quantize_weights(w: np.ndarray, axis: int) -> tuple[np.ndarray, QuantParams]:
    """Symmetric per-channel int8 quantization along ``axis``: int8 in [-127, 127], zero point 0."""
    w = np.asarray(w, np.float64)
    red = tuple(a for a in range(w.ndim) if a != axis)
    maxabs = np.max(np.abs(w), axis=red)
    scale = np.where(maxabs > 0, maxabs / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(round_half_away(w / scale.astype(np.float64).reshape(shape)), -127, 127).astype(np.int8)
    return q, QuantParams(scale, np.zeros(scale.size, np.int64), axis)


def _weight_axis(kind: str) -> int:
    return 3 if kind == "DEPTHWISE_CONV_2D" else 0


def _measure(v: np.ndarray, activation: str, percentile: float) -> tuple[float, float]:
    v = v.reshape(-1).astype(np.float64)
    if v.size == 0:
        return 0.0, 0.0
    if percentile >= 100.0:
        lo, hi = float(v.min()), float(v.max())
    elif activation in ("RELU", "RELU6"):
        lo, hi = 0.0, float(np.percentile(v, percentile))
    else:
        lo, hi = (float(x) for x in np.percentile(v, [100.0 - percentile, percentile]))
    return min(lo, 0.0), max(hi, 0.0)


def calibrate(model: Model, calib_x: np.ndarray, input_quantization: QuantParams | None = None,
              float_params: dict[int, tuple[np.ndarray | None, np.ndarray | None]] | None = None,
              percentile: float = 99.9, margin: float = 1.05, output_percentile: float = 100.0,
              output_margin: float = 1.1) -> Model:
    """Set every activation's int8 scale and zero point from calibration data, using the engine.

    Ops are visited in topological order, each run by the engine's own int8 kernel
    (``kernels.prepare`` / ``kernels.evaluate``, as ``Model.run`` does) on the int8 values the
    already-calibrated ops produced:

    1. Weighted ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) get their weights quantized per
       channel (from ``float_params[op_index] = (w, b)`` when given, else kept) and their int32 bias
       requantized at the now-final ``s_in * s_w[c]``.
    2. The output gets a provisional, conservative scale from a bound that cannot be exceeded,
       the kernel's ``output_bound`` (``max_c sum|w[c]| * max|x| + |b[c]|`` for weighted ops,
       ``max|a| + max|b|`` for ADD, ``max|x|`` for MEAN, ...).
    3. The op runs; its dequantized output's range (``percentile`` of the values, min/max for model
       outputs) widened by one provisional step sets a refined scale; the op runs again at that finer
       scale and the re-measured range times ``margin`` sets the final scale and zero point. Outputs
       with a fused RELU / RELU6 get zero point -128 (range [0, max]).
    4. Ops the registry marks ``output_quant="input"`` (pools, RESHAPE, PAD, data movement) share
       their input's quantization; "fixed" ones take what their definition fixes (SOFTMAX 1/256,
       -128; LOGISTIC, TANH).

    ``calib_x`` is a float batch in the model input's real range (quantized with
    ``input_quantization``, or the input tensor's current quantization), or an int8 batch. The model
    is changed in place and returned, re-prepared.
    """
    tensors = model.tensors
    float_params = float_params or {}
    if len(model.core_inputs) != 1:
        raise ModelError("calibrate: only single-input models are supported")
    t_in = model.core_inputs[0]
    if input_quantization is not None:
        tensors[t_in].quant = input_quantization
    x = np.asarray(calib_x)
    if x.dtype != np.int8:
        if not np.all(np.isfinite(x)):
            raise ModelError("calibrate: calibration inputs hold NaN or inf")
        x = quantize(x.astype(np.float32), tensors[t_in].quant)
    if tuple(x.shape[1:]) != tuple(tensors[t_in].shape[1:]) or x.shape[0] < 1:
        raise ModelError(f"calibrate: inputs must be (N, {', '.join(map(str, tensors[t_in].shape[1:]))}), "
                         f"got {tuple(x.shape)}")
    values: dict[int, np.ndarray] = {t_in: np.ascontiguousarray(x)}
    maxabs: dict[int, float] = {}
    core_out = set(model.core_outputs)

    def absmax(t: int) -> float:
        if t not in maxabs:
            maxabs[t] = float(np.max(np.abs(dequantize(values[t], tensors[t].quant)), initial=0.0))
        return maxabs[t]

    def run(op) -> np.ndarray:
        args = [values[i] if i in values else (tensors[i].data if i >= 0 else None) for i in op.inputs]
        return evaluate(op, prepare(op, model), args)

    def store(op, result) -> None:
        for t, v in zip(op.outputs, [result] if len(op.outputs) == 1 else result):
            values[t] = v

    for op in model.ops:
        if op.kind in ("QUANTIZE", "DEQUANTIZE") and (op.outputs[0] == t_in or op.inputs[0] in core_out):
            continue  # the float interface, if any
        kernel = KERNELS.get(op.kind)
        if kernel is None:
            raise ModelError(f"calibrate: op {op.kind} (index {op.index}) has no kernel")
        out_t = op.outputs[0]
        out = tensors[out_t]
        act = op.options.get("activation", "NONE")
        if kernel.output_quant in ("input", "fixed"):  # the op's definition sets the output's
            q = tensors[op.inputs[0]].quant if kernel.output_quant == "input" else kernel.fixed_quant(op, model)
            for t in op.outputs:
                tensors[t].quant = q
            store(op, run(op))
            continue
        if kernel.parameters and op.kind in WEIGHTED_OPS:
            s_in = float(tensors[op.inputs[0]].quant.s)
            wt = tensors[op.inputs[1]]
            axis = _weight_axis(op.kind)
            channels = wt.shape[axis]
            w_float, b_float = float_params.get(op.index, (None, None))
            if w_float is not None:
                wt.data, wt.quant = quantize_weights(w_float, axis)
            s_w = np.broadcast_to(wt.quant.scale.astype(np.float64), (channels,))
            has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
            if b_float is None:
                if has_bias and tensors[op.inputs[2]].quant is not None:
                    bt = tensors[op.inputs[2]]
                    b_float = bt.data.astype(np.float64) * np.broadcast_to(
                        bt.quant.scale.astype(np.float64), (channels,))
                else:
                    b_float = np.zeros(channels)
            b_float = np.asarray(b_float, np.float64).reshape(channels)
            if has_bias:
                bt = tensors[op.inputs[2]]
                b_scale = (s_in * s_w).astype(np.float32)
                bt.data = np.clip(round_half_away(b_float / b_scale.astype(np.float64)),
                                  _INT32.min, _INT32.max).astype(np.int32)
                bt.quant = QuantParams(b_scale, np.zeros(channels, np.int64), 0)
        if kernel.output_bound is None:
            raise ModelError(f"calibrate: op {op.kind} (index {op.index}) has no calibration rule")
        bound = kernel.output_bound(op, model, absmax)

        bound = max(bound, 1e-6)
        pct = output_percentile if out_t in core_out else percentile
        mrg = output_margin if out_t in core_out else margin
        # Pass 1: a scale the output cannot exceed.
        out.quant = _activation_quant(-bound, bound, act)
        step = float(out.quant.s)
        lo, hi = _measure(dequantize(run(op), out.quant), act, pct)
        if hi - lo > 0:
            # Pass 2: a finer scale that still covers the measured range (+ one coarse step).
            out.quant = _activation_quant(lo - step if lo < 0 else lo, hi + step, act)
            lo, hi = _measure(dequantize(run(op), out.quant), act, pct)
            if hi - lo > 0:
                out.quant = _activation_quant(lo * mrg, hi * mrg, act)
        store(op, run(op))

    model._prepared = None
    check_supported(model)
    return model
