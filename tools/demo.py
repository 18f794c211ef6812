"""`make demo`: the whole job, end to end, on the built-in digits data over a serial line.

    python tools/demo.py [--out demo_out] [--owner user7] [--method oeu]

1. trains an int8 digits CNN in the engine, with 20 simulated owners and a held-out validation slice;
2. starts a device agent as its own process (`edge-qmul serve --serial /dev/pts/N`) on one end of a
   null-modem pair of ptys, with a fresh key;
3. as the host, over the other end: pushes the model, the similar-label table and the samples, asks
   the device to forget one owner, follows its progress, commits, pulls the new model and certificate;
4. retrains from scratch on the host without that owner (the gold standard) and compares forget
   accuracy, test accuracy and MIA before, after and for the retrained model;
5. writes demo_out/: report.json, report.md, model_before.tflite, model_after.tflite,
   certificate.json and per_class_accuracy.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_qmul import datasets, metrics, models, save_tflite  # noqa: E402
from edge_qmul.fsutil import atomic_write  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.train import TRAINING_RECIPES, Trainer, fit  # noqa: E402
from edge_qmul.tflite import load_tflite  # noqa: E402
from edge_qmul.unlearn.similar_labels import build_table  # noqa: E402

T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def train(ds, x8, train_mask, seed=0):
    r = TRAINING_RECIPES["digits"]
    model = models.build(r["arch"], ds.input_shape, ds.num_classes, seed=seed,
                         calib_x=ds.x_train[train_mask][:256])
    steps = r["epochs"] * -(-int(train_mask.sum()) // r["batch_size"])
    trainer = Trainer(model, lr=r["lr"], momentum=r["momentum"], schedule="cosine", total_steps=steps)
    fit(trainer, x8[train_mask], ds.y_train[train_mask], r["epochs"], r["batch_size"], seed=seed)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="edge_qmul end to end: forget one user on a device over serial.",
                                 epilog="example: python tools/demo.py --out demo_out --owner user7")
    ap.add_argument("--out", type=Path, default=ROOT / "demo_out")
    ap.add_argument("--owner", default="user7", help="the simulated user who asks to be forgotten")
    ap.add_argument("--method", default=None, help="unlearning method (default: the product default)")
    args = ap.parse_args(argv)
    from edge_qmul.unlearn import DEFAULT_METHOD
    method = args.method or DEFAULT_METHOD
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    say("1/5 training the base int8 model on scikit-learn's digits, in the engine (integer arithmetic)")
    ds = datasets.load("digits", seed=0)
    rng = np.random.default_rng(0)
    n = len(ds.y_train)
    owners = np.array([f"user{i}" for i in rng.integers(0, 20, n)])
    val = np.zeros(n, bool)
    val[rng.choice(n, n // 10, replace=False)] = True
    probe = models.build("digits_cnn", ds.input_shape, 10, seed=0, calib_x=ds.x_train[:256])
    q = probe.tensors[probe.core_inputs[0]].quant  # inputs in [0, 1]: scale 1/255, zero point -128
    x8, x_test = quantize(ds.x_train, q), quantize(ds.x_test, q)
    base = train(ds, x8, ~val)
    base_path = save_tflite(base, out / "model_before.tflite")
    table = build_table(base, x8[~val], ds.y_train[~val], k=3, data="digits training split")
    table.save(out / "table.json")
    np.savez(out / "samples_train.npz", x=ds.x_train[~val], y=ds.y_train[~val], owners=owners[~val])
    np.savez(out / "samples_validation.npz", x=ds.x_train[val], y=ds.y_train[val], owners=owners[val])
    say(f"   test accuracy {100 * np.mean(base.forward(x_test).argmax(1) == ds.y_test):.1f}%; "
        f"{(owners[~val] == args.owner).sum()} training samples belong to {args.owner}")

    say("2/5 starting the device agent as its own process on a serial line (two ptys, null-modem)")
    from firmware_bridge.channel import Client
    from firmware_bridge.device import read_key, write_key
    from firmware_bridge.host import DeviceClient
    from firmware_bridge.transport import SerialLink
    key_path = out / "device.key"
    key_path.unlink(missing_ok=True)
    write_key(key_path)
    state = out / "device_state"
    if state.exists():
        import shutil
        shutil.rmtree(state)
    link = SerialLink(open_b=False)
    agent = subprocess.Popen([sys.executable, "-m", "edge_qmul.cli", "serve", "--serial", link.b_path,
                              "--state", str(state), "--key-file", str(key_path)],
                             stdout=subprocess.DEVNULL, stderr=open(out / "device.log", "w"))
    try:
        device = DeviceClient(Client(link.a, read_key(key_path), timeout=2.0))
        device.client.connect()
        say(f"   connected to {link.b_path}: session {device.client.session.session_id:08x}, "
            f"MTU {device.client.session.mtu}")

        say("3/5 pushing the model, the similar-label table and the samples")
        device.push_model(base_path)
        table_sha = device.push_table(out / "table.json")["sha256"]
        device.push_samples(out / "samples_train.npz")
        device.push_samples(out / "samples_validation.npz", role="validation")
        say(f"   device: {json.dumps(device.info())}")

        say(f"4/5 asking the device to forget {args.owner} with {method}")
        job = device.forget({"owner": args.owner}, method=method,
                            table=table_sha if method.startswith("qmul") else None)
        last = [None]

        def show(st):
            line = f"   [{st['phase']}] {100 * (st.get('progress') or 0):5.1f}%"
            if line != last[0]:
                say(line)
                last[0] = line
        result = device.wait(job, show, poll_s=0.1)
        if result["status"] != "done":
            raise SystemExit(f"demo: the job ended {result['status']}: {result.get('error')}")
        device.commit(job)
        certificate = device.certificate(job)
        new_bytes = device.pull("current")
        atomic_write(out / "model_after.tflite", new_bytes)
        atomic_write(out / "certificate.json", (json.dumps(certificate, indent=1, sort_keys=True) + "\n").encode())
        say(f"   committed; {certificate['n_forgotten']} samples deleted at {certificate['samples_deleted_at']}")
    finally:
        agent.terminate()
        agent.wait(10)
        link.close()

    say("5/5 retraining from scratch on the host without that owner, and comparing")
    keep = ~val & (owners != args.owner)
    retrained = train(ds, x8, keep)
    after = load_tflite(out / "model_after.tflite")
    f_mask = ~val & (owners == args.owner)
    forget, retain = (x8[f_mask], ds.y_train[f_mask]), (x8[keep], ds.y_train[keep])
    test = (x_test, ds.y_test)
    rows = {}
    for name, model in (("before", base), ("after (device)", after), ("retrain (host)", retrained)):
        m = metrics.evaluate(model, forget, retain, test)
        rows[name] = {"forget acc": 100 - m["UA"], "retain acc": m["RA"], "test acc": m["TA"], "MIA": m["MIA"]}
    lines = ["| model | forget acc | retain acc | test acc | MIA |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['forget acc']:.1f} | {r['retain acc']:.1f} | {r['test acc']:.1f} | {r['MIA']:.1f} |")
    table_md = "\n".join(lines)
    print(table_md, flush=True)

    per_class = {name: [100 * float(np.mean(model.forward(x_test[ds.y_test == c]).argmax(1) == c)) for c in range(10)]
                 for name, model in (("before", base), ("after", after), ("retrain", retrained))}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (name, accs) in enumerate(per_class.items()):
        ax.bar(np.arange(10) + (i - 1) * 0.27, accs, 0.27, label=name)
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("test accuracy (%)")
    low = min(min(v) for v in per_class.values())
    ax.set_ylim(max(0.0, 5 * np.floor((low - 5) / 5)), 101)  # every bar visible, even a collapsed class
    ax.set_title(f"per-class test accuracy: before, after forgetting {args.owner}, retrained")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "per_class_accuracy.png", dpi=110)
    plt.close(fig)

    report = {"owner": args.owner, "method": method, "metrics": rows, "per_class_test_accuracy": per_class,
              "certificate": {k: certificate[k] for k in ("request_id", "n_forgotten", "model_before_sha256",
                                                          "model_after_sha256", "samples_deleted_at", "wall_s")},
              "demo_wall_s": time.perf_counter() - T0}
    atomic_write(out / "report.json", (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    atomic_write(out / "report.md", (f"# edge_qmul demo: forgetting {args.owner} with {method}\n\n{table_md}\n\n"
                                     f"Certificate: `certificate.json`; new model: `model_after.tflite`.\n").encode())
    say(f"done: {out}/ holds report.json, report.md, model_after.tflite, certificate.json, per_class_accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
