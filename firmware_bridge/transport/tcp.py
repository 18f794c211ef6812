"""TCP: a connected socket as a transport, a listener that accepts them, and tcp://HOST:PORT URLs.

TCP already delivers bytes in order and checksummed, so its frames are large (`TCP_MTU`) and
TCP_NODELAY is on: frames are small request/reply exchanges that Nagle's algorithm would only delay.
IPv6 hosts are written in brackets: tcp://[::1]:PORT.
"""
from __future__ import annotations

import select
import socket
import urllib.parse

from .base import (DEFAULT, DEFAULT_READ_TIMEOUT, GONE_ERRNOS, TCP_MTU, Transport, TransportClosed,
                   TransportError, UseDefault, check_max_bytes)

__all__ = ["TcpListener", "TcpTransport", "connect_tcp", "open_tcp_url", "parse_tcp_url", "tcp_url"]


def tcp_url(host: str, port: int) -> str:
    """tcp://HOST:PORT, with an IPv6 host in brackets."""
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
                name = tcp_url(host, port)
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
            if e.errno in GONE_ERRNOS:
                raise TransportClosed(f"{self.name}: peer gone during write: {e}") from e
            raise TransportError(f"{self.name}: write failed: {e}") from e

    def read(self, max_bytes: int = 65536,
             timeout: float | None | UseDefault = DEFAULT) -> bytes:
        check_max_bytes(max_bytes)
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
            if e.errno in GONE_ERRNOS or self._closed:
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
    url = tcp_url(host, port)
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
            raise TransportError(f"cannot listen on {tcp_url(host, port)}: {e}") from e

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        return tcp_url(*self.address)

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


def parse_tcp_url(url: str) -> tuple[str, int]:
    """(host, port) of tcp://HOST:PORT; TransportError naming the URL for anything else."""
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


def open_tcp_url(url: str, *, timeout: float | None = DEFAULT_READ_TIMEOUT) -> TcpTransport:
    """Connect to tcp://HOST:PORT; the transport is named `url`, `timeout` is for its reads."""
    host, port = parse_tcp_url(url)
    try:
        t = connect_tcp(host, port, read_timeout=timeout)
    except TransportError as e:
        raise TransportError(f"cannot connect to {url!r}: {e.__cause__ or e}") from e.__cause__
    t.name = url
    return t
