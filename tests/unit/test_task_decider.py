"""The Task decider, given/when/then: every transition and every rejection code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from domain.backoff import backoff_seconds
from domain.messages import Rejection
from domain.task import (
    TASK_DECIDER,
    AssignTask,
    CancelTask,
    CompleteTask,
    FailTask,
    ReportProgress,
    RequeueTask,
    StartTask,
    SubmitTask,
    TaskAssigned,
    TaskCancelled,
    TaskCommand,
    TaskCompleted,
    TaskDeadLettered,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskQueued,
    TaskRequeued,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskTimedOut,
    TimeOutTask,
)
from tests.unit.gwt import given

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
TID = "task-1"
AGENT = "agent-1"
OTHER = "agent-2"


def at(seconds: float = 0) -> datetime:
    """A command time ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


def submitted(max_attempts: int = 3) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=TID,
        type="summarise",
        payload={"url": "https://example.org"},
        required_capabilities=("python",),
        priority="high",
        max_cost=1_000,
        lease_timeout_s=30.0,
        run_timeout_s=600.0,
        max_attempts=max_attempts,
    )


queued = TaskQueued(task_id=TID, reason="submitted")


def assigned(attempt: int = 1, agent: str = AGENT) -> TaskAssigned:
    """The assignment, carrying the task's type and payload for the agent."""
    return TaskAssigned(
        task_id=TID,
        agent_id=agent,
        attempt=attempt,
        type="summarise",
        payload={"url": "https://example.org"},
    )


def retry(attempt: int, not_before: datetime) -> TaskRetryScheduled:
    return TaskRetryScheduled(task_id=TID, attempt=attempt, not_before=not_before)


started = TaskStarted(task_id=TID, agent_id=AGENT)
failed_retryable = TaskFailed(task_id=TID, agent_id=AGENT, error="boom", retryable=True)


def history(status: str, max_attempts: int = 3) -> tuple[TaskEvent, ...]:
    """Events that leave the task in ``status`` after its first attempt."""
    base = (submitted(max_attempts), queued)
    return {
        "queued": base,
        "assigned": (*base, assigned()),
        "running": (*base, assigned(), started),
        "completed": (
            *base,
            assigned(),
            started,
            TaskCompleted(task_id=TID, agent_id=AGENT, result={}, quality=1.0),
        ),
        "failed": (
            *base,
            assigned(),
            started,
            TaskFailed(task_id=TID, agent_id=AGENT, error="bad input", retryable=False),
        ),
        "cancelled": (*base, TaskCancelled(task_id=TID, reason="cancelled by user")),
        "dead_lettered": (
            submitted(max_attempts=1),
            queued,
            assigned(),
            started,
            TaskTimedOut(task_id=TID, agent_id=AGENT),
            TaskDeadLettered(task_id=TID, reason="1 of 1 attempts used"),
        ),
    }[status]


TERMINAL = ("completed", "failed", "cancelled", "dead_lettered")


def submit(**fields: Any) -> SubmitTask:
    return SubmitTask(
        **{
            "task_id": TID,
            "at": at(),
            "type": "summarise",
            "payload": {"url": "https://example.org"},
            "required_capabilities": ("python",),
            "priority": "high",
            "max_cost": 1_000,
            "max_attempts": 3,
            **fields,
        }
    )


def assign(agent: str = AGENT, t: float = 0) -> AssignTask:
    return AssignTask(task_id=TID, agent_id=agent, at=at(t))


def start(agent: str = AGENT) -> StartTask:
    return StartTask(task_id=TID, agent_id=agent, at=at())


def progress(agent: str = AGENT) -> ReportProgress:
    return ReportProgress(task_id=TID, agent_id=agent, at=at(), progress=0.5, message="half")


def complete(agent: str = AGENT) -> CompleteTask:
    return CompleteTask(task_id=TID, agent_id=agent, at=at(), result={"ok": 1}, quality=0.8)


def fail(agent: str = AGENT, retryable: bool = True, t: float = 0) -> FailTask:
    return FailTask(task_id=TID, agent_id=agent, at=at(t), error="boom", retryable=retryable)


def cancel() -> CancelTask:
    return CancelTask(task_id=TID, at=at(), reason="no longer needed")


def requeue(agent: str = AGENT) -> RequeueTask:
    return RequeueTask(task_id=TID, agent_id=agent, at=at(), reason="lease_expired")


def time_out(agent: str = AGENT, t: float = 0) -> TimeOutTask:
    return TimeOutTask(task_id=TID, agent_id=agent, at=at(t))


def every_command_but_submit() -> list[TaskCommand]:
    return [assign(), start(), progress(), complete(), fail(), cancel(), requeue(), time_out()]


def command_id(command: TaskCommand) -> str:
    return type(command).__name__


# --- submitting ----------------------------------------------------------------------


def test_submitting_a_task_records_it_and_queues_it() -> None:
    given(TASK_DECIDER).when(submit()).then(submitted(), queued).and_state(
        task_id=TID,
        type="summarise",
        required_capabilities=("python",),
        priority="high",
        max_cost=1_000,
        max_attempts=3,
        status="queued",
        attempts=0,
        agent_id=None,
        not_before=None,
    )


def test_submitting_uses_the_default_specification() -> None:
    given(TASK_DECIDER).when(SubmitTask(task_id=TID, at=at(), type="t")).then(
        TaskSubmitted(
            task_id=TID,
            type="t",
            payload={},
            required_capabilities=(),
            priority="normal",
            max_cost=None,
            lease_timeout_s=30.0,
            run_timeout_s=600.0,
            max_attempts=3,
        ),
        TaskQueued(task_id=TID, reason="submitted"),
    )


@pytest.mark.parametrize("status", ["queued", "assigned", "running", *TERMINAL])
def test_submitting_an_existing_task_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(submit()).then_rejected(
        "task_already_submitted", kind="conflict"
    )


@pytest.mark.parametrize("command", every_command_but_submit(), ids=command_id)
def test_any_command_to_an_unknown_task_is_rejected_as_not_found(command: TaskCommand) -> None:
    given(TASK_DECIDER).when(command).then_rejected("task_not_found", kind="not_found")


@pytest.mark.parametrize("status", TERMINAL)
@pytest.mark.parametrize("command", every_command_but_submit(), ids=command_id)
def test_any_command_to_a_finished_task_is_rejected(status: str, command: TaskCommand) -> None:
    given(TASK_DECIDER, *history(status)).when(command).then_rejected(
        "task_finished", kind="conflict"
    )


# --- assigning -----------------------------------------------------------------------


def test_assigning_a_queued_task_counts_its_first_attempt() -> None:
    given(TASK_DECIDER, *history("queued")).when(assign()).then(assigned(attempt=1)).and_state(
        status="assigned", agent_id=AGENT, attempts=1
    )


@pytest.mark.parametrize("status", ["assigned", "running"])
def test_assigning_a_task_that_is_not_queued_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(assign(OTHER)).then_rejected(
        "task_not_queued", kind="conflict"
    )


def test_assigning_a_retry_before_it_is_due_is_rejected() -> None:
    due = at(10)
    given(TASK_DECIDER, *history("running"), failed_retryable, retry(2, due)).when(
        assign(t=9.999)
    ).then_rejected("retry_not_due", kind="conflict")


@pytest.mark.parametrize("t", [10, 11])
def test_assigning_a_retry_once_it_is_due_counts_the_next_attempt(t: float) -> None:
    given(TASK_DECIDER, *history("running"), failed_retryable, retry(2, at(10))).when(
        assign(OTHER, t=t)
    ).then(assigned(attempt=2, agent=OTHER)).and_state(
        status="assigned", agent_id=OTHER, attempts=2
    )


# --- starting ------------------------------------------------------------------------


def test_the_assigned_agent_starts_the_task() -> None:
    given(TASK_DECIDER, *history("assigned")).when(start()).then(started).and_state(
        status="running", agent_id=AGENT
    )


def test_starting_a_task_assigned_to_another_agent_is_forbidden() -> None:
    given(TASK_DECIDER, *history("assigned")).when(start(OTHER)).then_rejected(
        "not_assigned_agent", kind="forbidden", field="agent_id"
    )


@pytest.mark.parametrize("status", ["queued", "running"])
def test_starting_a_task_that_is_not_assigned_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(start()).then_rejected(
        "task_not_assigned", kind="conflict"
    )


# --- progress and completion ---------------------------------------------------------


def test_the_running_agent_reports_progress() -> None:
    given(TASK_DECIDER, *history("running")).when(progress()).then(
        TaskProgressed(task_id=TID, agent_id=AGENT, progress=0.5, message="half")
    ).and_state(status="running")


def test_the_running_agent_completes_the_task() -> None:
    given(TASK_DECIDER, *history("running")).when(complete()).then(
        TaskCompleted(task_id=TID, agent_id=AGENT, result={"ok": 1}, quality=0.8)
    ).and_state(status="completed")


@pytest.mark.parametrize("command", [progress(OTHER), complete(OTHER), fail(OTHER)], ids=command_id)
def test_another_agent_may_not_report_on_a_running_task(command: TaskCommand) -> None:
    given(TASK_DECIDER, *history("running")).when(command).then_rejected(
        "not_assigned_agent", kind="forbidden", field="agent_id"
    )


@pytest.mark.parametrize("status", ["queued", "assigned"])
def test_completing_a_task_that_is_not_running_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(complete()).then_rejected(
        "task_not_running", kind="conflict"
    )


@pytest.mark.parametrize("status", ["queued", "assigned"])
def test_reporting_progress_on_a_task_that_is_not_running_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(progress()).then_rejected(
        "task_not_running", kind="conflict"
    )


def test_failing_a_queued_task_is_rejected() -> None:
    given(TASK_DECIDER, *history("queued")).when(fail()).then_rejected(
        "task_not_running", kind="conflict"
    )


# --- failure, retry with backoff and dead letters ------------------------------------


@pytest.mark.parametrize("status", ["running", "assigned"])
def test_a_retryable_failure_with_attempts_left_schedules_a_retry_after_backoff(
    status: str,
) -> None:
    not_before = at(7) + timedelta(seconds=backoff_seconds(TID, 1))
    given(TASK_DECIDER, *history(status)).when(fail(t=7)).then(
        failed_retryable, retry(2, not_before)
    ).and_state(status="queued", agent_id=None, attempts=1, not_before=not_before)


def test_the_backoff_grows_with_the_attempt_number() -> None:
    second_failure_at = at(100)
    not_before = second_failure_at + timedelta(seconds=backoff_seconds(TID, 2))
    given(
        TASK_DECIDER,
        *history("running"),
        failed_retryable,
        retry(2, at(1)),
        assigned(attempt=2),
        started,
    ).when(fail(t=100)).then(failed_retryable, retry(3, not_before)).and_state(
        status="queued", attempts=2, not_before=not_before
    )
    assert backoff_seconds(TID, 2) >= 1.0  # ceiling 2 s, equal jitter: at least 1 s


def test_a_retryable_failure_on_the_last_attempt_dead_letters_the_task() -> None:
    given(
        TASK_DECIDER,
        *history("running", max_attempts=2),
        failed_retryable,
        retry(2, at(1)),
        assigned(attempt=2),
        started,
    ).when(fail(t=50)).then(
        failed_retryable, TaskDeadLettered(task_id=TID, reason="2 of 2 attempts used")
    ).and_state(status="dead_lettered", attempts=2)


def test_a_non_retryable_failure_is_terminal_even_with_attempts_left() -> None:
    given(TASK_DECIDER, *history("running")).when(fail(retryable=False)).then(
        TaskFailed(task_id=TID, agent_id=AGENT, error="boom", retryable=False)
    ).and_state(status="failed", attempts=1)


def test_a_failed_task_accepts_no_retry() -> None:
    given(TASK_DECIDER, *history("failed")).when(assign()).then_rejected("task_finished")


# --- time-outs -----------------------------------------------------------------------


def test_timing_out_a_running_task_with_attempts_left_schedules_a_retry_after_backoff() -> None:
    not_before = at(600) + timedelta(seconds=backoff_seconds(TID, 1))
    given(TASK_DECIDER, *history("running")).when(time_out(t=600)).then(
        TaskTimedOut(task_id=TID, agent_id=AGENT), retry(2, not_before)
    ).and_state(status="queued", agent_id=None, not_before=not_before)


def test_timing_out_the_last_attempt_dead_letters_the_task() -> None:
    given(TASK_DECIDER, *history("running", max_attempts=1)).when(time_out()).then(
        TaskTimedOut(task_id=TID, agent_id=AGENT),
        TaskDeadLettered(task_id=TID, reason="1 of 1 attempts used"),
    ).and_state(status="dead_lettered")


def test_timing_out_a_task_held_by_another_agent_is_rejected_as_moved_on() -> None:
    given(TASK_DECIDER, *history("running")).when(time_out(OTHER)).then_rejected(
        "task_moved_on", kind="conflict", field="agent_id"
    )


def test_timing_out_a_queued_task_is_rejected_as_moved_on() -> None:
    given(TASK_DECIDER, *history("queued")).when(time_out()).then_rejected(
        "task_moved_on", kind="conflict"
    )


# --- requeueing ----------------------------------------------------------------------


@pytest.mark.parametrize("status", ["assigned", "running"])
def test_requeueing_takes_the_task_back_without_backoff(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(requeue()).then(
        TaskRequeued(task_id=TID, agent_id=AGENT, reason="lease_expired"),
        TaskQueued(task_id=TID, reason="requeued"),
    ).and_state(status="queued", agent_id=None, not_before=None, attempts=1)


def test_a_requeued_task_can_be_assigned_again_at_once() -> None:
    given(
        TASK_DECIDER,
        *history("assigned"),
        TaskRequeued(task_id=TID, agent_id=AGENT, reason="agent_offline"),
        TaskQueued(task_id=TID, reason="requeued"),
    ).when(assign(OTHER)).then(assigned(attempt=2, agent=OTHER))


def test_requeueing_the_last_attempt_dead_letters_the_task() -> None:
    given(TASK_DECIDER, *history("assigned", max_attempts=1)).when(requeue()).then(
        TaskRequeued(task_id=TID, agent_id=AGENT, reason="lease_expired"),
        TaskDeadLettered(task_id=TID, reason="1 of 1 attempts used"),
    ).and_state(status="dead_lettered")


def test_requeueing_a_task_held_by_another_agent_is_rejected_as_moved_on() -> None:
    given(TASK_DECIDER, *history("running")).when(requeue(OTHER)).then_rejected(
        "task_moved_on", kind="conflict", field="agent_id"
    )


def test_requeueing_a_task_already_back_in_the_queue_is_rejected_as_moved_on() -> None:
    given(TASK_DECIDER, *history("queued")).when(requeue()).then_rejected(
        "task_moved_on", kind="conflict"
    )


# --- cancelling ----------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "assigned", "running"])
def test_cancelling_an_unfinished_task_is_terminal(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(cancel()).then(
        TaskCancelled(task_id=TID, reason="no longer needed")
    ).and_state(status="cancelled")


def test_cancelling_uses_a_default_reason() -> None:
    given(TASK_DECIDER, *history("queued")).when(CancelTask(task_id=TID, at=at())).then(
        TaskCancelled(task_id=TID, reason="cancelled by user")
    )


@pytest.mark.parametrize("status", TERMINAL)
def test_cancelling_a_finished_task_is_rejected(status: str) -> None:
    given(TASK_DECIDER, *history(status)).when(cancel()).then_rejected("task_finished")


# --- evolve --------------------------------------------------------------------------


def test_events_for_a_task_that_does_not_exist_leave_no_state() -> None:
    assert TASK_DECIDER.fold([queued, assigned(), started]) is None


def test_each_history_folds_to_its_status() -> None:
    for status in ("queued", "assigned", "running", *TERMINAL):
        state = TASK_DECIDER.fold(history(status))
        assert state is not None and state.status == status


# --- times ---------------------------------------------------------------------------


def test_a_naive_command_time_never_makes_decide_raise() -> None:
    """A command time without a zone is refused when built, or decided without raising."""
    scenario = given(TASK_DECIDER, *history("running"), failed_retryable, retry(2, at(10)))
    try:
        command = AssignTask(task_id=TID, agent_id=AGENT, at=datetime(2030, 1, 1))
    except ValidationError as error:
        assert [e["loc"] for e in error.errors()] == [("at",)]
        return
    outcome = scenario.when(command).outcome
    assert isinstance(outcome, Rejection) or outcome


# --- command validation --------------------------------------------------------------


NO_SUCH_REASON: Any = "felt_like_it"


def error_locations(error: ValidationError) -> list[tuple[str | int, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


@pytest.mark.parametrize(
    ("make", "location"),
    [
        (lambda: submit(type=""), ("type",)),
        (lambda: submit(required_capabilities=("python", "python")), ("required_capabilities",)),
        (lambda: submit(required_capabilities=("python", "")), ("required_capabilities",)),
        (lambda: submit(max_cost=-1), ("max_cost",)),
        (lambda: submit(max_attempts=0), ("max_attempts",)),
        (lambda: submit(lease_timeout_s=0), ("lease_timeout_s",)),
        (lambda: submit(priority="whenever"), ("priority",)),
        (lambda: submit(task_id=""), ("task_id",)),
        (lambda: submit(colour="blue"), ("colour",)),
        (lambda: ReportProgress(task_id=TID, agent_id=AGENT, at=at(), progress=1.5), ("progress",)),
        (lambda: CompleteTask(task_id=TID, agent_id=AGENT, at=at(), quality=-0.1), ("quality",)),
        (lambda: FailTask(task_id=TID, agent_id=AGENT, at=at(), error=""), ("error",)),
        (lambda: AssignTask(task_id=TID, agent_id="", at=at()), ("agent_id",)),
        (
            lambda: RequeueTask(task_id=TID, agent_id=AGENT, at=at(), reason=NO_SUCH_REASON),
            ("reason",),
        ),
    ],
    ids=[
        "empty_type",
        "duplicate_required_capabilities",
        "empty_required_capability",
        "negative_max_cost",
        "zero_max_attempts",
        "zero_lease_timeout",
        "unknown_priority",
        "empty_task_id",
        "unknown_field",
        "progress_above_one",
        "negative_quality",
        "empty_error",
        "empty_agent_id",
        "unknown_requeue_reason",
    ],
)
def test_an_invalid_task_command_is_a_validation_error_naming_the_field(
    make: Any, location: tuple[str | int, ...]
) -> None:
    with pytest.raises(ValidationError) as raised:
        make()
    assert error_locations(raised.value) == [location]
