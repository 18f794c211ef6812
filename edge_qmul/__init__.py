"""edge_qmul: on-device unlearning for int8-quantized models in an integer-arithmetic engine."""
from .errors import ModelError
from .graph import Model, Op, Tensor
from .quant import QuantParams
from .tflite import load_tflite, save_tflite

__version__ = "0.1.0"
__all__ = ["Model", "ModelError", "Op", "QuantParams", "Tensor", "load_tflite", "save_tflite", "__version__"]
