"""The state directory's one owner: the agent's commit and `edge-qmul unlearn --state --commit` leave
the same tree; the directory's lock; content addressing; every write through the FileOps layer."""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path
from edge_qmul import cli, datasets
from edge_qmul.fsutil import FileOps, sha256_file
from edge_qmul.state import StateDir, StateError
from firmware_bridge.device import Agent
from firmware_bridge.frames import MsgType

OWNER = "user3"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _populate(root: Path) -> None:
    """The digits model active and 400 train samples of 8 owners plus 80 validation samples,
    through the same calls the agent's PUT_END makes."""
    ds = datasets.load("digits", seed=0)
    owners = np.array([f"user{i % 8}" for i in range(400)])
    with StateDir(root) as state:
        state.activate(state.add("model", fixture_path("digits_cnn").read_bytes()))
        train = state.add("samples", _npz(x=ds.x_train[:400], y=ds.y_train[:400], owners=owners))
        assert state.import_samples(train) == 400
        val = state.add("samples", _npz(x=ds.x_train[400:480], y=ds.y_train[400:480]))
        assert state.import_samples(val, owner="holdout", role="validation") == 80


def _tree(root: Path, job_id: str) -> dict[str, str]:
    """Relative path -> content digest, with the job's random id named <job>; the job file and the
    store are compared by what they say (their ids and times differ), not by their bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir() or path.name.startswith("store.db"):
            continue
        rel = str(path.relative_to(root)).replace(job_id, "<job>")
        out[rel] = "job" if rel.startswith("jobs/") else sha256_file(path)
    return out


def _store_view(state: StateDir) -> dict:
    with state.store() as s:
        s.verify()
        return {"active": s.active_model, "count": s.count(), "owners": s.owners(),
                "requests": [(r["status"], r["method"]) for r in s.requests()]}


def test_cli_and_agent_commit_leave_the_same_state_directory(tmp_path):
    """One forget of an owner, committed through the agent (FORGET, JOB_STATUS, COMMIT) in one
    state directory and through `edge-qmul unlearn --state DIR --commit` in a copy of it: the same
    files, byte for byte (models, samples, tables, current.tflite), the same store contents, both job
    files committed with the same certificate fields."""
    via_agent, via_cli = tmp_path / "agent", tmp_path / "cli"
    _populate(via_agent)
    _populate(via_cli)
    params = {"epochs": 2, "seed": 0}

    agent = Agent(via_agent, threads=1)
    try:
        job_a = agent.handle(MsgType.FORGET, {"selector": {"owner": OWNER}, "method": "ft", "params": params})["job_id"]
        deadline = time.monotonic() + 600
        while agent.handle(MsgType.JOB_STATUS, {"job_id": job_a})["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the agent's job did not finish"
            time.sleep(0.05)
        agent.handle(MsgType.COMMIT, {"job_id": job_a})
    finally:
        agent.close()

    assert cli.main(["unlearn", "--state", str(via_cli), "--owner", OWNER, "--method", "ft",
                     "--epochs", "2", "--seed", "0", "--commit"]) == 0
    [job_file_cli] = (via_cli / "jobs").glob("*.json")
    job_c = job_file_cli.stem

    tree_a, tree_c = _tree(via_agent, job_a), _tree(via_cli, job_c)
    assert tree_a == tree_c
    assert "current.tflite" in tree_a and "jobs/<job>.json" in tree_a and "jobs/<job>.ids" not in tree_a
    with StateDir(via_agent) as a, StateDir(via_cli) as c:
        view_a, view_c = _store_view(a), _store_view(c)
        assert view_a == view_c and OWNER not in view_a["owners"]
        assert tree_a["current.tflite"] == view_a["active"]
    cert_a = json.loads((via_agent / "jobs" / f"{job_a}.json").read_text())
    cert_c = json.loads(job_file_cli.read_text())
    assert cert_a["status"] == cert_c["status"] == "committed"
    same = ("model_before_sha256", "model_after_sha256", "forgotten_sample_id_hashes", "n_forgotten",
            "method", "params", "committed", "steps")
    assert {k: cert_a["certificate"][k] for k in same} == {k: cert_c["certificate"][k] for k in same}


def test_state_directory_is_held_by_one_process_at_a_time(tmp_path):
    """A second opener (a CLI run beside a serving agent) is refused with a clear error, changing
    nothing; after close the directory opens again."""
    first = StateDir(tmp_path / "s")
    try:
        with pytest.raises(StateError, match="open in another process"):
            StateDir(tmp_path / "s")
        assert cli.main(["unlearn", "--state", str(tmp_path / "s"), "--owner", "x"]) == 2
    finally:
        first.close()
    StateDir(tmp_path / "s").close()


class RecordingOps(FileOps):
    """Records every primitive step, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []

    def write(self, path, data, mode="wb"):
        self.steps.append(("write", Path(path).name))
        super().write(path, data, mode)

    def fsync(self, path):
        self.steps.append(("fsync", Path(path).name))
        super().fsync(path)

    def rename(self, src, dst):
        self.steps.append(("rename", Path(dst).name))
        super().rename(src, dst)

    def unlink(self, path):
        self.steps.append(("unlink", Path(path).name))
        super().unlink(path)

    def fsync_dir(self, directory):
        self.steps.append(("fsync_dir", Path(directory).name))
        super().fsync_dir(directory)


def test_every_write_goes_through_the_file_operations_layer(tmp_path):
    """Adding and activating a model: each file lands by write, fsync, rename, fsync of its
    directory, in that order; content addressing stores a file once."""
    ops = RecordingOps()
    data = fixture_path("digits_cnn").read_bytes()
    with StateDir(tmp_path / "s", ops=ops) as state:
        sha = state.add("model", data)
        assert sha == sha256_file(fixture_path("digits_cnn"))
        assert [k for k, _ in ops.steps] == ["write", "fsync", "rename", "fsync_dir"]
        assert ops.steps[2] == ("rename", f"{sha}.tflite") and ops.steps[3] == ("fsync_dir", "models")
        assert state.add("model", data) == sha and len(ops.steps) == 4  # already there: nothing written
        state.activate(sha)
        assert ops.steps[-2:] == [("rename", "current.tflite"), ("fsync_dir", "s")]
        assert (tmp_path / "s" / "current.tflite").read_bytes() == data
        with pytest.raises(StateError, match="no such file"):
            state.resolve("models/nothing.tflite")
        with pytest.raises(StateError, match="unknown file"):
            state.resolve("../store.db")


def test_an_imported_upload_leaves_no_copy_of_the_samples(tmp_path):
    """Regression (found by the power-cut simulator's secure-delete check): samples/<sha>.npz stayed
    after its import, so a committed forget left the person's raw samples on the device. The upload
    is deleted once the store holds it; pushing it again is "complete" and imports nothing twice;
    after the commit no file in the directory holds the owner's samples."""
    from firmware_bridge.transfer import TransferArea

    ds = datasets.load("digits", seed=0)
    owners = np.array([f"user{i % 8}" for i in range(400)])
    data = _npz(x=ds.x_train[:400], y=ds.y_train[:400], owners=owners)
    raw = [row.tobytes() for row in ds.x_train[:400][owners == OWNER]]
    with StateDir(tmp_path) as state:
        state.activate(state.add("model", fixture_path("digits_cnn").read_bytes()))
        sha = state.add("samples", data)
        assert state.import_samples(sha) == 400
        assert not state.path("samples", sha).exists() and state.has("samples", sha)
        begin = TransferArea(state).begin({"kind": "samples", "sha256": sha, "size": len(data)})
        assert begin == {"offset": len(data), "complete": True}
        assert TransferArea(state).end({"kind": "samples", "sha256": sha})["sha256"] == sha
        assert state.import_samples(sha) == 400
        with state.store() as s:
            assert s.count() == 400
        job = state.new_job({"owner": OWNER}, "ft", {"epochs": 1, "seed": 0})
        state.run_job(job, warn=lambda m: None)
        state.commit_job(job)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(r in blob for r in raw), f"{path.name} holds {OWNER}'s samples"


def test_recovery_drops_an_upload_whose_import_the_cut_interrupted(tmp_path):
    """A cut after the import's marker but before the upload's deletion: start-up deletes it."""
    ds = datasets.load("digits", seed=0)
    data = _npz(x=ds.x_train[:40], y=ds.y_train[:40])
    with StateDir(tmp_path) as state:
        state.activate(state.add("model", fixture_path("digits_cnn").read_bytes()))
        sha = state.add("samples", data)
        state.import_samples(sha, owner="alice")
    state.path("samples", sha).write_bytes(data)  # as the cut left it
    with StateDir(tmp_path) as state:
        assert not state.path("samples", sha).exists()
        assert state.import_samples(sha) == 40


def test_recovery_finishes_a_rollback_the_cut_interrupted(tmp_path):
    """Regression (found by the power-cut simulator): a cut after the store recorded a rollback but
    before the job file did left a "done" job whose rollback the store then refused forever
    ("illegal status change rolled_back -> rolled_back"), so no new job could start."""
    _populate(tmp_path)
    with StateDir(tmp_path) as state:
        job = state.new_job({"owner": OWNER}, "ft", {"epochs": 1, "seed": 0})
        state.run_job(job, warn=lambda m: None)
        with state.store() as s:
            s.set_status(job.job_id, "rolled_back")  # the cut falls here
    with StateDir(tmp_path) as state:
        assert state.jobs[job.job_id].status == "rolled_back"
        assert not (tmp_path / "jobs" / f"{job.job_id}.ids").exists()
        nxt = state.new_job({"owner": "user5"}, "ft", {"epochs": 1, "seed": 0})
        state.run_job(nxt, warn=lambda m: None)
        state.commit_job(nxt)


def test_a_malformed_model_upload_is_refused_and_leaves_the_directory_unchanged(tmp_path):
    """PUT_END of a model nothing can load answers bad_model and keeps nothing (before, a bad model
    stayed in models/ until a collection); 60 structure-aware mutants of the digits model
    (tests/fuzzlib.py) that the loader refuses, through the agent's handlers."""
    from bridge_helpers import tree_digest
    from fuzzlib import mutant
    from edge_qmul.errors import ModelError
    from edge_qmul.tflite import load_tflite
    from firmware_bridge.channel import RemoteError

    _populate(tmp_path / "state")
    agent = Agent(tmp_path / "state", threads=1)
    refused = 0
    try:
        before = tree_digest(tmp_path / "state")
        for index in range(400):
            kind, _, data = mutant("digits_cnn", 16, index)
            try:
                load_tflite(data)
                continue  # a mutant that still loads is a model, not malformed
            except ModelError:
                pass
            sha = hashlib.sha256(data).hexdigest()
            agent.handle(MsgType.PUT_BEGIN, {"kind": "model", "sha256": sha, "size": len(data)})
            agent.handle(MsgType.PUT_CHUNK, {"sha256": sha, "offset": 0, "data": data})
            with pytest.raises(RemoteError) as info:
                agent.handle(MsgType.PUT_END, {"kind": "model", "sha256": sha, "activate": True})
            assert info.value.code == "bad_model" and str(tmp_path) not in str(info.value), (kind, info.value)
            assert tree_digest(tmp_path / "state") == before, kind
            refused += 1
            if refused == 60:
                break
        assert refused == 60
    finally:
        agent.close()


def test_a_forget_retried_after_its_commit_finds_its_job(tmp_path):
    """Regression (found by the fleet's redelivery test): a FORGET whose job key the device knows
    was checked against the store first, so a retry after the commit (the owner now gone) was
    refused as an unknown owner instead of answering its job."""
    _populate(tmp_path)
    agent = Agent(tmp_path, threads=1)
    try:
        body = {"selector": {"owner": OWNER}, "method": "ft", "params": {"epochs": 1, "seed": 0},
                "job_key": "0123456789abcdef"}
        job_id = agent.handle(MsgType.FORGET, body)["job_id"]
        while agent.handle(MsgType.JOB_STATUS, {"job_id": job_id})["status"] in ("queued", "running"):
            time.sleep(0.01)
        agent.handle(MsgType.COMMIT, {"job_id": job_id})
        assert agent.handle(MsgType.FORGET, body)["job_id"] == job_id == "0123456789abcdef"
        assert len(agent.jobs) == 1
    finally:
        agent.close()
