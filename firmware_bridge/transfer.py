"""Chunked, resumable file transfer over the channel, verified by SHA-256 before anything uses it.

PUT: ``PUT_BEGIN {kind, size, sha256}`` answers the offset the device already holds (a restart of
either side resumes there), then ``PUT_CHUNK {sha256, offset, data}`` appends in order (a retried
chunk below the held offset is acknowledged without writing again), then ``PUT_END {sha256}`` makes
the device hash the whole file and move it into place atomically. A file that does not hash right is
deleted and refused: nothing ever reads an unverified upload. GET reads ``(offset, length)`` slices.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from edge_qmul.api import KINDS, StateDir

from .channel import Client, RemoteError
from .frames import MsgType

MAX_FILE = 256 * 1024 * 1024
CHUNK_OVERHEAD = 192  # header 16, tag 16, msgpack keys + rid 16 + sha256 hex 64, with margin
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_sha(value) -> str:
    if not isinstance(value, str) or not SHA_RE.match(value):
        raise RemoteError("bad_request", "sha256 must be 64 lowercase hex digits")
    return value


class TransferArea:
    """The device's side of PUT and GET: checks each request, and keeps the bytes in the state
    directory's ``incoming/<sha>.part`` files until they verify (the directory's own writes)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state

    def begin(self, body: dict) -> dict:
        kind, sha, size = body.get("kind"), _check_sha(body.get("sha256")), body.get("size")
        if not isinstance(kind, str) or kind not in KINDS:
            raise RemoteError("bad_request", f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(size, int) or not 0 <= size <= MAX_FILE:
            raise RemoteError("bad_request", f"size must be an integer in [0, {MAX_FILE}]")
        if self.state.has(kind, sha):
            return {"offset": size, "complete": True}
        held = self.state.part_size(sha)
        if held > size:  # a stale partial of another size: start over
            self.state.drop_part(sha)
            held = 0
        return {"offset": held, "complete": False}

    def chunk(self, body: dict) -> dict:
        sha, offset, data = _check_sha(body.get("sha256")), body.get("offset"), body.get("data")
        if not isinstance(offset, int) or offset < 0 or not isinstance(data, (bytes, bytearray)):
            raise RemoteError("bad_request", "PUT_CHUNK needs an integer offset and bytes")
        held = self.state.part_size(sha)
        if offset + len(data) <= held:
            return {"offset": held}  # a retry of a chunk already written
        if offset != held:
            raise RemoteError("offset", f"expected offset {held}, got {offset}")
        if held + len(data) > MAX_FILE:
            raise RemoteError("too_large", f"files are limited to {MAX_FILE} bytes")
        return {"offset": self.state.append_part(sha, bytes(data))}

    def end(self, body: dict) -> dict:
        kind, sha = body.get("kind"), _check_sha(body.get("sha256"))
        if not isinstance(kind, str) or kind not in KINDS:
            raise RemoteError("bad_request", f"unknown kind {kind!r}")
        dest = self.state.path(kind, sha)
        if not self.state.has(kind, sha):
            dest = self.state.install_part(kind, sha)  # StateError (checksum, offset) -> the agent's reply
        return {"path": str(dest.relative_to(self.state.root)), "sha256": sha}

    def get(self, body: dict, resolve: Callable[[str], Path]) -> dict:
        name, offset, length = body.get("name"), body.get("offset", 0), body.get("length", 0)
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise RemoteError("bad_request", "GET needs non-negative integer offset and length")
        path = resolve(name)
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(min(offset, size))
            data = f.read(length)
        return {"size": size, "offset": offset, "data": data}


# --- host side -----------------------------------------------------------------------------------

def chunk_size(client: Client) -> int:
    """Data bytes per chunk so a PUT_CHUNK frame fits the negotiated MTU (COBS adds 1 byte in 254)."""
    if client.session is None:
        return 1024
    mtu = client.session.mtu
    return max(32, mtu - CHUNK_OVERHEAD - mtu // 254 - 1)


def put(client: Client, kind: str, data: bytes, progress: Callable[[int, int], None] | None = None,
        end_fields: dict | None = None) -> dict:
    """Upload ``data`` as a ``kind`` file; resumes where the device stands; returns PUT_END's reply
    (``end_fields`` ride on PUT_END: e.g. activate a model, the owner of imported samples)."""
    sha = hashlib.sha256(data).hexdigest()
    state = client.request(MsgType.PUT_BEGIN, {"kind": kind, "size": len(data), "sha256": sha})
    offset = int(state["offset"])
    if not state.get("complete"):
        while offset < len(data):
            if client.session is None:
                client.connect()
            n = chunk_size(client)
            try:
                offset = int(client.request(MsgType.PUT_CHUNK, {"sha256": sha, "offset": offset,
                                                                  "data": data[offset:offset + n]})["offset"])
            except RemoteError as e:
                if e.code != "offset":
                    raise
                # the device holds another offset (it restarted, or a reply was lost): ask again
                offset = int(client.request(MsgType.PUT_BEGIN, {"kind": kind, "size": len(data),
                                                                 "sha256": sha})["offset"])
            if progress is not None:
                progress(offset, len(data))
    return client.request(MsgType.PUT_END, {"kind": kind, "sha256": sha, **(end_fields or {})}, timeout=10.0)


def get(client: Client, name: str, progress: Callable[[int, int], None] | None = None) -> bytes:
    """Download a device file (e.g. ``current`` or ``models/<sha>.tflite``) in chunks."""
    out = bytearray()
    size = None
    while size is None or len(out) < size:
        reply = client.request(MsgType.GET, {"name": name, "offset": len(out), "length": chunk_size(client)})
        size = int(reply["size"])
        out += reply["data"]
        if not reply["data"] and len(out) < size:
            raise RemoteError("short_read", f"{name}: the device returned no data at offset {len(out)}")
        if progress is not None:
            progress(len(out), size)
    return bytes(out)
