"""firmware_bridge end to end: a host pushes a model, samples and a table to a device agent, forgets
an owner, and pulls the new model — over two real serial ports (ptys joined by a null-modem relay,
pyserial on both ends) and over real TCP on 127.0.0.1."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_qmul import datasets, litert, load_tflite, save_tflite
from edge_qmul.quant import quantize
from edge_qmul.unlearn.similar_labels import build_table
from faults import FaultyTransport
from firmware_bridge.channel import Client
from firmware_bridge.device import Agent, serve
from firmware_bridge.host import DeviceClient
from firmware_bridge.transport import SerialLink, TcpListener, connect_tcp

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def host_files(trained_digits, tmp_path_factory):
    """The trained digits model, and samples with owners and a validation slice, as files."""
    root = tmp_path_factory.mktemp("host")
    ds, val = trained_digits["ds"], trained_digits["val"]
    save_tflite(trained_digits["model"], root / "model.tflite")
    owners = np.array([f"user{i % 9}" for i in range(len(ds.y_train))])
    owners[:30] = "alice"
    np.savez(root / "train.npz", x=ds.x_train[~val], y=ds.y_train[~val], owners=owners[~val])
    np.savez(root / "val.npz", x=ds.x_train[val], y=ds.y_train[val], owners=owners[val])
    return root


def _start_device(kind: str, state):
    """(host transport, stop function) with an agent serving in a thread."""
    stop = threading.Event()
    agent = Agent(state)
    if kind == "tcp":
        listener = TcpListener("127.0.0.1", 0)

        def run():
            transport = listener.accept(timeout=10)
            serve(transport, agent, KEY, stop.is_set)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        host = connect_tcp(*listener.address)
    else:  # two real serial ports (ptys) joined by a null-modem relay: pyserial on both ends
        link = SerialLink()
        host = link.a
        thread = threading.Thread(target=serve, args=(link.b, agent, KEY, stop.is_set), daemon=True)
        thread.start()

    def shutdown():
        stop.set()
        thread.join(5)
        host.close()
        if kind != "tcp":
            link.close()
    return host, shutdown


@pytest.mark.parametrize("kind", ["tcp", "pty"])
def test_push_forget_pull(host_files, tmp_path, kind):
    host, shutdown = _start_device(kind, tmp_path / "state")
    try:
        device = DeviceClient(Client(host, KEY, timeout=2.0))
        device.client.connect()
        fixture = Path(__file__).parent / "fixtures" / "digits_cnn.tflite"  # TensorFlow-converted
        model_bytes = fixture.read_bytes()
        reply = device.push_model(fixture)
        assert reply["active"] and reply["sha256"] == hashlib.sha256(model_bytes).hexdigest()
        assert device.push_samples(host_files / "train.npz")["imported"] > 1000
        assert device.push_samples(host_files / "val.npz", role="validation")["imported"] > 100
        assert device.info()["model_sha256"] == reply["sha256"]
        model = load_tflite(fixture)
        ds = datasets.load("digits")
        build_table(model, quantize(ds.x_test, model.tensors[0].quant), ds.y_test).save(tmp_path / "t.json")
        table = device.push_table(tmp_path / "t.json")["sha256"]
        job = device.forget({"owner": "alice"}, method="qmul", table=table)
        seen = []
        result = device.wait(job, progress=seen.append, poll_s=0.05)
        assert result["status"] == "done", result
        assert seen and seen[-1]["status"] == "done"
        cert = device.commit(job)["certificate"]
        assert cert["committed"] and cert["n_forgotten"] == 30
        full = device.certificate(job)  # the whole certificate, from the device's job file
        assert len(full["forgotten_sample_id_hashes"]) == 30 and full["committed"]
        assert hashlib.sha256("\n".join(full["forgotten_sample_id_hashes"]).encode()).hexdigest() == \
            cert["forgotten_sample_id_hashes_sha256"]
        new = device.pull("current")
        assert hashlib.sha256(new).hexdigest() == cert["model_after_sha256"] != reply["sha256"]
        x = quantize(datasets.load("digits").x_test[:16], load_tflite(new).tensors[0].quant)
        np.testing.assert_array_equal(litert.run(new, x), load_tflite(new).forward(x))
        assert device.info()["model_sha256"] == cert["model_after_sha256"]
    finally:
        shutdown()


def _lossy_pair(kind: str, state, loss: float, seed: int):
    """Host and device ends, both wrapped in seeded fault injectors: `loss` of the frames dropped,
    bit flips at 1e-6 per byte (about 0.1% of 1 KB frames), 0.5% duplicated, 0.5% truncated."""
    stop = threading.Event()
    agent = Agent(state)
    faults = dict(drop=loss, flip=1e-6, duplicate=0.005, truncate=0.005)
    if kind == "tcp":
        listener = TcpListener("127.0.0.1", 0)
        holder = {}

        def run():
            transport = FaultyTransport(listener.accept(timeout=10), seed + 1, **faults)
            holder["device"] = transport
            serve(transport, agent, KEY, stop.is_set)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        host = FaultyTransport(connect_tcp(*listener.address), seed, **faults)
    else:
        link = SerialLink()
        device_end = FaultyTransport(link.b, seed + 1, **faults)
        thread = threading.Thread(target=serve, args=(device_end, agent, KEY, stop.is_set), daemon=True)
        thread.start()
        host = FaultyTransport(link.a, seed, **faults)

    def shutdown():
        stop.set()
        thread.join(5)
        host.close()
        if kind != "tcp":
            link.close()
    return host, agent, shutdown


@pytest.mark.parametrize("kind,loss", [("tcp", 0.01), pytest.param("pty", 0.01, marks=pytest.mark.slow),
                                       pytest.param("tcp", 0.05, marks=pytest.mark.slow),
                                       pytest.param("pty", 0.05, marks=pytest.mark.slow)])
def test_lossy_link_transfer_and_forget(host_files, tmp_path, kind, loss):
    host, agent, shutdown = _lossy_pair(kind, tmp_path / "state", loss, seed=int(loss * 1000))
    try:
        device = DeviceClient(Client(host, KEY, mtu=4096, timeout=0.15, retries=40))
        device.client.connect()
        blob = np.random.default_rng(7).bytes(2 * 1024 * 1024)
        reply = device.push("table", blob)  # any kind: 2 MB of bytes, verified on arrival
        assert reply["sha256"] == hashlib.sha256(blob).hexdigest()
        stored = tmp_path / "state" / reply["path"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == reply["sha256"]
        device.push_model(host_files / "model.tflite")
        device.push_samples(host_files / "train.npz")
        device.push_samples(host_files / "val.npz", role="validation")
        job = device.forget({"owner": "alice"}, method="qmul")
        result = device.wait(job, poll_s=0.05)
        assert result["status"] == "done", result
        assert len(agent.jobs) == 1  # retries never started a second job
        cert = device.commit(job)["certificate"]
        new = device.pull("current")
        assert hashlib.sha256(new).hexdigest() == cert["model_after_sha256"]
        assert device.client.stats["retries"] > 0  # the link really lost frames
    finally:
        shutdown()
