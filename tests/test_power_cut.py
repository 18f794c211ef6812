"""Power cuts, MCUboot-simulator style: the device agent runs as a real process (`edge-qmul serve`)
and is killed with SIGKILL at seeded random points of an upload and of a forget job; a restarted
agent on the same state directory must resume or recover, never expose a half-written file, and
never lose or half-apply a commit (DESIGN.md §5-§6).

Each scenario runs 30 kill points (3 batches of 10, each batch on its own state directory)."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_qmul import datasets, models, save_tflite
from edge_qmul.quant import quantize
from edge_qmul.store import Store
from edge_qmul.train import Trainer, fit
from firmware_bridge.channel import Client
from firmware_bridge.frames import MsgType
from firmware_bridge.host import DeviceClient
from firmware_bridge.transfer import chunk_size, put
from firmware_bridge.transport import connect_tcp

pytestmark = pytest.mark.slow  # agent processes killed at 60 points: the slow tier

BATCHES, POINTS = 3, 10  # 30 kill points per scenario
EDGE_QMUL = Path(sys.executable).with_name("edge-qmul")
N_OWNERS = 100


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_file(path: Path) -> str:
    return _sha(path.read_bytes())


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class AgentProcess:
    """`edge-qmul serve --listen 127.0.0.1:PORT` on a state directory; `kill()` is a power cut."""

    def __init__(self, state: Path, key_file: Path) -> None:
        self.state, self.key_file = state, key_file
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "AgentProcess":
        for _ in range(5):  # a free port can be taken between the probe and the bind: try another
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [str(EDGE_QMUL), "serve", "--listen", f"127.0.0.1:{self.port}", "--state", str(self.state),
                 "--key-file", str(self.key_file)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("listening on"):
                return self
            self.proc.wait(10)
        raise RuntimeError(f"the agent did not start (last line {line!r}, status {self.proc.returncode})")

    def sigkill(self) -> None:
        """The power cut itself (safe from a timer thread): SIGKILL, no clean-up of any kind."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL and reap."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()

    def client(self, key: bytes, mtu: int = 16384) -> "RecordingClient":
        c = RecordingClient(connect_tcp("127.0.0.1", self.port), key, mtu=mtu, timeout=2.0, retries=3)
        c.connect()
        return c


class RecordingClient(Client):
    """A channel Client that records PUT_CHUNK offsets, the bytes the device acknowledged, and can arm
    a kill when its n-th request is sent."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sent_types: list[MsgType] = []
        self.chunk_offsets: list[tuple[str, int]] = []  # (sha256, offset) of every PUT_CHUNK
        self.acked: dict[str, int] = {}  # sha256 -> highest offset the device acknowledged
        self.on_send = None  # callback(msg_type, n) before the n-th request goes out

    def request(self, msg_type, body=None, timeout=None, retries=None):
        self.sent_types.append(msg_type)
        if msg_type == MsgType.PUT_CHUNK:
            self.chunk_offsets.append((body["sha256"], body["offset"]))
        if self.on_send is not None:
            self.on_send(msg_type, len(self.sent_types))
        reply = super().request(msg_type, body, timeout, retries)
        if msg_type in (MsgType.PUT_CHUNK, MsgType.PUT_BEGIN):
            sha = body["sha256"]
            self.acked[sha] = max(self.acked.get(sha, 0), int(reply["offset"]))
        return reply


def _lingering_temp_files(state: Path) -> list[Path]:
    return [p for p in state.rglob("*") if p.name.endswith((".tmp", ".creating"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An old and a new model, a ~1.3 MB samples file for the upload, and owners' samples (100 owners
    plus a validation slice) for the forget job; a key file."""
    root = tmp_path_factory.mktemp("power_cut")
    ds = datasets.load("digits", seed=0)
    rng = np.random.default_rng(0)
    n = len(ds.y_train)
    val = np.zeros(n, bool)
    val[rng.choice(n, n // 10, replace=False)] = True
    x, y = ds.x_train[~val], ds.y_train[~val]
    old = models.build("digits_cnn", ds.input_shape, 10, seed=1, calib_x=x[:256])
    new = models.build("digits_cnn", ds.input_shape, 10, seed=0, calib_x=x[:256])
    fit(Trainer(new, lr=0.05, momentum=0.9), quantize(x, new.tensors[new.core_inputs[0]].quant), y, epochs=2)
    save_tflite(old, root / "old.tflite")
    save_tflite(new, root / "new.tflite")
    owners = np.array([f"o{i % N_OWNERS:03d}" for i in range(n)])
    np.savez(root / "train.npz", x=x, y=y, owners=owners[~val])
    np.savez(root / "val.npz", x=ds.x_train[val], y=ds.y_train[val], owners=owners[val])
    # the upload's samples: the training set twice, as float64, so about 1.3 MB
    np.savez(root / "big.npz", x=np.concatenate([x, x]).astype(np.float64), y=np.concatenate([y, y]),
             owners=np.array([f"b{i % 7}" for i in range(2 * len(y))]))
    key_file = root / "device.key"
    subprocess.run([str(EDGE_QMUL), "keygen", str(key_file)], check=True, capture_output=True)
    return root


def _template(files: Path, tmp: Path, name: str, samples: bool) -> Path:
    """A state directory holding the old model (active), and for the forget job the samples."""
    state = tmp / name
    agent = AgentProcess(state, files / "device.key").start()
    try:
        device = DeviceClient(agent.client((files / "device.key").read_bytes()))
        src = files / ("new.tflite" if samples else "old.tflite")
        assert device.push_model(src)["active"]
        if samples:
            assert device.push_samples(files / "train.npz")["imported"] > 1000
            assert device.push_samples(files / "val.npz", role="validation")["imported"] > 100
        device.client.transport.close()
    finally:
        agent.kill()
    return state


# --- upload ----------------------------------------------------------------------------------------

UPLOAD_MTU = 1024


def _upload(client: RecordingClient, files: Path, phase: dict) -> None:
    """Push the new model (activate) and the big samples file; `phase` says which file is in flight."""
    phase["now"] = "model"
    put(client, "model", (files / "new.tflite").read_bytes(), end_fields={"activate": True})
    phase["now"] = "samples"
    put(client, "samples", (files / "big.npz").read_bytes(), end_fields={"role": "train"})
    phase["now"] = "finished"


@pytest.mark.parametrize("batch", range(BATCHES))
def test_power_cut_during_upload(files, tmp_path, batch):
    key = (files / "device.key").read_bytes()
    template = _template(files, tmp_path, "template", samples=False)
    old_sha, new_sha = _sha_file(files / "old.tflite"), _sha_file(files / "new.tflite")
    big = (files / "big.npz").read_bytes()
    big_sha = _sha(big)
    with np.load(files / "big.npz") as f:
        n_big = len(f["y"])
    shas = {"model": new_sha, "samples": big_sha}
    sizes = {"model": (files / "new.tflite").stat().st_size, "samples": len(big)}

    # the number of requests a whole upload takes, to draw kill points over all of it
    state = tmp_path / "probe"
    shutil.copytree(template, state)
    agent = AgentProcess(state, files / "device.key").start()
    probe = agent.client(key, UPLOAD_MTU)
    _upload(probe, files, {})
    n_requests = len(probe.sent_types)
    chunk = chunk_size(probe)
    agent.kill()
    assert n_requests > 1000  # many chunks

    rng = random.Random(1000 + batch)
    resumed_above_zero = 0
    for point in range(POINTS):
        where = f"batch {batch} point {point}"
        state = tmp_path / f"s{point}"
        shutil.copytree(template, state)
        agent = AgentProcess(state, files / "device.key").start()
        client = agent.client(key, UPLOAD_MTU)
        phase: dict = {}
        at = rng.randrange(2, n_requests + 1)  # kill while the at-th request is in flight ...
        exact = rng.random() < 0.5  # ... or exactly after the (at-1)-th reply (the device is idle)
        delay = rng.uniform(0, 0.002)
        killed = threading.Event()

        def on_send(msg_type, n):
            if n == at and not killed.is_set():
                if exact:
                    agent.sigkill()
                else:
                    threading.Timer(delay, agent.sigkill).start()
                killed.set()
        client.on_send = on_send
        try:
            _upload(client, files, phase)
        except Exception:  # noqa: BLE001 - the link died with the agent
            pass
        assert killed.is_set(), where
        agent.proc.wait(10)  # the (timer's) SIGKILL
        agent.kill()
        cut_in = phase["now"]
        acked = dict(client.acked)
        client.transport.close()

        # after the cut, before any recovery: current.tflite is the old model or the new one, whole
        assert _sha_file(state / "current.tflite") in (old_sha, new_sha), where

        agent = AgentProcess(state, files / "device.key").start()
        try:
            assert not _lingering_temp_files(state), where
            assert _sha_file(state / "current.tflite") in (old_sha, new_sha), where
            client = agent.client(key, UPLOAD_MTU)
            if cut_in in ("model", "samples"):
                sha, size = shas[cut_in], sizes[cut_in]
                kind = cut_in
                begin = client.request(MsgType.PUT_BEGIN, {"kind": kind, "size": size, "sha256": sha})
                held = acked.get(sha, 0)
                parts = sorted(p.name for p in (state / "incoming").glob("*.part"))
                if begin["complete"]:
                    assert parts == [], where
                else:
                    # resumes at the device's offset: every acknowledged byte is kept, and at most the
                    # one chunk in flight (written but its reply lost) is beyond it
                    if exact:
                        assert begin["offset"] == held, where
                    else:
                        assert held <= begin["offset"] <= held + chunk, (where, begin, held)
                    assert parts == ([f"{sha}.part"] if begin["offset"] else []), where
                    resumed_above_zero += begin["offset"] > 0
                client.chunk_offsets.clear()
                _upload(client, files, {})
                sent = [off for s_, off in client.chunk_offsets if s_ == sha]
                if not begin["complete"] and begin["offset"] < size:
                    assert sent[0] == begin["offset"], (where, sent[:1], begin)  # resumed, not from 0
            else:
                _upload(client, files, {})
            # the final files are exact, the new model is active and current, samples imported once
            assert _sha_file(state / "models" / f"{new_sha}.tflite") == new_sha, where
            # imported once, then the upload deleted: the store is the samples' only home
            assert not (state / "samples" / f"{big_sha}.npz").exists(), where
            assert (state / "samples" / f"{big_sha}.imported").read_text() == str(n_big), where
            assert _sha_file(state / "current.tflite") == new_sha, where
            info = DeviceClient(client).info()
            assert info["model_sha256"] == new_sha, where
            assert info["samples"] == n_big, (where, info)  # imported exactly once
            assert not list((state / "incoming").glob("*.part")), where
            assert not _lingering_temp_files(state), where
            client.transport.close()
        finally:
            agent.kill()
        with Store(state / "store.db") as s:
            s.verify()
            assert s.active_model == new_sha and s.count() == n_big, where
        shutil.rmtree(state)
    assert resumed_above_zero >= POINTS // 2  # most cuts land where the device already holds data


# --- forget job ------------------------------------------------------------------------------------

def _wait(device: DeviceClient, job: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = device.status(job)
        if st["status"] not in ("queued", "running"):
            return st
        time.sleep(0.01)
    raise AssertionError(f"job {job} still running after {timeout} s")


def _check_store(state: Path, owner: str, job: str | None, old_sha: str, where: str) -> dict:
    """With the agent stopped: the store verifies (rows, audit chain), and either the job committed
    (new active model, the owner's samples gone) or it did not (old model, every sample there)."""
    with Store(state / "store.db") as s:
        s.verify()  # integrity, every row's digest, the audit hash chain
        log = s.audit_log()
        assert [row["seq"] for row in log] == list(range(log[0]["seq"], log[0]["seq"] + len(log))), where
        req = None
        if job is not None:
            req = next((r for r in s.requests() if r["id"] == job), None)
        committed = req is not None and req["status"] == "committed"
        n_owner = s.count(owner=owner)
        active = s.active_model
        if committed:
            assert n_owner == 0, where
            assert active == req["result"]["commit"]["model_after"], where  # (may equal the old: a job can stop at step 0)
        else:
            assert n_owner > 0, where
            assert active == old_sha, where
        assert _sha_file(state / "models" / f"{active}.tflite") == active, where
        return {"committed": committed, "active": active, "request": req}


JOB = {"method": "qmul", "retain_max": 384}  # a smaller retain set keeps each job well under a second


@pytest.mark.parametrize("batch", range(BATCHES))
def test_power_cut_during_forget(files, tmp_path, batch):
    key = (files / "device.key").read_bytes()
    state = _template(files, tmp_path, "state", samples=True)
    agent = AgentProcess(state, files / "device.key").start()
    device = DeviceClient(agent.client(key))
    rng = random.Random(2000 + batch)
    # how long a job and a commit take here, to spread the kill points over them
    probe_owner = f"o{N_OWNERS - 1 - batch:03d}"
    t0 = time.monotonic()
    probe = device.forget({"owner": probe_owner}, **JOB)
    assert _wait(device, probe)["status"] == "done"
    job_s = time.monotonic() - t0
    t0 = time.monotonic()
    device.commit(probe)
    commit_s = time.monotonic() - t0
    counts = {"forget": 0, "done": 0, "commit": 0}
    outcomes = {"committed": 0, "failed": 0, "done": 0, "unknown": 0}
    try:
        for point in range(POINTS):
            owner = f"o{batch * POINTS + point:03d}"
            where = f"batch {batch} point {point} ({owner})"
            old_sha = device.info()["model_sha256"]
            assert _sha_file(state / "current.tflite") == old_sha, where
            when = rng.choice(["forget", "forget", "done", "commit", "commit"])
            counts[when] += 1
            holder: dict = {}
            killed = threading.Event()

            def kill_after(delay: float) -> None:
                threading.Timer(delay, lambda: (agent.sigkill(), killed.set())).start()

            if when == "forget":  # before or while the job runs (or just after it finished)
                delay = rng.uniform(0, job_s)

                def on_send(msg_type, n):
                    if msg_type == MsgType.FORGET:
                        kill_after(delay)
                device.client.on_send = on_send
                try:
                    holder["job"] = device.forget({"owner": owner}, **JOB)
                    while not killed.is_set():
                        device.status(holder["job"])
                        time.sleep(0.01)
                except Exception:  # noqa: BLE001 - the agent died under the request
                    pass
            elif when == "done":  # between done and commit
                t0 = time.monotonic()
                holder["job"] = device.forget({"owner": owner}, **JOB)
                assert _wait(device, holder["job"])["status"] == "done", where
                job_s = min(job_s, time.monotonic() - t0)  # the probe also paid for warming up
                agent.sigkill()
                killed.set()
            else:  # while COMMIT runs (or just before or after)
                t0 = time.monotonic()
                holder["job"] = device.forget({"owner": owner}, **JOB)
                assert _wait(device, holder["job"])["status"] == "done", where
                job_s = min(job_s, time.monotonic() - t0)
                delay = rng.uniform(0, commit_s * 1.5)

                def on_send(msg_type, n):
                    if msg_type == MsgType.COMMIT:
                        kill_after(delay)
                device.client.on_send = on_send
                try:
                    device.commit(holder["job"])
                except Exception:  # noqa: BLE001
                    pass
            killed.wait(10)
            agent.kill()
            device.client.transport.close()
            job = holder.get("job")

            # the agent is down: the store alone must be consistent
            st = _check_store(state, owner, job, old_sha, where)
            if when != "commit":
                assert not st["committed"], where
            assert _sha_file(state / "current.tflite") in (old_sha, st["active"]), where

            agent = AgentProcess(state, files / "device.key").start()
            device = DeviceClient(agent.client(key))
            # current.tflite follows the store at start-up; nothing half-written is left
            assert _sha_file(state / "current.tflite") == st["active"] == device.info()["model_sha256"], where
            assert not _lingering_temp_files(state), where
            assert not list((state / "incoming").glob("*.part")), where
            if job is None:
                outcomes["unknown"] += 1  # the cut came before FORGET's reply: the host never knew the job
            else:
                status = device.status(job)["status"]
                outcomes[status] = outcomes.get(status, 0) + 1
                if st["committed"]:
                    assert status == "committed", (where, status)
                elif st["request"] is not None and st["request"]["status"] == "done" and status == "done":
                    device.rollback(job)  # finished before the cut: the host may still choose; drop it
                else:
                    assert status == "failed", (where, status, st["request"] and st["request"]["status"])
            if not st["committed"]:  # a new FORGET runs and commits to completion
                job = device.forget({"owner": owner}, **JOB)
                assert _wait(device, job)["status"] == "done", where
                cert = device.commit(job)["certificate"]
                assert cert["committed"] and device.info()["model_sha256"] == cert["model_after_sha256"], where
                assert _sha_file(state / "current.tflite") == cert["model_after_sha256"], where
            assert device.status(job)["status"] == "committed", where
    finally:
        agent.kill()
    with Store(state / "store.db") as s:
        s.verify()
        assert all(s.count(owner=f"o{batch * POINTS + p:03d}") == 0 for p in range(POINTS))
        assert _sha_file(state / "current.tflite") == s.active_model
        assert not s.requests("running") and not s.requests("pending")
    assert not _lingering_temp_files(state)
    print(f"batch {batch}: job {job_s:.2f} s, commit {commit_s:.3f} s; kill points {counts}, "
          f"status after restart {outcomes}")
