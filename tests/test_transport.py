"""firmware_bridge.transport over real parts: pyserial on a real pty, TCP on 127.0.0.1, loop://;
and the fault injector of tests/faults.py over real TCP and a pty."""
from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import tty

import pytest
import serial

from faults import FaultyTransport
from firmware_bridge.transport import (
    FdTransport, SerialTransport, TcpListener, TcpTransport, Transport, TransportClosed,
    TransportError, connect_tcp, open_transport, pty_pair,
)

ALL_BYTES = bytes(range(256)) * 4
MB = 1 << 20
# Frame bodies use only bytes with two or more bits set, so one flipped bit can never make a 0x00:
# every 0x00 the receiver sees is a delimiter the FaultyTransport sent.
BODY_BYTES = bytes(b for b in range(256) if bin(b).count("1") >= 2)


# ---------------------------------------------------------------------------------------- helpers

def read_exactly(t: Transport, n: int, overall: float = 15.0) -> bytes:
    """Read until n bytes arrived (a transport returns what is available, in pieces)."""
    got = bytearray()
    deadline = time.monotonic() + overall
    while len(got) < n:
        assert time.monotonic() < deadline, f"{t.name}: {len(got)} of {n} bytes after {overall}s"
        got += t.read(min(65536, n - len(got)), timeout=0.5)
    return bytes(got)


class Collector(threading.Thread):
    """Reads a transport in the background until the peer closes it (or `overall` runs out)."""

    def __init__(self, t: Transport, overall: float = 15.0):
        super().__init__(daemon=True)
        self.t, self.overall, self.data, self.closed = t, overall, bytearray(), False
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.overall
        while time.monotonic() < deadline:
            try:
                self.data += self.t.read(timeout=0.2)
            except TransportClosed:
                self.closed = True
                return

    def result(self) -> bytes:
        self.join(self.overall + 1)
        assert self.closed, f"{self.t.name}: peer never closed"
        return bytes(self.data)


def write_in_thread(t: Transport, data: bytes) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            t.write(data)
        except BaseException as e:  # reported by the joining test
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.errors = errors
    th.start()
    return th


def tcp_pair(timeout: float = 1.0) -> tuple[TcpTransport, TcpTransport]:
    with TcpListener("127.0.0.1", 0) as lst:
        client = connect_tcp(*lst.address, read_timeout=timeout)
        server = lst.accept(5.0, read_timeout=timeout)
    assert server is not None
    return client, server


def make_pair(kind: str) -> tuple[Transport, Transport]:
    if kind == "pty":
        return pty_pair()
    if kind == "tcp":
        return tcp_pair()
    if kind == "loop":
        t = open_transport("loop://")
        return t, t
    raise AssertionError(kind)


@pytest.fixture
def pair(request):
    a, b = make_pair(request.param)
    yield a, b
    a.close()
    b.close()


def split_frames(stream: bytes) -> list[bytes]:
    """The receiver's splitter: every 0x00 ends a frame; bytes after the last one are pending."""
    return stream.split(b"\x00")[:-1]


def frames(n: int, seed: int, max_len: int = 60) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.choices(BODY_BYTES, k=rng.randint(1, max_len))) for _ in range(n)]


def faulty_run(bodies: list[bytes], seed: int, chunk=None, **faults) -> tuple[bytes, dict]:
    """Send the frames through FaultyTransport over real TCP; return what arrived and the stats."""
    client, server = tcp_pair()
    collector = Collector(server)
    f = FaultyTransport(client, seed, **faults)
    stream = b"".join(body + b"\x00" for body in bodies)
    if chunk is None:
        for body in bodies:
            f.write(body + b"\x00")
    else:  # arbitrary write boundaries: mid-frame, several frames at once
        rng, i = random.Random(chunk), 0
        while i < len(stream):
            n = rng.randint(1, 300)
            f.write(stream[i:i + n])
            i += n
    assert f.pending == 0
    f.close()
    received = collector.result()
    server.close()
    return received, f.stats.as_dict()


def assert_binomial(count: int, n: int, p: float, what: str) -> None:
    """count ~ Binomial(n, p): within 5 standard deviations (false alarm ~ 1 in 1.7 million)."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(count - mean) <= 5 * sd + 1, f"{what}: {count}, expected {mean:.0f} +- {5 * sd:.0f}"


# --------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("pair", ["pty", "tcp", "loop"], indirect=True)
def test_every_byte_value_both_directions(pair):
    a, b = pair
    a.write(ALL_BYTES)
    assert read_exactly(b, len(ALL_BYTES)) == ALL_BYTES
    b.write(ALL_BYTES[::-1])
    assert read_exactly(a, len(ALL_BYTES)) == ALL_BYTES[::-1]


@pytest.mark.parametrize("pair,direction", [("pty", "a->b"), ("pty", "b->a"), ("tcp", "a->b"),
                                            ("tcp", "b->a"),
                                            pytest.param("loop", "a->b", marks=pytest.mark.slow)],
                         indirect=["pair"])
def test_one_megabyte_write_arrives_complete(pair, direction):
    a, b = pair if direction == "a->b" else pair[::-1]
    data = random.Random(1).randbytes(MB)
    writer = write_in_thread(a, data)  # a single write() of 1 MB; it blocks until b drains it
    assert read_exactly(b, MB) == data
    writer.join(5)
    assert not writer.is_alive() and not writer.errors
    assert b.read(timeout=0.05) == b""  # nothing extra


def test_pty_serial_end_is_real_pyserial():
    s, m = pty_pair(baudrate=57600)
    with s, m:
        assert isinstance(s.serial, serial.Serial) and s.serial.baudrate == 57600
        path = s.serial.port
        assert s.name == "serial://" + path and m.name == "pty://" + path
        assert s.default_mtu == m.default_mtu == 256


# ------------------------------------------------------------------------------------- timeouts

@pytest.mark.parametrize("pair", ["pty", "tcp", "loop"], indirect=True)
def test_read_timeout_returns_empty(pair):
    for t in dict.fromkeys(pair):
        start = time.monotonic()
        assert t.read(timeout=0.2) == b""
        assert time.monotonic() - start >= 0.15  # it waited, rather than failing at once
        assert t.read(timeout=0) == b""
    a, b = pair
    a.write(b"x\x00")  # and data after a timeout still arrives
    assert read_exactly(b, 2) == b"x\x00"


def test_default_read_timeout_comes_from_the_constructor():
    s, m = pty_pair(timeout=0.1)
    with s, m:
        start = time.monotonic()
        assert s.read() == b"" and m.read() == b""
        assert time.monotonic() - start < 5


def test_read_returns_at_most_max_bytes():
    s, m = pty_pair()
    with s, m:
        m.write(b"abcdef")
        assert read_exactly(s, 2) == b"ab"
        assert s.read(3) == b"cde"
        with pytest.raises(ValueError):
            s.read(0)


# ---------------------------------------------------------------------------------- peer closes

def test_tcp_peer_close_raises_transport_closed_after_pending_data():
    client, server = tcp_pair()
    server.write(b"last words\x00")
    server.close()
    assert read_exactly(client, 11) == b"last words\x00"
    with pytest.raises(TransportClosed, match="closed the connection"):
        client.read(timeout=2)
    # Writing to a closed peer fails too, once its RST has come back (the first write may pass).
    with pytest.raises(TransportClosed):
        for _ in range(100):
            client.write(b"x" * 1000)
            time.sleep(0.01)
    client.close()


@pytest.mark.parametrize("which", ["serial end", "master end"])
def test_pty_hang_up_raises_transport_closed(which):
    s, m = pty_pair()
    gone, left = (s, m) if which == "serial end" else (m, s)
    gone.close()
    with pytest.raises(TransportClosed):
        left.read(timeout=2)
    left.close()


@pytest.mark.parametrize("kind", ["pty", "tcp", "loop"])
def test_use_after_close_raises_transport_closed(kind):
    a, b = make_pair(kind)
    with a:
        assert not a.closed
    assert a.closed
    with pytest.raises(TransportClosed):
        a.read(timeout=0)
    with pytest.raises(TransportClosed):
        a.write(b"x")
    a.close()  # idempotent
    b.close()


# ---------------------------------------------------------------------------------------- TCP

def test_tcp_listener_picks_a_free_port_and_accept_times_out():
    with TcpListener("127.0.0.1", 0) as lst:
        host, port = lst.address
        assert host == "127.0.0.1" and port > 0 and lst.url == f"tcp://127.0.0.1:{port}"
        assert lst._sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert lst.accept(0.1) is None
        with connect_tcp(host, port) as c, lst.accept(5) as s:
            assert c.name == lst.url and c.default_mtu == 16384
            for t in (c, s):
                assert t.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# ------------------------------------------------------------------------------ open_transport

def test_open_tcp_url():
    with TcpListener("127.0.0.1", 0) as lst:
        url = lst.url
        with open_transport(url) as t, lst.accept(5) as peer:
            assert isinstance(t, TcpTransport) and t.name == url
            t.write(b"hello\x00")
            assert read_exactly(peer, 6) == b"hello\x00"


def _raw_pty() -> tuple[int, str, int]:
    """A raw pty for the code under test to open by path: (master fd, slave path, slave fd)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    return master, path, slave


@pytest.mark.parametrize("form", ["serial://{path}", "serial://{path}?baudrate=9600", "{path}"])
def test_open_serial_url_and_bare_path(form):
    master_fd, path, slave_fd = _raw_pty()
    url = form.format(path=path)
    with FdTransport(master_fd) as master, open_transport(url) as t:
        os.close(slave_fd)
        assert isinstance(t, SerialTransport) and t.default_mtu == 256
        assert t.name == (url if "://" in url else f"serial://{path}")
        assert t.serial.port == path
        assert t.serial.baudrate == (9600 if "baudrate" in url else 115200)
        t.write(ALL_BYTES)
        assert read_exactly(master, len(ALL_BYTES)) == ALL_BYTES
        master.write(b"back\x00")
        assert read_exactly(t, 5) == b"back\x00"


def test_open_loop_url():
    with open_transport("loop://") as t:
        assert isinstance(t, SerialTransport) and t.name == "loop://"
        t.write(b"echo\x00")
        assert read_exactly(t, 5) == b"echo\x00"


def test_open_pyserial_socket_url():
    with TcpListener("127.0.0.1", 0) as lst:
        host, port = lst.address
        with open_transport(f"socket://{host}:{port}") as t, lst.accept(5) as peer:
            assert isinstance(t, SerialTransport)
            t.write(ALL_BYTES)
            assert read_exactly(peer, len(ALL_BYTES)) == ALL_BYTES
            peer.write(b"pong\x00")
            assert read_exactly(t, 5) == b"pong\x00"
            peer.close()
            with pytest.raises(TransportClosed):
                t.read(timeout=2)


def _closed_port() -> int:
    with TcpListener("127.0.0.1", 0) as lst:
        return lst.address[1]


@pytest.mark.parametrize("url,message", [
    ("tcp://localhost", "no port"),
    ("tcp://:5000", "no host"),
    ("tcp://localhost:http", "Port could not be cast"),
    ("tcp://localhost:70000", "out of range"),
    ("tcp://localhost:0", "port 0"),
    ("tcp://localhost:5000/path", "unexpected path"),
    ("tcp://127.0.0.1:{closed}", "cannot connect"),
    ("serial://", "no device"),
    ("serial:///dev/ttyUSB0?parity=E", "unknown option"),
    ("serial:///dev/ttyUSB0?baudrate=fast", "baudrate must be"),
    ("serial:///dev/edge-qmul-no-such-device", "could not open port"),
    ("/dev/edge-qmul-no-such-device", "could not open port"),
    ("nosuch://device", "protocol 'nosuch' not known"),
    ("socket://127.0.0.1:{closed}", "Connection refused"),
    ("socket://127.0.0.1", "cannot open"),  # pyserial's own message is obscure here
    ("", "non-empty"),
])
def test_bad_urls_give_clear_errors_naming_them(url, message):
    url = url.replace("{closed}", str(_closed_port()))
    with pytest.raises(TransportError, match=message) as info:
        open_transport(url)
    assert repr(url) in str(info.value)
    assert not isinstance(info.value, TransportClosed)


# ---------------------------------------------------------------------------- FaultyTransport

N_FRAMES = 10_000


def test_fault_rates_match_the_configured_probabilities():
    bodies = frames(N_FRAMES, seed=7)
    p = dict(drop=0.1, duplicate=0.05, truncate=0.2, flip=0.01)
    received, st = faulty_run(bodies, seed=123, flip_delimiters=False, **p)
    n = N_FRAMES
    assert st["frames_in"] == n and st["bytes_in"] == sum(len(b) + 1 for b in bodies)
    assert_binomial(st["dropped"], n, p["drop"], "dropped")
    kept = n - st["dropped"]
    assert_binomial(st["truncated"], kept, p["truncate"], "truncated")
    assert_binomial(st["duplicated"], kept, p["duplicate"], "duplicated")
    # What the receiver got agrees with the counts: one 0x00 per frame sent, nothing else.
    out = split_frames(received)
    assert st["frames_out"] == kept + st["duplicated"] == len(out) == received.count(0)
    assert st["bytes_out"] == len(received) and received.endswith(b"\x00")
    # Flips: per byte before the delimiter, over the frames sent (about: a duplicate repeats its
    # frame, so the bytes of the distinct frames are estimated from the mean length).
    distinct_bytes = (sum(map(len, out)) * kept) // len(out)
    assert_binomial(st["bits_flipped"], distinct_bytes, p["flip"], "bits flipped")
    assert st["delimiters_flipped"] == 0


def test_flips_are_counted_exactly_and_may_hit_delimiters():
    bodies = frames(N_FRAMES, seed=8)
    received, st = faulty_run(bodies, seed=5, flip=0.02)  # delimiters included (the default)
    n_bytes = sum(len(b) + 1 for b in bodies)
    sent = b"".join(b + b"\x00" for b in bodies)
    assert len(received) == n_bytes and st["frames_out"] == N_FRAMES
    diff = [x ^ y for x, y in zip(sent, received)]
    assert sum(bin(d).count("1") for d in diff) == st["bits_flipped"]  # one bit per hit byte
    assert sum(1 for d in diff if d) == st["bits_flipped"]
    assert_binomial(st["bits_flipped"], n_bytes, 0.02, "bits flipped")
    assert_binomial(st["delimiters_flipped"], N_FRAMES, 0.02, "delimiters flipped")
    # A flipped delimiter merges two frames for the receiver; body bytes cannot become 0x00.
    assert received.count(0) == N_FRAMES - st["delimiters_flipped"]
    starts = [0]
    for b in bodies:
        starts.append(starts[-1] + len(b) + 1)
    assert st["corrupted"] == sum(any(diff[i:j]) for i, j in zip(starts, starts[1:]))


def test_faults_are_reproducible_for_a_seed_and_independent_of_write_boundaries():
    bodies = frames(2000, seed=9)
    faults = dict(drop=0.1, duplicate=0.1, truncate=0.1, flip=0.01)
    first = faulty_run(bodies, seed=42, **faults)
    assert faulty_run(bodies, seed=42, **faults) == first
    assert faulty_run(bodies, seed=42, chunk=3, **faults) == first
    assert faulty_run(bodies, seed=43, **faults) != first
    # Each fault has its own random stream: turning flips off leaves the rest where they were,
    # and turning drops off delivers the same frames plus the ones that had been dropped.
    no_flip = faulty_run(bodies, seed=42, **{**faults, "flip": 0.0})[1]
    for key in ("dropped", "duplicated", "truncated"):
        assert no_flip[key] == first[1][key]
    clean = {**faults, "flip": 0.0}
    all_kept = split_frames(faulty_run(bodies, seed=42, **{**clean, "drop": 0.0})[0])
    some_dropped = split_frames(faulty_run(bodies, seed=42, **{**clean, "drop": 0.5})[0])
    assert len(some_dropped) < len(all_kept) and set(some_dropped) <= set(all_kept)


def test_truncation_keeps_the_delimiter_so_the_receiver_resynchronises():
    bodies = frames(N_FRAMES, seed=10)
    received, st = faulty_run(bodies, seed=11, truncate=0.3)
    out = split_frames(received)
    assert len(out) == N_FRAMES  # no frame swallowed its neighbour
    cut = [(o, b) for o, b in zip(out, bodies) if o != b]
    assert len(cut) == st["truncated"]
    assert_binomial(st["truncated"], N_FRAMES, 0.3, "truncated")
    assert all(len(o) < len(b) and b.startswith(o) for o, b in cut)


def test_drops_and_duplicates_seen_by_a_receiver_over_the_pty():
    s, m = pty_pair()
    collector = Collector(s)
    f = FaultyTransport(m, seed=3, drop=0.3, duplicate=0.3)
    bodies = [b"frame %d" % i for i in range(500)]
    for body in bodies:
        f.write(body + b"\x00")
    deadline = time.monotonic() + 10
    while collector.data.count(0) < f.stats.frames_out and time.monotonic() < deadline:
        time.sleep(0.01)
    f.close()  # hangs up the pty: the collector's read raises TransportClosed
    got = split_frames(collector.result())
    s.close()
    assert len(got) == f.stats.frames_out == 500 - f.stats.dropped + f.stats.duplicated
    assert_binomial(f.stats.dropped, 500, 0.3, "dropped")
    assert list(dict.fromkeys(got)) == [b for b in bodies if b in set(got)]  # order kept
    assert len(got) - len(set(got)) == f.stats.duplicated


def test_faulty_transport_checks_probabilities_and_holds_partial_frames():
    client, server = tcp_pair()
    with client, server:
        with pytest.raises(ValueError, match="drop"):
            FaultyTransport(client, 0, drop=1.5)
        f = FaultyTransport(client, 0)
        f.write(b"half a fr")
        assert f.pending == 9 and server.read(timeout=0.1) == b""
        f.write(b"ame\x00tail")
        assert read_exactly(server, 13) == b"half a frame\x00" and f.pending == 4
        assert f.name == "faulty+" + client.name and f.default_mtu == client.default_mtu
