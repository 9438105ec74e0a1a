"""The ledger audit: the invariant on the read models and, independently, on the log.

The invariant (domain/account.py): ``supply = balances + staked + unstaking + in flight``.

Checks, each a ``Check`` that passes or names the difference:

1. the read models: the account rows' totals, and the ledger legs (every leg sums to
   zero overall, and each account's legs per bucket equal its row);
2. the log: every account event folded with the Account decider, up to the end of the
   log;
3. the two agree: the log folded up to exactly the offsets the projector has stored
   (read in the same PostgreSQL snapshot as the rows) gives the same account rows, so
   the comparison needs no caught-up projector and has no race.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from domain.account import (
    ACCOUNT,
    ACCOUNT_DECIDER,
    AccountEvent,
    AccountState,
    LedgerTotals,
    ledger_totals,
)
from infra.cloudevents import DecodeError
from infra.kafka import Kafka
from infra.mapper import decode_event
from infra.topics import Topics
from projections.db import checked_schema
from projections.offsets import stored_offsets
from projections.readmodels.accounts import all_accounts, ledger_sums


@dataclass(frozen=True)
class Check:
    """One audit check: its name, whether it passed, and what differed."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class LedgerAudit:
    """The result of ``audit_ledger``: the checks and the totals each side found."""

    checks: list[Check] = field(default_factory=list)
    read_model: LedgerTotals | None = None
    log: LedgerTotals | None = None

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)


def _totals_check(name: str, t: LedgerTotals) -> Check:
    holdings = t.balances + t.staked + t.unstaking + t.in_flight
    return Check(
        name,
        t.balanced and t.in_flight >= 0,
        f"supply {t.supply}, balances {t.balances} + staked {t.staked} + unstaking"
        f" {t.unstaking} + in flight {t.in_flight} = {holdings}",
    )


def _fold(
    records: list[Any], limit: dict[tuple[str, int], int] | None
) -> tuple[dict[str, AccountState], list[AccountEvent], int]:
    """The account states and events folded from ``records`` (up to ``limit``), and how
    many records did not decode (skipped: the projector dead-letters them, and
    ``decode_event`` raises nothing but DecodeError, whatever a record holds)."""
    states: dict[str, Any] = {}
    events: list[AccountEvent] = []
    undecodable = 0
    for r in records:
        if limit is not None and r.offset >= limit.get((r.topic, r.partition), 0):
            continue
        try:
            stored = decode_event(r)
        except DecodeError:
            undecodable += 1
            continue
        event = stored.event
        if not isinstance(event, AccountEvent):
            continue
        states[stored.aggregate_id] = ACCOUNT_DECIDER.evolve(states.get(stored.aggregate_id), event)
        events.append(event)
    return {k: v for k, v in states.items() if v is not None}, events, undecodable


async def audit_ledger(
    kafka: Kafka, topics: Topics, pool: asyncpg.Pool, schema: str
) -> LedgerAudit:
    """Run every check (see the module docstring) on the read models of ``schema`` (read
    through ``pool``, in one repeatable-read snapshot) and the account events of
    ``topics`` on ``kafka``, read to their end. The composition root builds the parts
    (``infra.bootstrap.open_operator``) and closes them."""
    s = checked_schema(schema)
    audit = LedgerAudit()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await all_accounts(conn, s)
        by_leg = await ledger_sums(conn, s)
        offsets = await stored_offsets(conn, s)

    in_flight = by_leg.get(("in_flight", "in_flight"), 0)
    audit.read_model = LedgerTotals(
        supply=sum(r["supply"] for r in rows),
        balances=sum(r["balance"] for r in rows),
        staked=sum(r["staked"] for r in rows),
        unstaking=sum(r["unstaking"] for r in rows),
        in_flight=in_flight,
    )
    audit.checks.append(
        _totals_check("read models: supply = holdings + in flight", audit.read_model)
    )
    total = sum(by_leg.values())
    audit.checks.append(
        Check("read models: the ledger legs sum to zero", total == 0, f"sum {total}")
    )
    wrong = []
    for r in rows:
        for bucket, column in (
            ("balance", "balance"),
            ("staked", "staked"),
            ("unstaking", "unstaking"),
        ):
            if by_leg.get((r["account_id"], bucket), 0) != r[column]:
                wrong.append(
                    f"{r['account_id']}.{column}: row {r[column]}, ledger"
                    f" {by_leg.get((r['account_id'], bucket), 0)}"
                )
    minted = -by_leg.get(("mint", "mint"), 0)
    if minted != audit.read_model.supply:
        wrong.append(f"supply: rows {audit.read_model.supply}, ledger {minted}")
    audit.checks.append(
        Check("read models: each account's ledger equals its row", not wrong, "; ".join(wrong[:5]))
    )

    tps = await kafka.partitions_of(topics.events(ACCOUNT))
    records: list[Any] = []
    await kafka.read_to_end(tps, records.append)
    states, events, undecodable = _fold(records, None)
    audit.log = ledger_totals(states.values(), events)
    check = _totals_check("log: supply = holdings + in flight", audit.log)
    if undecodable:
        check = Check(
            check.name,
            check.ok,
            f"{check.detail}; {undecodable} undecodable records"
            " skipped (see the dead-letter topic)",
        )
    audit.checks.append(check)

    at_offsets, _, _ = _fold(records, offsets)
    diffs = []
    rows_by_id = {r["account_id"]: r for r in rows}
    for aid in sorted(set(at_offsets) | set(rows_by_id)):
        st, row = at_offsets.get(aid), rows_by_id.get(aid)
        folded = None if st is None else (st.balance, st.staked, st.unstaking_total, st.supply)
        projected = (
            None
            if row is None
            else (row["balance"], row["staked"], row["unstaking"], row["supply"])
        )
        if folded != projected:
            diffs.append(f"{aid}: log {folded}, read model {projected}")
    audit.checks.append(
        Check(
            "read models equal the log folded to the projected offsets",
            not diffs,
            "; ".join(diffs[:5]) or f"{len(rows)} accounts",
        )
    )
    return audit
