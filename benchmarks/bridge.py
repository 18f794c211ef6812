"""firmware_bridge throughput and protocol overhead: a 10 MB PUT over TCP loopback and a pty pair.

    python benchmarks/bridge.py [--json OUT] [--size MB] [--repeats N] [--mtu 16384,1024]

For each transport (TCP on 127.0.0.1; a pty pair from ``firmware_bridge.transport.pty_pair``, the
device end a raw fd, the host end real pyserial) and each MTU, ``--repeats`` times: a device agent
(``firmware_bridge.device.serve``) runs in a thread on a fresh temporary state directory, a host
``Client`` connects (HELLO, MTU negotiated), and ``transfer.put(client, "table", data)`` uploads
``--size`` MB of random bytes: PUT_BEGIN, one PUT_CHUNK request/reply per chunk (the device appends
and fsyncs each chunk), PUT_END (the device hashes the whole file and renames it into place). The
time is that whole ``put`` call; MB/s = size / time (1 MB = 10^6 bytes); the median over repeats is
reported.

Overhead: both ends' transports are wrapped in a counter of the bytes *written* (host requests +
device replies, after the handshake), so wire bytes = everything either side put on the link for
the transfer; overhead = wire bytes - payload bytes (COBS, 0x00 delimiters, 16-byte headers, 16-byte
AEAD tags, msgpack keys, request ids, the file's SHA-256 in every chunk, and the replies).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from firmware_bridge.channel import Client  # noqa: E402
from firmware_bridge.device import Agent, serve  # noqa: E402
from firmware_bridge.transfer import chunk_size, put  # noqa: E402
from firmware_bridge.transport import TcpListener, Transport, connect_tcp, pty_pair  # noqa: E402

KEY = bytes(range(32))


class Counting(Transport):
    """Passes everything through to ``inner`` and counts the bytes and write calls it writes."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name, self.default_mtu, self.timeout = inner.name, inner.default_mtu, inner.timeout
        self.bytes_written = 0
        self.writes = 0

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        self.writes += 1
        self.inner.write(data)

    def read(self, *args, **kwargs) -> bytes:  # the inner transport's own default timeout applies
        return self.inner.read(*args, **kwargs)

    def close(self) -> None:
        self.inner.close()


def run_once(kind: str, mtu: int, data: bytes) -> dict:
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        agent = Agent(Path(tmp) / "state")
        holder: dict = {}
        if kind == "tcp":
            listener = TcpListener("127.0.0.1", 0)

            def run():
                holder["device"] = Counting(listener.accept(timeout=10))
                serve(holder["device"], agent, KEY, stop.is_set)
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            host = Counting(connect_tcp(*listener.address))
        else:
            device_end, host_end = pty_pair()
            holder["device"] = Counting(device_end)
            thread = threading.Thread(target=serve, args=(holder["device"], agent, KEY, stop.is_set), daemon=True)
            thread.start()
            host = Counting(host_end)
        try:
            client = Client(host, KEY, mtu=mtu, timeout=5.0)
            client.connect()
            while "device" not in holder:
                time.sleep(0.001)
            device = holder["device"]
            host.bytes_written = host.writes = device.bytes_written = device.writes = 0  # not the handshake
            t0 = time.perf_counter()
            reply = put(client, "table", data)
            seconds = time.perf_counter() - t0
            assert reply["sha256"] == hashlib.sha256(data).hexdigest()
            stored = Path(tmp) / "state" / reply["path"]
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == reply["sha256"]
            return {"seconds": seconds, "host_bytes": host.bytes_written, "device_bytes": device.bytes_written,
                    "requests": host.writes, "chunk": chunk_size(client), "mtu": client.session.mtu,
                    "retries": client.stats["retries"]}
        finally:
            stop.set()
            thread.join(5)
            host.close()
            if kind == "tcp":
                listener.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="example: python benchmarks/bridge.py --json benchmarks/results/bridge.json")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--size", type=float, default=10.0, help="MB (10^6 bytes) to upload (default 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mtu", default="16384,1024")
    args = ap.parse_args(argv)
    size = int(args.size * 1e6)
    rows = []
    print(f"{'transport':9} {'mtu':>6} {'chunk':>6} {'MB/s':>7} {'s':>6} {'requests':>8} "
          f"{'wire bytes':>11} {'overhead':>10} {'overhead %':>10}")
    for kind in ("tcp", "pty"):
        for mtu in (int(m) for m in args.mtu.split(",")):
            runs = []
            for r in range(args.repeats):
                data = os.urandom(size)
                runs.append(run_once(kind, mtu, data))
            seconds = statistics.median(x["seconds"] for x in runs)
            last = runs[-1]
            wire = last["host_bytes"] + last["device_bytes"]
            row = {"transport": kind, "mtu": last["mtu"], "chunk_bytes": last["chunk"], "payload_bytes": size,
                   "seconds_median": seconds, "mb_per_s": size / seconds / 1e6,
                   "seconds": [x["seconds"] for x in runs], "requests": last["requests"],
                   "host_bytes": last["host_bytes"], "device_bytes": last["device_bytes"], "wire_bytes": wire,
                   "overhead_bytes": wire - size, "overhead_pct": 100.0 * (wire - size) / size,
                   "overhead_bytes_per_request": (wire - size) / last["requests"],
                   "retries": sum(x["retries"] for x in runs)}
            rows.append(row)
            print(f"{kind:9} {row['mtu']:>6} {row['chunk_bytes']:>6} {row['mb_per_s']:>7.2f} {seconds:>6.2f} "
                  f"{row['requests']:>8} {wire:>11} {row['overhead_bytes']:>10} {row['overhead_pct']:>9.2f}%",
                  flush=True)
    if args.json:
        out = {"rows": rows, "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "tmpdir": tempfile.gettempdir()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
