"""Presence: which devices are up, as their brokers say, without sending them anything.

The idea: over MQTT every device keeps a retained `online` on PREFIX/ID/status while connected, and
its Last Will turns it `offline` when it goes (transport/mqtt.py). The runner subscribes to
PREFIX/+/status on each broker its devices use (one watcher per broker and host user, a fresh
client id and a clean session: the retained messages give the current state at once), so it
tries a device only once it is online, and at once when it comes back, instead of polling it with
HELLOs that would pile up in its queue. A device it has no word on (another transport, an older
agent) is None: the runner polls it as before.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from ..transport import TransportError
from ..transport.mqtt import MqttSettings, parse_mqtt_url, read_password
from .registry import Registry

__all__ = ["Presence"]

log = logging.getLogger("firmware_bridge.fleet.presence")


class _Watcher:
    """One broker's PREFIX/+/status, followed by a paho client on its own network thread."""

    def __init__(self, s: MqttSettings, owner: "Presence", connect_timeout: float = 10.0) -> None:
        self.settings, self.owner = s, owner
        self.client = c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                      client_id=f"eq-host-presence-{os.urandom(4).hex()}",
                                      protocol=mqtt.MQTTv5)
        c.enable_logger(log)
        if s.username is not None:
            c.username_pw_set(s.username, read_password(s.password_file, s.url) if s.password_file else None)
        if s.tls:
            try:
                c.tls_set_context(ssl.create_default_context(cafile=s.ca))
            except (OSError, ssl.SSLError) as e:
                raise TransportError(f"{s.url!r}: CA certificate {s.ca}: {e}") from None
        self.connected, self.ready = threading.Event(), threading.Event()
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self.ready.set()  # the retained states follow the SUBACK
        c.on_message = self._on_message
        try:
            c.connect(s.host, s.port, keepalive=s.keepalive, clean_start=True)
        except (OSError, ValueError) as e:
            raise TransportError(f"presence: cannot connect to {s.host}:{s.port}: {e}") from None
        c.loop_start()
        if not self.connected.wait(connect_timeout):
            log.warning("presence: no CONNACK from %s:%s yet; devices are polled meanwhile", s.host, s.port)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("presence: %s:%s refused the connection: %s", self.settings.host, self.settings.port,
                        reason_code)
            return
        client.subscribe(f"{self.settings.prefix}/+/status", qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        parts = message.topic.split("/")
        if len(parts) >= 2 and message.payload in (b"online", b"offline"):
            self.owner._set((self.settings.prefix, parts[-2]), message.payload == b"online")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Presence:
    """`online(device_id)`: True / False as its broker last said, None when unknown."""

    def __init__(self) -> None:
        self._state: dict[tuple[str, str], bool] = {}
        self._changed: dict[tuple[str, str], float] = {}
        self._where: dict[str, tuple[str, str]] = {}  # device id -> (prefix, id) on its broker
        self._watchers: dict[tuple, _Watcher] = {}
        self._cond = threading.Condition()

    @classmethod
    def for_registry(cls, registry: Registry) -> "Presence":
        """Watchers for the brokers of the registry's mqtt(s):// devices."""
        p = cls()
        for dev in registry.devices():
            if dev["url"].lower().startswith(("mqtt://", "mqtts://")):
                try:
                    p.watch(dev["id"], parse_mqtt_url(dev["url"]))
                except TransportError as e:
                    log.warning("presence for %s: %s; it is polled instead", dev["id"], e)
        for w in p._watchers.values():
            w.ready.wait(2.0)
        time.sleep(0.1)  # the retained states arrive right after the SUBACK
        return p

    def watch(self, device_id: str, s: MqttSettings) -> None:
        broker = (s.host, s.port, s.tls, s.username, s.password_file, s.ca, s.prefix)
        if broker not in self._watchers:
            self._watchers[broker] = _Watcher(s, self)
        self._where[device_id] = (s.prefix, s.device_id)

    def _set(self, key: tuple[str, str], online: bool) -> None:
        with self._cond:
            if self._state.get(key) != online:
                self._state[key] = online
                self._changed[key] = time.monotonic()
                self._cond.notify_all()

    def online(self, device_id: str) -> bool | None:
        with self._cond:
            return self._state.get(self._where.get(device_id, ("", device_id)))

    def changed(self, device_id: str) -> float:
        """When the device's presence last changed (time.monotonic), 0 if never."""
        with self._cond:
            return self._changed.get(self._where.get(device_id, ("", device_id)), 0.0)

    def wait_change(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def close(self) -> None:
        for w in self._watchers.values():
            w.close()
        self._watchers.clear()
