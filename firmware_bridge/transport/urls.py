"""`open_transport(url)`: the transport a URL names, chosen by its scheme as pyserial's
`serial_for_url` does (STYLE.md point 4):

    tcp://HOST:PORT             TcpTransport (TCP_NODELAY on); IPv6 as tcp://[::1]:PORT
    serial://DEVICE             SerialTransport(DEVICE), e.g. serial:///dev/ttyUSB0, serial://COM3;
                                ?baudrate=N sets the speed (default 115200)
    mqtt://HOST[:PORT]/DEVICE_ID?role=device|host&username=U&password_file=F
                                MqttTransport: the device's topic pair on an MQTT broker (QoS 1,
                                persistent session); mqtts:// adds TLS, &ca=CA.crt verifies it
    loop://, socket://, rfc2217://, spy://, hwgrep://, ...
                                SerialTransport(url): passed to pyserial untouched
    /dev/ttyUSB0 (no scheme)    SerialTransport(path)
"""
from __future__ import annotations

from typing import Callable

from .base import DEFAULT_READ_TIMEOUT, Transport, TransportError
from .mqtt import open_mqtt_url
from .serial import SerialTransport, open_serial_url
from .tcp import open_tcp_url

__all__ = ["SCHEMES", "open_transport"]

# Our own schemes; any other is pyserial's (its error names an unknown one).
SCHEMES: dict[str, Callable[..., Transport]] = {"tcp": open_tcp_url, "serial": open_serial_url,
                                                 "mqtt": open_mqtt_url, "mqtts": open_mqtt_url}


def open_transport(url: str, *, timeout: float | None = DEFAULT_READ_TIMEOUT) -> Transport:
    """Open the transport a URL names (table in the module docstring); `timeout` is for reads.

    A malformed URL, an unknown scheme or a missing device raises TransportError naming the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise TransportError(f"transport URL must be a non-empty string, got {url!r}")
    scheme, sep, _ = url.partition("://")
    if not sep:
        return SerialTransport(url, timeout=timeout)  # a bare device path
    opener = SCHEMES.get(scheme.lower())
    if opener is None:
        return SerialTransport(url, timeout=timeout)  # pyserial's own URL schemes
    return opener(url, timeout=timeout)
