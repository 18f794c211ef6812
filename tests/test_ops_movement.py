"""Data-movement ops (kernels/movement/): forward bit-exact with LiteRT, backward against the
float64 reference (tests/ref_movement.py), the vector option round trip and the batch-moving pair of
Keras' unrolled LSTM (the zoo model lstm_unrolled op by op: test_ops_movement_zoo.py).

Random single-op models come from ``default_rng([SEED, op, index])`` (reproduce one with
``model_case(name, i)``); N_MODELS per op, EDGE_QMUL_RANDOM_OPS_N lowers it.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

import ref_movement  # noqa: E402
from oplib import GraphBuilder, check_random_models, check_sample, compare, litert_interpreter, log_uniform, qp  # noqa: E402

from edge_qmul.errors import ModelError  # noqa: E402
from edge_qmul.grad import Error  # noqa: E402
from edge_qmul.graph import Model  # noqa: E402
from edge_qmul.kernels import KERNELS, Backward, evaluate  # noqa: E402
from edge_qmul.kernels import prepare as prepare_op  # noqa: E402
from edge_qmul.kernels.movement import _axis_range, _strided_slice_spec  # noqa: E402
from edge_qmul.tflite import to_bytes  # noqa: E402
from edge_qmul.tflite.reader import _parse, load_tflite  # noqa: E402

SEED = 20250301
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
SAMPLES = 3
I8, I32, I64, F32 = np.int8, np.int32, np.int64, np.float32


# --- helpers -------------------------------------------------------------------------------------

def _dtype(rng, others: float = 0.2):
    """int8 with a random quantization, or (sometimes) int32 / float32 without one."""
    r = rng.random()
    if r < others / 2:
        return I32, None
    if r < others:
        return F32, None
    return I8, qp(float(log_uniform(rng, 1e-3, 1.0)), int(rng.integers(-128, 128)))


def _values(rng, shape, dtype, k: int = SAMPLES) -> np.ndarray:
    """A batch of ``k`` samples of a batch-1 ``shape``."""
    full = (k,) + tuple(shape[1:])
    if dtype == I8:
        return rng.integers(-128, 128, full).astype(I8)
    if dtype == I32:
        return rng.integers(-2**31, 2**31, full, dtype=np.int64).astype(I32)
    return rng.standard_normal(full).astype(F32)


def _shape(rng, rank: int, hi: int = 5) -> tuple:
    return (1,) + tuple(int(v) for v in rng.integers(1, hi + 1, rank - 1))


def _axis_spec(rng, axis: int, rank: int) -> int:
    """``axis`` as the file writes it: positive, or sometimes its negative alias."""
    return axis - rank if rng.random() < 0.3 else axis


def _ints(g, name, values, dtype=I32, scalar=False):
    v = np.asarray(values, dtype)
    return g.tensor(name, () if scalar else v.shape, dtype, None, v.reshape(() if scalar else v.shape))


def engine_outputs(model, xs: list) -> list:
    """Run the model's ops in order with the kernels (several outputs per op allowed)."""
    values = dict(zip(model.inputs, xs))
    for op in model.ops:
        params = prepare_op(op, model)
        args = [values[i] if i in values else (model.tensors[i].data if i >= 0 else None) for i in op.inputs]
        ys = evaluate(op, params, args)
        for t, y in zip(op.outputs, ys if isinstance(ys, tuple) else (ys,)):
            values[t] = y
    return [values[t] for t in model.outputs]


# --- generators: (Model, [input batches], description) -------------------------------------------

def _operands(g, rng, n_in: int, shape_of, dtype, q, const: int):
    """``n_in`` operand tensors of shapes ``shape_of(i)`` (drawn in turn, so the random stream
    interleaves with the values): operand ``const`` a constant, the others model inputs with a
    random batch each. Returns (operands, model inputs, input batches)."""
    ins, model_in, xs = [], [], []
    for i in range(n_in):
        shape = shape_of(i)
        if i == const:
            ins.append(g.tensor(f"c{i}", shape, dtype, q, _values(rng, shape, dtype, 1)))
        else:
            ins.append(g.tensor(f"x{i}", shape, dtype, q))
            model_in.append(ins[-1])
            xs.append(_values(rng, shape, dtype))
    return ins, model_in, xs


def gen_concatenation(rng):
    rank = int(rng.integers(2, 6))
    base = _shape(rng, rank, 4)
    axis = int(rng.integers(1, rank))
    dtype, q = _dtype(rng)
    n_in = int(rng.integers(2, 6))
    const = int(rng.integers(n_in)) if rng.random() < 0.4 else -1
    g = GraphBuilder()
    sizes = []

    def shape_of(i):
        shape = list(base)
        shape[axis] = int(rng.integers(1, 5))
        sizes.append(shape[axis])
        return shape

    ins, model_in, xs = _operands(g, rng, n_in, shape_of, dtype, q, const)
    out = list(base)
    out[axis] = sum(sizes)
    y = g.tensor("y", out, dtype, q)
    g.op("CONCATENATION", ins, [y], axis=_axis_spec(rng, axis, rank), activation="NONE")
    return g.model(model_in, [y]), xs, dict(shape=base, axis=axis, sizes=sizes, const=const, dtype=dtype.__name__)


def _slice_spec(rng, shape):
    """A random STRIDED_SLICE spec: begin, end, strides and masks (the batch entry kept whole
    most of the time, so most specs are ones the engine takes)."""
    rank = len(shape)
    offset = rng.random() < 0.15
    count = rank if offset else int(rng.integers(1, rank + 3))
    lim = max(shape) + 2
    begin = rng.integers(-lim, lim + 1, count)
    end = rng.integers(-lim, lim + 1, count)
    strides = rng.choice([-3, -2, -1, 1, 1, 1, 2, 3], count)
    masks = {k: int(rng.integers(0, 1 << count)) if rng.random() < p else 0 for k, p in (
        ("begin_mask", 0.5), ("end_mask", 0.5), ("shrink_axis_mask", 0.3))}
    masks["ellipsis_mask"] = (1 << int(rng.integers(count))) if (not offset and rng.random() < 0.25) else 0
    masks["new_axis_mask"] = int(rng.integers(0, 1 << count)) & ~1 if (not offset and rng.random() < 0.25) else 0
    if offset:
        end = rng.integers(0, lim + 1, count)
        strides = np.abs(strides)
    if rng.random() < 0.8 and not masks["ellipsis_mask"] & 1:  # keep the batch axis whole
        begin[0], end[0], strides[0] = 0, 1, 1
        masks["shrink_axis_mask"] &= ~1
    return begin, end, strides, dict(masks, offset=bool(offset))


def gen_strided_slice(rng):
    for _ in range(200):
        rank = int(rng.integers(1, 6))
        shape = _shape(rng, rank, 6)
        dtype, q = _dtype(rng, 0.1)
        begin, end, strides, opts = _slice_spec(rng, shape)
        g = GraphBuilder()
        x = g.tensor("x", shape, dtype, q)
        ins = [x, _ints(g, "begin", begin), _ints(g, "end", end), _ints(g, "strides", strides)]
        try:
            out_shape = _slice_out_shape(shape, begin, end, strides, opts)
        except IndexError:  # more indices than axes: the kernel refuses those (tested below)
            continue
        if out_shape is None:
            continue
        y = g.tensor("y", out_shape, dtype, q)
        g.op("STRIDED_SLICE", ins, [y], **opts)
        try:
            model = g.model([x], [y])
        except ModelError:
            continue
        desc = dict(shape=shape, begin=begin.tolist(), end=end.tolist(), strides=strides.tolist(), **opts)
        return model, [_values(rng, shape, dtype)], desc
    raise RuntimeError("no valid STRIDED_SLICE spec in 200 tries")


def _slice_out_shape(shape, begin, end, strides, opts):
    """The output shape LiteRT declares (ResizeOutputTensor), from the kernel's own port."""
    eff, st, sp, sd, bm, em, sm, _ = _strided_slice_spec(tuple(shape), [int(v) for v in begin],
                                                         [int(v) for v in end], [int(v) for v in strides], opts)
    out = []
    for i, size in enumerate(eff):
        _, extent = _axis_range(size, st[i], sp[i], sd[i], (bm >> i) & 1, (em >> i) & 1, (sm >> i) & 1,
                                opts["offset"])
        if extent is not None:
            out.append(extent)
    return out if out else None


def gen_expand_dims(rng):
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank)
    axis = int(rng.integers(1, rank + 1))
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    a = _ints(g, "axis", [_axis_spec(rng, axis, rank + 1)], I64 if rng.random() < 0.3 else I32,
              scalar=rng.random() < 0.5)
    out = list(shape)
    out.insert(axis, 1)
    y = g.tensor("y", out, dtype, q)
    g.op("EXPAND_DIMS", [x, a], [y])
    return g.model([x], [y]), [_values(rng, shape, dtype)], dict(shape=shape, axis=axis)


def gen_squeeze(rng):
    rank = int(rng.integers(2, 6))
    shape = list(_shape(rng, rank, 4))
    ones = [i for i in range(1, rank) if rng.random() < 0.5] or [int(rng.integers(1, rank))]
    for i in ones:
        shape[i] = 1
    dims = [i for i in ones if rng.random() < 0.7] or ones[:1]
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    y = g.tensor("y", [s for i, s in enumerate(shape) if i not in dims], dtype, q)
    g.op("SQUEEZE", [x], [y], squeeze_dims=[_axis_spec(rng, d, rank) for d in dims])
    return g.model([x], [y]), [_values(rng, shape, dtype)], dict(shape=shape, dims=dims)


def gen_transpose(rng):
    rank = int(rng.integers(1, 7))
    shape = _shape(rng, rank)
    perm = [0] + [int(v) + 1 for v in rng.permutation(rank - 1)]
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    p = _ints(g, "perm", [_axis_spec(rng, v, rank) if v else 0 for v in perm])
    y = g.tensor("y", [shape[v] for v in perm], dtype, q)
    g.op("TRANSPOSE", [x, p], [y])
    return g.model([x], [y]), [_values(rng, shape, dtype)], dict(shape=shape, perm=perm)


def gen_pack(rng):
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank)
    n_in = int(rng.integers(1, 6))
    axis = int(rng.integers(1, rank + 1))
    dtype, q = _dtype(rng)
    const = int(rng.integers(n_in)) if n_in > 1 and rng.random() < 0.3 else -1
    g = GraphBuilder()
    ins, model_in, xs = _operands(g, rng, n_in, lambda i: shape, dtype, q, const)
    out = list(shape)
    out.insert(axis, n_in)
    y = g.tensor("y", out, dtype, q)
    g.op("PACK", ins, [y], values_count=n_in, axis=_axis_spec(rng, axis, rank + 1))
    return g.model(model_in, [y]), xs, dict(shape=shape, n=n_in, axis=axis, const=const, dtype=dtype.__name__)


def gen_unpack(rng):
    rank = int(rng.integers(2, 6))
    shape = _shape(rng, rank)
    axis = int(rng.integers(1, rank))
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    out = [s for i, s in enumerate(shape) if i != axis]
    ys = [g.tensor(f"y{k}", out, dtype, q) for k in range(shape[axis])]
    g.op("UNPACK", [x], ys, num=shape[axis], axis=_axis_spec(rng, axis, rank))
    return g.model([x], ys), [_values(rng, shape, dtype)], dict(shape=shape, axis=axis)


def gen_split(rng):
    rank = int(rng.integers(2, 6))
    shape = list(_shape(rng, rank, 4))
    axis = int(rng.integers(1, rank))
    num = int(rng.integers(1, 5))
    shape[axis] = num * int(rng.integers(1, 4))
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    a = _ints(g, "axis", [_axis_spec(rng, axis, rank)], scalar=rng.random() < 0.5)
    x = g.tensor("x", shape, dtype, q)
    out = list(shape)
    out[axis] //= num
    ys = [g.tensor(f"y{k}", out, dtype, q) for k in range(num)]
    g.op("SPLIT", [a, x], ys, num_splits=num)
    return g.model([x], ys), [_values(rng, shape, dtype)], dict(shape=shape, axis=axis, num=num)


def gen_split_v(rng):
    rank = int(rng.integers(2, 6))
    shape = list(_shape(rng, rank, 4))
    axis = int(rng.integers(1, rank))
    num = int(rng.integers(1, 5))
    sizes = [int(v) for v in rng.integers(1, 4, num)]
    shape[axis] = sum(sizes)
    spec = list(sizes)
    if rng.random() < 0.4:
        spec[int(rng.integers(num))] = -1
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    s = _ints(g, "size_splits", spec, I64 if rng.random() < 0.2 else I32)
    a = _ints(g, "axis", [_axis_spec(rng, axis, rank)], scalar=rng.random() < 0.5)
    ys = []
    for k, size in enumerate(sizes):
        out = list(shape)
        out[axis] = size
        ys.append(g.tensor(f"y{k}", out, dtype, q))
    g.op("SPLIT_V", [x, s, a], ys, num_splits=num)
    return g.model([x], ys), [_values(rng, shape, dtype)], dict(shape=shape, axis=axis, sizes=spec)


def gen_fill(rng):
    rank = int(rng.integers(1, 6))
    dims = [int(v) for v in rng.integers(1, 5, rank)]
    if rng.random() < 0.7:
        dims[0] = 1
    dtype, q = _dtype(rng, 0.4)
    g = GraphBuilder()
    d = _ints(g, "dims", dims, I64 if rng.random() < 0.3 else I32)
    v = g.tensor("value", (), dtype, q, _values(rng, (1,), dtype, 1).reshape(()))
    y = g.tensor("y", dims, dtype, q)
    g.op("FILL", [d, v], [y])
    return g.model([], [y]), [], dict(dims=dims, dtype=dtype.__name__)


def gen_tile(rng):
    rank = int(rng.integers(1, 6))
    shape = _shape(rng, rank, 4)
    reps = [1] + [int(v) for v in rng.integers(1, 4, rank - 1)]
    dtype, q = _dtype(rng)
    g = GraphBuilder()
    x = g.tensor("x", shape, dtype, q)
    m = _ints(g, "multiples", reps, I64 if rng.random() < 0.3 else I32)
    y = g.tensor("y", [s * r for s, r in zip(shape, reps)], dtype, q)
    g.op("TILE", [x, m], [y])
    return g.model([x], [y]), [_values(rng, shape, dtype)], dict(shape=shape, multiples=reps)


GENERATORS = {
    "CONCATENATION": gen_concatenation,
    "STRIDED_SLICE": gen_strided_slice,
    "EXPAND_DIMS": gen_expand_dims,
    "SQUEEZE": gen_squeeze,
    "TRANSPOSE": gen_transpose,
    "PACK": gen_pack,
    "UNPACK": gen_unpack,
    "SPLIT": gen_split,
    "SPLIT_V": gen_split_v,
    "FILL": gen_fill,
    "TILE": gen_tile,
}


def model_case(name: str, i: int):
    """Model ``i`` of op ``name``: (Model, input batches, description), reproducibly."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), i])
    return GENERATORS[name](rng)


# --- forward against LiteRT ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(GENERATORS), ids=list(GENERATORS))
def test_random_movement_models_match_litert(name):
    check_random_models(name, lambda i: model_case(name, i), N_MODELS,
                        f"tests/test_ops_movement.model_case({name!r}, i)",
                        compare=lambda model, xs: compare(model, xs, got=engine_outputs(model, xs)))


def test_random_movement_models_sample():
    """The fast tier's sample of the sweep above: the first models of every movement op."""
    check_sample({name: (lambda i, name=name: model_case(name, i)) for name in GENERATORS},
                 "tests/test_ops_movement.model_case({name!r}, i)",
                 compare=lambda model, xs: compare(model, xs, got=engine_outputs(model, xs)))


def _unchecked(g, inputs, outputs):
    """The builder's graph as a Model without the engine's checks (to hand LiteRT what we refuse)."""
    raw = Model.__new__(Model)
    raw.tensors, raw.ops, raw.inputs, raw.outputs = g.tensors, g.ops, list(inputs), list(outputs)
    raw.metadata, raw.description, raw.signature = {}, "edge_qmul", None
    for i, op in enumerate(raw.ops):
        op.index = i
    return raw


def _refused_by_litert(model) -> bool:
    try:
        interp = litert_interpreter(to_bytes(model))
        interp.invoke()
    except (RuntimeError, ValueError):
        return True
    return False


def _concat_model(q_in, q_out, act="NONE"):
    g = GraphBuilder()
    a = g.tensor("a", (1, 2, 3), I8, q_in[0])
    b = g.tensor("b", (1, 2, 4), I8, q_in[1])
    y = g.tensor("y", (1, 2, 7), I8, q_out)
    g.op("CONCATENATION", [a, b], [y], axis=2, activation=act)
    return g


@pytest.mark.parametrize("case", ["scale", "zero_point", "activation"])
def test_int8_concatenation_without_rescaling_like_litert(case):
    """LiteRT's int8 CONCATENATION refuses inputs quantized unlike the output, and fused activations;
    the engine refuses the same models (naming the op) instead of computing something else."""
    q = qp(0.05, 3)
    other = {"scale": qp(0.1, 3), "zero_point": qp(0.05, 4), "activation": q}[case]
    g = _concat_model((q, other), q, "RELU" if case == "activation" else "NONE")
    with pytest.raises(ModelError, match=r"op CONCATENATION \(index 0\)"):
        g.model([0, 1], [2])
    assert _refused_by_litert(_unchecked(g, [0, 1], [2]))


@pytest.mark.parametrize("build", ["batch_slice", "batch_squeeze", "batch_tile", "batch_split",
                                   "batch_expand", "transpose_out", "pack_quant"])
def test_batch_axis_and_quantization_refusals(build):
    g = GraphBuilder()
    q = qp(0.1, 0)
    x = g.tensor("x", (1, 3, 4), I8, q)
    if build == "batch_slice":
        ins = [x, _ints(g, "b", [0, 0, 0]), _ints(g, "e", [0, 3, 4]), _ints(g, "s", [1, 1, 1])]
        y = g.tensor("y", (3, 4), I8, q)
        g.op("STRIDED_SLICE", ins, [y], shrink_axis_mask=1)
    elif build == "batch_squeeze":
        y = g.tensor("y", (3, 4), I8, q)
        g.op("SQUEEZE", [x], [y], squeeze_dims=[])
    elif build == "batch_tile":
        y = g.tensor("y", (2, 3, 4), I8, q)
        g.op("TILE", [x, _ints(g, "m", [2, 1, 1])], [y])
    elif build == "batch_split":
        y = g.tensor("y", (1, 3, 4), I8, q)
        g.op("SPLIT", [_ints(g, "a", [0], scalar=True), x], [y], num_splits=1)
    elif build == "batch_expand":
        y = g.tensor("y", (1, 1, 3, 4), I8, q)
        g.op("EXPAND_DIMS", [x, _ints(g, "a", [0], scalar=True)], [y])
    elif build == "transpose_out":  # the batch moved and the tensor leaves the model
        y = g.tensor("y", (3, 1, 4), I8, q)
        g.op("TRANSPOSE", [x, _ints(g, "p", [1, 0, 2])], [y])
    else:
        y = g.tensor("y", (1, 2, 3, 4), I8, qp(0.2, 0))
        g.op("PACK", [x, x], [y], values_count=2, axis=1)
    with pytest.raises(ModelError, match=r"op [A-Z_]+ \(index 0\)"):
        g.model([x], [y])


# --- batch moved by TRANSPOSE / PACK and restored by UNPACK / TRANSPOSE ----------------------------

def test_transpose_unpack_moves_the_batch_and_back():
    """Keras' unrolled LSTM: (batch, time, features) -> (time, batch, features) -> time steps."""
    rng = np.random.default_rng(1)
    q = qp(0.03, 3)
    g = GraphBuilder()
    x = g.tensor("x", (1, 5, 8), I8, q)
    t = g.tensor("t", (5, 1, 8), I8, q)
    g.op("TRANSPOSE", [x, _ints(g, "perm", [1, 0, 2])], [t])
    steps = [g.tensor(f"s{k}", (1, 8), I8, q) for k in range(5)]
    g.op("UNPACK", [t], steps, num=5, axis=0)
    model = g.model([x], steps)
    xs = [_values(rng, (1, 5, 8), I8, 7)]
    got = engine_outputs(model, xs)
    assert compare(model, xs, got=got) is None
    # backward: UNPACK stacks the step errors (two scales, one step with none), TRANSPOSE permutes back
    errors = [Error(rng.integers(-900, 900, (7, 8)).astype(np.int16), 2.0 ** -(k % 2)) if k != 3 else None
              for k in range(5)]
    t_val = evaluate(model.ops[0], prepare_op(model.ops[0], model), [xs[0], None])
    gt = _backward(model, model.ops[1], [t_val], got, errors)[0]
    gx = _backward(model, model.ops[0], [xs[0], None], [t_val], [gt])[0]
    want = np.zeros((7, 5, 8))
    for k, e in enumerate(errors):
        if e is not None:
            want[:, k] = e.real()
    assert gx.values.shape == (7, 5, 8)
    np.testing.assert_allclose(gx.real(), want, atol=gx.scale / 2 + 1e-12)


def test_pack_on_axis_0_then_transpose_back():
    """return_sequences: step outputs stacked on axis 0 (time, batch, units), transposed back."""
    rng = np.random.default_rng(2)
    q = qp(0.02, -5)
    g = GraphBuilder()
    steps = [g.tensor(f"s{k}", (1, 6), I8, q) for k in range(4)]
    p = g.tensor("p", (4, 1, 6), I8, q)
    g.op("PACK", steps, [p], values_count=4, axis=0)
    y = g.tensor("y", (1, 4, 6), I8, q)
    g.op("TRANSPOSE", [p, _ints(g, "perm", [1, 0, 2])], [y])
    model = g.model(steps, [y])
    xs = [_values(rng, (1, 6), I8, 5) for _ in range(4)]
    assert compare(model, xs, got=engine_outputs(model, xs)) is None


# --- backward against the float64 reference ------------------------------------------------------

def _backward(model, op, inputs, outputs, errors):
    ctx = Backward(op=op, model=model, inputs=list(inputs), outputs=list(outputs), errors=list(errors),
                   wants=[True] * len(op.inputs))
    return KERNELS[op.kind].backward(prepare_op(op, model), ctx)


def _real(model, t, v):
    q = model.tensors[t].quant
    if q is None:
        return np.asarray(v, np.float64)
    return float(q.s) * (np.asarray(v, np.float64) - q.zp)


N_BACKWARD = max(10, N_MODELS // 6)


@pytest.mark.parametrize("name", list(GENERATORS), ids=list(GENERATORS))
def test_movement_backward_matches_reference(name):
    """The engine's int16 errors (real values) against the float64 reference's gradients: exact up
    to the one rounding where scales are joined (SPLIT / UNPACK) or tiles summed (TILE)."""
    worst, checked = 1.0, 0
    for i in range(N_BACKWARD):
        model, xs, desc = model_case(name, i)
        op = model.ops[0]
        rng = np.random.default_rng([SEED, i, 7])
        inputs = [dict(zip(model.inputs, xs)).get(t, model.tensors[t].data if t >= 0 else None) for t in op.inputs]
        outs = engine_outputs(model, xs)
        # random errors, one scale per output (power-of-two ratios and not), some outputs without one
        errors = []
        for k, y in enumerate(outs):
            if len(outs) > 1 and rng.random() < 0.2:
                errors.append(None)
                continue
            scale = float(2.0 ** rng.integers(-12, -4) * (1.0 if rng.random() < 0.6 else log_uniform(rng, 0.5, 1.0)))
            errors.append(Error(rng.integers(-30000, 30001, np.shape(y)).astype(np.int16), scale))
        grads = _backward(model, op, inputs, outs, errors)
        assert len(grads) == len(op.inputs)
        xs_real = [None if t < 0 else _real(model, t, v) for t, v in zip(op.inputs, inputs)]
        ys_real = ref_movement.forward(model, op, xs_real)
        for k, (y, yr) in enumerate(zip(outs, ys_real)):  # the reference's forward agrees too
            np.testing.assert_allclose(_real(model, op.outputs[k], y), yr, rtol=0, atol=1e-9,
                                       err_msg=f"{name} model {i} {desc}: reference forward, output {k}")
        want = ref_movement.backward(model, op, xs_real, ys_real, [None if e is None else e.real() for e in errors])
        for slot, (g, w) in enumerate(zip(grads, want)):
            if w is None or not np.any(w):
                assert g is None or not np.any(g.values), f"{name} model {i}: unexpected error in slot {slot}"
                continue
            assert g is not None, f"{name} model {i} {desc}: no error for input slot {slot}"
            assert g.values.dtype == np.int16 and g.values.shape == w.shape
            got = g.real()
            cos = float(np.dot(got.ravel(), w.ravel()) / (np.linalg.norm(got) * np.linalg.norm(w)))
            worst = min(worst, cos)
            np.testing.assert_allclose(got, w, rtol=0, atol=g.scale * (0.5 + 1e-4),
                                       err_msg=f"{name} model {i} {desc}: slot {slot}")
            assert cos >= 0.99
            checked += 1
    assert checked or name == "FILL"
    print(f"{name}: {checked} input errors checked, worst cosine {worst:.6f}")


# --- the option codec for vectors ----------------------------------------------------------------

@pytest.mark.parametrize("dims", [[2], [-1, 2], []])
def test_squeeze_dims_round_trip(dims):
    """squeeze_dims is a vector field: written and read back as the same list ([] included)."""
    g = GraphBuilder()
    q = qp(0.1, 1)
    x = g.tensor("x", (1, 3, 1, 1), I8, q)
    y = g.tensor("y", (1, 3, 1) if len(dims) == 1 else (1, 3) if dims else (3,), I8, q)
    g.op("SQUEEZE", [x], [y], squeeze_dims=dims)
    if dims:
        model = g.model([x], [y])
        back = load_tflite(to_bytes(model))
        assert back.ops[0].options["squeeze_dims"] == dims
        assert to_bytes(back) == to_bytes(model)
    else:  # squeezing every size-1 axis takes the batch too: the engine refuses, the file keeps []
        with pytest.raises(ModelError, match="batch axis"):
            g.model([x], [y])
        _, ops, *_ = _parse(to_bytes(_unchecked(g, [x], [y])))
        assert ops[0].options["squeeze_dims"] == []
