"""firmware_bridge: authenticated, resumable host <-> device sync over serial and TCP.

frames.py (COBS framing, the AEAD and the session keys), transport/ (the links, chosen by URL:
base, serial, pty, tcp, urls), channel.py (handshake, requests, retries), transfer.py (resumable,
hash-verified uploads), device.py (the agent over the engine's StateDir), commands.py
(``edge-qmul serve`` and ``keygen``) and host.py (``edge-qmul-host``). It reaches the engine only
through ``edge_qmul.api``. DESIGN.md §6 is the protocol.
"""

__all__: list[str] = []
