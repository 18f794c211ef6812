"""The host tools run end to end and write what they promise."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_similar_labels_tool(tmp_path):
    out = tmp_path / "table.json"
    r = _run("tools/similar_labels.py", "--model", str(fixture_path("digits_cnn")), "--data", "digits",
             "--out", str(out), "--pairs", "3")
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["k"] == 3 and len(table["similar"]) == 10 and table["model_sha256"]
    assert r.stdout.count("->") == 3
    bad = _run("tools/similar_labels.py", "--model", str(tmp_path / "missing.tflite"), "--data", "digits",
               "--out", str(tmp_path / "t2.json"))
    assert bad.returncode == 2 and "missing.tflite" in bad.stderr and not (tmp_path / "t2.json").exists()


@pytest.mark.slow
def test_evaluate_tool(tmp_path):
    """A one-setting suite, tuned and evaluated: every row carries its metrics, work and gap; the
    generated block of a README is rewritten; a bad suite is refused before any work."""
    suite = {"settings": [{"name": "random10_digits", "dataset": "digits", "forget": "random:0.1"}],
             "methods": ["ft", "qmul", "ga"], "budgets": [0.05, 0.1], "tuning_seeds": [100], "eval_seeds": [0],
             "lrs": [0.01, 0.05], "check_every": [4], "table_budget": 0.1, "default": "ga"}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    from edge_qmul.evaluation.report import BEGIN, END
    readme = tmp_path / "README.md"
    readme.write_text(f"# kept\n{BEGIN}\nOLD-BLOCK\n{END}\nkept too\n")
    r = _run("tools/evaluate.py", "--suite", str(tmp_path / "suite.json"), "--out", str(tmp_path / "out"),
             "--readme", str(readme), "--summary-readme", "")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "out/random10_digits.json").read_text())
    for method in ("ft", "qmul", "ga"):
        for prot in ("fixed", "rule"):
            for b in ("0.05", "0.1"):
                assert data["tuned"][method][prot][b]["config"]["lr"] in (0.01, 0.05)
                row = data["evaluation"]["per_seed"][0]["methods"][method][prot][b]
                assert row["passes_train"] + row["passes_forward"] <= float(b) * 23300 + 1e-9
                assert row["gap"] >= 0 and {"UA", "RA", "TA", "MIA", "changed", "wall_s"} <= set(row)
    assert data["evaluation"]["per_seed"][0]["retrain"]["gap"] == 0.0
    text = readme.read_text()
    assert text.startswith("# kept") and text.endswith("kept too\n") and "OLD-BLOCK" not in text
    assert "| qmul | rule |" in text and "Δgap vs ga (default)" in text
    assert (tmp_path / "out/random10_digits.png").read_bytes()[:4] == b"\x89PNG"
    bad = dict(suite, methods=["qmul", "nonsense"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = _run("tools/evaluate.py", "--suite", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out2"))
    assert r.returncode == 2 and "nonsense" in r.stderr and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_demo(tmp_path):
    """`make demo`'s script: trains, serves over a serial pair, forgets, compares, writes demo_out/."""
    out = tmp_path / "demo_out"
    from edge_qmul.evaluation.report import DEMO_BEGIN, DEMO_END
    (tmp_path / "README.md").write_text(f"a\n{DEMO_BEGIN}\nOLD-DEMO\n{DEMO_END}\nb\n")
    r = _run("tools/demo.py", "--out", str(out), "--readme", str(tmp_path / "README.md"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"before", "after (device)", "retrain (host)"}
    cert = json.loads((out / "certificate.json").read_text())
    import hashlib
    assert hashlib.sha256((out / "model_after.tflite").read_bytes()).hexdigest() == cert["model_after_sha256"]
    assert hashlib.sha256((out / "model_before.tflite").read_bytes()).hexdigest() == cert["model_before_sha256"]
    assert cert["committed"] and cert["method"] == report["method"]
    # the certificate counts exactly the owner's samples the demo pushed (train and validation)
    owned = sum(int((np.load(out / "base" / f"samples_{role}.npz")["owners"] == report["owner"]).sum())
                for role in ("train", "validation"))
    assert cert["n_forgotten"] == owned > 0
    # the per-class figures (and so the bars) are those of the model files on disk
    from edge_qmul import datasets, load_tflite
    from edge_qmul.quant import quantize
    ds = datasets.load("digits", seed=0)
    for name, file in (("before", "model_before.tflite"), ("after", "model_after.tflite")):
        model = load_tflite(out / file)
        x = quantize(ds.x_test, model.tensors[model.core_inputs[0]].quant)
        pred = model.forward(x).argmax(1)
        want = [100 * float(np.mean(pred[ds.y_test == c] == c)) for c in range(10)]
        assert np.allclose(report["per_class_test_accuracy"][name], want), name
    # the loss curves come from the device's record of the run
    history = report["unlearning_history"]
    assert history and [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert all(np.isfinite(v) for h in history for v in h.values())
    # the canary's figures are those of the model files on disk and the host's canaries.json
    from edge_qmul.evaluation.canary import load_canary, model_predict, trigger_hits
    canary, sha = load_canary(out / "base" / "canaries.json", report["owner"])
    assert sha == cert["model_before_sha256"] and len(canary.marked) > 0
    for name, file in (("before", "model_before.tflite"), ("after", "model_after.tflite")):
        hits = trigger_hits(model_predict(load_tflite(out / file), canary), ds.x_test, ds.y_test, canary)
        assert (report["canary"][name]["hits"], report["canary"][name]["trials"]) == hits, name
    assert report["canary"]["before"]["rate"] > 0.8  # learned
    assert report["canary"]["verdict"] in ("forgotten", "not forgotten", "undecided")
    # the device never learned which samples carry it, but its retain set out-voted most of them
    # (unlearn/neighbours.py), and the certificate says so in counts
    seen = cert["never_seen"]
    assert seen["significant"] and len(canary.marked) // 2 <= seen["contradicted"] <= seen["forget"]
    assert f"canary of {report['owner']}: {report['canary']['verdict']}" in (out / "report.md").read_text()
    assert "| MIA | canary |" in r.stdout
    # the host's verification binds to the device's certificate: its model hashes are the files'
    from edge_qmul.evaluation.canary import verify_files
    np.savez(tmp_path / "test.npz", x=ds.x_test, y=ds.y_test)
    v = verify_files(out / "base" / "canaries.json", report["owner"], out / "model_before.tflite",
                     out / "model_after.tflite", out / "model_before.tflite", tmp_path / "test.npz",
                     out / "certificate.json")
    assert v["certificate"]["request_id"] == cert["request_id"] and v["after"] == report["canary"]["after"]
    for png in ("per_class_accuracy.png", "canary_trigger.png", "unlearning_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in (out / "report.md").read_text()
    assert "| after (device, " in r.stdout
    table = r.stdout[r.stdout.index("| model |"):].split("\n\n")[0].split("\n[")[0].strip()
    assert table in (tmp_path / "README.md").read_text() and "OLD-DEMO" not in (tmp_path / "README.md").read_text()
    assert json.loads((out / "base" / "manifest.json").read_text())["owners"]["count"] == 20


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_help_with_an_example(capsys):
    from edge_qmul.cli import build_parser
    from edge_qmul.cli import main as cli_main
    from firmware_bridge.host import main as host_main

    def subcommands(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}

    commands = [[]]
    for name, sub in subcommands(build_parser()).items():
        commands.append([name])
        commands += [[name, inner] for inner in subcommands(sub)]
    assert ["store", "verify"] in commands and ["serve"] in commands
    for argv in commands:
        text = _help(cli_main, [*argv, "--help"], capsys)
        assert "example" in text and "edge-qmul " + " ".join(argv) in text, argv
    host_commands = ("info", "ping", "push-model", "push-table", "push-samples", "forget", "status", "result",
                     "commit", "rollback", "history", "pull-model", "bench")
    for argv in ([], *[[c] for c in host_commands]):
        text = _help(host_main, [*argv, "--help"], capsys)
        assert "example" in text and " ".join(["edge-qmul-host", *argv][-1:]) in text, argv
    for script in ("demo.py", "train_base.py", "bench_device.py", "similar_labels.py", "evaluate.py"):
        r = _run(f"tools/{script}", "--help")
        assert r.returncode == 0 and "example" in r.stdout and f"tools/{script}" in r.stdout, script


def test_demo_loss_plot_names_only_what_it_plots():
    """The loss plot's y label: nats for losses and entropies; the forget weight only when plotted
    (issue 19: it named w_f for methods that never record it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import demo
    assert demo.history_ylabel(["entropy_f", "loss_f", "loss_r"]) == "value (nats)"
    assert "w_f" in demo.history_ylabel(["loss_f", "loss_r", "w_f"])
    assert "w_f" not in demo.history_ylabel(["loss_r"])
