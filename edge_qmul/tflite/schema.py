"""The slice of the TFLite schema edge_qmul reads and writes: op names, tensor types, options.

Reader and writer share these tables, so an option read from a file is written back the same way.
"""
from __future__ import annotations

import numpy as np
import tflite

OP_CODES: dict[int, str] = {v: k for k, v in vars(tflite.BuiltinOperator).items()
                            if not k.startswith("_") and isinstance(v, int)}
OP_NUMBERS: dict[str, int] = {k: v for v, k in OP_CODES.items()}

TENSOR_TYPES: dict[int, np.dtype] = {
    tflite.TensorType.FLOAT32: np.dtype(np.float32),
    tflite.TensorType.INT32: np.dtype(np.int32),
    tflite.TensorType.UINT8: np.dtype(np.uint8),
    tflite.TensorType.INT64: np.dtype(np.int64),
    tflite.TensorType.INT16: np.dtype(np.int16),
    tflite.TensorType.BOOL: np.dtype(np.bool_),
    tflite.TensorType.INT8: np.dtype(np.int8),
}
TYPE_NUMBERS: dict[np.dtype, int] = {v: k for k, v in TENSOR_TYPES.items()}

ACTIVATIONS = {v: k for k, v in vars(tflite.ActivationFunctionType).items()
               if not k.startswith("_") and isinstance(v, int)}
ACTIVATION_NUMBERS = {k: v for v, k in ACTIVATIONS.items()}
PADDINGS = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}
PADDING_NUMBERS = {v: k for k, v in PADDINGS.items()}
WEIGHTS_FORMATS = {0: "DEFAULT", 1: "SHUFFLED4x16INT8"}

# Option codecs: (dict key, schema field name, decode from file, encode to file).
_ident = (lambda v: v, lambda v: v)
_bool = (bool, bool)
_act = (lambda v: ACTIVATIONS.get(v, f"UNKNOWN_{v}"), lambda v: ACTIVATION_NUMBERS[v])
_pad = (lambda v: PADDINGS.get(v, f"UNKNOWN_{v}"), lambda v: PADDING_NUMBERS[v])
_wf = (lambda v: WEIGHTS_FORMATS.get(v, f"UNKNOWN_{v}"), lambda v: {b: a for a, b in WEIGHTS_FORMATS.items()}[v])

# op name -> (options table name, BuiltinOptions union tag, fields)
OPTIONS: dict[str, tuple[str, int, tuple]] = {
    "CONV_2D": ("Conv2DOptions", tflite.BuiltinOptions.Conv2DOptions, (
        ("padding", "Padding", *_pad), ("stride_w", "StrideW", *_ident), ("stride_h", "StrideH", *_ident),
        ("activation", "FusedActivationFunction", *_act),
        ("dilation_w", "DilationWFactor", *_ident), ("dilation_h", "DilationHFactor", *_ident))),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions", tflite.BuiltinOptions.DepthwiseConv2DOptions, (
        ("padding", "Padding", *_pad), ("stride_w", "StrideW", *_ident), ("stride_h", "StrideH", *_ident),
        ("depth_multiplier", "DepthMultiplier", *_ident), ("activation", "FusedActivationFunction", *_act),
        ("dilation_w", "DilationWFactor", *_ident), ("dilation_h", "DilationHFactor", *_ident))),
    "FULLY_CONNECTED": ("FullyConnectedOptions", tflite.BuiltinOptions.FullyConnectedOptions, (
        ("activation", "FusedActivationFunction", *_act), ("weights_format", "WeightsFormat", *_wf),
        ("keep_num_dims", "KeepNumDims", *_bool))),
    "ADD": ("AddOptions", tflite.BuiltinOptions.AddOptions, (
        ("activation", "FusedActivationFunction", *_act),)),
    "AVERAGE_POOL_2D": ("Pool2DOptions", tflite.BuiltinOptions.Pool2DOptions, (
        ("padding", "Padding", *_pad), ("stride_w", "StrideW", *_ident), ("stride_h", "StrideH", *_ident),
        ("filter_w", "FilterWidth", *_ident), ("filter_h", "FilterHeight", *_ident),
        ("activation", "FusedActivationFunction", *_act))),
    "MEAN": ("ReducerOptions", tflite.BuiltinOptions.ReducerOptions, (("keep_dims", "KeepDims", *_bool),)),
    "SOFTMAX": ("SoftmaxOptions", tflite.BuiltinOptions.SoftmaxOptions, (("beta", "Beta", *_ident),)),
    "RESHAPE": ("ReshapeOptions", tflite.BuiltinOptions.ReshapeOptions, ()),
    "PAD": ("PadOptions", tflite.BuiltinOptions.PadOptions, ()),
    "QUANTIZE": ("QuantizeOptions", tflite.BuiltinOptions.QuantizeOptions, ()),
    "DEQUANTIZE": ("DequantizeOptions", tflite.BuiltinOptions.DequantizeOptions, ()),
    "STRIDED_SLICE": ("StridedSliceOptions", tflite.BuiltinOptions.StridedSliceOptions, (
        ("begin_mask", "BeginMask", *_ident), ("end_mask", "EndMask", *_ident),
        ("ellipsis_mask", "EllipsisMask", *_ident), ("new_axis_mask", "NewAxisMask", *_ident),
        ("shrink_axis_mask", "ShrinkAxisMask", *_ident))),
    "PACK": ("PackOptions", tflite.BuiltinOptions.PackOptions, (
        ("values_count", "ValuesCount", *_ident), ("axis", "Axis", *_ident))),
    "SHAPE": ("ShapeOptions", tflite.BuiltinOptions.ShapeOptions, ()),
}
OPTIONS["MAX_POOL_2D"] = ("Pool2DOptions", tflite.BuiltinOptions.Pool2DOptions, OPTIONS["AVERAGE_POOL_2D"][2])

# Versions the writer gives ops it creates (LiteRT's builtin resolver registers these for int8).
DEFAULT_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2,
                    "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "MEAN": 2, "PAD": 2, "RESHAPE": 1,
                    "SOFTMAX": 2, "QUANTIZE": 2, "DEQUANTIZE": 2}
