"""Tasks: submit (one or a batch), start, progress, complete, fail, cancel; a task as
the read model has it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from api.schemas.commands import BatchItemResult
from api.schemas.common import BoundedJson, Id, In
from api.schemas.money import Tokens, TokenString
from domain.task import (
    DEFAULT_CANCEL_REASON,
    DEFAULT_LEASE_TIMEOUT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUALITY,
    DEFAULT_RUN_TIMEOUT_S,
    CancelReason,
    ErrorText,
    Fraction,
    LeaseTimeoutS,
    MaxAttempts,
    Priority,
    ProgressMessage,
    RunTimeoutS,
    TaskType,
)

MAX_BATCH = 1000


class TaskCreate(In):
    """Submit a task; ``task_id`` defaults to a fresh uuid4; times in seconds."""

    task_id: Id | None = None
    type: TaskType
    payload: BoundedJson = Field(default_factory=dict)
    required_capabilities: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    priority: Priority = DEFAULT_PRIORITY
    max_cost: Tokens | None = None
    lease_timeout_s: LeaseTimeoutS = DEFAULT_LEASE_TIMEOUT_S
    run_timeout_s: RunTimeoutS = DEFAULT_RUN_TIMEOUT_S
    max_attempts: MaxAttempts = DEFAULT_MAX_ATTEMPTS


class TaskBatchCreate(In):
    """Submit up to 1,000 tasks in one request."""

    tasks: list[TaskCreate] = Field(min_length=1, max_length=MAX_BATCH)


class TaskStart(In):
    """The assigned agent starts the task."""

    agent_id: Id


class TaskProgress(In):
    """The assigned agent reports progress in [0, 1]."""

    agent_id: Id
    progress: Fraction
    message: ProgressMessage | None = None


class TaskComplete(In):
    """The assigned agent completes the task with a result and a quality in [0, 1]."""

    agent_id: Id
    result: BoundedJson = Field(default_factory=dict)
    quality: Fraction = DEFAULT_QUALITY


class TaskFail(In):
    """The assigned agent reports a failure; a retryable one is retried if attempts remain."""

    agent_id: Id
    error: ErrorText
    retryable: bool = True


class TaskCancel(In):
    """Cancel a task that has not finished."""

    reason: CancelReason = DEFAULT_CANCEL_REASON


class BatchResult(BaseModel):
    """The per-task results of ``POST /tasks:batch``, in request order."""

    items: list[BatchItemResult]
    accepted: int
    rejected: int
    pending: int


class TaskPublic(BaseModel):
    """A task as the read model has it (times in seconds, money in tokens)."""

    task_id: str
    type: str
    payload: dict[str, Any]
    required_capabilities: list[str]
    priority: str
    max_cost: TokenString | None
    lease_timeout_s: float
    run_timeout_s: float
    max_attempts: int
    status: str
    attempts: int
    requeues: int
    agent_id: str | None
    progress: float
    progress_message: str | None
    result: dict[str, Any] | None
    quality: float | None
    error: str | None
    not_before: datetime | None
    submitted_at: datetime
    queued_at: datetime | None
    assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskPublic:
        """From a row of ``projections.queries.get_task``/``list_tasks``."""
        return cls.model_validate(row)
