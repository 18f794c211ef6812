"""LiteRT as a reference interpreter: run .tflite bytes the way a device's app would.

``ai_edge_litert`` (LiteRT) is preferred; boards that only have the frozen ``tflite_runtime`` work
too. ``builtin=True`` selects the built-in reference kernels without XNNPACK, the engine's
bit-exact oracle; ``builtin=False`` the default (XNNPACK) path.
"""
from __future__ import annotations

import numpy as np


def _interpreter_module():
    # imported on first use: LiteRT is optional (the `device` extra), and the engine runs without it
    try:
        from ai_edge_litert import interpreter as mod
    except ImportError:  # pragma: no cover - boards with only tflite-runtime
        try:
            from tflite_runtime import interpreter as mod
        except ImportError as e:
            raise ImportError("LiteRT is not installed: pip install 'edge-qmul[device]' "
                              "(ai-edge-litert) or tflite-runtime") from e
    return mod


def interpreter(model_bytes: bytes, builtin: bool = True, threads: int | None = None):
    """A LiteRT Interpreter for ``model_bytes``, tensors allocated."""
    mod = _interpreter_module()
    kwargs = {"model_content": bytes(model_bytes)}
    if threads is not None:
        kwargs["num_threads"] = threads
    if builtin:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = mod.Interpreter(**kwargs)
    it.allocate_tensors()
    return it


def run(model_bytes: bytes, x: np.ndarray, builtin: bool = True, per_sample: bool = True) -> np.ndarray:
    """Run a single-input, single-output model on a batch.

    ``per_sample=True`` invokes once per sample at the file's batch size of 1, the way the fixtures'
    references were made (LiteRT's results can depend on the batch it is invoked with).
    """
    it = interpreter(model_bytes, builtin)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    x = np.asarray(x)
    if not per_sample:
        it.resize_tensor_input(inp, list(x.shape))
        it.allocate_tensors()
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out).copy()
    ys = []
    for s in range(x.shape[0]):
        # each sample is its own sequence: state (an LSTM's variable tensors) starts at zero, as the
        # engine's does
        it.reset_all_variables()
        it.set_tensor(inp, x[s:s + 1])
        it.invoke()
        ys.append(it.get_tensor(out).copy())
    return np.concatenate(ys)
