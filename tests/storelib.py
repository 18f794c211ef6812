"""Helpers shared by the store's tests: sample arrays (some holding a byte pattern to hunt for on
disk), a populated store, a finished forget request, and the files a store leaves beside it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edge_qmul.quant import QuantParams
from edge_qmul.store import Store

PATTERN = b"\xde\xad\xbe\xefFORGET-ME!\x13\x37"  # 16 bytes that appear nowhere else
assert len(PATTERN) == 16
MODEL_A, MODEL_B = "a" * 64, "b" * 64
Q = QuantParams([1 / 255], [-128])


def _samples(n: int, shape=(8, 8, 1), seed: int = 0) -> np.ndarray:
    """Random int8 samples that cannot contain PATTERN (bytes kept in [-64, 63])."""
    return np.random.default_rng(seed).integers(-64, 64, (n, *shape), dtype=np.int8)


def _with_pattern(n: int, shape=(8, 8, 1)) -> np.ndarray:
    x = np.zeros((n, *shape), np.int8)
    flat = x.reshape(n, -1)
    for i in range(n):
        flat[i, 3:19] = np.frombuffer(PATTERN, np.int8)
        flat[i, 0] = i  # rows differ
    return x


def _store_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def _file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _store_files(path)}


def _populated(path: Path, n_other: int = 120, shape=(8, 8, 1)) -> dict:
    """A store with owners u0..u3, 'alice' (whose samples hold PATTERN), a validation slice and the
    active model MODEL_A. Returns the ids."""
    with Store(path, create=True) as s:
        s.configure(num_classes=10, quant=Q)
        other = s.add(_samples(n_other, shape), np.arange(n_other) % 10, [f"u{i % 4}" for i in range(n_other)])
        alice = s.add(_with_pattern(4, shape), [1, 2, 3, 3], "alice")
        alice_val = s.add(_with_pattern(1, shape), [5], "alice", role="validation")
        val = s.add(_samples(10, shape, seed=1), np.arange(10), "holdout", role="validation")
        s.set_active_model(MODEL_A)
    return {"other": other, "alice": alice, "alice_val": alice_val, "val": val}


def _done_request(s: Store, selector: dict) -> str:
    rid = s.create_request(selector, "qmul", {"epochs": 2, "lr": 0.01})
    s.set_status(rid, "running")
    s.set_status(rid, "done", {"ua_after": 97.5})
    return rid
