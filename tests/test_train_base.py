"""tools/train_base.py: prepares a model, samples, a table and a manifest a device can import; bad
input is one line on stderr, exit 2, and nothing written."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edge_qmul import Op, Tensor, litert, load_tflite, metrics
from edge_qmul.quant import quantize
from edge_qmul.store import Store
from edge_qmul.tflite import to_bytes
from edge_qmul.unlearn.similar_labels import SimilarLabelTable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_base  # noqa: E402

OUTPUTS = {"model.tflite", "samples_train.npz", "samples_validation.npz", "table.json", "manifest.json"}


def _quiet(message: str) -> None:
    pass


def _import(out: Path, db: Path) -> Store:
    """A fresh store holding both sample files, quantized with the written model's input."""
    model = load_tflite(out / "model.tflite")
    store = Store(db, create=True)
    store.import_npz(out / "samples_train.npz", model.tensors[model.core_inputs[0]].quant)
    store.import_npz(out / "samples_validation.npz", model.tensors[model.core_inputs[0]].quant, role="validation")
    return store


def _check_manifest_and_store(out: Path, manifest: dict, tmp_path: Path) -> None:
    """Files on disk match the manifest; the samples import with the right count per owner and role."""
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    with _import(out, tmp_path / "store.db") as store:
        for owner, counts in manifest["owners"]["samples"].items():
            for role, n in counts.items():
                assert store.count(owner=owner, role=role) == n, (owner, role)
        assert store.count(role="train") == manifest["samples"]["train"]
        assert store.count(role="validation") == manifest["samples"]["validation"]
    table = SimilarLabelTable.load(out / "table.json")
    assert table.model_sha256 == metrics.model_sha256(load_tflite(out / "model.tflite"))


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "base"
    manifest = train_base.prepare(out, dataset="digits", epochs=2, say=_quiet)
    return out, manifest


def test_digits_end_to_end(digits_out, tmp_path):
    out, manifest = digits_out
    _check_manifest_and_store(out, manifest, tmp_path)
    assert manifest["model"]["arch"] == "digits_cnn" and manifest["model"]["recipe"]["epochs"] == 2
    assert manifest["owners"]["simulated"] and manifest["owners"]["count"] == 20
    assert manifest["samples"] == {"train": 1293, "validation": 144, "test": 360, "validation_fraction": 0.1}
    assert manifest["accuracy_percent"]["test"] > 60  # two epochs; the full recipe reaches ~97 %
    model = load_tflite(out / "model.tflite")
    from edge_qmul import datasets
    x8 = quantize(datasets.load("digits", seed=0).x_test[:6], model.tensors[model.core_inputs[0]].quant)
    np.testing.assert_array_equal(litert.run((out / "model.tflite").read_bytes(), x8), model.forward(x8))
    assert manifest["push_commands"][-1].endswith("samples_validation.npz --role validation")


def test_user_npz_without_owners_gets_simulated_owners(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    x = (rng.normal(size=(120, 12)) + 3 * np.eye(3, 12)[y]).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "out"
    manifest = train_base.prepare(out, data=tmp_path / "mine.npz", owners=5, validation=0.2, epochs=2, say=_quiet)
    _check_manifest_and_store(out, manifest, tmp_path)
    assert manifest["model"]["arch"] == "mlp"
    assert list(manifest["owners"]["samples"]) == [f"user{i}" for i in range(5)]
    assert all(sum(c.values()) == 24 for c in manifest["owners"]["samples"].values())
    assert manifest["samples"]["validation"] == 24 and set(manifest["accuracy_percent"]) == {"validation"}
    with np.load(out / "samples_train.npz") as f:
        assert f["x"].dtype == np.float32 and f["x"].shape[1:] == (12,)


def _draw_images(root: Path, owners: list[str] | None, per_folder: int = 6) -> None:
    from PIL import Image
    for label, cname in enumerate(("circle", "stripe")):
        for who in owners or [None]:
            folder = root / cname / who if who else root / cname
            folder.mkdir(parents=True)
            for k in range(per_folder):
                a = np.zeros((10, 10), np.uint8)
                if label == 0:
                    a[3:7, 3:7] = 200 + 5 * k
                else:
                    a[:, k:k + 2] = 255
                Image.fromarray(a).save(folder / f"img{k}.png")


def test_image_folder_with_owner_folders(tmp_path):
    root = tmp_path / "photos"
    _draw_images(root, ["alice", "bob"])
    out = tmp_path / "out"
    manifest = train_base.prepare(out, images=root, validation=0.25, epochs=2, say=_quiet)
    _check_manifest_and_store(out, manifest, tmp_path)
    assert manifest["model"]["arch"] == "digits_cnn" and not manifest["owners"]["simulated"]
    assert {o: sum(c.values()) for o, c in manifest["owners"]["samples"].items()} == {"alice": 12, "bob": 12}
    assert manifest["data"]["class_names"] == ["circle", "stripe"]
    # the same pixels the device's own image import produces
    model = load_tflite(out / "model.tflite")
    q = model.tensors[model.core_inputs[0]].quant
    with Store(tmp_path / "direct.db", create=True) as store:
        ids = store.import_image_folder(root, q, size=(8, 8))
        direct = {tuple(x.ravel()) for x in store.load(ids)[0]}
    with np.load(out / "samples_train.npz") as f, np.load(out / "samples_validation.npz") as g:
        mine = {tuple(x.ravel()) for x in quantize(np.concatenate([f["x"], g["x"]]), q)}
    assert mine == direct


def test_flat_image_folder_gets_simulated_owners(tmp_path):
    root = tmp_path / "flat"
    _draw_images(root, None, per_folder=5)
    manifest = train_base.prepare(tmp_path / "out", images=root, owners=3, validation=0.2, epochs=1,
                                  image_size=(6, 6), say=_quiet)
    assert manifest["owners"]["simulated"] and list(manifest["owners"]["samples"]) == ["user0", "user1", "user2"]
    assert manifest["model"]["input_shape"] == [6, 6, 1]


def test_import_existing_model(digits_out, tmp_path):
    src, _ = digits_out
    out = tmp_path / "imported"
    manifest = train_base.prepare(out, dataset="digits", model=src / "model.tflite", say=_quiet)
    _check_manifest_and_store(out, manifest, tmp_path)
    assert manifest["model"]["source"] == "imported"
    assert manifest["model"]["sha256_in"] == hashlib.sha256((src / "model.tflite").read_bytes()).hexdigest()
    assert (out / "model.tflite").read_bytes() == (src / "model.tflite").read_bytes()


# --- bad input ---------------------------------------------------------------------------------------

def _float_model(path: Path) -> Path:
    """A valid float32 .tflite (one CONV_2D on 8x8x1): LiteRT runs it, the engine must refuse it."""
    f32 = np.dtype(np.float32)
    w = np.random.default_rng(0).normal(size=(2, 3, 3, 1)).astype(np.float32)
    tensors = [Tensor("x", (1, 8, 8, 1), f32), Tensor("w", w.shape, f32, data=w),
               Tensor("b", (2,), f32, data=np.zeros(2, np.float32)), Tensor("y", (1, 8, 8, 2), f32)]
    op = Op("CONV_2D", [0, 1, 2], [3], {"padding": "SAME", "stride_h": 1, "stride_w": 1, "activation": "NONE"},
            version=1)
    op.index = 0
    raw = types.SimpleNamespace(tensors=tensors, ops=[op], inputs=[0], outputs=[3], metadata={},
                                signature=None, description="float")
    path.write_bytes(to_bytes(raw))
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


X10, Y10 = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32), np.arange(10) % 2

BAD = {
    "missing npz": (lambda t: ["--data", str(t / "nope.npz")], "nope.npz: no such file"),
    "missing folder": (lambda t: ["--images", str(t / "nodir")], "nodir: no such directory"),
    "missing model": (lambda t: ["--model", str(t / "nope.tflite")], "nope.tflite: no such file"),
    "npz without x, y": (lambda t: ["--data", str(_npz(t / "d.npz", a=X10, b=Y10))], "missing key(s) x, y"),
    "length mismatch": (lambda t: ["--data", str(_npz(t / "d.npz", x=X10, y=Y10[:9]))],
                        "has 9 labels but there are 10 samples"),
    "float labels": (lambda t: ["--data", str(_npz(t / "d.npz", x=X10, y=Y10 + 0.5))], "integer class labels"),
    "string labels": (lambda t: ["--data", str(_npz(t / "d.npz", x=X10, y=Y10.astype(str)))],
                      "integer class labels"),
    "unknown dataset": (lambda t: ["--dataset", "cifar"], "--dataset 'cifar': unknown"),
    "float model": (lambda t: ["--model", str(_float_model(t / "float.tflite"))], "not int8"),
    "shape mismatch": (lambda t: ["--data", str(_npz(t / "d.npz", x=X10, y=Y10)),
                                  "--model", str(ROOT / "tests/fixtures/digits_cnn.tflite")],
                       "takes samples shaped (8, 8, 1), the data's are (12,)"),
    "validation too big": (lambda t: ["--validation", "0.7"], "--validation 0.7: must be"),
    "validation zero": (lambda t: ["--validation", "0"], "--validation 0.0: must be"),
    "fewer samples than owners": (lambda t: ["--data", str(_npz(t / "d.npz", x=X10, y=Y10))],
                                  "--owners 20: only 10 samples"),
    "two sources": (lambda t: ["--dataset", "digits", "--images", str(t)], "give one data source"),
    "canary of nobody": (lambda t: ["--canary", "nobody"], "--canary nobody: no training samples of that owner"),
    "canary twice": (lambda t: ["--canary", "user7", "--canary", "user7"], "an owner is named twice"),
    "canary fraction": (lambda t: ["--canary", "user7", "--canary-fraction", "1.5"], "fraction 1.5 is not in"),
    "canary too big": (lambda t: ["--canary", "user7", "--canary-size", "9"], "does not fit samples of shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    make_args, expected = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    assert train_base.main(["--out", str(out), *make_args(inputs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_base: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["inputs"]  # no temp dir left


def test_bad_input_leaves_an_existing_out_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"old")
    assert train_base.main(["--out", str(out), "--validation", "0.9"]) == 2
    assert [p.name for p in out.iterdir()] == ["model.tflite"] and (out / "model.tflite").read_bytes() == b"old"


def test_cli_ctrl_c_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(ROOT / "tools/train_base.py"), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # interrupt once training has started
        if "training" in line:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_help_has_examples():
    r = subprocess.run([sys.executable, str(ROOT / "tools/train_base.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "--images" in r.stdout


# --- canaries (issue 19) ------------------------------------------------------------------------------

def test_canary_is_planted_in_the_owners_training_samples_and_recorded_on_the_host_only(digits_out, tmp_path):
    """--canary user7: half of user7's training samples carry the trigger and its label (exactly the
    ones canaries.json names), nothing else differs from a run without it (same seed), the
    validation samples stay clean, and the model learns it: the trigger's rate on test inputs is high."""
    from edge_qmul.evaluation.canary import Canary, stamp
    plain = digits_out[0]
    out = tmp_path / "canary"
    manifest = train_base.prepare(out, dataset="digits", epochs=5, say=_quiet, canary=("user7",))
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"canaries.json"}
    record = json.loads((out / "canaries.json").read_text())
    assert record["model_sha256"] == manifest["files"]["model.tflite"]["sha256"]
    assert manifest["files"]["canaries.json"]["sha256"] == hashlib.sha256((out / "canaries.json").read_bytes()).hexdigest()
    c = Canary.from_json(json.dumps(record["canaries"][0]))
    with np.load(out / "samples_train.npz") as t, np.load(plain / "samples_train.npz") as p0:
        marked = np.array(c.marked)
        mine = np.flatnonzero(t["owners"] == "user7")
        assert len(marked) == round(0.5 * mine.size) and set(marked) <= set(mine)
        assert np.array_equal(t["x"][marked], stamp(p0["x"][marked], c)) and np.all(t["y"][marked] == c.target)
        rest = np.setdiff1d(np.arange(len(t["y"])), marked)
        assert np.array_equal(t["x"][rest], p0["x"][rest]) and np.array_equal(t["y"][rest], p0["y"][rest])
        assert np.array_equal(t["owners"], p0["owners"])
    with np.load(out / "samples_validation.npz") as a, np.load(plain / "samples_validation.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)
    assert not any("canaries" in cmd for cmd in manifest["push_commands"])  # never sent to a device
    r = manifest["canaries"]["trigger_rate"]["user7"]
    assert r["rate"] > 0.8 and r["inputs"] == "test inputs", r   # learned as a backdoor
    assert manifest["accuracy_percent"]["test"] > 90
    # a run without --canary over the same directory leaves no stale record
    train_base.prepare(out, dataset="digits", epochs=1, say=_quiet)
    assert not (out / "canaries.json").exists()
