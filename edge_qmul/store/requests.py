"""Forget requests and the audit log, as methods of the Store: a request moves pending -> running ->
done -> committed (or failed / rolled back), and :meth:`RequestMethods.commit_forget` deletes the
samples, switches the model and marks the request in one transaction; every step appends a
hash-chained audit row that never holds an id, an owner or sample data in clear.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Sequence

import numpy as np

from .arguments import _check_ids, _check_sha256, _chunks, _name_some
from .schema import (GENESIS_HASH, STATUSES, TRANSITIONS, StoreError, _audit_hash, _canon, _now, _request_digest,
                     sha256_id)


class RequestMethods:
    """The requests and audit half of :class:`~edge_qmul.store.Store`; it relies on the Store's
    connection, transactions and meta rows (``_tx``, ``_read``, ``_get_meta_tx``, ``_put_meta``) and
    its samples (``select``, ``_require_ids``)."""

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

