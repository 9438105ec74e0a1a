"""PostgreSQL as the read models use it: the schema name they are interpolated with, and
how a connection is set up.

Every table lives in the schema named by ``Settings.db_schema`` (tests use a fresh one
each), so a read model can be rebuilt into a fresh schema and swapped in. The tables
themselves are declared by the read models (projections/readmodels/, one module each)
and created by ``projections.schema.migrate``.
"""

from __future__ import annotations

import json
import re
from typing import TypeAlias

import asyncpg

#: Where a query runs: a pool, or one of its connections (inside a transaction).
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def checked_schema(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier, else ValueError (it is
    interpolated into SQL, so nothing else is allowed)."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid schema name {name!r}: use [a-z_][a-z0-9_]*")
    return name


async def init_connection(conn: asyncpg.Connection) -> None:
    """Set up a new connection of a pool (``asyncpg.create_pool(..., init=init_connection)``):
    ``json`` and ``jsonb`` values go in and come out as Python data (``json.dumps`` /
    ``json.loads``). Every pool that reads or writes the read models is built with it;
    the projector checks that its pool was (``has_json_codec``)."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def has_json_codec(db: Db) -> bool:
    """True if ``db`` decodes ``jsonb`` to Python data (its connections were set up by
    ``init_connection``); the projector refuses a pool without it, whose JSON columns it
    would write as JSON strings."""
    return bool(await db.fetchval("SELECT '{}'::jsonb") == {})
