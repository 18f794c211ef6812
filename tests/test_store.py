"""The device's sample store: real SQLite files in tmp_path, real subprocess crashes, no mocks."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_qmul.quant import QuantParams, quantize
from edge_qmul.store import SCHEMA_VERSION, Store, StoreError, sha256_id

PATTERN = b"\xde\xad\xbe\xefFORGET-ME!\x13\x37"  # 16 bytes that appear nowhere else
assert len(PATTERN) == 16
MODEL_A, MODEL_B = "a" * 64, "b" * 64
Q = QuantParams([1 / 255], [-128])


def _samples(n: int, shape=(8, 8, 1), seed: int = 0) -> np.ndarray:
    """Random int8 samples that cannot contain PATTERN (bytes kept in [-64, 63])."""
    return np.random.default_rng(seed).integers(-64, 64, (n, *shape), dtype=np.int8)


def _with_pattern(n: int, shape=(8, 8, 1)) -> np.ndarray:
    x = np.zeros((n, *shape), np.int8)
    flat = x.reshape(n, -1)
    for i in range(n):
        flat[i, 3:19] = np.frombuffer(PATTERN, np.int8)
        flat[i, 0] = i  # rows differ
    return x


def _store_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def _file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _store_files(path)}


def _populated(path: Path, n_other: int = 120, shape=(8, 8, 1)) -> dict:
    """A store with owners u0..u3, 'alice' (whose samples hold PATTERN), a validation slice and the
    active model MODEL_A. Returns the ids."""
    with Store(path, create=True) as s:
        s.configure(num_classes=10, quant=Q)
        other = s.add(_samples(n_other, shape), np.arange(n_other) % 10, [f"u{i % 4}" for i in range(n_other)])
        alice = s.add(_with_pattern(4, shape), [1, 2, 3, 3], "alice")
        alice_val = s.add(_with_pattern(1, shape), [5], "alice", role="validation")
        val = s.add(_samples(10, shape, seed=1), np.arange(10), "holdout", role="validation")
        s.set_active_model(MODEL_A)
    return {"other": other, "alice": alice, "alice_val": alice_val, "val": val}


def _done_request(s: Store, selector: dict) -> str:
    rid = s.create_request(selector, "qmul", {"epochs": 2, "lr": 0.01})
    s.set_status(rid, "running")
    s.set_status(rid, "done", {"ua_after": 97.5})
    return rid


# --- opening, round trip ---------------------------------------------------------------------------------

def test_round_trip_and_pragmas(tmp_path):
    path = tmp_path / "store.db"
    x = _samples(30)
    y = np.arange(30) % 7
    with Store(path, create=True) as s:
        ids = s.add(x, y, [f"o{i % 3}" for i in range(30)], quant=Q)
        assert len(set(ids)) == 30 and all(len(i) == 32 for i in ids)
        conn = s.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with Store(path) as s:  # reopen from disk
        assert s.count() == 30 and s.owners() == ["o0", "o1", "o2"] and s.labels() == list(range(7))
        assert s.input_shape == (8, 8, 1) and s.quant == Q and s.meta()["dtype"] == "int8"
        order = [ids[5], ids[0], ids[29], ids[5]]  # given order, repeats allowed
        xl, yl = s.load(order)
        assert xl.dtype == np.int8 and xl.shape == (4, 8, 8, 1)
        np.testing.assert_array_equal(xl, x[[5, 0, 29, 5]])
        np.testing.assert_array_equal(yl, y[[5, 0, 29, 5]])
        assert s.verify()["samples"] == 30
        st = s.stats()
        assert st["by_owner"] == {"o0": 10, "o1": 10, "o2": 10} and st["by_role"] == {"train": 30}
        assert st["file_bytes"] > 0 and sum(st["by_label"].values()) == 30
    # create=True on an existing store simply opens it; check="quick" skips the per-row digests
    with Store(path, create=True) as s:
        assert s.count() == 30
    with Store(path, check="quick") as s:
        assert s.opened["check"] == "quick" and s.verify("quick")["samples"] == 30
    assert [p.name for p in _store_files(path)] == ["store.db"]  # a clean close leaves no WAL


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no store here"):
        Store(tmp_path / "missing.db")
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "dir.db", create=True)
    with pytest.raises(StoreError, match="directory"):
        Store(tmp_path, create=True)
    assert not list(tmp_path.iterdir())  # nothing left behind


# --- adding -----------------------------------------------------------------------------------------------

def test_add_is_all_or_nothing(tmp_path):
    path = tmp_path / "s.db"
    with Store(path, create=True) as s:
        s.configure(num_classes=3)
        first = s.add(_samples(5), [0, 1, 2, 0, 1], "a", ids=[f"id{i}" for i in range(5)])
        s.checkpoint()
        before = _file_hashes(path)["s.db"], s.count()

        bad_calls = [
            (dict(x_int8=_samples(3), labels=[0, 1, 2], owners="b", ids=["n1", "n2", "n1"]), "duplicate sample id 'n1'"),
            (dict(x_int8=_samples(3), labels=[0, 1, 2], owners="b", ids=["n1", "id3", "n3"]),
             "sample id 'id3' is already in the store"),
            (dict(x_int8=_samples(3).astype(np.int16), labels=[0, 1, 2], owners="b"), "must be int8"),
            (dict(x_int8=_samples(3, (4, 4, 1)), labels=[0, 1, 2], owners="b"), r"sample shape is \[8, 8, 1\]"),
            (dict(x_int8=_samples(3), labels=[0, 1, 3], owners="b"), "label 3 of sample 2 is out of range"),
            (dict(x_int8=_samples(3), labels=[0, -1, 2], owners="b"), "label -1 of sample 1 is negative"),
            (dict(x_int8=_samples(3), labels=[0, 1], owners="b"), "vector of 3 labels"),
            (dict(x_int8=_samples(3), labels=[0, 1, 2], owners=["b", "c"]), "3 owners"),
            (dict(x_int8=_samples(3), labels=[0, 1, 2], owners=["b", "", "c"]), "owner of sample 1"),
            (dict(x_int8=_samples(3), labels=[0.5, 1, 2], owners="b"), "integer class labels"),
            (dict(x_int8=_samples(3), labels=[0, 1, 2], owners="b", role="test"), "role must be one of"),
        ]
        for kwargs, msg in bad_calls:
            with pytest.raises(StoreError, match=msg):
                s.add(**kwargs)
            assert s.count() == 5, kwargs
        assert s.select(ids=first) == first
        with pytest.raises(StoreError, match="unknown sample id 'n1'"):
            s.select(ids=["n1"])
        assert s.add(np.zeros((0, 8, 8, 1), np.int8), [], "b") == []
        s.checkpoint()
        assert (_file_hashes(path)["s.db"], s.count()) == before  # the refused adds wrote nothing


# --- selecting, loading -------------------------------------------------------------------------------------

def test_select_by_owner_ids_label_and_roles(tmp_path):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        assert s.select(owner="alice") == ids["alice"]  # validation rows excluded by default
        assert s.select(owner="alice", role=None) == ids["alice"] + ids["alice_val"]
        assert s.select(owner="alice", role="validation") == ids["alice_val"]
        assert s.select(owner="holdout") == []  # known owner, no training samples
        assert s.select(ids=ids["alice"][::-1]) == ids["alice"][::-1]
        assert set(s.select(label=3)) == {ids["other"][i] for i in range(3, 120, 10)} | set(ids["alice"][2:])
        with pytest.raises(StoreError, match="unknown owner 'mallory'"):
            s.select(owner="mallory")
        with pytest.raises(StoreError, match="unknown sample id 'nope'"):
            s.select(ids=[ids["alice"][0], "nope"])
        with pytest.raises(StoreError, match="is a validation sample"):
            s.select(ids=ids["alice_val"])
        with pytest.raises(StoreError, match="label 10 is out of range"):
            s.select(label=10)
        with pytest.raises(StoreError, match="exactly one"):
            s.select(owner="alice", label=1)
        with pytest.raises(StoreError, match="exactly one"):
            s.select()
        with pytest.raises(StoreError, match="unknown sample id 'ghost'"):
            s.load([ids["other"][0], "ghost"])
        assert s.count(owner="alice") == 5 and s.count(role="validation") == 11
        assert s.stats()["by_role"] == {"train": 124, "validation": 11}


def test_mark_validation(tmp_path):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        moved = ids["other"][:10]
        assert s.mark_validation(moved) == 10
        assert s.mark_validation(moved) == 0
        assert not set(moved) & set(s.retain_sample([]))
        assert set(moved) <= set(s.select(owner="u0", role="validation")) | set(s.select(owner="u1", role="validation")) \
            | set(s.select(owner="u2", role="validation")) | set(s.select(owner="u3", role="validation"))
        assert s.set_role(moved, "train") == 10
        with pytest.raises(StoreError, match="unknown sample id 'zzz'"):
            s.mark_validation(["zzz"])
        s.verify()  # digests were updated with the role


def test_retain_sample_is_stratified_and_bounded(tmp_path):
    path = tmp_path / "s.db"
    counts = {0: 200, 1: 100, 2: 60, 3: 30, 4: 3}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    with Store(path, create=True) as s:
        ids = s.add(_samples(len(labels)), labels, "u")
        val = s.add(_samples(20, seed=2), np.arange(20) % 5, "v", role="validation")
        forget = ids[:50]  # 50 of class 0
        rest = [i for i in ids if i not in set(forget)]
        assert s.retain_sample(forget) == rest
        assert s.retain_sample(forget, max_n=10_000) == rest
        label_of = dict(zip(ids, labels.tolist()))
        remaining = {c: n - (50 if c == 0 else 0) for c, n in counts.items()}
        total = sum(remaining.values())
        for max_n in (40, 97, 200):
            got = s.retain_sample(forget, max_n=max_n, seed=1)
            assert len(got) == max_n and len(set(got)) == max_n
            assert not set(got) & set(forget) and not set(got) & set(val)
            per = {c: sum(label_of[i] == c for i in got) for c in counts}
            for c in counts:
                assert per[c] >= 1  # every class stays represented
                assert abs(per[c] - max_n * remaining[c] / total) < 1.5, (max_n, per)
            assert got == sorted(got, key=ids.index)  # insertion order
        assert s.retain_sample(forget, max_n=40, seed=1) == s.retain_sample(forget, max_n=40, seed=1)
        assert s.retain_sample(forget, max_n=40, seed=1) != s.retain_sample(forget, max_n=40, seed=2)
        assert set(s.retain_sample([], max_n=10, role="validation")) <= set(val)
        assert s.retain_sample(forget, max_n=0) == []
        with pytest.raises(StoreError, match="unknown sample id 'nope'"):
            s.retain_sample(["nope"], max_n=10)
        with pytest.raises(StoreError, match="max_n"):
            s.retain_sample(forget, max_n=-1)


# --- imports ---------------------------------------------------------------------------------------------------

def test_import_npz(tmp_path):
    path = tmp_path / "s.db"
    rng = np.random.default_rng(0)
    xf = rng.random((12, 4, 4, 1), dtype=np.float32)
    np.savez(tmp_path / "f.npz", x=xf, y=np.arange(12) % 3, class_names=np.array(["a", "b", "c"]))
    xi = _samples(6, (4, 4, 1))
    np.savez(tmp_path / "i.npz", x_train=xi, y_train=np.arange(6) % 3,
             owners=np.array(["p", "q", "p", "q", "p", "r"]))
    np.savez(tmp_path / "noowner.npz", x=xf, y=np.arange(12) % 3)
    np.savez(tmp_path / "badlabel.npz", x=xf, y=np.arange(12) % 5)
    np.savez(tmp_path / "u8.npz", x=(xf * 255).astype(np.uint8), y=np.arange(12) % 3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with Store(path, create=True) as s:
        ids = s.import_npz(tmp_path / "f.npz", Q, owner="carol")
        x, y = s.load(ids)
        np.testing.assert_array_equal(x, quantize(xf, Q, np.int8))  # LiteRT's rounding
        np.testing.assert_array_equal(y, np.arange(12) % 3)
        assert s.class_names == ["a", "b", "c"] and s.num_classes == 3 and s.quant == Q
        ids2 = s.import_npz(tmp_path / "i.npz", Q)  # int8 taken as is; owners from the file
        np.testing.assert_array_equal(s.load(ids2)[0], xi)
        assert s.select(owner="r") == [ids2[5]]
        n = s.count()
        for f, kw, msg in [
            ("noowner.npz", {}, "no owner"),
            ("i.npz", {"owner_key": "who"}, "owner_key 'who' is not in the file"),
            ("badlabel.npz", {"owner": "d"}, "badlabel.npz: .*label 3 of sample 3 is out of range"),
            ("u8.npz", {"owner": "d"}, "uint8"),
            ("junk.npz", {"owner": "d"}, "not a readable .npz"),
            ("missing.npz", {"owner": "d"}, "no such file"),
        ]:
            with pytest.raises(StoreError, match=msg):
                s.import_npz(tmp_path / f, Q, **kw)
            assert s.count() == n
        with pytest.raises(StoreError, match="quantization"):
            s.import_npz(tmp_path / "f.npz", QuantParams([0.5], [0]), owner="d")
        assert s.count() == n


def test_import_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    levels = {}
    for cname, owner, k, v in [("dog", "bob", 0, 200), ("cat", "ann", 0, 0), ("cat", "bob", 1, 255),
                               ("cat", "ann", 2, 51), ("emu", "cy", 0, 102)]:
        d = root / cname / owner
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 7), (v, v, v)).save(d / f"img{k}.png")
        levels[(cname, owner, k)] = v
    (root / "cat" / "ann" / "notes.txt").write_text("not an image")
    path = tmp_path / "s.db"
    with Store(path, create=True) as s:
        ids = s.import_image_folder(root, Q, size=(5, 6), channels=3)
        assert s.class_names == ["cat", "dog", "emu"] and s.input_shape == (5, 6, 3)
        x, y = s.load(ids)
        assert y.tolist() == [0, 0, 0, 1, 2]  # classes sorted by name, files sorted by path
        assert s.owners() == ["ann", "bob", "cy"]
        want = [levels[k] for k in [("cat", "ann", 0), ("cat", "ann", 2), ("cat", "bob", 1), ("dog", "bob", 0),
                                    ("emu", "cy", 0)]]
        for xi, v in zip(x, want):
            np.testing.assert_array_equal(xi, quantize(np.full((5, 6, 3), np.float32(v) / np.float32(255)), Q))
        # a broken image: StoreError naming it, nothing added
        (root / "dog" / "bob" / "broken.png").write_bytes(b"\x89PNG garbage")
        with pytest.raises(StoreError, match="broken.png"):
            s.import_image_folder(root, Q, size=(5, 6), channels=3)
        assert s.count() == 5
        with pytest.raises(StoreError, match="sample shape"):
            (root / "dog" / "bob" / "broken.png").unlink()
            s.import_image_folder(root, Q, size=(5, 6), channels=1)
        assert s.count() == 5
    with Store(tmp_path / "t.db", create=True) as s:
        flat = tmp_path / "flat"
        (flat / "a").mkdir(parents=True)
        Image.new("L", (4, 4), 128).save(flat / "a" / "x.png")
        with pytest.raises(StoreError, match="no owner"):
            s.import_image_folder(flat, Q, size=(4, 4))
        ids = s.import_image_folder(flat, Q, size=(4, 4), owner="dora")
        assert s.select(owner="dora") == ids and s.input_shape == (4, 4, 1)


# --- requests and the audit log ----------------------------------------------------------------------------------

def test_request_lifecycle(tmp_path):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        with pytest.raises(StoreError, match="unknown owner 'mallory'"):
            s.create_request({"owner": "mallory"}, "qmul", {})
        with pytest.raises(StoreError, match="unknown sample id 'x1'"):
            s.create_request({"ids": ["x1"]}, "qmul", {})
        with pytest.raises(StoreError, match="unknown key 'who'"):
            s.create_request({"who": "alice"}, "qmul", {})
        rid = s.create_request({"owner": "alice"}, "qmul", {"epochs": 2}, request_id="req-1")
        assert s.create_request({"owner": "alice"}, "qmul", {"epochs": 2}, request_id="req-1") == "req-1"
        with pytest.raises(StoreError, match="different"):
            s.create_request({"owner": "alice"}, "ga", {}, request_id="req-1")
        assert s.get_request(rid)["status"] == "pending"
        with pytest.raises(StoreError, match="illegal status change pending -> done"):
            s.set_status(rid, "done")
        with pytest.raises(StoreError, match="only through commit_forget"):
            s.set_status(rid, "committed")
        with pytest.raises(StoreError, match="status must be one of"):
            s.set_status(rid, "finished")
        s.set_status(rid, "running")
        r = s.set_status(rid, "done", {"ua": 99.0})
        assert r["status"] == "done" and r["result"] == {"ua": 99.0}
        s.set_status(rid, "rolled_back")
        with pytest.raises(StoreError, match="rolled_back -> running"):
            s.set_status(rid, "running")
        with pytest.raises(StoreError, match="unknown request 'nope'"):
            s.get_request("nope")
        with pytest.raises(StoreError, match="only a 'done' request"):
            s.commit_forget(rid, ids["alice"] + ids["alice_val"], MODEL_B)
        assert [e["event"] for e in s.audit_log()] == ["model_activated", "request_created", "request_status",
                                                       "request_status", "request_status"]
        assert [r["id"] for r in s.requests(status="rolled_back")] == [rid]


def test_audit_is_append_only(tmp_path):
    path = tmp_path / "s.db"
    _populated(path)
    with Store(path) as s:
        n = len(s.audit_log())
        for sql in ("UPDATE audit SET event = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 1",
                    "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                s.conn.execute(sql)
        other = sqlite3.connect(path)  # another connection gets the same refusal
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute("UPDATE audit SET details = '{}'")
        other.close()
        assert len(s.audit_log()) == n
        s.verify()


@pytest.mark.parametrize("tamper", ["edit_details", "delete_last", "drop_trigger_only"])
def test_audit_chain_detects_tampering(tmp_path, tamper):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        rid = _done_request(s, {"owner": "alice"})
        s.commit_forget(rid, ids["alice"] + ids["alice_val"], MODEL_B)
        s.verify()
    # someone with file access drops the trigger and rewrites history through their own connection
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("DROP TRIGGER audit_no_update")
    c.execute("DROP TRIGGER audit_no_delete")
    if tamper == "edit_details":
        row = c.execute("SELECT seq, details FROM audit WHERE event = 'forget_committed'").fetchone()
        d = json.loads(row[1])
        d["n_samples"] = 1
        c.execute("UPDATE audit SET details = ? WHERE seq = ?", (json.dumps(d), row[0]))
        msg = f"audit chain broken at row {row[0]}: its hash does not match"
    elif tamper == "delete_last":
        c.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
        msg = "audit chain broken"
    else:
        msg = "trigger 'audit_no_update' is missing"
    if tamper != "drop_trigger_only":  # put the triggers back to hide the edit
        from edge_qmul.store import _SCHEMA
        for stmt in _SCHEMA[-2:]:
            c.execute(stmt)
    c.close()
    before = _file_hashes(path)
    with pytest.raises(StoreError, match=msg):
        Store(path)
    assert _file_hashes(path) == before


# --- forgetting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 8, 1), (48, 48, 3)], ids=["in-page", "overflow-pages"])
def test_commit_forget_erases_the_bytes(tmp_path, shape):
    path = tmp_path / "s.db"
    ids = _populated(path, n_other=60, shape=shape)
    forget = ids["alice"] + ids["alice_val"]
    with Store(path) as s:
        assert any(PATTERN in p.read_bytes() for p in _store_files(path))
        rid = _done_request(s, {"owner": "alice"})
        # the job asked for the training rows; the commit must take the validation row too
        with pytest.raises(StoreError, match="1 selected sample.* missing from ids"):
            s.commit_forget(rid, ids["alice"], MODEL_B)
        n_audit = len(s.audit_log())
        rec = s.commit_forget(rid, forget, MODEL_B)
        assert rec["n_samples"] == 5 and rec["model_before"] == MODEL_A and rec["model_after"] == MODEL_B
        assert rec["sample_id_hashes"] == sorted(sha256_id(i) for i in forget)
        assert rec["checkpoint"] == {"ok": True, "wal_bytes": 0}
        assert rec["deleted_at"].endswith("+00:00")
        # the rows are gone, the model switched, the request committed, one audit row appended
        with pytest.raises(StoreError, match="unknown owner 'alice'"):
            s.select(owner="alice", role=None)
        assert s.count() == 60 + 10 and s.active_model == MODEL_B
        req = s.get_request(rid)
        assert req["status"] == "committed" and req["selector"] == {"owner_sha256": sha256_id("alice")}
        assert req["result"]["commit"]["audit_hash"] == rec["audit_hash"] and req["result"]["ua_after"] == 97.5
        log = s.audit_log()
        assert len(log) == n_audit + 1 and log[-1]["event"] == "forget_committed"
        assert log[-1]["details"] == {k: rec[k] for k in ("n_samples", "sample_id_hashes", "model_before",
                                                          "model_after", "deleted_at")}
        # the 16-byte pattern is nowhere on disk: not in the database file, not in the (truncated) WAL
        files = _store_files(path)
        assert path in files
        for p in files:
            assert PATTERN not in p.read_bytes(), p.name
        assert Path(f"{path}-wal").stat().st_size == 0
        s.verify()
        # a retry after a lost reply returns the same record and changes nothing
        again = s.commit_forget(rid, forget[::-1], MODEL_B)
        assert again["audit_hash"] == rec["audit_hash"] and len(s.audit_log()) == n_audit + 1
    for p in _store_files(path):
        assert PATTERN not in p.read_bytes(), p.name


def test_audit_holds_no_ids_or_owners_in_clear(tmp_path):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        r1 = _done_request(s, {"owner": "alice"})
        s.commit_forget(r1, ids["alice"] + ids["alice_val"], MODEL_B)
        some = ids["other"][:3]
        r2 = _done_request(s, {"ids": some})
        s.commit_forget(r2, some, "c" * 64)
        text = json.dumps(s.conn.execute("SELECT * FROM audit").fetchall())
        for sid in ids["alice"] + ids["alice_val"] + some:
            assert sid not in text
            assert sha256_id(sid) in text
        assert "alice" not in text and sha256_id("alice") in text
        assert s.get_request(r2)["selector"] == {"id_sha256": sorted(sha256_id(i) for i in some)}


def test_commit_forget_bad_input_changes_nothing(tmp_path):
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        rid = _done_request(s, {"owner": "alice"})
        forget = ids["alice"] + ids["alice_val"]
        s.checkpoint()
        before = _file_hashes(path)["s.db"]
        for args, msg in [
            ((rid, forget + ["ghost-id"], MODEL_B), "unknown sample id 'ghost-id'"),
            ((rid, forget + ids["other"][:1], MODEL_B), "1 id.* outside the selector"),
            ((rid, forget + forget[:1], MODEL_B), "duplicate sample id"),
            ((rid, [], MODEL_B), "ids is empty"),
            ((rid, forget, "xyz"), "new_model_sha256 must be a sha256"),
            (("no-such-request", forget, MODEL_B), "unknown request 'no-such-request'"),
        ]:
            with pytest.raises(StoreError, match=msg):
                s.commit_forget(*args)
        s.checkpoint()
        assert _file_hashes(path)["s.db"] == before
        assert s.count(owner="alice") == 5 and s.active_model == MODEL_A
        assert s.get_request(rid)["status"] == "done"


# --- corrupted files ------------------------------------------------------------------------------------------

def _flip(path: Path, offset: int, n: int = 16) -> None:
    b = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip_middle":  # 16 bytes of the first row key past the middle of the file
        _flip(path, data.index(b"sample-", len(data) // 2))
    elif how == "flip_sample_data":
        _flip(path, data.index(PATTERN) + 4, 4)
    elif how == "flip_page_header":
        _flip(path, (len(data) // 2) // 4096 * 4096, 8)
    elif how == "flip_sqlite_header":
        _flip(path, 16, 2)  # the page size
    elif how == "truncate_half":
        path.write_bytes(data[: len(data) // 2 // 4096 * 4096])
    elif how == "truncate_tail":
        path.write_bytes(data[:-100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "wrong_schema_version":
        c = sqlite3.connect(path)
        c.execute("PRAGMA user_version = 99")
        c.close()
    elif how == "missing_table":
        c = sqlite3.connect(path)
        c.execute("DROP TABLE requests")
        c.close()
    elif how == "foreign_database":
        path.unlink()
        c = sqlite3.connect(path)
        c.execute("CREATE TABLE t (x)")
        c.commit()
        c.close()
    else:  # pragma: no cover
        raise AssertionError(how)


CORRUPTIONS = {
    "flip_middle": "corrupted|integrity_check|malformed|digest",
    "flip_sample_data": "digest does not match",
    "flip_page_header": "corrupted|integrity_check|malformed",
    "flip_sqlite_header": "page size|corrupted|not a",
    "truncate_half": "truncated",
    "truncate_tail": "truncated",
    "empty": "empty file",
    "random_bytes": "not a SQLite database",
    "wrong_schema_version": "schema version 99 is newer",
    "missing_table": "table 'requests' is missing",
    "foreign_database": "not an edge_qmul store",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_store_is_refused_untouched(tmp_path, how):
    path = tmp_path / "s.db"
    with Store(path, create=True) as s:  # fixed ids: the same layout every run
        s.add(_samples(600), np.arange(600) % 10, [f"u{i % 7}" for i in range(600)],
              ids=[f"sample-{i:05d}" for i in range(600)])
        s.add(_with_pattern(1), [3], "alice", ids=["alice-0"])
        s.create_request({"owner": "alice"}, "qmul", {})
    assert [p.name for p in _store_files(path)] == ["s.db"]  # closed cleanly: no WAL left
    _corrupt(path, how)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match=CORRUPTIONS[how]) as e:
        Store(path)
    assert str(path) in str(e.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert [p.name for p in _store_files(path)] == ["s.db"]  # not even a -wal / -shm beside it
    with pytest.raises(StoreError):
        Store(path, create=True)  # create never overwrites a damaged file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


# --- crashes ------------------------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from edge_qmul.store import Store
    path, rid, model, where = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ids = sys.argv[5].split(",")
    s = Store(path)
    if where == "in_transaction":       # after the DELETE, before the audit row and COMMIT
        def crash(self, conn, event, request_id, details):
            assert conn.in_transaction
            os._exit(1)
        Store._append_audit = crash
    elif where == "after_commit":       # committed, the WAL not yet checkpointed
        Store.checkpoint = lambda self: os._exit(1)
    s.commit_forget(rid, ids, model)
    os._exit(3)                         # never reached
""")


@pytest.mark.parametrize("where", ["in_transaction", "after_commit"])
def test_crash_during_commit_forget_is_all_or_nothing(tmp_path, where):
    path = tmp_path / "s.db"
    ids = _populated(path)
    forget = ids["alice"] + ids["alice_val"]
    with Store(path) as s:
        rid = _done_request(s, {"owner": "alice"})
        audit_before = s.audit_log()
        n_before = s.count()
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, str(script), str(path), rid, MODEL_B, where, ",".join(forget)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    if where == "after_commit":  # the process died with the deleted rows' old pages still in the WAL
        assert Path(f"{path}-wal").stat().st_size > 0
    with Store(path) as s:
        s.verify()
        if where == "in_transaction":  # fully before
            assert s.count() == n_before and s.select(owner="alice", role=None) == forget
            assert s.active_model == MODEL_A and s.get_request(rid)["status"] == "done"
            assert s.audit_log() == audit_before
            x, _ = s.load(forget)
            assert all(PATTERN in row.tobytes() for row in x)
            rec = s.commit_forget(rid, forget, MODEL_B)  # and the commit can simply be redone
            assert rec["n_samples"] == 5
        else:  # fully after
            assert s.count() == n_before - 5 and "alice" not in s.owners()
            assert s.active_model == MODEL_B and s.get_request(rid)["status"] == "committed"
            log = s.audit_log()
            assert log[:-1] == audit_before and log[-1]["event"] == "forget_committed"
        # opening finished the checkpoint: the pattern is gone from every file
        for p in _store_files(path):
            assert PATTERN not in p.read_bytes(), p.name


def test_commit_on_a_stale_model_is_refused_and_changes_nothing(tmp_path):
    """Two jobs computed from the same model: committing the second after the first would make a
    model that still knows the first owner the active one. The store refuses it."""
    path = tmp_path / "s.db"
    ids = _populated(path)
    with Store(path) as s:
        r1 = _done_request(s, {"owner": "alice"})
        some = ids["other"][:3]
        r2 = _done_request(s, {"ids": some})
        s.commit_forget(r1, ids["alice"] + ids["alice_val"], MODEL_B, base_model_sha256=MODEL_A)
        before = (s.count(), s.active_model, s.get_request(r2)["status"])
        with pytest.raises(StoreError, match="active model is now bbbbbbbbbbbb.*run the request again"):
            s.commit_forget(r2, some, "c" * 64, base_model_sha256=MODEL_A)
        assert (s.count(), s.active_model, s.get_request(r2)["status"]) == before
        s.verify()
        # computed on the model that is active now: it goes through
        assert s.commit_forget(r2, some, "c" * 64, base_model_sha256=MODEL_B)["model_before"] == MODEL_B
