"""The line budget (CI): every Python file is at most LIMIT lines and opens with a docstring.

    python tools/line_budget.py            # exit 1 and list the files over budget or without one

A file that grows past the budget holds more than one idea: split it along its seam. Vendored
generator scripts under tests/fixtures/ are copies of ../shared and are not counted.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

LIMIT = 600
ROOTS = ("edge_qmul", "firmware_bridge", "tools", "benchmarks", "tests")
EXCLUDED = ("tests/fixtures/",)


def violations(repo: Path, limit: int = LIMIT) -> list[str]:
    """One line per file over ``limit`` lines or without an opening docstring."""
    out = []
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            if rel.startswith(EXCLUDED):
                continue
            text = path.read_text()
            lines = text.count("\n") + (not text.endswith("\n") and bool(text))
            if lines > limit:
                out.append(f"{rel}: {lines} lines, over the budget of {limit}")
            if text.strip() and ast.get_docstring(ast.parse(text)) is None:
                out.append(f"{rel}: no opening docstring saying what the file is")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=LIMIT)
    args = ap.parse_args(argv)
    found = violations(Path(__file__).resolve().parents[1], args.limit)
    for line in found:
        print(line, file=sys.stderr)
    print(f"line budget: {len(found)} problem(s), limit {args.limit} lines per file")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
