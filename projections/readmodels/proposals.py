"""The proposals read model (the economy's governance): one row per proposal with its
tallies (``proposals``, evolved by ``views.evolve_proposal``), every vote
(``proposal_votes``) and the economy parameters in force (``economy_parameters``, one row,
changed by executed proposals).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from domain import proposal as pr
from domain.economy import EconomyParameters
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
    upsert_sql,
)

NAME = "proposals"

COLUMNS = (
    "proposal_id",
    "title",
    "proposer",
    "change",
    "opened_at",
    "closes_at",
    "quorum_bp",
    "threshold_bp",
    "total_power",
    "status",
    "votes_for",
    "votes_against",
    "votes_abstain",
    "voters",
    "version",
    "updated_at",
)
JSON_COLUMNS = frozenset({"change"})

DDL = """
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
"""


class Proposals(ReadModel):
    """Proposal events -> ``proposals``, ``proposal_votes`` and ``economy_parameters``;
    no Redis view."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        s = schema
        self._upsert = upsert_sql(s, "proposals", COLUMNS, "proposal_id", JSON_COLUMNS)
        self._insert_vote = (
            f"INSERT INTO {s}.proposal_votes (proposal_id, voter, choice, power, time)"
            " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING"
        )
        # The parameters go in as JSON text (what model_dump_json writes).
        self._set_parameters = (
            f"INSERT INTO {s}.economy_parameters (id, params, proposal_id, changed_at)"
            " VALUES (1, $1::text::jsonb, $2, $3) ON CONFLICT (id) DO UPDATE SET"
            " params = EXCLUDED.params, proposal_id = EXCLUDED.proposal_id,"
            " changed_at = EXCLUDED.changed_at"
        )

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply the proposal events of ``events``: the rows, the votes, and the change
        each executed proposal makes to the economy parameters."""
        s = self.schema
        ids = {e.aggregate_id for e in events if e.aggregate_type == "proposal"}
        if not ids:
            return Applied()
        proposals = await locked_rows(conn, s, "proposals", "proposal_id", ids)
        fresh: list[RecordedEvent] = []
        votes: list[tuple[Any, ...]] = []
        changes: list[tuple[RecordedEvent, Any]] = []
        for e in events:
            if e.aggregate_type != "proposal":
                continue
            before = proposals.get(e.aggregate_id)
            after = views.evolve_proposal(before, e)
            if after is None or after is before:
                continue
            proposals[e.aggregate_id] = after
            fresh.append(e)
            ev = e.event
            if isinstance(ev, pr.VoteCast):
                votes.append((ev.proposal_id, ev.voter, ev.choice, ev.power, e.time))
            elif isinstance(ev, pr.ProposalExecuted):
                changes.append((e, ev.change))
        touched = {e.aggregate_id for e in fresh}
        if touched:
            await conn.executemany(
                self._upsert, [params(proposals[p], COLUMNS) for p in sorted(touched)]
            )
        if votes:
            await conn.executemany(self._insert_vote, votes)
        for e, change in changes:
            current = await conn.fetchval(
                f"SELECT params FROM {s}.economy_parameters WHERE id = 1 FOR UPDATE"
            )
            parameters = EconomyParameters.model_validate(
                json.loads(current) if isinstance(current, str) else (current or {})
            )
            await conn.execute(
                self._set_parameters,
                change.applied_to(parameters).model_dump_json(),
                e.aggregate_id,
                e.time,
            )
        return Applied(fresh)


# queries -------------------------------------------------------------------------------


async def economy_parameters(db: Db, schema: str) -> Row | None:
    """The parameters row (``params`` as a dict) set by the last executed proposal, or None."""
    s = checked_schema(schema)
    record = await db.fetchrow(f"SELECT * FROM {s}.economy_parameters WHERE id = 1")
    if record is None:
        return None
    row = dict(record)
    if isinstance(row["params"], str):
        row["params"] = json.loads(row["params"])
    return row


async def list_proposals(
    db: Db, schema: str, *, status: str | None = None, after: str | None = None, limit: int = 50
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


async def get_proposal(db: Db, schema: str, proposal_id: str) -> Row | None:
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
