"""The MQTT transport against a real mosquitto (tests/mosquitto.py) on 127.0.0.1, with the config,
passwords, ACL and TLS certificates firmware_bridge.broker writes: a real agent served over
mqtts://, queued delivery to an absent device, a broker restart, the ACL's refusals, a frame sealed
with another device's key, no password in logs, errors or reprs, and bad URLs."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from bridge_helpers import OTHER_PSK, PSK, wait_until
from mosquitto import mosquitto_broker  # noqa: F401 - a pytest fixture, used by name
from firmware_bridge.broker import HOST_USER, hash_password, write_broker_config
from firmware_bridge.channel import Client, Server
from firmware_bridge.device import Agent
from firmware_bridge.frames import DIRECTION_HOST_TO_DEVICE as H2D, MsgType, Sealer, hello_sealer
from firmware_bridge.host import DeviceClient
from firmware_bridge.transport import MqttTransport, Transport, TransportError, open_transport
from firmware_bridge.transport.mqtt import parse_mqtt_url

MODEL = Path(__file__).parent / "fixtures" / "digits_cnn.tflite"
DEV_A, DEV_B = "board-a", "board-b"


@pytest.fixture
def broker(mosquitto_broker):  # noqa: F811 - the fixture above
    return mosquitto_broker([DEV_A, DEV_B], tls=True)


def read_exactly(t: Transport, n: int, overall: float = 10.0) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + overall
    while len(got) < n:
        assert time.monotonic() < deadline, f"{t.name}: {len(got)} of {n} bytes after {overall}s: {bytes(got)!r}"
        got += t.read(n - len(got), timeout=0.2)
    return bytes(got)


class AgentThread:
    """A real Agent (state dir `state`) served by a channel.Server over `transport`, in a thread."""

    def __init__(self, transport: Transport, state: Path, psk: bytes = PSK) -> None:
        self.transport, self.agent = transport, Agent(state)
        self.server = Server(transport, psk, self.agent.handle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.server.serve, args=(self._stop.is_set,), daemon=True)
        self._thread.start()

    def __enter__(self) -> "AgentThread":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.transport.close()
        self.agent.close()


def passwords(broker) -> list[str]:
    return [p.read_text().strip() for p in broker.config.password_files.values()]


# ------------------------------------------------------------------ 1. a real agent over mqtts://

def test_agent_over_mqtts_hello_ping_info_put_get_and_no_secret_logged(broker, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, paho's lines included
    device = open_transport(broker.url(DEV_A, "device"))
    assert isinstance(device, MqttTransport) and device.default_mtu == 16384
    with AgentThread(device, tmp_path / "state"):
        host = open_transport(broker.url(DEV_A, "host"), timeout=0.2)
        client = Client(host, PSK, timeout=3.0)
        session = client.connect()  # HELLO / HELLO_ACK through the broker
        assert session.mtu == 16384
        dev = DeviceClient(client)
        assert "time" in dev.ping()
        assert dev.info()["model_sha256"] is None
        data = MODEL.read_bytes()
        assert dev.push_model(MODEL)["active"] is True
        assert dev.info()["model_sha256"] == hashlib.sha256(data).hexdigest()
        assert dev.pull() == data
        assert client.stats["retries"] == 0 and client.stats["dropped"] == 0
        reprs = [repr(host), repr(device), repr(client), str(vars(host)), str(vars(device))]
        host.close()
    secrets_ = passwords(broker) + [PSK.hex(), repr(PSK)]
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "connected as eq-dev-board-a" in logged and "Sending PUBLISH" in logged
    for secret in secrets_:
        assert secret not in logged
        assert secret not in "\n".join(reprs)
        assert secret not in broker.log.read_text()


# ------------------------------------------------ 2. queued delivery to an absent device (and disk)

def test_bytes_published_while_the_device_is_away_are_delivered_when_it_returns(broker):
    device = open_transport(broker.url(DEV_A, "device"))
    device.close()  # the broker keeps its session: the subscription, and a queue
    host = open_transport(broker.url(DEV_A, "host"))
    host.write(b"first\x00")
    host.write(b"second\x00")
    device = open_transport(broker.url(DEV_A, "device"))  # the same client id: eq-dev-board-a
    assert device.client_id == "eq-dev-board-a"
    assert read_exactly(device, 13) == b"first\x00second\x00"
    # Away again, and the broker restarts meanwhile: the queue was saved to disk (persistence).
    device.close()
    host.write(b"across a restart\x00")
    broker.restart()
    device = open_transport(broker.url(DEV_A, "device"))
    assert read_exactly(device, 17) == b"across a restart\x00"
    device.close()
    host.close()


# ------------------------------------------------------------- 3. the broker restarts mid-session

def test_broker_restart_mid_session_the_agent_and_host_carry_on(broker, tmp_path):
    device = open_transport(broker.url(DEV_A, "device"))
    with AgentThread(device, tmp_path / "state"):
        host = open_transport(broker.url(DEV_A, "host"), timeout=0.2)
        client = Client(host, PSK, timeout=3.0)
        client.connect()
        assert "time" in client.request(MsgType.PING)
        connects = (device.stats["connects"], host.stats["connects"])
        broker.restart()
        # The writes wait for the reconnect (paho's loop) and the PUBACK; the same session goes on.
        assert "time" in client.request(MsgType.PING)
        assert client.request(MsgType.INFO)["jobs"] == 0
        wait_until(lambda: device.connected and host.connected)
        assert (device.stats["connects"], host.stats["connects"]) == (connects[0] + 1, connects[1] + 1)
        host.write(b"\x00")  # and plain bytes written after the restart arrive
        host.close()


# --------------------------------------------------------------------------- 4. the broker's ACL

def test_a_device_cannot_read_or_write_another_devices_topics(broker):
    b_device = open_transport(broker.url(DEV_B, "device"))
    b_host = open_transport(broker.url(DEV_B, "host"))
    a_pw = broker.config.password_files[DEV_A]
    base = f"mqtts://127.0.0.1:{broker.port}/{DEV_B}?username={DEV_A}&password_file={a_pw}&ca={broker.config.ca}"
    # A's credentials on B's topics, both ways round. mosquitto grants the subscriptions (its
    # acl_file checks reads when it delivers) and refuses every publish: MQTT 5's PUBACK says so.
    as_b = open_transport(base + "&role=device&client_id=intruder-1")    # reads to_device, writes to_host
    as_host = open_transport(base + "&role=host&client_id=intruder-2")   # reads to_host, writes to_device
    for t in (as_b, as_host):
        with pytest.raises(TransportError, match="refused the publish .*Not authorized") as e:
            t.write(b"forged by A\x00")
        assert not any(pw in str(e.value) or pw in repr(t) for pw in passwords(broker))
    # What the real host sends B, and what B sends the host, never reach A's subscriptions; the
    # FIFO topics prove A's refused publishes went nowhere: the next legitimate bytes come first.
    b_host.write(b"for B\x00")
    b_device.write(b"from B\x00")
    assert read_exactly(b_device, 6) == b"for B\x00"
    assert read_exactly(b_host, 7) == b"from B\x00"
    assert as_b.read(timeout=0.5) == b"" and as_host.read(timeout=0.1) == b""
    for t in (as_b, as_host, b_device, b_host):
        t.close()


def test_taking_over_another_devices_client_id_gets_none_of_its_messages(broker):
    """MQTT lets a client with B's client id take B's persistent session over (mosquitto even under
    A's user name): the ACL still keeps every message for B away from A's credentials."""
    b_device = open_transport(broker.url(DEV_B, "device"))
    b_device.close()
    b_host = open_transport(broker.url(DEV_B, "host"))
    b_host.write(b"queued for B\x00")
    a_pw = broker.config.password_files[DEV_A]
    thief = open_transport(f"mqtts://127.0.0.1:{broker.port}/{DEV_B}?role=device&username={DEV_A}"
                           f"&password_file={a_pw}&ca={broker.config.ca}")  # client id eq-dev-board-b
    assert thief.client_id == "eq-dev-board-b"
    b_host.write(b"more for B\x00")
    assert thief.read(timeout=0.7) == b""
    thief.close()
    b_host.close()


def test_wrong_password_is_refused_by_the_broker(broker, tmp_path):
    bad = tmp_path / "bad.pw"
    bad.write_text("not-the-password\n")
    bad.chmod(0o600)
    url = (f"mqtts://127.0.0.1:{broker.port}/{DEV_A}?role=device&password_file={bad}"
           f"&ca={broker.config.ca}")
    with pytest.raises(TransportError, match="refused the connection: (Not authorized|Bad user name)") as e:
        open_transport(url)
    assert url in str(e.value) and "not-the-password" not in str(e.value)
    # without the broker's CA, TLS refuses the broker
    with pytest.raises(TransportError, match="cannot connect.*CERTIFICATE_VERIFY_FAILED"):
        open_transport(broker.url(DEV_A, "device").replace(f"&ca={broker.config.ca}", ""))


# ------------------------------------------- 5. a frame sealed with another device's key is refused

def test_frames_sealed_with_another_devices_key_are_dropped_by_the_device(broker, tmp_path):
    device = open_transport(broker.url(DEV_A, "device"))
    with AgentThread(device, tmp_path / "state") as a:
        host = open_transport(broker.url(DEV_A, "host"), timeout=0.2)  # the broker lets it through
        host.write(hello_sealer(OTHER_PSK, H2D, 4096).seal(MsgType.HELLO, {"nonce": os.urandom(16),
                                                                           "mtu": 4096, "version": 1}))
        host.write(Sealer(OTHER_PSK, 1, H2D, 4096).seal(MsgType.PING, {"rid": b"r" * 16, "body": {}}))
        wait_until(lambda: a.server.stats["frames"] == 2)
        assert a.server.stats["rejected"] == {"auth": 1, "session": 1}
        assert a.server.session is None and a.server.stats["handled"] == 0
        assert host.read(timeout=0.5) == b""  # silence: no HELLO_ACK, no ERROR
        client = Client(host, PSK, timeout=3.0)  # the device's own key still works
        client.connect()
        assert "time" in client.request(MsgType.PING)
        host.close()


# -------------------------------------------------------------------------------- 7. bad URLs

@pytest.mark.parametrize("url,message", [
    ("mqtt://broker:1883", "no device id"),
    ("mqtt://broker:1883/", "no device id"),
    ("mqtt:///dev1", "no broker host"),
    ("mqtt://broker:0/dev1", "port 0"),
    ("mqtt://broker:99999/dev1", "out of range"),
    ("mqtt://broker/a/b", "device id 'a/b'"),
    ("mqtt://broker/dev+1", "device id 'dev\\+1'"),
    ("mqtt://broker/dev1?role=admin", "role 'admin'"),
    ("mqtt://broker/dev1?colour=red", "unknown option 'colour'"),
    ("mqtt://broker/dev1?password=hunter2", "password goes in a file"),
    ("mqtt://broker/dev1?role=device&role=host", "given twice"),
    ("mqtt://broker/dev1?username=", "'username' is empty"),
    ("mqtt://broker/dev1?ca=/x.crt", "ca= needs TLS"),
    ("mqtt://broker/dev1?keepalive=1", "keepalive '1'"),
    ("mqtt://broker/dev1?prefix=a/%23", "prefix 'a/#'"),
    ("mqtt://broker/dev1#frag", "fragment"),
])
def test_bad_mqtt_urls_give_clear_errors_naming_them(url, message):
    with pytest.raises(TransportError, match=message) as e:
        open_transport(url)
    assert url.split("?")[0].split("#")[0] in str(e.value)


def test_a_password_in_the_url_is_refused_and_never_echoed():
    with pytest.raises(TransportError, match="credentials in the URL are refused.*password_file") as e:
        open_transport("mqtts://board-a:s3cret-pw@broker:8883/board-a")
    assert "s3cret-pw" not in str(e.value) and "mqtts://***@broker:8883/board-a" in str(e.value)


def test_password_file_must_exist_and_be_private(tmp_path):
    missing = tmp_path / "missing.pw"
    with pytest.raises(TransportError, match="password file .*missing.pw: No such file"):
        open_transport(f"mqtt://127.0.0.1:1/board-a?role=device&password_file={missing}")
    shared = tmp_path / "shared.pw"
    shared.write_text("pw\n")
    shared.chmod(0o644)
    with pytest.raises(TransportError, match="readable by others .*chmod 600"):
        open_transport(f"mqtt://127.0.0.1:1/board-a?role=device&password_file={shared}")


def test_url_defaults():
    s = parse_mqtt_url("mqtts://broker/board-a?role=device")
    assert (s.host, s.port, s.tls, s.username, s.role, s.keepalive) == ("broker", 8883, True, "board-a",
                                                                        "device", 60)
    s = parse_mqtt_url("mqtt://broker/board-a")
    assert (s.port, s.tls, s.username, s.role) == (1883, False, None, "host")


# ------------------------------------------------------------------------ the generated config

def test_plain_mqtt_listener_and_config_rewrites_keep_passwords(mosquitto_broker):  # noqa: F811
    broker = mosquitto_broker([DEV_A], tls=False)
    before = passwords(broker)
    cfg = write_broker_config(broker.config.directory, [DEV_B], port=broker.port, tls=False,
                              run_as=None if os.geteuid() else "root")
    broker.config = cfg
    assert passwords(broker)[:2] == before and set(cfg.password_files) == {HOST_USER, DEV_A, DEV_B}
    for name in ("passwd", "acl", f"passwords/{DEV_A}.pw"):
        assert (cfg.directory / name).stat().st_mode & 0o077 == 0, name
    broker.restart()
    device = open_transport(broker.url(DEV_B, "device"))
    host = open_transport(broker.url(DEV_B, "host"))
    assert broker.url(DEV_B, "host").startswith("mqtt://")
    host.write(b"plain\x00")
    assert read_exactly(device, 6) == b"plain\x00"
    device.close()
    host.close()
    assert hash_password("x", b"\x00" * 12).startswith("$7$101$AAAAAAAAAAAAAAAA$")


def test_broker_config_command_prints_paths_and_urls_never_passwords(tmp_path, capsys):
    import argparse

    from firmware_bridge.broker import add_broker_command
    parser = argparse.ArgumentParser(prog="edge-qmul")
    add_broker_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["broker-config", str(tmp_path / "b"), "--device", DEV_A, "--port", "18883"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"mosquitto -c {tmp_path / 'b' / 'mosquitto.conf'}" in out and "mqtts://127.0.0.1:18883/" in out
    for pw in (tmp_path / "b" / "passwords").glob("*.pw"):
        assert pw.stat().st_mode & 0o777 == 0o600 and pw.read_text().strip() not in out


def test_edge_qmul_serve_url_and_the_host_cli_over_mqtts(broker, tmp_path):
    """The commands as a user types them: `edge-qmul serve --url mqtts://...` in its own process,
    `edge-qmul-host --device mqtts://... push-model / info` in others, through mosquitto."""
    import json
    import subprocess
    import sys

    key = tmp_path / "device.key"
    key.write_bytes(PSK)
    key.chmod(0o600)
    bindir = Path(sys.executable).parent
    agent = subprocess.Popen([str(bindir / "edge-qmul"), "serve", "--url", broker.url(DEV_A, "device"),
                              "--state", str(tmp_path / "state"), "--key-file", str(key), "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        host = [str(bindir / "edge-qmul-host"), "--device", broker.url(DEV_A, "host"), "--key-file", str(key),
                "--timeout", "3"]
        deadline = time.monotonic() + 60
        while True:  # the agent subscribes once its process has started
            r = subprocess.run(host + ["ping"], capture_output=True, text=True, timeout=120)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
        assert r.returncode == 0, r.stderr
        r = subprocess.run(host + ["push-model", str(MODEL)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(host + ["info"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(MODEL.read_bytes()).hexdigest() in r.stdout
    finally:
        agent.terminate()
        out, _ = agent.communicate(timeout=30)
    for secret in passwords(broker) + [PSK.hex()]:
        assert secret not in out and secret not in r.stdout + r.stderr
    assert json.loads(out.splitlines()[0])["level"] == "INFO"  # the agent's JSON log lines
