"""The harness of the bridge security tests: a real device on one end of a real line, the test raw
on the other.

A real ``channel.Server`` around a real ``device.Agent`` (tmp state dir) serves one end of a real
transport (a pty pair or TCP on 127.0.0.1) in a thread; the test holds the other end and speaks
the wire protocol itself (``HostSession``, built from frames.py directly), so it can send forged,
replayed, cut and mutated frames. ``link_factory`` is the pytest fixture that makes and closes them.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from cobs import cobs

from firmware_bridge.channel import Server
from firmware_bridge.device import Agent
from firmware_bridge.frames import (
    DIRECTION_DEVICE_TO_HOST as D2H,
    DIRECTION_HOST_TO_DEVICE as H2D,
    FrameError,
    FrameReader,
    MsgType,
    Opener,
    Sealer,
    derive_session_keys,
    hello_opener,
    hello_sealer,
)
from firmware_bridge.transport import TcpListener, TransportClosed, connect_tcp, pty_pair

PSK = hashlib.sha256(b"edge_qmul test_bridge_security: the device key").digest()
OTHER_PSK = hashlib.sha256(b"edge_qmul test_bridge_security: another device").digest()
assert len(PSK) == 32 and PSK != OTHER_PSK

REQUEST_TYPES = frozenset({MsgType.PING, MsgType.INFO, MsgType.PUT_BEGIN, MsgType.PUT_CHUNK,
                           MsgType.PUT_END, MsgType.GET, MsgType.FORGET, MsgType.JOB_STATUS,
                           MsgType.JOB_RESULT, MsgType.COMMIT, MsgType.ROLLBACK, MsgType.BENCH})
POLL_BOUND_S = 10.0  # a poll(0.02) must return (a blocked read never would); 2.75 s seen on 2 busy CPUs
WAIT_S = 10.0       # how long the host waits for an answer that must come
SHA_POOL = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]  # plausible file hashes


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

