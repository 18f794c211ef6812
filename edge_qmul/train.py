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

import numba
import numpy as np
from numba import njit

from . import grad as G
from .errors import ModelError
from .graph import Model
from .kernels import KERNELS, Backward, MemoryQuery, conv
from .profile import Profiler, phase_or_nothing
from .quant import dequantize, quantize_multiplier, quantize_multipliers

HEADS = ("ce", "soft", "neg_ce", "entropy")
Q15 = 1 << 15
BLOCK_BYTES = 8 * 1024  # int32 input-gradient sums held at once (grad.from_blocks)
BLOCKS_PER_BATCH = 8  # ... or an eighth of the batch, if more: each block costs a few kernel calls


def input_gradient_block(n: int, per_sample: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Samples per block of input-gradient sums: at least one per thread and an eighth of the
    batch, and as many as fit in ``block_bytes`` (small layers then take one or two calls)."""
    return max(1, numba.get_num_threads(), -(-n // BLOCKS_PER_BATCH), block_bytes // max(per_sample, 1))


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
            total += _sum_squares(pg.acc.reshape(-1)) * pg.scale ** 2
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


@njit(cache=True)
def _sum_squares(a) -> float:
    total = 0.0
    for i in range(a.size):
        v = np.float64(a[i])
        total += v * v
    return total


def combine(terms: Iterable[tuple[Gradients, float]]) -> Gradients:
    """sum of weight * gradients, per parameter, in integers: each term is brought to a common
    scale by a fixed-point multiplier (12 bits of headroom), summed in int64, returned as int32.

    Weights are scalars (e.g. Adaptive Gradient Reweighting's w_f, w_r, or a projection
    coefficient); a parameter missing from a term counts as zero there.
    """
    terms = [(g, float(w)) for g, w in terms if w != 0.0]
    out = Gradients(loss=sum(w * g.loss for g, w in terms), batch=max((g.batch for g, _ in terms), default=0))
    names = []
    for g, _ in terms:
        names += [n for n in g.params if n not in names]
    for name in names:
        parts = [(g.params[name], w) for g, w in terms if name in g.params]
        top = max(abs(w) * pg.scale for pg, w in parts)
        if top == 0.0:
            out.params[name] = ParamGrad(np.zeros_like(parts[0][0].acc), 1.0)
            continue
        target = top / (1 << 12)
        acc = np.zeros(parts[0][0].acc.size, np.int64)
        for pg, w in parts:
            m, s = quantize_multiplier(abs(w) * pg.scale / target)
            _accumulate_scaled(acc, pg.acc.reshape(-1), m, s, 1 if w > 0 else -1)
        out.params[name] = _to_int32(acc.reshape(parts[0][0].acc.shape), target)
    return out


def _to_int32(acc: np.ndarray, scale: float) -> ParamGrad:
    """An int64 sum as an int32 accumulator: shift right (rounding) only if it does not fit."""
    out, r = _narrow_to_int32(np.ascontiguousarray(acc).reshape(-1))
    return ParamGrad(out.reshape(acc.shape), scale * 2.0 ** r)


@njit(cache=True)
def _narrow_to_int32(acc):
    # one compiled call per parameter (it runs for every parameter of every step): the max-abs,
    # the smallest shift that leaves 30 magnitude bits, the rounding shift and the narrowing
    r = G.shift_for(G.max_abs(acc), 30)
    out = np.empty(acc.size, np.int32)
    half = (np.int64(1) << (r - 1)) if r else np.int64(0)
    for i in range(acc.size):
        out[i] = np.int32((np.int64(acc[i]) + half) >> r)
    return out, r


def _combine_errors(a: G.Error, b: G.Error) -> G.Error:
    """a + b for errors with different scales (a tensor read by two ops, e.g. a residual): both
    rescaled by fixed-point multipliers to a common scale with 8 bits of headroom and summed in
    int32 (|each| <= 2^23), then rounded back to an error."""
    target = max(a.scale, b.scale) / (1 << 8)
    ma, sa = quantize_multiplier(a.scale / target)
    mb, sb = quantize_multiplier(b.scale / target)
    acc = _sum_rescaled(a.values.reshape(-1), ma, sa, b.values.reshape(-1), mb, sb)
    return G.from_accumulator(acc.reshape(a.values.shape), target)


@njit(cache=True)
def _accumulate_scaled(acc, a, multiplier, shift, sign):
    for i in range(a.size):
        acc[i] += sign * _round_scaled(a[i], multiplier, shift, False)


@njit(cache=True)
def _sum_rescaled(a, ma, sa, b, mb, sb):
    out = np.empty(a.size, np.int32)
    for i in range(a.size):
        out[i] = _round_scaled(a[i], ma, sa, False) + _round_scaled(b[i], mb, sb, False)
    return out


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
                 stochastic_rounding: bool = False, profiler: "Profiler | None" = None,
                 block_bytes: int = BLOCK_BYTES) -> None:
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
        self.profiler = profiler
        self.block_bytes = int(block_bytes)  # int32 input-gradient sums held at once: memory vs calls
        # a conv weight gradient's workspace grows with the same budget (more parallel tasks)
        self.patch_bytes = max(conv.PATCH_BYTES, 4 * self.block_bytes)
        self._update_during_backward = False
        self.steps = 0
        self.sample_passes = 0  # samples through forward + backward (the work unlearning spends)
        self.trainable_ops = self._select(trainable)
        self._op_by_name = {model.ops[i].name: model.ops[i] for i in self.trainable_ops}
        self.logits_tensor = self._logits_tensor()
        # master weights: int16 while 127.5 * 2^F fits, int32 beyond
        self.master_dtype = np.int16 if (127.5 * 2 ** frac_bits) < 2 ** 15 else np.int32
        self.master: dict[str, np.ndarray] = {}
        self.velocity: dict[str, np.ndarray] = {}
        self._update_cache: dict[str, tuple] = {}
        for name, t in self._trainable_tensors().items():
            w = model.tensors[t].data
            if w.dtype == np.int8:  # int8 parameters keep fixed-point masters; int32 biases do not need one
                self.master[name] = (w.astype(np.int32) << frac_bits).astype(self.master_dtype)
        self._needs_grad = self._needs_grad_tensors()

    # --- setup ---
    def _select(self, trainable) -> list[int]:
        with_params = [op.index for op in self.model.ops if KERNELS[op.kind].parameters]
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

    def _trainable_tensors(self) -> dict[str, int]:
        """Parameter name -> tensor index, for the parameters of the trainable ops."""
        out = {}
        for i in self.trainable_ops:
            op = self.model.ops[i]
            for slot, suffix in KERNELS[op.kind].parameters:
                if slot < len(op.inputs) and op.inputs[slot] >= 0:
                    out[f"{op.name}.{suffix}"] = op.inputs[slot]
        return out

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
                need.update(op.outputs)
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
        return self.gradients_groups([(x, targets, head)])[0]

    def gradients_groups(self, parts) -> list[Gradients]:
        """Separate gradients for several batches, each with its own loss head, from ONE forward and
        ONE backward over their concatenation: samples never interact, so each op's errors for a
        group's rows are that group's own; only the weight sums are split by rows. (The groups share
        each error tensor's scale.) ``parts`` is a list of (x, targets, head)."""
        checked = [self._check(x, t, h) + (h,) for x, t, h in parts]
        model = self.model
        x = checked[0][0] if len(checked) == 1 else np.concatenate([c[0] for c in checked])
        self.sample_passes += len(x)
        bounds, start = [], 0
        for c in checked:
            bounds.append(slice(start, start + len(c[0])))
            start += len(c[0])
        with phase_or_nothing(self.profiler, "forward"):
            values = model.run({model.core_inputs[0]: x}, start_after_interface=True)
        with phase_or_nothing(self.profiler, "loss"):
            logits_q = values[self.logits_tensor]
            logits = dequantize(logits_q, model.tensors[self.logits_tensor].quant).astype(np.float64)
            logits = logits.reshape(logits.shape[0], -1)
            dlogits = np.empty_like(logits)
            groups = []
            for rows, (_, targets, head) in zip(bounds, checked):
                loss, dlogits[rows] = loss_head(logits[rows], targets, head)
                groups.append((rows, Gradients(loss=loss, batch=rows.stop - rows.start)))
            errors: dict[int, G.Error] = {self.logits_tensor: G.from_float(dlogits.reshape(logits_q.shape))}
        with phase_or_nothing(self.profiler, "backward"):
            self._backward(values, errors, groups)
        return [g for _, g in groups]

    def _backward(self, values: dict, errors: dict, groups: list) -> None:
        """Walk the ops backward from the logits' error down to the first trainable op.

        Each op's kernel does its own backward (kernels/contract.py); the walk only masks the
        output error by the op's clamp (the STE), hands parameter gradients to the groups (or, in
        step(), applies them at once), and sums errors that meet at a tensor read by two ops.
        Memory is what makes this work on a board: the activations an op no longer needs are
        dropped as soon as its backward is done, and input gradients are summed a few samples at
        a time (grad.from_blocks).
        """
        model = self.model
        prepared = model._ensure_prepared()
        first = min(self.trainable_ops) if self.trainable_ops else len(model.ops)
        trainable = set(self.trainable_ops)
        for op in reversed(model.ops[first:]):
            if not any(t in errors for t in op.outputs):
                continue
            kernel = KERNELS[op.kind]
            params = prepared[op.index]
            errs = [errors.pop(t, None) for t in op.outputs]
            clamp = kernel.clamp(params)
            if clamp and errs[0] is not None:
                G.clamp_mask(errs[0].values, values[op.outputs[0]], *clamp)
            # later (upstream) ops never read the outputs: dropped now, unless the backward reads them
            outs = [values.pop(t, None) for t in op.outputs]
            shapes = [None if v is None else v.shape for v in outs]
            if not kernel.needs_outputs:
                outs = [None] * len(outs)
            wants = [self._wants_error(t) for t in op.inputs]
            trained = op.index in trainable
            if not trained and not any(wants):
                continue
            inputs = [None if t < 0 else values[t] if t in values else model.tensors[t].data for t in op.inputs]
            if trained and self._update_during_backward and any(wants):
                # step() updates the parameters in place as soon as their gradient exists; the input
                # error still needs the values the forward used: an int8 copy (a quarter of the int32
                # gradient it replaces)
                for slot, _ in kernel.parameters:
                    if slot < len(inputs) and inputs[slot] is not None and inputs[slot].dtype == np.int8:
                        inputs[slot] = inputs[slot].copy()
            x = inputs[0]
            n = next(sh[0] for sh in shapes if sh is not None)
            per_sample = 4 * int(np.prod(x.shape[1:])) if x is not None and x.ndim else 4
            ctx = Backward(op, model, inputs, outs, errs, wants,
                           block=input_gradient_block(n, per_sample, self.block_bytes), train=trained,
                           groups=[rows for rows, _ in groups], emit=self._emitter(op, groups),
                           patch_bytes=self.patch_bytes)
            for t, e in zip(op.inputs, kernel.backward(params, ctx)):
                if e is None or not self._wants_error(t):
                    continue
                errors[t] = _combine_errors(errors[t], e) if t in errors else e

    def _emitter(self, op, groups: list):
        """ctx.emit for one op: an int64 (or int32) gradient sum with its scale, for group k."""
        def emit(k: int, suffix: str, sums: np.ndarray, scale: float) -> None:
            name = f"{op.name}.{suffix}"
            pg = _to_int32(sums, scale)
            if self._update_during_backward:
                self._apply_param(name, pg, self.learning_rate())
            else:
                groups[k][1].params[name] = pg
        return emit

    def _wants_error(self, t: int) -> bool:
        return t >= 0 and t in self._needs_grad and t != self.model.core_inputs[0]

    # --- update ---
    def apply(self, gradients: Gradients, weight: float = 1.0) -> None:
        """Apply -lr * weight * gradient to the trainable parameters (master weights, int8 weights,
        int32 biases). ``weight`` may be negative (ascent) or a reweighting factor."""
        with phase_or_nothing(self.profiler, "update"):
            self._apply(gradients, weight)

    def _apply(self, gradients: Gradients, weight: float) -> None:
        if not math.isfinite(weight):
            raise ModelError(f"gradient weight must be finite, got {weight!r}")
        names = {self.model.ops[i].name for i in self.trainable_ops}
        unknown = [n for n in gradients.params if n.rsplit(".", 1)[0] not in names]
        if unknown:
            raise ModelError(f"gradients for parameters that are not trainable here: {', '.join(unknown)}")
        lr = self.learning_rate() * weight
        for name, pg in gradients.items():
            self._apply_param(name, pg, lr)
        self.steps += 1

    def _apply_param(self, name: str, pg: ParamGrad, lr: float) -> None:
        """-lr * gradient on one parameter: master + int8 weights, or int32 biases, in place."""
        if lr == 0.0:
            return
        F = self.frac_bits
        tensor, s_real, stride, count = self._update_info(name)
        sign = -1 if lr > 0 else 1  # descent for lr > 0
        decay_m, decay_s = quantize_multiplier(abs(lr) * self.weight_decay) if self.weight_decay else (0, 0)
        mu = int(round(self.momentum * Q15))
        velocity = self._velocity(name, pg.acc.shape)
        if not tensor.data.flags.writeable:
            tensor.data = tensor.data.copy()
        if name in self.master:
            # int8 steps per unit of acc, times 2^F: |lr| * scale / s_w[c] * 2^F
            mult, shift = quantize_multipliers(abs(lr) * pg.scale / s_real * 2 ** F)
            _sgd_weights(self.master[name].reshape(-1), pg.acc.reshape(-1), tensor.data.reshape(-1),
                         mult, shift, stride, count, sign, self.stochastic_rounding,
                         int(127.5 * 2 ** F), F, decay_m, decay_s, velocity.reshape(-1), mu,
                         int(np.iinfo(self.master_dtype).min), int(np.iinfo(self.master_dtype).max))
        else:
            mult, shift = quantize_multipliers(abs(lr) * pg.scale / s_real)
            _sgd_bias(tensor.data.reshape(-1), pg.acc.reshape(-1), mult, shift, stride, count, sign,
                      self.stochastic_rounding, velocity.reshape(-1), mu)

    def _update_info(self, name: str) -> tuple:
        """What the update of one parameter needs that does not change between steps: its tensor,
        the real scale of each channel, the channel run length of its layout (channel =
        (i // stride) % count) and the channel count; built once per name.

        A parameter's real scale is its tensor's quantization (per channel along its axis, or
        one); a bias the file gives no quantization gets input scale x filter scale (slot 1)."""
        info = self._update_cache.get(name)
        if info is None:
            model = self.model
            op = self._op_by_name[name.rsplit(".", 1)[0]]
            t = self._trainable_tensors()[name]
            tensor = model.tensors[t]
            q = tensor.quant
            if q is None:  # a bias the file gave no quantization: input scale x filter scale
                w_q = model.tensors[op.inputs[1]].quant
                scale, axis = float(model.tensors[op.inputs[0]].quant.s) * w_q.scale.astype(np.float64), 0
            else:
                scale, axis = q.scale.astype(np.float64), q.axis if q.per_channel else 0
            shape = tensor.data.shape
            count = scale.size
            if count > 1 and (axis >= len(shape) or shape[axis] != count):
                raise ModelError(f"{name}: {count} scales do not fit shape {list(shape)} along axis {axis}")
            stride = int(np.prod(shape[axis + 1:])) if count > 1 else int(tensor.data.size)
            info = (tensor, np.ascontiguousarray(np.broadcast_to(scale, (count,))), stride, count)
            self._update_cache[name] = info
        return info

    def _velocity(self, name: str, shape: tuple) -> np.ndarray:
        """Momentum buffer (int32, master units), or an empty array without momentum."""
        if not self.momentum:
            return np.zeros(0, np.int32)
        if name not in self.velocity:
            self.velocity[name] = np.zeros(shape, np.int32)
        return self.velocity[name]

    def memory_report(self, batch: int, step: bool = True) -> dict:
        """Bytes one training step at ``batch`` holds at its peak, by where they go, and the float32
        footprint of the same training computed the same way.

        ``step=True`` describes :meth:`step` (each op updated as the backward passes it, so only one
        op's gradients exist at a time); ``step=False`` describes gradients() + apply(), which hold
        every trainable parameter's int32 gradient.

        It replays the step's allocations: persistent int8 weights + int32 biases, master weights
        and momentum; the int8 activations the forward saves (1 byte each, dropped one by one as the
        backward passes them); the int32 parameter gradients; and the errors and transient sums of
        the op being differentiated (int16 errors, int64 weight sums, int32 input sums a few samples
        at a time). ``float32_total`` counts fp32 weights, gradients, saved activations and the
        fp32 errors of the same op sequence, and the im2col workspace of a conv's weight gradient
        (int16 here, float32 there).
        """
        if batch < 1:
            raise ModelError(f"batch must be >= 1, got {batch}")
        model = self.model
        params = model.parameter_tensors()
        weights = sum(model.tensors[t].data.nbytes for t in params.values())
        n_params = sum(model.tensors[t].data.size for t in params.values())
        trainable = set(self._trainable_tensors())
        trainable_elems = sum(model.tensors[t].data.size for n, t in params.items() if n in trainable)
        master = sum(m.nbytes for m in self.master.values())
        optimizer = 4 * trainable_elems if self.momentum else 0
        grads = 0 if step else 4 * trainable_elems

        def elems(t: int) -> int:
            return batch * int(np.prod(model.tensors[t].shape[1:]))

        core = [model.core_inputs[0]] + [t for op in model.ops
                                         if not (op.kind == "DEQUANTIZE" and op.inputs[0] in model.core_outputs)
                                         and not (op.kind == "QUANTIZE" and op.outputs[0] in model.core_inputs)
                                         for t in op.outputs]
        acts = {t: elems(t) for t in core}
        saved = sum(acts.values())
        pending = {self.logits_tensor: 2 * elems(self.logits_tensor)}
        pending32 = {self.logits_tensor: 4 * elems(self.logits_tensor)}
        persistent = weights + master + optimizer
        peak, at = persistent + saved + grads, {"saved_activations": saved, "errors_and_sums": 0}
        fixed32 = 4 * n_params + 4 * trainable_elems + (optimizer and 4 * trainable_elems)
        peak32 = fixed32 + 4 * saved
        first = min(self.trainable_ops) if self.trainable_ops else len(model.ops)
        trainable_ops = set(self.trainable_ops)
        for op in reversed(model.ops[first:]):
            outs = [t for t in op.outputs if t in pending]
            if not outs:
                continue
            for t in outs:
                pending.pop(t)
            e32 = sum(pending32.pop(t) for t in outs)
            x_t = op.inputs[0]
            need = [i for i in op.inputs if self._wants_error(i)]
            per_sample = 4 * int(np.prod(model.tensors[x_t].shape[1:])) if x_t >= 0 else 4
            block = min(batch, input_gradient_block(batch, per_sample, self.block_bytes))
            q = MemoryQuery(batch, elems, self._wants_error, block, op.index in trainable_ops, step,
                            self.patch_bytes)
            t = KERNELS[op.kind].backward_bytes(op, model, q)  # includes the op's output errors
            for o in op.outputs:
                acts.pop(o, None)  # _backward drops an op's output activations before its backward
            errs = sum(pending.values())
            for i in need:
                if i in pending:
                    t += 6 * elems(i)  # combining two errors: int32 sum, then the int16 result
            now = persistent + sum(acts.values()) + grads + errs + t
            if now > peak:
                peak, at = now, {"saved_activations": sum(acts.values()), "errors_and_sums": errs + t}
            # the float32 computation done the same way (its workspace in float32: twice the int16 one)
            made32 = sum(4 * elems(i) for i in need)
            base32 = fixed32 + 4 * sum(acts.values()) + sum(pending32.values()) + e32
            peak32 = max(peak32, base32 + made32, base32 + q.float32_workspace)
            for i in need:
                pending[i] = 2 * elems(i)
                pending32[i] = 4 * elems(i)
        return {"batch": batch, "weights": weights, "master_weights": master, "optimizer_state": optimizer,
                "gradients": grads, **at, "total": peak, "float32_total": peak32}

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One SGD step on cross-entropy to labels ``y``; returns the batch loss.

        Each op's parameters are updated as soon as the backward has passed it (its gradients
        are never all held at once), which gives the same result as gradients() then apply():
        an op's update only needs its own gradient, and the backward never reads it again.
        """
        self._update_during_backward = True
        try:
            g = self.gradients(x, y, head="ce")
        finally:
            self._update_during_backward = False
        self.steps += 1
        return g.loss


@njit(cache=True, inline="always")
def _round_scaled(a, multiplier, shift, stochastic):
    """a * multiplier * 2^(shift - 31) as an integer, symmetric in sign.

    Round to nearest, or pseudo-stochastic: of the discarded bits, the upper half is compared with
    the lower half (no RNG), so the chance of rounding up tracks the discarded fraction.
    """
    p = np.int64(a) * np.int64(multiplier)
    neg = p < 0
    if neg:
        p = -p
    total = 31 - shift
    if total <= 0:
        r = p << (-total)
    elif stochastic and total >= 2:
        half = total // 2
        d = p & ((np.int64(1) << total) - 1)
        r = (p >> total) + (1 if (d >> (total - half)) > (d & ((np.int64(1) << half) - 1)) else 0)
    else:
        r = (p + (np.int64(1) << (total - 1))) >> total
    return -r if neg else r


@njit(cache=True)
def _sgd_weights(master, acc, weight, mult, shift, stride, count, sign, stochastic, limit, frac_bits,
                 decay_mult, decay_shift, velocity, mu_q15, lo, hi):
    """One SGD step on master weights in place, and the int8 weights derived from them.

    STE of the weight quantizer: no update where round(master / 2^F) is clipped (|master| >= limit).
    Weight decay pulls master toward 0 by lr * wd; momentum keeps an int32 velocity (mu in Q15).
    """
    half = (1 << frac_bits) >> 1
    # element i belongs to channel (i // stride) % count: walk the runs of one channel in order
    # instead of dividing per element (the division kept this loop scalar)
    for block in range(master.size // (stride * count)):
        for c in range(count):
            mc = mult[c]
            sc = shift[c]
            start = (block * count + c) * stride
            for i in range(start, start + stride):
                m = np.int64(master[i])
                d = np.int64(0)
                if -limit <= m < limit:
                    d = sign * _round_scaled(acc[i], mc, sc, stochastic)
                if decay_mult != 0:
                    d += sign * _round_scaled(m, decay_mult, decay_shift, False)
                if velocity.size:
                    v = ((np.int64(velocity[i]) * mu_q15 + (1 << 14)) >> 15) + d
                    v = min(max(v, -(2**31)), 2**31 - 1)
                    velocity[i] = v
                    d = v
                m = min(max(m + d, lo), hi)
                master[i] = m
                weight[i] = min(max((m + half) >> frac_bits, -127), 127)


@njit(cache=True)
def _sgd_bias(bias, acc, mult, shift, stride, count, sign, stochastic, velocity, mu_q15):
    """One SGD step on int32 biases in place (their scale s_in * s_w is fine enough for no master);
    element c belongs to channel (c // stride) % count."""
    for c in range(bias.size):
        ch = (c // stride) % count
        d = sign * _round_scaled(acc[c], mult[ch], shift[ch], stochastic)
        if velocity.size:
            v = ((np.int64(velocity[c]) * mu_q15 + (1 << 14)) >> 15) + d
            v = min(max(v, -(2**31)), 2**31 - 1)
            velocity[c] = v
            d = v
        bias[c] = min(max(np.int64(bias[c]) + d, -(2**31)), 2**31 - 1)


def fit(trainer: Trainer, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int = 32, seed: int = 0,
        progress=None) -> list[float]:
    """Shuffled minibatch SGD for ``epochs``; returns the mean loss of each epoch.

    ``progress(epoch, step, steps_per_epoch, loss)`` is called after every step (a bar, a log line).
    """
    if epochs < 1 or batch_size < 1:
        raise ModelError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ModelError(f"{len(x)} inputs but {len(y)} labels")
    rng = np.random.default_rng(seed)
    steps = -(-len(x) // batch_size)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            losses.append(trainer.step(x[idx], y[idx]))
            if progress is not None:
                progress(epoch, s, steps, losses[-1])
        history.append(float(np.mean(losses)))
    return history


# Recipes for training the built-in architectures from scratch (used by tests, tools, benchmarks).
TRAINING_RECIPES = {
    "digits": {"arch": "digits_cnn", "epochs": 20, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "mnist1d": {"arch": "mnist1d_cnn", "epochs": 30, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "mnist5k": {"arch": "mnist_cnn", "epochs": 15, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
}


def fit_recipe(model, recipe: dict, x_int8: np.ndarray, y: np.ndarray, seed: int, progress=None) -> Trainer:
    """Train ``model`` on (``x_int8``, ``y``) with a recipe's epochs, batch, lr and momentum under a
    cosine schedule (``TRAINING_RECIPES``); returns the Trainer."""
    steps = recipe["epochs"] * -(-len(x_int8) // recipe["batch_size"])
    trainer = Trainer(model, lr=recipe["lr"], momentum=recipe["momentum"], schedule="cosine", total_steps=steps)
    fit(trainer, x_int8, y, recipe["epochs"], recipe["batch_size"], seed=seed, progress=progress)
    return trainer


def train_from_scratch(dataset: str, seed: int = 0, progress=None, **overrides) -> tuple[Model, float]:
    """Build the dataset's architecture, calibrate it on 256 training samples, train it with the
    recipe (cosine schedule) and return (model, test accuracy). Host-side: loads a built-in dataset."""
    from . import datasets, models
    from .quant import quantize
    if dataset not in TRAINING_RECIPES:
        raise ModelError(f"no training recipe for {dataset!r}; known: {', '.join(TRAINING_RECIPES)}")
    recipe = {**TRAINING_RECIPES[dataset], **overrides}
    ds = datasets.load(dataset, seed=seed)
    rng = np.random.default_rng(seed)
    calib = ds.x_train[rng.choice(len(ds.x_train), min(256, len(ds.x_train)), replace=False)]
    model = models.build(recipe["arch"], ds.input_shape, ds.num_classes, seed=seed, calib_x=calib)
    q = model.tensors[model.core_inputs[0]].quant
    x_train, x_test = quantize(ds.x_train, q), quantize(ds.x_test, q)
    fit_recipe(model, recipe, x_train, ds.y_train, seed, progress)
    accuracy = float(np.mean(model.forward(x_test).argmax(axis=1) == ds.y_test))
    return model, accuracy
