"""A command's answer: the events it wrote and where, the aggregate's state after it,
or where to poll when the outcome did not come in time."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from api.schemas.money import StateType
from domain.account import ACCOUNT, AccountState
from domain.agent import AGENT, AgentState
from domain.proposal import PROPOSAL, ProposalState
from domain.task import TASK, TaskState

#: The state model of each aggregate type whose state holds money: a command's answer
#: shows its ``MicroTokens`` fields as token strings (api/schemas/money.py). The other
#: aggregates' states (workflows, templates, runs) hold none and pass as they are.
STATE_TYPES: dict[str, StateType] = {
    AGENT: AgentState,
    TASK: TaskState,
    ACCOUNT: AccountState,
    PROPOSAL: ProposalState,
}


class EventRef(BaseModel):
    """An event a command wrote, and where: pass ``position`` as ``?after=`` to a query
    to read your write."""

    id: str
    type: str
    version: int
    topic: str
    partition: int | None = None
    offset: int | None = None
    position: str | None = None


class CommandResult(BaseModel):
    """An accepted command: the aggregate's id, version and state after it, its events."""

    id: str
    version: int
    state: dict[str, Any] | None
    events: list[EventRef]
    command_id: str


class CommandPending(BaseModel):
    """A command on the log whose outcome did not come in time; poll ``location``."""

    command_id: str
    status: Literal["pending"] = "pending"
    location: str


class CommandOutcomePublic(BaseModel):
    """What the decider made of a command (``GET /commands/{command_id}``)."""

    command_id: str
    command_type: str
    aggregate_type: str
    id: str
    status: str
    version: int
    events: list[EventRef]
    rejection: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    duplicate: bool = False
    decided_at: datetime


class BatchItemResult(BaseModel):
    """One task of a batch: ``status`` is accepted, rejected or pending, ``http_status``
    what the single-task route would have answered."""

    index: int
    id: str
    command_id: str
    status: Literal["accepted", "rejected", "pending"]
    http_status: int
    version: int | None = None
    events: list[EventRef] = []
    problem: dict[str, Any] | None = None
