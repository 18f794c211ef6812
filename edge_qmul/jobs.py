"""A forget job as a record: what was asked, where it stands, and its certificate.

The state directory (:mod:`edge_qmul.state`) keeps one JSON file per job; the agent answers
JOB_STATUS from it and the host's ``history`` reads its loss curves.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPEN = ("queued", "running", "done")  # a job that still blocks the next request
ENDED = ("done", "failed", "committed", "rolled_back")
HISTORY_POINTS = 500  # loss-curve points kept per job
SELECTOR_KEYS = ("owner", "ids", "label")


def canonical_json(obj) -> str:
    """The JSON text whose sha256 is a certificate's hash: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class SelectorError(ValueError):
    """A forget selection that is not exactly one of an owner, a list of ids or a class."""


def check_selector(selector) -> dict:
    """``{"owner": str}``, ``{"ids": [str, ...]}`` or ``{"label": int}``, else SelectorError."""
    if not isinstance(selector, dict) or len(selector) != 1 or next(iter(selector)) not in SELECTOR_KEYS:
        raise SelectorError("selector must be one of {owner}, {ids}, {label}")
    return selector


def parse_selector(owner: str | None = None, ids_file: str | None = None, label: int | None = None) -> dict:
    """The selection of the ``--owner`` / ``--ids FILE`` / ``--class K`` options (exactly one)."""
    chosen = [k for k, v in (("owner", owner), ("ids", ids_file), ("label", label)) if v is not None]
    if len(chosen) != 1:
        raise SelectorError("give exactly one of --owner, --ids FILE, --class K")
    if owner is not None:
        return {"owner": owner}
    if label is not None:
        return {"label": int(label)}
    path = Path(ids_file)
    if not path.is_file():
        raise SelectorError(f"--ids {path}: no such file")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise SelectorError(f"--ids {path}: lists no sample id (the forget set would be empty)")
    return {"ids": ids}


@dataclass
class ForgetJob:
    """One forget request on a device, from queued to committed, failed or rolled back."""

    job_id: str
    selector: dict
    method: str
    params: dict = field(default_factory=dict)
    table: str | None = None  # sha256 of tables/<sha>.json
    retain_max: int | None = None
    created: float = field(default_factory=time.time)
    status: str = "queued"
    phase: str = "queued"
    progress: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    certificate: dict | None = None
    history: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "ForgetJob":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str) + "\n"

    def status_reply(self) -> dict:
        return {"job_id": self.job_id, "status": self.status, "phase": self.phase, "progress": self.progress,
                "eta_s": self.eta_s, "error": self.error}

    def record_progress(self, info: dict, elapsed: float) -> None:
        """A progress report of the method: phase, fraction done, time left, and a point of the loss
        curves (thinned: past HISTORY_POINTS, every other point goes, so a long run stays a few kB)."""
        total = max(1, info.get("steps", 1) * info.get("epochs", 1))
        done = info.get("epoch", 0) * info.get("steps", 0) + info.get("step", 0)
        fraction = min(1.0, done / total)
        if info.get("max_passes"):  # a work budget: it ends the run unless the epoch cap does first
            fraction = max(fraction, min(1.0, info.get("sample_passes", 0) / info["max_passes"]))
        self.phase = info.get("phase", "unlearning")
        self.progress = fraction
        self.eta_s = elapsed / fraction - elapsed if fraction > 0 else None
        self.history.append({"step": done, "t_s": round(elapsed, 4),
                             **{k: float(v) for k, v in info.items()
                                if k not in ("epoch", "step", "steps", "epochs", "phase")
                                and isinstance(v, (int, float))}})
        if len(self.history) > HISTORY_POINTS:
            del self.history[1::2]

    def finish(self, certificate: dict) -> None:
        self.status, self.phase, self.progress, self.eta_s = "done", "done", 1.0, 0.0
        self.certificate = certificate

    def fail(self, error: str) -> None:
        self.status, self.phase, self.error = "failed", "failed", error
