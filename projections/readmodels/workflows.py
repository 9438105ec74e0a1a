"""The workflows read model: definitions (``workflows``, evolved by
``views.evolve_workflow``), every published template version (``workflow_templates``),
runs (``workflow_runs``, from the execution request on, evolved by ``views.evolve_run``)
and their steps (``workflow_steps``, changed per batch by ``views.StepChange``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from domain import workflow as wf
from domain import workflow_run as wr
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

NAME = "workflows"

WORKFLOW_COLUMNS = (
    "id",
    "name",
    "description",
    "version",
    "status",
    "spec",
    "params",
    "template",
    "runs",
    "created_at",
    "updated_at",
    "aggregate_version",
)
TEMPLATE_COLUMNS = ("name", "version", "description", "parameters", "spec", "published_at")
RUN_COLUMNS = (
    "run_id",
    "workflow_id",
    "version",
    "status",
    "inputs",
    "result",
    "error",
    "failed_step",
    "compensated",
    "steps_total",
    "steps_done",
    "requested_at",
    "started_at",
    "finished_at",
    "updated_at",
    "aggregate_version",
)
STEP_COLUMNS = ("run_id", "step_id", "position", "kind", "task_type", "status", "items_total")
JSON_COLUMNS = frozenset({"spec", "params", "inputs", "result", "parameters"})

DDL = """
-- Workflows: definitions, template versions, runs and their steps.
-- ``version`` is the definition's version (bumped by each update); ``aggregate_version``
-- the aggregate's event sequence, which If-Match compares (executions bump it too).
CREATE TABLE IF NOT EXISTS {s}.workflows (
    id                 text PRIMARY KEY,
    name               text        NOT NULL,
    description        text        NOT NULL,
    version            integer     NOT NULL,
    status             text        NOT NULL,
    spec               jsonb       NOT NULL,
    params             jsonb       NOT NULL,
    template           text,
    runs               integer     NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    aggregate_version  integer     NOT NULL
);
CREATE INDEX IF NOT EXISTS workflows_by_created ON {s}.workflows (created_at DESC, id DESC);

-- Every published version of every template (a version never changes).
CREATE TABLE IF NOT EXISTS {s}.workflow_templates (
    name          text        NOT NULL,
    version       integer     NOT NULL,
    description   text        NOT NULL,
    parameters    jsonb       NOT NULL,
    spec          jsonb       NOT NULL,
    published_at  timestamptz NOT NULL,
    PRIMARY KEY (name, version)
);

-- A run is "pending" from its execution request until the run aggregate has started;
-- ``aggregate_version`` is the run aggregate's event sequence (0 while pending).
CREATE TABLE IF NOT EXISTS {s}.workflow_runs (
    run_id             text PRIMARY KEY,
    workflow_id        text        NOT NULL,
    version            integer     NOT NULL,
    status             text        NOT NULL,
    inputs             jsonb       NOT NULL,
    result             jsonb,
    error              text,
    failed_step        text,
    compensated        boolean     NOT NULL DEFAULT false,
    steps_total        integer     NOT NULL,
    steps_done         integer     NOT NULL DEFAULT 0,
    requested_at       timestamptz NOT NULL,
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL,
    aggregate_version  integer     NOT NULL
);
CREATE INDEX IF NOT EXISTS workflow_runs_by_requested
    ON {s}.workflow_runs (requested_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS workflow_runs_by_workflow
    ON {s}.workflow_runs (workflow_id, requested_at DESC, run_id DESC);

-- One row per step (and compensation step) of a run, in declaration order
-- (``position``). Updated per projector batch with counters and array appends, so a
-- map step of many items costs one row update per batch, not one per item.
CREATE TABLE IF NOT EXISTS {s}.workflow_steps (
    run_id            text        NOT NULL,
    step_id           text        NOT NULL,
    position          integer     NOT NULL,
    kind              text        NOT NULL,
    task_type         text        NOT NULL,
    status            text        NOT NULL,
    items_total       integer,
    items_done        integer     NOT NULL DEFAULT 0,
    attempts          integer     NOT NULL DEFAULT 0,
    task_ids          text[]      NOT NULL DEFAULT '{{}}',
    result            jsonb,
    error             text,
    started_at        timestamptz,
    finished_at       timestamptz,
    compensating_for  text,
    PRIMARY KEY (run_id, step_id)
);
"""


class Workflows(ReadModel):
    """Workflow, template and run events -> ``workflows``, ``workflow_templates``,
    ``workflow_runs`` and ``workflow_steps``; no Redis view."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        s = schema
        self._upsert_workflow = upsert_sql(s, "workflows", WORKFLOW_COLUMNS, "id", JSON_COLUMNS)
        self._insert_template = (
            f"INSERT INTO {s}.workflow_templates ({', '.join(TEMPLATE_COLUMNS)}) VALUES"
            " ($1, $2, $3, $4::jsonb, $5::jsonb, $6) ON CONFLICT DO NOTHING"
        )
        # steps_done is counted from the steps rows (below), never written from memory; a
        # row never goes back to an older aggregate version (a copy projecting the
        # workflow topic may insert the pending row after another has started the run).
        self._upsert_run = (
            upsert_sql(s, "workflow_runs", RUN_COLUMNS, "run_id", JSON_COLUMNS).replace(
                ", steps_done = EXCLUDED.steps_done", ""
            )
            + f" WHERE {s}.workflow_runs.aggregate_version <= EXCLUDED.aggregate_version"
        )
        self._insert_step = (
            f"INSERT INTO {s}.workflow_steps ({', '.join(STEP_COLUMNS)}) VALUES"
            " ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
        )
        # The result goes in as JSON text ($9, when $8), so a result of JSON null is
        # stored as JSON null, not as SQL NULL.
        self._change_step = (
            f"UPDATE {s}.workflow_steps SET status = coalesce($3, status),"
            " items_total = coalesce($4, items_total), items_done = items_done + $5,"
            " attempts = greatest(attempts, $6), task_ids = task_ids || $7::text[],"
            " result = CASE WHEN $8 THEN $9::text::jsonb ELSE result END,"
            " error = coalesce($10, error), started_at = coalesce($11, started_at),"
            " finished_at = coalesce($12, finished_at),"
            " compensating_for = coalesce($13, compensating_for)"
            " WHERE run_id = $1 AND step_id = $2"
        )
        self._close_steps = (
            f"UPDATE {s}.workflow_steps SET status = 'cancelled', finished_at = $2"
            " WHERE run_id = $1 AND status IN ('pending', 'running')"
        )
        self._count_steps_done = (
            f"UPDATE {s}.workflow_runs r SET steps_done = (SELECT count(*) FROM"
            f" {s}.workflow_steps st WHERE st.run_id = r.run_id AND st.kind = 'step'"
            " AND st.status IN ('completed', 'failed', 'skipped', 'cancelled'))"
            " WHERE r.run_id = ANY($1::text[])"
        )

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply the workflow, template and run events of ``events``: definitions,
        template versions, runs and their steps.

        Steps are written as changes merged over the batch (views.StepChange), one
        UPDATE per touched step, so a map step's per-item events cost one row update
        per batch.
        """
        s = self.schema
        workflow_ids = {e.aggregate_id for e in events if e.aggregate_type == wf.WORKFLOW}
        run_ids = {e.aggregate_id for e in events if e.aggregate_type == wr.RUN}
        run_ids |= {
            e.event.run_id for e in events if isinstance(e.event, wf.WorkflowExecutionRequested)
        }
        if (
            not workflow_ids
            and not run_ids
            and not any(e.aggregate_type == wf.TEMPLATE for e in events)
        ):
            return Applied()
        # Lock order (definitions, then runs, then steps, by id).
        workflows = await locked_rows(conn, s, "workflows", "id", workflow_ids)
        runs = await locked_rows(conn, s, "workflow_runs", "run_id", run_ids)
        fresh: list[RecordedEvent] = []
        templates: list[Row] = []
        new_steps: list[Row] = []
        changes: dict[tuple[str, str], views.StepChange] = {}
        closes: list[tuple[str, Any]] = []
        touched_workflows: set[str] = set()
        touched_runs: set[str] = set()
        recount: set[str] = set()
        for e in events:
            if e.aggregate_type == wf.WORKFLOW:
                before = workflows.get(e.aggregate_id)
                after = views.evolve_workflow(before, e)
                if after is None or after is before:
                    continue
                workflows[e.aggregate_id] = after
                touched_workflows.add(e.aggregate_id)
                fresh.append(e)
                pending = views.requested_run(e)
                if pending is not None and pending["run_id"] not in runs:
                    runs[pending["run_id"]] = pending
                    touched_runs.add(pending["run_id"])
            elif e.aggregate_type == wf.TEMPLATE:
                row = views.template_row(e)
                if row is not None:
                    templates.append(row)
                    fresh.append(e)
            elif e.aggregate_type == wr.RUN:
                before = runs.get(e.aggregate_id)
                after = views.evolve_run(before, e)
                if after is None or after is before:
                    continue
                runs[e.aggregate_id] = after
                touched_runs.add(e.aggregate_id)
                fresh.append(e)
                new_steps += views.step_rows(e)
                found = views.step_change(e)
                if found is not None:
                    key = (e.aggregate_id, found[0])
                    if key in changes:
                        changes[key].absorb(found[1])
                    else:
                        changes[key] = found[1]
                    if found[1].status is not None:
                        recount.add(e.aggregate_id)
                if views.closes_run(e):
                    closes.append((e.aggregate_id, e.time))
                    recount.add(e.aggregate_id)
        if touched_workflows:
            await conn.executemany(
                self._upsert_workflow,
                [params(workflows[w], WORKFLOW_COLUMNS) for w in sorted(touched_workflows)],
            )
        if templates:
            await conn.executemany(
                self._insert_template, [params(t, TEMPLATE_COLUMNS) for t in templates]
            )
        if touched_runs:
            await conn.executemany(
                self._upsert_run, [params(runs[r], RUN_COLUMNS) for r in sorted(touched_runs)]
            )
        if new_steps:
            await conn.executemany(
                self._insert_step, [tuple(r[c] for c in STEP_COLUMNS) for r in new_steps]
            )
        if changes:
            await conn.executemany(
                self._change_step,
                [
                    (
                        run_id,
                        step_id,
                        c.status,
                        c.items_total,
                        c.items_done,
                        c.attempts,
                        c.task_ids,
                        c.has_result,
                        json.dumps(c.result) if c.has_result else None,
                        c.error,
                        c.started_at,
                        c.finished_at,
                        c.compensating_for,
                    )
                    for (run_id, step_id), c in sorted(changes.items())
                ],
            )
        if closes:
            await conn.executemany(self._close_steps, closes)
        if recount:
            await conn.execute(self._count_steps_done, sorted(recount))
        return Applied(fresh)


# queries -------------------------------------------------------------------------------


async def get_workflow(db: Db, schema: str, workflow_id: str) -> Row | None:
    """One workflow definition (``spec`` and ``params`` decoded), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.workflows WHERE id = $1", workflow_id)
    return None if record is None else query_row(record)


async def list_workflows(
    db: Db,
    schema: str,
    *,
    status: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Row]:
    """Definitions newest first (``created_at``, then id, both descending), after the
    ``(created_at, id)`` key ``after``, optionally of one ``status``."""
    s = checked_schema(schema)
    after_at, after_id = after if after is not None else (None, None)
    records = await db.fetch(
        f"""
        SELECT * FROM {s}.workflows w
         WHERE ($1::text IS NULL OR w.status = $1)
           AND ($2::timestamptz IS NULL OR (w.created_at, w.id) < ($2, $3::text))
         ORDER BY w.created_at DESC, w.id DESC
         LIMIT $4
        """,
        status,
        after_at,
        after_id,
        limit,
    )
    return [query_row(r) for r in records]


async def get_template(db: Db, schema: str, name: str, version: int | None = None) -> Row | None:
    """Version ``version`` of template ``name`` (its latest when None), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(
        f"SELECT * FROM {s}.workflow_templates WHERE name = $1"
        " AND ($2::integer IS NULL OR version = $2) ORDER BY version DESC LIMIT 1",
        name,
        version,
    )
    return None if record is None else query_row(record)


async def list_templates(
    db: Db, schema: str, *, after: str | None = None, limit: int = 50
) -> list[Row]:
    """The latest version of each template, by name, after the name ``after``."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT DISTINCT ON (name) * FROM {s}.workflow_templates"
        " WHERE ($1::text IS NULL OR name > $1) ORDER BY name, version DESC LIMIT $2",
        after,
        limit,
    )
    return [query_row(r) for r in records]


async def get_run(db: Db, schema: str, run_id: str, *, steps: bool = True) -> Row | None:
    """One workflow run, or None; with ``steps`` (its steps rows in declaration order,
    the compensation steps last) unless ``steps`` is False. A completed run's ``result``
    is its final steps' results (``_with_results``)."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.workflow_runs WHERE run_id = $1", run_id)
    if record is None:
        return None
    row = query_row(record)
    if not steps:
        await _with_results(db, s, [row])
        return row
    records = await db.fetch(
        f"SELECT * FROM {s}.workflow_steps WHERE run_id = $1 ORDER BY position", run_id
    )
    row["steps"] = [query_row(r) for r in records]
    if _names_results(row):
        results = {st["step_id"]: st.get("result") for st in row["steps"]}
        row["result"] = {sid: results.get(sid, v) for sid, v in row["result"].items()}
    return row


def _names_results(row: Row) -> bool:
    return row["status"] == "completed" and isinstance(row.get("result"), dict)


async def _with_results(db: Db, s: str, rows: list[Row]) -> None:
    """Fill in the ``result`` of each completed run of ``rows`` (in place) from its
    steps rows: the run row names its final steps (projections/views.py
    ``run_result_keys``), whose results the steps rows hold. Rows written before the
    run event named them hold the results themselves, which the steps rows repeat."""
    named = {r["run_id"]: r for r in rows if _names_results(r) and r["result"]}
    if not named:
        return
    records = await db.fetch(
        f"SELECT run_id, step_id, result FROM {s}.workflow_steps"
        " WHERE run_id = ANY($1::text[]) AND step_id = ANY($2::text[])",
        sorted(named),
        sorted({sid for r in named.values() for sid in r["result"]}),
    )
    found = {(rec["run_id"], rec["step_id"]): query_row(rec)["result"] for rec in records}
    for run_id, r in named.items():
        r["result"] = {sid: found.get((run_id, sid), v) for sid, v in r["result"].items()}


async def list_runs(
    db: Db,
    schema: str,
    *,
    workflow_id: str | None = None,
    status: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Row]:
    """Runs newest first (``requested_at``, then run id, both descending), after the
    ``(requested_at, run_id)`` key ``after``, filtered by workflow and/or status; a
    completed run's ``result`` as ``get_run`` has it."""
    s = checked_schema(schema)
    after_at, after_id = after if after is not None else (None, None)
    records = await db.fetch(
        f"""
        SELECT * FROM {s}.workflow_runs r
         WHERE ($1::text IS NULL OR r.workflow_id = $1)
           AND ($2::text IS NULL OR r.status = $2)
           AND ($3::timestamptz IS NULL OR (r.requested_at, r.run_id) < ($3, $4::text))
         ORDER BY r.requested_at DESC, r.run_id DESC
         LIMIT $5
        """,
        workflow_id,
        status,
        after_at,
        after_id,
        limit,
    )
    rows = [query_row(r) for r in records]
    await _with_results(db, s, rows)
    return rows
