"""What each op becomes in a compiled plan: a line of source calling its kernel's compiled core.

An emitter does, once at plan time, what the op's Python ``forward`` does on every call (pad the
per-channel parameters, lay out the implicit GEMM's border, choose the loop) and writes the one
call that is left, with the op's scalars as literals and its arrays as slots of the plan's
constant tuple. Every emitter calls the same compiled core as the per-op path, so the two agree bit
for bit (tests/test_plan.py checks it on every fixture and zoo model). An op kind without an
emitter here runs through the per-op path (the plan splits around it).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..kernels import add, depthwise, fully_connected, implicit_dot, implicit_gemm, mean, pool, quantize, softmax
from ..kernels.dot_tile import dot_kind
from ..kernels.gemm import padded_params
from ..kernels.implicit_gemm import border_geometry, conv2d_int8_implicit


def _packed(pack, op_index: int, p, *args):
    """A derived-constant maker: (panels, requantization table) of op ``op_index`` from its current
    weights and bias (``pack(weights, *args)`` -> (panels, correction); implicit_dot.requant_table)."""
    def make(model):
        op = model.ops[op_index]
        panels, correction = pack(model.tensors[op.inputs[1]].data, *args)
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        bias = model.tensors[op.inputs[2]].data if has_bias else p.zero_bias
        table = implicit_dot.requant_table(panels, correction, np.ascontiguousarray(bias, np.int32),
                                           np.ascontiguousarray(p.rq.multiplier, np.int32),
                                           np.ascontiguousarray(p.rq.shift, np.int32))
        return panels, table
    return make


def emit_conv(g, op, p, model) -> None:
    if dot_kind() is not None:
        return emit_conv_dot(g, op, p, model)
    v, r = p.win, p.rq
    w = model.tensors[op.inputs[1]].data
    cout, k_h, k_w, cin = w.shape
    in_h, in_w = model.tensors[op.inputs[0]].shape[1:3]
    rows, cols, channels, tap_len, offsets = border_geometry(in_h, in_w, cin, v, k_h, k_w)
    bias = g.bias(op, p.zero_bias)
    mult_p, shift_p = p.panel_requant or padded_params(r.multiplier, r.shift)
    per_sample = v.out_h * v.out_w
    chunk = f"{g.fn(implicit_gemm.positions_per_task_for)}(n * {per_sample}, {2 * len(offsets) * tap_len}, threads)"
    args = (f"{g.x(op, 0)}, {g.x(op, 1)}, {p.input_offset}, {v.pad_top}, {v.pad_left}, {rows}, {cols}, "
            f"{channels}, {tap_len}, {g.const(offsets)}, {g.padded(bias)}, {g.const(mult_p)}, "
            f"{g.const(shift_p)}, {r.out_zero_point}, {r.act_min}, {r.act_max}, {v.stride_h}, {v.stride_w}, "
            f"{v.out_h}, {v.out_w}, {chunk}, {r.rounding}")
    call = g.call(conv2d_int8_implicit, args, g.macs(op))
    g.assign(op, f"{call}.reshape((n, {v.out_h}, {v.out_w}, {cout}))")


def emit_conv_dot(g, op, p, model) -> None:
    """CONV_2D on the int8 dot-product tiles (implicit_dot), the filters packed once per weights."""
    v, r = p.win, p.rq
    w = model.tensors[op.inputs[1]].data
    cout, k_h, k_w, cin = w.shape
    in_h, in_w = model.tensors[op.inputs[0]].shape[1:3]
    lay = implicit_dot.conv_layout(in_h, in_w, cin, k_h, k_w, v.out_h, v.out_w, v.stride_h, v.stride_w, v.dil_h,
                                   v.dil_w, v.pad_top, v.pad_left)
    make = _packed(implicit_dot.pack_conv, op.index, p, -p.input_offset, v.dil_w, implicit_dot.KIND)
    panels, table = g.derived(f"pack{op.index}", make, 0), g.derived(f"pack{op.index}", make, 1)
    positions = f"n * {v.out_h * v.out_w}"
    out = g.tmp()
    g.line(f"{out} = np.empty(({positions}, {cout}), np.int8)")
    args = (f"{g.x(op, 0)}, {panels}, {table}, {g.const(lay.offsets)}, {out}, {v.pad_top}, {v.pad_left}, "
            f"{lay.rows}, {lay.cols}, {lay.channels}, {-p.input_offset}, {r.out_zero_point}, {r.act_min}, "
            f"{r.act_max}, {v.stride_h}, {v.stride_w}, {v.out_h}, {v.out_w}, {r.rounding}")
    g.line(g.call(implicit_dot.conv_run, args, g.macs(op), twin=implicit_dot.conv_run_serial))
    g.assign(op, f"{out}.reshape((n, {v.out_h}, {v.out_w}, {cout}))")


def emit_fully_connected_dot(g, op, p, model) -> None:
    """FULLY_CONNECTED on the dot tiles at any number of rows, the weights packed once per weights."""
    r = p.rq
    cout = model.tensors[op.inputs[1]].data.shape[0]
    make = _packed(implicit_dot.pack_fc, op.index, p, -p.input_offset, implicit_dot.KIND)
    panels, table = g.derived(f"pack{op.index}", make, 0), g.derived(f"pack{op.index}", make, 1)
    rows, out = g.tmp(), g.tmp()
    g.line(f"{rows} = np.ascontiguousarray({g.x(op, 0)}).reshape((-1, {p.depth}))")
    g.line(f"{out} = np.empty(({rows}.shape[0], {cout}), np.int8)")
    args = f"{rows}, {panels}, {table}, {out}, {r.out_zero_point}, {r.act_min}, {r.act_max}, {r.rounding}"
    g.line(g.call(implicit_dot.fc_run, args, g.macs(op), twin=implicit_dot.fc_run_serial))
    shape = ", ".join(map(str, p.out_shape))
    g.assign(op, f"{out}.reshape((n, {shape}))")


def emit_depthwise(g, op, p, model) -> None:
    v, r = p.win, p.rq
    args = (f"{g.x(op, 0)}, {g.x(op, 1)}, {g.bias(op, p.zero_bias)}, {p.input_offset}, {p.depth_multiplier}, "
            f"{g.const(r.multiplier)}, {g.const(r.shift)}, {r.out_zero_point}, {r.act_min}, {r.act_max}, "
            f"{v.stride_h}, {v.stride_w}, {v.dil_h}, {v.dil_w}, {v.pad_top}, {v.pad_left}, {v.out_h}, "
            f"{v.out_w}, {r.rounding}")
    g.assign(op, g.call(depthwise.depthwise_int8, args, g.macs(op)))


def emit_fully_connected(g, op, p, model) -> None:
    if dot_kind() is not None:
        return emit_fully_connected_dot(g, op, p, model)
    r = p.rq
    w = model.tensors[op.inputs[1]].data
    if not w.flags.c_contiguous:
        raise NotImplementedError("non-contiguous filter")
    per_sample = int(np.prod(model.tensors[op.inputs[0]].shape[1:])) // p.depth
    rows = g.tmp()
    g.line(f"{rows} = np.ascontiguousarray({g.x(op, 0)}).reshape((-1, {p.depth}))")
    args = (f"{rows}, {g.x(op, 1)}, {g.bias(op, p.zero_bias)}, {p.input_offset}, {g.const(r.multiplier)}, "
            f"{g.const(r.shift)}, {r.out_zero_point}, {r.act_min}, {r.act_max}, {r.rounding}")
    gemm = g.call(fully_connected.fully_connected_int8_gemm, args, g.macs(op))
    dots = g.call(fully_connected.fully_connected_int8, args, g.macs(op))
    shape = ", ".join(map(str, p.out_shape))
    g.assign(op, f"({gemm} if n * {per_sample} >= 4 else {dots}).reshape((n, {shape}))")


def emit_pool(g, op, p, model) -> None:
    v = p.win
    core = pool.average_pool_int8 if op.kind == "AVERAGE_POOL_2D" else pool.max_pool_int8
    args = (f"{g.x(op, 0)}, {p.filter_h}, {p.filter_w}, {v.stride_h}, {v.stride_w}, {v.pad_top}, {v.pad_left}, "
            f"{v.out_h}, {v.out_w}, {p.act_min}, {p.act_max}")
    g.assign(op, g.call(core, args, g.macs(op)))


def emit_reshape(g, op, p, model) -> None:
    shape = "".join(f", {d}" for d in p.out_shape)
    g.assign(op, f"np.ascontiguousarray({g.x(op, 0)}).reshape((n{shape}))")


def emit_add(g, op, p, model) -> None:
    # as add.forward: each operand of full rank brings its own batch (a zero state made by FILL has
    # batch 1 beside a batch of inputs), the output has the larger
    rank = len(p.out_shape) + 1
    flat, leads = [], []
    for k in (0, 1):
        t = model.tensors[op.inputs[k]]
        if t.is_constant and len(t.shape) == rank and t.shape[0] != 1:
            raise NotImplementedError("a constant with a batch axis")
        lead = f"{g.x(op, k)}.shape[0]" if len(t.shape) == rank and not t.is_constant else "1"
        name = g.tmp()
        g.line(f"{name} = np.ascontiguousarray({g.x(op, k)}).reshape(({lead}, -1))")
        flat.append(name)
        leads.append(f"{name}.shape[0]")
    a, b = flat
    g.line(f"n = max({leads[0]}, {leads[1]})")
    scalars = (f"{p.offset1}, {p.offset2}, {p.mult1}, {p.shift1}, {p.mult2}, {p.shift2}, {p.out_mult}, "
               f"{p.out_shift}, {p.out_zero_point}, {p.act_min}, {p.act_max}")
    general = g.call(add.add_int8, f"{a}, {b}, n, {g.const(p.index1)}, {g.const(p.index2)}, "
                                   f"{g.const(p.loop)}, {scalars}", g.macs(op))
    shape = "".join(f", {d}" for d in p.out_shape)
    if p.vector_end >= 0:
        same = g.call(add.add_int8_same, f"{a}, {b}, {p.vector_end}, {scalars}", g.macs(op))
        g.assign(op, f"({same} if {a}.shape == {b}.shape else {general}).reshape((n{shape}))")
    else:
        g.assign(op, f"{general}.reshape((n{shape}))")


def emit_mean(g, op, p, model) -> None:
    shape = "".join(f", {d}" for d in p.out_shape)
    if p.spatial:
        y = g.call(mean.mean_keep_dims_int8, f"{g.x(op, 0)}, {p.bias}, {p.multiplier}, {p.shift}", g.macs(op))
    else:
        x = g.x(op, 0)
        if p.perm is not None:
            x = f"np.ascontiguousarray(np.transpose({x}, {tuple(p.perm)}))"
        fold = "".join(f", {d}" for d in p.fold)
        y = g.call(mean.mean_reduce_int8, f"np.ascontiguousarray({x}).reshape((n{fold})), {p.input_zero_point}, "
                                          f"{p.out_zero_point}, {p.multiplier}, {p.shift}, {p.count}", g.macs(op))
    g.assign(op, f"{y}.reshape((n{shape}))")


def emit_softmax(g, op, p, model) -> None:
    x = g.x(op, 0)
    depth = model.tensors[op.inputs[0]].shape[-1]
    flat = f"np.ascontiguousarray({x}).reshape((-1, {depth}))"
    if p.table16 is not None:
        y = g.call(softmax.softmax_int8_uint16_table,
                   f"{flat}, {g.const(p.table16)}, {g.literal(p.out_scale)}, {p.out_zero_point}", g.macs(op))
    else:
        y = g.call(softmax.softmax_int8, f"{flat}, {g.const(p.table)}, {g.literal(p.out_scale)}, "
                                         f"{p.out_zero_point}", g.macs(op))
    g.assign(op, f"{y}.reshape({x}.shape)")


def emit_quantize(g, op, p, model) -> None:
    x = g.x(op, 0)
    size = int(np.prod(model.tensors[op.inputs[0]].shape[1:]))
    flat = f"np.ascontiguousarray({x}).reshape((n, {size}))"
    if p.from_float:
        y = g.call(quantize_float, f"{flat}, {size - size % 8}, {g.literal(np.float32(1.0 / float(p.out_q.s)))}, "
                                   f"{g.literal(float(p.out_q.s))}, {p.out_q.zp}", g.macs(op))
    else:
        y = g.call(quantize.requantize_int8, f"{flat}, {size - size % 16}, {p.in_zero_point}, {p.multiplier}, "
                                             f"{p.shift}, {p.out_q.zp}", g.macs(op))
    g.assign(op, f"{y}.reshape({x}.shape)")


def emit_dequantize(g, op, p, model) -> None:
    x = g.x(op, 0)
    size = int(np.prod(model.tensors[op.inputs[0]].shape[1:]))
    scale, zp = float(p.in_q.s), p.in_q.zp
    args = (f"np.ascontiguousarray({x}).reshape((n, {size})), {size - size % 8}, {g.literal(scale)}, {zp}, "
            f"{g.literal(np.float32(scale))}, {g.literal(np.float32(-zp * scale))}, {bool(p.fma)}")
    g.assign(op, f"{g.call(dequantize_float, args, g.macs(op))}.reshape({x}.shape)")


EMITTERS = {
    "CONV_2D": emit_conv, "DEPTHWISE_CONV_2D": emit_depthwise, "FULLY_CONNECTED": emit_fully_connected,
    "AVERAGE_POOL_2D": emit_pool, "MAX_POOL_2D": emit_pool, "RESHAPE": emit_reshape, "ADD": emit_add,
    "MEAN": emit_mean, "SOFTMAX": emit_softmax, "QUANTIZE": emit_quantize, "DEQUANTIZE": emit_dequantize,
}


# --- compiled forms of what the per-op path computes in numpy -------------------------------------

@njit(cache=True)
def quantize_float(x, vector_size, inv_scale, scale, zp):
    """quantize.forward_quantize from float32: the first ``vector_size`` elements of a sample as
    LiteRT's vector loop (float32 product with float32(1/scale), ties to even), the rest as its
    scalar tail (double division, ties away from zero)."""
    n, size = x.shape
    out = np.empty((n, size), np.int8)
    for b in range(n):
        for i in range(size):
            if i < vector_size:
                q = np.int64(np.rint(np.float32(x[b, i]) * inv_scale))
            else:
                d = np.float64(x[b, i]) / scale
                q = np.int64(np.sign(d) * np.floor(np.abs(d) + 0.5))
            out[b, i] = min(max(q + zp, -128), 127)
    return out


@njit(cache=True)
def dequantize_float(x, vector_size, scale, zp, scale32, offset32, fma):
    """quantize.forward_dequantize: the vector part as float32 q * scale + float32(-zp * scale)
    (fused on aarch64: one rounding of the exact float64 value), the tail as scale * (q - zp)."""
    n, size = x.shape
    out = np.empty((n, size), np.float32)
    for b in range(n):
        for i in range(size):
            if i < vector_size:
                if fma:
                    out[b, i] = np.float32(np.float64(x[b, i]) * np.float64(scale32) + np.float64(offset32))
                else:
                    out[b, i] = np.float32(np.float32(x[b, i]) * scale32) + offset32
            else:
                out[b, i] = np.float32(scale * (np.float64(x[b, i]) - zp))
    return out


__all__ = ["EMITTERS", "dequantize_float", "quantize_float"]
