"""int16 tiles vs int8 dot-product tiles (vpdpbusd / sdot) on single CONV_2D / FULLY_CONNECTED layers.

    python benchmarks/dot_tiles.py [--only "rn18 conv3x3,mbv2 expand,mbv2 project,fc"] [--batch 32]
                                   [--threads 2] [--repeats 7] [--min-time 0.2] [--best]

For each layer of benchmarks/forward.py's single_layers (CONV_2D and FULLY_CONNECTED only), in one
process, the median time of one batch through

  * int16: the kernel's forward with EDGE_QMUL_DOT=off (the int16 pmaddwd tile path);
  * dot: the kernel's forward on the dot tiles, packing the weights per call (as wired today);
  * dot packed: implicit_dot's driver with the weights packed once (what a compiled plan calls);
  * XNNPACK: LiteRT's default resolver, resized to the batch;

and the ratios int16 / dot packed and dot packed / XNNPACK. Outputs of int16 and dot are checked equal.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numba  # noqa: E402

from forward import LiteRT, single_layers, time_calls  # noqa: E402

import time  # noqa: E402


def best_calls(fns: list, repeats: int, min_time: float) -> list[float]:
    """The fastest single call of each function, calls interleaved (A B C A B C ...) for about
    ``min_time`` * repeats seconds in all: on a shared machine the median of a parallel region is
    the other processes' lottery (a descheduled worker holds up the region), the minimum is not."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    end = time.perf_counter() + min_time * repeats * len(fns)
    while time.perf_counter() < end:
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best
from edge_qmul.kernels import conv, fully_connected, implicit_dot  # noqa: E402
from edge_qmul.kernels.dot_tile import dot_kind  # noqa: E402
from edge_qmul.tflite import to_bytes  # noqa: E402


def _off(fn):
    def run():
        os.environ["EDGE_QMUL_DOT"] = "off"
        try:
            return fn()
        finally:
            del os.environ["EDGE_QMUL_DOT"]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="rn18 conv3x3,mbv2 expand,mbv2 project,fc")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--best", action="store_true", help="fastest call instead of the median (shared machines)")
    args = ap.parse_args(argv)
    os.environ.pop("EDGE_QMUL_DOT", None)
    kind = dot_kind()
    if kind is None:
        print("no dot-product kernel on this CPU")
        return 1
    numba.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    stat = "fastest call" if args.best else f"median of {args.repeats}"
    print(f"dot kind {kind}, batch {args.batch}, {args.threads} threads, {stat}")
    print(f"{'layer':34s} {'int16':>9s} {'dot':>9s} {'dot pk':>9s} {'XNNPACK':>9s} {'int16/dotpk':>11s} "
          f"{'dotpk/XNN':>9s}")
    rng = np.random.default_rng(0)
    for name, model in single_layers(False):
        op = model.ops[0]
        if op.kind not in ("CONV_2D", "FULLY_CONNECTED") or (only and not any(s in name for s in only)):
            continue
        x_t, w_t, b_t = (model.tensors[i] for i in op.inputs)
        x = rng.integers(-128, 128, (args.batch,) + tuple(x_t.shape[1:])).astype(np.int8)
        w, bias = w_t.data, b_t.data
        if op.kind == "CONV_2D":
            p = conv.prepare(op, model)
            packed = implicit_dot.pack_conv(w, -p.input_offset, p.win.dil_w)
            fwd = lambda: conv.forward(p, x, w, bias)  # noqa: E731
            pk = lambda: implicit_dot.conv_forward(  # noqa: E731
                x, w, bias, -p.input_offset, p.win, p.rq, p.rq.multiplier, p.rq.shift, packed=packed)
        else:
            p = fully_connected.prepare(op, model)
            r = p.rq
            packed = implicit_dot.pack_fc(w, -p.input_offset)
            fwd = lambda: fully_connected.forward(p, x, w, bias)  # noqa: E731
            pk = lambda: implicit_dot.fc_forward(x.reshape(-1, p.depth), w, bias, -p.input_offset,  # noqa: E731
                                                 r.multiplier, r.shift, r.out_zero_point, r.act_min, r.act_max,
                                                 r.rounding, packed=packed).reshape(args.batch, -1)
        int16 = _off(fwd)
        xnn = LiteRT(to_bytes(model), args.batch, args.threads, builtin=False)
        y16, ydot, ypk = int16(), fwd(), pk()
        assert np.array_equal(y16, ydot) and np.array_equal(y16.reshape(ypk.shape), ypk), name
        timer = best_calls if args.best else time_calls
        t16, tdot, tpk, txnn = timer([int16, fwd, pk, lambda: xnn.run(x)], args.repeats, args.min_time)
        ms = lambda t: f"{t * 1e3:8.2f}m"  # noqa: E731
        print(f"{name:34s} {ms(t16)} {ms(tdot)} {ms(tpk)} {ms(txnn)} {t16 / tpk:11.2f} {tpk / txnn:9.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
