"""The int8 activations (kernels/activation.py) against LiteRT's builtin kernels, bit for bit, and
their STE backward against the float64 reference (tests/ref_activation.py).

Random single-op models (ranks 1-4, log-uniform or power-of-two scales, every zero point) are
written with the project's writer and run in LiteRT one sample at a time (tests/oplib.py); every
op also gets models whose input holds all 256 int8 values, so each table entry is checked.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from edge_qmul import kernels
from edge_qmul.errors import ModelError
from edge_qmul.grad import Error, clamp_mask, from_float
from edge_qmul.kernels.contract import Backward
from oplib import GraphBuilder, check_random_models, check_sample, compare, log_uniform, pot, qp, random_int8

import ref_activation

SEED = 20240923
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
KINDS = ref_activation.KINDS
I8 = np.int8


def _scale(rng, tie: bool, lo: float, hi: float) -> float:
    if tie:
        return float(pot(rng, int(np.floor(np.log2(lo))), int(np.ceil(np.log2(hi)))))
    return float(log_uniform(rng, lo, hi))


def _shape(rng) -> tuple:
    rank = int(rng.integers(1, 5))
    return (1,) + tuple(int(v) for v in rng.integers(1, 9, size=rank - 1))


def _quant(rng, kind: str):
    """(s_in, zp_in, s_out, zp_out, options) for one random model of ``kind``."""
    tie = bool(rng.random() < 0.4)
    zp_in, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    options = {}
    if kind in ("LOGISTIC", "TANH"):
        s_in = _scale(rng, tie, 1e-3, 0.5)
        if kind == "LOGISTIC":  # LiteRT requires the scale 1/256 exactly, any zero point
            s_out, zp_out = 1 / 256, (-128 if rng.random() < 0.7 else zp_out)
        else:  # LiteRT's LUT path accepts any output quantization
            s_out, zp_out = (1 / 128, 0) if rng.random() < 0.7 else (_scale(rng, tie, 1e-3, 0.1), zp_out)
        return s_in, zp_in, s_out, zp_out, options
    s_in = _scale(rng, tie, 1e-3, 1.0)
    # output scale near the input scale (HARD_SWISH needs s_out > s_in / 128)
    s_out = s_in * (float(pot(rng, -2, 3)) if tie else float(log_uniform(rng, 0.1, 8.0)))
    if kind == "LEAKY_RELU":
        r = rng.random()
        alpha = (float(rng.integers(-4, 17)) / 8 if tie else
                 float(rng.uniform(0.0, 1.0)) if r < 0.7 else float(rng.uniform(-2.0, 4.0)))
        options["alpha"] = alpha
    return s_in, zp_in, s_out, zp_out, options


def single_op(kind: str, shape: tuple, s_in, zp_in, s_out, zp_out, options):
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s_in, zp_in))
    y = g.tensor("y", shape, I8, qp(s_out, zp_out))
    g.op(kind, [x], [y], **options)
    return g.model([x], [y])


def model_case(kind: str, i: int):
    """Model ``i`` of ``kind``: (Model, [input batch], description), reproducibly."""
    rng = np.random.default_rng([SEED, zlib.crc32(kind.encode()), i])
    shape = _shape(rng)
    s_in, zp_in, s_out, zp_out, options = _quant(rng, kind)
    model = single_op(kind, shape, s_in, zp_in, s_out, zp_out, options)
    near = np.clip(zp_in + rng.integers(-8, 9, size=shape), -128, 127).astype(I8)
    xs = np.concatenate([random_int8(rng, shape), random_int8(rng, shape), near])
    desc = dict(shape=shape, s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out, **options)
    return model, [xs], desc


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_random_activation_models_match_litert(kind):
    check_random_models(kind, lambda i: model_case(kind, i), N_MODELS,
                        f"tests/test_ops_activation.model_case({kind!r}, i)")


def test_random_activation_models_sample():
    """The fast tier's sample of the sweep above: the first models of every activation."""
    check_sample({kind: (lambda i, kind=kind: model_case(kind, i)) for kind in KINDS},
                 "tests/test_ops_activation.model_case({name!r}, i)")


ALL_VALUES = np.arange(-128, 128, dtype=np.int16).astype(I8).reshape(1, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_every_int8_value_matches_litert(kind):
    """Models whose input is all 256 int8 values: every table entry against LiteRT."""
    def case(i):
        q = _quant(np.random.default_rng([SEED, zlib.crc32(kind.encode()), 10**6 + i]), kind)
        return single_op(kind, (1, 256), *q), [ALL_VALUES], q

    check_random_models(kind, case, max(4, N_MODELS // 10),
                        f"tests/test_ops_activation.py: _quant(default_rng([SEED, crc32({kind!r}), 10**6 + i]), {kind!r})",
                        what="all-256-value models")


# Scales whose multiplier differs when s_in / s_out (and s_in * alpha / s_out) is taken in float32
# (as activations.cc does: float operands) rather than in double; rare among random scales.
FLOAT32_QUOTIENT_CASES = [
    ("RELU", 0.4771014153957367, -77, 0.5330992341041565, -106, {}),
    ("RELU", 0.09258025884628296, 90, 0.055596500635147095, 79, {}),
    ("RELU6", 0.0032391701824963093, -125, 0.007576744072139263, -1, {}),
    ("LEAKY_RELU", 0.014561287127435207, -83, 0.05161082372069359, -58, {"alpha": 0.7061082124710083}),
    ("LEAKY_RELU", 0.021065110340714455, 31, 0.02628469653427601, -1, {"alpha": 0.6475239992141724}),
]


@pytest.mark.parametrize("case", FLOAT32_QUOTIENT_CASES, ids=lambda c: c[0])
def test_float32_multiplier_quotients_match_litert(case):
    pytest.importorskip("ai_edge_litert")
    kind, *q = case
    assert compare(single_op(kind, (1, 256), *q), [ALL_VALUES]) is None


# --- prepare checks -------------------------------------------------------------------------------

def test_logistic_requires_output_scale_one_over_256():
    with pytest.raises(ModelError, match=r"op LOGISTIC \(index 0\).*1/256"):
        single_op("LOGISTIC", (1, 4), 0.1, 0, 1 / 128, -128, {})


def test_rejects_float_and_per_channel_tensors():
    g = GraphBuilder()
    x = g.tensor("x", (1, 4), np.float32)
    y = g.tensor("y", (1, 4), np.float32)
    g.op("TANH", [x], [y])
    with pytest.raises(ModelError, match=r"op TANH \(index 0\).*float32"):
        g.model([x], [y])  # the Model prepares every op
    g = GraphBuilder()
    x = g.tensor("x", (1, 2), I8, qp([0.1, 0.2], [0, 0], axis=1))
    y = g.tensor("y", (1, 2), I8, qp(0.1, 0))
    g.op("RELU", [x], [y])
    with pytest.raises(ModelError, match=r"op RELU \(index 0\).*per tensor"):
        g.model([x], [y])


def test_hard_swish_rejects_output_scale_below_input_over_128():
    with pytest.raises(ModelError, match=r"op HARD_SWISH \(index 0\).*s_in / 128"):
        single_op("HARD_SWISH", (1, 4), 1.0, 0, 1 / 256, 0, {})


def test_fixed_output_quantization():
    k = kernels.KERNELS
    for kind, (s, zp) in (("LOGISTIC", (1 / 256, -128)), ("TANH", (1 / 128, 0))):
        m = single_op(kind, (1, 4), 0.05, 0, s, zp, {})
        assert k[kind].output_quant == "fixed"
        q = k[kind].fixed_quant(m.ops[0], m)
        assert (q.s, q.zp) == (np.float32(s), zp)
    for kind in ("HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU"):
        assert k[kind].output_quant == "computed"


# --- backward ------------------------------------------------------------------------------------

def _dequantize(q, s, zp):
    return float(s) * (np.asarray(q, np.float64) - zp)


def engine_backward(model, x: np.ndarray, g: np.ndarray):
    """(masked float gradient the op receives, engine input error as float)."""
    op = model.ops[0]
    params = kernels.prepare(op, model)
    kernel = kernels.KERNELS[op.kind]
    y = kernel.forward(params, x)
    err = from_float(g)
    lo, hi = kernel.clamp(params)
    err = Error(clamp_mask(err.values.copy(), y, lo, hi), err.scale)
    ctx = Backward(op, model, [x], [y], [err], [True])
    (gx,) = kernel.backward(params, ctx)
    assert gx.values.dtype == np.int16 and gx.values.shape == x.shape
    return err.real(), gx.real()


def reference_backward(model, x: np.ndarray, g_masked: np.ndarray) -> np.ndarray:
    op = model.ops[0]
    q = model.tensors[op.inputs[0]].quant
    xs = [_dequantize(x, q.s, q.zp)]
    ys = ref_activation.forward(model, op, xs)
    return ref_activation.backward(model, op, xs, ys, [g_masked])[0]


def _cos(a, b) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_float64_reference(kind):
    got, want = [], []
    for i in range(100):
        model, xs, _ = model_case(kind, i)
        rng = np.random.default_rng([SEED, 7, i])
        g = rng.standard_normal(xs[0].shape) * float(log_uniform(rng, 1e-4, 1e2))
        g_masked, gx = engine_backward(model, xs[0], g)
        got.append(gx.reshape(-1))
        want.append(reference_backward(model, xs[0], g_masked).reshape(-1))
    cos = _cos(np.concatenate(got), np.concatenate(want))
    assert cos >= 0.99, f"{kind}: cosine {cos:.5f} between engine and float64 input gradients"


def test_backward_exact_leaky_relu_case():
    """alpha 1/4, s_in 1/2: d = [1/4, 1] in Q14 (4096, 16384); g = [1000, -1000] * 2^-10.

    acc = [4096000, -16384000]; the int16 rounding shifts right by 9: [8000, -32000], scale
    2^-10 * 2^-14 * 2^9 = 2^-15, i.e. real [0.244140625, -0.9765625] = [0.25, 1] * g.
    """
    model = single_op("LEAKY_RELU", (1, 2), 0.5, 0, 0.5, 0, {"alpha": 0.25})
    op = model.ops[0]
    params = kernels.prepare(op, model)
    x = np.array([[-4, 2]], I8)
    y = kernels.KERNELS["LEAKY_RELU"].forward(params, x)
    assert y.tolist() == [[-1, 2]]
    err = Error(np.array([[1000, -1000]], np.int16), 2.0**-10)
    (gx,) = kernels.KERNELS["LEAKY_RELU"].backward(params, Backward(op, model, [x], [y], [err], [True]))
    assert params.bits == 14 and params.deriv[-4 + 128] == 4096 and params.deriv[2 + 128] == 16384
    assert gx.values.tolist() == [[8000, -32000]] and gx.scale == 2.0**-15
    assert gx.real().tolist() == [[0.244140625, -0.9765625]]


def test_backward_exact_logistic_at_zero():
    """sigma'(0) = 1/4 in Q16 (16384): an error of 2^-10 * 4 at x = zp comes back as 2^-10."""
    model = single_op("LOGISTIC", (1, 1), 0.1, 5, 1 / 256, -128, {})
    op = model.ops[0]
    params = kernels.prepare(op, model)
    x = np.array([[5]], I8)
    y = kernels.KERNELS["LOGISTIC"].forward(params, x)
    assert y.tolist() == [[0]]  # sigma(0) = 1/2 = 128 / 256 on zero point -128
    err = Error(np.array([[4]], np.int16), 2.0**-10)
    (gx,) = kernels.KERNELS["LOGISTIC"].backward(params, Backward(op, model, [x], [y], [err], [True]))
    assert params.bits == 16 and params.deriv[5 + 128] == 16384
    assert gx.real().tolist() == [[2.0**-10]]


def test_backward_not_wanted_and_no_error():
    model = single_op("TANH", (1, 3), 0.05, 0, 1 / 128, 0, {})
    op = model.ops[0]
    k = kernels.KERNELS["TANH"]
    params = kernels.prepare(op, model)
    x = np.array([[-3, 0, 3]], I8)
    y = k.forward(params, x)
    assert k.backward(params, Backward(op, model, [x], [y], [None], [False])) == [None]
    (gx,) = k.backward(params, Backward(op, model, [x], [y], [None], [True]))
    assert not gx.values.any()
