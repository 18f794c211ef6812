"""firmware_bridge security at the channel / device level (DESIGN.md §6).

A real ``channel.Server`` around a real ``device.Agent`` (tmp state dir) serves one end of a real
transport (a pty pair or TCP on 127.0.0.1) in a thread; the test holds the other end and speaks
the wire protocol itself, so it can send forged, replayed, cut and mutated frames.

Checked: every kind of bad frame is dropped, counted by reason, never answered and changes no
state (files, jobs, session); 10,000+ random, mutated and validly sealed frames of random types and
payloads neither crash, hang nor grow the device, and never earn a REPLY they should not; the key
never shows in logs or reprs; key files are written 0600, never overwritten, and refused when
readable by others or of the wrong length.

Frames-level checks (each rejection reason, resync, Opener fuzzing) are in test_frames.py.
"""
from __future__ import annotations

import base64
import copy
import gc
import hashlib
import logging
import os
import random
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge import channel
from firmware_bridge.channel import REPLY_CACHE, Client, RemoteError, Server
from firmware_bridge.device import Agent, KeyFileError, read_key
from firmware_bridge.frames import (
    DIRECTION_DEVICE_TO_HOST as D2H,
    DIRECTION_HOST_TO_DEVICE as H2D,
    HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    REASONS,
    TAG_SIZE,
    FrameError,
    FrameReader,
    MsgType,
    Opener,
    Sealer,
    derive_hello_key,
    derive_session_keys,
    hello_opener,
    hello_sealer,
)
from firmware_bridge.transfer import put as transfer_put
from firmware_bridge.transport import TcpListener, TransportClosed, connect_tcp, pty_pair

PSK = hashlib.sha256(b"edge_qmul test_bridge_security: the device key").digest()
OTHER_PSK = hashlib.sha256(b"edge_qmul test_bridge_security: another device").digest()
assert len(PSK) == 32 and PSK != OTHER_PSK

REQUEST_TYPES = frozenset({MsgType.PING, MsgType.INFO, MsgType.PUT_BEGIN, MsgType.PUT_CHUNK,
                           MsgType.PUT_END, MsgType.GET, MsgType.FORGET, MsgType.JOB_STATUS,
                           MsgType.JOB_RESULT, MsgType.COMMIT, MsgType.ROLLBACK, MsgType.BENCH})
POLL_BOUND_S = 2.0  # one Server.poll(0.02) must return well within this
WAIT_S = 10.0       # how long the host waits for an answer that must come


# ------------------------------------------------------------------------------- harness

class Link:
    """A device (Server + Agent on ``state``) on one end of a real transport, polled in a thread;
    the test holds the other end (``host``) raw.

    The poll loop records how long each ``Server.poll`` took and any exception that escaped it
    (which must never happen): ``errors``, ``max_poll_s``, ``polls``.
    """

    def __init__(self, kind: str, state: Path, psk: bytes = PSK) -> None:
        self.agent = Agent(state)
        if kind == "pty":
            device_end, self.host = pty_pair()
        elif kind == "tcp":
            with TcpListener("127.0.0.1", 0) as listener:
                self.host = connect_tcp(*listener.address)
                device_end = listener.accept(timeout=5)
        else:
            raise ValueError(kind)
        self.device_end = device_end
        self.server = Server(device_end, psk, self.agent.handle)
        self.errors: list[BaseException] = []
        self.max_poll_s = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-poll", daemon=True)
        self._thread.start()
        self.reader = FrameReader(1 << 17)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.server.poll(0.02)
            except TransportClosed:
                return
            except BaseException as e:  # noqa: BLE001 - recorded: poll must never raise
                self.errors.append(e)
                return
            finally:
                self.max_poll_s = max(self.max_poll_s, time.monotonic() - t0)
                self.polls += 1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.host.close()
        self.device_end.close()

    def send(self, wire: bytes) -> None:
        self.host.write(wire)

    def collect(self, opener: Opener, done, timeout: float = WAIT_S):
        """Read device frames until ``done(frame)``; returns (that frame, everything before it).

        Everything before it is a list of ``Frame`` (opened with ``opener``) or raw chunks that
        did not open (a HELLO_ACK under the hello key, garbage): a silent device sends neither.
        """
        extras: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.alive or not self.errors):
            data = self.host.read(1 << 16, timeout=0.05)
            for chunk in self.reader.feed(data) if data else []:
                try:
                    frame = opener.open(chunk)
                except FrameError:
                    extras.append(chunk)
                    continue
                if done(frame):
                    return frame, extras
                extras.append(frame)
        raise AssertionError(f"no answer (device errors: {self.errors!r}; "
                             f"alive: {self.alive}; before: {extras!r})")

    def handshake(self, mtu: int = 4096, nonce: bytes | None = None,
                  allow_extras: bool = False) -> "HostSession":
        nonce = os.urandom(16) if nonce is None else nonce
        hello = hello_sealer(PSK, H2D, 4096).seal(MsgType.HELLO, {"nonce": nonce, "mtu": mtu,
                                                                  "version": 1})
        self.send(hello)
        ack, extras = self.collect(
            FreshHelloOpener(),
            lambda f: f.type == MsgType.HELLO_ACK and f.payload.get("host_nonce") == nonce)
        # (extras: only HELLO_ACKs of other HELLOs, when the test sent some)
        assert allow_extras or not extras, extras
        body = ack.payload
        keys = derive_session_keys(PSK, nonce, body["nonce"], body["session_id"])
        return HostSession(self, body["session_id"], keys, body["mtu"], hello, nonce, body["nonce"])


class FreshHelloOpener:
    """Opens every HELLO_ACK with a new hello opener: each ACK is sealed by its own hello sealer,
    which starts at a random counter, so ACKs of different HELLOs come in no counter order."""

    def open(self, chunk: bytes):
        return hello_opener(PSK, D2H, 4096).open(chunk)


class HostSession:
    """The host's side of one session, built from frames.py directly: it knows its session keys,
    so it can seal with the right key, any counter, or a wrong one."""

    def __init__(self, link: Link, sid: int, keys, mtu: int, hello_wire: bytes, host_nonce: bytes,
                 device_nonce: bytes) -> None:
        self.link, self.sid, self.keys, self.mtu = link, sid, keys, mtu
        self.hello_wire, self.host_nonce, self.device_nonce = hello_wire, host_nonce, device_nonce
        # max_frame 64 KiB, above the negotiated MTU, so oversized frames can be sent on purpose.
        self.sealer = Sealer(keys.host_to_device, sid, H2D, 1 << 16)
        self.opener = Opener(keys.device_to_host, sid, D2H, 1 << 16)

    def frame(self, msg_type, body: dict, rid: bytes | None = None) -> tuple[bytes, bytes]:
        rid = os.urandom(16) if rid is None else rid
        return rid, self.sealer.seal(msg_type, {"rid": rid, "body": body})

    def wait_for(self, rid: bytes, timeout: float = WAIT_S):
        return self.link.collect(self.opener, lambda f: f.payload.get("rid") == rid, timeout)

    def request(self, msg_type, body: dict | None = None):
        """One request; asserts nothing else arrived before its answer; returns the answer frame."""
        rid, wire = self.frame(msg_type, body or {})
        self.link.send(wire)
        answer, extras = self.wait_for(rid)
        assert not extras, extras
        return answer

    def sync(self) -> list:
        """PING (after a 0x00 that ends any unterminated run) and wait for its REPLY: everything
        sent before has then been processed, and what the device sent for it is returned."""
        rid, wire = self.frame(MsgType.PING, {})
        self.link.send(b"\x00" + wire)
        answer, extras = self.wait_for(rid)
        assert answer.type == MsgType.REPLY and "time" in answer.payload["body"]
        return extras


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and every directory, as a marker)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def wait_until(cond, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the device")
        time.sleep(0.002)


def reseal_raw(wire: bytes, edit) -> bytes:
    """Decode a wire frame, apply ``edit(bytearray)`` to the raw header + ciphertext + tag, encode."""
    raw = bytearray(cobs.decode(wire[:-1]))
    edit(raw)
    return cobs.encode(bytes(raw)) + b"\x00"


def flip(pos: int, mask: int = 0x01):
    def edit(raw: bytearray) -> None:
        raw[pos] ^= mask
    return edit


def cut(n: int):
    def edit(raw: bytearray) -> None:
        del raw[-n:]
    return edit


@pytest.fixture
def link_factory(tmp_path):
    links: list[Link] = []

    def make(kind: str = "pty", name: str = "state") -> Link:
        link = Link(kind, tmp_path / name)
        links.append(link)
        return link
    yield make
    for link in links:
        link.close()


# -------------------------------------------------------------- 1. bad frames: dropped, silent

# Each case: (name, build(session, link) -> wire, expected reason). The wire carries a PUT_CHUNK
# that *would* change the state directory (it appends the rest of a half-uploaded file) if acted on.

def _pending_chunk(s: HostSession):
    return {"sha256": s.upload_sha, "offset": s.upload_offset, "data": s.upload_rest}


def _wrong_key(s, link):
    return Sealer(OTHER_PSK, s.sid, H2D, 1 << 16, start_counter=s.sealer.counter + 1).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _wrong_psk_same_nonces(s, link):
    keys = derive_session_keys(OTHER_PSK, s.host_nonce, s.device_nonce, s.sid)
    return Sealer(keys.host_to_device, s.sid, H2D, 1 << 16, start_counter=s.sealer.counter + 1).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _wrong_psk_hello(s, link):
    return hello_sealer(OTHER_PSK, H2D, 4096).seal(MsgType.HELLO, {"nonce": os.urandom(16),
                                                                   "mtu": 4096, "version": 1})


def _changed(pos_of):
    def build(s, link):
        wire = s.frame(MsgType.PUT_CHUNK, _pending_chunk(s))[1]
        raw_len = len(cobs.decode(wire[:-1]))
        return reseal_raw(wire, flip(pos_of(raw_len)))
    return build


def _changed_type(s, link):
    wire = s.frame(MsgType.PUT_CHUNK, _pending_chunk(s))[1]
    return reseal_raw(wire, lambda raw: raw.__setitem__(1, int(MsgType.PUT_END)))


def _changed_sid(s, link):
    wire = s.frame(MsgType.PUT_CHUNK, _pending_chunk(s))[1]
    return reseal_raw(wire, flip(4))


def _replayed_last(s, link):
    return s.last_accepted


def _replayed_first(s, link):
    return s.first_accepted


def _older_counter(s, link):
    return Sealer(s.keys.host_to_device, s.sid, H2D, 1 << 16, start_counter=1).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _equal_counter(s, link):
    return Sealer(s.keys.host_to_device, s.sid, H2D, 1 << 16, start_counter=s.sealer.counter).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _cut_tag(n):
    def build(s, link):
        return reseal_raw(s.frame(MsgType.PUT_CHUNK, _pending_chunk(s))[1], cut(n))
    return build


def _other_session_keys(s, link):
    # Keys of another session (other nonces) under the current session id and a fresh counter.
    keys = derive_session_keys(PSK, os.urandom(16), os.urandom(16), s.sid)
    return Sealer(keys.host_to_device, s.sid, H2D, 1 << 16, start_counter=s.sealer.counter + 1).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _previous_session(s, link):
    # A frame sealed in the session before this one (its id and keys), never sent then.
    return s.previous_session_frame


def _reflected(s, link):
    # Sealed under the device->host key of this session: a frame reflected back to the device.
    return Sealer(s.keys.device_to_host, s.sid, D2H, 1 << 16, start_counter=s.sealer.counter + 1).seal(
        MsgType.PUT_CHUNK, {"rid": os.urandom(16), "body": _pending_chunk(s)})


def _replayed_hello(s, link):
    # The HELLO that opened this very session, sent again: must not open (replace) a session.
    return s.hello_wire


def _replayed_old_hello(s, link):
    # The HELLO of the session before: must not open a session either.
    return s.previous_hello


BAD_FRAMES = [
    ("wrong_key", _wrong_key, "auth"),
    ("wrong_psk_same_nonces", _wrong_psk_same_nonces, "auth"),
    ("wrong_psk_hello", _wrong_psk_hello, "auth"),
    ("changed_payload_byte", _changed(lambda n: HEADER_SIZE + 5), "auth"),
    ("changed_tag_byte", _changed(lambda n: n - 1), "auth"),
    ("changed_flags", _changed(lambda n: 2), "auth"),
    ("changed_counter", _changed(lambda n: 8), "auth"),
    ("changed_type", _changed_type, "auth"),
    ("changed_session_id", _changed_sid, "session"),
    ("replayed_last", _replayed_last, "replay"),
    ("replayed_first", _replayed_first, "replay"),
    ("older_counter", _older_counter, "replay"),
    ("equal_counter", _equal_counter, "replay"),
    ("cut_tag_1", _cut_tag(1), "auth"),
    ("cut_tag_8", _cut_tag(8), "auth"),
    ("cut_tag_16", _cut_tag(16), "auth"),
    ("other_session_keys", _other_session_keys, "auth"),
    ("previous_session", _previous_session, "session"),
    ("reflected", _reflected, "auth"),
    ("replayed_hello", _replayed_hello, "replay"),
    ("replayed_old_hello", _replayed_old_hello, "replay"),
]


def _session_with_pending_upload(link: Link) -> HostSession:
    """A session (after an earlier one) with a 3000-byte table half uploaded."""
    old = link.handshake()
    old.request(MsgType.PING)
    previous_session_frame = old.frame(MsgType.PUT_CHUNK, {"sha256": "0" * 64, "offset": 0,
                                                           "data": b"x"})[1]
    s = link.handshake()
    s.previous_session_frame, s.previous_hello = previous_session_frame, old.hello_wire
    blob = os.urandom(3000)
    s.upload_blob, s.upload_sha = blob, hashlib.sha256(blob).hexdigest()
    begin = s.request(MsgType.PUT_BEGIN, {"kind": "table", "size": len(blob), "sha256": s.upload_sha})
    assert begin.type == MsgType.REPLY and begin.payload["body"]["offset"] == 0
    rid, s.first_accepted = s.frame(MsgType.PUT_CHUNK, {"sha256": s.upload_sha, "offset": 0,
                                                        "data": blob[:1000]})
    link.send(s.first_accepted)
    assert s.wait_for(rid)[0].payload["body"]["offset"] == 1000
    s.upload_offset, s.upload_rest = 1000, blob[1000:]
    rid, s.last_accepted = s.frame(MsgType.INFO, {})
    link.send(s.last_accepted)
    assert s.wait_for(rid)[0].type == MsgType.REPLY
    return s


def _device_state(link: Link, s: HostSession) -> dict:
    server = link.server
    return {
        "files": tree_digest(link.agent.state),
        "jobs": copy.deepcopy(link.agent.jobs),
        "session": server.session,
        "session_id": server.session.session_id,
        "highest": server.session.opener.highest,
        "accepted": server.session.opener.accepted,
        "handled": server.stats["handled"],
        "replayed_replies": server.stats["replayed_replies"],
        "replies": list(server.replies),
    }


def _check_bad_frames(link: Link, cases) -> None:
    s = _session_with_pending_upload(link)
    server = link.server
    for name, build, reason in cases:
        wire = build(s, link)
        before = _device_state(link, s)
        rejected_before = dict(server.stats["rejected"])
        frames_before = server.stats["frames"]
        link.send(wire)
        wait_until(lambda: server.stats["frames"] == frames_before + 1)
        after = _device_state(link, s)
        assert after == before, f"{name}: the device changed state"
        assert after["session"] is before["session"], f"{name}: the session was replaced"
        rejected = dict(server.stats["rejected"])
        assert rejected == {**rejected_before, reason: rejected_before.get(reason, 0) + 1}, \
            f"{name}: rejected {rejected_before} -> {rejected}, expected one more {reason!r}"
        assert s.sync() == [], f"{name}: the device answered a bad frame"
    # Everything was dropped: the same upload, correctly sealed, still works in the same session
    # (and does change the state, so the bad frames' payload would have mattered).
    before = tree_digest(link.agent.state)
    reply = s.request(MsgType.PUT_CHUNK, _pending_chunk(s))
    assert reply.type == MsgType.REPLY and reply.payload["body"]["offset"] == 3000
    end = s.request(MsgType.PUT_END, {"kind": "table", "sha256": s.upload_sha})
    assert end.type == MsgType.REPLY, end.payload
    stored = link.agent.state / end.payload["body"]["path"]
    assert stored.read_bytes() == s.upload_blob and tree_digest(link.agent.state) != before
    assert link.errors == [] and link.alive


@pytest.mark.parametrize("name,build,reason", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_is_dropped_counted_silent_and_harmless(link_factory, name, build, reason):
    _check_bad_frames(link_factory("pty"), [(name, build, reason)])


def test_all_bad_frames_in_one_session_over_tcp(link_factory):
    _check_bad_frames(link_factory("tcp"), BAD_FRAMES)


def test_garbage_between_frames_is_dropped_and_counted(link_factory):
    link = link_factory("tcp")
    s = link.handshake()
    server = link.server
    base = sum(server.stats["rejected"].values())
    files = tree_digest(link.agent.state)
    # garbage chunks (COBS that decodes short, a bad version, an unknown type), each delimited
    junk = [b"\x01\x02\x03\x00", cobs.encode(b"\x09" * 40) + b"\x00",
            cobs.encode(HEADER.pack(PROTOCOL_VERSION, 99, 0, s.sid, 7) + b"\x05" * TAG_SIZE) + b"\x00",
            cobs.encode(HEADER.pack(PROTOCOL_VERSION, int(MsgType.PING), 0, s.sid, 2**40)
                        + os.urandom(40)) + b"\x00"]
    link.send(b"".join(junk))
    assert s.sync() == []
    assert sum(server.stats["rejected"].values()) == base + len(junk)
    assert server.stats["rejected"]["malformed"] >= 3 and server.stats["rejected"]["auth"] >= 1
    assert tree_digest(link.agent.state) == files


# ------------------------------------------------------------------- 2. fuzzing the device

SHA_POOL = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
BODY_KEYS = ["kind", "sha256", "size", "offset", "data", "name", "length", "job_id", "selector",
             "method", "params", "table", "batch", "activate", "role", "owner", "retain_max"]
SPECIAL = ["table", "model", "samples", "current", "models/x.tflite", "jobs/none.json", "../etc",
           "oeu", "qmul", {"owner": "alice"}, {"label": 3}, {"ids": ["a"]}, 0, 1, 8, -1, 2**31]

_ints = st.integers(-(2**63), 2**64 - 1)


def _seeded_bytes(min_size: int, max_size: int):
    return st.tuples(st.integers(0, 2**32), st.integers(min_size, max_size)).map(
        lambda t: random.Random(t[0]).randbytes(t[1]))


_leaf = st.one_of(st.none(), st.booleans(), _ints, st.floats(), st.binary(max_size=48),
                  st.text(max_size=12))
# one level of nesting (a recursive strategy makes hypothesis ~10x slower per frame)
_values = _leaf | st.lists(_leaf, max_size=4) | st.dictionaries(st.text(max_size=6), _leaf, max_size=3)
_bodies = st.dictionaries(st.sampled_from(BODY_KEYS) | st.text(max_size=6),
                          _values | st.sampled_from(SHA_POOL + SPECIAL), max_size=6)
_payloads = st.dictionaries(st.sampled_from(["rid", "body"]) | st.text(max_size=8), _values,
                            max_size=5)
_types = st.sampled_from(list(MsgType))
_spec = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    # long runs are drawn as (seed, size): hypothesis draws a byte at a time, which is slow
    st.tuples(st.just("bytes"), _seeded_bytes(300, 4000)),  # over the MTU
    st.tuples(st.just("bytes"), _seeded_bytes(2100, 5000).map(  # no 0x00 at all: over the
        lambda b: b.replace(b"\x00", b"\x01"))),              # reader's limit
    st.tuples(st.just("big"), _types, st.integers(900, 1900)),  # sealed right, over the MTU
    st.tuples(st.just("forged"), _types, _ints.map(lambda c: c % 2**64), st.binary(max_size=200)),
    st.tuples(st.just("payload"), _types, _payloads),
    st.tuples(st.just("request"), _types, _bodies),
    st.tuples(st.just("request"), st.sampled_from(sorted(REQUEST_TYPES)), _bodies),
    st.tuples(st.just("mutated"), _types, _bodies,
              st.lists(st.integers(0, 2**20), min_size=1, max_size=4)),
    st.tuples(st.just("cut"), _types, _bodies, st.integers(1, 40)),
    st.tuples(st.just("replay"), st.integers(0, 2**20)),
    st.tuples(st.just("retry"), st.integers(0, 2**20)),
)


def _decodes_to(chunk: bytes, raw: bytes) -> bool:
    try:
        return cobs.decode(chunk) == raw
    except cobs.DecodeError:
        return False


class Fuzzer:
    """Sends fuzz specs to a device, then checks what came back.

    Each frame is preceded by 0x00, so whatever a mangled frame does to the stream (eat its own
    delimiter, run over the MTU), the next frame is read on its own; so the expected answers are
    exact: a well-formed request of a request type gets one REPLY or ERROR, a well-formed frame
    of another type one ERROR, anything else (garbage, forged, mutated, cut, replayed, badly
    shaped payload, over the MTU) nothing.
    """

    def __init__(self, link: Link, s: HostSession) -> None:
        self.link, self.s = link, s
        self.sent = 0
        self.accepted_wires: list[bytes] = []   # frames the device accepted (for replays)
        self.requests: list[tuple[bytes, MsgType, dict]] = []  # (rid, type, body) answered
        self.first_answer: dict[bytes, object] = {}
        self.rid_seq = 0
        self.codes: dict[str, int] = {}
        self.replies = 0
        self.equivalent = 0

    def _rid(self) -> bytes:
        self.rid_seq += 1
        return struct.pack(">QQ", 0xF022F022F022F022, self.rid_seq)

    def _seal(self, msg_type, payload: dict) -> bytes | None:
        try:
            return self.s.sealer.seal(msg_type, payload)
        except (FrameError, ValueError, TypeError, OverflowError):
            return None  # not encodable (or over 64 KiB): nothing to send

    def run(self, specs) -> None:
        expect: dict[bytes, str] = {}   # rid -> "reply_or_error" | "error" | "silent"
        retry_of: dict[bytes, tuple] = {}
        wires = []
        for spec in specs:
            kind = spec[0]
            if kind == "bytes":
                wire = spec[1]
            elif kind == "forged":  # the current session id, a high counter, a made-up tag
                wire = cobs.encode(HEADER.pack(PROTOCOL_VERSION, int(spec[1]), 0, self.s.sid, spec[2])
                                   + spec[3] + os.urandom(TAG_SIZE)) + b"\x00"
            elif kind == "payload":
                payload = dict(spec[2])
                wire = self._seal(spec[1], payload)
                if wire is None:
                    continue
                rid, body = payload.get("rid"), payload.get("body")
                well_formed = isinstance(rid, bytes) and len(rid) == 16 and isinstance(body, dict)
                if isinstance(rid, bytes):
                    expect.setdefault(rid, "silent")
                if well_formed and len(wire) <= self.s.mtu:
                    # a plain request after all (hypothesis does draw the keys "rid" and "body");
                    # a rid seen before is answered from the reply cache, whatever the type
                    seen = rid in self.first_answer or expect.get(rid, "silent") != "silent"
                    expect[rid] = ("reply_or_error" if spec[1] in REQUEST_TYPES or seen
                                   else "error")
                    self.accepted_wires.append(wire)
            elif kind in ("request", "mutated", "cut", "big"):
                rid = self._rid()
                if kind == "big":
                    kind, spec = "request", (kind, spec[1], {"data": b"\x01" * spec[2]})
                wire = self._seal(spec[1], {"rid": rid, "body": spec[2]})
                if wire is None:
                    continue
                answered = "reply_or_error" if spec[1] in REQUEST_TYPES else "error"
                fits = len(wire) <= self.s.mtu
                if kind == "request":
                    expect[rid] = answered if fits else "silent"
                    if fits:
                        self.accepted_wires.append(wire)
                        self.requests.append((rid, spec[1], spec[2]))
                else:
                    raw = cobs.decode(wire[:-1])
                    if kind == "mutated":  # bit flips anywhere, the delimiter included
                        buf = bytearray(wire)
                        for bit in spec[3]:
                            buf[(bit // 8) % len(buf)] ^= 1 << (bit % 8)
                        wire = bytes(buf)
                    else:
                        wire = wire[:-1 - min(spec[3], len(wire) - 2)] + b"\x00"
                    expect[rid] = "silent"
                    if fits and any(_decodes_to(c, raw) for c in wire.split(b"\x00")):
                        # The damage left another COBS encoding of the very same frame (e.g. the
                        # delimiter after a final 0xFF block turned into 0x01, an empty last
                        # block): the device rightly accepts it, as it would the original.
                        expect[rid] = answered
                        self.equivalent += 1
            elif kind == "replay":
                if not self.accepted_wires:
                    continue
                wire = self.accepted_wires[spec[1] % len(self.accepted_wires)]
            elif kind == "retry":  # a new frame with an earlier request's rid: the stored answer
                if not self.requests:
                    continue
                # among the last 100 requests, which are all still in the reply cache
                recent = self.requests[-100:]
                rid, msg_type, body = recent[spec[1] % len(recent)]
                wire = self._seal(msg_type, {"rid": rid, "body": body})
                if wire is None or len(wire) > self.s.mtu:
                    continue
                retry_of[rid] = (msg_type, body)
                expect[rid] = "reply_or_error" if msg_type in REQUEST_TYPES else "error"
            else:
                raise AssertionError(kind)
            wires.append(b"\x00" + wire)
        counts: dict[bytes, int] = {}
        for wire in wires:
            self.link.send(wire)
            self.sent += 1
        answers = self.s.sync()
        for answer in answers:
            assert not isinstance(answer, bytes), f"an answer that does not open: {answer!r}"
            assert answer.type in (MsgType.REPLY, MsgType.ERROR), answer
            rid = answer.payload.get("rid")
            assert rid in expect, f"an answer to nothing expected: {answer}"
            counts[rid] = counts.get(rid, 0) + 1
            want = expect[rid]
            assert want != "silent", f"a frame that must be dropped was answered: {answer}"
            if want == "error":
                assert answer.type == MsgType.ERROR and answer.payload["code"] == "bad_request", answer
            if answer.type == MsgType.ERROR:
                code = str(answer.payload.get("code"))
                self.codes[code] = self.codes.get(code, 0) + 1
            else:
                self.replies += 1
            first = self.first_answer.setdefault(rid, answer)
            if rid in retry_of and first is not answer:
                # a retry is answered from the reply cache: the very same answer again
                assert (first.type, first.payload) == (answer.type, answer.payload), \
                    (retry_of[rid], first, answer)
        for rid, want in expect.items():
            if want != "silent":
                assert counts.get(rid, 0) >= 1, f"request {rid.hex()} ({want}) got no answer"
        # bounded: the reader holds less than one frame, the cache at most REPLY_CACHE replies
        server = self.link.server
        assert server.reader.buffered < server.reader.max_frame
        assert len(server.replies) <= REPLY_CACHE
        assert set(server.stats["rejected"]) <= set(REASONS)
        assert self.link.errors == [] and self.link.alive
        assert self.link.max_poll_s < POLL_BOUND_S, self.link.max_poll_s


@pytest.mark.parametrize("msg_type,body,code", [
    (MsgType.JOB_STATUS, {"job_id": ["a", "list"]}, "not_found"),
    (MsgType.JOB_RESULT, {"job_id": {"a": 1}}, "not_found"),
    (MsgType.COMMIT, {"job_id": b"bytes"}, "not_found"),
    (MsgType.ROLLBACK, {"job_id": None}, "not_found"),
    (MsgType.FORGET, {"selector": {"owner": "a"}, "method": ["qmul"]}, "bad_request"),
    (MsgType.FORGET, {"selector": {"owner": "a"}, "method": {"x": 1}}, "bad_request"),
])
def test_badly_typed_fields_are_bad_requests_not_internal_errors(link_factory, caplog, msg_type,
                                                                 body, code):
    caplog.set_level(logging.ERROR)
    link = link_factory("pty")
    s = link.handshake()
    answer = s.request(msg_type, body)
    assert answer.type == MsgType.ERROR and answer.payload["code"] == code, answer.payload
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback logged


def _final_ping(link: Link) -> None:
    """A real Client on the same line: a new HELLO, then a PING, must work."""
    link.reader = FrameReader(1 << 17)
    client = Client(link.host, PSK, timeout=2.0, retries=3)
    assert "time" in client.request(MsgType.PING)
    assert link.errors == [] and link.alive


def test_fuzz_device_with_random_mutated_and_sealed_frames(link_factory, caplog):
    caplog.set_level(logging.CRITICAL)  # handler failures are logged with tracebacks; not kept
    link = link_factory("pty")
    s = link.handshake(mtu=1024)
    fuzzer = Fuzzer(link, s)

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_spec, min_size=40, max_size=60))
    def fuzz(specs):
        fuzzer.run(specs)

    while fuzzer.sent < 10_000:
        fuzz()
    stats = link.server.stats
    print(f"\nfuzz: {fuzzer.sent} frames, {stats['frames']} chunks, rejected {stats['rejected']}, "
          f"handled {stats['handled']}, replayed replies {stats['replayed_replies']}, "
          f"{fuzzer.replies} REPLY, ERROR codes {fuzzer.codes}, max poll {link.max_poll_s:.3f} s")
    assert fuzzer.sent >= 10_000
    assert sum(stats["rejected"].values()) > 5000  # most of it really was rejected ...
    assert stats["handled"] > 1000 and stats["replayed_replies"] > 10  # ... and handlers ran
    assert all(stats["rejected"].get(r) for r in ("malformed", "too_large", "auth", "replay"))
    _final_ping(link)


def _rng_spec(rng: random.Random):
    """The same kinds of frames as ``_spec``, drawn from a seeded Random (no hypothesis)."""
    def value(depth=0):
        r = rng.random()
        if r < 0.2 or depth > 1:
            return rng.choice([None, True, rng.getrandbits(64), rng.random(),
                               rng.randbytes(rng.randrange(48)), "t" * rng.randrange(12)]
                              + SHA_POOL + SPECIAL)
        if r < 0.5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(BODY_KEYS): value(depth + 1) for _ in range(rng.randrange(4))}
    body = {rng.choice(BODY_KEYS): value() for _ in range(rng.randrange(6))}
    t = rng.choice(list(MsgType))
    return rng.choice([
        ("bytes", rng.randbytes(rng.randrange(300))),
        ("bytes", rng.randbytes(rng.randrange(1500, 4000))),
        ("bytes", rng.randbytes(rng.randrange(2100, 5000)).replace(b"\x00", b"\x01")),
        ("big", t, rng.randrange(900, 1900)),
        ("forged", t, rng.getrandbits(64), rng.randbytes(rng.randrange(200))),
        ("payload", t, {rng.choice(["rid", "body", "x"]): value() for _ in range(3)}),
        ("request", t, body),
        ("request", rng.choice(sorted(REQUEST_TYPES)), body),
        ("mutated", t, body, [rng.getrandbits(20) for _ in range(rng.randrange(1, 4))]),
        ("cut", t, body, rng.randrange(1, 40)),
        ("replay", rng.getrandbits(20)),
        ("retry", rng.getrandbits(20)),
    ])


def test_fuzz_memory_stays_bounded(link_factory, caplog):
    """After a 1,500-frame warm-up (which fills the reply cache), 1,000 fuzz frames and then 2,000
    more: what the bridge and the agent hold does not grow from the first mark to the second (the
    cache only replaces entries), and the whole process barely does."""
    caplog.set_level(logging.CRITICAL)
    link = link_factory("tcp")
    s = link.handshake(mtu=1024)
    fuzzer = Fuzzer(link, s)
    rng = random.Random(20240607)

    def rounds(n: int) -> None:
        for _ in range(n):
            fuzzer.run([_rng_spec(rng) for _ in range(50)])
            # the test's own records stop growing
            del fuzzer.accepted_wires[:-200], fuzzer.requests[:-200]
            fuzzer.first_answer.clear()

    rounds(30)
    assert len(link.server.replies) == REPLY_CACHE  # warm: the cache is full
    ours = [tracemalloc.Filter(True, "*firmware_bridge*"), tracemalloc.Filter(True, "*edge_qmul*")]
    tracemalloc.start()
    try:
        rounds(20)
        gc.collect()
        first = tracemalloc.take_snapshot()
        rounds(40)
        gc.collect()
        second = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    device_growth = sum(d.size_diff for d in second.filter_traces(ours).compare_to(
        first.filter_traces(ours), "filename"))
    total_growth = sum(d.size_diff for d in second.compare_to(first, "filename"))
    print(f"\nmemory growth over 2000 frames: bridge+agent {device_growth} B, process {total_growth} B")
    assert device_growth < 64 * 1024
    assert total_growth < 1024 * 1024
    assert link.server.reader.buffered < link.server.reader.max_frame
    assert len(link.server.replies) <= REPLY_CACHE
    _final_ping(link)


_hello_values = _values | st.binary(min_size=16, max_size=16) | st.sampled_from(
    [float("inf"), float("-inf"), float("nan"), 2**63, 2**64 - 1, -(2**63), 10**18, 2**40, 1e300,
     "4096", b"4096", [1] * 16, True])


def test_fuzz_hello_payloads_sealed_with_the_right_key(link_factory):
    """HELLOs that authenticate (right pre-shared key) but carry any payload: the device either
    opens a session with a sane MTU or drops the frame as malformed; it never crashes, and a proper
    handshake afterwards works."""
    link = link_factory("pty")

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payload=st.dictionaries(st.sampled_from(["nonce", "mtu", "version"]) | st.text(max_size=6),
                                   _hello_values, max_size=4))
    def fuzz(payload):
        link.send(hello_sealer(PSK, H2D, 4096).seal(MsgType.HELLO, payload))
        s = link.handshake(mtu=2048, allow_extras=True)
        assert s.request(MsgType.PING).type == MsgType.REPLY
        assert link.errors == [], link.errors
        assert 256 <= link.server.session.mtu <= 2048
        assert 256 <= link.server.reader.max_frame <= 2 * 16384

    fuzz()
    assert link.errors == [] and link.alive


def test_client_handshake_survives_a_stale_hello_ack_with_a_higher_counter(link_factory, monkeypatch):
    """A late HELLO_ACK of an earlier HELLO, sealed at a higher (random) counter, arrives first: the
    Client must still accept its own ACK (it used to drop it as a replay and need another try)."""
    from firmware_bridge import frames
    counters = iter(range(2**62, 0, -(2**40)))  # every hello sealer starts lower than the last
    monkeypatch.setattr(frames.secrets, "randbits", lambda k: next(counters))
    link = link_factory("pty")
    first = link.server.session
    link.send(hello_sealer(PSK, H2D, 4096).seal(MsgType.HELLO, {"nonce": os.urandom(16), "mtu": 4096}))
    wait_until(lambda: link.server.session is not first)  # its ACK waits unread on the host side
    client = Client(link.host, PSK, timeout=2.0, retries=1)
    client.connect()
    assert client.session.session_id == link.server.session.session_id
    assert "time" in client.request(MsgType.PING)


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
            assert form not in message


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
