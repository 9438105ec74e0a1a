"""The projection's consumed positions: the next offset of every partition the projector
has applied, stored in PostgreSQL in the same transaction as the rows
(``projection_offsets``), and the queries that read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg

from domain.recorded import Position
from projections.db import Db, checked_schema

#: The name the projector stores its offsets under: every read model and the event
#: archive are projected together, in one transaction per batch, so they share one.
PROJECTION = "core"

DDL = """
-- The consumed position of each projection: written in the same transaction as its rows.
CREATE TABLE IF NOT EXISTS {s}.projection_offsets (
    projection   text    NOT NULL,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint  NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
"""


async def stored_offsets(db: Db, schema: str) -> dict[tuple[str, int], int]:
    """The next offset ``PROJECTION`` stored for each (topic, partition) it has read."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT topic, partition, next_offset FROM {s}.projection_offsets WHERE projection = $1",
        PROJECTION,
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in records}


async def lock_offsets(
    conn: asyncpg.Connection, schema: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The next offset ``PROJECTION`` stored for each of ``partitions`` (topic, partition)
    that has one, its rows locked (``FOR UPDATE``, in topic and partition order) until the
    open transaction of ``conn`` ends: a projector batch holds them while it applies, so
    two copies never apply the same records."""
    s = checked_schema(schema)
    wanted = sorted(set(partitions))
    records = await conn.fetch(
        f"SELECT o.topic, o.partition, o.next_offset FROM {s}.projection_offsets o"
        " JOIN unnest($2::text[], $3::int[]) AS b(topic, partition)"
        " USING (topic, partition) WHERE o.projection = $1"
        " ORDER BY o.topic, o.partition FOR UPDATE OF o",
        PROJECTION,
        [t for t, _ in wanted],
        [p for _, p in wanted],
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in records}


async def lock_offset(
    conn: asyncpg.Connection, schema: str, topic: str, partition: int
) -> int | None:
    """The next offset ``PROJECTION`` stored for ``topic``/``partition`` (None if none),
    its row locked (``FOR UPDATE``) until the open transaction of ``conn`` ends."""
    s = checked_schema(schema)
    next_offset: int | None = await conn.fetchval(
        f"SELECT next_offset FROM {s}.projection_offsets WHERE projection = $1"
        " AND topic = $2 AND partition = $3 FOR UPDATE",
        PROJECTION,
        topic,
        partition,
    )
    return next_offset


async def save_offsets(
    conn: asyncpg.Connection, schema: str, offsets: Iterable[tuple[str, int, int]]
) -> None:
    """Store ``offsets`` (topic, partition, next offset) as ``PROJECTION``'s, in the open
    transaction of ``conn`` (the one that applied the records below them), replacing
    what was stored."""
    s = checked_schema(schema)
    await conn.executemany(
        f"INSERT INTO {s}.projection_offsets (projection, topic, partition, next_offset,"
        " updated_at) VALUES ($1, $2, $3, $4, now()) ON CONFLICT (projection, topic,"
        " partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        [(PROJECTION, topic, partition, n) for topic, partition, n in offsets],
    )


async def projected_offsets(
    db: Db, schema: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The next offset every projection of each (topic, partition) has reached: the lowest
    over the projections that have a row for it; partitions with no row are absent."""
    s = checked_schema(schema)
    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    records = await db.fetch(
        f"""
        SELECT o.topic, o.partition, min(o.next_offset) AS next_offset
          FROM {s}.projection_offsets o
          JOIN unnest($1::text[], $2::integer[]) AS w(topic, partition)
            ON o.topic = w.topic AND o.partition = w.partition
         GROUP BY o.topic, o.partition
        """,
        [t for t, _ in wanted],
        [p for _, p in wanted],
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in records}


async def unreached(db: Db, schema: str, positions: Sequence[Position]) -> list[Position]:
    """The positions the read models have not projected yet (next_offset <= offset)."""
    reached = await projected_offsets(db, schema, ((p.topic, p.partition) for p in positions))
    return [p for p in positions if reached.get((p.topic, p.partition), -1) <= p.offset]
