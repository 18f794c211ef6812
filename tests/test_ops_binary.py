"""MUL and SUB: random single-op models bit-exact with LiteRT, and the STE backward against float64.

The generators cover same shapes, every broadcast LiteRT distinguishes (scalar, per-channel
constant, rows and columns, both inputs broadcast, shapes that fold into the five-fold pattern and
shapes that do not), ranks 2 to 6, a constant operand of full or lower rank, either operand order,
fused activations, power-of-two scales (exact ties) and general ones, and MUL output scales small
enough to saturate (where LiteRT's vector and scalar loops part).
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import ref_binary
from edge_qmul import grad
from edge_qmul.errors import ModelError
from edge_qmul.kernels import KERNELS, Backward
from edge_qmul.quant import dequantize
from oplib import GraphBuilder, check_random_models, check_sample, fmt_desc, log_uniform, qp, random_int8
from test_random_ops import ACTIVATIONS, _inputs, _scale, _snap

SEED = 20240612
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
I8 = np.int8
PATTERNS = ("same", "same_const", "bcast_input", "bcast_const", "low_rank_const", "scalar",
            "per_channel", "row", "column", "both", "generic")


def _shapes(rng, pattern: str):
    """(full shape, shape of the other operand, other is constant, operand a's shape)."""
    ranks = {"row": [2, 3, 4], "column": [2, 3, 4], "both": [3, 4, 5], "generic": [4, 5, 6]}.get(
        pattern, [2, 3, 4, 4, 4, 5, 6])
    rank = int(rng.choice(ranks))
    full = (1,) + tuple(int(v) for v in rng.integers(1, 8 if rank < 5 else 4, rank - 1))
    if rng.random() < 0.4:  # a last axis with a 16-wide vector part and a tail
        full = full[:-1] + (int(rng.integers(1, 40)),)
    shape_a = full
    const = pattern.endswith("const") or pattern in ("scalar", "per_channel")
    if pattern in ("same", "same_const"):
        other = full
    elif pattern in ("bcast_input", "bcast_const", "low_rank_const"):
        keep = rng.random(rank - 1) < 0.5
        other = (1,) + tuple(d if k else 1 for d, k in zip(full[1:], keep))
        if pattern == "low_rank_const":
            other = other[int(rng.integers(1, rank)):]
    elif pattern == "scalar":
        # (rank 0 is left out: the writer's np.ascontiguousarray makes a 0-d constant 1-d)
        other = [(1,), (1,) * rank][int(rng.integers(2))]
    elif pattern == "per_channel":
        other = (full[-1],) if rng.random() < 0.5 else (1,) * (rank - 1) + (full[-1],)
    elif pattern == "row":  # (1, ..., 1, W) against (1, ..., H, W)
        other = (1,) * (rank - 1) + (full[-1],)
        const = rng.random() < 0.5
    elif pattern == "column":  # (1, ..., H, 1)
        other = full[:-1] + (1,)
        const = rng.random() < 0.5
    elif pattern == "generic":  # ones alternating between the inputs: no five-fold pattern
        full = (1,) + tuple(max(d, 2) for d in full[1:])
        shape_a = tuple(1 if k in (rank - 2, rank - 4) else d for k, d in enumerate(full))
        other = tuple(1 if k in (rank - 1, rank - 3) else d for k, d in enumerate(full))
        const = rng.random() < 0.3
    else:  # "both": each input broadcast along an axis the other has
        full = full[:-2] + (max(full[-2], 2), max(full[-1], 2))
        shape_a, other = full[:-1] + (1,), full[:-2] + (1, full[-1])
        const = rng.random() < 0.3
    return full, tuple(other), const, shape_a


def gen_binary(rng, kind: str):
    tie = rng.random() < 0.4
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    full, shape_b, const, shape_a = _shapes(rng, pattern)
    s1, s2 = _scale(rng, tie, 1e-3, 1.0), _scale(rng, tie, 1e-3, 1.0)
    saturate = False
    if kind == "MUL":
        # products of offsets reach 255^2; typical ones ~74^2: put those around +-60 (x 1/4..4)
        s_out = s1 * s2 * 74 * 74 / 60 * float(log_uniform(rng, 0.25, 4.0))
        saturate = rng.random() < 0.1
        if saturate:  # rescaled products beyond int16: the vector bodies saturate and wrap
            s_out *= float(log_uniform(rng, 1e-4, 1e-2))
    else:
        s_out = max(s1, s2) * float(log_uniform(rng, 0.5, 4.0))
    s_out = _snap(s_out, tie)
    zp1, zp2, zp_out = (int(v) for v in rng.integers(-128, 128, 3))
    act = ACTIVATIONS[rng.integers(3)]
    swap = rng.random() < 0.5
    g = GraphBuilder()
    a = g.tensor("a", shape_a, I8, qp(s1, zp1))
    b = g.tensor("b", shape_b, I8, qp(s2, zp2), random_int8(rng, shape_b) if const else None)
    y = g.tensor("y", full, I8, qp(s_out, zp_out))
    g.op(kind, [b, a] if swap else [a, b], [y], activation=act)
    xs = [_inputs(rng, shape_a, zp1)]
    inputs = [a]
    if not const:
        inputs.append(b)
        xs.append(_inputs(rng, shape_b, zp2))
    desc = dict(pattern=pattern, shape_a=shape_a, shape_b=shape_b, const=const, swap=swap, act=act,
                tie=tie, saturate=saturate, s1=s1, zp1=zp1, s2=s2, zp2=zp2, s_out=s_out, zp_out=zp_out)
    return g.model(inputs, [y]), xs, desc


def model_case(kind: str, i: int):
    rng = np.random.default_rng([SEED, zlib.crc32(kind.encode()), i])
    return gen_binary(rng, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["MUL", "SUB"])
def test_random_binary_models_match_litert(kind):
    check_random_models(kind, lambda i: model_case(kind, i), N_MODELS,
                        f"tests/test_ops_binary.model_case({kind!r}, i)")


def test_random_binary_models_sample():
    """The fast tier's sample of the sweep above: the first models of MUL and SUB."""
    check_sample({kind: (lambda i, kind=kind: model_case(kind, i)) for kind in ("MUL", "SUB")},
                 "tests/test_ops_binary.model_case({name!r}, i)")


# --- backward ---------------------------------------------------------------------------------------

def _engine_backward(model, xs_int, g_real):
    """The kernel's backward on a hand-built context: (per-slot Errors, masked real output gradient)."""
    op = model.ops[0]
    params = KERNELS[op.kind].prepare(op, model)
    slots = [xs_int[t] if t in xs_int else model.tensors[t].data for t in op.inputs]
    y = KERNELS[op.kind].forward(params, *slots)
    lo, hi = KERNELS[op.kind].clamp(params)
    err = grad.from_float(g_real)
    grad.clamp_mask(err.values, y, lo, hi)
    ctx = Backward(op, model, slots, [y], [err], [True, True])
    return KERNELS[op.kind].backward(params, ctx), err.real()


def _cosine(u, v):
    u, v = np.ravel(u), np.ravel(v)
    den = np.linalg.norm(u) * np.linalg.norm(v)
    return 1.0 if den == 0 and np.linalg.norm(u - v) == 0 else float(u @ v / den) if den else 0.0


def _real_slots(model, op, xs_int):
    return [dequantize(xs_int[t] if t in xs_int else model.tensors[t].data,
                       model.tensors[t].quant).astype(np.float64) for t in op.inputs]


COSINES: dict = {}


@pytest.mark.parametrize("kind", ["MUL", "SUB"])
def test_backward_matches_float64_reference(kind):
    rng = np.random.default_rng([SEED, 7, zlib.crc32(kind.encode())])
    worst = [1.0, 1.0]
    for i in range(60):
        model, xs, desc = model_case(kind, i)
        op = model.ops[0]
        xs_int = dict(zip(model.inputs, xs))
        n = xs[0].shape[0]
        g = rng.standard_normal((n,) + tuple(model.tensors[op.outputs[0]].shape[1:]))
        errors, g_masked = _engine_backward(model, xs_int, g)
        real = _real_slots(model, op, xs_int)
        (y_ref,) = ref_binary.forward(model, op, real)
        want = ref_binary.backward(model, op, real, [y_ref], [g_masked])
        for slot in (0, 1):
            got = errors[slot].real()  # constants too (wants is all True): summed over the batch
            assert got.shape == want[slot].shape, (i, slot, got.shape, want[slot].shape)
            if np.abs(want[slot]).max() == 0:
                continue
            c = _cosine(got, want[slot])
            worst[slot] = min(worst[slot], c)
            assert c >= 0.99, f"{kind} model {i} slot {slot}: cosine {c:.4f} ({fmt_desc(desc)})"
            # the cosine ignores the error's scale: the norms must agree as well
            ratio = np.linalg.norm(got) / np.linalg.norm(want[slot])
            assert abs(ratio - 1) < 0.01, f"{kind} model {i} slot {slot}: norm ratio {ratio:.4f}"
    COSINES[kind] = worst
    print(f"{kind}: worst gradient cosine per input slot {worst}")


def test_mul_backward_by_hand():
    """One case worked by hand: a (1, 2) activation times a per-channel constant (2,)."""
    g = GraphBuilder()
    a = g.tensor("a", (1, 2), I8, qp(0.5, 1))
    c = g.tensor("c", (2,), I8, qp(0.25, -2), np.array([6, -2], I8))  # real [2.0, 0.0]
    y = g.tensor("y", (1, 2), I8, qp(1.0, 0))
    g.op("MUL", [a, c], [y], activation="NONE")
    model = g.model([a], [y])
    x = np.array([[5, -3], [1, 9]], I8)  # real a: [[2, -2], [0, 4]]
    errors, gm = _engine_backward(model, {a: x}, np.array([[1.0, 2.0], [3.0, -1.0]]))
    # d a = g * real(c) = [[2, 0], [6, 0]]; d c = sum_n g * real(a) = [1*2 + 3*0, 2*(-2) + (-1)*4]
    np.testing.assert_allclose(errors[0].real(), [[2.0, 0.0], [6.0, 0.0]], rtol=1e-3)
    np.testing.assert_allclose(errors[1].real(), [2.0, -8.0], rtol=1e-3)
    want = ref_binary.backward(model, model.ops[0], _real_slots(model, model.ops[0], {a: x}), None, [gm])
    np.testing.assert_allclose(want[1], [2.0, -8.0], rtol=1e-3)


def test_sub_backward_by_hand():
    """SUB: +g to input 0, -g summed over the broadcast (and batch) axes to a (1, 1) input 1."""
    g = GraphBuilder()
    a = g.tensor("a", (1, 3), I8, qp(0.5, 0))
    b = g.tensor("b", (1, 1), I8, qp(0.5, 0))
    y = g.tensor("y", (1, 3), I8, qp(0.5, 0))
    g.op("SUB", [a, b], [y], activation="NONE")
    model = g.model([a, b], [y])
    xa, xb = np.array([[1, 2, 3], [4, 5, 6]], I8), np.array([[1], [2]], I8)
    gr = np.array([[1.0, 2.0, 4.0], [-1.0, 0.5, 0.25]])
    errors, _ = _engine_backward(model, {a: xa, b: xb}, gr)
    np.testing.assert_allclose(errors[0].real(), gr, atol=1e-3)
    np.testing.assert_allclose(errors[1].real(), [[-7.0], [0.25]], atol=1e-3)


def test_prepare_rejects_bad_models():
    g = GraphBuilder()
    a = g.tensor("a", (1, 3, 4), I8, qp(0.5, 0))
    b = g.tensor("b", (1, 3, 5), I8, qp(0.5, 0))
    y = g.tensor("y", (1, 3, 4), I8, qp(0.5, 0))
    g.op("MUL", [a, b], [y])
    with pytest.raises(ModelError, match=r"MUL \(index 0\): shapes"):
        g.model([a, b], [y])  # the Model prepares its ops
    g = GraphBuilder()
    a = g.tensor("a", (1, 4), I8, qp(0.5, 0))
    b = g.tensor("b", (1, 4), np.float32)
    y = g.tensor("y", (1, 4), I8, qp(0.5, 0))
    g.op("SUB", [a, b], [y])
    with pytest.raises(ModelError, match=r"SUB \(index 0\): input 1"):
        g.model([a, b], [y])
