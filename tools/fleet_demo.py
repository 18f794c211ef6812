"""`make fleet-demo`: one person forgotten across a small fleet of devices over MQTT, one of them
offline when the request is made.

    python tools/fleet_demo.py [--devices 5] [--owner user7] [--keep NEW_DIR]

The idea: everything a real fleet has, on this machine, in a temporary directory:
1. a mosquitto broker (TLS, a password and an ACL per device: firmware_bridge.broker's config) on a
   free port of 127.0.0.1;
2. five device agents, each its own process (`edge-qmul serve --url mqtts://...`) with its own key
   and state directory;
3. as the host: the digits CNN (tests/fixtures/digits_cnn.tflite, the int8 model `make demo`
   trains, kept as a fixture) and digits samples pushed to each, the owner's samples on three of
   them; each device enrolled in a fleet registry (`edge-qmul-fleet enroll`);
4. one of the three stopped, then `edge-qmul-fleet --presence forget --owner user7 --commit --wait`
   started; the stopped device is started again a few seconds later and gets its job then;
5. the report: per device its job, certificate hash, model hash and whether the request is complete.
Every process is stopped at the end, on an error or on Ctrl-C. Exit status 0 when the request is
complete, 1 when not, 2 when the demo could not run (no mosquitto). No key or password is printed.
"""
from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_qmul import datasets  # noqa: E402
from firmware_bridge.broker import write_broker_config  # noqa: E402
from firmware_bridge.channel import Client  # noqa: E402
from firmware_bridge.device import read_key, write_key  # noqa: E402
from firmware_bridge.fleet import cli as fleet_cli  # noqa: E402
from firmware_bridge.fleet.registry import Registry  # noqa: E402
from firmware_bridge.host import DeviceClient  # noqa: E402
from firmware_bridge.transport import open_transport  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "digits_cnn.tflite"
FLEET_OPTS = ["--hello-timeout", "1", "--reply-timeout", "3", "--poll", "1"]
T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edge_qmul_cmd() -> list[str]:
    script = Path(sys.executable).parent / "edge-qmul"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_qmul.cli"]


class Demo:
    """The demo's processes (broker, agents, the fleet command); `close()` stops them all."""

    def __init__(self, work: Path, n_devices: int) -> None:
        self.work = work
        self.ids = [f"board-{i}" for i in range(n_devices)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.broker = None

    def start_broker(self, mosquitto: str) -> None:
        run_as = getpass.getuser() if os.geteuid() == 0 else None  # root: mosquitto drops to us
        self.cfg = write_broker_config(self.work / "broker", self.ids, port=free_port(), tls=True, run_as=run_as)
        log = open(self.work / "broker" / "mosquitto.log", "ab")
        self.procs["mosquitto"] = subprocess.Popen([mosquitto, "-c", str(self.cfg.conf)], stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.procs["mosquitto"].poll() is not None:
                raise RuntimeError(f"mosquitto exited: see {self.work / 'broker' / 'mosquitto.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.cfg.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {self.cfg.port}") from None
                time.sleep(0.05)

    def url(self, device_id: str, role: str) -> str:
        return self.cfg.url(device_id, role, host="127.0.0.1")

    def key_file(self, device_id: str) -> Path:
        return self.work / "keys" / f"{device_id}.key"

    def start_agent(self, device_id: str) -> None:
        log = open(self.work / f"{device_id}.log", "ab")
        self.procs[device_id] = subprocess.Popen(
            [*edge_qmul_cmd(), "serve", "--url", self.url(device_id, "device"), "--state",
             str(self.work / device_id), "--key-file", str(self.key_file(device_id)), "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def stop_agent(self, device_id: str) -> None:
        p = self.procs.pop(device_id)
        p.terminate()
        p.wait(30)

    def provision(self, device_id: str, npz: Path, timeout: float = 60.0) -> None:
        """Push the model and the samples, once the agent answers."""
        key = read_key(self.key_file(device_id))
        deadline = time.monotonic() + timeout
        while True:
            transport = open_transport(self.url(device_id, "host"), timeout=0.2)
            try:
                client = Client(transport, key, timeout=3.0)
                client.connect()
                dev = DeviceClient(client)
                dev.push_model(MODEL)
                dev.push_samples(npz)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.procs[device_id].poll() is not None:
                    raise
                time.sleep(0.5)
            finally:
                transport.close()

    def close(self) -> None:
        for name, p in list(self.procs.items()):
            if name != "mosquitto" and p.poll() is None:
                p.terminate()
        for name, p in list(self.procs.items()):
            if name == "mosquitto":
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        broker = self.procs.get("mosquitto")
        if broker is not None and broker.poll() is None:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(5)
        self.procs.clear()


def write_samples(path: Path, owners: list[str], start: int, per_owner: int = 12) -> Path:
    ds = datasets.load("digits", seed=0)
    n = per_owner * len(owners)
    np.savez(path, x=ds.x_train[start:start + n], y=ds.y_train[start:start + n],
             owners=np.repeat(np.array(owners), per_owner))
    return path


def pipe(stream, prefix: str) -> None:
    for line in stream:
        print(f"{prefix}{line.rstrip()}", flush=True)


def run(args, work: Path) -> int:
    mosquitto = find_mosquitto()
    if mosquitto is None:
        print("fleet-demo: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    demo = Demo(work, args.devices)
    holders = demo.ids[:3]
    late = holders[-1]
    db = work / "fleet.db"
    try:
        demo.start_broker(mosquitto)
        say(f"mosquitto (pid {demo.procs['mosquitto'].pid}) on 127.0.0.1:{demo.cfg.port} (TLS, one password "
            f"and ACL entry per device): {work / 'broker'}")
        (work / "keys").mkdir(mode=0o700, exist_ok=True)
        for d in demo.ids:
            write_key(demo.key_file(d))
            demo.start_agent(d)
        say(f"{len(demo.ids)} agents started: " + ", ".join(f"{d} (pid {demo.procs[d].pid})" for d in demo.ids))
        for i, d in enumerate(demo.ids):
            owners = ([args.owner] if d in holders else []) + [f"user{10 + 2 * i}", f"user{11 + 2 * i}"]
            demo.provision(d, write_samples(work / f"{d}.npz", owners, start=40 * i))
            rc = fleet_cli.main(["--db", str(db), "--quiet", *FLEET_OPTS, "enroll", "--url", demo.url(d, "host"),
                                 "--key-file", str(demo.key_file(d))])
            if rc != 0:
                raise RuntimeError(f"enrolling {d} failed ({rc})")
            say(f"{d}: model and samples pushed (owners {', '.join(owners)}), enrolled")
        demo.stop_agent(late)
        say(f"{late} stopped (it holds {args.owner}'s samples too)")
        say(f"edge-qmul-fleet --presence forget --owner {args.owner} --method ft --commit --wait")
        forget = subprocess.Popen([sys.executable, "-m", "firmware_bridge.fleet.cli", "--db", str(db), *FLEET_OPTS,
                                   "--presence", "forget", "--owner", args.owner, "--method", "ft", "--param",
                                   "epochs=1", "--commit", "--wait", "--timeout", str(args.timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        demo.procs["forget"] = forget
        readers = [threading.Thread(target=pipe, args=(s, "    fleet | "), daemon=True)
                   for s in (forget.stdout, forget.stderr)]
        for t in readers:
            t.start()
        time.sleep(args.late_after)
        demo.start_agent(late)
        say(f"{late} started again (pid {demo.procs[late].pid}); no second command")
        try:
            rc = forget.wait(args.timeout + 30)
        except subprocess.TimeoutExpired:
            forget.kill()
            rc = forget.wait(5)
        for t in readers:
            t.join(5)
        say(f"edge-qmul-fleet forget exited with {rc}")
        with Registry(db) as reg:
            request = reg.requests()[-1]["id"]
            doc = fleet_cli.report(reg, request)
        print(f"\nrequest {request}: forget {args.owner!r} on {doc['devices_targeted']} of {len(demo.ids)} devices")
        print(f"{'device':<10} {'status':<10} {'job':<17} {'certificate sha256':<66} {'model sha256':<14}")
        for row in doc["devices"]:
            print(f"{row['device_id']:<10} {row['status']:<10} {row['job_id'] or '-':<17} "
                  f"{row['certificate_sha256'] or '-':<66} {(row['model_sha256_pulled'] or '-')[:12]:<14}")
        complete = doc["complete"] and rc == 0
        print(f"request complete: {'yes' if complete else 'NO'}")
        return 0 if complete else 1
    finally:
        demo.close()
        say("every process stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=5, help="device agents to start (at least 3)")
    ap.add_argument("--owner", default="user7", help="the person to forget (their samples on 3 devices)")
    ap.add_argument("--late-after", type=float, default=4.0, help="seconds before the stopped device returns")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds the forget command may take")
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.devices < 3:
        ap.error("--devices: at least 3")
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fleet_demo_"))
    if args.keep and work.exists() and any(work.iterdir()):
        ap.error(f"--keep {work}: expected a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work)
    except KeyboardInterrupt:
        print("fleet-demo: interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
