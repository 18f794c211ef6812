"""Shape arithmetic folded at load (edge_qmul/tflite/fold.py), checked against LiteRT, which
computes the same shapes at run time."""
from __future__ import annotations

import numpy as np
from edge_qmul import Op, QuantParams, Tensor, litert, load_tflite
from edge_qmul.tflite import to_bytes
from test_bad_input import _raw_model

I8, I32 = np.dtype(np.int8), np.dtype(np.int32)


def _upsampling_model() -> bytes:
    """Keras 3 UpSampling2D's pattern: size = CONCATENATION(STRIDED_SLICE(SHAPE(x)) * 2, [5]), then
    RESIZE_NEAREST_NEIGHBOR(x, size); and FILL(dims from SHAPE, int8 value) added to it."""
    q = QuantParams([0.05], [3])
    t = [Tensor("x", (1, 4, 3, 2), I8, q),                                           # 0
         Tensor("shape", (4,), I32),                                                 # 1
         Tensor("begin", (1,), I32, data=np.array([1], np.int32)),                    # 2
         Tensor("end", (1,), I32, data=np.array([2], np.int32)),                      # 3
         Tensor("strides", (1,), I32, data=np.array([1], np.int32)),                  # 4
         Tensor("h", (1,), I32),                                                     # 5
         Tensor("two", (1,), I32, data=np.array([2], np.int32)),                      # 6
         Tensor("h2", (1,), I32),                                                    # 7
         Tensor("five", (1,), I32, data=np.array([5], np.int32)),                     # 8
         Tensor("size", (2,), I32),                                                  # 9
         Tensor("up", (1, 8, 5, 2), I8, q),                                          # 10
         Tensor("dims", (4,), I32),                                                  # 11
         Tensor("value", (), I8, q, data=np.array(7, np.int8)),                       # 12
         Tensor("filled", (1, 8, 5, 2), I8, q),                                      # 13
         Tensor("y", (1, 8, 5, 2), I8, QuantParams([0.1], [-2]))]                    # 14
    shape_options = {"out_type": 2}  # TensorType.INT32
    ops = [Op("SHAPE", [0], [1], shape_options, version=1),
           Op("STRIDED_SLICE", [1, 2, 3, 4], [5], {"begin_mask": 0, "end_mask": 0, "ellipsis_mask": 0,
                                                   "new_axis_mask": 0, "shrink_axis_mask": 0}, version=2),
           Op("MUL", [5, 6], [7], {"activation": "NONE"}, version=1),
           Op("CONCATENATION", [7, 8], [9], {"axis": 0, "activation": "NONE"}, version=1),
           Op("RESIZE_NEAREST_NEIGHBOR", [0, 9], [10], {"align_corners": False, "half_pixel_centers": False},
              version=3),
           Op("SHAPE", [10], [11], shape_options, version=1),
           Op("FILL", [11, 12], [13], version=3),
           Op("ADD", [10, 13], [14], {"activation": "NONE"}, version=2)]
    return to_bytes(_raw_model(t, ops, [0], [14]))


def test_shape_arithmetic_through_concatenation_folds_and_equals_litert():
    data = _upsampling_model()
    model = load_tflite(data)
    assert [op.kind for op in model.ops] == ["RESIZE_NEAREST_NEIGHBOR", "FILL", "ADD"]
    resize = model.ops[0]
    np.testing.assert_array_equal(model.tensors[resize.inputs[1]].data, [8, 5])
    x = np.random.default_rng(0).integers(-128, 128, size=(6, 4, 3, 2)).astype(np.int8)
    np.testing.assert_array_equal(model.predict(x), litert.run(data, x))
