"""The device's sample store, its requests: the request lifecycle, the append-only audit log and
committing a forget (the erased bytes leave the file); real SQLite files in tmp_path, no mocks."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from storelib import MODEL_A, MODEL_B, PATTERN, _done_request, _file_hashes, _populated, _store_files

from edge_qmul.store import _SCHEMA, Store, StoreError, sha256_id


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

