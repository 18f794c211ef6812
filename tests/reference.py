"""The float64 "fake-quant" reference of the int8 core, forward and STE backward (tests only).

DESIGN.md §3: the engine trains with integer arithmetic only; this module is the float64 model its
integer backward is checked against. It works on *real* values (``scale * (q - zero_point)``):

* Parameters are dequantized once (:func:`real_parameters`): ``weight = s_w[c] * w_q`` per output
  channel (or per tensor), ``bias = s_in * s_w[c] * b_q``.
* :func:`forward` runs the int8 core (``model.core_inputs[0]`` to ``model.core_outputs[0]``) in
  float64 with **no rounding**: every op computes its exact real result, and the result is clipped
  to the op's real clamp range ``[s_out * (act_min - z_out), s_out * (act_max - z_out)]`` where
  ``(act_min, act_max) = activation_range(fused activation or NONE, output quant)``. PAD pads with
  real 0, pools ignore padded cells. QUANTIZE / DEQUANTIZE at the float interface and a final
  SOFTMAX are skipped: the reference's output is :func:`output_tensor` (the logits).
* :func:`backward` is the straight-through estimator: at each op's output the gradient passes only
  where the output value is strictly inside its clamp range; then each op's exact float64 Jacobian
  (transposed) carries it to the op's inputs and parameters.

Everything is batch-first numpy and vectorized over the batch and channels; spatial windows loop
over kernel taps (test models are small).
"""
from __future__ import annotations

import numpy as np

from edge_qmul.graph import Model
from edge_qmul.kernels.common import window
from edge_qmul.quant import QuantParams, activation_range

# Relative tolerance (in units of the output scale) of the "strictly inside the clamp" test.
MASK_TOL = 1e-9

_CONV_KINDS = ("CONV_2D", "DEPTHWISE_CONV_2D")
_LINEAR_KINDS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_POOL_KINDS = ("AVERAGE_POOL_2D", "MAX_POOL_2D")


# --- quantization helpers -------------------------------------------------------------------------

def _scale_along(qp: QuantParams, ndim: int, axis: int) -> np.ndarray:
    """The float64 scale of ``qp`` shaped to broadcast against an ``ndim`` array along ``axis``."""
    scale = qp.scale.astype(np.float64)
    if scale.size == 1:
        return scale.reshape((1,) * ndim)
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _dequantize64(q: np.ndarray, qp: QuantParams) -> np.ndarray:
    """``scale * (q - zero_point)`` in float64 (per tensor, or per channel along ``qp.axis``)."""
    q = np.asarray(q)
    scale = _scale_along(qp, q.ndim, qp.axis)
    zp = qp.zero_point.astype(np.float64)
    zp = zp.reshape(scale.shape) if zp.size > 1 else zp.reshape((1,) * q.ndim)
    return scale * (q.astype(np.float64) - zp)


def clamp_range(model: Model, op, k: int = 0) -> tuple[float, float]:
    """The real clamp range of ``op``'s output ``k``: ``s_out * (act_min - z_out), s_out * (act_max - z_out)``."""
    qo = model.tensors[op.outputs[k]].quant
    lo, hi = activation_range(op.options.get("activation", "NONE"), qo)
    s, z = float(qo.s), qo.zp
    return s * (lo - z), s * (hi - z)


def inside_mask(model: Model, op, y: np.ndarray, k: int = 0) -> np.ndarray:
    """STE mask of ``op``'s output value ``y``: True where strictly inside the real clamp range.

    "Strictly" has a tolerance of ``MASK_TOL * s_out``, so a value that sits on a bound up to
    float64 rounding (e.g. a dequantized int8 equal to act_min) counts as clipped.
    """
    lo, hi = clamp_range(model, op, k)
    tol = MASK_TOL * float(model.tensors[op.outputs[k]].quant.s)
    return (y > lo + tol) & (y < hi - tol)


# --- which ops the reference runs -----------------------------------------------------------------

def output_tensor(model: Model) -> int:
    """The tensor the reference ends in: ``core_outputs[0]``, or a final SOFTMAX's input (logits)."""
    t = model.core_outputs[0]
    for op in model.ops:
        if op.kind == "SOFTMAX" and op.outputs[0] == t:
            return op.inputs[0]
    return t


def core_ops(model: Model) -> list:
    """The ops of the int8 core in topological order, without interface (DE)QUANTIZE or a final SOFTMAX."""
    core_out = model.core_outputs[0]
    last = output_tensor(model)
    ops = []
    for op in model.ops:
        if op.kind == "QUANTIZE" and op.outputs[0] in model.core_inputs \
                and model.tensors[op.inputs[0]].dtype == np.float32:
            continue
        if op.kind == "DEQUANTIZE" and op.inputs[0] in model.core_outputs:
            continue
        if op.kind == "SOFTMAX" and op.outputs[0] == core_out and op.inputs[0] == last:
            continue
        ops.append(op)
    return ops


# --- parameters ------------------------------------------------------------------------------------

def real_parameters(model: Model) -> dict[str, np.ndarray]:
    """Float64 real weights and biases of every parameter (names of ``model.parameter_tensors()``).

    ``weight = s_w[c] * w_q`` with the filter's per-channel scales along its quantization axis
    (CONV_2D axis 0, DEPTHWISE_CONV_2D axis 3, FULLY_CONNECTED axis 0) or its single scale;
    ``bias = s_in * s_w[c] * b_q`` (the int32 bias's own quantization is not consulted).
    """
    out: dict[str, np.ndarray] = {}
    for op in model.ops:
        if op.kind not in _LINEAR_KINDS:
            continue  # registered ops (tests/ref_*.py) read their own parameters
        w_t = model.tensors[op.inputs[1]]
        cout = w_t.shape[3] if op.kind == "DEPTHWISE_CONV_2D" else w_t.shape[0]
        s_w = np.broadcast_to(w_t.quant.scale.astype(np.float64), (cout,))
        axis = 3 if op.kind == "DEPTHWISE_CONV_2D" else 0
        if w_t.quant.per_channel and w_t.quant.axis != axis:
            raise ValueError(f"{op.name}: filter quantized along axis {w_t.quant.axis}, expected {axis}")
        shape = [1] * w_t.data.ndim
        shape[axis] = -1
        # int8 filters have zero point 0 (the kernels refuse others)
        out[f"{op.name}.weight"] = s_w.reshape(shape) * w_t.data.astype(np.float64)
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            s_in = float(model.tensors[op.inputs[0]].quant.s)
            out[f"{op.name}.bias"] = s_in * s_w * model.tensors[op.inputs[2]].data.astype(np.float64)
    return out


def _merged(model: Model, params: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    merged = real_parameters(model)
    for name, value in (params or {}).items():
        if name not in merged:
            raise KeyError(f"unknown parameter {name!r}; known: {', '.join(merged)}")
        merged[name] = np.asarray(value, dtype=np.float64).reshape(merged[name].shape)
    return merged


def _constant(model: Model, t: int) -> np.ndarray:
    """Real value of a non-parameter constant operand (e.g. an ADD constant)."""
    tensor = model.tensors[t]
    if tensor.quant is None:
        return tensor.data.astype(np.float64)
    return _dequantize64(tensor.data, tensor.quant)


# --- geometry --------------------------------------------------------------------------------------

def _geometry(op, model: Model, k_h: int, k_w: int, dilated: bool):
    x = model.tensors[op.inputs[0]]
    o = op.options
    dil = (o.get("dilation_h", 1), o.get("dilation_w", 1)) if dilated else (1, 1)
    return window(op, x.shape[1], x.shape[2], k_h, k_w, o.get("padding", "VALID"),
                  o.get("stride_h", 1), o.get("stride_w", 1), *dil)


def _padded_extent(win, in_h: int, in_w: int, k_h: int, k_w: int) -> tuple[int, int, int, int]:
    """(bottom, right) padding, and padded (H, W), so that every tap's strided slice fits."""
    need_h = (win.out_h - 1) * win.stride_h + (k_h - 1) * win.dil_h + 1
    need_w = (win.out_w - 1) * win.stride_w + (k_w - 1) * win.dil_w + 1
    bottom = max(need_h - in_h - win.pad_top, 0)
    right = max(need_w - in_w - win.pad_left, 0)
    return bottom, right, in_h + win.pad_top + bottom, in_w + win.pad_left + right


def _pad_spatial(x: np.ndarray, win, bottom: int, right: int, value: float = 0.0) -> np.ndarray:
    return np.pad(x, ((0, 0), (win.pad_top, bottom), (win.pad_left, right), (0, 0)),
                  constant_values=value)


def _tap(win, ky: int, kx: int) -> tuple[slice, slice]:
    """Rows and columns of the padded input that tap (ky, kx) reads for every output pixel."""
    y0, x0 = ky * win.dil_h, kx * win.dil_w
    return (slice(y0, y0 + (win.out_h - 1) * win.stride_h + 1, win.stride_h),
            slice(x0, x0 + (win.out_w - 1) * win.stride_w + 1, win.stride_w))


def _crop(gpad: np.ndarray, win, in_h: int, in_w: int) -> np.ndarray:
    return gpad[:, win.pad_top:win.pad_top + in_h, win.pad_left:win.pad_left + in_w, :]


# --- forward ---------------------------------------------------------------------------------------

def _conv_forward(op, model, x, w, b):
    cout, k_h, k_w, _ = w.shape
    win = _geometry(op, model, k_h, k_w, True)
    bottom, right, _, _ = _padded_extent(win, x.shape[1], x.shape[2], k_h, k_w)
    xp = _pad_spatial(x, win, bottom, right)
    y = np.zeros((x.shape[0], win.out_h, win.out_w, cout))
    for ky in range(k_h):
        for kx in range(k_w):
            rows, cols = _tap(win, ky, kx)
            y += xp[:, rows, cols, :] @ w[:, ky, kx, :].T
    return y + (0.0 if b is None else b)


def _depthwise_forward(op, model, x, w, b):
    _, k_h, k_w, cout = w.shape
    mult = cout // x.shape[3]
    xe = np.repeat(x, mult, axis=3)  # channel oc reads input channel oc // mult
    win = _geometry(op, model, k_h, k_w, True)
    bottom, right, _, _ = _padded_extent(win, x.shape[1], x.shape[2], k_h, k_w)
    xp = _pad_spatial(xe, win, bottom, right)
    y = np.zeros((x.shape[0], win.out_h, win.out_w, cout))
    for ky in range(k_h):
        for kx in range(k_w):
            rows, cols = _tap(win, ky, kx)
            y += xp[:, rows, cols, :] * w[0, ky, kx, :]
    return y + (0.0 if b is None else b)


def _fc_forward(op, model, x, w, b):
    out_shape = model.tensors[op.outputs[0]].shape[1:]
    y = x.reshape(-1, w.shape[1]) @ w.T + (0.0 if b is None else b)
    return y.reshape((x.shape[0],) + tuple(out_shape))


def _pool_windows(op, model, x):
    """Padded input, validity mask of the padded cells, geometry and filter size of a pool op."""
    k_h, k_w = op.options.get("filter_h", 1), op.options.get("filter_w", 1)
    win = _geometry(op, model, k_h, k_w, False)
    bottom, right, ph, pw = _padded_extent(win, x.shape[1], x.shape[2], k_h, k_w)
    valid = np.zeros((1, ph, pw, 1), bool)
    valid[:, win.pad_top:win.pad_top + x.shape[1], win.pad_left:win.pad_left + x.shape[2]] = True
    return _pad_spatial(x, win, bottom, right), valid, win, k_h, k_w


def _avg_pool_forward(op, model, x):
    xp, valid, win, k_h, k_w = _pool_windows(op, model, x)
    total = np.zeros((x.shape[0], win.out_h, win.out_w, x.shape[3]))
    count = np.zeros((1, win.out_h, win.out_w, 1))
    for ky in range(k_h):
        for kx in range(k_w):
            rows, cols = _tap(win, ky, kx)
            total += xp[:, rows, cols, :]
            count += valid[:, rows, cols, :]
    return total / count


def _max_pool_argmax(op, model, x):
    """Max over valid cells, and the index of the first maximal tap in (ky, kx) scan order."""
    xp, valid, win, k_h, k_w = _pool_windows(op, model, x)
    best = np.full((x.shape[0], win.out_h, win.out_w, x.shape[3]), -np.inf)
    arg = np.full(best.shape, -1, np.int64)
    for ky in range(k_h):
        for kx in range(k_w):
            rows, cols = _tap(win, ky, kx)
            v = np.where(valid[:, rows, cols, :], xp[:, rows, cols, :], -np.inf)
            better = v > best  # strict: ties keep the earlier tap
            best = np.where(better, v, best)
            arg = np.where(better, ky * k_w + kx, arg)
    return best, arg


def _mean_axes(model, op) -> tuple[int, ...]:
    rank = len(model.tensors[op.inputs[0]].shape)
    return tuple(sorted({int(a) % rank for a in np.asarray(model.tensors[op.inputs[1]].data).reshape(-1)}))


def _pads(model, op) -> np.ndarray:
    return np.asarray(model.tensors[op.inputs[1]].data).astype(np.int64).reshape(-1, 2)


def _operand(model, values, t):
    if t in values:
        return values[t]
    return _constant(model, t)


# Ops registered by other modules (tests/ref_*.py): kind -> (forward, backward).
#   forward(model, op, xs) -> [y per output]: xs are float64 real values per input slot (constants
#       dequantized, None for an absent optional input); outputs unclipped.
#   backward(model, op, xs, ys, gs) -> [gradient per input slot or None] (gs: masked output
#       gradients, None where nothing reached an output), or ([...], {suffix: parameter gradient}).
REGISTERED: dict = {}


def register(kind: str, forward, backward) -> None:
    """Add the float64 forward and backward of an op kind (see REGISTERED)."""
    REGISTERED[kind] = (forward, backward)


def _slot_values(model: Model, op, values: dict[int, np.ndarray]) -> list:
    """Real values per input slot; None for an absent input or a state (variable) tensor at zero."""
    return [None if t < 0 or (t not in values and model.tensors[t].data is None)
            else _operand(model, values, t) for t in op.inputs]


def _op_forward(model: Model, op, values: dict[int, np.ndarray], params: dict[str, np.ndarray]):
    """The unclipped float64 result of one op (a list for registered ops: one per output)."""
    kind = op.kind
    if kind in REGISTERED:
        return REGISTERED[kind][0](model, op, _slot_values(model, op, values))
    x = _operand(model, values, op.inputs[0])
    if kind in _LINEAR_KINDS:
        w = params[f"{op.name}.weight"]
        b = params.get(f"{op.name}.bias")
        fn = {"CONV_2D": _conv_forward, "DEPTHWISE_CONV_2D": _depthwise_forward,
              "FULLY_CONNECTED": _fc_forward}[kind]
        return fn(op, model, x, w, b)
    if kind == "ADD":
        return x + _operand(model, values, op.inputs[1])
    if kind == "AVERAGE_POOL_2D":
        return _avg_pool_forward(op, model, x)
    if kind == "MAX_POOL_2D":
        return _max_pool_argmax(op, model, x)[0]
    if kind == "MEAN":
        return x.mean(axis=_mean_axes(model, op), keepdims=bool(op.options.get("keep_dims", False))) \
            .reshape((x.shape[0],) + tuple(model.tensors[op.outputs[0]].shape[1:]))
    if kind == "PAD":
        return np.pad(x, [tuple(p) for p in _pads(model, op)], constant_values=0.0)
    if kind in ("RESHAPE", "QUANTIZE"):  # QUANTIZE inside the core: int8 -> int8, real value kept
        return x.reshape((x.shape[0],) + tuple(model.tensors[op.outputs[0]].shape[1:]))
    raise NotImplementedError(f"reference: op {kind} (index {op.index}) inside the int8 core")


def forward(model: Model, x_real: np.ndarray, params: dict[str, np.ndarray] | None = None
            ) -> dict[int, np.ndarray]:
    """Float64 forward of the int8 core with no rounding; returns tensor index -> value (batch-first).

    ``x_real`` is the real value of ``model.core_inputs[0]`` (batch-first; it need not lie on the
    int8 grid). Every op's exact result is clipped to its real clamp range (:func:`clamp_range`).
    ``params`` overrides real parameters by name (see :func:`real_parameters`).
    """
    p = _merged(model, params)
    values = {model.core_inputs[0]: np.asarray(x_real, dtype=np.float64)}
    for op in core_ops(model):
        ys = _op_forward(model, op, values, p)
        for k, y in enumerate(ys if isinstance(ys, list) else [ys]):
            t = op.outputs[k]
            if model.tensors[t].quant is None:  # int32 / float values (a FILL's shape, ...)
                values[t] = y
                continue
            lo, hi = clamp_range(model, op, k)
            values[t] = np.clip(y, lo, hi)
    return values


# --- backward --------------------------------------------------------------------------------------

def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``g`` over the axes along which an operand of ``shape`` was broadcast."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def _op_backward(model: Model, op, acts, g: np.ndarray, params, pgrads) -> list[tuple[int, np.ndarray]]:
    """Carry the (already masked) output gradient ``g`` of ``op`` to its inputs.

    Parameter gradients are written to ``pgrads``; returns (input tensor, gradient) pairs for the
    non-constant inputs.
    """
    x_t = op.inputs[0]
    x = _operand(model, acts, x_t)
    kind = op.kind
    if kind == "CONV_2D":
        w = params[f"{op.name}.weight"]
        cout, k_h, k_w, _ = w.shape
        win = _geometry(op, model, k_h, k_w, True)
        bottom, right, _, _ = _padded_extent(win, x.shape[1], x.shape[2], k_h, k_w)
        xp = _pad_spatial(x, win, bottom, right)
        gx = np.zeros_like(xp)
        gw = np.zeros_like(w)
        g2 = g.reshape(-1, cout)
        for ky in range(k_h):
            for kx in range(k_w):
                rows, cols = _tap(win, ky, kx)
                gw[:, ky, kx, :] = g2.T @ xp[:, rows, cols, :].reshape(-1, x.shape[3])
                gx[:, rows, cols, :] += g @ w[:, ky, kx, :]
        pgrads[f"{op.name}.weight"] = gw
        if f"{op.name}.bias" in params:
            pgrads[f"{op.name}.bias"] = g2.sum(axis=0)
        return [(x_t, _crop(gx, win, x.shape[1], x.shape[2]))]
    if kind == "DEPTHWISE_CONV_2D":
        w = params[f"{op.name}.weight"]
        _, k_h, k_w, cout = w.shape
        cin = x.shape[3]
        mult = cout // cin
        win = _geometry(op, model, k_h, k_w, True)
        bottom, right, _, _ = _padded_extent(win, x.shape[1], x.shape[2], k_h, k_w)
        xp = _pad_spatial(np.repeat(x, mult, axis=3), win, bottom, right)
        gx = np.zeros_like(xp)
        gw = np.zeros_like(w)
        for ky in range(k_h):
            for kx in range(k_w):
                rows, cols = _tap(win, ky, kx)
                gw[0, ky, kx, :] = (g * xp[:, rows, cols, :]).sum(axis=(0, 1, 2))
                gx[:, rows, cols, :] += g * w[0, ky, kx, :]
        pgrads[f"{op.name}.weight"] = gw
        if f"{op.name}.bias" in params:
            pgrads[f"{op.name}.bias"] = g.sum(axis=(0, 1, 2))
        gx = _crop(gx, win, x.shape[1], x.shape[2])
        # output channel oc = ic * mult + m came from input channel ic
        gx = gx.reshape(gx.shape[:3] + (cin, mult)).sum(axis=-1)
        return [(x_t, gx)]
    if kind == "FULLY_CONNECTED":
        w = params[f"{op.name}.weight"]
        x2 = x.reshape(-1, w.shape[1])
        g2 = g.reshape(-1, w.shape[0])
        pgrads[f"{op.name}.weight"] = g2.T @ x2
        if f"{op.name}.bias" in params:
            pgrads[f"{op.name}.bias"] = g2.sum(axis=0)
        return [(x_t, (g2 @ w).reshape(x.shape))]
    if kind == "ADD":
        out = []
        for t in op.inputs[:2]:
            if t in acts or not model.tensors[t].is_constant:
                out.append((t, unbroadcast(g, _operand(model, acts, t).shape)))
        return out
    if kind == "AVERAGE_POOL_2D":
        xp, valid, win, k_h, k_w = _pool_windows(op, model, x)
        count = np.zeros((1, win.out_h, win.out_w, 1))
        for ky in range(k_h):
            for kx in range(k_w):
                rows, cols = _tap(win, ky, kx)
                count += valid[:, rows, cols, :]
        share = g / count
        gx = np.zeros_like(xp)
        for ky in range(k_h):
            for kx in range(k_w):
                rows, cols = _tap(win, ky, kx)
                gx[:, rows, cols, :] += share * valid[:, rows, cols, :]
        return [(x_t, _crop(gx, win, x.shape[1], x.shape[2]))]
    if kind == "MAX_POOL_2D":
        _, arg = _max_pool_argmax(op, model, x)
        xp, _, win, k_h, k_w = _pool_windows(op, model, x)
        gx = np.zeros_like(xp)
        for ky in range(k_h):
            for kx in range(k_w):
                rows, cols = _tap(win, ky, kx)
                gx[:, rows, cols, :] += np.where(arg == ky * k_w + kx, g, 0.0)
        return [(x_t, _crop(gx, win, x.shape[1], x.shape[2]))]
    if kind == "MEAN":
        axes = _mean_axes(model, op)
        count = int(np.prod([x.shape[a] for a in axes]))
        kept = list(x.shape)
        for a in axes:
            kept[a] = 1
        return [(x_t, np.broadcast_to(g.reshape(kept) / count, x.shape).copy())]
    if kind == "PAD":
        idx = tuple(slice(a, a + n) for (a, _), n in zip(_pads(model, op), x.shape))
        return [(x_t, g[idx])]
    if kind in ("RESHAPE", "QUANTIZE"):
        return [(x_t, g.reshape(x.shape))]
    raise NotImplementedError(f"reference: op {kind} (index {op.index}) inside the int8 core")


def backward(model: Model, acts: dict[int, np.ndarray], grad_out: np.ndarray,
             params: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """STE gradients dL/d(real parameter) for every parameter name, given dL/d(core output).

    ``acts`` maps tensor index -> float64 real value: from :func:`forward`, or
    :func:`dequantized_values` of ``model.run``. ``grad_out`` has the shape of
    :func:`output_tensor` (the core output, or the logits under a final SOFTMAX). At each op's
    output the gradient is masked to where the value is strictly inside the op's clamp range; the
    gradient that reaches the core input is discarded. ``params`` as in :func:`forward` (the
    weights used to carry gradients to inputs).
    """
    return _backward_all(model, acts, grad_out, params)[0]


def _backward_all(model: Model, acts, grad_out, params=None):
    """(parameter gradients, tensor index -> gradient of every non-constant tensor reached)."""
    p = _merged(model, params)
    grads: dict[int, np.ndarray] = {output_tensor(model): np.asarray(grad_out, dtype=np.float64)}
    pgrads = {name: np.zeros_like(v) for name, v in p.items()}
    for op in reversed(core_ops(model)):
        if not any(y_t in grads for y_t in op.outputs):
            continue  # nothing downstream of this op reaches the output
        if op.kind in REGISTERED:
            gs = [grads[y_t] * inside_mask(model, op, acts[y_t], k) if y_t in grads else None
                  for k, y_t in enumerate(op.outputs)]
            xs = _slot_values(model, op, acts)
            ys = [acts.get(y_t) for y_t in op.outputs]
            res = REGISTERED[op.kind][1](model, op, xs, ys, gs)
            gx, pg = res if isinstance(res, tuple) else (res, {})
            for suffix, v in pg.items():
                pgrads[f"{op.name}.{suffix}"] = v
            pairs = [(t, v) for t, v in zip(op.inputs, gx)
                     if v is not None and t >= 0 and not model.tensors[t].is_constant]
        else:
            y_t = op.outputs[0]
            g = grads[y_t] * inside_mask(model, op, acts[y_t])
            pairs = _op_backward(model, op, acts, g, p, pgrads)
        for t, gt in pairs:
            grads[t] = grads[t] + gt if t in grads else gt
    return pgrads, grads


# --- int8 values -----------------------------------------------------------------------------------

def dequantized_values(model: Model, values: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Float64 real values ``s * (q - z)`` of the int8 tensors in ``values`` (from ``model.run``).

    Constants (weights, biases, shapes) and non-int8 tensors (float interface) are skipped.
    """
    out = {}
    for t, v in values.items():
        tensor = model.tensors[t]
        if tensor.is_constant or tensor.quant is None or np.asarray(v).dtype != np.int8:
            continue
        out[t] = float(tensor.quant.s) * (np.asarray(v).astype(np.float64) - tensor.quant.zp)
    return out


# The float64 references of the op families that live in their own modules register here.
for _module in ("ref_binary", "ref_activation", "ref_movement", "ref_resize", "ref_lstm"):
    try:
        __import__(_module)
    except ModuleNotFoundError as _e:
        if _e.name != _module:
            raise
