"""A real mosquitto for the tests: started on a free port on 127.0.0.1 with a config written by
firmware_bridge.broker, stopped after; `restart()` for fault tests.

`Mosquitto(directory, devices, tls=...)` writes the config (passwords, ACL, CA and server
certificate) and starts `mosquitto -c` on it; `mosquitto_broker` is the pytest fixture that yields
a factory of them and stops them all. Tests are skipped only when the mosquitto binary is missing
(CI installs the Debian package). Its log goes to DIR/mosquitto.log (mosquitto logs client ids and
user names, never passwords).
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from firmware_bridge.broker import BrokerConfig, write_broker_config

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A port nothing listens on now (the OS's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """mosquitto on 127.0.0.1:`port` with the config of `write_broker_config(directory, devices)`."""

    def __init__(self, directory: Path, devices, *, tls: bool = True, **config) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        # As root, mosquitto drops to the `mosquitto` account, which cannot read our mode-600 files.
        run_as = getpass.getuser() if os.geteuid() == 0 else None
        self.config: BrokerConfig = write_broker_config(directory, devices, port=free_port(), tls=tls,
                                                        run_as=run_as, **config)
        self.log = Path(directory) / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def port(self) -> int:
        return self.config.port

    def url(self, device_id: str, role: str = "host", **extra: str) -> str:
        """The transport URL for `device_id` as `role`, with this broker's credentials."""
        url = self.config.url(device_id, role, host="127.0.0.1")
        return url + "".join(f"&{k}={v}" for k, v in extra.items())

    def start(self, timeout: float = 10.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config.conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log.read_text()}")
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistent sessions), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Mosquitto":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def mosquitto_broker(tmp_path):
    """A factory: `mosquitto_broker(devices, tls=True, name="broker")` -> a running Mosquitto."""
    brokers: list[Mosquitto] = []

    def make(devices, tls: bool = True, name: str = "broker", **config) -> Mosquitto:
        broker = Mosquitto(tmp_path / name, devices, tls=tls, **config)
        brokers.append(broker)
        return broker
    yield make
    for broker in brokers:
        broker.stop()
