"""The accounts read model (the economy's money): one row per account (``accounts``,
micro-tokens, evolved by ``views.evolve_account``), every movement as double-entry legs
(``ledger_entries``, from ``views.ledger_legs``), and in Redis the earnings leaderboard
and the stake per tier.
"""

from __future__ import annotations

import json
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
    as_columns,
    locked_rows,
    params,
    upsert_sql,
)

NAME = "accounts"

COLUMNS = (
    "account_id",
    "holder",
    "balance",
    "staked",
    "unstaking",
    "pending",
    "supply",
    "tier",
    "earned",
    "slashed",
    "opened_at",
    "version",
    "updated_at",
)
JSON_COLUMNS = frozenset({"pending"})

DDL = """
-- The economy: accounts (micro-tokens) and the double-entry ledger.
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
"""


class Accounts(ReadModel):
    """Account events -> ``accounts`` and ``ledger_entries``; Redis: the leaderboard
    (``RedisKeys.leaderboard``, absolute earnings) and ``RedisKeys.stake_by_tier``."""

    name = NAME
    ddl = DDL

    def __init__(self, schema: str, keys: RedisKeys) -> None:
        super().__init__(schema, keys)
        s = schema
        self._upsert = upsert_sql(s, "accounts", COLUMNS, "account_id", JSON_COLUMNS)
        # Bulk rows go in as one INSERT ... SELECT over arrays (one column per parameter):
        # PostgreSQL plans and runs it once, where executemany ran it once per row, which
        # cost the database more CPU than the projector itself. WITH ORDINALITY keeps the
        # rows in order (ledger_entries.seq is assigned in it).
        self._insert_legs = (
            f"INSERT INTO {s}.ledger_entries (event_id, leg, account_id, bucket, amount, kind,"
            " counterparty, task_id, proposal_id, command_id, time)"
            " SELECT event_id, leg, account_id, bucket, amount, kind, counterparty, task_id,"
            " proposal_id, command_id, time FROM unnest($1::text[], $2::int[], $3::text[],"
            " $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],"
            " $10::text[], $11::timestamptz[]) WITH ORDINALITY AS r(event_id, leg, account_id,"
            " bucket, amount, kind, counterparty, task_id, proposal_id, command_id, time, n)"
            " ORDER BY n ON CONFLICT DO NOTHING"
        )

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> Applied:
        """Apply the account events of ``events``: the rows and their ledger legs. The
        accounts whose row changed have their Redis views copied."""
        ids = {e.aggregate_id for e in events if e.aggregate_type == "account"}
        if not ids:
            return Applied()
        accounts = await locked_rows(conn, self.schema, "accounts", "account_id", ids)
        fresh: list[RecordedEvent] = []
        legs: list[tuple[Any, ...]] = []
        for e in events:
            if e.aggregate_type != "account":
                continue
            before = accounts.get(e.aggregate_id)
            after = views.evolve_account(before, e)
            if after is None or after is before:
                continue
            accounts[e.aggregate_id] = after
            fresh.append(e)
            for i, leg in enumerate(views.ledger_legs(e)):
                legs.append(
                    (
                        e.id,
                        i,
                        leg["account_id"],
                        leg["bucket"],
                        leg["amount"],
                        leg["kind"],
                        leg["counterparty"],
                        leg["task_id"],
                        None,
                        e.causation_id,
                        e.time,
                    )
                )
        touched = {e.aggregate_id for e in fresh}
        if touched:
            await conn.executemany(
                self._upsert, [params(accounts[a], COLUMNS) for a in sorted(touched)]
            )
        if legs:
            await conn.execute(self._insert_legs, *as_columns(legs))
        return Applied(fresh, {NAME: touched})

    async def sync_redis(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, ids: set[str] | None
    ) -> None:
        """Copy earnings to the leaderboard (absolute totals, so a repeat is harmless) and
        recompute stake by tier (all accounts when ``ids`` is None)."""
        s = self.schema
        where = "" if ids is None else "AND account_id = ANY($1::text[])"
        args: list[Any] = [] if ids is None else [sorted(ids)]
        rows = await pool.fetch(
            f"SELECT account_id, earned FROM {s}.accounts WHERE holder <> 'treasury' {where}",
            *args,
        )
        tiers = await pool.fetch(
            f"SELECT tier, sum(staked)::bigint AS staked FROM {s}.accounts GROUP BY tier"
        )
        async with redis.pipeline(transaction=True) as pipe:
            earned = {row["account_id"]: row["earned"] for row in rows if row["earned"] > 0}
            if earned:
                pipe.zadd(self.keys.leaderboard, earned)
            pipe.delete(self.keys.stake_by_tier)
            by_tier = {row["tier"]: row["staked"] for row in tiers}
            if by_tier:
                pipe.hset(self.keys.stake_by_tier, mapping=by_tier)
            await pipe.execute()


# queries -------------------------------------------------------------------------------


async def get_account(db: Db, schema: str, account_id: str) -> Row | None:
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
    db: Db, schema: str, account_id: str, *, after: int | None = None, limit: int = 50
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


async def stakes(db: Db, schema: str) -> list[Row]:
    """Every account with a stake: (account_id, staked), by account id."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT account_id, staked FROM {s}.accounts WHERE staked > 0 ORDER BY account_id"
    )
    return [dict(r) for r in records]


async def economy_summary(db: Db, schema: str, *, bucket: str = "hour") -> Row:
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
        f"SELECT coalesce(sum(amount), 0)::bigint FROM {s}.ledger_entries"
        " WHERE bucket = 'in_flight'"
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
        **dict(totals),
        "in_flight": in_flight,
        "tiers": [dict(r) for r in tiers],
        "flows": [dict(r) for r in flows],
    }


async def all_accounts(db: Db, schema: str) -> list[Row]:
    """Every account row, as stored (micro-tokens), in no particular order."""
    s = checked_schema(schema)
    return [dict(r) for r in await db.fetch(f"SELECT * FROM {s}.accounts")]


async def ledger_sums(db: Db, schema: str) -> dict[tuple[str, str], int]:
    """The sum of the ledger legs (micro-tokens) of each (account id, bucket), including
    the two accounts outside the holders (``("in_flight", "in_flight")`` and
    ``("mint", "mint")``)."""
    s = checked_schema(schema)
    records = await db.fetch(
        f"SELECT account_id, bucket, sum(amount)::bigint AS amount"
        f" FROM {s}.ledger_entries GROUP BY account_id, bucket"
    )
    return {(r["account_id"], r["bucket"]): r["amount"] for r in records}
