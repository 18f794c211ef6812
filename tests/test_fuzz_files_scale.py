"""Fuzzing the device's input files at scale (issue 16, slow tier): structure-aware mutations of
real .tflite models, of sample .npz uploads and of similar-label tables.

(a) .tflite: fuzzlib.py mutates one field of a fixture model (shapes, types, buffer indices and
sizes, quantization arrays, opcode indices, op and graph inputs / outputs, options, vtables,
offsets; or cuts / extends the file) and worker subprocesses load each mutant and run the fixture's
input through it: a mutant loads and runs to int8 outputs of its declared shapes, or is refused
with ModelError; a crash or hang of a worker is a finding naming the mutation, not pytest's end.
(b) .npz: a valid samples upload is mutated per array (dtype, shape, values, keys, class names,
owners, a pickled object array) or as an archive (cut, damaged member, a member's .npy header
rewritten, not a zip) and imported into a real store the way the agent imports an upload: it is
imported, or refused with SampleError / StoreError / StateError / ModelError (ValueErrors with a
message) and the store's file bytes and count stay as they were; a pickle is never loaded.
(c) similar-label tables: a valid table's JSON is mutated (missing / unknown / retyped fields,
class counts, labels out of range, weights, deep nesting, huge numbers, broken text), then loaded,
checked against the model and used: it works or raises TableError with a message. Hypothesis
draws the retyped fields; seeded generators the rest (reproducible from the printed numbers).

The fast tier runs a sample of each; the slow tier 120,000 .tflite mutants (24,000 per model),
20,000 uploads and 43,000 tables. Counts per kind and
per outcome are printed (``pytest -s``). Findings have their own regression tests at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_helpers import tree_digest
from conftest import fixture_path
from fuzzlib import TFLITE_KINDS, TFLITE_MODELS, check_mutant, mutant, run_workers, tflite_sites, valid_input
from edge_qmul.datasets.samples import SampleError
from edge_qmul.errors import ModelError
from edge_qmul.state import StateError, import_samples
from edge_qmul.store import Store, StoreError
from edge_qmul.tflite import load_tflite
from edge_qmul.unlearn.similar_labels import (MODES, SimilarLabelTable, TableError, assign_from_table,
                                              check_table)

FILE_ERRORS = (SampleError, StoreError, StateError, ModelError)


def _report(title: str, counts: Counter, findings: list) -> None:
    kinds = sorted({k for k, _ in counts})
    print(f"\n{title}: {sum(counts.values())} mutations, {len(findings)} findings")
    for k in kinds:
        print(f"  {k:22s} " + ", ".join(f"{o} {n}" for (kk, o), n in sorted(counts.items()) if kk == k))
    for f in findings[:60]:
        print("  FINDING", f)


# ------------------------------------------------------------------------------ (a) .tflite

def fuzz_tflite(per_model: int, seed: int, procs: int = 2, chunks: int = 2,
                models: tuple = TFLITE_MODELS) -> Counter:
    step = -(-per_model // chunks)
    jobs = [(name, seed, s, min(s + step, per_model)) for name in models for s in range(0, per_model, step)]
    counts, findings = run_workers(jobs, procs=procs)
    counts = Counter(counts)
    _report(f".tflite fuzz ({', '.join(models)}; seed {seed})", counts, findings)
    assert not findings, findings[:10]
    total = sum(counts.values())
    assert total == per_model * len(models)
    outcomes = Counter(o for _, o in counts.elements())
    assert outcomes["refused"] > total // 4 and outcomes["ran"] > total // 20, outcomes
    return counts


def test_mutations_are_structure_aware_and_reproducible():
    """Every fixture yields sites of most field kinds; a mutant is a function of its numbers and
    differs from the file."""
    for name in TFLITE_MODELS:
        buf = fixture_path(name).read_bytes()
        sites = tflite_sites(buf)
        assert len(sites) >= len(TFLITE_KINDS) - 3, (name, set(TFLITE_KINDS) - set(sites))
        for i in range(30):
            kind, what, data = mutant(name, 1, i)
            assert (kind, what, data) == mutant(name, 1, i) and data != buf and kind in sites


def test_fuzz_tflite_fast_sample():
    counts = fuzz_tflite(200, seed=7, procs=2, chunks=1, models=("digits_cnn", "mlp40"))
    assert len({k for k, _ in counts}) >= 20  # most kinds of mutation drawn


@pytest.mark.slow
def test_fuzz_tflite_at_scale():
    counts = fuzz_tflite(24_000, seed=2024, procs=2, chunks=8)
    assert sum(counts.values()) >= 100_000


# --------------------------------------------------------------------------------- (b) .npz

class Evil:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64",
          "complex64", "bool", "U5", "S5", "datetime64[s]", "V4"]


def _base_samples(n: int = 6) -> dict[str, np.ndarray]:
    with np.load(Path(fixture_path("digits_cnn_floatio")).with_suffix(".npz")) as d:
        x = d["x"][:n].astype(np.float32)
    return {"x": x, "y": (np.arange(n) * 3 % 10).astype(np.int64),
            "owners": np.array([f"owner{i % 3}" for i in range(n)])}


def _npy(arr: np.ndarray, header: dict | None = None) -> bytes:
    out = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    d.update(header or {})
    np.lib.format.write_array_header_1_0(out, d)
    out.write(arr.tobytes())
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def npz_mutation(rng: random.Random, evil_marker: str) -> tuple[str, bytes]:
    """(kind, file bytes) of one mutated samples upload."""
    arrays = _base_samples(rng.randrange(1, 9))
    arrays["x"] += np.float32(rng.random() / 64)  # every upload its own bytes (its own sample ids)
    n = len(arrays["y"])
    key = rng.choice(["x", "y", "owners"])
    kind = rng.choice(["dtype", "shape", "values", "missing_key", "extra_key", "rename_key",
                       "class_names", "owners", "object_array", "zip_cut", "zip_damage", "npy_header",
                       "not_npz", "valid"])
    a = arrays[key]
    if kind == "dtype":
        try:
            arrays[key] = a.astype(rng.choice(DTYPES))
        except (TypeError, ValueError):
            arrays[key] = np.zeros(a.shape, rng.choice(DTYPES))
    elif kind == "shape":
        arrays[key] = rng.choice([
            lambda: a[None], lambda: a.reshape(-1), lambda: np.asarray(a.reshape(-1)[0]),
            lambda: a[:0], lambda: a[:max(1, n - 1)] if n > 1 else np.concatenate([a, a]),
            lambda: np.concatenate([a, a]), lambda: a.reshape(n, -1),
            lambda: np.repeat(a, 3, axis=-1) if a.ndim > 1 else a[:, None],
            lambda: np.swapaxes(a, 0, -1) if a.ndim > 1 else a[None, :]])()
    elif kind == "values":
        flat = a.reshape(-1).copy()
        if key == "x":
            flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 3e38])
        elif key == "y":
            flat = flat.astype(rng.choice([np.int64, np.float64, np.uint64]))
            value = rng.choice([-1, 10, 11, 2**40, 2**62, 255, 1.5, np.nan, -0.0, 1e300])
            try:
                flat[rng.randrange(n)] = value
            except (OverflowError, ValueError):  # -1 into uint64, NaN into int64
                flat[rng.randrange(n)] = 2**63 if flat.dtype == np.uint64 else 10
        else:
            flat[rng.randrange(n)] = rng.choice(["", " ", "\x00", "é" * 3, "a" * 5])
        arrays[key] = flat.reshape(a.shape)
    elif kind == "missing_key":
        del arrays[key]
    elif kind == "extra_key":
        arrays[rng.choice(["x_train", "y_train", "junk", "owner", "x ", "class_names", ""])] = rng.choice(
            [arrays["x"], arrays["y"], np.zeros(3), np.array("s"), np.zeros((0,))])
    elif kind == "rename_key":
        arrays[key + "_train" if key != "owners" else "owner"] = arrays.pop(key)
    elif kind == "class_names":
        arrays["class_names"] = rng.choice([
            np.array([str(i) for i in range(10)]), np.array(["a"] * 10), np.array([str(i) for i in range(3)]),
            np.array([str(i) for i in range(40)]), np.arange(10), np.zeros((2, 5)), np.array([""] * 10),
            np.array("one")])
    elif kind == "owners":
        arrays["owners"] = rng.choice([np.arange(n), np.array([b"o"] * n), np.zeros((n, 2)),
                                       np.array([""] * n), np.array(["o"] * (n + 1)), np.array("o")])
    elif kind == "object_array":
        Evil.marker = evil_marker
        obj = np.empty(n, object)
        obj[:] = [Evil() for _ in range(n)]
        arrays[key] = obj
    if kind in ("zip_cut", "zip_damage", "npy_header", "not_npz"):
        members = {f"{k}.npy": _npy(v) for k, v in arrays.items()}
        if kind == "npy_header":
            k = rng.choice(sorted(members))
            arr = arrays[k[:-4]]
            change = rng.choice([{"shape": (10**12,)}, {"shape": (2**40, 8)}, {"shape": (n * 2, 8, 8, 1)},
                                 {"shape": ()}, {"descr": "<U100000"}, {"descr": "|O"}, {"descr": "<f8"},
                                 {"fortran_order": True}, {"shape": (-1,)}, {"descr": "<i1"}])
            try:
                members[k] = _npy(arr, change)
            except ValueError:
                members[k] = _npy(arr)[:-1]
        data = _zip(members)
        if kind == "zip_cut":
            data = data[:rng.randrange(len(data))]
        elif kind == "zip_damage":
            buf = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        elif kind == "not_npz":
            data = rng.choice([b"", rng.randbytes(rng.randrange(1, 200)), _npy(arrays.get("x", np.zeros(3))),
                               b"PK\x03\x04" + rng.randbytes(50), json.dumps({"x": 1}).encode()])
        return kind, data
    out = io.BytesIO()
    (np.savez_compressed if rng.random() < 0.3 else np.savez)(out, **arrays)
    return kind, out.getvalue()


class NpzFuzzer:
    """A real store fed mutated uploads through state.import_samples, as the agent's PUT_END does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = load_tflite(fixture_path("digits_cnn"))
        self.marker = root / "unpickled"
        self.counts: Counter = Counter()
        self.findings: list = []
        self.stores = 0
        self._new_store()

    def _new_store(self) -> None:
        if self.stores:
            self.store.close()
        self.stores += 1
        d = self.root / f"store{self.stores}"
        d.mkdir()
        self.store = Store(d / "store.db", create=True)
        self.upload = self.root / "upload.npz"
        base = io.BytesIO()
        np.savez(base, **_base_samples())
        self.upload.write_bytes(base.getvalue())
        import_samples(self.store, self.model, npz=self.upload, owner=None, id_prefix="base")

    def _state(self) -> tuple:
        files = {k: v for k, v in tree_digest(self.store.path.parent).items() if not k.endswith("-shm")}
        return self.store.count(), files

    def one(self, seed: int) -> None:
        rng = random.Random(seed)
        kind, data = npz_mutation(rng, str(self.marker))
        self.upload.write_bytes(data)
        prefix = hashlib.sha256(data).hexdigest()[:32]
        owner = rng.choice([None, None, "fuzz"])
        before = self._state()
        try:
            ids = import_samples(self.store, self.model, npz=self.upload, owner=owner, id_prefix=prefix)
        except FILE_ERRORS as e:
            after = self._state()
            ok = bool(str(e)) and after == before
            outcome = "refused" if ok else "FINDING: refused but the store changed" if str(e) else "FINDING: no message"
        except Exception as e:  # noqa: BLE001 - the finding
            outcome = f"FINDING: {type(e).__name__}: {str(e)[:100]}"
        else:
            outcome = "imported" if self.store.count() == before[0] + len(ids) and ids else "FINDING: count"
        if self.marker.exists():
            outcome = "FINDING: a pickle was loaded"
            self.marker.unlink()
        self.counts[(kind, outcome.split(":")[0])] += 1
        if outcome.startswith("FINDING"):
            self.findings.append((seed, kind, outcome))
        if self.store.count() > 3000:
            self._new_store()


def fuzz_npz(tmp_path: Path, n: int, seed: int) -> Counter:
    fz = NpzFuzzer(tmp_path)
    for i in range(n):
        fz.one(seed * 10_000_019 + i)
    fz.store.close()
    _report(f".npz fuzz (seed {seed}, {fz.stores} stores)", fz.counts, fz.findings)
    assert not fz.findings, fz.findings[:10]
    assert sum(fz.counts.values()) == n
    return fz.counts


def test_fuzz_npz_fast_sample(tmp_path):
    counts = fuzz_npz(tmp_path, 300, seed=3)
    outcomes = Counter(o for _, o in counts.elements())
    assert outcomes["refused"] > 100 and outcomes["imported"] > 20, outcomes


@pytest.mark.slow
def test_fuzz_npz_at_scale(tmp_path):
    counts = fuzz_npz(tmp_path, 20_000, seed=2024)
    assert len({k for k, _ in counts}) == 14


# ------------------------------------------------------------------------- (c) label tables

SHA = hashlib.sha256(b"model").hexdigest()


def _base_table(rng: random.Random, k: int = 3, classes: int = 10) -> dict:
    similar = []
    for c in range(classes):
        others = rng.sample([o for o in range(classes) if o != c], k)
        w = [rng.random() + 0.1 for _ in others]
        similar.append([[o, x / sum(w)] for o, x in zip(others, w)])
    return {"version": 1, "class_names": [str(c) for c in range(classes)], "k": k,
            "model_sha256": SHA, "data": "fuzz", "similar": similar}


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=4), v, max_size=3),
                     max_leaves=12)


def table_mutation(rng: random.Random) -> tuple[str, bytes]:
    d = _base_table(rng)
    field = rng.choice(sorted(d))
    kind = rng.choice(["missing_field", "unknown_field", "wrong_type", "class_count", "label_range",
                       "self_or_twice", "weight", "row_len", "nesting", "huge_number", "text", "k",
                       "version_sha", "class_names", "valid"])
    c = rng.randrange(10)
    row = d["similar"][c]
    if kind == "missing_field":
        del d[field]
    elif kind == "unknown_field":
        d[rng.choice(["Version", "extra", "", "similar "])] = 1
    elif kind == "wrong_type":
        d[field] = rng.choice([None, True, 1, 1.5, "s", [], {}, [[1]], {"a": 1}, -1, 2**70])
    elif kind == "class_count":
        rng.choice([lambda: d["similar"].pop(), lambda: d["similar"].append(row),
                    lambda: d["class_names"].pop(), lambda: d["class_names"].append("x"),
                    lambda: d.update(similar=[]), lambda: d.update(class_names=["0"], similar=[row])])()
    elif kind == "label_range":
        row[rng.randrange(len(row))][0] = rng.choice([-1, 10, 11, 2**63, -(2**63), 10**30, 1.0, True,
                                                      "1", None, [1], 1e300])
    elif kind == "self_or_twice":
        row[0][0] = rng.choice([c, row[-1][0]])
    elif kind == "weight":
        row[rng.randrange(len(row))][1] = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e308,
                                                      "0.5", None, True, 5e-324, 2**1000])
    elif kind == "row_len":
        d["similar"][c] = rng.choice([[], row + row[:1], row[:1], [row], [[1]], [[1, 0.5, 3]], row * 5])
    elif kind == "nesting":
        depth = rng.choice([50, 500, 5_000, 100_000])
        d[field] = json.loads("[" * 10 + "]" * 10)
        text = json.dumps(d).replace("[[[[[[[[[[]]]]]]]]]]", "[" * depth + "]" * depth, 1)
        return kind, text.encode()
    elif kind == "huge_number":
        digits = rng.choice([20, 400, 4_301, 50_000])
        text = json.dumps(d).replace('"k": 3', '"k": ' + "9" * digits, 1)
        if rng.random() < 0.5:
            text = json.dumps(d).replace('"version": 1', '"version": 1' + "0" * digits, 1)
        return kind, text.encode()
    elif kind == "text":
        text = json.dumps(d).encode()
        return kind, rng.choice([text[:rng.randrange(len(text))], b"\xef\xbb\xbf" + text, text + b"garbage",
                                 text.replace(b"1", b"\xff", 1), b"", b"null", b"[1, 2]", b'"s"',
                                 text.replace(b'{"version": 1', b'{"version": 1, "version": 2', 1),
                                 text.replace(b"0.", b"NaN, 0.", 1), rng.randbytes(40)])
    elif kind == "k":
        d["k"] = rng.choice([0, 1, 9, 10, -1, 2, True, 3.0])
    elif kind == "version_sha":
        d[rng.choice(["version", "model_sha256"])] = rng.choice([0, 2, "1", SHA.upper(), SHA[:10], None, 1.0])
    elif kind == "class_names":
        d["class_names"][rng.randrange(10)] = rng.choice(["0", "1", 1, None, "", ["a"]])
    return kind, json.dumps(d).encode()


def check_table_file(path: Path, rng: random.Random) -> str:
    """'loaded' / 'refused' (TableError with a message) / 'FINDING: ...' for the table in ``path``."""
    try:
        table = SimilarLabelTable.load(path)
        check_table(table, rng.choice([SHA, None]), rng.choice([10, 10, 9]), allow_model_mismatch=rng.random() < 0.5)
        for mode in MODES:
            out = assign_from_table(table, np.arange(10) % table.num_classes, mode)
            assert np.all(np.isfinite(out)) and len(out) == 10
    except TableError as e:
        return "refused" if str(e) else "FINDING: no message"
    except Exception as e:  # noqa: BLE001 - the finding
        return f"FINDING: {type(e).__name__}: {str(e)[:100]}"
    return "loaded"


def fuzz_tables(tmp_path: Path, n: int, seed: int, hypothesis_examples: int) -> Counter:
    counts: Counter = Counter()
    findings: list = []
    path = tmp_path / "table.json"

    def record(kind: str, outcome: str, where) -> None:
        counts[(kind, outcome.split(":")[0])] += 1
        if outcome.startswith("FINDING"):
            findings.append((where, kind, outcome))

    for i in range(n):
        rng = random.Random(seed * 10_000_019 + i)
        kind, data = table_mutation(rng)
        path.write_bytes(data)
        record(kind, check_table_file(path, rng), seed * 10_000_019 + i)

    @settings(max_examples=hypothesis_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(["version", "class_names", "k", "model_sha256", "data", "similar",
                                  "similar.row", "similar.entry", "similar.class", "similar.weight"]),
           value=_JSON, c=st.integers(0, 9))
    def retyped(field, value, c):
        d = _base_table(random.Random(c))
        if field.startswith("similar."):
            target = {"row": lambda: d["similar"].__setitem__(c, value),
                      "entry": lambda: d["similar"][c].__setitem__(0, value),
                      "class": lambda: d["similar"][c][0].__setitem__(0, value),
                      "weight": lambda: d["similar"][c][0].__setitem__(1, value)}[field.split(".")[1]]
            target()
        else:
            d[field] = value
        path.write_text(json.dumps(d))
        record("hypothesis_retyped", check_table_file(path, random.Random(c)), (field, value, c))

    retyped()
    _report(f"similar-label table fuzz (seed {seed})", counts, findings)
    assert not findings, findings[:10]
    return counts


def test_fuzz_tables_fast_sample(tmp_path):
    counts = fuzz_tables(tmp_path, 1500, seed=5, hypothesis_examples=100)
    assert counts[("valid", "loaded")] > 30 and sum(n for (_, o), n in counts.items() if o == "refused") > 900


@pytest.mark.slow
def test_fuzz_tables_at_scale(tmp_path):
    counts = fuzz_tables(tmp_path, 40_000, seed=2024, hypothesis_examples=3000)
    assert sum(counts.values()) >= 43_000


# ------------------------------------------------------------------ regression tests (findings)
# Each is one mutant the fuzzers found, written out (fixture, byte position, format, new value) so
# it stays the same mutant whatever the generators become.

def _patched(name: str, pos: int, fmt: str, value) -> bytes:
    buf = bytearray(fixture_path(name).read_bytes())
    struct.pack_into(fmt, buf, pos, value)
    return bytes(buf)


# (fixture, byte position, struct format, value there, value written, what it did before the fix,
#  where it is refused now, what the ModelError says)
MODEL_FINDINGS = [
    # subgraph outputs name a tensor no op computes: forward() raised KeyError (graph.py)
    ("digits_cnn", 7588, "<i", 17, 4, "KeyError: the output is a bias", "load", "is a constant or an input"),
    ("mlp40", 8712, "<I", 1, 2, "KeyError: outputs' length 1 -> 2, a constant next", "load", "is a constant or an input"),
    ("digits_cnn_floatio", 7676, "<i", 19, 0, "KeyError: the output is the model's input", "load",
     "is a constant or an input"),
    # a conv's bias swapped for a shorter one: the compiled loop read and wrote past its end
    ("mobilenet_tiny", 13316, "<i", 14, 4, "free(): invalid next size (SIGABRT)", "load",
     r"bias .* expected \[64\]"),
    ("mobilenet_tiny", 13124, "<i", 8, 16, "corrupted size vs. prev_size (SIGABRT)", "load",
     r"bias .* expected \[96\]"),
    # a dimension of 2**24 + 1 or 1,955,895,372: MemoryError (add.py) asking for 1 TiB / 21.9 TiB
    ("resnet_tiny", 23196, "<i", 1, 16777217, "MemoryError (add.py)", "load", "holds over 2 GiB"),
    ("mobilenet_tiny", 14548, "<i", 1, 1955895372, "MemoryError (add.py)", "load", "holds over 2 GiB"),
    # an op's outputs vector length 1 -> 2 (its second output: whatever int32 follows)
    ("digits_cnn", 7076, "<I", 1, 2, "an int8 (10,) output, declared (2, 10)", "run",
     "lists 2 outputs, but its kernel makes 1"),
    ("mlp40", 8612, "<I", 1, 2, "ValueError: cannot reshape array (fully_connected.py)", "run", "lists 2 outputs"),
    ("digits_cnn", 7472, "<I", 1, 2, "numba TypingError: wrong tuple length", "run", "lists 2 outputs"),
    # a bias -> another tensor: of another dtype or shape
    ("mlp40", 8708, "<i", 5, 0, "numba TypingError: no implementation for int32", "load",
     "input 2 .* expected int32"),
    ("digits_cnn", 7096, "<i", 4, 7, "numba TypingError", "load", "input 2 .* expected int32"),
    ("digits_cnn", 7580, "<i", 8, 3, "IndexError: tuple index out of range (gemm.py)", "load",
     r"bias .* has shape \[\]"),
    ("digits_cnn", 7492, "<i", 6, 5, "ValueError: could not broadcast (gemm.py)", "load", "input 2 .* expected int32"),
    # an op's inputs vector length 3 -> 4: an extra input
    ("digits_cnn", 7568, "<I", 3, 4, "TypeError: forward() takes from 3 to 4 positional arguments", "run",
     "do not fit the op .TypeError"),
    # a filter scale of 1e-38 / 1.4e-45: multipliers out of int32's range
    ("mobilenet_tiny", 16684, "<f", 0.0008541301358491182, 1e-38, "OverflowError / TypingError (depthwise.py)", "run",
     "do not fit the op"),
    ("mobilenet_tiny", 14648, "<f", 6.013856909703463e-05, 1.401298464324817e-45, "OverflowError (depthwise.py)", "run",
     "do not fit the op .OverflowError"),
    # a vtable entry of a conv's options 10 -> 20: its dilation read from another field
    ("resnet_tiny", 21778, "<H", 10, 20, "MemoryError: allocation failed (conv.py)", "run",
     "do not fit the op .MemoryError"),
]


@pytest.mark.parametrize("name,pos,fmt,old,new,was,stage,message", MODEL_FINDINGS,
                         ids=[f"{m[0]}-{m[1]}-{m[4]}" for m in MODEL_FINDINGS])
def test_regression_malformed_models_are_model_errors(name, pos, fmt, old, new, was, stage, message):
    """Each mutant the .tflite fuzzer found crashing the worker or raising something else (``was``)
    is now a ModelError naming what is wrong: at load, or at the forward pass (naming the op)."""
    assert struct.unpack_from(fmt, fixture_path(name).read_bytes(), pos)[0] == pytest.approx(old, rel=1e-6)
    data = _patched(name, pos, fmt, new)
    if stage == "load":
        with pytest.raises(ModelError, match=message):
            load_tflite(data)
    else:
        model = load_tflite(data)
        with pytest.raises(ModelError, match=r"op [A-Z_0-9]+ \(index \d+\)") as e:
            model.forward(valid_input(name))
        assert re.search(message, str(e.value)), (was, str(e.value))
    assert outcome_of(data, name)[0] == ("refused" if stage == "load" else "run_refused")


def outcome_of(data: bytes, name: str) -> tuple[str, str]:
    return check_mutant(data, valid_input(name))


def test_regression_sample_upload_with_huge_features_saturates_with_the_right_sign(tmp_path):
    """Was: x = +-1e30 quantized through an int64 cast that overflows (x86: INT64_MIN whatever the
    sign), so -1e30 was stored as 127 and 1e30 as -128 or 127 (quant.quantize)."""
    arrays = _base_samples(4)
    arrays["x"][0, 0, 0, 0], arrays["x"][1, 0, 0, 0], arrays["x"][2, 0, 0, 0] = 1e30, -1e30, 3e38
    path = tmp_path / "up.npz"
    np.savez(path, **arrays)
    store = Store(tmp_path / "store.db", create=True)
    ids = import_samples(store, load_tflite(fixture_path("digits_cnn")), npz=path)
    x, _ = store.load(ids)
    assert [int(x[i, 0, 0, 0]) for i in range(3)] == [127, -128, 127]
    store.close()


@pytest.mark.parametrize("kind,text", ids=["huge_int", "deep_nesting"], argvalues=[
    ("an int of 4,301 digits", '{"version": 1, "class_names": ["a", "b"], "k": ' + "9" * 4301 +
     ', "similar": [[[1, 1.0]], [[0, 1.0]]]}'),
    ("arrays 100,000 deep", '{"version": 1, "class_names": ["a", "b"], "k": 1, "similar": ' +
     "[" * 100_000 + "]" * 100_000 + "}"),
])
def test_regression_table_json_that_python_cannot_parse_is_a_table_error(tmp_path, kind, text):
    """Was: ValueError (int string conversion limit) / RecursionError out of SimilarLabelTable.load,
    which the forget path (it catches TableError) did not turn into a refusal."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(TableError, match="not a JSON similar-label table"):
        SimilarLabelTable.load(path)


def test_regression_a_batch_dimension_of_65536_is_refused_before_any_gather_table():
    """Found by the slow tier's .tflite fuzzer as a hang under load: resnet_tiny with an ADD input's
    dimension 1 -> 65536 built a gather table of 2^27 entries (4.7 s alone, over 60 s on a busy
    machine) before the shapes were refused; the shapes are now checked first."""
    kind, what, data = mutant("resnet_tiny", 2024, 14267)
    assert kind == "tensor_shape" and "65536" in what
    with pytest.raises(ModelError, match="does not broadcast to one sample"):
        load_tflite(data)
