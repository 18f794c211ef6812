"""The transport interface: a bidirectional byte stream that knows nothing of frames.

Every transport moves opaque bytes; frames.py encodes the frames. This module holds the interface
(`Transport`), its errors, the MTUs a transport proposes in HELLO, and the small helpers the
implementations share.

Framing (DESIGN.md §6). Frames are COBS-encoded and terminated by one 0x00 byte; another module
encodes them, a transport only carries bytes. COBS rewrites a frame so that it contains no 0x00 at
all (cost: at most one byte per 254, plus one), so on the wire 0x00 means "end of frame" and
nothing else. That is what makes a raw serial line usable: a UART has no packet boundaries, a
receiver may start listening mid-frame, and a byte can be lost or garbled. Whatever happened, the
receiver throws away bytes up to the next 0x00 and is back in step; there is no escape state or
length field whose corruption could make it swallow the frames that follow. A garbled byte that
becomes 0x00 splits one frame in two, and a garbled delimiter merges two frames into one; either
way the results fail the AEAD check and are dropped, and only the frames touched are lost.

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

__all__ = [
    "DEFAULT",
    "DEFAULT_READ_TIMEOUT",
    "GONE_ERRNOS",
    "SERIAL_MTU",
    "TCP_MTU",
    "Transport",
    "TransportClosed",
    "TransportError",
    "UseDefault",
    "check_max_bytes",
    "errno_of",
]

DEFAULT_READ_TIMEOUT = 1.0  # seconds; each transport's `timeout` unless given to its constructor
SERIAL_MTU = 256
TCP_MTU = 16384

# errno values that mean the other end, or the device itself, is gone rather than busy.
GONE_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.EPIPE,
                         errno.ECONNRESET, errno.ECONNABORTED, errno.ESHUTDOWN, errno.ENOTCONN})


class TransportError(OSError):
    """A transport could not be opened, or a read or write failed. The message names the URL."""


class TransportClosed(TransportError):
    """The peer closed the connection, the device vanished, or this transport was closed."""


class UseDefault:
    """The type of `DEFAULT`: `read(timeout=DEFAULT)` waits the transport's own `timeout`."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = UseDefault()  # read(timeout=...) not given: use the transport's own `timeout`


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
             timeout: float | None | UseDefault = DEFAULT) -> bytes: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def _timeout(self, timeout: float | None | UseDefault) -> float | None:
        t = self.timeout if isinstance(timeout, UseDefault) else timeout
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


def check_max_bytes(max_bytes: int) -> None:
    """`read(max_bytes)` must ask for at least one byte."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")


def errno_of(exc: BaseException | None) -> int | None:
    """The errno of `exc` or of the OSError it was raised from (pyserial wraps them in messages)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None
