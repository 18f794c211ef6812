"""Is this file a sound store? The SQLite header read by hand, then, through a read-only connection,
application id, schema version, tables, triggers, SQLite's own check, every row's digest and the audit
hash chain. Everything here only reads, so a file that fails is never written to.
"""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

from .schema import (_COLUMNS, _TRIGGERS, APPLICATION_ID, GENESIS_HASH, SCHEMA_VERSION, StoreError, _audit_hash,
                     _meta_digest, _request_digest, _sample_digest)

SQLITE_MAGIC = b"SQLite format 3\0"


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg or type(e) is sqlite3.DatabaseError


def check_header(path: Path) -> None:
    """Refuse an empty, foreign, truncated or padded file from its 100-byte SQLite header alone,
    before SQLite opens it (StoreError naming the problem)."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise StoreError(f"{where}: cannot read the store ({e.strerror})") from None
    if size == 0:
        raise StoreError(f"{where}: empty file (0 bytes), not a store")
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreError(f"{where}: not a SQLite database (bad header)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size  # the header writes 64 KiB as 1
    if page_size < 512 or page_size & (page_size - 1):
        raise StoreError(f"{where}: corrupted header (page size {page_size})")
    if size % page_size:
        raise StoreError(f"{where}: truncated or padded: {size} bytes is not a whole number of "
                         f"{page_size}-byte pages")
    in_header = int.from_bytes(header[28:32], "big")
    valid_for = int.from_bytes(header[92:96], "big")
    change = int.from_bytes(header[24:28], "big")
    wal = Path(f"{path}-wal")
    # the page count in the header is trustworthy only when its version-valid-for number matches the
    # change counter, and a non-empty WAL may hold the pages the file lacks
    if (valid_for == change and in_header and size // page_size < in_header
            and not (wal.exists() and wal.stat().st_size)):
        raise StoreError(f"{where}: truncated: the header says {in_header} pages, the file holds "
                         f"{size // page_size}")


def validate_file(path: Path, full: bool, timeout: float) -> dict:
    """Check the store file at ``path`` without writing to it: its header, then
    :func:`_check_connection` over a read-only connection. Returns the check's summary."""
    where = str(path)
    check_header(path)
    # With no -wal file no connection has the store open and the file alone is the whole state:
    # read it as immutable, which creates no -wal / -shm beside it. Otherwise read it with the WAL.
    query = "?mode=ro" if Path(f"{path}-wal").exists() else "?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + query, uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"{where}: cannot open ({e})") from None
    try:
        return _check_connection(conn, where, full)
    finally:
        conn.close()


def _check_connection(conn: sqlite3.Connection, where: str, full: bool) -> dict:
    """Check that ``conn`` is a sound store; raise StoreError naming the first problem.

    Reads only, so it runs on the read-only connection used before a file is opened for writing.
    """
    def fail(msg: str):
        raise StoreError(f"{where}: {msg}")

    try:
        return _check_connection_body(conn, fail, full)
    except StoreError:
        raise
    except (sqlite3.Error, UnicodeError, ValueError, TypeError, KeyError, OverflowError) as e:
        # a corrupted page can surface as undecodable text or a malformed value, not only as an SQLite error
        fail(f"database is corrupted ({type(e).__name__}: {e})")


def _check_connection_body(conn: sqlite3.Connection, fail, full: bool) -> dict:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0]: r[1] for r in conn.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'trigger')")}
    except sqlite3.DatabaseError as e:
        fail(f"not a readable SQLite database ({e})")
    if app_id != APPLICATION_ID:
        if not tables:
            fail("not an edge_qmul store (an empty database: no tables)")
        fail(f"not an edge_qmul store (SQLite application_id is {app_id:#x}, expected {APPLICATION_ID:#x})")
    if version != SCHEMA_VERSION:
        if version > SCHEMA_VERSION:
            fail(f"store schema version {version} is newer than this edge_qmul supports "
                 f"({SCHEMA_VERSION}); upgrade edge_qmul")
        fail(f"unknown store schema version {version} (this edge_qmul reads version {SCHEMA_VERSION})")
    try:
        for table, cols in _COLUMNS.items():
            if tables.get(table) != "table":
                fail(f"wrong schema: table {table!r} is missing")
            have = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            if have != cols:
                fail(f"wrong schema: table {table!r} has columns {have}, expected {cols}")
        for trig in _TRIGGERS:
            if tables.get(trig) != "trigger":
                fail(f"audit log is not protected: trigger {trig!r} is missing (tampering?)")
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check")]
        if rows != ["ok"]:
            fail(f"SQLite {'integrity' if full else 'quick'}_check failed: {'; '.join(rows[:5])}")
        meta = _check_meta(conn, fail)
        n_samples = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        if full:
            _check_samples(conn, meta, fail)
            _check_requests(conn, fail)
        audit = _check_audit(conn, meta, fail)
    except sqlite3.DatabaseError as e:
        fail(f"database is corrupted ({e})")
    return {"integrity": "ok", "check": "full" if full else "quick", "schema_version": version,
            "samples": n_samples, "audit_rows": audit["rows"], "audit_head": audit["head"]}


def _check_meta(conn, fail) -> dict:
    meta = {}
    for key, value, digest in conn.execute("SELECT key, value, digest FROM meta"):
        if not isinstance(key, str) or not isinstance(value, str) or digest != _meta_digest(key, value):
            fail(f"meta row {key!r} is corrupted (its digest does not match)")
        try:
            meta[key] = json.loads(value)
        except ValueError:
            fail(f"meta row {key!r} does not hold JSON")
    return meta


def _check_samples(conn, meta: dict, fail) -> None:
    shape_ok = meta.get("input_shape")
    for rowid, sid, owner, label, role, shape, data, added_at, digest in conn.execute(
            "SELECT rowid, id, owner, label, role, shape, data, added_at, digest FROM samples"):
        where = f"sample {sid!r} (row {rowid})"
        if not (isinstance(sid, str) and isinstance(owner, str) and isinstance(label, int)
                and isinstance(shape, str) and isinstance(data, bytes) and isinstance(added_at, str)):
            fail(f"{where} has fields of the wrong type")
        if digest != _sample_digest(sid, owner, label, role, shape, added_at, data):
            fail(f"{where} is corrupted (its digest does not match its contents)")
        try:
            dims = json.loads(shape)
        except ValueError:
            fail(f"{where} has an unreadable shape {shape!r}")
        if shape_ok is not None and dims != shape_ok:
            fail(f"{where} has shape {dims}, the store holds {shape_ok}")
        if len(data) != math.prod(dims):
            fail(f"{where} holds {len(data)} bytes, shape {dims} needs {math.prod(dims)}")


def _check_requests(conn, fail) -> None:
    for row in conn.execute("SELECT id, selector, method, params, status, created_at, updated_at, "
                            "result, digest FROM requests"):
        if row[8] != _request_digest(*row[:8]):
            fail(f"request {row[0]!r} is corrupted (its digest does not match)")


def _check_audit(conn, meta: dict, fail) -> dict:
    prev, expect_seq = GENESIS_HASH, 1
    for seq, t, event, rid, details, prev_hash, h in conn.execute(
            "SELECT seq, time, event, request_id, details, prev_hash, hash FROM audit ORDER BY seq"):
        if seq != expect_seq:
            fail(f"audit chain broken: row {expect_seq} is missing (next row is {seq})")
        if prev_hash != prev:
            fail(f"audit chain broken at row {seq}: prev_hash does not match row {seq - 1}")
        if h != _audit_hash(prev_hash, seq, t, event, rid, details):
            fail(f"audit chain broken at row {seq}: its hash does not match its contents (tampered?)")
        prev, expect_seq = h, expect_seq + 1
    n = expect_seq - 1
    head = meta.get("audit_head", {"seq": 0, "hash": GENESIS_HASH})
    if head != {"seq": n, "hash": prev}:
        fail(f"audit chain broken: the log ends at row {n} but the recorded head is row {head.get('seq')} "
             "(rows removed?)")
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    if (row[0] if row else 0) != n:
        fail(f"audit chain broken: {row[0] if row else 0} rows were appended but {n} remain")
    return {"rows": n, "head": prev}
