"""Every read model, registered once: a module per read model (its tables, how a batch of
events changes them, its Redis view and its queries), listed here in the order the
projector applies them in each batch's transaction (also the order rows are locked in,
which keeps concurrent projectors deadlock-free).

To add a read model: write its module (a ``ReadModel`` subclass with ``name``, ``ddl``,
``apply`` and, if it keeps a Redis view, ``sync_redis``; its row logic as pure functions
in projections/views.py) and add its class to ``READ_MODELS``. ``migrate`` creates its
tables, the projector applies it, and the event archive records the events it applied.
"""

from __future__ import annotations

import asyncpg

from projections import offsets
from projections.readmodels.accounts import Accounts
from projections.readmodels.agents import Agents
from projections.readmodels.archive import EventArchive
from projections.readmodels.base import Applied, ReadModel
from projections.readmodels.dead_letters import DeadLetters
from projections.readmodels.proposals import Proposals
from projections.readmodels.tasks import Tasks
from projections.readmodels.workflows import Workflows
from projections.schema import checked_schema

__all__ = [
    "READ_MODELS",
    "Applied",
    "DeadLetters",
    "EventArchive",
    "ReadModel",
    "ddl",
    "migrate",
]

#: The read models of the event topics, in the order they are applied.
READ_MODELS: tuple[type[ReadModel], ...] = (Agents, Tasks, Accounts, Proposals, Workflows)


def ddl(schema: str) -> str:
    """The DDL of the schema, the projection offsets, the event archive, every read model
    and the dead letters (idempotent: ``CREATE ... IF NOT EXISTS``)."""
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
