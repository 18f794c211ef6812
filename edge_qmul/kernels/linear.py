"""The backward that CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED share around their own loops.

Each of the three modules provides ``grad_params(p, x, g) -> (int64 weight sums, int64 bias sums)``
and ``grad_input(p, w, g_folded, in_shape) -> int32 sums`` (or ``grad_input_prepared``); what is
common is the bookkeeping: parameter gradients per group of rows, the per-channel filter scales
folded into the error before it meets the int8 filter, input sums a block of samples at a time.
"""
from __future__ import annotations

import numpy as np

from .. import grad as G
from .contract import Backward, MemoryQuery

PARAMETERS = ((1, "weight"), (2, "bias"))


def clamp(p) -> tuple[int, int]:
    return p.rq.act_min, p.rq.act_max


def output_bound(op, model, absmax) -> float:
    """max over output channels of sum |w| * max|x| + |b|: no output can exceed it."""
    w_t = model.tensors[op.inputs[1]]
    w = w_t.data.astype(np.float64)
    depthwise = op.kind == "DEPTHWISE_CONV_2D"
    channels = w.shape[3] if depthwise else w.shape[0]
    s_w = np.broadcast_to(w_t.quant.scale.astype(np.float64), (channels,))
    rows = np.abs(w).sum(axis=(0, 1, 2)) if depthwise else np.abs(w).reshape(channels, -1).sum(axis=1)
    bias = np.zeros(channels)
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        s_in = float(model.tensors[op.inputs[0]].quant.s)
        bias = np.abs(model.tensors[op.inputs[2]].data.astype(np.float64)) * s_in * s_w
    return float(np.max(rows * s_w * absmax(op.inputs[0]) + bias))


def make_backward(grad_params, grad_input, depthwise: bool = False, fully_connected: bool = False,
                  conv: bool = False):
    """The contract's backward for one of the three weighted ops, from its own ``grad_params`` and
    ``grad_input`` (a function of (p, w, in_shape) returning a function of the error block when
    ``conv``: the filters are rearranged once, not once per block)."""

    def backward(p, ctx: Backward) -> list:
        op, model = ctx.op, ctx.model
        err = ctx.errors[0]
        x, w = ctx.inputs[0], ctx.inputs[1]
        g = err.values
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        if ctx.train:
            s_x = float(model.tensors[op.inputs[0]].quant.s)
            extra = {"patch_bytes": ctx.patch_bytes} if conv and ctx.patch_bytes else {}
            for k, rows in enumerate(ctx.groups):
                whole = len(ctx.groups) == 1
                gw, gb = grad_params(p, x if whole else x[rows], g if whole else g[rows], **extra)
                ctx.emit(k, "weight", gw, err.scale * s_x)
                del gw
                if has_bias:
                    ctx.emit(k, "bias", gb, err.scale)
                del gb
        out = [None] * len(op.inputs)
        if not ctx.wants[0]:
            return out
        wq = model.tensors[op.inputs[1]].quant
        cout = w.shape[3] if depthwise else w.shape[0]
        # products meeting in one input gradient: C_out*KH*KW (conv), M*KH*KW (depthwise), C_out (FC)
        terms = w.shape[0] if fully_connected else w.size // x.shape[-1]
        m, fold_shift, factor = G.channel_fold(np.broadcast_to(wq.scale.astype(np.float64), (cout,)), terms)
        folded = G.fold_channel_scale(g, m, fold_shift)
        n = g.shape[0]
        scale = err.scale
        del g, err.values  # the folded copy replaces the error
        in_shape = tuple(x.shape[1:])
        if conv:
            per_block = grad_input(p, w, in_shape)
        else:
            per_block = lambda gb: grad_input(p, w, gb, in_shape)  # noqa: E731
        out[0] = G.from_blocks(lambda a, b: per_block(folded[a:b]), n, in_shape, scale * factor, ctx.block)
        return out

    return backward


def make_backward_bytes(grad_weight_plan=None):
    """What the weighted op's backward holds: int64 weight sums (and a conv's im2col workspace),
    then the int32 gradients (step() applies them at once, keeping an int8 copy of the weights for
    the input error), then the input error made from int32 sums a block of samples at a time."""

    def backward_bytes(op, model, q: MemoryQuery) -> int:
        e_out = 2 * q.elems(op.outputs[0])
        x_t = op.inputs[0]
        x_e = q.elems(x_t)
        need = q.wants(x_t)
        new_x = 2 * x_e if need else 0
        w = model.tensors[op.inputs[1]].data.size if q.trained else 0
        b = model.tensors[op.inputs[2]].data.size if q.trained and len(op.inputs) > 2 \
            and op.inputs[2] >= 0 else 0
        copy = w if q.step and need else 0
        patch = 0
        if q.trained and grad_weight_plan is not None:
            _, oh, ow, cout = model.tensors[op.outputs[0]].shape
            w_shape = model.tensors[op.inputs[1]].data.shape
            taps = int(np.prod(w_shape[1:]))
            patch = grad_weight_plan(q.batch, q.batch * oh * ow, cout, taps, w_shape[3],
                                                 q.patch_bytes)[1]
        q.float32_workspace = 2 * patch  # the same im2col rows, float32 instead of int16
        return max(e_out + 8 * w + patch, e_out + 4 * (w + b) + copy,
                   (copy + e_out + new_x + 6 * x_e * q.block // q.batch) if need else 0)

    return backward_bytes

