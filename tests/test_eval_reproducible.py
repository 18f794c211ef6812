"""The recorded comparison (benchmarks/results/unlearn/, benchmarks/README.md) is what HEAD computes.

Integer training is deterministic (across runs and thread counts), so the recorded figures are a
function of the code: a change that moves them must re-record them (`make eval`), not leave them
stale. The slow test reruns one evaluation seed of one setting and compares every figure of it
exactly; the fast ones check that the tables were generated from the recorded results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_qmul.evaluation import report, suite as suite_mod

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks/unlearn_suite.json"
RESULTS = ROOT / "benchmarks/results/unlearn"
VOLATILE = ("wall_s", "original_train_s")  # clocks: the only figures that are not a function of the code


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _recorded(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    assert path.exists(), f"{path} is missing: run make eval"
    return json.loads(path.read_text())


def test_every_setting_of_the_suite_is_recorded_and_its_tables_are_generated_from_it():
    suite = suite_mod.Suite.load(SUITE)
    bench = (ROOT / "benchmarks/README.md").read_text()
    results = {}
    for setting in suite.settings:
        result = _recorded(setting.name)
        results[setting.name] = result
        assert result["setting"]["forget"] == setting.forget and result["budgets"] == suite.budgets
        assert result["evaluation"]["seeds"] == suite.eval_seeds and result["tuning_seeds"] == suite.tuning_seeds
        # the summary is the summary of the recorded rows (no figure edited by hand)
        again = json.loads(json.dumps(suite_mod.summarize(suite, result["evaluation"]["per_seed"]), default=str))
        assert again == result["evaluation"]["summary"], setting.name
        section = report.setting_section(setting.name, result, suite,
                                         f"`benchmarks/results/unlearn/{setting.name}.{{json,md,png}}`")
        assert section.strip() in bench, f"benchmarks/README.md's table of {setting.name} is stale: run make eval"
    summary = report.summary_table(results, suite)
    assert summary in (ROOT / "README.md").read_text(), "README.md's summary table is stale: run make eval"


@pytest.mark.slow
def test_one_seed_of_the_recorded_comparison_reproduces_exactly():
    suite = suite_mod.Suite.load(SUITE)
    name = "random10_digits"
    recorded = _recorded(name)
    seed = recorded["evaluation"]["seeds"][0]
    got = suite_mod.evaluate(suite, suite.setting(name), recorded["tuned"], seeds=[seed], log=lambda m: None)
    got = json.loads(json.dumps(got["per_seed"][0], default=str))
    want = recorded["evaluation"]["per_seed"][0]
    _same_configs(got, want)
    assert _strip(got) == _strip(want)


def _same_configs(got, want) -> None:
    """A row's ``config`` may hold fields added to UnlearnConfig after the recording, at their
    defaults (which cannot have changed the figures); they are dropped from ``got`` once checked."""
    from edge_qmul.unlearn import UnlearnConfig
    defaults = UnlearnConfig().to_dict()
    if isinstance(got, dict) and isinstance(want, dict):
        if "config" in got and isinstance(want.get("config"), dict):
            for k in set(got["config"]) - set(want["config"]):
                assert got["config"][k] == defaults[k], (k, got["config"][k])
                del got["config"][k]
        for k in got:
            if k in want:
                _same_configs(got[k], want[k])
