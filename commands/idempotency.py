"""Which command ids a command processor has decided, in memory bounded independent of
uptime, and where each one's first outcome is on the command-outcome topic.

A repeated command id (the HTTP ``Idempotency-Key``) must get its first outcome back and
write nothing, also after a restart or a takeover and long after the first decision. The
processor used to keep every decided command's whole Outcome in memory (~4 KB for a
heartbeat), which grew without bound. It now keeps two things:

- ``DecidedCommands``, one entry per decided command id still on the outcome topic: the
  first 8 bytes of the id's 16-byte BLAKE2b digest -> the position of its first outcome
  record (``offset << 16 | partition``), kept in sorted arrays: 16 bytes per command id
  once sealed (plus a dict of the newest 16,384 ids, about 2 MB; ``command_memory_bytes``
  measures it). Entries are dropped once the outcome topic's retention has deleted their
  record (``forget_before``, fed every 5 minutes by the partitions' log start offsets),
  so this part is bounded by *retention x command rate x 16 B* (up to twice that, as
  segments go whole), not by uptime: the issue's 100 agents heartbeating every 2 s
  (4.3 million commands a day) with the default week of retention is ~0.5 GB, ~70 MB
  with a day's retention of the outcome topic. The outcome topic holding those outcomes
  (~4 KB each for a heartbeat) is 250 times that on disk.
- ``OutcomeCache``, the encoded outcome values (the record value bytes, as written) of
  the most recently decided or repeated command ids, least recently used first out, bounded
  by a byte budget (``SWARMLOG_PROCESSOR_OUTCOME_CACHE_BYTES``, 8 MiB by default; the
  budget counts value bytes plus ``CACHE_ENTRY_OVERHEAD`` per entry).

A repeated id found in ``where`` but not in the cache is answered by reading its first
outcome back from the outcome topic at that position (one fetch, read_committed), so the
cache is only a shortcut. The digest is checked against the outcome it leads to (two ids
sharing 64 bits of digest are then told apart: the second is decided as a new command,
not answered with the other command's outcome). An id whose outcome the topic no longer
retains (a week by default) is no longer recognised: that is the idempotency window.

After a restart or takeover ``DecidedCommands`` is rebuilt from the outcome topic's partition by
reading each record's headers only (``ce_subject`` is the command id): the first outcome
of an id comes before any duplicate of it on the same partition, so the first one wins.
The values read on the way fill the cache (the most recent ones stay), so a client
resending what it sent just before the restart is answered from memory.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
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


class _Segment:
    """A sealed run of ``DecidedCommands`` entries: 64-bit digest keys sorted, with the
    packed outcome positions beside them (-1 once forgotten), and per partition the
    highest outcome offset it holds (it may be dropped once retention passed them all)."""

    __slots__ = ("highest", "keys", "live", "positions")

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        pairs.sort(key=lambda pair: pair[0])
        self.keys = array("Q", (k for k, _ in pairs))
        self.positions = array("q", (p for _, p in pairs))
        self.highest: dict[int, int] = {}
        self.live = 0
        for packed in self.positions:
            if packed >= 0:
                self.live += 1
                partition, offset = unpack_position(packed)
                if offset > self.highest.get(partition, -1):
                    self.highest[partition] = offset

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: int) -> int:
        """Where ``key`` is in this segment, or -1."""
        i = bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def pairs(self) -> list[tuple[int, int]]:
        """The live (key, packed position) pairs."""
        return [(k, p) for k, p in zip(self.keys, self.positions, strict=True) if p >= 0]

    def expired(self, log_start: Mapping[int, int]) -> bool:
        """Whether retention has deleted every outcome this segment points at."""
        return all(offset < log_start.get(p, 0) for p, offset in self.highest.items())


class DecidedCommands:
    """The command ids one command partition's owner has decided: digest -> packed
    position of the first outcome record, in the order they were decided.

    Pure data, no IO: the processor feeds it the positions of the outcome records it
    wrote (``remember``) or read on takeover (``remember_first``), and the log start
    offsets of the outcome topic (``forget_before``).

    Layout (a small log-structured merge of sorted arrays): the newest ids sit in a dict
    of at most ``SEGMENT_IDS`` entries (in decision order); when it fills it is sealed
    into a segment of two arrays, 64-bit keys (the digest's first 8 bytes) sorted and
    the positions beside them: 16 bytes an id. Adjacent segments of equal size merge
    (as a binary counter does) up to ``MAX_SEGMENT_IDS``, so a lookup searches about four
    segments per million ids (one ``bisect`` each, about 2 µs): 9 segments and 17 µs for
    a new id at 2 million ids, about 115 segments at 30 million (a week of 100 agents
    heartbeating every 2 s).
    Segments stay in decision order, so retention drops the oldest whole segments. Two
    ids sharing 64 bits of digest (about 1 in 40,000 for 30 million ids) are told apart
    by the outcome's command id (the processor checks it): the second is decided as new.
    """

    SEGMENT_IDS = 16_384
    MAX_SEGMENT_IDS = 262_144

    def __init__(self) -> None:
        self._hot: dict[int, int] = {}
        self._segments: list[_Segment] = []

    def __len__(self) -> int:
        """Entries held (an entry replaced by ``remember`` counts until segments merge)."""
        return len(self._hot) + sum(s.live for s in self._segments)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes) and self.position(digest) is not None

    @staticmethod
    def _key(digest: bytes) -> int:
        return int.from_bytes(digest[:8], "big")

    def _find(self, key: int) -> tuple[_Segment, int] | None:
        for segment in reversed(self._segments):  # the newest entry for a key wins
            i = segment.index(key)
            if i >= 0:
                return segment, i
        return None

    def position(self, digest: bytes) -> tuple[int, int] | None:
        """(partition, offset) of the first outcome of ``digest``'s command, or None."""
        key = self._key(digest)
        packed = self._hot.get(key)
        if packed is None:
            found = self._find(key)
            if found is None:
                return None
            packed = found[0].positions[found[1]]
        return None if packed < 0 else unpack_position(packed)

    def remember(self, digest: bytes, partition: int, offset: int) -> None:
        """Record the first outcome of a command just decided (a later call for the same
        digest replaces it: the earlier one proved to be a digest collision)."""
        key = self._key(digest)
        self._hot.pop(key, None)  # keep insertion order = order of decision
        self._hot[key] = pack_position(partition, offset)
        if len(self._hot) >= self.SEGMENT_IDS:
            self._seal()

    def remember_first(self, digest: bytes, partition: int, offset: int) -> None:
        """Record an outcome read back in log order; a later one (a duplicate) is ignored."""
        if self.position(digest) is None:
            self.remember(digest, partition, offset)

    def forget(self, digest: bytes) -> None:
        """Drop ``digest`` (its outcome is gone from the topic)."""
        key = self._key(digest)
        if self._hot.pop(key, None) is not None:
            return
        found = self._find(key)
        if found is not None and found[0].positions[found[1]] >= 0:
            found[0].positions[found[1]] = -1
            found[0].live -= 1

    def forget_before(self, log_start: Mapping[int, int]) -> int:
        """Drop, oldest first, the entries whose outcome record lies before its partition's
        log start offset (deleted by retention); stop at the first one still retained
        (sealed segments go whole, once every outcome they point at is deleted).
        ``log_start`` maps partition -> log start offset (a partition not given is kept).
        Returns how many entries were dropped."""
        dropped = 0
        while self._segments and self._segments[0].expired(log_start):
            dropped += self._segments.pop(0).live
        if self._segments:
            return dropped
        expired: list[int] = []
        for key, packed in self._hot.items():
            partition, offset = unpack_position(packed)
            if offset >= log_start.get(partition, 0):
                break
            expired.append(key)
        for key in expired:
            del self._hot[key]
        return dropped + len(expired)

    def _seal(self) -> None:
        """Turn the hot dict into a segment; merge the newest segments while the last two
        are the same size (older entries first, so a newer entry for a key wins)."""
        self._segments.append(_Segment(list(self._hot.items())))
        self._hot = {}
        while (
            len(self._segments) >= 2
            and len(self._segments[-2]) <= len(self._segments[-1])
            and len(self._segments[-2]) + len(self._segments[-1]) <= self.MAX_SEGMENT_IDS
        ):
            newer = self._segments.pop()
            older = self._segments.pop()
            merged = dict(older.pairs())
            for key, packed in zip(newer.keys, newer.positions, strict=True):
                if packed >= 0:
                    merged[key] = packed
                else:  # forgotten in the newer segment: not resurrected from the older
                    merged.pop(key, None)
            self._segments.append(_Segment(list(merged.items())))


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
