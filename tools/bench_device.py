"""Benchmark a .tflite model on this machine (run it on the board itself).

    python tools/bench_device.py --model m.tflite [--batch 8] [--forget-size 64] [--method oeu] \
        [--repeats 5] [--samples data.npz] [--json out.json] [--png out.png]

Prints per-op forward latency, whole forward, training step and unlearning times (medians) and
peak memory (edge_qmul.bench); writes the report as JSON and a PNG when asked.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_qmul import Model, load_tflite  # noqa: E402
from edge_qmul.bench import bench_model, format_table, plot  # noqa: E402
from edge_qmul.datasets import open_npz, sample_keys  # noqa: E402
from edge_qmul.errors import ModelError  # noqa: E402
from edge_qmul.fsutil import atomic_write  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.unlearn import DEFAULT_METHOD, METHODS  # noqa: E402

PROG = "bench_device"
EPILOG = """examples:
  python tools/bench_device.py --model model.tflite
  python tools/bench_device.py --model model.tflite --batch 32 --repeats 10 --json bench.json --png bench.png
  python tools/bench_device.py --model model.tflite --samples data.npz --forget-size 32 --method qmul

--samples takes an .npz with inputs under x (or x_train), shaped (N, *model input shape), float
(quantized with the model's input scale) or int8, and integer labels under y (or y_train).
Without it, inputs are random int8 and labels random.
Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted."""


class UsageError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and leave the decision to main()."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="bench_device.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Benchmark an int8 .tflite model on this machine: per-op forward latency,\n"
                                   "whole forward, training step, unlearning time and peak memory\n"
                                   "(medians over --repeats runs after one warm-up).",
                       epilog=EPILOG)
    ap.add_argument("--model", required=True, type=Path, help="the int8 .tflite model")
    ap.add_argument("--batch", type=int, default=8, help="batch of the forward and training step (default 8)")
    ap.add_argument("--forget-size", type=int, default=64, help="samples to forget (default 64)")
    ap.add_argument("--method", default=DEFAULT_METHOD,
                    help=f"unlearning method (default {DEFAULT_METHOD}; one of {', '.join(METHODS)})")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    ap.add_argument("--samples", type=Path, help="an .npz of real samples (x, y) instead of random ones")
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    ap.add_argument("--png", type=Path, help="write a plot here (needs matplotlib)")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the (long) benchmark runs."""
    for name in ("batch", "forget_size", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r}: unknown; known: {', '.join(METHODS)}")
    if not args.model.is_file():
        raise UsageError(f"--model {args.model}: no such file")
    if args.samples is not None and not args.samples.is_file():
        raise UsageError(f"--samples {args.samples}: no such file")
    for flag, path in (("--json", args.json), ("--png", args.png)):
        if path is not None and not path.resolve().parent.is_dir():
            raise UsageError(f"{flag} {path}: directory {path.resolve().parent} does not exist")
    if args.png is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--png needs matplotlib (pip install 'edge-qmul[host]')")


def load_samples(path: Path, model: Model) -> tuple[np.ndarray, np.ndarray]:
    """(int8 inputs, int labels) from an .npz, checked against the model's input shape."""
    try:
        f = open_npz(path)
    except ValueError as e:
        raise UsageError(f"--samples {e}") from None
    with f:
        files = list(f.files)
        xk, yk = sample_keys(files)
        if xk is None or yk is None:
            raise UsageError(f"--samples {path}: needs keys x and y (or x_train and y_train); "
                             f"found {', '.join(files) or 'none'}")
        x, y = f[xk], f[yk]
    t_in = model.tensors[model.core_inputs[0]]
    sample_shape = tuple(t_in.shape[1:])
    if x.ndim != len(sample_shape) + 1 or tuple(x.shape[1:]) != sample_shape:
        raise UsageError(f"--samples {path}: {xk} has shape {x.shape}; the model takes "
                         f"(N, {', '.join(map(str, sample_shape))})")
    if y.shape != (len(x),):
        raise UsageError(f"--samples {path}: {yk} has shape {y.shape}, expected ({len(x)},) to match {xk}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"--samples {path}: {yk} must hold integer labels, got {y.dtype}")
    if x.dtype == np.int8:
        return x, y
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise UsageError(f"--samples {path}: {xk} holds NaN or inf")
        return quantize(x, t_in.quant), y
    raise UsageError(f"--samples {path}: {xk} is {x.dtype}; give float features or int8 samples")


class PhaseLines:
    """Progress on stderr: one line when a measurement starts."""

    def __init__(self) -> None:
        self.phase = None

    def __call__(self, info: dict) -> None:
        if info["phase"] != self.phase:
            self.phase = info["phase"]
            print(f"{PROG}: measuring {self.phase.removeprefix('bench ')} ...", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model = load_tflite(args.model)
    samples = load_samples(args.samples, model) if args.samples is not None else None
    report = bench_model(model, batch=args.batch, forget_size=args.forget_size, method=args.method,
                         repeats=args.repeats, samples=samples, progress=PhaseLines(), model_path=args.model)
    print(format_table(report))
    if args.json is not None:
        atomic_write(args.json, (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    if args.png is not None:
        plot(report, args.png)
        print(f"wrote {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except (UsageError, ModelError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
