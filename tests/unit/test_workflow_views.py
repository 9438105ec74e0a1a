"""The workflow read-model views, pure: definition and run rows, and step changes merged
over a batch, checked against the run decider's own state for the same events."""

from __future__ import annotations

from typing import Any

from domain import workflow as wf
from domain import workflow_run as wr
from domain.recorded import RecordedEvent
from projections import views
from projections.views import Row, StepChange
from tests.unit.logs import Log, t


def step(sid: str, **fields: Any) -> wf.StepSpec:
    return wf.StepSpec.model_validate({"id": sid, "task_type": "work", **fields})


def drive(
    spec: wf.WorkflowSpec,
    inputs: dict[str, Any],
    *,
    fail: frozenset[str] = frozenset(),
    cancel_after: int | None = None,
) -> tuple[list[RecordedEvent], wr.RunState]:
    """Run the run decider to its end, every task succeeding (with its payload as the
    result) unless its step is in ``fail``; cancel after ``cancel_after`` outcomes."""
    log = Log()
    state: wr.RunState | None = None
    clock = 0.0

    def apply(events: list[wr.RunEvent] | Any) -> None:
        nonlocal state, clock
        assert isinstance(events, list), events
        for e in events:
            clock += 0.01
            log.add("r1", clock, e)
            state = wr.evolve(state, e)

    apply(
        wr.decide(
            wr.StartWorkflowRun(
                at=t(0), run_id="r1", workflow_id="w1", version=1, spec=spec, inputs=inputs
            ),
            None,
        )
    )
    outcomes = 0
    while state is not None and state.status in ("running", "compensating"):
        if cancel_after is not None and outcomes >= cancel_after:
            apply(wr.decide(wr.CancelWorkflowRun(at=t(clock), run_id="r1"), state))
            break
        sid, index, unit = next(
            (sid, i, u)
            for sid, s in state.steps.items()
            if s.status == "running"
            for i, u in sorted(s.units.items())
            if u.status == "scheduled"
        )
        scheduled = next(
            u
            for e in reversed(log.events)
            if isinstance(e.event, wr.StepTasksScheduled)
            for u in e.event.tasks
            if u.task_id == unit.task_id
        )
        ok = sid not in fail
        apply(
            wr.decide(
                wr.RecordStepTaskOutcome(
                    at=t(clock),
                    run_id="r1",
                    step_id=sid,
                    index=index,
                    attempt=unit.attempt,
                    task_id=unit.task_id,
                    succeeded=ok,
                    result=scheduled.payload if ok else None,
                    error=None if ok else "boom",
                ),
                state,
            )
        )
        outcomes += 1
    assert state is not None
    return log.events, state


def project(events: list[RecordedEvent], batch: int) -> tuple[Row, dict[str, Row], int]:
    """Fold the run events as the projector does: run row per event, step changes merged
    per batch of ``batch`` events. Returns (run row, steps rows, step updates written)."""
    run: Row | None = None
    steps: dict[str, Row] = {}
    updates = 0
    for start in range(0, len(events), batch):
        changes: dict[str, StepChange] = {}
        closed_at = None
        for e in events[start : start + batch]:
            after = views.evolve_run(run, e)
            if after is run:
                continue
            run = after
            for row in views.step_rows(e):
                steps[row["step_id"]] = {
                    "items_done": 0,
                    "attempts": 0,
                    "task_ids": [],
                    "result": None,
                    "error": None,
                    "started_at": None,
                    "finished_at": None,
                    "compensating_for": None,
                    **row,
                }
            found = views.step_change(e)
            if found is not None:
                if found[0] in changes:
                    changes[found[0]].absorb(found[1])
                else:
                    changes[found[0]] = found[1]
            if views.closes_run(e):
                closed_at = e.time
        for sid, change in changes.items():
            steps[sid] = change.applied_to(steps[sid])
            updates += 1
        if closed_at is not None:
            steps = views.close_steps(steps, closed_at)
    assert run is not None
    return run, steps, updates


def test_a_map_step_of_a_thousand_items_is_one_row_update_per_batch() -> None:
    spec = wf.WorkflowSpec(
        steps=(
            step("fan", map={"items": "inputs.xs", "max_parallelism": 50}),
            step("sum", depends_on=("fan",), payload_from={"n": "length(steps.fan.result)"}),
        )
    )
    events, state = drive(spec, {"xs": list(range(1000))})
    assert state.status == "completed"
    run, steps, updates = project(events, batch=500)

    # The row names the final steps; the read side fills in their results from the steps.
    assert run["status"] == "completed" and run["result"] == {"sum": None}
    assert {sid: steps[sid]["result"] for sid in run["result"]} == {"sum": {"n": 1000}}
    assert wr.run_result(state) == {"sum": {"n": 1000}}
    fan = steps["fan"]
    assert fan["status"] == "completed"
    assert (fan["items_total"], fan["items_done"], fan["attempts"]) == (1000, 1000, 1)
    assert fan["task_ids"] == [wr.step_task_id("r1", "fan", i, 1) for i in range(1000)]
    assert fan["result"] == [{"item": i, "index": i} for i in range(1000)]
    assert steps["sum"]["items_total"] == 1 and steps["sum"]["items_done"] == 1
    assert views.steps_done(steps) == 2 == run["steps_total"]
    # One outcome per command here, so ~2,000 unit events (a success and the next item
    # scheduled per decision) in 4 batches: a handful of step updates, not one per event.
    assert len(events) > 1900 and updates <= 2 * (len(events) // 500 + 1)


def test_the_steps_read_model_agrees_with_the_run_decider_whatever_the_batches() -> None:
    spec = wf.WorkflowSpec(
        steps=(
            step("a"),
            step("b", depends_on=("a",), when="inputs.go"),
            step("c", depends_on=("b",)),
            step(
                "d",
                depends_on=("a",),
                on_failure="continue",
                retry={"max_attempts": 2, "backoff_base_s": 0},
            ),
            step("e", depends_on=("d",)),
        ),
    )
    events, state = drive(spec, {"go": False}, fail=frozenset({"d"}))
    assert state.status == "completed"
    for batch in (1, 3, 1000):
        run, steps, _ = project(events, batch)
        assert {sid: r["status"] for sid, r in steps.items()} == {
            sid: s.status for sid, s in state.steps.items()
        }
        assert steps["b"]["error"] == "condition is false: inputs.go"
        assert steps["c"]["error"] == "upstream step b was skipped"
        assert steps["d"]["attempts"] == 2 and len(steps["d"]["task_ids"]) == 2
        assert steps["d"]["items_done"] == 0 and "after 2 of 2 attempts" in steps["d"]["error"]
        assert views.steps_done(steps) == 5
        assert run["status"] == "completed" and run["failed_step"] is None


def test_a_compensated_failure_fails_the_run_and_counts_only_main_steps() -> None:
    spec = wf.WorkflowSpec(
        steps=(
            step("pay"),
            step("ship", depends_on=("pay",), on_failure="compensate", compensation="refund"),
            step("mail", depends_on=("ship",)),
        ),
        compensations=(step("refund"),),
    )
    events, state = drive(spec, {}, fail=frozenset({"ship"}))
    run, steps, _ = project(events, 4)
    assert (run["status"], run["failed_step"], run["compensated"]) == ("failed", "ship", True)
    assert steps["refund"]["kind"] == "compensation"
    assert steps["refund"]["compensating_for"] == "ship"
    assert steps["refund"]["status"] == "completed"
    assert steps["mail"]["status"] == "cancelled" == state.steps["mail"].status
    assert steps["mail"]["finished_at"] == run["finished_at"]
    assert views.steps_done(steps) == 3 == run["steps_total"]


def test_a_cancelled_run_cancels_its_unfinished_steps() -> None:
    spec = wf.WorkflowSpec(steps=(step("a"), step("b", depends_on=("a",))))
    events, state = drive(spec, {}, cancel_after=1)
    run, steps, _ = project(events, 2)
    assert run["status"] == "cancelled" and run["error"] == "cancelled by user"
    assert steps["a"]["status"] == "completed"
    assert steps["b"]["status"] == "cancelled" == state.steps["b"].status
    assert steps["b"]["task_ids"] == [wr.step_task_id("r1", "b", 0, 1)]


def test_an_event_at_or_below_the_run_row_version_changes_nothing() -> None:
    events, _ = drive(wf.WorkflowSpec(steps=(step("a"),)), {})
    run: Row | None = None
    for e in events:
        run = views.evolve_run(run, e)
    assert run is not None
    for e in events:
        assert views.evolve_run(run, e) is run


def test_a_pending_run_keeps_its_request_time_when_it_starts() -> None:
    spec = wf.WorkflowSpec(steps=(step("a"),))
    log = Log()
    requested = log.add(
        "w1",
        1,
        wf.WorkflowExecutionRequested(
            workflow_id="w1", run_id="r1", version=3, spec=spec, inputs={"x": 1}
        ),
    )
    pending = views.requested_run(requested)
    assert pending is not None
    assert (pending["status"], pending["aggregate_version"], pending["steps_total"]) == (
        "pending",
        0,
        1,
    )
    started = log.add(
        "r1",
        2,
        wr.WorkflowRunStarted(
            run_id="r1", workflow_id="w1", version=3, spec=spec, inputs={"x": 1}, params={}
        ),
    )
    run = views.evolve_run(pending, started)
    assert run is not None
    assert (run["status"], run["requested_at"], run["started_at"]) == ("running", t(1), t(2))
    assert views.evolve_run(run, started) is run


def test_a_definition_row_tells_its_version_from_its_aggregate_version() -> None:
    spec = wf.WorkflowSpec(steps=(step("a"),))
    spec2 = wf.WorkflowSpec(steps=(step("a"), step("b", depends_on=("a",))))
    log = Log()
    row = None
    for at, e in enumerate(
        [
            wf.WorkflowCreated(workflow_id="w1", name="n", description="d", spec=spec),
            wf.WorkflowExecutionRequested(
                workflow_id="w1", run_id="r1", version=1, spec=spec, inputs={}
            ),
            wf.WorkflowUpdated(workflow_id="w1", version=2, name="n2", description="d", spec=spec2),
            wf.WorkflowArchived(workflow_id="w1"),
        ]
    ):
        row = views.evolve_workflow(row, log.add("w1", at, e))
    assert row is not None
    assert (row["version"], row["aggregate_version"], row["runs"]) == (2, 4, 1)
    assert (row["name"], row["status"]) == ("n2", "archived")
    assert [s["id"] for s in row["spec"]["steps"]] == ["a", "b"]
    assert row["created_at"] == t(0) and row["updated_at"] == t(3)


def test_a_published_template_is_a_row_of_its_own_version() -> None:
    log = Log()
    stored = log.add(
        "tpl",
        0,
        wf.TemplatePublished(
            name="tpl",
            version=2,
            description="d",
            parameters={"n": wf.ParameterSpec(description="how many", default=3, required=False)},
            spec=wf.WorkflowSpec(steps=(step("a"),)),
        ),
    )
    row = views.template_row(stored)
    assert row is not None
    assert (row["name"], row["version"]) == ("tpl", 2)
    assert row["parameters"] == {"n": {"description": "how many", "default": 3, "required": False}}


def test_step_changes_merge_counters_appends_and_last_values() -> None:
    first = StepChange(status="running", items_total=3, started_at=t(1))
    for i in range(3):
        first.absorb(StepChange(attempts=1, task_ids=[f"t{i}"]))
    first.absorb(StepChange(items_done=1))
    first.absorb(StepChange(attempts=2, task_ids=["t0b"]))
    first.absorb(StepChange(items_done=2))
    first.absorb(StepChange(status="completed", has_result=True, result=None, finished_at=t(9)))
    row = first.applied_to(
        {
            "step_id": "s",
            "status": "pending",
            "items_done": 0,
            "attempts": 0,
            "task_ids": ["old"],
            "result": {"x": 1},
        }
    )
    assert row["status"] == "completed" and row["items_total"] == 3
    assert (row["items_done"], row["attempts"]) == (3, 2)
    assert row["task_ids"] == ["old", "t0", "t1", "t2", "t0b"]
    assert row["result"] is None and row["started_at"] == t(1) and row["finished_at"] == t(9)
