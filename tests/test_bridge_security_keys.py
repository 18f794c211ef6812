"""Bridge security, the keys: no key shows in logs or reprs; key files are written 0600, never
overwritten, and refused when readable by others or of the wrong length.

The harness (a real device on a real line) is in bridge_helpers.py.
"""
from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_helpers import OTHER_PSK, PSK, SHA_POOL
from bridge_helpers import link_factory  # noqa: F401 - a pytest fixture, used by name
from firmware_bridge import channel
from firmware_bridge.channel import Client, RemoteError
from firmware_bridge.device import KeyFileError, read_key
from firmware_bridge.frames import (
    DIRECTION_HOST_TO_DEVICE as H2D,
    MsgType,
    Sealer,
    derive_hello_key,
    hello_sealer,
)
from firmware_bridge.transfer import put as transfer_put

# ---------------------------------------------------------------------------- 3. no key in logs

def _secret_forms(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), key[:12].hex(), key[-12:].hex(), repr(key), str(key),
            repr(key)[2:-1][:24], key.decode("latin-1"), base64.b64encode(key).decode()[:24],
            repr(list(key))[1:-1][:40]]


def test_key_never_logged_or_in_reprs(link_factory, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    session_keys = []
    real_derive = channel.derive_session_keys

    def spy(*args):
        keys = real_derive(*args)
        session_keys.append(keys)
        return keys
    monkeypatch.setattr(channel, "derive_session_keys", spy)

    link = link_factory("tcp")
    client = Client(link.host, PSK, timeout=2.0, retries=5)
    client.connect()
    assert "time" in client.request(MsgType.PING)
    assert client.request(MsgType.INFO)["jobs"] == 0
    blob = os.urandom(5000)
    reply = transfer_put(client, "table", blob)
    assert (link.agent.state / reply["path"]).read_bytes() == blob
    with pytest.raises(RemoteError):
        client.request(MsgType.JOB_STATUS, {"job_id": "nope"})
    with pytest.raises(RemoteError) as internal:  # a handler that fails inside: log.exception
        client.request(MsgType.PUT_BEGIN, {"kind": ["not", "hashable"], "sha256": SHA_POOL[0], "size": 1})
    assert internal.value.code in ("internal", "bad_request")
    # bad frames: garbage, a wrong key, a HELLO under another key, a replay
    link.send(b"\x07garbage\x00" + os.urandom(64) + b"\x00")
    sid = client.session.session_id
    link.send(Sealer(OTHER_PSK, sid, H2D, 4096, start_counter=10**6).seal(MsgType.PING, {"rid": b"r" * 16,
                                                                                         "body": {}}))
    link.send(hello_sealer(OTHER_PSK, H2D, 4096).seal(MsgType.HELLO, {"nonce": os.urandom(16)}))
    wire = client.session.sealer.seal(MsgType.PING, {"rid": b"q" * 16, "body": {}})
    link.send(wire + wire)
    assert "time" in client.request(MsgType.PING)
    # a second session (the host reconnects), and another round
    client.session = None
    client.connect()
    assert client.request(MsgType.INFO)["jobs"] == 0
    assert link.server.stats["rejected"].get("auth", 0) >= 2
    assert link.server.stats["rejected"].get("replay", 0) >= 1
    assert len(session_keys) >= 4  # both ends of two sessions
    secrets_ = [PSK, derive_hello_key(PSK)] + [k for keys in session_keys
                                               for k in (keys.host_to_device, keys.device_to_host)]

    records = list(caplog.records)
    assert any(r.levelno == logging.DEBUG and "rejected" in r.getMessage() for r in records)
    assert any("session" in r.getMessage() and "opened" in r.getMessage() for r in records)
    handler = logging.Formatter("%(name)s %(levelname)s %(message)s")
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err]
    for r in records:
        texts += [r.getMessage(), handler.format(r), repr(r.args), str(r.exc_text)]
    texts += [repr(x) for x in (client, link.server, link.agent, client.session, link.server.session,
                                link.server.reader, client.reader, link.server.stats, client.stats,
                                link.host, link.device_end)]
    texts += [str(x) for x in (client, link.server, link.agent)]
    blob_text = "\n".join(texts)
    for key in secrets_:
        for form in _secret_forms(key):
            assert form not in blob_text, "a key leaked into a log or a repr"


# ------------------------------------------------------------------------------- 4. key files

def _keygen(path: Path):
    return subprocess.run([sys.executable, "-m", "edge_qmul.cli", "keygen", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_keygen_writes_32_bytes_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "device.key"
    r = _keygen(path)
    assert r.returncode == 0, r.stderr
    key = path.read_bytes()
    assert len(key) == 32 and key != bytes(32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.hex() not in r.stdout + r.stderr
    assert read_key(path) == key

    r = _keygen(path)
    assert r.returncode != 0
    assert str(path) in r.stderr and "overwritten" in r.stderr and "Traceback" not in r.stderr
    assert path.read_bytes() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.hex() not in r.stdout + r.stderr

    other = tmp_path / "other.key"
    assert _keygen(other).returncode == 0
    assert other.read_bytes() != key  # random, not derived from anything


def _expect_refused(path: Path, content: bytes, *words: str) -> None:
    with pytest.raises(KeyFileError) as info:
        read_key(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    if content:
        for form in (content.hex(), repr(content), content[:8].hex(), content.decode("latin-1")):
            # a one-byte key's "07" is in a path like pytest-107: only forms long enough to mean it
            assert len(form) < 6 or form not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o777])
def test_read_key_refuses_a_file_others_can_read(tmp_path, mode):
    path = tmp_path / "device.key"
    key = os.urandom(32)
    path.write_bytes(key)
    path.chmod(mode)
    _expect_refused(path, key, "chmod 600", f"{mode:o}")
    path.chmod(0o600)
    assert read_key(path) == key
    path.chmod(0o400)
    assert read_key(path) == key


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_read_key_refuses_the_wrong_length(tmp_path, size):
    path = tmp_path / "device.key"
    content = bytes(range(7, 7 + size)) if size < 200 else os.urandom(size)
    path.write_bytes(content)
    path.chmod(0o600)
    _expect_refused(path, content, f"{size} bytes", "32")


def test_read_key_refuses_a_missing_file(tmp_path):
    _expect_refused(tmp_path / "absent.key", b"")
