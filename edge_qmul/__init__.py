"""edge_qmul: on-device unlearning for int8-quantized models in an integer-arithmetic engine."""
from pathlib import Path as _Path

__version__ = "0.1.0"

from .numba_cache import drop_stale_cache as _drop_stale_cache

_drop_stale_cache(_Path(__file__).resolve().parent)  # before any kernel loads cached machine code

from .errors import ModelError  # noqa: E402
from .graph import Model, Op, Tensor  # noqa: E402
from .quant import QuantParams  # noqa: E402
from .tflite import load_tflite, save_tflite  # noqa: E402

__all__ = ["Model", "ModelError", "Op", "QuantParams", "Tensor", "load_tflite", "save_tflite", "__version__"]
