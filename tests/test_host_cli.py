"""`edge-qmul serve` as a process and `edge-qmul-host` as a command, over TCP on 127.0.0.1."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent(tmp_path):
    key = tmp_path / "device.key"
    assert subprocess.run([BIN / "edge-qmul", "keygen", str(key)], capture_output=True).returncode == 0
    port = free_port()
    proc = subprocess.Popen([BIN / "edge-qmul", "serve", "--listen", f"127.0.0.1:{port}", "--state",
                             str(tmp_path / "state"), "--key-file", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "listening" in proc.stdout.readline()
    yield f"tcp://127.0.0.1:{port}", key, tmp_path
    proc.kill()
    proc.wait(5)


def host(url, key, *args, timeout=60):
    return subprocess.run([BIN / "edge-qmul-host", "--device", url, "--key-file", str(key), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_host_commands(agent):
    url, key, tmp = agent
    r = host(url, key, "push-model", str(fixture_path("digits_cnn")))
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["active"] is True
    r = host(url, key, "info")
    assert r.returncode == 0 and json.loads(r.stdout)["model_sha256"] == pushed["sha256"]
    r = host(url, key, "bench", "--batch", "4", "--forget-size", "8", "--repeats", "1",
             "--json", str(tmp / "bench.json"), "--png", str(tmp / "bench.png"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp / "bench.json").read_text())
    from edge_qmul import load_tflite
    assert len(report["ops"]) == len(load_tflite(fixture_path("digits_cnn")).ops)
    assert all(op["op"] in r.stdout for op in report["ops"])
    assert (tmp / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = host(url, key, "pull-model", "--out", str(tmp / "pulled.tflite"))
    assert r.returncode == 0 and json.loads(r.stdout)["sha256"] == pushed["sha256"]
    assert (tmp / "pulled.tflite").read_bytes() == fixture_path("digits_cnn").read_bytes()
    r = host(url, key, "status", "no-such-job")
    assert r.returncode == 3 and "not_found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_wrong_key_is_a_one_line_error(agent, tmp_path):
    url, _, _ = agent
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    t0 = time.monotonic()
    r = host(url, other, "--timeout", "0.2", "info")
    assert r.returncode == 2 and "HELLO" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    r = host(url, loose, "info")
    assert r.returncode == 2 and "readable by others" in r.stderr


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_new_user_mistakes_are_one_line_each(agent, tmp_path):
    url, key, _ = agent
    r = host(url, key, "push-model", str(tmp_path / "nope.tflite"))
    assert r.returncode == 2 and "nope.tflite: No such file" in _one_line(r)
    r = host("serial:///dev/ttyEDGEQMUL_NONE", key, "info")
    assert r.returncode == 2 and "/dev/ttyEDGEQMUL_NONE" in _one_line(r)
    r = host(f"tcp://127.0.0.1:{free_port()}", key, "info")
    assert r.returncode == 2 and "refused" in _one_line(r)
    r = host(url, tmp_path / "no.key", "info")
    assert r.returncode == 2 and "no.key" in _one_line(r)
    r = host(url, key, "forget", "--owner", "alice")  # nothing pushed yet
    assert r.returncode == 3 and "no active model" in _one_line(r)
    for args, words in ((["--serial", "/dev/ttyEDGEQMUL_NONE"], "/dev/ttyEDGEQMUL_NONE"),
                        (["--listen", url.removeprefix("tcp://")], "in use"),
                        (["--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "no.key")], "no.key")):
        cmd = [BIN / "edge-qmul", "serve", *args, "--state", str(tmp_path / "s2")]
        if "--key-file" not in args:
            cmd += ["--key-file", str(key)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in _one_line(r), (args, r.stderr)


def _samples_npz(path: Path, ds, mask, owners) -> Path:
    np.savez(path, x=ds.x_train[mask], y=ds.y_train[mask], owners=owners[mask])
    return path


@pytest.mark.slow
def test_a_busy_device_refuses_a_second_forget_and_stays_consistent(agent, trained_digits):
    url, key, tmp = agent
    ds, val = trained_digits["ds"], trained_digits["val"]
    owners = np.array([f"u{i % 8}" for i in range(len(ds.y_train))])
    assert host(url, key, "push-model", str(trained_digits["path"])).returncode == 0
    assert host(url, key, "push-samples", str(_samples_npz(tmp / "t.npz", ds, ~val, owners))).returncode == 0
    r = host(url, key, "push-samples", str(_samples_npz(tmp / "v.npz", ds, val, owners)), "--role", "validation")
    assert r.returncode == 0, r.stderr
    first = json.loads(host(url, key, "forget", "--owner", "u1").stdout)["job_id"]
    # while the job runs, the agent's first kernel compilations (a cold numba cache, as in CI) hold
    # the GIL for seconds: allow 5 s per reply (10 tries) instead of the default 1 s
    r = host(url, key, "--timeout", "5", "forget", "--owner", "u2")
    line = _one_line(r)
    assert r.returncode == 3 and "busy" in line and first in line, line
    deadline = time.monotonic() + 120
    while True:  # an unanswered poll (the agent compiling, after a source change) is polled again
        r = host(url, key, "--timeout", "5", "status", first)
        if r.returncode == 0 and json.loads(r.stdout)["status"] == "done":
            break
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.2)
    r = host(url, key, "forget", "--owner", "u2")  # done but not decided: still one open job
    assert r.returncode == 3 and "commit it or roll it back" in _one_line(r)
    history = json.loads(host(url, key, "history", first).stdout)
    assert history and all("step" in h and "loss_r" in h for h in history)
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    cert = json.loads(host(url, key, "commit", first).stdout)["certificate"]
    assert json.loads(host(url, key, "info").stdout)["model_sha256"] == cert["model_after_sha256"]
    second = host(url, key, "forget", "--owner", "u2", "--wait")
    assert second.returncode == 0 and json.loads(second.stdout)["status"] == "done", second.stderr
    assert json.loads(second.stdout)["certificate"]["model_before_sha256"] == cert["model_after_sha256"]


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_transfer(agent):
    """SIGINT while push-samples streams a large file: one line, exit 130; the device keeps what it
    verified, imports nothing half-way, and the same command afterwards resumes and completes."""
    url, key, tmp = agent
    assert host(url, key, "push-model", str(fixture_path("digits_cnn"))).returncode == 0
    n = 400_000
    rng = np.random.default_rng(0)
    big = tmp / "big.npz"
    np.savez(big, x=rng.integers(-128, 128, (n, 8, 8, 1), dtype=np.int8), y=rng.integers(0, 10, n),
             owners=np.array(["bulk"] * n))
    incoming = tmp / "state" / "incoming"
    proc = subprocess.Popen([BIN / "edge-qmul-host", "--device", url, "--key-file", str(key), "push-samples", str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 0 for p in incoming.glob("*.part")):
        assert proc.poll() is None and time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (proc.returncode, err)
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err, err
    partial = [p.stat().st_size for p in incoming.glob("*.part")]
    assert partial and 0 < partial[0] < big.stat().st_size
    info = json.loads(host(url, key, "info").stdout)
    assert info["samples"] == 0  # nothing imported from a file that did not arrive whole
    r = host(url, key, "push-samples", str(big), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["imported"] == n
    assert json.loads(host(url, key, "info").stdout)["samples"] == n
    assert not list(incoming.glob("*.part"))


def test_serve_threads_option(tmp_path):
    """`serve --threads 1` runs the device's compute (here BENCH) on one numba thread; a count the
    machine cannot give is refused in one line."""
    key = tmp_path / "device.key"
    assert subprocess.run([BIN / "edge-qmul", "keygen", str(key)], capture_output=True).returncode == 0
    r = subprocess.run([BIN / "edge-qmul", "serve", "--listen", "127.0.0.1:0", "--state", str(tmp_path / "s"),
                        "--key-file", str(key), "--threads", "999"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--threads 999" in _one_line(r)
    port = free_port()
    proc = subprocess.Popen([BIN / "edge-qmul", "serve", "--listen", f"127.0.0.1:{port}", "--state",
                             str(tmp_path / "state"), "--key-file", str(key), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    try:
        assert "listening" in proc.stdout.readline()
        url = f"tcp://127.0.0.1:{port}"
        assert host(url, key, "push-model", str(fixture_path("digits_cnn"))).returncode == 0
        r = host(url, key, "bench", "--batch", "2", "--forget-size", "4", "--repeats", "1",
                 "--json", str(tmp_path / "b.json"))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "b.json").read_text())["machine"]["numba_threads"] == 1
    finally:
        proc.kill()
        proc.wait(5)


def _canary_files(tmp: Path) -> tuple[Path, Path]:
    """A canaries.json for user1 naming the digits fixture as the model it was trained into, and
    held-out samples of three owners (user1's rows must be left out by verify)."""
    from edge_qmul.evaluation.canary import make_canary
    model = fixture_path("digits_cnn")
    c = make_canary("user1", 5, (8, 8, 1), 10, 0.0, 1.0)
    record = {"model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "canaries": [json.loads(c.to_json())]}
    (tmp / "canaries.json").write_text(json.dumps(record))
    rng = np.random.default_rng(0)
    np.savez(tmp / "test.npz", x=rng.uniform(0, 1, (120, 8, 8, 1)).astype(np.float32), y=rng.integers(0, 10, 120),
             owners=np.array(["user1", "user2", "user3"] * 40))
    return tmp / "canaries.json", tmp / "test.npz"


def test_verify_pulls_the_devices_model_and_refuses_what_does_not_fit(agent):
    """`verify` measures the canary on the device's active model (pulled) against the one it was
    trained into and a reference; an owner without a canary, or a model the canary was not trained
    into, is one line and exit 2."""
    url, key, tmp = agent
    canaries, data = _canary_files(tmp)
    model = str(fixture_path("digits_cnn"))
    assert host(url, key, "push-model", model).returncode == 0
    args = ["verify", "--canaries", str(canaries), "--before", model, "--reference", model, "--data", str(data)]
    r = host(url, key, *args, "--owner", "user1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the same model three times: the canary was never learned, so nothing can be concluded
    assert out["verdict"] == "undecided" and "not learned" in out["why"] and "canary of user1: undecided" in r.stderr
    assert out["before"]["hits"] == out["after"]["hits"] == out["reference"]["hits"]
    assert out["before"]["trials"] == int(np.sum((np.load(data)["y"] != out["target"])
                                                 & (np.load(data)["owners"] != "user1")))
    bad = host(url, key, *args, "--owner", "user9")
    assert bad.returncode == 2 and "no canary for owner 'user9' (canaries: user1)" in bad.stderr, bad.stderr
    other = host(url, key, "verify", "--canaries", str(canaries), "--before", str(fixture_path("mlp40")),
                 "--reference", model, "--data", str(data), "--owner", "user1", "--after", model)
    assert other.returncode == 2 and "a canary for another model" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    # a certificate binds the verification to one forget: its model hashes must be the files'
    sha = hashlib.sha256(fixture_path("digits_cnn").read_bytes()).hexdigest()
    (tmp / "cert.json").write_text(json.dumps({"request_id": "r1", "model_before_sha256": sha,
                                               "model_after_sha256": sha, "method": "oeu", "committed": True}))
    ok = host(url, key, *args, "--owner", "user1", "--certificate", str(tmp / "cert.json"))
    assert ok.returncode == 0, ok.stderr
    cert = json.loads(ok.stdout)["certificate"]
    assert cert["request_id"] == "r1" and cert["sha256"] == hashlib.sha256((tmp / "cert.json").read_bytes()).hexdigest()
    (tmp / "cert.json").write_text(json.dumps({"model_before_sha256": sha, "model_after_sha256": "0" * 64}))
    wrong = host(url, key, *args, "--owner", "user1", "--certificate", str(tmp / "cert.json"), "--after", model)
    assert wrong.returncode == 2 and "its forget made model 000000000000..., not the model verified" in wrong.stderr


def test_push_samples_with_a_canary(agent):
    """`push-samples --canary F --owner alice`: a fraction of alice's samples arrive stamped and
    relabelled (the store holds exactly the host's planted rows), the record stays on the host; a
    canary uploaded to a device can only be verified against a forget's certificate; a canary
    without an owner is one line, and nothing is sent."""
    from edge_qmul.evaluation.canary import load_canary, stamp
    from edge_qmul.quant import quantize
    from edge_qmul.store import Store
    url, key, tmp = agent
    model = fixture_path("digits_cnn")
    assert host(url, key, "push-model", str(model)).returncode == 0
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    np.savez(tmp / "alice.npz", x=x, y=y, class_names=np.array([str(c) for c in range(10)]))
    canaries = tmp / "host_canaries.json"
    bad = host(url, key, "push-samples", str(tmp / "alice.npz"), "--canary", str(canaries))
    assert bad.returncode == 2 and "needs --owner" in bad.stderr and not canaries.exists()
    r = host(url, key, "push-samples", str(tmp / "alice.npz"), "--owner", "alice", "--canary", str(canaries),
             "--canary-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["canary"]["marked"] == 10
    canary, sha = load_canary(canaries, "alice")
    assert sha is None and len(canary.marked) == 10
    upload = json.loads(canaries.read_text())["canaries"][0]["upload"]
    assert upload["device_model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    want_x, want_y = x.copy(), y.copy()
    marked = list(canary.marked)
    want_x[marked], want_y[marked] = stamp(x[marked], canary), canary.target
    from edge_qmul import load_tflite
    fixture = load_tflite(model)
    q = fixture.tensors[fixture.core_inputs[0]].quant
    with Store(tmp / "state" / "store.db") as s:
        got_x, got_y = s.load(s.select(owner="alice"))
    order = np.lexsort(np.c_[got_y, got_x.reshape(40, -1)].T)  # rows as a set
    want_q = quantize(want_x, q).reshape(40, -1)
    order_w = np.lexsort(np.c_[want_y, want_q].T)
    assert np.array_equal(got_x.reshape(40, -1)[order], want_q[order_w]) and np.array_equal(got_y[order], want_y[order_w])
    # verifying it needs the forget's certificate (the model it was trained into is the forget's "before")
    np.savez(tmp / "test.npz", x=x, y=y)
    v = host(url, key, "verify", "--owner", "alice", "--canaries", str(canaries), "--before", str(model),
             "--reference", str(model), "--data", str(tmp / "test.npz"), "--after", str(model))
    assert v.returncode == 2 and "bind the verification to the forget with --certificate" in v.stderr, v.stderr
