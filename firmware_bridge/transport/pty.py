"""Serial lines inside one machine, made of pseudo-terminals: a real line with no hardware.

`pty_pair` gives both ends of one pty (pyserial on the slave device, the master as a raw
descriptor). `SerialLink` is a virtual null-modem cable: two ptys and a relay thread, so pyserial
opens a device path on both ends, as a host's USB-serial adapter and a board's UART would; the
demo (tools/demo.py) runs its device agent as a separate process on one end of it.
"""
from __future__ import annotations

import os
import select
import threading
import tty

from .base import DEFAULT_READ_TIMEOUT
from .serial import FdTransport, SerialTransport

__all__ = ["SerialLink", "pty_pair"]


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
    """A virtual null-modem cable: two serial ports joined end to end, pyserial on both.

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
        for _, slave in self._fds:  # pyserial holds its own descriptors now
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
