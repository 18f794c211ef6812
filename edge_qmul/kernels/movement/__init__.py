"""Data movement: CONCATENATION, STRIDED_SLICE, EXPAND_DIMS, SQUEEZE, TRANSPOSE, PACK, UNPACK, SPLIT,
SPLIT_V, FILL, TILE. Values are copied, never computed, so the outputs equal LiteRT's bit for bit.

LiteRT's int8 CONCATENATION, PACK, UNPACK and FILL refuse inputs whose scale or zero point differ
from the output's (concatenation.cc: "no re-scaling needed for Int8"; its fused activation must be
NONE), so no op here requantizes: every op checks that its data tensors share one quantization.

Arrays are batch-first (axis 0 is the batch; the file's tensors have batch 1) and an op applies the
file's axes literally to them. That also covers the one place Keras moves the batch axis: an
unrolled RNN transposes (batch, time, features) to (time, batch, features) and UNPACKs the time
axis (the pieces are batch-first again), or PACKs per-step outputs along axis 0 and transposes back.
``batch_axis`` follows where the batch sits; a tensor whose batch is not at axis 0 may only be read
by TRANSPOSE, UNPACK or PACK, and must not be a model output (ModelError otherwise).

FILL's output does not depend on the input: it is the file's shape (batch 1), and the ops reading
it broadcast it over the batch. Constant operands of CONCATENATION and PACK broadcast likewise.

The ops live in join_split.py (CONCATENATION, PACK, UNPACK, SPLIT, SPLIT_V), strided_slice.py,
reshape.py (EXPAND_DIMS, SQUEEZE, TRANSPOSE) and fill_tile.py (FILL, TILE); checks.py holds what
they share. This module gathers their registry.
"""
from __future__ import annotations

from .checks import BATCH_MOVERS, DTYPES, batch_axis, data_quant, movement_kernel
from .fill_tile import (backward_none, backward_tile, forward_fill, forward_tile, prepare_fill, prepare_tile,
                        tile_backward_bytes)
from .join_split import (backward_concatenation, backward_pack, backward_split, backward_unpack,
                         forward_concatenation, forward_pack, forward_split, forward_unpack, prepare_concatenation,
                         prepare_pack, prepare_split, prepare_split_v, prepare_unpack)
from .reshape import (backward_reshape, backward_transpose, forward_reshape, forward_transpose, prepare_expand_dims,
                      prepare_squeeze, prepare_transpose)
from .strided_slice import (_axis_range, _strided_slice_spec, backward_strided_slice, forward_strided_slice,
                            prepare_strided_slice)

KERNELS = {
    "CONCATENATION": movement_kernel(prepare_concatenation, forward_concatenation, backward_concatenation),
    "STRIDED_SLICE": movement_kernel(prepare_strided_slice, forward_strided_slice, backward_strided_slice),
    "EXPAND_DIMS": movement_kernel(prepare_expand_dims, forward_reshape, backward_reshape),
    "SQUEEZE": movement_kernel(prepare_squeeze, forward_reshape, backward_reshape),
    "TRANSPOSE": movement_kernel(prepare_transpose, forward_transpose, backward_transpose),
    "PACK": movement_kernel(prepare_pack, forward_pack, backward_pack),
    "UNPACK": movement_kernel(prepare_unpack, forward_unpack, backward_unpack),
    "SPLIT": movement_kernel(prepare_split, forward_split, backward_split, output_quant="fixed",
                             fixed_quant=data_quant(1)),
    "SPLIT_V": movement_kernel(prepare_split_v, forward_split, backward_split),
    "FILL": movement_kernel(prepare_fill, forward_fill, backward_none, output_quant="fixed",
                            fixed_quant=data_quant(1)),
    "TILE": movement_kernel(prepare_tile, forward_tile, backward_tile, backward_bytes=tile_backward_bytes),
}

__all__ = ["BATCH_MOVERS", "DTYPES", "KERNELS", "_axis_range", "_strided_slice_spec", "batch_axis"]
