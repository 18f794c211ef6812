"""Model -> .tflite (placeholder)."""
def save_tflite(model, path): raise NotImplementedError
def to_bytes(model): raise NotImplementedError
