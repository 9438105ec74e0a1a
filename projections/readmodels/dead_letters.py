"""The dead letters read model: every role's dead letters, projected from the dead-letter
topic (``dead_letters``), which ``swarmlog deadletters`` and ``GET /deadletters`` list.

Its input is the records of the dead-letter topic, not events: ``read_dead_letter``
turns any record into a row (never raising), and ``DeadLetters.insert`` writes the rows
in the projector's transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg
import orjson

from domain.recorded import Position
from projections.db import Db, checked_schema
from projections.readmodels.base import Row

NAME = "dead_letters"

DDL = """
-- Dead letters: records some role could not process, projected from the dead-letter
-- topic (newest first by ``dead_lettered_at``). ``letter`` is the dead-letter record's value
-- as written (JSON: reason, the original topic/partition/offset, key, value, headers);
-- ``replayed_at`` is set by ``swarmlog deadletters replay``.
CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    id                text        PRIMARY KEY,
    source_topic      text,
    source_partition  integer,
    source_offset     bigint,
    reason            text        NOT NULL,
    key               text,
    dead_lettered_at  timestamptz NOT NULL,
    letter_partition  integer     NOT NULL,
    letter_offset     bigint      NOT NULL,
    letter            bytea       NOT NULL,
    replayed_at       timestamptz,
    replay_note       text
);
CREATE INDEX IF NOT EXISTS dead_letters_by_time
    ON {s}.dead_letters (dead_lettered_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dead_letters_by_source
    ON {s}.dead_letters (source_topic, source_partition, source_offset);
"""

COLUMNS = (
    "id",
    "source_topic",
    "source_partition",
    "source_offset",
    "reason",
    "key",
    "dead_lettered_at",
    "letter_partition",
    "letter_offset",
    "letter",
)


def _clean(value: Any) -> str | None:
    """``value`` as text PostgreSQL accepts: NUL written as ``\\u0000``, lone surrogates
    escaped; None stays None."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\x00", "\\u0000")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _small_int(value: Any, bits: int) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** (bits - 1)
    return value if ok else None


def read_dead_letter(record: Any) -> Row:
    """A record of the dead-letter topic as a ``dead_letters`` row; never raises.

    Keys: id (the CloudEvent id, else ``<topic>/<partition>/<offset>`` of the letter),
    source_topic, source_partition, source_offset (where the dead-lettered record is;
    None if the letter does not say), reason, key, dead_lettered_at (the CloudEvent
    time, else the record's timestamp), letter_partition, letter_offset, letter (the
    value as written). Text is cleaned of what PostgreSQL refuses (``_clean``).
    """
    headers: dict[str, bytes] = {}
    for k, v in record.headers or ():
        if isinstance(v, bytes):
            headers[k] = v
    letter_id = _clean(headers.get("ce_id", b"").decode("utf-8", "replace")) or ""
    try:
        data = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        data = {"reason": "unreadable dead letter (its value is not a JSON object)"}
    at: datetime | None = None
    try:
        at = datetime.fromisoformat(headers["ce_time"].decode("utf-8"))
        if at.tzinfo is None:
            at = None
    except (KeyError, ValueError):
        at = None
    if at is None:
        at = datetime.fromtimestamp(max(0, record.timestamp or 0) / 1000, UTC)
    source_topic = data.get("topic") if isinstance(data.get("topic"), str) else None
    return {
        # Ours are uuids; a foreign producer's id may be any length (index and cursor
        # bounds), so a long one is named by where the letter is instead.
        "id": (
            letter_id
            if 0 < len(letter_id) <= 200
            else f"{record.topic}/{record.partition}/{record.offset}"
        ),
        "source_topic": _clean(source_topic),
        "source_partition": _small_int(data.get("partition"), 32),
        "source_offset": _small_int(data.get("offset"), 64),
        "reason": _clean(data.get("reason")) or "",
        "key": _clean(data.get("key")),
        "dead_lettered_at": at,
        "letter_partition": record.partition,
        "letter_offset": record.offset,
        "letter": bytes(record.value or b""),
    }


class DeadLetters:
    """Dead-letter records -> ``dead_letters`` (one row per dead letter id; a repeat is
    left as it is); no Redis view. Not a ``ReadModel``: its input is records of the
    dead-letter topic, not events."""

    name: ClassVar[str] = NAME
    ddl: ClassVar[str] = DDL

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self._insert = (
            f"INSERT INTO {schema}.dead_letters ({', '.join(COLUMNS)})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING"
        )

    async def insert(self, conn: asyncpg.Connection, letters: list[Row]) -> None:
        """Insert ``letters`` (rows as ``read_dead_letter`` makes them) in the open
        transaction of ``conn``."""
        if letters:
            await conn.executemany(self._insert, [tuple(d[c] for c in COLUMNS) for d in letters])


# queries -------------------------------------------------------------------------------

_DEAD_LETTER_LIST = (
    "id, source_topic, source_partition, source_offset, reason, key, dead_lettered_at,"
    " letter_partition, letter_offset, replayed_at, replay_note"
)


async def list_dead_letters(
    db: Db,
    schema: str,
    *,
    topic: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Row]:
    """Dead letters newest first (``dead_lettered_at``, then id, both descending), after
    the ``(dead_lettered_at, id)`` key ``after``, of records from ``topic`` if given.

    Each row: id, source_topic/partition/offset (where the dead-lettered record is),
    reason, key, dead_lettered_at, letter_partition/offset (where the dead letter is on
    the dead-letter topic), replayed_at and replay_note (None until replayed).
    """
    s = checked_schema(schema)
    after_at, after_id = after if after is not None else (None, None)
    records = await db.fetch(
        f"""
        SELECT {_DEAD_LETTER_LIST} FROM {s}.dead_letters d
         WHERE ($1::text IS NULL OR d.source_topic = $1)
           AND ($2::timestamptz IS NULL OR (d.dead_lettered_at, d.id) < ($2, $3::text))
         ORDER BY d.dead_lettered_at DESC, d.id DESC
         LIMIT $4
        """,
        topic,
        after_at,
        after_id,
        limit,
    )
    return [dict(r) for r in records]


async def find_dead_letters(
    db: Db, schema: str, *, id: str | None = None, source: Position | None = None
) -> list[Row]:
    """The dead letters with ``id``, or of the record at ``source``, with ``letter`` (the
    dead-letter record's value, bytes), oldest first."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"""
        SELECT {_DEAD_LETTER_LIST}, letter FROM {s}.dead_letters d
         WHERE ($1::text IS NOT NULL AND d.id = $1)
            OR ($2::text IS NOT NULL AND (d.source_topic, d.source_partition, d.source_offset)
                = ($2, $3::integer, $4::bigint))
         ORDER BY d.dead_lettered_at, d.id
        """,
        id,
        source.topic if source else None,
        source.partition if source else None,
        source.offset if source else None,
    )
    return [dict(r) for r in records]


async def mark_replayed(db: Db, schema: str, source: Position, note: str) -> None:
    """Mark the dead letters of the record at ``source`` replayed now, with ``note`` (what
    the replay did) as their ``replay_note``."""
    s = checked_schema(schema)
    await db.execute(
        f"UPDATE {s}.dead_letters SET replayed_at = now(), replay_note = $4"
        " WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3",
        source.topic,
        source.partition,
        source.offset,
        note,
    )
