"""Bridge security, bad frames (DESIGN.md §6): every kind of forged, replayed, cut or mutated frame
is dropped, counted by reason, never answered and changes no state (files, jobs, session); a stale
HELLO_ACK does not stop a Client's handshake.

Frames-level checks (each rejection reason, resync, Opener fuzzing) are in test_frames.py; the
harness (a real device on a real line) is in bridge_helpers.py.
"""
from __future__ import annotations

import copy
import hashlib
import os

import pytest
from cobs import cobs

from bridge_helpers import (OTHER_PSK, PSK, HostSession, Link, cut, flip, reseal_raw, tree_digest,
                            wait_until)
from bridge_helpers import link_factory  # noqa: F401 - a pytest fixture, used by name
from firmware_bridge import frames
from firmware_bridge.channel import Client
from firmware_bridge.frames import (
    DIRECTION_DEVICE_TO_HOST as D2H,
    DIRECTION_HOST_TO_DEVICE as H2D,
    HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    TAG_SIZE,
    MsgType,
    Sealer,
    derive_session_keys,
    hello_sealer,
)

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


def test_client_handshake_survives_a_stale_hello_ack_with_a_higher_counter(link_factory, monkeypatch):
    """A late HELLO_ACK of an earlier HELLO, sealed at a higher (random) counter, arrives first: the
    Client must still accept its own ACK (it used to drop it as a replay and need another try)."""
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

