"""The host's side: a Python client for a device, and the ``edge-qmul-host`` command.

    edge-qmul-host --device tcp://10.0.0.7:7070 --key-file device.key info
    edge-qmul-host --device serial:///dev/ttyUSB0 --key-file device.key push-model model.tflite
    edge-qmul-host ... forget --owner alice --method qmul --wait
    edge-qmul-host ... pull-model --out new.tflite

Exit status 0 on success; otherwise non-zero with a one-line reason on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from edge_qmul.api import (add_command, atomic_write, format_table, parse_selector, plant_upload, plot,
                           record_upload, summary_line, verify_files)

from .channel import ChannelError, Client, RemoteError
from .device import read_key
from .frames import MsgType
from .transfer import get, put
from .transport import TransportError, open_transport


class DeviceClient:
    """Typed calls for every device operation, over a connected channel Client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def info(self) -> dict:
        return self.client.request(MsgType.INFO)

    def ping(self) -> dict:
        return self.client.request(MsgType.PING)

    def push(self, kind: str, data: bytes, progress=None, **end_fields) -> dict:
        return put(self.client, kind, data, progress, end_fields)

    def push_model(self, path: Path, activate: bool = True, progress=None) -> dict:
        return self.push("model", Path(path).read_bytes(), progress, activate=activate)

    def push_table(self, path: Path, progress=None) -> dict:
        return self.push("table", Path(path).read_bytes(), progress)

    def push_samples(self, path: Path, owner: str | None = None, role: str = "train", progress=None,
                     data: bytes | None = None) -> dict:
        """Upload the samples file at ``path`` (or ``data``, its bytes as changed on the host)."""
        fields = {"owner": owner, "role": role} if owner else {"role": role}
        return self.push("samples", Path(path).read_bytes() if data is None else data, progress, **fields)

    def push_samples_with_canary(self, path: Path, owner: str, canaries: Path, fraction: float = 0.5,
                                 num_classes: int | None = None, progress=None) -> dict:
        """Plant ``owner``'s canary in a fraction of the file's samples (evaluation/canary.py), upload
        them, then record the canary in the host's ``canaries`` file (never sent to the device)."""
        data, canary = plant_upload(Path(path).read_bytes(), owner, num_classes, fraction)
        model = self.info().get("model_sha256")
        out = self.push_samples(path, owner, "train", progress, data=data)
        record_upload(canaries, canary, {"device_model_sha256": model, "file": str(path),
                                         "sent_sha256": hashlib.sha256(data).hexdigest()})
        return {**out, "canary": {"owner": owner, "marked": len(canary.marked), "record": str(canaries)}}

    def forget(self, selector: dict, method: str | None = None, params: dict | None = None, table: str | None = None,
               retain_max: int | None = None) -> str:
        body = {"selector": selector, "method": method, "params": params or {}, "table": table,
                "retain_max": retain_max, "job_key": os.urandom(8).hex()}
        return self.client.request(MsgType.FORGET, body)["job_id"]

    def status(self, job_id: str) -> dict:
        return self.client.request(MsgType.JOB_STATUS, {"job_id": job_id})

    def wait(self, job_id: str, progress=None, poll_s: float = 0.2, timeout_s: float = 3600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status(job_id)
            if progress is not None:
                progress(st)
            if st["status"] in ("done", "failed", "committed", "rolled_back"):
                return self.result(job_id)
            time.sleep(poll_s)
        raise ChannelError(f"job {job_id} did not finish within {timeout_s} s")

    def result(self, job_id: str) -> dict:
        return self.client.request(MsgType.JOB_RESULT, {"job_id": job_id})

    def job_file(self, job_id: str) -> dict:
        """The device's whole record of a job: status, certificate, loss history."""
        return json.loads(self.pull(f"jobs/{job_id}.json"))

    def certificate(self, job_id: str) -> dict:
        """The whole certificate (with every forgotten id's hash), read from the device's job file."""
        return self.job_file(job_id)["certificate"]

    def history(self, job_id: str) -> list[dict]:
        """The unlearning run's loss curves: one dict per recorded step (step, t_s and the method's losses)."""
        return self.job_file(job_id).get("history", [])

    def commit(self, job_id: str) -> dict:
        return self.client.request(MsgType.COMMIT, {"job_id": job_id}, timeout=10.0)

    def rollback(self, job_id: str) -> dict:
        return self.client.request(MsgType.ROLLBACK, {"job_id": job_id})

    def pull(self, name: str = "current", progress=None) -> bytes:
        return get(self.client, name, progress)

    def bench(self, batch: int = 8, forget_size: int = 64, method: str = "oeu", repeats: int = 5,
              timeout: float = 900.0) -> dict:
        """edge_qmul.bench.bench_model run on the device, on its active model (one long request)."""
        return self.client.request(MsgType.BENCH, {"batch": batch, "forget_size": forget_size, "method": method,
                                                   "repeats": repeats}, timeout=timeout)


def connect(url: str, key: bytes, timeout: float = 1.0, retries: int = 10) -> DeviceClient:
    client = Client(open_transport(url), key, timeout=timeout, retries=retries)
    client.connect()
    return DeviceClient(client)


def _bar(label: str):
    """A tqdm bar on a terminal, else nothing (the final line still reports)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # optional (a host extra): without it, the final line only
    except ImportError:
        return None
    bar = tqdm(desc=label, unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return update


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="edge-qmul-host", description="Talk to an edge-qmul device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  edge-qmul-host --device tcp://board:7070 --key-file device.key info\n"
               "  edge-qmul-host --device serial:///dev/ttyUSB0 --key-file device.key push-model m.tflite\n"
               "  edge-qmul-host --device tcp://board:7070 --key-file device.key push-samples d.npz --owner alice\n"
               "  edge-qmul-host --device tcp://board:7070 --key-file device.key forget --owner alice --wait --commit\n"
               "  edge-qmul-host --device tcp://board:7070 --key-file device.key pull-model --out new.tflite")
    ap.add_argument("--device", required=True, help="tcp://HOST:PORT, serial:///dev/ttyUSB0 (any pyserial URL) or "
                    "mqtts://BROKER:PORT/DEVICE_ID?password_file=F&ca=ca.crt")
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for one reply")
    sub = ap.add_subparsers(dest="command", required=True)
    pre = "edge-qmul-host --device tcp://board:7070 --key-file device.key"
    add_command(sub, "info", "the device's model, samples, jobs, free space and memory", f"{pre} info")
    add_command(sub, "ping", "check the link and the key", f"{pre} ping")
    pm = add_command(sub, "push-model", "upload an int8 .tflite and make it the active model",
                     f"{pre} push-model model.tflite")
    pm.add_argument("model", help="the .tflite file")
    pm.add_argument("--no-activate", action="store_true", help="upload only; keep the active model")
    pt = add_command(sub, "push-table", "upload a similar-label table (tools/similar_labels.py)",
                     f"{pre} push-table table.json")
    pt.add_argument("table", help="the table (JSON)")
    ps = add_command(sub, "push-samples", "upload samples (.npz with x, y and optional owners) into the device's store",
                     [f"{pre} push-samples samples_train.npz", f"{pre} push-samples mine.npz --owner alice",
                      f"{pre} push-samples samples_validation.npz --role validation"])
    ps.add_argument("npz", help="the samples (.npz: x, y, optional owners)")
    ps.add_argument("--owner", help="owner of every sample in the file")
    ps.add_argument("--role", default="train", choices=("train", "validation"))
    ps.add_argument("--canary", metavar="CANARIES_JSON", help="with --owner: plant the owner's canary (a seeded "
                    "trigger and label) in a fraction of the samples before upload, recorded in this host-side "
                    "file for `verify` (the device is not told which samples carry it)")
    ps.add_argument("--canary-fraction", type=float, default=0.5, help="of the samples that carry it (default 0.5)")
    ps.add_argument("--canary-classes", type=int, help="the model's class count (default: the file's class_names)")
    fg = add_command(sub, "forget", "ask the device to forget an owner, a list of sample ids or a class",
                     [f"{pre} forget --owner alice --wait --commit", f"{pre} forget --ids ids.txt --method qmul --table SHA256"])
    fg.add_argument("--owner", help="forget every sample of this owner")
    fg.add_argument("--ids", help="forget the sample ids listed in this file, one per line")
    fg.add_argument("--class", dest="label", type=int, help="forget a whole class")
    fg.add_argument("--method", default=None, help="default: the device's default for the kind of request "
                                                   "(edge_qmul.unlearn.default_method)")
    fg.add_argument("--table", help="sha256 of a pushed table")
    fg.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    fg.add_argument("--commit", action="store_true", help="with --wait: commit when done")
    for name, what in (("status", "a job's phase, progress and time left"),
                       ("result", "a finished job's outcome and certificate (id hashes as one digest)"),
                       ("commit", "delete the forgotten samples and make the job's model the active one"),
                       ("rollback", "drop a finished job: the model and the samples stay as they were"),
                       ("history", "the loss curves of a job's unlearning run")):
        p = add_command(sub, name, what, f"{pre} {name} 3fa2c4d15e6b7a80")
        p.add_argument("job_id", help="the id the forget command printed")
    pl = add_command(sub, "pull-model", "download the active model (or a job file) from the device",
                     [f"{pre} pull-model --out new.tflite", f"{pre} pull-model --name jobs/3fa2c4d15e6b7a80.json --out job.json"])
    pl.add_argument("--out", required=True, help="where to write it (atomically)")
    pl.add_argument("--name", default="current", help="'current' (the active model) or jobs/<id>.json")
    bn = add_command(sub, "bench", "per-op, forward, training-step and unlearning times and peak memory, "
                     "measured on the device with its active model",
                     [f"{pre} bench --batch 8", f"{pre} bench --batch 32 --forget-size 128 --json b.json --png b.png"])
    bn.add_argument("--batch", type=int, default=8)
    bn.add_argument("--forget-size", type=int, default=64, help="samples in the timed unlearning run")
    bn.add_argument("--method", default="oeu")
    bn.add_argument("--repeats", type=int, default=5, help="runs per measurement (medians are reported)")
    bn.add_argument("--json", help="write the report here")
    bn.add_argument("--png", help="draw the report here")
    vf = add_command(sub, "verify", "did a forget remove an owner? their canary's trigger before, after and for a "
                     "model retrained without them (host side; tools/train_base.py --canary)",
                     f"{pre} verify --owner user7 --canaries base/canaries.json --before base/model.tflite "
                     "--reference retrained.tflite --data test.npz")
    vf.add_argument("--owner", required=True)
    vf.add_argument("--canaries", required=True, help="the host's canaries.json")
    vf.add_argument("--before", required=True, help="the model the canary was trained into (for a canary from "
                                                    "push-samples --canary: the model the forget started from)")
    vf.add_argument("--reference", required=True, help="a model retrained without the owner")
    vf.add_argument("--data", required=True, help="held-out samples (.npz: x, y, optional owners)")
    vf.add_argument("--after", help="the model after the forget (default: pull the device's active model)")
    vf.add_argument("--certificate", help="the forget's certificate (edge-qmul-host result JOB): its model hashes "
                                          "must be those of --before and the model verified")
    vf.add_argument("--out", help="also write the verification here (JSON, atomically): beside the certificate, "
                                  "for edge-qmul-fleet report --verification")
    args = ap.parse_args(argv)

    try:
        cmd = args.command
        # verify with --after asks the device nothing
        device = None if cmd == "verify" and args.after else connect(args.device, read_key(args.key_file),
                                                                      timeout=args.timeout)
        if cmd in ("info", "ping"):
            out = getattr(device, cmd)()
        elif cmd == "push-model":
            out = device.push_model(Path(args.model), activate=not args.no_activate, progress=_bar("push-model"))
        elif cmd == "push-table":
            out = device.push_table(Path(args.table), progress=_bar("push-table"))
        elif cmd == "push-samples" and args.canary:
            if not args.owner or args.role != "train":
                raise ValueError("push-samples --canary needs --owner and the train role (a canary is one "
                                 "owner's, learned from their training samples)")
            out = device.push_samples_with_canary(Path(args.npz), args.owner, Path(args.canary), args.canary_fraction,
                                                  args.canary_classes, progress=_bar("push-samples"))
        elif cmd == "push-samples":
            out = device.push_samples(Path(args.npz), owner=args.owner, role=args.role, progress=_bar("push-samples"))
        elif cmd == "forget":
            job = device.forget(parse_selector(args.owner, args.ids, args.label), args.method, table=args.table)
            if not args.wait:
                out = {"job_id": job}
            else:
                def show(st):
                    if sys.stderr.isatty():
                        eta = st.get("eta_s")
                        print(f"\r[{st['phase']}] {100 * (st.get('progress') or 0):5.1f}%"
                              + (f" eta {eta:.1f}s" if eta else ""), end="", file=sys.stderr, flush=True)
                out = device.wait(job, show)
                if args.commit and out["status"] == "done":
                    out = {"status": "committed", **device.commit(job)}
        elif cmd == "status":
            out = device.status(args.job_id)
        elif cmd == "result":
            out = device.result(args.job_id)
        elif cmd == "commit":
            out = device.commit(args.job_id)
        elif cmd == "rollback":
            out = device.rollback(args.job_id)
        elif cmd == "history":
            out = device.history(args.job_id)
        elif cmd == "pull-model":
            data = device.pull(args.name, progress=_bar("pull-model"))
            atomic_write(args.out, data)
            out = {"path": args.out, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        elif cmd == "verify":
            after = args.after or device.pull("current", progress=_bar("pull-model"))
            out = verify_files(args.canaries, args.owner, args.before, after, args.reference, args.data,
                               args.certificate)
            if args.out:
                atomic_write(args.out, (json.dumps(out, indent=1, sort_keys=True) + "\n").encode())
            print(f"edge-qmul-host: {summary_line(out)}", file=sys.stderr)
        elif cmd == "bench":
            report = device.bench(args.batch, args.forget_size, args.method, args.repeats)
            if args.json:
                atomic_write(args.json, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
            if args.png:
                plot(report, args.png)
            print(format_table(report))
            return 0
        print(json.dumps(out, indent=1, sort_keys=True, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
        return 0
    except RemoteError as e:
        print(f"edge-qmul-host: device error {e.code}: {e.message}", file=sys.stderr)
        return 3
    except (ChannelError, TransportError, OSError, ValueError) as e:
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"edge-qmul-host: error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-qmul-host: interrupted; the device keeps what it verified (an upload resumes "
              "where it stopped when you run the command again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
