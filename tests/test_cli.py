"""`edge-qmul info` prints the summary; bad files give a one-line error and exit 2."""
from __future__ import annotations

import subprocess
import sys

from conftest import fixture_path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_qmul.cli", *args], capture_output=True, text=True)


def test_info_prints_summary():
    r = _cli("info", str(fixture_path("mobilenet_tiny")))
    assert r.returncode == 0, r.stderr
    for word in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "total", "MACs", "sha256"):
        assert word in r.stdout
    total = [line for line in r.stdout.splitlines() if line.strip().startswith("total")][0]
    params, nbytes, macs = map(int, total.split()[1:])
    assert params > 0 and nbytes >= params and macs > 1_000_000


def test_info_bad_file(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    r = _cli("info", str(bad))
    assert r.returncode == 2
    assert "bad.tflite" in r.stderr and "Traceback" not in r.stderr
