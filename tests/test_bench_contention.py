"""benchmarks/contention.py runs end to end (correctness of its output only; no timing asserts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "contention.py"


@pytest.mark.slow
def test_contention_quick_has_every_row(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import contention
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "contention.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["workload"], r["load"], r["threads"]) for r in rows}
    for w in contention.WORKLOADS:
        for load in contention.LOADS:
            for th in ("1", "2"):
                assert (w, load, th) in seen, (w, load, th)
    for r in rows:
        assert r["median_s"] > 0 and r["p90_s"] > 0, r
        assert r["slowdown_vs_alone"] is not None and r["slowdown_vs_alone"] > 0, r
        assert r["ratio_vs_1thread_alone"] is not None and r["ratio_vs_1thread_alone"] > 0, r
        assert isinstance(r["flag"], bool)
        assert r["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert len(rows) == len(contention.WORKLOADS) * len(contention.LOADS) * 2
