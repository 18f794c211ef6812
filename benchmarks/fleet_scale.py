"""Fleet scale: N real agents behind one mosquitto, one fleet-wide forget of an owner they all hold.

    NUMBA_CACHE_DIR=/tmp/nc_scale .venv/bin/python benchmarks/fleet_scale.py --devices 1000 \
        --per-process 200 --json benchmarks/results/fleet_scale.json

The idea: the issue-17 acceptance point measured end to end with nothing simulated on the device
side. Every device is a real `firmware_bridge.device.Agent` (its own state directory, its own
random key, one job worker thread) served by `device.serve` on its own MQTT transport (role=device,
one paho client and network thread each), M of them per worker process. The host side is the real
`edge-qmul-fleet forget --owner X --commit --wait` (cli -> Fleet runner) in its own process.

Shortcuts, each equivalent to something the fleet already does: (1) provisioning: ONE state
directory is provisioned over the host API (model push + samples push), then copied N times
(shutil.copytree): the same bytes N pushes would have left. (2) enrollment: the registry rows are
written directly (Registry.add_device with the INFO the device would answer); `forget` then
HELLOs and INFOs every device anyway (refresh_all), so what each device holds is checked over the
network. (3) TLS is off by default (`--tls` turns it on), measured separately.

Measured: wall time from the forget command to 50/90/99/100% committed deliveries; deliveries per
second; peak RSS (VmHWM) of mosquitto, of the fleet process and of every worker process.
Checked (the exit status): every device has exactly one job file, its id is the delivery's job key,
the job is committed, and the registry says N committed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/mosquitto.py: the Mosquitto starter
MODEL = ROOT / "tests" / "fixtures" / "digits_cnn.tflite"
OWNER = "alice"


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by mosquitto and the workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_mem(pid: int) -> dict:
    """{'rss': bytes, 'hwm': bytes} of a live process from /proc (empty if it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


# ------------------------------------------------------------------ worker process: M agents

def worker_main(spec_path: Path) -> int:
    """Serve the agents listed in the spec (id, url, key file, state dir) until stdin closes."""
    from firmware_bridge.device import Agent, read_key, serve
    from firmware_bridge.transport.mqtt import open_mqtt_url

    spec = json.loads(spec_path.read_text())
    stop = threading.Event()
    live = []
    t0 = time.monotonic()
    for device_id, url, key_file, state in spec:
        transport = open_mqtt_url(url, connect_timeout=60.0)
        agent = Agent(state, threads=1)
        th = threading.Thread(target=serve, args=(transport, agent, read_key(key_file), stop.is_set),
                              name=f"serve-{device_id}", daemon=True)
        th.start()
        live.append((transport, agent, th))
    print(f"READY {len(live)} {time.monotonic() - t0:.2f}", flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    stop.set()  # the serve loops end within their 0.1 s poll; the broker sees the connections drop
    time.sleep(0.5)
    print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
    os._exit(0)


# ------------------------------------------------------------------ host side: the fleet command

HOST_WRAPPER = ("import resource, sys\nfrom firmware_bridge.fleet import cli\nrc = cli.main(sys.argv[1:])\n"
                "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
                "sys.exit(rc)\n")


def provision_template(broker, root: Path, per_device: int) -> tuple[Path, str]:
    """One state directory provisioned over the host API (model + samples, half of them OWNER's);
    returns (its path, the model's sha256)."""
    import numpy as np

    from edge_qmul import datasets
    from firmware_bridge.channel import Client, Server
    from firmware_bridge.device import Agent, read_key, write_key
    from firmware_bridge.host import DeviceClient
    from firmware_bridge.transport import open_transport

    state, key = root / "template", read_key(write_key(root / "template.key"))
    ds = datasets.load("digits", seed=0)
    half = per_device // 2
    npz = root / "samples.npz"
    np.savez(npz, x=ds.x_train[:per_device], y=ds.y_train[:per_device],
             owners=np.array([OWNER] * half + ["keep"] * (per_device - half)))
    device = open_transport(broker.url("template", "device"))
    agent = Agent(state, threads=1)
    stop = threading.Event()
    th = threading.Thread(target=Server(device, key, agent.handle).serve, args=(stop.is_set,), daemon=True)
    th.start()
    host = open_transport(broker.url("template", "host"), timeout=0.2)
    try:
        client = Client(host, key, timeout=5.0)
        client.connect()
        dev = DeviceClient(client)
        sha = dev.push_model(MODEL)["sha256"]
        dev.push_samples(npz)
        info = dev.info()
        assert sorted(info["owners"]) == sorted({OWNER, "keep"}) and info["samples"] == per_device, info
    finally:
        host.close()
        stop.set()
        th.join(5)
        device.close()
        agent.close()
    return state, sha


def warm_numba(template: Path, root: Path, params: dict) -> float:
    """Run one forget job on a copy of the template in this process (fills the numba cache the
    workers load from); the job's wall time."""
    from edge_qmul.api import StateDir

    scratch = root / "warm"
    shutil.copytree(template, scratch)
    sd = StateDir(scratch)
    try:
        from edge_qmul.api import check_selector
        job = sd.new_job(check_selector({"owner": OWNER}), "ft", params, None, None)
        t = time.monotonic()
        sd.run_job(job, warn=lambda *a: None)
        elapsed = time.monotonic() - t
        assert job.status == "done", (job.status, job.error)
    finally:
        sd.close()
    shutil.rmtree(scratch)
    return elapsed


class Monitor(threading.Thread):
    """Samples the registry's committed count and the processes' memory every `step` seconds."""

    def __init__(self, db: Path, pids: dict[str, int], total: int, t0: float, step: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.db, self.pids, self.total, self.t0, self.step = db, pids, total, t0, step
        self.marks: dict[str, float] = {}
        self.first_sent: float | None = None
        self.request_at: float | None = None
        self.peak: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.done.is_set():
            now = time.monotonic() - self.t0
            for name, pid in list(self.pids.items()):
                hwm = proc_mem(pid).get("hwm")
                if hwm:
                    self.peak[name] = max(self.peak.get(name, 0), hwm)
            try:
                if conn is None and self.db.exists():
                    conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                if conn is not None:
                    rows = dict(conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall())
                    if rows and self.request_at is None:
                        self.request_at = now
                    if self.first_sent is None and sum(v for k, v in rows.items() if k != "pending"):
                        self.first_sent = now
                    committed = rows.get("committed", 0)
                    for pct in (50, 90, 99, 100):
                        if f"p{pct}" not in self.marks and committed * 100 >= pct * self.total:
                            self.marks[f"p{pct}"] = now
            except sqlite3.Error:
                pass
            self.done.wait(self.step)
        if conn is not None:
            conn.close()


def verify(root: Path, db: Path, ids: list[str]) -> dict:
    """Exactly once: one job file per device, named by its delivery's job key, committed."""
    from firmware_bridge.fleet.registry import Registry, job_key

    problems = []
    with Registry(db) as reg:
        reqs = reg.requests()
        assert len(reqs) == 1, f"expected one request, found {len(reqs)}"
        rid = reqs[0]["id"]
        counts = reg.counts(rid)
        deliveries = {d["device_id"]: d for d in reg.deliveries(rid)}
        status = reg.request(rid)["status"]
    for device_id in ids:
        jobs = sorted((root / "states" / device_id / "jobs").glob("*.json"))
        key = job_key(rid, device_id)
        if [p.stem for p in jobs] != [key]:
            problems.append(f"{device_id}: job files {[p.stem for p in jobs]} (expected [{key}])")
            continue
        job = json.loads(jobs[0].read_text())
        if job.get("status") != "committed":
            problems.append(f"{device_id}: job {key} is {job.get('status')}")
        d = deliveries.get(device_id)
        if d is None or d["status"] != "committed" or d["attempts"] != 0:
            problems.append(f"{device_id}: delivery {d and d['status']} (attempts {d and d['attempts']})")
    return {"request": rid, "request_status": status, "counts": counts, "problems": problems[:20],
            "n_problems": len(problems), "ok": not problems and counts["committed"] == len(ids)}


def run(args) -> dict:
    from mosquitto import Mosquitto

    from firmware_bridge.device import write_key
    from firmware_bridge.fleet.registry import Registry

    nofile = raise_nofile()
    root = Path(args.root or tempfile.mkdtemp(prefix="fleet_scale_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    n, m = args.devices, args.per_process
    ids = [f"dev-{i:05d}" for i in range(n)]
    params = {"epochs": 1}
    timings: dict[str, float] = {}
    t = time.monotonic()
    broker = Mosquitto(root / "broker", ids + ["template"], tls=args.tls)
    timings["broker_config_and_start_s"] = time.monotonic() - t
    workers: list[subprocess.Popen] = []
    host = None
    try:
        t = time.monotonic()
        template, model_sha = provision_template(broker, root, args.samples)
        timings["provision_template_s"] = time.monotonic() - t
        timings["one_job_in_process_s"] = warm_numba(template, root, params)
        t = time.monotonic()
        (root / "states").mkdir(exist_ok=True)
        (root / "keys").mkdir(exist_ok=True)
        for device_id in ids:  # = the N model + samples pushes, already done
            shutil.copytree(template, root / "states" / device_id)
            write_key(root / "keys" / f"{device_id}.key")
        timings["copy_states_and_keys_s"] = time.monotonic() - t

        t = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for w in range(0, n, m):
            spec = [[d, broker.url(d, "device"), str(root / "keys" / f"{d}.key"), str(root / "states" / d)]
                    for d in ids[w:w + m]]
            spec_path = root / f"worker{w // m}.json"
            spec_path.write_text(json.dumps(spec))
            workers.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                            stderr=open(root / f"worker{w // m}.log", "w")))
        for p in workers:
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"worker {p.pid} did not start: {line!r}; see {root}/worker*.log")
        timings["agents_start_s"] = time.monotonic() - t

        db = root / "fleet.db"
        t = time.monotonic()
        with Registry(db) as reg:  # = `edge-qmul-fleet enroll` of each, without the network round trip
            for device_id in ids:
                reg.add_device(device_id, broker.url(device_id, "host"), str(root / "keys" / f"{device_id}.key"),
                               {"owners": [OWNER, "keep"], "samples": args.samples, "model_sha256": model_sha})
        timings["registry_rows_s"] = time.monotonic() - t

        argv = ["--db", str(db), "--quiet", "--hello-timeout", str(args.hello_timeout), "--reply-timeout",
                str(args.reply_timeout), "--poll", str(args.poll), "forget", "--owner", OWNER, "--method", "ft",
                "--param", "epochs=1", "--commit", "--wait", "--timeout", str(args.timeout)]
        mem_before = {"mosquitto": proc_mem(broker.proc.pid).get("rss", 0)}
        t0 = time.monotonic()
        host = subprocess.Popen([sys.executable, "-c", HOST_WRAPPER, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        pids = {"mosquitto": broker.proc.pid, "fleet": host.pid} | {f"worker{i}": p.pid for i, p in enumerate(workers)}
        mon = Monitor(db, pids, n, t0)
        mon.start()
        out, err = host.communicate(timeout=args.timeout + 120)
        elapsed = time.monotonic() - t0
        time.sleep(2 * mon.step)
        mon.done.set()
        mon.join()
        peak = dict(mon.peak)
        peak["mosquitto"] = max(peak.get("mosquitto", 0), proc_mem(broker.proc.pid).get("hwm", 0))
        host_maxrss = next((int(line.split()[1]) for line in err.splitlines() if line.startswith("MAXRSS")), None)
        if host_maxrss:
            peak["fleet"] = host_maxrss
        check = verify(root, db, ids)
        check["fleet_exit_status"] = host.returncode
        check["ok"] = check["ok"] and host.returncode == 0
        if host.returncode != 0:
            check["fleet_stderr_tail"] = err[-2000:]
        worker_rss = [v for k, v in peak.items() if k.startswith("worker")]
        return {
            "devices": n, "per_process": m, "worker_processes": len(workers), "tls": args.tls,
            "samples_per_device": args.samples, "method": "ft", "params": params, "model": MODEL.name,
            "fleet_cmd": "edge-qmul-fleet " + " ".join(a if " " not in a else repr(a) for a in argv[2:]),
            "rlimit_nofile": nofile, "cores": os.cpu_count(), "root": str(root), "setup": timings,
            "forget": {"wall_s": elapsed, "request_recorded_s": mon.request_at, "first_job_sent_s": mon.first_sent,
                       **{f"{k}_committed_s": v for k, v in mon.marks.items()},
                       "deliveries_per_s": n / mon.marks["p100"] if "p100" in mon.marks else None,
                       "fleet_stdout": out.strip().splitlines()[-1:] if out.strip() else []},
            "memory_bytes": {"mosquitto_peak": peak.get("mosquitto"), "mosquitto_before_forget": mem_before["mosquitto"],
                             "fleet_peak": peak.get("fleet"), "worker_peak_max": max(worker_rss, default=None),
                             "workers_peak_sum": sum(worker_rss), "per_agent_approx": sum(worker_rss) // n},
            "check": check,
        }
    finally:
        if host is not None and host.poll() is None:
            host.kill()
            host.communicate()
        for p in workers:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        broker.stop()
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)


def summary(r: dict) -> str:
    f, mem, mb = r["forget"], r["memory_bytes"], 1 / 2**20
    rows = [("devices / per process / processes", f"{r['devices']} / {r['per_process']} / {r['worker_processes']}"),
            ("TLS", str(r["tls"])),
            ("setup: broker, template, copy, agents up, registry",
             ", ".join(f"{r['setup'][k]:.1f}" for k in ("broker_config_and_start_s", "provision_template_s",
                                                         "copy_states_and_keys_s", "agents_start_s",
                                                         "registry_rows_s")) + " s"),
            ("first job in process (numba cache load)", f"{r['setup']['one_job_in_process_s'] * 1000:.0f} ms"),
            ("forget -> request recorded (refresh_all)", _s(f["request_recorded_s"])),
            ("forget -> 50% / 90% / 99% / 100% committed",
             " / ".join(_s(f.get(f"p{p}_committed_s")) for p in (50, 90, 99, 100))),
            ("fleet command wall", _s(f["wall_s"])),
            ("deliveries per second", f"{f['deliveries_per_s']:.1f}" if f["deliveries_per_s"] else "-"),
            ("mosquitto RSS before forget / peak", f"{(mem['mosquitto_before_forget'] or 0) * mb:.1f} / "
                                                   f"{(mem['mosquitto_peak'] or 0) * mb:.1f} MiB"),
            ("fleet process peak RSS", f"{(mem['fleet_peak'] or 0) * mb:.1f} MiB"),
            ("worker peak RSS max / sum / per agent", f"{(mem['worker_peak_max'] or 0) * mb:.1f} / "
                                                      f"{mem['workers_peak_sum'] * mb:.1f} MiB / "
                                                      f"{mem['per_agent_approx'] / 1024:.0f} KiB"),
            ("exactly once: committed / problems", f"{r['check']['counts']['committed']} / {r['check']['n_problems']}"),
            ("verdict", "OK" if r["check"]["ok"] else "FAILED")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _s(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-process", type=int, default=200, help="agents per worker process")
    ap.add_argument("--samples", type=int, default=20, help="samples per device (half of them the owner's)")
    ap.add_argument("--tls", action="store_true", help="mqtts:// (default: plain mqtt:// on 127.0.0.1)")
    ap.add_argument("--hello-timeout", type=float, default=10.0)
    ap.add_argument("--reply-timeout", type=float, default=15.0)
    ap.add_argument("--poll", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="the fleet command's --timeout")
    ap.add_argument("--root", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(Path(args.worker))
    if args.devices < 1 or not 1 <= args.per_process <= 300:
        ap.error("--devices must be at least 1 and --per-process 1 to 300 (each agent's paho client holds "
                 "3 fds and paho's select() cannot watch fds >= 1024)")
    r = run(args)
    print(summary(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
    return 0 if r["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
