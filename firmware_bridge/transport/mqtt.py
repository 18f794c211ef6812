"""MQTT: the bridge's byte stream carried by a broker, one pair of topics per device.

    mqtt://HOST[:PORT]/DEVICE_ID?role=device&password_file=dev.pw
    mqtts://HOST[:PORT]/DEVICE_ID?role=host&username=edge_qmul_host&password_file=host.pw&ca=ca.crt

The frames are the same COBS-delimited, AEAD-sealed frames as on a serial line or TCP, sealed end to
end with the device's key: the broker routes them but can neither read nor forge them (a forged or
replayed frame is dropped by the device's AEAD and counters as on any other line). The broker's own
security (TLS, one username and password per device, an ACL keeping every device on its own topics)
keeps strangers off the topics; firmware_bridge/broker.py writes a mosquitto setup for a fleet.

Topics. `PREFIX/DEVICE_ID/to_device` (the host publishes, the device subscribes) and
`PREFIX/DEVICE_ID/to_host` (the reverse); `role=device|host` picks the side. Each `write` is one
MQTT message at QoS 1 (several for a write over `MAX_MESSAGE` bytes), and returns once the broker
acknowledged it (PUBACK), or raises TransportError after `write_timeout`. `read` returns the
payloads of received messages as one byte stream, in order: the COBS framing above is unchanged,
and a duplicate that QoS 1 may deliver is a replayed frame, which the channel drops.

Sessions. MQTT 5, standard features only (no broker's private extensions). MQTT 5 rather than
3.1.1 because a 3.1.1 broker drops a publish its ACL forbids and still acknowledges it, while an
MQTT 5 PUBACK carries the refusal (0x87 Not authorized), which `write` raises as TransportError.
The client id is fixed per (role, device), `eq-dev-ID` / `eq-host-ID`, with clean_start=False and
a session expiry of `SESSION_EXPIRY`, so the broker keeps the subscription and queues the QoS 1
messages published while this side is away, and delivers them when it comes back (the device must
have connected once, to make its subscription). A subscription the ACL forbids is refused in the
SUBACK by some brokers (raised when opening) and granted but never served by others (mosquitto's
acl_file checks reads at delivery): either way nothing of another device's topics arrives.
paho's network thread reconnects after a lost connection or a broker restart, and every (re)connect
subscribes again, so a broker that lost its sessions still gets the subscription. A lost connection
is not TransportClosed: `read` returns b"" meanwhile and `write` waits for the PUBACK; a write that
timed out stays queued in paho and is sent on reconnect (the channel's retries tolerate the copy).
Messages received but not yet read when the transport closes are lost, like bytes in a closed
socket. One client per id: a second client with the same id takes the session over and the first
is disconnected (MQTT's rule). mosquitto allows that even under another user's credentials; the
intruder then receives nothing (the ACL is checked at delivery) but the owner is pushed off and
messages queued meanwhile are dropped: a denial of service, not a leak.

Presence (role=device). The device's client sets a Last Will `offline` on `PREFIX/DEVICE_ID/status`
(QoS 1, retained) and publishes a retained `online` there on every connect, and `offline` when it
closes cleanly (a clean DISCONNECT drops the will): a host subscribed to `PREFIX/+/status` knows
which devices are up without sending them anything (firmware_bridge/fleet/presence.py), so nothing
piles up in an absent device's queue. A broker whose ACL forbids the topic refuses these publishes
in their PUBACK; that is harmless (the link works, only presence is missing).

MTU: `MQTT_MTU`, 16384 bytes, as TCP. The broker delivers each message whole, in order and
checked, so only the per-message cost matters: a PUBACK round trip through the broker per write,
which large frames amortise; 16 KiB (encoded at most 16450 bytes) stays far below the message
size limits brokers set, and bounds what a broker holds per queued message for an offline device.

Secrets. The password comes from `password_file` (mode 0600), never from the URL: `user:pass@`
is refused. It is handed to paho only, never kept, logged, put in a message or in `repr`.
"""
from __future__ import annotations

import logging
import os
import re
import ssl
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .base import (DEFAULT, DEFAULT_READ_TIMEOUT, TCP_MTU, Transport, TransportClosed, TransportError,
                   UseDefault, check_max_bytes)

__all__ = ["MAX_MESSAGE", "MQTT_MTU", "MqttSettings", "MqttTransport", "PREFIX", "check_device_id",
           "device_topics", "open_mqtt_url", "parse_mqtt_url", "read_password", "status_topic"]

log = logging.getLogger("firmware_bridge.transport.mqtt")

PREFIX = "edge_qmul"
MQTT_MTU = TCP_MTU
MAX_MESSAGE = 65536  # a longer write is published as several messages
SESSION_EXPIRY = 7 * 24 * 3600  # seconds the broker keeps an absent side's session and queue
ROLES = ("device", "host")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
OPTIONS = ("role", "username", "password_file", "ca", "client_id", "keepalive", "prefix")
# A device id is a topic level, a broker user name and a client id suffix: no MQTT wildcards (+ #),
# no level separator (/), nothing a password or ACL file would read as syntax.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


def check_device_id(device_id: str) -> str:
    """`device_id` if it is usable as a topic level and broker user name, else ValueError."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ValueError(f"device id {device_id!r}: expected 1-64 of A-Z a-z 0-9 _ . - "
                         "(starting with a letter or digit)")
    return device_id


def status_topic(device_id: str, prefix: str = PREFIX) -> str:
    """The retained presence topic of a device: `online` or `offline` (its Last Will)."""
    check_device_id(device_id)
    return f"{prefix}/{device_id}/status"


def device_topics(device_id: str, prefix: str = PREFIX) -> tuple[str, str]:
    """(to_device, to_host): the topics a device's frames travel on, host to device and back."""
    check_device_id(device_id)
    return f"{prefix}/{device_id}/to_device", f"{prefix}/{device_id}/to_host"


def _redact(url: str) -> str:
    """The URL with any user:password@ part replaced, for error messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)


@dataclass(frozen=True)
class MqttSettings:
    """What an mqtt:// or mqtts:// URL says (`parse_mqtt_url`); no password, only its file."""

    url: str
    host: str
    port: int
    device_id: str
    tls: bool = False
    role: str = "host"
    username: str | None = None
    password_file: str | None = None
    ca: str | None = None
    client_id: str | None = None
    keepalive: int = 60
    prefix: str = PREFIX


def parse_mqtt_url(url: str) -> MqttSettings:
    """The settings of mqtt[s]://HOST[:PORT]/DEVICE_ID[?options]; TransportError naming the URL.

    Options: role=device|host (default host), username=, password_file=, ca= (mqtts only),
    client_id=, keepalive= (seconds), prefix= (the topics' first levels, default edge_qmul).
    The username defaults to the device id for role=device. A password in the URL is refused.
    """
    shown = _redact(url)
    expected = "expected mqtt[s]://HOST[:PORT]/DEVICE_ID[?role=device|host&username=U&password_file=F]"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TransportError(f"{shown!r}: {e}; {expected}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise TransportError(f"{shown!r}: not an mqtt:// or mqtts:// URL; {expected}")
    if "@" in parts.netloc:
        raise TransportError(f"{shown!r}: credentials in the URL are refused (they end up in logs and "
                             "shell history); use ?username=NAME&password_file=PATH (a file of mode 600)")
    if not parts.hostname:
        raise TransportError(f"{shown!r}: no broker host; {expected}")
    if port == 0:
        raise TransportError(f"{shown!r}: port 0 cannot be connected to; {expected}")
    if parts.fragment:
        raise TransportError(f"{shown!r}: unexpected #fragment; {expected}")
    device_id = parts.path[1:] if parts.path.startswith("/") else ""
    if not device_id:
        raise TransportError(f"{shown!r}: no device id in the path; {expected}")
    try:
        check_device_id(device_id)
    except ValueError as e:
        raise TransportError(f"{shown!r}: {e}") from None
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise TransportError(f"{shown!r}: malformed query ({e}); {expected}") from None
    opts: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTIONS:
            raise TransportError(f"{shown!r}: unknown option {key!r}; known: {', '.join(OPTIONS)}"
                                 + ("; a password goes in a file: password_file=PATH" if "pass" in key else ""))
        if key in opts:
            raise TransportError(f"{shown!r}: option {key!r} given twice")
        if not value:
            raise TransportError(f"{shown!r}: option {key!r} is empty")
        opts[key] = value
    role = opts.get("role", "host")
    if role not in ROLES:
        raise TransportError(f"{shown!r}: role {role!r}: expected device or host")
    if "ca" in opts and scheme != "mqtts":
        raise TransportError(f"{shown!r}: ca= needs TLS: use mqtts://")
    keepalive = opts.get("keepalive", "60")
    if not keepalive.isdigit() or not 5 <= int(keepalive) <= 65535:
        raise TransportError(f"{shown!r}: keepalive {keepalive!r}: expected seconds, 5 to 65535")
    prefix = opts.get("prefix", PREFIX)
    if not _PREFIX.match(prefix):
        raise TransportError(f"{shown!r}: prefix {prefix!r}: expected topic levels without wildcards")
    username = opts.get("username", device_id if role == "device" else None)
    return MqttSettings(url=url, host=parts.hostname, port=port or DEFAULT_PORTS[scheme],
                        device_id=device_id, tls=scheme == "mqtts", role=role, username=username,
                        password_file=opts.get("password_file"), ca=opts.get("ca"),
                        client_id=opts.get("client_id"), keepalive=int(keepalive), prefix=prefix)


def read_password(path: str, url: str) -> str:
    """The password in `path` (one line); refused if the file is readable by group or others."""
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TransportError(f"{url!r}: password file {path}: readable by others "
                                 f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except TransportError:
        raise
    except OSError as e:
        raise TransportError(f"{url!r}: password file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TransportError(f"{url!r}: password file {path}: not UTF-8 text") from None
    if not password or "\n" in password:
        raise TransportError(f"{url!r}: password file {path}: expected one non-empty line")
    return password


class MqttTransport(Transport):
    """One side (`role`) of a device's topic pair on a broker, connected and subscribed.

    The constructor connects, waits for the broker's CONNACK and SUBACK within `connect_timeout`,
    then leaves the connection to paho's network thread. TransportError names the URL and the
    broker's reason when it refuses the connection (bad credentials) or the subscription (ACL).
    """

    default_mtu = MQTT_MTU

    def __init__(self, settings: MqttSettings, password: str | None = None, *,
                 timeout: float | None = DEFAULT_READ_TIMEOUT, write_timeout: float = 10.0,
                 connect_timeout: float = 10.0, reconnect_delay: tuple[float, float] = (0.5, 10.0)):
        s = settings
        self.settings, self.name, self.timeout, self.write_timeout = s, s.url, timeout, write_timeout
        to_device, to_host = device_topics(s.device_id, s.prefix)
        self.topic_in, self.topic_out = (to_device, to_host) if s.role == "device" else (to_host, to_device)
        self.client_id = s.client_id or f"eq-{'dev' if s.role == 'device' else 'host'}-{s.device_id}"
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._closed = False
        self._acked: dict[int, tuple[int, str]] = {}  # mid -> (_acks at its PUBACK, refusal or "")
        self._acks = 0
        self._connack: str | None = None  # None: no CONNACK yet; "": accepted; else the refusal
        self._suback: str | None = None
        self._sub_mid: int | None = None
        self.connected = False
        self.stats = {"connects": 0, "messages_in": 0, "messages_out": 0}
        c = self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                       protocol=mqtt.MQTTv5)
        c.enable_logger(log)  # paho's lines name packet flags, never the password
        c.reconnect_delay_set(*reconnect_delay)
        self.topic_status = status_topic(s.device_id, s.prefix) if s.role == "device" else None
        if self.topic_status:
            c.will_set(self.topic_status, b"offline", qos=1, retain=True)
        if s.username is not None:
            c.username_pw_set(s.username, password)
        if s.tls:
            try:
                c.tls_set_context(ssl.create_default_context(cafile=s.ca))
            except (OSError, ssl.SSLError) as e:
                raise TransportError(f"{self.name!r}: CA certificate {s.ca}: {e}") from None
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_subscribe, c.on_message, c.on_publish = self._on_subscribe, self._on_message, self._on_publish
        try:
            self._open(connect_timeout)
        except BaseException:
            self._closed = True
            c.disconnect()
            sock = c.socket()
            if sock is not None:
                sock.close()
            raise
        c.loop_start()

    def _open(self, connect_timeout: float) -> None:
        s, c = self.settings, self._client
        try:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY
            c.connect(s.host, s.port, keepalive=s.keepalive, clean_start=False, properties=props)
        except (OSError, ValueError) as e:  # ssl errors are OSErrors
            raise TransportError(f"cannot connect to {self.name!r}: {e}") from None
        deadline = time.monotonic() + connect_timeout
        while self._connack is None or (not self._connack and self._suback is None):
            if time.monotonic() > deadline:
                what = "CONNACK" if self._connack is None else "SUBACK"
                raise TransportError(f"{self.name!r}: no {what} from the broker within {connect_timeout} s")
            rc = c.loop(0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS and not self._connack:  # (a refusal is reported below)
                raise TransportError(f"{self.name!r}: the connection was lost while opening: "
                                     f"{mqtt.error_string(rc)}")
        if self._connack:
            raise TransportError(f"{self.name!r}: the broker refused the connection: {self._connack} "
                                 f"(user {s.username!r}, client id {self.client_id!r})")
        if self._suback:
            raise TransportError(f"{self.name!r}: the broker refused the subscription to "
                                 f"{self.topic_in!r}: {self._suback} (user {s.username!r}; the ACL "
                                 "lets a device use only its own topics)")

    # --- paho callbacks, on its network thread (or on the opening thread during _open) ---
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connack = str(reason_code)
            log.warning("%s: the broker refused the connection: %s", self.name, reason_code)
            return
        self._connack = ""
        self.connected = True
        self.stats["connects"] += 1
        log.info("%s: connected as %s (session present: %s)", self.name, self.client_id,
                 flags.session_present)
        # Subscribed on every connect: a broker that lost the session (no persistence) would
        # otherwise never deliver again; subscribing again to a kept subscription is harmless.
        self._sub_mid = client.subscribe(self.topic_in, qos=1)[1]
        if self.topic_status:  # after the subscription: a host that sees `online` can be answered
            client.publish(self.topic_status, b"online", qos=1, retain=True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._sub_mid:
            return
        failed = [rc for rc in reason_codes if rc.is_failure]
        self._suback = f"{failed[0]} (SUBACK 0x{failed[0].value:02x})" if failed else ""
        if failed:
            log.error("%s: the broker refused the subscription to %s: %s", self.name, self.topic_in,
                      self._suback)

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self._buf += message.payload
            self.stats["messages_in"] += 1
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._acks += 1
            self._acked[mid] = (self._acks, str(reason_code) if reason_code.is_failure else "")
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False
        if not self._closed:
            log.warning("%s: connection to the broker lost (%s); reconnecting", self.name, reason_code)

    # --- Transport ---
    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if self._closed:
            raise TransportClosed(f"{self.name}: write on a closed transport")
        data = bytes(data)
        if not data:
            return
        with self._cond:
            start = self._acks
        mids = []
        for off in range(0, len(data), MAX_MESSAGE):
            info = self._client.publish(self.topic_out, data[off:off + MAX_MESSAGE], qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued
                raise TransportError(f"{self.name}: publish failed: {mqtt.error_string(info.rc)}")
            mids.append(info.mid)
        self.stats["messages_out"] += len(mids)
        # A PUBACK counted after `start` for the mid is this message's: paho never hands out a mid
        # still in flight, so an earlier holder of the mid was acknowledged before `start`.
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._closed or all(self._acked.get(m, (-1,))[0] > start for m in mids),
                self.write_timeout)
            refused = [self._acked[m][1] for m in mids if m in self._acked and self._acked[m][1]]
        if self._closed:
            raise TransportClosed(f"{self.name}: closed during a write")
        if done and refused:
            raise TransportError(f"{self.name}: the broker refused the publish to {self.topic_out!r}: "
                                 f"{refused[0]} (user {self.settings.username!r}; the ACL lets a "
                                 "device use only its own topics)")
        if not done:
            raise TransportError(f"{self.name}: the broker did not acknowledge a write within "
                                 f"{self.write_timeout} s (connected: {self.connected}); paho "
                                 "keeps it queued and sends it when the connection is back")

    def read(self, max_bytes: int = 65536,
             timeout: float | None | UseDefault = DEFAULT) -> bytes:
        check_max_bytes(max_bytes)
        t = self._timeout(timeout)
        with self._cond:
            if not self._closed and not self._buf:
                self._cond.wait_for(lambda: self._closed or self._buf, t)
            if self._closed:
                raise TransportClosed(f"{self.name}: read on a closed transport")
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
        return data

    def close(self) -> None:
        """Disconnect cleanly; the broker keeps the session (and queues for it) until we return."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self.connected:  # DISCONNECT goes out through the network thread, then it stops
            if self.topic_status:  # a clean DISCONNECT drops the will: say it ourselves
                info = self._client.publish(self.topic_status, b"offline", qos=1, retain=True)
                try:
                    info.wait_for_publish(min(2.0, self.write_timeout))
                except (RuntimeError, ValueError):  # the connection went meanwhile: the will says it
                    pass
            self._client.disconnect()
            self._client.loop_stop()
        else:  # stop the reconnecting thread first (paho logs an error if it loops unconnected)
            self._client.loop_stop()
            self._client.disconnect()
        # paho keeps its wake-up socket pair until the client is garbage-collected (it sits in a
        # cycle); release it now, as paho's own __del__ does, so a process opening and closing many
        # transports stays below select()'s fd limit of 1024
        self._client._reset_sockets(sockpair_only=True)


def open_mqtt_url(url: str, *, timeout: float | None = DEFAULT_READ_TIMEOUT, **kwargs) -> MqttTransport:
    """Connect to the broker an mqtt[s]:// URL names, as its role, subscribed to its topic."""
    settings = parse_mqtt_url(url)
    password = read_password(settings.password_file, url) if settings.password_file else None
    return MqttTransport(settings, password, timeout=timeout, **kwargs)
