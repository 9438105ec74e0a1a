"""Governance: propose a parameter change, vote, read proposals with their tallies.

Voting power is each account's stake when the proposal is created: the route reads
every stake from the accounts read model and the proposal carries that snapshot.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from api.deps import Cursor, DispatchDep, FreshDep, Limit, ProposalIdPath, ReadModelsDep
from api.dispatch import COMMAND_RESPONSES
from api.pagination import TEXT, Keyset
from api.problems import Problem
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.money import to_micro
from api.schemas.proposals import ProposalCreate, ProposalPublic, VoteIn
from domain import proposal as pr
from domain.economy import ParameterChange, TierMultipliers
from projections import queries

router = APIRouter(prefix="/proposals", tags=["governance"])

#: By proposal id.
PROPOSALS = Keyset("proposals", (TEXT,), lambda row: (row["proposal_id"],))


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def create_proposal(
    body: ProposalCreate, dispatch: DispatchDep, read_models: ReadModelsDep
) -> JSONResponse:
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
        for r in await read_models(queries.stakes)
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
async def cast_vote(
    proposal_id: ProposalIdPath, body: VoteIn, dispatch: DispatchDep
) -> JSONResponse:
    """Vote once per account (409 already_voted; 403 no_voting_power)."""
    command = dispatch.command(
        pr.CastVote, proposal_id=proposal_id, voter=body.voter, choice=body.choice
    )
    return await dispatch.execute(command)


@router.get("", response_model=Page[ProposalPublic])
async def list_proposals(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    status: Annotated[pr.Status | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[ProposalPublic]:
    """Proposals by id, optionally of one status."""
    rows = await read_models(
        queries.list_proposals, status=status, after=PROPOSALS.after(cursor), limit=limit + 1
    )
    return PROPOSALS.page(rows, limit, ProposalPublic.from_row)


@router.get(
    "/{proposal_id}",
    response_model=ProposalPublic,
    responses={404: {"description": "no such proposal"}},
)
async def get_proposal(
    proposal_id: ProposalIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> ProposalPublic:
    """One proposal with its tallies and votes."""
    row = await read_models(queries.get_proposal, proposal_id)
    if row is None:
        raise Problem(404, "proposal_not_found", f"no proposal {proposal_id}", field="proposal_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return ProposalPublic.from_row(row)
