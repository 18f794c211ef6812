"""edge-qmul-fleet against a real mosquitto (tests/mosquitto.py): an erasure request for a person
reaches exactly the devices that hold their samples, offline ones when they return, each job runs
once, and the report lists every certificate with the model it produced.

The fast test runs three agents in this process (AgentThread) and the command's bad input; the
slow one runs ten `edge-qmul serve --url mqtts://...` processes, two of them stopped when the
request is made and started later, with no second command."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_qmul import datasets
from firmware_bridge.channel import Client
from firmware_bridge.device import read_key, write_key
from firmware_bridge.fleet import cli
from firmware_bridge.fleet.registry import FleetError, Registry, canonical_json, job_key
from firmware_bridge.host import DeviceClient
from firmware_bridge.transport import open_transport
from mosquitto import mosquitto_broker  # noqa: F401 - a pytest fixture, used by name
from test_transport_mqtt import AgentThread

MODEL = Path(__file__).parent / "fixtures" / "digits_cnn.tflite"
FAST = ["--hello-timeout", "1", "--reply-timeout", "3", "--poll", "0.5"]


def fleet(db: Path, *argv: str, capsys=None) -> tuple[int, str, str]:
    """`edge-qmul-fleet --db DB ARGV` in this process: (exit status, stdout, stderr)."""
    rc = cli.main(["--db", str(db), *FAST, *argv])
    if capsys is None:
        return rc, "", ""
    out = capsys.readouterr()
    return rc, out.out, out.err


def samples(path: Path, owners: list[str], per_owner: int = 12, start: int = 0) -> Path:
    """An .npz of digits training samples, `per_owner` for each owner (in order)."""
    ds = datasets.load("digits", seed=0)
    n = per_owner * len(owners)
    np.savez(path, x=ds.x_train[start:start + n], y=ds.y_train[start:start + n],
             owners=np.repeat(np.array(owners), per_owner))
    return path


def provision(url: str, key: bytes, npz: Path) -> str:
    """Push the model and the samples through the host API; the model's sha256."""
    transport = open_transport(url, timeout=0.2)
    try:
        client = Client(transport, key, timeout=3.0)
        client.connect()
        dev = DeviceClient(client)
        sha = dev.push_model(MODEL)["sha256"]
        dev.push_samples(npz)
        return sha
    finally:
        transport.close()


def job_files(state: Path) -> list[str]:
    return sorted(p.stem for p in (state / "jobs").glob("*.json"))


def secrets_of(broker, keys) -> list[str]:
    return [p.read_text().strip() for p in broker.config.password_files.values()] + \
        [k.hex() for k in keys] + [repr(k) for k in keys]


# ------------------------------------------------------------------ fast: in-process agents

def test_fleet_registry_and_commands_on_three_agents(mosquitto_broker, tmp_path, capsys):  # noqa: F811
    ids = ["dev-a", "dev-b", "dev-c"]
    broker = mosquitto_broker(ids + ["dev-x"], tls=True)
    db = tmp_path / "fleet.db"
    keys, agents = {}, {}
    holdings = {"dev-a": ["alice", "bob"], "dev-b": ["bob", "carol"], "dev-c": ["alice", "dave"]}

    def start(device_id: str) -> AgentThread:
        return AgentThread(open_transport(broker.url(device_id, "device")), tmp_path / device_id, keys[device_id])

    for i, device_id in enumerate(ids):
        keys[device_id] = read_key(write_key(tmp_path / f"{device_id}.key"))
        agents[device_id] = start(device_id)
        provision(broker.url(device_id, "host"), keys[device_id],
                  samples(tmp_path / f"{device_id}.npz", holdings[device_id], start=40 * i))
        rc, out, err = fleet(db, "enroll", "--url", broker.url(device_id, "host"),
                             "--key-file", str(tmp_path / f"{device_id}.key"), capsys=capsys)
        assert rc == 0, err
        assert f"enrolled {device_id}" in out and ", ".join(holdings[device_id]) in out

    # bad input: clear errors, exit 2, nothing recorded
    rc, out, err = fleet(db, "enroll", "--url", broker.url("dev-x", "host"), "--key-file",
                         str(tmp_path / "dev-a.key"), capsys=capsys)
    assert rc == 2 and "device dev-x: no answer" in err and "not enrolled" in err
    rc, out, err = fleet(db, "enroll", "--url", broker.url("dev-a", "device"), "--key-file",
                         str(tmp_path / "dev-a.key"), capsys=capsys)
    assert rc == 2 and "role=device: the fleet is the host side" in err
    rc, out, err = fleet(db, "enroll", "--url", "tcp://127.0.0.1:1", "--key-file", str(tmp_path / "dev-a.key"),
                         capsys=capsys)
    assert rc == 2 and "name the device with --id" in err
    (tmp_path / "open.key").write_bytes(b"k" * 32)
    (tmp_path / "open.key").chmod(0o644)
    rc, out, err = fleet(db, "enroll", "--url", broker.url("dev-x", "host"), "--key-file",
                         str(tmp_path / "open.key"), capsys=capsys)
    assert rc == 2 and "readable by others" in err
    for argv, message in ((["status", "nope"], "unknown request 'nope'"),
                          (["report", "nope"], "unknown request 'nope'"),
                          (["retry", "nope"], "unknown request 'nope'"),
                          (["run", "nope"], "unknown request 'nope'"),
                          (["list", "dev-zz"], "unknown device 'dev-zz'; enrolled: dev-a, dev-b, dev-c")):
        rc, out, err = fleet(db, *argv, capsys=capsys)
        assert rc == 2 and message in err, (argv, err)
    rc, out, err = fleet(tmp_path / "none.db", "list", capsys=capsys)
    assert rc == 2 and "no fleet registry at" in err and not (tmp_path / "none.db").exists()
    with pytest.raises(SystemExit):
        cli.main(["--db", str(db), "forget", "--owner", "x", "--param", "novalue"])
    capsys.readouterr()

    rc, out, err = fleet(db, "list", capsys=capsys)
    assert rc == 0 and out.count("owners:") == 3 and "dev-x" not in out

    # dev-c goes offline; alice is on dev-a (online) and dev-c (offline, counted by its last report)
    agents.pop("dev-c").__exit__()
    rc, out, err = fleet(db, "forget", "--owner", "alice", "--method", "ft", "--param", "epochs=1", "--commit",
                         capsys=capsys)
    assert rc == 0, err
    request = out.split()[1].rstrip(":")
    assert "on 2 device(s): dev-a, dev-c; queued for offline dev-c" in out
    assert "dev-a: job" in err and "sent" in err
    reg = Registry(db)
    d = {x["device_id"]: x for x in reg.deliveries(request)}
    assert set(d) == {"dev-a", "dev-c"}  # dev-b holds no alice: nothing for it
    assert d["dev-a"]["job_key"] == job_key(request, "dev-a") and d["dev-c"]["status"] == "pending"
    assert "HELLO" in d["dev-c"]["error"]
    rc, out, err = fleet(db, "report", request, capsys=capsys)
    assert rc == 1 and "NOT COMPLETE" in out

    # dev-c returns; `run --wait` (what a service would keep running) finishes both
    agents["dev-c"] = start("dev-c")
    t0 = time.monotonic()
    rc, out, err = fleet(db, "run", "--wait", "--timeout", "120", capsys=capsys)
    assert rc == 0, err
    assert f"{request}  owner 'alice'  complete" in out, out
    elapsed = time.monotonic() - t0
    rc, out, err = fleet(db, "report", request, "--json", str(tmp_path / "report.json"), capsys=capsys)
    assert rc == 0 and "COMPLETE: all 2 devices" in out
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["complete"] and doc["devices_targeted"] == 2
    for row in doc["devices"]:
        assert row["status"] == "committed" and row["model_matches_certificate"] is True
        assert row["certificate_sha256"] == hashlib.sha256(canonical_json(row["certificate"]).encode()).hexdigest()
        assert row["certificate"]["committed"] and row["certificate"]["n_forgotten"] == 12
        assert job_files(tmp_path / row["device_id"]) == [row["job_id"]]
    assert job_files(tmp_path / "dev-b") == []
    # what each device now reports: alice is gone
    devices = {x["id"]: x for x in reg.devices()}
    assert devices["dev-a"]["owners"] == ["bob"] and devices["dev-c"]["owners"] == ["dave"]
    assert devices["dev-a"]["model_sha256"] == doc["devices"][0]["model_sha256_pulled"]

    # a canary verification bound to dev-a's certificate is shown beside it in the report
    from edge_qmul.evaluation.canary import make_canary, verify_files
    row = next(r for r in doc["devices"] if r["device_id"] == "dev-a")
    (tmp_path / "cert_a.json").write_text(json.dumps(row["certificate"], indent=1))
    canary = make_canary("alice", 3, (8, 8, 1), 10, 0.0, 1.0)
    (tmp_path / "canaries.json").write_text(json.dumps({"model_sha256": hashlib.sha256(MODEL.read_bytes()).hexdigest(),
                                                        "canaries": [json.loads(canary.to_json())]}))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "held_out.npz", x=rng.uniform(0, 1, (90, 8, 8, 1)).astype(np.float32), y=rng.integers(0, 10, 90))
    after = tmp_path / "dev-a" / "models" / f"{row['certificate']['model_after_sha256']}.tflite"
    v = verify_files(tmp_path / "canaries.json", "alice", MODEL, after, MODEL, tmp_path / "held_out.npz",
                     tmp_path / "cert_a.json")
    (tmp_path / "verify_a.json").write_text(json.dumps(v))
    rc, out, err = fleet(db, "report", request, "--verification", str(tmp_path / "verify_a.json"), "--json",
                         str(tmp_path / "report_v.json"), capsys=capsys)
    assert rc == 0 and "dev-a: canary of alice: undecided" in out, out + err
    rows = {r["device_id"]: r for r in json.loads((tmp_path / "report_v.json").read_text())["devices"]}
    assert rows["dev-a"]["verification"]["verdict"] == "undecided" and "verification" not in rows["dev-c"]
    assert rows["dev-a"]["verification"]["model_sha256_after"] == row["certificate"]["model_after_sha256"]
    for change, message in (({"owner": "bob"}, "verifies owner 'bob'"), ({"certificate": None}, "not bound to a certificate"),
                            ({"certificate": {**v["certificate"], "sha256_canonical": "0" * 64}}, "is none of request")):
        (tmp_path / "bad_v.json").write_text(json.dumps({**v, **change}))
        rc, out, err = fleet(db, "report", request, "--verification", str(tmp_path / "bad_v.json"), capsys=capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err

    # a delivery sent again (a lost reply, a restarted fleet) finds the job: no second one
    reg.update_delivery(request, "dev-a", status="pending")
    rc, out, err = fleet(db, "run", request, "--wait", "--timeout", "60", capsys=capsys)
    assert rc == 0 and job_files(tmp_path / "dev-a") == [d["dev-a"]["job_key"]]
    # a request for an owner nobody holds is complete at once; a failure can be retried
    rc, out, err = fleet(db, "forget", "--owner", "zoe", capsys=capsys)
    assert rc == 0 and "on 0 device(s)" in out and "no device held the owner" in out
    rc, out, err = fleet(db, "forget", "--owner", "bob", "--method", "nosuch", capsys=capsys)
    bob = out.split()[1].rstrip(":")
    assert {x["status"] for x in reg.deliveries(bob)} == {"failed"} and reg.request(bob)["status"] == "failed"
    assert "unknown method 'nosuch'" in reg.deliveries(bob)[0]["error"]
    rc, out, err = fleet(db, "retry", bob, capsys=capsys)
    assert rc == 0 and "2 failed deliveries back to pending" in out
    assert {x["job_key"] for x in reg.deliveries(bob)} == {job_key(bob, "dev-a", 1), job_key(bob, "dev-b", 1)}
    rc, out, err = fleet(db, "status", "--json", capsys=capsys)
    assert {r["id"]: r["status"] for r in json.loads(out)}[request] == "complete"
    reg.close()

    # no secret anywhere: outputs, the registry file, the report
    everything = (tmp_path / "report.json").read_text() + db.read_bytes().decode("latin-1")
    for secret in secrets_of(broker, keys.values()):
        assert secret not in everything
    for a in agents.values():
        a.__exit__()
    print(f"\nfast fleet: dev-c back -> both committed in {elapsed:.1f} s")


def test_registry_errors_and_states(tmp_path):
    with Registry(tmp_path / "r.db") as reg:
        with pytest.raises(FleetError, match="unknown device 'x'; enrolled: none"):
            reg.device("x")
        reg.add_device("d1", "tcp://h:1", "/k", {"owners": ["b", "a", None], "samples": 3})
        assert reg.device("d1")["owners"] == ["a", "b"] and reg.holders("a") == ["d1"]
        rid = reg.add_request("a", None, {}, True, ["d1"])
        with pytest.raises(FleetError, match="unknown delivery fields"):
            reg.update_delivery(rid, "d1", password="x")
        with pytest.raises(FleetError, match="delivery status 'lost'"):
            reg.update_delivery(rid, "d1", status="lost")
        with pytest.raises(FleetError, match="has no delivery to device 'd2'"):
            reg.delivery(rid, "d2")
        with pytest.raises(FleetError, match="needs an owner"):
            reg.add_request("", None, {}, True, [])
        reg.update_delivery(rid, "d1", status="done")
        assert reg.request(rid)["status"] == "open"  # with --commit, done is not the end
        reg.update_delivery(rid, "d1", status="committed")
        assert reg.request(rid)["status"] == "complete"
    with sqlite3.connect(tmp_path / "r.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(FleetError, match="bad.db: file is not a database"):
        Registry(tmp_path / "bad.db")


# --------------------------------------------- slow: ten agent processes, two of them offline

def _serve(bindir: Path, url: str, state: Path, key: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([str(bindir / "edge-qmul"), "serve", "--url", url, "--state", str(state),
                                 "--key-file", str(key), "--threads", "1"], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _wait_for(what, predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(step)
    return time.monotonic()


@pytest.mark.slow
def test_ten_agent_processes_forget_reaches_exactly_the_holders_offline_ones_later(mosquitto_broker, tmp_path):  # noqa: F811
    ids = [f"board-{i}" for i in range(10)]
    holders, late = ids[:6], ids[4:6]  # alice's samples on six boards; two of them are off at first
    broker = mosquitto_broker(ids, tls=True)
    bindir = Path(sys.executable).parent
    db = tmp_path / "fleet.db"
    keygens = [subprocess.Popen([str(bindir / "edge-qmul"), "keygen", str(tmp_path / f"{d}.key")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for d in ids]
    assert all(p.wait(120) == 0 for p in keygens)
    keys = {d: read_key(tmp_path / f"{d}.key") for d in ids}
    agents = {d: _serve(bindir, broker.url(d, "device"), tmp_path / d, tmp_path / f"{d}.key", tmp_path / f"{d}.log")
              for d in ids}
    runner = None
    try:
        for i, d in enumerate(ids):  # the host API, once each agent has subscribed
            owners = (["alice"] if d in holders else []) + [f"user{i}", f"user{(i + 1) % 10}"]
            npz = samples(tmp_path / f"{d}.npz", owners, start=40 * i)
            _wait_for(f"{d} answering", lambda: _try(provision, broker.url(d, "host"), keys[d], npz), 60, 0.5)
            assert cli.main(["--db", str(db), "--quiet", "enroll", "--url", broker.url(d, "host"),
                             "--key-file", str(tmp_path / f"{d}.key")]) == 0
        with Registry(db) as reg:
            assert reg.holders("alice") == holders
        for d in late:
            agents[d].terminate()
            agents[d].wait(30)
        t_forget = time.monotonic()
        runner = subprocess.Popen([sys.executable, "-m", "firmware_bridge.fleet.cli", "--db", str(db), *FAST,
                                   "--poll", "1", "--presence", "forget", "--owner", "alice", "--method", "ft", "--param",
                                   "epochs=1", "--commit", "--wait", "--timeout", "600"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reg = Registry(db)

        def committed() -> set[str]:
            return {x["device_id"] for x in reg.deliveries() if x["status"] == "committed"}
        _wait_for("the request", lambda: reg.requests(), 60)
        request = reg.requests()[0]["id"]
        t_online = _wait_for("the four online holders committing", lambda: committed() == set(holders) - set(late),
                             300, 0.2) - t_forget
        assert {x["device_id"]: x["status"] for x in reg.deliveries(request) if x["device_id"] in late} == \
            {d: "pending" for d in late}
        t_restart = time.monotonic()
        offsets = {d: (tmp_path / f"{d}.log").stat().st_size for d in late}
        for d in late:  # started again: no second command
            agents[d] = _serve(bindir, broker.url(d, "device"), tmp_path / d, tmp_path / f"{d}.key",
                               tmp_path / f"{d}.log")
        t_late = _wait_for("the two late holders committing", lambda: committed() == set(holders), 300, 0.2) - t_restart
        out, err = runner.communicate(timeout=120)
        assert runner.returncode == 0, err
        for d in late:  # presence: no HELLO was sent while they were away, so no burst on return
            sessions = (tmp_path / f"{d}.log").read_text()[offsets[d]:].count("opened, mtu")
            assert sessions == 1, (d, sessions)
        assert f"{request}  owner 'alice'  complete" in out
        assert cli.main(["--db", str(db), "report", request, "--json", str(tmp_path / "report.json")]) == 0
        doc = json.loads((tmp_path / "report.json").read_text())
        assert doc["complete"] and doc["devices_targeted"] == 6
        assert sorted(r["device_id"] for r in doc["devices"]) == holders
        for row in doc["devices"]:  # each certificate's model is the model on the device now
            d = row["device_id"]
            transport = open_transport(broker.url(d, "host"), timeout=0.2)
            client = Client(transport, keys[d], timeout=3.0)
            client.connect()
            model = DeviceClient(client).pull("current")
            transport.close()
            assert hashlib.sha256(model).hexdigest() == row["model_sha256_pulled"] == \
                row["certificate"]["model_after_sha256"]
            assert row["certificate"]["committed"] and row["certificate"]["n_forgotten"] == 12
            assert row["certificate_sha256"] == hashlib.sha256(canonical_json(row["certificate"]).encode()).hexdigest()
            assert job_files(tmp_path / d) == [row["job_id"]] == [job_key(request, d)]  # ran exactly once
        for d in ids[6:]:
            assert job_files(tmp_path / d) == []  # no alice there: nothing sent
        reg.close()
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.communicate()
        for p in agents.values():
            p.terminate()
        for p in agents.values():
            p.wait(30)
    logs = "".join((tmp_path / f"{d}.log").read_text() for d in ids) + out + err + broker.log.read_text()
    for secret in secrets_of(broker, keys.values()):
        assert secret not in logs and secret not in (tmp_path / "report.json").read_text()
    print(f"\nten agents: forget -> 4 online committed in {t_online:.1f} s; restart -> 2 late committed in "
          f"{t_late:.1f} s")


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
