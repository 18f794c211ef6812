"""Keep numba's on-disk cache consistent with the package's sources.

numba checks a cached function against its own source file only (its index stores that file's
modification time and size). The kernels inline functions from other files (``quant.requantize``,
the tile kernel in ``kernels/tile.py``), so after a ``git pull`` or an edit that touches only those,
the kernels of unchanged files would load machine code built from the old ones: stale, possibly
mismatched layouts. At import, :func:`drop_stale_cache` fingerprints every source file of the
package and, when the fingerprint differs from the one the cache was built with, deletes the
package's cached functions so they are compiled afresh. The check costs one ``stat`` per file.

With ``NUMBA_CACHE_DIR`` set, the cache lives outside the package and is left alone.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

STAMP = "numba-sources.sha256"


def sources_fingerprint(package: Path) -> str:
    """A digest of every .py file's path, size and modification time under ``package``."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        digest.update(f"{path.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def drop_stale_cache(package: Path) -> bool:
    """Delete the package's numba cache files if its sources changed since they were written;
    returns whether anything was deleted. Never raises on I/O trouble (a read-only install)."""
    if os.environ.get("NUMBA_CACHE_DIR") or os.environ.get("NUMBA_DISABLE_JIT"):
        return False
    try:
        fingerprint = sources_fingerprint(package)
        stamp = package / "__pycache__" / STAMP
        if stamp.is_file() and stamp.read_text() == fingerprint:
            return False
        dropped = False
        for pattern in ("*.nbi", "*.nbc"):
            for cached in package.rglob(pattern):
                cached.unlink(missing_ok=True)
                dropped = True
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(fingerprint)
        return dropped
    except OSError:
        return False
