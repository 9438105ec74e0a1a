"""The Task aggregate: a unit of work, queued, assigned to an agent, run and finished.

Lifecycle::

    submitted -> queued -> assigned -> running -> completed
                   ^          |           |----> failed ---(retryable, attempts left)--+
                   |          |           |----> timed out -(attempts left)-------------+
                   +----------+-- requeued (lease expired, agent lost) <----------------+
    queued/assigned/running -> cancelled;   no attempts left -> dead_lettered

An attempt is counted at each assignment; ``max_attempts`` bounds them, after which the
task is dead-lettered. Only the assigned agent may start, progress, complete or fail it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator

from domain.backoff import backoff_seconds
from domain.messages import Command, Decider, Event, Message, Rejection, rejected
from domain.money import MAX_PRICE, MicroTokens

TASK = "task"

Priority = Literal["low", "normal", "high", "urgent", "critical"]
PRIORITY_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2, "urgent": 3, "critical": 4}
DEFAULT_PRIORITY: Priority = "normal"

Status = Literal[
    "queued", "assigned", "running", "completed", "failed", "cancelled", "dead_lettered"
]
ACTIVE: frozenset[str] = frozenset({"assigned", "running"})
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "dead_lettered"})

RequeueReason = Literal["lease_expired", "agent_offline", "agent_stopped", "agent_deregistered"]


class TaskCommand(Command):
    """A command addressed to one Task aggregate, keyed by ``task_id``."""

    aggregate_type: ClassVar[str] = TASK
    id_field: ClassVar[str] = "task_id"
    task_id: str = Field(min_length=1, max_length=128)


# The fields of the task commands, declared once: the commands below and the HTTP API's
# request bodies (api/schemas/tasks.py) both use them, so a bound or default cannot drift.

LeaseTimeoutS = Annotated[float, Field(gt=0, le=86_400)]
"""How long an assigned task may wait to be started, in seconds (at most a day)."""
DEFAULT_LEASE_TIMEOUT_S = 30.0

RunTimeoutS = Annotated[float, Field(gt=0, le=7 * 86_400)]
"""How long a started task may run, in seconds (at most a week)."""
DEFAULT_RUN_TIMEOUT_S = 600.0

MaxAttempts = Annotated[int, Field(ge=1, le=100)]
"""How many assignments a task gets before it is dead-lettered."""
DEFAULT_MAX_ATTEMPTS = 3

MaxCost = Annotated[int, Field(ge=0, le=MAX_PRICE)]
"""The most an agent may cost per task, in micro-tokens."""

TaskType = Annotated[str, Field(min_length=1, max_length=128)]
"""A task's type (what kind of work it is)."""

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
"""A share in [0, 1]: a task's progress or the quality of its result."""
DEFAULT_QUALITY = 1.0

ProgressMessage = Annotated[str, Field(max_length=2000)]
"""What an agent says with a progress report."""

ErrorText = Annotated[str, Field(min_length=1, max_length=10_000)]
"""Why a task failed, as its agent reports it."""

CancelReason = Annotated[str, Field(max_length=2000)]
"""Why a task or a workflow run was cancelled."""
DEFAULT_CANCEL_REASON = "cancelled by user"


class SubmitTask(TaskCommand):
    """Submit a task; it is queued at once.

    ``max_cost`` (micro-tokens, None = any) bounds the agent's ``cost_per_task``;
    ``lease_timeout_s`` is how long an assigned task may wait to be started,
    ``run_timeout_s`` how long it may run; both in seconds.
    """

    type: TaskType
    payload: dict[str, Any] = Field(default_factory=dict)
    required_capabilities: tuple[str, ...] = ()
    priority: Priority = DEFAULT_PRIORITY
    max_cost: MaxCost | None = None
    lease_timeout_s: LeaseTimeoutS = DEFAULT_LEASE_TIMEOUT_S
    run_timeout_s: RunTimeoutS = DEFAULT_RUN_TIMEOUT_S
    max_attempts: MaxAttempts = DEFAULT_MAX_ATTEMPTS

    @field_validator("required_capabilities")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("required capabilities must be unique")
        if any(not c for c in value):
            raise ValueError("a required capability is empty")
        return value


class AssignTask(TaskCommand):
    """Assign a queued task to an agent (sent by the scheduler)."""

    agent_id: str = Field(min_length=1)


class StartTask(TaskCommand):
    """The assigned agent starts the task."""

    agent_id: str = Field(min_length=1)


class ReportProgress(TaskCommand):
    """The assigned agent reports progress in [0, 1] on a running task."""

    agent_id: str = Field(min_length=1)
    progress: Fraction
    message: ProgressMessage | None = None


class CompleteTask(TaskCommand):
    """The assigned agent completes a running task with a result and quality in [0, 1]."""

    agent_id: str = Field(min_length=1)
    result: dict[str, Any] = Field(default_factory=dict)
    quality: Fraction = DEFAULT_QUALITY


class FailTask(TaskCommand):
    """The assigned agent reports a failure; a retryable one is retried if attempts remain."""

    agent_id: str = Field(min_length=1)
    error: ErrorText
    retryable: bool = True


class CancelTask(TaskCommand):
    """Cancel a task that has not finished."""

    reason: CancelReason = DEFAULT_CANCEL_REASON


class RequeueTask(TaskCommand):
    """Take an assigned or running task back from its agent (sent by the scheduler).

    ``agent_id`` is the agent the scheduler saw holding it: if the task has moved on
    since, the command is rejected rather than requeueing someone else's work.
    """

    agent_id: str
    reason: RequeueReason


class TimeOutTask(TaskCommand):
    """A running task overran its run timeout (sent by the scheduler)."""

    agent_id: str


class TaskEvent(Event):
    """An event of one Task aggregate."""

    aggregate_type: ClassVar[str] = TASK
    task_id: str


class TaskSubmitted(TaskEvent):
    """A task was submitted (its full specification)."""

    event_type: ClassVar[str] = "submitted"
    type: str
    payload: dict[str, Any]
    required_capabilities: tuple[str, ...]
    priority: Priority
    max_cost: int | None
    lease_timeout_s: float
    run_timeout_s: float
    max_attempts: int


class TaskQueued(TaskEvent):
    """The task is waiting for an agent; not before ``not_before`` when set (UTC)."""

    event_type: ClassVar[str] = "queued"
    reason: Literal["submitted", "retry", "requeued"] = "submitted"
    not_before: datetime | None = None


class TaskAssigned(TaskEvent):
    """The task was assigned to ``agent_id`` as attempt number ``attempt`` (1-based).

    It carries the task's ``type`` and ``payload``, so that an agent following its
    assignment stream has all it needs to start, with no read of a read model.
    """

    event_type: ClassVar[str] = "assigned"
    agent_id: str
    attempt: int
    type: str | None = None
    payload: dict[str, Any] | None = None


class TaskStarted(TaskEvent):
    """The assigned agent started the task."""

    event_type: ClassVar[str] = "started"
    agent_id: str


class TaskProgressed(TaskEvent):
    """The agent reported progress in [0, 1]."""

    event_type: ClassVar[str] = "progressed"
    agent_id: str
    progress: float
    message: str | None = None


class TaskCompleted(TaskEvent):
    """The task completed with a result and a quality score in [0, 1]."""

    event_type: ClassVar[str] = "completed"
    agent_id: str
    result: dict[str, Any]
    quality: float


class TaskFailed(TaskEvent):
    """The agent reported a failure."""

    event_type: ClassVar[str] = "failed"
    agent_id: str
    error: str
    retryable: bool


class TaskTimedOut(TaskEvent):
    """The task overran its run timeout on ``agent_id``."""

    event_type: ClassVar[str] = "timed_out"
    agent_id: str


class TaskRequeued(TaskEvent):
    """The task was taken back from ``agent_id`` for ``reason``."""

    event_type: ClassVar[str] = "requeued"
    agent_id: str
    reason: str


class TaskRetryScheduled(TaskEvent):
    """A failed or timed-out attempt will be retried, not before ``not_before`` (UTC)."""

    event_type: ClassVar[str] = "retry_scheduled"
    attempt: int
    not_before: datetime


class TaskCancelled(TaskEvent):
    """The task was cancelled."""

    event_type: ClassVar[str] = "cancelled"
    reason: str


class TaskDeadLettered(TaskEvent):
    """The task ran out of attempts and was set aside for a person to look at."""

    event_type: ClassVar[str] = "dead_lettered"
    reason: str


class _TaskFields(Message):
    """What a task's state holds in every status (money in micro-tokens, times in
    seconds); ``not_before`` is when a queued task may next be assigned (kept, as it
    was, once assigned)."""

    task_id: str
    type: str
    payload: dict[str, Any] = Field(default_factory=dict)
    required_capabilities: tuple[str, ...]
    priority: Priority
    max_cost: MicroTokens | None
    lease_timeout_s: float
    run_timeout_s: float
    max_attempts: int
    status: Status
    attempts: int = 0
    agent_id: str | None = None
    not_before: datetime | None = None


class QueuedTask(_TaskFields):
    """A task waiting for an agent: held by none."""

    status: Literal["queued"] = "queued"
    agent_id: None = None


class HeldTask(_TaskFields):
    """A task assigned to, or running on, the agent ``agent_id``."""

    status: Literal["assigned", "running"]
    agent_id: str


class FinishedTask(_TaskFields):
    """A task that will not change again; ``agent_id`` is the agent that last held it
    (None if none did)."""

    status: Literal["completed", "failed", "cancelled", "dead_lettered"]


TaskState = QueuedTask | HeldTask | FinishedTask
"""The write-side state of one task: one type per kind of status, so that a task held by
an agent always names it and a queued one never does."""

_T = TypeVar("_T", QueuedTask, HeldTask, FinishedTask)


def _becomes(state: TaskState, kind: type[_T], **update: Any) -> _T:
    """``state`` as a ``kind``, with ``update`` (the fields every status has carry over;
    ``update`` sets the status and whatever ``kind`` holds differently)."""
    return kind.model_validate({**dict(state), **update})


def _not_holder(state: HeldTask, agent_id: str) -> Rejection | None:
    if state.agent_id != agent_id:
        return rejected(
            "forbidden",
            "not_assigned_agent",
            f"task {state.task_id} is not assigned to agent {agent_id}",
            field="agent_id",
        )
    return None


def _release(
    state: HeldTask, at: datetime, agent_id: str, first: TaskEvent, retry: bool
) -> list[TaskEvent]:
    """Events after an attempt ended without success: retry, requeue or dead-letter."""
    tid = state.task_id
    if not retry:
        return [first]
    if state.attempts >= state.max_attempts:
        return [
            first,
            TaskDeadLettered(
                task_id=tid, reason=f"{state.attempts} of {state.max_attempts} attempts used"
            ),
        ]
    if isinstance(first, TaskRequeued):
        return [first, TaskQueued(task_id=tid, reason="requeued")]
    delay = backoff_seconds(tid, state.attempts)
    return [
        first,
        TaskRetryScheduled(
            task_id=tid, attempt=state.attempts + 1, not_before=at + timedelta(seconds=delay)
        ),
    ]


def decide(command: TaskCommand, state: TaskState | None) -> list[TaskEvent] | Rejection:
    """Decide the events for ``command`` given the task's ``state`` (None: not submitted).

    Rejections: ``task_not_found`` (not_found); ``task_already_submitted``,
    ``task_not_queued``, ``retry_not_due``, ``task_not_assigned``, ``task_not_running``,
    ``task_finished``, ``task_moved_on`` (conflict); ``not_assigned_agent`` (forbidden).
    """
    tid = command.task_id
    match command, state:
        case SubmitTask(), None:
            return [
                TaskSubmitted(
                    task_id=tid,
                    type=command.type,
                    payload=command.payload,
                    required_capabilities=command.required_capabilities,
                    priority=command.priority,
                    max_cost=command.max_cost,
                    lease_timeout_s=command.lease_timeout_s,
                    run_timeout_s=command.run_timeout_s,
                    max_attempts=command.max_attempts,
                ),
                TaskQueued(task_id=tid, reason="submitted"),
            ]
        case SubmitTask(), _:
            return rejected("conflict", "task_already_submitted", f"task {tid} exists")
        case _, None:
            return rejected("not_found", "task_not_found", f"no task {tid}")
        case _, FinishedTask():
            return rejected("conflict", "task_finished", f"task {tid} is {state.status}")
        case AssignTask(), QueuedTask():
            if state.not_before is not None and command.at < state.not_before:
                return rejected(
                    "conflict",
                    "retry_not_due",
                    f"task {tid} may not be retried before {state.not_before.isoformat()}",
                )
            return [
                TaskAssigned(
                    task_id=tid,
                    agent_id=command.agent_id,
                    attempt=state.attempts + 1,
                    type=state.type,
                    payload=state.payload,
                )
            ]
        case AssignTask(), HeldTask():
            return rejected("conflict", "task_not_queued", f"task {tid} is {state.status}")
        case StartTask(), HeldTask(status="assigned"):
            return _not_holder(state, command.agent_id) or [
                TaskStarted(task_id=tid, agent_id=command.agent_id)
            ]
        case StartTask(), QueuedTask() | HeldTask():
            return rejected("conflict", "task_not_assigned", f"task {tid} is {state.status}")
        case ReportProgress(), HeldTask(status="running"):
            return _not_holder(state, command.agent_id) or [
                TaskProgressed(
                    task_id=tid,
                    agent_id=command.agent_id,
                    progress=command.progress,
                    message=command.message,
                )
            ]
        case CompleteTask(), HeldTask(status="running"):
            return _not_holder(state, command.agent_id) or [
                TaskCompleted(
                    task_id=tid,
                    agent_id=command.agent_id,
                    result=command.result,
                    quality=command.quality,
                )
            ]
        case FailTask(), HeldTask():
            return _not_holder(state, command.agent_id) or _release(
                state,
                command.at,
                command.agent_id,
                TaskFailed(
                    task_id=tid,
                    agent_id=command.agent_id,
                    error=command.error,
                    retryable=command.retryable,
                ),
                retry=command.retryable,
            )
        case ReportProgress() | CompleteTask() | FailTask(), QueuedTask() | HeldTask():
            return rejected("conflict", "task_not_running", f"task {tid} is {state.status}")
        case CancelTask(), QueuedTask() | HeldTask():
            return [TaskCancelled(task_id=tid, reason=command.reason)]
        case RequeueTask() | TimeOutTask(), HeldTask() if state.agent_id == command.agent_id:
            first: TaskEvent
            if isinstance(command, TimeOutTask):
                first = TaskTimedOut(task_id=tid, agent_id=command.agent_id)
            else:
                first = TaskRequeued(task_id=tid, agent_id=command.agent_id, reason=command.reason)
            return _release(state, command.at, command.agent_id, first, retry=True)
        case RequeueTask() | TimeOutTask(), QueuedTask() | HeldTask():
            return rejected(
                "conflict",
                "task_moved_on",
                f"task {tid} is {state.status} on agent {state.agent_id}",
                field="agent_id",
            )
    return rejected("invalid", "unknown_command", f"not a task command: {command!r}")


def evolve(state: TaskState | None, event: TaskEvent) -> TaskState | None:
    """Apply ``event`` to ``state``; never raises, never checks rules."""
    if isinstance(event, TaskSubmitted):
        return QueuedTask(
            task_id=event.task_id,
            type=event.type,
            payload=event.payload,
            required_capabilities=event.required_capabilities,
            priority=event.priority,
            max_cost=event.max_cost,
            lease_timeout_s=event.lease_timeout_s,
            run_timeout_s=event.run_timeout_s,
            max_attempts=event.max_attempts,
        )
    if state is None:
        return None
    match event:
        case TaskQueued() | TaskRetryScheduled():
            return _becomes(
                state, QueuedTask, status="queued", agent_id=None, not_before=event.not_before
            )
        case TaskAssigned():
            return _becomes(
                state, HeldTask, status="assigned", agent_id=event.agent_id, attempts=event.attempt
            )
        case TaskStarted():
            return _becomes(state, HeldTask, status="running", agent_id=event.agent_id)
        case TaskCompleted():
            return _becomes(state, FinishedTask, status="completed")
        case TaskFailed():
            return _becomes(state, FinishedTask, status="failed")
        case TaskCancelled():
            return _becomes(state, FinishedTask, status="cancelled")
        case TaskDeadLettered():
            return _becomes(state, FinishedTask, status="dead_lettered")
    return state


TASK_DECIDER: Decider[TaskCommand, TaskState, TaskEvent] = Decider(
    aggregate_type=TASK,
    command_types=(
        SubmitTask,
        AssignTask,
        StartTask,
        ReportProgress,
        CompleteTask,
        FailTask,
        CancelTask,
        RequeueTask,
        TimeOutTask,
    ),
    event_types=(
        TaskSubmitted,
        TaskQueued,
        TaskAssigned,
        TaskStarted,
        TaskProgressed,
        TaskCompleted,
        TaskFailed,
        TaskTimedOut,
        TaskRequeued,
        TaskRetryScheduled,
        TaskCancelled,
        TaskDeadLettered,
    ),
    decide=decide,
    evolve=evolve,
)
