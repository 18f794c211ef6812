"""Power cuts at every step of a device's update (tests/crashsim.py): upload a table and samples,
import the samples, run a forget job, commit. For each prefix of the clean run's file operations and
each way the disk may hold it, the state directory recovers and keeps its invariants."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path
from crashsim import VARIANTS, RecordingOps, disk_after
from edge_qmul import datasets
from edge_qmul.fsutil import sha256_file
from edge_qmul.jobs import ForgetJob
from edge_qmul.state import StateDir
from edge_qmul.store import Store

OWNER = "user3"
SAMPLE_POINTS = 50  # cut points (x variants) in the fast tier; the slow tier runs every one


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _upload(state: StateDir, kind: str, data: bytes, chunk: int = 4096) -> str:
    """What PUT_BEGIN / PUT_CHUNK / PUT_END do on the device."""
    sha = hashlib.sha256(data).hexdigest()
    for offset in range(0, len(data), chunk):
        state.append_part(sha, data[offset:offset + chunk])
    state.install_part(kind, sha)
    return sha


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """(initial directory, trace, facts): a clean run recorded from a directory holding the old model
    and 200 samples of 8 owners."""
    root = tmp_path_factory.mktemp("crash")
    ds = datasets.load("digits", seed=0)
    initial = root / "initial"
    with StateDir(initial) as state:
        old = state.add("model", fixture_path("digits_cnn").read_bytes())
        state.activate(old)
        owners = np.array([f"user{i % 8}" for i in range(200)])
        sha = state.add("samples", _npz(x=ds.x_train[:200], y=ds.y_train[:200], owners=owners))
        state.import_samples(sha)
    (initial / "lock").unlink()
    run = root / "run"
    shutil.copytree(initial, run)
    ops = RecordingOps(run)
    val = _npz(x=ds.x_train[200:260], y=ds.y_train[200:260])
    table = fixture_path("digits_cnn").read_bytes()[:1000]  # any bytes: only its upload is under test
    with StateDir(run, ops=ops) as state:
        table_sha = _upload(state, "table", table)
        val_sha = _upload(state, "samples", val)
        state.import_samples(val_sha, owner="holdout", role="validation")
        job = state.new_job({"owner": OWNER}, "ft", {"epochs": 1, "seed": 0})
        state.run_job(job, warn=lambda m: None)
        cert = state.commit_job(job)
    ops.finish()
    facts = {"old": old, "new": cert["model_after_sha256"], "uploads": {table_sha: table, val_sha: val}}
    return initial, ops.trace, facts


def _check(state_dir: Path, facts: dict, where: str, new_job: bool) -> None:
    """The invariants after recovery; with ``new_job``, a new forget job then runs and commits."""
    with StateDir(state_dir) as state:
        assert not list(state_dir.rglob(".*.tmp")), where
        with Store(state.store_path) as s:
            s.verify()
            active = s.active_model
            held = s.count(owner=OWNER)
            committed = any(r["status"] == "committed" for r in s.requests())
        assert active in (facts["old"], facts["new"]), where
        assert sha256_file(state.path("model", active)) == active, where
        assert sha256_file(state.current) == active, where
        # the forgotten owner's samples exist exactly when the commit did not happen
        assert (held > 0) == (active == facts["old"]) == (not committed), where
        for sha, data in facts["uploads"].items():
            for kind in ("table", "samples"):
                if state.path(kind, sha).exists():
                    assert sha256_file(state.path(kind, sha)) == sha, where  # never an unverified file
            part = state_dir / "incoming" / f"{sha}.part"
            if part.exists():
                assert data.startswith(part.read_bytes()), where  # a resume offset that verifies
        for kind in ("model", "table", "samples"):  # content-addressed: a name is its bytes' hash
            sub, ext = {"model": ("models", ".tflite"), "table": ("tables", ".json"),
                        "samples": ("samples", ".npz")}[kind]
            for path in (state_dir / sub).glob(f"*{ext}"):
                assert sha256_file(path) == path.stem, f"{where}: {sub}/{path.name} does not hash to its name"
        for path in (state_dir / "jobs").glob("*.json"):
            ForgetJob.from_dict(json.loads(path.read_text()))  # every job file whole
        for job in state.jobs.values():
            assert job.status in ("failed", "done", "committed", "rolled_back"), where
        if new_job:
            for job in state.open_jobs():  # a finished, uncommitted job is decided first
                state.rollback_job(job)
            job = state.new_job({"owner": "user5"}, "ft", {"epochs": 1, "seed": 1})
            state.run_job(job, warn=lambda m: None)
            cert = state.commit_job(job)
            assert sha256_file(state.current) == cert["model_after_sha256"], where


def _cuts(trace) -> list[tuple[int, bool, bool]]:
    return [(k, r, t) for k in range(len(trace) + 1) for r, t in VARIANTS]


def _report(results: dict) -> str:
    return ", ".join(f"{kind}: {ok} of {n}" for kind, (ok, n) in sorted(results.items()))


def _run_cuts(lifecycle, tmp_path, cuts, new_job_every: int) -> dict:
    initial, trace, facts = lifecycle
    results: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    failures = []
    for n, (k, renames, torn) in enumerate(cuts):
        kind = trace[k - 1].kind if k else "start"
        where = f"cut after step {k} ({kind}), renames_reached={renames}, torn={torn}"
        out = disk_after(initial, trace, k, tmp_path / "cut", renames, torn)
        results[kind][1] += 1
        try:
            _check(out, facts, where, new_job=n % new_job_every == 0)
            results[kind][0] += 1
        except Exception as e:  # noqa: BLE001 - every cut is reported, not only the first
            failures.append(f"{where}: {type(e).__name__}: {e}")
    total = sum(n for _, n in results.values())
    ok = sum(o for o, _ in results.values())
    print(f"{ok} of {total} cut points recovered ({_report(results)})")
    assert not failures, f"{ok} of {total} recovered; first failures:\n" + "\n".join(failures[:5])
    return results


def test_power_cut_sample_recovers(lifecycle, tmp_path):
    """50 cut points spread over the trace and the four disk variants; every fifth then runs and
    commits a new job."""
    _, trace, _ = lifecycle
    every = _cuts(trace)
    step = max(1, len(every) // SAMPLE_POINTS)
    _run_cuts(lifecycle, tmp_path, every[::step][:SAMPLE_POINTS], new_job_every=5)


@pytest.mark.slow
def test_power_cut_at_every_step_recovers(lifecycle, tmp_path):
    """Every prefix of the trace, every variant, each followed by a new job that commits: k of N
    recovered per operation kind, k = N."""
    _, trace, _ = lifecycle
    results = _run_cuts(lifecycle, tmp_path, _cuts(trace), new_job_every=1)
    assert sum(n for _, n in results.values()) >= 100
