"""A power-cut simulator on the state directory's file-operations layer (MCUboot's simulator, for files).

A clean run records every step of its ``FileOps`` (write, fsync, rename, unlink, fsync of a
directory) with the bytes involved. :func:`disk_after` then rebuilds, for any prefix of that trace,
the directory a power cut there would leave: file contents are what was last fsynced (or, torn, that
plus the written bytes up to a 512-byte sector boundary); directory entries are those of the last
fsync of their directory (or, optimistic, every rename and creation so far: a rename not followed by a
directory fsync may or may not have reached the disk).

SQLite's own writes do not go through FileOps. The store runs with ``synchronous=FULL``, so a
committed transaction is durable: the recorder copies the store's files (``store.db``, its WAL) as
they stand before each step, i.e. SQLite is cut only at transaction boundaries between our steps.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_qmul.fsutil import FileOps

SECTOR = 512
STORE_FILES = ("store.db", "store.db-wal")


@dataclass
class Step:
    kind: str             # write | fsync | rename | unlink | fsync_dir | sqlite
    path: str = ""        # relative to the root (rename: the destination)
    src: str = ""         # rename's source
    data: bytes = b""     # write: the whole file after the write
    files: dict = field(default_factory=dict)  # sqlite: name -> bytes (None: absent)


class RecordingOps(FileOps):
    """Performs every step and records it, relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.trace: list[Step] = []
        self._store = self._store_files()

    def _rel(self, path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def _store_files(self) -> dict:
        return {n: (self.root / n).read_bytes() if (self.root / n).exists() else None for n in STORE_FILES}

    def _sync_store(self) -> None:
        now = self._store_files()
        if now != self._store:
            self.trace.append(Step("sqlite", files=now))
            self._store = now

    def write(self, path, data, mode="wb"):
        self._sync_store()
        super().write(path, data, mode)
        self.trace.append(Step("write", self._rel(path), data=Path(path).read_bytes()))

    def fsync(self, path):
        self._sync_store()
        super().fsync(path)
        self.trace.append(Step("fsync", self._rel(path)))

    def rename(self, src, dst):
        self._sync_store()
        super().rename(src, dst)
        self.trace.append(Step("rename", self._rel(dst), src=self._rel(src)))

    def unlink(self, path):
        self._sync_store()
        existed = Path(path).exists()
        super().unlink(path)
        if existed:
            self.trace.append(Step("unlink", self._rel(path)))

    def fsync_dir(self, directory):
        self._sync_store()
        super().fsync_dir(directory)
        self.trace.append(Step("fsync_dir", self._rel(directory) if Path(directory) != self.root else "."))

    def finish(self) -> None:
        """Record the store's last transactions (after the last step)."""
        self._sync_store()


@dataclass
class Inode:
    durable: bytes
    pending: bytes


class Disk:
    """Directory entries and file contents, each durable or pending, as the trace leaves them."""

    def __init__(self, root: Path) -> None:
        self.inodes: list[Inode] = []
        self.durable: dict[str, int] = {}  # path -> inode (paths carry their directory)
        self.pending: dict[str, int] = {}
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
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
            def inside(p: str) -> bool:
                return (str(Path(p).parent) if "/" in p else ".") == step.path
            self.durable = {p: i for p, i in self.durable.items() if not inside(p)}
            self.durable.update({p: i for p, i in self.pending.items() if inside(p)})
        elif step.kind == "sqlite":
            for name, data in step.files.items():
                for table in (self.durable, self.pending):
                    table.pop(name, None)
                if data is not None:
                    self._add(name, data, durable=True)
        else:
            raise ValueError(step.kind)

    def write_to(self, out: Path, renames_reached: bool, torn: bool) -> None:
        """The directory after the cut: durable entries (or every entry so far); durable bytes (or
        torn: plus the pending bytes up to a sector boundary)."""
        out.mkdir(parents=True)
        for d in sorted(self.dirs):
            (out / d).mkdir(parents=True, exist_ok=True)
        entries = dict(self.durable)
        if renames_reached:
            entries.update(self.pending)
            entries = {p: i for p, i in entries.items() if p in self.pending}
        for rel, i in entries.items():
            node = self.inodes[i]
            data = node.durable
            if torn and len(node.pending) > len(data) and node.pending[:len(data)] == data:
                keep = (len(node.pending) // SECTOR) * SECTOR
                data = node.pending[:max(keep, len(data))]
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (renames_reached, torn)


def disk_after(initial: Path, trace: list[Step], k: int, out: Path, renames_reached: bool,
               torn: bool) -> Path:
    """Write to ``out`` what ``initial`` becomes when power is cut after ``trace[:k]``."""
    disk = Disk(initial)
    for step in trace[:k]:
        disk.apply(step)
    if out.exists():
        shutil.rmtree(out)
    disk.write_to(out, renames_reached, torn)
    return out
