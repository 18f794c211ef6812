"""The Store: one open store file -- its connection and write transactions, its meta rows (sample
shape, quantization, classes, the active model), the importers' entry points, verify and stats. The
samples and the requests live in their own method classes, which the Store combines.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..datasets import SampleBatch, SampleError, image_folder_samples, npz_samples
from ..quant import QuantParams
from .arguments import _check_sha256
from .integrity import _check_connection, _is_corruption, validate_file
from .requests import RequestMethods
from .samples import SampleMethods
from .schema import StoreError, _canon, _meta_digest, _quant_from_json, _quant_to_json, create_file


class Store(SampleMethods, RequestMethods):
    """The device's sample store (see the :mod:`edge_qmul.store` docstring).

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
            create_file(self.path)
        self.opened = validate_file(self.path, check == "full", self._timeout)
        self._conn = self._connect()
        self.checkpoint()

    # -- opening --

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

    # -- imports --

    def import_npz(self, path: str | os.PathLike, quant: QuantParams, owner: str | None = None,
                   owner_key: str | None = None, role: str = "train", id_prefix: str | None = None) -> list[str]:
        """Import samples from an .npz: features under ``x`` (or ``x_train``), labels under ``y``
        (``y_train``); owners are ``owner`` for all, or the array under ``owner_key`` (default key
        ``owners`` if present). Float features are quantized with ``quant`` (LiteRT's rounding);
        int8 features are taken as they are. ``class_names`` in the file are recorded. All or nothing."""
        try:
            batch = npz_samples(path, quant, owner=owner, owner_key=owner_key)
        except SampleError as e:
            raise StoreError(str(e)) from None
        # id_prefix makes the ids a function of the file (e.g. its sha256): importing the
        # same upload twice then fails on the first id instead of adding a second copy
        ids = None if id_prefix is None else [f"{id_prefix}-{i:07d}" for i in range(len(batch.labels))]
        return self._import(batch, ids, role, quant, str(Path(path)))

    def import_image_folder(self, root: str | os.PathLike, quant: QuantParams, size: tuple[int, int],
                            channels: int = 1, owner: str | None = None, role: str = "train",
                            value_range: tuple[float, float] = (0.0, 1.0)) -> list[str]:
        """Import ``root/<class>/...`` images: class sub-folders sorted by name give labels 0..K-1
        (names recorded in meta). With ``owner`` every image belongs to it; otherwise images sit in
        ``root/<class>/<owner>/`` and the folder names their owner. Images are converted to grayscale
        (``channels=1``) or RGB (3), resized to ``size=(H, W)`` (bilinear), mapped from [0, 255] to
        ``value_range`` and quantized with ``quant``. Needs Pillow. All or nothing."""
        try:
            batch = image_folder_samples(root, quant, size, channels=channels, owner=owner, value_range=value_range)
        except SampleError as e:
            raise StoreError(str(e)) from None
        return self._import(batch, None, role, quant, str(Path(root)))

    def _import(self, batch: SampleBatch, ids: list[str] | None, role: str, quant: QuantParams,
                where: str) -> list[str]:
        """Add an importer's batch and record its class names, in one transaction."""
        try:
            with self._tx() as conn:
                if batch.class_names is not None:
                    self._configure(conn, class_names=batch.class_names)
                return self._add(conn, batch.x, batch.labels, batch.owners, ids, role, quant, batch.what)
        except StoreError as e:
            raise StoreError(f"{where}: {e}") from None

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
