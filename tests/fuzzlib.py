"""Structure-aware mutation of real .tflite files, and the worker processes that load the mutants.

``tflite_sites`` walks a .tflite flatbuffer with the generated ``tflite`` accessors and lists where
each field of interest lies in the file: tensor shapes (elements and lengths), types and buffer
indices, quantization scale / zero-point arrays (elements and lengths) and quantized dimension,
buffer data lengths and int32 (bias) buffer values, operator opcode indices, inputs, outputs,
options type and option fields, operator codes, subgraph inputs and outputs, every table's vtable
entries and vtable offset, every reference's uoffset, vector lengths and the root offset.
``mutate_tflite`` writes one boundary or random value into one such site (of a kind drawn first,
so rare kinds are not drowned by frequent ones), or cuts / extends the file at a structural
boundary. Mutation ``i`` of model ``name`` under ``seed`` is a pure function of the three, so any
finding is replayed from its numbers alone (``mutant(name, seed, i)``).

Run as a script (``python fuzzlib.py NAME SEED START STOP``) it is one worker: it loads each mutant
with the engine's loader, runs a forward pass on the fixture's valid input when it loads, and
prints one line per mutation: index, kind, outcome (``refused``: ModelError at load; ``ran``: int8
outputs of the declared shapes; ``run_refused``: ModelError at the forward pass; ``FINDING``:
anything else) and a detail. ``run_workers`` runs such workers in subprocesses, so a segfault or a
hang is a finding naming its mutation instead of the end of pytest.
"""
from __future__ import annotations

import os
import random
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TFLITE_MODELS = ("digits_cnn", "digits_cnn_floatio", "mlp40", "mobilenet_tiny", "resnet_tiny")
TFLITE_KINDS = (
    "tensor_shape", "tensor_rank", "tensor_type", "tensor_buffer", "tensor_is_variable",
    "quant_scale", "quant_scale_len", "quant_zero_point", "quant_zero_point_len", "quant_dimension",
    "buffer_size", "bias_values", "op_opcode_index", "op_io", "op_io_len", "op_options_type",
    "op_options_field", "opcode_code", "opcode_version", "graph_io", "graph_io_len", "vector_len",
    "vtable", "soffset", "uoffset", "root_offset", "truncate", "extend",
)
LENGTH_KINDS = {"tensor_rank", "quant_scale_len", "quant_zero_point_len", "buffer_size", "op_io_len",
                "graph_io_len", "vector_len"}
INTS = (0, 1, -1, 2, 3, 4, 7, 8, 16, 127, 128, -128, 255, 256, 65535, 65536, 2**31 - 1, -(2**31),
        2**32 - 1, 2**24 + 1)
FLOATS = (0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 1e-38, 1e38, 3.4e38,
          1e-10, 1.0, 1e5, -1e-3)


# ------------------------------------------------------------------------------------- sites

def _u32(buf: bytes, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def tflite_sites(buf: bytes) -> dict[str, list[tuple[int, str]]]:
    """kind -> [(byte position, struct format)] of the fields of a valid .tflite ``buf``."""
    import tflite
    sites: dict[str, list[tuple[int, str]]] = {k: [] for k in TFLITE_KINDS}
    add = lambda kind, pos, fmt: sites[kind].append((pos, fmt))  # noqa: E731

    def table(tab) -> None:
        add("soffset", tab.Pos, "<i")
        vt = tab.Pos - struct.unpack_from("<i", buf, tab.Pos)[0]
        for e in range(0, struct.unpack_from("<H", buf, vt)[0], 2):
            add("vtable", vt + e, "<H")

    def scalar(tab, slot: int, kind: str, fmt: str) -> None:
        o = tab.Offset(slot)
        if o:
            add(kind, tab.Pos + o, fmt)

    def vector(tab, slot: int, kind: str | None, fmt: str, len_kind: str = "vector_len") -> tuple[int, int]:
        o = tab.Offset(slot)
        if not o:
            return 0, 0
        add("uoffset", tab.Pos + o, "<I")
        start, n = tab.Vector(o), tab.VectorLen(o)
        add(len_kind, start - 4, "<I")
        if kind:
            for i in range(n):
                add(kind, start + i * struct.calcsize(fmt), fmt)
        return start, n

    m = tflite.Model.GetRootAsModel(buf, 0)
    add("root_offset", 0, "<I")
    table(m._tab)
    for slot in (6, 8, 12):  # operator codes, subgraphs, buffers
        vector(m._tab, slot, None, "<I")
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        table(oc._tab)
        scalar(oc._tab, 4, "opcode_code", "<b")
        scalar(oc._tab, 10, "opcode_code", "<i")
        scalar(oc._tab, 8, "opcode_version", "<i")
    for i in range(m.BuffersLength()):
        b = m.Buffers(i)
        table(b._tab)
        vector(b._tab, 4, None, "<B", "buffer_size")
    sg = m.Subgraphs(0)
    table(sg._tab)
    vector(sg._tab, 4, None, "<I")
    vector(sg._tab, 10, None, "<I")
    vector(sg._tab, 6, "graph_io", "<i", "graph_io_len")
    vector(sg._tab, 8, "graph_io", "<i", "graph_io_len")
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        table(t._tab)
        vector(t._tab, 4, "tensor_shape", "<i", "tensor_rank")
        scalar(t._tab, 6, "tensor_type", "<b")
        scalar(t._tab, 8, "tensor_buffer", "<I")
        scalar(t._tab, 14, "tensor_is_variable", "<B")
        if t.Type() == 2 and 0 < t.Buffer() < m.BuffersLength():  # int32 data: biases
            b = m.Buffers(t.Buffer())
            o = b._tab.Offset(4)
            if o:
                start, n = b._tab.Vector(o), b._tab.VectorLen(o)
                for k in range(0, n - 3, 4):
                    add("bias_values", start + k, "<i")
        q = t.Quantization()
        if q is not None:
            table(q._tab)
            vector(q._tab, 8, "quant_scale", "<f", "quant_scale_len")
            vector(q._tab, 10, "quant_zero_point", "<q", "quant_zero_point_len")
            scalar(q._tab, 16, "quant_dimension", "<i")
    for i in range(sg.OperatorsLength()):
        o = sg.Operators(i)
        table(o._tab)
        scalar(o._tab, 4, "op_opcode_index", "<I")
        for slot in (6, 8, 20):
            vector(o._tab, slot, "op_io", "<i", "op_io_len")
        scalar(o._tab, 10, "op_options_type", "<B")
        opt = o.BuiltinOptions()
        if opt is not None:
            table(opt)
            vt = opt.Pos - struct.unpack_from("<i", buf, opt.Pos)[0]
            for e in range(4, struct.unpack_from("<H", buf, vt)[0], 2):
                off = struct.unpack_from("<H", buf, vt + e)[0]
                if off:
                    add("op_options_field", opt.Pos + off, "<B")
    return {k: v for k, v in sites.items() if v or k in ("truncate", "extend")}


# ---------------------------------------------------------------------------------- mutation

def _int_value(rng: random.Random, old: int, length: bool, size: int) -> int:
    if length:
        return rng.choice([0, 1, old - 1, old + 1, old * 2, old // 2, old + 4096, 2**31 - 1,
                           2**32 - 1, size // 4, size, rng.getrandbits(32)])
    return rng.choice([rng.choice(INTS), rng.choice(INTS), old + rng.choice((-1, 1)), old * 2, -old,
                       rng.randrange(-4, 64), rng.getrandbits(32)])


def _write(buf: bytearray, pos: int, fmt: str, value) -> None:
    if fmt == "<f":
        struct.pack_into(fmt, buf, pos, value)
    else:
        width = struct.calcsize(fmt)
        buf[pos:pos + width] = (int(value) % 2 ** (8 * width)).to_bytes(width, "little")


def mutate_tflite(buf: bytes, sites: dict, rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, what was done, the mutant's bytes): one structure-aware change of ``buf``."""
    kind = rng.choice(sorted(sites))
    out = bytearray(buf)
    edges = sorted({p for k, v in sites.items() for p, _ in v} | {len(buf)})
    if kind == "truncate":  # at a field, just before or after one, or anywhere
        at = max(0, min(len(buf) - 1, rng.choice(edges) + rng.choice((-4, -1, 0, 1, 4)))) \
            if rng.random() < 0.7 else rng.randrange(len(buf))
        return kind, f"cut to {at} of {len(buf)} bytes", bytes(out[:at])
    if kind == "extend":  # bytes inserted at a field (shifting what follows) or appended
        at = rng.choice(edges)
        extra = rng.choice([b"\x00" * rng.randrange(1, 64), rng.randbytes(rng.randrange(1, 64)),
                            b"\xff" * 4])
        out[at:at] = extra
        return kind, f"{len(extra)} bytes inserted at {at}", bytes(out)
    pos, fmt = rng.choice(sites[kind])
    old = struct.unpack_from(fmt, buf, pos)[0]
    if fmt == "<f":
        value = rng.choice(FLOATS + (old * rng.choice((0.5, 2.0, -1.0, 1e20, 1e-20)),))
    else:
        value = _int_value(rng, int(old), kind in LENGTH_KINDS, len(buf))
        if kind == "op_options_field" and rng.random() < 0.5:
            fmt = "<i" if pos + 4 <= len(buf) else fmt  # a 4-byte field (strides, axis, ...)
            old = struct.unpack_from(fmt, buf, pos)[0]
    _write(out, pos, fmt, value)
    width = struct.calcsize(fmt)
    if out[pos:pos + width] == buf[pos:pos + width]:  # the value it had: change it after all
        out[pos] ^= 1
    new = struct.unpack_from(fmt, out, pos)[0]
    return kind, f"{fmt} at {pos}: {old!r} -> {new!r}", bytes(out)


def mutant(name: str, seed: int, index: int, _cache: dict = {}) -> tuple[str, str, bytes]:  # noqa: B006
    """Mutation ``index`` of fixture ``name`` under ``seed`` (deterministic)."""
    if name not in _cache:
        buf = (FIXTURES / f"{name}.tflite").read_bytes()
        _cache[name] = (buf, tflite_sites(buf))
    buf, sites = _cache[name]
    return mutate_tflite(buf, sites, random.Random(f"{seed}:{name}:{index}"))


# ------------------------------------------------------------------------------------ worker

def valid_input(name: str):
    """The fixture's recorded inputs (2 samples) as int8 for the model's int8 core."""
    import numpy as np

    from edge_qmul.quant import quantize
    from edge_qmul.tflite import load_tflite
    model = load_tflite(FIXTURES / f"{name}.tflite")
    with np.load(FIXTURES / f"{name}.npz") as d:
        x = d["x"][:2]
    if x.dtype != np.int8:
        x = quantize(x, model.tensors[model.core_inputs[0]].quant)
    return x


def check_mutant(data: bytes, x) -> tuple[str, str]:
    """(outcome, detail) of loading ``data`` and running ``x`` through it."""
    import numpy as np

    from edge_qmul.errors import ModelError
    from edge_qmul.tflite import load_tflite
    try:
        model = load_tflite(data)
    except ModelError as e:
        return ("refused", str(e)[:160]) if str(e) else ("FINDING", "ModelError without a message")
    try:
        ys = model.forward(x)
    except ModelError as e:
        return "run_refused", str(e)[:160]
    ys = ys if isinstance(ys, list) else [ys]
    for y, t in zip(ys, model.core_outputs):
        want = (len(x), *model.tensors[t].shape[1:])
        if not isinstance(y, np.ndarray) or y.dtype != model.tensors[t].dtype or y.shape != want:
            return "FINDING", f"output {getattr(y, 'dtype', type(y))}{getattr(y, 'shape', '')}, declared {want}"
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            return "FINDING", "non-finite output"
    return "ran", ""


def _where(e: BaseException) -> str:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"


def worker(name: str, seed: int, start: int, stop: int) -> None:
    x = valid_input(name)
    print("ready", flush=True)
    for i in range(start, stop):
        kind, what, data = mutant(name, seed, i)
        try:
            outcome, detail = check_mutant(data, x)
        except Exception as e:  # noqa: BLE001 - the finding itself
            outcome, detail = "FINDING", f"{type(e).__name__} at {_where(e)}: {str(e)[:120]}"
        print(f"{i}\t{kind}\t{outcome}\t{detail if outcome == 'FINDING' else ''} [{what}]".replace("\n", " "),
              flush=True)


def run_workers(jobs: list[tuple[str, int, int, int]], procs: int = 2, hang_s: float = 60.0):
    """Run (name, seed, start, stop) jobs in ``procs`` worker subprocesses at a time.

    Returns (counts {(kind, outcome): n}, findings [(name, seed, index, kind, outcome, detail)]).
    A worker that dies (a crash) or prints nothing for ``hang_s`` (a hang) is a finding for the
    mutation after its last line; a new worker carries on after it."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONHASHSEED="0")
    counts: dict[tuple[str, str], int] = {}
    findings: list[tuple] = []
    queue = list(jobs)
    running: list[dict] = []

    def launch(name, seed, start, stop):
        p = subprocess.Popen([sys.executable, __file__, name, str(seed), str(start), str(stop)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                             bufsize=1)
        running.append({"p": p, "job": (name, seed, start, stop), "next": start, "from": start,
                        "t": time.monotonic()})

    while queue or running:
        while queue and len(running) < procs:
            launch(*queue.pop(0))
        ready, _, _ = select.select([r["p"].stdout for r in running], [], [], 1.0)
        for r in list(running):
            name, seed, start, stop = r["job"]
            dead = None
            if r["p"].stdout in ready:
                line = r["p"].stdout.readline()
                r["t"] = time.monotonic()
                if line == "":
                    code = r["p"].wait()
                    dead = None if r["next"] >= stop and code == 0 else f"crash: exit status {code}"
                elif line.startswith("ready"):
                    continue
                else:
                    i, kind, outcome, detail = line.rstrip("\n").split("\t", 3)
                    counts[(kind, outcome)] = counts.get((kind, outcome), 0) + 1
                    if outcome == "FINDING":
                        findings.append((name, seed, int(i), kind, outcome, detail))
                    r["next"] = int(i) + 1
                    continue
            elif time.monotonic() - r["t"] > hang_s:
                r["p"].kill()
                r["p"].wait()
                dead = f"hang: no answer in {hang_s:.0f} s"
            else:
                continue
            running.remove(r)
            if dead:
                i = r["next"]
                kind, what, _ = mutant(name, seed, i)
                counts[(kind, dead.split(":")[0])] = counts.get((kind, dead.split(":")[0]), 0) + 1
                # a crash may be heap damage an earlier mutation of this worker did: the range
                findings.append((name, seed, i, kind, dead, f"{what} (worker from {r['from']})"))
                if i + 1 < stop:
                    queue.insert(0, (name, seed, i + 1, stop))
    return counts, findings


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
