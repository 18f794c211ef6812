"""The register-blocked int16 tile kernel, written in LLVM vector IR (a numba intrinsic).

    tile[r, j] = sum_k a[row_r, k] * B[j, k]      r < MR, j < NR, int32

numba has no vector types, so a plain loop leaves the vectorizing to LLVM, which vectorizes along
the reduction (4 useful products per instruction, measured; benchmarks/README.md). Here the MR x NR
int32 sums are explicit vector registers that live through the whole K loop, as in ruy's and
XNNPACK's kernels: per pair of k, one load of B's packed panel (NR columns x 2 k, int16), one
broadcast of a[row, k:k+2] per row, and MR * NR / L pair multiply-adds, L = vector lanes.

The pair multiply-add is ``pmaddwd`` (int16 pairs -> int32, vpdpwssd once LLVM fuses the add on
AVX-512 VNNI), called by name on x86 and written as sext-mul-add on every other target (aarch64
NEON gets smull/smlal from it), so the kernel is portable and bit-identical everywhere: each pair
sum and the total are exact int32 as long as callers keep the true sums inside int32.

B is packed once per call by ``pack_panels``: panel p holds columns p*NR .. p*NR+NR-1 as
[k pair][column][2] int16, zero past the last column and past K (so an odd K reads one extra A
element per row, multiplied by 0: A's row buffer must hold an even number of int16s).
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant import SINGLE_ROUNDING

_I16, _I32 = ir.IntType(16), ir.IntType(32)


def target_features() -> set[str]:
    """CPU features numba compiles for: NUMBA_CPU_NAME/NUMBA_CPU_FEATURES when set, else the host's."""
    if numba.config.CPU_NAME:
        return {f[1:] for f in (numba.config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    return {name for name, on in llvm_binding.get_host_cpu_features().items() if on}


def tile_variants(features: set[str]) -> tuple[int, list[tuple[int, int, str | None]]]:
    """MR and the panel widths for a target, widest first: [(NR, lanes, x86 pmaddwd intrinsic or None)].

    AVX-512: 8 rows x 32 columns = 16 zmm sums (8x32 measured fastest of 4x32, 6x32, 8x16, 12x32,
    4x64 on MobileNetV2 / ResNet-18 / FC shapes), and 8x16, 8x8 (ymm) for narrow outputs, which
    would leave most of a 32-column panel empty. AVX2 and 128-bit targets (NEON): 4 rows x 2
    vectors = 8 sums, leaving registers for B and the broadcasts, and one vector for narrow outputs.
    """
    avx2 = "llvm.x86.avx2.pmadd.wd"
    if "avx512bw" in features:
        avx512 = "llvm.x86.avx512.pmaddw.d.512"
        return 8, [(32, 16, avx512), (16, 16, avx512), (8, 8, avx2)]
    if "avx2" in features:
        return 4, [(16, 8, avx2), (8, 8, avx2), (8, 8, avx2)]
    return 4, [(8, 4, None), (4, 4, None), (4, 4, None)]


def loop(builder, count, intp, carried, body_fn, name):
    """for i in range(count): carried = body_fn(i, carried); the carried values are phis."""
    entry = builder.block
    head = builder.append_basic_block(name + ".head")
    body = builder.append_basic_block(name + ".body")
    done = builder.append_basic_block(name + ".done")
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(intp)
    i.add_incoming(ir.Constant(intp, 0), entry)
    phis = []
    for value in carried:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        phis.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, count), body, done)
    builder.position_at_end(body)
    updated = body_fn(i, phis)
    i_next = builder.add(i, ir.Constant(intp, 1))
    end = builder.block
    builder.branch(head)
    i.add_incoming(i_next, end)
    for phi, value in zip(phis, updated):
        phi.add_incoming(value, end)
    builder.position_at_end(done)
    return phis


def make_tile_kernel(mr: int, nr: int, lanes: int, native: str | None):
    """An intrinsic ``tile_kernel(a, bases, offsets, panels, p, tile)``:

        tile[r, j] = sum_t sum_k a.flat[bases[r] + offsets[t] + k] * B[p * nr + j, t * K_t + k]

    ``a``: a C-contiguous int16 (or int8, widened on load) array read flat; ``bases``: intp, the start of each of the mr rows;
    ``offsets``: intp, one per tap, each tap covering K_t = 2 * panels.shape[1] / len(offsets)
    consecutive elements. A plain product is one tap at offset 0 with bases[r] = row * row_length;
    a convolution reads its input in place (implicit GEMM): a tap per filter position, offset
    (ky * W + kx) * C into the zero-padded int16 input, bases at each output position's corner.
    ``panels``: pack_panels' int16 (P, K2, 2 * nr); ``tile``: int32 C-contiguous (mr, nr).
    """
    nv = nr // lanes
    v_sum = ir.VectorType(_I32, lanes)
    v_pairs = ir.VectorType(_I16, 2 * lanes)
    v_wide = ir.VectorType(_I32, 2 * lanes)
    even = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 2 * i) for i in range(lanes)])
    odd = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 2 * i + 1) for i in range(lanes)])
    splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)

    def pair_products(builder, a, b):
        # lane i: a[2i] * b[2i] + a[2i+1] * b[2i+1]
        if native:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_sum, [v_pairs, v_pairs]), native)
            return builder.call(fn, [a, b])
        prod = builder.mul(builder.sext(a, v_wide), builder.sext(b, v_wide))
        return builder.add(builder.shuffle_vector(prod, prod, even), builder.shuffle_vector(prod, prod, odd))

    @intrinsic
    def tile_kernel(typingctx, a, bases, offsets, panels, p, tile):
        sig = types.void(a, bases, offsets, panels, p, tile)

        def codegen(context, builder, signature, args):
            a_v, bases_v, offsets_v, panels_v, p_v, tile_v = args
            a_ty, bases_ty, offsets_ty, panels_ty, p_ty, tile_ty = signature.args
            intp = context.get_value_type(types.intp)
            p_v = context.cast(builder, p_v, p_ty, types.intp)
            arr_a = context.make_array(a_ty)(context, builder, a_v)
            arr_bases = context.make_array(bases_ty)(context, builder, bases_v)
            arr_offsets = context.make_array(offsets_ty)(context, builder, offsets_v)
            arr_b = context.make_array(panels_ty)(context, builder, panels_v)
            arr_t = context.make_array(tile_ty)(context, builder, tile_v)
            a_int8 = a_ty.dtype == types.int8
            a_elem = ir.IntType(8) if a_int8 else _I16
            a_data = builder.bitcast(arr_a.data, a_elem.as_pointer())
            bases_data = builder.bitcast(arr_bases.data, intp.as_pointer())
            offsets_data = builder.bitcast(arr_offsets.data, intp.as_pointer())
            row_starts = [builder.gep(a_data, [builder.load(builder.gep(bases_data, [ir.Constant(intp, r)]))])
                          for r in range(mr)]
            taps = builder.extract_value(arr_offsets.shape, 0)
            k2 = builder.sdiv(builder.extract_value(arr_b.shape, 1), taps)  # k pairs per tap
            b_base = builder.add(builder.ptrtoint(arr_b.data, intp),
                                 builder.mul(p_v, builder.extract_value(arr_b.strides, 0)))
            b_ptr = builder.inttoptr(b_base, v_pairs.as_pointer())
            zero = ir.Constant(v_sum, None)

            def tap_body(t, sums):
                offset = builder.load(builder.gep(offsets_data, [t]))
                pair_ty = _I16 if a_int8 else _I32  # two elements of a, loaded as one integer
                rows = [builder.bitcast(builder.gep(start, [offset]), pair_ty.as_pointer()) for start in row_starts]
                first_pair = builder.mul(t, k2)

                def pair_body(kk, sums):
                    at = builder.mul(builder.add(first_pair, kk), ir.Constant(intp, nv))
                    b_vecs = [builder.load(builder.gep(b_ptr, [builder.add(at, ir.Constant(intp, v))]), align=2)
                              for v in range(nv)]
                    out = []
                    for r in range(mr):
                        pair = builder.load(builder.gep(rows[r], [kk]), align=1 if a_int8 else 2)
                        if a_int8:  # two int8 -> two int16, as one int32
                            two = builder.sext(builder.bitcast(pair, ir.VectorType(ir.IntType(8), 2)),
                                               ir.VectorType(_I16, 2))
                            pair = builder.bitcast(two, _I32)
                        one = builder.insert_element(ir.Constant(ir.VectorType(_I32, 1), None), pair,
                                                     ir.Constant(_I32, 0))
                        a_vec = builder.bitcast(builder.shuffle_vector(one, one, splat), v_pairs)
                        out += [builder.add(sums[r * nv + v], pair_products(builder, a_vec, b_vecs[v]))
                                for v in range(nv)]
                    return out

                return loop(builder, k2, intp, sums, pair_body, "tile.pairs")

            sums = loop(builder, taps, intp, [zero] * (mr * nv), tap_body, "tile.taps")
            t_base = builder.ptrtoint(arr_t.data, intp)
            for r in range(mr):
                for v in range(nv):
                    addr = builder.add(t_base, ir.Constant(intp, 4 * (r * nr + v * lanes)))
                    builder.store(sums[r * nv + v], builder.inttoptr(addr, v_sum.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile_kernel


MR, _VARIANTS = tile_variants(target_features())
(NR, _L0, _N0), (NR_HALF, _L1, _N1), (NR_QUARTER, _L2, _N2) = _VARIANTS
tile_kernel = make_tile_kernel(MR, NR, _L0, _N0)
tile_kernel_half = make_tile_kernel(MR, NR_HALF, _L1, _N1)
tile_kernel_quarter = make_tile_kernel(MR, NR_QUARTER, _L2, _N2)


@njit(cache=True)
def pack_panels(b, nr=NR):
    """B (N, K) int8/int16 -> panels (ceil(N / nr), ceil(K / 2), 2 * nr): [panel][k pair][column][2],
    zero-padded."""
    return pack_runs(b, nr, b.shape[1], b.shape[1])


@njit(cache=True)
def pack_runs(b, nr, run, padded_run):
    """pack_panels of a B whose rows are runs of ``run`` values (a filter's channels per tap), each
    placed ``padded_run`` apart in k with zeros between: K' = K / run * padded_run."""
    n, k = b.shape
    k_out = k // run * padded_run
    k2 = (k_out + 1) // 2
    out = np.zeros(((n + nr - 1) // nr, k2, 2 * nr), np.int16)
    dst = out.reshape(-1)
    src = np.ascontiguousarray(b).reshape(-1)
    for o in range(n):  # flat unsigned indices: no negative-index fix-ups in the loop
        base = np.uint64((o // nr) * k2 * 2 * nr + 2 * (o % nr))
        for r in range(k // run):
            s0 = np.uint64(o * k + r * run)
            t0 = r * padded_run
            for c in range(run):
                t = t0 + c
                dst[base + np.uint64((t >> 1) * 2 * nr + (t & 1))] = src[s0 + np.uint64(c)]
    return out


def make_requantize_tile(mr: int, nr: int, lanes: int):
    """An intrinsic ``requantize_tile(tile, rows, bias, mult, shift, o0, out, row0, col0, zp, lo, hi,
    rounding)``:

        out[row0 + r, col0 + j] = requantize(tile[r, j] + bias[o0 + j], mult[o0 + j], shift[o0 + j], zp, lo, hi,
                                             rounding=rounding)

    for r < rows, j < nr, with quant.requantize's arithmetic in int32 vector lanes (only the
    product is 64-bit): quant.DOUBLE_ROUNDING is SRDHM then a rounding right shift with ties toward
    +inf (LiteRT's x86 epilogue), quant.SINGLE_ROUNDING ruy arm64's sqdmulh then a rounding shift of
    at least one bit. Plain numba loops promote every step to int64 lanes (half the width, measured
    0.29 ns per output). Needs o0 + nr <= len(bias), col0 + nr <= out.shape[1] and unit inner strides.
    """
    nv = nr // lanes
    v32 = ir.VectorType(_I32, lanes)
    v64 = ir.VectorType(ir.IntType(64), lanes)
    v8 = ir.VectorType(ir.IntType(8), lanes)

    def splat(builder, value, vec_ty):
        one = builder.insert_element(ir.Constant(ir.VectorType(vec_ty.element, 1), None), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes))

    def const(vec_ty, value):
        return ir.Constant(vec_ty, [ir.Constant(vec_ty.element, value)] * lanes)

    def smax(builder, a, b):
        return builder.select(builder.icmp_signed(">", a, b), a, b)

    def smin(builder, a, b):
        return builder.select(builder.icmp_signed("<", a, b), a, b)

    @intrinsic
    def requantize_tile(typingctx, tile, rows, bias, mult, shift, o0, out, row0, col0, zp, lo, hi, rounding):
        sig = types.void(tile, rows, bias, mult, shift, o0, out, row0, col0, zp, lo, hi, rounding)

        def codegen(context, builder, signature, args):
            (tile_v, rows_v, bias_v, mult_v, shift_v, o0_v, out_v, row0_v, col0_v, zp_v, lo_v, hi_v,
             rounding_v) = args
            tys = signature.args
            intp = context.get_value_type(types.intp)

            def as_intp(v, ty):
                return context.cast(builder, v, ty, types.intp)

            def as_i32(v, ty):
                return context.cast(builder, v, ty, types.int32)

            rows_v, o0_v, row0_v = as_intp(rows_v, tys[1]), as_intp(o0_v, tys[5]), as_intp(row0_v, tys[7])
            col0_v = as_intp(col0_v, tys[8])
            zp = splat(builder, as_i32(zp_v, tys[9]), v32)
            lo = splat(builder, as_i32(lo_v, tys[10]), v32)
            hi = splat(builder, as_i32(hi_v, tys[11]), v32)
            arr_tile = context.make_array(tys[0])(context, builder, tile_v)
            arr_out = context.make_array(tys[6])(context, builder, out_v)

            def channel_vectors(arr_v, ty):
                arr = context.make_array(ty)(context, builder, arr_v)
                base = builder.gep(builder.bitcast(arr.data, _I32.as_pointer()), [o0_v])
                return [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(intp, v * lanes)]),
                                                     v32.as_pointer()), align=4) for v in range(nv)]

            biases, mults, shifts = (channel_vectors(args[k], tys[k]) for k in (2, 3, 4))
            zero, one = const(v32, 0), const(v32, 1)
            single = builder.icmp_signed("==", as_i32(rounding_v, tys[12]), ir.Constant(_I32, SINGLE_ROUNDING))
            # the 64-bit product's rounding constant: 2^30 for SRDHM, 0 for sqdmulh (floor)
            nudge = builder.select(single, const(v64, 0), const(v64, 1 << 30))
            per_vector = []
            for v in range(nv):
                s = shifts[v]
                # double: left = max(s, 0), right = max(-s, 0); single (ruy arm64): right = max(-s, 1),
                # left = s + right, so there is always a rounding shift of one bit or more
                right = smax(builder, builder.sub(zero, s), builder.select(single, one, zero))
                left = builder.select(single, builder.add(s, right), smax(builder, s, zero))
                has_right = builder.icmp_signed(">", right, zero)
                right_1 = builder.select(has_right, builder.sub(right, one), zero)
                per_vector.append((left, right, right_1, builder.zext(has_right, v32),
                                   builder.sext(mults[v], v64),
                                   builder.icmp_signed("==", mults[v], const(v32, -(2 ** 31)))))
            out_base = builder.ptrtoint(arr_out.data, intp)
            out_stride = builder.extract_value(arr_out.strides, 0)
            with cgutils.for_range(builder, rows_v) as loop:
                r = loop.index
                t_row = builder.gep(builder.bitcast(arr_tile.data, _I32.as_pointer()),
                                    [builder.mul(r, ir.Constant(intp, nr))])
                o_row = builder.add(out_base, builder.add(builder.mul(builder.add(row0_v, r), out_stride), col0_v))
                for v in range(nv):
                    left, right, right_1, round_bit, m64, m_min = per_vector[v]
                    acc = builder.load(builder.bitcast(builder.gep(t_row, [ir.Constant(intp, v * lanes)]),
                                                       v32.as_pointer()), align=4)
                    x = builder.shl(builder.add(acc, biases[v]), left)
                    # SRDHM: floor((x * m + 2^30) / 2^31) (sqdmulh: without the 2^30), saturating
                    # only for (-2^31)^2
                    prod = builder.add(builder.mul(builder.sext(x, v64), m64), nudge)
                    q = builder.trunc(builder.ashr(prod, const(v64, 31)), v32)
                    saturate = builder.and_(m_min, builder.icmp_signed("==", x, const(v32, -(2 ** 31))))
                    q = builder.select(saturate, const(v32, 2 ** 31 - 1), q)
                    # quant.rounding_shift_right_half_up in int32 lanes: (q >> r) + ((q >> (r - 1)) & 1)
                    y = builder.add(builder.ashr(q, right), builder.and_(builder.ashr(q, right_1), round_bit))
                    y = smin(builder, smax(builder, builder.add(y, zp), lo), hi)
                    dst = builder.inttoptr(builder.add(o_row, ir.Constant(intp, v * lanes)), v8.as_pointer())
                    builder.store(builder.trunc(y, v8), dst, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return requantize_tile


requantize_tile = make_requantize_tile(MR, NR, _L0)
requantize_tile_half = make_requantize_tile(MR, NR_HALF, _L1)
requantize_tile_quarter = make_requantize_tile(MR, NR_QUARTER, _L2)
