"""The bridge's sub-commands of ``edge-qmul``: ``serve`` (the device agent), ``keygen`` and
``broker-config`` (a mosquitto setup for a fleet).

Registered under the entry-point group ``edge_qmul.commands`` (pyproject.toml), so the engine's
command line offers them without importing the bridge.
"""
from __future__ import annotations

import argparse
import logging

import numba

from edge_qmul.api import CLIError, add_command

from .broker import add_broker_command
from .device import Agent, KeyFileError, read_key, serve, write_key
from .transport import SerialTransport, TcpListener, TransportError, open_transport

LOG_FORMAT = '{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}'


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        key = read_key(args.key_file)
    except KeyFileError as e:
        raise CLIError(str(e)) from None
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise CLIError(f"--threads {args.threads}: must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
    agent = Agent(args.state, threads=args.threads)
    if args.serial:
        serve(SerialTransport(args.serial), agent, key)
        return 0
    if args.url:
        try:
            transport = open_transport(args.url)
        except TransportError as e:
            raise CLIError(str(e)) from None
        serve(transport, agent, key)
        return 0
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        raise CLIError(f"--listen {args.listen!r}: expected HOST:PORT")
    listener = TcpListener(host or "127.0.0.1", int(port))
    print(f"listening on {listener.address[0]}:{listener.address[1]}", flush=True)
    while True:  # one host at a time; the next connection gets the same state
        transport = listener.accept(timeout=None)
        serve(transport, agent, key)


def _keygen(args: argparse.Namespace) -> int:
    try:
        path = write_key(args.key_file)
    except FileExistsError:
        raise CLIError(f"{args.key_file} exists: a key is never overwritten") from None
    print(f"wrote a 32-byte key to {path} (mode 600)")
    return 0


def add_commands(sub) -> None:
    """Add ``serve``, ``keygen`` and ``broker-config`` to the ``edge-qmul`` sub-command parsers ``sub``."""
    sv = add_command(sub, "serve", "run the device agent (firmware_bridge) on a serial line, TCP or an MQTT broker", [
        "edge-qmul serve --serial /dev/ttyUSB0 --state /var/lib/edge-qmul --key-file device.key",
        "edge-qmul serve --listen 0.0.0.0:7070 --state /var/lib/edge-qmul --key-file device.key",
        "edge-qmul serve --url 'mqtts://broker:8883/cam1?role=device&password_file=cam1.pw&ca=ca.crt' "
        "--state /var/lib/edge-qmul --key-file device.key"])
    where = sv.add_mutually_exclusive_group(required=True)
    where.add_argument("--serial", help="a pyserial URL or device, e.g. /dev/ttyUSB0")
    where.add_argument("--listen", help="HOST:PORT to listen on (TCP)")
    where.add_argument("--url", help="any transport URL, e.g. mqtts://broker:8883/ID?role=device&"
                       "password_file=F&ca=ca.crt (the device's topics on an MQTT broker)")
    sv.add_argument("--state", required=True, help="the device's state directory")
    sv.add_argument("--key-file", required=True, help="the 32-byte pre-shared key (mode 0600)")
    sv.add_argument("--threads", type=int, help="compute threads for unlearning (default: every core; "
                    "1 on a board whose other cores are kept busy, where parallel kernels wait for them)")
    sv.set_defaults(func=_serve)
    kg = add_command(sub, "keygen", "write a new 32-byte pre-shared key with mode 0600",
                     "edge-qmul keygen device.key   # then copy it to the host over a channel you trust")
    kg.add_argument("key_file")
    kg.set_defaults(func=_keygen)
    add_broker_command(sub)
