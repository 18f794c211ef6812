"""The engine's public surface for other packages (the bridge, tools): import from here only.

What is named here is kept stable; everything else in ``edge_qmul`` may move between releases.
The import contract in pyproject.toml (``lint-imports``) holds ``firmware_bridge`` to this module.
"""
from __future__ import annotations

from . import __version__
from .bench import bench_model, format_table, plot
from .cli import add_command
from .errors import CLIError, ModelError
from .evaluation.canary import CanaryError, plant_upload, record_upload, summary_line, verify_files
from .fsutil import FileOps, atomic_write, fsync_dir, sha256_file
from .graph import Model
from .jobs import ENDED, ForgetJob, SelectorError, canonical_json, check_selector, parse_selector
from .state import KINDS, StateDir, StateError
from .store import StoreError
from .tflite import load_tflite

__all__ = ["CLIError", "CanaryError", "ENDED", "FileOps", "ForgetJob", "KINDS", "Model", "ModelError", "SelectorError",
           "StateDir", "StateError", "StoreError", "__version__", "add_command", "atomic_write",
           "bench_model", "canonical_json", "check_selector", "format_table", "fsync_dir", "load_tflite", "parse_selector",
           "plant_upload", "plot", "record_upload", "sha256_file", "summary_line", "verify_files"]
