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
# INT_VECTOR in both places marks a [int] vector field: the reader and writer handle it themselves
# (a flatbuffers vector is read by index and must be built before its table starts).
INT_VECTOR = "int_vector"
_ints = (INT_VECTOR, INT_VECTOR)
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
        ("shrink_axis_mask", "ShrinkAxisMask", *_ident), ("offset", "Offset", *_bool))),
    "PACK": ("PackOptions", tflite.BuiltinOptions.PackOptions, (
        ("values_count", "ValuesCount", *_ident), ("axis", "Axis", *_ident))),
    "SHAPE": ("ShapeOptions", tflite.BuiltinOptions.ShapeOptions, (("out_type", "OutType", *_ident),)),
}
OPTIONS["MAX_POOL_2D"] = ("Pool2DOptions", tflite.BuiltinOptions.Pool2DOptions, OPTIONS["AVERAGE_POOL_2D"][2])
_resize = (("align_corners", "AlignCorners", *_bool), ("half_pixel_centers", "HalfPixelCenters", *_bool))
OPTIONS["RESIZE_BILINEAR"] = ("ResizeBilinearOptions", tflite.BuiltinOptions.ResizeBilinearOptions, _resize)
OPTIONS["RESIZE_NEAREST_NEIGHBOR"] = ("ResizeNearestNeighborOptions",
                                      tflite.BuiltinOptions.ResizeNearestNeighborOptions, _resize)
OPTIONS["MUL"] = ("MulOptions", tflite.BuiltinOptions.MulOptions, (("activation", "FusedActivationFunction", *_act),))
OPTIONS["SUB"] = ("SubOptions", tflite.BuiltinOptions.SubOptions, (
    ("activation", "FusedActivationFunction", *_act), ("pot_scale_int16", "PotScaleInt16", *_bool)))

# Versions the writer gives ops it creates (LiteRT's builtin resolver registers these for int8).
DEFAULT_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2,
                    "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "MEAN": 2, "PAD": 2, "RESHAPE": 1,
                    "SOFTMAX": 2, "QUANTIZE": 2, "DEQUANTIZE": 2}
# RESIZE_*: version 3 is int8 with half_pixel_centers (op_version.cc); the resolver takes 1..4.
DEFAULT_VERSIONS.update({"RESIZE_BILINEAR": 3, "RESIZE_NEAREST_NEIGHBOR": 3})
# MUL / SUB: version 2 is int8 (op_version.cc); the resolver takes MUL 1..8, SUB 1..5.
DEFAULT_VERSIONS.update({"MUL": 2, "SUB": 2})
# Activations: LEAKY_RELU carries alpha; HARD_SWISH an empty table; the others have no options.
OPTIONS["LEAKY_RELU"] = ("LeakyReluOptions", tflite.BuiltinOptions.LeakyReluOptions, (("alpha", "Alpha", *_ident),))
OPTIONS["HARD_SWISH"] = ("HardSwishOptions", tflite.BuiltinOptions.HardSwishOptions, ())
# int8 versions (op_version.cc): LOGISTIC / TANH / RELU / RELU6 2; LEAKY_RELU, HARD_SWISH, RELU_N1_TO_1 1.
DEFAULT_VERSIONS.update({"LOGISTIC": 2, "TANH": 2, "RELU": 2, "RELU6": 2, "RELU_N1_TO_1": 1,
                         "LEAKY_RELU": 1, "HARD_SWISH": 1})
# UNIDIRECTIONAL_SEQUENCE_LSTM (kernels/lstm.py): version 1 is the int8 8x8_16 kernel (op_version.cc)
OPTIONS["UNIDIRECTIONAL_SEQUENCE_LSTM"] = (
    "UnidirectionalSequenceLSTMOptions", tflite.BuiltinOptions.UnidirectionalSequenceLSTMOptions, (
        ("fused_activation_function", "FusedActivationFunction", *_act), ("cell_clip", "CellClip", *_ident),
        ("proj_clip", "ProjClip", *_ident), ("time_major", "TimeMajor", *_bool),
        ("asymmetric_quantize_inputs", "AsymmetricQuantizeInputs", *_bool),
        ("diagonal_recurrent_tensors", "DiagonalRecurrentTensors", *_bool)))
DEFAULT_VERSIONS.update({"UNIDIRECTIONAL_SEQUENCE_LSTM": 1})
# Data movement (kernels/movement/); int8 versions from op_version.cc, inside the resolver's ranges.
OPTIONS["CONCATENATION"] = ("ConcatenationOptions", tflite.BuiltinOptions.ConcatenationOptions, (
    ("axis", "Axis", *_ident), ("activation", "FusedActivationFunction", *_act)))
OPTIONS["SQUEEZE"] = ("SqueezeOptions", tflite.BuiltinOptions.SqueezeOptions, (
    ("squeeze_dims", "SqueezeDims", *_ints),))
OPTIONS["SPLIT"] = ("SplitOptions", tflite.BuiltinOptions.SplitOptions, (("num_splits", "NumSplits", *_ident),))
OPTIONS["SPLIT_V"] = ("SplitVOptions", tflite.BuiltinOptions.SplitVOptions, (("num_splits", "NumSplits", *_ident),))
OPTIONS["UNPACK"] = ("UnpackOptions", tflite.BuiltinOptions.UnpackOptions, (
    ("num", "Num", *_ident), ("axis", "Axis", *_ident)))
for _kind, _table in (("TRANSPOSE", "TransposeOptions"), ("EXPAND_DIMS", "ExpandDimsOptions"),
                      ("TILE", "TileOptions"), ("FILL", "FillOptions")):
    OPTIONS[_kind] = (_table, getattr(tflite.BuiltinOptions, _table), ())
DEFAULT_VERSIONS.update({"CONCATENATION": 2, "STRIDED_SLICE": 4, "SQUEEZE": 1, "EXPAND_DIMS": 1,
                         "TRANSPOSE": 2, "PACK": 2, "UNPACK": 2, "SPLIT": 2, "SPLIT_V": 2, "FILL": 3,
                         "TILE": 1})
# Read for shape arithmetic folded at load (fold.py): GATHER's axis, REDUCE_PROD's keep_dims.
OPTIONS["GATHER"] = ("GatherOptions", tflite.BuiltinOptions.GatherOptions, (
    ("axis", "Axis", *_ident), ("batch_dims", "BatchDims", *_ident)))
OPTIONS["REDUCE_PROD"] = ("ReducerOptions", tflite.BuiltinOptions.ReducerOptions, (("keep_dims", "KeepDims", *_bool),))
