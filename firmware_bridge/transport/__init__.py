"""Byte transports for the bridge, one module per kind of link, chosen by URL.

base.py is the interface (`Transport`, its errors, the MTUs); serial.py is anything pyserial opens
and a raw descriptor; pty.py builds serial lines out of pseudo-terminals (`pty_pair`, and
`SerialLink`, a virtual null-modem cable); tcp.py is TCP; mqtt.py is a device's pair of topics on
an MQTT broker; urls.py picks one by URL (`open_transport`). Every transport moves opaque bytes; frames.py encodes the frames. The
fault-injecting transport the tests use lives with them (tests/faults.py).
"""
from __future__ import annotations

from .base import (DEFAULT_READ_TIMEOUT, SERIAL_MTU, TCP_MTU, Transport, TransportClosed,
                   TransportError)
from .mqtt import MQTT_MTU, MqttTransport
from .pty import SerialLink, pty_pair
from .serial import FdTransport, SerialTransport
from .tcp import TcpListener, TcpTransport, connect_tcp
from .urls import open_transport

__all__ = [
    "DEFAULT_READ_TIMEOUT",
    "FdTransport",
    "MQTT_MTU",
    "MqttTransport",
    "SERIAL_MTU",
    "SerialLink",
    "SerialTransport",
    "TCP_MTU",
    "TcpListener",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "TransportError",
    "connect_tcp",
    "open_transport",
    "pty_pair",
]
