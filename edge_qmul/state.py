"""The device's state directory (DESIGN.md §5), and the one owner of everything in it.

    models/<sha256>.tflite     content-addressed models (uploads and job results)
    tables/<sha256>.json       similar-label tables
    samples/<sha256>.npz       uploaded sample batches until imported (then deleted: the store holds
                               them, where a forget deletes them; <sha256>.imported marks the import)
    incoming/<sha256>.part     uploads in progress (resumed after a restart)
    jobs/<job_id>.json         forget jobs and their certificates (.ids: the ids COMMIT deletes)
    store.db                   the SQLite sample store; its meta row names the active model
    current.tflite             what the device's own app loads, derived from the store
    lock                       held (flock) by the one process that has the directory open

The agent (``edge-qmul serve``) and the CLI (``edge-qmul unlearn --state DIR``) both go through
:class:`StateDir`, so a job runs, commits and recovers the same way whichever started it. Every
write goes through one :class:`~edge_qmul.fsutil.FileOps`, so a test can cut power between any two.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ModelError
from .forget import ForgetRun, commit, run_forget
from .fsutil import DEFAULT, FileOps, sha256_file
from .graph import Model
from .jobs import ForgetJob, OPEN, check_selector
from .store import Store, StoreError
from .tflite import load_tflite, to_bytes
from .unlearn import METHODS, default_method

KINDS = {"model": ("models", ".tflite"), "table": ("tables", ".json"), "samples": ("samples", ".npz")}
READABLE = ("models", "tables", "jobs")  # what GET may name, besides "current"


class StateError(ValueError):
    """A request the state directory refuses; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def import_samples(store: Store, model: Model, npz: Path | None = None, images: Path | None = None,
                   owner: str | None = None, role: str = "train", id_prefix: str | None = None) -> list[str]:
    """Import an .npz or an image folder into ``store``, quantized with ``model``'s input; a new
    store takes its input shape, quantization and class count from the model first."""
    inp = model.tensors[model.core_inputs[0]]
    if store.quant is None:
        store.configure(input_shape=inp.shape[1:], quant=inp.quant, num_classes=model.num_classes)
    if npz is not None:
        return store.import_npz(npz, inp.quant, owner=owner, role=role, id_prefix=id_prefix)
    if images is None:
        raise StoreError("import needs an .npz file or an image folder")
    shape = tuple(inp.shape[1:])
    h, w, c = shape if len(shape) == 3 else (*shape, 1)
    return store.import_image_folder(images, inp.quant, size=(h, w), channels=c, owner=owner, role=role)


class StateDir:
    """One device's state directory: files, the active model, samples, jobs, recovery, collection.

    Opening takes the directory's lock (one process at a time: an agent, or a CLI run) and recovers
    whatever a crash left: interrupted jobs become failed, temp files go, current.tflite is re-derived.
    """

    def __init__(self, root: str | os.PathLike, ops: FileOps = DEFAULT) -> None:
        self.root = Path(root)
        self.ops = ops
        for sub in ("incoming", "jobs", *(sub for sub, _ in KINDS.values())):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StateError("busy", f"{self.root} is open in another process (a running agent?); "
                                     "stop it or send the request to it") from None
        self.jobs: dict[str, ForgetJob] = {}
        self.recover()

    def close(self) -> None:
        """Release the directory's lock (the process ending does it too)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> "StateDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- layout ---
    def path(self, kind: str, sha: str) -> Path:
        sub, ext = KINDS[kind]
        return self.root / sub / f"{sha}{ext}"

    @property
    def store_path(self) -> Path:
        return self.root / "store.db"

    @property
    def current(self) -> Path:
        return self.root / "current.tflite"

    def _job_file(self, job_id: str, ext: str = ".json") -> Path:
        return self.root / "jobs" / f"{job_id}{ext}"

    def resolve(self, name) -> Path:
        """The file a GET names: ``current`` or ``models|tables|jobs/<file>``."""
        if name == "current":
            path = self.current
        elif isinstance(name, str) and name.count("/") == 1 and name.split("/")[0] in READABLE:
            path = self.root / name
        else:
            raise StateError("bad_request", f"unknown file {name!r}")
        if ".." in Path(name).parts or not path.is_file():
            raise StateError("not_found", f"{name}: no such file on the device")
        return path

    # --- store and the active model ---
    def store(self, create: bool = False, check: str = "quick") -> Store:
        """The sample store. Requests open it with SQLite's quick_check (0.17 s at 400k samples);
        the full check (every row's digest, the audit chain: 3.1 s there) runs at start-up and
        before a commit deletes anything."""
        if not create and not self.store_path.exists():
            raise StateError("no_store", "the device holds no samples yet (push-samples first)")
        return Store(self.store_path, create=create, check=check)

    def active_model(self) -> str | None:
        if not self.store_path.exists():
            return None
        with self.store() as s:
            return s.active_model

    def load_active(self) -> tuple[str, Model]:
        sha = self.active_model()
        if sha is None:
            raise StateError("no_model", "the device has no active model")
        return sha, load_tflite(self.path("model", sha))

    def add(self, kind: str, data: bytes) -> str:
        """Store ``data`` content-addressed (atomically; once); returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(kind, sha)
        if not dest.exists():
            self.ops.atomic_write(dest, data)
        return sha

    def activate(self, sha: str) -> None:
        """Make models/<sha>.tflite the active model: it must load; then the store's row, then
        current.tflite."""
        try:
            load_tflite(self.path("model", sha))
        except (ModelError, OSError, ValueError) as e:
            raise StateError("bad_model", str(e)) from None
        with self.store(create=True) as s:
            s.set_active_model(sha)
        self.derive_current()

    def derive_current(self) -> None:
        """current.tflite = the store's active model (copy + fsync + rename), when it is not already."""
        sha = self.active_model()
        if sha is None or (self.current.exists() and sha256_file(self.current) == sha):
            return
        self.ops.atomic_write(self.current, self.path("model", sha).read_bytes())

    def has(self, kind: str, sha: str) -> bool:
        """Whether the device holds this upload (for samples: as a file, or imported)."""
        path = self.path(kind, sha)
        return path.exists() or (kind == "samples" and path.with_suffix(".imported").exists())

    # --- uploads: incoming/<sha>.part, verified before anything reads it ---
    def _part(self, sha: str) -> Path:
        return self.root / "incoming" / f"{sha}.part"

    def part_size(self, sha: str) -> int:
        part = self._part(sha)
        return part.stat().st_size if part.exists() else 0

    def append_part(self, sha: str, data: bytes) -> int:
        self.ops.append(self._part(sha), data)
        return self.part_size(sha)

    def drop_part(self, sha: str) -> None:
        self.ops.remove(self._part(sha))

    def install_part(self, kind: str, sha: str) -> Path:
        """Hash the finished upload; move it into place if it matches, else delete and refuse."""
        part, dest = self._part(sha), self.path(kind, sha)
        if not part.exists():
            raise StateError("offset", "no data received for this file")
        if sha256_file(part) != sha:
            self.drop_part(sha)
            raise StateError("checksum", "the received file does not match its SHA-256; send it again")
        if kind == "model":  # a model nothing could load is refused here, and leaves nothing behind
            try:
                load_tflite(part)
            except (ModelError, OSError) as e:
                self.drop_part(sha)
                raise StateError("bad_model", str(e).replace(str(part), "the uploaded model")) from None
        self.ops.move(part, dest)
        return dest

    # --- samples ---
    def import_samples(self, sha: str, owner: str | None = None, role: str = "train") -> int:
        """Import samples/<sha>.npz once. The ids derive from the upload's hash, so a repeated
        import (a retried PUT_END, a cut after the import's transaction) adds nothing and answers
        the first import's count."""
        path = self.path("samples", sha)
        marker = path.with_suffix(".imported")
        if marker.exists():
            self._drop_imported(path)
            return int(marker.read_text() or 0)
        _, model = self.load_active()
        prefix = sha[:32]
        with self.store(create=True) as s:
            try:
                s.select(ids=[f"{prefix}-{0:07d}"], role=None)
                already = True
            except StoreError:
                already = False
            if already:
                with np.load(path) as data:
                    n = len(data["y"] if "y" in data.files else data["y_train"])
            else:
                n = len(import_samples(s, model, npz=path, owner=owner, role=role, id_prefix=prefix))
        self.ops.atomic_write(marker, str(n).encode())
        self._drop_imported(path)
        return n

    def _drop_imported(self, path: Path) -> None:
        # an imported upload's bytes live on in the store, where a forget deletes them; a copy left
        # in samples/ would keep a forgotten person's data on the device (found by the power-cut
        # simulator's secure-delete check)
        if path.exists():
            self.ops.remove(path)

    # --- jobs ---
    def save_job(self, job: ForgetJob) -> None:
        self.ops.atomic_write(self._job_file(job.job_id), job.to_json().encode())

    def open_jobs(self) -> list[ForgetJob]:
        return [j for j in self.jobs.values() if j.status in OPEN]

    def new_job(self, selector, method: str | None = None, params: dict | None = None,
                table: str | None = None, retain_max: int | None = None, job_id: str | None = None) -> ForgetJob:
        """Check a forget request and record it as a queued job (nothing runs yet). One open job at a
        time: two jobs from the same model cannot both be committed (the second's model would still
        know the first's samples), so a second request is refused with what to do."""
        selector = check_selector(selector)
        if job_id is not None and job_id in self.jobs:
            # a retried or redelivered request: its job, whatever happened since (after a commit the
            # selection names no sample any more, and checking it would refuse the retry)
            return self.jobs[job_id]
        method = default_method(selector) if method is None else method
        if not isinstance(method, str) or method not in METHODS:
            raise StateError("bad_request", f"unknown method {method!r}")
        if self.active_model() is None:
            raise StateError("no_model", "the device has no active model")
        if table is not None and not self.path("table", table).is_file():
            raise StateError("not_found", f"table {table} was not uploaded")
        with self.store() as s:  # check the selection now, so a bad request fails at once
            try:
                s.select(**selector, role=None)
            except StoreError as e:
                raise StateError("bad_selector", str(e)) from None
        for job in self.open_jobs():
            if job.status == "done":
                raise StateError("busy", f"job {job.job_id} has finished and waits: commit it or roll it "
                                         "back before a new forget request")
            raise StateError("busy", f"job {job.job_id} is {job.status} ({job.phase}, {100 * job.progress:.0f}%); "
                                     "wait for it, then commit or roll it back")
        job = ForgetJob(job_id=job_id or os.urandom(8).hex(), selector=selector, method=method,
                        params=dict(params or {}), table=table, retain_max=retain_max)
        self.jobs[job.job_id] = job
        self.save_job(job)
        return job

    def run_job(self, job: ForgetJob, progress: Callable[[dict], None] | None = None,
                warn: Callable[[str], None] = print, allow_table_mismatch: bool = False) -> ForgetJob:
        """Run a queued job to "done" (certificate made, nothing committed) or "failed"."""
        start = time.monotonic()
        job.status, job.phase = "running", "loading"

        def on_progress(info: dict) -> None:
            job.record_progress(info, time.monotonic() - start)
            if progress is not None:
                progress(info)

        try:
            sha, _ = self.load_active()
            table = str(self.path("table", job.table)) if job.table else None
            with self.store() as s:
                run = run_forget(self.path("model", sha), s, job.selector, job.method, job.params, table,
                                 allow_table_mismatch, job.retain_max,
                                 save_model=lambda m: self.path("model", self.add("model", to_bytes(m))),
                                 progress=on_progress, request_id=job.job_id, warn=warn)
            self.ops.atomic_write(self._job_file(job.job_id, ".ids"), "\n".join(run.forget_ids).encode())
            job.finish(run.certificate)
        except Exception as e:
            job.fail(f"{type(e).__name__}: {e}")
            self.save_job(job)
            raise
        self.save_job(job)
        return job

    def commit_job(self, job: ForgetJob) -> dict:
        """Delete the job's forgotten samples and switch the active model (one store transaction),
        then the job file, current.tflite and the collection of unreferenced models."""
        if job.status == "committed":
            return job.certificate
        if job.status != "done":
            raise StateError("not_ready", f"job {job.job_id} is {job.status}")
        ids = self._job_file(job.job_id, ".ids").read_text().split("\n")
        with self.store(check="full") as s:
            cert = commit(s, job.certificate, ids)
        job.status, job.certificate = "committed", cert
        self.save_job(job)
        self.ops.remove(self._job_file(job.job_id, ".ids"))
        self.derive_current()
        self.collect_garbage()
        return cert

    def rollback_job(self, job: ForgetJob) -> None:
        """Drop a finished job: the model and the samples stay as they were."""
        if job.status == "rolled_back":
            return
        if job.status != "done":
            raise StateError("not_ready", f"job {job.job_id} is {job.status}")
        with self.store() as s:
            s.set_status(job.job_id, "rolled_back")
        job.status = "rolled_back"
        self.save_job(job)
        self.ops.remove(self._job_file(job.job_id, ".ids"))
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Delete model files nothing refers to (never while a job runs: its new model is not yet
        named anywhere)."""
        if any(j.status in ("queued", "running") for j in self.jobs.values()):
            return
        keep = {self.active_model()}
        keep |= {(j.certificate or {}).get("model_after_sha256") for j in self.open_jobs()}
        for path in sorted((self.root / "models").glob("*.tflite")):
            if path.stem not in keep:
                self.ops.remove(path)

    # --- start-up ---
    def recover(self) -> None:
        """After a crash: interrupted jobs are failed (nothing of theirs was committed), a commit
        the store made but the job file missed is completed, current.tflite matches the store,
        temp files go."""
        # atomic_write makes its temp file next to the target: a cut leaves them in any folder
        for tmp in self.root.rglob(".*.tmp"):
            self.ops.unlink(tmp)
        for marker in sorted((self.root / "samples").glob("*.imported")):  # a cut after the import
            self._drop_imported(marker.with_suffix(".npz"))
        requests: dict[str, dict] = {}
        if self.store_path.exists():
            with self.store(check="full") as s:
                # "pending" too: a cut can fall between create_request and set_status("running")
                for req in s.requests("running") + s.requests("pending"):
                    s.set_status(req["id"], "failed", {"error": "interrupted: the agent restarted"})
                requests = {r["id"]: r for r in s.requests()}
        for path in sorted((self.root / "jobs").glob("*.json")):
            try:
                job = ForgetJob.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                continue
            req = requests.get(job.job_id)
            if job.status in ("queued", "running"):
                if req is not None and req["status"] == "done":
                    # it finished, but the certificate (and the ids COMMIT needs) died with the
                    # process: it can never be committed, so close the request
                    with self.store() as s:
                        s.set_status(req["id"], "rolled_back")
                job.fail("interrupted: the agent restarted")
                self.ops.unlink(self._job_file(job.job_id, ".ids"))
                self.save_job(job)
            elif job.status == "done" and req is not None and req["status"] == "rolled_back":
                # the rollback reached the store but the cut came before the job file said so
                job.status = "rolled_back"
                self.ops.unlink(self._job_file(job.job_id, ".ids"))
                self.save_job(job)
            elif job.status == "done" and req is not None and req["status"] == "committed":
                # the commit transaction went through but the cut came before the job file said so
                record = (req.get("result") or {}).get("commit") or {}
                job.status = "committed"
                job.certificate = dict(job.certificate or {}, committed=True,
                                       samples_deleted_at=record.get("deleted_at"),
                                       audit_hash=record.get("audit_hash"))
                self.ops.unlink(self._job_file(job.job_id, ".ids"))
                self.save_job(job)
            self.jobs[job.job_id] = job
        self.derive_current()
