"""The `edge-qmul` command (device side)."""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from . import __version__
from .errors import ModelError


def _info(args: argparse.Namespace) -> int:
    from .tflite import load_tflite
    model = load_tflite(args.model)
    data = Path(args.model).read_bytes()
    print(f"model: {args.model}")
    print(f"sha256: {hashlib.sha256(data).hexdigest()}")
    print(f"size: {len(data)} bytes")
    print(model.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-qmul", description="On-device unlearning for int8 models.")
    p.add_argument("--version", action="version", version=f"edge-qmul {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a .tflite model's ops, shapes, parameters, bytes and MACs")
    info.add_argument("model", help="path to an int8 .tflite model")
    info.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelError as e:
        print(f"edge-qmul: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
