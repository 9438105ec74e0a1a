"""What a read model is to the projector, and the SQL helpers the read models share.

A read model (one module each in projections/readmodels/) declares its tables (``ddl``),
how a batch of recorded events changes them (``apply``, run inside the projector's
transaction) and, if it keeps a hot view in Redis, how that view is copied from its rows
(``sync_redis``, run after the commit). The rows themselves evolve in the pure views of
projections/views.py; a read model reads the rows the batch touches, folds the events
over them with its views and writes back the rows that changed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import asyncpg
import redis.asyncio as aioredis

from domain.recorded import RecordedEvent
from projections.keys import RedisKeys

#: A read-model row: a dict keyed by column name.
Row = dict[str, Any]


@dataclass
class Applied:
    """What a read model did with a batch: the events that changed one of its rows, in
    order (the event archive records exactly these), and per read model name the ids
    whose Redis view may have changed (copied after the commit by that read model's
    ``sync_redis``)."""

    events: list[RecordedEvent] = field(default_factory=list)
    redis: dict[str, set[str]] = field(default_factory=dict)

    def merge(self, other: Applied) -> None:
        """Add ``other``'s events (after these) and Redis ids to this one."""
        self.events += other.events
        for name, ids in other.redis.items():
            self.redis.setdefault(name, set()).update(ids)


class ReadModel(ABC):
    """One read model of the event topics, as the projector drives it.

    ``name`` names it (and its Redis view, in ``Applied.redis``); ``ddl`` creates its
    tables, idempotently, with ``{s}`` for the schema (``projections.schema.migrate``
    runs every registered read model's). A read model is built once per projector with
    the (checked) schema and the deployment's Redis keys.
    """

    name: ClassVar[str]
    ddl: ClassVar[str]

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        self.schema = schema
        self.keys = keys

    @abstractmethod
    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply ``events`` (a batch, in log order per partition; every type of event:
        ignore those of other aggregates) to the rows, in the open transaction of
        ``conn``. Lock the rows it reads (``FOR UPDATE``, in id order) so concurrent
        projectors stay consistent and deadlock-free.

        Raising fails the batch: the projector rolls it back and isolates the events
        that fail on their own (dead letters), unless ``is_transient`` says it was an
        outage (then the batch is retried).
        """

    async def sync_redis(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, ids: set[str] | None
    ) -> None:
        """Copy the Redis view of ``ids`` (every row when None) from the committed rows;
        nothing by default (a read model with no Redis view). Must be idempotent: it
        runs again after a failure, and from every projector copy."""
        return None


# SQL helpers ---------------------------------------------------------------------------


def upsert_sql(
    schema: str, table: str, columns: tuple[str, ...], key: str, json_columns: frozenset[str]
) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` of every column of ``table``, one row
    per call (``executemany`` with ``params``); ``json_columns`` are cast to jsonb."""
    cols = ", ".join(columns)
    values = ", ".join(
        f"${i}::jsonb" if c in json_columns else f"${i}" for i, c in enumerate(columns, 1)
    )
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != key)
    return (
        f"INSERT INTO {schema}.{table} ({cols}) VALUES ({values}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


def params(row: Row, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """The values of ``row`` in the order of ``columns`` (the parameters of an upsert)."""
    return tuple(row[c] for c in columns)


def as_columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as columns: the arrays of an ``INSERT ... SELECT FROM unnest(...)``."""
    return [list(c) for c in zip(*rows, strict=True)]


async def locked_rows(
    conn: asyncpg.Connection, schema: str, table: str, key: str, ids: Iterable[str]
) -> dict[str, Row]:
    """The rows of ``table`` whose ``key`` is in ``ids``, locked (``FOR UPDATE``, in key
    order, which keeps concurrent projectors deadlock-free), by key."""
    records = await conn.fetch(
        f"SELECT * FROM {schema}.{table} WHERE {key} = ANY($1::text[]) ORDER BY {key} FOR UPDATE",
        sorted(ids),
    )
    return {rec[key]: dict(rec) for rec in records}


# query helpers -------------------------------------------------------------------------

#: The JSON columns of every read model's tables, decoded by ``query_row`` when the
#: connection has no JSON codec (``projections.schema.init_connection``).
_QUERY_JSON_COLUMNS = (
    "capabilities",
    "payload",
    "required_capabilities",
    "result",
    "data",
    "spec",
    "params",
    "inputs",
    "parameters",
)


def query_row(record: asyncpg.Record) -> Row:
    """A record the API reads as a plain dict, its JSON columns decoded."""
    row = dict(record)
    for column in _QUERY_JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row
