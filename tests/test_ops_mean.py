"""MEAN over any non-batch axes of ranks 2-5: random single-op int8 models equal LiteRT's builtin
kernel bit for bit (every axes subset, keep_dims both ways, axes negative / repeated / scalar,
equal and different in/out quantization, power-of-two scales and counts for exact ties), the Conv1D
fixture's MEAN over time, and the backward (error broadcast, 1/count in the scale).
"""
from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

import test_train
from oplib import GraphBuilder, check_random_models, check_sample, compare, log_uniform, pot, qp, random_int8

from edge_qmul import grad as G
from edge_qmul.errors import ModelError
from edge_qmul.graph import Model
from edge_qmul.kernels import mean, unsupported_ops
from edge_qmul.kernels.contract import Backward
from edge_qmul.quant import quantize
from edge_qmul.tflite.reader import _parse
from conftest import litert_data  # noqa: E402

SEED = 20240908
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
I8, I32 = np.int8, np.int32
ZOO = Path(__file__).parent / "fixtures" / "zoo"

# (rank, reduced axes, keep_dims): every non-empty subset of the non-batch axes of ranks 2-5
COMBOS = [(rank, axes, keep) for rank in range(2, 6)
          for k in range(1, rank) for axes in itertools.combinations(range(1, rank), k)
          for keep in (False, True)]


def gen_mean(rng, i: int):
    rank, axes, keep = COMBOS[i % len(COMBOS)]
    if i % 10 == 9:  # global average pooling more often: keep_dims=True takes LiteRT's other kernel
        rank, axes, keep = 4, (1, 2), (i // 10) % 2 == 0
    tie = rng.random() < 0.4
    budget = {2: 64, 3: 24, 4: 12, 5: 6}[rank]
    dims = [int(rng.integers(1, budget + 1)) for _ in range(rank - 1)]
    if tie:  # power-of-two counts: the mean lands on .5 ties
        dims = [int(rng.choice([1, 2, 4, 8])) if a + 1 in axes else d for a, d in enumerate(dims)]
    if rank == 4 and rng.random() < 0.3:
        dims[2] = int(rng.integers(16, 40))  # channels past one 16-lane vector (the keep_dims path)
    shape = (1, *dims)
    # the axes as a file may spell them: negative, repeated, shuffled, or one scalar
    spelled = [a - rank if rng.random() < 0.3 else a for a in axes]
    if rng.random() < 0.2:
        spelled.append(spelled[0])
    spelled = [int(v) for v in rng.permutation(spelled)]
    scalar = False  # a 0-d axes tensor: LiteRT reads it the same, but the writer cannot write one yet
    s_in, zp_in = (float(pot(rng, -10, 0)) if tie else float(log_uniform(rng, 1e-3, 1.0))), int(rng.integers(-128, 128))
    s_out = s_in * float(log_uniform(rng, 0.25, 4.0))
    s_out = float(2.0 ** np.round(np.log2(s_out))) if tie else s_out
    zp_out = int(rng.integers(-128, 128))
    if rng.random() < 0.2:
        s_out, zp_out = s_in, zp_in
    out_shape = tuple(1 if a in axes else d for a, d in enumerate(shape)) if keep else \
        tuple(d for a, d in enumerate(shape) if a not in axes)
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s_in, zp_in))
    ax = g.tensor("axes", () if scalar else (len(spelled),), I32, None, np.array(spelled, np.int32))
    y = g.tensor("y", out_shape, I8, qp(s_out, zp_out))
    g.op("MEAN", [x, ax], [y], keep_dims=keep)
    xs = np.concatenate([random_int8(rng, (2,) + shape[1:]),
                         np.clip(zp_in + rng.integers(-6, 7, shape), -128, 127).astype(I8)])
    desc = dict(in_shape=shape, axes=spelled if not scalar else spelled[0], keep_dims=keep, tie=tie,
                s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [xs], desc


def model_case(i: int):
    rng = np.random.default_rng([SEED, zlib.crc32(b"MEAN"), i])
    return gen_mean(rng, i)


@pytest.mark.slow
def test_random_mean_models_match_litert():
    check_random_models("MEAN", model_case, N_MODELS, "tests/test_ops_mean.model_case(i)")


def test_random_mean_models_sample():
    """The fast tier's sample of the sweep above."""
    check_sample({"MEAN": model_case}, "tests/test_ops_mean.model_case(i)")


def test_conv1d_fixture_mean_over_time_matches_litert():
    """The Keras Conv1D model's MEAN: rank 3 (N, T, C), axis 1 given as a scalar, keep_dims False."""
    pytest.importorskip("ai_edge_litert")
    tensors, ops, *_ = _parse((ZOO / "conv1d_har_floatio.tflite").read_bytes())
    op = next(o for o in ops if o.kind == "MEAN")
    xt, at, yt = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    assert len(xt.shape) == 3 and np.asarray(at.data).reshape(-1).tolist() == [1]
    g = GraphBuilder()
    x = g.tensor("x", xt.shape, I8, xt.quant)
    # the file's axis is a 0-d tensor; written as shape (1,) (the writer's np.ascontiguousarray
    # turns 0-d data into 1-d); the engine reads both alike (test_mean_scalar_axis_is_one_axis)
    ax = g.tensor("axes", (1,), I32, None, np.asarray(at.data).reshape(1))
    y = g.tensor("y", yt.shape, I8, yt.quant)
    g.op("MEAN", [x, ax], [y], **op.options)
    rng = np.random.default_rng(3)
    xs = random_int8(rng, (16,) + tuple(xt.shape[1:]))
    assert compare(g.model([x], [y]), [xs]) is None


def test_conv1d_fixture_whole_model_matches_litert_when_supported():
    model = Model(*_parse((ZOO / "conv1d_har_floatio.tflite").read_bytes()))
    missing = unsupported_ops(model)
    if missing:
        pytest.skip(f"other ops of the model are not supported yet: {dict(missing)}")
    data = litert_data(ZOO / "conv1d_har_floatio.npz")
    np.testing.assert_array_equal(np.asarray(model.predict(data["x"])).view(np.uint32),
                                  data["y_builtin"].view(np.uint32))


def test_mean_scalar_axis_is_one_axis():
    model = Model(*_parse((ZOO / "conv1d_har_floatio.tflite").read_bytes()))
    op = next(o for o in model.ops if o.kind == "MEAN")
    assert model.tensors[op.inputs[1]].shape == ()
    p = mean.prepare(op, model)
    x = random_int8(np.random.default_rng(4), (5,) + tuple(model.tensors[op.inputs[0]].shape[1:]))
    model.tensors[op.inputs[1]].data = np.array([1], np.int32)
    model.tensors[op.inputs[1]].shape = (1,)
    np.testing.assert_array_equal(mean.forward(p, x), mean.forward(mean.prepare(op, model), x))


def test_mean_refuses_the_batch_axis_and_bad_axes():
    for axes in ([0, 1], [-3], [3]):
        g = GraphBuilder()
        x = g.tensor("x", (1, 4, 5), I8, qp(0.1, 0))
        ax = g.tensor("axes", (len(axes),), I32, None, np.array(axes, np.int32))
        y = g.tensor("y", (1, 5), I8, qp(0.1, 0))
        g.op("MEAN", [x, ax], [y], keep_dims=False)
        with pytest.raises(ModelError, match=r"MEAN \(index 0\)"):
            m = g.model([x], [y])
            mean.prepare(m.ops[0], m)


def _cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else float(np.allclose(a, b))


def test_mean_backward_broadcasts_the_error():
    """Against the float64 Jacobian (reference.py's MEAN: dy/dx = 1/count on every averaged cell)."""
    for i in range(len(COMBOS)):
        model, (x,), desc = model_case(i)
        op = model.ops[0]
        p = mean.prepare(op, model)
        y = mean.forward(p, x)
        rng = np.random.default_rng(i)
        err = G.from_float(rng.standard_normal(y.shape))
        ctx = Backward(op=op, model=model, inputs=[x, model.tensors[op.inputs[1]].data], outputs=[y],
                       errors=[err], wants=[True, False])
        gx, none = mean.KERNELS["MEAN"].backward(p, ctx)
        assert none is None and gx.values.dtype == np.int16 and gx.values.shape == x.shape
        axes = tuple(sorted({a % x.ndim for a in np.atleast_1d(desc["axes"])}))
        kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
        want = np.broadcast_to(err.real().reshape(kept), x.shape) / np.prod([x.shape[a] for a in axes])
        assert _cosine(gx.real(), want) >= 0.99, (i, desc)
        np.testing.assert_allclose(gx.real(), want, rtol=1e-12, atol=0)
        ctx.wants = [False, False]
        assert mean.KERNELS["MEAN"].backward(p, ctx) == [None, None]


def test_conv1d_fixture_gradients_through_mean_match_reference():
    """The trainer's integer gradients of the Conv1D model (MEAN over time on the path) against
    the float64 reference."""
    model = Model(*_parse((ZOO / "conv1d_har_floatio.tflite").read_bytes()))
    if unsupported_ops(model):
        pytest.skip(f"other ops of the model are not supported yet: {dict(unsupported_ops(model))}")
    x8 = quantize(np.load(ZOO / "conv1d_har_floatio.npz")["x"][:8], model.tensors[model.core_inputs[0]].quant)
    assert test_train.check_gradients(model, x8, np.random.default_rng(0).integers(0, 2, 8)) > 0
