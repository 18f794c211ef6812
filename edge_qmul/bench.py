"""Benchmark a model on this machine: per-op forward latency, whole forward, one training step,
one unlearning run, and peak memory.

    from edge_qmul import load_tflite
    from edge_qmul.bench import bench_model, format_table
    report = bench_model(load_tflite("m.tflite"), batch=8, model_path="m.tflite")
    print(format_table(report))

Every time is the MEDIAN over ``repeats`` runs after one warm-up run (the warm-up also loads
numba's compiled kernels). Memory is measured in a separate pass, one run per phase under
tracemalloc (:class:`edge_qmul.profile.Profiler`), because tracemalloc slows allocation-heavy code
down and would distort the times. ``bench_model`` neither prints nor writes files: the device
agent calls it too.

The model passed in is never changed: training and unlearning work on copies.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numba
import numpy as np

from . import __version__
from .errors import ModelError
from .fsutil import sha256_file
from .graph import Model
from .profile import Profiler
from .quant import dequantize
from .train import Trainer
from .unlearn import METHODS, make_config, unlearn

RETAIN_FACTOR = 4     # retain set = 4 x the forget set ...
RETAIN_CAP = 1024     # ... at most this many samples
UNLEARN_EPOCHS = 2    # a fixed amount of unlearning work: epochs over the forget set, no early stop
TRAIN_LR = 0.01       # the training step's learning rate (it changes values, not the time)

ProgressFn = Callable[[dict], None]


# --- inputs --------------------------------------------------------------------------------------

def _check_settings(model: Model, batch: int, forget_size: int, method: str, repeats: int,
                    unlearn_epochs: int) -> None:
    if not isinstance(model, Model):
        raise ModelError(f"bench: expected an edge_qmul Model, got {type(model).__name__}")
    if len(model.core_inputs) != 1:
        raise ModelError(f"bench: only single-input models are supported (this one has {len(model.core_inputs)})")
    for name, value in (("batch", batch), ("forget_size", forget_size), ("repeats", repeats),
                        ("unlearn_epochs", unlearn_epochs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ModelError(f"bench: {name} must be an integer >= 1, got {value!r}")
    if method not in METHODS:
        raise ModelError(f"bench: unknown unlearning method {method!r}; known: {', '.join(METHODS)}")


def _check_samples(model: Model, samples: tuple, needed: int) -> tuple[np.ndarray, np.ndarray]:
    """The user's (int8 inputs, labels), checked against the model; ModelError naming the problem."""
    try:
        x, y = samples
    except (TypeError, ValueError):
        raise ModelError("bench: samples must be a pair (x_int8, labels)") from None
    x, y = np.asarray(x), np.asarray(y)
    sample_shape = tuple(model.tensors[model.core_inputs[0]].shape[1:])
    if x.dtype != np.int8:
        raise ModelError(f"bench: sample inputs must be int8 (quantized with the model's input scale), got {x.dtype}")
    if x.shape[1:] != sample_shape:
        raise ModelError(f"bench: sample inputs must have shape (N, {', '.join(map(str, sample_shape))}), "
                         f"got {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ModelError(f"bench: labels must be {len(x)} integers, got {y.dtype}{list(y.shape)}")
    classes = model.num_classes
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        raise ModelError(f"bench: label {int(y[bad[0]])} at position {int(bad[0])} is outside [0, {classes})")
    if len(x) < needed:
        raise ModelError(f"bench: {len(x)} samples are too few: need at least {needed} "
                         "(max(batch, forget_size + 1)); lower batch or forget_size")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _random_samples(model: Model, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    sample_shape = tuple(model.tensors[model.core_inputs[0]].shape[1:])
    x = rng.integers(-128, 128, size=(n,) + sample_shape, dtype=np.int16).astype(np.int8)
    return x, rng.integers(0, model.num_classes, size=n).astype(np.int64)


# --- timing --------------------------------------------------------------------------------------

def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _graph_feed(model: Model, x: np.ndarray) -> np.ndarray:
    """The model's own input for int8 core input ``x``: float for float-interface models (their
    QUANTIZE op turns it back into ``x``), ``x`` itself otherwise."""
    t_in = model.tensors[model.inputs[0]]
    if t_in.dtype == np.float32:
        return dequantize(x, model.tensors[model.core_inputs[0]].quant)
    return x


def op_seconds(model: Model, x: np.ndarray) -> tuple[list[float], list[tuple[int, ...]]]:
    """One forward of the whole graph (interface ops included) on int8 batch ``x``, timing each op
    (``Model.run(timings=...)``). Returns per-op seconds and output shapes, in op order."""
    timings: list = []
    values = model.run({model.inputs[0]: _graph_feed(model, x)}, timings=timings)
    seconds = [s for _, s in timings]
    shapes = [tuple(int(d) for d in np.shape(values[op.outputs[0]])) for op, _ in timings]
    return seconds, shapes


# --- the benchmark -------------------------------------------------------------------------------

def machine_info() -> dict:
    """What the numbers were measured on. The load average matters: numba's parallel kernels wait
    for free cores, so a busy machine can make every op far slower."""
    load = [round(float(v), 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []
    return {"machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "edge_qmul": __version__, "cpu_count": os.cpu_count() or 0,
            "numba_threads": int(numba.get_num_threads()), "load_average": load}


def max_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def bench_model(model: Model, batch: int = 8, forget_size: int = 64, method: str = "oeu",
                repeats: int = 5, samples: tuple | None = None, progress: ProgressFn | None = None, *,
                unlearn_epochs: int = UNLEARN_EPOCHS, model_path: str | os.PathLike | None = None,
                seed: int = 0) -> dict:
    """Measure ``model`` on this machine; returns a JSON-serialisable report (see the module doc).

    ``samples``: ``(x_int8, labels)`` from the user's data, or None for random int8 inputs and
    random labels. The forward and training step run on the first ``batch`` samples; unlearning
    forgets ``forget_size`` samples with a retain set of up to 4x that (capped at 1024), for
    ``unlearn_epochs`` epochs with the stopping rule off, so every run does the same work.
    ``model_path``: the file the model came from (its sha256 goes into the report).
    ``progress``: called with ``{"phase", "step", "steps", "epoch", "epochs"}`` as runs finish.
    Bad arguments raise ModelError before anything runs.
    """
    _check_settings(model, batch, forget_size, method, repeats, unlearn_epochs)
    machine = machine_info()  # before the runs: the load average is the machine's, not ours
    retain_size = min(RETAIN_FACTOR * forget_size, RETAIN_CAP)
    rng = np.random.default_rng(seed)
    if samples is None:
        x, y = _random_samples(model, max(batch, forget_size + retain_size), rng)
        source = "random"
    else:
        x, y = _check_samples(model, samples, max(batch, forget_size + 1))
        source = "samples"
    order = rng.permutation(len(x))
    forget_rows = order[:forget_size]
    retain_rows = order[forget_size:forget_size + retain_size]
    forget, retain = (x[forget_rows], y[forget_rows]), (x[retain_rows], y[retain_rows])
    retain_size = len(retain_rows)
    xb, yb = x[:batch], y[:batch]
    config = make_config(method, {"epochs": unlearn_epochs, "stop": False, "seed": seed, "budget": None})
    sha256 = sha256_file(model_path) if model_path is not None else None

    def report_progress(phase: str, done: int) -> None:
        if progress is not None:
            progress({"phase": f"bench {phase}", "step": done, "steps": repeats + 1, "epoch": 0, "epochs": 1})

    def medians_of(phase: str, run: Callable[[], object], warm_up: Callable[[], object] | None = None) -> list[float]:
        (warm_up or run)()
        report_progress(phase, 1)
        times = []
        for r in range(repeats):
            times.append(_timed(run))
            report_progress(phase, r + 2)
        return times

    # per-op latency
    per_op: list[list[float]] = []
    shapes: list[tuple[int, ...]] = []

    def ops_once() -> None:
        seconds, out_shapes = op_seconds(model, xb)
        per_op.append(seconds)
        shapes[:] = out_shapes

    medians_of("per-op", ops_once)
    timed_runs = per_op[1:]  # without the warm-up
    op_median = [_median([run[i] for run in timed_runs]) for i in range(len(model.ops))]
    ops_total = float(sum(op_median))
    ops = [{"index": op.index, "op": op.kind, "output_shape": list(shapes[i]), "median_s": op_median[i],
            "share": op_median[i] / ops_total if ops_total > 0 else 0.0}
           for i, op in enumerate(model.ops)]

    # whole forward (the int8 core, as training and the device agent run it)
    forward_times = medians_of("forward", lambda: model.forward(xb))

    # one training step, on a copy
    trainer = Trainer(model.copy(), lr=TRAIN_LR)
    step_times = medians_of("train step", lambda: trainer.step(xb, yb))

    # unlearning: a fixed number of epochs; the warm-up runs one epoch (same kernels, less time)
    results = []
    unlearn_times = medians_of(
        f"unlearn {method}",
        lambda: results.append(unlearn(model, forget, retain, method=method, config=config)),
        warm_up=lambda: unlearn(model, forget, retain, method=method,
                                config=make_config(method, {"epochs": 1, "stop": False, "seed": seed, "budget": None})))
    steps = int(results[-1].steps)
    unlearn_median = _median(unlearn_times)

    # memory: one more run per phase under tracemalloc
    with Profiler() as profiler:
        with profiler.phase("forward"):
            model.forward(xb)
        with profiler.phase("train_step"):
            trainer.step(xb, yb)
        with profiler.phase("unlearn"):
            unlearn(model, forget, retain, method=method, config=config)
    peaks = {name: int(stats.peak_bytes) for name, stats in profiler.phases.items()}

    in_tensor = model.tensors[model.core_inputs[0]]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {"description": model.description, "sha256": sha256,
                  "path": str(model_path) if model_path is not None else None,
                  "ops": len(model.ops), "parameters": int(sum(p.size for p in model.parameters().values())),
                  "input_shape": [int(s) for s in in_tensor.shape[1:]], "classes": model.num_classes},
        "settings": {"batch": int(batch), "repeats": int(repeats), "inputs": source, "seed": int(seed)},
        "ops": ops,
        "ops_total_s": ops_total,
        "forward": {"median_s": _median(forward_times), "per_sample_s": _median(forward_times) / batch},
        "train_step": {"median_s": _median(step_times), "per_sample_s": _median(step_times) / batch,
                       "lr": TRAIN_LR},
        "unlearn": {"method": method, "median_s": unlearn_median, "steps": steps,
                    "per_step_s": unlearn_median / steps if steps else 0.0,
                    "forget_size": int(forget_size), "retain_size": int(retain_size),
                    "epochs": int(unlearn_epochs), "batch_size": int(config.batch_size),
                    "retain_batch_size": int(config.retain_batch_size), "lr": float(config.lr)},
        "memory": {"tracemalloc_peak_bytes": peaks, "ru_maxrss_bytes": max_rss_bytes()},
    }


# --- presentation --------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1.0 else f"{seconds:.3f} s"


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def format_table(report: dict) -> str:
    """The report as plain text: the machine, the per-op table, then the whole-phase times and memory."""
    m, mod, s = report["machine"], report["model"], report["settings"]
    lines = [f"machine: {m['machine']}, {m['platform']}, {m['cpu_count']} CPUs, python {m['python']}, "
             f"numpy {m['numpy']}, numba {m['numba']} ({m['numba_threads']} threads)"
             + (f", load average {m['load_average'][0]:.2f}" if m["load_average"] else ""),
             f"model: {mod['path'] or mod['description']}"
             + (f" sha256 {mod['sha256'][:16]}" if mod["sha256"] else "")
             + f", {mod['ops']} ops, {mod['parameters']} parameters, input {mod['input_shape']}",
             f"batch {s['batch']}, {s['inputs']} inputs, medians of {s['repeats']} runs after one warm-up, "
             f"{report['date']}", ""]
    rows = [("#", "op", "output", "median ms", "share")]
    rows += [(str(o["index"]), o["op"], "x".join(map(str, o["output_shape"])), _ms(o["median_s"]),
              f"{100 * o['share']:.1f}%") for o in report["ops"]]
    rows.append(("", "sum of ops", "", _ms(report["ops_total_s"]), "100.0%"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {3, 4}
    for r in rows:
        lines.append("  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))).rstrip())
    f, t, u = report["forward"], report["train_step"], report["unlearn"]
    peaks = report["memory"]["tracemalloc_peak_bytes"]
    lines += ["",
              f"forward     {_duration(f['median_s'])} ({_duration(f['per_sample_s'])}/sample), "
              f"tracemalloc peak {_mib(peaks.get('forward', 0))}",
              f"train step  {_duration(t['median_s'])} ({_duration(t['per_sample_s'])}/sample), "
              f"tracemalloc peak {_mib(peaks.get('train_step', 0))}",
              f"unlearn     {_duration(u['median_s'])} ({u['method']}: forget {u['forget_size']}, retain "
              f"{u['retain_size']}, {u['epochs']} epochs = {u['steps']} steps, {_duration(u['per_step_s'])}/step), "
              f"tracemalloc peak {_mib(peaks.get('unlearn', 0))}",
              f"process max RSS {_mib(report['memory']['ru_maxrss_bytes'])}"]
    return "\n".join(lines)


def plot(report: dict, path: str | os.PathLike) -> None:
    """A PNG: per-op latency bars, and a small panel with forward / train step / unlearn per step.

    Needs matplotlib (the ``host`` extra); raises ModelError if it is missing.
    """
    try:  # matplotlib is optional (the host extra): the device agent benchmarks without it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModelError("plot: needs matplotlib (pip install 'edge-qmul[host]')") from None
    ops = report["ops"]
    labels = [f"{o['index']} {o['op']}" for o in ops]
    op_ms = [o["median_s"] * 1e3 for o in ops]
    fig, (ax_ops, ax_phases) = plt.subplots(
        1, 2, figsize=(11, max(3.0, 0.28 * len(ops) + 1.5)), gridspec_kw={"width_ratios": [3, 1]})
    ax_ops.barh(range(len(ops)), op_ms, color="tab:blue")
    ax_ops.set_yticks(range(len(ops)), labels, fontsize=7 if len(ops) > 30 else 9)
    ax_ops.invert_yaxis()
    ax_ops.set_xlabel(f"median ms (batch {report['settings']['batch']})")
    ax_ops.set_title(f"per-op forward latency, sum {report['ops_total_s'] * 1e3:.3g} ms")
    phases = {"forward": report["forward"]["median_s"], "train step": report["train_step"]["median_s"],
              f"unlearn/step\n({report['unlearn']['method']})": report["unlearn"]["per_step_s"]}
    bars = ax_phases.bar(range(len(phases)), [v * 1e3 for v in phases.values()],
                         color=["tab:blue", "tab:orange", "tab:green"])
    ax_phases.bar_label(bars, fmt="%.3g", fontsize=8)
    ax_phases.margins(y=0.15)
    ax_phases.set_xticks(range(len(phases)), list(phases), fontsize=8)
    ax_phases.set_ylabel("median ms")
    ax_phases.set_title("phases")
    name = Path(report["model"]["path"]).name if report["model"]["path"] else report["model"]["description"]
    fig.suptitle(f"{name} on {report['machine']['machine']}, {report['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
