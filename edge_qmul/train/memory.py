"""How many bytes a training step holds: the block size of input-gradient sums, and a replay of
the backward walk's allocations that gives a step's peak (``Trainer.memory_report``).

The replay walks the ops in the order ``Trainer._backward`` does and asks each kernel for the bytes
its backward holds (``Kernel.backward_bytes``), so the report follows the code it describes; the
tests compare it with tracemalloc's measured peak.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

from ..errors import ModelError
from ..kernels import KERNELS, MemoryQuery

if TYPE_CHECKING:  # for the annotation only: the Trainer calls this module
    from .trainer import Trainer

BLOCK_BYTES = 8 * 1024  # int32 input-gradient sums held at once (grad.from_blocks)
BLOCKS_PER_BATCH = 8  # ... or an eighth of the batch, if more: each block costs a few kernel calls


def input_gradient_block(n: int, per_sample: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Samples per block of input-gradient sums: at least one per thread and an eighth of the
    batch, and as many as fit in ``block_bytes`` (small layers then take one or two calls)."""
    return max(1, numba.get_num_threads(), -(-n // BLOCKS_PER_BATCH), block_bytes // max(per_sample, 1))


def memory_report(trainer: "Trainer", batch: int, step: bool = True) -> dict:
    """Bytes one training step at ``batch`` holds at its peak, by where they go, and the float32
    footprint of the same training computed the same way.

    ``step=True`` describes ``trainer.step`` (each op updated as the backward passes it, so only
    one op's gradients exist at a time); ``step=False`` describes gradients() + apply(), which hold
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
    model = trainer.model
    params = model.parameter_tensors()
    weights = sum(model.tensors[t].data.nbytes for t in params.values())
    n_params = sum(model.tensors[t].data.size for t in params.values())
    trainable = set(trainer.trainable_tensors())
    trainable_elems = sum(model.tensors[t].data.size for n, t in params.items() if n in trainable)
    master = sum(m.nbytes for m in trainer.master.values())
    optimizer = 4 * trainable_elems if trainer.momentum else 0
    grads = 0 if step else 4 * trainable_elems

    def elems(t: int) -> int:
        return batch * int(np.prod(model.tensors[t].shape[1:]))

    core = [model.core_inputs[0]] + [t for op in model.ops
                                     if not (op.kind == "DEQUANTIZE" and op.inputs[0] in model.core_outputs)
                                     and not (op.kind == "QUANTIZE" and op.outputs[0] in model.core_inputs)
                                     for t in op.outputs]
    acts = {t: elems(t) for t in core}
    saved = sum(acts.values())
    pending = {trainer.logits_tensor: 2 * elems(trainer.logits_tensor)}
    pending32 = {trainer.logits_tensor: 4 * elems(trainer.logits_tensor)}
    persistent = weights + master + optimizer
    peak, at = persistent + saved + grads, {"saved_activations": saved, "errors_and_sums": 0}
    fixed32 = 4 * n_params + 4 * trainable_elems + (optimizer and 4 * trainable_elems)
    peak32 = fixed32 + 4 * saved
    first = min(trainer.trainable_ops) if trainer.trainable_ops else len(model.ops)
    trainable_ops = set(trainer.trainable_ops)
    for op in reversed(model.ops[first:]):
        outs = [t for t in op.outputs if t in pending]
        if not outs:
            continue
        for t in outs:
            pending.pop(t)
        e32 = sum(pending32.pop(t) for t in outs)
        x_t = op.inputs[0]
        need = [i for i in op.inputs if trainer.wants_error(i)]
        per_sample = 4 * int(np.prod(model.tensors[x_t].shape[1:])) if x_t >= 0 else 4
        block = min(batch, input_gradient_block(batch, per_sample, trainer.block_bytes))
        q = MemoryQuery(batch, elems, trainer.wants_error, block, op.index in trainable_ops, step,
                        trainer.patch_bytes)
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

