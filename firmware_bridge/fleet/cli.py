"""`edge-qmul-fleet`: erasure requests for a person across a fleet of devices, from one registry.

    edge-qmul-fleet enroll --url 'mqtts://broker:8883/board-1?role=host&username=edge_qmul_host&password_file=host.pw&ca=ca.crt' --key-file board-1.key
    edge-qmul-fleet list
    edge-qmul-fleet forget --owner alice --method ft --commit --wait
    edge-qmul-fleet status
    edge-qmul-fleet report 20250101-120000-a1b2c3 --json alice-erasure.json
    edge-qmul-fleet retry 20250101-120000-a1b2c3 --wait
    edge-qmul-fleet run --wait          # work through every pending delivery (a service may run this)

The idea: the registry (fleet/registry.py) knows which owners each device last reported holding;
`forget` makes one delivery per holder and the runner (fleet/runner.py) works them through, the
offline devices' when they come back. A request is complete when every device that held the
owner has committed (or, without --commit, finished its job); `report` is the document that says
so, with every device's certificate. Exit status: 0 done / complete, 1 not complete after --wait,
2 an error (one line on stderr naming it). No key or password is ever printed.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import sys
from pathlib import Path

from edge_qmul.api import add_command, atomic_write, summary_line

from ..channel import ChannelError
from ..transport import TransportError
from ..transport.mqtt import parse_mqtt_url
from .registry import DELIVERY_STATES, FleetError, Registry, job_key
from .runner import Fleet, Offline

DEFAULT_DB = "fleet.db"
CERT_HASH_RULE = "sha256 of the certificate as canonical JSON (keys sorted, no spaces, UTF-8)"


class RunnerLock:
    """One runner per registry: two would talk to the same devices as the same MQTT client."""

    def __init__(self, db: Path) -> None:
        self.path = Path(f"{db}.runner.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FleetError(f"another edge-qmul-fleet process is working through {db}'s deliveries "
                             f"(it holds {self.path}); it takes up new requests too") from None

    def release(self) -> None:
        os.close(self.fd)


def _device_id(url: str, given: str | None) -> str:
    if url.lower().startswith(("mqtt://", "mqtts://")):
        try:
            s = parse_mqtt_url(url)
        except TransportError as e:
            raise FleetError(str(e)) from None
        if s.role != "host":
            raise FleetError(f"{url!r}: role={s.role}: the fleet is the host side (role=host)")
        if given is not None and given != s.device_id:
            raise FleetError(f"--id {given!r} differs from the device id {s.device_id!r} in the URL")
        return s.device_id
    if given is None:
        raise FleetError(f"{url!r}: name the device with --id (only an mqtt:// URL holds its id)")
    return given


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. epochs=1")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def report(reg: Registry, request_id: str) -> dict:
    """The document for a regulator: the request, every targeted device's outcome and certificate."""
    req = reg.request(request_id)
    rows = []
    for d in reg.deliveries(request_id):
        cert = d["certificate"]
        rows.append({"device_id": d["device_id"], "job_id": d["job_id"], "status": d["status"],
                     "certificate_sha256": d["certificate_sha256"], "model_sha256_pulled": d["model_sha256_pulled"],
                     "model_matches_certificate": (None if not cert or not d["model_sha256_pulled"] else
                                                   d["model_sha256_pulled"] == cert.get("model_after_sha256")),
                     "error": d["error"], "attempts": d["attempts"] + 1, "updated": _when(d["updated"]),
                     "earlier_jobs": [job_key(request_id, d["device_id"], i) for i in range(d["attempts"])],
                     "certificate": cert})
    return {"document": "edge-qmul erasure request report", "generated": _when(datetime.datetime.now().timestamp()),
            "request": {"id": req["id"], "owner": req["owner"], "method": req["method"], "params": req["params"],
                        "commit": req["commit"], "created": _when(req["created"]), "status": req["status"]},
            "complete": req["status"] == "complete", "counts": reg.counts(request_id),
            "devices_targeted": len(rows), "certificate_sha256_rule": CERT_HASH_RULE, "devices": rows}


def attach_verifications(doc: dict, paths: list[str]) -> dict:
    """The report with each canary verification (``edge-qmul-host verify --certificate C --out V``)
    placed on the device whose certificate it was bound to (same canonical sha256). A verification
    of another owner, bound to no certificate, or to none of this request's, is an error naming it."""
    by_cert = {d["certificate_sha256"]: d for d in doc["devices"] if d["certificate_sha256"]}
    owner = doc["request"]["owner"]
    for path in paths:
        try:
            v = json.loads(Path(path).read_text())
            cert, who = v.get("certificate"), v["owner"]
            entry = {k: v[k] for k in ("verdict", "before", "after", "reference", "p_value", "difference_hi",
                                       "canary_sha256", "model_sha256_after")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FleetError(f"{path}: not a verification from edge-qmul-host verify ({e.__class__.__name__}: {e})")
        if who != owner:
            raise FleetError(f"{path}: verifies owner {who!r}; request {doc['request']['id']} forgets {owner!r}")
        if not cert or not cert.get("sha256_canonical"):
            raise FleetError(f"{path}: not bound to a certificate (run verify with --certificate)")
        row = by_cert.get(cert["sha256_canonical"])
        if row is None:
            raise FleetError(f"{path}: its certificate {cert['sha256_canonical'][:16]}... is none of request "
                             f"{doc['request']['id']}'s")
        row["verification"] = {**entry, "file": str(path), "line": summary_line(v)}
    return doc


def _print_report(doc: dict) -> None:
    r = doc["request"]
    print(f"request {r['id']}: forget owner {r['owner']!r} (method {r['method'] or 'default'}, "
          f"{'commit' if r['commit'] else 'no commit'}), created {r['created']}")
    print(f"{'device':<16} {'status':<10} {'job':<17} {'certificate sha256':<18} {'model pulled':<14} error")
    for d in doc["devices"]:
        print(f"{d['device_id']:<16} {d['status']:<10} {d['job_id'] or '-':<17} "
              f"{(d['certificate_sha256'] or '-')[:16]:<18} {(d['model_sha256_pulled'] or '-')[:12]:<14} "
              f"{d['error'] or ''}")
    for d in doc["devices"]:
        if d.get("verification"):
            print(f"{d['device_id']}: {d['verification']['line']}")
    n = doc["devices_targeted"]
    if doc["complete"]:
        print(f"COMPLETE: all {n} devices that held {r['owner']!r} "
              + ("committed; certificates above" if r["commit"] else "finished their jobs"))
    else:
        c = doc["counts"]
        print(f"NOT COMPLETE: {', '.join(f'{c[s]} {s}' for s in DELIVERY_STATES if c[s])} of {n}")


def _status_line(reg: Registry, req: dict) -> str:
    c = reg.counts(req["id"])
    parts = ", ".join(f"{c[s]} {s}" for s in DELIVERY_STATES if c[s]) or "no device held the owner"
    return f"{req['id']}  owner {req['owner']!r}  {req['status']:<8}  {parts}"


def _try_lock(args) -> "RunnerLock | None":
    try:
        return RunnerLock(Path(args.db))
    except FleetError as e:
        print(f"edge-qmul-fleet: {e}", file=sys.stderr)
        return None


def _run(args, reg: Registry, request_ids: list[str] | None, wait: bool) -> bool:
    """Work the deliveries through under the runner lock; True when none is left open."""
    lock = RunnerLock(Path(args.db))
    try:
        with _fleet(args, reg) as fleet:
            return fleet.run(request_ids, wait_all=wait, timeout=args.timeout if wait else None)
    finally:
        lock.release()


def _fleet(args, reg: Registry) -> Fleet:
    quiet = getattr(args, "quiet", False)
    presence = None
    if getattr(args, "presence", False):
        from .presence import Presence
        presence = Presence.for_registry(reg)
    return Fleet(reg, hello_timeout=args.hello_timeout, reply_timeout=args.reply_timeout, poll_s=args.poll,
                 on_event=None if quiet else (lambda m: print(m, file=sys.stderr, flush=True)), presence=presence)


def _cmd(args) -> int:
    cmd = args.command
    reg = Registry(args.db, create=cmd == "enroll")
    try:
        if cmd == "enroll":
            device_id = _device_id(args.url, args.id)
            key_file = str(Path(args.key_file).resolve())
            lock = RunnerLock(Path(args.db))
            try:
                with Fleet(reg, hello_timeout=args.hello_timeout, reply_timeout=args.reply_timeout) as fleet:
                    try:
                        info = fleet.contact(device_id, args.url, key_file).info()
                    except (Offline, ChannelError) as e:
                        raise FleetError(f"device {device_id}: no answer at {args.url} ({e}): is its agent "
                                         f"running, with the key in {key_file}? (not enrolled)") from None
            finally:
                lock.release()
            dev = reg.add_device(device_id, args.url, key_file, info)
            print(f"enrolled {device_id}: model {(dev['model_sha256'] or 'none')[:12]}, {dev['samples'] or 0} samples, "
                  f"owners {', '.join(dev['owners']) or 'none'}")
        elif cmd == "list":
            devices = [reg.device(args.device)] if args.device else reg.devices()
            if args.json:
                print(json.dumps(devices, indent=1, sort_keys=True))
            for d in devices if not args.json else []:
                print(f"{d['id']:<16} last seen {_when(d['last_seen'])}  model {(d['model_sha256'] or 'none')[:12]}  "
                      f"{d['samples'] or 0} samples  owners: {', '.join(d['owners']) or 'none'}")
            if not devices and not args.json:
                print("no devices enrolled")
        elif cmd == "forget":
            params = dict(args.param or [])
            # Under the runner lock; if another runner holds it, the request is only recorded (it
            # takes it up): two processes as the same MQTT client would push each other off.
            lock = _try_lock(args)
            try:
                fleet = _fleet(args, reg) if lock else None
                seen = fleet.refresh_all() if fleet else {}  # online devices report what they hold now
                targets = reg.holders(args.owner)
                request_id = reg.add_request(args.owner, args.method, params, args.commit, targets)
                offline = [t for t in targets if seen.get(t) != "online"]
                print(f"request {request_id}: owner {args.owner!r} on {len(targets)} device(s)"
                      + (f": {', '.join(targets)}" if targets else "")
                      + (f"; queued for offline {', '.join(offline)}" if offline else ""), flush=True)
                done = fleet.run([request_id], wait_all=args.wait, timeout=args.timeout) if fleet else False
            finally:
                if lock:
                    fleet.close()
                    lock.release()
            print(_status_line(reg, reg.request(request_id)))
            return 0 if not args.wait or (done and reg.request(request_id)["status"] == "complete") else 1
        elif cmd == "status":
            reqs = [reg.request(args.request)] if args.request else reg.requests()
            if args.json:
                print(json.dumps([{**r, "counts": reg.counts(r["id"])} for r in reqs], indent=1, sort_keys=True))
            else:
                for r in reqs:
                    print(_status_line(reg, r))
                if not reqs:
                    print("no requests")
        elif cmd == "report":
            doc = attach_verifications(report(reg, args.request), args.verification or [])
            if args.json:
                atomic_write(args.json, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
            _print_report(doc)
            return 0 if doc["complete"] else 1
        elif cmd == "retry":
            again = reg.retry(args.request)
            print(f"request {args.request}: {len(again)} failed deliveries back to pending"
                  + (f" ({', '.join(again)})" if again else ""))
            done = _run(args, reg, [args.request], args.wait)
            print(_status_line(reg, reg.request(args.request)))
            return 0 if not args.wait or done else 1
        elif cmd == "run":
            for r in args.request or []:
                reg.request(r)  # unknown ids are refused before any work
            done = _run(args, reg, args.request or None, args.wait)
            for r in reg.requests():
                if not args.request or r["id"] in args.request:
                    print(_status_line(reg, r))
            return 0 if not args.wait or done else 1
        return 0
    finally:
        reg.close()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-qmul-fleet", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + "\n".join(
                                     "  " + line.strip() for line in __doc__.split("\n\n")[1].splitlines()))
    ap.add_argument("--db", default=os.environ.get("EDGE_QMUL_FLEET_DB", DEFAULT_DB),
                    help=f"the registry (SQLite; default $EDGE_QMUL_FLEET_DB or ./{DEFAULT_DB})")
    ap.add_argument("--hello-timeout", type=float, default=2.0, help="seconds a device has to answer HELLO")
    ap.add_argument("--reply-timeout", type=float, default=3.0, help="seconds a device has to answer a request")
    ap.add_argument("--poll", type=float, default=10.0, help="seconds between tries of an offline device")
    ap.add_argument("--presence", action="store_true", help="MQTT: follow the devices' retained online/offline "
                    "status instead of polling offline devices with HELLO")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    sub = ap.add_subparsers(dest="command", required=True)
    p = "edge-qmul-fleet"
    en = add_command(sub, "enroll", "add a device (it must answer now): its URL (host side) and key file",
                     [f"{p} enroll --url 'mqtts://broker:8883/board-1?role=host&username=edge_qmul_host&"
                      "password_file=host.pw&ca=ca.crt' --key-file keys/board-1.key",
                      f"{p} enroll --url tcp://10.0.0.7:7070 --id board-7 --key-file keys/board-7.key"])
    en.add_argument("--url", required=True, help="the device's transport URL, host side (no password in it)")
    en.add_argument("--key-file", required=True, help="the device's 32-byte key (mode 600); its path is stored")
    en.add_argument("--id", help="the device id (default: the id in an mqtt:// URL)")
    ls = add_command(sub, "list", "the devices and what they last reported (owners, model, samples)",
                     [f"{p} list", f"{p} list board-1 --json"])
    ls.add_argument("device", nargs="?", help="only this device")
    ls.add_argument("--json", action="store_true")
    fg = add_command(sub, "forget", "erase an owner's samples on every device that holds them (queued for "
                     "offline ones)", [f"{p} forget --owner alice --commit --wait",
                                       f"{p} forget --owner bob --method ft --param epochs=1 --commit"])
    fg.add_argument("--owner", required=True)
    fg.add_argument("--method", help="the unlearning method (default: the device's default)")
    fg.add_argument("--param", action="append", type=_param, help="a method parameter KEY=VALUE (repeatable)")
    fg.add_argument("--commit", action="store_true", help="commit each job when done (delete the samples, "
                    "activate the new model) and collect the certificates")
    for cmd in (fg,):
        cmd.add_argument("--wait", action="store_true", help="keep going until every device has finished "
                         "(offline devices when they return)")
        cmd.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (exit 1)")
    st = add_command(sub, "status", "per request, its deliveries by status", [f"{p} status", f"{p} status REQUEST"])
    st.add_argument("request", nargs="?")
    st.add_argument("--json", action="store_true")
    rp = add_command(sub, "report", "per device: job, status, certificate and model hashes; complete or not",
                     f"{p} report REQUEST --json erasure.json")
    rp.add_argument("request")
    rp.add_argument("--json", help="write the whole report, certificates included, here")
    rp.add_argument("--verification", action="append", metavar="V.json",
                    help="a canary verification bound to one of the request's certificates (edge-qmul-host verify "
                         "--certificate C --out V.json); shown beside that device's certificate (repeatable)")
    rt = add_command(sub, "retry", "failed deliveries of a request back to pending (a new job each), and run",
                     f"{p} retry REQUEST --wait")
    rt.add_argument("request")
    rn = add_command(sub, "run", "work through every open delivery (of the given requests, else all)",
                     [f"{p} run --wait", f"{p} run REQUEST --wait --timeout 600"])
    rn.add_argument("request", nargs="*")
    for cmd in (rt, rn):
        cmd.add_argument("--wait", action="store_true", help="until every delivery has ended")
        cmd.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (exit 1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _cmd(args)
    except FleetError as e:
        print(f"edge-qmul-fleet: {e}", file=sys.stderr)
        return 2
    except (ChannelError, TransportError, OSError, ValueError) as e:
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"edge-qmul-fleet: error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-qmul-fleet: interrupted; the registry keeps every delivery's state (run it again, or "
              "`edge-qmul-fleet run --wait`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
