"""`make demo`: the whole job, end to end, on the built-in digits data over a serial line.

    python tools/demo.py [--out demo_out] [--owner user7] [--method oeu]

1. trains an int8 digits CNN in the engine, with 20 simulated owners and a held-out validation slice;
2. starts a device agent as its own process (`edge-qmul serve --serial /dev/pts/N`) on one end of a
   null-modem pair of ptys, with a fresh key;
3. as the host, over the other end: pushes the model, the similar-label table and the samples, asks
   the device to forget one owner, follows its progress, commits, pulls the new model and certificate;
4. retrains from scratch on the host without that owner (the gold standard) and compares forget
   accuracy, test accuracy, MIA and the owner's canary (a trigger planted in half of their samples
   by train_base --canary) before, after and for the retrained model, with the canary's verdict;
5. writes demo_out/: report.json, report.md, model_before.tflite, model_after.tflite,
   certificate.json, per_class_accuracy.png, canary_trigger.png, unlearning_loss.png and base/
   (what train_base wrote).
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
sys.path.insert(0, str(ROOT / "tools"))

from edge_qmul import metrics  # noqa: E402
from edge_qmul.evaluation.canary import load_canary, summary_line, verify_forget  # noqa: E402
from edge_qmul.fsutil import atomic_write  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.tflite import load_tflite  # noqa: E402
from train_base import load_builtin, prepare, train_model  # noqa: E402  (tools/train_base.py)

T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


OUTPUTS = ("report.json", "report.md", "model_before.tflite", "model_after.tflite", "certificate.json",
           "per_class_accuracy.png", "canary_trigger.png", "unlearning_loss.png", "base/")


def canary_line(report: dict) -> str:
    """One sentence: the canary's verdict and the rates behind it."""
    return summary_line({"owner": report["owner"], **report["canary"]})


def plot_canary(trigger: dict, verdict: str, owner: str, path: Path) -> None:
    """The trigger's success rate before, after and for the retrained model, with exact intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(trigger)
    rates = [100 * trigger[n]["rate"] for n in names]
    err = [[100 * (trigger[n]["rate"] - trigger[n]["lo"]) for n in names],
           [100 * (trigger[n]["hi"] - trigger[n]["rate"]) for n in names]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, rates, yerr=err, capsize=6, color=["tab:blue", "tab:orange", "tab:green"])
    for i, v in enumerate(rates):
        ax.text(i, v + err[1][i] + 2, f"{v:.1f}%", ha="center")  # above the interval's top
    ax.set_ylim(0, 110)
    ax.set_ylabel("trigger success (%, 95% CI)")
    ax.set_title(f"{owner}'s canary: {verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict], method: str, owner: str, path: Path) -> None:
    """The device's loss curves of the unlearning run, one line per recorded quantity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({k for h in history for k in h} - COUNTERS)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, label=f"{k}: {LEGEND.get(k, k)}")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel(history_ylabel(keys))
    ax.set_title(f"{method} forgetting {owner} on the device: {len(history)} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history_ylabel(keys: list[str]) -> str:
    """The y axis label of the plotted quantities: nats for losses and entropies, and the forget
    weight named only when it is plotted (the methods that record it: qmul's AGR)."""
    parts = ["nats" if any(k in NATS for k in keys) else ""]
    parts += [f"{k}: {LEGEND.get(k, k)}, no unit" for k in keys if k not in NATS]
    return "value" + (f" ({'; '.join(p for p in parts if p)})" if any(parts) else "")


NATS = ("loss_r", "loss_f", "entropy_f", "loss_moved", "loss_anchor")
# not curves: the step, the clock and the work counters (on a loss axis they flatten every curve)
COUNTERS = {"step", "t_s", "sample_passes", "max_passes"}
LEGEND = {"loss_r": "cross-entropy on the retain batch", "loss_f": "loss on the forget batch (toward similar labels)",
          "loss_moved": "contradicted forget samples, to their neighbours' label",
          "loss_anchor": "retain samples of the labels those leave",
          "entropy_f": "prediction entropy on the forget batch (pushed up)", "w_f": "adaptive forget weight"}


def report_markdown(report: dict, table_md: str) -> str:
    """report.md: the table, what each column means, the plots and the certificate."""
    c = report["certificate"]
    h = report["unlearning_history"]
    keys = sorted({k for r in h for k in r} - COUNTERS)
    worst = min(range(10), key=lambda d: report["per_class_test_accuracy"]["after"][d] -
                report["per_class_test_accuracy"]["before"][d])
    before, after = (report["per_class_test_accuracy"][k][worst] for k in ("before", "after"))
    return "\n".join([
        f"# edge_qmul demo: forgetting {report['owner']} with {report['method']}", "",
        table_md, "",
        canary_line(report), "",
        "![the canary's trigger](canary_trigger.png)", "",
        "- forget acc: accuracy on the forgotten owner's training samples (a retrained model's level is the goal, "
        "not 0); retain acc: on everyone else's; test acc: on the held-out test split; "
        "MIA: membership-inference efficacy on the forget set (lower: fewer look like training members); "
        "canary: how often the owner's trigger, stamped on test inputs of other classes, gives its label "
        "(half of the owner's training samples carry it, so forget acc counts those at the trigger's label).",
        f"- {c['n_forgotten']} samples deleted from the device's store at {c['samples_deleted_at']}; "
        f"unlearning took {c['wall_s']:.2f} s on the device.",
        f"- model before: `{c['model_before_sha256']}`; after: `{c['model_after_sha256']}` (`model_after.tflite`); "
        "the whole certificate: `certificate.json`.", "",
        "![per-class test accuracy](per_class_accuracy.png)", "",
        f"The class that lost most: digit {worst}, {before:.1f}% before, {after:.1f}% after.", "",
        "![unlearning loss curves](unlearning_loss.png)", "",
        f"{len(h)} unlearning steps recorded by the device: "
        + "; ".join(f"{k} ({LEGEND.get(k, k)}) {h[0][k]:.3f} -> {h[-1][k]:.3f}" for k in keys if k in h[0] and k in h[-1]),
        f"\nDemo wall time {report['demo_wall_s']:.1f} s.", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="edge_qmul end to end: forget one user on a device over serial.",
                                 epilog="example: python tools/demo.py --out demo_out --owner user7")
    ap.add_argument("--out", type=Path, default=ROOT / "demo_out")
    ap.add_argument("--owner", default="user7", help="the simulated user who asks to be forgotten")
    ap.add_argument("--method", default=None, help="unlearning method (default: the product default)")
    ap.add_argument("--readme", type=Path, help="also write the comparison table into this README's demo block "
                                                "(make eval: README.md)")
    args = ap.parse_args(argv)
    if args.readme is not None:  # refuse before any work, not after
        from edge_qmul.evaluation.report import DEMO_BEGIN, DEMO_END
        text = args.readme.read_text() if args.readme.is_file() else ""
        if DEMO_BEGIN not in text or DEMO_END not in text:
            ap.error(f"--readme {args.readme}: no demo block (the markers {DEMO_BEGIN} ... {DEMO_END})")
    from edge_qmul.unlearn import DEFAULT_METHOD
    method = args.method or DEFAULT_METHOD
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    say("1/5 training the base int8 model on scikit-learn's digits, in the engine (integer arithmetic), "
        "with tools/train_base.py: 20 simulated owners, a 10% validation slice, the similar-label table")
    base_dir = out / "base"
    prepare(base_dir, dataset="digits", owners=20, validation=0.1, seed=0, say=lambda m: say(f"   {m}"),
            canary=(args.owner,))
    base_path = base_dir / "model.tflite"
    atomic_write(out / "model_before.tflite", base_path.read_bytes())
    base = load_tflite(base_path)
    with np.load(base_dir / "samples_train.npz") as f:
        x_train, y_train, owners = f["x"], f["y"], f["owners"]
    q = base.tensors[base.core_inputs[0]].quant
    data = load_builtin("digits", seed=0)
    x8, x_test, y_test = quantize(x_train, q), quantize(data.x_test, q), data.y_test
    say(f"   {(owners == args.owner).sum()} training samples belong to {args.owner}")

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
        table_sha = device.push_table(base_dir / "table.json")["sha256"]
        device.push_samples(base_dir / "samples_train.npz")
        device.push_samples(base_dir / "samples_validation.npz", role="validation")
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
        job_file = device.job_file(job)
        certificate, history = job_file["certificate"], job_file.get("history", [])
        new_bytes = device.pull("current")
        atomic_write(out / "model_after.tflite", new_bytes)
        atomic_write(out / "certificate.json", (json.dumps(certificate, indent=1, sort_keys=True) + "\n").encode())
        say(f"   committed; {certificate['n_forgotten']} samples deleted at {certificate['samples_deleted_at']}")
    finally:
        agent.terminate()
        agent.wait(10)
        link.close()

    say("5/5 retraining from scratch on the host without that owner (same recipe), and comparing")
    keep = owners != args.owner
    data.x, data.y = x_train, y_train
    retrained, _ = train_model(data, keep, "digits_cnn", None, 0, say=lambda m: None)
    after = load_tflite(out / "model_after.tflite")
    forget, retain = (x8[~keep], y_train[~keep]), (x8[keep], y_train[keep])
    test = (x_test, y_test)
    canary, _ = load_canary(base_dir / "canaries.json", args.owner)
    check = verify_forget(canary, base, after, retrained, data.x_test, data.y_test)
    trigger = {"before": check["before"], "after (device)": check["after"], "retrain (host)": check["reference"]}
    rows = {}
    for name, model in (("before", base), ("after (device)", after), ("retrain (host)", retrained)):
        m = metrics.evaluate(model, forget, retain, test)
        rows[name] = {"forget acc": 100 - m["UA"], "retain acc": m["RA"], "test acc": m["TA"], "MIA": m["MIA"],
                      "canary": 100 * trigger[name]["rate"]}
    lines = ["| model | forget acc | retain acc | test acc | MIA | canary |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        label = f"after (device, {method})" if name == "after (device)" else name
        lines.append(f"| {label} | {r['forget acc']:.1f} | {r['retain acc']:.1f} | {r['test acc']:.1f} | {r['MIA']:.1f} "
                     f"| {r['canary']:.1f} |")
    table_md = "\n".join(lines)
    print(table_md, flush=True)
    say(canary_line({"canary": check, "owner": args.owner}))
    if args.readme is not None:
        from edge_qmul.evaluation.report import DEMO_BEGIN, DEMO_END, write_block
        write_block(args.readme, [table_md], DEMO_BEGIN, DEMO_END)
        say(f"wrote the table into {args.readme}")

    per_class = {name: [metrics.accuracy(model, x_test[y_test == c], y_test[y_test == c]) for c in range(10)]
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

    plot_history(history, method, args.owner, out / "unlearning_loss.png")
    plot_canary(trigger, check["verdict"], args.owner, out / "canary_trigger.png")

    report = {"owner": args.owner, "method": method, "metrics": rows, "per_class_test_accuracy": per_class,
              "unlearning_history": history, "canary": check,
              "certificate": {k: certificate[k] for k in ("request_id", "n_forgotten", "model_before_sha256",
                                                          "model_after_sha256", "samples_deleted_at", "wall_s")},
              "demo_wall_s": time.perf_counter() - T0}
    atomic_write(out / "report.json", (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    atomic_write(out / "report.md", report_markdown(report, table_md).encode())
    say(f"done: {out}/ holds {', '.join(OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
