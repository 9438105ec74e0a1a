"""The workflow, template and run deciders, given/when/then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain.backoff import backoff_seconds
from domain.workflow import (
    TEMPLATE_DECIDER,
    WORKFLOW_DECIDER,
    ArchiveWorkflow,
    CreateWorkflow,
    ExecuteWorkflow,
    MapSpec,
    ParameterSpec,
    PublishTemplate,
    RetryPolicy,
    StepSpec,
    TemplatePublished,
    UpdateWorkflow,
    WorkflowArchived,
    WorkflowCreated,
    WorkflowExecutionRequested,
    WorkflowSpec,
    WorkflowUpdated,
)
from domain.workflow_run import (
    RUN_DECIDER,
    CancelWorkflowRun,
    RecordStepTaskOutcome,
    RecordStepTaskOutcomes,
    RunEvent,
    RunLimits,
    RunState,
    ScheduledTask,
    StartWorkflowRun,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
    StepTaskFailed,
    StepTaskOutcome,
    StepTasksScheduled,
    StepTasksSucceeded,
    SucceededTask,
    WorkflowRunCancelled,
    WorkflowRunCompleted,
    WorkflowRunFailed,
    WorkflowRunStarted,
    json_size,
    pack,
    run_decider,
    run_result,
    step_task_id,
)
from tests.unit.gwt import given

AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
W = "wf-1"
R = "run-1"


def step(sid: str, *deps: str, **extra: Any) -> StepSpec:
    return StepSpec(id=sid, task_type=f"do_{sid}", depends_on=deps, **extra)


SPEC = WorkflowSpec(steps=(step("a"), step("b", "a")))


# -- definitions ------------------------------------------------------------------------


def created(spec: WorkflowSpec = SPEC) -> WorkflowCreated:
    return WorkflowCreated(workflow_id=W, name="two", description="", spec=spec)


def test_create_a_valid_definition() -> None:
    given(WORKFLOW_DECIDER).when(CreateWorkflow(workflow_id=W, name="two", spec=SPEC, at=AT)).then(
        created()
    ).and_state(version=1, status="active")


def test_create_an_invalid_definition_is_rejected_naming_the_field() -> None:
    bad = WorkflowSpec(steps=(step("a", "b"), step("b", "a")))
    rejection = (
        given(WORKFLOW_DECIDER)
        .when(CreateWorkflow(workflow_id=W, name="x", spec=bad, at=AT))
        .then_rejected("cycle", kind="invalid", field="steps[0].depends_on")
    )
    assert "a -> b -> a" in rejection.detail


def test_create_twice_is_a_conflict() -> None:
    given(WORKFLOW_DECIDER, created()).when(
        CreateWorkflow(workflow_id=W, name="two", spec=SPEC, at=AT)
    ).then_rejected("workflow_exists", kind="conflict")


def test_update_bumps_the_version() -> None:
    new = WorkflowSpec(steps=(step("only"),))
    given(WORKFLOW_DECIDER, created()).when(
        UpdateWorkflow(workflow_id=W, spec=new, description="v2", at=AT)
    ).then(
        WorkflowUpdated(workflow_id=W, version=2, name="two", description="v2", spec=new)
    ).and_state(version=2, spec=new)


def test_an_update_is_validated_too() -> None:
    given(WORKFLOW_DECIDER, created()).when(
        UpdateWorkflow(workflow_id=W, spec=WorkflowSpec(steps=(step("a", "zz"),)), at=AT)
    ).then_rejected("unknown_dependency", field="steps[0].depends_on")


def test_execute_carries_the_current_version_whole() -> None:
    new = WorkflowSpec(steps=(step("only"),))
    updated = WorkflowUpdated(workflow_id=W, version=2, name="two", description="", spec=new)
    given(WORKFLOW_DECIDER, created(), updated).when(
        ExecuteWorkflow(workflow_id=W, run_id=R, inputs={"x": 1}, at=AT)
    ).then(
        WorkflowExecutionRequested(workflow_id=W, run_id=R, version=2, spec=new, inputs={"x": 1})
    ).and_state(runs=1)


def test_an_archived_definition_cannot_be_executed_or_updated() -> None:
    history = (created(), WorkflowArchived(workflow_id=W))
    given(WORKFLOW_DECIDER, *history).when(
        ExecuteWorkflow(workflow_id=W, run_id=R, at=AT)
    ).then_rejected("workflow_archived", kind="gone")
    given(WORKFLOW_DECIDER, *history).when(
        UpdateWorkflow(workflow_id=W, spec=SPEC, at=AT)
    ).then_rejected("workflow_archived", kind="gone")


def test_archive() -> None:
    given(WORKFLOW_DECIDER, created()).when(ArchiveWorkflow(workflow_id=W, at=AT)).then(
        WorkflowArchived(workflow_id=W)
    ).and_state(status="archived")


def test_commands_on_a_missing_definition_are_not_found() -> None:
    given(WORKFLOW_DECIDER).when(ExecuteWorkflow(workflow_id=W, run_id=R, at=AT)).then_rejected(
        "workflow_not_found", kind="not_found"
    )


def test_templates_are_versioned() -> None:
    params = {"package": ParameterSpec(description="what to analyse")}
    first = TemplatePublished(name="t", version=1, description="", parameters=params, spec=SPEC)
    given(TEMPLATE_DECIDER).when(
        PublishTemplate(name="t", parameters=params, spec=SPEC, at=AT)
    ).then(first)
    given(TEMPLATE_DECIDER, first).when(
        PublishTemplate(name="t", parameters=params, spec=SPEC, at=AT)
    ).then(first.model_copy(update={"version": 2})).and_state(version=2)


def test_an_invalid_template_is_rejected() -> None:
    given(TEMPLATE_DECIDER).when(
        PublishTemplate(name="t", spec=WorkflowSpec(steps=(step("a", "a"),)), at=AT)
    ).then_rejected("cycle", kind="invalid")


# -- runs -------------------------------------------------------------------------------


def scheduled(sid: str, index: int = 0, attempt: int = 1, **extra: Any) -> StepTasksScheduled:
    """The ``StepTasksScheduled`` of one unit (``extra``: its payload, not_before...)."""
    unit: dict[str, Any] = {
        "index": index,
        "attempt": attempt,
        "task_id": step_task_id(R, sid, index, attempt),
        "payload": extra.pop("payload", {}),
        "not_before": extra.pop("not_before", None),
    }
    fields: dict[str, Any] = {
        "run_id": R,
        "step_id": sid,
        "task_type": f"do_{sid}",
        "required_capabilities": (),
        "priority": "normal",
        "run_timeout_s": 600.0,
        "tasks": (ScheduledTask(**unit),),
    }
    fields.update(extra)
    return StepTasksScheduled(**fields)


def merged(*events: StepTasksScheduled | StepTasksSucceeded) -> RunEvent:
    """One event listing the units of ``events`` (of one kind and step), in order."""
    tasks = tuple(u for e in events for u in e.tasks)
    return events[0].model_copy(update={"tasks": tasks})


def start(spec: WorkflowSpec, inputs: dict[str, Any] | None = None) -> list[RunEvent]:
    """The events a run of ``spec`` starts with."""
    out = RUN_DECIDER.decide(
        StartWorkflowRun(run_id=R, workflow_id=W, version=1, spec=spec, inputs=inputs or {}, at=AT),
        None,
    )
    assert isinstance(out, list)
    return out


def outcome(
    sid: str, index: int = 0, attempt: int = 1, ok: bool = True, result: Any = None, **kw: Any
) -> RecordStepTaskOutcome:
    return RecordStepTaskOutcome(
        run_id=R,
        step_id=sid,
        index=index,
        attempt=attempt,
        task_id=step_task_id(R, sid, index, attempt),
        succeeded=ok,
        result=result,
        error=None if ok else kw.pop("error", "boom"),
        at=kw.pop("at", AT),
    )


def succeeded(sid: str, result: Any, index: int = 0, attempt: int = 1) -> StepTasksSucceeded:
    """The ``StepTasksSucceeded`` of one unit."""
    return StepTasksSucceeded(
        run_id=R,
        step_id=sid,
        tasks=(
            SucceededTask(
                index=index,
                attempt=attempt,
                task_id=step_task_id(R, sid, index, attempt),
                result=result,
            ),
        ),
    )


def test_start_schedules_the_roots_only() -> None:
    spec = WorkflowSpec(steps=(step("a"), step("b"), step("c", "a", "b")))
    given(RUN_DECIDER).when(
        StartWorkflowRun(run_id=R, workflow_id=W, version=1, spec=spec, at=AT)
    ).then(
        WorkflowRunStarted(run_id=R, workflow_id=W, version=1, spec=spec, inputs={}, params={}),
        StepStarted(run_id=R, step_id="a"),
        scheduled("a"),
        StepStarted(run_id=R, step_id="b"),
        scheduled("b"),
    )


def test_a_step_starts_when_its_last_dependency_completes_and_sees_its_result() -> None:
    spec = WorkflowSpec(
        steps=(step("a"), step("b", "a", payload={"k": 1}, payload_from={"n": "steps.a.result.n"}))
    )
    given(RUN_DECIDER, *start(spec)).when(outcome("a", result={"n": 7})).then(
        succeeded("a", {"n": 7}),
        StepCompleted(run_id=R, step_id="a", result={"n": 7}),
        StepStarted(run_id=R, step_id="b"),
        scheduled("b", payload={"k": 1, "n": 7}),
    )


def test_the_run_completes_with_the_results_of_its_final_steps() -> None:
    history = [
        *start(SPEC),
        *RUN_DECIDER.decide(outcome("a", result=1), RUN_DECIDER.fold(start(SPEC))),
    ]  # type: ignore[misc]
    given(RUN_DECIDER, *history).when(outcome("b", result=2)).then(
        succeeded("b", 2),
        StepCompleted(run_id=R, step_id="b", result=2),
        WorkflowRunCompleted(run_id=R, result_steps=("b",)),
    ).and_state(status="completed")
    assert run_result(
        RUN_DECIDER.fold(
            [
                *history,
                *RUN_DECIDER.decide(  # type: ignore[misc]
                    outcome("b", result=2), RUN_DECIDER.fold(history)
                ),
            ]
        )
    ) == {"b": 2}


def test_a_false_condition_skips_the_step_and_its_dependents() -> None:
    spec = WorkflowSpec(
        steps=(step("a", when="inputs.go"), step("b", "a"), step("c", when="!(inputs.go)"))
    )
    given(RUN_DECIDER).when(
        StartWorkflowRun(run_id=R, workflow_id=W, version=1, spec=spec, inputs={"go": False}, at=AT)
    ).then(
        WorkflowRunStarted(
            run_id=R, workflow_id=W, version=1, spec=spec, inputs={"go": False}, params={}
        ),
        StepSkipped(run_id=R, step_id="a", reason="condition is false: inputs.go"),
        StepSkipped(run_id=R, step_id="b", reason="upstream step a was skipped"),
        StepStarted(run_id=R, step_id="c"),
        scheduled("c"),
    )


def test_a_map_step_keeps_to_its_parallelism_and_fans_in_in_item_order() -> None:
    spec = WorkflowSpec(
        steps=(
            step("a", map=MapSpec(items="inputs.xs", max_parallelism=2)),
            step("b", "a", payload_from={"all": "steps.a.result"}),
        )
    )
    events = start(spec, {"xs": ["p", "q", "r"]})
    assert [e for e in events if isinstance(e, StepTasksScheduled)] == [
        merged(
            scheduled("a", 0, payload={"item": "p", "index": 0}),
            scheduled("a", 1, payload={"item": "q", "index": 1}),
        )
    ]
    state = RUN_DECIDER.fold(events)
    # item 1 finishes first: item 2 takes its place
    then = (
        given(RUN_DECIDER, *events)
        .when(outcome("a", 1, result="Q"))
        .then(succeeded("a", "Q", index=1), scheduled("a", 2, payload={"item": "r", "index": 2}))
    )
    state = then.state
    for index, result in ((2, "R"), (0, "P")):
        out = RUN_DECIDER.decide(outcome("a", index, result=result), state)
        assert isinstance(out, list)
        state = RUN_DECIDER.fold(out, state)
    assert state.steps["a"].status == "completed"
    assert state.steps["a"].result == ["P", "Q", "R"]
    assert state.steps["b"].units[0].status == "scheduled"
    b_task = [e for e in out if isinstance(e, StepTasksScheduled) and e.step_id == "b"]
    assert b_task[0].tasks[0].payload == {"all": ["P", "Q", "R"]}


def test_an_empty_map_completes_at_once() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    events = start(spec, {"xs": []})
    assert events[-2:] == [
        StepCompleted(run_id=R, step_id="a", result=[]),
        WorkflowRunCompleted(run_id=R, result_steps=("a",)),
    ]


def test_a_map_over_something_not_a_list_fails_the_step() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    events = start(spec, {"xs": "nope"})
    assert isinstance(events[-2], StepFailed) and "not a list" in events[-2].error
    assert isinstance(events[-1], WorkflowRunFailed)


def test_a_failure_with_attempts_left_is_retried_after_backoff() -> None:
    spec = WorkflowSpec(
        steps=(step("a", retry=RetryPolicy(max_attempts=3, backoff_base_s=2, backoff_max_s=30)),)
    )
    delay = backoff_seconds(step_task_id(R, "a", 0, 1), 1, base_s=2, cap_s=30)
    retry_at = AT + timedelta(seconds=delay)
    given(RUN_DECIDER, *start(spec)).when(outcome("a", ok=False, error="flaky")).then(
        StepTaskFailed(
            run_id=R,
            step_id="a",
            index=0,
            attempt=1,
            task_id=step_task_id(R, "a", 0, 1),
            error="flaky",
            retry_at=retry_at,
        ),
        scheduled("a", attempt=2, not_before=retry_at),
    )
    assert 1.0 <= delay <= 2.0


def test_the_last_attempt_failing_fails_the_step_and_the_run() -> None:
    spec = WorkflowSpec(steps=(step("a"), step("b", "a")))
    then = (
        given(RUN_DECIDER, *start(spec))
        .when(outcome("a", ok=False, error="no"))
        .then(
            StepTaskFailed(
                run_id=R,
                step_id="a",
                index=0,
                attempt=1,
                task_id=step_task_id(R, "a", 0, 1),
                error="no",
            ),
            StepFailed(run_id=R, step_id="a", error="no (after 1 of 1 attempts)"),
            WorkflowRunFailed(run_id=R, step_id="a", error="no (after 1 of 1 attempts)"),
        )
    )
    state = then.and_state(status="failed")
    assert state.steps["b"].status == "cancelled"


def test_a_gate_that_does_not_hold_counts_as_a_failed_attempt() -> None:
    spec = WorkflowSpec(
        steps=(step("a", gate="result.score > `5`", retry=RetryPolicy(max_attempts=2)),)
    )
    events = start(spec)
    first = RUN_DECIDER.decide(outcome("a", result={"score": 3}), RUN_DECIDER.fold(events))
    assert isinstance(first, list)
    assert isinstance(first[0], StepTaskFailed)
    assert first[0].error == "gate failed: result.score > `5`"
    assert first[1] == scheduled("a", attempt=2, not_before=first[0].retry_at)
    state = RUN_DECIDER.fold([*events, *first])
    second = RUN_DECIDER.decide(outcome("a", attempt=2, result={"score": 9}), state)
    assert isinstance(second, list) and isinstance(second[-1], WorkflowRunCompleted)


def test_a_map_gate_checks_the_fanned_in_list() -> None:
    spec = WorkflowSpec(
        steps=(
            step(
                "a",
                map=MapSpec(items="inputs.xs"),
                gate="length(result) == length(inputs.xs) && !contains(result, `null`)",
            ),
        )
    )
    events = start(spec, {"xs": [1, 2]})
    state = RUN_DECIDER.fold(events)
    out = RUN_DECIDER.decide(outcome("a", 0, result="ok"), state)
    state = RUN_DECIDER.fold(out, state)  # type: ignore[arg-type]
    out = RUN_DECIDER.decide(outcome("a", 1, result=None), state)
    assert isinstance(out, list)
    assert isinstance(out[-2], StepFailed) and out[-2].error.startswith("gate failed")


def test_on_failure_continue_lets_dependents_run_and_see_the_failure() -> None:
    spec = WorkflowSpec(
        steps=(step("a", on_failure="continue"), step("b", "a", when="steps.a.status == 'failed'"))
    )
    out = RUN_DECIDER.decide(outcome("a", ok=False), RUN_DECIDER.fold(start(spec)))
    assert isinstance(out, list)
    assert [type(e).__name__ for e in out] == [
        "StepTaskFailed",
        "StepFailed",
        "StepStarted",
        "StepTasksScheduled",
    ]


def test_compensation_runs_then_the_run_fails_compensated() -> None:
    spec = WorkflowSpec(
        steps=(step("a", on_failure="compensate", compensation="undo"),),
        compensations=(step("undo"),),
    )
    failed = RUN_DECIDER.decide(outcome("a", ok=False), RUN_DECIDER.fold(start(spec)))
    assert isinstance(failed, list)
    assert failed[-2:] == [
        StepStarted(run_id=R, step_id="undo", compensating_for="a"),
        scheduled("undo"),
    ]
    history = [*start(spec), *failed]
    given(RUN_DECIDER, *history).when(outcome("undo", result="undone")).then(
        succeeded("undo", "undone"),
        StepCompleted(run_id=R, step_id="undo", result="undone"),
        WorkflowRunFailed(
            run_id=R, step_id="a", error="boom (after 1 of 1 attempts)", compensated=True
        ),
    )
    out = RUN_DECIDER.decide(outcome("undo", ok=False), RUN_DECIDER.fold(history))
    assert isinstance(out, list) and out[-1] == WorkflowRunFailed(
        run_id=R, step_id="a", error="boom (after 1 of 1 attempts)", compensated=False
    )


def test_cancel_a_running_run() -> None:
    given(RUN_DECIDER, *start(SPEC)).when(CancelWorkflowRun(run_id=R, reason="stop", at=AT)).then(
        WorkflowRunCancelled(run_id=R, reason="stop")
    ).and_state(status="cancelled")


def test_a_finished_run_rejects_commands() -> None:
    history = [*start(SPEC), WorkflowRunCancelled(run_id=R, reason="x")]
    given(RUN_DECIDER, *history).when(CancelWorkflowRun(run_id=R, at=AT)).then_rejected(
        "run_finished", kind="conflict"
    )
    given(RUN_DECIDER, *history).when(outcome("a")).then_rejected("run_finished")


@pytest.mark.parametrize(
    "command",
    [
        outcome("a", attempt=2),  # not the current attempt
        outcome("b"),  # not started
        RecordStepTaskOutcome(
            run_id=R, step_id="a", index=0, attempt=1, task_id="other", succeeded=True, at=AT
        ),
    ],
)
def test_a_stale_outcome_is_rejected(command: RecordStepTaskOutcome) -> None:
    given(RUN_DECIDER, *start(SPEC)).when(command).then_rejected(
        "stale_task_outcome", kind="conflict"
    )


def test_a_recorded_outcome_is_not_recorded_twice() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    events = start(spec, {"xs": [1, 2]})
    first = RUN_DECIDER.decide(outcome("a", 0, result=1), RUN_DECIDER.fold(events))
    assert isinstance(first, list)
    given(RUN_DECIDER, *events, *first).when(outcome("a", 0, result=1)).then_rejected(
        "stale_task_outcome"
    )


def test_unknown_steps_and_runs() -> None:
    given(RUN_DECIDER, *start(SPEC)).when(outcome("zz")).then_rejected("unknown_step")
    given(RUN_DECIDER).when(CancelWorkflowRun(run_id=R, at=AT)).then_rejected("run_not_found")
    given(RUN_DECIDER, *start(SPEC)).when(
        StartWorkflowRun(run_id=R, workflow_id=W, version=1, spec=SPEC, at=AT)
    ).then_rejected("run_exists")


def test_a_payload_expression_error_fails_the_step() -> None:
    spec = WorkflowSpec(steps=(step("a", payload_from={"n": "length(inputs.n)"}),))
    events = start(spec, {"n": 5})
    assert isinstance(events[-2], StepFailed) and "payload_from" in events[-2].error


def test_replaying_the_events_gives_the_same_state() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")), step("b", "a")))
    events = start(spec, {"xs": [1, 2, 3]})
    state: RunState = RUN_DECIDER.fold(events)
    history = list(events)
    for index in range(3):
        out = RUN_DECIDER.decide(outcome("a", index, result=index), state)
        assert isinstance(out, list)
        history += out
        state = RUN_DECIDER.fold(out, state)
    assert RUN_DECIDER.fold(history) == state


def test_while_compensating_other_steps_neither_retry_nor_end_the_run() -> None:
    spec = WorkflowSpec(
        steps=(
            step("a", on_failure="compensate", compensation="undo"),
            step("b", retry=RetryPolicy(max_attempts=3)),
        ),
        compensations=(step("undo"),),
    )
    history = start(spec)
    failed = RUN_DECIDER.decide(outcome("a", ok=False), RUN_DECIDER.fold(history))
    assert isinstance(failed, list)
    history += failed
    then = given(RUN_DECIDER, *history).when(outcome("b", ok=False, error="late"))
    state = then.then(
        StepTaskFailed(
            run_id=R,
            step_id="b",
            index=0,
            attempt=1,
            task_id=step_task_id(R, "b", 0, 1),
            error="late",
        ),
        StepFailed(run_id=R, step_id="b", error="late (after 1 of 3 attempts)"),
    ).and_state(status="compensating")
    out = RUN_DECIDER.decide(outcome("undo", result="ok"), state)
    assert isinstance(out, list) and out[-1] == WorkflowRunFailed(
        run_id=R, step_id="a", error="boom (after 1 of 1 attempts)", compensated=True
    )


def test_a_value_too_large_for_one_record_fails_the_step() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    events = start(spec, {"xs": ["x" * 1000] * 600})
    assert isinstance(events[-2], StepFailed)
    assert events[-2].error.startswith("map.items") and "524,288 bytes" in events[-2].error
    # non-ASCII is written escaped (6 bytes a character): the exact size decides
    events = start(spec, {"xs": ["é" * 1000] * 100})
    assert isinstance(events[-2], StepFailed)
    assert events[-2].error.startswith("map.items of ") and "bytes is over" in events[-2].error


def test_an_outcome_shows_a_summary_of_the_run_not_its_results() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    state = RUN_DECIDER.fold(start(spec, {"xs": [1, 2]}))
    assert RUN_DECIDER.summary(state) == {
        "run_id": R,
        "workflow_id": W,
        "version": 1,
        "status": "running",
        "steps": {"a": {"status": "running", "units": 2, "succeeded": 0}},
    }
    assert WORKFLOW_DECIDER.summary(None) is None


def test_a_batch_of_outcomes_is_recorded_in_order_passing_over_stale_ones() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs", max_parallelism=2)),))
    events = start(spec, {"xs": [1, 2, 3]})

    def item(index: int, attempt: int = 1) -> StepTaskOutcome:
        return StepTaskOutcome(
            step_id="a",
            index=index,
            attempt=attempt,
            task_id=step_task_id(R, "a", index, attempt),
            succeeded=True,
            result=index,
        )

    then = given(RUN_DECIDER, *events).when(
        RecordStepTaskOutcomes(run_id=R, outcomes=(item(0), item(0, 2), item(1)), at=AT)
    )
    # one event per kind and step: both successes, then the item that took a place
    state = then.then(
        merged(succeeded("a", 0, index=0), succeeded("a", 1, index=1)),
        scheduled("a", 2, payload={"item": 3, "index": 2}),
    ).state
    # a batch with nothing current is rejected, so the engine's resend ends
    given(RUN_DECIDER, *events, *then.outcome).when(  # type: ignore[misc]
        RecordStepTaskOutcomes(run_id=R, outcomes=(item(0), item(1)), at=AT)
    ).then_rejected("stale_task_outcome")
    out = RUN_DECIDER.decide(RecordStepTaskOutcomes(run_id=R, outcomes=(item(2),), at=AT), state)
    assert isinstance(out, list) and isinstance(out[-1], WorkflowRunCompleted)
    assert out[-1].result_steps == ("a",)
    assert run_result(RUN_DECIDER.fold(out, state)) == {"a": [0, 1, 2]}


BATCH_EVENT_BYTES = 256 * 1024
"""What the command processor packs events to with its default 1 MiB record limit."""


def test_a_map_start_is_one_event_per_step_packed_by_size() -> None:
    spec = WorkflowSpec(
        steps=(step("a", map=MapSpec(items="inputs.xs", max_items=1000, max_parallelism=1000)),)
    )
    xs = ["x" * 400] * 1000  # ~400 KiB of items, ~560 KiB of units: three events' worth
    decided = start(spec, {"xs": xs})
    assert len([e for e in decided if isinstance(e, StepTasksScheduled)]) == 1
    events = pack(decided, BATCH_EVENT_BYTES)
    assert RUN_DECIDER.packed(decided, BATCH_EVENT_BYTES) == events
    batches = [e for e in events if isinstance(e, StepTasksScheduled)]
    assert len(batches) == 3
    assert [u.index for e in batches for u in e.tasks] == list(range(1000))
    assert all(json_size(e.model_dump(mode="json")) < BATCH_EVENT_BYTES + 1024 for e in batches)
    assert RUN_DECIDER.fold(events).steps["a"].units.keys() == set(range(1000))
    assert RUN_DECIDER.fold(events) == RUN_DECIDER.fold(decided)


def test_packing_keeps_the_order_of_events_and_folds_to_the_same_state() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs", max_parallelism=3)),))
    events = start(spec, {"xs": ["x" * 100, "y" * 100, "z" * 100]})
    state = RUN_DECIDER.fold(events)
    decided = RUN_DECIDER.decide(
        RecordStepTaskOutcomes(
            run_id=R,
            outcomes=tuple(
                StepTaskOutcome(
                    step_id="a",
                    index=i,
                    attempt=1,
                    task_id=step_task_id(R, "a", i, 1),
                    succeeded=True,
                    result="r" * 300,
                )
                for i in range(3)
            ),
            at=AT,
        ),
        state,
    )
    assert isinstance(decided, list)
    packed = pack(decided, 500)  # one unit of about 460 bytes an event
    assert [type(e) for e in packed] == [StepTasksSucceeded] * 3 + [type(e) for e in decided[1:]]
    assert [t.index for e in packed[:3] for t in e.tasks] == [0, 1, 2]  # type: ignore[attr-defined]
    assert RUN_DECIDER.fold(packed, state) == RUN_DECIDER.fold(decided, state)
    assert pack(decided, 10**6) == decided


def test_the_value_limit_is_the_callers() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs")),))
    command = StartWorkflowRun(
        run_id=R, workflow_id=W, version=1, spec=spec, inputs={"xs": ["x" * 100] * 20}, at=AT
    )
    assert not any(isinstance(e, StepFailed) for e in start(spec, {"xs": ["x" * 100] * 20}))
    out = run_decider(RunLimits(max_value_bytes=1000)).decide(command, None)
    assert isinstance(out, list) and isinstance(out[-2], StepFailed)
    assert out[-2].error == "map.items of 2061 bytes is over 1000"


def test_a_unit_scheduled_and_succeeded_in_one_decision_is_listed_in_that_order() -> None:
    spec = WorkflowSpec(steps=(step("a", map=MapSpec(items="inputs.xs", max_parallelism=1)),))
    events = start(spec, {"xs": [1, 2]})

    def item(index: int) -> StepTaskOutcome:
        return StepTaskOutcome(
            step_id="a",
            index=index,
            attempt=1,
            task_id=step_task_id(R, "a", index, 1),
            succeeded=True,
            result=index,
        )

    when = given(RUN_DECIDER, *events).when(
        RecordStepTaskOutcomes(run_id=R, outcomes=(item(0), item(1)), at=AT)
    )
    then = when.then(
        succeeded("a", 0, index=0),
        scheduled("a", 1, payload={"item": 2, "index": 1}),
        succeeded("a", 1, index=1),
        StepCompleted(run_id=R, step_id="a", result=[0, 1]),
        WorkflowRunCompleted(run_id=R, result_steps=("a",)),
    )
    assert RUN_DECIDER.fold([*events, *when.outcome]) == then.state  # type: ignore[misc]
