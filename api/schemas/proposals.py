"""Governance: propose a parameter change, vote; a proposal with its tallies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from api.schemas.common import Id, In
from api.schemas.money import Tokens, TokenString, public_state
from domain.economy import ParameterChange, SlashRateBp, TierMultipliers, UnstakeCooldownS
from domain.proposal import (
    DEFAULT_QUORUM_BP,
    DEFAULT_THRESHOLD_BP,
    Choice,
    ProposalTitle,
    QuorumBp,
    ThresholdBp,
    WindowS,
)


class MultipliersIn(TierMultipliers, In):
    """Reward multipliers per tier, in basis points (10000 = x1.0)."""


class ParameterChangeIn(In):
    """A change to the economy's parameters (omitted: unchanged)."""

    base_reward: Tokens | None = None
    multipliers: MultipliersIn | None = None
    slash_rate_bp: SlashRateBp | None = None
    unstake_cooldown_s: UnstakeCooldownS | None = None


class ProposalCreate(In):
    """Propose a parameter change; voting power is each account's stake now."""

    proposal_id: Id | None = None
    title: ProposalTitle
    proposer: Id
    change: ParameterChangeIn
    window_s: WindowS
    quorum_bp: QuorumBp = DEFAULT_QUORUM_BP
    threshold_bp: ThresholdBp = DEFAULT_THRESHOLD_BP


class VoteIn(In):
    """A vote: for, against or abstain."""

    voter: Id
    choice: Choice


class VotePublic(BaseModel):
    """A vote cast, with the voter's power (tokens staked at the proposal's creation)."""

    voter: str
    choice: str
    power: TokenString
    time: datetime


class ProposalPublic(BaseModel):
    """A proposal with its tallies (tokens of stake)."""

    proposal_id: str
    title: str
    proposer: str
    change: dict[str, Any]
    opened_at: datetime
    closes_at: datetime
    quorum_bp: int
    threshold_bp: int
    total_power: TokenString
    status: str
    votes_for: TokenString
    votes_against: TokenString
    votes_abstain: TokenString
    voters: int
    version: int
    votes: list[VotePublic] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ProposalPublic:
        """From a row of ``projections.queries.get_proposal``/``list_proposals``; the
        change's money (``base_reward``) in tokens."""
        return cls.model_validate(
            {**row, "change": public_state(ParameterChange, dict(row["change"]))}
        )
