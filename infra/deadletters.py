"""Dead letters for operators: listing them with their reasons, and replaying one.

A dead letter is a record some role could not process, written to the dead-letter topic
with the reason, the original key, value and headers and the original position (see
infra/codec.encode_dead_letter); the projector projects that topic into the
``dead_letters`` table. Listing reads the table (cheap, keyset-paginated), or the topic
itself (``from_log``: when no projector runs).

Replay depends on what the record was:

- An event (a record of an event topic, dead-lettered by the projector): the projector
  re-applies it (``Projector.replay``), reading it from its topic, where it still is
  (event topics are retained forever). It is never written to the event topic again:
  the event topics are the store, where a second copy would be a second event with the
  same id and version, which the deciders that rebuild state from them would fold twice.
- Anything else (a command the processor could not read): the original record (same
  key, value and headers: from its topic while retained, else from the dead letter's
  copy) is produced to its topic again, so the role that refused it reads it again. A
  command carries its id (the idempotency key), so one decided meanwhile is not decided
  twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiokafka import TopicPartition

from infra import kafka
from infra.codec import Position
from infra.settings import Settings
from infra.topics import Topics
from projections import queries
from projections.projector import Projector, read_dead_letter

_POSITION = re.compile(r"^(?P<topic>.+):(?P<partition>\d{1,9}):(?P<offset>\d{1,18})$")


def parse_ref(ref: str) -> tuple[str | None, Position | None]:
    """``(id, None)`` for a dead letter's id, ``(None, position)`` for
    ``<topic>:<partition>:<offset>`` (the position of the dead-lettered record)."""
    m = _POSITION.match(ref)
    if m is None:
        return ref, None
    return None, Position(m["topic"], int(m["partition"]), int(m["offset"]))


async def _table_rows(
    settings: Settings, **kw: Any
) -> list[dict[str, Any]] | None:
    """``queries.find_dead_letters`` or ``list_dead_letters`` (``find`` in kw), None if
    the table does not exist yet (no projector ran on this schema)."""
    _, database_url, _ = settings.require_services()
    conn = await asyncpg.connect(database_url)
    try:
        if kw.pop("find", False):
            return await queries.find_dead_letters(conn, settings.db_schema, **kw)
        return await queries.list_dead_letters(conn, settings.db_schema, **kw)
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


async def _log_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every dead letter on the dead-letter topic, as ``dead_letters`` rows (one per id)."""
    kafka_url, _, _ = settings.require_services()
    topics = Topics.of(settings)
    tps = await kafka.partitions_of(kafka_url, topics.deadletter)
    rows: dict[str, dict[str, Any]] = {}

    def keep(record: Any) -> None:
        row = read_dead_letter(record)
        rows.setdefault(row["id"], {**row, "replayed_at": None, "replay_note": None})

    await kafka.read_to_end(kafka_url, tps, keep)
    return list(rows.values())


async def list_dead_letters(
    settings: Settings, *, limit: int = 50, topic: str | None = None, from_log: bool = False
) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters (of records from ``topic`` if given), newest
    first, from the ``dead_letters`` table, or with ``from_log`` from the topic."""
    if not from_log:
        rows = await _table_rows(settings, topic=topic, limit=limit)
        return rows or []
    rows = [r for r in await _log_rows(settings) if topic is None or r["source_topic"] == topic]
    rows.sort(key=lambda r: (r["dead_lettered_at"], r["id"]), reverse=True)
    return [{k: v for k, v in r.items() if k != "letter"} for r in rows[:limit]]


@dataclass(frozen=True)
class Replayed:
    """What a replay did, in a sentence (``how``) and where (``source``)."""

    source: Position
    how: str


async def find(settings: Settings, ref: str) -> dict[str, Any]:
    """The dead letter ``ref`` names (its id, or ``<topic>:<partition>:<offset>`` of the
    record), from the table, else from the topic; LookupError if there is none."""
    letter_id, position = parse_ref(ref)
    rows = await _table_rows(settings, find=True, id=letter_id, source=position)
    if not rows:
        rows = [
            r for r in await _log_rows(settings)
            if r["id"] == letter_id
            or (position is not None
                and (r["source_topic"], r["source_partition"], r["source_offset"])
                == (position.topic, position.partition, position.offset))
        ]
    if not rows:
        raise LookupError(f"no dead letter {ref!r}")
    row = rows[0]
    if row["source_topic"] is None or row["source_partition"] is None or (
        row["source_offset"] is None
    ):
        raise LookupError(f"dead letter {ref!r} does not say where its record was")
    return row


async def replay(settings: Settings, ref: str) -> Replayed:
    """Replay the dead letter ``ref`` (see the module docstring for how).

    Raises LookupError if there is no such dead letter, ``projections.projector.
    ReplayError`` if an event is still refused (nothing changed then).
    """
    kafka_url, database_url, redis_url = settings.require_services()
    topics = Topics.of(settings)
    row = await find(settings, ref)
    source = Position(row["source_topic"], row["source_partition"], row["source_offset"])
    if source.topic in topics.event_topics.values():
        projector = Projector(
            bootstrap_servers=kafka_url, topics=topics, database_url=database_url,
            schema=settings.db_schema, redis_url=redis_url, redis_prefix=settings.redis_prefix,
        )
        result = await projector.replay(source)
        how = (
            f"re-applied {result.aggregate} event {result.event_id}"
            + ("" if result.applied else " (ignored: the row had moved past it)")
            + f"; {result.later_applied} later event(s) of it applied"
            + (f", {result.later_dead_lettered} dead-lettered again"
               if result.later_dead_lettered else "")
        )
        return Replayed(source, how)
    key, value, headers, whence = await _original(kafka_url, source, row)
    producer = kafka.producer(kafka_url)
    await producer.start()
    try:
        meta = await producer.send_and_wait(source.topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()
    how = (
        f"produced the record ({whence}) to {source.topic} again, now at partition"
        f" {meta.partition} offset {meta.offset}"
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"UPDATE {settings.db_schema}.dead_letters SET replayed_at = now(), replay_note = $4"
            " WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3",
            source.topic, source.partition, source.offset, how,
        )
    except asyncpg.UndefinedTableError:
        pass
    finally:
        await conn.close()
    return Replayed(source, how)


async def _original(
    bootstrap: str, source: Position, row: dict[str, Any]
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str]:
    """(key, value, headers, whence) of the dead-lettered record: read from its topic
    while it is retained (byte for byte), else rebuilt from the dead letter's copy."""
    tp = TopicPartition(source.topic, source.partition)
    c = kafka.consumer(bootstrap)
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, source.offset)
        batch = await c.getmany(tp, timeout_ms=5000, max_records=1)
        for record in batch.get(tp, []):
            if record.offset == source.offset:
                return record.key, record.value, list(record.headers or ()), "read from its topic"
    finally:
        await c.stop()
    letter = orjson.loads(row["letter"])

    def raw(text: Any) -> bytes | None:
        return None if text is None else str(text).encode("utf-8")

    headers = [(k, raw(v) or b"") for k, v in (letter.get("headers") or {}).items()]
    return raw(letter.get("key")), raw(letter.get("value")), headers, "from the dead letter's copy"
