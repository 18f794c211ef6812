"""An x86 host drives an emulated aarch64 board: push, forget, commit, pull (``make test-arm64``).

``edge-qmul serve`` runs inside the Debian arm64 root that tools/arm64.sh builds (qemu-user,
Cortex-A76), listening on 127.0.0.1; ``edge-qmul-host`` on the x86 side pushes the TensorFlow-
converted digits model, a similar-label table and samples with owners, forgets one owner with
Q-MUL, commits and pulls the new model. Then aarch64 LiteRT inside the root runs the pulled model and
must give the accuracies the agent reported, and the same session against an x86 agent told to
compute as aarch64's LiteRT (EDGE_QMUL_LITERT=aarch64) must produce the same model, byte for byte.

Skipped unless EDGE_QMUL_ARM64_ROOT names the root (tools/arm64.sh sets it).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path

ROOT = os.environ.get("EDGE_QMUL_ARM64_ROOT")
VENV = os.environ.get("EDGE_QMUL_ARM64_VENV", "/opt/edge-qmul")
QEMU_CPU = os.environ.get("QEMU_CPU", "cortex-a76")
HOST_BIN = Path(sys.executable).parent
OWNER = "user3"

pytestmark = pytest.mark.skipif(not ROOT, reason="needs the emulated aarch64 root: make test-arm64")


def _arm_argv(command: str) -> list[str]:
    return ["chroot", ROOT, "/usr/bin/env", "-i", "HOME=/root", f"PATH={VENV}/bin:/usr/bin:/bin",
            "LANG=C.UTF-8", f"QEMU_CPU={QEMU_CPU}", "/bin/bash", "-c", f"cd /src && exec {command}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], env: dict | None = None, startup_s: float = 900) -> subprocess.Popen:
    """Start an agent; return once it prints 'listening on'."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + startup_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            return proc
    proc.kill()
    raise AssertionError("the agent did not start:\n" + "".join(lines))


def _host(port: int, key: Path, *args: str) -> dict:
    out = subprocess.run([str(HOST_BIN / "edge-qmul-host"), "--device", f"tcp://127.0.0.1:{port}",
                          "--key-file", str(key), "--timeout", "60", *args],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"edge-qmul-host {' '.join(args)}: {out.stderr[-2000:]}"
    return json.loads(out.stdout)


def _session(port: int, key: Path, files: Path) -> dict:
    """push model, table, samples; forget OWNER with Q-MUL; commit; pull. Returns what came back."""
    assert _host(port, key, "ping")
    pushed = _host(port, key, "push-model", str(fixture_path("digits_cnn")))
    table = _host(port, key, "push-table", str(files / "table.json"))["sha256"]
    assert _host(port, key, "push-samples", str(files / "train.npz"))["imported"] == 400
    assert _host(port, key, "push-samples", str(files / "val.npz"), "--role", "validation")["imported"] == 80
    done = _host(port, key, "forget", "--owner", OWNER, "--method", "qmul", "--table", table, "--wait", "--commit")
    pulled = _host(port, key, "pull-model", "--out", str(files / f"pulled_{port}.tflite"))
    return {"pushed": pushed, "done": done, "pulled": pulled, "path": files / f"pulled_{port}.tflite"}


@pytest.fixture(scope="module")
def host_files(tmp_path_factory):
    """Samples of eight owners, a validation slice and a similar-label table, made on the host."""
    from edge_qmul import datasets, load_tflite
    from edge_qmul.quant import quantize
    from edge_qmul.unlearn.similar_labels import build_table
    root = tmp_path_factory.mktemp("arm64_host")
    ds = datasets.load("digits", seed=0)
    owners = np.array([f"user{i % 8}" for i in range(400)])
    np.savez(root / "train.npz", x=ds.x_train[:400], y=ds.y_train[:400], owners=owners)
    np.savez(root / "val.npz", x=ds.x_train[400:480], y=ds.y_train[400:480], owners=np.array(["val"] * 80))
    model = load_tflite(fixture_path("digits_cnn"))
    build_table(model, quantize(ds.x_test, model.tensors[0].quant), ds.y_test).save(root / "table.json")
    return root


def test_x86_host_drives_an_emulated_aarch64_agent(host_files, tmp_path):
    work = Path(ROOT) / "tmp" / f"edge-qmul-agent-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inside = f"/tmp/{work.name}"
    subprocess.run(_arm_argv(f"edge-qmul keygen {inside}/device.key"), check=True, capture_output=True)
    key = work / "device.key"
    port = _free_port()
    agent = _start(_arm_argv(f"edge-qmul serve --listen 127.0.0.1:{port} --state {inside}/state "
                             f"--key-file {inside}/device.key"))
    try:
        board = _session(port, key, host_files)
    finally:
        agent.terminate()
        agent.wait(60)
    cert = board["done"]["certificate"]
    assert board["done"]["status"] == "committed" and cert["committed"] and cert["n_forgotten"] == 50
    assert board["pulled"]["sha256"] == cert["model_after_sha256"] != board["pushed"]["sha256"]
    check = cert["litert_check"]  # made on the board: its engine against its own LiteRT
    assert check["litert_platform"] == check["engine_profile"] == "aarch64"
    assert check["bit_exact"] and check["differing_elements"] == 0 and check["output_elements"] > 0

    # aarch64 LiteRT, inside the root, runs the pulled model on the forgotten owner's samples and
    # the validation slice: the accuracies the agent reported
    shutil.copy(board["path"], work / "pulled.tflite")
    for name in ("train.npz", "val.npz"):
        shutil.copy(host_files / name, work / name)
    script = (f"import json, numpy as np; from edge_qmul import litert, load_tflite; "
              f"from edge_qmul.quant import quantize; d = '{inside}'; "
              f"data = open(d + '/pulled.tflite', 'rb').read(); m = load_tflite(data); "
              f"q = m.tensors[m.core_inputs[0]].quant; t = np.load(d + '/train.npz'); v = np.load(d + '/val.npz'); "
              f"f = t['owners'] == '{OWNER}'; "
              f"acc = lambda x, y: 100.0 * float((litert.run(data, quantize(x, q)).argmax(1) == y).mean()); "
              f"print(json.dumps({{'UA': 100.0 - acc(t['x'][f], t['y'][f]), 'VA': acc(v['x'], v['y'])}}))")
    out = subprocess.run(_arm_argv(f"python -c \"{script}\""), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    after = cert["metrics_after"]
    assert measured["UA"] == pytest.approx(after["UA"], abs=1e-9)
    assert measured["VA"] == pytest.approx(after["VA"], abs=1e-9)

    # the host computes what the board computed: an x86 agent with the aarch64 profile makes the
    # same model from the same session
    port2 = _free_port()
    (tmp_path / "key").write_bytes(key.read_bytes())
    os.chmod(tmp_path / "key", 0o600)
    env = {**os.environ, "EDGE_QMUL_LITERT": "aarch64"}
    agent = _start([str(HOST_BIN / "edge-qmul"), "serve", "--listen", f"127.0.0.1:{port2}", "--state",
                    str(tmp_path / "state"), "--key-file", str(tmp_path / "key")], env=env)
    try:
        host = _session(port2, tmp_path / "key", host_files)
    finally:
        agent.terminate()
        agent.wait(60)
    assert host["done"]["certificate"]["model_after_sha256"] == cert["model_after_sha256"]
    # and its certificate says which LiteRT it checked against (this host's, not the board's)
    assert host["done"]["certificate"]["litert_check"]["engine_profile"] == "aarch64"
    assert host["done"]["certificate"]["litert_check"]["litert_platform"] == "x86_64"
    shutil.rmtree(work, ignore_errors=True)
