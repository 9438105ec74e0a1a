"""Agents: register, update capabilities; an agent as the read model has it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field

from api.schemas.common import Id, In
from api.schemas.money import Tokens, TokenString
from domain.agent import (
    DEFAULT_MAX_CONCURRENT_TASKS,
    AgentName,
    CapabilityLevel,
    CapabilityName,
    MaxConcurrentTasks,
)


class CapabilityIn(In):
    """A named skill with a level in [0, 1] (1 = expert)."""

    name: CapabilityName
    level: CapabilityLevel


class AgentCreate(In):
    """Register an agent; ``agent_id`` defaults to a fresh uuid4."""

    agent_id: Id | None = None
    name: AgentName
    capabilities: list[CapabilityIn] = Field(default_factory=list, max_length=100)
    max_concurrent_tasks: MaxConcurrentTasks = DEFAULT_MAX_CONCURRENT_TASKS
    cost_per_task: Tokens = "0"


class AgentUpdate(In):
    """Replace an agent's capabilities."""

    capabilities: list[CapabilityIn] = Field(max_length=100)


class HeartbeatIn(In):
    """A heartbeat: ``sent_at`` is when the agent sent it (RFC 3339 with a UTC offset).

    The API records it clamped to [received - ``heartbeat_max_skew_s``, received], so a
    heartbeat that waited in a queue still counts from when it was sent and a fast
    agent clock cannot date one in the future. Without it (or with no body) the
    heartbeat counts from when the API took it up.
    """

    sent_at: AwareDatetime | None = None


class CapabilityPublic(BaseModel):
    """A capability of an agent."""

    name: str
    level: float


class AgentPublic(BaseModel):
    """An agent as the read model has it; ``status`` derived from lifecycle and load."""

    agent_id: str
    name: str
    capabilities: list[CapabilityPublic]
    max_concurrent_tasks: int
    cost_per_task: TokenString
    lifecycle: str
    status: str
    load: int
    registered_at: datetime
    last_heartbeat_at: datetime | None
    tasks_completed: int
    tasks_failed: int
    tasks_lost: int
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AgentPublic:
        """From a row of ``projections.queries.get_agent``/``list_agents``."""
        return cls.model_validate(row)
