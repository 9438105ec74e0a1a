"""Which command ids a command processor has decided, in memory bounded independent of
uptime, and where each one's first outcome is on the command-outcome topic.

A repeated command id (the HTTP ``Idempotency-Key``) must get its first outcome back and
write nothing, also after a restart or a takeover and long after the first decision. The
processor used to keep every decided command's whole Outcome in memory (~4 KB for a
heartbeat), which grew without bound. It now keeps two things:

- ``DecidedCommands.where``, one entry per decided command id still on the outcome topic:
  the 16-byte BLAKE2b digest of the id -> the position of its first outcome record
  (``offset << 16 | partition``, one int). Measured at 110 to 140 bytes per command id
  (a 49-byte ``bytes`` key, a 32-byte int and the dict's slot; ``command_memory_bytes``).
  Entries are dropped once the outcome topic's retention has deleted their record
  (``forget_before``, fed every 5 minutes by the partitions' log start offsets), so this
  part is bounded by *retention x command rate x ~130 B*, not by uptime: 1 million
  commands a day with the default week of retention is ~0.9 GB; the issue's 100 agents
  heartbeating every 2 s (4.3 million a day) ~3.9 GB, or ~0.56 GB with a day's retention
  of the outcome topic. The outcome topic holding those outcomes (~4 KB each for a
  heartbeat) is 30 times that on disk.
- ``OutcomeCache``, the encoded outcome values (the record value bytes, as written) of
  the most recently decided or repeated command ids, least recently used first out, bounded
  by a byte budget (``SWARMLOG_PROCESSOR_OUTCOME_CACHE_BYTES``, 8 MiB by default; the
  budget counts value bytes plus ``CACHE_ENTRY_OVERHEAD`` per entry).

A repeated id found in ``where`` but not in the cache is answered by reading its first
outcome back from the outcome topic at that position (one fetch, read_committed), so the
cache is only a shortcut. The digest is checked against the outcome it leads to (a
digest collision, ~1 in 10^21 for a billion ids, is then decided as a new command, not
answered with another command's outcome). An id whose outcome the topic no longer
retains (a week by default) is no longer recognised: that is the idempotency window.

After a restart or takeover ``where`` is rebuilt from the outcome topic's partition by
reading each record's headers only (``ce_subject`` is the command id): the first outcome
of an id comes before any duplicate of it on the same partition, so the first one wins.
The values read on the way fill the cache (the most recent ones stay), so a client
resending what it sent just before the restart is answered from memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

#: Bytes the cache counts for one entry beyond the value itself (key, node and slot).
CACHE_ENTRY_OVERHEAD = 120

_PARTITION_BITS = 16
_PARTITION_MASK = (1 << _PARTITION_BITS) - 1


def command_digest(command_id: str) -> bytes:
    """The 16-byte BLAKE2b digest under which a command id is remembered."""
    return hashlib.blake2b(command_id.encode("utf-8"), digest_size=16).digest()


def pack_position(partition: int, offset: int) -> int:
    """(partition, offset) of an outcome record as one int; partitions below 65,536."""
    return (offset << _PARTITION_BITS) | partition


def unpack_position(position: int) -> tuple[int, int]:
    """The (partition, offset) that ``pack_position`` packed."""
    return position & _PARTITION_MASK, position >> _PARTITION_BITS


class OutcomeCache:
    """Encoded outcome values by command digest, least recently used evicted first, the
    total (value bytes + ``CACHE_ENTRY_OVERHEAD`` each) held at most ``budget_bytes``.

    A value larger than the whole budget is not kept. Shared by every partition a
    processor owns: a command id's first outcome never changes, so an entry stays right
    whichever partition it came from.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self.used_bytes = 0
        self._values: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, digest: bytes) -> bytes | None:
        """The value remembered for ``digest`` (and mark it recently used), or None."""
        value = self._values.get(digest)
        if value is not None:
            self._values.move_to_end(digest)
        return value

    def put(self, digest: bytes, value: bytes) -> None:
        """Remember ``value`` for ``digest``, evicting the least recently used entries."""
        cost = len(value) + CACHE_ENTRY_OVERHEAD
        old = self._values.pop(digest, None)
        if old is not None:
            self.used_bytes -= len(old) + CACHE_ENTRY_OVERHEAD
        if cost > self.budget_bytes:
            return
        self._values[digest] = value
        self.used_bytes += cost
        while self.used_bytes > self.budget_bytes:
            _, evicted = self._values.popitem(last=False)
            self.used_bytes -= len(evicted) + CACHE_ENTRY_OVERHEAD


class DecidedCommands:
    """The command ids one command partition's owner has decided: digest -> packed
    position of the first outcome record, in the order they were decided.

    Pure data, no IO: the processor feeds it the positions of the outcome records it
    wrote (``remember``) or read on takeover (``remember_first``), and the log start
    offsets of the outcome topic (``forget_before``).
    """

    def __init__(self) -> None:
        self.where: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, digest: object) -> bool:
        return digest in self.where

    def position(self, digest: bytes) -> tuple[int, int] | None:
        """(partition, offset) of the first outcome of ``digest``'s command, or None."""
        packed = self.where.get(digest)
        return None if packed is None else unpack_position(packed)

    def remember(self, digest: bytes, partition: int, offset: int) -> None:
        """Record the first outcome of a command just decided (a later call for the same
        digest replaces it: the earlier one proved to be a digest collision)."""
        self.where.pop(digest, None)  # keep insertion order = order of decision
        self.where[digest] = pack_position(partition, offset)

    def remember_first(self, digest: bytes, partition: int, offset: int) -> None:
        """Record an outcome read back in log order; a later one (a duplicate) is ignored."""
        self.where.setdefault(digest, pack_position(partition, offset))

    def forget(self, digest: bytes) -> None:
        """Drop ``digest`` (its outcome is gone from the topic)."""
        self.where.pop(digest, None)

    def forget_before(self, log_start: Mapping[int, int]) -> int:
        """Drop, oldest first, the entries whose outcome record lies before its partition's
        log start offset (deleted by retention); stop at the first one still retained.
        ``log_start`` maps partition -> log start offset (a partition not given is kept).
        Returns how many entries were dropped."""
        expired: list[bytes] = []
        for digest, packed in self.where.items():
            partition, offset = unpack_position(packed)
            if offset >= log_start.get(partition, 0):
                break
            expired.append(digest)
        for digest in expired:
            del self.where[digest]
        return len(expired)


def outcome_subject(record: Any) -> str | None:
    """The command id an outcome record is about (its ``ce_subject`` header), when it is
    an outcome the processor wrote (``ce_source`` ``/swarmlog/processor``); else None."""
    subject = source = None
    for name, value in record.headers or ():
        if name == "ce_subject":
            subject = value
        elif name == "ce_source":
            source = value
    if subject is None or source != b"/swarmlog/processor":
        return None
    try:
        return bytes(subject).decode("utf-8")
    except UnicodeDecodeError:
        return None


def command_memory_bytes(n: int) -> float:
    """Measured bytes per entry of ``DecidedCommands`` holding ``n`` ids (for the docs)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decided = DecidedCommands()
        for i in range(n):
            decided.remember(command_digest(f"{i:08d}-command-id"), 0, 10_000_000 + i)
        after = tracemalloc.get_traced_memory()[0]
        return (after - before) / n
    finally:
        tracemalloc.stop()
