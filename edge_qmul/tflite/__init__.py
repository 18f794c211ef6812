""".tflite <-> Model."""
from .reader import load_tflite
from .writer import save_tflite, to_bytes

__all__ = ["load_tflite", "save_tflite", "to_bytes"]
