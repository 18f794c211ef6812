"""edge_qmul.bench and tools/bench_device.py: the report is complete and consistent, the model is left
alone, and the CLI turns bad input into one line and exit 2. Correctness only, never timings."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import fixture_path
from edge_qmul import ModelError, Op, Tensor, load_tflite, models
from edge_qmul.bench import bench_model, format_table, plot
from edge_qmul.tflite import to_bytes

ROOT = Path(__file__).resolve().parents[1]
FAST = {"repeats": 2, "forget_size": 8, "batch": 4}


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_device", ROOT / "tools" / "bench_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_device = _load_tool()


@pytest.fixture(scope="module")
def digits_cnn():
    calib = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)).astype(np.float32)
    return models.build("digits_cnn", (8, 8, 1), 10, seed=0, calib_x=calib)


@pytest.fixture(scope="module")
def report(digits_cnn):
    return bench_model(digits_cnn, **FAST)


def _snapshot(model) -> dict[str, np.ndarray]:
    return {i: t.data.copy() for i, t in enumerate(model.tensors) if t.data is not None}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_every_op_listed_once(report, digits_cnn):
    ops = report["ops"]
    assert [o["index"] for o in ops] == list(range(len(digits_cnn.ops)))
    assert [o["op"] for o in ops] == [op.kind for op in digits_cnn.ops]
    assert ops[0]["output_shape"][0] == FAST["batch"]
    assert report["ops_total_s"] > 0
    assert all(o["median_s"] > 0 and o["share"] > 0 for o in ops)
    assert math.isclose(sum(o["share"] for o in ops), 1.0, rel_tol=1e-9)


def test_fields_present_finite_positive(report):
    assert all(math.isfinite(v) for v in _numbers(report))
    for section in ("forward", "train_step"):
        assert report[section]["median_s"] > 0 and report[section]["per_sample_s"] > 0
    u = report["unlearn"]
    assert u["method"] == "oeu" and u["forget_size"] == 8 and u["retain_size"] == 32
    assert u["steps"] == u["epochs"] * math.ceil(u["forget_size"] / u["batch_size"]) > 0
    assert u["median_s"] > 0 and u["per_step_s"] > 0
    peaks = report["memory"]["tracemalloc_peak_bytes"]
    assert set(peaks) == {"forward", "train_step", "unlearn"} and all(v > 0 for v in peaks.values())
    assert report["memory"]["ru_maxrss_bytes"] > 0
    m = report["machine"]
    assert m["machine"] and m["python"] and m["numpy"] and m["numba"] and m["cpu_count"] > 0
    assert report["settings"]["batch"] == 4 and report["settings"]["inputs"] == "random" and report["date"]


def test_json_round_trips(report):
    assert json.loads(json.dumps(report)) == report


def test_table_and_png(report, tmp_path):
    table = format_table(report)
    for o in report["ops"]:
        assert o["op"] in table
    assert "forward" in table and "train step" in table and "unlearn" in table
    png = tmp_path / "bench.png"
    plot(report, png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_model_is_not_modified(digits_cnn):
    before = _snapshot(digits_cnn)
    bench_model(digits_cnn, repeats=1, forget_size=4, batch=2, method="ga")
    after = _snapshot(digits_cnn)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_file_model_with_samples():
    path = fixture_path("digits_cnn_floatio")  # float interface: QUANTIZE / DEQUANTIZE are listed too
    model = load_tflite(path)
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (20, 8, 8, 1)).astype(np.int8)
    y = rng.integers(0, 10, 20)
    r = bench_model(model, samples=(x, y), model_path=path, **FAST)
    assert r["settings"]["inputs"] == "samples" and len(r["model"]["sha256"]) == 64
    assert [o["op"] for o in r["ops"]] == [op.kind for op in model.ops]
    assert r["unlearn"]["retain_size"] == 12  # what is left of 20 samples after forgetting 8


@pytest.mark.parametrize("kwargs, match", [
    ({"batch": 0}, "batch must be"),
    ({"method": "nope"}, "unknown unlearning method"),
    ({"samples": (np.zeros((3, 8, 8, 1), np.int8), np.zeros(3, int))}, "too few"),
    ({"samples": (np.zeros((30, 8, 8, 1), np.float32), np.zeros(30, int))}, "must be int8"),
    ({"samples": (np.zeros((30, 8, 8, 1), np.int8), np.full(30, 10))}, "outside"),
])
def test_bad_arguments_raise_before_running(digits_cnn, kwargs, match):
    with pytest.raises(ModelError, match=match):
        bench_model(digits_cnn, **kwargs)


# --- the CLI -------------------------------------------------------------------------------------

def _float_model_bytes() -> bytes:
    """A float32 CONV_2D model (written without Model's checks, which would refuse it)."""
    import types
    f32 = np.dtype(np.float32)
    tensors = [Tensor("x", (1, 6, 6, 2), f32), Tensor("w", (3, 3, 3, 2), f32, data=np.ones((3, 3, 3, 2), f32)),
               Tensor("b", (3,), f32, data=np.zeros(3, f32)), Tensor("y", (1, 6, 6, 3), f32)]
    op = Op("CONV_2D", [0, 1, 2], [3], {"padding": "SAME", "stride_h": 1, "stride_w": 1, "activation": "NONE"},
            version=1)
    return to_bytes(types.SimpleNamespace(tensors=tensors, ops=[op], inputs=[0], outputs=[3], metadata={},
                                          signature=None, description="float"))


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    model = str(fixture_path("digits_cnn"))
    (tmp / "garbage.tflite").write_bytes(b"not a flatbuffer at all" * 8)
    (tmp / "float.tflite").write_bytes(_float_model_bytes())
    np.savez(tmp / "nokeys.npz", a=np.zeros(3))
    np.savez(tmp / "shape.npz", x=np.zeros((10, 4, 4, 1), np.int8), y=np.zeros(10, int))
    np.savez(tmp / "labels.npz", x=np.zeros((10, 8, 8, 1), np.int8), y=np.zeros((10, 2), int))
    return {
        "missing model": (["--model", str(tmp / "missing.tflite")], "missing.tflite"),
        "not a tflite": (["--model", str(tmp / "garbage.tflite")], "file identifier"),
        "float model": (["--model", str(tmp / "float.tflite")], "not int8-quantized"),
        "batch 0": (["--model", model, "--batch", "0"], "--batch must be >= 1"),
        "batch not a number": (["--model", model, "--batch", "x"], "--batch"),
        "unknown method": (["--model", model, "--method", "nope"], "unknown"),
        "npz missing keys": (["--model", model, "--samples", str(tmp / "nokeys.npz")], "needs keys x and y"),
        "npz wrong shape": (["--model", model, "--samples", str(tmp / "shape.npz")], "the model takes"),
        "npz labels shape": (["--model", model, "--samples", str(tmp / "labels.npz")], "expected (10,)"),
    }


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    for name, (argv, match) in _bad_inputs(tmp_path).items():
        assert bench_device.main(argv) == 2, name
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and match in lines[0] and lines[0].startswith("bench_device: error:"), (name, err)
        assert "Traceback" not in err and out == "", name


def test_cli_too_few_samples(tmp_path, capsys):
    np.savez(tmp_path / "few.npz", x=np.zeros((5, 8, 8, 1), np.float32), y=np.zeros(5, np.int64))
    argv = ["--model", str(fixture_path("digits_cnn")), "--samples", str(tmp_path / "few.npz")]
    assert bench_device.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too few" in err[0]


def test_cli_ctrl_c(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_device, "bench_model", interrupted)
    assert bench_device.main(["--model", str(fixture_path("digits_cnn"))]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["bench_device: interrupted"]


def test_cli_run_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--model", str(fixture_path("digits_cnn")), "--batch", "4", "--forget-size", "8", "--repeats", "2",
            "--method", "qmul", "--json", str(out_json), "--png", str(out_png)]
    assert bench_device.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["unlearn"]["method"] == "qmul" and len(data["ops"]) == len(load_tflite(fixture_path("digits_cnn")).ops)
    assert data["model"]["sha256"] and "sum of ops" in out and f"wrote {out_json}" in out
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size[0] > 0
