"""The economy at a glance: the earnings leaderboard and the summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from api.schemas.money import TokenString


class LeaderboardEntry(BaseModel):
    """An account's rank by rewards earned."""

    rank: int
    account_id: str
    earned: TokenString


class TierSummary(BaseModel):
    """Accounts and stake in one tier."""

    tier: str
    accounts: int
    staked: TokenString


class FlowSummary(BaseModel):
    """Rewards or slashes in one bucket of time."""

    at: datetime
    kind: str
    amount: TokenString
    count: int


class EconomySummary(BaseModel):
    """The economy's totals (tokens): supply = balances + staked + unstaking + in flight."""

    supply: TokenString
    treasury: TokenString
    balances: TokenString
    staked: TokenString
    unstaking: TokenString
    in_flight: TokenString
    accounts: int
    balanced: bool
    tiers: list[TierSummary]
    flows: list[FlowSummary]
    parameters: dict[str, Any]
