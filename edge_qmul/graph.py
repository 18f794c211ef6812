"""Model: tensors and ops in topological order, run as a batch by the int8 kernels.

A Model is what a .tflite file holds, minus what the engine does not need: the shape-computing
subgraph that Keras' Flatten emits is folded into a plain RESHAPE when the file is read. Tensors keep
the shapes the file declares (batch 1); the engine runs any batch size along axis 0.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import kernels
from .arithmetic import Arithmetic, arithmetic
from .errors import ModelError
from .quant import QuantParams, dequantize, quantize

# forward/predict calls of one model before its compiled plan is built (EDGE_QMUL_PLAN_AFTER)
PLAN_AFTER_CALLS = int(os.environ.get("EDGE_QMUL_PLAN_AFTER", "3"))


@dataclass
class Tensor:
    """One tensor of the graph. ``data`` is set for constants (weights, biases, parameters)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quant: QuantParams | None = None
    data: np.ndarray | None = None
    shape_signature: tuple[int, ...] | None = None
    variable: bool = False  # state an op reads and writes across invocations (LSTM): zeros at the start


    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Op:
    """One operator: its builtin name, tensor indices (-1 = optional input absent) and options."""

    kind: str
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)
    version: int | None = None  # None: the writer picks the usual int8 version of the op
    index: int = 0
    intermediates: list[int] = field(default_factory=list)  # tensors that only carry quantization
                                                             # of an op's internals (an int8 LSTM's gates)

    @property
    def name(self) -> str:
        """Stable parameter-naming prefix, e.g. ``conv_2d_0`` (kind + position in the graph)."""
        return f"{self.kind.lower()}_{self.index}"


class Model:
    """An int8 model: ``forward`` runs the int8 core, ``predict`` the whole float/int8 interface."""

    def __init__(self, tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int],
                 metadata: dict[str, bytes] | None = None, description: str = "edge_qmul",
                 signature: dict | None = None, litert: str | Arithmetic | None = None) -> None:
        self.tensors = tensors
        self.ops = ops
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.metadata = dict(metadata or {})
        self.description = description
        self.signature = signature
        # whose LiteRT the kernels reproduce: the host's platform unless told (arithmetic.py)
        self.litert = arithmetic(litert)
        for i, op in enumerate(ops):
            op.index = i
        self._prepared: list | None = None
        self.weights_version = 0  # moved by whatever changes weights in place (the trainer)
        self._plans: dict[bool, list] = {}  # interface? -> [prepared list it was built for, calls, Plan]
        kernels.check_supported(self)

    # --- interface -------------------------------------------------------------------------------
    @property
    def core_inputs(self) -> list[int]:
        """Int8 tensors the int8 core starts from: model inputs, or what QUANTIZE makes of them."""
        return [self._skip_interface(t, "QUANTIZE") for t in self.inputs]

    @property
    def core_outputs(self) -> list[int]:
        """Int8 tensors the core ends in: model outputs, or what DEQUANTIZE reads."""
        return [self._skip_interface(t, "DEQUANTIZE") for t in self.outputs]

    @property
    def logits_tensor(self) -> int:
        """The classifier's logits: the first core output, or the input of the SOFTMAX that makes it
        (training and the metrics read real-valued logits, not int8 probabilities on a 1/256 grid)."""
        out = self.core_outputs[0]
        for op in self.ops:
            if op.outputs[0] == out and op.kind == "SOFTMAX":
                return op.inputs[0]
        return out

    @property
    def num_classes(self) -> int:
        """Classes the model scores: the size of one sample's logits."""
        shape = self.tensors[self.logits_tensor].shape
        return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])

    def _skip_interface(self, t: int, kind: str) -> int:
        for op in self.ops:
            if op.kind != kind:
                continue
            if kind == "QUANTIZE" and op.inputs[0] == t and self.tensors[t].dtype == np.float32:
                return op.outputs[0]
            if kind == "DEQUANTIZE" and op.outputs[0] == t:
                return op.inputs[0]
        return t

    def parameters(self) -> dict[str, np.ndarray]:
        """Named trainable parameters (``<op>.weight``, ``<op>.bias``), the arrays themselves."""
        return {name: self.tensors[t].data for name, t in self.parameter_tensors().items()}

    def parameter_tensors(self) -> dict[str, int]:
        """Parameter name -> tensor index."""
        out = {}
        for op in self.ops:
            for slot, suffix in kernels.parameter_slots(op.kind):
                if slot < len(op.inputs) and op.inputs[slot] >= 0:
                    out[f"{op.name}.{suffix}"] = op.inputs[slot]
        return out

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        """Replace a parameter's values (same shape and dtype; scales unchanged)."""
        tensors = self.parameter_tensors()
        if name not in tensors:
            raise ModelError(f"unknown parameter {name!r}; known: {', '.join(tensors)}")
        t = self.tensors[tensors[name]]
        value = np.asarray(value)
        if value.shape != t.data.shape or value.dtype != t.data.dtype:
            raise ModelError(f"parameter {name!r} is {t.data.dtype}{list(t.data.shape)}, "
                             f"got {value.dtype}{list(value.shape)}")
        t.data = value.copy()
        self.weights_version += 1

    def use_litert(self, litert: str | Arithmetic | None) -> "Model":
        """Compute as the LiteRT of platform ``litert`` does (``x86_64``, ``aarch64``; None: the
        host's); the ops are prepared again. Returns the model."""
        self.litert = arithmetic(litert)
        self._prepared = None
        self._ensure_prepared()
        return self

    # --- execution -------------------------------------------------------------------------------
    def _ensure_prepared(self) -> list:
        if self._prepared is None:
            from .plan import bound_numba_labels
            bound_numba_labels()  # a new model's kernels may compile next (plan/__init__.py says why)
            self._prepared = [kernels.prepare(op, self) for op in self.ops]
        return self._prepared

    def run(self, feeds: dict[int, np.ndarray], start_after_interface: bool = False,
            keep: bool = False, timings: list | None = None) -> dict[int, np.ndarray]:
        """Run ops in order from ``feeds`` (tensor index -> batch array); returns every value.

        With ``start_after_interface`` the QUANTIZE / DEQUANTIZE ops at the float interface are
        skipped, so the int8 core runs alone. ``timings``, if given, receives (op, seconds) per op run.
        """
        prepared = self._ensure_prepared()
        values: dict[int, np.ndarray] = dict(feeds)
        core_in, core_out = set(self.core_inputs), set(self.core_outputs)
        for op, params in zip(self.ops, prepared):
            if start_after_interface and (
                    (op.kind == "QUANTIZE" and op.outputs[0] in core_in)
                    or (op.kind == "DEQUANTIZE" and op.inputs[0] in core_out)):
                continue
            # a variable (state) tensor no op has written yet reads as None: the kernel's zero state
            args = [values[i] if i in values else (self.tensors[i].data if i >= 0 else None)
                    for i in op.inputs]
            if timings is None:
                result = kernels.evaluate(op, params, args)
            else:
                t0 = time.perf_counter()
                result = kernels.evaluate(op, params, args)
                timings.append((op, time.perf_counter() - t0))
            if len(op.outputs) == 1:
                values[op.outputs[0]] = result
            else:
                for t, v in zip(op.outputs, result):
                    values[t] = v
        return values

    def compiled(self, interface: bool = False, build: bool = True):
        """The compiled plan (edge_qmul/plan) of ``forward`` (or, with ``interface``, of ``predict``),
        built now if ``build``; None when plans are off or the model's could not be built.

        EDGE_QMUL_PLAN: ``explicit`` (default) builds it only here; ``auto`` at a model's third
        forward/predict call; ``off`` never (the per-op path always). Not ``auto`` by default: compiling
        a plan takes seconds for a small model and minutes for the largest (mobilenetv2_035 ~85 s, the
        zoo's unrolled RNNs longer), cold, once per model structure (numba caches it on disk), which
        a third ``predict`` should not cost unasked."""
        if os.environ.get("EDGE_QMUL_PLAN", "explicit") == "off":
            return None
        prepared = self._ensure_prepared()
        state = self._plans.get(interface)
        if state is None or state[0] is not prepared:
            state = self._plans[interface] = [prepared, 0, None]
        if state[2] is None and build:
            from .plan import Plan
            try:
                state[2] = Plan(self, interface)
            except Exception as e:  # the per-op path stays: it is the reference the plan copies
                warnings.warn(f"edge_qmul: no compiled plan for this model ({type(e).__name__}: {e})")
                state[2] = False
        return state[2] or None

    def _run_outputs(self, feeds: dict[int, np.ndarray], interface: bool) -> list[np.ndarray]:
        # A model's third call of forward/predict builds its plan (EDGE_QMUL_PLAN=auto): one-off
        # runs (loading, checks, fuzzing) never pay for compiling one. A plan that fails at run time is dropped and the
        # per-op path answers (and raises the error that names the op, if there is one).
        prepared = self._ensure_prepared()
        state = self._plans.get(interface)
        if state is None or state[0] is not prepared:
            state = self._plans[interface] = [prepared, 0, None]
        plan = state[2]
        if plan is None and os.environ.get("EDGE_QMUL_PLAN", "explicit") == "auto":
            state[1] += 1
            if state[1] >= PLAN_AFTER_CALLS:
                plan = self.compiled(interface)
        if plan:
            try:
                return plan.run_outputs(feeds, self.outputs if interface else self.core_outputs)
            except Exception as e:
                warnings.warn(f"edge_qmul: compiled plan failed ({type(e).__name__}: {e}); per-op path used")
                state[2] = False
        values = self.run(feeds, start_after_interface=not interface)
        return [values[t] for t in (self.outputs if interface else self.core_outputs)]

    def _check_batch(self, x: np.ndarray, t: int, where: str) -> np.ndarray:
        tensor = self.tensors[t]
        if (type(x) is np.ndarray and x.dtype == tensor.dtype and x.dtype != np.float32
                and x.shape[1:] == tuple(tensor.shape[1:]) and x.ndim == len(tensor.shape) and x.shape[0] >= 1
                and x.flags.c_contiguous):
            return x  # the usual case, checked in a few comparisons (a batch-1 forward is microseconds)
        x = np.asarray(x)
        if x.dtype != tensor.dtype:
            if tensor.dtype == np.float32 and np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            else:
                raise ModelError(f"{where}: input {tensor.name!r} takes {np.dtype(tensor.dtype).name}, "
                                 f"got {x.dtype.name}")
        if x.ndim == len(tensor.shape) - 1 and tuple(x.shape) == tuple(tensor.shape[1:]):
            x = x[None]
        if x.ndim != len(tensor.shape) or tuple(x.shape[1:]) != tuple(tensor.shape[1:]) or x.shape[0] < 1:
            raise ModelError(f"{where}: input {tensor.name!r} has shape (N, {', '.join(map(str, tensor.shape[1:]))}),"
                             f" got {tuple(x.shape)}")
        if x.dtype == np.float32 and not np.all(np.isfinite(x)):
            raise ModelError(f"{where}: input {tensor.name!r} holds NaN or inf")
        return np.ascontiguousarray(x)

    def forward(self, *xs: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Run the int8 core on int8 batches; returns the int8 output(s) (one array per output)."""
        core_in = self.core_inputs
        if len(xs) != len(core_in):
            raise ModelError(f"forward: the model has {len(core_in)} input(s), got {len(xs)}")
        feeds = {t: self._check_batch(x, t, "forward") for t, x in zip(core_in, xs)}
        outs = self._run_outputs(feeds, interface=False)
        return outs[0] if len(outs) == 1 else outs

    def predict(self, *xs: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Run the whole model as LiteRT would: float in/out for float-interface models.

        An int8 model given float input quantizes it with the input scale first, and returns int8,
        like the .tflite. A single sample without a batch axis is accepted.
        """
        if len(xs) != len(self.inputs):
            raise ModelError(f"predict: the model has {len(self.inputs)} input(s), got {len(xs)}")
        feeds = {}
        for t, x in zip(self.inputs, xs):
            tensor = self.tensors[t]
            x = np.asarray(x)
            if tensor.dtype == np.int8 and np.issubdtype(x.dtype, np.floating):
                if not np.all(np.isfinite(x)):
                    raise ModelError(f"predict: input {tensor.name!r} holds NaN or inf")
                x = quantize(x, tensor.quant)
            feeds[t] = self._check_batch(x, t, "predict")
        outs = self._run_outputs(feeds, interface=True)
        return outs[0] if len(outs) == 1 else outs

    def dequantize_output(self, y: np.ndarray, k: int = 0) -> np.ndarray:
        """Float view of a core output (for scores and losses)."""
        return dequantize(y, self.tensors[self.core_outputs[k]].quant)

    # --- description -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def summary(self) -> str:
        """A table of ops, output shapes, parameters, bytes and MACs, with totals."""
        rows = [("#", "op", "output", "shape", "params", "bytes", "MACs")]
        total_p = total_b = total_m = 0
        for op in self.ops:
            out = self.tensors[op.outputs[0]]
            p = b = 0
            for slot, _ in kernels.parameter_slots(op.kind):
                if slot < len(op.inputs) and op.inputs[slot] >= 0:
                    p += int(self.tensors[op.inputs[slot]].data.size)
                    b += int(self.tensors[op.inputs[slot]].data.nbytes)
            m = kernels.macs(op, self)
            total_p, total_b, total_m = total_p + p, total_b + b, total_m + m
            rows.append((str(op.index), op.kind, out.name[:40], "x".join(map(str, out.shape)),
                         str(p), str(b), str(m)))
        rows.append(("", "total", "", "", str(total_p), str(total_b), str(total_m)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        io = []
        for label, ts in (("input", self.inputs), ("output", self.outputs)):
            for t in ts:
                tt = self.tensors[t]
                io.append(f"{label}: {tt.name} {np.dtype(tt.dtype).name}{list(tt.shape)} {tt.quant}")
        return "\n".join(io + lines)

    def copy(self) -> "Model":
        """A deep copy (tensor data copied), sharing nothing mutable with this model."""
        return Model([copy.deepcopy(t) for t in self.tensors], [copy.deepcopy(o) for o in self.ops],
                     self.inputs, self.outputs, self.metadata, self.description,
                     copy.deepcopy(self.signature), self.litert)
