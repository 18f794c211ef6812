"""LiteRT's int8 arithmetic per platform: which rounding each op uses where LiteRT's builds differ.

The same LiteRT release computes slightly different int8 results on x86_64 and on aarch64, because
its two builds take different code paths (ai-edge-litert 2.3.0, builtin kernels, read in its sources
and confirmed under an emulated Cortex-A76, tools/arm64.sh):

- **CONV_2D and FULLY_CONNECTED through ruy.** aarch64 builds define TFLITE_WITH_RUY, and ruy's
  arm64 kernels requantize an accumulator with ``sqdmulh`` then a rounding shift (``srshl``): one
  rounding of ``acc * M / 2^(31 + right)``. x86's kernels round twice (SRDHM, then the shift), as
  gemmlowp's MultiplyByQuantizedMultiplier does. A batch-1 FULLY_CONNECTED that LiteRT sends to its
  own NEON GEMV (cpu_backend_gemm_custom_gemv.h) rounds twice on both.
- **DEQUANTIZE**: the aarch64 compiler contracts ``q * scale + (-zp * scale)`` into one fused
  multiply-add; x86 (SSE, no FMA) rounds the product first.
- **SOFTMAX**: aarch64 (clang) builds SoftmaxInt8LUT, a uint16 exp table with integer sums and a
  requantization, where x86 uses a float32 table (kernels/softmax.py).
- **HARD_SWISH**: its NEON body runs on ARM only (x86 takes the reference code), and rounds its
  int16 steps differently (kernels/activation.py).
- **DEPTHWISE_CONV_2D**: the aarch64-only 3x3 kernel shifts left after the multiply for a channel
  whose multiplier is 1 or more (kernels/depthwise.py); otherwise both run the same NEON code.

A :class:`Model` carries one :class:`Arithmetic`; its kernels read it when they prepare. The
default is the platform the engine runs on; ``load_tflite(..., litert="aarch64")`` (or
``EDGE_QMUL_LITERT=aarch64``) makes an x86 host compute exactly what a board's LiteRT will.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from .errors import ModelError
from .quant import DOUBLE_ROUNDING, SINGLE_ROUNDING  # the roundings a profile picks between


@dataclass(frozen=True)
class Arithmetic:
    """The int8 arithmetic of LiteRT's builtin kernels on one platform."""

    platform: str
    gemm_rounding: int  # CONV_2D and FULLY_CONNECTED through ruy
    gemv_rounding: int  # LiteRT's custom GEMV (one destination column: batch 1, one position)
    dequantize_fma: bool  # DEQUANTIZE's vector part as one fused multiply-add
    softmax_uint16_table: bool  # SOFTMAX int8 with SoftmaxInt8LUT (a uint16 exp table)
    depthwise_3x3_kernel: bool  # the NEON 3x3 DEPTHWISE_CONV_2D kernel where it applies
    neon_hard_swish: bool  # HARD_SWISH's NEON body (aarch64 only: x86 runs the reference)

    def gemm(self, rows: int, depth: int, cols: int) -> int:
        """The rounding of a LiteRT ``cpu_backend_gemm::Gemm`` with ``rows`` outputs (filters),
        ``depth`` products each and ``cols`` destination columns (positions of one invocation):
        one column, four rows and eight products or more take the custom GEMV, the rest ruy."""
        if cols == 1 and rows >= 4 and depth >= 8:
            return self.gemv_rounding
        return self.gemm_rounding


ARITHMETICS = {
    "x86_64": Arithmetic("x86_64", DOUBLE_ROUNDING, DOUBLE_ROUNDING, False, False, False, False),
    "aarch64": Arithmetic("aarch64", SINGLE_ROUNDING, DOUBLE_ROUNDING, True, True, True, True),
}
ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x86": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
ENV = "EDGE_QMUL_LITERT"


def host_platform() -> str:
    """The profile of the machine the engine runs on: ``aarch64`` on 64-bit ARM, else ``x86_64``."""
    return ALIASES.get(platform.machine().lower(), "x86_64")


def arithmetic(litert: str | Arithmetic | None = None) -> Arithmetic:
    """The Arithmetic named by ``litert`` (``x86_64``, ``aarch64``, or an alias such as ``arm64``);
    None means ``$EDGE_QMUL_LITERT`` when set, else the host's platform."""
    if isinstance(litert, Arithmetic):
        return litert
    source = "litert"
    if litert is None:
        litert, source = os.environ.get(ENV) or host_platform(), ENV
    name = ALIASES.get(str(litert).lower())
    if name is None:
        raise ModelError(f"{source}={litert!r}: unknown LiteRT platform; choose one of "
                         f"{', '.join(sorted(ARITHMETICS))}")
    return ARITHMETICS[name]
