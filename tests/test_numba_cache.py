"""edge_qmul.numba_cache: cached kernels are dropped when any source file of the package changed
(numba itself only compares a function with its own file), and kept otherwise."""
from __future__ import annotations

import os

from edge_qmul.numba_cache import STAMP, drop_stale_cache


def _package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "kernels" / "__pycache__").mkdir(parents=True)
    (pkg / "quant.py").write_text("x = 1\n")
    (pkg / "kernels" / "conv.py").write_text("y = 2\n")
    return pkg


def _cached(pkg):
    files = [pkg / "kernels" / "__pycache__" / "conv.forward-10.py311.nbi",
             pkg / "kernels" / "__pycache__" / "conv.forward-10.py311.1.nbc"]
    for f in files:
        f.write_bytes(b"cached")
    return files


def test_stale_cache_is_dropped_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pkg = _package(tmp_path)
    files = _cached(pkg)
    assert drop_stale_cache(pkg)  # no stamp yet: built by an unknown version of the sources
    assert not any(f.exists() for f in files)
    assert (pkg / "__pycache__" / STAMP).is_file()
    files = _cached(pkg)  # compiled again by this version
    assert not drop_stale_cache(pkg)
    assert all(f.exists() for f in files)
    # an edit to another file than the cached function's (quant.py is inlined into the kernels)
    st = (pkg / "quant.py").stat()
    os.utime(pkg / "quant.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert drop_stale_cache(pkg)
    assert not any(f.exists() for f in files)


def test_an_external_cache_dir_is_left_alone(tmp_path, monkeypatch):
    pkg = _package(tmp_path)
    files = _cached(pkg)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert not drop_stale_cache(pkg)
    assert all(f.exists() for f in files)


def test_a_read_only_install_does_not_raise(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pkg = _package(tmp_path)
    os.chmod(pkg, 0o555)
    try:
        drop_stale_cache(pkg)  # the stamp cannot be written: nothing raised
    finally:
        os.chmod(pkg, 0o755)
