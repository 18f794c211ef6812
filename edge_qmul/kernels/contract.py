"""What every op kernel provides: the one contract the graph, the trainer, calibration and the
memory report read (kernels/__init__.py collects one :class:`Kernel` per op name).

An op family's module owns the op whole, forward and backward on one screen:

- ``prepare(op, model) -> params``: plain Python, once per model; checks the op (ModelError naming
  the op on anything it does not support), computes multipliers, shifts, tables, geometry.
- ``forward(params, *inputs) -> array | tuple``: compiled integer loops; ``inputs`` are the arrays of
  the op's input slots (batch-first activations, constants as stored, None for an absent optional
  input). An op with several outputs returns a tuple, one array per output, in order.
- ``backward(params, ctx: Backward) -> list[Error | None]``: the STE backward. It returns one entry
  per input slot (None where ``ctx.wants[slot]`` is False or the input is constant) and hands
  parameter gradients to ``ctx.emit``. Errors are int16 values with a float scale (grad.Error).
- ``clamp(params) -> (lo, hi) | None``: the int8 clamp of output 0 (requantization and fused
  activation); the trainer masks the output error to where the forward value was strictly inside.
  None: the op copies or permutes values and clamps nothing.
- ``backward_bytes(op, model, q: MemoryQuery) -> int``: what the backward holds at its peak besides
  errors still pending for other tensors: its own output errors, the input errors it makes, and any
  transient sums or copies (``Trainer.memory_report`` adds these up along the backward walk).
- ``needs_outputs``: the backward reads ``ctx.outputs`` (otherwise the trainer frees them first).
- ``parameters``: input slots that hold trainable parameters, as (slot, name suffix).
- ``output_quant``: how calibration sets the outputs' quantization: "computed" (from the measured
  range, starting from ``output_bound(op, model, absmax)``: a bound on |output| the op cannot
  exceed given ``absmax(t)``, the max |real value| of an input tensor), "input" (the same as
  input 0: the op moves values), or "fixed" (the op's definition fixes it: ``fixed_quant(op, model)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ModelError
from ..grad import Error


@dataclass
class Backward:
    """What one op's backward receives from the trainer's walk."""

    op: Any                                  # graph.Op
    model: Any                               # graph.Model (tensors: shapes, quantization)
    inputs: list                             # per input slot: the array the forward read (or None)
    outputs: list                            # per output: the array the forward made (or None if dropped)
    errors: list                             # per output: Error (clamp-masked) or None (no error reached it)
    wants: list                              # per input slot: is that input's error needed
    block: int = 1                           # samples per block of int32 input-gradient sums
    train: bool = False                      # are this op's parameters trained (call emit)
    groups: list = field(default_factory=list)  # row slices of the batch with separate gradients
    emit: Callable | None = None             # emit(group, suffix, int sums, scale)
    patch_bytes: int = 0                     # workspace budget of a conv weight gradient

    def error(self, k: int = 0) -> Error | None:
        return self.errors[k] if k < len(self.errors) else None

    def zeros_error(self, k: int = 0) -> Error:
        """The error of output ``k`` or, if none reached it, zeros of its shape (scale 1)."""
        e = self.error(k)
        if e is not None:
            return e
        n = next(v.values.shape[0] for v in self.errors if v is not None)
        shape = (n,) + tuple(self.model.tensors[self.op.outputs[k]].shape[1:])
        return Error(np.zeros(shape, np.int16), 1.0)


@dataclass
class MemoryQuery:
    """What backward_bytes may ask about one step of the memory replay."""

    batch: int
    elems: Callable[[int], int]   # tensor index -> elements at this batch
    wants: Callable[[int], bool]  # tensor index -> is its error needed
    block: int                    # samples per block of input-gradient sums
    trained: bool                 # this op's parameters are trained
    step: bool                    # Trainer.step (update during backward) rather than gradients()
    patch_bytes: int
    float32_workspace: int = 0    # set by backward_bytes: what a float32 twin of this backward holds
                                  # besides errors (a conv's im2col rows in float32, an LSTM's gates)


def no_macs(op, model) -> int:
    return 0


def no_clamp(params) -> None:
    return None


def error_bytes(op, model, q: MemoryQuery) -> int:
    """The default backward_bytes: int16 output errors in, int16 input errors out, nothing else."""
    out = sum(2 * q.elems(t) for t in op.outputs)
    made = sum(2 * q.elems(t) for t in op.inputs if t >= 0 and q.wants(t))
    return out + made


def no_backward(params, ctx: Backward) -> list:
    raise ModelError(f"op {ctx.op.kind} (index {ctx.op.index}) has no backward; it cannot sit between "
                     "a trainable op and the loss")


@dataclass(frozen=True)
class Kernel:
    prepare: Callable
    forward: Callable
    backward: Callable = no_backward
    clamp: Callable = no_clamp
    macs: Callable = no_macs
    backward_bytes: Callable = error_bytes
    parameters: tuple = ()
    output_quant: str = "computed"
    fixed_quant: Callable | None = None
    output_bound: Callable | None = None
    needs_outputs: bool = False  # the backward reads ctx.outputs (else they are dropped before it)
