"""`make fleet-demo` (tools/fleet_demo.py) as a user runs it: a broker, five agent processes, one
person forgotten on the three devices that hold them (one of them back only after the request),
the report printed, exit status 0, and nothing left running or on disk afterwards; Ctrl-C stops
every process too."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosquitto import MOSQUITTO

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tools" / "fleet_demo.py"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def started_pids(out: str) -> list[int]:
    return [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_fleet_demo_forgets_one_person_across_the_fleet(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(DEMO), "--keep", str(tmp_path / "work")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "5 agents started" in out and "board-2 stopped" in out and "board-2 started again" in out
    assert "queued for offline board-2" in out
    rows = re.findall(r"^(board-\d)\s+(\w+)\s+([0-9a-f]{16})\s+([0-9a-f]{64})\s+([0-9a-f]{12})\s*$", out, re.M)
    assert [(r[0], r[1]) for r in rows] == [("board-0", "committed"), ("board-1", "committed"),
                                            ("board-2", "committed")], out
    assert len({r[2] for r in rows}) == 3 and len({r[4] for r in rows}) == 3  # a job and a model each
    assert "request complete: yes" in out and "every process stopped" in out
    assert gone(started_pids(out))
    work = tmp_path / "work"
    for d in ("board-0", "board-1", "board-2"):  # each holder ran exactly one job
        assert len(list((work / d / "jobs").glob("*.json"))) == 1
    for d in ("board-3", "board-4"):
        assert not list((work / d / "jobs").glob("*.json"))
    secrets = [p.read_text().strip() for p in (work / "broker" / "passwords").glob("*.pw")]
    secrets += [p.read_bytes().hex() for p in (work / "keys").glob("*.key")]
    assert secrets and not any(s in out for s in secrets)
    print(f"\nfleet demo: {elapsed:.1f} s")
    assert elapsed < 120


def test_fleet_demo_ctrl_c_stops_every_process():
    proc = subprocess.Popen([sys.executable, str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "agents started" in line:
            break
    pids = started_pids("".join(lines))
    assert len(pids) == 6, lines  # mosquitto and five agents
    work = re.search(r"(\S*fleet_demo_\w+)/broker", "".join(lines)).group(1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted; every process stopped" in rest
    assert gone(pids) and not os.path.exists(work)
