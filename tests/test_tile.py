"""kernels/tile.py: the register-blocked tile kernel and its requantizing epilogue, on every code
path this x86 machine can compile — the AVX-512 and AVX2 pmaddwd intrinsics and the portable
sext-mul-add form that aarch64 gets — against int64 numpy products and quant.requantize."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from edge_qmul.kernels import tile as T
from edge_qmul.quant import requantize

FEATURES = T.target_features()
SHAPES = [pytest.param((4, 8, 4, None), id="portable-4x8"),
          pytest.param((8, 16, 4, None), id="portable-8x16"),
          pytest.param((4, 16, 8, "llvm.x86.avx2.pmadd.wd"), id="avx2-4x16",
                       marks=pytest.mark.skipif("avx2" not in FEATURES, reason="needs AVX2")),
          pytest.param((8, 8, 8, "llvm.x86.avx2.pmadd.wd"), id="avx2-8x8",
                       marks=pytest.mark.skipif("avx2" not in FEATURES, reason="needs AVX2")),
          pytest.param((8, 16, 16, "llvm.x86.avx512.pmaddw.d.512"), id="avx512-8x16",
                       marks=pytest.mark.skipif("avx512bw" not in FEATURES, reason="needs AVX-512BW")),
          pytest.param((8, 32, 16, "llvm.x86.avx512.pmaddw.d.512"), id="avx512-8x32",
                       marks=pytest.mark.skipif("avx512bw" not in FEATURES, reason="needs AVX-512BW"))]


def _driver(kernel):
    @njit
    def run(a, bases, offsets, panels, tiles):
        for p in range(panels.shape[0]):
            kernel(a, bases, offsets, panels, p, tiles[p])
    return run


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a_dtype", [np.int16, np.int8])
def test_tile_kernel_matches_int64_reference(shape, a_dtype):
    mr, nr, lanes, native = shape
    run = _driver(T.make_tile_kernel(mr, nr, lanes, native))
    rng = np.random.default_rng(mr * 100 + nr + (a_dtype == np.int8))
    lo, hi = (-128, 128) if a_dtype == np.int8 else (-2 ** 15, 2 ** 15)
    for taps, k_tap, n in [(1, 6, nr), (1, 10, 2 * nr + 3), (3, 4, nr - 1), (9, 8, 5)]:
        # a flat buffer; row r's tap t covers a[bases[r] + offsets[t] : ... + k_tap]
        a = rng.integers(lo, hi, 4000).astype(a_dtype)
        bases = np.sort(rng.choice(np.arange(0, 1000, 2), mr, replace=False)).astype(np.intp)
        offsets = (np.arange(taps) * 37 * 2).astype(np.intp)
        b = rng.integers(-2 ** 15, 2 ** 15, (n, taps * k_tap)).astype(np.int16)
        panels = T.pack_panels(b, nr)
        tiles = np.full((panels.shape[0], mr, nr), 7, np.int32)
        run(a, bases, offsets, panels, tiles)
        rows = np.stack([np.concatenate([a[s + o: s + o + k_tap] for o in offsets]) for s in bases])
        want = (rows.astype(np.int64) @ b.T.astype(np.int64))
        got = tiles.transpose(1, 0, 2).reshape(mr, -1)[:, :n].astype(np.int64)
        np.testing.assert_array_equal(got, (want + 2 ** 31) % 2 ** 32 - 2 ** 31)  # exact int32 (wrapping)


def test_pack_panels_layout():
    b = np.arange(5 * 3, dtype=np.int16).reshape(5, 3)
    p = T.pack_panels(b, 4)
    assert p.shape == (2, 2, 8)
    # panel 0, k pair 0: columns 0..3, each (k0, k1)
    assert p[0, 0].tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert p[0, 1].tolist() == [2, 0, 5, 0, 8, 0, 11, 0]  # k = 3 is padding
    assert p[1, 0].tolist() == [12, 13, 0, 0, 0, 0, 0, 0]  # column 5.. is padding


@pytest.mark.parametrize("rounding", [0, 1], ids=["double", "single"])
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_requantize_tile_matches_scalar_requantize(lanes, rounding):
    """Both epilogues (x86's double rounding, ruy arm64's single one) equal quant.requantize."""
    mr, nr = 4, 2 * lanes
    kernel = T.make_requantize_tile(mr, nr, lanes)

    @njit
    def vector(tile, rows, bias, mult, shift, o0, out, row0, zp, lo, hi):
        kernel(tile, rows, bias, mult, shift, o0, out, row0, o0, zp, lo, hi, rounding)

    @njit
    def scalar(tile, rows, bias, mult, shift, o0, out, row0, zp, lo, hi):
        for r in range(rows):
            for j in range(nr):
                c = o0 + j
                out[row0 + r, c] = requantize(np.int32(tile[r, j] + bias[c]), mult[c], shift[c], zp, lo, hi,
                                              rounding=rounding)

    rng = np.random.default_rng(lanes)
    for case in range(400):
        cout = 3 * nr
        wide = case % 3 == 0
        tile = (rng.integers(-2 ** 31, 2 ** 31, (mr, nr), dtype=np.int64) if wide
                else rng.integers(-2 ** 16, 2 ** 16, (mr, nr))).astype(np.int32)
        tile[0, :4] = [-2 ** 31, 2 ** 31 - 1, 0, -1]
        bias = rng.integers(-2 ** 12, 2 ** 12, cout).astype(np.int32)
        mult = rng.integers(2 ** 30, 2 ** 31, cout, dtype=np.int64).astype(np.int32)
        mult[:2] = -2 ** 31  # the one saturating SRDHM input
        shift = rng.integers(-31, 8, cout).astype(np.int32)
        shift[::5] = 0
        o0, rows = int(rng.integers(0, 3)) * nr, int(rng.integers(1, mr + 1))
        zp, lo, hi = np.int32(rng.integers(-128, 128)), np.int32(rng.integers(-128, 0)), np.int32(rng.integers(0, 128))
        got = np.zeros((mr + 4, cout), np.int8)
        want = np.zeros((mr + 4, cout), np.int8)
        vector(tile, rows, bias, mult, shift, o0, got, 2, zp, lo, hi)
        scalar(tile, rows, bias, mult, shift, o0, want, 2, zp, lo, hi)
        np.testing.assert_array_equal(got, want, err_msg=f"case {case}")


PORTABLE_CHECK = """
import numpy as np
from edge_qmul.kernels import tile
from edge_qmul.tflite import load_tflite
assert tile._N0 is None and tile._N1 is None, "the portable build must not call x86 instructions"
for name in ("mobilenet_tiny", "resnet_tiny"):
    model = load_tflite(f"tests/fixtures/{name}.tflite", litert="x86_64")  # the recorded references' platform
    d = np.load(f"tests/fixtures/{name}.npz")
    np.testing.assert_array_equal(model.predict(d["x"]), d["y_builtin"])
print("portable ok", tile.MR, tile.NR)
"""


@pytest.mark.slow
def test_portable_build_is_bit_exact_with_litert(tmp_path):
    # NUMBA_CPU_NAME=generic: numba targets a CPU without AVX, so the tile kernels take the form an
    # aarch64 board compiles (sext-mul-add, 128-bit-sized blocks); the fixtures must still equal
    # LiteRT built-in's outputs
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    env.pop("NUMBA_CPU_FEATURES", None)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "portable ok 4 8" in run.stdout
