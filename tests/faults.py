"""A fault-injecting transport for tests: drops, duplicates, truncates and bit-flips whole frames.

`FaultyTransport` wraps any transport and damages what is written through it, reproducibly for a
seed; `FaultStats` counts what it did. It is one more implementation of the transport interface,
used to show that the channel survives a lossy line (STYLE.md point 4).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from firmware_bridge.transport import Transport, TransportClosed
from firmware_bridge.transport.base import DEFAULT, UseDefault

__all__ = ["FaultStats", "FaultyTransport"]


@dataclass
class FaultStats:
    """What a FaultyTransport did. frames_out = frames_in - dropped + duplicated."""

    frames_in: int = 0        # complete 0x00-terminated frames written to the FaultyTransport
    frames_out: int = 0       # frames passed to the inner transport (a duplicate counts twice)
    dropped: int = 0
    duplicated: int = 0
    truncated: int = 0
    corrupted: int = 0        # frames with at least one flipped bit (counted once per frame)
    bits_flipped: int = 0     # one bit per flipped byte, counted once per frame (not per copy)
    delimiters_flipped: int = 0  # flipped 0x00 terminators (each merges two frames downstream)
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class FaultyTransport(Transport):
    """A transport that damages whole frames on their way out, reproducibly for a seed.

    Written bytes are held until a 0x00 arrives; each 0x00-terminated chunk is one frame. For
    each frame, independently, and in this order:
      1. drop       with probability `drop`: nothing is sent (nothing else is drawn for it);
      2. truncate   with probability `truncate`: keep a random prefix of 0..n-1 of its n bytes
                    before the delimiter and then the delimiter, so the receiver ends that frame
                    early and resynchronises on the next one (a bare delimiter is left alone);
      3. flip       each byte, with probability `flip`, gets one random bit inverted. By default
                    this includes the delimiter, as on a real line: a flipped delimiter merges the
                    frame with the next, and a byte flipped to 0x00 splits it. Pass
                    `flip_delimiters=False` to corrupt only the bytes before the delimiter;
      4. duplicate  with probability `duplicate`: the (possibly damaged) frame is sent twice.
    Reads pass through unchanged; wrap both ends to damage both directions. Bytes after the last
    0x00 wait for the rest of their frame; `pending` counts them and `close()` discards them.

    Each fault draws from its own random.Random seeded with (seed, fault), and every frame draws
    the same numbers for drop, truncate and duplicate whatever happens to it. So the outcome
    depends only on the seed and the sequence of frames, not on how writes were split; raising
    one probability adds faults of that kind without moving the others (except that flips land
    differently once truncation changes a frame's length). `stats` counts everything done.
    """

    def __init__(self, inner: Transport, seed: int, drop: float = 0.0, duplicate: float = 0.0,
                 flip: float = 0.0, truncate: float = 0.0, *, flip_delimiters: bool = True):
        for what, p in (("drop", drop), ("duplicate", duplicate), ("flip", flip),
                        ("truncate", truncate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FaultyTransport: {what} must be a probability in [0, 1], "
                                 f"not {p}")
        self.inner = inner
        self.seed = seed
        self.drop, self.duplicate, self.flip, self.truncate = drop, duplicate, flip, truncate
        self.flip_delimiters = flip_delimiters
        self.name = f"faulty+{inner.name}"
        self.default_mtu = inner.default_mtu
        self.stats = FaultStats()
        self._pending = bytearray()
        self._rng = {k: random.Random(f"{seed}:{k}") for k in ("drop", "truncate", "flip", "dup")}
        # Flipped bytes are found by geometric gaps between them: one log() per flip instead of one
        # random() per byte. P(gap = g) = (1 - p)^g p, the same law as independent per-byte trials.
        self._log_keep = math.log1p(-flip) if 0.0 < flip < 1.0 else None

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        return self.inner.timeout

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise TransportClosed(f"{self.name}: write on a closed transport")
        self._pending += data
        end = self._pending.rfind(0)
        if end < 0:
            return
        chunk, self._pending = bytes(self._pending[:end + 1]), self._pending[end + 1:]
        out = bytearray()
        start = 0
        while start < len(chunk):
            stop = chunk.index(0, start) + 1
            out += self._damage(chunk[start:stop])
            start = stop
        self.stats.bytes_out += len(out)
        if out:
            self.inner.write(bytes(out))

    def _damage(self, frame: bytes) -> bytes:
        s = self.stats
        s.frames_in += 1
        s.bytes_in += len(frame)
        # Every frame draws the same numbers from the drop, truncate and duplicate streams, whatever
        # happens to it, so each decision depends only on the seed and the frame's position.
        body = len(frame) - 1
        drop_u = self._rng["drop"].random()
        trunc_u, cut = self._rng["truncate"].random(), self._rng["truncate"].randrange(max(body, 1))
        dup_u = self._rng["dup"].random()
        if drop_u < self.drop:
            s.dropped += 1
            return b""
        buf = bytearray(frame)
        if trunc_u < self.truncate and body > 0:
            buf = buf[:cut] + b"\x00"
            s.truncated += 1
        flips = self._flip(buf, len(buf) if self.flip_delimiters else len(buf) - 1)
        if flips:
            s.corrupted += 1
        copies = 2 if dup_u < self.duplicate else 1
        s.duplicated += copies - 1
        s.frames_out += copies
        s.bits_flipped += flips
        return bytes(buf) * copies

    def _flip(self, buf: bytearray, n: int) -> int:
        """Invert one random bit in each of buf[:n] with probability `flip`; return how many."""
        if self.flip <= 0.0 or n <= 0:
            return 0
        rng = self._rng["flip"]
        count = 0
        i = -1
        while True:
            if self._log_keep is None:  # flip == 1: every byte
                i += 1
            else:
                i += 1 + int(math.log(1.0 - rng.random()) / self._log_keep)
            if i >= n:
                return count
            if i == len(buf) - 1:
                self.stats.delimiters_flipped += 1
            buf[i] ^= 1 << rng.randrange(8)
            count += 1

    def read(self, max_bytes: int = 65536,
             timeout: float | None | UseDefault = DEFAULT) -> bytes:
        return self.inner.read(max_bytes, timeout)

    def close(self) -> None:
        self._pending.clear()
        self.inner.close()
