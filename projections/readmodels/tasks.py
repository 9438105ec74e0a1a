"""The tasks read model: one row per task (``tasks``, evolved by ``views.evolve_task``),
and the agents' task counters (``agent_counters``, declared by the agents read model)
added to from task events. A task event changes its agent's load, so the agents that
held or hold a task of the batch have their Redis hash copied again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from domain.recorded import RecordedEvent
from projections import views
from projections.db import Db, checked_schema
from projections.keys import RedisKeys
from projections.readmodels import agents
from projections.readmodels.base import (
    Applied,
    ReadModel,
    Row,
    locked_rows,
    params,
    query_row,
    upsert_sql,
)

NAME = "tasks"

COLUMNS = (
    "task_id",
    "type",
    "payload",
    "required_capabilities",
    "priority",
    "priority_rank",
    "max_cost",
    "lease_timeout_s",
    "run_timeout_s",
    "max_attempts",
    "status",
    "attempts",
    "requeues",
    "agent_id",
    "progress",
    "progress_message",
    "result",
    "quality",
    "error",
    "not_before",
    "submitted_at",
    "queued_at",
    "assigned_at",
    "started_at",
    "finished_at",
    "version",
    "updated_at",
)
JSON_COLUMNS = frozenset({"payload", "required_capabilities", "result"})

DDL = """
CREATE TABLE IF NOT EXISTS {s}.tasks (
    task_id                text PRIMARY KEY,
    type                   text        NOT NULL,
    payload                jsonb       NOT NULL,
    required_capabilities  jsonb       NOT NULL,
    priority               text        NOT NULL,
    priority_rank          integer     NOT NULL,
    max_cost               bigint,
    lease_timeout_s        double precision NOT NULL,
    run_timeout_s          double precision NOT NULL,
    max_attempts           integer     NOT NULL,
    status                 text        NOT NULL,
    attempts               integer     NOT NULL DEFAULT 0,
    requeues               integer     NOT NULL DEFAULT 0,
    agent_id               text,
    progress               double precision NOT NULL DEFAULT 0,
    progress_message       text,
    result                 jsonb,
    quality                double precision,
    error                  text,
    not_before             timestamptz,
    submitted_at           timestamptz NOT NULL,
    queued_at              timestamptz,
    assigned_at            timestamptz,
    started_at             timestamptz,
    finished_at            timestamptz,
    version                integer     NOT NULL,
    updated_at             timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON {s}.tasks (status, priority_rank DESC, submitted_at);
CREATE INDEX IF NOT EXISTS tasks_by_agent ON {s}.tasks (agent_id, status);
CREATE INDEX IF NOT EXISTS tasks_by_type ON {s}.tasks (type, status);
"""


class Tasks(ReadModel):
    """Task events -> ``tasks`` and ``agent_counters``; no Redis view of its own (it marks
    the agents whose load may have changed for the agents read model's)."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        s = schema
        self._upsert = upsert_sql(s, "tasks", COLUMNS, "task_id", JSON_COLUMNS)
        self._add_counts = (
            f"INSERT INTO {s}.agent_counters AS c (agent_id, tasks_completed, tasks_failed,"
            " tasks_lost) VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id) DO UPDATE SET"
            " tasks_completed = c.tasks_completed + EXCLUDED.tasks_completed,"
            " tasks_failed = c.tasks_failed + EXCLUDED.tasks_failed,"
            " tasks_lost = c.tasks_lost + EXCLUDED.tasks_lost"
        )

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply the task events of ``events``. The agents that held a task of the batch
        before it, hold one after it, or gained a counter have their Redis hash copied."""
        ids = {e.aggregate_id for e in events if e.aggregate_type == "task"}
        if not ids:
            return Applied()
        tasks = await locked_rows(conn, self.schema, "tasks", "task_id", ids)
        # A requeue leaves the row on its agent until the next event clears it, which may
        # come in a later batch: remember who held each task before this batch too.
        holders = {t["agent_id"] for t in tasks.values() if t.get("agent_id")}
        counters: dict[tuple[str, str], int] = defaultdict(int)
        fresh: list[RecordedEvent] = []
        for e in events:
            if e.aggregate_type != "task":
                continue
            before = tasks.get(e.aggregate_id)
            after = views.evolve_task(before, e)
            if after is not None and after is not before:
                tasks[e.aggregate_id] = after
                fresh.append(e)
                if (count := views.agent_counts(e)) is not None:
                    counters[count] += 1
        touched = {e.aggregate_id for e in fresh}
        holders |= {t["agent_id"] for t in tasks.values() if t.get("agent_id")}
        holders |= {a for a, _ in counters}
        if touched:
            await conn.executemany(
                self._upsert, [params(tasks[t], COLUMNS) for t in sorted(touched)]
            )
        if counters:
            # Kept apart from agent_rows so that a task finished before its agent's
            # registration has been read still counts (the topics are read independently).
            await conn.executemany(
                self._add_counts,
                [
                    (
                        agent_id,
                        counters[(agent_id, "tasks_completed")],
                        counters[(agent_id, "tasks_failed")],
                        counters[(agent_id, "tasks_lost")],
                    )
                    for agent_id in sorted({a for a, _ in counters})
                ],
            )
        return Applied(fresh, {agents.NAME: holders})


# queries -------------------------------------------------------------------------------


async def get_task(db: Db, schema: str, task_id: str) -> Row | None:
    """One task, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.tasks WHERE task_id = $1", task_id)
    return None if record is None else query_row(record)


async def list_tasks(
    db: Db,
    schema: str,
    *,
    status: str | None = None,
    type: str | None = None,
    agent_id: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Row]:
    """Tasks newest first (``submitted_at`` descending, then ``task_id`` descending),
    after the ``(submitted_at, task_id)`` key ``after``, filtered by status, type, agent."""
    s = checked_schema(schema)
    after_at, after_id = after if after is not None else (None, None)
    records = await db.fetch(
        f"""
        SELECT * FROM {s}.tasks t
         WHERE ($1::text IS NULL OR t.status = $1)
           AND ($2::text IS NULL OR t.type = $2)
           AND ($3::text IS NULL OR t.agent_id = $3)
           AND ($4::timestamptz IS NULL OR (t.submitted_at, t.task_id) < ($4, $5::text))
         ORDER BY t.submitted_at DESC, t.task_id DESC
         LIMIT $6
        """,
        status,
        type,
        agent_id,
        after_at,
        after_id,
        limit,
    )
    return [query_row(r) for r in records]
