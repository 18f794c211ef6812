"""The device's sample store, its samples: opening, adding, selecting, loading, importing; real SQLite
files in tmp_path, no mocks."""
from __future__ import annotations

import numpy as np
import pytest

from storelib import Q, _file_hashes, _populated, _samples, _store_files

from edge_qmul.quant import QuantParams, quantize
from edge_qmul.store import SCHEMA_VERSION, Store, StoreError


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



def test_float_labels_beyond_any_class_are_named_not_called_negative(tmp_path):
    """Regression (found by fuzzing sample uploads): a label of 1e300 was cast to int64's minimum
    and refused as "negative"."""
    with Store(tmp_path / "s.db", create=True) as s:
        x = np.zeros((2, 4), np.int8)
        with pytest.raises(StoreError, match=r"label 1e\+300 of sample 1 is not a class index"):
            s.add(x, np.array([1.0, 1e300]), "alice")
        assert s.count() == 0
