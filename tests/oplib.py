"""Build single-op int8 Models directly (no converter) and run them in LiteRT's builtin kernels.

Used by tests/test_random_ops.py and tests/test_ops_*.py: a model is made with :class:`GraphBuilder`,
written with the project's own writer (``edge_qmul.tflite.to_bytes``) and run one sample at a time in
LiteRT with ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`` (the reference the engine must equal
bit for bit); :func:`check_random_models` runs a test's numbered random models against it.
:func:`check_ops_against_litert` feeds every op of a whole model LiteRT's own inputs to it and
compares each output with LiteRT's (the fixtures, the zoo and the aarch64 recordings).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edge_qmul.graph import Model, Op, Tensor
from edge_qmul.kernels import evaluate
from edge_qmul.quant import QuantParams
from edge_qmul.tflite import to_bytes


def qp(scale, zero_point=0, axis: int = 0) -> QuantParams:
    scale = np.asarray(scale, np.float32).reshape(-1)
    zp = np.broadcast_to(np.asarray(zero_point, np.int64).reshape(-1), scale.shape)
    return QuantParams(scale, zp, axis)


class GraphBuilder:
    """Collects tensors and ops; ``model()`` returns an edge_qmul Model of them."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.ops: list[Op] = []

    def tensor(self, name: str, shape, dtype, quant: QuantParams | None = None,
               data: np.ndarray | None = None) -> int:
        shape = tuple(int(s) for s in shape)
        if data is not None:
            data = np.require(np.asarray(data, dtype=dtype).reshape(shape), requirements="C")  # 0-d stays 0-d
        self.tensors.append(Tensor(name, shape, np.dtype(dtype), quant, data))
        return len(self.tensors) - 1

    def op(self, kind: str, inputs: list[int], outputs: list[int], **options) -> None:
        self.ops.append(Op(kind, list(inputs), list(outputs), dict(options)))

    def model(self, inputs: list[int], outputs: list[int]) -> Model:
        return Model(self.tensors, self.ops, inputs, outputs)


# --- random parameters -----------------------------------------------------------------------------

def log_uniform(rng: np.random.Generator, lo: float, hi: float, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def pot(rng: np.random.Generator, lo: int, hi: int, size=None):
    """Powers of two 2^k, k in [lo, hi]: scales whose ratios are exact, so requantization hits ties."""
    return np.float32(2.0) ** rng.integers(lo, hi + 1, size).astype(np.float32)


def random_int8(rng: np.random.Generator, shape, lo: int = -128, hi: int = 127) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


def float32_bits(a: np.ndarray) -> np.ndarray:
    """Float arrays as their bit patterns (so -0.0 != 0.0 and NaNs compare), others unchanged."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    return a


# --- LiteRT ----------------------------------------------------------------------------------------

def litert_interpreter(model_bytes: bytes | None = None, path: Path | None = None, preserve_all: bool = False):
    """LiteRT's builtin kernels (no delegates) for a model given as bytes or a path; ``preserve_all``
    keeps every intermediate tensor readable after invoke."""
    # imported here: test_litert_profiles.py uses this module on machines without ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    source = {"model_content": model_bytes} if path is None else {"model_path": str(path)}
    interp = Interpreter(**source, experimental_preserve_all_tensors=preserve_all,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    return interp


def litert_sample_tensors(interp, x: np.ndarray) -> Callable[[str], np.ndarray]:
    """Run one sample (batch 1) through ``interp`` (made with ``preserve_all``) from LiteRT's reset
    state, and return LiteRT's value of a tensor by its name."""
    index = {t["name"]: t["index"] for t in interp.get_tensor_details()}
    interp.reset_all_variables()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return lambda name: interp.get_tensor(index[name])


def check_ops_against_litert(model: Model, litert_tensor: Callable[[str], np.ndarray], label: str) -> int:
    """Feed each op of ``model`` LiteRT's own inputs to it and compare every output with LiteRT's,
    bit for bit (floats by their bit patterns). ``litert_tensor(name)`` is LiteRT's value of a
    tensor for one sample (a live interpreter or a recording); constants come from the model, and
    variable (state) tensors and absent inputs are None: LiteRT resets them per sample. Returns
    the number of outputs compared."""
    checked = 0
    for op, params in zip(model.ops, model._ensure_prepared()):
        args = []
        for i in op.inputs:
            t = model.tensors[i] if i >= 0 else None
            args.append(None if t is None or t.variable else t.data if t.is_constant else litert_tensor(t.name))
        got = evaluate(op, params, args)
        for t, g in zip(op.outputs, [got] if len(op.outputs) == 1 else list(got)):
            ref = litert_tensor(model.tensors[t].name)
            np.testing.assert_array_equal(float32_bits(np.asarray(g).reshape(ref.shape)), float32_bits(ref),
                                          err_msg=f"{label}: op {op.kind} (index {op.index}) output {t}")
            checked += 1
    return checked


def run_litert(interp, xs: list[np.ndarray]) -> np.ndarray:
    """Run ``interp`` one sample at a time (its input has batch 1) over batches ``xs``."""
    return run_litert_outputs(interp, xs)[0]


def run_litert_outputs(interp, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Every output of ``interp`` (in the model's output order) over batches ``xs``, one sample at a
    time; a model without inputs runs once. Outputs are joined along axis 0 (a batch-1 axis)."""
    ins = interp.get_input_details()
    outs = [d["index"] for d in interp.get_output_details()]
    n = xs[0].shape[0] if xs else 1
    ys: list[list[np.ndarray]] = [[] for _ in outs]
    for i in range(n):
        for d, x in zip(ins, xs):
            interp.set_tensor(d["index"], np.ascontiguousarray(x[i:i + 1]))
        interp.invoke()
        for k, t in enumerate(outs):
            y = interp.get_tensor(t).copy()
            ys[k].append(y if y.ndim else y.reshape(1))
    return [np.concatenate(y, axis=0) for y in ys]


# --- recording LiteRT's answers (under emulation: what an aarch64 board's LiteRT computes) -----------

RECORD_DIR = os.environ.get("EDGE_QMUL_LITERT_RECORD")  # set by tools/arm64.sh's recording run
_recording: dict | None = None  # the cases of the random-model loop running now


def _record_case(model_bytes: bytes, xs: list[np.ndarray], wants: list[np.ndarray]) -> None:
    if _recording is not None:
        k = len(_recording["cases"])
        case = {f"c{k}_model": np.frombuffer(model_bytes, np.uint8)}
        case.update({f"c{k}_x{j}": np.asarray(x) for j, x in enumerate(xs)})
        case.update({f"c{k}_y{j}": np.asarray(y) for j, y in enumerate(wants)})
        _recording["cases"].append(case)


def _save_recording(name: str) -> None:
    """Write the loop's recorded cases to RECORD_DIR/<test id>.npz (model bytes, inputs, LiteRT's
    outputs, case by case), which tests/test_litert_profiles.py replays on any machine."""
    test = os.environ.get("PYTEST_CURRENT_TEST", name).split(" ")[0]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in test.replace(".py::", "-"))
    arrays: dict[str, np.ndarray] = {}
    for case in _recording["cases"]:
        arrays.update(case)
    arrays["count"] = np.array(len(_recording["cases"]))
    out = Path(RECORD_DIR)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{name}.npz", **arrays)


def compare(model: Model, xs: list[np.ndarray], interp=None, got=None) -> str | None:
    """None if the engine's ``predict`` (or ``got``: one array, or a list of one per output) equals
    LiteRT bit for bit on batches ``xs``, else a message naming the output that differs."""
    if interp is None:
        model_bytes = to_bytes(model)
        interp = litert_interpreter(model_bytes)
        wants = run_litert_outputs(interp, xs)
        if got is None:  # a case the engine runs from the file alone (replayable from its bytes)
            _record_case(model_bytes, xs, wants)
    else:
        wants = run_litert_outputs(interp, xs)
    gots = model.predict(*xs) if got is None else got
    gots = list(gots) if isinstance(gots, (list, tuple)) else [gots]
    if len(gots) != len(wants):
        return f"outputs: engine {len(gots)} vs LiteRT {len(wants)}"
    for k, (want, got_k) in enumerate(zip(wants, gots)):
        msg = _compare_one(np.asarray(got_k), want, xs)
        if msg is not None:
            return msg if len(wants) == 1 else f"output {k}: {msg}"
    return None


def _compare_one(got: np.ndarray, want: np.ndarray, xs: list[np.ndarray]) -> str | None:
    if got.shape != want.shape:
        return f"shape: engine {got.shape} vs LiteRT {want.shape}"
    if got.dtype != want.dtype:
        return f"dtype: engine {got.dtype} vs LiteRT {want.dtype}"
    g, w = float32_bits(got), float32_bits(want)
    try:
        np.testing.assert_array_equal(g, w)
    except AssertionError:
        bad = np.argwhere(g != w)
        idx = tuple(int(v) for v in bad[0])
        sample = idx[0]
        ins = ", ".join(f"x{k}[{sample}] flat={np.asarray(x[sample]).reshape(-1)[:48].tolist()}"
                        for k, x in enumerate(xs))
        return (f"{len(bad)} of {g.size} elements differ; first at {list(idx)}: engine {got[idx]!r} "
                f"vs LiteRT {want[idx]!r}; {ins}")
    return None


# --- random model loops ------------------------------------------------------------------------------

def fmt_desc(desc) -> str:
    """A model's description for a failure line: ``k=v, ...`` with floats to 6 digits."""
    if not isinstance(desc, dict):
        return repr(desc)

    def f(v):
        return f"{v:.6g}" if isinstance(v, float) else repr(v)
    return ", ".join(f"{k}={f(v)}" for k, v in desc.items())


def check_random_models(name: str, make_case: Callable[[int], tuple], n: int, reproduce: str,
                        compare: Callable[..., str | None] = compare, what: str = "random models",
                        record: bool = True) -> None:
    """Run models ``make_case(i) -> (model, input batches, description)`` for i < n through
    ``compare(model, xs)`` (None when the engine equals LiteRT, else a message); a case that raises,
    building or running, is a failure too. Fails the test with ``NAME: k of N ... disagree with
    LiteRT (reproduce with REPRODUCE)`` and the first 8 failures."""
    global _recording
    pytest.importorskip("ai_edge_litert")
    failures = []
    _recording = {"cases": []} if RECORD_DIR and record else None
    for i in range(n):
        desc = {}
        try:
            model, xs, desc = make_case(i)
            msg = compare(model, xs)
        except Exception as e:  # a model LiteRT or the engine refuses is a failure too
            msg = f"{type(e).__name__}: {e}"
        if msg is not None:
            failures.append(f"  model {i}: {fmt_desc(desc)}\n    {msg}")
    if _recording is not None:
        if _recording["cases"]:  # (a loop whose cases all ran through the test's own engine path
            _save_recording(name)  # records nothing)
        _recording = None
    if failures:
        shown = "\n".join(failures[:8])
        more = f"\n  ... and {len(failures) - 8} more" if len(failures) > 8 else ""
        pytest.fail(f"{name}: {len(failures)} of {n} {what} disagree with LiteRT "
                    f"(reproduce with {reproduce}):\n{shown}{more}", pytrace=False)


SAMPLE_N = 8  # models per op in the fast tier's sample; the slow tier's sweeps run N_MODELS per op


def check_sample(make_cases: dict[str, Callable[[int], tuple]], reproduce: str,
                 compare: Callable[..., str | None] = compare) -> None:
    """The fast tier's share of a sweep: the first SAMPLE_N models of every op in ``make_cases``
    (op name -> make_case), the same models the slow tier's sweep starts with; never recorded."""
    for name, make_case in make_cases.items():
        check_random_models(name, make_case, SAMPLE_N, reproduce.format(name=name), compare, record=False)
