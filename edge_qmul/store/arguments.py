"""Checks of the arguments callers give the Store (sample ids, roles, hashes): each returns the value
in its plain form or raises StoreError naming the argument; plus the batching of id lists for SQL.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .schema import ROLES, StoreError

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit


def _chunks(seq: Sequence, n: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _name_some(items: Sequence[str], k: int = 5) -> str:
    """The first ``k`` items quoted, and how many more, for an error message."""
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
