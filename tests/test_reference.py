"""The float64 fake-quant reference (tests/reference.py) checked by itself.

* Finite differences: the reference forward is piecewise linear in every real parameter and input,
  so central differences of ``forward`` must equal ``backward`` to rounding error wherever no clamp
  bound or max-pool tie lies within the step (entries near a kink are detected and skipped).
* Hand-made cases pin what finite differences cannot see: max-pool ties go to the first cell,
  values on a clamp bound pass no gradient, SAME average pooling divides by the valid cells.
* Agreement with the int8 engine: on int8 inputs the reference's forward is within a step or two of
  ``model.run`` (it only lacks the rounding), also on the TensorFlow-converted fixtures.
"""
from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import fixture_data, fixture_path
from edge_qmul import load_tflite
from edge_qmul.graph import Model, Op
from edge_qmul.kernels.common import window
from edge_qmul.quant import QuantParams
from oplib import GraphBuilder, qp

I8, I32, F32 = np.int8, np.int32, np.float32
BATCH = 3
PLACEHOLDER = qp(1e3, 0)  # output quantization until calibrate() replaces it


# --- building small random models -------------------------------------------------------------------

class Net:
    """A GraphBuilder with one call per op; output quantization is fixed later by :func:`calibrate`."""

    def __init__(self, rng: np.random.Generator, in_shape: tuple, float_io: bool = False) -> None:
        self.g, self.rng = GraphBuilder(), rng
        self.targets: dict[int, float] = {}  # op output tensor -> wanted std of the op's result
        q_in = qp(0.02 * float(rng.uniform(0.5, 2.0)), int(rng.integers(-30, 31)))
        if float_io:
            self.float_in = self.g.tensor("x_float", (1,) + in_shape, F32)
            self.x = self.g.tensor("x", (1,) + in_shape, I8, q_in)
            self.g.op("QUANTIZE", [self.float_in], [self.x])
        else:
            self.float_in = None
            self.x = self.g.tensor("x", (1,) + in_shape, I8, q_in)

    def shape(self, t: int) -> tuple:
        return self.g.tensors[t].shape

    def _out(self, shape, std: float = 1.0, like: int | None = None) -> int:
        """A new int8 activation tensor; ``like``: share that tensor's quantization (pool, pad, reshape)."""
        quant = PLACEHOLDER if like is None else self.g.tensors[like].quant
        t = self.g.tensor(f"t{len(self.g.tensors)}", shape, I8, quant)
        self.targets[t] = std
        return t

    def _filter(self, shape, cout: int, axis: int, per_channel: bool, s_in: float):
        s_w = (0.01 * self.rng.uniform(0.5, 2.0, cout if per_channel else 1)).astype(np.float32)
        w = self.rng.integers(-127, 128, shape)
        wq = qp(s_w, 0, axis) if per_channel else qp(s_w[0], 0)
        wt = self.g.tensor(f"w{len(self.g.tensors)}", shape, I8, wq, w)
        b = self.rng.integers(-3000, 3001, cout)
        bscale = np.float32(s_in) * np.broadcast_to(s_w, (cout,)).astype(np.float32)
        bt = self.g.tensor(f"b{len(self.g.tensors)}", (cout,), I32,
                           qp(bscale, 0) if per_channel else qp(bscale[0], 0), b)
        return wt, bt

    def _window_out(self, x, k, stride, dil, padding):
        _, h, w, _ = self.shape(x)
        win = window(Op("X", [], []), h, w, k[0], k[1], padding, stride[0], stride[1], dil[0], dil[1])
        return win.out_h, win.out_w

    def conv(self, x, cout, k=(3, 3), stride=(1, 1), dil=(1, 1), padding="VALID", act="NONE",
             per_channel=True, bias=True, std=1.0):
        cin = self.shape(x)[3]
        wt, bt = self._filter((cout, k[0], k[1], cin), cout, 0, per_channel, self.g.tensors[x].quant.s)
        oh, ow = self._window_out(x, k, stride, dil, padding)
        y = self._out((1, oh, ow, cout), std)
        self.g.op("CONV_2D", [x, wt, bt if bias else -1], [y], padding=padding, stride_h=stride[0],
                  stride_w=stride[1], dilation_h=dil[0], dilation_w=dil[1], activation=act)
        return y

    def depthwise(self, x, mult, k=(3, 3), stride=(1, 1), dil=(1, 1), padding="VALID", act="NONE",
                  per_channel=True, std=1.0):
        cout = self.shape(x)[3] * mult
        wt, bt = self._filter((1, k[0], k[1], cout), cout, 3, per_channel, self.g.tensors[x].quant.s)
        oh, ow = self._window_out(x, k, stride, dil, padding)
        y = self._out((1, oh, ow, cout), std)
        self.g.op("DEPTHWISE_CONV_2D", [x, wt, bt], [y], padding=padding, stride_h=stride[0],
                  stride_w=stride[1], dilation_h=dil[0], dilation_w=dil[1], depth_multiplier=mult,
                  activation=act)
        return y

    def fc(self, x, units, act="NONE", per_channel=True, bias=True, std=1.0):
        depth = int(np.prod(self.shape(x)[1:]))
        wt, bt = self._filter((units, depth), units, 0, per_channel, self.g.tensors[x].quant.s)
        y = self._out((1, units), std)
        self.g.op("FULLY_CONNECTED", [x, wt, bt if bias else -1], [y], activation=act)
        return y

    def add(self, a, b, act="NONE"):
        y = self._out(self.shape(a))
        self.g.op("ADD", [a, b], [y], activation=act)
        return y

    def pool(self, kind, x, k, stride, padding="VALID", act="NONE"):
        oh, ow = self._window_out(x, k, stride, (1, 1), padding)
        y = self._out((1, oh, ow, self.shape(x)[3]), like=x)
        self.g.op(kind, [x], [y], padding=padding, stride_h=stride[0], stride_w=stride[1],
                  filter_h=k[0], filter_w=k[1], activation=act)
        return y

    def mean(self, x, keep):
        c = self.shape(x)[3]
        axes = self.g.tensor(f"axes{len(self.g.tensors)}", (2,), I32, None, np.array([1, 2]))
        y = self._out((1, 1, 1, c) if keep else (1, c))
        self.g.op("MEAN", [x, axes], [y], keep_dims=keep)
        return y

    def pad(self, x, pads):
        pads = np.array(pads, np.int32)
        p = self.g.tensor(f"pads{len(self.g.tensors)}", pads.shape, I32, None, pads)
        y = self._out(tuple(int(s + a + b) for s, (a, b) in zip(self.shape(x), pads)), like=x)
        self.g.op("PAD", [x, p], [y])
        return y

    def reshape(self, x, shape):
        y = self._out((1,) + tuple(shape), like=x)
        self.g.op("RESHAPE", [x], [y])
        return y

    def model(self, y, softmax=False, float_out=False) -> Model:
        if softmax:
            s = self.g.tensor("probs", self.shape(y), I8, qp(1 / 256, -128))
            self.g.op("SOFTMAX", [y], [s])
            y = s
        if float_out:
            f = self.g.tensor("y_float", self.shape(y), F32)
            self.g.op("DEQUANTIZE", [y], [f])
            y = f
        return Model(self.g.tensors, self.g.ops, [self.float_in if self.float_in is not None else self.x], [y])


SHARED_QUANT = ("RESHAPE", "PAD", "AVERAGE_POOL_2D", "MAX_POOL_2D")


def calibrate(net: Net, model: Model, x: np.ndarray) -> Model:
    """Choose filter and output scales op by op so every op's result has the wanted spread and a
    few percent of it is clipped by the int8 range (so the clamp masks matter). Returns a new,
    re-prepared Model (the engine's own checks then hold for it)."""
    rng = net.rng
    tensors = model.tensors
    for op in ref.core_ops(model):
        y_t = op.outputs[0]
        if op.kind in SHARED_QUANT:
            tensors[y_t].quant = tensors[op.inputs[0]].quant
            continue
        def unclipped():
            return ref._op_forward(model, op, ref.forward(model, x), ref.real_parameters(model))

        y = unclipped()
        if op.kind in ref._LINEAR_KINDS:
            # scale the filter (and with it the bias' real value) to the wanted spread
            gain = net.targets[y_t] / max(float(np.std(y)), 1e-12)
            wt = tensors[op.inputs[1]]
            wt.quant = QuantParams(wt.quant.scale * np.float32(gain), wt.quant.zero_point, wt.quant.axis)
            y = unclipped()
        act = op.options.get("activation", "NONE")
        if act in ("RELU", "RELU6"):
            zp = -128
            # a mostly negative pre-activation still needs a positive range for its few positives
            hi = 8.0 if act == "RELU6" else max(float(np.quantile(y, 0.97)), 1e-2 * float(np.abs(y).max()), 1e-6)
            scale = hi / 255
        else:
            zp = int(rng.integers(-30, 31))
            scale = max(float(np.quantile(y, 0.97)) / (127 - zp), -float(np.quantile(y, 0.03)) / (128 + zp))
        tensors[y_t].quant = qp(scale, zp)
        for slot in (2,):  # keep the int32 bias' own quantization consistent (the writer stores it)
            if op.kind in ref._LINEAR_KINDS and len(op.inputs) > slot and op.inputs[slot] >= 0:
                bt = tensors[op.inputs[slot]]
                s = np.float32(tensors[op.inputs[0]].quant.s) * tensors[op.inputs[1]].quant.scale
                bt.quant = QuantParams(s, np.zeros(s.size, np.int64), 0)
    return Model(tensors, model.ops, model.inputs, model.outputs)


def real_input(model: Model, rng, n=BATCH) -> np.ndarray:
    """Continuous real inputs inside the core input's range (off the int8 grid: no ties)."""
    t = model.tensors[model.core_inputs[0]]
    q = t.quant
    u = rng.uniform(-127.5, 126.5, (n,) + tuple(t.shape[1:]))
    return float(q.s) * (u - q.zp)


def build(make, seed: int) -> tuple[Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    net, y = make(rng)
    model = net.model(*y) if isinstance(y, tuple) else net.model(y)
    x = real_input(model, rng)
    return calibrate(net, model, x), x


# --- finite differences -----------------------------------------------------------------------------

def _fd_entries(rng, size: int, k: int) -> np.ndarray:
    return np.arange(size) if size <= k else rng.choice(size, k, replace=False)


def check_by_finite_differences(model: Model, x: np.ndarray, seed: int = 0, per_tensor: int = 25,
                                rel: float = 1e-6) -> dict:
    """Central differences of ``forward`` vs ``backward`` for parameters and the core input.

    L = sum(r * out). The forward is piecewise linear, so where no kink lies within the step the
    output moves exactly linearly: ``y(+h) + y(-h) - 2 y(0)`` vanishes to rounding. Entries where it
    does not (a clamp bound or a max-pool tie within h) are skipped, and counted.
    """
    rng = np.random.default_rng(seed)
    out_t = ref.output_tensor(model)
    acts = ref.forward(model, x)
    y0 = acts[out_t]
    r = rng.standard_normal(y0.shape)
    pgrads, tgrads = ref._backward_all(model, acts, r)
    assert set(pgrads) == set(model.parameter_tensors())
    base = ref.real_parameters(model)
    y_scale = float(np.abs(y0).max()) + 1e-300
    stats = {"checked": 0, "skipped": 0}

    def one(value: np.ndarray, flat: int, run, analytic: np.ndarray, what: str) -> None:
        h = rel * max(float(np.abs(value).max()), 1e-12)
        plus, minus = value.copy(), value.copy()
        plus.flat[flat] += h
        minus.flat[flat] -= h
        yp, ym = run(plus), run(minus)
        if np.abs(yp + ym - 2 * y0).max() > 1e-9 * y_scale:
            stats["skipped"] += 1
            return
        fd = float(np.sum(r * (yp - ym))) / (2 * h)
        want = float(analytic.flat[flat])
        # relative to the entry, with a floor relative to the whole gradient tensor for entries
        # whose gradient is small (float64 cancellation in y(+h) - y(-h) is absolute)
        tol = 1e-6 * abs(want) + 1e-7 * float(np.abs(analytic).max()) + 1e-14
        assert abs(fd - want) <= tol, f"{what}[{np.unravel_index(flat, value.shape)}]: fd {fd!r} vs backward {want!r}"
        stats["checked"] += 1

    for name, value in base.items():
        assert pgrads[name].shape == value.shape
        for flat in _fd_entries(rng, value.size, per_tensor):
            one(value, int(flat), lambda v, name=name: ref.forward(model, x, {name: v})[out_t],
                pgrads[name], name)
    x_t = model.core_inputs[0]
    if x_t in tgrads:  # the gradient reaching the core input (backward discards it; check it anyway)
        for flat in _fd_entries(rng, x.size, per_tensor):
            one(x, int(flat), lambda v: ref.forward(model, v)[out_t], tgrads[x_t], "input")
    total = stats["checked"] + stats["skipped"]
    assert total > 0
    assert stats["skipped"] <= 0.1 * total, stats
    return stats


def check_against_engine(model: Model, xq: np.ndarray, steps: float = 1.0) -> None:
    """Op by op, the reference on the engine's dequantized inputs is within ``steps`` output steps
    of the engine's int8 output (the engine only adds rounding), and backward runs on the engine's
    dequantized activations."""
    x_t = model.core_inputs[0]
    values = model.run({x_t: xq}, start_after_interface=True)
    deq = ref.dequantized_values(model, values)
    assert not any(model.tensors[t].is_constant for t in deq)
    params = ref.real_parameters(model)
    for op in ref.core_ops(model):
        lo, hi = ref.clamp_range(model, op)
        want = np.clip(ref._op_forward(model, op, deq, params), lo, hi)
        err = np.abs(deq[op.outputs[0]] - want).max() / float(model.tensors[op.outputs[0]].quant.s)
        assert err <= steps, f"op {op.index} {op.kind}: reference vs engine {err:.3f} steps"
    out_t = ref.output_tensor(model)
    grads = ref.backward(model, deq, np.ones_like(deq[out_t]))
    for name, v in params.items():
        assert grads[name].shape == v.shape and np.all(np.isfinite(grads[name]))
    assert any(np.any(g != 0) for g in grads.values())


def to_int8(model: Model, x_real: np.ndarray) -> np.ndarray:
    q = model.tensors[model.core_inputs[0]].quant
    return np.clip(np.round(x_real / float(q.s)) + q.zp, -128, 127).astype(I8)


# --- the models ---------------------------------------------------------------------------------------

def m_conv(padding, stride, dil, act, per_channel=True, bias=True):
    def make(rng):
        net = Net(rng, (7, 8, 3))
        return net, net.conv(net.x, 4, (3, 2), stride, dil, padding, act, per_channel, bias,
                             std=4.0 if act == "RELU6" else 1.0)
    return make


def m_depthwise(padding, stride, act):
    def make(rng):
        net = Net(rng, (6, 7, 3))
        return net, net.depthwise(net.x, 2, (3, 3), stride, (1, 1), padding, act)
    return make


def m_fc(per_channel, act="NONE", bias=True):
    def make(rng):
        net = Net(rng, (10,))
        return net, net.fc(net.x, 6, act, per_channel, bias)
    return make


def m_add_two_branches(act):
    def make(rng):
        net = Net(rng, (5, 5, 3))
        a = net.conv(net.x, 4, (1, 1))
        b = net.conv(net.x, 4, (3, 3), padding="SAME")
        return net, net.add(a, b, act)
    return make


def m_add_residual(rng):
    net = Net(rng, (5, 5, 3))
    return net, net.add(net.conv(net.x, 3, (3, 3), padding="SAME"), net.x)


def m_add_self(rng):
    net = Net(rng, (4, 4, 2))
    a = net.conv(net.x, 2, (1, 1))
    return net, net.add(a, a)


def m_after_conv(kind, **kw):
    """A 1x1 conv (so parameters see the op's gradient) followed by the op under test."""
    def make(rng):
        opts = dict(kw)
        net = Net(rng, (7, 6, 3))
        c = net.conv(net.x, 4, (1, 1), act=opts.pop("conv_act", "NONE"))
        if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            return net, net.pool(kind, c, **opts)
        if kind == "MEAN":
            return net, net.mean(c, **opts)
        if kind == "PAD":
            return net, net.pad(c, **opts)
        if kind == "RESHAPE":
            return net, net.reshape(c, **opts)
        raise AssertionError(kind)
    return make


def m_chain(rng):
    """conv -> relu -> maxpool -> reshape -> fc (-> softmax, skipped by the reference)."""
    net = Net(rng, (8, 8, 2))
    c = net.conv(net.x, 5, (3, 3), padding="SAME", act="RELU")
    p = net.pool("MAX_POOL_2D", c, (2, 2), (2, 2))
    r = net.reshape(p, (4 * 4 * 5,))
    return net, (net.fc(r, 4), True)


def m_residual(rng):
    """Float interface; conv -> conv -> add(residual) -> mean -> fc."""
    net = Net(rng, (6, 6, 3), float_io=True)
    c1 = net.conv(net.x, 4, (3, 3), padding="SAME", act="RELU6", std=4.0)
    c2 = net.conv(c1, 4, (3, 3), padding="SAME")
    s = net.conv(net.x, 4, (1, 1))
    a = net.add(c2, s, act="RELU")
    m = net.mean(a, keep=False)
    return net, (net.fc(m, 3, per_channel=False), False, True)


def m_mobile(rng):
    """pad -> conv stride 2 -> depthwise SAME -> conv -> avgpool SAME -> mean keep_dims -> reshape -> fc."""
    net = Net(rng, (9, 9, 2))
    p = net.pad(net.x, [[0, 0], [1, 0], [0, 1], [0, 0]])
    c = net.conv(p, 3, (3, 3), (2, 2), act="RELU")
    d = net.depthwise(c, 2, (3, 3), (1, 1), padding="SAME", act="RELU6")
    e = net.conv(d, 4, (1, 1))
    a = net.pool("AVERAGE_POOL_2D", e, (3, 3), (2, 2), padding="SAME")
    m = net.mean(a, keep=True)
    r = net.reshape(m, (4,))
    return net, net.fc(r, 3, act="RELU")


CASES = {
    "conv_valid_none": m_conv("VALID", (1, 1), (1, 1), "NONE"),
    "conv_same_stride2_relu": m_conv("SAME", (2, 2), (1, 1), "RELU"),
    "conv_same_dilation2_relu6": m_conv("SAME", (1, 1), (2, 2), "RELU6"),
    "conv_valid_stride_dilation_per_tensor_no_bias": m_conv("VALID", (2, 1), (1, 2), "NONE", False, False),
    "depthwise_mult2_same": m_depthwise("SAME", (1, 1), "NONE"),
    "depthwise_mult2_valid_stride2_relu": m_depthwise("VALID", (2, 2), "RELU"),
    "fc_per_channel": m_fc(True),
    "fc_per_tensor_relu": m_fc(False, "RELU"),
    "fc_no_bias": m_fc(True, bias=False),
    "add_two_branches": m_add_two_branches("NONE"),
    "add_two_branches_relu": m_add_two_branches("RELU"),
    "add_residual": m_add_residual,
    "add_self": m_add_self,
    "avg_pool_valid": m_after_conv("AVERAGE_POOL_2D", k=(2, 3), stride=(2, 1)),
    "avg_pool_same": m_after_conv("AVERAGE_POOL_2D", k=(3, 3), stride=(2, 2), padding="SAME"),
    "max_pool_valid": m_after_conv("MAX_POOL_2D", k=(2, 2), stride=(2, 2)),
    "max_pool_same_relu": m_after_conv("MAX_POOL_2D", k=(3, 2), stride=(1, 2), padding="SAME", act="RELU"),
    "max_pool_after_relu": m_after_conv("MAX_POOL_2D", k=(2, 2), stride=(1, 1), conv_act="RELU"),
    "mean": m_after_conv("MEAN", keep=False),
    "mean_keep_dims": m_after_conv("MEAN", keep=True),
    "pad": m_after_conv("PAD", pads=[[0, 0], [1, 2], [0, 1], [2, 0]]),
    "reshape": m_after_conv("RESHAPE", shape=(6, 7 * 2, 2)),
    "chain_conv_relu_maxpool_reshape_fc_softmax": m_chain,
    "residual_block_float_io": m_residual,
    "mobile_block": m_mobile,
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_finite_differences(case):
    model, x = build(CASES[case], seed=sorted(CASES).index(case))
    stats = check_by_finite_differences(model, x)
    assert stats["checked"] >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_forward_close_to_int8_engine(case):
    model, x = build(CASES[case], seed=sorted(CASES).index(case))
    check_against_engine(model, to_int8(model, x))


def test_clamp_ranges_are_hit():
    """The calibrated models clip some outputs at both ends, so the STE masks are exercised."""
    model, x = build(CASES["conv_valid_none"], 0)
    op = model.ops[0]
    y = ref.forward(model, x)[op.outputs[0]]
    lo, hi = ref.clamp_range(model, op)
    assert np.any(y == lo) and np.any(y == hi) and np.any((y > lo) & (y < hi))
    grads = ref._backward_all(model, ref.forward(model, x), np.ones_like(y))[1]
    gx_none = grads[model.core_inputs[0]]
    # clipped outputs pass nothing: the input gradient equals that of the masked output gradient
    masked = ((y > lo) & (y < hi)).astype(float)
    gx_masked = ref._backward_all(model, ref.forward(model, x), masked)[1][model.core_inputs[0]]
    np.testing.assert_allclose(gx_none, gx_masked, rtol=0, atol=1e-12)


# --- hand-made cases ----------------------------------------------------------------------------------

def _pool_model(kind, in_hw, k, stride, padding, act="NONE", scale=1.0, zp=0):
    g = GraphBuilder()
    x = g.tensor("x", (1,) + in_hw + (1,), I8, qp(scale, zp))
    oh, ow = (window(Op("X", [], []), in_hw[0], in_hw[1], k[0], k[1], padding, stride[0], stride[1]).out_h,
              window(Op("X", [], []), in_hw[0], in_hw[1], k[0], k[1], padding, stride[0], stride[1]).out_w)
    y = g.tensor("y", (1, oh, ow, 1), I8, qp(scale, zp))
    g.op(kind, [x], [y], padding=padding, stride_h=stride[0], stride_w=stride[1], filter_h=k[0],
         filter_w=k[1], activation=act)
    return g.model([x], [y])


def test_max_pool_tie_goes_to_first_cell_in_scan_order():
    model = _pool_model("MAX_POOL_2D", (2, 3), (2, 2), (1, 1), "VALID")
    x = np.array([[1., 5., 5.], [5., 2., 5.]]).reshape(1, 2, 3, 1)
    acts = ref.forward(model, x)
    np.testing.assert_array_equal(acts[1].reshape(-1), [5, 5])
    gx = ref._backward_all(model, acts, np.array([10., 100.]).reshape(1, 1, 2, 1))[1][0]
    # window 0 covers (0,0),(0,1),(1,0),(1,1): first 5 at (0,1); window 1: first 5 at (0,1) too
    np.testing.assert_array_equal(gx.reshape(2, 3), [[0, 110, 0], [0, 0, 0]])


def test_max_pool_ignores_padded_cells():
    # all inputs negative: a padded cell (real 0 if it counted) must never win
    model = _pool_model("MAX_POOL_2D", (2, 2), (3, 3), (1, 1), "SAME", scale=0.5, zp=100)
    x = -np.array([[4., 3.], [2., 1.]]).reshape(1, 2, 2, 1)
    acts = ref.forward(model, x)
    np.testing.assert_array_equal(acts[1].reshape(-1), [-1, -1, -1, -1])
    gx = ref._backward_all(model, acts, np.ones((1, 2, 2, 1)))[1][0]
    np.testing.assert_array_equal(gx.reshape(2, 2), [[0, 0], [0, 4]])


def test_average_pool_same_divides_by_valid_cells():
    model = _pool_model("AVERAGE_POOL_2D", (2, 2), (2, 2), (1, 1), "SAME")
    x = np.array([[1., 2.], [3., 4.]]).reshape(1, 2, 2, 1)
    acts = ref.forward(model, x)
    np.testing.assert_allclose(acts[1].reshape(2, 2), [[2.5, 3.0], [3.5, 4.0]])
    gx = ref._backward_all(model, acts, np.ones((1, 2, 2, 1)))[1][0]
    np.testing.assert_allclose(gx.reshape(2, 2), [[1 / 4, 1 / 4 + 1 / 2], [1 / 4 + 1 / 2, 1 / 4 + 1 / 2 + 1 / 2 + 1]])


def test_pad_pads_with_real_zero_and_slices_the_gradient():
    g = GraphBuilder()
    x = g.tensor("x", (1, 1, 2, 1), I8, qp(0.5, 17))
    p = g.tensor("pads", (4, 2), I32, None, np.array([[0, 0], [1, 0], [0, 2], [0, 0]]))
    y = g.tensor("y", (1, 2, 4, 1), I8, qp(0.5, 17))
    g.op("PAD", [x, p], [y])
    model = g.model([x], [y])
    acts = ref.forward(model, np.array([3., -2.]).reshape(1, 1, 2, 1))
    np.testing.assert_array_equal(acts[y].reshape(2, 4), [[0, 0, 0, 0], [3, -2, 0, 0]])
    gy = np.arange(8.).reshape(1, 2, 4, 1)
    gx = ref._backward_all(model, acts, gy)[1][x]
    np.testing.assert_array_equal(gx.reshape(-1), [4, 5])


def test_values_on_a_clamp_bound_pass_no_gradient():
    # RELU with scale 0.5, zp -128: range [0, 127.5]; values exactly on either bound (as a
    # dequantized int8 is) pass nothing, values inside pass everything.
    model = _pool_model("MAX_POOL_2D", (1, 4), (1, 1), (1, 1), "VALID", act="RELU", scale=0.5, zp=-128)
    lo, hi = ref.clamp_range(model, model.ops[0])
    assert (lo, hi) == (0.0, 127.5)
    acts = {0: np.array([0., 1e-3, 127.5, 3.]).reshape(1, 1, 4, 1)}
    acts[1] = acts[0].copy()
    gx = ref._backward_all(model, acts, np.ones((1, 1, 4, 1)))[1][0]
    np.testing.assert_array_equal(gx.reshape(-1), [0, 1, 0, 1])


def test_real_parameters_and_dequantized_values():
    model, x = build(CASES["depthwise_mult2_same"], 1)
    params = ref.real_parameters(model)
    op = model.ops[0]
    w, b = model.tensors[op.inputs[1]], model.tensors[op.inputs[2]]
    s_in = float(model.tensors[op.inputs[0]].quant.s)
    s_w = w.quant.scale.astype(np.float64)
    np.testing.assert_array_equal(params["depthwise_conv_2d_0.weight"], w.data * s_w.reshape(1, 1, 1, -1))
    np.testing.assert_array_equal(params["depthwise_conv_2d_0.bias"], s_in * s_w * b.data)
    fc, _ = build(CASES["fc_per_tensor_relu"], 2)
    p = ref.real_parameters(fc)
    wt = fc.tensors[fc.ops[0].inputs[1]]
    np.testing.assert_array_equal(p["fully_connected_0.weight"], float(wt.quant.s) * wt.data)
    xq = np.zeros((2,) + tuple(model.tensors[0].shape[1:]), I8)
    deq = ref.dequantized_values(model, model.run({0: xq}))
    assert set(deq) == {0, op.outputs[0]}
    q = model.tensors[0].quant
    np.testing.assert_array_equal(deq[0], np.full(xq.shape, -q.zp * float(q.s)))


def test_params_override_and_softmax_skip():
    model, x = build(m_chain, 7)
    out_t = ref.output_tensor(model)
    assert model.ops[-1].kind == "SOFTMAX" and out_t == model.ops[-1].inputs[0]
    assert all(op.kind != "SOFTMAX" for op in ref.core_ops(model))
    zero = {name: np.zeros_like(v) for name, v in ref.real_parameters(model).items()}
    y = ref.forward(model, x, zero)[out_t]
    lo, hi = ref.clamp_range(model, model.ops[-2])
    np.testing.assert_array_equal(y, np.clip(0.0, lo, hi))
    with pytest.raises(KeyError):
        ref.forward(model, x, {"nope.weight": np.zeros(1)})


@pytest.mark.parametrize("name", ["digits_cnn", "resnet_tiny", "mobilenet_tiny"])
def test_fixture_models(name):
    """Converter-made graphs: op by op the reference is within a step of the engine, and its
    backward matches finite differences on a few entries of each parameter."""
    model = load_tflite(fixture_path(name))
    data = fixture_data(name)
    x_t = model.core_inputs[0]
    q = model.tensors[x_t].quant
    xq = data["x"][:2]
    assert xq.dtype == np.int8
    x_real = float(q.s) * (xq.astype(np.float64) - q.zp)
    check_against_engine(model, xq)
    rng = np.random.default_rng(0)
    x_cont = x_real + float(q.s) * rng.uniform(-0.4, 0.4, x_real.shape)  # off the grid: no ties
    check_by_finite_differences(model, x_cont, per_tensor=2)
