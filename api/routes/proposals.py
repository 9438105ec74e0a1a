"""Governance: propose a parameter change, vote, read proposals with their tallies.

Voting power is each account's stake when the proposal is created: the route reads
every stake from the accounts read model and the proposal carries that snapshot.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from api.deps import Cursor, FreshDep, Limit, PoolDep, SettingsDep
from api.dispatch import COMMAND_RESPONSES, DispatchDep
from api.pagination import TEXT, decode_cursor, encode_cursor
from api.problems import Problem
from api.schemas import (
    ID_PATTERN,
    CommandResult,
    Page,
    ProposalCreate,
    ProposalPublic,
    VoteIn,
    to_micro,
)
from domain import proposal as pr
from domain.economy import ParameterChange, TierMultipliers
from projections import queries

router = APIRouter(prefix="/proposals", tags=["governance"])

ProposalIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the proposal id")
]


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def create_proposal(  # type: ignore[no-untyped-def]
    body: ProposalCreate, dispatch: DispatchDep, settings: SettingsDep, pool: PoolDep
):
    """Propose a change; the stakes now are the voting powers (201, Location)."""
    proposal_id = body.proposal_id or dispatch.new_id("proposal")
    c = body.change
    change = ParameterChange(
        base_reward=to_micro(c.base_reward) if c.base_reward is not None else None,
        multipliers=TierMultipliers(**c.multipliers.model_dump()) if c.multipliers else None,
        slash_rate_bp=c.slash_rate_bp,
        unstake_cooldown_s=c.unstake_cooldown_s,
    )
    powers = tuple(
        pr.VoterPower(account_id=r["account_id"], power=r["staked"])
        for r in await queries.stakes(pool, settings.db_schema)
    )
    command = dispatch.command(
        pr.CreateProposal,
        proposal_id=proposal_id,
        title=body.title,
        proposer=body.proposer,
        change=change,
        window_s=body.window_s,
        quorum_bp=body.quorum_bp,
        threshold_bp=body.threshold_bp,
        powers=powers,
    )
    return await dispatch.execute(command, created_at=f"/proposals/{proposal_id}")


@router.post("/{proposal_id}/votes", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def cast_vote(proposal_id: ProposalIdPath, body: VoteIn, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Vote once per account (409 already_voted; 403 no_voting_power)."""
    command = dispatch.command(
        pr.CastVote, proposal_id=proposal_id, voter=body.voter, choice=body.choice
    )
    return await dispatch.execute(command)


@router.get("", response_model=Page[ProposalPublic])
async def list_proposals(
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    status: Annotated[
        Literal["open", "passed", "rejected", "quorum_missed", "executed"] | None, Query()
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[ProposalPublic]:
    """Proposals by id, optionally of one status."""
    key = decode_cursor("proposals", cursor, TEXT)
    rows = await queries.list_proposals(
        pool, settings.db_schema, status=status, after=key[0] if key else None, limit=limit + 1
    )
    items = [ProposalPublic.from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=items, next_cursor=encode_cursor("proposals", items[-1].proposal_id) if more else None
    )


@router.get(
    "/{proposal_id}",
    response_model=ProposalPublic,
    responses={404: {"description": "no such proposal"}},
)
async def get_proposal(
    proposal_id: ProposalIdPath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    response: Response,
) -> ProposalPublic:
    """One proposal with its tallies and votes."""
    row = await queries.get_proposal(pool, settings.db_schema, proposal_id)
    if row is None:
        raise Problem(404, "proposal_not_found", f"no proposal {proposal_id}", field="proposal_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return ProposalPublic.from_row(row)
