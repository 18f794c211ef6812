"""The Trainer: integer SGD on an int8 Model, in place — the backward walk over the ops, the
parameter updates, and the learning-rate schedule.

- master weights: int16 fixed point with ``frac_bits`` fractional bits (int32 above 8 bits); the
  model's int8 weight is always round(master / 2^F) clipped to [-127, 127], so updates smaller
  than one int8 step accumulate instead of vanishing.
- STE: an op's output error passes only where its int8 output was strictly inside its clamp
  (requantization to int8, fused RELU / RELU6); the weight quantizer passes the gradient straight
  to master, masked where the weight is clipped.
- SGD on the real-valued weights (w_real = s_w[c] * w_int8): the step for channel c is
  -lr * g_real / s_w[c] in int8 steps, applied as a fixed-point multiplier on the int32 gradient
  (``sgd.py``).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .. import grad as G
from ..errors import ModelError
from ..graph import Model
from ..kernels import KERNELS, Backward, conv
from ..losses import HEADS, loss_head
from ..profile import Profiler, phase_or_nothing
from ..quant import dequantize, quantize, quantize_multiplier, quantize_multipliers
from .gradients import Gradients, ParamGrad, combine_errors, to_int32
from .memory import BLOCK_BYTES, input_gradient_block, memory_report
from .sgd import sgd_bias, sgd_weights

Q15 = 1 << 15


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
        self.logits_tensor = model.logits_tensor
        # master weights: int16 while 127.5 * 2^F fits, int32 beyond
        self.master_dtype = np.int16 if (127.5 * 2 ** frac_bits) < 2 ** 15 else np.int32
        self.master: dict[str, np.ndarray] = {}
        self.velocity: dict[str, np.ndarray] = {}
        self._update_cache: dict[str, tuple] = {}
        for name, t in self.trainable_tensors().items():
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

    def trainable_tensors(self) -> dict[str, int]:
        """Parameter name -> tensor index, for the parameters of the trainable ops."""
        out = {}
        for i in self.trainable_ops:
            op = self.model.ops[i]
            for slot, suffix in KERNELS[op.kind].parameters:
                if slot < len(op.inputs) and op.inputs[slot] >= 0:
                    out[f"{op.name}.{suffix}"] = op.inputs[slot]
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
            x = quantize(x, self.model.tensors[core_in].quant)
        x = self.model._check_batch(x, core_in, "train")
        n = x.shape[0]
        classes = self.model.num_classes
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
            wants = [self.wants_error(t) for t in op.inputs]
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
                if e is None or not self.wants_error(t):
                    continue
                errors[t] = combine_errors(errors[t], e) if t in errors else e

    def _emitter(self, op, groups: list):
        """ctx.emit for one op: an int64 (or int32) gradient sum with its scale, for group k."""
        def emit(k: int, suffix: str, sums: np.ndarray, scale: float) -> None:
            name = f"{op.name}.{suffix}"
            pg = to_int32(sums, scale)
            if self._update_during_backward:
                self._apply_param(name, pg, self.learning_rate())
            else:
                groups[k][1].params[name] = pg
        return emit

    def wants_error(self, t: int) -> bool:
        """Whether the backward computes an error for tensor ``t`` (it leads to a trainable op)."""
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
        self.model.weights_version += 1  # compiled plans pack the weights again (edge_qmul/plan)
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
            sgd_weights(self.master[name].reshape(-1), pg.acc.reshape(-1), tensor.data.reshape(-1),
                         mult, shift, stride, count, sign, self.stochastic_rounding,
                         int(127.5 * 2 ** F), F, decay_m, decay_s, velocity.reshape(-1), mu,
                         int(np.iinfo(self.master_dtype).min), int(np.iinfo(self.master_dtype).max))
        else:
            mult, shift = quantize_multipliers(abs(lr) * pg.scale / s_real)
            sgd_bias(tensor.data.reshape(-1), pg.acc.reshape(-1), mult, shift, stride, count, sign,
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
            t = self.trainable_tensors()[name]
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
        footprint of the same training (:func:`edge_qmul.train.memory.memory_report`)."""
        return memory_report(self, batch, step)

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

