"""Forward-pass benchmark: the edge_qmul engine against LiteRT (built-in kernels and XNNPACK).

    python benchmarks/forward.py [--json OUT] [--repeats N] [--quick] [--batches 1,32] [--zoo]

For each fixture model (tests/fixtures/*.tflite) and for single CONV_2D / DEPTHWISE_CONV_2D /
FULLY_CONNECTED layers shaped like real layers of MobileNetV2 (224x224 input) and ResNet-18, built
with random int8 weights through the project's Model and .tflite writer, and with ``--zoo`` for the
real-world models of tests/fixtures/zoo/*.tflite (rows ``zoo/NAME``; ``--only zoo`` runs just those),
this measures the time of one batch through

  * the engine (``model.forward`` on int8 input; ``model.predict`` for float-interface models, so
    that it runs the same QUANTIZE ... DEQUANTIZE graph LiteRT runs), threads set with
    ``numba.set_num_threads``;
  * LiteRT with ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`` (no XNNPACK);
  * LiteRT with its default resolver (XNNPACK delegate);

at 1 and 2 threads, all in this one process. LiteRT's input is resized to the batch so the whole
batch runs in one ``invoke`` (if resizing fails, it runs sample by sample and the row says so).
Models with variable (state) tensors (an LSTM) get ``reset_all_variables()`` before every invoke,
batched or per sample: LiteRT keeps state between invokes, the engine starts every sample as its own
sequence from zero state (as the fixtures' ``y_builtin`` were made).
PyTorch (if installed) runs a float32 twin of the graph; a model with ops the twin does not know
gets "-" in the torch columns.
Everything is warmed up first (numba compilation is not timed). Each repeat times enough
back-to-back batches to last at least ``--min-time`` seconds and records the time per batch; the
repeats of the three backends are interleaved, and the reported value is the median over repeats.

Every row also counts output elements where the engine and LiteRT built-in differ (the engine's
contract is bit-exactness with LiteRT built-in run one sample at a time on 1 thread, so that count,
``mism/1``, must be 0; ``mism`` is against the timed interpreter, whose batch and thread count can
change LiteRT's own results, which the row's notes then count) and, for information, where XNNPACK
differs from the built-in kernels (XNNPACK rounds ties differently, so small counts there are expected).

GOP/s counts 2 operations per multiply-accumulate: ``2 * MACs * batch / engine_s``.
"""
from __future__ import annotations

import os

# a row labelled 2 threads runs 2 threads, whatever the load (edge_qmul/threads.py would give one up)
os.environ.setdefault("EDGE_QMUL_THREADS", "fixed")
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numba  # noqa: E402

from edge_qmul import Model, Op, QuantParams, Tensor, load_tflite  # noqa: E402
from edge_qmul.kernels import macs as op_macs  # noqa: E402
from edge_qmul.threads import OtherBusy  # noqa: E402
from edge_qmul.tflite import to_bytes  # noqa: E402

try:  # LiteRT, with the legacy tflite_runtime as a fallback (DESIGN.md section 2)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError:  # pragma: no cover
    from tflite_runtime.interpreter import Interpreter, OpResolverType  # type: ignore

try:  # PyTorch float32 eager, for reference (the `bench` extra); rows say "-" without it
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twin import TorchTwin
except ImportError:  # pragma: no cover
    torch = None

FIXTURES = ROOT / "tests" / "fixtures"
ZOO = FIXTURES / "zoo"
FIXTURE_BATCH = 8
LAYER_BATCH = 1
THREADS = (1, 2)


# --- single layers ------------------------------------------------------------------------------

def _per_channel_weight(rng, shape, axis):
    w = rng.integers(-127, 128, size=shape, dtype=np.int64).astype(np.int8)
    n = shape[axis]
    scale = rng.uniform(0.004, 0.02, size=n).astype(np.float32)
    return w, QuantParams(scale, np.zeros(n, np.int64), axis)


def _out_scale(s_in, s_w, taps):
    # Accumulator std ~ std(x - zp) * std(w) * sqrt(taps) with x, w uniform int8 (std ~74, ~73):
    # pick the output scale so that the output spreads over ~+-40 levels (little saturation).
    return np.float32(s_in * float(np.mean(s_w)) * 74.0 * 73.0 * np.sqrt(taps) / 40.0)


def _layer(name, kind, in_shape, w_shape, w_axis, out_shape, taps, options, seed):
    """(name, Model) of one weighted layer with random per-channel int8 weights (channels along
    ``w_axis``), int32 bias and an output scale for ``taps`` products per output."""
    rng = np.random.default_rng(seed)
    s_in, zp_in = np.float32(0.02), -3
    wt, wq = _per_channel_weight(rng, w_shape, w_axis)
    cout = w_shape[w_axis]
    bias = rng.integers(-2000, 2001, size=cout).astype(np.int32)
    bq = QuantParams((s_in * wq.scale.astype(np.float64)).astype(np.float32), np.zeros(cout, np.int64), 0)
    tensors = [
        Tensor("input", in_shape, np.int8, QuantParams(s_in, zp_in)),
        Tensor("weight", wt.shape, np.int8, wq, data=wt),
        Tensor("bias", (cout,), np.int32, bq, data=bias),
        Tensor("output", out_shape, np.int8, QuantParams(_out_scale(s_in, wq.scale, taps), 5)),
    ]
    return name, Model(tensors, [Op(kind, [0, 1, 2], [3], options)], [0], [3])


def _window(h, w, k, stride, padding, activation) -> tuple[int, int, dict]:
    """Output height and width of a k x k window, and the options of the op."""
    oh = -(-h // stride) if padding == "SAME" else (h - k) // stride + 1
    ow = -(-w // stride) if padding == "SAME" else (w - k) // stride + 1
    return oh, ow, {"padding": padding, "stride_h": stride, "stride_w": stride, "dilation_h": 1,
                    "dilation_w": 1, "activation": activation}


def conv_layer(name, h, w, cin, cout, k=1, stride=1, padding="SAME", activation="RELU6", seed=0):
    oh, ow, options = _window(h, w, k, stride, padding, activation)
    return _layer(name, "CONV_2D", (1, h, w, cin), (cout, k, k, cin), 0, (1, oh, ow, cout), k * k * cin,
                  options, seed)


def depthwise_layer(name, h, w, c, k=3, stride=1, padding="SAME", activation="RELU6", seed=0):
    oh, ow, options = _window(h, w, k, stride, padding, activation)
    return _layer(name, "DEPTHWISE_CONV_2D", (1, h, w, c), (1, k, k, c), 3, (1, oh, ow, c), k * k,
                  dict(options, depth_multiplier=1), seed)


def fc_layer(name, cin, cout, activation="NONE", seed=0):
    return _layer(name, "FULLY_CONNECTED", (1, cin), (cout, cin), 0, (1, cout), cin,
                  {"activation": activation, "keep_num_dims": False}, seed)


def single_layers(quick: bool):
    """(name, Model) of layers shaped like MobileNetV2-1.0 (224x224) and ResNet-18 layers."""
    layers = [
        # MobileNetV2
        conv_layer("mbv2 conv3x3 s2 224x224x3->32", 224, 224, 3, 32, k=3, stride=2),
        conv_layer("mbv2 expand1x1 112x112x16->96", 112, 112, 16, 96),
        conv_layer("mbv2 expand1x1 28x28x32->192", 28, 28, 32, 192),
        conv_layer("mbv2 project1x1 14x14x384->64", 14, 14, 384, 64, activation="NONE"),
        depthwise_layer("mbv2 dw3x3 s2 112x112x96", 112, 112, 96, stride=2),
        depthwise_layer("mbv2 dw3x3 56x56x144", 56, 56, 144),
        depthwise_layer("mbv2 dw3x3 14x14x384", 14, 14, 384),
        fc_layer("mbv2 fc 1280->1000", 1280, 1000),
        # ResNet-18
        conv_layer("rn18 conv3x3 56x56x64->64", 56, 56, 64, 64, k=3, activation="RELU"),
        conv_layer("rn18 conv3x3 28x28x128->128", 28, 28, 128, 128, k=3, activation="RELU"),
        conv_layer("rn18 conv3x3 14x14x256->256", 14, 14, 256, 256, k=3, activation="RELU"),
        fc_layer("rn18 fc 512->1000", 512, 1000),
    ]
    if quick:
        keep = {"mbv2 expand1x1 28x28x32->192", "mbv2 dw3x3 14x14x384", "mbv2 fc 1280->1000",
                "rn18 conv3x3 14x14x256->256"}
        layers = [l for l in layers if l[0] in keep]
    return layers


# --- runners ------------------------------------------------------------------------------------

class LiteRT:
    """One interpreter, resized to the batch if it can be; ``run(x) -> outputs[0]``."""

    def __init__(self, content: bytes, batch: int, threads: int, builtin: bool, stateful: bool = False):
        # stateful: the model has variable tensors (an LSTM's state), which LiteRT carries from one
        # invoke to the next; every invoke then starts from reset (zero) state, as the engine does
        self.stateful = stateful
        kw = {"num_threads": threads}
        if builtin:
            kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.interp = Interpreter(model_content=content, **kw)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.batched = False
        try:
            self.interp.resize_tensor_input(self.inp["index"], [batch] + list(self.inp["shape"][1:]))
            self.interp.allocate_tensors()
            if stateful:
                self.interp.reset_all_variables()
            # Outputs behind a shape-computing subgraph (Keras Flatten) only get their batched
            # shape when the graph runs, so check after one invoke, not after allocate_tensors.
            self.interp.set_tensor(self.inp["index"], np.zeros([batch] + list(self.inp["shape"][1:]),
                                                               self.inp["dtype"]))
            self.interp.invoke()
            shape = self.interp.get_tensor(self.interp.get_output_details()[0]["index"]).shape
            self.batched = int(shape[0]) == batch
        except (RuntimeError, ValueError):
            self.batched = False
        if not self.batched:  # back to the file's shape, one sample per invoke
            self.interp = Interpreter(model_content=content, **kw)
            self.interp.allocate_tensors()
        self.in_idx = self.inp["index"]
        self.out_idx = self.interp.get_output_details()[0]["index"]

    def run(self, x: np.ndarray) -> np.ndarray:
        it = self.interp
        if self.batched:
            if self.stateful:  # each sample of the batch is its own sequence from zero state
                it.reset_all_variables()
            it.set_tensor(self.in_idx, x)
            it.invoke()
            return it.get_tensor(self.out_idx)
        return self.run_per_sample(x)

    def run_per_sample(self, x: np.ndarray) -> np.ndarray:
        """One invoke per sample (needs an interpreter made with batch 1)."""
        it = self.interp
        outs = []
        for i in range(x.shape[0]):
            if self.stateful:  # each sample is its own sequence: zero state, as the engine's
                it.reset_all_variables()
            it.set_tensor(self.in_idx, x[i:i + 1])
            it.invoke()
            outs.append(it.get_tensor(self.out_idx).copy())
        return np.concatenate(outs, axis=0)


GAP_S = 0.01  # pause between backends so spinning worker threads (OpenMP, ruy) go idle first


def time_calls(fns: list, repeats: int, min_time: float) -> list[float]:
    """Median time per call of each function in ``fns``.

    Each function is warmed up (compilation, allocation, caches) and gets a loop count so that one
    repeat lasts >= ``min_time`` seconds. The repeats are interleaved (A B C A B C ...) so that all
    backends see the same background load on a shared machine.
    """
    loops = []
    for fn in fns:
        fn()
        fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        loops.append(max(1, int(np.ceil(min_time / one))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            time.sleep(GAP_S)
            n = loops[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t0) / n)
    return [statistics.median(s) for s in samples]


def model_macs(model: Model) -> int:
    """Multiply-accumulates of one sample; ops without a count (or that fail to give one) count 0."""
    total = 0
    for op in model.ops:
        try:
            total += int(op_macs(op, model) or 0)
        except Exception:  # noqa: BLE001 -- a benchmark column, not worth a crash
            pass
    return total


def is_stateful(model: Model) -> bool:
    """The model has variable (state) tensors, e.g. an UNIDIRECTIONAL_SEQUENCE_LSTM's."""
    return any(getattr(t, "variable", False) for t in model.tensors)


def torch_twin(model: Model, x_float: np.ndarray):
    """``(net, xt)``: the model's float32 torch twin and input, or None if the twin cannot be built
    or run (ops it does not know, like SOFTMAX, LSTM, CONCATENATION, ...)."""
    try:
        net = TorchTwin(model).eval()
        xt = torch.from_numpy(np.ascontiguousarray(x_float, dtype=np.float32))
        with torch.inference_mode():
            net(xt)
    except Exception:  # noqa: BLE001 -- ValueError for unknown ops; anything else: no torch column either
        return None
    return net, xt


def input_batch(model: Model, batch: int, rng, fixture: Path | None) -> np.ndarray:
    t = model.tensors[model.inputs[0]]
    if fixture is not None and fixture.exists():
        x = np.load(fixture)["x"]
        reps = -(-batch // len(x))
        return np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:batch])
    shape = (batch,) + tuple(t.shape[1:])
    if t.dtype == np.float32:
        return rng.uniform(0, 1, size=shape).astype(np.float32)
    return rng.integers(-128, 128, size=shape, dtype=np.int64).astype(np.int8)


def count_mismatches(a: np.ndarray, b: np.ndarray) -> int:
    """Elements where ``a`` and ``b`` differ (every element if the shapes differ)."""
    if a.shape != b.shape:
        return int(max(a.size, b.size))
    return int(np.count_nonzero(a != b))


def bench_case(name, model, content, batch, x, threads, repeats, min_time):
    load1_before = _load1()
    busy = OtherBusy().start()
    numba.set_num_threads(threads)
    float_io = model.tensors[model.inputs[0]].dtype == np.float32
    engine_fn = model.predict if float_io else model.forward
    model.compiled(interface=float_io)  # the compiled plan (EDGE_QMUL_PLAN=off: the per-op path)
    y_engine = np.asarray(engine_fn(x))
    stateful = is_stateful(model)
    builtin = LiteRT(content, batch, threads, builtin=True, stateful=stateful)
    y_builtin = builtin.run(x).copy()
    xnn = LiteRT(content, batch, threads, builtin=False, stateful=stateful)
    y_xnn = xnn.run(x).copy()
    fns = [lambda: engine_fn(x), lambda: builtin.run(x), lambda: xnn.run(x)]
    twin = None
    if torch is not None:  # the same graph in float32 eager PyTorch, from the dequantized weights
        torch.set_num_threads(threads)
        x_float = x if x.dtype == np.float32 else \
            ((x.astype(np.float32) - model.tensors[model.inputs[0]].quant.zp) * model.tensors[model.inputs[0]].quant.s)
        twin = torch_twin(model, x_float)
    if twin is not None:
        net, xt = twin

        def torch_fn():
            with torch.inference_mode():
                return net(xt)
        fns.append(torch_fn)
    times = time_calls(fns, repeats, min_time)
    engine_s, builtin_s, xnn_s = times[:3]
    torch_s = times[3] if twin is not None else None
    busy_other = round(busy.value(), 2)

    # The engine's reference is LiteRT built-in run one sample at a time (how the fixtures' y_builtin
    # were made). With batch > 1 the timed, resized interpreter can differ from it: LiteRT's
    # DEQUANTIZE takes a vectorized path on larger tensors that computes q*s - zp*s instead of
    # (q - zp)*s, 1 ulp apart on some float outputs. So count both. The reference runs on 1 thread,
    # as the fixtures' were made: LiteRT's built-in kernels can depend on the thread count too (its
    # multi-threaded int8 MEAN differs from its single-threaded one on MobileNetV3's squeeze-excite).
    if threads == 1 and (batch == 1 or not builtin.batched):
        y_ref = y_builtin
    else:
        y_ref = LiteRT(content, 1, 1, builtin=True, stateful=stateful).run_per_sample(x)
    mism = count_mismatches(y_engine, y_builtin)
    mism_ref = count_mismatches(y_engine, y_ref)
    builtin_self = count_mismatches(y_builtin, y_ref)  # LiteRT built-in (this batch, threads) vs its reference
    mism_xnn = count_mismatches(y_xnn, y_builtin)
    m = model_macs(model)
    notes = []
    if float_io:
        notes.append("float io: engine runs predict()")
    if not builtin.batched or not xnn.batched:
        notes.append("litert per-sample (resize failed)")
    if builtin_self:
        notes.append(f"litert built-in at batch {batch}, {threads} thread(s) differs from itself one sample at a "
                     f"time on 1 thread in {builtin_self} element(s)")
    if stateful:
        notes.append("variable tensors: litert state reset before each invoke")
    if torch is not None and twin is None:
        notes.append("no torch twin (ops it does not know)")
    return {
        "name": name, "threads": threads, "batch": batch,
        "engine_s": engine_s, "litert_builtin_s": builtin_s, "litert_xnnpack_s": xnn_s, "torch_s": torch_s,
        "macs": m, "gops": 2.0 * m * batch / engine_s / 1e9,
        "gops_builtin": 2.0 * m * batch / builtin_s / 1e9,
        "gops_xnnpack": 2.0 * m * batch / xnn_s / 1e9,
        "mismatches": mism, "mismatches_vs_per_sample_builtin": mism_ref, "outputs": int(y_builtin.size),
        "xnnpack_vs_builtin_mismatches": mism_xnn, "builtin_vs_per_sample_builtin_mismatches": builtin_self,
        "litert_batched": bool(builtin.batched and xnn.batched), "notes": "; ".join(notes),
        "load1_before": load1_before, "cpu_busy_other": busy_other,
    }


# --- table --------------------------------------------------------------------------------------

def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _torch(r) -> str:
    return fmt_s(r["torch_s"]) if r.get("torch_s") else "-"


def _torch_ratio(r) -> str:
    return f"{r['engine_s'] / r['torch_s']:.2f}" if r.get("torch_s") else "-"


def table(rows) -> str:
    head = ("name", "thr", "batch", "engine", "builtin", "xnnpack", "torch", "eng/bi", "eng/xnn", "eng/torch",
            "GOP/s", "mism", "mism/1", "xnn!=bi", "other")
    lines = [head]
    for r in rows:
        lines.append((r["name"], str(r["threads"]), str(r["batch"]), fmt_s(r["engine_s"]),
                      fmt_s(r["litert_builtin_s"]), fmt_s(r["litert_xnnpack_s"]), _torch(r),
                      f"{r['engine_s'] / r['litert_builtin_s']:.2f}",
                      f"{r['engine_s'] / r['litert_xnnpack_s']:.2f}", _torch_ratio(r), f"{r['gops']:.3f}",
                      f"{r['mismatches']}/{r['outputs']}", str(r["mismatches_vs_per_sample_builtin"]),
                      str(r["xnnpack_vs_builtin_mismatches"]), f"{r['cpu_busy_other']:.2f}"))
    widths = [max(len(l[c]) for l in lines) for c in range(len(head))]
    out = []
    for i, l in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(l, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows) -> str:
    head = ["name", "threads", "batch", "engine", "LiteRT builtin", "LiteRT XNNPACK", "PyTorch fp32",
            "engine/builtin", "engine/XNNPACK", "engine/PyTorch", "engine GOP/s", "mismatches (batched builtin)",
            "mismatches (per-sample builtin)", "XNNPACK != builtin", "other load (CPUs)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["name"], str(r["threads"]), str(r["batch"]), fmt_s(r["engine_s"]), fmt_s(r["litert_builtin_s"]),
            fmt_s(r["litert_xnnpack_s"]), _torch(r), f"{r['engine_s'] / r['litert_builtin_s']:.2f}",
            f"{r['engine_s'] / r['litert_xnnpack_s']:.2f}", _torch_ratio(r), f"{r['gops']:.3f}",
            f"{r['mismatches']}/{r['outputs']}", str(r["mismatches_vs_per_sample_builtin"]),
            str(r["xnnpack_vs_builtin_mismatches"]), f"{r['cpu_busy_other']:.2f}"]) + " |")
    return "\n".join(out)


def best_markdown(rows) -> str:
    """Each side at its best thread count, per (name, batch): the table the performance targets use
    (engine / built-in <= 1.0 means the engine is at least as fast)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["name"], r["batch"]), []).append(r)
    head = ["model / layer", "batch", "engine", "LiteRT built-in", "LiteRT XNNPACK", "PyTorch fp32",
            "engine / built-in", "engine / XNNPACK", "engine / PyTorch", ">= 1.0x built-in"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, batch), rs in groups.items():
        best = {k: min(r[k] for r in rs) for k in ("engine_s", "litert_builtin_s", "litert_xnnpack_s")}
        torch_s = min((r["torch_s"] for r in rs if r.get("torch_s")), default=None)
        ratio = best["engine_s"] / best["litert_builtin_s"]
        out.append("| " + " | ".join([
            name, str(batch), fmt_s(best["engine_s"]), fmt_s(best["litert_builtin_s"]),
            fmt_s(best["litert_xnnpack_s"]), fmt_s(torch_s) if torch_s else "-", f"{ratio:.2f}",
            f"{best['engine_s'] / best['litert_xnnpack_s']:.2f}",
            f"{best['engine_s'] / torch_s:.2f}" if torch_s else "-", "yes" if ratio <= 1.0 else "no"]) + " |")
    return "\n".join(out)


def _load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python benchmarks/forward.py --json benchmarks/results/forward.json")
    ap.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median "
                    "reported); default 11, or 3 with --quick")
    ap.add_argument("--min-time", type=float, default=None, help="seconds each repeat lasts at least "
                    "(batches run back to back); default 0.03, or 0.01 with --quick")
    ap.add_argument("--quick", action="store_true", help="fewer layers, repeats and shorter repeats")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--batches", default="1,32", help="batch sizes for every model and layer (default 1,32; "
                    "--quick: the fixtures at 8 and the layers at 1)")
    ap.add_argument("--zoo", action="store_true", help="also the real-world models of tests/fixtures/zoo "
                    "(rows zoo/NAME, at the fixtures' batches; --only zoo runs just those)")
    ap.add_argument("--only", default=None, help="comma-separated name substrings: run only those rows "
                    "(e.g. --only 'rn18,expand')")
    ap.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier run's "
                    "JSON (no measurement)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
        print(table(rows))
        print()
        print(markdown(rows))
        print()
        print(best_markdown(rows))
        return 0
    repeats = args.repeats or (3 if args.quick else 11)
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.03)
    threads = [t for t in THREADS if t <= numba.config.NUMBA_NUM_THREADS]

    rng = np.random.default_rng(1234)
    cases = []  # (name, model, content, batch, x)
    fixture_batches = [FIXTURE_BATCH] if args.quick else [int(b) for b in args.batches.split(",")]
    layer_batches = [LAYER_BATCH] if args.quick else fixture_batches
    files = [(p.stem, p) for p in sorted(FIXTURES.glob("*.tflite"))]
    files += [(f"zoo/{p.stem}", p) for p in sorted(ZOO.glob("*.tflite"))] if args.zoo else []
    for name, path in files:
        model, content = load_tflite(path), path.read_bytes()
        for batch in fixture_batches:
            cases.append((name, model, content, batch,
                          input_batch(model, batch, rng, path.with_suffix(".npz"))))
    for name, model in single_layers(args.quick):
        for batch in layer_batches:
            cases.append((name, model, to_bytes(model), batch, input_batch(model, batch, rng, None)))

    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c[0] for w in wanted)]
        if not cases:
            hint = " (the zoo's rows need --zoo)" if not args.zoo and any("zoo" in w for w in wanted) else ""
            ap.error(f"--only {args.only!r} matches no model or layer{hint}")
    print(f"# {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"numpy {np.__version__}, numba {numba.__version__} ("
          f"threads {threads}); repeats={repeats} min_time={min_time}s; load average {_loadavg()}",
          flush=True)
    rows = []
    t_start = time.perf_counter()
    for name, model, content, batch, x in cases:
        for t in threads:
            row = bench_case(name, model, content, batch, x, t, repeats, min_time)
            rows.append(row)
            print(f"  {name:36s} thr={t} engine={fmt_s(row['engine_s']):>10s} "
                  f"builtin={fmt_s(row['litert_builtin_s']):>10s} xnnpack={fmt_s(row['litert_xnnpack_s']):>10s}"
                  f" mismatches={row['mismatches']}/{row['mismatches_vs_per_sample_builtin']}" + (f"  [{row['notes']}]" if row["notes"] else ""),
                  flush=True)
    print(f"# total {time.perf_counter() - t_start:.1f} s, load average {_loadavg()}\n")
    print(table(rows))
    if args.markdown:
        print()
        print(markdown(rows))
        print()
        print(best_markdown(rows))
    print("\nmism: output elements where the engine differs from the timed (batched) LiteRT built-in;"
          " mism/1: from LiteRT built-in run one sample at a time on 1 thread (the engine's bit-exact reference);"
          " xnn!=bi: XNNPACK vs built-in (ties rounded differently; expected). GOP/s = 2*MACs*batch/engine_s."
          " other: CPUs kept busy by other processes (and hypervisor steal) while the row ran; on a"
          " 2-CPU machine anything near 1 spoils the 2-thread timings.")
    bad = [r for r in rows if r["mismatches_vs_per_sample_builtin"]]
    for label, sel in (("LiteRT built-in one sample at a time (the reference)", bad),
                       ("the batched LiteRT built-in", [r for r in rows if r["mismatches"] and r not in bad])):
        if sel:
            print(f"\nWARNING: engine differs from {label} in {len(sel)} row(s): "
                  + ", ".join(f"{r['name']} (thr {r['threads']}, batch {r['batch']})" for r in sel), file=sys.stderr)
    self_diff = [r for r in rows if r.get("builtin_vs_per_sample_builtin_mismatches")]
    if self_diff:
        print(f"\nNOTE: LiteRT built-in itself differs from its 1-thread per-sample reference in {len(self_diff)} "
              "row(s) (a thread count or batch dependence of LiteRT's kernels, not the engine): "
              + ", ".join(f"{r['name']} (thr {r['threads']}, batch {r['batch']}: "
                          f"{r['builtin_vs_per_sample_builtin_mismatches']})" for r in self_diff), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
