"""`edge-qmul serve` as a process and `edge-qmul-host` as a command, over TCP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    r = host(url, key, "bench", "--batch", "4")
    assert r.returncode == 0 and json.loads(r.stdout)["forward_s_median"] > 0
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
