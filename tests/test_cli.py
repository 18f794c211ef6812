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


def test_litert_option_names_the_arithmetic_and_refuses_unknown_platforms():
    """--litert makes a command compute as that platform's LiteRT; a bad name: exit 2, one line."""
    from edge_qmul.arithmetic import host_platform
    r = _cli("info", str(fixture_path("mlp40")))
    assert f"arithmetic: LiteRT on {host_platform()}" in r.stdout
    r = _cli("--litert", "arm64", "info", str(fixture_path("mlp40")))
    assert r.returncode == 0 and "arithmetic: LiteRT on aarch64" in r.stdout
    r = _cli("--litert", "riscv64", "info", str(fixture_path("mlp40")))
    assert r.returncode == 2 and "unknown LiteRT platform" in r.stderr and "Traceback" not in r.stderr


def test_info_bad_file(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    r = _cli("info", str(bad))
    assert r.returncode == 2
    assert "bad.tflite" in r.stderr and "Traceback" not in r.stderr


def test_info_lists_every_unsupported_op(tmp_path, capsys):
    """A refused model: every op kind without a kernel, with its count and positions, exit 2."""
    import numpy as np

    from edge_qmul import Op, QuantParams, Tensor
    from edge_qmul.cli import main
    from edge_qmul.tflite import to_bytes
    from test_bad_input import _raw_model
    q = QuantParams([0.05], [3])
    kinds = ["EXP", "LOGISTIC", "EXP", "GATHER_ND"]
    tensors = [Tensor(f"t{i}", (1, 4), np.dtype(np.int8), q) for i in range(len(kinds) + 1)]
    ops = [Op(k, [i], [i + 1], {}, version=1) for i, k in enumerate(kinds)]
    path = tmp_path / "m.tflite"
    path.write_bytes(to_bytes(_raw_model(tensors, ops, [0], [len(kinds)])))
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "3 op(s) of 2 kind(s)" in err[0]
    assert err[1].split() == ["EXP", "x2", "at", "op", "index", "0,", "2"]
    assert err[2].split() == ["GATHER_ND", "x1", "at", "op", "index", "3"]
