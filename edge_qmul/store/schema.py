"""What a store file holds: the SQL schema and its constants, canonical JSON, and the row digests and
audit hash that make every row tamper-evident; plus the atomic creation of an empty store file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import fsync_dir
from ..quant import QuantParams

SCHEMA_VERSION = 1
APPLICATION_ID = 0x45514D4C  # "EQML": marks the file as an edge_qmul store
ROLES = ("train", "validation")
STATUSES = ("pending", "running", "done", "failed", "committed", "rolled_back")
# Legal status changes. 'committed' is reached only through Store.commit_forget, which deletes the
# samples and switches the model in the same transaction.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("running", "failed", "rolled_back"),
    "running": ("done", "failed"),
    "done": ("committed", "rolled_back"),
    "failed": (),
    "committed": (),
    "rolled_back": (),
}
GENESIS_HASH = "0" * 64

_SCHEMA = [
    """CREATE TABLE samples (
        id TEXT PRIMARY KEY NOT NULL,
        owner TEXT NOT NULL,
        label INTEGER NOT NULL,
        role TEXT NOT NULL DEFAULT 'train' CHECK (role IN ('train', 'validation')),
        shape TEXT NOT NULL,
        data BLOB NOT NULL,
        added_at TEXT NOT NULL,
        digest TEXT NOT NULL
    )""",
    "CREATE INDEX samples_owner ON samples(owner)",
    "CREATE INDEX samples_label ON samples(label, role)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL, digest TEXT NOT NULL)",
    """CREATE TABLE requests (
        id TEXT PRIMARY KEY NOT NULL,
        selector TEXT NOT NULL,
        method TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('pending', 'running', 'done', 'failed', 'committed', 'rolled_back')),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        result TEXT,
        digest TEXT NOT NULL
    )""",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        event TEXT NOT NULL,
        request_id TEXT,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused'); END""",
]
_COLUMNS = {
    "samples": ["id", "owner", "label", "role", "shape", "data", "added_at", "digest"],
    "meta": ["key", "value", "digest"],
    "requests": ["id", "selector", "method", "params", "status", "created_at", "updated_at", "result",
                 "digest"],
    "audit": ["seq", "time", "event", "request_id", "details", "prev_hash", "hash"],
}
_TRIGGERS = ("audit_no_update", "audit_no_delete")


class StoreError(ValueError):
    """The store file, or an input to it, is wrong. The message names what and where."""


def sha256_id(sample_id: str) -> str:
    """The hash under which a sample id appears in the audit log and forget certificates."""
    return hashlib.sha256(sample_id.encode("utf-8")).hexdigest()


def _canon(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, no NaN): the text every digest is taken over."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"value is not JSON-serializable ({e}): {obj!r:.200}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _sample_digest(sid: str, owner: str, label: int, role: str, shape: str, added_at: str,
                   data: bytes) -> str:
    h = hashlib.sha256(b"edge_qmul.sample.v1\0")
    h.update(_canon([sid, owner, int(label), role, shape, added_at]).encode("utf-8"))
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def _meta_digest(key: str, value: str) -> str:
    return hashlib.sha256(_canon(["edge_qmul.meta.v1", key, value]).encode("utf-8")).hexdigest()


def _request_digest(rid, selector, method, params, status, created_at, updated_at, result) -> str:
    return hashlib.sha256(_canon(["edge_qmul.request.v1", rid, selector, method, params, status,
                                  created_at, updated_at, result]).encode("utf-8")).hexdigest()


def _audit_hash(prev_hash: str, seq: int, t: str, event: str, request_id, details: str) -> str:
    return hashlib.sha256(_canon([prev_hash, seq, t, event, request_id, details]).encode("utf-8")).hexdigest()


def _quant_to_json(q: QuantParams) -> dict:
    return {"scale": [float(s) for s in q.scale], "zero_point": [int(z) for z in q.zero_point],
            "axis": int(q.axis)}


def _quant_from_json(d: dict) -> QuantParams:
    return QuantParams(np.asarray(d["scale"], np.float32), np.asarray(d["zero_point"], np.int64),
                       int(d.get("axis", 0)))


def create_file(path: Path) -> None:
    """Create an empty store at ``path``: schema, application id, version and the ``dtype`` meta row,
    built in a temp file beside it and renamed into place, so a crash leaves no half-made store."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.creating"
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            value = _canon("int8")
            conn.execute("INSERT INTO meta (key, value, digest) VALUES ('dtype', ?, ?)",
                         (value, _meta_digest("dtype", value)))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()  # the last connection: SQLite checkpoints and removes -wal / -shm
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists():
            raise StoreError(f"{path}: appeared while the store was being created")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{tmp}{suffix}")
            except FileNotFoundError:
                pass
