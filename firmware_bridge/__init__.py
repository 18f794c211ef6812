"""firmware_bridge: authenticated, resumable host <-> device sync over serial and TCP.

frames.py (COBS framing, the AEAD and the session keys), transport.py (the links, chosen by URL),
channel.py (handshake, requests, retries), transfer.py (resumable, hash-verified uploads),
device.py (the agent: ``edge-qmul serve``) and host.py (``edge-qmul-host``). DESIGN.md §6 is the
protocol.
"""

__all__: list[str] = []
