"""kernels/dot_tile.py + implicit_dot.py: the int8 dot-product tiles (vpdpbusd, sdot) are bit-exact
with the int16 tile path and with int64 numpy references, for CONV_2D and FULLY_CONNECTED, on every
kind this machine runs: the host's (vnni512 / avxvnni here; sdot under the emulated cortex-a76 of
``make test-arm64``) and, on x86, "generic" (sdot's signed arithmetic in portable IR). The aarch64
sdot code itself is shown by compiling the tile's IR for aarch64 with llvmlite."""
from __future__ import annotations

import platform

import numpy as np
import pytest
from numba import njit

from conftest import FIXTURE_MODELS, fixture_data, fixture_path
from edge_qmul import load_tflite
from edge_qmul.kernels import conv as conv_mod
from edge_qmul.kernels import dot_tile as DT
from edge_qmul.kernels import fully_connected as fc_mod
from edge_qmul.kernels import implicit_dot as ID
from edge_qmul.kernels.common import Requant, Window, window
from edge_qmul.quant import DOUBLE_ROUNDING, SINGLE_ROUNDING, requantize

ARM = platform.machine() in ("aarch64", "arm64")
FEATURES = DT.target_features()
HOST = DT.host_kind()
KINDS = sorted({k for k in [HOST, "avxvnni" if "avxvnni" in FEATURES and not ARM else None,
                            None if ARM else "generic"] if k})


@njit(cache=True)
def _requantize_all(acc, bias, mult, shift, zp, lo, hi, rounding):
    out = np.empty(acc.shape, np.int8)
    for i in range(acc.shape[0]):
        for o in range(acc.shape[1]):
            out[i, o] = requantize(np.int32(acc[i, o] + bias[o]), mult[o], shift[o], zp, lo, hi, rounding=rounding)
    return out


def _conv_reference(x, w, zp_in, v: Window):
    """int64 sum (x - zp_in) * w over each window, zero outside the input: (N * out_h * out_w, C_out)."""
    n, in_h, in_w, cin = x.shape
    cout, k_h, k_w, _ = w.shape
    xs = x.astype(np.int64) - zp_in
    acc = np.zeros((n, v.out_h, v.out_w, cout), np.int64)
    for ky in range(k_h):
        for kx in range(k_w):
            for oy in range(v.out_h):
                iy = oy * v.stride_h - v.pad_top + ky * v.dil_h
                if not 0 <= iy < in_h:
                    continue
                for ox in range(v.out_w):
                    ix = ox * v.stride_w - v.pad_left + kx * v.dil_w
                    if 0 <= ix < in_w:
                        acc[:, oy, ox] += xs[:, iy, ix] @ w[:, ky, kx].T.astype(np.int64)
    return acc.reshape(-1, cout)


def _params(rng, cout, rounding):
    mult = rng.integers(2 ** 30, 2 ** 31 - 1, cout).astype(np.int32)
    shift = rng.integers(-12, -6, cout).astype(np.int32)
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    return bias, Requant(mult, shift, int(rng.integers(-20, 20)), -128, 127, rounding)


def _weights(rng, shape):
    w = rng.integers(-127, 128, shape).astype(np.int8)
    w.reshape(-1)[rng.choice(w.size, max(1, w.size // 10), replace=False)] = -128
    return w


# (n, h, w, cin, cout, k, stride, dilation, padding, zp_in)
CONV_CASES = [(2, 7, 6, 1, 7, 3, 1, 1, "SAME", -128),
              (1, 9, 9, 3, 17, 3, 2, 1, "SAME", 127),
              (2, 8, 7, 2, 33, 5, 1, 1, "VALID", 3),
              (1, 6, 9, 5, 9, 3, 1, 2, "SAME", -128),
              (2, 6, 6, 8, 40, 1, 1, 1, "VALID", 127),
              (1, 7, 8, 6, 5, 2, 2, 1, "SAME", -7),
              (1, 10, 9, 3, 16, 3, 1, 2, "VALID", 0),
              (3, 5, 5, 12, 48, 3, 2, 1, "SAME", 100)]
if ARM:  # emulated: a few small cases
    CONV_CASES = CONV_CASES[:4]


def _conv_case(case, rounding, seed):
    n, h, wd, cin, cout, k, stride, dil, padding, zp_in = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, h, wd, cin)).astype(np.int8)
    x.reshape(-1)[rng.choice(x.size, x.size // 8, replace=False)] = zp_in
    w = _weights(rng, (cout, k, k, cin))
    v = window(None, h, wd, k, k, padding, stride, stride, dil, dil)
    bias, rq = _params(rng, cout, rounding)
    return x, w, v, bias, rq, zp_in


@pytest.mark.skipif(not KINDS, reason="no dot-product kernel on this CPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rounding", [DOUBLE_ROUNDING, SINGLE_ROUNDING])
def test_conv_dot_matches_int16_path_and_int64_reference(kind, rounding, monkeypatch):
    for i, case in enumerate(CONV_CASES):
        x, w, v, bias, rq, zp_in = _conv_case(case, rounding, 100 * i + rounding)
        want = _requantize_all(_conv_reference(x, w, zp_in, v), bias, rq.multiplier, rq.shift, rq.out_zero_point,
                               rq.act_min, rq.act_max, rounding).reshape(x.shape[0], v.out_h, v.out_w, -1)
        monkeypatch.setenv("EDGE_QMUL_DOT", "off")
        p = conv_mod.ConvParams(v, rq, -zp_in, np.zeros(w.shape[0], np.int32), w.shape[1:3])
        int16 = conv_mod.forward(p, x, w, bias)
        monkeypatch.delenv("EDGE_QMUL_DOT")
        np.testing.assert_array_equal(int16, want, err_msg=f"int16 path, case {case}")
        for parallel in ([False] if ARM else [False, True]):
            got = ID.conv_forward(x, w, bias, zp_in, v, rq, rq.multiplier, rq.shift, kind=kind, parallel=parallel)
            np.testing.assert_array_equal(got, want, err_msg=f"{kind} parallel={parallel}, case {case}")


FC_CASES = [(4, 37, 45, -128), (13, 64, 7, 127), (32, 101, 33, 5), (9, 3, 16, 0), (5, 256, 70, -1)]
if ARM:
    FC_CASES = FC_CASES[:3]


@pytest.mark.skipif(not KINDS, reason="no dot-product kernel on this CPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rounding", [DOUBLE_ROUNDING, SINGLE_ROUNDING])
def test_fc_dot_matches_int16_path_and_int64_reference(kind, rounding, monkeypatch):
    for i, (rows, depth, cout, zp_in) in enumerate(FC_CASES):
        rng = np.random.default_rng(1000 + 10 * i + rounding)
        x = rng.integers(-128, 128, (rows, depth)).astype(np.int8)
        w = _weights(rng, (cout, depth))
        bias, rq = _params(rng, cout, rounding)
        acc = (x.astype(np.int64) - zp_in) @ w.T.astype(np.int64)
        want = _requantize_all(acc, bias, rq.multiplier, rq.shift, rq.out_zero_point, rq.act_min, rq.act_max,
                               rounding)
        monkeypatch.setenv("EDGE_QMUL_DOT", "off")
        p = fc_mod.FullyConnectedParams(rq, -zp_in, depth, (cout,), np.zeros(cout, np.int32))
        np.testing.assert_array_equal(fc_mod.forward(p, x, w, bias), want)
        monkeypatch.delenv("EDGE_QMUL_DOT")
        for parallel in ([False] if ARM else [False, True]):
            got = ID.fc_forward(x, w, bias, zp_in, rq.multiplier, rq.shift, rq.out_zero_point, rq.act_min,
                                rq.act_max, rounding, kind=kind, parallel=parallel)
            np.testing.assert_array_equal(got, want, err_msg=f"{kind} parallel={parallel} {(rows, depth, cout)}")


def _pack_reference(b, nr, run, padded_run):
    n, k = b.shape
    runs = k // run
    kk = np.zeros((n, runs, padded_run), np.int8)
    kk[:, :, :run] = b.reshape(n, runs, run)
    kk = kk.reshape(n, -1)
    kq = -(-kk.shape[1] // 4)
    kk = np.pad(kk, ((0, -n % nr), (0, 4 * kq - kk.shape[1])))
    return kk.reshape(-1, nr, kq, 4).transpose(0, 2, 1, 3).reshape(-1, kq, 4 * nr)


@pytest.mark.parametrize("n, k, nr, run, padded_run", [(19, 30, 16, 5, 8), (40, 64, 32, 8, 8), (7, 12, 8, 12, 12),
                                                        (33, 21, 16, 21, 24), (5, 18, 8, 9, 12)])
def test_pack_quads_matches_reference(n, k, nr, run, padded_run):
    b = _weights(np.random.default_rng(n * k), (n, k))
    np.testing.assert_array_equal(ID.pack_quads(b, nr, run, padded_run), _pack_reference(b, nr, run, padded_run))


def test_pack_quads_layout_and_correction():
    rng = np.random.default_rng(7)
    w = _weights(rng, (19, 2, 3, 5))  # 19 outputs, 6 taps of 5 channels -> runs padded to 8
    panels = ID.pack_quads(w.reshape(19, -1), 16, 5, 8)
    assert panels.shape == (2, 6 * 8 // 4, 64)
    flat = w.reshape(19, 6, 5)
    for o in range(19):
        for t in range(6):
            for c in range(8):
                k = t * 8 + c
                got = panels[o // 16, k // 4, 4 * (o % 16) + k % 4]
                assert got == (flat[o, t, c] if c < 5 else 0)
    assert not panels[1, :, 4 * 3:].any()  # columns past the last output are zero
    corr = ID.weight_correction(w.reshape(19, -1), 128 + 127)
    np.testing.assert_array_equal(corr, (w.reshape(19, -1).astype(np.int64).sum(1) * 255).astype(np.int32))


def test_dot_kind_choice(monkeypatch):
    assert DT.dot_kind({"avx2", "avx512bw", "avx512vnni", "avxvnni"}) == "vnni512"
    assert DT.dot_kind({"avx2", "avxvnni"}) == "avxvnni"
    assert DT.dot_kind({"neon", "dotprod"}) == "sdot"
    assert DT.dot_kind({"avx2"}) in (None, "sdot")  # sdot only from an aarch64 HWCAP
    monkeypatch.setenv("EDGE_QMUL_DOT", "off")
    assert DT.dot_kind() is None
    assert DT.dot_kind({"avx512bw", "avx512vnni"}) is None


@pytest.mark.skipif(not ARM, reason="the emulated cortex-a76 run (make test-arm64)")
def test_arm64_selects_sdot():
    """Under ``make test-arm64`` (cortex-a76, HWCAP asimddp) the dot path is sdot; a cortex-a72 has none."""
    if DT._hwcap_dotprod() or "dotprod" in FEATURES:
        assert DT.dot_kind() == "sdot" and HOST == "sdot"
    else:
        assert DT.dot_kind() is None


def _assembly(spec, triple, cpu, features, attribute=None):
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    ir_module = DT.standalone_module(spec, triple)
    if attribute:
        set.add(ir_module.get_global("dot_tile").attributes, attribute)
    module = llvm.parse_assembly(str(ir_module))
    module.verify()
    try:
        target = llvm.Target.from_triple(triple)
    except RuntimeError as e:  # an llvmlite built without that target
        pytest.skip(f"llvmlite has no {triple} target: {e}")
    tm = target.create_target_machine(cpu=cpu, features=features, opt=3)
    return tm.emit_assembly(module)


def test_aarch64_tile_compiles_to_sdot():
    """The same tile body numba runs, compiled for aarch64 (cortex-a76, +dotprod): sdot instructions."""
    for spec in DT.specs("sdot"):
        asm = _assembly(spec, "aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod")
        assert asm.count("sdot\t") >= spec.mr * spec.nr // spec.lanes, asm[:2000]
        assert "smull" not in asm and "mul\tv" not in asm  # no widening multiplies: dot products only


def test_dotprod_attribute_enables_sdot_on_a_cpu_without_it():
    """HWCAP says dotprod but numba's CPU does not: the kernel's function attribute still gets sdot."""
    spec = DT.specs("sdot")[0]
    asm = _assembly(spec, "aarch64-unknown-linux-gnu", "cortex-a72", "", DT.DOTPROD_ATTRIBUTE)
    assert asm.count("sdot\t") >= spec.mr * spec.nr // spec.lanes


def test_x86_tile_compiles_to_vpdpbusd():
    for kind, features in [("vnni512", "+avx512f,+avx512bw,+avx512vl,+avx512vnni"), ("avxvnni", "+avx2,+avxvnni")]:
        for spec in DT.specs(kind):
            asm = _assembly(spec, "x86_64-unknown-linux-gnu", "x86-64-v3", features)
            assert asm.count("vpdpbusd") >= spec.mr * spec.nr // spec.lanes


@pytest.mark.skipif(not KINDS or HOST is None, reason="no dot-product kernel on this CPU")
@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_models_through_dot_path(name, monkeypatch):
    """Whole fixture models with CONV_2D / FULLY_CONNECTED on the host's dot tiles equal LiteRT built-in."""
    monkeypatch.setenv("EDGE_QMUL_PLAN", "off")  # the per-op path (a compiled plan would bypass conv.forward)
    calls = []
    conv_fwd, fc_fwd = ID.conv_forward, ID.fc_forward
    monkeypatch.setattr(ID, "conv_forward", lambda *a, **k: calls.append("conv") or conv_fwd(*a, **k))
    monkeypatch.setattr(ID, "fc_forward", lambda *a, **k: calls.append("fc") or fc_fwd(*a, **k))
    model = load_tflite(fixture_path(name))
    d = fixture_data(name)
    np.testing.assert_array_equal(model.predict(d["x"]), d["y_builtin"])
    if any(op.kind == "CONV_2D" for op in model.ops):
        assert calls, "the dot path was not used"
