"""Authenticated, encrypted frames for the host <-> device link (DESIGN.md §6).

Wire format
-----------
One frame on the wire is ``COBS(header + ciphertext_with_tag) + b"\\x00"``.

* **COBS, 0x00-delimited.** COBS removes every 0x00 from the frame body, so 0x00 appears only as the
  delimiter. A reader that joins a serial line mid-frame, or loses bytes to line noise, throws away
  at most the damaged frame and is back in sync at the next 0x00 -- no length field has to be
  trusted and no escape state can be lost. The cost is at most one byte per 254.
* **Header** (16 bytes, little endian): ``version u8, type u8, flags u16, session_id u32,
  counter u64``. It is sent in clear, because a receiver must route a frame (HELLO vs session
  frame, which session) before it can pick a key, but it is the AEAD's *associated data*: a
  changed version, type, flag, session id or counter fails the tag exactly like a changed
  payload byte.
* **Payload**: msgpack of a dict, sealed with ChaCha20-Poly1305 (16-byte tag appended).

Keys and nonces
---------------
* :func:`derive_hello_key` -- HKDF-SHA256 over the device's 32-byte pre-shared key. HELLO and
  HELLO_ACK (session id 0) are sealed with it, so a wrong pre-shared key already fails at HELLO
  (reason ``"auth"``) instead of after a handshake.
* :func:`derive_session_keys` -- HKDF-SHA256 over the pre-shared key, salted with both sides'
  16-byte random HELLO nonces, with the session id and a direction tag in ``info``. Each direction
  gets its own 32-byte key: the two sides' counters run independently, and separate keys mean the
  host's frame ``n`` and the device's frame ``n`` can never share a (key, nonce) pair, and a frame
  reflected back to its sender does not authenticate.
* The 12-byte AEAD nonce is ``direction constant (4 bytes) + counter (8 bytes)``. The counter
  only rises within a :class:`Sealer`, so one key never sees the same nonce twice. The direction
  constant also separates the two directions of the (single) hello key.

  The hello key is the same for every connection, so a hello :class:`Sealer` must not start at
  counter 1 each time (that would reuse a nonce across connections and let an eavesdropper forge
  HELLO frames). :func:`hello_sealer` therefore starts at a random 63-bit counter.

Receiving
---------
:class:`Opener` checks, in this order: size, COBS, header length, version, type, session id, tag,
counter (strictly above the highest accepted one, so replays and reordered-old frames are
dropped) and payload decoding; only a frame that passes all of them advances the window. Every
rejection raises :class:`FrameError` with a ``reason`` from :data:`REASONS` and is counted in
:attr:`Opener.stats`; a rejected frame changes nothing else.

Secrets: no object in this module keeps a key in a field that ``repr()`` shows, and no exception
message or log line contains a key (only lengths and reasons).
"""
from __future__ import annotations

import enum
import logging
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
from cobs import cobs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PROTOCOL_VERSION", "MsgType", "Header", "Frame", "FrameError", "REASONS", "SessionKeys",
    "Sealer", "Opener", "FrameReader", "split_frames", "peek_header", "derive_hello_key",
    "derive_session_keys", "hello_sealer", "hello_opener", "DIRECTION_HOST_TO_DEVICE",
    "DIRECTION_DEVICE_TO_HOST", "HEADER_SIZE", "TAG_SIZE", "KEY_SIZE", "NONCE_SIZE",
    "DEFAULT_MAX_FRAME",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<BBHIQ")  # version, type, flags, session_id, counter
HEADER_SIZE = HEADER.size  # 16
TAG_SIZE = 16
KEY_SIZE = 32
NONCE_SIZE = 16  # the HELLO nonces (not the AEAD nonce)
DEFAULT_MAX_FRAME = 65536
MIN_MAX_FRAME = 64  # smallest max_frame that still fits a header, a tag and a small payload

MAX_COUNTER = 2**64 - 1
MAX_SESSION_ID = 2**32 - 1

DIRECTION_HOST_TO_DEVICE = 1
DIRECTION_DEVICE_TO_HOST = 2
_DIRECTION_TAGS = {DIRECTION_HOST_TO_DEVICE: b"host->device", DIRECTION_DEVICE_TO_HOST: b"device->host"}

HELLO_INFO = b"edge-qmul hello v1"
SESSION_INFO = b"edge-qmul session v1"

REASONS = ("malformed", "too_large", "auth", "replay", "session")


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    PING = 3
    PONG = 4
    INFO = 5
    PUT_BEGIN = 6
    PUT_CHUNK = 7
    PUT_END = 8
    GET = 9
    FORGET = 10
    JOB_STATUS = 11
    JOB_RESULT = 12
    COMMIT = 13
    ROLLBACK = 14
    BENCH = 15
    REPLY = 16
    ERROR = 17


_MSG_TYPES = frozenset(int(t) for t in MsgType)


class FrameError(Exception):
    """A frame was rejected (or could not be built). ``reason`` is one of :data:`REASONS`:

    * ``"malformed"`` -- COBS, header, msgpack or payload shape is wrong, wrong version, unknown type
    * ``"too_large"`` -- over the frame limit
    * ``"auth"``      -- the tag does not verify: wrong key, changed byte, cut tag, other session's key
    * ``"replay"``    -- counter not above the highest accepted counter
    * ``"session"``   -- the header names another session id
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown FrameError reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Header(NamedTuple):
    version: int
    type: MsgType
    flags: int
    session_id: int
    counter: int


@dataclass(frozen=True)
class Frame:
    """One accepted frame: the authenticated header fields and the decrypted payload."""

    type: MsgType
    flags: int
    session_id: int
    counter: int
    payload: dict = field(default_factory=dict)


@dataclass(frozen=True, repr=False, eq=False)
class SessionKeys:
    """The two 32-byte session keys, one per direction. ``repr()`` never shows them."""

    host_to_device: bytes
    device_to_host: bytes

    def __repr__(self) -> str:
        return "SessionKeys(host_to_device=<redacted>, device_to_host=<redacted>)"


# --------------------------------------------------------------------------------------- keys

def _check_bytes(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        # The length only: never the value, which may be a secret.
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _check_direction(direction: int) -> None:
    if direction not in _DIRECTION_TAGS:
        raise ValueError(f"direction must be DIRECTION_HOST_TO_DEVICE (1) or "
                         f"DIRECTION_DEVICE_TO_HOST (2), got {direction!r}")


def _check_session_id(session_id: int) -> None:
    if not isinstance(session_id, int) or not 0 <= session_id <= MAX_SESSION_ID:
        raise ValueError(f"session_id must be an integer in [0, 2**32), got {session_id!r}")


def _hkdf(psk: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(psk)


def derive_hello_key(psk: bytes) -> bytes:
    """Key for HELLO / HELLO_ACK frames: HKDF-SHA256(psk, salt=None, info=b"edge-qmul hello v1").

    Sealing HELLO with a key only the pre-shared key yields means a device (or host) with the wrong
    key is told so at the first frame ("auth"), before any session state exists.
    """
    psk = _check_bytes(psk, "pre-shared key", KEY_SIZE)
    return _hkdf(psk, None, HELLO_INFO)


def derive_session_keys(psk: bytes, host_nonce: bytes, device_nonce: bytes,
                        session_id: int) -> SessionKeys:
    """Per-session, per-direction keys.

    HKDF-SHA256 over ``psk`` with ``salt = host_nonce + device_nonce`` (16 random bytes each, so
    every session gets fresh keys even though the pre-shared key never changes) and ``info =
    b"edge-qmul session v1" + session_id (u32 LE) + direction tag``. Two separate keys keep the two
    sides' independent counters from ever colliding under one key.
    """
    psk = _check_bytes(psk, "pre-shared key", KEY_SIZE)
    host_nonce = _check_bytes(host_nonce, "host_nonce", NONCE_SIZE)
    device_nonce = _check_bytes(device_nonce, "device_nonce", NONCE_SIZE)
    _check_session_id(session_id)
    salt = host_nonce + device_nonce
    sid = session_id.to_bytes(4, "little")
    return SessionKeys(
        host_to_device=_hkdf(psk, salt, SESSION_INFO + sid + _DIRECTION_TAGS[DIRECTION_HOST_TO_DEVICE]),
        device_to_host=_hkdf(psk, salt, SESSION_INFO + sid + _DIRECTION_TAGS[DIRECTION_DEVICE_TO_HOST]),
    )


def _aead_nonce(direction: int, counter: int) -> bytes:
    return direction.to_bytes(4, "little") + counter.to_bytes(8, "little")


def _check_max_frame(max_frame: int) -> int:
    if not isinstance(max_frame, int) or max_frame < MIN_MAX_FRAME:
        raise ValueError(f"max_frame must be an integer >= {MIN_MAX_FRAME}, got {max_frame!r}")
    return max_frame


def _unpack_payload(data: bytes, max_frame: int) -> Any:
    # Limits: nothing in a frame of max_frame bytes can be longer than max_frame; they stop a
    # forged-length header inside msgpack from making the decoder allocate more than that.
    return msgpack.unpackb(
        data, raw=False, use_list=True,
        max_bin_len=max_frame, max_str_len=max_frame, max_array_len=max_frame,
        max_map_len=max_frame, max_ext_len=max_frame,
    )


# --------------------------------------------------------------------------------- sealing

class Sealer:
    """Builds the wire frames of one direction of one session.

    ``seal`` returns the complete wire bytes (delimiter included). The counter starts at
    ``start_counter`` (1 unless given; see :func:`hello_sealer`) and rises by one per sealed frame;
    a frame that is refused (too large, bad payload) uses no counter value.
    """

    def __init__(self, key: bytes, session_id: int, direction: int,
                 max_frame: int = DEFAULT_MAX_FRAME, *, start_counter: int = 1) -> None:
        key = _check_bytes(key, "key", KEY_SIZE)
        _check_session_id(session_id)
        _check_direction(direction)
        if not isinstance(start_counter, int) or not 1 <= start_counter <= MAX_COUNTER:
            raise ValueError("start_counter must be an integer in [1, 2**64)")
        self._aead = ChaCha20Poly1305(key)  # the only place the key lives
        self.session_id = session_id
        self.direction = direction
        self.max_frame = _check_max_frame(max_frame)
        self._next = start_counter

    @property
    def counter(self) -> int:
        """Counter of the most recently sealed frame (``start_counter - 1`` before the first)."""
        return self._next - 1

    def __repr__(self) -> str:
        return (f"Sealer(session_id={self.session_id}, direction={self.direction}, "
                f"counter={self.counter}, max_frame={self.max_frame})")

    def seal(self, msg_type: MsgType | int, payload: dict, flags: int = 0) -> bytes:
        if int(msg_type) not in _MSG_TYPES:
            raise ValueError(f"unknown message type {msg_type!r}")
        if not isinstance(flags, int) or not 0 <= flags <= 0xFFFF:
            raise ValueError(f"flags must be an integer in [0, 65536), got {flags!r}")
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
        if self._next > MAX_COUNTER:
            raise OverflowError("frame counter exhausted; start a new session")
        body = msgpack.packb(payload, use_bin_type=True)
        if HEADER_SIZE + len(body) + TAG_SIZE + 2 > self.max_frame:  # COBS only adds bytes
            raise FrameError("too_large", f"payload of {len(body)} bytes exceeds max_frame "
                                          f"{self.max_frame}")
        # What the receiver will decode must be what the receiver accepts: e.g. msgpack encodes
        # int or tuple map keys, which the receiver (strict map keys) would then reject.
        try:
            _unpack_payload(body, self.max_frame)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types
            raise ValueError(f"payload cannot be decoded by the receiver: {exc}") from None
        counter = self._next
        header = HEADER.pack(PROTOCOL_VERSION, int(msg_type), flags, self.session_id, counter)
        sealed = self._aead.encrypt(_aead_nonce(self.direction, counter), body, header)
        wire = cobs.encode(header + sealed) + b"\x00"
        if len(wire) > self.max_frame:
            raise FrameError("too_large", f"encoded frame of {len(wire)} bytes exceeds max_frame "
                                          f"{self.max_frame}")
        self._next = counter + 1
        return wire


# --------------------------------------------------------------------------------- opening

def _decode_chunk(encoded: bytes) -> bytes:
    try:
        raw = cobs.decode(encoded)
    except cobs.DecodeError as exc:
        raise FrameError("malformed", f"COBS: {exc}") from None
    if len(raw) < HEADER_SIZE + TAG_SIZE:
        raise FrameError("malformed", f"frame of {len(raw)} bytes is shorter than header + tag "
                                      f"({HEADER_SIZE + TAG_SIZE})")
    return raw


def _parse_header(raw: bytes) -> Header:
    version, mtype, flags, session_id, counter = HEADER.unpack_from(raw)
    if version != PROTOCOL_VERSION:
        raise FrameError("malformed", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if mtype not in _MSG_TYPES:
        raise FrameError("malformed", f"unknown message type {mtype}")
    return Header(version, MsgType(mtype), flags, session_id, counter)


def peek_header(encoded: bytes) -> Header:
    """Parse the clear header of one COBS chunk (no delimiter) without decrypting it.

    For routing only (HELLO vs session frame, which session): nothing here is authenticated until
    an :class:`Opener` has checked the tag. Raises ``FrameError("malformed")``.
    """
    return _parse_header(_decode_chunk(encoded))


class Opener:
    """Checks and decrypts the frames of one direction of one session.

    ``open`` takes one COBS chunk without its 0x00 delimiter (what :class:`FrameReader` yields).
    ``stats`` counts rejections by reason; ``accepted`` counts accepted frames; ``highest`` is the
    highest accepted counter. A rejected frame changes nothing but ``stats``.
    """

    def __init__(self, key: bytes, session_id: int, direction: int,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        key = _check_bytes(key, "key", KEY_SIZE)
        _check_session_id(session_id)
        _check_direction(direction)
        self._aead = ChaCha20Poly1305(key)
        self.session_id = session_id
        self.direction = direction
        self.max_frame = _check_max_frame(max_frame)
        self._highest = 0
        self.accepted = 0
        self.stats: dict[str, int] = {r: 0 for r in REASONS}

    @property
    def highest(self) -> int:
        return self._highest

    def __repr__(self) -> str:
        return (f"Opener(session_id={self.session_id}, direction={self.direction}, "
                f"highest={self._highest}, accepted={self.accepted}, stats={self.stats})")

    def open(self, encoded: bytes) -> Frame:
        try:
            frame = self._open(encoded)
        except FrameError as exc:
            self.stats[exc.reason] += 1
            log.debug("frame rejected (session %d, direction %d): %s",
                      self.session_id, self.direction, exc)
            raise
        self._highest = frame.counter
        self.accepted += 1
        return frame

    def _open(self, encoded: bytes) -> Frame:
        # The wire frame is the chunk plus its delimiter.
        if len(encoded) + 1 > self.max_frame:
            raise FrameError("too_large", f"frame of {len(encoded) + 1} bytes exceeds max_frame "
                                          f"{self.max_frame}")
        raw = _decode_chunk(encoded)
        header = _parse_header(raw)
        if header.session_id != self.session_id:
            raise FrameError("session", f"session id {header.session_id}, expected "
                                        f"{self.session_id}")
        aad = raw[:HEADER_SIZE]
        try:
            body = self._aead.decrypt(_aead_nonce(self.direction, header.counter),
                                      raw[HEADER_SIZE:], aad)
        except InvalidTag:
            raise FrameError("auth", "tag does not verify") from None
        if header.counter <= self._highest:
            raise FrameError("replay", f"counter {header.counter} not above {self._highest}")
        try:
            payload = _unpack_payload(body, self.max_frame)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types
            raise FrameError("malformed", f"payload: {type(exc).__name__}") from None
        if not isinstance(payload, dict):
            raise FrameError("malformed", f"payload is {type(payload).__name__}, not a map")
        return Frame(header.type, header.flags, header.session_id, header.counter, payload)


def hello_sealer(psk: bytes, direction: int, max_frame: int = DEFAULT_MAX_FRAME) -> Sealer:
    """Sealer for HELLO / HELLO_ACK (session id 0) under :func:`derive_hello_key`.

    The hello key is the same for every connection, so the counter starts at a random 63-bit
    value: starting at 1 every time would reuse (key, nonce) across connections.
    """
    return Sealer(derive_hello_key(psk), 0, direction, max_frame,
                  start_counter=secrets.randbits(63) + 1)


def hello_opener(psk: bytes, direction: int, max_frame: int = DEFAULT_MAX_FRAME) -> Opener:
    """Opener for HELLO / HELLO_ACK frames of one connection (session id 0)."""
    return Opener(derive_hello_key(psk), 0, direction, max_frame)


# ------------------------------------------------------------------------------- splitting

def _split(buffer: bytearray, max_frame: int, skipping: bool) -> tuple[list[bytes], int, bool]:
    """Core of :func:`split_frames`: returns (chunks, runs dropped as over-long, skipping).

    ``skipping`` means the bytes up to the next 0x00 belong to an over-long run already counted.
    """
    limit = max_frame - 1  # longest chunk; the delimiter makes the wire frame max_frame bytes
    out: list[bytes] = []
    dropped = 0
    start = 0
    while True:
        end = buffer.find(0, start)
        if end < 0:
            break
        if skipping:
            skipping = False
        elif end - start > limit:
            dropped += 1
        elif end > start:  # empty chunks (0x00 0x00) are idle fill / resync bytes
            out.append(bytes(buffer[start:end]))
        start = end + 1
    del buffer[:start]
    if not skipping and len(buffer) > limit:
        dropped += 1
        skipping = True
    if skipping:
        buffer.clear()
    return out, dropped, skipping


def split_frames(buffer: bytearray, max_frame: int = DEFAULT_MAX_FRAME) -> list[bytes]:
    """Remove every complete 0x00-terminated chunk from ``buffer`` and return them (no delimiter).

    Chunks longer than ``max_frame - 1`` are dropped; an unterminated run longer than that is
    discarded so the buffer never grows past ``max_frame`` (its remaining bytes then arrive as one
    garbage chunk that an :class:`Opener` rejects). Empty chunks are skipped. :class:`FrameReader`
    is the stateful version that drops an over-long run's tail too and counts what it dropped.
    """
    return _split(buffer, _check_max_frame(max_frame), False)[0]


class FrameReader:
    """Turns a byte stream into COBS chunks for :meth:`Opener.open`, with bounded memory.

    Because 0x00 only ever appears as a delimiter, garbage or a partial frame costs at most the
    chunk it lands in; the next frame after a 0x00 is read normally. ``dropped_oversize`` counts
    runs dropped for being longer than ``max_frame``.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = _check_max_frame(max_frame)
        self._buf = bytearray()
        self._skipping = False
        self.dropped_oversize = 0

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held (always < max_frame between calls)."""
        return len(self._buf)

    def __repr__(self) -> str:
        return (f"FrameReader(max_frame={self.max_frame}, buffered={len(self._buf)}, "
                f"dropped_oversize={self.dropped_oversize})")

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        view = memoryview(data).cast("B")
        step = self.max_frame  # at most ~2 * max_frame bytes are held at any moment
        for i in range(0, len(view), step):
            self._buf += view[i:i + step]
            chunks, dropped, self._skipping = _split(self._buf, self.max_frame, self._skipping)
            out.extend(chunks)
            self.dropped_oversize += dropped
        return out
