"""`edge-qmul unlearn` and `edge-qmul store` end to end on a real SQLite store and .tflite files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edge_qmul import datasets, load_tflite, save_tflite
from edge_qmul.cli import main
from edge_qmul.quant import quantize
from edge_qmul.store import Store, sha256_id

PATTERN = bytes(range(100, 116))  # 16 bytes no digit image holds (values 100..115 in a row)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def device(trained_digits, tmp_path_factory):
    """The trained digits model and a store: 12 owners, a validation slice the model never saw, and
    one of alice's samples carrying a unique byte pattern."""
    root = tmp_path_factory.mktemp("device")
    ds, val, model = trained_digits["ds"], trained_digits["val"], trained_digits["model"]
    n = len(ds.y_train)
    q = model.tensors[model.core_inputs[0]].quant
    x = quantize(ds.x_train, q)
    owners = np.array(["alice"] + [f"user{i % 11}" for i in range(1, n)])
    owners[:40] = "alice"
    x[0].reshape(-1)[:16] = np.frombuffer(PATTERN, np.int8)
    save_tflite(model, root / "model.tflite")
    with Store(root / "store.db", create=True) as s:
        s.configure(input_shape=x.shape[1:], quant=q, num_classes=10)
        s.add(x[~val], ds.y_train[~val], list(owners[~val]))
        s.add(x[val], ds.y_train[val], list(owners[val]), role="validation")
    return root


def copy_device(device: Path, tmp_path: Path) -> tuple[Path, Path]:
    for name in ("model.tflite", "store.db"):
        (tmp_path / name).write_bytes((device / name).read_bytes())
    return tmp_path / "model.tflite", tmp_path / "store.db"


def test_forget_an_owner_and_commit(device, tmp_path):
    model, store = copy_device(device, tmp_path)
    with Store(store) as s:
        alice = s.select(owner="alice", role=None)
    assert PATTERN in store.read_bytes()
    rc = main(["unlearn", "--model", str(model), "--store", str(store), "--owner", "alice",
               "--method", "qmul", "--out", str(tmp_path / "new.tflite"), "--report", str(tmp_path / "r.json"),
               "--commit"])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_forgotten"] == len(alice) and report["committed"]
    assert report["forgotten_sample_id_hashes"] == sorted(sha256_id(i) for i in alice)
    assert report["model_after_sha256"] == sha(tmp_path / "new.tflite")
    assert report["model_before_sha256"] == sha(model)
    check = report["litert_check"]
    assert check["bit_exact"] and check["differing_elements"] == 0 and check["top_class_agrees"]
    assert check["output_elements"] > 0 and check["engine_profile"] == check["litert_platform"]
    assert report["samples_deleted_at"]
    for key in ("UA", "RA"):
        assert report["metrics_before"][key] is not None and report["metrics_after"][key] is not None
    with Store(store) as s:
        assert s.count(owner="alice") == 0
        assert s.active_model == report["model_after_sha256"]
        log = json.dumps(s.audit_log())
    assert "alice" not in log and not any(i in log for i in alice)
    wal = Path(f"{store}-wal")
    assert PATTERN not in store.read_bytes()
    assert not wal.exists() or PATTERN not in wal.read_bytes()
    load_tflite(tmp_path / "new.tflite")  # a valid model


def _bad(args, model: Path, store: Path, capsys, message: str):
    before = (sha(model), sha(store))
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert (sha(model), sha(store)) == before


def test_bad_requests_change_nothing(device, tmp_path, capsys):
    model, store = copy_device(device, tmp_path)
    out = str(tmp_path / "new.tflite")
    base = ["unlearn", "--model", str(model), "--store", str(store), "--out", out]
    _bad(base + ["--owner", "mallory"], model, store, capsys, "mallory")
    ids = tmp_path / "ids.txt"
    ids.write_text("no-such-id\n")
    _bad(base + ["--ids", str(ids)], model, store, capsys, "no-such-id")
    ids.write_text("\n")
    _bad(base + ["--ids", str(ids)], model, store, capsys, "empty")
    with Store(store) as s:
        everything = s.retain_sample()
    ids.write_text("\n".join(everything))
    _bad(base + ["--ids", str(ids)], model, store, capsys, "whole store")
    other = load_tflite(Path(__file__).parent / "fixtures" / "digits_cnn.tflite")
    from edge_qmul.unlearn.similar_labels import build_table
    ds = datasets.load("digits", seed=0)
    table = build_table(other, quantize(ds.x_test, other.tensors[other.core_inputs[0]].quant), ds.y_test)
    table.save(tmp_path / "table.json")
    _bad(base + ["--owner", "alice", "--table", str(tmp_path / "table.json")], model, store, capsys, "model")
    assert not Path(out).exists()


def test_corrupted_store_is_refused(device, tmp_path, capsys):
    model, store = copy_device(device, tmp_path)
    data = bytearray(store.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    store.write_bytes(bytes(data))
    _bad(["unlearn", "--model", str(model), "--store", str(store), "--owner", "alice", "--out",
          str(tmp_path / "new.tflite")], model, store, capsys, "store.db")


def test_store_commands(device, tmp_path, capsys):
    model, store = copy_device(device, tmp_path)
    assert main(["store", "verify", str(store)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ok")
    assert main(["store", "stats", str(store)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["by_owner"]["alice"] == 40
    assert main(["store", "list", str(store), "--owner", "alice"]) == 0
    assert "alice\t40 samples" in capsys.readouterr().out
    ds = datasets.load("digits", seed=1)
    np.savez(tmp_path / "more.npz", x=ds.x_test[:10], y=ds.y_test[:10])
    assert main(["store", "import", str(store), "--model", str(model), "--npz", str(tmp_path / "more.npz"),
                 "--owner", "bob"]) == 0
    with Store(store) as s:
        assert s.count(owner="bob") == 10
