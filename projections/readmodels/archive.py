"""The event archive: every event some read model applied, once, with where it is in the
log (``events``), for audit queries (the history of an aggregate, as of a time).

It is written last in each batch, from the events the other read models report as
applied (``Applied.events``): an event no view took (a repeat, or one whose aggregate
has no row) is not archived, which is how ``Projector.replay`` tells that a replayed
event was applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from domain.recorded import Position, RecordedEvent
from infra.mapper import event_ce_type
from projections.db import Db, checked_schema
from projections.keys import RedisKeys
from projections.readmodels.base import Applied, ReadModel, Row, as_columns, query_row

NAME = "archive"

DDL = """
-- The event archive: every event, for audit queries (history of an aggregate, as-of).
CREATE TABLE IF NOT EXISTS {s}.events (
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    event_id        text        NOT NULL UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    version         integer     NOT NULL,
    type            text        NOT NULL,
    time            timestamptz NOT NULL,
    correlation_id  text        NOT NULL,
    causation_id    text        NOT NULL,
    schema_version  integer     NOT NULL,
    data            jsonb       NOT NULL,
    projected_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS events_by_aggregate
    ON {s}.events (aggregate_type, aggregate_id, version);
CREATE INDEX IF NOT EXISTS events_by_time ON {s}.events (time);
"""


def _where(e: RecordedEvent) -> Position:
    """Where ``e`` was read from (an archived event always was: it came off a topic)."""
    if e.position is None:
        raise ValueError(f"event {e.id} has no position: only events read back are archived")
    return e.position


class EventArchive(ReadModel):
    """Applied events -> ``events``, in one ``INSERT ... SELECT FROM unnest`` per batch."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        s = schema
        self._insert = (
            f'INSERT INTO {s}.events (topic, partition, "offset", event_id, aggregate_type,'
            " aggregate_id, version, type, time, correlation_id, causation_id, schema_version,"
            " data) SELECT topic, partition, o, event_id, aggregate_type, aggregate_id,"
            " version, type, time, correlation_id, causation_id, schema_version, data::jsonb"
            " FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[],"
            " $6::text[], $7::int[], $8::text[], $9::timestamptz[], $10::text[], $11::text[],"
            " $12::int[], $13::text[]) AS r(topic, partition, o, event_id, aggregate_type,"
            " aggregate_id, version, type, time, correlation_id, causation_id, schema_version,"
            " data) ON CONFLICT DO NOTHING"
        )

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Archive every one of ``events`` (those the read models applied), in one
        statement; one already archived is left as it is."""
        if not events:
            return Applied()
        await conn.execute(
            self._insert,
            *as_columns(
                (
                    _where(e).topic,
                    _where(e).partition,
                    _where(e).offset,
                    e.id,
                    e.aggregate_type,
                    e.aggregate_id,
                    e.version,
                    event_ce_type(e.aggregate_type, e.event.event_type),
                    e.time,
                    e.correlation_id,
                    e.causation_id,
                    e.event.schema_version,
                    e.event.model_dump_json(),
                )
                for e in events
            ),
        )
        return Applied(list(events))


# queries -------------------------------------------------------------------------------


async def aggregate_history(
    db: Db,
    schema: str,
    aggregate_type: str,
    aggregate_id: str,
    *,
    after_version: int = 0,
    limit: int = 100,
) -> list[Row]:
    """The archived events of one aggregate with version > ``after_version``, by version."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"""
        SELECT topic, partition, "offset", event_id, aggregate_type, aggregate_id, version,
               type, time, correlation_id, causation_id, schema_version, data
          FROM {s}.events
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3
         ORDER BY version
         LIMIT $4
        """,
        aggregate_type,
        aggregate_id,
        after_version,
        limit,
    )
    return [query_row(r) for r in records]


async def count_archived(db: Db, schema: str, event_ids: Sequence[str]) -> int:
    """How many of ``event_ids`` are archived (were applied by some read model); in the
    open transaction when ``db`` is a connection in one."""
    s = checked_schema(schema)
    count: int = await db.fetchval(
        f"SELECT count(*) FROM {s}.events WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    return count
