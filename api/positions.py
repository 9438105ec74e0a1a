"""Positions in the log as the API writes them: read-your-writes marks and SSE ids.

* ``after=<topic>:<partition>:<offset>`` names one event a query waits for (the
  ``position`` of each event in a command's response).
* An SSE id is a *position vector*: the next offset of every (topic, partition) of the
  stream, in canonical order (topic names sorted, then partition number), written as
  ``v1:<o1>.<o2>...``, e.g. ``v1:12.0.7.3.9.1`` for two topics of three partitions.
  Resuming from it means seeking each partition to its offset: no gap, no duplicate.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import TopicPartition

from domain.recorded import Position

VECTOR_VERSION = "v1"
#: Longest SSE id a client may send back: 20 characters per partition of a few thousand.
MAX_VECTOR_CHARS = 100_000


#: Kafka's bounds: a partition is an int32, an offset an int64.
MAX_PARTITION = 2**31 - 1
MAX_OFFSET = 2**63 - 1


def parse_after(
    values: Iterable[str],
    topics: Collection[str] | None = None,
    partitions: int | None = None,
) -> list[Position]:
    """Parse ``topic:partition:offset`` marks; ValueError naming the bad one: malformed,
    a partition or offset out of Kafka's range, or (when given) a topic not in
    ``topics`` or a partition not below ``partitions``."""
    out: list[Position] = []
    for value in values:
        topic, sep1, rest = value.rpartition(":")
        topic, sep2, partition = topic.rpartition(":")
        offset = rest
        if not (
            sep1
            and sep2
            and topic
            and partition.isascii()
            and partition.isdigit()
            and offset.isascii()
            and offset.isdigit()
        ):
            raise ValueError(f"{value!r} is not <topic>:<partition>:<offset>")
        if topics is not None and topic not in topics:
            raise ValueError(f"{value!r}: no event topic {topic!r}")
        bound = MAX_PARTITION if partitions is None else partitions - 1
        if len(partition) > 10 or int(partition) > bound:
            raise ValueError(f"{value!r}: partition {partition} is not in [0, {bound}]")
        if len(offset) > 19 or int(offset) > MAX_OFFSET:
            raise ValueError(f"{value!r}: offset {offset} is out of range")
        out.append(Position(topic, int(partition), int(offset)))
    return out


def format_position(p: Position) -> str:
    """``topic:partition:offset``, the form ``?after=`` takes."""
    return f"{p.topic}:{p.partition}:{p.offset}"


@dataclass(frozen=True)
class Layout:
    """The (topic, partition) pairs of a stream, in the canonical order of its vectors."""

    partitions: tuple[TopicPartition, ...]

    @classmethod
    def of(cls, topics: Iterable[str], partitions: int) -> Layout:
        """Every partition 0..partitions-1 of each topic, topics sorted by name."""
        return cls(
            tuple(TopicPartition(t, p) for t in sorted(set(topics)) for p in range(partitions))
        )

    def encode(self, offsets: Mapping[TopicPartition, int]) -> str:
        """The vector of ``offsets`` (next offset per partition)."""
        return f"{VECTOR_VERSION}:" + ".".join(str(offsets[tp]) for tp in self.partitions)

    def decode(self, text: str) -> dict[TopicPartition, int]:
        """The offsets in vector ``text``; ValueError when it is malformed or another layout's."""
        version, sep, body = text.strip().partition(":")
        if version != VECTOR_VERSION or not sep:
            raise ValueError(f"{text!r} is not a {VECTOR_VERSION} position vector")
        parts: Sequence[str] = body.split(".")
        if len(parts) != len(self.partitions):
            raise ValueError(
                f"{text!r} has {len(parts)} offsets; this stream has {len(self.partitions)}"
                " partitions"
            )
        if not all(
            p.isascii() and p.isdigit() and len(p) <= 19 and int(p) <= MAX_OFFSET for p in parts
        ):
            raise ValueError(f"{text!r}: offsets must be non-negative 64-bit integers")
        return {tp: int(p) for tp, p in zip(self.partitions, parts, strict=True)}
