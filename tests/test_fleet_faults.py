"""Issue 17's faults against a real mosquitto and real agents: whatever goes wrong mid-request, an
erasure request still completes and every device runs its job exactly once.

* duplicated and delayed deliveries (fast): a second MQTT client with the host's credentials
  (the `chaos` below) subscribes to every device's two topics and publishes each message it sees a
  second time on the same topic, at once or up to a few seconds late. The broker really delivers
  every frame twice, some copies after the reply they belong to; the channel drops the copies
  (counter / HELLO-nonce replays), so no request is acted on twice.
* the broker restarted while `forget --commit --wait` works through three devices (slow).
* a device process (`edge-qmul serve --url`) SIGKILLed while its job runs, then started again: its
  start-up recovery fails the job ("interrupted"), and the runner starts the delivery again as a
  new attempt (a new job key); the failed job stays on the device and in the report (slow).
Counting: the job files of each state directory, the registry's deliveries and the certificates.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from firmware_bridge.device import read_key, write_key
from firmware_bridge.fleet import cli
from firmware_bridge.fleet.registry import Registry, job_key
from firmware_bridge.transport import open_transport
from firmware_bridge.transport.mqtt import device_topics
from mosquitto import mosquitto_broker  # noqa: F401 - a pytest fixture, used by name
from test_fleet import FAST, _serve, _try, _wait_for, job_files, provision, samples
from test_transport_mqtt import AgentThread

HOLDINGS = {"dev-a": ["alice", "bob"], "dev-b": ["alice", "carol"], "dev-c": ["alice", "dave"]}


class Chaos:
    """A second host-side MQTT client that publishes every message on the devices' topics again:
    every third copy at once, the others 0.2-1.5 s or 2-2.75 s late (after the original's reply)."""

    def __init__(self, broker, device_ids) -> None:
        cfg = broker.config
        self.copies, self.seen = 0, Counter()
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self.client = c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="eq-chaos", protocol=mqtt.MQTTv5)
        c.username_pw_set(cfg.host_user, cfg.password_files[cfg.host_user].read_text().strip())
        if cfg.tls:
            c.tls_set_context(ssl.create_default_context(cafile=str(cfg.ca)))
        subscribed = threading.Event()
        self.topics = [t for d in device_ids for t in device_topics(d)]
        c.on_connect = lambda cl, *a: cl.subscribe([(t, 1) for t in self.topics])
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert subscribed.wait(10), "the chaos client did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        key = (message.topic, bytes(message.payload))
        with self._lock:
            self.seen[key] += 1
            if self.seen[key] > 1:  # our own copy coming back: not copied again
                return
            n = len(self.seen)
        delay = 0.0 if n % 3 == 0 else (0.2 + (n % 7) * 0.2 if n % 3 == 1 else 2.0 + (n % 4) * 0.25)
        t = threading.Timer(delay, self._copy, (message.topic, bytes(message.payload)))
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _copy(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)
        with self._lock:
            self.copies += 1

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        self.client.loop_stop()
        self.client.disconnect()


def setup_fleet(broker, tmp_path: Path, db: Path, procs=()) -> tuple[dict, dict]:
    """Keys, agents (AgentThread; a `edge-qmul serve` process for ids in `procs`), the model and
    samples pushed, every device enrolled; (keys, agents)."""
    keys, agents = {}, {}
    bindir = Path(sys.executable).parent
    for i, d in enumerate(HOLDINGS):
        keys[d] = read_key(write_key(tmp_path / f"{d}.key"))
        if d in procs:
            agents[d] = _serve(bindir, broker.url(d, "device"), tmp_path / d, tmp_path / f"{d}.key",
                               tmp_path / f"{d}.log")
        else:
            agents[d] = AgentThread(open_transport(broker.url(d, "device")), tmp_path / d, keys[d])
        npz = samples(tmp_path / f"{d}.npz", HOLDINGS[d], per_owner=24, start=60 * i)
        _wait_for(f"{d} answering", lambda: _try(provision, broker.url(d, "host"), keys[d], npz), 60, 0.5)
        assert cli.main(["--db", str(db), "--quiet", "enroll", "--url", broker.url(d, "host"),
                         "--key-file", str(tmp_path / f"{d}.key")]) == 0
    return keys, agents


def stop_agents(agents: dict) -> None:
    for a in agents.values():
        if isinstance(a, AgentThread):
            a.__exit__()
        elif a.poll() is None:
            a.terminate()
            a.wait(30)


class ForgetThread(threading.Thread):
    """`edge-qmul-fleet forget --owner alice ... --commit --wait` in a thread; .rc its exit status."""

    def __init__(self, db: Path, *params: str, timeout: float = 300) -> None:
        super().__init__(daemon=True)
        self.argv = ["--db", str(db), *FAST, "forget", "--owner", "alice", "--method", "ft",
                     *[x for p in params for x in ("--param", p)], "--commit", "--wait", "--timeout", str(timeout)]
        self.rc: int | None = None
        self.t0 = time.monotonic()
        self.start()

    def run(self) -> None:
        self.rc = cli.main(self.argv)
        self.elapsed = time.monotonic() - self.t0


def request_of(db: Path) -> str:
    with Registry(db) as reg:
        _wait_for("the request", lambda: reg.requests(), 60)
        return reg.requests()[0]["id"]


def check_complete(db: Path, tmp_path: Path, request: str, earlier: dict | None = None) -> dict:
    """The request complete, each device one committed job (plus `earlier` failed ones); the report."""
    earlier = earlier or {}
    assert cli.main(["--db", str(db), "report", request, "--json", str(tmp_path / "report.json")]) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["complete"] and doc["devices_targeted"] == len(HOLDINGS)
    for row in doc["devices"]:
        d = row["device_id"]
        n = len(earlier.get(d, []))
        assert row["status"] == "committed" and row["model_matches_certificate"] is True
        assert row["job_id"] == job_key(request, d, n) and row["attempts"] == n + 1
        assert row["earlier_jobs"] == earlier.get(d, [])
        assert row["certificate"]["committed"] and row["certificate"]["n_forgotten"] == 24
        assert job_files(tmp_path / d) == sorted([row["job_id"], *earlier.get(d, [])])  # no second job
        jobs = {k: json.loads((tmp_path / d / "jobs" / f"{k}.json").read_text()) for k in job_files(tmp_path / d)}
        assert [k for k, j in jobs.items() if j["status"] == "committed"] == [row["job_id"]]
    return doc


# ----------------------------------------------------- fast: duplicated and delayed deliveries

def test_duplicated_and_delayed_deliveries_run_each_job_once(mosquitto_broker, tmp_path):  # noqa: F811
    broker = mosquitto_broker(list(HOLDINGS), tls=False)
    db = tmp_path / "fleet.db"
    keys, agents = setup_fleet(broker, tmp_path, db)
    chaos = Chaos(broker, list(HOLDINGS))
    try:
        t0 = time.monotonic()
        rc = cli.main(["--db", str(db), *FAST, "--quiet", "forget", "--owner", "alice", "--method", "ft",
                       "--param", "epochs=1", "--commit", "--wait", "--timeout", "120"])
        elapsed = time.monotonic() - t0
        assert rc == 0
        time.sleep(3.5)  # the last late copies arrive, and must change nothing
        request = request_of(db)
        check_complete(db, tmp_path, request)
        rejected = Counter()
        for a in agents.values():
            rejected.update(a.server.stats["rejected"])
        print(f"\nchaos: {chaos.copies} copies of {len(chaos.seen)} messages; agents dropped {dict(rejected)}; "
              f"request complete in {elapsed:.1f} s")
        assert chaos.copies >= 30 and sum(rejected.values()) >= 10
        # a second run finds nothing to do: still one job each
        assert cli.main(["--db", str(db), *FAST, "--quiet", "run", "--wait", "--timeout", "30"]) == 0
        check_complete(db, tmp_path, request)
    finally:
        chaos.close()
        stop_agents(agents)


# ------------------------------------------------------------ slow: the broker restarted mid-request

@pytest.mark.slow
def test_broker_restarted_mid_request_each_device_commits_once(mosquitto_broker, tmp_path):  # noqa: F811
    broker = mosquitto_broker(list(HOLDINGS), tls=True)
    db = tmp_path / "fleet.db"
    keys, agents = setup_fleet(broker, tmp_path, db)
    try:
        forget = ForgetThread(db, "epochs=20")
        request = request_of(db)
        with Registry(db) as reg:
            _wait_for("a job sent", lambda: any(x["status"] == "sent" for x in reg.deliveries(request)), 60, 0.05)
            before = {x["device_id"]: x["status"] for x in reg.deliveries(request)}
            broker.restart()  # at once: FORGETs in flight, or their replies
            t_down = time.monotonic()
            broker.stop()  # then down for 2 s while the jobs run: JOB_STATUS polls go unanswered
            during = {x["device_id"]: x["status"] for x in reg.deliveries(request)}
            time.sleep(2.0)
            broker.start()
            down_s = time.monotonic() - t_down
        assert "committed" not in before.values() and "committed" not in during.values()
        forget.join(300)
        assert forget.rc == 0, forget.rc
        check_complete(db, tmp_path, request)
        connects = broker.log.read_text().count("New client connected")
        print(f"\nbroker restarted with deliveries {before}, then down {down_s:.1f} s with {during}: request "
              f"complete {forget.elapsed:.1f} s after forget; {connects} client connections in the broker log")
    finally:
        stop_agents(agents)


# --------------------------------------------------- slow: a device process SIGKILLed mid-job

@pytest.mark.slow
def test_device_killed_mid_job_is_retried_as_a_new_attempt(mosquitto_broker, tmp_path):  # noqa: F811
    victim = "dev-b"
    broker = mosquitto_broker(list(HOLDINGS), tls=True)
    db = tmp_path / "fleet.db"
    keys, agents = setup_fleet(broker, tmp_path, db, procs={victim})
    try:
        forget = ForgetThread(db, "epochs=1000", "budget=null")  # ~1000 steps of ~4 ms: seconds
        request = request_of(db)
        first = job_key(request, victim)
        job_path = tmp_path / victim / "jobs" / f"{first}.json"
        with Registry(db) as reg:  # the FORGET answered: the job is in the agent's worker thread
            _wait_for(f"{victim}'s job sent", lambda: reg.delivery(request, victim)["status"] == "sent", 120, 0.05)
        time.sleep(1.0)
        assert json.loads(job_path.read_text())["status"] == "queued"  # on disk until it ends
        os.kill(agents[victim].pid, signal.SIGKILL)
        agents[victim].wait(10)
        t_kill = time.monotonic()
        assert json.loads(job_path.read_text())["status"] == "queued"  # killed before it ended
        assert "no validation slice" in (tmp_path / f"{victim}.log").read_text()  # ...but after it started
        time.sleep(2.0)
        agents[victim] = _serve(Path(sys.executable).parent, broker.url(victim, "device"), tmp_path / victim,
                                tmp_path / f"{victim}.key", tmp_path / f"{victim}.log")
        forget.join(300)
        assert forget.rc == 0, forget.rc
        doc = check_complete(db, tmp_path, request, earlier={victim: [first]})
        failed = json.loads(job_path.read_text())
        assert failed["status"] == "failed" and "interrupted" in json.dumps(failed)
        print(f"\nkilled {victim} mid-job: recovered as failed, attempt 2 committed; request complete "
              f"{time.monotonic() - t_kill:.1f} s after the kill ({forget.elapsed:.1f} s in all)")
        assert [r["attempts"] for r in doc["devices"] if r["device_id"] == victim] == [2]
    finally:
        stop_agents(agents)


# ------------------------------------------- fast: the runner's bound on interrupted attempts

class _InterruptedEveryTime:
    """A DeviceClient whose every job was failed by the agent's start-up recovery."""

    def status(self, key: str) -> dict:
        return {"job_id": key, "status": "failed"}

    def result(self, key: str) -> dict:
        return {"error": "interrupted: the agent restarted"}


def test_interrupted_jobs_are_retried_up_to_max_attempts_then_failed(tmp_path):
    from firmware_bridge.fleet.runner import Fleet
    with Registry(tmp_path / "r.db") as reg:
        reg.add_device("d1", "tcp://h:1", "/k", {"owners": ["alice"]})
        rid = reg.add_request("alice", "ft", {}, True, ["d1"])
        fleet = Fleet(reg, max_attempts=3)
        keys = []
        for attempt in range(3):
            d = reg.delivery(rid, "d1")
            keys.append(d["job_key"])
            assert d["job_key"] == job_key(rid, "d1", attempt) and d["attempts"] == attempt
            delay = fleet._advance(_InterruptedEveryTime(), reg.request(rid), d)
            if attempt < 2:  # a new attempt at once, the last one's end recorded
                assert delay == 0.0 and reg.delivery(rid, "d1")["status"] == "pending"
                assert f"job {keys[-1]} failed: interrupted" in reg.delivery(rid, "d1")["error"]
        d = reg.delivery(rid, "d1")
        assert delay is None and d["status"] == "failed" and d["attempts"] == 2
        assert reg.request(rid)["status"] == "failed"
        doc = cli.report(reg, rid)
        assert doc["devices"][0]["earlier_jobs"] == keys[:2] and doc["devices"][0]["attempts"] == 3
