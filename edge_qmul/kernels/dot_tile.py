"""int8 dot-product tile kernels: vpdpbusd (AVX-512 VNNI, AVX-VNNI) and sdot (aarch64 dot product).

    tile[r, j] = sum_k a[row_r, k] * B[j, k]      r < MR, j < NR, int32 (wrapping)

The same register tile as tile.py (MR x NR int32 sums in vector registers through the whole K
loop), but four k per instruction on int8 operands instead of two on int16: per quad of k, one load
of B's packed panel (NR columns x 4 k, int8), one 32-bit broadcast of a[row, k:k+4] per row, and
MR * NR / L dot-product instructions (L = int32 lanes).

The instructions differ in signedness:

  * vpdpbusd multiplies *unsigned* bytes of A by signed bytes of B. A holds x + 128 (x XOR 0x80 as
    uint8), so sum (x + 128) w = sum (x - zp_in) w + (zp_in + 128) sum w: the caller subtracts the
    per-output-channel correction (zp_in + 128) * sum_k w[o, k], computed once by the packer.
    Padding cells of A hold zp_in + 128 (they mean x - zp_in = 0).
  * sdot multiplies signed bytes by signed bytes. A holds x itself (x - zp_in need not fit int8),
    padding cells hold zp_in, and the correction is zp_in * sum_k w[o, k].

Both are exact: every product and quad sum fits int32 and the int32 accumulation wraps, so the
corrected sum equals the true sum mod 2^32, i.e. exactly whenever the true sum fits int32 (callers
guarantee that, as for the int16 path). ``A_SHIFT[kind]`` is the 128 or 0.

Panels: panel p holds columns p*NR .. p*NR+NR-1 as [k quad][column][4] int8, zero past the last
column and past K (K is rounded up to a multiple of 4 with zero weights; A is read 4 bytes at a time,
so a row's last quad may read up to 3 bytes past its K: callers keep those inside the buffer).

The run-time choice (``dot_kind``) comes from the CPU features numba compiles for
(tile.target_features()), on aarch64 Linux also from getauxval(AT_HWCAP) (HWCAP_ASIMDDP), and
EDGE_QMUL_DOT=off forces the portable int16 path. The IR builder (``emit_dot_tile``) works on raw
pointers and is called both from the numba intrinsic and, in tests, from a plain llvmlite module
compiled for aarch64 to show the sdot code.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .tile import loop, make_requantize_tile, target_features

_I8, _I32 = ir.IntType(8), ir.IntType(32)

HWCAP_ASIMDDP = 1 << 20
AT_HWCAP = 16


def _hwcap_dotprod() -> bool:
    """aarch64 Linux: the kernel's (or qemu-user's) HWCAP_ASIMDDP bit."""
    if platform.machine() not in ("aarch64", "arm64") or not hasattr(ctypes, "CDLL"):
        return False
    try:
        libc = ctypes.CDLL(None)
        getauxval = libc.getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        return bool(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)
    except (OSError, AttributeError):
        return False


def dot_kind(features: set[str] | None = None) -> str | None:
    """"vnni512" | "avxvnni" | "sdot" | None (the portable int16 path): the dot-product kernel the CPU
    that numba compiles for has. EDGE_QMUL_DOT=off forces None."""
    if os.environ.get("EDGE_QMUL_DOT", "").lower() in ("off", "0", "no", "false"):
        return None
    if features is None:
        return host_kind()
    if "avx512vnni" in features and "avx512bw" in features:
        return "vnni512"
    if "avxvnni" in features and "avx2" in features:
        return "avxvnni"
    if "dotprod" in features or _hwcap_dotprod():
        return "sdot"
    return None


@functools.lru_cache(maxsize=1)
def host_kind() -> str | None:
    """dot_kind() of the CPU numba compiles for, whatever EDGE_QMUL_DOT says."""
    env = os.environ.pop("EDGE_QMUL_DOT", None)
    try:
        return dot_kind(target_features())
    finally:
        if env is not None:
            os.environ["EDGE_QMUL_DOT"] = env


LOADING_KIND: str | None = None  # set while implicit_dot loads a copy of itself for another kind


# A holds x + A_SHIFT (as a byte); padding cells hold zp_in + A_SHIFT; correction (zp_in + A_SHIFT) * sum w
A_SHIFT = {"vnni512": 128, "avxvnni": 128, "sdot": 0, "generic": 0}


@dataclass(frozen=True)
class DotSpec:
    kind: str  # "vnni512" | "avxvnni" | "sdot" | "generic" (sdot's arithmetic in portable IR: tests)
    mr: int
    nr: int
    lanes: int


def specs(kind: str) -> tuple[DotSpec, DotSpec]:
    """(full, half) panel geometries of a kind: AVX-512 8 x 32 (16 zmm sums, as tile.py's int16
    kernel) and 8 x 16; AVX-VNNI 4 x 16 (ymm) and 4 x 8; NEON 4 x 16 (16 of the 32 q registers) and 4 x 8."""
    if kind == "vnni512":
        return DotSpec(kind, 8, 32, 16), DotSpec(kind, 8, 16, 16)
    if kind == "avxvnni":
        return DotSpec(kind, 4, 16, 8), DotSpec(kind, 4, 8, 8)
    if kind in ("sdot", "generic"):
        return DotSpec(kind, 4, 16, 4), DotSpec(kind, 4, 8, 4)
    raise ValueError(f"unknown dot kind {kind!r}")


def _dot(builder, spec: DotSpec, acc, a, b):
    """acc + per-lane dot products of 4 bytes: unsigned a x signed b (vpdpbusd) or signed x signed."""
    v_sum = ir.VectorType(_I32, spec.lanes)
    if spec.kind in ("vnni512", "avxvnni"):
        name = "llvm.x86.avx512.vpdpbusd.512" if spec.lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_sum, [v_sum] * 3), name)
        return builder.call(fn, [acc, a, b])
    v_bytes = ir.VectorType(_I8, 4 * spec.lanes)
    if spec.kind == "sdot":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_sum, [v_sum, v_bytes, v_bytes]),
                                            "llvm.aarch64.neon.sdot.v4i32.v16i8")
        return builder.call(fn, [acc, builder.bitcast(a, v_bytes), builder.bitcast(b, v_bytes)])
    # generic: signed x signed in portable IR
    v_wide = ir.VectorType(_I32, 4 * spec.lanes)
    prod = builder.mul(builder.sext(builder.bitcast(a, v_bytes), v_wide),
                       builder.sext(builder.bitcast(b, v_bytes), v_wide))
    out = acc
    for q in range(4):
        idx = ir.Constant(v_sum, [ir.Constant(_I32, 4 * i + q) for i in range(spec.lanes)])
        out = builder.add(out, builder.shuffle_vector(prod, prod, idx))
    return out


def emit_dot_tile(builder, spec: DotSpec, intp, a_ptr, bases_ptr, offsets_ptr, taps, quads, b_ptr, tile_ptr):
    """Emit the tile loop at the builder's position:

        tile[r, j] = sum_t sum_q sum_i a[bases[r] + offsets[t] + 4q + i] * panel[t * quads + q][j][i]

    a_ptr: i8* (bytes of A); bases_ptr, offsets_ptr: intp* (mr bases, ``taps`` offsets); quads: k quads
    per tap; b_ptr: i8*, the panel's start ([quad][column][4] int8); tile_ptr: i32*, mr x nr int32 out."""
    mr, nr, lanes = spec.mr, spec.nr, spec.lanes
    nv = nr // lanes
    v_sum = ir.VectorType(_I32, lanes)
    zeros_idx = ir.Constant(v_sum, [ir.Constant(_I32, 0)] * lanes)
    row_starts = [builder.gep(a_ptr, [builder.load(builder.gep(bases_ptr, [ir.Constant(intp, r)]))])
                  for r in range(mr)]
    b_vec_ptr = builder.bitcast(b_ptr, v_sum.as_pointer())

    def tap_body(t, sums):
        offset = builder.load(builder.gep(offsets_ptr, [t]))
        rows = [builder.bitcast(builder.gep(start, [offset]), _I32.as_pointer()) for start in row_starts]
        first = builder.mul(t, quads)

        def quad_body(q, sums):
            at = builder.mul(builder.add(first, q), ir.Constant(intp, nv))
            b_vecs = [builder.load(builder.gep(b_vec_ptr, [builder.add(at, ir.Constant(intp, v))]), align=4)
                      for v in range(nv)]
            out = []
            for r in range(mr):
                quad = builder.load(builder.gep(rows[r], [q]), align=1)
                one = builder.insert_element(ir.Constant(ir.VectorType(_I32, 1), None), quad, ir.Constant(_I32, 0))
                a_vec = builder.shuffle_vector(one, one, zeros_idx)
                out += [_dot(builder, spec, sums[r * nv + v], a_vec, b_vecs[v]) for v in range(nv)]
            return out

        return loop(builder, quads, intp, sums, quad_body, "dot.quads")

    sums = loop(builder, taps, intp, [ir.Constant(v_sum, None)] * (mr * nv), tap_body, "dot.taps")
    out_ptr = builder.bitcast(tile_ptr, v_sum.as_pointer())
    for r in range(mr):
        for v in range(nv):
            builder.store(sums[r * nv + v], builder.gep(out_ptr, [ir.Constant(intp, r * nv + v)]), align=4)


def standalone_module(spec: DotSpec, triple: str = "", name: str = "dot_tile") -> ir.Module:
    """A module with ``void dot_tile(i8* a, i64* bases, i64* offsets, i64 taps, i64 quads, i8* panel,
    i32* tile)`` built by emit_dot_tile: the kernel's code outside numba (tests compile it for aarch64)."""
    module = ir.Module(name=name)
    if triple:
        module.triple = triple
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), i64.as_pointer(), i64.as_pointer(), i64, i64,
                                           _I8.as_pointer(), _I32.as_pointer()])
    fn = ir.Function(module, fnty, name)
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    emit_dot_tile(builder, spec, i64, *fn.args)
    builder.ret_void()
    return module


# the function attribute that lets a function use sdot when numba's CPU (NUMBA_CPU_NAME, or LLVM's host
# detection under qemu-user) lacks the feature the kernel's HWCAP reports
DOTPROD_ATTRIBUTE = '"target-features"="+neon,+dotprod"'


def _needs_dotprod_attribute(spec: DotSpec) -> bool:
    return spec.kind == "sdot" and "dotprod" not in target_features()


def make_dot_tile_kernel(spec: DotSpec):
    """An intrinsic ``dot_tile(a, bases, offsets, panels, p, tile)``: emit_dot_tile over

        a: C-contiguous uint8/int8 array read flat; bases: intp (mr,); offsets: intp (taps,);
        panels: int8 (P, KQ, 4 * nr), KQ = taps * quads; p: the panel; tile: int32 C-contiguous (mr, nr).
    """

    @intrinsic
    def dot_tile(typingctx, a, bases, offsets, panels, p, tile):
        sig = types.void(a, bases, offsets, panels, p, tile)

        def codegen(context, builder, signature, args):
            a_v, bases_v, offsets_v, panels_v, p_v, tile_v = args
            a_ty, bases_ty, offsets_ty, panels_ty, p_ty, tile_ty = signature.args
            if _needs_dotprod_attribute(spec):
                # HWCAP says dotprod but numba's CPU lacks it: let this function use sdot
                set.add(builder.function.attributes, DOTPROD_ATTRIBUTE)  # (llvmlite knows no string attributes)
            intp = context.get_value_type(types.intp)
            p_v = context.cast(builder, p_v, p_ty, types.intp)
            arr_a = context.make_array(a_ty)(context, builder, a_v)
            arr_bases = context.make_array(bases_ty)(context, builder, bases_v)
            arr_offsets = context.make_array(offsets_ty)(context, builder, offsets_v)
            arr_b = context.make_array(panels_ty)(context, builder, panels_v)
            arr_t = context.make_array(tile_ty)(context, builder, tile_v)
            taps = builder.extract_value(arr_offsets.shape, 0)
            quads = builder.sdiv(builder.extract_value(arr_b.shape, 1), taps)
            b_ptr = builder.gep(builder.bitcast(arr_b.data, _I8.as_pointer()),
                                [builder.mul(p_v, builder.extract_value(arr_b.strides, 0))])
            emit_dot_tile(builder, spec, intp, builder.bitcast(arr_a.data, _I8.as_pointer()),
                          builder.bitcast(arr_bases.data, intp.as_pointer()),
                          builder.bitcast(arr_offsets.data, intp.as_pointer()), taps, quads, b_ptr,
                          builder.bitcast(arr_t.data, _I32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return dot_tile


class DotKernels:
    """A kind's intrinsics: full and half panel tiles and their requantizing epilogues (tile.py's,
    bit-identical to the int16 path's)."""

    def __init__(self, kind: str):
        full, half = specs(kind)
        self.kind, self.mr, self.nr, self.nr_half = kind, full.mr, full.nr, half.nr
        self.a_shift = A_SHIFT[kind]
        self.tile = make_dot_tile_kernel(full)
        self.tile_half = make_dot_tile_kernel(half)
        self.requantize = make_requantize_tile(full.mr, full.nr, full.lanes)
        self.requantize_half = make_requantize_tile(half.mr, half.nr, half.lanes)
