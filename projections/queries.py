"""Read-model queries: every SQL statement the API runs against the projector's tables.

Each function takes an asyncpg pool or connection and the schema name (checked with
``checked_schema``, since it is interpolated), and returns plain dicts keyed by column
(JSON columns decoded, money as integer micro-tokens). Pagination is keyset: each list
function takes the sort key of the last row already seen (``after``) and returns at most
``limit`` rows after it, in a fixed total order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from domain.recorded import Position
from projections.schema import checked_schema

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection
Row = dict[str, Any]

_JSON_COLUMNS = (
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


def _row(record: asyncpg.Record) -> Row:
    row = dict(record)
    for column in _JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


async def ping(db: Conn) -> None:
    """Raise if PostgreSQL does not answer ``select 1``."""
    await db.fetchval("SELECT 1")


async def get_agent(db: Conn, schema: str, agent_id: str) -> Row | None:
    """One agent with its derived ``status`` and ``load``, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(
        f"SELECT * FROM ({_AGENT_VIEW.format(s=s)}) v WHERE v.agent_id = $1", agent_id
    )
    return None if record is None else _row(record)


async def list_agents(
    db: Conn,
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
    return [_row(r) for r in records]


async def get_task(db: Conn, schema: str, task_id: str) -> Row | None:
    """One task, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.tasks WHERE task_id = $1", task_id)
    return None if record is None else _row(record)


async def list_tasks(
    db: Conn,
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
    return [_row(r) for r in records]


async def aggregate_history(
    db: Conn,
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
    return [_row(r) for r in records]


async def projected_offsets(
    db: Conn, schema: str, partitions: Iterable[tuple[str, int]]
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


async def unreached(db: Conn, schema: str, positions: Sequence[Position]) -> list[Position]:
    """The positions the read models have not projected yet (next_offset <= offset)."""
    reached = await projected_offsets(db, schema, ((p.topic, p.partition) for p in positions))
    return [p for p in positions if reached.get((p.topic, p.partition), -1) <= p.offset]


# the economy ------------------------------------------------------------------------


async def get_account(db: Conn, schema: str, account_id: str) -> Row | None:
    """One account row (micro-tokens; ``pending`` the unstakes waiting), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.accounts WHERE account_id = $1", account_id)
    if record is None:
        return None
    row = dict(record)
    if isinstance(row.get("pending"), str):
        row["pending"] = json.loads(row["pending"])
    return row


async def account_ledger(
    db: Conn, schema: str, account_id: str, *, after: int | None = None, limit: int = 50
) -> list[Row]:
    """The ledger legs of ``account_id`` in log order (by ``seq``), after ``after``."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT seq, event_id, leg, account_id, bucket, amount, kind, counterparty, task_id,"
        f" proposal_id, command_id, time FROM {s}.ledger_entries"
        " WHERE account_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        account_id,
        after or 0,
        limit,
    )
    return [dict(r) for r in records]


async def stakes(db: Conn, schema: str) -> list[Row]:
    """Every account with a stake: (account_id, staked), by account id."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT account_id, staked FROM {s}.accounts WHERE staked > 0 ORDER BY account_id"
    )
    return [dict(r) for r in records]


async def economy_parameters(db: Conn, schema: str) -> Row | None:
    """The parameters row (``params`` as a dict) set by the last executed proposal, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.economy_parameters WHERE id = 1")
    if record is None:
        return None
    row = dict(record)
    if isinstance(row["params"], str):
        row["params"] = json.loads(row["params"])
    return row


async def economy_summary(db: Conn, schema: str, *, bucket: str = "hour") -> Row:
    """Totals (micro-tokens): supply, treasury, balances, staked, unstaking, in flight;
    staked and accounts by tier; rewards and slashes per ``bucket`` of time."""
    s = checked_schema(schema)
    if bucket not in {"minute", "hour", "day"}:
        raise ValueError(bucket)
    totals = await db.fetchrow(
        f"SELECT coalesce(sum(supply), 0)::bigint AS supply,"
        f" coalesce(sum(balance) FILTER (WHERE account_id = 'treasury'), 0)::bigint AS treasury,"
        f" coalesce(sum(balance), 0)::bigint AS balances,"
        f" coalesce(sum(staked), 0)::bigint AS staked,"
        f" coalesce(sum(unstaking), 0)::bigint AS unstaking,"
        f" count(*)::integer AS accounts FROM {s}.accounts"
    )
    in_flight = await db.fetchval(
        f"SELECT coalesce(sum(amount), 0)::bigint FROM {s}.ledger_entries WHERE bucket = 'in_flight'"
    )
    tiers = await db.fetch(
        f"SELECT tier, count(*)::integer AS accounts, sum(staked)::bigint AS staked"
        f" FROM {s}.accounts WHERE holder <> 'treasury' GROUP BY tier ORDER BY tier"
    )
    flows = await db.fetch(
        f"SELECT date_trunc('{bucket}', time) AS at, kind, sum(amount)::bigint AS amount,"
        f" count(*)::integer AS count FROM {s}.ledger_entries"
        " WHERE kind IN ('reward', 'slash') AND bucket IN ('balance', 'staked')"
        " AND (kind = 'reward' AND amount > 0 OR kind = 'slash' AND amount < 0)"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return {
        **dict(totals),  # type: ignore[arg-type]
        "in_flight": in_flight,
        "tiers": [dict(r) for r in tiers],
        "flows": [dict(r) for r in flows],
    }


async def list_proposals(
    db: Conn, schema: str, *, status: str | None = None, after: str | None = None, limit: int = 50
) -> list[Row]:
    """Proposals by id after ``after``, optionally of one ``status``."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT * FROM {s}.proposals WHERE ($1::text IS NULL OR status = $1)"
        " AND ($2::text IS NULL OR proposal_id > $2) ORDER BY proposal_id LIMIT $3",
        status,
        after,
        limit,
    )
    return [_proposal(r) for r in records]


def _proposal(record: asyncpg.Record) -> Row:
    row = dict(record)
    if isinstance(row["change"], str):
        row["change"] = json.loads(row["change"])
    return row


async def get_proposal(db: Conn, schema: str, proposal_id: str) -> Row | None:
    """One proposal with its tallies and ``votes`` (voter, choice, power, time), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.proposals WHERE proposal_id = $1", proposal_id)
    if record is None:
        return None
    row = _proposal(record)
    votes = await db.fetch(
        f"SELECT voter, choice, power, time FROM {s}.proposal_votes WHERE proposal_id = $1"
        " ORDER BY time, voter",
        proposal_id,
    )
    row["votes"] = [dict(v) for v in votes]
    return row


# workflows --------------------------------------------------------------------------


async def get_workflow(db: Conn, schema: str, workflow_id: str) -> Row | None:
    """One workflow definition (``spec`` and ``params`` decoded), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.workflows WHERE id = $1", workflow_id)
    return None if record is None else _row(record)


async def list_workflows(
    db: Conn,
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
    return [_row(r) for r in records]


async def get_template(db: Conn, schema: str, name: str, version: int | None = None) -> Row | None:
    """Version ``version`` of template ``name`` (its latest when None), or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(
        f"SELECT * FROM {s}.workflow_templates WHERE name = $1"
        " AND ($2::integer IS NULL OR version = $2) ORDER BY version DESC LIMIT 1",
        name,
        version,
    )
    return None if record is None else _row(record)


async def list_templates(
    db: Conn, schema: str, *, after: str | None = None, limit: int = 50
) -> list[Row]:
    """The latest version of each template, by name, after the name ``after``."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT DISTINCT ON (name) * FROM {s}.workflow_templates"
        " WHERE ($1::text IS NULL OR name > $1) ORDER BY name, version DESC LIMIT $2",
        after,
        limit,
    )
    return [_row(r) for r in records]


async def get_run(db: Conn, schema: str, run_id: str, *, steps: bool = True) -> Row | None:
    """One workflow run, or None; with ``steps`` (its steps rows in declaration order,
    the compensation steps last) unless ``steps`` is False. A completed run's ``result``
    is its final steps' results (``_with_results``)."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.workflow_runs WHERE run_id = $1", run_id)
    if record is None:
        return None
    row = _row(record)
    if not steps:
        await _with_results(db, s, [row])
        return row
    records = await db.fetch(
        f"SELECT * FROM {s}.workflow_steps WHERE run_id = $1 ORDER BY position", run_id
    )
    row["steps"] = [_row(r) for r in records]
    if _names_results(row):
        results = {st["step_id"]: st.get("result") for st in row["steps"]}
        row["result"] = {sid: results.get(sid, v) for sid, v in row["result"].items()}
    return row


def _names_results(row: Row) -> bool:
    return row["status"] == "completed" and isinstance(row.get("result"), dict)


async def _with_results(db: Conn, s: str, rows: list[Row]) -> None:
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
    found = {(rec["run_id"], rec["step_id"]): _row(rec)["result"] for rec in records}
    for run_id, r in named.items():
        r["result"] = {sid: found.get((run_id, sid), v) for sid, v in r["result"].items()}


async def list_runs(
    db: Conn,
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
    rows = [_row(r) for r in records]
    await _with_results(db, s, rows)
    return rows


# dead letters -------------------------------------------------------------------------

_DEAD_LETTER_LIST = (
    "id, source_topic, source_partition, source_offset, reason, key, dead_lettered_at,"
    " letter_partition, letter_offset, replayed_at, replay_note"
)


async def list_dead_letters(
    db: Conn,
    schema: str,
    *,
    topic: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Row]:
    """Dead letters newest first (``dead_lettered_at``, then id, both descending), after
    the ``(dead_lettered_at, id)`` key ``after``, of records from ``topic`` if given.

    Each row: id, source_topic/partition/offset (where the dead-lettered record is),
    reason, key, dead_lettered_at, letter_partition/offset (where the dead letter is on
    the dead-letter topic), replayed_at and replay_note (None until replayed).
    """
    s = checked_schema(schema)
    after_at, after_id = after if after is not None else (None, None)
    records = await db.fetch(
        f"""
        SELECT {_DEAD_LETTER_LIST} FROM {s}.dead_letters d
         WHERE ($1::text IS NULL OR d.source_topic = $1)
           AND ($2::timestamptz IS NULL OR (d.dead_lettered_at, d.id) < ($2, $3::text))
         ORDER BY d.dead_lettered_at DESC, d.id DESC
         LIMIT $4
        """,
        topic,
        after_at,
        after_id,
        limit,
    )
    return [dict(r) for r in records]


async def find_dead_letters(
    db: Conn, schema: str, *, id: str | None = None, source: Position | None = None
) -> list[Row]:
    """The dead letters with ``id``, or of the record at ``source``, with ``letter`` (the
    dead-letter record's value, bytes), oldest first."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"""
        SELECT {_DEAD_LETTER_LIST}, letter FROM {s}.dead_letters d
         WHERE ($1::text IS NOT NULL AND d.id = $1)
            OR ($2::text IS NOT NULL AND (d.source_topic, d.source_partition, d.source_offset)
                = ($2, $3::integer, $4::bigint))
         ORDER BY d.dead_lettered_at, d.id
        """,
        id,
        source.topic if source else None,
        source.partition if source else None,
        source.offset if source else None,
    )
    return [dict(r) for r in records]
