"""Compare two sets of benchmarks/forward.py runs (e.g. before and after a change), row by row.

    python benchmarks/compare_forward.py --before a1.json a2.json --after b1.json b2.json

Each run's rows are normalised by the peer measured in the same process at the same moment: the
engine's time over LiteRT built-in's (so machine load that slows both cancels out). For every row
it prints the range of that ratio over the runs before and after, and the ratio of their medians
(after / before: < 1 faster, > 1 slower); rows whose every run after is more than ``--margin``
above every run before are listed as slower beyond noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _rows(paths: list[Path]) -> list[dict]:
    return [{(r["name"], r["threads"], r["batch"]): r for r in json.loads(p.read_text())} for p in paths]


def _ratio(r: dict) -> float:
    return r["engine_s"] / r["litert_builtin_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, nargs="+", required=True, help="forward.py --json files, before")
    ap.add_argument("--after", type=Path, nargs="+", required=True, help="forward.py --json files, after")
    ap.add_argument("--margin", type=float, default=0.10, help="slower beyond noise: every run after above "
                    "every run before by more than this fraction (default 0.10)")
    args = ap.parse_args(argv)
    before, after = _rows(args.before), _rows(args.after)
    keys = [k for k in before[0] if all(k in runs for runs in before + after)]
    print("| row | threads | batch | engine / built-in, before | after | after / before |")
    print("|---|---|---|---|---|---|")
    ratios, slower = [], []
    for k in keys:
        b = [_ratio(runs[k]) for runs in before]
        a = [_ratio(runs[k]) for runs in after]
        x = statistics.median(a) / statistics.median(b)
        ratios.append(x)
        if min(a) > max(b) * (1 + args.margin):
            slower.append(k)
        print(f"| {k[0]} | {k[1]} | {k[2]} | {min(b):.2f}-{max(b):.2f} | {min(a):.2f}-{max(a):.2f} | {x:.2f} |")
    print(f"\n{len(keys)} rows; after / before: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")
    print("slower beyond noise: " + (", ".join(f"{n} (thr {t}, batch {b})" for n, t, b in slower) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
