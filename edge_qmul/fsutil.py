"""The file-operations layer: every write the device's state makes, as a few named steps.

A crash (or a power cut) can fall between any two steps, so what survives depends on their order:
``atomic_write`` is temp file + write + fsync + rename + fsync of the directory, which leaves the
old file or the new one, whole. The steps are methods of :class:`FileOps` so that a test can record
a clean run's steps and rebuild the disk as a cut between any two of them would leave it; the
state directory (:mod:`edge_qmul.state`) makes all its writes through one ``FileOps``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable

Writer = Callable[[BinaryIO], None]


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as lowercase hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileOps:
    """The primitive steps (write, append, fsync, rename, unlink, fsync of a directory) and the
    compound ones built only from them. Subclass and override the primitives to observe them."""

    # --- primitives: each is one step a crash can fall after ---
    def write(self, path: Path, data: bytes | Writer, mode: str = "wb") -> None:
        """Create (or truncate, or with mode "ab" extend) ``path`` and write; not yet durable."""
        with open(path, mode) as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)

    def fsync(self, path: Path) -> None:
        """Make a file's written bytes durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace ``dst`` by ``src`` (durable only after fsync_dir of both directories)."""
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        """Remove a file if it exists (durable only after fsync_dir)."""
        Path(path).unlink(missing_ok=True)

    def fsync_dir(self, directory: Path) -> None:
        """Make the renames, creations and removals inside ``directory`` durable."""
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory handles
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- compound steps ---
    def append(self, path: Path, data: bytes) -> None:
        """Extend ``path`` by ``data`` durably (an upload's next chunk)."""
        self.write(path, data, mode="ab")
        self.fsync(path)

    def atomic_write(self, path: str | os.PathLike, data: bytes | Writer) -> Path:
        """Write ``path`` as temp file + fsync + rename + fsync of the directory.

        ``data`` is the bytes, or a function that writes to the open temp file. On any error the
        temp file is removed and the previous file (if any) is untouched.
        """
        path = Path(path)
        directory = path.parent if str(path.parent) else Path(".")
        # named like mkstemp's files, but created by write(): the layer sees every step
        tmp = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            self.write(tmp, data)
            self.fsync(tmp)
            self.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.fsync_dir(directory)
        return path

    def move(self, src: Path, dst: Path) -> None:
        """Rename a durable file into another directory of the same file system, durably."""
        self.rename(src, dst)
        self.fsync_dir(dst.parent)
        if src.parent != dst.parent:
            self.fsync_dir(src.parent)

    def remove(self, path: Path) -> None:
        """Remove a file durably."""
        self.unlink(path)
        self.fsync_dir(path.parent)


DEFAULT = FileOps()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (the default FileOps)."""
    DEFAULT.fsync_dir(Path(directory))


def atomic_write(path: str | os.PathLike, write: bytes | Writer) -> Path:
    """Write ``path`` whole or not at all (the default FileOps; see :meth:`FileOps.atomic_write`)."""
    return DEFAULT.atomic_write(path, write)
