"""Small classifiers built directly as int8 Models (no TensorFlow), calibrated with the int8 engine.

Each architecture function returns a :class:`~edge_qmul.graph.Model` whose .tflite
(``edge_qmul.tflite.to_bytes``) LiteRT runs bit-exactly like ``Model.forward``:

``mlp``             RESHAPE (flatten) -> [FULLY_CONNECTED + RELU] * len(hidden) -> FULLY_CONNECTED
``digits_cnn``      CONV 3x3 16 SAME RELU, CONV 3x3 32 /2 SAME RELU, MAX_POOL 2x2, RESHAPE, FC
``mnist_cnn``       CONV 3x3 8 SAME RELU, MAX_POOL 2x2, CONV 3x3 16 SAME RELU, MAX_POOL 2x2, RESHAPE, FC
                    (LeNet-like, for 28x28 MNIST: 28 -> 14 -> 7, 7x7x16 = 784 features)
``mnist1d_cnn``     three 1x5 CONV_2D of 32 channels (strides 1, 2, 2) + RELU, RESHAPE, FC
``mobilenet_tiny``  stem CONV 3x3 /2 RELU6; inverted residual blocks (1x1 expand RELU6, DEPTHWISE 3x3
                    RELU6, 1x1 linear projection, ADD where shapes match); MEAN over H, W; FC
``resnet_tiny``     stem CONV 3x3 RELU; a basic block (conv-relu-conv, ADD with fused RELU) and a
                    strided one with a 1x1 projection shortcut; MEAN over H, W; FC

On inputs of height 1 (MNIST-1D's (1, W, C) layout) the 2-D architectures use 1xK kernels and stride
only along W, so every layer is a 1-D convolution.

Parameters: He-normal float weights (seeded), zero biases. Weights are quantized symmetric per output
channel to int8 [-127, 127] with zero point 0 (CONV_2D and FULLY_CONNECTED along axis 0,
DEPTHWISE_CONV_2D along axis 3 of its (1, KH, KW, C) filter); biases are int32 at scale s_in * s_w[c].
The final FULLY_CONNECTED has no activation: its int8 output is the logits (no SOFTMAX).

Activation scales (int8 asymmetric per tensor) come from :func:`edge_qmul.calibrate.calibrate`,
which runs the engine's own kernels op by op on calibration inputs; its public names are importable
from here too.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .calibrate import WEIGHTED_OPS, calibrate, input_quant, quantize_weights
from .graph import Model, Op, Tensor
from .kernels import KERNELS
from .quant import QuantParams

__all__ = ["ARCHITECTURES", "SHARED_QUANT_OPS", "WEIGHTED_OPS", "build", "calibrate", "digits_cnn",
           "input_quant", "mlp", "mnist1d_cnn", "mnist_cnn", "mobilenet_tiny", "quantize_weights",
           "reinitialize", "resnet_tiny"]

# Ops whose outputs keep their input's quantization (they move values), from the kernel registry.
SHARED_QUANT_OPS = tuple(sorted(k for k, v in KERNELS.items() if v.output_quant == "input"))


def _placeholder_quant(channels: int | None = None, axis: int = 0) -> QuantParams:
    n = 1 if channels is None else channels
    return QuantParams(np.ones(n, np.float32), np.zeros(n, np.int64), axis)


def _he_normal(rng: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)


# --- graph building ------------------------------------------------------------------------------

def _same_out(size: int, stride: int) -> int:
    return -(-size // stride)


def _valid_out(size: int, k: int, stride: int) -> int:
    return (size - k + stride) // stride


class _Builder:
    """Collects tensors, ops and the float parameters of an architecture, then calibrates it."""

    def __init__(self, name: str, input_shape: Sequence[int], seed: int) -> None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (1, 3) or any(s < 1 for s in shape):
            raise ValueError(f"{name}: input_shape must be (H, W, C) or (features,), got {tuple(input_shape)}")
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.tensors: list[Tensor] = []
        self.ops: list[Op] = []
        self.float_params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.input = self.activation("input", (1,) + shape)

    # tensors
    def shape(self, t: int) -> tuple[int, ...]:
        return self.tensors[t].shape

    def activation(self, name: str, shape) -> int:
        shape = tuple(int(s) for s in shape)
        self.tensors.append(Tensor(name, shape, np.dtype(np.int8), _placeholder_quant(), None,
                                   (-1,) + shape[1:]))
        return len(self.tensors) - 1

    def constant(self, name: str, data: np.ndarray, quant: QuantParams | None) -> int:
        data = np.ascontiguousarray(data)
        self.tensors.append(Tensor(name, tuple(data.shape), data.dtype, quant, data))
        return len(self.tensors) - 1

    def _op(self, kind: str, inputs: list[int], output: int, **options) -> int:
        self.ops.append(Op(kind, list(inputs), [output], dict(options)))
        return output

    def _prefix(self, kind: str) -> str:
        return f"{self.name}/{kind.lower()}_{len(self.ops)}"

    def _weighted(self, kind: str, w: np.ndarray, axis: int, inputs_x: int, out_shape, **options) -> int:
        channels = w.shape[axis]
        prefix = self._prefix(kind)
        q, wq = quantize_weights(w, axis)
        wt = self.constant(f"{prefix}/weight", q, wq)
        bt = self.constant(f"{prefix}/bias", np.zeros(channels, np.int32), _placeholder_quant(channels, 0))
        y = self.activation(f"{prefix}/out", out_shape)
        self.float_params[len(self.ops)] = (w, np.zeros(channels))
        return self._op(kind, [inputs_x, wt, bt], y, **options)

    # ops
    def conv(self, x: int, cout: int, k=(3, 3), stride=(1, 1), padding: str = "SAME",
             activation: str = "NONE") -> int:
        _, h, w_, cin = self.shape(x)
        kh, kw = k
        sh, sw = stride
        if padding == "SAME":
            oh, ow = _same_out(h, sh), _same_out(w_, sw)
        else:
            oh, ow = _valid_out(h, kh, sh), _valid_out(w_, kw, sw)
        w = _he_normal(self.rng, (cout, kh, kw, cin), kh * kw * cin)
        return self._weighted("CONV_2D", w, 0, x, (1, oh, ow, cout), padding=padding, stride_w=sw,
                              stride_h=sh, activation=activation, dilation_w=1, dilation_h=1)

    def depthwise(self, x: int, k=(3, 3), stride=(1, 1), padding: str = "SAME",
                  activation: str = "NONE") -> int:
        _, h, w_, c = self.shape(x)
        kh, kw = k
        sh, sw = stride
        oh, ow = _same_out(h, sh), _same_out(w_, sw)
        if padding != "SAME":
            oh, ow = _valid_out(h, kh, sh), _valid_out(w_, kw, sw)
        w = _he_normal(self.rng, (1, kh, kw, c), kh * kw)
        return self._weighted("DEPTHWISE_CONV_2D", w, 3, x, (1, oh, ow, c), padding=padding,
                              stride_w=sw, stride_h=sh, depth_multiplier=1, activation=activation,
                              dilation_w=1, dilation_h=1)

    def fc(self, x: int, cout: int, activation: str = "NONE") -> int:
        depth = self.shape(x)[-1]
        w = _he_normal(self.rng, (cout, depth), depth)
        return self._weighted("FULLY_CONNECTED", w, 0, x, (1, cout), activation=activation,
                              weights_format="DEFAULT", keep_num_dims=False)

    def add(self, a: int, b: int, activation: str = "NONE") -> int:
        if self.shape(a) != self.shape(b):
            raise ValueError(f"{self.name}: ADD of {self.shape(a)} and {self.shape(b)}")
        y = self.activation(f"{self._prefix('ADD')}/out", self.shape(a))
        return self._op("ADD", [a, b], y, activation=activation)

    def max_pool(self, x: int, k=(2, 2), stride=(2, 2)) -> int:
        _, h, w_, c = self.shape(x)
        y = self.activation(f"{self._prefix('MAX_POOL_2D')}/out",
                            (1, _valid_out(h, k[0], stride[0]), _valid_out(w_, k[1], stride[1]), c))
        return self._op("MAX_POOL_2D", [x], y, padding="VALID", stride_w=stride[1], stride_h=stride[0],
                        filter_w=k[1], filter_h=k[0], activation="NONE")

    def flatten(self, x: int) -> int:
        if len(self.shape(x)) == 2:
            return x
        y = self.activation(f"{self._prefix('RESHAPE')}/out", (1, int(np.prod(self.shape(x)[1:]))))
        return self._op("RESHAPE", [x], y)

    def mean_hw(self, x: int) -> int:
        axes = self.constant(f"{self._prefix('MEAN')}/axes", np.array([1, 2], np.int32), None)
        y = self.activation(f"{self._prefix('MEAN')}/out", (1, self.shape(x)[3]))
        return self._op("MEAN", [x, axes], y, keep_dims=False)

    # finish
    def finish(self, output: int, calib_x: np.ndarray | None, input_range, seed: int,
               calib_samples: int = 256) -> Model:
        in_shape = self.shape(self.input)[1:]
        if calib_x is not None:
            calib_x = np.asarray(calib_x, np.float32)
            if calib_x.shape[1:] != in_shape:
                if calib_x.shape == in_shape:
                    calib_x = calib_x[None]
                else:
                    raise ValueError(f"{self.name}: calib_x must be (N, {', '.join(map(str, in_shape))}), "
                                     f"got {calib_x.shape}")
            if calib_x.shape[0] < 1 or not np.all(np.isfinite(calib_x)):
                raise ValueError(f"{self.name}: calib_x must hold at least one finite sample")
        if input_range is None:
            if calib_x is not None:
                input_range = (float(calib_x.min()), float(calib_x.max()))
            else:
                input_range = (0.0, 1.0)
        lo, hi = float(input_range[0]), float(input_range[1])
        if not hi > lo:
            raise ValueError(f"{self.name}: input_range must be (lo, hi) with lo < hi, got {input_range}")
        qin = input_quant(lo, hi)
        if calib_x is None:
            rng = np.random.default_rng(seed + 7919)
            calib_x = rng.uniform(lo, hi, size=(calib_samples,) + in_shape).astype(np.float32)
        self.tensors[self.input].quant = qin
        for op in self.ops:  # placeholders that pass the kernels' checks until calibration
            if op.kind in SHARED_QUANT_OPS:
                self.tensors[op.outputs[0]].quant = self.tensors[op.inputs[0]].quant
        model = Model(self.tensors, self.ops, [self.input], [output], description=f"edge_qmul {self.name}",
                      signature={"key": "serving_default", "inputs": [("input", self.input)],
                                 "outputs": [("logits", output)]})
        return calibrate(model, calib_x, qin, self.float_params)


def _spatial(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: input_shape must be (H, W, C), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _k(h: int, k: int) -> tuple[int, int]:
    """A kxk kernel, or 1xk on height-1 (1-D) inputs."""
    return (1, k) if h == 1 else (k, k)


def _s(h: int, s: int) -> tuple[int, int]:
    return (1, s) if h == 1 else (s, s)


# --- architectures -------------------------------------------------------------------------------

def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,), seed: int = 0,
        calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None) -> Model:
    """RESHAPE (flatten) -> FULLY_CONNECTED + RELU per hidden width -> FULLY_CONNECTED (logits)."""
    g = _Builder("mlp", input_shape, seed)
    x = g.flatten(g.input)
    for width in hidden:
        x = g.fc(x, int(width), "RELU")
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


def digits_cnn(input_shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, seed: int = 0,
               calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None,
               channels: tuple[int, int] = (16, 32)) -> Model:
    """CONV 3x3 16 SAME RELU, CONV 3x3 32 stride 2 SAME RELU, MAX_POOL 2x2, RESHAPE, FC."""
    h, w, _ = _spatial(input_shape, "digits_cnn")
    g = _Builder("digits_cnn", input_shape, seed)
    x = g.conv(g.input, channels[0], _k(h, 3), (1, 1), "SAME", "RELU")
    x = g.conv(x, channels[1], _k(h, 3), _s(h, 2), "SAME", "RELU")
    x = _halve(g, x)
    x = g.flatten(x)
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


def _halve(g, x):
    """MAX_POOL 2x2 over the sides longer than 1 (none on a 1x1 map), so small and 1-D inputs build."""
    _, hh, ww, _ = g.shape(x)
    if hh >= 2 or ww >= 2:
        ph, pw = min(2, hh), min(2, ww)
        x = g.max_pool(x, (ph, pw), (ph, pw))
    return x


def mnist_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, seed: int = 0,
              calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None,
              channels: tuple[int, int] = (8, 16)) -> Model:
    """CONV 3x3 SAME RELU, MAX_POOL 2x2, CONV 3x3 SAME RELU, MAX_POOL 2x2, RESHAPE, FC: on 28x28
    inputs 28 -> 14 -> 7 positions, 7 x 7 x channels[1] features. A pool halves only the sides
    longer than 1 (none on a 1x1 map), so small and 1-D (1, W, C) inputs build too."""
    h, w, _ = _spatial(input_shape, "mnist_cnn")
    g = _Builder("mnist_cnn", input_shape, seed)
    x = g.input
    for c in channels:
        x = _halve(g, g.conv(x, int(c), _k(h, 3), (1, 1), "SAME", "RELU"))
    x = g.flatten(x)
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


def mnist1d_cnn(input_shape: Sequence[int] = (1, 40, 1), num_classes: int = 10, seed: int = 0,
                calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None,
                channels: int = 32, kernel: int = 5, strides: Sequence[int] = (1, 2, 2)) -> Model:
    """1-D CNN as 1xK CONV_2D layers: len(strides) convs of ``channels`` (kernel 1x5, RELU), then
    RESHAPE + FC. On (1, 40, 1) inputs: 40 -> 40 -> 20 -> 10 positions x 32 channels -> 320 -> FC."""
    h, w, _ = _spatial(input_shape, "mnist1d_cnn")
    g = _Builder("mnist1d_cnn", input_shape, seed)
    x = g.input
    for s in strides:
        x = g.conv(x, int(channels), _k(h, kernel), _s(h, int(s)), "SAME", "RELU")
    x = g.flatten(x)
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


def mobilenet_tiny(input_shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, seed: int = 0,
                   calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None,
                   stem: int = 16, blocks: Sequence[tuple[int, int, int]] = ((1, 16, 1), (4, 24, 2), (4, 24, 1))
                   ) -> Model:
    """Tiny MobileNetV2: stem CONV 3x3 /2 RELU6, inverted residual blocks given as
    (expansion, out channels, stride): 1x1 expand RELU6, DEPTHWISE 3x3 RELU6, 1x1 linear
    projection, ADD when stride 1 and channels match; MEAN over H, W; FC."""
    h, w, _ = _spatial(input_shape, "mobilenet_tiny")
    g = _Builder("mobilenet_tiny", input_shape, seed)
    x = g.conv(g.input, int(stem), _k(h, 3), _s(h, 2), "SAME", "RELU6")
    for t, c, s in blocks:
        cin = g.shape(x)[3]
        y = g.conv(x, int(cin * t), (1, 1), (1, 1), "VALID", "RELU6")
        y = g.depthwise(y, _k(h, 3), _s(h, int(s)), "SAME", "RELU6")
        y = g.conv(y, int(c), (1, 1), (1, 1), "VALID", "NONE")
        x = g.add(x, y) if g.shape(x) == g.shape(y) else y
    x = g.mean_hw(x)
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


def resnet_tiny(input_shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, seed: int = 0,
                calib_x: np.ndarray | None = None, input_range: tuple[float, float] | None = None,
                widths: tuple[int, int] = (16, 32)) -> Model:
    """Tiny ResNet: stem CONV 3x3 RELU; basic block (CONV RELU, CONV, ADD + fused RELU); strided
    basic block with a 1x1 stride-2 projection shortcut; MEAN over H, W; FC."""
    h, w, _ = _spatial(input_shape, "resnet_tiny")
    g = _Builder("resnet_tiny", input_shape, seed)
    k3 = _k(h, 3)
    x = g.conv(g.input, widths[0], k3, (1, 1), "SAME", "RELU")
    y = g.conv(x, widths[0], k3, (1, 1), "SAME", "RELU")
    y = g.conv(y, widths[0], k3, (1, 1), "SAME", "NONE")
    x = g.add(x, y, "RELU")
    y = g.conv(x, widths[1], k3, _s(h, 2), "SAME", "RELU")
    y = g.conv(y, widths[1], k3, (1, 1), "SAME", "NONE")
    shortcut = g.conv(x, widths[1], (1, 1), _s(h, 2), "VALID", "NONE")
    x = g.add(shortcut, y, "RELU")
    x = g.mean_hw(x)
    return g.finish(g.fc(x, int(num_classes)), calib_x, input_range, seed)


_BUILDERS: dict[str, Callable[..., Model]] = {
    "mlp": mlp,
    "digits_cnn": digits_cnn,
    "mnist_cnn": mnist_cnn,
    "mnist1d_cnn": mnist1d_cnn,
    "mobilenet_tiny": mobilenet_tiny,
    "resnet_tiny": resnet_tiny,
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def reinitialize(model: Model, calib_x: np.ndarray, seed: int = 0) -> Model:
    """Fresh He-normal weights and zero biases for every weighted op of ``model`` (any int8 graph,
    e.g. one read from a .tflite), recalibrated on ``calib_x``; the input quantization is kept.
    In place; returns the model. This is how "retrain from scratch" starts for an imported model."""
    rng = np.random.default_rng(seed)
    float_params = {}
    for op in model.ops:
        if op.kind not in WEIGHTED_OPS:
            continue
        w = model.tensors[op.inputs[1]]
        if op.kind == "CONV_2D":
            fan_in = int(np.prod(w.shape[1:]))
        elif op.kind == "DEPTHWISE_CONV_2D":
            fan_in = int(w.shape[1] * w.shape[2])
        else:
            fan_in = int(w.shape[1])
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        cout = w.shape[3] if op.kind == "DEPTHWISE_CONV_2D" else w.shape[0]
        float_params[op.index] = (_he_normal(rng, w.shape, fan_in), np.zeros(cout) if has_bias else None)
    return calibrate(model, calib_x, input_quantization=model.tensors[model.core_inputs[0]].quant,
                     float_params=float_params)


def build(name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0,
          calib_x: np.ndarray | None = None, **kw) -> Model:
    """Build architecture ``name`` (one of :data:`ARCHITECTURES`); extra keywords go to its function
    (e.g. ``hidden`` for mlp, ``input_range``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return _BUILDERS[name](tuple(input_shape), int(num_classes), seed=seed, calib_x=calib_x, **kw)
