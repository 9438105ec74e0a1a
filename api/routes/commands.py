"""Commands whose outcome did not come in time (a 202 points here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import CommandClientDep
from api.dispatch import event_refs
from api.problems import Problem
from api.schemas.commands import STATE_TYPES, CommandOutcomePublic
from api.schemas.money import public_state

router = APIRouter(prefix="/commands", tags=["commands"])


@router.get(
    "/{command_id}",
    response_model=CommandOutcomePublic,
    responses={404: {"description": "this API process has not seen the outcome (yet)"}},
)
async def command_outcome(
    command_id: Annotated[str, Path(min_length=1, max_length=200)],
    client: CommandClientDep,
) -> CommandOutcomePublic:
    """The outcome of a command, if this API process has seen it since it started."""
    outcome = client.recent(command_id)
    if outcome is None:
        raise Problem(
            404,
            "outcome_not_found",
            f"no outcome of command {command_id} seen yet; it may still be pending",
            field="command_id",
        )
    return CommandOutcomePublic(
        command_id=outcome.command_id,
        command_type=outcome.command_type,
        aggregate_type=outcome.aggregate_type,
        id=outcome.aggregate_id,
        status=outcome.status,
        version=outcome.version,
        events=event_refs(outcome),
        rejection=outcome.rejection.model_dump() if outcome.rejection else None,
        state=public_state(STATE_TYPES.get(outcome.aggregate_type), outcome.state),
        duplicate=outcome.duplicate,
        decided_at=outcome.decided_at,
    )
