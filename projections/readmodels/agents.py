"""The agents read model: one row per agent (``agent_rows``, evolved by
``views.evolve_agent``), its task counters (``agent_counters``, added to by the tasks read
model from task events), the ``agents`` view joining them, and in Redis one hash per agent
with its lifecycle, operational status and load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from domain.recorded import RecordedEvent
from projections import views
from projections.db import Db, checked_schema
from projections.keys import RedisKeys
from projections.readmodels.base import (
    Applied,
    ReadModel,
    Row,
    locked_rows,
    params,
    query_row,
    upsert_sql,
)

NAME = "agents"

COLUMNS = (
    "agent_id",
    "name",
    "capabilities",
    "max_concurrent_tasks",
    "cost_per_task",
    "lifecycle",
    "registered_at",
    "last_heartbeat_at",
    "version",
    "updated_at",
)
JSON_COLUMNS = frozenset({"capabilities"})

DDL = """
CREATE TABLE IF NOT EXISTS {s}.agent_rows (
    agent_id              text PRIMARY KEY,
    name                  text        NOT NULL,
    capabilities          jsonb       NOT NULL,
    max_concurrent_tasks  integer     NOT NULL,
    cost_per_task         bigint      NOT NULL,
    lifecycle             text        NOT NULL,
    registered_at         timestamptz NOT NULL,
    last_heartbeat_at     timestamptz,
    version               integer     NOT NULL,
    updated_at            timestamptz NOT NULL
);

-- Counted from task events (projections/readmodels/tasks.py), which may be read before
-- the agent's registration.
CREATE TABLE IF NOT EXISTS {s}.agent_counters (
    agent_id         text PRIMARY KEY,
    tasks_completed  integer NOT NULL DEFAULT 0,
    tasks_failed     integer NOT NULL DEFAULT 0,
    tasks_lost       integer NOT NULL DEFAULT 0
);

-- The agents read model: the row and its counters.
CREATE OR REPLACE VIEW {s}.agents AS
SELECT r.agent_id, r.name, r.capabilities, r.max_concurrent_tasks, r.cost_per_task,
       r.lifecycle, r.registered_at, r.last_heartbeat_at,
       coalesce(c.tasks_completed, 0) AS tasks_completed,
       coalesce(c.tasks_failed, 0) AS tasks_failed,
       coalesce(c.tasks_lost, 0) AS tasks_lost,
       r.version, r.updated_at
  FROM {s}.agent_rows r LEFT JOIN {s}.agent_counters c USING (agent_id);
"""

# Sets the hash only when ARGV[1] is higher than its stored version: KEYS[1], ARGV = version,
# field, value, field, value...
_GUARDED_HSET = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class Agents(ReadModel):
    """Agent events -> ``agent_rows``; Redis: one hash per agent (``RedisKeys.agent``)
    with ``lifecycle``, ``status`` (idle or busy while running, else the lifecycle),
    ``load`` (its tasks assigned or running) and ``version`` (when the row was read, in
    microseconds of the database's clock)."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        self._upsert = upsert_sql(schema, "agent_rows", COLUMNS, "agent_id", JSON_COLUMNS)

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply the agent events of ``events``; the agents whose row changed have their
        Redis hash copied."""
        ids = {e.aggregate_id for e in events if e.aggregate_type == "agent"}
        if not ids:
            return Applied()
        # Lock order (agents, then tasks, by id) keeps concurrent projectors deadlock-free.
        agents = await locked_rows(conn, self.schema, "agent_rows", "agent_id", ids)
        fresh: list[RecordedEvent] = []
        for e in events:
            if e.aggregate_type != "agent":
                continue
            before = agents.get(e.aggregate_id)
            after = views.evolve_agent(before, e)
            if after is not None and after is not before:
                agents[e.aggregate_id] = after
                fresh.append(e)
        touched = {e.aggregate_id for e in fresh}
        if touched:
            await conn.executemany(
                self._upsert, [params(agents[a], COLUMNS) for a in sorted(touched)]
            )
        return Applied(fresh, {NAME: touched})

    async def sync_redis(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, ids: set[str] | None
    ) -> None:
        """Copy agents' lifecycle, status and load to Redis (all agents when None)."""
        s = self.schema
        where = "" if ids is None else "WHERE a.agent_id = ANY($1::text[])"
        args: list[Any] = [] if ids is None else [sorted(ids)]
        rows = await pool.fetch(
            f"""
            SELECT a.agent_id, a.lifecycle,
                   (SELECT count(*) FROM {s}.tasks t
                     WHERE t.agent_id = a.agent_id AND t.status IN ('assigned', 'running')) AS load,
                   (extract(epoch FROM clock_timestamp()) * 1e6)::bigint AS read_at
              FROM {s}.agent_rows a {where}
            """,
            *args,
        )
        if not rows:
            return
        hset = redis.register_script(_GUARDED_HSET)
        async with redis.pipeline(transaction=False) as pipe:
            for row in rows:
                status = row["lifecycle"]
                if status == "running":
                    status = "busy" if row["load"] else "idle"
                # Load depends on other aggregates, so the guard is when the row was read
                # (the database's clock, shared by every projector copy): a slower copy's
                # older read never overwrites a newer one.
                version = row["read_at"]
                await hset(
                    keys=[self.keys.agent(row["agent_id"])],
                    args=[
                        version,
                        "lifecycle",
                        row["lifecycle"],
                        "status",
                        status,
                        "load",
                        row["load"],
                    ],
                    client=pipe,
                )
            await pipe.execute()


# queries -------------------------------------------------------------------------------

#: The operational status of an agent, derived from its lifecycle and its load (the
#: number of its tasks that are assigned or running).
_AGENT_VIEW = """
SELECT a.agent_id, a.name, a.capabilities, a.max_concurrent_tasks, a.cost_per_task,
       a.lifecycle, a.registered_at, a.last_heartbeat_at, a.tasks_completed,
       a.tasks_failed, a.tasks_lost, a.version, a.updated_at,
       coalesce(l.load, 0)::integer AS load,
       CASE a.lifecycle
            WHEN 'running' THEN CASE WHEN coalesce(l.load, 0) > 0 THEN 'busy' ELSE 'idle' END
            ELSE a.lifecycle
       END AS status
  FROM {s}.agents a
  LEFT JOIN LATERAL (
       SELECT count(*) AS load
         FROM {s}.tasks t
        WHERE t.agent_id = a.agent_id AND t.status IN ('assigned', 'running')
  ) l ON true
"""


async def get_agent(db: Db, schema: str, agent_id: str) -> Row | None:
    """One agent with its derived ``status`` and ``load``, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(
        f"SELECT * FROM ({_AGENT_VIEW.format(s=s)}) v WHERE v.agent_id = $1", agent_id
    )
    return None if record is None else query_row(record)


async def list_agents(
    db: Db,
    schema: str,
    *,
    lifecycle: str | None = None,
    status: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[Row]:
    """Agents ordered by ``agent_id``, after the agent id ``after``, filtered by lifecycle
    and/or derived status (idle, busy, registered, stopped, offline, deregistered)."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"""
        SELECT * FROM ({_AGENT_VIEW.format(s=s)}) v
         WHERE ($1::text IS NULL OR v.lifecycle = $1)
           AND ($2::text IS NULL OR v.status = $2)
           AND ($3::text IS NULL OR v.agent_id > $3)
         ORDER BY v.agent_id
         LIMIT $4
        """,
        lifecycle,
        status,
        after,
        limit,
    )
    return [query_row(r) for r in records]
