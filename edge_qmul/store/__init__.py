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

The package: :mod:`.schema` (tables, constants, canonical JSON, row digests, creating a file),
:mod:`.integrity` (checking a file before and while it is used), :mod:`.store` (the Store: connection,
meta, imports), :mod:`.samples` and :mod:`.requests` (the Store's sample and request methods),
:mod:`.arguments` (argument checks). The importers' file reading lives in :mod:`edge_qmul.datasets`.
"""
from __future__ import annotations

from ..datasets import IMAGE_EXTENSIONS
from .schema import (_SCHEMA, APPLICATION_ID, GENESIS_HASH, ROLES, SCHEMA_VERSION, STATUSES, TRANSITIONS, StoreError,
                     sha256_id)
from .store import Store

__all__ = ["Store", "StoreError", "SCHEMA_VERSION", "ROLES", "STATUSES", "TRANSITIONS", "sha256_id"]
