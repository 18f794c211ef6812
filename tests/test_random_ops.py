"""Random single-op models: the engine must equal LiteRT's builtin kernels bit for bit.

For each supported op, N_MODELS models with random shapes, geometry, scales (log-uniform, or powers of
two so that requantization lands on exact .5 ties), zero points, per-channel filters, fused
activations and biases are built directly as edge_qmul Models, written with the project's writer,
run in LiteRT (BUILTIN_WITHOUT_DEFAULT_DELEGATES, one sample at a time) and compared with the
engine's batched ``predict`` with exact equality (floats by bit pattern). Each model draws its
parameters from ``default_rng([SEED, op, index])``, so a failure names a reproducible model.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from oplib import GraphBuilder, check_random_models, check_sample, compare, log_uniform, pot, qp, random_int8  # noqa: E402

SEED = 20240611
N_MODELS = int(os.environ.get("EDGE_QMUL_RANDOM_OPS_N", "300"))
SAMPLES = 3  # random inputs per model (one sample at a time in LiteRT, one batch in the engine)
ACTIVATIONS = ("NONE", "RELU", "RELU6")
I8, I32, F32 = np.int8, np.int32, np.float32


def _scale(rng, tie: bool, lo=1e-3, hi=1.0) -> float:
    if tie:
        return float(pot(rng, int(np.floor(np.log2(lo))), int(np.ceil(np.log2(hi)))))
    return float(log_uniform(rng, lo, hi))


def _snap(v: float, tie: bool) -> float:
    """Round a scale to a power of two in tie mode, so scale ratios are exact."""
    return float(2.0 ** np.round(np.log2(v))) if tie else float(v)


def _inputs(rng, shape, zp: int, k: int = SAMPLES) -> np.ndarray:
    """Batch of int8 inputs: uniform ones, plus one concentrated around the zero point."""
    xs = [random_int8(rng, shape) for _ in range(k - 1)]
    near = np.clip(zp + rng.integers(-6, 7, size=shape), -128, 127).astype(I8)
    xs.append(near)
    return np.concatenate(xs, axis=0)


def _mac_weights(rng, shape, bits: int) -> np.ndarray:
    """int8 weights in [-127, 127], multiples of 2^bits (bits > 0 in tie mode)."""
    step = 1 << bits
    return rng.integers(-(127 // step), 127 // step + 1, shape) * step


def _mac_bias(rng, n: int, acc_std: float, bits: int) -> np.ndarray:
    step = 1 << bits
    lim = int(2 * acc_std) // step
    return rng.integers(-lim, lim + 1, n) * step


def _mac_inputs(rng, shape, zp: int, bits: int = 3) -> np.ndarray:
    """The usual samples, plus one whose x - zp are multiples of 2^bits.

    With tie-mode weights (multiples of 2^wbits) and power-of-two scales, accumulators are then
    multiples of 2^(bits + wbits), so a large share of outputs lands exactly on .5 before the
    final rounding shift, where LiteRT's roundings (half-up, half-away, single/double) disagree.
    """
    step = 1 << bits
    k = rng.integers(-((128 + zp) // step), (127 - zp) // step + 1, size=shape)
    return np.concatenate([_inputs(rng, shape, zp), (zp + k * step).astype(I8)], axis=0)


def _out_scale(rng, s_in: float, s_w, acc_std: float, tie: bool) -> float:
    """An output scale that puts typical accumulators around +-60 (random factor up to 4x)."""
    s = s_in * float(np.mean(s_w)) * acc_std / 60.0 * float(log_uniform(rng, 0.25, 4.0))
    return _snap(s, tie)


def _filter_quant(rng, n: int, per_channel: bool, tie: bool, axis: int):
    if per_channel:
        if tie:
            s_w = pot(rng, -9, -5, n).astype(np.float64)
        else:
            s_w = log_uniform(rng, 1e-3, 1e-1) * log_uniform(rng, 0.25, 4.0, n)
        return s_w.astype(np.float32), qp(s_w, np.zeros(n, np.int64), axis)
    s = _scale(rng, tie, 1e-3, 1e-1)
    return np.full(n, s, np.float32), qp(s, 0)


def _geometry(rng, in_h, in_w, dilate: bool):
    """(kh, kw, stride_h, stride_w, dil_h, dil_w, padding) whose window fits the input."""
    for _ in range(100):
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        dh, dw = (int(rng.integers(1, 4)), int(rng.integers(1, 4))) if dilate and rng.random() < 0.4 else (1, 1)
        padding = "SAME" if rng.random() < 0.5 else "VALID"
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        if padding == "VALID" and (eh > in_h or ew > in_w):
            continue
        if padding == "SAME" and (eh > in_h + 4 or ew > in_w + 4):
            continue
        return kh, kw, sh, sw, dh, dw, padding
    return 1, 1, 1, 1, 1, 1, "VALID"


def _out_hw(in_h, in_w, kh, kw, sh, sw, dh, dw, padding):
    if padding == "SAME":
        return -(-in_h // sh), -(-in_w // sw)
    return (in_h - ((kh - 1) * dh + 1)) // sh + 1, (in_w - ((kw - 1) * dw + 1)) // sw + 1


# --- generators: (Model, [input batches], description) ------------------------------------------

def gen_conv_2d(rng):
    tie = rng.random() < 0.4
    wbits = int(rng.integers(2, 5)) if tie else 0
    h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    # cout past 32 and 64: whole and partial panels of the tile kernel (kernels/tile.py, NR <= 32)
    cin, cout = int(rng.integers(1, 17)), int(rng.integers(1, 25) if rng.random() < 0.6 else rng.integers(25, 71))
    if rng.random() < 0.15:  # one output pixel (LiteRT's GEMV path)
        kh, kw, sh, sw, dh, dw, padding = min(h, 5), min(w, 5), 1, 1, 1, 1, "VALID"
        h, w = kh, kw
    else:
        kh, kw, sh, sw, dh, dw, padding = _geometry(rng, h, w, True)
    oh, ow = _out_hw(h, w, kh, kw, sh, sw, dh, dw, padding)
    per_channel = rng.random() < 0.7
    s_in, zp_in = _scale(rng, tie), int(rng.integers(-128, 128))
    s_w, wq = _filter_quant(rng, cout, per_channel, tie, 0)
    acc_std = 74.0 * 74.0 * np.sqrt(kh * kw * cin)
    s_out, zp_out = _out_scale(rng, s_in, s_w, acc_std, tie), int(rng.integers(-128, 128))
    act = ACTIVATIONS[rng.integers(3)]
    has_bias = rng.random() < 0.7  # LiteRT's conv.cc requires a bias tensor: "absent" = all zeros
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, cin), I8, qp(s_in, zp_in))
    wt = g.tensor("w", (cout, kh, kw, cin), I8, wq, _mac_weights(rng, (cout, kh, kw, cin), wbits))
    bscale = (np.float32(s_in) * s_w).astype(np.float32)
    bias = _mac_bias(rng, cout, acc_std, wbits + 3) if has_bias else np.zeros(cout)
    ins = [x, wt, g.tensor("b", (cout,), I32, qp(bscale, np.zeros(cout, np.int64)), bias)]
    y = g.tensor("y", (1, oh, ow, cout), I8, qp(s_out, zp_out))
    g.op("CONV_2D", ins, [y], padding=padding, stride_h=sh, stride_w=sw, dilation_h=dh, dilation_w=dw,
         activation=act)
    desc = dict(in_shape=(1, h, w, cin), cout=cout, wbits=wbits, k=(kh, kw), stride=(sh, sw), dil=(dh, dw),
                padding=padding, per_channel=per_channel, bias=has_bias, act=act, tie=tie,
                s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [_mac_inputs(rng, (1, h, w, cin), zp_in)], desc


def gen_depthwise_conv_2d(rng):
    tie = rng.random() < 0.4
    wbits = int(rng.integers(2, 5)) if tie else 0
    h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    cin = int(rng.integers(1, 13))
    mult = int(rng.choice([1, 1, 2, 3]))
    while cin * mult > 24:
        cin -= 1
    cout = cin * mult
    kh, kw, sh, sw, dh, dw, padding = _geometry(rng, h, w, True)
    oh, ow = _out_hw(h, w, kh, kw, sh, sw, dh, dw, padding)
    per_channel = rng.random() < 0.7
    s_in, zp_in = _scale(rng, tie), int(rng.integers(-128, 128))
    s_w, wq = _filter_quant(rng, cout, per_channel, tie, 3)
    acc_std = 74.0 * 74.0 * np.sqrt(kh * kw)
    s_out, zp_out = _out_scale(rng, s_in, s_w, acc_std, tie), int(rng.integers(-128, 128))
    act = ACTIVATIONS[rng.integers(3)]
    # LiteRT 2.3.0's int8 depthwise kernel crashes (reads a null bias) on a two-input node, so
    # "no bias" is an all-zero bias tensor here.
    has_bias = rng.random() < 0.7
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, cin), I8, qp(s_in, zp_in))
    wt = g.tensor("w", (1, kh, kw, cout), I8, wq, _mac_weights(rng, (1, kh, kw, cout), wbits))
    bscale = (np.float32(s_in) * s_w).astype(np.float32)
    bias = _mac_bias(rng, cout, acc_std, wbits + 3) if has_bias else np.zeros(cout)
    ins = [x, wt, g.tensor("b", (cout,), I32, qp(bscale, np.zeros(cout, np.int64)), bias)]
    y = g.tensor("y", (1, oh, ow, cout), I8, qp(s_out, zp_out))
    g.op("DEPTHWISE_CONV_2D", ins, [y], padding=padding, stride_h=sh, stride_w=sw, depth_multiplier=mult,
         dilation_h=dh, dilation_w=dw, activation=act)
    desc = dict(in_shape=(1, h, w, cin), mult=mult, wbits=wbits, k=(kh, kw), stride=(sh, sw), dil=(dh, dw),
                padding=padding, per_channel=per_channel, bias=has_bias, act=act, tie=tie,
                s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [_mac_inputs(rng, (1, h, w, cin), zp_in)], desc


def gen_depthwise_conv_2d_3x3(rng):
    """The shapes aarch64's LiteRT runs in its NEON 3x3 kernel (3x3, multiplier 1, equal strides of
    1 or 2, channels a multiple of 8), with some channels' multipliers at 1 or more: that kernel
    shifts those left after the multiply, every other path before it (arithmetic.py)."""
    h, w = int(rng.integers(2, 11)), int(rng.integers(2, 11))
    cin = int(rng.choice([8, 16, 24]))
    stride = int(rng.integers(1, 3))
    padding = "SAME" if rng.random() < 0.6 or min(h, w) < 3 else "VALID"
    oh, ow = _out_hw(h, w, 3, 3, stride, stride, 1, 1, padding)
    s_in, zp_in = float(log_uniform(rng, 1e-3, 1.0)), int(rng.integers(-128, 128))
    s_out, zp_out = float(log_uniform(rng, 1e-3, 1.0)), int(rng.integers(-100, 100))
    hot = rng.random(cin) < 0.4  # channels whose multiplier s_in * s_w / s_out is in [1, 8)
    s_w = np.where(hot, s_out / s_in * log_uniform(rng, 1.0, 8.0, cin),
                   s_out / s_in * log_uniform(rng, 0.002, 0.05, cin)).astype(np.float32)
    weights = np.where(hot[None, None, None, :], rng.integers(-2, 3, (1, 3, 3, cin)),
                       rng.integers(-127, 128, (1, 3, 3, cin)))
    bias = np.where(hot, rng.integers(-20, 21, cin), rng.integers(-2000, 2001, cin))
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, cin), I8, qp(s_in, zp_in))
    wt = g.tensor("w", (1, 3, 3, cin), I8, qp(s_w, np.zeros(cin, np.int64), axis=3), weights)
    bscale = (np.float32(s_in) * s_w).astype(np.float32)
    ins = [x, wt, g.tensor("b", (cin,), I32, qp(bscale, np.zeros(cin, np.int64)), bias)]
    y = g.tensor("y", (1, oh, ow, cin), I8, qp(s_out, zp_out))
    g.op("DEPTHWISE_CONV_2D", ins, [y], padding=padding, stride_h=stride, stride_w=stride, depth_multiplier=1,
         dilation_h=1, dilation_w=1, activation="NONE")
    near = np.clip(zp_in + rng.integers(-3, 4, size=(2, h, w, cin)), -128, 127).astype(I8)
    xs = np.concatenate([_inputs(rng, (1, h, w, cin), zp_in, 1), near])
    desc = dict(in_shape=(1, h, w, cin), stride=stride, padding=padding, hot=int(hot.sum()), s_in=s_in,
                zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [xs], desc


def gen_fully_connected(rng):
    tie = rng.random() < 0.4
    wbits = int(rng.integers(2, 5)) if tie else 0
    units = int(rng.integers(1, 25) if rng.random() < 0.6 else rng.integers(25, 71))
    depth = int(rng.integers(1, 49))
    keep = bool(rng.random() < 0.4)
    r = rng.random()
    if keep and r < 0.6:
        in_shape, out_shape = (1, int(rng.integers(1, 5)), depth), None
        out_shape = in_shape[:-1] + (units,)
    elif not keep and r < 0.3:
        hh, ww = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        c = max(1, depth // (hh * ww))
        depth = hh * ww * c
        in_shape, out_shape = (1, hh, ww, c), (1, units)
    else:
        in_shape, out_shape = (1, depth), (1, units)
    per_channel = rng.random() < 0.5
    s_in, zp_in = _scale(rng, tie), int(rng.integers(-128, 128))
    s_w, wq = _filter_quant(rng, units, per_channel, tie, 0)
    acc_std = 74.0 * 74.0 * np.sqrt(depth)
    s_out, zp_out = _out_scale(rng, s_in, s_w, acc_std, tie), int(rng.integers(-128, 128))
    act = ACTIVATIONS[rng.integers(3)]
    has_bias = rng.random() < 0.7
    g = GraphBuilder()
    x = g.tensor("x", in_shape, I8, qp(s_in, zp_in))
    wt = g.tensor("w", (units, depth), I8, wq, _mac_weights(rng, (units, depth), wbits))
    ins = [x, wt]
    if has_bias:
        bscale = (np.float32(s_in) * s_w).astype(np.float32)
        bq = qp(bscale, np.zeros(units, np.int64)) if per_channel else qp(bscale[0], 0)
        ins.append(g.tensor("b", (units,), I32, bq,
                            _mac_bias(rng, units, acc_std, wbits + 3)))
    else:
        ins.append(-1)
    y = g.tensor("y", out_shape, I8, qp(s_out, zp_out))
    g.op("FULLY_CONNECTED", ins, [y], activation=act, keep_num_dims=keep)
    desc = dict(in_shape=in_shape, units=units, wbits=wbits, keep_num_dims=keep, per_channel=per_channel,
                bias=has_bias, act=act, tie=tie, s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [_mac_inputs(rng, in_shape, zp_in)], desc


# ADD operand rescales that LiteRT's vector loop (srdhm(a << (20 + s), M): one rounding) and its
# scalar loop (RoundingDivideByPOT(srdhm(a << 20, M), -s): two) compute differently, found by search:
# with scale M / 2^31 on one input (offset a = x - zp below), scale 1.0 on the other (offset b in
# about [-255, -84]) and output scale 2.0, the sum lands exactly on a rounding tie in one loop and
# just off it in the other, so the int8 outputs differ by one. (a, M) pairs:
ADD_TIE_CASES = ((133, 1340158976), (137, 1708581888), (139, 1637649408), (147, 1417047040),
                 (151, 1308400640), (153, 2035196928), (159, 1148025856), (161, 1200456704),
                 (163, 1791765504), (167, 1453087744), (169, 1385063424), (173, 1166840832))


def _add_tie_values(rng, shape, zp: int, offset: int | None) -> np.ndarray:
    """int8 values: mostly zp + offset (if given), else low values (offsets far below zp)."""
    if offset is not None:
        v = np.where(rng.random(shape) < 0.75, zp + offset, rng.integers(-128, 128, shape))
    else:
        v = rng.integers(-128, min(zp - 80, 127) + 1, shape)
    return np.clip(v, -128, 127).astype(I8)


def gen_add(rng):
    tie = rng.random() < 0.4
    crafted = rng.random() < 0.3  # scales and values from ADD_TIE_CASES
    rank = int(rng.choice([2, 3, 4, 4, 4]))
    full = (1,) + tuple(int(v) for v in rng.integers(1, 10, rank - 1))
    if rng.random() < 0.3:  # a channel count with a vector part and a tail
        full = full[:-1] + (int(rng.integers(1, 40)),)
    kind = rng.choice(["same", "same", "bcast_input", "bcast_const", "bcast_const_low_rank"])
    shape_a = full
    if kind == "same":
        shape_b = full
    else:
        keep_mask = rng.random(rank - 1) < 0.5
        shape_b = (1,) + tuple(d if k else 1 for d, k in zip(full[1:], keep_mask))
        if kind == "bcast_const_low_rank":
            cut = int(rng.integers(1, rank))  # drop leading axes, batch included
            shape_b = shape_b[cut:]
    swap = kind != "same" and rng.random() < 0.5
    s1, s2 = _scale(rng, tie, 1e-3, 1.0), _scale(rng, tie, 1e-3, 1.0)
    s_out = _snap(max(s1, s2) * float(log_uniform(rng, 0.5, 4.0)), tie)
    zp1, zp2, zp_out = (int(v) for v in rng.integers(-128, 128, 3))
    act = ACTIVATIONS[rng.integers(3)]
    offsets = (None, None)
    if crafted:
        off, m = ADD_TIE_CASES[rng.integers(len(ADD_TIE_CASES))]
        s_t = float(np.float32(m / 2.0**31))
        zp_t = int(rng.integers(-128, 128 - off))
        zp_o = int(rng.integers(87, 128))
        zp_out, s_out, act = int(rng.integers(-20, 60)), 2.0, "NONE"
        if rng.random() < 0.5:  # the crafted scale on the full-shape operand, or the broadcast one
            s1, zp1, s2, zp2, offsets = s_t, zp_t, 1.0, zp_o, (off, None)
        else:
            s1, zp1, s2, zp2, offsets = 1.0, zp_o, s_t, zp_t, (None, off)

    def values(shape, zp, offset):
        if crafted:
            return np.concatenate([_add_tie_values(rng, shape, zp, offset) for _ in range(SAMPLES)])
        return _inputs(rng, shape, zp)

    g = GraphBuilder()
    a = g.tensor("a", shape_a, I8, qp(s1, zp1))
    if kind.startswith("bcast_const"):
        b = g.tensor("b", shape_b, I8, qp(s2, zp2), (_add_tie_values(rng, shape_b, zp2, offsets[1]) if crafted
                                                 else random_int8(rng, shape_b)))
        model_inputs = [a]
    else:
        b = g.tensor("b", shape_b, I8, qp(s2, zp2))
        model_inputs = [a, b]
    y = g.tensor("y", full, I8, qp(s_out, zp_out))
    g.op("ADD", [b, a] if swap else [a, b], [y], activation=act)
    xs = [values(shape_a, zp1, offsets[0])]
    if len(model_inputs) == 2:
        xs.append(values(shape_b, zp2, offsets[1]))
    desc = dict(kind=str(kind), shape_a=shape_a, shape_b=shape_b, swap=swap, act=act, tie=tie,
                crafted=crafted, s1=s1, zp1=zp1, s2=s2, zp2=zp2, s_out=s_out, zp_out=zp_out)
    return g.model(model_inputs, [y]), xs, desc


def _gen_pool(rng, kind):
    h, w, c = int(rng.integers(1, 13)), int(rng.integers(1, 13)), int(rng.integers(1, 25))
    kh, kw, sh, sw, _, _, padding = _geometry(rng, h, w, False)
    oh, ow = _out_hw(h, w, kh, kw, sh, sw, 1, 1, padding)
    s, zp = _scale(rng, False, 1e-3, 1.0), int(rng.integers(-128, 128))
    act = ACTIVATIONS[rng.integers(3)]
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, c), I8, qp(s, zp))
    y = g.tensor("y", (1, oh, ow, c), I8, qp(s, zp))
    g.op(kind, [x], [y], padding=padding, stride_h=sh, stride_w=sw, filter_h=kh, filter_w=kw, activation=act)
    desc = dict(in_shape=(1, h, w, c), filter=(kh, kw), stride=(sh, sw), padding=padding, act=act, s=s, zp=zp)
    return g.model([x], [y]), [_inputs(rng, (1, h, w, c), zp)], desc


def gen_average_pool_2d(rng):
    return _gen_pool(rng, "AVERAGE_POOL_2D")


def gen_max_pool_2d(rng):
    return _gen_pool(rng, "MAX_POOL_2D")


def gen_mean(rng):
    tie = rng.random() < 0.4
    h, w, c = int(rng.integers(1, 13)), int(rng.integers(1, 13)), int(rng.integers(1, 25))
    if tie and rng.random() < 0.5:  # a power-of-two count makes the mean land on ties
        h, w = int(rng.choice([1, 2, 4, 8])), int(rng.choice([1, 2, 4, 8]))
    keep = bool(rng.random() < 0.5)
    axes = [[1, 2], [2, 1], [1, 2]][int(rng.integers(3))]
    s_in, zp_in = _scale(rng, tie, 1e-3, 1.0), int(rng.integers(-128, 128))
    s_out, zp_out = _snap(s_in * float(log_uniform(rng, 0.25, 4.0)), tie), int(rng.integers(-128, 128))
    if rng.random() < 0.15:
        s_out, zp_out = s_in, zp_in
    g = GraphBuilder()
    x = g.tensor("x", (1, h, w, c), I8, qp(s_in, zp_in))
    ax = g.tensor("axes", (2,), I32, None, np.array(axes, np.int32))
    y = g.tensor("y", (1, 1, 1, c) if keep else (1, c), I8, qp(s_out, zp_out))
    g.op("MEAN", [x, ax], [y], keep_dims=keep)
    desc = dict(in_shape=(1, h, w, c), axes=axes, keep_dims=keep, tie=tie, s_in=s_in, zp_in=zp_in,
                s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [_inputs(rng, (1, h, w, c), zp_in)], desc


def gen_pad(rng):
    rank = int(rng.integers(2, 5))
    shape = (1,) + tuple(int(v) for v in rng.integers(1, 9, rank - 1))
    pads = np.zeros((rank, 2), np.int32)
    pads[1:] = rng.integers(0, 4, (rank - 1, 2))
    out_shape = tuple(int(s + p[0] + p[1]) for s, p in zip(shape, pads))
    s, zp = _scale(rng, False), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s, zp))
    p = g.tensor("paddings", (rank, 2), I32, None, pads)
    y = g.tensor("y", out_shape, I8, qp(s, zp))
    g.op("PAD", [x, p], [y])
    desc = dict(in_shape=shape, paddings=pads.tolist(), zp=zp)
    return g.model([x], [y]), [_inputs(rng, shape, zp)], desc


def _factor(rng, n: int, parts: int) -> tuple:
    dims = []
    for _ in range(parts - 1):
        divs = [d for d in range(1, n + 1) if n % d == 0]
        d = int(rng.choice(divs))
        dims.append(d)
        n //= d
    return tuple(dims) + (n,)


def gen_reshape(rng):
    in_rank, out_rank = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    shape = (1,) + tuple(int(v) for v in rng.integers(1, 7, in_rank - 1))
    size = int(np.prod(shape))
    out_shape = (1,) + _factor(rng, size, out_rank - 1)
    s, zp = _scale(rng, False), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s, zp))
    y = g.tensor("y", out_shape, I8, qp(s, zp))
    g.op("RESHAPE", [x], [y])
    desc = dict(in_shape=shape, out_shape=out_shape)
    return g.model([x], [y]), [_inputs(rng, shape, zp)], desc


def gen_softmax(rng):
    r = rng.random()
    c = int(rng.integers(1, 41))
    shape = (1, c) if r < 0.5 else ((1, int(rng.integers(1, 5)), c) if r < 0.75
                                    else (1, int(rng.integers(1, 4)), int(rng.integers(1, 4)), c))
    s_in, zp_in = float(log_uniform(rng, 1e-2, 1.0)), int(rng.integers(-128, 128))
    beta = 1.0 if rng.random() < 0.6 else float(np.float32(log_uniform(rng, 0.1, 3.0)))
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s_in, zp_in))
    y = g.tensor("y", shape, I8, qp(1.0 / 256, -128))
    g.op("SOFTMAX", [x], [y], beta=beta)
    desc = dict(shape=shape, s_in=s_in, zp_in=zp_in, beta=beta)
    return g.model([x], [y]), [_inputs(rng, shape, zp_in)], desc


def _flat_shape(rng):
    size = int(rng.integers(1, 65))
    rank = int(rng.integers(2, 5))
    return (1,) + _factor(rng, size, rank - 1)


def gen_quantize_float(rng):
    tie = rng.random() < 0.5
    shape = _flat_shape(rng)
    s, zp = _scale(rng, tie, 1e-3, 1.0), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", shape, F32)
    y = g.tensor("y", shape, I8, qp(s, zp))
    g.op("QUANTIZE", [x], [y])
    k = np.array(rng.integers(-140, 141, (SAMPLES,) + shape[1:]), np.float64)
    xs = [(k[0] + rng.uniform(-0.5, 0.5, shape[1:])) * s,      # generic values
          (k[1] + 0.5) * s,                                     # exact .5 ties when s is a power of 2
          (k[2] + rng.choice([-0.5, 0.5], shape[1:])) * s * (1 + rng.choice([-1, 0, 1], shape[1:]) * 2.0 ** -23)]
    x_batch = np.stack([v.astype(F32).reshape(shape[1:]) for v in xs])
    desc = dict(shape=shape, tie=tie, s=s, zp=zp)
    return g.model([x], [y]), [x_batch], desc


def gen_quantize_int8(rng):
    tie = rng.random() < 0.5
    shape = _flat_shape(rng)
    s_in, zp_in = _scale(rng, tie, 1e-3, 1.0), int(rng.integers(-128, 128))
    s_out, zp_out = _snap(s_in * float(log_uniform(rng, 0.1, 10.0)), tie), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s_in, zp_in))
    y = g.tensor("y", shape, I8, qp(s_out, zp_out))
    g.op("QUANTIZE", [x], [y])
    desc = dict(shape=shape, tie=tie, s_in=s_in, zp_in=zp_in, s_out=s_out, zp_out=zp_out)
    return g.model([x], [y]), [_inputs(rng, shape, zp_in)], desc


def gen_dequantize(rng):
    tie = rng.random() < 0.3
    shape = _flat_shape(rng)
    s, zp = _scale(rng, tie, 1e-4, 10.0), int(rng.integers(-128, 128))
    g = GraphBuilder()
    x = g.tensor("x", shape, I8, qp(s, zp))
    y = g.tensor("y", shape, F32)
    g.op("DEQUANTIZE", [x], [y])
    desc = dict(shape=shape, s=s, zp=zp)
    return g.model([x], [y]), [_inputs(rng, shape, zp)], desc


GENERATORS = {
    "CONV_2D": gen_conv_2d,
    "DEPTHWISE_CONV_2D": gen_depthwise_conv_2d,
    "DEPTHWISE_CONV_2D_3X3": gen_depthwise_conv_2d_3x3,
    "FULLY_CONNECTED": gen_fully_connected,
    "ADD": gen_add,
    "AVERAGE_POOL_2D": gen_average_pool_2d,
    "MAX_POOL_2D": gen_max_pool_2d,
    "MEAN": gen_mean,
    "PAD": gen_pad,
    "RESHAPE": gen_reshape,
    "SOFTMAX": gen_softmax,
    "QUANTIZE_FLOAT": gen_quantize_float,
    "QUANTIZE_INT8": gen_quantize_int8,
    "DEQUANTIZE": gen_dequantize,
}


def model_case(name: str, i: int):
    """Model ``i`` of op ``name``: (Model, input batches, description), reproducibly."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), i])
    return GENERATORS[name](rng)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GENERATORS), ids=list(GENERATORS))
def test_random_single_op_models_match_litert(name):
    check_random_models(name, lambda i: model_case(name, i), N_MODELS,
                        f"tests/test_random_ops.model_case({name!r}, i)")


def test_random_single_op_models_sample():
    """The fast tier's sample of the sweep above: the first models of every op."""
    check_sample({name: (lambda i, name=name: model_case(name, i)) for name in GENERATORS},
                 "tests/test_random_ops.model_case({name!r}, i)")


@pytest.mark.parametrize("ratio_bits", [21, 23, 26])
def test_add_of_an_operand_2_to_20_times_finer_matches_litert(ratio_bits):
    """An ADD whose second operand's scale is under 2^-20 of the first's (an unrolled GRU adds the
    FULLY_CONNECTED of its zero state, scale ~1e-9): AddElementwiseInt8's shift count 20 + s2 is
    negative, which vshlq_s32 takes as a truncating right shift. Through predict and through a
    compiled plan (where the count is a literal and a negative ``<<`` was folded to garbage)."""
    g = GraphBuilder()
    shape = (1, 4, 37)  # a 16-wide vector part and a scalar tail
    a = g.tensor("a", shape, I8, qp(0.05, 3))
    b = g.tensor("b", shape, I8, qp(0.05 * 2.0 ** -ratio_bits * 1.37, -5))
    y = g.tensor("y", shape, I8, qp(0.1, -1))
    g.op("ADD", [a, b], [y], activation="NONE")
    model = g.model([a, b], [y])
    rng = np.random.default_rng(ratio_bits)
    xs = [random_int8(rng, (5,) + shape[1:]), random_int8(rng, (5,) + shape[1:])]
    assert compare(model, xs) is None
    plan = model.compiled(interface=True)
    got = plan.run({a: xs[0], b: xs[1]})[y]
    assert compare(model, xs, got=got) is None
