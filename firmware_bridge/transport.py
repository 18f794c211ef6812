"""Byte transports for the bridge: serial (any pyserial URL), TCP, and a fault injector for tests.

Every transport moves opaque bytes and knows nothing of frames; `open_transport(url)` picks one by
URL, as pyserial's `serial_for_url` does (STYLE.md point 4):

    tcp://HOST:PORT             TcpTransport (TCP_NODELAY on); IPv6 as tcp://[::1]:PORT
    serial://DEVICE             SerialTransport(DEVICE), e.g. serial:///dev/ttyUSB0, serial://COM3;
                                ?baudrate=N sets the speed (default 115200)
    loop://, socket://, rfc2217://, spy://, hwgrep://, ...
                                SerialTransport(url): passed to pyserial untouched
    /dev/ttyUSB0 (no scheme)    SerialTransport(path)

Framing (DESIGN.md §6). Frames are COBS-encoded and terminated by one 0x00 byte; another module
encodes them, this one only carries bytes. COBS rewrites a frame so that it contains no 0x00 at all
(cost: at most one byte per 254, plus one), so on the wire 0x00 means "end of frame" and nothing
else. That is what makes a raw serial line usable: a UART has no packet boundaries, a receiver may
start listening mid-frame, and a byte can be lost or garbled. Whatever happened, the receiver
throws away bytes up to the next 0x00 and is back in step; there is no escape state or length field
whose corruption could make it swallow the frames that follow. A garbled byte that becomes 0x00
splits one frame in two, and a garbled delimiter merges two frames into one; either way the
results fail the AEAD check and are dropped, and only the frames touched are lost.

MTU. `default_mtu` is the frame size a transport proposes in HELLO (the size is negotiated there):
- serial, 256 bytes. At 115200 baud 8-N-1 a byte costs 10 bit times, about 11.5 kB/s, so a 256-byte
  frame is on the wire for about 22 ms, and a frame spoiled by one bad bit is cheap to resend.
  With a bit error rate e, a frame of n bytes survives with probability (1 - e)^(8n); short frames
  keep that close to 1 on a noisy line, and they fit the small receive buffers of a microcontroller.
- TCP, 16384 bytes. TCP already delivers bytes in order and checksummed, so frames only need to be
  large enough to amortise the per-frame header and 16-byte AEAD tag, and small enough that a
  receiver can bound the memory it holds for one incomplete frame.
The MTU limits the frame before COBS; the encoded frame is at most mtu + ceil(mtu / 254) + 1 bytes.

Threads: one thread may read while another writes. `read()` waits at most `timeout` seconds, so a
reader loop should use a finite timeout to notice a shutdown; `close()` from a third thread while a
read is blocked is not supported on every transport.
"""
from __future__ import annotations

import abc
import errno
import math
import os
import random
import select
import socket
import time
import tty
import urllib.parse
from dataclasses import asdict, dataclass

import serial

__all__ = [
    "DEFAULT_READ_TIMEOUT",
    "FaultStats",
    "FaultyTransport",
    "FdTransport",
    "SerialTransport",
    "TcpListener",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "TransportError",
    "connect_tcp",
    "open_transport",
    "pty_pair",
]

DEFAULT_READ_TIMEOUT = 1.0  # seconds; each transport's `timeout` unless given to its constructor
SERIAL_MTU = 256
TCP_MTU = 16384

# errno values that mean the other end, or the device itself, is gone rather than busy.
_GONE_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.EPIPE,
                          errno.ECONNRESET, errno.ECONNABORTED, errno.ESHUTDOWN, errno.ENOTCONN})


class TransportError(OSError):
    """A transport could not be opened, or a read or write failed. The message names the URL."""


class TransportClosed(TransportError):
    """The peer closed the connection, the device vanished, or this transport was closed."""


class _UseDefault:
    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT = _UseDefault()  # read(timeout=...) not given: use the transport's own `timeout`


class Transport(abc.ABC):
    """A bidirectional byte stream. Subclasses set `name`, `default_mtu` and `timeout`.

    - `write(data)` sends all of `data` or raises TransportError (TransportClosed if the peer is
      gone). It may block while the peer is not reading.
    - `read(max_bytes, timeout)` returns 1..max_bytes bytes as soon as any are available, or b""
      when `timeout` seconds pass with none (None waits for ever, 0 polls). It raises
      TransportClosed when the peer closed or the port vanished, and once `close()` was called.
    - `name` is a URL for logs; `default_mtu` is the frame size to propose in HELLO.
    """

    name: str = "?"
    default_mtu: int = SERIAL_MTU
    timeout: float | None = DEFAULT_READ_TIMEOUT

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def read(self, max_bytes: int = 65536,
             timeout: float | None | _UseDefault = _DEFAULT) -> bytes: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def _timeout(self, timeout: float | None | _UseDefault) -> float | None:
        t = self.timeout if isinstance(timeout, _UseDefault) else timeout
        if t is not None and t < 0:
            raise ValueError(f"{self.name}: timeout must be >= 0 or None, not {t}")
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name} {state}>"


def _check_max(max_bytes: int) -> None:
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")


def _errno_of(exc: BaseException) -> int | None:
    """The errno of `exc` or of the OSError it was raised from (pyserial wraps them in messages)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


# ------------------------------------------------------------------------------------------------
# Serial: anything pyserial opens.

class SerialTransport(Transport):
    """A serial port, or anything `serial.serial_for_url` opens (loop://, socket://, rfc2217://...).

    `url_or_port` is a device path (/dev/ttyUSB0, /dev/pts/3, COM3) or a pyserial URL. Failing to
    open it (unknown scheme, no such device, refused connection) raises TransportError naming it.

    Reads: where the port has a file descriptor (real serial ports and ptys, socket://, spy://) the
    port is kept non-blocking and `read` waits in select(), so it returns whatever arrived without
    touching the port's settings. Otherwise (loop://, rfc2217://) pyserial's own read timeout is
    used for the first byte, changed only when a read asks for a different timeout (on rfc2217://
    a change is a round trip to the server), and the rest comes from `in_waiting`.
    Note: loop:// buffers only 4096 bytes, so a larger write blocks until another thread reads.
    """

    default_mtu = SERIAL_MTU

    def __init__(self, url_or_port: str, baudrate: int = 115200, *,
                 timeout: float | None = DEFAULT_READ_TIMEOUT,
                 write_timeout: float | None = None):
        if not isinstance(url_or_port, str) or not url_or_port:
            raise TransportError(f"serial port: expected a device path or URL, got {url_or_port!r}")
        self.url = url_or_port
        self.name = url_or_port if "://" in url_or_port else f"serial://{url_or_port}"
        self.timeout = timeout
        try:
            self._ser = serial.serial_for_url(url_or_port, baudrate=baudrate, timeout=timeout,
                                              write_timeout=write_timeout)
        except (ValueError, serial.SerialException, OSError) as e:
            raise TransportError(f"cannot open {url_or_port!r}: {e}") from e
        try:
            self._fd: int | None = self._ser.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            self._fd = None
        if self._fd is not None:
            self._ser.timeout = 0  # select() does the waiting; pyserial only drains
        self._ser_timeout = self._ser.timeout

    @property
    def serial(self) -> serial.SerialBase:
        """The underlying pyserial object (for baud rate changes, modem lines, ...)."""
        return self._ser

    @property
    def closed(self) -> bool:
        return not self._ser.is_open

    def write(self, data: bytes) -> None:
        if self.closed:
            raise TransportClosed(f"{self.name}: write on a closed transport")
        try:
            self._ser.write(data)
        except serial.SerialTimeoutException as e:
            raise TransportError(f"{self.name}: write timed out") from e
        except (serial.SerialException, OSError) as e:
            if isinstance(e, serial.PortNotOpenError) or _errno_of(e) in _GONE_ERRNOS:
                raise TransportClosed(f"{self.name}: port gone during write: {e}") from e
            raise TransportError(f"{self.name}: write failed: {e}") from e

    def read(self, max_bytes: int = 65536,
             timeout: float | None | _UseDefault = _DEFAULT) -> bytes:
        _check_max(max_bytes)
        t = self._timeout(timeout)
        if self.closed:
            raise TransportClosed(f"{self.name}: read on a closed transport")
        try:
            if self._fd is not None:
                ready, _, _ = select.select([self._fd], [], [], t)
                if not ready:
                    return b""
                # Readable but nothing to read means hang-up: pyserial raises for that.
                return self._ser.read(max_bytes)
            if t != self._ser_timeout:
                self._ser.timeout = self._ser_timeout = t
            first = self._ser.read(1)
            if not first:
                if self.closed:
                    raise TransportClosed(f"{self.name}: port closed")
                return b""
            n = min(self._ser.in_waiting, max_bytes - 1)
            return first + self._ser.read(n) if n > 0 else first
        except (serial.SerialException, OSError) as e:
            # pyserial raises from read only when the device or connection is gone.
            raise TransportClosed(f"{self.name}: port gone during read: {e}") from e

    def close(self) -> None:
        self._ser.close()


# ------------------------------------------------------------------------------------------------
# A raw file descriptor (the master end of a pty).

class FdTransport(Transport):
    """A file descriptor read and written with os.read/os.write, waiting in select().

    Made for the master end of a pty (see `pty_pair`), which pyserial cannot open by path. Takes
    ownership of `fd`: it is set non-blocking and closed by `close()`. EOF or EIO on read (on
    Linux, a pty master reads EIO once every slave descriptor is closed) raises TransportClosed.
    """

    default_mtu = SERIAL_MTU

    def __init__(self, fd: int, name: str | None = None, *,
                 timeout: float | None = DEFAULT_READ_TIMEOUT,
                 write_timeout: float | None = None):
        self._fd: int | None = fd
        self.name = name or f"fd://{fd}"
        self.timeout = timeout
        self.write_timeout = write_timeout
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _live_fd(self, what: str) -> int:
        if self._fd is None:
            raise TransportClosed(f"{self.name}: {what} on a closed transport")
        return self._fd

    def write(self, data: bytes) -> None:
        fd = self._live_fd("write")
        view = memoryview(data).cast("B")
        deadline = None if self.write_timeout is None else time.monotonic() + self.write_timeout
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno in _GONE_ERRNOS:
                    raise TransportClosed(f"{self.name}: peer gone during write: {e}") from e
                raise TransportError(f"{self.name}: write failed: {e}") from e
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError(f"{self.name}: write timed out with {len(view)} bytes unsent")
            select.select([], [fd], [], left)

    def read(self, max_bytes: int = 65536,
             timeout: float | None | _UseDefault = _DEFAULT) -> bytes:
        _check_max(max_bytes)
        t = self._timeout(timeout)
        fd = self._live_fd("read")
        deadline = None if t is None else time.monotonic() + t
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return b""
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:  # another reader took it; wait out the rest of the timeout
                if left == 0.0:
                    return b""
                continue
            except OSError as e:
                if e.errno in _GONE_ERRNOS:
                    raise TransportClosed(f"{self.name}: peer gone: {e}") from e
                raise TransportError(f"{self.name}: read failed: {e}") from e
            if not data:
                raise TransportClosed(f"{self.name}: end of file")
            return data

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def pty_pair(baudrate: int = 115200, *, timeout: float | None = DEFAULT_READ_TIMEOUT
             ) -> tuple[SerialTransport, FdTransport]:
    """For tests and demos: a real serial line in one process, as (serial_end, master_end).

    `serial_end` is pyserial opening the pty's slave device (/dev/pts/N), exactly as it opens a
    USB-serial adapter; `master_end` is the master descriptor as an FdTransport, since pyserial
    cannot open a master by path. Both ends are raw (no echo, no line editing, no CR/LF mapping, no
    XON/XOFF), so every byte value, 0x00 included, passes unchanged. Closing one end makes the
    other's read raise TransportClosed. The baud rate is recorded but a pty does not pace bytes.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(master)
        tty.setraw(slave)
        path = os.ttyname(slave)
        serial_end = SerialTransport(path, baudrate, timeout=timeout)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    # Only pyserial's descriptor stays open, so closing serial_end hangs up the master (EIO).
    os.close(slave)
    return serial_end, FdTransport(master, f"pty://{path}", timeout=timeout)


class SerialLink:
    """For tests and demos: two serial ports joined by a null-modem cable, pyserial on both ends.

    Two pty pairs; a relay thread copies each master's bytes to the other master, so whatever
    pyserial writes on port `a` (a /dev/pts/N slave) comes out of port `b` (another slave), as
    between a host's USB-serial adapter and a board's UART. Every byte value passes unchanged
    (all four ends raw). `close()` stops the relay and closes the ports.
    """

    def __init__(self, baudrate: int = 115200, *, timeout: float | None = DEFAULT_READ_TIMEOUT,
                 open_b: bool = True) -> None:
        """``open_b=False`` leaves port b's path (``b_path``) for another process to open (a
        device agent run as its own process); its slave stays open here, unread, so the relay
        never sees the hang-up of a slave nobody holds yet."""
        import threading
        self._fds = []
        paths = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(master)
            tty.setraw(slave)
            paths.append(os.ttyname(slave))
            self._fds.append((master, slave))
        self.a_path, self.b_path = paths
        self.a = SerialTransport(paths[0], baudrate, timeout=timeout)
        self.b = SerialTransport(paths[1], baudrate, timeout=timeout) if open_b else None
        self._held = self._fds[1][1] if not open_b else None
        for i, (_, slave) in enumerate(self._fds):  # pyserial holds its own descriptors now
            if slave != self._held:
                os.close(slave)
        self._stop = False
        self._thread = threading.Thread(target=self._relay, name="serial-link", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        ma, mb = self._fds[0][0], self._fds[1][0]
        peer = {ma: mb, mb: ma}
        while not self._stop:
            try:
                ready, _, _ = select.select([ma, mb], [], [], 0.05)
                for fd in ready:
                    data = os.read(fd, 65536)
                    view = memoryview(data)
                    while view:
                        _, writable, _ = select.select([], [peer[fd]], [], 1.0)
                        if writable:
                            view = view[os.write(peer[fd], view):]
            except OSError:  # a port closed: the cable is cut
                return

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for port in (self.a, self.b):
            if port is not None:
                port.close()
        if self._held is not None:
            os.close(self._held)
        for master, _ in self._fds:
            try:
                os.close(master)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# TCP.

def _tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class TcpTransport(Transport):
    """A connected TCP socket (from `connect_tcp` or `TcpListener.accept`). Takes ownership of it.

    TCP_NODELAY is set: frames are small and request/reply, so Nagle's wait for more data would
    only add latency. `write_timeout` (None: wait for ever) bounds a write the peer does not read.
    """

    default_mtu = TCP_MTU

    def __init__(self, sock: socket.socket, *, timeout: float | None = DEFAULT_READ_TIMEOUT,
                 write_timeout: float | None = None, name: str | None = None):
        self._sock = sock
        self.timeout = timeout
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The socket timeout only governs sendall(): reads wait in select() and then recv() what
        # is there, which never blocks.
        sock.settimeout(write_timeout)
        if name is None:
            try:
                host, port = sock.getpeername()[:2]
                name = _tcp_url(host, port)
            except OSError:
                name = "tcp://?"
        self.name = name
        self._closed = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if self._closed:
            raise TransportClosed(f"{self.name}: write on a closed transport")
        try:
            self._sock.sendall(data)
        except socket.timeout as e:
            raise TransportError(f"{self.name}: write timed out") from e
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                raise TransportClosed(f"{self.name}: peer gone during write: {e}") from e
            raise TransportError(f"{self.name}: write failed: {e}") from e

    def read(self, max_bytes: int = 65536,
             timeout: float | None | _UseDefault = _DEFAULT) -> bytes:
        _check_max(max_bytes)
        t = self._timeout(timeout)
        if self._closed:
            raise TransportClosed(f"{self.name}: read on a closed transport")
        try:
            ready, _, _ = select.select([self._sock], [], [], t)
            if not ready:
                return b""
            data = self._sock.recv(max_bytes)
        except (BlockingIOError, socket.timeout):
            return b""
        except OSError as e:
            if e.errno in _GONE_ERRNOS or self._closed:
                raise TransportClosed(f"{self.name}: connection lost: {e}") from e
            raise TransportError(f"{self.name}: read failed: {e}") from e
        if not data:
            raise TransportClosed(f"{self.name}: peer closed the connection")
        return data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in select()
        except OSError:
            pass
        self._sock.close()


def connect_tcp(host: str, port: int, timeout: float = 5.0, *,
                read_timeout: float | None = DEFAULT_READ_TIMEOUT) -> TcpTransport:
    """Connect to host:port within `timeout` seconds; TransportError naming the URL if not."""
    url = _tcp_url(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise TransportError(f"cannot connect to {url!r}: {e}") from e
    return TcpTransport(sock, timeout=read_timeout, name=url)


class TcpListener:
    """A listening TCP socket (SO_REUSEADDR, so a restarted agent can rebind at once).

    Port 0 picks a free port; `address` tells which. `accept(timeout)` returns a TcpTransport, or
    None if no one connected within `timeout` seconds (None waits for ever), so a serve loop can
    poll a stop flag between calls, as `read` returns b"" on a timeout.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 8):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # create_server sets SO_REUSEADDR on POSIX (and not on Windows, where it means
            # something unsafe).
            self._sock = socket.create_server((host, port), family=family, backlog=backlog)
        except OSError as e:
            raise TransportError(f"cannot listen on {_tcp_url(host, port)}: {e}") from e

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        return _tcp_url(*self.address)

    def accept(self, timeout: float | None = None, *,
               read_timeout: float | None = DEFAULT_READ_TIMEOUT) -> TcpTransport | None:
        if self._sock.fileno() < 0:
            raise TransportClosed("TCP listener: accept on a closed listener")
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        try:
            sock, _ = self._sock.accept()
        except OSError as e:
            raise TransportError(f"{self.url}: accept failed: {e}") from e
        return TcpTransport(sock, timeout=read_timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# URLs.

def open_transport(url: str, *, timeout: float | None = DEFAULT_READ_TIMEOUT) -> Transport:
    """Open the transport a URL names (table in the module docstring); `timeout` is for reads.

    A malformed URL, an unknown scheme or a missing device raises TransportError naming the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise TransportError(f"transport URL must be a non-empty string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return SerialTransport(url, timeout=timeout)  # a bare device path
    scheme = scheme.lower()
    if scheme == "tcp":
        host, port = _parse_tcp(url)
        try:
            t = connect_tcp(host, port, read_timeout=timeout)
        except TransportError as e:
            raise TransportError(f"cannot connect to {url!r}: {e.__cause__ or e}") from e.__cause__
        t.name = url
        return t
    if scheme == "serial":
        device, _, query = rest.partition("?")
        if not device:
            raise TransportError(f"{url!r}: no device; expected serial://DEVICE, "
                                 "e.g. serial:///dev/ttyUSB0")
        baudrate = 115200
        for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
            if key != "baudrate":
                raise TransportError(f"{url!r}: unknown option {key!r} (only baudrate=N)")
            try:
                baudrate = int(values[-1])
                if baudrate <= 0:
                    raise ValueError
            except ValueError:
                raise TransportError(f"{url!r}: baudrate must be a positive integer, "
                                     f"not {values[-1]!r}") from None
        try:
            t = SerialTransport(device, baudrate, timeout=timeout)
        except TransportError as e:
            raise TransportError(f"cannot open {url!r}: {e.__cause__ or e}") from e.__cause__
        t.name = url
        return t
    return SerialTransport(url, timeout=timeout)  # pyserial's own URL schemes


def _parse_tcp(url: str) -> tuple[str, int]:
    expected = "expected tcp://HOST:PORT"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TransportError(f"{url!r}: {e}; {expected}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise TransportError(f"{url!r}: unexpected path, query or user; {expected}")
    if not parts.hostname:
        raise TransportError(f"{url!r}: no host; {expected}")
    if port is None:
        raise TransportError(f"{url!r}: no port; {expected}")
    if port == 0:
        raise TransportError(f"{url!r}: port 0 cannot be connected to; {expected}")
    return parts.hostname, port


# ------------------------------------------------------------------------------------------------
# Fault injection.

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
    """A transport that damages whole frames on their way out, reproducibly for a seed. For tests.

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
             timeout: float | None | _UseDefault = _DEFAULT) -> bytes:
        return self.inner.read(max_bytes, timeout)

    def close(self) -> None:
        self._pending.clear()
        self.inner.close()
