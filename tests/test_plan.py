"""The compiled plan (edge_qmul/plan): the same outputs as the per-op path, bit for bit, on every
fixture and zoo model, at any batch and thread count; weights changed in place or replaced are seen;
ops without an emitter split the plan; a plan that cannot run hands over to the per-op path.

The per-op path is the reference because it is the one tests/test_fixtures.py and tests/test_zoo.py
hold equal to LiteRT's built-in kernels; the fixtures' LiteRT outputs are checked here too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numba
import numpy as np
import pytest

from conftest import litert_data
from edge_qmul import load_tflite
from edge_qmul.plan import Plan, unliteral
from edge_qmul.train import Trainer

FIXTURES = Path(__file__).parent / "fixtures"
ZOO = FIXTURES / "zoo"
# compiling a plan takes seconds per model (mobilenetv2_035's 64 ops: over a minute, cold): the
# largest fixture and the zoo are the slow tier's
MODELS = [pytest.param(p.stem, marks=pytest.mark.slow) if p.stem == "mobilenetv2_035" else p.stem
          for p in sorted(FIXTURES.glob("*.tflite"))]
ZOO_NAMES = sorted(m["name"] for m in json.loads((ZOO / "index.json").read_text()))


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    return np.resize(x, (n,) + x.shape[1:])


def _same_as_per_op(model, x: np.ndarray, interface: bool) -> Plan:
    plan = model.compiled(interface)
    assert plan is not None
    ins = model.inputs if interface else model.core_inputs
    outs = model.outputs if interface else model.core_outputs
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            for n in (1, 3, 32):
                xb = _batch(x, n)
                got = plan.run({ins[0]: xb})
                want = model.run({ins[0]: xb}, start_after_interface=not interface)
                for t in outs:
                    np.testing.assert_array_equal(got[t], want[t], err_msg=f"batch {n}, {threads} threads")
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return plan


@pytest.mark.parametrize("name", MODELS)
def test_plan_equals_per_op_and_litert_on_the_fixtures(name):
    model = load_tflite(FIXTURES / f"{name}.tflite")
    d = litert_data(FIXTURES / f"{name}.npz")
    plan = _same_as_per_op(model, d["x"], interface=True)
    assert plan.segments == 1 and len(plan.steps) == 1  # every op of the fixtures is compiled
    np.testing.assert_array_equal(plan.run({model.inputs[0]: d["x"]})[model.outputs[0]], d["y_builtin"])
    for _ in range(4):  # forward/predict switch to the plan by themselves (the third call on)
        np.testing.assert_array_equal(model.predict(d["x"]), d["y_builtin"])
    assert model._plans[True][2] is not None and model._plans[True][2] is not False


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_plan_equals_per_op_on_the_zoo(name):
    model = load_tflite(ZOO / f"{name}.tflite")
    d = litert_data(ZOO / f"{name}.npz")
    plan = _same_as_per_op(model, d["x"][:4], interface=True)
    # predict goes through the plan now that it is built (run_outputs: every output, in order)
    want = model.run({model.inputs[0]: d["x"][:4]})
    got = model.predict(d["x"][:4])
    for k, t in enumerate(model.outputs):
        np.testing.assert_array_equal(got[k] if len(model.outputs) > 1 else got, want[t])
    kinds = {op.kind for op in model.ops}
    if kinds <= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN", "RESHAPE", "SOFTMAX",
                 "AVERAGE_POOL_2D", "MAX_POOL_2D", "QUANTIZE", "DEQUANTIZE"}:
        assert plan.segments == 1 and len(plan.steps) == 1
    else:
        assert len(plan.steps) > plan.segments  # ops the plan does not compile run between segments


def test_plan_sees_weights_trained_in_place_and_replaced():
    model = load_tflite(FIXTURES / "digits_cnn.tflite")
    x = litert_data(FIXTURES / "digits_cnn.npz")["x"]
    assert model.compiled() is not None
    before = model.forward(x)
    rng = np.random.default_rng(0)
    trainer = Trainer(model, lr=0.5)
    for _ in range(3):
        trainer.step(x, rng.integers(0, 10, len(x)))
    after = model.forward(x)
    np.testing.assert_array_equal(after, model.run({model.core_inputs[0]: x},
                                                   start_after_interface=True)[model.core_outputs[0]])
    assert not np.array_equal(after, before)
    name = next(n for n in model.parameters() if n.endswith(".weight"))
    model.set_parameter(name, -model.parameters()[name])
    np.testing.assert_array_equal(model.forward(x), model.run({model.core_inputs[0]: x},
                                                              start_after_interface=True)[model.core_outputs[0]])


def test_forward_builds_the_plan_at_its_third_call(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_PLAN", "auto")
    model = load_tflite(FIXTURES / "mlp40.tflite")
    x = litert_data(FIXTURES / "mlp40.npz")["x"]
    first = model.forward(x)
    model.forward(x)
    assert model.compiled(build=False) is None
    np.testing.assert_array_equal(model.forward(x), first)
    assert model.compiled(build=False) is not None


def test_plans_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_PLAN", "off")
    model = load_tflite(FIXTURES / "mlp40.tflite")
    x = litert_data(FIXTURES / "mlp40.npz")["x"]
    for _ in range(4):
        model.forward(x)
    assert model.compiled() is None


def test_a_plan_that_fails_hands_over_to_the_per_op_path():
    model = load_tflite(FIXTURES / "mlp40.tflite")
    x = litert_data(FIXTURES / "mlp40.npz")["x"]
    want = model.forward(x)
    plan = model.compiled()

    def broken(ins, arena, threads):
        raise ValueError("simulated")
    assert plan.steps[0][0] == "segment"
    plan.steps[0][1] = broken  # the compiled segment itself fails
    with pytest.warns(UserWarning, match="compiled plan failed"):
        np.testing.assert_array_equal(model.forward(x), want)
    assert model._plans[False][2] is False  # not tried again
    np.testing.assert_array_equal(model.forward(x), want)


def test_numba_label_counter_run_away_is_brought_back_down():
    """numba's process-wide block-label counter about doubles per compilation of nested inline
    kernels; compiling the zoo's plans in one process took it to hundreds of digits and LLVM then
    refused the labels. A plan's first call brings it back down (plan.bound_numba_labels)."""
    from numba.core import ir_utils

    from edge_qmul.plan import bound_numba_labels

    counter = ir_utils._the_max_label
    counter._value = 10 ** 1200  # far past where LLVM's 1024-character names end
    bound_numba_labels()
    assert counter._value < 1 << 48

    @numba.njit(inline="always")
    def clamp(v):
        if v > 10:
            return 10
        return v

    @numba.njit
    def use(v):  # inlines a branch: at 10**1200 its block names fail LLVM's parser (checked)
        s = 0
        for i in range(v):
            s += clamp(i)
        return s

    assert use(20) == 55 + 9 * 10


def test_unliteral_types_integer_and_boolean_arguments_and_keeps_their_values():
    args = "a0, c[1], 1, -128, F(n * 2304, 60, threads), 1.5e-05, np.float32(0.25), True, c[12]"
    typed = unliteral(args)
    assert typed == ("a0, c[1], np.int64(1), -np.int64(128), F(n * np.int64(2304), np.int64(60), threads), "
                     "1.5e-05, np.float32(0.25), np.bool_(True), c[12]")
    scope = {"np": np, "a0": 7, "c": list(range(20)), "n": 3, "threads": 2, "F": lambda *a: a}
    assert eval(typed, scope) == eval(args, scope)


@pytest.mark.parametrize("name", ["digits_cnn", "mobilenet_tiny"])
def test_a_plan_with_typed_scalars_equals_per_op_and_compiles_no_literal_specialization(name, monkeypatch):
    """Above EDGE_QMUL_PLAN_SPECIALIZE weighted ops a plan passes its kernels typed scalars: one
    compilation per kernel signature, shared by every call site, instead of one per call."""
    from numba.core import types
    from edge_qmul.kernels import implicit_gemm
    from edge_qmul.plan.serial import serial

    monkeypatch.setenv("EDGE_QMUL_PLAN_SPECIALIZE", "0")
    model = load_tflite(FIXTURES / f"{name}.tflite")
    d = litert_data(FIXTURES / f"{name}.npz")
    conv = serial(implicit_gemm.conv2d_int8_implicit)
    before = set(conv.overloads)
    plan = Plan(model, interface=True)
    assert not plan.specialize
    numba.set_num_threads(1)
    try:
        for n in (1, 5):
            xb = _batch(d["x"], n)
            got, want = plan.run({model.inputs[0]: xb}), model.run({model.inputs[0]: xb})
            np.testing.assert_array_equal(got[model.outputs[0]], want[model.outputs[0]])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(plan.run({model.inputs[0]: d["x"]})[model.outputs[0]], d["y_builtin"])
    added = set(conv.overloads) - before
    assert not any(isinstance(t, types.Literal) for sig in added for t in sig), added
    monkeypatch.setenv("EDGE_QMUL_PLAN_SPECIALIZE", "16")
    assert Plan(model, interface=True).specialize


def test_a_bad_specialize_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_PLAN_SPECIALIZE", "many")
    with pytest.raises(ValueError, match="EDGE_QMUL_PLAN_SPECIALIZE='many'"):
        Plan(load_tflite(FIXTURES / "mlp40.tflite"), interface=True)
