"""The paper-style comparison of unlearning methods on the int8 model, in the engine.

examples:
    python tools/evaluate.py --suite benchmarks/unlearn_suite.json              # everything
    python tools/evaluate.py --suite benchmarks/unlearn_suite.json --settings random10_digits
    python tools/evaluate.py --suite benchmarks/unlearn_suite.json --report     # tables from saved results

Per setting: every method is tuned at every budget (a fraction of retrain's training sample-passes)
and under both protocols (the paper's fixed work, and the retrain-free stopping rule) on the tuning
seeds, then evaluated with the chosen configurations on the evaluation seeds (disjoint); results go
to ``--out`` as ``<setting>.json`` (tuned configurations, every seed's rows, the summary), a
markdown table and a gap-vs-budget plot; ``--readme`` (on by default with the suite's own file)
rewrites the generated block of benchmarks/README.md. Protocol and metrics:
``edge_qmul/evaluation/protocol.py`` and DESIGN.md §4.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_qmul.evaluation import report, suite as suite_mod  # noqa: E402
from edge_qmul.unlearn import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_setting(suite: suite_mod.Suite, name: str, out: Path, tuned_from: Path | None,
                seeds: list[int] | None) -> dict:
    setting = suite.setting(name)
    t0 = time.perf_counter()
    if tuned_from is not None:
        tuned = json.loads(tuned_from.read_text())["tuned"]
        tuning_s = None
    else:
        tuned = suite_mod.tune(suite, setting, log)
        tuning_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    evaluation = suite_mod.evaluate(suite, setting, tuned, seeds, log)
    evaluation["seeds"] = seeds or suite.eval_seeds
    result = {"setting": setting.__dict__, "budgets": suite.budgets, "tuning_seeds": suite.tuning_seeds,
              "methods": suite.methods, "tuned": tuned, "evaluation": evaluation,
              "time_s": {"tuning": tuning_s, "evaluation": time.perf_counter() - t1}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    log(f"{name}: tuning {tuning_s or 0:.0f} s, evaluation {result['time_s']['evaluation']:.0f} s -> {out / name}.json")
    return result


def write_reports(suite: suite_mod.Suite, names: list[str], out: Path, readme: Path | None,
                  summary_readme: Path | None) -> None:
    sections, results = [], {}
    for setting in suite.settings:
        path = out / f"{setting.name}.json"
        if not path.exists():
            log(f"{setting.name}: no results at {path} (run it first); left out of the report")
            continue
        result = json.loads(path.read_text())
        results[setting.name] = result
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        section = report.setting_section(setting.name, result, suite,
                                         f"`{rel.with_suffix('')}.{{json,md,png}}`")
        (out / f"{setting.name}.md").write_text(section)
        report.plot(result["evaluation"]["summary"], [str(b) for b in suite.budgets], out / f"{setting.name}.png",
                    f"{setting.name}: average gap to retrain against budget "
                    f"({len(result['evaluation']['seeds'])} evaluation seeds)")
        sections.append(section)
    if readme is not None and sections:
        report.write_block(readme, sections)
        log(f"rewrote the generated block of {readme}")
    if summary_readme is not None and results:
        report.write_block(summary_readme, [report.summary_table(results, suite)], report.SUMMARY_BEGIN,
                           report.SUMMARY_END)
        log(f"rewrote the summary block of {summary_readme}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare unlearning methods on the int8 model.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--suite", type=Path, required=True, help="the suite file (benchmarks/unlearn_suite.json)")
    ap.add_argument("--settings", help="comma-separated setting names (default: all of the suite's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/unlearn")
    ap.add_argument("--tuned", type=Path, help="skip tuning: take the configurations from this result file")
    ap.add_argument("--seeds", help="evaluate on these seeds instead of the suite's (e.g. to check one)")
    ap.add_argument("--report", action="store_true", help="only write the tables and plots from saved results")
    ap.add_argument("--readme", default=str(ROOT / "benchmarks/README.md"),
                    help="the README whose generated block is rewritten ('' for none)")
    ap.add_argument("--summary-readme", default=str(ROOT / "README.md"),
                    help="the README whose summary block (gap per method and setting) is rewritten ('' for none)")
    args = ap.parse_args(argv)
    try:
        suite = suite_mod.Suite.load(args.suite)
    except (OSError, ValueError, TypeError) as e:
        ap.error(f"cannot read the suite {args.suite}: {e}")
    unknown = [m for m in suite.methods if m not in METHODS]
    if unknown:
        ap.error(f"{args.suite}: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    names = [s.strip() for s in args.settings.split(",")] if args.settings else [s.name for s in suite.settings]
    for name in names:
        try:
            suite.setting(name)
        except ValueError as e:
            ap.error(str(e))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    readme = Path(args.readme) if args.readme else None
    summary_readme = Path(args.summary_readme) if args.summary_readme else None
    if not args.report:
        for name in names:
            run_setting(suite, name, args.out, args.tuned, seeds)
    write_reports(suite, names, args.out, readme, summary_readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
