"""Fuzzing the device at scale (issue 16, slow tier): 1,000,000 frames against a live agent.

The device is the real ``Server`` + ``Agent`` on a real TCP line (bridge_helpers.Link); the test
holds the host's end and its session keys, and sends batches of about 2,000 frames, each frame
after a 0x00 so whatever a damaged frame does to the stream ends there. The mix: random bytes
(short, over the MTU, without a delimiter, a forged header with a made-up tag), sealed frames over
the MTU, sealed frames damaged (bit flips, cut, extended, COBS code bytes changed), valid frames sent out of order and
replayed (old counters, the handshake's HELLO again), frames sealed with a wrong key (another
device's key, the other direction's key, another session id, a reflected device frame), and a few
valid PING / INFO / JOB_STATUS requests.

The test keeps the device's counter window itself (a frame of the session opens only if its
counter is above every counter accepted before), so it knows exactly which frames must be
answered: every reply must answer one of them, once; everything else earns silence. After every
batch: the device thread is alive and raised nothing, no poll took long, its buffers and caches are
within their bounds; at the end the process's RSS grew less than a stated bound after the first
10% of frames, the state directory is byte-for-byte what it was, and a new client's PING works.
A seeded generator per batch (the seed is in every failure message) keeps a finding reproducible;
the fast tier runs a 20,000-frame sample of the same mix.
"""
from __future__ import annotations

import logging
import os
import random
import resource
import time
from collections import Counter, deque

import pytest
from cobs import cobs

from bridge_helpers import OTHER_PSK, POLL_BOUND_S, HostSession, Link, tree_digest
from bridge_helpers import link_factory  # noqa: F401 - a pytest fixture, used by name
from firmware_bridge.channel import HELLO_NONCES, REPLY_CACHE
from firmware_bridge.frames import (
    DIRECTION_DEVICE_TO_HOST as D2H,
    DIRECTION_HOST_TO_DEVICE as H2D,
    HEADER,
    PROTOCOL_VERSION,
    REASONS,
    TAG_SIZE,
    Frame,
    MsgType,
    Sealer,
    derive_session_keys,
    hello_sealer,
)
from test_bridge_security_fuzz import _decodes_to, _final_ping

BATCH = 2000                 # frames per write-and-sync round
BATCH_BOUND_S = 60.0         # a hang bound: one batch (write, device work, sync) far exceeds none
RSS_GROWTH_BOUND = 16 << 20  # bytes the process may grow after the first 10% of the frames
VALID_TYPES = (MsgType.PING, MsgType.INFO, MsgType.JOB_STATUS)  # requests that change nothing
WEIGHTS = {  # kind -> share of the frames (out_of_order counts each frame of its group)
    "random": 10, "no_delimiter": 1, "forged": 6, "bitflip": 18, "truncated": 7, "extended": 7,
    "cobs_damage": 7, "oversized": 2, "out_of_order": 3, "replayed": 8, "replayed_hello": 1, "wrong_key": 7,
    "other_session": 4, "reflected": 4, "valid": 2,
}
KINDS, SHARES = list(WEIGHTS), list(WEIGHTS.values())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class ScaleFuzzer:
    """Builds batches of frames for one session, sends them, and checks every answer."""

    def __init__(self, link: Link, s: HostSession) -> None:
        self.link, self.s = link, s
        self.highest = s.sealer.counter  # the device's window as the test tracks it (0: none yet)
        self.sent: Counter[str] = Counter()
        self.expected = self.replies = self.errors = 0
        self.equivalent: Counter[str] = Counter()
        self.accepted: deque[bytes] = deque(maxlen=512)  # frames the device took (to replay)
        self.rid_seq = 0
        other = derive_session_keys(OTHER_PSK, s.host_nonce, s.device_nonce, s.sid)
        self.wrong_sealers = [
            Sealer(other.host_to_device, s.sid, H2D, 1 << 16),        # another device's key
            Sealer(s.keys.device_to_host, s.sid, H2D, 1 << 16),       # the other direction's key
            Sealer(os.urandom(32), s.sid, H2D, 1 << 16),              # a random key
        ]
        self.other_session = Sealer(s.keys.host_to_device, (s.sid + 1) % 2**32 or 1, H2D, 1 << 16)
        self.reflector = Sealer(s.keys.device_to_host, s.sid, D2H, 1 << 16)  # what the device sends

    # --- building ---
    def _rid(self) -> bytes:
        self.rid_seq += 1
        return b"FZ" + self.rid_seq.to_bytes(14, "big")

    def _body(self, rng: random.Random) -> dict:
        return rng.choice([{}, {"job_id": "f" * rng.randrange(20)}, {"x": rng.randbytes(rng.randrange(64))},
                           {"data": b"\x01" * rng.randrange(300)}])

    def _valid(self, rng: random.Random) -> tuple[bytes, bytes, int]:
        """(rid, wire, counter) of a valid request that changes nothing on the device."""
        rid = self._rid()
        wire = self.s.sealer.seal(rng.choice(VALID_TYPES), {"rid": rid, "body": self._body(rng)})
        return rid, wire, self.s.sealer.counter

    def _take(self, rid: bytes, wire: bytes, counter: int, expect: set) -> None:
        """A validly sealed frame is sent intact: the device answers it iff its counter is new."""
        if counter > self.highest:
            self.highest = counter
            expect.add(rid)
            self.accepted.append(wire)

    def _damage(self, kind: str, wire: bytes, rng: random.Random) -> bytes:
        body = bytearray(wire[:-1])
        if kind == "bitflip":
            for _ in range(rng.randrange(1, 5)):
                i = rng.randrange(len(body) + 1)  # the delimiter too
                if i == len(body):
                    return bytes(body) + bytes([1 << rng.randrange(8)])
                body[i] ^= 1 << rng.randrange(8)
        elif kind == "truncated":
            del body[-rng.randrange(1, len(body)):]
        elif kind == "extended":
            tail = rng.randbytes(rng.randrange(1, 40)).replace(b"\x00", b"\x01")
            at = rng.choice([len(body), rng.randrange(len(body))])
            body[at:at] = tail
        else:  # cobs_damage: a code byte (the first is one, more follow every <= 254 bytes) or a 0x00
            i = 0 if rng.random() < 0.6 else rng.randrange(len(body))
            new = rng.choice([0, 1, 2, 0xFF, rng.randrange(256), max(1, body[i] - 1), min(255, body[i] + 1)])
            body[i] = new if new != body[i] else new ^ 1  # always a change
        return bytes(body) + b"\x00"

    def build(self, rng: random.Random, n: int) -> tuple[list[bytes], set[bytes]]:
        """About ``n`` frames, and the rids the device must answer."""
        units: list[bytes] = []
        expect: set[bytes] = set()
        s = self.s
        while len(units) < n:
            kind = rng.choices(KINDS, SHARES)[0]
            if kind == "random":
                wire = rng.randbytes(rng.choice([rng.randrange(1, 64), rng.randrange(64, 400),
                                                 rng.randrange(1024, 3000)]))
            elif kind == "no_delimiter":  # longer than the reader's limit: dropped as a whole
                wire = rng.randbytes(rng.randrange(2100, 5000)).replace(b"\x00", b"\x01")
            elif kind == "forged":  # this session's id, a counter ahead, a made-up tag
                header = HEADER.pack(PROTOCOL_VERSION, int(rng.choice(list(MsgType))), 0, s.sid,
                                     self.highest + rng.randrange(1, 1 << 20))
                wire = cobs.encode(header + rng.randbytes(rng.randrange(40)) + rng.randbytes(TAG_SIZE)) + b"\x00"
            elif kind in ("bitflip", "truncated", "extended", "cobs_damage"):
                rid, wire, counter = self._valid(rng)
                raw = cobs.decode(wire[:-1])
                wire = self._damage(kind, wire, rng)
                if any(_decodes_to(c, raw) for c in wire.split(b"\x00")):
                    # The damage left another COBS encoding of the same frame (e.g. a trailing
                    # code byte): a valid frame after all, answered as the original would be.
                    self.equivalent[kind] += 1
                    self._take(rid, wire, counter, expect)
            elif kind == "oversized":  # sealed right, but over the MTU (or the reader's limit)
                wire = s.sealer.seal(rng.choice(VALID_TYPES),
                                     {"rid": self._rid(), "body": {"data": rng.randbytes(rng.randrange(1000, 2600))}})
            elif kind == "out_of_order":  # k valid frames sealed in order, sent shuffled
                group = [self._valid(rng) for _ in range(rng.randrange(2, 8))]
                rng.shuffle(group)
                for rid, wire, counter in group:
                    self._take(rid, wire, counter, expect)
                units.extend(b"\x00" + w for _, w, _ in group)
                self.sent[kind] += len(group)
                continue
            elif kind == "replayed":  # a frame the device took before (an old counter)
                if not self.accepted:
                    continue
                wire = rng.choice(self.accepted)
            elif kind == "replayed_hello":  # the handshake's HELLO again: its nonce is known
                wire = s.hello_wire
            elif kind == "wrong_key":
                if rng.random() < 0.15:  # a HELLO under another device's key
                    wire = hello_sealer(OTHER_PSK, H2D, 4096).seal(
                        MsgType.HELLO, {"nonce": rng.randbytes(16), "mtu": 1024, "version": 1})
                else:
                    wire = rng.choice(self.wrong_sealers).seal(
                        rng.choice(VALID_TYPES), {"rid": self._rid(), "body": self._body(rng)})
            elif kind == "other_session":
                wire = self.other_session.seal(rng.choice(VALID_TYPES), {"rid": self._rid(), "body": {}})
            elif kind == "reflected":  # a device-to-host frame sent back to the device
                wire = self.reflector.seal(rng.choice([MsgType.REPLY, MsgType.ERROR, MsgType.PING]),
                                           {"rid": self._rid(), "body": {"time": 1.0}})
            else:  # valid
                rid, wire, counter = self._valid(rng)
                self._take(rid, wire, counter, expect)
            units.append(b"\x00" + wire)
            self.sent[kind] += 1
        return units, expect

    # --- sending and checking ---
    def run_batch(self, seed: int, n: int = BATCH) -> None:
        rng = random.Random(seed)
        t0 = time.monotonic()
        units, expect = self.build(rng, n)
        self.link.send(b"".join(units))
        answers = self.s.sync()  # the PING after the batch: everything before it was processed
        self.highest = self.s.sealer.counter
        where = f"batch seed {seed}"
        answered: set[bytes] = set()
        for a in answers:
            assert isinstance(a, Frame), f"{where}: the device sent something that does not open: {a!r}"
            assert a.type in (MsgType.REPLY, MsgType.ERROR), f"{where}: {a}"
            rid = a.payload.get("rid")
            assert rid in expect, f"{where}: a reply to a frame that must be dropped: {a}"
            assert rid not in answered, f"{where}: answered twice: {a}"
            answered.add(rid)
            if a.type == MsgType.ERROR:
                assert a.payload.get("code") == "not_found", f"{where}: {a}"  # JOB_STATUS of no job
                self.errors += 1
        assert answered == expect, f"{where}: {len(expect - answered)} valid requests not answered"
        self.expected += len(expect)
        self.replies += len(answered)
        server = self.link.server
        assert self.link.errors == [] and self.link.alive, f"{where}: device died: {self.link.errors!r}"
        assert self.link.max_poll_s < POLL_BOUND_S, f"{where}: a poll took {self.link.max_poll_s:.2f} s"
        assert server.reader.buffered < server.reader.max_frame, where
        assert len(server.replies) <= REPLY_CACHE and len(server.hello_nonces) <= HELLO_NONCES, where
        assert server.session.session_id == self.s.sid, f"{where}: the session was replaced"
        assert time.monotonic() - t0 < BATCH_BOUND_S, f"{where}: a batch took over {BATCH_BOUND_S} s"


def fuzz_frames(link_factory, total: int, seed: int) -> dict:  # noqa: F811 - the fixture's value
    """Send ``total`` frames in batches; returns the counts (and prints them)."""
    link = link_factory("tcp")
    state = link.agent.state
    before = tree_digest(state)
    s = link.handshake(mtu=1024)
    fz = ScaleFuzzer(link, s)
    rss = []
    t0 = time.monotonic()
    batch = 0
    while sum(fz.sent.values()) < total:
        fz.run_batch(seed * 1_000_003 + batch, min(BATCH, total - sum(fz.sent.values())))
        batch += 1
        if not rss and sum(fz.sent.values()) >= total // 10:
            rss.append(_rss())
    rss.append(_rss())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = link.server.stats
    frames = sum(fz.sent.values())
    print(f"\nframes fuzz: {frames} frames in {batch} batches, {time.monotonic() - t0:.1f} s; by kind "
          f"{dict(sorted(fz.sent.items()))}\n  device: {stats['frames']} chunks, handled {stats['handled']}, "
          f"rejected {stats['rejected']}\n  replies {fz.replies} (REPLY {fz.replies - fz.errors}, ERROR "
          f"not_found {fz.errors}) to {fz.expected} valid requests (+{batch} sync PINGs), 0 to "
          f"{frames - fz.expected} invalid; damaged frames that were equivalent encodings {dict(fz.equivalent)}\n"
          f"  RSS after 10%: {rss[0] >> 20} MiB, at the end: {rss[-1] >> 20} MiB (growth "
          f"{(rss[-1] - rss[0]) / 2**20:+.1f} MiB, bound {RSS_GROWTH_BOUND >> 20}); peak RSS {peak >> 20} MiB; "
          f"max poll {link.max_poll_s * 1000:.0f} ms")
    assert frames >= total
    assert rss[-1] - rss[0] < RSS_GROWTH_BOUND, (rss, "memory grew")
    assert fz.replies == fz.expected
    assert set(stats["rejected"]) <= set(REASONS)
    assert all(stats["rejected"].get(r) for r in REASONS), stats["rejected"]  # every refusal path ran
    assert tree_digest(state) == before  # valid requests were PING / INFO / JOB_STATUS only
    _final_ping(link)
    assert tree_digest(state) == before
    return {"frames": frames, "by_kind": dict(fz.sent), "replies": fz.replies, "expected": fz.expected}


def test_fuzz_frames_fast_sample(link_factory, caplog):  # noqa: F811
    """20,000 frames of the slow test's mix (every kind), in the fast tier."""
    caplog.set_level(logging.CRITICAL)
    counts = fuzz_frames(link_factory, 20_000, seed=16)
    assert set(counts["by_kind"]) == set(KINDS)
    assert counts["expected"] > 100


@pytest.mark.slow
def test_fuzz_a_million_frames(link_factory, caplog):  # noqa: F811
    """1,000,000 frames against one live agent: 0 crashes, 0 hangs, 0 replies to an invalid
    frame, bounded memory, the state directory unchanged."""
    caplog.set_level(logging.CRITICAL)
    counts = fuzz_frames(link_factory, 1_000_000, seed=1604)
    assert set(counts["by_kind"]) == set(KINDS) and min(counts["by_kind"].values()) > 1000
    assert counts["expected"] > 10_000
