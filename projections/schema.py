"""The read models' PostgreSQL schema: the DDL of every registered read model (and of the
projection offsets), created idempotently into one schema by ``migrate``.

Every table lives in the schema named by ``Settings.db_schema`` (tests use a fresh one
each), so a read model can be rebuilt into a fresh schema and swapped in.
"""

from __future__ import annotations

import asyncpg

from projections import offsets
from projections.db import checked_schema, init_connection
from projections.readmodels import READ_MODELS, DeadLetters, EventArchive

__all__ = ["checked_schema", "ddl", "init_connection", "migrate"]


def ddl(schema: str) -> str:
    """The DDL of the schema, the projection offsets, the event archive, every read model
    of ``READ_MODELS`` and the dead letters (idempotent: ``CREATE ... IF NOT EXISTS``)."""
    s = checked_schema(schema)
    parts = [
        "CREATE SCHEMA IF NOT EXISTS {s};",
        offsets.DDL,
        EventArchive.ddl,
        *(model.ddl for model in READ_MODELS),
        DeadLetters.ddl,
    ]
    return "\n".join(part.format(s=s) for part in parts)


async def migrate(conn: asyncpg.Connection, schema: str) -> None:
    """Create the schema and every read model's tables in it, if missing (idempotent;
    serialized by an advisory lock, so concurrent starts are safe)."""
    s = checked_schema(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"swarmlog-migrate-{s}")
        await conn.execute(ddl(s))
