"""Deterministic ids: the same cause always gets the same id (uuid5, RFC 4122).

An event's id is derived from the command that caused it and its index; a command a
process manager issues gets its id from the event and the purpose that caused it. So a
replay, a retry or a second runner writes the same ids, and the processor's idempotency
check (by command id) makes the repeat harmless. Pure: no clock, no randomness.
"""

from __future__ import annotations

import hashlib
import uuid

NAMESPACE = uuid.UUID("6f1c1f2e-4b7a-5d8e-9a41-53c0a1e2b7d9")
"""swarmlog's uuid5 namespace."""

_NAMESPACE_BYTES = NAMESPACE.bytes


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))``, without building a UUID object (a third of
    the time; the hot path derives one or two per command)."""
    b = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def event_id(command_id: str, index: int) -> str:
    """Deterministic id of the ``index``-th event caused by ``command_id`` (uuid5)."""
    return _uuid5(f"{command_id}/{index}")


def derived_id(*parts: object) -> str:
    """A deterministic command id from the event and purpose that caused it (uuid5)."""
    return _uuid5("/".join(str(p) for p in parts))
