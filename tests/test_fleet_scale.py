"""The issue-17 scale point, small: benchmarks/fleet_scale.py with 100 real agents (two worker
processes of 50) behind one real mosquitto; one fleet-wide forget of an owner all of them hold.

The idea: the benchmark script is itself the check (its exit status says whether every device's
job ran exactly once and was committed); this test runs it as a user would and asserts what the
JSON says about completeness and exactly-once, never timings (the machine is shared). The 1,000-
device run is the same command with --devices 1000 (numbers in the benchmark's JSON).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosquitto import MOSQUITTO

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_scale.py"


@pytest.mark.slow
def test_fleet_scale_100_agents_forget_completes_exactly_once(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    out = tmp_path / "fleet_scale.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", "100", "--per-process", "50",
                           "--samples", "20", "--timeout", "300", "--root", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1])))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    check = r["check"]
    assert check["ok"] and check["n_problems"] == 0 and check["problems"] == [], check
    assert check["fleet_exit_status"] == 0 and check["request_status"] == "complete"
    assert check["counts"] == {"pending": 0, "sent": 0, "done": 0, "committed": 100, "failed": 0}
    assert r["devices"] == 100 and r["worker_processes"] == 2
    assert r["forget"]["p100_committed_s"] is not None  # the monitor saw every delivery committed
    # exactly once, looked at again here: one job file per device, committed, named by its job key
    from firmware_bridge.fleet.registry import job_key

    states = sorted((tmp_path / "work" / "states").iterdir())
    assert len(states) == 100
    for state in states:
        jobs = list((state / "jobs").glob("*.json"))
        assert [p.stem for p in jobs] == [job_key(check["request"], state.name)]
        assert json.loads(jobs[0].read_text())["status"] == "committed"
    print("\n" + proc.stdout)
