"""The fleet on the host: erasure requests for a person across many devices (``edge-qmul-fleet``).

registry.py keeps the devices, requests and per-device deliveries in SQLite; runner.py talks to
the devices and moves the deliveries forward; cli.py is the command.
"""
from __future__ import annotations

from .registry import FleetError, Registry
from .runner import Fleet

__all__ = ["Fleet", "FleetError", "Registry"]
