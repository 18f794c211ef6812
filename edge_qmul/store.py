"""The device's sample store: one SQLite file (WAL) with samples, owners, forget requests and an
append-only audit log (DESIGN §5).

Tables
------
``samples``   id, owner, label, role ('train' | 'validation'), shape (JSON), data (int8 bytes),
              added_at, digest (sha256 over the whole row, so a flipped byte anywhere in a row -- its
              data, owner or label -- is caught on open and by :meth:`Store.verify`).
``meta``      key -> JSON value: ``input_shape``, ``dtype`` (int8), ``quant`` (scale, zero point, axis
              the samples were quantized with), ``num_classes``, ``class_names``,
              ``active_model_sha256``, ``audit_head``; each row carries a digest too.
``requests``  forget requests: selector, method, params (JSON), status, times, result (JSON).
``audit``     append-only log: UPDATE and DELETE abort in SQLite triggers, and every row stores
              ``sha256(canonical [prev_hash, seq, time, event, request_id, details])``, a hash chain
              whose head is also kept in ``meta``. The log never holds a sample id, an owner name or
              sample data in clear: only their sha256 (``sample_id_hashes``, ``owner_sha256``).

Guarantees
----------
* Every bad input or integrity problem raises :class:`StoreError` naming what and where, and
  changes nothing: each write is one ``BEGIN IMMEDIATE`` transaction (all-or-nothing).
* Opening a file first checks it through a read-only connection (``mode=ro``): application id,
  schema version (``PRAGMA user_version``), tables, triggers, ``PRAGMA integrity_check`` (or
  ``quick_check`` with ``check="quick"``), row digests and the audit chain. A file that fails is
  never written to.
* Connections run with ``journal_mode=WAL``, ``secure_delete=ON``, ``foreign_keys=ON`` and
  ``synchronous=FULL`` (a committed transaction survives power loss).
* :meth:`Store.commit_forget` deletes the forgotten samples, switches the active model and marks the
  request committed in ONE transaction, appends the audit row in the same transaction, and then runs
  ``PRAGMA wal_checkpoint(TRUNCATE)`` so the deleted bytes (zeroed in place by ``secure_delete``)
  leave the write-ahead log as well. A crash before the commit leaves every sample, the old model
  and the request as they were; a crash after it leaves the new state, and the next open finishes
  the checkpoint.

Sample ids are hashed with plain sha256 (no salt) so that the host, which knows the ids it sent,
can check a forget certificate. Ids generated here are uuid4 hex (122 random bits), which a hash
does not reveal; ids or owner names chosen by people can be guessed from their hash.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .fsutil import fsync_dir
from .quant import QuantParams, quantize

__all__ = ["Store", "StoreError", "SCHEMA_VERSION", "ROLES", "STATUSES", "TRANSITIONS", "sha256_id"]

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
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit

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


# --- small helpers -----------------------------------------------------------------------------------

def sha256_id(sample_id: str) -> str:
    """The hash under which a sample id appears in the audit log and forget certificates."""
    return hashlib.sha256(sample_id.encode("utf-8")).hexdigest()


def _canon(obj: Any) -> str:
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


def _chunks(seq: Sequence, n: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _name_some(items: Sequence[str], k: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def _check_ids(ids: Any, what: str, allow_dup: bool = False) -> list[str]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise StoreError(f"{what} must be a list of sample id strings, got {type(ids).__name__}")
    out = list(ids)
    for i, s in enumerate(out):
        if isinstance(s, np.str_):
            s = out[i] = str(s)
        if not isinstance(s, str) or not s:
            raise StoreError(f"{what}[{i}] must be a non-empty string, got {s!r}")
    if not allow_dup:
        seen: set[str] = set()
        for i, s in enumerate(out):
            if s in seen:
                raise StoreError(f"{what}: duplicate sample id {s!r} (at position {i})")
            seen.add(s)
    return out


def _check_role(role: Any, allow_none: bool = False) -> str | None:
    if role is None and allow_none:
        return None
    if role not in ROLES:
        raise StoreError(f"role must be one of {', '.join(ROLES)}{' or None' if allow_none else ''}, got {role!r}")
    return role


def _check_sha256(h: Any, what: str) -> str:
    if not isinstance(h, str) or not _SHA256_RE.match(h):
        raise StoreError(f"{what} must be a sha256 as 64 lowercase hex digits, got {h!r}")
    return h


def _quant_to_json(q: QuantParams) -> dict:
    return {"scale": [float(s) for s in q.scale], "zero_point": [int(z) for z in q.zero_point],
            "axis": int(q.axis)}


def _quant_from_json(d: dict) -> QuantParams:
    return QuantParams(np.asarray(d["scale"], np.float32), np.asarray(d["zero_point"], np.int64),
                       int(d.get("axis", 0)))


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg or type(e) is sqlite3.DatabaseError


# --- checking a connection ---------------------------------------------------------------------------

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


# --- the store -----------------------------------------------------------------------------------------

class Store:
    """The device's sample store (see the module docstring).

    ``Store(path)`` opens an existing store; ``Store(path, create=True)`` creates it if ``path``
    does not exist (atomically: a crash leaves no half-made file). ``check`` is ``"full"`` (default:
    integrity_check, every row's digest, the audit chain) or ``"quick"`` (quick_check, meta, the audit
    chain) for very large stores. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False, check: str = "full",
                 timeout: float = 10.0):
        if check not in ("full", "quick"):
            raise StoreError(f"check must be 'full' or 'quick', got {check!r}")
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._timeout = float(timeout)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a store file")
        if not self.path.exists():
            if not create:
                raise StoreError(f"{self.path}: no store here (pass create=True to create one)")
            if not self.path.parent.is_dir():
                raise StoreError(f"{self.path}: directory {str(self.path.parent)!r} does not exist")
            self._create_file()
        self.opened = self._validate_readonly(check == "full")
        self._conn = self._connect()
        self.checkpoint()

    # -- opening --

    def _create_file(self) -> None:
        tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.creating"
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
            if self.path.exists():
                raise StoreError(f"{self.path}: appeared while the store was being created")
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(f"{tmp}{suffix}")
                except FileNotFoundError:
                    pass

    def _validate_readonly(self, full: bool) -> dict:
        where = str(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as e:
            raise StoreError(f"{where}: cannot read the store ({e.strerror})") from None
        if size == 0:
            raise StoreError(f"{where}: empty file (0 bytes), not a store")
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            raise StoreError(f"{where}: not a SQLite database (bad header)")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            raise StoreError(f"{where}: corrupted header (page size {page_size})")
        if size % page_size:
            raise StoreError(f"{where}: truncated or padded: {size} bytes is not a whole number of "
                             f"{page_size}-byte pages")
        in_header = int.from_bytes(header[28:32], "big")
        valid_for = int.from_bytes(header[92:96], "big")
        change = int.from_bytes(header[24:28], "big")
        wal = Path(f"{self.path}-wal")
        if (valid_for == change and in_header and size // page_size < in_header
                and not (wal.exists() and wal.stat().st_size)):
            raise StoreError(f"{where}: truncated: the header says {in_header} pages, the file holds "
                             f"{size // page_size}")
        # With no -wal file no connection has the store open and the file alone is the whole state:
        # read it as immutable, which creates no -wal / -shm beside it. Otherwise read it with the WAL.
        query = "?mode=ro" if wal.exists() else "?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(self.path.resolve().as_uri() + query, uri=True,
                                   timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{where}: cannot open ({e})") from None
        try:
            return _check_connection(conn, where, full)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode here (journal_mode is {mode})")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self.checkpoint()
                finally:
                    self._conn.close()
                    self._conn = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{self.count()} samples"
        return f"Store({str(self.path)!r}, {state})"

    # -- plumbing --

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                if _is_corruption(e):
                    raise StoreError(f"{self.path}: database is corrupted ({e})") from None
                raise

    def checkpoint(self) -> dict:
        """``PRAGMA wal_checkpoint(TRUNCATE)``: copy the WAL into the file and truncate it to 0 bytes.

        Waits (up to the store's ``timeout``) while another connection's read transaction blocks
        it; returns ``ok`` False (and the WAL size) if it still could not, in which case the next
        open or checkpoint finishes the job.
        """
        with self._lock:
            busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            wal = Path(f"{self.path}-wal")
            return {"ok": not busy, "wal_bytes": wal.stat().st_size if wal.exists() else 0}

    # -- meta --

    def meta(self) -> dict:
        """All meta values (decoded JSON)."""
        return {k: json.loads(v) for k, v in self._read("SELECT key, value FROM meta ORDER BY key")}

    def _get_meta(self, key: str, default=None):
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    @staticmethod
    def _put_meta(conn, key: str, value) -> None:
        text = _canon(value)
        conn.execute("INSERT INTO meta (key, value, digest) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                     "SET value = excluded.value, digest = excluded.digest", (key, text, _meta_digest(key, text)))

    def _set_once(self, conn, key: str, value, what: str) -> None:
        """Set a meta value that may not change once set (a different value raises StoreError)."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            self._put_meta(conn, key, value)
        elif json.loads(row[0]) != json.loads(_canon(value)):
            raise StoreError(f"{self.path}: {what} is {json.loads(row[0])}, this input has {value}")

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        s = self._get_meta("input_shape")
        return None if s is None else tuple(s)

    @property
    def quant(self) -> QuantParams | None:
        """The quantization the samples were made with (None until an import or add records it)."""
        q = self._get_meta("quant")
        return None if q is None else _quant_from_json(q)

    @property
    def num_classes(self) -> int | None:
        return self._get_meta("num_classes")

    @property
    def class_names(self) -> list[str] | None:
        return self._get_meta("class_names")

    @property
    def active_model(self) -> str | None:
        """sha256 of the active model file (``models/<sha256>.tflite``), or None."""
        return self._get_meta("active_model_sha256")

    def configure(self, input_shape: Sequence[int] | None = None, quant: QuantParams | None = None,
                  num_classes: int | None = None, class_names: Sequence[str] | None = None) -> None:
        """Record what the samples are. Each value can be set once; setting it again to the same
        value is a no-op, to a different value a StoreError."""
        with self._tx() as conn:
            self._configure(conn, input_shape, quant, num_classes, class_names)

    def _configure(self, conn, input_shape=None, quant=None, num_classes=None, class_names=None) -> None:
        if input_shape is not None:
            dims = [int(d) for d in input_shape]
            if not dims or any(d <= 0 for d in dims):
                raise StoreError(f"input_shape must be positive dimensions, got {tuple(input_shape)}")
            self._set_once(conn, "input_shape", dims, "the store's sample shape")
        if quant is not None:
            if not isinstance(quant, QuantParams):
                raise StoreError(f"quant must be a QuantParams, got {type(quant).__name__}")
            if not np.all(np.isfinite(quant.scale)) or np.any(quant.scale <= 0):
                raise StoreError(f"quant scale must be positive and finite, got {quant.scale.tolist()}")
            if np.any(quant.zero_point < -128) or np.any(quant.zero_point > 127):
                raise StoreError(f"quant zero point must be in the int8 range, got {quant.zero_point.tolist()}")
            self._set_once(conn, "quant", _quant_to_json(quant), "the samples' quantization")
        if class_names is not None:
            names = [str(c) for c in class_names]
            if len(set(names)) != len(names):
                raise StoreError(f"class names must be distinct, got {names}")
            if num_classes is None:
                num_classes = len(names)
            elif num_classes != len(names):
                raise StoreError(f"{len(names)} class names for num_classes={num_classes}")
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
                raise StoreError(f"num_classes must be a positive integer, got {num_classes!r}")
            num_classes = int(num_classes)
            top = conn.execute("SELECT MAX(label) FROM samples").fetchone()[0]
            if top is not None and top >= num_classes:
                raise StoreError(f"num_classes={num_classes} but the store holds label {top}")
            self._set_once(conn, "num_classes", num_classes, "num_classes")
        if class_names is not None:
            self._set_once(conn, "class_names", names, "the class names")

    def set_active_model(self, model_sha256: str, note: str | None = None) -> None:
        """Make ``model_sha256`` the active model (first deployment, or an operator's switch); audited.
        A forget switches the model through :meth:`commit_forget` instead."""
        _check_sha256(model_sha256, "model_sha256")
        with self._tx() as conn:
            before = self._get_meta_tx(conn, "active_model_sha256")
            self._put_meta(conn, "active_model_sha256", model_sha256)
            details = {"model_before": before, "model_after": model_sha256}
            if note is not None:
                details["note"] = str(note)
            self._append_audit(conn, "model_activated", None, details)

    @staticmethod
    def _get_meta_tx(conn, key: str, default=None):
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- audit --

    def _append_audit(self, conn, event: str, request_id: str | None, details: dict) -> dict:
        """Append one hash-chained audit row inside the caller's transaction."""
        head = self._get_meta_tx(conn, "audit_head", {"seq": 0, "hash": GENESIS_HASH})
        seq, prev = head["seq"] + 1, head["hash"]
        t = _now()
        text = _canon(details)
        h = _audit_hash(prev, seq, t, event, request_id, text)
        conn.execute("INSERT INTO audit (seq, time, event, request_id, details, prev_hash, hash) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, t, event, request_id, text, prev, h))
        self._put_meta(conn, "audit_head", {"seq": seq, "hash": h})
        return {"seq": seq, "hash": h, "time": t}

    def audit_log(self) -> list[dict]:
        """Every audit row, oldest first: seq, time, event, request_id, details (dict), prev_hash, hash."""
        return [{"seq": s, "time": t, "event": e, "request_id": r, "details": json.loads(d),
                 "prev_hash": p, "hash": h}
                for s, t, e, r, d, p, h in self._read(
                    "SELECT seq, time, event, request_id, details, prev_hash, hash FROM audit ORDER BY seq")]

    # -- samples --

    def add(self, x_int8: np.ndarray, labels, owners, ids: Sequence[str] | None = None,
            role: str = "train", quant: QuantParams | None = None) -> list[str]:
        """Add N int8 samples (``x_int8`` is (N, *shape)) in one transaction; returns their ids.

        ``owners`` is one owner for all or N owners; ``ids`` default to uuid4 hex. The first add fixes
        the store's sample shape; ``quant`` (optional) records how the samples were quantized.
        Anything wrong -- dtype, shape, a label out of range, an id already stored -- raises
        StoreError and adds nothing.
        """
        with self._tx() as conn:
            return self._add(conn, x_int8, labels, owners, ids, role, quant, "x_int8")

    def _add(self, conn, x, labels, owners, ids, role, quant, what: str) -> list[str]:
        if not isinstance(x, np.ndarray):
            raise StoreError(f"{what} must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.int8:
            raise StoreError(f"{what} must be int8 (quantize it first), got {x.dtype}")
        if x.ndim < 2:
            raise StoreError(f"{what} must be (N, *sample_shape), got shape {x.shape}")
        n, shape = x.shape[0], [int(d) for d in x.shape[1:]]
        role = _check_role(role)
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise StoreError(f"labels must be a vector of {n} labels, got shape {labels.shape}")
        if n and not (np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_):
            if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) \
                    and np.all(np.mod(labels, 1) == 0):
                labels = labels.astype(np.int64)
            else:
                raise StoreError(f"labels must be integer class labels, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if n and labels.min() < 0:
            i = int(np.nonzero(labels < 0)[0][0])
            raise StoreError(f"label {int(labels[i])} of sample {i} is negative")
        if isinstance(owners, (str, np.str_)):
            owners = [str(owners)] * n
        else:
            owners = list(np.asarray(owners).reshape(-1)) if isinstance(owners, np.ndarray) else list(owners)
            if len(owners) != n:
                raise StoreError(f"owners must be one owner or {n} owners, got {len(owners)}")
        for i, o in enumerate(owners):
            if isinstance(o, np.str_):
                owners[i] = o = str(o)
            if not isinstance(o, str) or not o:
                raise StoreError(f"owner of sample {i} must be a non-empty string, got {o!r}")
        if ids is None:
            ids = [uuid.uuid4().hex for _ in range(n)]
        else:
            ids = _check_ids(ids, "ids")
            if len(ids) != n:
                raise StoreError(f"ids must name {n} samples, got {len(ids)}")
        if n == 0:
            return []
        self._configure(conn, input_shape=shape, quant=quant)
        k = self._get_meta_tx(conn, "num_classes")
        if k is not None and labels.max() >= k:
            i = int(np.nonzero(labels >= k)[0][0])
            raise StoreError(f"label {int(labels[i])} of sample {i} is out of range: the store has {k} classes")
        for chunk in _chunks(ids):
            row = conn.execute(f"SELECT id FROM samples WHERE id IN ({','.join('?' * len(chunk))}) LIMIT 1",
                               list(chunk)).fetchone()
            if row:
                raise StoreError(f"sample id {row[0]!r} is already in the store")
        shape_text = _canon(shape)
        t = _now()
        x = np.ascontiguousarray(x)
        rows = []
        for i in range(n):
            data = x[i].tobytes()
            lab = int(labels[i])
            rows.append((ids[i], owners[i], lab, role, shape_text, data, t,
                         _sample_digest(ids[i], owners[i], lab, role, shape_text, t, data)))
        conn.executemany("INSERT INTO samples (id, owner, label, role, shape, data, added_at, digest) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return ids

    def count(self, owner: str | None = None, role: str | None = None) -> int:
        """Number of samples (of one owner and/or role; all by default)."""
        role = _check_role(role, allow_none=True)
        sql, args = "SELECT COUNT(*) FROM samples WHERE 1", []
        if owner is not None:
            sql, args = sql + " AND owner = ?", args + [owner]
        if role is not None:
            sql, args = sql + " AND role = ?", args + [role]
        return self._read(sql, args)[0][0]

    def owners(self) -> list[str]:
        """The distinct owners, sorted."""
        return [r[0] for r in self._read("SELECT DISTINCT owner FROM samples ORDER BY owner")]

    def labels(self) -> list[int]:
        """The distinct labels present, sorted."""
        return [r[0] for r in self._read("SELECT DISTINCT label FROM samples ORDER BY label")]

    def _roles_of(self, conn, ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in _chunks(ids):
            found.update(conn.execute(f"SELECT id, role FROM samples WHERE id IN ({','.join('?' * len(chunk))})",
                                      list(chunk)).fetchall())
        return found

    def _require_ids(self, conn, ids: list[str], what: str) -> dict[str, str]:
        found = self._roles_of(conn, list(dict.fromkeys(ids)))
        missing = [s for s in dict.fromkeys(ids) if s not in found]
        if missing:
            raise StoreError(f"{what}: unknown sample id{'s' if len(missing) > 1 else ''} {_name_some(missing)} "
                             f"(not in {self.path})")
        return found

    def select(self, owner: str | None = None, ids: Sequence[str] | None = None, label: int | None = None,
               role: str | None = "train") -> list[str]:
        """Sample ids chosen by exactly one of owner, ids or label; ``role`` filters ('train' by
        default, 'validation', or None for both). Owner and label order is insertion order; ids keep
        the given order. An unknown owner, id or an empty label raises StoreError naming it, and so
        does an id whose role is not ``role``. ``select(**request_selector)`` resolves a request."""
        role = _check_role(role, allow_none=True)
        given = [k for k, v in (("owner", owner), ("ids", ids), ("label", label)) if v is not None]
        if len(given) != 1:
            raise StoreError(f"select needs exactly one of owner, ids, label; got {given or 'none'}")
        with self._lock:
            conn = self.conn
            rf, ra = ("", []) if role is None else (" AND role = ?", [role])
            if owner is not None:
                if not isinstance(owner, str) or not owner:
                    raise StoreError(f"owner must be a non-empty string, got {owner!r}")
                if conn.execute("SELECT 1 FROM samples WHERE owner = ? LIMIT 1", (owner,)).fetchone() is None:
                    raise StoreError(f"unknown owner {owner!r}: no samples of that owner in {self.path}")
                return [r[0] for r in conn.execute(
                    f"SELECT id FROM samples WHERE owner = ?{rf} ORDER BY rowid", [owner] + ra)]
            if label is not None:
                if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                    raise StoreError(f"label must be an integer, got {label!r}")
                label = int(label)
                k = self.num_classes
                if label < 0 or (k is not None and label >= k):
                    raise StoreError(f"label {label} is out of range (the store has {k} classes)")
                if conn.execute("SELECT 1 FROM samples WHERE label = ? LIMIT 1", (label,)).fetchone() is None:
                    raise StoreError(f"no samples with label {label} in {self.path}")
                return [r[0] for r in conn.execute(
                    f"SELECT id FROM samples WHERE label = ?{rf} ORDER BY rowid", [label] + ra)]
            ids = _check_ids(ids, "ids")
            found = self._require_ids(conn, ids, "select")
            if role is not None:
                other = [s for s in ids if found[s] != role]
                if other:
                    raise StoreError(f"select: sample {other[0]!r} is a {found[other[0]]} sample, not {role} "
                                     "(pass role=None to select both)")
            return ids

    def load(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(x int8 (N, *shape), labels int64 (N,))`` for ``ids``, in the given order (repeats allowed).
        An unknown id, or a row whose bytes do not match its shape, raises StoreError naming it."""
        ids = _check_ids(ids, "ids", allow_dup=True)
        shape = self.input_shape
        if not ids:
            return np.zeros((0, *(shape or ())), np.int8), np.zeros(0, np.int64)
        uniq = list(dict.fromkeys(ids))
        rows: dict[str, tuple] = {}
        with self._lock:
            for chunk in _chunks(uniq):
                for sid, label, shp, data in self.conn.execute(
                        f"SELECT id, label, shape, data FROM samples WHERE id IN ({','.join('?' * len(chunk))})",
                        list(chunk)):
                    rows[sid] = (label, shp, data)
        missing = [s for s in uniq if s not in rows]
        if missing:
            raise StoreError(f"load: unknown sample id{'s' if len(missing) > 1 else ''} {_name_some(missing)} "
                             f"(not in {self.path})")
        x = np.empty((len(ids), *shape), np.int8)
        y = np.empty(len(ids), np.int64)
        size = math.prod(shape)
        for i, sid in enumerate(ids):
            label, shp, data = rows[sid]
            if json.loads(shp) != list(shape) or not isinstance(data, bytes) or len(data) != size:
                raise StoreError(f"sample {sid!r} is corrupted: {len(data) if isinstance(data, bytes) else '?'} "
                                 f"bytes, shape {shp}, the store holds {list(shape)} ({size} bytes)")
            x[i] = np.frombuffer(data, np.int8).reshape(shape)
            y[i] = label
        return x, y

    def set_role(self, ids: Sequence[str], role: str) -> int:
        """Move samples to the 'train' or 'validation' slice; returns how many changed."""
        role = _check_role(role)
        ids = _check_ids(ids, "ids")
        with self._tx() as conn:
            self._require_ids(conn, ids, "set_role")
            changed = 0
            for chunk in _chunks(ids):
                rows = conn.execute(f"SELECT id, owner, label, role, shape, added_at, data FROM samples "
                                    f"WHERE id IN ({','.join('?' * len(chunk))})", list(chunk)).fetchall()
                for sid, owner, label, old, shape, added_at, data in rows:
                    if old == role:
                        continue
                    conn.execute("UPDATE samples SET role = ?, digest = ? WHERE id = ?",
                                 (role, _sample_digest(sid, owner, label, role, shape, added_at, data), sid))
                    changed += 1
            return changed

    def mark_validation(self, ids: Sequence[str]) -> int:
        """Hold ``ids`` out as the validation slice (never trained on; the stopping rule's yardstick)."""
        return self.set_role(ids, "validation")

    def retain_sample(self, exclude_ids: Sequence[str] = (), max_n: int | None = None, seed: int = 0,
                      role: str = "train") -> list[str]:
        """Ids of the retain set: every ``role`` sample not in ``exclude_ids``, or, with ``max_n``, a
        class-stratified random subset of at most ``max_n`` (largest-remainder quotas proportional to
        each class's count; every class keeps at least one sample when ``max_n`` allows). Returned in
        insertion order; the same seed gives the same subset."""
        role = _check_role(role)
        exclude = _check_ids(exclude_ids, "exclude_ids", allow_dup=True)
        if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer))
                                  or max_n < 0):
            raise StoreError(f"max_n must be a non-negative integer or None, got {max_n!r}")
        with self._lock:
            self._require_ids(self.conn, exclude, "retain_sample exclude_ids")
            rows = self.conn.execute("SELECT id, label FROM samples WHERE role = ? ORDER BY rowid",
                                     (role,)).fetchall()
        ex = set(exclude)
        rows = [(i, r) for i, r in enumerate(r for r in rows if r[0] not in ex)]
        if max_n is None or max_n >= len(rows):
            return [r[0] for _, r in rows]
        by_label: dict[int, list[int]] = {}
        for pos, (_sid, lab) in rows:
            by_label.setdefault(lab, []).append(pos)
        labels = sorted(by_label)
        total = len(rows)
        exact = {c: max_n * len(by_label[c]) / total for c in labels}
        quota = {c: int(math.floor(exact[c])) for c in labels}
        left = max_n - sum(quota.values())
        for c in sorted(labels, key=lambda c: (-(exact[c] - quota[c]), c))[:left]:
            quota[c] += 1
        if max_n >= len(labels):  # keep every class present
            for c in sorted((c for c in labels if quota[c] == 0), key=lambda c: (-len(by_label[c]), c)):
                donor = max((d for d in labels if quota[d] > 1), key=lambda d: (quota[d] - exact[d], quota[d]))
                quota[donor] -= 1
                quota[c] = 1
        rng = np.random.default_rng(seed)
        chosen: list[int] = []
        for c in labels:
            pos = by_label[c]
            chosen.extend(pos[j] for j in rng.choice(len(pos), size=quota[c], replace=False))
        return [rows[p][1][0] for p in sorted(chosen)]

    # -- imports --

    def import_npz(self, path: str | os.PathLike, quant: QuantParams, owner: str | None = None,
                   owner_key: str | None = None, role: str = "train", id_prefix: str | None = None) -> list[str]:
        """Import samples from an .npz: features under ``x`` (or ``x_train``), labels under ``y``
        (``y_train``); owners are ``owner`` for all, or the array under ``owner_key`` (default key
        ``owners`` if present). Float features are quantized with ``quant`` (LiteRT's rounding);
        int8 features are taken as they are. ``class_names`` in the file are recorded. All or nothing."""
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise StoreError(f"{where}: no such file")
        from .datasets import open_npz, sample_keys
        try:
            f = open_npz(path)
        except ValueError as e:
            raise StoreError(str(e)) from None
        with f:
            files = list(f.files)
            if not files:
                raise StoreError(f"{where}: not an .npz archive of named arrays")
            xk, yk = sample_keys(files)
            if xk is None or yk is None:
                raise StoreError(f"{where}: needs keys x and y (or x_train and y_train); found {', '.join(files)}")
            try:
                x, y = f[xk], f[yk]
                if owner is not None and owner_key is not None:
                    raise StoreError(f"{where}: pass owner or owner_key, not both")
                if owner is None:
                    owner_key = owner_key or ("owners" if "owners" in files else None)
                    if owner_key is None:
                        raise StoreError(f"{where}: no owner: pass owner= (one owner for all samples) or "
                                         "owner_key= (the key of a per-sample owners array)")
                    if owner_key not in files:
                        raise StoreError(f"{where}: owner_key {owner_key!r} is not in the file "
                                         f"(keys: {', '.join(files)})")
                    owners = f[owner_key]
                    if owners.shape != (len(x),):
                        raise StoreError(f"{where}: {owner_key} has shape {owners.shape}, expected ({len(x)},)")
                    owners = [str(o) for o in owners.tolist()]
                else:
                    owners = owner
                names = [str(c) for c in f["class_names"].tolist()] if "class_names" in files else None
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(f"{where}: cannot read arrays ({type(e).__name__}: {e})") from None
        if x.ndim < 2:
            raise StoreError(f"{where}: {xk} must be (N, *sample_shape), got shape {x.shape}")
        if len(x) == 0:
            raise StoreError(f"{where}: {xk} holds no samples")
        if y.shape != (len(x),):
            raise StoreError(f"{where}: {yk} has shape {y.shape}, expected ({len(x)},) to match {xk}")
        if not isinstance(quant, QuantParams):
            raise StoreError(f"quant must be a QuantParams, got {type(quant).__name__}")
        if x.dtype == np.int8:
            q = x
        elif np.issubdtype(x.dtype, np.floating):
            if not np.all(np.isfinite(x)):
                raise StoreError(f"{where}: {xk} holds NaN or inf")
            q = quantize(x, quant, np.int8)
        else:
            raise StoreError(f"{where}: {xk} is {x.dtype}; give float features (quantized here) or int8 "
                             "samples already quantized")
        try:
            with self._tx() as conn:
                if names is not None:
                    self._configure(conn, class_names=names)
                # id_prefix makes the ids a function of the file (e.g. its sha256): importing the
                # same upload twice then fails on the first id instead of adding a second copy
                ids = None if id_prefix is None else [f"{id_prefix}-{i:07d}" for i in range(len(y))]
                return self._add(conn, q, y, owners, ids, role, quant, xk)
        except StoreError as e:
            raise StoreError(f"{where}: {e}") from None

    def import_image_folder(self, root: str | os.PathLike, quant: QuantParams, size: tuple[int, int],
                            channels: int = 1, owner: str | None = None, role: str = "train",
                            value_range: tuple[float, float] = (0.0, 1.0)) -> list[str]:
        """Import ``root/<class>/...`` images: class sub-folders sorted by name give labels 0..K-1
        (names recorded in meta). With ``owner`` every image belongs to it; otherwise images sit in
        ``root/<class>/<owner>/`` and the folder names their owner. Images are converted to grayscale
        (``channels=1``) or RGB (3), resized to ``size=(H, W)`` (bilinear), mapped from [0, 255] to
        ``value_range`` and quantized with ``quant``. Needs Pillow. All or nothing."""
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError as e:  # pragma: no cover
            raise ImportError("import_image_folder needs Pillow: pip install 'edge-qmul[device]'") from e
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"{root}: not a directory")
        if channels not in (1, 3):
            raise StoreError(f"channels must be 1 or 3, got {channels!r}")
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise StoreError(f"size must be (H, W), got {size!r}") from None
        if h <= 0 or w <= 0:
            raise StoreError(f"size must be positive, got {size!r}")
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise StoreError(f"value_range must be finite with hi > lo, got {value_range!r}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise StoreError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
        files: list[tuple[Path, int, str]] = []
        for label, cname in enumerate(classes):
            for p in sorted((root / cname).rglob("*")):
                rel = p.relative_to(root / cname)
                if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                if owner is not None:
                    who = owner
                elif len(rel.parts) == 2:
                    who = rel.parts[0]
                else:
                    raise StoreError(f"{p}: no owner for this image: pass owner=, or put images in "
                                     f"{root}/<class>/<owner>/")
                files.append((p, label, who))
        if not files:
            raise StoreError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        mode = "L" if channels == 1 else "RGB"
        x = np.empty((len(files), h, w, channels), np.float32)
        for i, (p, _label, _who) in enumerate(files):
            try:
                with Image.open(p) as im:
                    im = im.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise StoreError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
            x[i] = a.reshape(h, w, channels)
        x = np.float32(lo) + x * np.float32((hi - lo) / 255.0)
        q = quantize(x, quant, np.int8)
        labels = np.array([f[1] for f in files], np.int64)
        owners = [f[2] for f in files]
        try:
            with self._tx() as conn:
                self._configure(conn, class_names=classes)
                return self._add(conn, q, labels, owners, None, role, quant, "images")
        except StoreError as e:
            raise StoreError(f"{root}: {e}") from None

    # -- requests --

    @staticmethod
    def _norm_selector(selector: Any) -> dict:
        if not isinstance(selector, dict):
            raise StoreError(f"selector must be a dict with one of owner, ids, label; got {selector!r:.100}")
        extra = [k for k in selector if k not in ("owner", "ids", "label")]
        if extra:
            raise StoreError(f"selector has unknown key {extra[0]!r} (allowed: owner, ids, label)")
        if len(selector) != 1:
            raise StoreError(f"selector needs exactly one of owner, ids, label; got {sorted(selector) or 'none'}")
        (k, v), = selector.items()
        if k == "owner":
            if not isinstance(v, str) or not v:
                raise StoreError(f"selector owner must be a non-empty string, got {v!r}")
            return {"owner": v}
        if k == "ids":
            ids = _check_ids(v, "selector ids")
            if not ids:
                raise StoreError("selector ids is empty")
            return {"ids": ids}
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise StoreError(f"selector label must be an integer, got {v!r}")
        return {"label": int(v)}

    @staticmethod
    def redact_selector(selector: dict) -> dict:
        """The selector as the audit log records it: owner and ids replaced by their sha256."""
        if "owner" in selector:
            return {"owner_sha256": sha256_id(selector["owner"])}
        if "ids" in selector:
            return {"id_sha256": sorted(sha256_id(s) for s in selector["ids"])}
        return dict(selector)

    def create_request(self, selector: dict, method: str, params: dict | None = None,
                       request_id: str | None = None) -> str:
        """Record a forget request (status 'pending'); returns its id (uuid4 hex unless given).

        The selector must resolve now (an unknown owner or id raises StoreError). Re-sending the same
        request id with the same content returns it again (idempotent); with other content it is a
        StoreError. The audit log gets the selector redacted to hashes."""
        sel = self._norm_selector(selector)
        if not isinstance(method, str) or not method:
            raise StoreError(f"method must be a non-empty string, got {method!r}")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise StoreError(f"params must be a dict, got {type(params).__name__}")
        sel_text, params_text = _canon(sel), _canon(params)
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not request_id or len(request_id) > 128:
            raise StoreError(f"request_id must be a non-empty string of at most 128 characters, got {request_id!r}")
        with self._tx() as conn:
            row = conn.execute("SELECT selector, method, params FROM requests WHERE id = ?",
                               (request_id,)).fetchone()
            if row is not None:
                if row == (sel_text, method, params_text):
                    return request_id
                raise StoreError(f"request {request_id!r} already exists with a different selector, "
                                 "method or params")
            self.select(**sel, role=None)  # raises for an unknown owner / id / empty label
            t = _now()
            conn.execute("INSERT INTO requests (id, selector, method, params, status, created_at, updated_at, "
                         "result, digest) VALUES (?, ?, ?, ?, 'pending', ?, ?, NULL, ?)",
                         (request_id, sel_text, method, params_text, t, t,
                          _request_digest(request_id, sel_text, method, params_text, "pending", t, t, None)))
            self._append_audit(conn, "request_created", request_id,
                               {"selector": self.redact_selector(sel), "method": method, "params": params})
        return request_id

    def _row_request(self, conn, request_id: str) -> tuple:
        if not isinstance(request_id, str):
            raise StoreError(f"request id must be a string, got {request_id!r}")
        row = conn.execute("SELECT id, selector, method, params, status, created_at, updated_at, result "
                           "FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown request {request_id!r} (not in {self.path})")
        return row

    @staticmethod
    def _request_dict(row: tuple) -> dict:
        rid, sel, method, params, status, created, updated, result = row
        return {"id": rid, "selector": json.loads(sel), "method": method, "params": json.loads(params),
                "status": status, "created_at": created, "updated_at": updated,
                "result": None if result is None else json.loads(result)}

    def get_request(self, request_id: str) -> dict:
        """A request as a dict: id, selector, method, params, status, created_at, updated_at, result."""
        with self._lock:
            return self._request_dict(self._row_request(self.conn, request_id))

    def requests(self, status: str | None = None) -> list[dict]:
        """All requests (optionally of one status), oldest first."""
        if status is not None and status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        sql = "SELECT id, selector, method, params, status, created_at, updated_at, result FROM requests"
        rows = self._read(sql + (" WHERE status = ?" if status else "") + " ORDER BY created_at, rowid",
                          (status,) if status else ())
        return [self._request_dict(r) for r in rows]

    def _write_request(self, conn, rid, sel, method, params, status, created, result_text) -> str:
        t = _now()
        conn.execute("UPDATE requests SET selector = ?, status = ?, updated_at = ?, result = ?, digest = ? "
                     "WHERE id = ?", (sel, status, t, result_text,
                                      _request_digest(rid, sel, method, params, status, created, t, result_text),
                                      rid))
        return t

    def set_status(self, request_id: str, status: str, result: dict | None = None) -> dict:
        """Move a request along pending -> running -> done | failed, pending -> failed | rolled_back,
        done -> rolled_back. ('committed' only through :meth:`commit_forget`.) ``result`` (a JSON
        object) replaces the stored one when given. Returns the updated request."""
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if status == "committed":
            raise StoreError("a request becomes 'committed' only through commit_forget, which deletes "
                             "the samples and switches the model in the same transaction")
        if result is not None and not isinstance(result, dict):
            raise StoreError(f"result must be a dict (JSON object), got {type(result).__name__}")
        result_text = None if result is None else _canon(result)
        with self._tx() as conn:
            rid, sel, method, params, old, created, _upd, old_result = self._row_request(conn, request_id)
            if status not in TRANSITIONS[old]:
                allowed = ", ".join(TRANSITIONS[old]) or "none (final)"
                raise StoreError(f"request {request_id!r}: illegal status change {old} -> {status} "
                                 f"(allowed from {old}: {allowed})")
            text = old_result if result_text is None else result_text
            self._write_request(conn, rid, sel, method, params, status, created, text)
            details = {"from": old, "to": status}
            if text is not None:
                details["result_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            self._append_audit(conn, "request_status", request_id, details)
            return self._request_dict(self._row_request(conn, request_id))

    def commit_forget(self, request_id: str, ids: Sequence[str], new_model_sha256: str,
                      base_model_sha256: str | None = None) -> dict:
        """Commit a finished forget job in ONE transaction: delete the samples ``ids`` (all of them,
        including validation rows: they must be exactly what the request's selector names now), make
        ``new_model_sha256`` the active model, mark the request 'committed' (its selector redacted to
        hashes) and append a ``forget_committed`` audit row. Then checkpoint the WAL (TRUNCATE).

        The request must be 'done'. Unknown ids, a mismatch with the selector or a bad hash raise
        StoreError and change nothing. Calling it again for a committed request with the same ids
        and model returns the same record (a retry after a lost reply). Returns request_id,
        deleted_at, n_samples, sample_id_hashes (sorted), model_before, model_after, audit_seq,
        audit_hash and checkpoint (ok, wal_bytes)."""
        ids = _check_ids(ids, "ids")
        if not ids:
            raise StoreError("commit_forget: ids is empty")
        _check_sha256(new_model_sha256, "new_model_sha256")
        hashes = sorted(sha256_id(s) for s in ids)
        with self._tx() as conn:
            rid, sel_text, method, params, status, created, _upd, result_text = self._row_request(conn, request_id)
            if status == "committed":
                prev = (json.loads(result_text) or {}).get("commit") if result_text else None
                if not (prev and prev["sample_id_hashes"] == hashes and prev["model_after"] == new_model_sha256):
                    raise StoreError(f"request {request_id!r} is already committed with other samples or model")
                record = prev
            elif status != "done":
                raise StoreError(f"request {request_id!r} is {status}; only a 'done' request can be committed")
            else:
                self._require_ids(conn, ids, f"commit_forget {request_id!r}")
                want = set(self.select(**json.loads(sel_text), role=None))
                if want != set(ids):
                    extra, missing = set(ids) - want, sorted(want - set(ids))
                    raise StoreError(
                        f"commit_forget {request_id!r}: ids do not match the request's selector now: "
                        + (f"{len(missing)} selected sample(s) missing from ids (e.g. {_name_some(missing, 3)})"
                           if missing else "")
                        + ("; " if missing and extra else "")
                        + (f"{len(extra)} id(s) outside the selector (e.g. {_name_some(sorted(extra), 3)})"
                           if extra else ""))
                model_before = self._get_meta_tx(conn, "active_model_sha256")
                if base_model_sha256 not in (None, model_before) and model_before is not None:
                    raise StoreError(
                        f"commit_forget {request_id!r}: the job ran on model {base_model_sha256[:12]} but the "
                        f"active model is now {str(model_before)[:12]} (another forget was committed since); "
                        "roll this job back and run the request again")
                deleted_at = _now()
                n = 0
                for chunk in _chunks(ids):
                    n += conn.execute(f"DELETE FROM samples WHERE id IN ({','.join('?' * len(chunk))})",
                                      list(chunk)).rowcount
                if n != len(ids):  # cannot happen inside the transaction; never commit if it does
                    raise StoreError(f"commit_forget {request_id!r}: deleted {n} rows for {len(ids)} ids")
                self._put_meta(conn, "active_model_sha256", new_model_sha256)
                record = {"request_id": request_id, "deleted_at": deleted_at, "n_samples": n,
                          "sample_id_hashes": hashes, "model_before": model_before,
                          "model_after": new_model_sha256}
                audit = self._append_audit(conn, "forget_committed", request_id,
                                           {k: v for k, v in record.items() if k != "request_id"})
                record.update(audit_seq=audit["seq"], audit_hash=audit["hash"])
                result = json.loads(result_text) if result_text else {}
                result["commit"] = record
                redacted = _canon(self.redact_selector(json.loads(sel_text)))
                self._write_request(conn, rid, redacted, method, params, "committed", created, _canon(result))
        return dict(record, checkpoint=self.checkpoint())

    # -- checks and statistics --

    def verify(self, check: str = "full") -> dict:
        """Check the open store: SQLite integrity_check, schema and triggers, every row's digest and
        byte length, the audit hash chain. Returns a summary; raises StoreError on any failure."""
        if check not in ("full", "quick"):
            raise StoreError(f"check must be 'full' or 'quick', got {check!r}")
        with self._lock:
            return _check_connection(self.conn, str(self.path), check == "full")

    def stats(self) -> dict:
        """Counts per owner, label and role; requests per status; audit rows; bytes on disk."""
        def grouped(col):
            return {k: n for k, n in self._read(f"SELECT {col}, COUNT(*) FROM samples GROUP BY {col} ORDER BY {col}")}
        page_size = self._read("PRAGMA page_size")[0][0]
        wal = Path(f"{self.path}-wal")
        return {
            "samples": self.count(),
            "by_owner": grouped("owner"),
            "by_label": grouped("label"),
            "by_role": grouped("role"),
            "requests_by_status": {k: n for k, n in self._read(
                "SELECT status, COUNT(*) FROM requests GROUP BY status ORDER BY status")},
            "audit_rows": self._read("SELECT COUNT(*) FROM audit")[0][0],
            "file_bytes": self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "page_size": page_size,
            "page_count": self._read("PRAGMA page_count")[0][0],
            "freelist_pages": self._read("PRAGMA freelist_count")[0][0],
        }
