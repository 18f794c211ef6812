"""Request / response over sealed frames: HELLO handshake, request ids, retries, idempotent replies.

The host sends ``{"rid": <16 bytes>, "body": {...}}`` in a frame of the request's type; the device
answers ``REPLY {"rid", "body"}`` or ``ERROR {"rid", "code", "message"}``. A lost request or reply
is retried with the same rid (a fresh frame counter); the device keeps its recent replies by rid and
answers a retry with the stored reply instead of running the handler again, so a retried FORGET runs
one job. Invalid frames are dropped and counted, never answered: garbage gets silence.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .frames import (DIRECTION_DEVICE_TO_HOST, DIRECTION_HOST_TO_DEVICE, FrameError, FrameReader, MsgType,
                     Opener, Sealer, derive_session_keys, hello_opener, hello_sealer, peek_header)
from .transport import Transport, TransportClosed

log = logging.getLogger("firmware_bridge.channel")

HOST_TO_DEVICE, DEVICE_TO_HOST = DIRECTION_HOST_TO_DEVICE, DIRECTION_DEVICE_TO_HOST
DEFAULT_MTU = 16384
MIN_MTU = 256
REPLY_CACHE = 256  # replies kept for retried requests
HELLO_NONCES = 1024  # host nonces of recent HELLOs, kept to drop a replayed HELLO


class ChannelError(Exception):
    """The link failed: no answer after every retry, or the handshake was refused."""


class RemoteError(Exception):
    """The device answered ERROR: ``code`` (machine readable) and a human message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Session:
    session_id: int
    sealer: Sealer
    opener: Opener
    mtu: int


class Client:
    """The host's end: ``connect()`` then ``request(type, body)``; reconnects when the device restarts."""

    def __init__(self, transport: Transport, psk: bytes, mtu: int = DEFAULT_MTU, timeout: float = 1.0,
                 retries: int = 10) -> None:
        if len(psk) != 32:
            raise ValueError("the pre-shared key must be 32 bytes")
        self.transport, self._psk = transport, bytes(psk)
        self.requested_mtu, self.timeout, self.retries = int(mtu), float(timeout), int(retries)
        self.session: Session | None = None
        self.reader = FrameReader(max(mtu, MIN_MTU) * 2)
        self.stats = {"sent": 0, "retries": 0, "reconnects": 0, "dropped": 0}

    def __repr__(self) -> str:
        return f"Client({self.transport.name!r}, session={self.session.session_id if self.session else None})"

    # --- handshake ---
    def connect(self) -> Session:
        for _ in range(self.retries):
            nonce = os.urandom(16)
            sealer = hello_sealer(self._psk, HOST_TO_DEVICE, max_frame=4096)
            self.transport.write(sealer.seal(MsgType.HELLO, {"nonce": nonce, "mtu": self.requested_mtu,
                                                             "version": 1}))
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                for chunk in self._read(deadline):
                    try:
                        # A fresh opener for every HELLO_ACK: each one is sealed by its own hello
                        # sealer starting at a random counter, so with one opener per attempt a
                        # late ACK of an earlier attempt, arriving first with a higher counter,
                        # would make the right ACK look like a replay. Replays are caught by the
                        # host_nonce check below (a fresh nonce per attempt).
                        frame = hello_opener(self._psk, DEVICE_TO_HOST, max_frame=4096).open(chunk)
                    except FrameError:
                        self.stats["dropped"] += 1
                        continue
                    body = frame.payload
                    if frame.type != MsgType.HELLO_ACK or body.get("host_nonce") != nonce:
                        continue
                    keys = derive_session_keys(self._psk, nonce, body["nonce"], body["session_id"])
                    mtu = max(MIN_MTU, min(int(body["mtu"]), self.requested_mtu))
                    self.session = Session(body["session_id"],
                                           Sealer(keys.host_to_device, body["session_id"], HOST_TO_DEVICE, mtu),
                                           Opener(keys.device_to_host, body["session_id"], DEVICE_TO_HOST, mtu),
                                           mtu)
                    self.reader = FrameReader(mtu * 2)
                    return self.session
        # A device drops a HELLO it cannot authenticate without a word (an answer would help an
        # attacker); over TCP an accepted connection at least says the agent is up.
        why = ("the agent accepted the connection, so most likely its key differs from --key-file"
               if self.transport.name.startswith("tcp://") else
               "the device is not running an agent on this line, or its key differs from --key-file")
        raise ChannelError(f"no answer to HELLO from {self.transport.name} after {self.retries} tries: {why}")

    def _read(self, deadline: float) -> list[bytes]:
        wait = max(0.0, min(0.05, deadline - time.monotonic()))
        data = self.transport.read(65536, timeout=wait)
        return self.reader.feed(data) if data else []

    # --- requests ---
    def request(self, msg_type: MsgType, body: dict | None = None, timeout: float | None = None,
                retries: int | None = None) -> dict:
        """Send a request and return the device's REPLY body; RemoteError for an ERROR reply."""
        rid = os.urandom(16)
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        misses = 0
        for attempt in range(retries):
            if self.session is None:
                self.connect()
                self.stats["reconnects"] += attempt > 0
            if attempt:
                self.stats["retries"] += 1
            self.transport.write(self.session.sealer.seal(msg_type, {"rid": rid, "body": body or {}}))
            self.stats["sent"] += 1
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for chunk in self._read(deadline):
                    try:
                        frame = self.session.opener.open(chunk)
                    except FrameError:
                        self.stats["dropped"] += 1
                        continue
                    payload = frame.payload
                    if payload.get("rid") != rid:
                        continue  # a late reply to an earlier request
                    if frame.type == MsgType.ERROR:
                        raise RemoteError(str(payload.get("code")), str(payload.get("message")))
                    return payload.get("body", {})
            misses += 1
            if misses >= 3 and self.session is not None:
                # several silent tries: the device may have restarted and lost the session
                self.session = None
                misses = 0
        raise ChannelError(f"{msg_type.name}: no answer from {self.transport.name} after {retries} tries")


class Server:
    """The device's end: reads frames, answers HELLO, dispatches requests to ``handle(type, body)``.

    ``handle`` returns the reply body, or raises RemoteError (answered as ERROR). Replies are cached
    by request id so that a retry is answered without running the handler again.
    """

    def __init__(self, transport: Transport, psk: bytes, handle: Callable[[MsgType, dict], dict],
                 max_mtu: int = DEFAULT_MTU) -> None:
        if len(psk) != 32:
            raise ValueError("the pre-shared key must be 32 bytes")
        self.transport, self._psk, self.handle = transport, bytes(psk), handle
        self.max_mtu = int(max_mtu)
        self.session: Session | None = None
        self.reader = FrameReader(self.max_mtu * 2)
        self.replies: OrderedDict[bytes, tuple[MsgType, dict]] = OrderedDict()
        self.hello_nonces: OrderedDict[bytes, None] = OrderedDict()
        self.stats = {"frames": 0, "handled": 0, "replayed_replies": 0, "rejected": {}}

    def __repr__(self) -> str:
        return f"Server({self.transport.name!r}, session={self.session.session_id if self.session else None})"

    def _reject(self, reason: str) -> None:
        self.stats["rejected"][reason] = self.stats["rejected"].get(reason, 0) + 1

    def poll(self, timeout: float = 0.1) -> int:
        """Process what arrives within ``timeout``; returns the number of frames handled."""
        data = self.transport.read(65536, timeout=timeout)
        handled = 0
        for chunk in self.reader.feed(data) if data else []:
            self.stats["frames"] += 1
            try:
                header = peek_header(chunk)
            except FrameError as e:
                self._reject(e.reason)
                continue
            if header.type == MsgType.HELLO and header.session_id == 0:
                self._hello(chunk)
            else:
                self._request(chunk, header)
            handled += 1
        return handled

    def serve(self, stop=lambda: False) -> None:
        """Poll until ``stop()`` is true or the transport closes."""
        try:
            while not stop():
                self.poll(0.1)
        except TransportClosed:
            pass

    def _hello(self, chunk: bytes) -> None:
        try:
            frame = hello_opener(self._psk, HOST_TO_DEVICE, max_frame=4096).open(chunk)
            host_nonce, mtu = frame.payload.get("nonce"), frame.payload.get("mtu", DEFAULT_MTU)
            # Exact types, no conversions: bytes(<int>) allocates that many bytes or raises
            # OverflowError, and int(inf) raises OverflowError; either would escape poll() and
            # kill the agent on an (authenticated) HELLO carrying {"nonce": 2**63} or {"mtu": inf}.
            if not isinstance(host_nonce, bytes) or len(host_nonce) != 16 or not isinstance(mtu, int):
                raise FrameError("malformed")
            mtu = max(MIN_MTU, min(mtu, self.max_mtu))
        except FrameError as e:
            self._reject(e.reason)
            return
        # A replayed HELLO: every HELLO is opened by a fresh hello opener, so no counter catches a
        # replay, and a recorded HELLO sent again would replace the live session (and be answered),
        # against DESIGN §6 ("a replayed ... frame is dropped and counted, never acted on"). The
        # host draws a new random nonce for every HELLO, so a repeated nonce is a replay. Only the
        # last HELLO_NONCES are remembered (bounded memory), and not across restarts.
        if host_nonce in self.hello_nonces:
            self._reject("replay")
            return
        self.hello_nonces[host_nonce] = None
        while len(self.hello_nonces) > HELLO_NONCES:
            self.hello_nonces.popitem(last=False)
        nonce = os.urandom(16)
        session_id = int.from_bytes(os.urandom(4), "little") or 1
        keys = derive_session_keys(self._psk, host_nonce, nonce, session_id)
        self.session = Session(session_id, Sealer(keys.device_to_host, session_id, DEVICE_TO_HOST, mtu),
                               Opener(keys.host_to_device, session_id, HOST_TO_DEVICE, mtu), mtu)
        self.reader = FrameReader(mtu * 2)
        ack = hello_sealer(self._psk, DEVICE_TO_HOST, max_frame=4096)
        self.transport.write(ack.seal(MsgType.HELLO_ACK, {"nonce": nonce, "host_nonce": host_nonce,
                                                          "session_id": session_id, "mtu": mtu}))
        log.info("session %08x opened, mtu %d", session_id, mtu)

    def _request(self, chunk: bytes, header) -> None:
        if self.session is None or header.session_id != self.session.session_id:
            self._reject("session")
            return
        try:
            frame = self.session.opener.open(chunk)
        except FrameError as e:
            self._reject(e.reason)
            return
        payload = frame.payload
        rid = payload.get("rid") if isinstance(payload, dict) else None
        if not isinstance(rid, (bytes, bytearray)) or len(rid) != 16 or not isinstance(payload.get("body"), dict):
            self._reject("malformed")
            return
        rid = bytes(rid)
        if rid in self.replies:
            self.stats["replayed_replies"] += 1
            reply_type, reply = self.replies[rid]
        else:
            try:
                reply_type, reply = MsgType.REPLY, {"rid": rid, "body": self.handle(frame.type, payload["body"])}
            except RemoteError as e:
                reply_type, reply = MsgType.ERROR, {"rid": rid, "code": e.code, "message": e.message}
            except Exception as e:  # a handler bug must not kill the agent
                log.exception("handler for %s failed", frame.type.name)
                reply_type, reply = MsgType.ERROR, {"rid": rid, "code": "internal",
                                                    "message": f"{type(e).__name__}: {e}"}
            self.stats["handled"] += 1
            self.replies[rid] = (reply_type, reply)
            while len(self.replies) > REPLY_CACHE:
                self.replies.popitem(last=False)
        try:
            self.transport.write(self.session.sealer.seal(reply_type, reply))
        except FrameError:
            err = {"rid": rid, "code": "too_large", "message": "reply exceeds the negotiated MTU"}
            self.transport.write(self.session.sealer.seal(MsgType.ERROR, err))
