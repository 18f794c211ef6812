"""Record what this machine's LiteRT (builtin kernels, no XNNPACK) computes for the test models.

Run on an aarch64 board, or inside the emulated Cortex-A76 of ``tools/arm64.sh``, it writes the
outputs the x86 tests replay to guard the ``aarch64`` arithmetic profile where no emulation runs
(tests/test_litert_profiles.py):

    python tools/record_litert.py --out tests/fixtures/litert_aarch64

For each fixture model (tests/fixtures) and zoo model (tests/fixtures/zoo) that the engine loads:
the outputs one sample at a time and as one batch, and, for the first ``--intermediates`` samples of
the fixtures, every tensor LiteRT computed (so each op can be replayed from LiteRT's own inputs).
The random single-op recordings come from the op tests themselves, run with
``EDGE_QMUL_LITERT_RECORD=DIR`` (tests/oplib.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_MODELS = ["digits_cnn", "digits_cnn_floatio", "mlp40", "mobilenet_tiny", "resnet_tiny",
                  "mobilenetv2_035"]


def machine_description() -> dict:
    """Where the recording was made: the ISA, LiteRT's version, the CPU LiteRT saw."""
    import ai_edge_litert
    import os
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("CPU part", "Features", "model name") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:
        pass
    return {"machine": platform.machine(), "python": platform.python_version(),
            "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
            "qemu_cpu": os.environ.get("QEMU_CPU", ""), "cpuinfo": cpu}


def _interpreter(path: Path, preserve: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(str(path), experimental_preserve_all_tensors=preserve,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def record_model(path: Path, x: np.ndarray, intermediates: int) -> dict[str, np.ndarray]:
    """LiteRT's outputs for ``x`` per sample and as one batch, and every tensor of the first
    ``intermediates`` samples (keys ``s{sample}_t{tensor index}``, names in ``tensor_names``)."""
    it = _interpreter(path)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    per_sample = []
    for s in range(len(x)):
        it.reset_all_variables()
        it.set_tensor(inp, x[s:s + 1])
        it.invoke()
        per_sample.append(it.get_tensor(out).copy())
    arrays = {"x": x, "y_per_sample": np.concatenate(per_sample)}
    try:
        it.resize_tensor_input(inp, list(x.shape))
        it.allocate_tensors()
    except RuntimeError:  # a model whose state tensors fix the batch (an LSTM's): per sample only
        pass
    else:
        it.reset_all_variables()
        it.set_tensor(inp, x)
        it.invoke()
        arrays["y_batch"] = it.get_tensor(out).copy()
    if intermediates:
        it = _interpreter(path, preserve=True)
        details = it.get_tensor_details()
        arrays["tensor_names"] = np.array(json.dumps({d["name"]: d["index"] for d in details}))
        for s in range(min(intermediates, len(x))):
            it.reset_all_variables()
            it.set_tensor(inp, x[s:s + 1])
            it.invoke()
            for d in details:
                try:
                    v = it.get_tensor(d["index"])
                except ValueError:  # a tensor without data (an absent optional input)
                    continue
                if v is not None and v.size:
                    arrays[f"s{s}_t{d['index']}"] = v.copy()
    return arrays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for fixtures/ and zoo/ records")
    ap.add_argument("--intermediates", type=int, default=2,
                    help="samples whose every tensor is recorded, fixtures only (default 2)")
    ap.add_argument("--only", nargs="*", help="record only these model names")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edge_qmul import load_tflite
    from edge_qmul.errors import ModelError

    zoo = [m["name"] for m in json.loads((FIXTURES / "zoo" / "index.json").read_text())]
    jobs = [("fixtures", FIXTURES, n, args.intermediates) for n in FIXTURE_MODELS]
    jobs += [("zoo", FIXTURES / "zoo", n, 0) for n in sorted(zoo)]
    meta = machine_description()
    for group, folder, name, inter in jobs:
        if args.only and name not in args.only:
            continue
        path = folder / f"{name}.tflite"
        try:
            load_tflite(path)
        except ModelError as e:  # the zoo holds models the engine refuses on purpose
            print(f"{group}/{name}: skipped ({e})"[:160], flush=True)
            continue
        with np.load(folder / f"{name}.npz") as d:
            x = d["x"]
        arrays = record_model(path, x, inter)
        arrays["meta"] = np.array(json.dumps(meta))
        dest = args.out / group / f"{name}.npz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dest, **arrays)
        tensors = sum(k.startswith("s") and "_t" in k for k in arrays)
        print(f"{group}/{name}: {len(x)} samples, {tensors} recorded tensors -> {dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
