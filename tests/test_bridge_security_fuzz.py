"""Bridge security, fuzzing the device (DESIGN.md §6): 10,000+ random, mutated and validly sealed
frames of random types and payloads neither crash, hang nor grow the device, and never earn a REPLY
they should not; authenticated HELLOs with any payload open a sane session or are dropped; badly
typed request fields are bad requests, not internal errors.

The harness (a real device on a real line) is in bridge_helpers.py.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import struct
import tracemalloc

import pytest
from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_helpers import POLL_BOUND_S, PSK, REQUEST_TYPES, SHA_POOL, HostSession, Link
from bridge_helpers import link_factory  # noqa: F401 - a pytest fixture, used by name
from firmware_bridge.channel import REPLY_CACHE, Client
from firmware_bridge.frames import (
    DIRECTION_HOST_TO_DEVICE as H2D,
    HEADER,
    PROTOCOL_VERSION,
    REASONS,
    TAG_SIZE,
    FrameError,
    FrameReader,
    MsgType,
    hello_sealer,
)

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


@pytest.mark.slow
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


@pytest.mark.slow
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
