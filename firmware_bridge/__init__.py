"""firmware_bridge: authenticated, resumable host <-> device sync over serial and TCP.

DESIGN.md §6 describes the protocol; it is built in its own issue. The package exists now so the
layout of DESIGN.md §1 holds and imports resolve.
"""

__all__: list[str] = []
