"""Training-step benchmark: the edge_qmul int8 engine against PyTorch (CPU, float32, eager).

    python benchmarks/train_step.py [--json OUT] [--repeats N] [--min-time S] [--quick] [--markdown]

One training step = forward + loss + backward + parameter update, batch 32, for

  * ``digits_cnn`` on (8, 8, 1) scikit-learn digits, 10 classes;
  * ``mobilenet_tiny`` (tiny MobileNetV2) on (32, 32, 3) uniform random images, 10 random labels;

run by

  * the engine: ``Trainer(model, lr).step(x_int8, labels)`` (integer backward, integer SGD on
    master weights), threads set with ``numba.set_num_threads``;
  * PyTorch: an ``nn.Module`` built by walking ``model.ops`` (so it has the same layers, channels,
    kernel sizes, strides, TFLite SAME/VALID padding (asymmetric where TFLite's is), fused RELU/RELU6, residual ADDs, MEAN pooling,
    NHWC flatten order and FC), initialised with the engine's dequantized int8 weights and biases,
    float32, eager mode; step = ``zero_grad(set_to_none=True)``, ``cross_entropy``, ``backward``,
    ``SGD(lr).step()``; threads set with ``torch.set_num_threads``. Its input is the dequantized
    int8 batch the engine gets, so both see the same batch.

at 1 and 2 threads, in this one process. Everything is warmed up first (numba compilation is not
timed). Each repeat times enough back-to-back steps to last at least ``--min-time`` seconds and
records the time per step; repeats of the two backends alternate (which goes first alternates too,
with a 10 ms pause between backends), and the reported value is the median over repeats.

Memory of one step (measured outside the timed repeats, at 1 thread):

  * engine: ``tracemalloc`` peak during one ``Trainer.step`` minus what was allocated just before
    it (weights and master weights, already allocated, are not counted), and, for reference, the
    engine's own analytic ``Trainer.memory_report(32)["total"]`` (which does include weights).
  * torch: PyTorch 2.13 CPU exposes no allocator statistics (``torch.cpu`` has no memory_stats,
    there is no CPU caching allocator), and tracemalloc does not see torch's allocations. The
    number reported is measured with ``torch.profiler.profile(profile_memory=True)``: every CPU
    allocation and free through c10's allocator during one step is recorded, and the peak of their
    running sum is the step's peak above what was allocated before it (the same definition as the
    engine's). For reference an analytic footprint is also reported: parameter + gradient bytes plus
    the nbytes of every tensor autograd saves for backward (``saved_tensors_hooks``).

Correctness (cheap): from identical starting weights, one engine step and one torch step on the
batch must both lower that batch's loss; the script also reports how far the torch forward's logits
are from the engine's dequantized int8 logits (same weights; the engine quantizes activations).
"""
from __future__ import annotations

import os

# a row labelled 2 threads runs 2 threads, whatever the load (edge_qmul/threads.py would give one up)
os.environ.setdefault("EDGE_QMUL_THREADS", "fixed")
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numba  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from edge_qmul import datasets, models  # noqa: E402
from edge_qmul.profile import Profiler  # noqa: E402
from edge_qmul.threads import OtherBusy  # noqa: E402
from edge_qmul.quant import dequantize, quantize  # noqa: E402
from edge_qmul.train import Trainer, loss_head  # noqa: E402
from torch_twin import TorchTwin  # noqa: E402

BATCH = 32
LR = 0.01
THREADS = (1, 2)
NUM_CLASSES = 10


# --- the torch twin of an engine Model ------------------------------------------------------------

def torch_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


# --- workloads --------------------------------------------------------------------------------------

def workloads(quick: bool):
    d = datasets.load("digits", seed=0)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.y_train))
    yield ("digits_cnn", (8, 8, 1), d.x_train[idx[:256]], d.x_train[idx[:BATCH]], d.y_train[idx[:BATCH]],
           "scikit-learn digits (train split, seed 0)")
    x = rng.uniform(0.0, 1.0, size=(256 + BATCH, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int64)
    yield ("mobilenet_tiny", (32, 32, 3), x[:256], x[256:], y, "uniform random images, random labels")


# --- measurement ------------------------------------------------------------------------------------

def _set_threads(n: int) -> None:
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def _time_per_step(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _steps_for(fn, min_time: float) -> int:
    """How many back-to-back steps last at least min_time (estimated from 1..few calls)."""
    t = _time_per_step(fn, 1)
    t = min(t, _time_per_step(fn, 2))
    return max(1, int(np.ceil(min_time / max(t, 1e-9))))


def engine_peak(trainer: Trainer, x8, y) -> tuple[int, dict]:
    """tracemalloc peak of one step above what was allocated before it, and the Profiler report."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        trainer.step(x8, y)
        peak = tracemalloc.get_traced_memory()[1] - base
        trainer.profiler = Profiler()
        with trainer.profiler:
            trainer.step(x8, y)
        rep = trainer.profiler.report()
        trainer.profiler = None
    finally:
        if started:
            tracemalloc.stop()
    return peak, rep


def torch_peak_profiler(net, opt, x, y) -> int | None:
    """Peak of the running sum of c10 CPU allocations/frees during one step (torch.profiler).

    The previous step's gradients are released before profiling starts, so the step's new
    gradients count (as the engine's int32 gradients do) and no free of a block allocated before
    the profile (whose size the profiler cannot know) goes missing.
    """
    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch_step(net, opt, x, y)
    try:
        raw = prof.profiler.kineto_results.events()
        events = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
    except AttributeError:  # pragma: no cover - older/newer profiler internals
        return None
    if not events:
        return None
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return int(peak)


def torch_analytic(net, opt, x, y) -> dict:
    """Parameter + gradient bytes, plus the bytes of every tensor autograd saves for backward."""
    saved = {"bytes": 0}
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        # count each storage once (parameters that autograd saves are already counted as params)
        key = t.untyped_storage().data_ptr()
        if key not in seen and not any(t.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                                       for q in net.parameters()):
            seen.add(key)
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return {"params": params, "grads": params, "saved": saved["bytes"], "total": 2 * params + saved["bytes"]}


def engine_loss(trainer: Trainer, x8, y) -> float:
    m = trainer.model
    vals = m.run({m.core_inputs[0]: x8}, start_after_interface=True)
    lt = trainer.logits_tensor
    logits = dequantize(vals[lt], m.tensors[lt].quant).astype(np.float64)
    return loss_head(logits.reshape(len(y), -1), y)[0], logits.reshape(len(y), -1)


def run_model(name, shape, calib, xf, y, data_note, repeats: int, min_time: float, threads_list) -> tuple[list, dict]:
    m = models.build(name, shape, NUM_CLASSES, seed=0, calib_x=calib)
    x8 = quantize(xf, m.tensors[m.core_inputs[0]].quant)
    x_t = torch.from_numpy(dequantize(x8, m.tensors[m.core_inputs[0]].quant).astype(np.float32))
    y_t = torch.from_numpy(y)

    # --- correctness: one step each from the same weights must lower the batch's loss ---
    _set_threads(1)
    m_check = copy.deepcopy(m)
    net0 = TorchTwin(m_check)
    t_check = Trainer(m_check, lr=LR)
    e_before, e_logits = engine_loss(t_check, x8, y)
    e_step_loss = t_check.step(x8, y)
    e_after, _ = engine_loss(t_check, x8, y)
    opt0 = torch.optim.SGD(net0.parameters(), lr=LR)
    with torch.no_grad():
        t_logits = net0(x_t).double().numpy()
        t_before = float(F.cross_entropy(net0(x_t), y_t))
    torch_step(net0, opt0, x_t, y_t)
    with torch.no_grad():
        t_after = float(F.cross_entropy(net0(x_t), y_t))
    span = float(np.ptp(t_logits)) or 1.0
    check = {"engine_loss_before": round(e_before, 5), "engine_loss_after": round(e_after, 5),
             "engine_step_returned_loss": round(float(e_step_loss), 5),
             "torch_loss_before": round(t_before, 5), "torch_loss_after": round(t_after, 5),
             "engine_loss_decreased": bool(e_after < e_before), "torch_loss_decreased": bool(t_after < t_before),
             "logits_max_abs_diff": round(float(np.max(np.abs(t_logits - e_logits))), 4),
             "logits_max_abs_diff_rel_span": round(float(np.max(np.abs(t_logits - e_logits))) / span, 4),
             "argmax_agreement": round(float(np.mean(t_logits.argmax(1) == e_logits.argmax(1))), 3)}
    print(f"[{name}] check: engine loss {e_before:.4f} -> {e_after:.4f}, torch loss {t_before:.4f} -> "
          f"{t_after:.4f}; logits |torch - engine| max {check['logits_max_abs_diff']} "
          f"({check['logits_max_abs_diff_rel_span']:.1%} of the logit span), argmax agree "
          f"{check['argmax_agreement']:.0%}", file=sys.stderr)
    if not (check["engine_loss_decreased"] and check["torch_loss_decreased"]):
        print(f"WARNING [{name}]: a step did not lower the batch loss", file=sys.stderr)

    # --- the timed pair, fresh from the same weights ---
    trainer = Trainer(m, lr=LR)
    net = TorchTwin(m)
    opt = torch.optim.SGD(net.parameters(), lr=LR)

    def eng():
        trainer.step(x8, y)

    def tor():
        torch_step(net, opt, x_t, y_t)

    # --- memory (1 thread, outside the timed repeats) ---
    _set_threads(1)
    eng(); tor()  # noqa: E702  (warm-up: numba compilation, torch first-call setup)
    e_peak, e_prof = engine_peak(trainer, x8, y)
    e_report = trainer.memory_report(BATCH)
    t_peak = torch_peak_profiler(net, opt, x_t, y_t)
    t_an = torch_analytic(net, opt, x_t, y_t)
    n_params = sum(p.numel() for p in net.parameters())

    rows = []
    for threads in threads_list:
        _set_threads(threads)
        for _ in range(3):  # warm-up at this thread count (numba parallel pools, torch threads)
            eng(); tor()  # noqa: E702
        n_e, n_t = _steps_for(eng, min_time), _steps_for(tor, min_time)
        te, tt = [], []
        busy_meter = OtherBusy().start()
        for r in range(repeats):
            order = ((eng, n_e, te), (tor, n_t, tt)) if r % 2 == 0 else ((tor, n_t, tt), (eng, n_e, te))
            for fn, n, out in order:
                out.append(_time_per_step(fn, n))
                time.sleep(0.01)
        busy = round(busy_meter.value(), 2)
        e_s, t_s = statistics.median(te), statistics.median(tt)
        row = {"name": name, "batch": BATCH, "threads": threads, "engine_step_s": e_s, "torch_step_s": t_s,
               "engine_peak_bytes": int(e_peak), "torch_peak_bytes": t_peak,
               "ratio": round(e_s / t_s, 3),
               "engine_report_bytes": int(e_report["total"]), "engine_report": e_report,
               "engine_phases": e_prof["phases"],
               "torch_analytic_bytes": t_an["total"], "torch_analytic": t_an,
               "torch_peak_method": "torch.profiler profile_memory (c10 CPU alloc/free events), peak above "
                                    "the start of the step" if t_peak is not None else "unavailable",
               "params": n_params, "engine_steps_per_repeat": n_e, "torch_steps_per_repeat": n_t,
               "repeats": repeats, "engine_step_s_all": te, "torch_step_s_all": tt,
               "cpu_busy_other": busy, "data": data_note, "check": check}
        rows.append(row)
        if threads > 1 and busy >= 0.5:
            print(f"WARNING [{name}] threads {threads}: other processes kept {busy} CPUs busy; "
                  f"this row's timings are not meaningful, rerun on a quiet machine", file=sys.stderr)
        print(f"[{name}] threads {threads}: engine {_fmt_s(e_s)}, torch {_fmt_s(t_s)}, "
              f"engine/torch {e_s / t_s:.2f}, other load {busy}", file=sys.stderr)
    return rows, check


def _engine_source() -> dict:
    """The git commit the engine was measured at, and whether edge_qmul/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "edge_qmul"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": head, "edge_qmul_dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "edge_qmul_dirty": None}


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_b(b) -> str:
    if b is None:
        return "n/a"
    if b >= 1 << 20:
        return f"{b / (1 << 20):.2f} MiB"
    return f"{b / 1024:.1f} KiB"


def markdown(rows: list) -> str:
    head = ("| name | threads | batch | engine step | torch step | engine/torch | engine peak (tracemalloc) "
            "| engine memory_report total | torch peak (profiler) | torch analytic | other load (CPUs) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], str(r["threads"]), str(r["batch"]), _fmt_s(r["engine_step_s"]), _fmt_s(r["torch_step_s"]),
            f"{r['ratio']:.2f}", _fmt_b(r["engine_peak_bytes"]), _fmt_b(r["engine_report_bytes"]),
            _fmt_b(r["torch_peak_bytes"]), _fmt_b(r["torch_analytic_bytes"]), f"{r['cpu_busy_other']:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python benchmarks/train_step.py --json benchmarks/results/train_step.json")
    ap.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per backend (median reported); "
                    "default 11, or 3 with --quick")
    ap.add_argument("--min-time", type=float, default=None, help="seconds each repeat lasts at least; "
                    "default 0.2, or 0.05 with --quick")
    ap.add_argument("--quick", action="store_true", help="few short repeats (a smoke test, not a measurement)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown on stdout")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    threads_list = [t for t in THREADS if t <= numba.config.NUMBA_NUM_THREADS]
    torch.manual_seed(0)

    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy "
          f"{np.__version__}, numba {numba.__version__} ({numba.config.THREADING_LAYER} threading layer), "
          f"torch {torch.__version__}; batch {BATCH}, lr {LR}, repeats {repeats}, min-time {min_time}s",
          file=sys.stderr)
    rows = []
    for name, shape, calib, xf, y, note in workloads(args.quick):
        r, _ = run_model(name, shape, calib, xf, y, note, repeats, min_time, threads_list)
        rows.extend(r)
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "n/a"
    src = _engine_source()
    for r in rows:
        r["numba_threading_layer"] = layer
        r["engine_source"] = src
        r["versions"] = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                         "torch": torch.__version__}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    table = markdown(rows)
    if args.markdown:
        print(table)
    else:
        print(table, file=sys.stderr)
    bad = [r["name"] for r in rows if not (r["check"]["engine_loss_decreased"] and r["check"]["torch_loss_decreased"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
