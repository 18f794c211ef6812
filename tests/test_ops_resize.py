"""RESIZE_NEAREST_NEIGHBOR and RESIZE_BILINEAR: random single-op int8 models equal LiteRT's builtin
kernels bit for bit (up and down scaling, integer and non-integer ratios, align_corners,
half_pixel_centers, equal and different in/out quantization), and the integer backward follows the
float64 reference (tests/ref_resize.py).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

import ref_resize
import test_train
from oplib import GraphBuilder, check_random_models, check_sample, log_uniform, qp, random_int8

from edge_qmul import grad as G
from edge_qmul.errors import ModelError
from edge_qmul.graph import Model
from edge_qmul.kernels import prepare, resize, unsupported_ops
from edge_qmul.kernels.contract import Backward
from edge_qmul.tflite.reader import _parse
from conftest import litert_data  # noqa: E402

SEED = 20240907
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
KINDS = ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR")
I8, I32 = np.int8, np.int32


def _out_size(rng, n: int) -> int:
    r = rng.random()
    if r < 0.3:  # integer upscale (2x: the common U-Net case; ties in bilinear)
        return n * int(rng.choice([2, 2, 3, 4]))
    if r < 0.45 and n > 1:  # integer downscale where it divides
        divs = [d for d in range(2, n + 1) if n % d == 0]
        return n // int(rng.choice(divs))
    return int(rng.integers(1, 25))  # any ratio, non-integer included


def gen_resize(rng, kind: str, i: int):
    h, w = int(rng.integers(1, 11)), int(rng.integers(1, 11))
    c = int(rng.integers(1, 20)) if rng.random() < 0.8 else int(rng.integers(16, 40))
    oh, ow = _out_size(rng, h), _out_size(rng, w)
    # the flag combinations in turn; nearest also takes both flags together
    combos = [(False, False), (True, False), (False, True)]
    if kind == "RESIZE_NEAREST_NEIGHBOR":
        combos.append((True, True))
    align, half = combos[i % len(combos)]
    s, zp = float(log_uniform(rng, 1e-3, 1.0)), int(rng.integers(-128, 128))
    s_out, zp_out = s, zp
    if rng.random() < 0.2:  # LiteRT copies the stored values whatever the output quantization says
        s_out, zp_out = float(log_uniform(rng, 1e-3, 1.0)), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, c), I8, qp(s, zp))
    size = g.tensor("size", (2,), I32, None, np.array([oh, ow], np.int32))
    y = g.tensor("y", (1, oh, ow, c), I8, qp(s_out, zp_out))
    g.op(kind, [x, size], [y], align_corners=align, half_pixel_centers=half)
    xs = np.concatenate([random_int8(rng, (2, h, w, c)),
                         np.clip(zp + rng.integers(-6, 7, (1, h, w, c)), -128, 127).astype(I8)])
    desc = dict(in_shape=(1, h, w, c), size=(oh, ow), align_corners=align, half_pixel_centers=half,
                same_quant=(s, zp) == (s_out, zp_out))
    return g.model([x], [y]), [xs], desc


def model_case(kind: str, i: int):
    rng = np.random.default_rng([SEED, zlib.crc32(kind.encode()), i])
    return gen_resize(rng, kind, i)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_random_resize_models_match_litert(kind):
    check_random_models(kind, lambda i: model_case(kind, i), N_MODELS,
                        f"tests/test_ops_resize.model_case({kind!r}, i)")


def test_random_resize_models_sample():
    """The fast tier's sample of the sweep above: the first models of both resize ops."""
    check_sample({kind: (lambda i, kind=kind: model_case(kind, i)) for kind in KINDS},
                 "tests/test_ops_resize.model_case({name!r}, i)")


def _cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else float(np.allclose(a, b))


def engine_backward(model, op, x, err: G.Error, block: int = 2) -> G.Error:
    """The engine's input error of a single-op model, through a Backward context built by hand."""
    params = prepare(op, model)
    y = resize.KERNELS[op.kind].forward(params, x, model.tensors[op.inputs[1]].data)
    ctx = Backward(op=op, model=model, inputs=[x, model.tensors[op.inputs[1]].data], outputs=[y],
                   errors=[err], wants=[True, False], block=block)
    gx, none = resize.KERNELS[op.kind].backward(params, ctx)
    assert none is None
    return gx


@pytest.mark.parametrize("kind", KINDS)
def test_resize_backward_follows_reference(kind):
    worst = []
    for i in range(40):
        model, (x,), desc = model_case(kind, i)
        op = model.ops[0]
        rng = np.random.default_rng([SEED, 7, i])
        y_shape = (x.shape[0],) + tuple(model.tensors[op.outputs[0]].shape[1:])
        err = G.from_float(rng.standard_normal(y_shape) * 1e-3)
        gx = engine_backward(model, op, x, err)
        assert gx.values.dtype == np.int16 and gx.values.shape == x.shape
        qi = model.tensors[op.inputs[0]].quant
        x_real = qi.s * (x.astype(np.float64) - qi.zp)
        want = ref_resize.backward(model, op, [x_real, None], None, [err.real()])[0]
        worst.append((_cosine(gx.real(), want), i, desc))
    low = [w for w in worst if w[0] < 0.99]
    assert not low, f"{kind}: {len(low)} of {len(worst)} gradients with cosine < 0.99: {low[:4]}"


def test_resize_reference_forward_is_the_engine_up_to_rounding():
    """The float64 reference and the int8 forward agree within one unit (the reference is checked
    too, not only used)."""
    for kind in KINDS:
        for i in range(30):
            model, (x,), desc = model_case(kind, i)
            op = model.ops[0]
            qi, qo = model.tensors[op.inputs[0]].quant, model.tensors[op.outputs[0]].quant
            got = np.asarray(model.forward(x)).astype(np.float64)
            want = ref_resize.forward(model, op, [qi.s * (x.astype(np.float64) - qi.zp), None])[0] / qo.s + qo.zp
            if kind == "RESIZE_BILINEAR":
                # a unit of rounding, more where the 10-bit scale's error (up to 1/2048 a row per
                # output row) meets a steep input
                d = np.abs(got - np.clip(want, -128, 127))
                assert np.mean(d <= 1.5) > 0.97 and d.max() <= 8, (kind, i, desc, d.max())
            else:  # nearest: LiteRT's float32 / fixed-point index may differ from float64 on a tie
                assert np.mean(np.abs(got - want) < 1e-6) > 0.9, (kind, i, desc)


def test_resize_refuses_what_litert_cannot_run():
    model, _, _ = model_case("RESIZE_BILINEAR", 0)
    op = model.ops[0]
    op.options.update(align_corners=True, half_pixel_centers=True)
    with pytest.raises(ModelError, match=r"RESIZE_BILINEAR \(index"):
        prepare(op, model)
    # 2 -> 99 rows: (2048 + 49) // 99 = 21 per row, 98 * 21 >= 2 * 1024: LiteRT reads row 2 of 2
    g = GraphBuilder()
    x = g.tensor("x", (1, 2, 2, 3), I8, qp(0.1, 0))
    s = g.tensor("size", (2,), I32, None, np.array([99, 2], np.int32))
    y = g.tensor("y", (1, 99, 2, 3), I8, qp(0.1, 0))
    g.op("RESIZE_BILINEAR", [x, s], [y])
    with pytest.raises(ModelError, match=r"RESIZE_BILINEAR \(index 0\).*outside the input"):
        m = g.model([x], [y])
        prepare(m.ops[0], m)
    g = GraphBuilder()
    x = g.tensor("x", (1, 4, 4, 3), I8, qp(0.1, 0))
    s = g.tensor("size", (2,), I32)  # not a constant
    y = g.tensor("y", (1, 8, 8, 3), I8, qp(0.1, 0))
    g.op("RESIZE_NEAREST_NEIGHBOR", [x, s], [y])
    with pytest.raises(ModelError, match=r"RESIZE_NEAREST_NEIGHBOR \(index 0\).*constant"):
        m = g.model([x, s], [y])
        prepare(m.ops[0], m)


def test_unet_fixture_whole_model_matches_litert_when_supported():
    """The zoo U-Net (Keras Resizing, nearest, half_pixel_centers) end to end against LiteRT."""

    zoo = Path(__file__).parent / "fixtures" / "zoo"
    model = Model(*_parse((zoo / "unet_small.tflite").read_bytes()))
    missing = unsupported_ops(model)
    if missing:
        pytest.skip(f"other ops of the model are not supported yet: {dict(missing)}")
    data = litert_data(zoo / "unet_small.npz")
    np.testing.assert_array_equal(np.asarray(model.predict(data["x"][:4])), data["y_builtin"][:4])


def test_unet_fixture_gradients_through_resize_match_reference():
    """The trainer's integer gradients of the zoo U-Net (two RESIZE_NEAREST_NEIGHBOR on the path)
    against the float64 reference."""

    zoo = Path(__file__).parent / "fixtures" / "zoo"
    model = Model(*_parse((zoo / "unet_small.tflite").read_bytes()))
    if unsupported_ops(model):
        pytest.skip(f"other ops of the model are not supported yet: {dict(unsupported_ops(model))}")
    x8 = np.load(zoo / "unet_small.npz")["x"][:2]
    assert test_train.check_gradients(model, x8, np.random.default_rng(0).integers(0, 2, len(x8))) > 0
