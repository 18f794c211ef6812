"""Contention benchmark: the engine beside other programs that want the same CPUs.

    python benchmarks/contention.py [--json OUT] [--markdown] [--quick] [--repeats N] [--min-time S]
                                    [--configs default,passive,...] [--loads none,spin1,...]
                                    [--workloads NAME,...] [--threads 1,2] [--from-json A,B]

EDGE_QMUL_ENGINE_ROOT=DIR imports edge_qmul from DIR (e.g. ``git archive HEAD edge_qmul | tar -x -C DIR``
while the working tree is being edited) and EDGE_QMUL_ENGINE_COMMIT names that commit in the JSON.

Workloads (the engine in a fresh worker subprocess, threads set with ``numba.set_num_threads``):

  * ``fwd digits_cnn b1|b32``, ``fwd mobilenet_tiny b1|b32``: ``model.forward(x)`` of
    tests/fixtures/*.tflite (``edge_qmul.api.load_tflite``), x = the fixture's ``x`` repeated to the batch;
  * ``train digits_cnn b32``, ``train mobilenet_tiny b32``: ``Trainer(model, lr=0.01).step(x8, y)`` on the
    models and data benchmarks/train_step.py uses (rebuilt here: train_step.py imports torch at module
    level, which would put torch's threads in every process of this benchmark).

at engine threads 1 and 2 (and ``auto`` under the ``auto`` config, see below), under each load, each
load being separate processes started before the worker and killed after it:

  * ``none``: nothing else started;
  * ``spin1`` / ``spin2``: one / two pure-Python busy loops;
  * ``engine``: a second engine process running the same workload as the one being timed, in a
    loop, at 2 threads (another OpenMP program; it follows the worker's current workload);
  * ``litert``: ai_edge_litert ``Interpreter`` (default resolver, XNNPACK, ``num_threads=2``)
    invoking tests/fixtures/mobilenet_tiny.tflite (batch 1) in a loop;
  * ``agent`` (optional, not in the default list): a Python thread inside the worker process
    busy-looping (the agent's own request/MQTT threads at their worst: they hold the GIL and a core).

Configurations (``--configs``; each is environment given to the worker and to the second-engine
load, so they take effect before numba starts its threads):

  * ``default``: nothing set (numba's OpenMP layer, libgomp defaults; since edge_qmul/threads.py the
    engine itself then follows the load: the threads asked for are a ceiling);
  * ``fixed``: ``EDGE_QMUL_THREADS=fixed``: the engine keeps the threads asked for (the engine's
    behaviour before edge_qmul/threads.py);
  * ``passive``: ``OMP_WAIT_POLICY=passive`` (waiting OpenMP threads sleep at once);
  * ``spin10k``: ``GOMP_SPINCOUNT=10000`` (spin ~30x shorter than the default 300000 before sleeping);
  * ``active``: ``OMP_WAIT_POLICY=active`` (spin forever);
  * ``workqueue``: ``NUMBA_THREADING_LAYER=workqueue`` (numba's own pool, no OpenMP);
  * ``auto``: default environment, and an extra engine-thread setting ``auto``: first from a 0.1 s look
    at /proc/stat, then before each call, at most every 0.25 s, the worker reads /proc/stat, subtracts
    its own CPU time, and sets ``numba.set_num_threads(max(1, round(cpus - other_busy)))`` (clamped to
    1..cpus): the thread count chosen from the load;
  * ``auto_passive``: ``auto`` with ``OMP_WAIT_POLICY=passive``;
  * ``auto_half`` / ``auto_half_passive``: as ``auto`` / ``auto_passive`` with another rule: give up every
    CPU that other processes keep more than half busy, ``cpus - ceil(other_busy - 0.5)`` (at least 1; on 2
    CPUs: 1 thread as soon as others use half a CPU). ``round`` undercounts a spinner while the engine
    itself runs 2 threads (the engine then takes part of the spinner's core), so it flips back to 2.

Timing: each (workload, threads) cell is warmed up (4 calls, the last one timed to size the repeats; 1
with ``--quick``, which also stops a cell after its first repeat once it has lasted 0.5 s), then each
repeat runs enough back-to-back calls to last >= ``--min-time`` (30 ms), timing every call; ``median``
is the median over repeats of the mean call time in a repeat (as forward.py), ``p90`` the 90th
percentile of the single calls (OpenMP cliffs show in tails). ``other`` is the CPUs kept busy by other
processes while the cell ran (/proc/stat minus the worker's own CPU time). Slowdowns are against the
same configuration's ``none`` row at the same threads and against its 1-thread ``none`` row; a row is
flagged when the first is > 2 (``>2x``) or, for more than 1 thread, when the median is > 1.1x the engine
alone on 1 thread (``<1t``). ``--from-json A,B`` re-annotates and prints earlier runs without measuring.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# EDGE_QMUL_ENGINE_ROOT: import edge_qmul from another checkout (e.g. a `git archive` of a commit, while the
# working tree is being edited; EDGE_QMUL_ENGINE_COMMIT then names its commit in the JSON); fixtures still
# come from this repository
ENGINE_ROOT = Path(os.environ.get("EDGE_QMUL_ENGINE_ROOT") or ROOT).resolve()
if str(ENGINE_ROOT) not in sys.path:
    sys.path.insert(0, str(ENGINE_ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

WORKLOADS = ("fwd digits_cnn b1", "fwd digits_cnn b32", "fwd mobilenet_tiny b1", "fwd mobilenet_tiny b32",
             "train digits_cnn b32", "train mobilenet_tiny b32")
LOADS = ("none", "spin1", "spin2", "engine", "litert")
ALL_LOADS = LOADS + ("agent",)
CONFIGS = {
    "default": {},
    "fixed": {"EDGE_QMUL_THREADS": "fixed"},
    "passive": {"OMP_WAIT_POLICY": "passive"},
    "active": {"OMP_WAIT_POLICY": "active"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "auto": {},
    "auto_passive": {"OMP_WAIT_POLICY": "passive"},
    "auto_half": {"EDGE_QMUL_CONTENTION_AUTO_RULE": "half"},
    "auto_half_passive": {"EDGE_QMUL_CONTENTION_AUTO_RULE": "half", "OMP_WAIT_POLICY": "passive"},
}
# knobs the worker must not inherit from the caller's shell (they would change the configuration)
CLEARED_ENV = ("EDGE_QMUL_THREADS", "EDGE_QMUL_CONTENTION_AUTO_RULE", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
               "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_PROC_BIND")
LR = 0.01
BATCH_TRAIN = 32
LOAD_ENGINE_THREADS = 2
LITERT_THREADS = 2


# --- /proc/stat (edge_qmul.threads.OtherBusy's twin: this script must also run an engine checkout older than it)

def cpu_stat():
    """(busy CPU seconds of the whole machine incl. steal, wall clock), or None."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / hz


class OtherBusy:
    """CPUs kept busy by other processes between start() and value() (machine busy - own CPU time)."""

    def start(self):
        self.s0, self.t0, self.p0 = cpu_stat(), time.perf_counter(), time.process_time()
        return self

    def value(self) -> float:
        s1, wall = cpu_stat(), time.perf_counter() - self.t0
        if self.s0 is None or s1 is None or wall <= 0:
            return float("nan")
        return max(0.0, (s1 - self.s0) - (time.process_time() - self.p0)) / wall


class AutoThreads:
    """Thread count chosen from the load: every ``period`` s (checked at call boundaries) read how many
    CPUs other processes kept busy since the last check and use the CPUs left (at least 1)."""

    def __init__(self, period: float = 0.25, rule: str = "round"):
        import numba
        self.rule = rule
        self.numba = numba
        self.cpus = numba.config.NUMBA_NUM_THREADS
        self.period = period
        # the first decision from a 0.1 s look at the machine (an engine would keep its decision from call
        # to call; here each cell starts a new one, so it must not start blind at 2 threads)
        self.win = OtherBusy().start()
        time.sleep(0.1)
        self.win.t0 -= period
        self.update()
        self.chosen: list[int] = []

    def update(self):
        if time.perf_counter() - self.win.t0 >= self.period:
            other = self.win.value()
            if math.isnan(other):
                n = self.cpus
            elif self.rule == "half":  # give up every CPU that others keep more than half busy
                n = max(1, min(self.cpus, self.cpus - math.ceil(other - 0.5)))
            else:  # "round": the CPUs left, rounded
                n = max(1, min(self.cpus, round(self.cpus - other)))
            if n != self.numba.get_num_threads():
                self.numba.set_num_threads(n)
            self.win = OtherBusy().start()
        if hasattr(self, "chosen"):
            self.chosen.append(self.numba.get_num_threads())


# --- workloads --------------------------------------------------------------------------------------

def build_workload(name: str):
    """A no-argument function running one call of the workload (model loaded/built, input ready)."""
    import numpy as np
    kind, model_name, b = name.split()
    batch = int(b[1:])
    if kind == "fwd":
        from edge_qmul.api import load_tflite
        model = load_tflite(str(FIXTURES / f"{model_name}.tflite"))
        if hasattr(model, "compiled"):  # build the compiled plan now, not inside a timed call
            model.compiled()
        x = np.load(FIXTURES / f"{model_name}.npz")["x"]
        x = np.ascontiguousarray(np.concatenate([x] * -(-batch // len(x)), axis=0)[:batch])
        return lambda: model.forward(x)
    # training step: the models and batches of benchmarks/train_step.py's workloads()
    from edge_qmul import datasets, models
    from edge_qmul.quant import quantize
    from edge_qmul.train import Trainer
    rng = np.random.default_rng(0)
    if model_name == "digits_cnn":
        d = datasets.load("digits", seed=0)
        idx = rng.permutation(len(d.y_train))
        shape, calib, xf, y = (8, 8, 1), d.x_train[idx[:256]], d.x_train[idx[:batch]], d.y_train[idx[:batch]]
    else:
        xs = rng.uniform(0.0, 1.0, size=(256 + batch, 32, 32, 3)).astype(np.float32)
        shape, calib, xf = (32, 32, 3), xs[:256], xs[256:]
        y = rng.integers(0, 10, size=batch).astype(np.int64)
    m = models.build(model_name, shape, 10, seed=0, calib_x=calib)
    x8 = quantize(xf, m.tensors[m.core_inputs[0]].quant)
    trainer = Trainer(m, lr=LR)
    return lambda: trainer.step(x8, y)


# --- loads (run until killed) -------------------------------------------------------------------------

def _orphaned(ppid: int) -> bool:
    """The process that started this load is gone (killed without stopping its loads): stop too."""
    return os.getppid() != ppid


def load_spin():
    ppid = os.getppid()
    print("ready", flush=True)
    x = 0
    while True:
        x += 1
        if x % 10_000_000 == 0 and _orphaned(ppid):
            return


def load_litert():
    import numpy as np
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover
        from tflite_runtime.interpreter import Interpreter  # type: ignore
    it = Interpreter(model_path=str(FIXTURES / "mobilenet_tiny.tflite"), num_threads=LITERT_THREADS)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    x = np.load(FIXTURES / "mobilenet_tiny.npz")["x"][:1]
    it.set_tensor(inp["index"], x)
    it.invoke()
    ppid = os.getppid()
    print("ready", flush=True)
    while not _orphaned(ppid):
        it.invoke()


def load_engine(sync: Path, workloads: list[str]):
    """Runs the workload named in ``sync`` (written by the worker) in a loop, at 2 threads."""
    import numba
    numba.set_num_threads(min(LOAD_ENGINE_THREADS, numba.config.NUMBA_NUM_THREADS))
    fns = {w: build_workload(w) for w in workloads}
    for fn in fns.values():  # compile / warm up everything before the worker starts
        fn()
        fn()
    current = {"name": workloads[0]}

    def follow():
        last = None
        while True:
            try:
                txt = sync.read_text().strip()
            except OSError:
                txt = ""
            if txt and txt != last and txt in fns:
                current["name"] = last = txt
            time.sleep(0.02)

    threading.Thread(target=follow, daemon=True).start()
    ppid = os.getppid()
    print("ready", flush=True)
    while not _orphaned(ppid):
        fns[current["name"]]()


# --- the worker: times every (workload, threads) cell ------------------------------------------------------

def percentile(v: list[float], q: float) -> float:
    s = sorted(v)
    k = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[k]


def agent_thread(stop: threading.Event):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def worker(args) -> list[dict]:
    import numba
    layer = None
    rows = []
    sync = Path(args.sync) if args.sync else None
    stop = threading.Event()
    if args.agent:
        threading.Thread(target=agent_thread, args=(stop,), daemon=True).start()
    threads_list = [t for t in args.threads.split(",")]
    for w in args.workloads.split(","):
        fn = build_workload(w)
        if sync is not None:
            sync.write_text(w + "\n")
            time.sleep(0.3)  # the second engine switches to this workload
        for th in threads_list:
            rule = os.environ.get("EDGE_QMUL_CONTENTION_AUTO_RULE", "round")
            auto = AutoThreads(rule=rule) if th == "auto" else None
            if auto is None:
                numba.set_num_threads(min(int(th), numba.config.NUMBA_NUM_THREADS))

            def call():
                if auto is not None:
                    auto.update()
                fn()

            for _ in range(args.warmup - 1):
                call()
            if layer is None:
                layer = numba.threading_layer()
            t0 = time.perf_counter()  # the last warm-up call also sizes the repeats
            call()
            one = max(time.perf_counter() - t0, 1e-7)
            n = max(1, int(math.ceil(args.min_time / one)))
            means, calls = [], []
            busy = OtherBusy().start()
            cell0 = time.perf_counter()
            for _ in range(args.repeats):
                if args.max_cell_time and means and time.perf_counter() - cell0 > args.max_cell_time:
                    break  # --quick: a cell caught in a cliff (0.1-4 s per call) stops after 1 repeat
                ts = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    call()
                    ts.append(time.perf_counter() - t0)
                means.append(sum(ts) / n)
                calls.extend(ts)
            row = {"workload": w, "threads": th, "median_s": statistics.median(means),
                   "p90_s": percentile(calls, 0.9), "max_s": max(calls), "repeat_means_s": means,
                   "calls_per_repeat": n, "repeats": len(means), "cpu_busy_other": round(busy.value(), 2),
                   "numba_threading_layer": layer}
            if auto is not None:
                ch = auto.chosen
                row["auto_threads_mean"] = round(sum(ch) / len(ch), 2)
            rows.append(row)
            print(f"  {w:24s} threads {th:4s} median {fmt(row['median_s'])} p90 {fmt(row['p90_s'])} "
                  f"other {row['cpu_busy_other']}", file=sys.stderr)
    stop.set()
    return rows


# --- orchestration --------------------------------------------------------------------------------------

def child_env(config: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(CONFIGS[config])
    env["PYTHONPATH"] = str(ENGINE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_load(kind: str, config: str, sync: Path, workloads: list[str]) -> list[subprocess.Popen]:
    me = [sys.executable, str(Path(__file__).resolve())]
    if kind in ("none", "agent"):
        return []
    if kind in ("spin1", "spin2"):
        cmds = [me + ["--load", "spin"]] * (1 if kind == "spin1" else 2)
    elif kind == "engine":
        cmds = [me + ["--load", "engine", "--sync", str(sync), "--workloads", ",".join(workloads)]]
    elif kind == "litert":
        cmds = [me + ["--load", "litert"]]
    else:
        raise ValueError(kind)
    procs = [subprocess.Popen(c, env=child_env(config), stdout=subprocess.PIPE, text=True,
                              start_new_session=True) for c in cmds]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            stop_load(procs)
            raise RuntimeError(f"load {kind} did not start (exit {p.poll()})")
    time.sleep(0.2)
    return procs


def stop_load(procs: list[subprocess.Popen]):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_cell_set(config: str, load: str, workloads: list[str], threads: list[str], repeats: int,
                 min_time: float, sync: Path, quick: bool = False) -> list[dict]:
    sync.write_text(workloads[0] + "\n")
    procs = start_load(load, config, sync, workloads)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workloads", ",".join(workloads),
               "--threads", ",".join(threads), "--repeats", str(repeats), "--min-time", str(min_time)]
        if quick:
            cmd += ["--quick"]
        if load == "engine":
            cmd += ["--sync", str(sync)]
        if load == "agent":
            cmd += ["--agent"]
        out = subprocess.run(cmd, env=child_env(config), stdout=subprocess.PIPE, text=True, check=True).stdout
    finally:
        stop_load(procs)
    rows = json.loads(out.strip().splitlines()[-1])
    for r in rows:
        r["config"], r["load"], r["env"] = config, load, CONFIGS[config]
    return rows


def annotate(rows: list[dict]) -> None:
    alone = {(r["config"], r["workload"], r["threads"]): r["median_s"] for r in rows if r["load"] == "none"}
    for r in rows:
        a = alone.get((r["config"], r["workload"], r["threads"]))
        a1 = alone.get((r["config"], r["workload"], "1"))
        r["slowdown_vs_alone"] = round(r["median_s"] / a, 3) if a else None
        r["ratio_vs_1thread_alone"] = round(r["median_s"] / a1, 3) if a1 else None
        r["p90_vs_alone"] = round(r["p90_s"] / a, 3) if a else None
        # the acceptance: at most 2x slower than alone, and (for more than 1 thread) never worse than the engine
        # on 1 thread alone (10% allowed for noise); on 1 thread the second criterion is the first's number
        over2 = (r["slowdown_vs_alone"] or 0) > 2
        worse1 = r["threads"] != "1" and (r["ratio_vs_1thread_alone"] or 0) > 1.1
        r["flag"] = bool(over2 or worse1)
        r["flags"] = (">2x " if over2 else "") + ("<1t" if worse1 else "")


def engine_source() -> dict:
    """The git commit of this repository and whether edge_qmul/ has uncommitted changes (only meaningful
    when the engine is imported from this repository, see EDGE_QMUL_ENGINE_ROOT)."""
    if ENGINE_ROOT != ROOT:  # e.g. `git archive HEAD edge_qmul | tar -x -C DIR`: say which commit in the env
        return {"commit": os.environ.get("EDGE_QMUL_ENGINE_COMMIT"), "edge_qmul_dirty": None,
                "engine_from_this_repo": False}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "edge_qmul"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": head, "edge_qmul_dirty": bool(dirty), "engine_from_this_repo": ENGINE_ROOT == ROOT}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "edge_qmul_dirty": None, "engine_from_this_repo": ENGINE_ROOT == ROOT}


def fmt(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def markdown(rows: list[dict]) -> str:
    head = ("| config | workload | threads | load | median | p90 | slowdown vs alone | vs 1 thread alone | "
            "other (CPUs) | flag |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        th = r["threads"] + (f" ({r['auto_threads_mean']:.1f})" if "auto_threads_mean" in r else "")
        lines.append("| " + " | ".join([
            r["config"], r["workload"], th, r["load"], fmt(r["median_s"]), fmt(r["p90_s"]),
            f"{r['slowdown_vs_alone']:.2f}" if r["slowdown_vs_alone"] else "-",
            f"{r['ratio_vs_1thread_alone']:.2f}" if r["ratio_vs_1thread_alone"] else "-",
            f"{r['cpu_busy_other']:.2f}", r["flags"].strip()]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python benchmarks/contention.py --json "
                                        "benchmarks/results/contention.json --markdown")
    ap.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown on stdout")
    ap.add_argument("--quick", action="store_true", help="3 short repeats (a smoke test, not a measurement)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per cell; default 9, 3 with --quick")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per repeat; default 0.03, "
                    "0.01 with --quick")
    ap.add_argument("--configs", default="default", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma list of {', '.join(ALL_LOADS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    ap.add_argument("--threads", default="1,2", help="engine thread counts (auto configs add 'auto')")
    # internal modes
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load", choices=("spin", "engine", "litert"), help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    ap.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--from-json", help="comma list of earlier --json files: re-annotate, print (and with "
                    "--json write) them, without measuring")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.03)

    if args.load == "spin":
        load_spin()
        return 0
    if args.load == "litert":
        load_litert()
        return 0
    if args.load == "engine":
        load_engine(Path(args.sync), args.workloads.split(","))
        return 0
    if args.worker:
        args.repeats, args.min_time = repeats, min_time
        args.warmup, args.max_cell_time = (1, 0.5) if args.quick else (4, None)
        rows = worker(args)
        print(json.dumps(rows))
        return 0

    if args.from_json:
        rows = [r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())]
        annotate(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(markdown(rows), file=sys.stdout if args.markdown else sys.stderr)
        return 0
    workloads = [w for w in args.workloads.split(",") if w]
    loads = [l for l in args.loads.split(",") if l]
    if "none" not in loads:
        loads.insert(0, "none")
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c}")
    for l in loads:
        if l not in ALL_LOADS:
            ap.error(f"unknown load {l}")
    import numba
    import numpy as np
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy "
          f"{np.__version__}, numba {numba.__version__}; repeats {repeats}, min-time {min_time}s; configs "
          f"{configs}; loads {loads}", file=sys.stderr)
    # SIGTERM (e.g. a test's timeout) unwinds like Ctrl-C, so that the loads are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sync = Path(f"/tmp/edge_qmul_contention_{os.getpid()}.sync")
    rows = []
    t_start = time.perf_counter()
    try:
        for c in configs:
            threads = args.threads.split(",") + (["auto"] if c.startswith("auto") else [])
            for l in loads:
                print(f"[{c}] load {l}", file=sys.stderr)
                rows.extend(run_cell_set(c, l, workloads, threads, repeats, min_time, sync, args.quick))
    finally:
        sync.unlink(missing_ok=True)
    annotate(rows)
    meta = {"engine_root": str(ENGINE_ROOT), "engine_source": engine_source(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "load_engine_threads": LOAD_ENGINE_THREADS,
            "litert_threads": LITERT_THREADS, "wall_s": round(time.perf_counter() - t_start, 1)}
    try:
        import ai_edge_litert
        meta["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    for r in rows:
        r["meta"] = meta
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    table = markdown(rows)
    print(table, file=sys.stdout if args.markdown else sys.stderr)
    print(f"# {meta['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
