"""The engine Model's op graph as a float32 PyTorch module, for the benchmarks' comparisons.

Shared by train_step.py (a training step), forward.py (inference) and unlearn_qat.py (Q-MUL as
fake-quant QAT, which subclasses it). Not a converter: it covers the ops of the fixtures and of
the benchmark layers, and raises ValueError on anything else.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_qmul.quant import dequantize


def _same_pads(in_size: int, k: int, stride: int) -> tuple[int, int]:
    """TFLite SAME padding: total = max((out-1)*s + k - in, 0), total // 2 before, the rest after."""
    out = -(-in_size // stride)
    total = max((out - 1) * stride + k - in_size, 0)
    return total // 2, total - total // 2


def _activation(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "NONE":
        return x
    if act == "RELU":
        return F.relu(x)
    if act == "RELU6":
        return F.relu6(x)
    raise ValueError(f"unsupported fused activation {act}")


class TorchTwin(nn.Module):
    """The engine Model's op graph as a float32 torch module (NCHW inside, NHWC in and out).

    Built by walking ``model.ops``: CONV_2D -> conv2d, DEPTHWISE_CONV_2D -> conv2d with
    groups=channels, FULLY_CONNECTED -> linear, ADD -> +, MEAN over H, W -> mean(2, 3),
    MAX_POOL_2D -> max_pool2d, RESHAPE -> NHWC flatten; fused RELU / RELU6 applied after; SAME
    padding by TFLite's rule (total // 2 before, the rest after): the convolution's own padding when
    that is symmetric, an explicit F.pad when not (stride 2 on even sizes). Parameters are the engine's int8 weights
    and int32 biases dequantized to float32, so both start from the same real-valued weights.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.steps: list[tuple] = []
        self.params = nn.ParameterDict()
        tensors = model.tensors
        self.input_id = model.inputs[0]
        self.output_id = model.core_outputs[0]
        for op in model.ops:
            o = op.options
            act = o.get("activation", "NONE")
            x_shape = tensors[op.inputs[0]].shape
            if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                wt, bt = tensors[op.inputs[1]], tensors[op.inputs[2]]
                w = dequantize(wt.data, wt.quant).astype(np.float32)
                b = (bt.data.astype(np.float64) * bt.quant.scale.astype(np.float64)).astype(np.float32)
                if op.kind == "CONV_2D":  # (O, KH, KW, I) -> (O, I, KH, KW)
                    w = w.transpose(0, 3, 1, 2)
                    groups = 1
                elif op.kind == "DEPTHWISE_CONV_2D":  # (1, KH, KW, C) -> (C, 1, KH, KW)
                    if o.get("depth_multiplier", 1) != 1:
                        raise ValueError("depth_multiplier != 1 is not supported here")
                    w = w.transpose(3, 0, 1, 2)
                    groups = w.shape[0]
                key = f"op{op.index}"
                self.params[key + "_w"] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)))
                self.params[key + "_b"] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(b)))
                if op.kind == "FULLY_CONNECTED":
                    self.steps.append(("fc", key, op.inputs[0], op.outputs[0], act))
                    continue
                kh, kw = w.shape[2], w.shape[3]
                sh, sw = o.get("stride_h", 1), o.get("stride_w", 1)
                if o.get("dilation_h", 1) != 1 or o.get("dilation_w", 1) != 1:
                    raise ValueError("dilation is not supported here")
                if o["padding"] == "SAME":
                    pt, pb = _same_pads(x_shape[1], kh, sh)
                    pl, pr = _same_pads(x_shape[2], kw, sw)
                    pads = (pl, pr, pt, pb)
                else:
                    pads = (0, 0, 0, 0)
                self.steps.append(("conv", key, op.inputs[0], op.outputs[0], act, (sh, sw), pads, groups))
            elif op.kind == "ADD":
                self.steps.append(("add", None, op.inputs[0], op.outputs[0], act, op.inputs[1]))
            elif op.kind == "MEAN":
                axes = tuple(int(a) for a in tensors[op.inputs[1]].data.reshape(-1))
                if axes != (1, 2) or o.get("keep_dims", False):
                    raise ValueError(f"MEAN over {axes} keep_dims={o.get('keep_dims')} is not supported here")
                self.steps.append(("mean", None, op.inputs[0], op.outputs[0], "NONE"))
            elif op.kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
                if o.get("padding", "VALID") != "VALID":
                    raise ValueError("SAME pooling is not supported here")
                self.steps.append(("maxpool" if op.kind == "MAX_POOL_2D" else "avgpool", None, op.inputs[0],
                                   op.outputs[0], act, (o["filter_h"], o["filter_w"]),
                                   (o["stride_h"], o["stride_w"])))
            elif op.kind in ("QUANTIZE", "DEQUANTIZE"):  # the float interface: values pass through
                self.steps.append(("identity", None, op.inputs[0], op.outputs[0], "NONE"))
            elif op.kind == "RESHAPE":
                if len(tensors[op.outputs[0]].shape) != 2:
                    raise ValueError("only flattening RESHAPEs are supported here")
                self.steps.append(("flatten", None, op.inputs[0], op.outputs[0], "NONE"))
            else:
                raise ValueError(f"op {op.kind} has no torch counterpart here")

    # Hooks a fake-quant subclass overrides (unlearn_qat.QATTwin): here the float values pass as they are.
    def weight(self, key: str) -> torch.Tensor:
        return self.params[key + "_w"]

    def activation_out(self, y: torch.Tensor, tensor: int) -> torch.Tensor:
        return y

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        x_nhwc = self.activation_out(x_nhwc, self.input_id)
        # NCHW from here on (2-D after flatten/mean; an MLP's input is 2-D already)
        v = {self.input_id: x_nhwc.permute(0, 3, 1, 2) if x_nhwc.dim() == 4 else x_nhwc}
        p = self.params
        for s in self.steps:
            kind, key, i, out, act = s[:5]
            x = v[i]
            if kind == "conv":
                stride, pads, groups = s[5], s[6], s[7]
                pl, pr, pt, pb = pads
                if pl == pr and pt == pb:  # symmetric: let the convolution pad (no padded copy)
                    y = F.conv2d(x, self.weight(key), p[key + "_b"], stride=stride, padding=(pt, pl),
                                 groups=groups)
                else:  # TFLite's asymmetric SAME (stride 2 on even sizes: 0 before, 1 after)
                    y = F.conv2d(F.pad(x, pads), self.weight(key), p[key + "_b"], stride=stride, groups=groups)
            elif kind == "fc":
                y = F.linear(x, self.weight(key), p[key + "_b"])
            elif kind == "add":
                y = x + v[s[5]]
            elif kind == "mean":
                y = x.mean(dim=(2, 3))
            elif kind == "maxpool":
                y = F.max_pool2d(x, s[5], s[6])
            elif kind == "avgpool":
                y = F.avg_pool2d(x, s[5], s[6])
            elif kind == "identity":
                y = x
            elif kind == "flatten":  # NHWC element order, as the engine's RESHAPE
                y = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.dim() == 4 else x
            v[out] = self.activation_out(_activation(y, act), out)
        return v[self.output_id]
