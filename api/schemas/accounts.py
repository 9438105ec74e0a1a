"""Accounts: open, grant, transfer, stake, unstake; an account and its ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from api.schemas.common import Id, In
from api.schemas.money import PositiveTokens, TokenString
from domain.account import DEFAULT_GRANT_REASON, Memo


class AccountCreate(In):
    """Open an account for a holder."""

    account_id: Id


class Grant(In):
    """A grant from the treasury (an admin act)."""

    amount: PositiveTokens
    reason: Memo = DEFAULT_GRANT_REASON


class Transfer(In):
    """Send tokens of the account's balance to another account."""

    to: Id
    amount: PositiveTokens
    memo: Memo = ""


class AmountIn(In):
    """An amount of tokens (stake, unstake)."""

    amount: PositiveTokens


class PendingUnstakePublic(BaseModel):
    """An unstake waiting for its cooldown."""

    amount: TokenString
    available_at: datetime


class AccountPublic(BaseModel):
    """An account, money in tokens."""

    account_id: str
    holder: str
    balance: TokenString
    staked: TokenString
    unstaking: TokenString
    pending_unstakes: list[PendingUnstakePublic]
    tier: str
    earned: TokenString
    slashed: TokenString
    supply: TokenString
    opened_at: datetime
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AccountPublic:
        """From a row of ``projections.queries.get_account`` (``pending``: the unstakes)."""
        return cls.model_validate({**row, "pending_unstakes": row["pending"]})


class LedgerEntryPublic(BaseModel):
    """One leg of a movement: the account's bucket and signed amount, and its cause."""

    seq: int
    event_id: str
    bucket: str
    amount: TokenString
    kind: str
    counterparty: str | None
    task_id: str | None
    proposal_id: str | None
    command_id: str
    time: datetime
