"""Fixed-point training of an int8 Model: integer backward, STE, master weights, integer SGD.

Every multiply-accumulate is integer (kernels/*: int32 products of int16 errors and int8 values).
Floats appear only where DESIGN.md §3 allows them: scale bookkeeping (each error and gradient carries
one float scale), the loss head over B x classes, and scalar reductions (gradient norms).

- master weights: int16 fixed point with ``frac_bits`` fractional bits (int32 above 8 bits); the
  model's int8 weight is always round(master / 2^F) clipped to [-127, 127], so updates smaller
  than one int8 step accumulate instead of vanishing.
- STE: an op's output error passes only where its int8 output was strictly inside its clamp
  (requantization to int8, fused RELU / RELU6); the weight quantizer passes the gradient straight
  to master, masked where the weight is clipped.
- SGD on the real-valued weights (w_real = s_w[c] * w_int8): the step for channel c is
  -lr * g_real / s_w[c] in int8 steps, applied as a fixed-point multiplier on the int32 gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from numba import njit

from . import grad as G
from .errors import ModelError
from .graph import PARAMETER_SLOTS, Model
from .kernels import add, conv, depthwise, fully_connected, mean, pool, shape
from .quant import dequantize, quantize_multiplier, quantize_multipliers

HEADS = ("ce", "soft", "neg_ce", "entropy")
PARAM_KERNELS = {"CONV_2D": conv, "DEPTHWISE_CONV_2D": depthwise, "FULLY_CONNECTED": fully_connected}
Q15 = 1 << 15


# --- loss heads (float over B x classes: the one place floats do arithmetic) ---------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_head(logits: np.ndarray, targets: np.ndarray, head: str = "ce") -> tuple[float, np.ndarray]:
    """Loss (mean over the batch) and dL/dlogits for real-valued logits (B, C).

    ``ce``: cross-entropy to hard labels; ``soft``: cross-entropy to target distributions (B, C);
    ``neg_ce``: negated cross-entropy (gradient ascent); ``entropy``: mean prediction entropy H(p)
    (minimizing it sharpens, so maximizing entropy means applying its gradient with weight < 0).
    """
    z = np.asarray(logits, dtype=np.float64)
    b, c = z.shape
    p = _softmax(z)
    logp = np.log(np.maximum(p, 1e-300))
    if head in ("ce", "neg_ce"):
        onehot = np.zeros_like(p)
        onehot[np.arange(b), targets] = 1.0
        loss, d = -float(np.mean(logp[np.arange(b), targets])), (p - onehot) / b
        return (loss, d) if head == "ce" else (-loss, -d)
    if head == "soft":
        t = np.asarray(targets, dtype=np.float64)
        return -float(np.mean(np.sum(t * logp, axis=1))), (p - t) / b
    if head == "entropy":
        h = -np.sum(p * logp, axis=1, keepdims=True)
        return float(np.mean(h)), -p * (logp + h) / b
    raise ModelError(f"unknown loss head {head!r}; known: {', '.join(HEADS)}")


# --- gradients -----------------------------------------------------------------------------------

@dataclass
class ParamGrad:
    """Gradient of a real-valued parameter: ``acc * scale``, acc int32."""

    acc: np.ndarray
    scale: float

    def real(self) -> np.ndarray:
        return self.acc.astype(np.float64) * self.scale


@dataclass
class Gradients:
    """Per-parameter integer gradients of one batch, with the loss they came from."""

    params: dict[str, ParamGrad] = field(default_factory=dict)
    loss: float = 0.0
    batch: int = 0

    def __getitem__(self, name: str) -> ParamGrad:
        return self.params[name]

    def __iter__(self):
        return iter(self.params)

    def items(self):
        return self.params.items()

    def norm(self) -> float:
        """L2 norm of the real-valued gradient over all parameters (a scalar reduction)."""
        total = 0.0
        for pg in self.params.values():
            a = pg.acc.astype(np.float64)
            total += float(np.dot(a.ravel(), a.ravel())) * pg.scale ** 2
        return math.sqrt(total)

    def dot(self, other: "Gradients") -> float:
        """<self, other> over the real-valued gradients (for projections, e.g. OEU)."""
        total = 0.0
        for name, pg in self.params.items():
            if name in other.params:
                o = other.params[name]
                total += float(np.dot(pg.acc.astype(np.float64).ravel(), o.acc.astype(np.float64).ravel())) \
                    * pg.scale * o.scale
        return total


def _to_int32(acc: np.ndarray, scale: float) -> ParamGrad:
    """An int64 sum as an int32 accumulator: shift right (rounding) only if it does not fit."""
    max_abs = int(np.max(np.abs(acc))) if acc.size else 0
    r = G.shift_for(max_abs, 30)
    if r:
        acc = (acc + (1 << (r - 1))) >> r
    return ParamGrad(acc.astype(np.int32), scale * 2.0 ** r)


def _combine_errors(a: G.Error, b: G.Error) -> G.Error:
    """a + b for errors with different scales: both rescaled by fixed-point multipliers to a common
    scale with 10 bits of headroom, summed in int64, rounded back to an error."""
    top = max(a.scale, b.scale)
    target = top / (1 << 10)
    acc = np.zeros(a.values.shape, np.int64)
    for e in (a, b):
        m, s = quantize_multiplier(e.scale / target)
        acc += _scale_int64(e.values.reshape(-1).astype(np.int64), m, s).reshape(e.values.shape)
    return G.from_accumulator(acc, target)


@njit(cache=True)
def _scale_int64(v, multiplier, shift):
    # v * multiplier * 2^(shift - 31), rounded to nearest, in int64 (v is small: no overflow).
    out = np.empty(v.size, np.int64)
    total = 31 - shift
    for i in range(v.size):
        p = v[i] * np.int64(multiplier)
        if total > 0:
            out[i] = (p + (np.int64(1) << (total - 1))) >> total
        else:
            out[i] = p << (-total)
    return out


def clamp_range(op, params) -> tuple[int, int] | None:
    """The int8 clamp an op's output went through (None: the op copies values, no clamp)."""
    if op.kind in PARAM_KERNELS:
        return params.rq.act_min, params.rq.act_max
    if op.kind in ("ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return params.act_min, params.act_max
    if op.kind in ("MEAN", "QUANTIZE"):
        return -128, 127
    return None


# --- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """Integer SGD on an int8 Model, in place.

    ``trainable``: None (every op with parameters), op names (``conv_2d_0``), op indices, or
    ``"last:k"`` (the last k ops with parameters) — the rest stay frozen and backward stops early.
    ``schedule``: ``"constant"`` or ``"cosine"`` (over ``total_steps``).
    """

    def __init__(self, model: Model, lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0,
                 schedule: str = "constant", total_steps: int | None = None,
                 trainable: Iterable | str | None = None, frac_bits: int = 8,
                 stochastic_rounding: bool = False) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ModelError(f"learning rate must be a positive number, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ModelError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
            raise ModelError(f"weight decay must be >= 0, got {weight_decay!r}")
        if schedule not in ("constant", "cosine"):
            raise ModelError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        if schedule == "cosine" and not total_steps:
            raise ModelError("the cosine schedule needs total_steps")
        if not 0 <= frac_bits <= 22:
            raise ModelError(f"frac_bits must be in [0, 22], got {frac_bits}")
        self.model = model
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.schedule, self.total_steps = schedule, total_steps
        self.frac_bits = frac_bits
        self.stochastic_rounding = bool(stochastic_rounding)
        self.steps = 0
        self.trainable_ops = self._select(trainable)
        self.logits_tensor = self._logits_tensor()
        # master weights: int16 while 127.5 * 2^F fits, int32 beyond
        self.master_dtype = np.int16 if (127.5 * 2 ** frac_bits) < 2 ** 15 else np.int32
        self.master: dict[str, np.ndarray] = {}
        self.velocity: dict[str, np.ndarray] = {}
        for i in self.trainable_ops:
            op = model.ops[i]
            w = model.tensors[op.inputs[1]].data
            self.master[f"{op.name}.weight"] = (w.astype(np.int32) << frac_bits).astype(self.master_dtype)
        self._needs_grad = self._needs_grad_tensors()

    # --- setup ---
    def _select(self, trainable) -> list[int]:
        with_params = [op.index for op in self.model.ops if op.kind in PARAM_KERNELS]
        if trainable is None:
            return with_params
        if isinstance(trainable, str) and trainable.startswith("last:"):
            try:
                k = int(trainable[5:])
            except ValueError:
                raise ModelError(f"trainable {trainable!r}: expected 'last:K'") from None
            if k < 1:
                raise ModelError(f"trainable {trainable!r}: K must be >= 1")
            return with_params[-k:]
        if isinstance(trainable, (str, int)):
            trainable = [trainable]
        by_name = {self.model.ops[i].name: i for i in with_params}
        chosen = []
        for t in trainable:
            if isinstance(t, (int, np.integer)) and int(t) in with_params:
                chosen.append(int(t))
            elif isinstance(t, str) and t in by_name:
                chosen.append(by_name[t])
            else:
                raise ModelError(f"trainable: unknown op {t!r}; ops with parameters: {', '.join(by_name)}")
        return sorted(set(chosen))

    def _logits_tensor(self) -> int:
        out = self.model.core_outputs[0]
        for op in self.model.ops:
            if op.outputs[0] == out and op.kind == "SOFTMAX":
                return op.inputs[0]  # train on the logits, not on int8 probabilities
        return out

    def _needs_grad_tensors(self) -> set[int]:
        need: set[int] = set()
        trainable = set(self.trainable_ops)
        for op in self.model.ops:
            if op.index in trainable or any(i in need for i in op.inputs if i >= 0):
                need.add(op.outputs[0])
        return need

    def learning_rate(self) -> float:
        if self.schedule == "cosine":
            t = min(self.steps, self.total_steps)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t / self.total_steps))
        return self.lr

    # --- input checks (before anything changes) ---
    def _check(self, x: np.ndarray, targets, head: str) -> tuple[np.ndarray, np.ndarray]:
        if head not in HEADS:
            raise ModelError(f"unknown loss head {head!r}; known: {', '.join(HEADS)}")
        core_in = self.model.core_inputs[0]
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            if not np.all(np.isfinite(x)):
                raise ModelError("training input holds NaN or inf")
            from .quant import quantize
            x = quantize(x, self.model.tensors[core_in].quant)
        x = self.model._check_batch(x, core_in, "train")
        n = x.shape[0]
        classes = int(np.prod(self.model.tensors[self.logits_tensor].shape[1:]))
        if head in ("ce", "neg_ce"):
            y = np.asarray(targets)
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
                raise ModelError(f"labels must be {n} integers, got {y.dtype.name}{list(y.shape)}")
            bad = np.flatnonzero((y < 0) | (y >= classes))
            if bad.size:
                raise ModelError(f"label {int(y[bad[0]])} at position {int(bad[0])} is outside [0, {classes})")
            return x, y.astype(np.int64)
        if head == "soft":
            t = np.asarray(targets, dtype=np.float64)
            if t.shape != (n, classes) or not np.all(np.isfinite(t)) or np.any(t < 0):
                raise ModelError(f"soft targets must be finite, non-negative, shape ({n}, {classes})")
            return x, t
        return x, np.zeros(n, np.int64)  # entropy needs no targets

    # --- forward + backward ---
    def gradients(self, x: np.ndarray, targets=None, head: str = "ce") -> Gradients:
        """Integer gradients of the loss for one batch (the model is not changed)."""
        x, targets = self._check(x, targets, head)
        model = self.model
        prepared = model._ensure_prepared()
        values = model.run({model.core_inputs[0]: x}, start_after_interface=True)
        logits_q = values[self.logits_tensor]
        logits = dequantize(logits_q, model.tensors[self.logits_tensor].quant).astype(np.float64)
        loss, dlogits = loss_head(logits.reshape(logits.shape[0], -1), targets, head)
        errors: dict[int, G.Error] = {self.logits_tensor: G.from_float(dlogits.reshape(logits_q.shape))}
        grads = Gradients(loss=loss, batch=x.shape[0])
        trainable = set(self.trainable_ops)
        first = min(trainable) if trainable else len(model.ops)
        for op in reversed(model.ops[first:]):
            out = op.outputs[0]
            if out not in errors:
                continue
            err = errors.pop(out)
            params = prepared[op.index]
            clamp = clamp_range(op, params)
            g = G.clamp_mask(err.values, values[out], *clamp) if clamp else err.values
            inputs = [values[i] if i in values else model.tensors[i].data for i in op.inputs]
            for slot, (acc, factor) in self._backward_op(op, params, inputs, g, err.scale, grads):
                t = op.inputs[slot]
                if t not in self._needs_grad or t == model.core_inputs[0]:
                    continue
                e = G.Error(acc, err.scale * factor) if acc.dtype == np.int16 else \
                    G.from_accumulator(acc, err.scale * factor)
                errors[t] = _combine_errors(errors[t], e) if t in errors else e
        return grads

    def _backward_op(self, op, params, inputs, g, scale, grads: Gradients):
        """Parameter gradients into ``grads``; returns [(input slot, (accumulator, scale factor))]."""
        kind = op.kind
        if kind in PARAM_KERNELS:
            x, w = inputs[0], inputs[1]
            need_x = op.inputs[0] in self._needs_grad
            g_folded, factor = None, 1.0
            if need_x:
                wq = self.model.tensors[op.inputs[1]].quant
                cout = w.shape[0] if kind != "DEPTHWISE_CONV_2D" else w.shape[3]
                # products meeting in one input gradient: C_out*KH*KW (conv), M*KH*KW (depthwise), C_out (FC)
                terms = w.shape[0] if kind == "FULLY_CONNECTED" else w.size // x.shape[-1]
                m, fold_shift, factor = G.channel_fold(np.broadcast_to(wq.scale.astype(np.float64), (cout,)),
                                                       terms)
                g_folded = G.fold_channel_scale(g, m, fold_shift)
            gw, gb, gx = PARAM_KERNELS[kind].backward(params, x, w, g, g_folded)
            if op.index in self.trainable_ops:
                s_x = float(self.model.tensors[op.inputs[0]].quant.s)
                grads.params[f"{op.name}.weight"] = _to_int32(gw, scale * s_x)
                if len(op.inputs) > 2 and op.inputs[2] >= 0:
                    grads.params[f"{op.name}.bias"] = _to_int32(gb, scale)
            return [(0, (gx, factor))] if gx is not None else []
        if kind == "ADD":
            return list(enumerate(add.backward(params, inputs[0], inputs[1], g)))
        if kind == "AVERAGE_POOL_2D":
            return [(0, pool.backward_average(params, inputs[0], g))]
        if kind == "MAX_POOL_2D":
            return [(0, pool.backward_max(params, inputs[0], g))]
        if kind == "MEAN":
            return [(0, mean.backward(params, inputs[0], g))]
        if kind == "RESHAPE":
            return [(0, shape.backward_reshape(params, inputs[0], g))]
        if kind == "PAD":
            return [(0, shape.backward_pad(params, inputs[0], g))]
        raise ModelError(f"op {kind} (index {op.index}) has no backward; it cannot sit between "
                         "a trainable op and the loss")

    # --- update ---
    def apply(self, gradients: Gradients, weight: float = 1.0) -> None:
        """Apply -lr * weight * gradient to the trainable parameters (master weights, int8 weights,
        int32 biases). ``weight`` may be negative (ascent) or a reweighting factor."""
        if not math.isfinite(weight):
            raise ModelError(f"gradient weight must be finite, got {weight!r}")
        lr = self.learning_rate() * weight
        model = self.model
        F = self.frac_bits
        names = {op.name: op for op in (model.ops[i] for i in self.trainable_ops)}
        unknown = [n for n in gradients.params if n.rsplit(".", 1)[0] not in names]
        if unknown:
            raise ModelError(f"gradients for parameters that are not trainable here: {', '.join(unknown)}")
        for name, pg in gradients.items():
            op = names[name.rsplit(".", 1)[0]]
            w_t = model.tensors[op.inputs[1]]
            cout = w_t.shape[3] if op.kind == "DEPTHWISE_CONV_2D" else w_t.shape[0]
            s_w = np.broadcast_to(w_t.quant.scale.astype(np.float64), (cout,))
            axis = 3 if op.kind == "DEPTHWISE_CONV_2D" else 0
            if name.endswith(".weight"):
                master = self.master[name]
                limit = int(127.5 * 2 ** F)  # beyond: round(master / 2^F) is clipped
                acc = np.where((master >= limit) | (master < -limit), 0, pg.acc).astype(np.int32)
                # int8 steps per unit of acc, times 2^F: lr * scale / s_w[c] * 2^F
                mult, shift = quantize_multipliers(np.abs(lr) * pg.scale / s_w * 2 ** F)
                delta = _channel_scale(np.moveaxis(acc, axis, 0), mult, shift, self.stochastic_rounding)
                delta = -np.sign(lr) * np.moveaxis(delta, 0, axis)
                if self.weight_decay:
                    m, s = quantize_multiplier(abs(lr) * self.weight_decay)
                    decay = _scale_int64(master.reshape(-1).astype(np.int64), m, s).reshape(master.shape)
                    delta = delta - np.sign(lr) * decay
                delta = self._momentum(name, delta)
                info = np.iinfo(self.master_dtype)
                master[...] = np.clip(master.astype(np.int64) + delta, info.min, info.max)
                w_t.data = np.clip((master.astype(np.int64) + (1 << F >> 1)) >> F, -127, 127).astype(np.int8)
            else:
                b_t = model.tensors[op.inputs[2]]
                s_in = float(model.tensors[op.inputs[0]].quant.s)
                mult, shift = quantize_multipliers(np.abs(lr) * pg.scale / (s_in * s_w))
                delta = -np.sign(lr) * _channel_scale(pg.acc.reshape(cout, 1), mult, shift,
                                                      self.stochastic_rounding).reshape(cout)
                delta = self._momentum(name, delta)
                b_t.data = np.clip(b_t.data.astype(np.int64) + delta, -(2**31), 2**31 - 1).astype(np.int32)
        self.steps += 1

    def _momentum(self, name: str, delta: np.ndarray) -> np.ndarray:
        if not self.momentum:
            return delta.astype(np.int64)
        mu = int(round(self.momentum * Q15))
        v = self.velocity.get(name)
        v = np.zeros(delta.shape, np.int64) if v is None else v.astype(np.int64)
        v = ((v * mu + (Q15 >> 1)) >> 15) + delta
        v = np.clip(v, -(2**31), 2**31 - 1)
        self.velocity[name] = v.astype(np.int32)
        return v

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One SGD step on cross-entropy to labels ``y``; returns the batch loss."""
        g = self.gradients(x, y, head="ce")
        self.apply(g)
        return g.loss


@njit(cache=True)
def _channel_scale(acc, mult, shift, stochastic):
    """acc[c, ...] * mult[c] * 2^(shift[c] - 31) rounded to an integer per channel.

    Round to nearest, or pseudo-stochastic: of the discarded bits, the upper half is compared with
    the lower half (no RNG), so the chance of rounding up tracks the discarded fraction.
    """
    c = acc.shape[0]
    flat = acc.reshape(c, -1)
    out = np.empty(flat.shape, np.int64)
    for ch in range(c):
        total = 31 - shift[ch]
        for i in range(flat.shape[1]):
            p = np.int64(flat[ch, i]) * np.int64(mult[ch])
            neg = p < 0
            a = -p if neg else p
            if total <= 0:
                r = a << (-total)
            elif stochastic and total >= 2:
                half = total // 2
                q = a >> total
                d = a & ((np.int64(1) << total) - 1)
                hi = d >> (total - half)
                lo = d & ((np.int64(1) << half) - 1)
                r = q + (1 if hi > lo else 0)
            else:
                r = (a + (np.int64(1) << (total - 1))) >> total
            out[ch, i] = -r if neg else r
    return out.reshape(acc.shape)
