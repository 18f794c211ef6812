"""The samples, as methods of the Store: add int8 samples in one transaction, count them, choose them
by owner, ids or label, load them back, move them between the train and validation slices, and draw
a class-stratified retain set.
"""
from __future__ import annotations

import json
import math
import uuid
from typing import Sequence

import numpy as np

from ..quant import QuantParams
from .arguments import _check_ids, _check_role, _chunks, _name_some
from .schema import StoreError, _canon, _now, _sample_digest


class SampleMethods:
    """The samples half of :class:`~edge_qmul.store.Store`; it relies on the Store's connection,
    transactions and meta rows (``conn``, ``_lock``, ``_tx``, ``_read``, ``_configure``,
    ``_get_meta_tx``, ``input_shape``, ``num_classes``)."""

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
                big = np.abs(labels.astype(np.float64)) >= 2.0**31  # beyond int64 the cast wraps to a negative label
                if big.any():
                    i = int(np.nonzero(big)[0][0])
                    raise StoreError(f"label {labels[i]:g} of sample {i} is not a class index")
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
