"""The device's sample store under damage: corrupted files are refused untouched, and a crash
during a commit is all or nothing; real SQLite files in tmp_path, real subprocess crashes, no mocks."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storelib import MODEL_A, MODEL_B, PATTERN, _done_request, _populated, _samples, _store_files, _with_pattern

from edge_qmul.store import Store, StoreError


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
