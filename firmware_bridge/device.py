"""The device agent: ``edge-qmul serve (--serial URL | --listen HOST:PORT) --state DIR --key-file F``.

It answers the protocol's requests over one state directory (its layout and crash rules:
``edge_qmul.state``). One forget job runs at a time, in a worker thread; its status (phase,
progress, ETA) is answered by JOB_STATUS while it runs. At start-up the state directory recovers:
a job that was running when the agent died is marked failed (its candidate model was never made
active, its samples never deleted), and ``current.tflite`` is re-derived from the store.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from pathlib import Path

import numba

from edge_qmul.api import (ENDED, ForgetJob, ModelError, SelectorError, StateDir, StateError, StoreError,
                           __version__, bench_model, check_selector, fsync_dir)

from .channel import RemoteError, Server
from .frames import MsgType
from .transfer import TransferArea

log = logging.getLogger("firmware_bridge.device")


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
    """The protocol's handlers over one state directory (:class:`edge_qmul.api.StateDir`), and the
    worker thread that runs forget jobs one at a time."""

    def __init__(self, state: str | os.PathLike, threads: int | None = None) -> None:
        self.state = Path(state)
        self.threads = threads  # numba compute threads for jobs and BENCH (None: every core)
        self.dir = StateDir(self.state)  # takes the directory's lock and recovers it
        self.transfers = TransferArea(self.dir)
        self.jobs = self.dir.jobs
        self.queue: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="forget-worker", daemon=True)
        self.worker.start()

    def close(self) -> None:
        """Release the state directory (a job still running is left to the process's end)."""
        self.dir.close()

    def active_model(self) -> str | None:
        return self.dir.active_model()

    # --- dispatch ---
    def handle(self, msg_type: MsgType, body: dict) -> dict:
        handler = {
            MsgType.PING: lambda b: {"time": time.time()},
            MsgType.INFO: self.info,
            MsgType.PUT_BEGIN: self.transfers.begin,
            MsgType.PUT_CHUNK: self.transfers.chunk,
            MsgType.PUT_END: self.put_end,
            MsgType.GET: lambda b: self.transfers.get(b, self.dir.resolve),
            MsgType.FORGET: self.forget,
            MsgType.JOB_STATUS: self.job_status,
            MsgType.JOB_RESULT: self.job_result,
            MsgType.COMMIT: self.commit,
            MsgType.ROLLBACK: self.rollback,
            MsgType.BENCH: self.bench,
        }.get(msg_type)
        if handler is None:
            raise RemoteError("bad_request", f"{msg_type.name} is not a request")
        try:
            return handler(body)
        except StateError as e:  # the state directory's refusals carry the protocol's code
            raise RemoteError(e.code, str(e)) from None

    def info(self, body: dict) -> dict:
        out = {"engine_version": __version__, "model_sha256": self.active_model(),
               "free_memory_bytes": _free_memory(), "jobs": len(self.jobs)}
        if self.dir.store_path.exists():
            with self.dir.store() as s:
                out["samples"] = s.count()
                out["owners"] = s.owners()  # a fleet host targets an erasure request by these
        return out

    def put_end(self, body: dict) -> dict:
        reply = self.transfers.end(body)
        kind, sha = body["kind"], body["sha256"]
        if kind == "model" and body.get("activate"):
            self.dir.activate(sha)
            reply["active"] = True
        if kind == "samples":
            try:
                reply["imported"] = self.dir.import_samples(sha, owner=body.get("owner"),
                                                            role=body.get("role", "train"))
            except StoreError as e:
                raise RemoteError("bad_samples", str(e)) from None
        return reply

    # --- jobs ---
    def forget(self, body: dict) -> dict:
        try:
            selector = check_selector(body.get("selector"))
        except SelectorError as e:
            raise RemoteError("bad_request", str(e)) from None
        # The host names the job (a random key reused by its retries): a FORGET retried after the
        # agent restarted (its reply cache gone) finds the same job instead of starting another.
        key = body.get("job_key")
        valid_key = isinstance(key, str) and len(key) == 16 and all(c in "0123456789abcdef" for c in key)
        with self.lock:
            known = valid_key and key in self.jobs
            job = self.dir.new_job(selector, body.get("method"), body.get("params") or {}, body.get("table"),
                                   body.get("retain_max"), job_id=key if valid_key else None)
        if not known:
            self.queue.put(job.job_id)
        return {"job_id": job.job_id}

    def _use_threads(self) -> None:
        if self.threads is not None:  # numba's thread count is per calling thread
            numba.set_num_threads(self.threads)

    def _work(self) -> None:
        self._use_threads()
        while True:
            job = self.jobs[self.queue.get()]
            try:
                self.dir.run_job(job, warn=log.warning)
            except Exception:  # noqa: BLE001 - a failed job is reported (its file says why), the agent goes on
                log.exception("job %s failed", job.job_id)

    def _job(self, body: dict) -> ForgetJob:
        # A job id that is not a string (a list, a dict) would make dict.get raise TypeError
        job_id = body.get("job_id")
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise RemoteError("not_found", f"unknown job {body.get('job_id')!r}")
        return job

    def job_status(self, body: dict) -> dict:
        return self._job(body).status_reply()

    def job_result(self, body: dict) -> dict:
        job = self._job(body)
        if job.status not in ENDED:
            raise RemoteError("not_ready", f"job {job.job_id} is {job.status}")
        return {"status": job.status, "certificate": _compact(job.certificate),
                "certificate_file": f"jobs/{job.job_id}.json", "error": job.error}

    def commit(self, body: dict) -> dict:
        job = self._job(body)
        cert = self.dir.commit_job(job)
        return {"certificate": _compact(cert), "certificate_file": f"jobs/{job.job_id}.json"}

    def rollback(self, body: dict) -> dict:
        self.dir.rollback_job(self._job(body))
        return {"status": "rolled_back"}

    def bench(self, body: dict) -> dict:
        """edge_qmul.bench on the active model: per-op, forward, training-step and unlearning times
        and peak memory, measured here. Refused while a job runs (both would be measured wrong)."""
        sha, model = self.dir.load_active()
        running = [j.job_id for j in self.jobs.values() if j.status in ("queued", "running")]
        if running:
            raise RemoteError("busy", f"job {running[0]} is running; benchmark when it is done")
        settings = {k: body[k] for k in ("batch", "forget_size", "method", "repeats") if body.get(k) is not None}
        self._use_threads()
        try:
            return bench_model(model, model_path=self.dir.path("model", sha), **settings)
        except (ModelError, TypeError) as e:
            raise RemoteError("bad_request", f"bench: {e}") from None


def _compact(cert: dict | None) -> dict | None:
    """The certificate without its per-sample id hashes (they can outgrow a small MTU): a digest of
    them stands in; the whole certificate is the job file, fetched with GET jobs/<id>.json."""
    if not cert:
        return cert
    hashes = cert.get("forgotten_sample_id_hashes") or []
    out = {k: v for k, v in cert.items() if k != "forgotten_sample_id_hashes"}
    out["forgotten_sample_id_hashes_sha256"] = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    return out


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
