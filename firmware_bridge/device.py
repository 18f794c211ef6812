"""The device agent: ``edge-qmul serve (--serial URL | --listen HOST:PORT) --state DIR --key-file F``.

The state directory (DESIGN.md §5)::

    models/<sha256>.tflite     content-addressed models (uploads and job results)
    tables/<sha256>.json       similar-label tables
    samples/<sha256>.npz       uploaded sample batches (imported into the store)
    incoming/<sha256>.part     uploads in progress (resumed after a restart)
    jobs/<job_id>.json         forget certificates
    store.db                   the SQLite sample store; its meta row names the active model
    current.tflite             what the device's own app loads, derived from the store after a commit
                               and again at start-up

One forget job runs at a time, in a worker thread; its status (phase, progress, ETA) is answered by
JOB_STATUS while it runs. At start-up, a job that was running when the agent died is marked failed
(its candidate model was never made active, its samples never deleted), and ``current.tflite`` is
re-derived from the store.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import stat
import threading
import time
from pathlib import Path

import numpy as np

from edge_qmul import __version__
from edge_qmul.fsutil import atomic_write, fsync_dir

from .channel import RemoteError, Server
from .frames import MsgType
from .transfer import TransferArea

log = logging.getLogger("firmware_bridge.device")
HISTORY_POINTS = 500  # loss-curve points kept per job


class KeyFileError(ValueError):
    """A key file that is missing, readable by others or not 32 bytes (the message never holds key bytes)."""


def read_key(path: str | os.PathLike) -> bytes:
    """The 32-byte pre-shared key; refused if the file is readable by others than its owner."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise KeyFileError(f"key file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path}: readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                         "chmod 600 it")
    data = path.read_bytes()
    if len(data) != 32:
        raise KeyFileError(f"key file {path}: holds {len(data)} bytes, expected 32")
    return data


def write_key(path: str | os.PathLike) -> Path:
    """A fresh random 32-byte key with mode 0600 (never overwrites an existing key)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent if str(path.parent) else Path("."))
    return path


class Agent:
    """Handlers for every message, the state directory and the job worker."""

    def __init__(self, state: str | os.PathLike, threads: int | None = None) -> None:
        self.state = Path(state)
        self.threads = threads  # numba compute threads for jobs and BENCH (None: every core)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "jobs").mkdir(exist_ok=True)
        self.transfers = TransferArea(self.state)
        self.jobs: dict[str, dict] = {}
        self.queue: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()
        self.recover()
        self.worker = threading.Thread(target=self._work, name="forget-worker", daemon=True)
        self.worker.start()

    # --- state ---
    @property
    def store_path(self) -> Path:
        return self.state / "store.db"

    def _store(self, create: bool = False):
        from edge_qmul.store import Store
        if not create and not self.store_path.exists():
            raise RemoteError("no_store", "the device holds no samples yet (push-samples first)")
        return Store(self.store_path, create=create)

    def active_model(self) -> str | None:
        if not self.store_path.exists():
            return None
        with self._store() as s:
            return s.active_model

    def derive_current(self) -> None:
        """current.tflite = the store's active model (copy + fsync + rename)."""
        sha = self.active_model()
        if sha is None:
            return
        src = self.state / "models" / f"{sha}.tflite"
        cur = self.state / "current.tflite"
        if cur.exists() and _sha(cur) == sha:
            return
        atomic_write(cur, src.read_bytes())

    def recover(self) -> None:
        """After a crash: interrupted jobs are failed (nothing of theirs was committed), current.tflite
        matches the store, stray temp files go."""
        # atomic_write makes its temp file next to the target, so a cut leaves them in jobs/,
        # models/, samples/ too, not only at the top: look everywhere
        for tmp in self.state.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        requests: dict[str, dict] = {}
        if self.store_path.exists():
            with self._store() as s:
                # "pending" too: a cut can fall between create_request and set_status("running")
                for req in s.requests("running") + s.requests("pending"):
                    s.set_status(req["id"], "failed", {"error": "interrupted: the agent restarted"})
                requests = {r["id"]: r for r in s.requests()}
        for path in (self.state / "jobs").glob("*.json"):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            req = requests.get(job["job_id"])
            # the job file, not only the store, must say what happened, or JOB_STATUS answers
            # "queued"/"running" for ever after a cut (the worker never sees the job again)
            if job.get("status") in ("queued", "running"):
                if req is not None and req["status"] == "done":
                    # it finished, but the certificate (and the ids COMMIT needs) died with the
                    # process: it can never be committed, so close the request
                    with self._store() as s:
                        s.set_status(req["id"], "rolled_back")
                job.update(status="failed", phase="failed", error="interrupted: the agent restarted")
                (self.state / "jobs" / f"{job['job_id']}.ids").unlink(missing_ok=True)
                self._save_job(job)
            elif job.get("status") == "done" and req is not None and req["status"] == "committed":
                # the commit transaction went through but the cut came before the job file said so:
                # the commit stands (as the store holds it); complete the certificate as commit() does
                record = (req.get("result") or {}).get("commit") or {}
                job.update(status="committed", certificate=dict(
                    job.get("certificate") or {}, committed=True, samples_deleted_at=record.get("deleted_at"),
                    audit_hash=record.get("audit_hash")))
                (self.state / "jobs" / f"{job['job_id']}.ids").unlink(missing_ok=True)
                self._save_job(job)
            self.jobs[job["job_id"]] = job
        if self.store_path.exists():
            self.derive_current()

    # --- dispatch ---
    def handle(self, msg_type: MsgType, body: dict) -> dict:
        handler = {
            MsgType.PING: lambda b: {"time": time.time()},
            MsgType.INFO: self.info,
            MsgType.PUT_BEGIN: self.transfers.begin,
            MsgType.PUT_CHUNK: self.transfers.chunk,
            MsgType.PUT_END: self.put_end,
            MsgType.GET: lambda b: self.transfers.get(b, self.resolve),
            MsgType.FORGET: self.forget,
            MsgType.JOB_STATUS: self.job_status,
            MsgType.JOB_RESULT: self.job_result,
            MsgType.COMMIT: self.commit,
            MsgType.ROLLBACK: self.rollback,
            MsgType.BENCH: self.bench,
        }.get(msg_type)
        if handler is None:
            raise RemoteError("bad_request", f"{msg_type.name} is not a request")
        return handler(body)

    def resolve(self, name) -> Path:
        if name == "current":
            path = self.state / "current.tflite"
        elif isinstance(name, str) and name.count("/") == 1 and name.split("/")[0] in ("models", "tables", "jobs"):
            path = self.state / name
        else:
            raise RemoteError("bad_request", f"unknown file {name!r}")
        if ".." in Path(name).parts or not path.is_file():
            raise RemoteError("not_found", f"{name}: no such file on the device")
        return path

    def info(self, body: dict) -> dict:
        out = {"engine_version": __version__, "model_sha256": self.active_model(),
               "free_memory_bytes": _free_memory(), "jobs": len(self.jobs)}
        if self.store_path.exists():
            with self._store() as s:
                out["samples"] = s.count()
        return out

    def put_end(self, body: dict) -> dict:
        reply = self.transfers.end(body)
        kind, sha = body["kind"], body["sha256"]
        if kind == "model" and body.get("activate"):
            from edge_qmul.tflite import load_tflite
            try:
                load_tflite(self.state / reply["path"])
            except Exception as e:  # noqa: BLE001 - any bad model is refused before activation
                raise RemoteError("bad_model", str(e)) from None
            with self._store(create=True) as s:
                s.set_active_model(sha)
            self.derive_current()
            reply["active"] = True
        if kind == "samples":
            reply["imported"] = self._import_samples(self.state / reply["path"], body)
        return reply

    def _import_samples(self, path: Path, body: dict) -> int:
        """Import an uploaded npz once: a repeated PUT_END (a retry after a restart) gets the count
        of the first import instead of a second copy of the samples."""
        marker = path.with_suffix(".imported")
        if marker.exists():
            return int(marker.read_text() or 0)
        from edge_qmul.tflite import load_tflite
        sha = self.active_model()
        if sha is None:
            raise RemoteError("no_model", "push a model first: samples are quantized with its input")
        model = load_tflite(self.state / "models" / f"{sha}.tflite")
        q = model.tensors[model.core_inputs[0]].quant
        role = body.get("role", "train")
        with self._store(create=True) as s:
            if s.quant is None:
                s.configure(input_shape=model.tensors[model.core_inputs[0]].shape[1:], quant=q,
                            num_classes=int(model.tensors[model.core_outputs[0]].shape[-1]))
            from edge_qmul.store import StoreError
            # The ids are a function of the upload (its sha256): if a cut came after the import's
            # transaction but before the marker, the first id is already there and nothing is added.
            prefix = path.stem[:32]
            try:
                s.select(ids=[f"{prefix}-{0:07d}"], role=None)
                already = True
            except StoreError:
                already = False
            try:
                if already:
                    with np.load(path) as data:
                        n = len(data["y"] if "y" in data.files else data["y_train"])
                else:
                    n = len(s.import_npz(path, q, owner=body.get("owner"), role=role, id_prefix=prefix))
            except StoreError as e:
                raise RemoteError("bad_samples", str(e)) from None
        atomic_write(marker, str(n).encode())
        return n

    # --- jobs ---
    def forget(self, body: dict) -> dict:
        selector, method = body.get("selector"), body.get("method")
        if not isinstance(selector, dict) or len(selector) != 1 or next(iter(selector)) not in ("owner", "ids", "label"):
            raise RemoteError("bad_request", "selector must be one of {owner}, {ids}, {label}")
        from edge_qmul.unlearn import METHODS, default_method
        method = default_method(selector) if method is None else method
        if not isinstance(method, str) or method not in METHODS:  # (a list: TypeError, "internal")
            raise RemoteError("bad_request", f"unknown method {method!r}")
        if self.active_model() is None:
            raise RemoteError("no_model", "the device has no active model")
        table = body.get("table")
        if table is not None and not (self.state / "tables" / f"{table}.json").is_file():
            raise RemoteError("not_found", f"table {table} was not uploaded")
        with self._store() as s:  # check the selection now, so a bad request fails at once
            from edge_qmul.store import StoreError
            try:
                s.select(**selector, role=None)
            except StoreError as e:
                raise RemoteError("bad_selector", str(e)) from None
        # The host names the job (a random key reused by its retries): a FORGET retried after the
        # agent restarted (its reply cache gone) finds the same job instead of starting another.
        key = body.get("job_key")
        if isinstance(key, str) and len(key) == 16 and all(c in "0123456789abcdef" for c in key):
            if key in self.jobs:
                return {"job_id": key}
            job_id = key
        else:
            job_id = os.urandom(8).hex()
        self._refuse_if_busy()
        job = {"job_id": job_id, "status": "queued", "phase": "queued", "progress": 0.0, "eta_s": None,
               "selector": selector, "method": method, "params": body.get("params") or {}, "table": table,
               "retain_max": body.get("retain_max"), "created": time.time()}
        with self.lock:
            self.jobs[job_id] = job
        self._save_job(job)
        self.queue.put(job_id)
        return {"job_id": job_id}

    def _refuse_if_busy(self) -> None:
        """One open job at a time. Two jobs started from the same model cannot both be committed
        (the second's model would still know the first's samples), and unlearning is the device's
        whole CPU: a second request is refused with what to do, not queued behind the first."""
        with self.lock:
            open_jobs = [j for j in self.jobs.values() if j.get("status") in ("queued", "running", "done")]
        for job in open_jobs:
            if job["status"] == "done":
                raise RemoteError("busy", f"job {job['job_id']} has finished and waits: commit it or roll it "
                                          "back before a new forget request")
            raise RemoteError("busy", f"job {job['job_id']} is {job['status']} ({job.get('phase')}, "
                                      f"{100 * (job.get('progress') or 0):.0f}%); wait for it, then commit or "
                                      "roll it back")

    def _save_job(self, job: dict) -> None:
        atomic_write(self.state / "jobs" / f"{job['job_id']}.json",
                     (json.dumps(job, sort_keys=True, default=str) + "\n").encode())

    def _use_threads(self) -> None:
        if self.threads is not None:  # numba's thread count is per calling thread
            import numba
            numba.set_num_threads(self.threads)

    def _work(self) -> None:
        self._use_threads()
        while True:
            job_id = self.queue.get()
            job = self.jobs[job_id]
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a failed job is reported, the agent goes on
                log.exception("job %s failed", job_id)
                job.update(status="failed", phase="failed", error=f"{type(e).__name__}: {e}")
            self._save_job(job)

    def _run(self, job: dict) -> None:
        from edge_qmul.forget import run_forget
        start = time.monotonic()
        job.update(status="running", phase="loading")

        history: list[dict] = []

        def progress(info: dict) -> None:
            total = max(1, info.get("steps", 1) * info.get("epochs", 1))
            done = info.get("epoch", 0) * info.get("steps", 0) + info.get("step", 0)
            fraction = min(1.0, done / total)
            if info.get("max_passes"):  # a work budget: it ends the run unless the epoch cap does first
                fraction = max(fraction, min(1.0, info.get("sample_passes", 0) / info["max_passes"]))
            elapsed = time.monotonic() - start
            job.update(phase=info.get("phase", "unlearning"), progress=fraction,
                       eta_s=elapsed / fraction - elapsed if fraction > 0 else None)
            # the loss curves of the run, kept with the job (GET jobs/<id>.json); thinned so a long
            # run stays a few kB: past HISTORY_POINTS, every other point goes
            history.append({"step": done, "t_s": round(elapsed, 4),
                            **{k: float(v) for k, v in info.items()
                               if k not in ("epoch", "step", "steps", "epochs", "phase")
                               and isinstance(v, (int, float))}})
            if len(history) > HISTORY_POINTS:
                del history[1::2]
            job["history"] = history

        model = self.state / "models" / f"{self.active_model()}.tflite"
        table = str(self.state / "tables" / f"{job['table']}.json") if job.get("table") else None
        with self._store() as s:
            cert = run_forget(model, s, job["selector"], job["method"], job["params"], table,
                              retain_max=job.get("retain_max"), out_path=None, progress=progress,
                              request_id=job["job_id"], warn=log.warning)
        ids = cert.pop("_forget_ids")
        (self.state / "jobs" / f"{job['job_id']}.ids").write_text("\n".join(ids))  # for COMMIT; never sent
        job.update(status="done", phase="done", progress=1.0, eta_s=0.0, certificate=cert)

    def _job(self, body: dict) -> dict:
        # A job id that is not a string (a list, a dict) made dict.get raise TypeError: an
        # "internal" error with a logged traceback instead of "not_found" for a bad request.
        job_id = body.get("job_id")
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise RemoteError("not_found", f"unknown job {body.get('job_id')!r}")
        return job

    def job_status(self, body: dict) -> dict:
        job = self._job(body)
        return {k: job.get(k) for k in ("job_id", "status", "phase", "progress", "eta_s", "error")}

    def job_result(self, body: dict) -> dict:
        job = self._job(body)
        if job["status"] not in ("done", "committed", "rolled_back", "failed"):
            raise RemoteError("not_ready", f"job {job['job_id']} is {job['status']}")
        return {"status": job["status"], "certificate": _compact(job.get("certificate")),
                "certificate_file": f"jobs/{job['job_id']}.json", "error": job.get("error")}

    def commit(self, body: dict) -> dict:
        from edge_qmul.forget import commit
        job = self._job(body)
        if job["status"] == "committed":
            return {"certificate": _compact(job["certificate"]), "certificate_file": f"jobs/{job['job_id']}.json"}
        if job["status"] != "done":
            raise RemoteError("not_ready", f"job {job['job_id']} is {job['status']}")
        ids_path = self.state / "jobs" / f"{job['job_id']}.ids"
        cert = dict(job["certificate"], _forget_ids=ids_path.read_text().split("\n"))
        with self._store() as s:
            cert = commit(s, cert)
        job.update(status="committed", certificate=cert)
        self._save_job(job)
        ids_path.unlink(missing_ok=True)
        self.derive_current()
        self.collect_models()
        return {"certificate": _compact(cert), "certificate_file": f"jobs/{job['job_id']}.json"}

    def rollback(self, body: dict) -> dict:
        job = self._job(body)
        if job["status"] == "rolled_back":
            return {"status": "rolled_back"}
        if job["status"] != "done":
            raise RemoteError("not_ready", f"job {job['job_id']} is {job['status']}")
        with self._store() as s:
            s.set_status(job["job_id"], "rolled_back")
        job.update(status="rolled_back")
        self._save_job(job)
        (self.state / "jobs" / f"{job['job_id']}.ids").unlink(missing_ok=True)
        self.collect_models()
        return {"status": "rolled_back"}

    def collect_models(self) -> None:
        """Delete model files nothing refers to (after a commit or rollback, never during a job:
        a running job's new model is not yet named anywhere)."""
        if any(j.get("status") in ("queued", "running") for j in self.jobs.values()):
            return
        keep = {self.active_model()}
        keep |= {j.get("certificate", {}).get("model_after_sha256") for j in self.jobs.values()
                 if j.get("status") in ("queued", "running", "done")}
        for path in (self.state / "models").glob("*.tflite"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def bench(self, body: dict) -> dict:
        """edge_qmul.bench on the active model: per-op, forward, training-step and unlearning times
        and peak memory, measured here. Refused while a job runs (both would be measured wrong)."""
        from edge_qmul.bench import bench_model
        from edge_qmul.errors import ModelError
        from edge_qmul.tflite import load_tflite
        sha = self.active_model()
        if sha is None:
            raise RemoteError("no_model", "the device has no active model")
        with self.lock:
            running = [j["job_id"] for j in self.jobs.values() if j.get("status") in ("queued", "running")]
        if running:
            raise RemoteError("busy", f"job {running[0]} is running; benchmark when it is done")
        settings = {k: body[k] for k in ("batch", "forget_size", "method", "repeats") if body.get(k) is not None}
        self._use_threads()
        path = self.state / "models" / f"{sha}.tflite"
        try:
            return bench_model(load_tflite(path), model_path=path, **settings)
        except (ModelError, TypeError) as e:
            raise RemoteError("bad_request", f"bench: {e}") from None

def _compact(cert: dict | None) -> dict | None:
    """The certificate without its per-sample id hashes (they can outgrow a small MTU): a digest of
    them stands in; the whole certificate is the job file, fetched with GET jobs/<id>.json."""
    if not cert:
        return cert
    import hashlib
    hashes = cert.get("forgotten_sample_id_hashes") or []
    out = {k: v for k, v in cert.items() if k != "forgotten_sample_id_hashes"}
    out["forgotten_sample_id_hashes_sha256"] = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    return out


def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def serve(transport, state: "str | os.PathLike | Agent", psk: bytes, stop=lambda: False) -> None:
    """Run the agent (or a new one on ``state``) on one transport until ``stop()`` or the link closes."""
    agent = state if isinstance(state, Agent) else Agent(state)
    server = Server(transport, psk, agent.handle)
    log.info("serving %s, state %s, model %s", transport.name, agent.state, agent.active_model())
    server.serve(stop)


__all__ = ["Agent", "KeyFileError", "read_key", "serve", "write_key"]
