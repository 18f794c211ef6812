"""The fleet's registry: one SQLite file of devices, erasure requests and their deliveries.

The idea: an erasure request names a person, and the registry turns it into one *delivery* per
device that reported holding that person's samples. A delivery is the request's queue entry for
one device and walks pending -> sent -> done -> committed (or failed); it survives the fleet
process (WAL, synchronous=FULL, every write in one transaction), so a device offline for days gets
its job when it returns, and a restarted fleet process carries on where the last one stopped.

    devices(id, url, key_file, enrolled, last_seen, model_sha256, owners, samples, ...)
    requests(id, owner, method, params, commit_flag, created, status)
    deliveries(request_id, device_id, job_key, status, job_id, certificate, certificate_sha256,
               model_sha256_pulled, error, attempts, updated)

A delivery's `job_key` (16 hex digits) is derived from (request id, device id, attempt): the device
runs one job per key, so a retried or redelivered FORGET never starts a second job. Only paths are
stored (the device's key file, the broker password file inside the URL), never a secret.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge_qmul.api import canonical_json

__all__ = ["DELIVERY_STATES", "FleetError", "Registry", "canonical_json", "job_key"]

DELIVERY_STATES = ("pending", "sent", "done", "committed", "failed")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    key_file TEXT NOT NULL,
    enrolled REAL NOT NULL,
    last_seen REAL,
    model_sha256 TEXT,
    owners TEXT NOT NULL DEFAULT '[]',
    samples INTEGER,
    engine_version TEXT,
    jobs INTEGER
);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    method TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    commit_flag INTEGER NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    request_id TEXT NOT NULL REFERENCES requests(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    job_key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'done', 'committed', 'failed')),
    job_id TEXT,
    certificate TEXT,
    certificate_sha256 TEXT,
    model_sha256_pulled TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (request_id, device_id)
);
"""
DEVICE_COLUMNS = ("id", "url", "key_file", "enrolled", "last_seen", "model_sha256", "owners", "samples",
                  "engine_version", "jobs")
DELIVERY_COLUMNS = ("request_id", "device_id", "job_key", "status", "job_id", "certificate",
                    "certificate_sha256", "model_sha256_pulled", "error", "attempts", "updated")
REQUEST_COLUMNS = ("id", "owner", "method", "params", "commit_flag", "created", "status")


class FleetError(Exception):
    """A fleet command that cannot be done: the message names what was wrong (never a secret)."""


def job_key(request_id: str, device_id: str, attempt: int = 0) -> str:
    """The 16-hex-digit job key of a delivery: the same inputs always give the same key."""
    text = f"edge-qmul-fleet\0{request_id}\0{device_id}\0{attempt}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry:
    """The registry file at `path` (created with its tables if missing). Thread-safe: one
    connection, one lock; every write is one transaction."""

    def __init__(self, path: str | os.PathLike, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if not create and not self.path.exists():
            raise FleetError(f"no fleet registry at {self.path} (enroll a device first, or pass --db)")
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self._tx() as c:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as e:
            raise FleetError(f"fleet registry {self.path}: {e}") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _rows(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            cur = self.conn.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    # --- devices ---
    def add_device(self, device_id: str, url: str, key_file: str, info: dict | None = None) -> dict:
        """Enroll (or re-enroll: a new URL or key file) a device; `info` is its INFO reply."""
        now = time.time()
        with self._tx() as c:
            c.execute("INSERT INTO devices (id, url, key_file, enrolled) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT(id) DO UPDATE SET url = excluded.url, key_file = excluded.key_file",
                      (device_id, url, key_file, now))
        if info is not None:
            self.seen(device_id, info)
        return self.device(device_id)

    def seen(self, device_id: str, info: dict | None = None) -> None:
        """The device answered now; with its INFO reply, what it holds is refreshed too."""
        now = time.time()
        with self._tx() as c:
            if info is None:
                c.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))
                return
            owners = sorted(o for o in info.get("owners") or [] if isinstance(o, str))
            c.execute("UPDATE devices SET last_seen = ?, model_sha256 = ?, owners = ?, samples = ?, "
                      "engine_version = ?, jobs = ? WHERE id = ?",
                      (now, info.get("model_sha256"), json.dumps(owners), info.get("samples"),
                       info.get("engine_version"), info.get("jobs"), device_id))

    def device(self, device_id: str) -> dict:
        rows = self._rows("SELECT * FROM devices WHERE id = ?", (device_id,))
        if not rows:
            known = [d["id"] for d in self.devices()]
            raise FleetError(f"unknown device {device_id!r}; enrolled: {', '.join(known) or 'none'}")
        return _device(rows[0])

    def devices(self) -> list[dict]:
        return [_device(r) for r in self._rows("SELECT * FROM devices ORDER BY id")]

    def holders(self, owner: str) -> list[str]:
        """The devices whose last report lists `owner` among the owners of their samples."""
        return [d["id"] for d in self.devices() if owner in d["owners"]]

    # --- requests ---
    def add_request(self, owner: str, method: str | None, params: dict, commit: bool,
                    devices: list[str]) -> str:
        """A new erasure request and one pending delivery per device in `devices`; its id."""
        if not owner:
            raise FleetError("an erasure request needs an owner (--owner X)")
        now = time.time()
        request_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + os.urandom(3).hex()
        with self._tx() as c:
            c.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (request_id, owner, method, json.dumps(params, sort_keys=True), int(bool(commit)), now,
                       "open" if devices else "complete"))
            for device_id in devices:
                c.execute("INSERT INTO deliveries (request_id, device_id, job_key, status, updated) "
                          "VALUES (?, ?, ?, 'pending', ?)", (request_id, device_id, job_key(request_id, device_id),
                                                             now))
        return request_id

    def request(self, request_id: str) -> dict:
        rows = self._rows("SELECT * FROM requests WHERE id = ?", (request_id,))
        if not rows:
            recent = [r["id"] for r in self.requests()[-5:]]
            raise FleetError(f"unknown request {request_id!r}; recent: {', '.join(recent) or 'none'}")
        return _request(rows[0])

    def requests(self) -> list[dict]:
        return [_request(r) for r in self._rows("SELECT * FROM requests ORDER BY created, id")]

    # --- deliveries ---
    def deliveries(self, request_id: str | None = None, open_only: bool = False) -> list[dict]:
        sql, args = "SELECT * FROM deliveries WHERE 1", []
        if request_id is not None:
            sql, args = sql + " AND request_id = ?", [request_id]
        if open_only:
            sql += " AND status IN ('pending', 'sent', 'done')"
        return [_delivery(r) for r in self._rows(sql + " ORDER BY request_id, device_id", args)]

    def delivery(self, request_id: str, device_id: str) -> dict:
        rows = self._rows("SELECT * FROM deliveries WHERE request_id = ? AND device_id = ?", (request_id, device_id))
        if not rows:
            raise FleetError(f"request {request_id!r} has no delivery to device {device_id!r}")
        return _delivery(rows[0])

    def update_delivery(self, request_id: str, device_id: str, **fields) -> dict:
        """Set a delivery's fields (status, job_id, error, certificate, ...) in one transaction and
        refresh its request's status; returns the delivery."""
        bad = set(fields) - set(DELIVERY_COLUMNS[2:])
        if bad:
            raise FleetError(f"unknown delivery fields {sorted(bad)}")
        if "status" in fields and fields["status"] not in DELIVERY_STATES:
            raise FleetError(f"delivery status {fields['status']!r}: expected one of {', '.join(DELIVERY_STATES)}")
        if isinstance(fields.get("certificate"), dict):
            fields["certificate"] = canonical_json(fields["certificate"])
        fields["updated"] = time.time()
        with self._tx() as c:
            cols = ", ".join(f"{k} = ?" for k in fields)
            c.execute(f"UPDATE deliveries SET {cols} WHERE request_id = ? AND device_id = ?",
                      [*fields.values(), request_id, device_id])
            self._refresh_status(c, request_id)
        return self.delivery(request_id, device_id)

    def retry(self, request_id: str) -> list[str]:
        """Failed deliveries of a request back to pending, each with a new job key (its failed job
        stays on the device, as its record); returns their device ids."""
        self.request(request_id)
        now = time.time()
        with self._tx() as c:
            rows = c.execute("SELECT device_id, attempts FROM deliveries WHERE request_id = ? AND status = 'failed'",
                             (request_id,)).fetchall()
            for device_id, attempts in rows:
                c.execute("UPDATE deliveries SET status = 'pending', job_key = ?, job_id = NULL, error = NULL, "
                          "certificate = NULL, certificate_sha256 = NULL, model_sha256_pulled = NULL, "
                          "attempts = ?, updated = ? WHERE request_id = ? AND device_id = ?",
                          (job_key(request_id, device_id, attempts + 1), attempts + 1, now, request_id, device_id))
            self._refresh_status(c, request_id)
        return [r[0] for r in rows]

    def next_attempt(self, request_id: str, device_id: str, error: str) -> dict:
        """One delivery back to pending as its next attempt (a new job key), `error` saying why the
        last one ended; the delivery."""
        with self._tx() as c:
            row = c.execute("SELECT attempts FROM deliveries WHERE request_id = ? AND device_id = ?",
                            (request_id, device_id)).fetchone()
            if row is None:
                raise FleetError(f"request {request_id!r} has no delivery to device {device_id!r}")
            c.execute("UPDATE deliveries SET status = 'pending', job_key = ?, job_id = NULL, error = ?, "
                      "attempts = ?, updated = ? WHERE request_id = ? AND device_id = ?",
                      (job_key(request_id, device_id, row[0] + 1), error, row[0] + 1, time.time(), request_id,
                       device_id))
            self._refresh_status(c, request_id)
        return self.delivery(request_id, device_id)

    @staticmethod
    def _refresh_status(c: sqlite3.Connection, request_id: str) -> None:
        commit = c.execute("SELECT commit_flag FROM requests WHERE id = ?", (request_id,)).fetchone()[0]
        counts = dict(c.execute("SELECT status, COUNT(*) FROM deliveries WHERE request_id = ? GROUP BY status",
                                (request_id,)).fetchall())
        final = {"committed"} if commit else {"done", "committed"}
        if all(s in final for s in counts):
            status = "complete"
        elif all(s in final or s == "failed" for s in counts):
            status = "failed"  # every delivery ended, some failed: `retry` sends them again
        else:
            status = "open"
        c.execute("UPDATE requests SET status = ? WHERE id = ?", (status, request_id))

    def counts(self, request_id: str) -> dict[str, int]:
        rows = self._rows("SELECT status, COUNT(*) AS n FROM deliveries WHERE request_id = ? GROUP BY status",
                          (request_id,))
        return {s: 0 for s in DELIVERY_STATES} | {r["status"]: r["n"] for r in rows}


def _device(row: dict) -> dict:
    row["owners"] = json.loads(row["owners"] or "[]")
    return row


def _request(row: dict) -> dict:
    row["params"] = json.loads(row["params"] or "{}")
    row["commit"] = bool(row.pop("commit_flag"))
    return row


def _delivery(row: dict) -> dict:
    row["certificate"] = json.loads(row["certificate"]) if row["certificate"] else None
    return row
