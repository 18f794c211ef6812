"""A compiled plan per model: the graph's forward as one compiled function, not a Python loop of ops.

At batch 1 the per-op path spends most of its time in Python (the digits CNN: 27 us a forward
against LiteRT's 4 us; each op's forward pads parameters, lays out its GEMM, checks shapes, then
crosses into numba). A plan does that work once: each op's emitter (plan/steps.py) writes one line
of Python source calling the op's compiled core with its scalars as literals (typed, for models of
more than SPECIALIZE_WEIGHTED_OPS weighted ops: ``unliteral``), the lines become one
``@njit`` function per run of supported ops (a *segment*), and a call of the plan is one crossing
into compiled code per segment. Ops without an emitter run between segments through the per-op
path. Small work calls serial twins of the kernels (plan/serial.py): no parallel region opens.

The generated source lives in a file (numba caches only functions defined in files), named by a
digest of the source and of the engine's own sources, so a changed kernel never loads an old plan.
Weights are passed by reference, so training in place is seen; a tensor whose array is replaced
(``Model.set_parameter``) is picked up at the next call.
"""
from __future__ import annotations

import hashlib
import io
import tokenize
import re
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

import numba
import numpy as np

from .. import kernels
from ..kernels.gemm import NR
from ..numba_cache import sources_fingerprint
from ..threads import update as update_threads
from .serial import serial
from .steps import EMITTERS

_PACKAGE = Path(__file__).resolve().parent.parent
# A segment's multiply-adds (batch included) from which, with threads, its ops run one by one in
# parallel kernels rather than in the compiled serial segment. Measured at 2 threads against the
# serial plan (benchmarks/forward.py): mobilenetv2_035 and resnet_tiny at batch 1 (4.8 M, 8.9 M)
# 2.8x and 2.2x slower per op in parallel, digits at batch 32 (2.7 M) 2.9x; at batch 32
# mobilenetv2_035 (152 M) and resnet_tiny (284 M) 0.95x and 0.83x; mobilenet_tiny (33 M) alike.
SEGMENT_PARALLEL_WORK = 1 << 25
# Up to this many weighted ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) a model's plan passes
# its kernels their scalars as literals, so numba compiles each call for its own values (constant
# loop bounds and strides: measured 10-30% faster segments on the conv fixtures, ~3 s of compilation
# per call); larger models pass them typed (unliteral) and share one compilation per kernel
# signature: efficientnet_b0's plan compiled in 110 s instead of 523 s, mobilenet_v1_025_vww's in
# 11 s instead of 84 s. EDGE_QMUL_PLAN_SPECIALIZE sets it (0: never).
SPECIALIZE_WEIGHTED_OPS = 16
_MODULES: dict[str, object] = {}
_LOCK = threading.Lock()
_fingerprint: str | None = None


def plan_dir() -> Path:
    """Where generated plan sources (and numba's cache of them) live: EDGE_QMUL_PLAN_DIR, else
    $XDG_CACHE_HOME/edge_qmul/plans (~/.cache/...)."""
    if os.environ.get("EDGE_QMUL_PLAN_DIR"):
        return Path(os.environ["EDGE_QMUL_PLAN_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge_qmul" / "plans"


class _Source:
    """The source of one segment being generated (the ``g`` the emitters write through)."""

    def __init__(self, model, live: dict[int, str], specialize: bool) -> None:
        self.model = model
        self.specialize = specialize  # scalars as literals (SPECIALIZE_WEIGHTED_OPS)
        self.live = live          # tensor index -> variable holding it in the segment
        self.lines: list[str] = []
        self.consts: list[tuple[str, object]] = []  # ("tensor", index) or ("array", ndarray)
        self._const_ids: dict[tuple, int] = {}
        self.imports: dict[int, tuple[str, object]] = {}
        self.total_work = 0  # per sample, of all the segment's calls
        self._tmp = 0

    def line(self, text: str) -> None:
        self.lines.append(text)

    def tmp(self) -> str:
        self._tmp += 1
        return f"v{self._tmp}"

    def _slot(self, key: tuple, entry: tuple) -> str:
        if key not in self._const_ids:
            self._const_ids[key] = len(self.consts)
            self.consts.append(entry)
        return f"c[{self._const_ids[key]}]"

    def derived(self, key: str, make, part: int) -> str:
        """Part ``part`` of ``make(model)``, arrays computed from the current weights (packed
        filters): made again whenever the weights change."""
        return self._slot(("derived", key, part), ("derived", (key, make), part))

    def const(self, array: np.ndarray) -> str:
        """A fixed array (computed at plan time) as a slot of the constant tuple."""
        return self._slot(("array", id(array)), ("array", np.ascontiguousarray(array)))

    def x(self, op, k: int) -> str:
        """Input ``k`` of ``op``: a variable of the segment, or a constant tensor's slot."""
        t = op.inputs[k]
        if t in self.live:
            return self.live[t]
        if self.model.tensors[t].is_constant:
            return self._slot(("tensor", t), ("tensor", t))
        raise NotImplementedError(f"tensor {t} is neither computed nor constant")

    def bias(self, op, zero_bias: np.ndarray) -> str:
        return self.x(op, 2) if len(op.inputs) > 2 and op.inputs[2] >= 0 else self.const(zero_bias)

    def i32(self, expr: str) -> str:
        return expr  # biases are int32 (common.check_bias); the run functions pad them

    def padded(self, expr: str) -> str:
        return f"{self.fn(pad_to_panels)}({expr})"

    def fn(self, dispatcher) -> str:
        """The name the generated module gives a compiled function: from its module and qualified
        name, so that it is the same in every segment of the module and never names another."""
        py = dispatcher.py_func
        name = "F_" + re.sub(r"\W", "_", f"{py.__module__}.{py.__qualname__}")
        self.imports.setdefault(id(dispatcher), (name, dispatcher))
        return name

    def call(self, dispatcher, args: str, work: int, twin=None) -> str:
        """The kernel's call: its serial twin (``twin``, or one compiled from the kernel's own
        source), so that no parallel region opens inside the plan. Its integer and boolean
        arguments are literals when the plan specializes, else typed (``unliteral``)."""
        self.total_work += int(work)
        return f"{self.fn(twin or serial(dispatcher))}({args if self.specialize else unliteral(args)})"

    def macs(self, op) -> int:
        return max(1, kernels.macs(op, self.model))

    @staticmethod
    def literal(value) -> str:
        if isinstance(value, np.float32):
            return f"np.float32({float(value)!r})"
        if isinstance(value, (float, np.floating)):
            return repr(float(value))
        return str(int(value))

    def assign(self, op, expr: str) -> None:
        name = f"t{op.outputs[0]}"
        self.line(f"{name} = {expr}")
        self.live[op.outputs[0]] = name


def specialize_limit() -> int:
    """EDGE_QMUL_PLAN_SPECIALIZE, else SPECIALIZE_WEIGHTED_OPS."""
    text = os.environ.get("EDGE_QMUL_PLAN_SPECIALIZE", str(SPECIALIZE_WEIGHTED_OPS))
    if not text.strip().isdigit():
        raise ValueError(f"EDGE_QMUL_PLAN_SPECIALIZE={text!r}: expected a count of weighted ops (0: never)")
    return int(text)


def unliteral(args: str) -> str:
    """``args`` with each integer or boolean constant wrapped as ``np.int64(..)``/``np.bool_(..)``,
    except tuple indices (``c[3]``). Numba types a constant argument as a literal and compiles the
    callee once per distinct value: a conv kernel compiled again for every conv of the model (about
    3 s each; efficientnet_b0's plan took 9 minutes to compile), where typed arguments share one
    compilation per signature across every call site and model."""
    starts = [0]  # offset of each line's first character
    for line in args.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out, done, previous = [], 0, None
    for tok in tokenize.generate_tokens(io.StringIO(args).readline):
        wrap = None
        if tok.type == tokenize.NUMBER and previous != "[" and re.fullmatch(r"\d+", tok.string):
            wrap = "np.int64"
        elif tok.type == tokenize.NAME and tok.string in ("True", "False") and previous != ".":
            wrap = "np.bool_"
        if wrap:
            begin = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            out += [args[done:begin], f"{wrap}({tok.string})"]
            done = end
        previous = tok.string
    return "".join(out) + args[done:]


def _module_source(segments: list[tuple[list[str], _Source]]) -> tuple[str, dict]:
    header = ['"""A compiled plan generated by edge_qmul.plan: do not edit."""', "import numpy as np",
              "from numba import njit", ""]
    imports = {}
    for _, g in segments:
        for name, d in g.imports.values():
            imports[name] = d
    body = []
    for i, (params, g) in enumerate(segments):
        body += ["", "", "@njit(cache=True)", f"def segment{i}(ins, c, threads):"]
        body += [f"    {p} = ins[{k}]" for k, p in enumerate(params)]
        body += [f"    {line}" for line in g.lines]
        body.append(f"    return ({', '.join(g.live[t] for t in g.outputs)},)")
    return "\n".join(header) + "\n" + "\n".join(body) + "\n", imports


def _load(source: str, imports: dict):
    """Write the source under plan_dir() (named by its digest and the engine's sources) and import
    it, or reuse the module already imported."""
    global _fingerprint
    if _fingerprint is None:
        _fingerprint = sources_fingerprint(_PACKAGE)
    names = "".join(f"{n}={d.py_func.__module__}.{d.py_func.__qualname__}\n" for n, d in sorted(imports.items()))
    digest = hashlib.sha256((source + names + _fingerprint + numba.__version__).encode()).hexdigest()[:24]
    with _LOCK:
        if digest in _MODULES:
            return _MODULES[digest]
        directory = plan_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            directory = Path(tempfile.mkdtemp(prefix="edge_qmul_plans_"))
        path = directory / f"plan_{digest}.py"
        if not path.is_file() or path.read_text() != source:
            tmp = directory / f".plan_{digest}.{os.getpid()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
        name = f"edge_qmul_plan_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__dict__.update(imports)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[digest] = module
        return module


class Plan:
    """A model's forward (``interface=False``: the int8 core) or predict (``interface=True``) as
    compiled segments and per-op steps. ``plan(*xs)`` returns every output value by tensor index."""

    def __init__(self, model, interface: bool) -> None:
        self.model = model
        prepared = model._ensure_prepared()
        core_in, core_out = set(model.core_inputs), set(model.core_outputs)
        self.inputs = list(model.inputs if interface else model.core_inputs)
        self.outputs = list(model.outputs if interface else model.core_outputs)
        ops = []
        for op, params in zip(model.ops, prepared):
            if not interface and ((op.kind == "QUANTIZE" and op.outputs[0] in core_in)
                                  or (op.kind == "DEQUANTIZE" and op.inputs[0] in core_out)):
                continue
            ops.append((op, params))
        self._consts: dict[int, tuple] = {}
        limit = specialize_limit()
        self.specialize = limit > 0 and sum(op.kind in kernels.WEIGHTED_OPS for op, _ in ops) <= limit
        self.steps = self._build(ops)
        self.segments = sum(1 for s in self.steps if s[0] == "segment")

    def _build(self, ops: list) -> list:
        # consumers after each position: which tensors a segment must hand out
        later_uses = [set() for _ in range(len(ops) + 1)]
        later_uses[len(ops)] = set(self.outputs)
        for i in range(len(ops) - 1, -1, -1):
            later_uses[i] = later_uses[i + 1] | {t for t in ops[i][0].inputs if t >= 0}
        runs, current = [], []
        for i, (op, params) in enumerate(ops):
            if op.kind in EMITTERS and len(op.outputs) == 1 and not self._stateful(op):
                current.append(i)
                continue
            if current:
                runs.append(("segment", current))
                current = []
            runs.append(("op", i))
        if current:
            runs.append(("segment", current))
        steps, compiled = [], []
        for kind, what in runs:
            if kind == "op":
                steps.append(("op",) + ops[what])
                continue
            step = self._segment([ops[i] for i in what], later_uses[what[-1] + 1])
            steps.extend(step)
            compiled += [s for s in step if s[0] == "segment"]
        if compiled:
            source, imports = _module_source([(s[2], s[3]) for s in compiled])
            module = _load(source, imports)
            for i, s in enumerate(compiled):
                s[1] = getattr(module, f"segment{i}")
        return steps

    def _stateful(self, op) -> bool:
        return any(t >= 0 and self.model.tensors[t].variable for t in op.inputs)

    def _segment(self, ops: list, needed_after: set) -> list:
        produced = {t for op, _ in ops for t in op.outputs}
        params = []
        live = {}
        for op, _ in ops:
            for t in op.inputs:
                if t >= 0 and t not in produced and t not in live and not self.model.tensors[t].is_constant:
                    live[t] = f"a{len(params)}"
                    params.append(t)
        if not params:  # nothing flows in: run the ops one by one
            return [("op",) + o for o in ops]
        g = _Source(self.model, dict(live), self.specialize)
        for op, p in ops:
            try:
                if op.kind != "ADD":  # an op's batch is its first input's (ADD's: emit_add)
                    g.line(f"n = {g.x(op, 0)}.shape[0]")
                EMITTERS[op.kind](g, op, p, self.model)
            except NotImplementedError:
                return [("op",) + o for o in ops]
        g.outputs = [t for t in sorted(produced) if t in needed_after]
        g.const_tensors = [v for kind, v, *_ in g.consts if kind == "tensor"]
        g.output_set = set(g.outputs)
        g.called = False
        g.output_index = {t: k for k, t in enumerate(g.outputs)}
        g.ops = ops
        return [["segment", None, [live[t] for t in params], g, params]]

    def consts(self, g: _Source) -> tuple:
        """The segment's constant tuple: weights by reference, fixed arrays, and arrays derived from
        the weights (packed filters, requantization tables), made again when a weight tensor's array
        is replaced or the model's ``weights_version`` moves (the trainer and ``set_parameter`` move
        it). Each array costs ~0.15 us to unbox per call, so emitters keep them few. (One byte arena
        viewed inside the segment was tried: numba's typing then failed with "name is too long" LLVM
        errors once a process had compiled a few hundred segments, e.g. the zoo's in a row.)"""
        tensors = self.model.tensors
        stamp = [self.model.weights_version]
        stamp += [id(tensors[t].data) for t in g.const_tensors]
        cached = self._consts.get(id(g))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        values = tuple(self._const_values(g))
        self._consts[id(g)] = (stamp, values)
        return values

    def _const_values(self, g: _Source) -> list:
        tensors = self.model.tensors
        made = {}
        values = []
        for kind, v, *part in g.consts:
            if kind == "tensor":
                values.append(tensors[v].data)
            elif kind == "array":
                values.append(v)
            else:
                (key, make), = (v,)
                if key not in made:
                    made[key] = make(self.model)
                values.append(made[key][part[0]])
        return values

    def _per_op(self, ops: list, values: dict) -> None:
        for op, params in ops:
            args = [values[i] if i in values else (self.model.tensors[i].data if i >= 0 else None)
                    for i in op.inputs]
            result = kernels.evaluate(op, params, args)
            if len(op.outputs) == 1:
                values[op.outputs[0]] = result
            else:
                values.update(zip(op.outputs, result))

    def _first_call(self, g: _Source) -> None:
        bound_numba_labels()  # the segment compiles now (or loads from numba's cache)
        g.called = True

    def run_outputs(self, feeds: dict[int, np.ndarray], wanted: list[int]) -> list[np.ndarray]:
        """The values of tensors ``wanted`` from ``feeds``; a plan of one segment (every fixture's)
        goes straight to it: at batch 1 the dictionaries of ``run`` cost as much as a small layer."""
        if len(self.steps) == 1 and self.steps[0][0] == "segment":
            _, fn, _, g, params = self.steps[0]
            ins = tuple([feeds[t] for t in params])
            if ins[0].shape[0] * g.total_work < SEGMENT_PARALLEL_WORK and set(wanted) <= g.output_set:
                if not g.called:
                    self._first_call(g)
                update_threads()
                outs = fn(ins, self.consts(g), 1)
                return [outs[g.output_index[t]] for t in wanted]
        values = self.run(feeds)
        return [values[t] for t in wanted]

    def run(self, feeds: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Every value the plan computes (tensor index -> array) from ``feeds``."""
        values = dict(feeds)
        update_threads()
        for step in self.steps:
            if step[0] == "op":
                self._per_op([step[1:]], values)
                continue
            _, fn, _, g, params = step
            ins = tuple([values[t] for t in params])
            # (numba.get_num_threads costs ~0.8 us: asked only when the work could use threads)
            if ins[0].shape[0] * g.total_work >= SEGMENT_PARALLEL_WORK and numba.get_num_threads() > 1:
                # work that pays for threads: the segment's ops one by one, in parallel kernels
                # (a compiled segment calling parallel kernels took minutes and GBs to compile)
                self._per_op(g.ops, values)
                continue
            # the segment's kernels are serial twins: the thread count only sizes their blocks
            if not g.called:
                self._first_call(g)
            values.update(zip(g.outputs, fn(ins, self.consts(g), 1)))
        return values


# numba's IR block labels come from one process-wide counter, and each inline="always" call moves it
# past the callee's labels after offsetting them by the counter: nested inline kernels about double
# it per compilation, and after some hundreds of kernel compilations in one process (the 14 zoo
# plans in one pytest process) labels run to hundreds of digits and LLVM refuses them ("name is too
# long"). Every inlined callee is offset above its caller's own labels, so between compilations the
# counter can safely be brought back down.
_LABELS_RESET_ABOVE = 1 << 48
_LABELS_RESET_TO = 1 << 24


def bound_numba_labels() -> None:
    """Bring numba's block-label counter back down if it has run away (see above); call only
    outside numba compilation (it takes numba's compiler lock, so no other thread is compiling)."""
    from numba.core import ir_utils
    from numba.core.compiler_lock import global_compiler_lock

    counter = ir_utils._the_max_label
    if counter._value < _LABELS_RESET_ABOVE:
        return
    with global_compiler_lock:
        counter._value = _LABELS_RESET_TO


@numba.njit(cache=True)
def pad_to_panels(a):
    """gemm.padded_params inside compiled code: int32 zeros past the last channel to whole panels."""
    n = -(-a.shape[0] // NR) * NR
    out = np.zeros(n, np.int32)
    out[:a.shape[0]] = a
    return out


__all__ = ["Plan", "bound_numba_labels", "plan_dir", "pad_to_panels"]
