"""A power-cut simulator on the state directory's file-operations layer (MCUboot's simulator, for files).

A clean run records every step of its ``FileOps`` (write, fsync, rename, unlink, fsync of a
directory) with the bytes involved. :class:`Replayer` then rebuilds, for any prefix of that trace,
the directory a power cut there would leave: file contents are what was last fsynced (or, torn, that
plus the new bytes up to a 512-byte sector boundary); directory entries are those of the last fsync
of their directory (or, optimistic, every rename and creation so far: a rename not followed by a
directory fsync may or may not have reached the disk).

SQLite's own writes are counted too, at the level of its WAL protocol (``PRAGMA journal_mode=WAL``,
``synchronous=FULL``, the store's ``PRAGMA wal_checkpoint(TRUNCATE)``), not through a VFS shim
(Python's sqlite3 cannot load one without a C extension). While recording, every connection the
store opens is a :class:`RecordingConnection`: after each statement the recorder compares
``store.db`` and ``store.db-wal`` with what it last saw and records the change as SQLite makes it --
frames appended to the WAL (a write), the WAL's fsync when a transaction commits (and, for a new
WAL, the directory's, as SQLite's unix VFS does), a checkpoint's pages written into ``store.db`` and
its fsync, then the WAL's truncation (not fsynced). A cut can therefore leave a torn or unsynced WAL,
a half-written checkpoint, or a truncation that never reached the disk, and SQLite's recovery runs
on that.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from edge_qmul.fsutil import FileOps

SECTOR = 512
DB, WAL = "store.db", "store.db-wal"
IGNORED = ("lock", "store.db-shm")  # not data: the flock file; SQLite rebuilds the WAL index


@dataclass
class Step:
    kind: str             # write | fsync | rename | unlink | fsync_dir
    path: str = ""        # relative to the root (rename: the destination); "." is the root
    src: str = ""         # rename's source
    data: bytes = b""     # write: the whole file after the write
    source: str = "ops"   # ops (FileOps) | sqlite (the store's own writes)
    phase: str = ""       # the lifecycle step that made it

    @property
    def label(self) -> str:
        return f"{self.source}:{self.kind}"


class RecordingOps(FileOps):
    """Performs every step and records it, relative to ``root``; with :meth:`recording_sqlite`,
    the store's SQLite writes too. Set ``phase`` to label the steps that follow."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.trace: list[Step] = []
        self.phase = "open"
        self._seen = self._store_files()   # what the trace says the store's files hold
        self._wal_dir_synced = True
        self._unsynced: set[str] = set()    # store files written since their last fsync

    def _rel(self, path) -> str:
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        return rel or "."

    def _add(self, kind: str, path: str, source: str = "ops", **kw) -> None:
        self.trace.append(Step(kind, path, source=source, phase=self.phase, **kw))

    # --- SQLite ---
    def _store_files(self) -> dict:
        return {n: (self.root / n).read_bytes() if (self.root / n).exists() else None for n in (DB, WAL)}

    def store_changed(self, synchronous: int | None) -> None:
        """Record what SQLite wrote since the last look, in the order its WAL protocol writes it.
        ``synchronous``: None inside a transaction, else the connection's ``PRAGMA synchronous``,
        which decides the fsyncs (WAL mode: FULL and EXTRA sync the WAL at every commit and the
        database at a checkpoint; NORMAL syncs both only at a checkpoint; OFF never)."""
        now, before = self._store_files(), self._seen
        level = -1 if synchronous is None else synchronous
        checkpoint = now[DB] != before[DB]
        if before[WAL] is None and now[WAL] is not None:
            self._wal_dir_synced = False  # a new WAL: its first fsync also syncs the directory
        wal_grew = now[WAL] and now[WAL] != before[WAL]
        if wal_grew:
            for data in _frame_writes(before[WAL] or b"", now[WAL], _page_size(now[DB])):
                self._add("write", WAL, "sqlite", data=data)
            self._unsynced.add(WAL)
        if (level >= 2 or (level == 1 and checkpoint)) and WAL in self._unsynced and now[WAL]:
            self._add("fsync", WAL, "sqlite")
            if not self._wal_dir_synced:  # as the unix VFS does for a file it created
                self._add("fsync_dir", ".", "sqlite")
                self._wal_dir_synced = True
            self._unsynced.discard(WAL)
        if now[DB] != before[DB]:
            for data in _page_writes(before[DB] or b"", now[DB] or b"", _page_size(now[DB])):
                self._add("write", DB, "sqlite", data=data)
            self._unsynced.add(DB)
        if level >= 1 and DB in self._unsynced:
            self._add("fsync", DB, "sqlite")
            self._unsynced.discard(DB)
        if before[WAL] is not None and now[WAL] is None:  # the last connection closed
            self._add("unlink", WAL, "sqlite")
            self._unsynced.discard(WAL)
        elif not wal_grew and before[WAL] and now[WAL] == b"":  # a TRUNCATE checkpoint
            self._add("write", WAL, "sqlite", data=b"")
            self._unsynced.discard(WAL)
        self._seen = now

    @contextlib.contextmanager
    def recording_sqlite(self, synchronous: str | None = None):
        """Within: every sqlite3 connection reports its statements' writes to this recorder.
        ``synchronous`` (a test of the simulator): the store's ``PRAGMA synchronous = FULL`` runs
        with this value instead."""
        real_connect, recorder = sqlite3.connect, self

        class RecordingConnection(sqlite3.Connection):
            def _synchronous(self) -> int:
                return sqlite3.Connection.execute(self, "PRAGMA synchronous").fetchone()[0]

            def execute(self, sql, *args, **kwargs):
                if synchronous and sql.replace(" ", "").upper() == "PRAGMASYNCHRONOUS=FULL":
                    sql = f"PRAGMA synchronous = {synchronous}"
                try:
                    return super().execute(sql, *args, **kwargs)
                finally:
                    recorder.store_changed(None if self.in_transaction else self._synchronous())

            def close(self):
                level = self._synchronous()
                super().close()
                recorder.store_changed(level)

        def connect(*args, **kwargs):
            kwargs.setdefault("factory", RecordingConnection)
            return real_connect(*args, **kwargs)

        sqlite3.connect = connect
        try:
            yield self
        finally:
            sqlite3.connect = real_connect

    # --- FileOps ---
    def write(self, path, data, mode="wb"):
        super().write(path, data, mode)
        self._add("write", self._rel(path), data=Path(path).read_bytes())

    def fsync(self, path):
        super().fsync(path)
        self._add("fsync", self._rel(path))

    def rename(self, src, dst):
        super().rename(src, dst)
        self._add("rename", self._rel(dst), src=self._rel(src))

    def unlink(self, path):
        existed = Path(path).exists()
        super().unlink(path)
        if existed:
            self._add("unlink", self._rel(path))

    def fsync_dir(self, directory):
        super().fsync_dir(directory)
        self._add("fsync_dir", self._rel(directory))


def _page_size(db: bytes | None) -> int:
    size = int.from_bytes(db[16:18], "big") if db and len(db) >= 100 else 4096
    return 65536 if size == 1 else size


def _frame_writes(old: bytes, new: bytes, page: int) -> list[bytes]:
    """The WAL after each of SQLite's writes: its 32-byte header, then one frame (24-byte header
    and a page) at a time, from the first byte that changed."""
    first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    bounds = [32] + list(range(32 + page + 24, len(new) + 1, page + 24))
    cuts = [b for b in bounds if b > first] or [len(new)]
    if cuts[-1] != len(new):
        cuts.append(len(new))
    return [new[:c] + old[c:] if c < len(old) else new[:c] for c in cuts]


def _page_writes(old: bytes, new: bytes, page: int) -> list[bytes]:
    """The database file after each page a checkpoint writes (in page order, changed pages only)."""
    out, cur = [], bytearray(old)
    for start in range(0, max(len(old), len(new)), page):
        if old[start:start + page] != new[start:start + page]:
            cur[start:start + page] = new[start:start + page]
            out.append(bytes(cur[:len(new)]) if len(new) < len(cur) else bytes(cur))
    if not out or out[-1] != new:
        out.append(new)
    return out


@dataclass
class Inode:
    durable: bytes
    pending: bytes


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else "."


def torn(durable: bytes, pending: bytes) -> bytes:
    """What a write cut mid-way leaves: the new bytes up to a sector boundary about half-way through
    the changed range, the old ones after it. A shrink (a truncation) is not torn: it is metadata."""
    if len(pending) < len(durable) or pending == durable:
        return durable
    first = next((i for i, (a, b) in enumerate(zip(durable, pending)) if a != b), len(durable))
    cut = ((first + len(pending)) // 2 // SECTOR) * SECTOR
    cut = max(cut, (first // SECTOR) * SECTOR)
    return pending[:cut] + durable[cut:]


class Disk:
    """Directory entries and file contents, each durable or pending, as the trace leaves them."""

    def __init__(self, root: Path) -> None:
        self.inodes: list[Inode] = []
        self.durable: dict[str, int] = {}  # path -> inode (paths carry their directory)
        self.pending: dict[str, int] = {}
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and p.name not in IGNORED:
                self._add(p.relative_to(root).as_posix(), p.read_bytes(), durable=True)
        self.dirs = {p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_dir()}

    def _add(self, rel: str, data: bytes, durable: bool) -> None:
        self.inodes.append(Inode(data if durable else b"", data))
        self.pending[rel] = len(self.inodes) - 1
        if durable:
            self.durable[rel] = len(self.inodes) - 1

    def apply(self, step: Step) -> None:
        if step.kind == "write":
            if step.path in self.pending:
                self.inodes[self.pending[step.path]].pending = step.data
            else:
                self._add(step.path, step.data, durable=False)
        elif step.kind == "fsync":
            node = self.inodes[self.pending[step.path]]
            node.durable = node.pending
        elif step.kind == "rename":
            self.pending[step.path] = self.pending.pop(step.src)
        elif step.kind == "unlink":
            self.pending.pop(step.path, None)
        elif step.kind == "fsync_dir":
            self.durable = {p: i for p, i in self.durable.items() if _parent(p) != step.path}
            self.durable.update({p: i for p, i in self.pending.items() if _parent(p) == step.path})
        else:
            raise ValueError(step.kind)

    def image(self, renames_reached: bool, tear: bool) -> dict[str, bytes]:
        """The files after the cut: durable entries (or every entry so far); durable bytes (or
        torn: part of the pending ones)."""
        entries = dict(self.durable)
        if renames_reached:
            entries = dict(self.pending)
        out = {}
        for rel, i in sorted(entries.items()):
            node = self.inodes[i]
            out[rel] = torn(node.durable, node.pending) if tear else node.durable
        return out

    def write_to(self, out: Path, files: dict[str, bytes]) -> None:
        out.mkdir(parents=True)
        for d in sorted(self.dirs):
            (out / d).mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (renames_reached, torn)


class Replayer:
    """Disk states after each prefix of a trace, built incrementally (cuts come in step order)."""

    def __init__(self, initial: Path, trace: list[Step]) -> None:
        self.initial, self.trace = initial, trace
        self.disk, self.k = Disk(initial), 0

    def cut(self, k: int, renames_reached: bool, tear: bool, out: Path) -> str:
        """Write to ``out`` what ``initial`` becomes when power is cut after ``trace[:k]``; returns
        the digest of that state (equal states need checking once)."""
        if k < self.k:
            self.disk, self.k = Disk(self.initial), 0
        for step in self.trace[self.k:k]:
            self.disk.apply(step)
        self.k = k
        files = self.disk.image(renames_reached, tear)
        digest = hashlib.sha256()
        for rel, data in files.items():
            digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        if out.exists():
            shutil.rmtree(out)
        self.disk.write_to(out, files)
        return digest.hexdigest()

