"""The PostgreSQL read models: DDL, applied idempotently into one schema.

Every table lives in the schema named by ``Settings.db_schema`` (tests use a fresh one
each), so a read model can be rebuilt into a fresh schema and swapped in.
"""

from __future__ import annotations

import re

import asyncpg

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

DDL = """
CREATE SCHEMA IF NOT EXISTS {s};

-- The consumed position of each projection: written in the same transaction as its rows.
CREATE TABLE IF NOT EXISTS {s}.projection_offsets (
    projection   text    NOT NULL,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint  NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

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
CREATE INDEX IF NOT EXISTS events_by_aggregate ON {s}.events (aggregate_type, aggregate_id, version);
CREATE INDEX IF NOT EXISTS events_by_time ON {s}.events (time);

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

-- Counted from task events, which may be read before the agent's registration.
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

-- The economy: accounts (micro-tokens), the double-entry ledger, parameters, proposals.
CREATE TABLE IF NOT EXISTS {s}.accounts (
    account_id   text PRIMARY KEY,
    holder       text        NOT NULL,
    balance      bigint      NOT NULL,
    staked       bigint      NOT NULL,
    unstaking    bigint      NOT NULL,
    pending      jsonb       NOT NULL,
    supply       bigint      NOT NULL,
    tier         text        NOT NULL,
    earned       bigint      NOT NULL,
    slashed      bigint      NOT NULL,
    opened_at    timestamptz NOT NULL,
    version      integer     NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS accounts_by_tier ON {s}.accounts (tier);

-- Every movement, as legs that sum to zero per event: an account's bucket (balance,
-- staked, unstaking) or one of the two accounts outside the holders: "in_flight"
-- (debits not yet credited) and "mint" (minus everything the treasury minted).
CREATE TABLE IF NOT EXISTS {s}.ledger_entries (
    seq           bigserial   NOT NULL,
    event_id      text        NOT NULL,
    leg           integer     NOT NULL,
    account_id    text        NOT NULL,
    bucket        text        NOT NULL,
    amount        bigint      NOT NULL,
    kind          text        NOT NULL,
    counterparty  text,
    task_id       text,
    proposal_id   text,
    command_id    text        NOT NULL,
    time          timestamptz NOT NULL,
    PRIMARY KEY (event_id, leg)
);
CREATE INDEX IF NOT EXISTS ledger_by_account ON {s}.ledger_entries (account_id, seq);
CREATE INDEX IF NOT EXISTS ledger_by_kind_time ON {s}.ledger_entries (kind, time);

-- The economy parameters in force (one row), changed by executed proposals.
CREATE TABLE IF NOT EXISTS {s}.economy_parameters (
    id           integer PRIMARY KEY CHECK (id = 1),
    params       jsonb       NOT NULL,
    proposal_id  text,
    changed_at   timestamptz
);

CREATE TABLE IF NOT EXISTS {s}.proposals (
    proposal_id    text PRIMARY KEY,
    title          text        NOT NULL,
    proposer       text        NOT NULL,
    change         jsonb       NOT NULL,
    opened_at      timestamptz NOT NULL,
    closes_at      timestamptz NOT NULL,
    quorum_bp      integer     NOT NULL,
    threshold_bp   integer     NOT NULL,
    total_power    bigint      NOT NULL,
    status         text        NOT NULL,
    votes_for      bigint      NOT NULL,
    votes_against  bigint      NOT NULL,
    votes_abstain  bigint      NOT NULL,
    voters         integer     NOT NULL,
    version        integer     NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.proposal_votes (
    proposal_id  text        NOT NULL,
    voter        text        NOT NULL,
    choice       text        NOT NULL,
    power        bigint      NOT NULL,
    time         timestamptz NOT NULL,
    PRIMARY KEY (proposal_id, voter)
);

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
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON {s}.dead_letters (dead_lettered_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dead_letters_by_source
    ON {s}.dead_letters (source_topic, source_partition, source_offset);

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


def checked_schema(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier, else ValueError (it is
    interpolated into SQL, so nothing else is allowed)."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid schema name {name!r}: use [a-z_][a-z0-9_]*")
    return name


async def migrate(conn: asyncpg.Connection, schema: str) -> None:
    """Create the schema and every read-model table in it, if missing (idempotent)."""
    s = checked_schema(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"swarmlog-migrate-{s}")
        await conn.execute(DDL.format(s=s))
