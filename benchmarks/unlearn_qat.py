"""Unlearning benchmark: the engine's integer `qmul` against the same algorithm written as PyTorch
fake-quant QAT (the way the Q-MUL paper runs it). For comparison only.

    python benchmarks/unlearn_qat.py [--json OUT] [--repeats N] [--markdown]

Workload: the digits CNN trained in the engine (`train_from_scratch("digits")`), a random 10% of
its training split as the forget set, the rest as the retain set. Both sides run the same Q-MUL
with the same fixed amount of work (the stopping rule off: 5 epochs over the forget set, forget and
retain batches of 32, the same batch order), the same similar labels (the original model's most
probable wrong class, computed once by the engine and given to both), AGR with the "mean" rule,
plain SGD at lr 0.01:

  * engine: ``unlearn(model, forget, retain, method="qmul", config={"stop": False})``: int8
    forward, integer backward, int16 master weights;
  * PyTorch 2.13 CPU eager, float32 fake-quant QAT: the engine's graph as a torch module
    (torch_twin.TorchTwin's layers) whose weights are fake-quantized per channel with the int8
    model's scales and whose every activation is fake-quantized with the int8 model's output scale
    and zero point (``torch.fake_quantize_per_*_affine``, straight-through gradients); per step one
    forward + backward on the forget batch (cross-entropy to the similar labels) and one on the
    retain batch, the two gradients' norms give the AGR weights, the weighted sum is applied.

Each side runs at 1 and 2 threads; everything is warmed up first; the reported time is the median
of ``--repeats`` whole runs; the ratio is taken at each side's best thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numba  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edge_qmul import datasets  # noqa: E402
from edge_qmul.quant import dequantize, quantize  # noqa: E402
from edge_qmul.train import train_from_scratch  # noqa: E402
from edge_qmul.unlearn import accuracy, unlearn  # noqa: E402
from edge_qmul.unlearn.similar_labels import assign_from_model  # noqa: E402
from torch_twin import TorchTwin  # noqa: E402

EPOCHS, BATCH, LR = 5, 32, 0.01


class QATTwin(TorchTwin):
    """TorchTwin with fake-quantized weights (per channel) and activations (per tensor), using the
    int8 model's own scales and zero points: what a QAT run of this int8 model computes."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.act_q = {}
        for t in [model.core_inputs[0]] + [op.outputs[0] for op in model.ops]:
            q = model.tensors[t].quant
            self.act_q[t] = (float(q.s), int(q.zp))
        self.w_q = {}
        for op in model.ops:
            if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                q = model.tensors[op.inputs[1]].quant
                scale = np.broadcast_to(q.scale.astype(np.float32), (model.tensors[op.inputs[1]].shape[
                    3 if op.kind == "DEPTHWISE_CONV_2D" else 0],)).copy()
                self.w_q[f"op{op.index}"] = torch.from_numpy(scale)

    def activation_out(self, y: torch.Tensor, tensor: int) -> torch.Tensor:
        """Per tensor, so the layout does not matter."""
        s, zp = self.act_q[tensor]
        return torch.fake_quantize_per_tensor_affine(y, s, zp, -128, 127)

    def weight(self, key: str) -> torch.Tensor:
        scale = self.w_q[key]
        return torch.fake_quantize_per_channel_affine(self.params[key + "_w"], scale,
                                                      torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)


def qmul_qat(net: QATTwin, xf: torch.Tensor, tf: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor,
             seed: int = 0) -> int:
    """Q-MUL in float32 fake-quant QAT: similar-label CE on the forget batch, CE on the retain
    batch, AGR "mean" weights from the two gradients' norms, plain SGD. Returns the step count."""
    params = list(net.parameters())
    rng = np.random.default_rng(seed)
    retain_order, retain_pos = rng.permutation(len(xr)), 0
    steps = 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(xf))
        for s in range(-(-len(xf) // BATCH)):
            idx = torch.from_numpy(order[s * BATCH:(s + 1) * BATCH])
            if retain_pos + BATCH > len(xr):
                retain_order, retain_pos = rng.permutation(len(xr)), 0
            ridx = torch.from_numpy(retain_order[retain_pos:retain_pos + BATCH])
            retain_pos += BATCH
            g_f = torch.autograd.grad(F.cross_entropy(net(xf[idx]), tf[idx]), params)
            g_r = torch.autograd.grad(F.cross_entropy(net(xr[ridx]), yr[ridx]), params)
            nf = float(torch.sqrt(sum((g * g).sum() for g in g_f)))
            nr = float(torch.sqrt(sum((g * g).sum() for g in g_r)))
            total = nf + nr
            w_f, w_r = (total / (2 * nf), total / (2 * nr)) if nf > 0 and nr > 0 else (0.5, 0.5)
            with torch.no_grad():
                for p, a, b in zip(params, g_f, g_r):
                    p.add_(w_f * a + w_r * b, alpha=-LR)
            steps += 1
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python benchmarks/unlearn_qat.py --json benchmarks/results/unlearn_qat.json")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)

    base, test_acc = train_from_scratch("digits", seed=0)
    d = datasets.load("digits", seed=0)
    q = base.tensors[base.core_inputs[0]].quant
    x8 = quantize(d.x_train, q)
    rng = np.random.default_rng(0)
    forget_mask = np.zeros(len(x8), bool)
    forget_mask[rng.choice(len(x8), len(x8) // 10, replace=False)] = True
    forget, retain = (x8[forget_mask], d.y_train[forget_mask]), (x8[~forget_mask], d.y_train[~forget_mask])
    targets = assign_from_model(base, *forget)
    xf_t = torch.from_numpy(dequantize(forget[0], q).astype(np.float32))
    xr_t = torch.from_numpy(dequantize(retain[0], q).astype(np.float32))
    tf_t, yr_t = torch.from_numpy(targets), torch.from_numpy(retain[1].astype(np.int64))
    # the QAT twin computes what the int8 model computes (up to float rounding at the requantizations)
    with torch.no_grad():
        twin_logits = QATTwin(base)(xf_t).numpy()
    engine_logits = base.dequantize_output(base.forward(forget[0]))
    agree = float(np.mean(twin_logits.argmax(1) == engine_logits.argmax(1)) * 100)
    max_diff = float(np.max(np.abs(twin_logits - engine_logits)))
    print(f"digits CNN (test acc {100 * test_acc:.1f}%), forget {len(forget[0])} samples, retain {len(retain[0])}; "
          f"{EPOCHS} epochs, batch {BATCH}, lr {LR}; QAT twin vs engine logits: argmax agree {agree:.1f}%, "
          f"max |diff| {max_diff:.3f} (output scale {float(base.tensors[base.core_outputs[0]].quant.s):.3f})",
          flush=True)

    def engine_run():
        return unlearn(base, forget, retain, method="qmul", config={"stop": False, "epochs": EPOCHS, "lr": LR})

    def torch_run():
        net = QATTwin(base)
        steps = qmul_qat(net, xf_t, tf_t, xr_t, yr_t)
        return net, steps

    rows = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        torch.set_num_threads(threads)
        engine_run()
        torch_run()  # warm
        te, tt = [], []
        for r in range(args.repeats):
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                if side == 0:
                    result = engine_run()
                    te.append(time.perf_counter() - t0)
                else:
                    net, steps = torch_run()
                    tt.append(time.perf_counter() - t0)
        with torch.no_grad():
            torch_fa = float((net(xf_t).argmax(1).numpy() == forget[1]).mean() * 100)
        rows.append({"threads": threads, "engine_s": statistics.median(te), "torch_qat_s": statistics.median(tt),
                     "engine_steps": result.steps, "torch_steps": steps,
                     "engine_forget_acc": accuracy(result.model, forget), "torch_forget_acc": torch_fa})
        print(f"threads {threads}: engine {rows[-1]['engine_s'] * 1e3:.1f} ms ({result.steps} steps), "
              f"torch QAT {rows[-1]['torch_qat_s'] * 1e3:.1f} ms ({steps} steps); forget acc after: "
              f"engine {rows[-1]['engine_forget_acc']:.1f}%, torch {torch_fa:.1f}%", flush=True)
    best_e = min(r["engine_s"] for r in rows)
    best_t = min(r["torch_qat_s"] for r in rows)
    summary = {"rows": rows, "twin_argmax_agree_percent": agree, "twin_max_abs_logit_diff": max_diff, "engine_best_s": best_e, "torch_qat_best_s": best_t, "torch_over_engine": best_t / best_e,
               "forget": int(forget_mask.sum()), "retain": int((~forget_mask).sum()), "epochs": EPOCHS,
               "torch": torch.__version__, "numba": numba.__version__}
    print(f"best: engine {best_e * 1e3:.1f} ms, torch QAT {best_t * 1e3:.1f} ms: engine {best_t / best_e:.2f}x faster")
    if args.markdown:
        print("| threads | engine qmul | PyTorch fake-quant QAT qmul | QAT / engine | steps |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['threads']} | {r['engine_s'] * 1e3:.1f} ms | {r['torch_qat_s'] * 1e3:.1f} ms | "
                  f"{r['torch_qat_s'] / r['engine_s']:.2f} | {r['engine_steps']} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
