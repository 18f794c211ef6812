"""Serial lines: anything pyserial opens (a device path or one of its URLs), and a raw descriptor.

`SerialTransport` wraps `serial.serial_for_url`, so a device path (/dev/ttyUSB0, /dev/pts/3, COM3)
and pyserial's own URLs (loop://, socket://, rfc2217://, spy://, hwgrep://, ...) all work;
`open_serial_url` parses our serial://DEVICE?baudrate=N form. `FdTransport` reads and writes a
file descriptor, for the master end of a pty, which pyserial cannot open by path.
"""
from __future__ import annotations

import os
import select
import time
import urllib.parse

import serial

from .base import (DEFAULT, DEFAULT_READ_TIMEOUT, GONE_ERRNOS, SERIAL_MTU, Transport, TransportClosed,
                   TransportError, UseDefault, check_max_bytes, errno_of)

__all__ = ["FdTransport", "SerialTransport", "open_serial_url"]

DEFAULT_BAUDRATE = 115200


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

    def __init__(self, url_or_port: str, baudrate: int = DEFAULT_BAUDRATE, *,
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
            if isinstance(e, serial.PortNotOpenError) or errno_of(e) in GONE_ERRNOS:
                raise TransportClosed(f"{self.name}: port gone during write: {e}") from e
            raise TransportError(f"{self.name}: write failed: {e}") from e

    def read(self, max_bytes: int = 65536,
             timeout: float | None | UseDefault = DEFAULT) -> bytes:
        check_max_bytes(max_bytes)
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


def open_serial_url(url: str, *, timeout: float | None = DEFAULT_READ_TIMEOUT) -> SerialTransport:
    """Open serial://DEVICE[?baudrate=N] (default 115200); the transport is named `url`.

    A missing device, an unknown option or a bad baud rate raises TransportError naming the URL.
    """
    device, _, query = url.partition("://")[2].partition("?")
    if not device:
        raise TransportError(f"{url!r}: no device; expected serial://DEVICE, "
                             "e.g. serial:///dev/ttyUSB0")
    baudrate = DEFAULT_BAUDRATE
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
                if e.errno in GONE_ERRNOS:
                    raise TransportClosed(f"{self.name}: peer gone during write: {e}") from e
                raise TransportError(f"{self.name}: write failed: {e}") from e
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError(f"{self.name}: write timed out with {len(view)} bytes unsent")
            select.select([], [fd], [], left)

    def read(self, max_bytes: int = 65536,
             timeout: float | None | UseDefault = DEFAULT) -> bytes:
        check_max_bytes(max_bytes)
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
                if e.errno in GONE_ERRNOS:
                    raise TransportClosed(f"{self.name}: peer gone: {e}") from e
                raise TransportError(f"{self.name}: read failed: {e}") from e
            if not data:
                raise TransportClosed(f"{self.name}: end of file")
            return data

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
