"""Power cuts at every step of a device's life (tests/crashsim.py): push a model and activate it,
push a table, push samples (interrupted, resumed) and import them, forget an owner, commit (the
store's secure delete), forget another and roll back, push a model nothing uses and collect garbage.
For each prefix of the clean run's file operations and SQLite's writes, and each way the disk may
hold it, the state directory recovers, keeps its invariants, resumes the uploads and commits a new job.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path
from crashsim import VARIANTS, RecordingOps, Replayer
from edge_qmul import datasets
from edge_qmul.fsutil import sha256_file
from edge_qmul.jobs import ForgetJob
from edge_qmul.state import StateDir
from edge_qmul.store import Store
from firmware_bridge.device import Agent
from firmware_bridge.frames import MsgType
from firmware_bridge.transfer import TransferArea

OWNER, ROLLED = "user3", "user4"  # forgotten and committed; forgotten and rolled back
CHUNK = 2048
SAMPLE_POINTS = 50  # cut points in the fast tier; the slow tier runs every one
SUBDIRS = {"model": ("models", ".tflite"), "table": ("tables", ".json"), "samples": ("samples", ".npz")}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _push(area: TransferArea, kind: str, data: bytes, stop_after: int | None = None) -> bool:
    """What the host's put() makes the device do (PUT_BEGIN, PUT_CHUNKs from the device's offset,
    PUT_END); ``stop_after`` chunks: the link drops there. True when the upload was installed."""
    sha = hashlib.sha256(data).hexdigest()
    offset = area.begin({"kind": kind, "sha256": sha, "size": len(data)})["offset"]
    held = area.state.part_size(sha)
    assert offset in (len(data), held) and data.startswith(data[:offset])  # a verifiable resume point
    sent = 0
    while offset < len(data):
        if stop_after is not None and sent == stop_after:
            return False
        offset = area.chunk({"sha256": sha, "offset": offset, "data": data[offset:offset + CHUNK]})["offset"]
        sent += 1
    area.end({"kind": kind, "sha256": sha})
    return True


def _other_model(ds) -> bytes:
    """A second model for the same input: the old one fine-tuned for an epoch, in a scratch dir."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, StateDir(tmp) as state:
        state.activate(state.add("model", fixture_path("digits_cnn").read_bytes()))
        owners = np.array(["other", "kept"] * 50)
        state.import_samples(state.add("samples", _npz(x=ds.x_train[300:400], y=ds.y_train[300:400],
                                                       owners=owners)))
        job = state.new_job({"owner": "other"}, "ft", {"epochs": 1, "seed": 7})
        state.run_job(job, warn=lambda m: None)
        return state.path("model", job.certificate["model_after_sha256"]).read_bytes()


class RenameBeforeFsync(RecordingOps):
    """A deliberately broken ordering: atomic_write renames the temp file before its fsync."""

    def atomic_write(self, path, data):
        path = Path(path)
        tmp = path.parent / f".{path.name}.broken.tmp"
        self.write(tmp, data)
        self.rename(tmp, path)
        self.fsync(path)
        self.fsync_dir(path.parent)
        return path


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """(initial directory, trace, facts): a clean run recorded from a directory holding the old model
    and 200 samples of 8 owners."""
    return _record(tmp_path_factory.mktemp("crash"), RecordingOps)


def _record(root: Path, recorder: type[RecordingOps], synchronous: str | None = None):
    ds = datasets.load("digits", seed=0)
    initial = root / "initial"
    owners = np.array([f"user{i % 8}" for i in range(200)])
    with StateDir(initial) as state:
        old = state.add("model", fixture_path("digits_cnn").read_bytes())
        state.activate(old)
        state.import_samples(state.add("samples", _npz(x=ds.x_train[:200], y=ds.y_train[:200],
                                                       owners=owners)))
        with state.store() as s:
            ids = s.select(owner=OWNER)
            x_owner = s.load(ids)[0]
            x_all = np.concatenate([s.load(s.select(owner=o))[0] for o in s.owners()])
            rolled_n = s.count(owner=ROLLED)
    others = {row.tobytes() for row in x_all} - {row.tobytes() for row in x_owner}
    # the owner's samples as the store keeps them, and as the upload carried them
    secrets = [row.tobytes() for row in x_owner if row.tobytes() not in others]
    secrets += [row.tobytes() for row in ds.x_train[:200][owners == OWNER]]
    (initial / "lock").unlink()
    new_model = _other_model(ds)
    spare = fixture_path("mlp40").read_bytes()
    table = json.dumps({"similar": {str(c): [(c + 1) % 10] for c in range(10)}}).encode()
    val = _npz(x=ds.x_train[200:260], y=ds.y_train[200:260])
    run = root / "run"
    shutil.copytree(initial, run)
    ops = recorder(run)
    with ops.recording_sqlite(synchronous), StateDir(run, ops=ops) as state:
        area = TransferArea(state)
        ops.phase = "push-model"
        _push(area, "model", new_model)
        state.activate(hashlib.sha256(new_model).hexdigest())
        ops.phase = "push-table"
        _push(area, "table", table)
        ops.phase = "push-samples"
        assert not _push(area, "samples", val, stop_after=2)  # the link drops ...
        assert _push(area, "samples", val)                     # ... and the upload resumes
        state.import_samples(hashlib.sha256(val).hexdigest(), owner="holdout", role="validation")
        ops.phase = "forget"
        job = state.new_job({"owner": OWNER}, "ft", {"epochs": 1, "seed": 0})
        state.run_job(job, warn=lambda m: None)
        ops.phase = "commit"
        cert = state.commit_job(job)
        ops.phase = "rollback"
        rolled = state.new_job({"owner": ROLLED}, "ft", {"epochs": 1, "seed": 1})
        state.run_job(rolled, warn=lambda m: None)
        state.rollback_job(rolled)
        ops.phase = "gc"
        _push(area, "model", spare)
        state.collect_garbage()
        assert not state.path("model", hashlib.sha256(spare).hexdigest()).exists()
    facts = {"models": (old, hashlib.sha256(new_model).hexdigest()), "new": cert["model_after_sha256"],
             "forget": job.job_id, "total": 200 + 60, "owner_n": len(ids), "rolled": rolled.job_id, "rolled_n": rolled_n, "secrets": secrets,
             "uploads": [("model", new_model), ("table", table), ("samples", val), ("model", spare)]}
    return initial, ops.trace, facts


def _check_files(state_dir: Path, facts: dict, committed: bool, where: str) -> None:
    assert not list(state_dir.rglob(".*.tmp")), where  # no temp file is left to pass for data
    for kind, (sub, ext) in SUBDIRS.items():  # content-addressed: a name is its bytes' hash
        for path in (state_dir / sub).glob(f"*{ext}"):
            assert sha256_file(path) == path.stem, f"{where}: {sub}/{path.name} does not hash to its name"
    for _, data in facts["uploads"]:
        part = state_dir / "incoming" / f"{hashlib.sha256(data).hexdigest()}.part"
        if part.exists():
            assert data.startswith(part.read_bytes()), where  # a resume offset that verifies
    for path in (state_dir / "jobs").glob("*.json"):
        ForgetJob.from_dict(json.loads(path.read_text()))  # every job file whole
    if committed:  # secure delete: none of the owner's bytes anywhere in the directory
        for path in state_dir.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert not any(s in blob for s in facts["secrets"]), f"{where}: {path.name} keeps {OWNER}'s data"


def _agent_push(agent: Agent, kind: str, data: bytes, **end_fields) -> dict:
    """The host's put() against the agent's handlers: PUT_BEGIN, PUT_CHUNKs from its offset, PUT_END."""
    sha = hashlib.sha256(data).hexdigest()
    begin = agent.handle(MsgType.PUT_BEGIN, {"kind": kind, "sha256": sha, "size": len(data)})
    offset = begin["offset"]
    assert offset == (len(data) if begin["complete"] else agent.dir.part_size(sha))  # resumes where it verifies
    while offset < len(data):
        body = {"sha256": sha, "offset": offset, "data": data[offset:offset + CHUNK]}
        offset = agent.handle(MsgType.PUT_CHUNK, body)["offset"]
    return agent.handle(MsgType.PUT_END, {"kind": kind, "sha256": sha, **end_fields})


def _agent_job(agent: Agent, selector: dict) -> dict:
    """FORGET, JOB_STATUS until it ends, COMMIT: the certificate."""
    job_id = agent.handle(MsgType.FORGET, {"selector": selector, "method": "ft",
                                           "params": {"epochs": 1, "seed": 1}})["job_id"]
    deadline = time.monotonic() + 120
    while agent.handle(MsgType.JOB_STATUS, {"job_id": job_id})["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the new job did not end"
        time.sleep(0.005)
    return agent.handle(MsgType.COMMIT, {"job_id": job_id})["certificate"]


def _check(state_dir: Path, facts: dict, where: str, finish: bool) -> None:
    """Start the agent on the cut state (its start-up recovery), check the invariants; with
    ``finish``, the host resumes its uploads and a new forget job runs and commits."""
    agent = Agent(state_dir, threads=1)
    try:
        state = agent.dir
        with Store(state.store_path) as s:  # the full check: integrity, row digests, the audit chain
            s.verify()
            active = s.active_model
            held, rolled_held = s.count(owner=OWNER), s.count(owner=ROLLED)
            holdout = s.count(owner="holdout")
            requests = {r["id"]: r for r in s.requests()}
            audited = [a for a in s.audit_log() if a["event"] == "forget_committed"]
        committed = requests.get(facts["forget"], {}).get("status") == "committed"
        assert sha256_file(state.path("model", active)) == active, where
        assert sha256_file(state.current) == active, where
        # the owner's samples exist exactly when the commit did not happen; the audit log says so
        assert (held == 0) == committed == (active == facts["new"]), where
        assert [a["request_id"] for a in audited] == ([facts["forget"]] if committed else []), where
        assert committed or active in facts["models"], where
        assert rolled_held == facts["rolled_n"], where  # a rolled-back job deletes nothing
        assert requests.get(facts["rolled"], {}).get("status") != "committed", where
        assert holdout in (0, 60), where  # an import is whole or absent
        _check_files(state_dir, facts, committed, where)
        for job in state.jobs.values():
            assert job.status in ("failed", "done", "committed", "rolled_back"), where
            # the job file and the store agree on what was committed and rolled back
            store_status = requests.get(job.job_id, {}).get("status")
            assert (job.status == "committed") == (store_status == "committed"), where
            assert job.status != "rolled_back" or store_status == "rolled_back", where
        if finish:
            for kind, data in facts["uploads"]:
                fields = {"owner": "holdout", "role": "validation"} if kind == "samples" else {}
                _agent_push(agent, kind, data, **fields)
            assert agent.handle(MsgType.INFO, {})["samples"] == facts["total"] - (facts["owner_n"] if committed else 0), where
            for job in state.open_jobs():  # a finished, uncommitted job is decided first
                agent.handle(MsgType.ROLLBACK, {"job_id": job.job_id})
            cert = _agent_job(agent, {"owner": "user5"})
            assert sha256_file(state.current) == cert["model_after_sha256"], where
    finally:
        agent.close()


def _cuts(trace) -> list[tuple[int, bool, bool]]:
    return [(k, r, t) for k in range(len(trace) + 1) for r, t in VARIANTS]


def _run_cuts(lifecycle, tmp_path, cuts, finish_every: int) -> dict:
    """Check each cut; print and return "k of N recovered" per operation kind and per phase."""
    initial, trace, facts = lifecycle
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_phase: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    seen: dict[str, str | None] = {}  # state digest -> failure (None: recovered)
    failures, replay = [], Replayer(initial, trace)
    for n, (k, renames, tear) in enumerate(cuts):
        step = trace[k - 1] if k else None
        label, phase = (step.label, step.phase) if step else ("start", "start")
        where = (f"cut after step {k} ({phase}, {label} {step.path if step else ''}), "
                 f"renames_reached={renames}, torn={tear}")
        digest = replay.cut(k, renames, tear, tmp_path / "cut")
        finish = n % finish_every == 0
        if digest not in seen or (finish and seen[digest] == "unfinished"):
            try:
                _check(tmp_path / "cut", facts, where, finish)
                seen[digest] = None if finish else "unfinished"
            except Exception as e:  # noqa: BLE001 - every cut is reported, not only the first
                seen[digest] = f"{where}: {type(e).__name__}: {e}"
        for table, key in ((by_kind, label), (by_phase, phase)):
            table[key][1] += 1
            if seen[digest] in (None, "unfinished"):
                table[key][0] += 1
        if seen[digest] not in (None, "unfinished") and seen[digest] not in failures:
            failures.append(seen[digest])
    total = sum(n for _, n in by_kind.values())
    ok = sum(o for o, _ in by_kind.values())
    print(f"\n{ok} of {total} cut points recovered ({len(seen)} distinct disk states)")
    for name, table in (("operation", by_kind), ("phase", by_phase)):
        print(f"  by {name}: " + ", ".join(f"{k}: {o} of {n}" for k, (o, n) in sorted(table.items())))
    return by_kind, failures


def _assert_recovered(lifecycle, tmp_path, cuts, finish_every: int) -> dict:
    by_kind, failures = _run_cuts(lifecycle, tmp_path, cuts, finish_every)
    assert not failures, f"{len(failures)} failed; first failures:\n" + "\n".join(failures[:5])
    return by_kind


def test_lifecycle_trace_counts_every_kind_of_step(lifecycle):
    """The recording saw each lifecycle phase and SQLite's own WAL writes, fsyncs and checkpoints."""
    _, trace, _ = lifecycle
    labels = collections.Counter(s.label for s in trace)
    phases = {s.phase for s in trace}
    assert phases == {"open", "push-model", "push-table", "push-samples", "forget", "commit", "rollback", "gc"}
    for label in ("ops:write", "ops:fsync", "ops:rename", "ops:unlink", "ops:fsync_dir",
                  "sqlite:write", "sqlite:fsync"):
        assert labels[label] > 0, (label, labels)
    wal_writes = [s for s in trace if s.source == "sqlite" and s.path == "store.db-wal" and s.data]
    assert wal_writes and all(s.data[:4] in (b"7\x7f\x06\x82", b"7\x7f\x06\x83") for s in wal_writes)


def test_power_cut_sample_recovers(lifecycle, tmp_path):
    """50 cut points spread over the trace and the four disk variants; every fifth then resumes the
    uploads and commits a new job."""
    _, trace, _ = lifecycle
    every = _cuts(trace)
    step = max(1, len(every) // SAMPLE_POINTS)
    _assert_recovered(lifecycle, tmp_path, every[::step][:SAMPLE_POINTS], finish_every=5)


@pytest.mark.slow
def test_power_cut_at_every_step_recovers(lifecycle, tmp_path):
    """Every prefix of the trace, every variant (N >= 1,000), each distinct state followed by resumed
    uploads and a new job that commits: k of N recovered per operation kind, k = N."""
    _, trace, _ = lifecycle
    results = _assert_recovered(lifecycle, tmp_path, _cuts(trace), finish_every=1)
    assert sum(n for _, n in results.values()) >= 1000


@pytest.mark.slow
def test_power_cut_catches_a_rename_before_fsync(tmp_path):
    """The simulator is not blind: with atomic_write's rename moved before its fsync, cuts leave
    files that are empty or do not hash to their name, and the report says where."""
    broken = _record(tmp_path / "rec", RenameBeforeFsync)
    by_kind, failures = _run_cuts(broken, tmp_path, _cuts(broken[1]), finish_every=1)
    print("\n".join(failures[:3]))
    assert failures and sum(o for o, _ in by_kind.values()) < sum(n for _, n in by_kind.values())


@pytest.mark.slow
def test_power_cut_catches_sqlite_without_fsync(tmp_path):
    """SQLite's writes are counted, not assumed durable: with the store's connections at
    ``PRAGMA synchronous = OFF`` a cut loses a commit the job file already reports."""
    broken = _record(tmp_path / "rec", RecordingOps, synchronous="OFF")
    by_kind, failures = _run_cuts(broken, tmp_path, _cuts(broken[1]), finish_every=1)
    print("\n".join(failures[:3]))
    assert failures and sum(o for o, _ in by_kind.values()) < sum(n for _, n in by_kind.values())
