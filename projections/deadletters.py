"""Dead letters for operators: listing them with their reasons, and replaying one.

A dead letter is a record some role could not process, written to the dead-letter topic
with the reason, the original key, value and headers and the original position (see
infra/deadletter_records.encode_dead_letter); the projector projects that topic into the
``dead_letters`` table. Listing reads the table (cheap, keyset-paginated), or the topic
itself (``from_log``: when no projector runs).

Every function takes what it reads and writes from the composition root, which opens
and closes it (``infra.bootstrap.open_operator``): the ``Kafka``, the ``Topics``, an
asyncpg pool on the read models and their schema.

Replay depends on what the record was:

- An event (a record of an event topic, dead-lettered by the projector): the projector
  re-applies it (``Projector.replay``), reading it from its topic, where it still is
  (event topics are retained forever). It is never written to the event topic again:
  the event topics are the store, where a second copy would be a second event with the
  same id and version, which the deciders that rebuild state from them would fold twice.
- Anything else (a command the processor could not read or decide): the original record
  (same key, value and headers, read from its topic while it is retained) is produced to
  its topic again, so the role that refused it reads it again, under a new command id
  derived from the original (``derived_id("replay", id)``, the original id as its
  ``causationid``): the original id already has its outcome (the rejection), which a
  repeat of that id would only be answered with. A second replay of the same dead letter
  derives the same id, so it is not decided twice. Once retention has deleted the
  original, replay refuses: the dead letter's copy may be cut or re-encoded, and a record
  rebuilt from it is not the one that was sent (resend the command through the API).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import TopicPartition

from domain.ids import derived_id
from domain.recorded import Position
from infra.kafka import Kafka
from infra.topics import Topics
from projections.projector import Projector
from projections.readmodels.dead_letters import (
    find_dead_letters,
    mark_replayed,
    read_dead_letter,
)
from projections.readmodels.dead_letters import (
    list_dead_letters as table_dead_letters,
)

_POSITION = re.compile(r"^(?P<topic>.+):(?P<partition>\d{1,9}):(?P<offset>\d{1,18})$")


def parse_ref(ref: str) -> tuple[str | None, Position | None]:
    """``(id, None)`` for a dead letter's id, ``(None, position)`` for
    ``<topic>:<partition>:<offset>`` (the position of the dead-lettered record)."""
    m = _POSITION.match(ref)
    if m is None:
        return ref, None
    return None, Position(m["topic"], int(m["partition"]), int(m["offset"]))


async def _table_rows(pool: asyncpg.Pool, schema: str, **kw: Any) -> list[dict[str, Any]] | None:
    """``find_dead_letters`` or the read model's ``list_dead_letters`` (``find`` in kw),
    None if the table does not exist yet (no projector ran on this schema)."""
    try:
        if kw.pop("find", False):
            return await find_dead_letters(pool, schema, **kw)
        return await table_dead_letters(pool, schema, **kw)
    except asyncpg.UndefinedTableError:
        return None


async def _log_rows(kafka: Kafka, topics: Topics) -> list[dict[str, Any]]:
    """Every dead letter on the dead-letter topic, as ``dead_letters`` rows (one per id)."""
    tps = await kafka.partitions_of(topics.deadletter)
    rows: dict[str, dict[str, Any]] = {}

    def keep(record: Any) -> None:
        row = read_dead_letter(record)
        rows.setdefault(row["id"], {**row, "replayed_at": None, "replay_note": None})

    await kafka.read_to_end(tps, keep)
    return list(rows.values())


async def list_dead_letters(
    kafka: Kafka,
    topics: Topics,
    pool: asyncpg.Pool,
    schema: str,
    *,
    limit: int = 50,
    topic: str | None = None,
    from_log: bool = False,
) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters (of records from ``topic`` if given), newest
    first, from the ``dead_letters`` table of ``schema`` (through ``pool``), or with
    ``from_log`` from the dead-letter topic of ``topics`` (on ``kafka``)."""
    if not from_log:
        rows = await _table_rows(pool, schema, topic=topic, limit=limit)
        return rows or []
    rows = [
        r for r in await _log_rows(kafka, topics) if topic is None or r["source_topic"] == topic
    ]
    rows.sort(key=lambda r: (r["dead_lettered_at"], r["id"]), reverse=True)
    return [{k: v for k, v in r.items() if k != "letter"} for r in rows[:limit]]


@dataclass(frozen=True)
class Replayed:
    """What a replay did, in a sentence (``how``) and where (``source``)."""

    source: Position
    how: str


async def find(
    kafka: Kafka, topics: Topics, pool: asyncpg.Pool, schema: str, ref: str
) -> dict[str, Any]:
    """The dead letter ``ref`` names (its id, or ``<topic>:<partition>:<offset>`` of the
    record), from the table, else from the topic; LookupError if there is none."""
    letter_id, position = parse_ref(ref)
    rows = await _table_rows(pool, schema, find=True, id=letter_id, source=position)
    if not rows:
        rows = [
            r
            for r in await _log_rows(kafka, topics)
            if r["id"] == letter_id
            or (
                position is not None
                and (r["source_topic"], r["source_partition"], r["source_offset"])
                == (position.topic, position.partition, position.offset)
            )
        ]
    if not rows:
        raise LookupError(f"no dead letter {ref!r}")
    row = rows[0]
    if (
        row["source_topic"] is None
        or row["source_partition"] is None
        or (row["source_offset"] is None)
    ):
        raise LookupError(f"dead letter {ref!r} does not say where its record was")
    return row


async def replay(
    kafka: Kafka,
    topics: Topics,
    pool: asyncpg.Pool,
    schema: str,
    ref: str,
    open_projector: Callable[[], AbstractAsyncContextManager[Projector]],
) -> Replayed:
    """Replay the dead letter ``ref`` (see the module docstring for how), found with
    ``find``; a command is produced again through ``kafka`` and its ``dead_letters`` rows
    in ``schema`` marked replayed through ``pool``.

    ``open_projector`` opens a projector (and closes its clients after): the composition
    root's ``infra.bootstrap.open_projector``, which is used only for an event.
    Raises LookupError if there is no such dead letter, ``projections.projector.
    ReplayError`` if an event is still refused (nothing changed then).
    """
    row = await find(kafka, topics, pool, schema, ref)
    source = Position(row["source_topic"], row["source_partition"], row["source_offset"])
    if source.topic in topics.event_topics.values():
        async with open_projector() as projector:
            result = await projector.replay(source)
        how = (
            f"re-applied {result.aggregate} event {result.event_id}"
            + ("" if result.applied else " (ignored: the row had moved past it)")
            + f"; {result.later_applied} later event(s) of it applied"
            + (
                f", {result.later_dead_lettered} dead-lettered again"
                if result.later_dead_lettered
                else ""
            )
        )
        return Replayed(source, how)
    key, value, headers = await _original(kafka, source)
    headers, renamed = _as_replay(headers)
    producer = kafka.producer()
    await producer.start()
    try:
        meta = await producer.send_and_wait(source.topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()
    how = (
        f"produced the record (read from its topic) to {source.topic} again"
        + (f" as command {renamed}" if renamed else "")
        + f", now at partition {meta.partition} offset {meta.offset}"
    )
    with contextlib.suppress(asyncpg.UndefinedTableError):
        await mark_replayed(pool, schema, source, how)
    return Replayed(source, how)


async def _original(
    kafka: Kafka, source: Position
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of the dead-lettered record, byte for byte from its topic;
    LookupError once retention deleted it (the dead letter's copy may be cut or
    re-encoded, so nothing is rebuilt from it)."""
    tp = TopicPartition(source.topic, source.partition)
    c = kafka.consumer()
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, source.offset)
        batch = await c.getmany(tp, timeout_ms=5000, max_records=1)
        for record in batch.get(tp, []):
            if record.offset == source.offset:
                return record.key, record.value, list(record.headers or ())
    finally:
        await c.stop()
    raise LookupError(
        f"{source.topic}:{source.partition}:{source.offset} is no longer on its topic "
        "(retention deleted it); its dead letter's copy may be cut or re-encoded, so it is "
        "not replayed: send the command again through the API"
    )


def _as_replay(headers: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], str | None]:
    """``headers`` with ``ce_id`` replaced by the replay's command id (derived from the
    original, which becomes ``ce_causationid``), and that new id; unchanged (and None)
    when there is no readable ``ce_id``."""
    original = next((v for k, v in headers if k == "ce_id"), None)
    if not isinstance(original, bytes):
        return headers, None
    try:
        command_id = original.decode("utf-8")
    except UnicodeDecodeError:
        return headers, None
    renamed = derived_id("replay", command_id)
    kept = [(k, v) for k, v in headers if k not in ("ce_id", "ce_causationid")]
    return kept + [("ce_id", renamed.encode()), ("ce_causationid", original)], renamed
