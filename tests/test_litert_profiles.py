"""The aarch64 arithmetic profile against what LiteRT computed on an (emulated) Cortex-A76.

tests/fixtures/litert_aarch64 holds LiteRT 2.3.0's own outputs recorded inside the emulated
aarch64 root of ``make test-arm64`` (tools/record_litert.py for the fixture and zoo models; the op
tests run with EDGE_QMUL_LITERT_RECORD for the random single-op models). Here, on any machine, the
engine with ``litert="aarch64"`` must equal them bit for bit, so the profile stays guarded where no
emulation runs; and the x86 profile must not (the recordings do tell the platforms apart).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oplib import check_ops_against_litert, float32_bits
from edge_qmul import load_tflite
from edge_qmul.arithmetic import arithmetic, host_platform
from edge_qmul.errors import ModelError
from edge_qmul.forget import litert_check

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = FIXTURES / "litert_aarch64"
RANDOM = sorted((RECORDED / "random").glob("*.npz"))
MODELS = sorted((RECORDED / "fixtures").glob("*.npz")) + sorted((RECORDED / "zoo").glob("*.npz"))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _model_path(record: Path) -> Path:
    return (FIXTURES if record.parent.name == "fixtures" else FIXTURES / "zoo") / f"{record.stem}.tflite"


def random_cases(record: dict) -> list[tuple[bytes, list[np.ndarray], list[np.ndarray]]]:
    """(model bytes, input batches, LiteRT's outputs) of each recorded random model."""
    cases = []
    for k in range(int(record["count"])):
        xs = [record[f"c{k}_x{j}"] for j in range(64) if f"c{k}_x{j}" in record]
        ys = [record[f"c{k}_y{j}"] for j in range(64) if f"c{k}_y{j}" in record]
        cases.append((record[f"c{k}_model"].tobytes(), xs, ys))
    return cases


def disagreements(cases, litert: str) -> list[str]:
    """Which recorded random models the engine with profile ``litert`` does not reproduce."""
    bad = []
    for k, (model_bytes, xs, ys) in enumerate(cases):
        model = load_tflite(model_bytes, litert=litert)
        got = model.predict(*xs)
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        for j, (g, y) in enumerate(zip(got, ys)):
            g = np.asarray(g).reshape(y.shape)
            if g.dtype != y.dtype or not np.array_equal(float32_bits(g), float32_bits(y)):
                bad.append(f"case {k} output {j}: {int(np.sum(float32_bits(g) != float32_bits(y)))} "
                           f"of {y.size} elements differ")
    return bad


def test_recordings_exist_and_come_from_aarch64():
    assert len(RANDOM) >= 15 and len(MODELS) >= 15, "tests/fixtures/litert_aarch64 is incomplete"
    meta = json.loads(str(_load(MODELS[0])["meta"]))
    assert meta["machine"] == "aarch64" and meta["ai_edge_litert"] == "2.3.0"
    assert meta["cpuinfo"]["CPU part"] == "0xd0b"  # Cortex-A76


@pytest.mark.parametrize("path", RANDOM, ids=[p.stem.split("-")[-1].replace("test_", "") for p in RANDOM])
def test_random_single_op_models_equal_recorded_aarch64_litert(path):
    cases = random_cases(_load(path))
    bad = disagreements(cases, "aarch64")
    assert not bad, f"{path.stem}: {len(bad)} of {len(cases)} recorded models disagree:\n" + "\n".join(bad[:8])


def _op(path: Path) -> str:
    """The op a recording is of: ``...match_litert_CONV_2D_`` -> ``CONV_2D``."""
    return path.stem.rsplit("litert_", 1)[-1].strip("_")


def test_x86_profile_does_not_reproduce_aarch64():
    """The recordings tell the platforms apart: where LiteRT's builds differ (the GEMM epilogue,
    the 3x3 depthwise kernel, DEQUANTIZE's fused multiply-add, SOFTMAX's table, HARD_SWISH's NEON
    body), the x86 profile misses some models."""
    counts: dict[str, int] = {}
    for path in RANDOM:
        if _op(path) in DIFFERING_OPS:
            counts[_op(path)] = counts.get(_op(path), 0) + len(disagreements(random_cases(_load(path)), "x86_64"))
    assert set(counts) == set(DIFFERING_OPS), f"recordings missing for {set(DIFFERING_OPS) - set(counts)}"
    assert all(counts.values()), f"the x86 profile reproduces every aarch64 recording of some op: {counts}"


DIFFERING_OPS = ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D_3X3", "DEQUANTIZE", "SOFTMAX", "HARD_SWISH")


@pytest.mark.parametrize("path", MODELS, ids=[f"{p.parent.name}/{p.stem}" for p in MODELS])
def test_model_equals_recorded_aarch64_litert(path):
    """Fixtures and zoo models, one sample at a time (the file's batch of 1, as a device invokes
    them) and batched in the engine: both equal the recorded per-sample outputs."""
    rec = _load(path)
    model = load_tflite(_model_path(path), litert="aarch64")
    y = model.predict(rec["x"])
    np.testing.assert_array_equal(float32_bits(y), float32_bits(rec["y_per_sample"]))
    for s in range(0, len(rec["x"]), 7):
        np.testing.assert_array_equal(float32_bits(model.predict(rec["x"][s:s + 1])),
                                      float32_bits(rec["y_per_sample"][s:s + 1]))


@pytest.mark.parametrize("path", [p for p in MODELS if p.parent.name == "fixtures"],
                         ids=lambda p: p.stem)
def test_every_recorded_intermediate_tensor(path):
    """Each op of a fixture, given aarch64 LiteRT's own inputs to it, makes its recorded output."""
    rec = _load(path)
    index = json.loads(str(rec["tensor_names"]))
    model = load_tflite(_model_path(path), litert="aarch64")
    samples = sorted({int(k[1:k.index("_")]) for k in rec if k.startswith("s") and "_t" in k})
    assert samples
    for s in samples:
        check_ops_against_litert(model, lambda name: rec[f"s{s}_t{index[name]}"], f"{path.stem}, sample {s}")


def test_profile_names_and_default():
    assert arithmetic("arm64").platform == "aarch64" and arithmetic("AMD64").platform == "x86_64"
    assert arithmetic(None).platform == host_platform()
    with pytest.raises(ModelError, match="unknown LiteRT platform.*aarch64, x86_64"):
        arithmetic("riscv64")
    with pytest.raises(ModelError, match="riscv64"):
        load_tflite(FIXTURES / "mlp40.tflite", litert="riscv64")


def test_use_litert_switches_an_existing_model():
    path = MODELS[[p.stem for p in MODELS].index("resnet_tiny")]
    rec = _load(path)
    model = load_tflite(_model_path(path), litert="x86_64")
    assert not np.array_equal(model.predict(rec["x"]), rec["y_per_sample"])
    np.testing.assert_array_equal(model.use_litert("aarch64").predict(rec["x"]), rec["y_per_sample"])
    assert model.copy().litert.platform == "aarch64"


def test_certificate_check_counts_bits_and_top_classes_apart(tmp_path):
    """forget.litert_check reports differing elements and top-class agreement as separate fields:
    the engine computing another platform's profile differs in some bits, not in top classes."""
    other = "aarch64" if host_platform() == "x86_64" else "x86_64"
    path = FIXTURES / "resnet_tiny.tflite"
    x = _load(FIXTURES / "resnet_tiny.npz")["x"]
    same = litert_check(path, load_tflite(path), x)
    assert same["bit_exact"] and same["differing_elements"] == 0 and same["top_class_agrees"]
    assert same["output_elements"] == x.shape[0] * 10 and same["engine_profile"] == host_platform()
    cross = litert_check(path, load_tflite(path, litert=other), x)
    assert not cross["bit_exact"] and cross["differing_elements"] > 0 and cross["top_class_agrees"]
    assert cross["engine_profile"] == other and cross["litert_platform"] == host_platform()
