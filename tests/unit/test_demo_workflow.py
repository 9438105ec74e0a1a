"""The shipped package-analysis template: valid, and run through the run decider with the
demo's own step handlers it completes with a report that ranks every module."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from demo.analysis import discover_modules
from demo.workflow import TEMPLATE_NAME, discover, handle, load_template, report
from domain.workflow import (
    ParameterSpec,
    WorkflowSpec,
    bind_parameters,
    check_spec,
    evaluate,
    truthy,
)
from domain.workflow_run import (
    RUN_DECIDER,
    RecordStepTaskOutcome,
    RunState,
    StartWorkflowRun,
    StepTasksScheduled,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)


def template() -> tuple[WorkflowSpec, dict[str, ParameterSpec]]:
    body = load_template()
    spec = WorkflowSpec(steps=body["steps"], compensations=body.get("compensations", ()))
    params = {k: ParameterSpec(**v) for k, v in body["parameters"].items()}
    return spec, params


def test_the_shipped_template_is_a_valid_definition() -> None:
    spec, params = template()
    assert load_template()["name"] == TEMPLATE_NAME
    assert check_spec(spec) is None
    assert [s.id for s in spec.steps] == ["discover", "analyse", "report"]
    assert bind_parameters(params, {"packages": ["json"]}) == {"packages": ["json"], "top": 10}


def test_an_unknown_template_is_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        load_template("nope")


def test_discover_rejects_a_bad_payload() -> None:
    with pytest.raises(ValueError, match="packages"):
        discover({"packages": "json"})


def run_to_the_end(state: RunState, events: list[Any]) -> tuple[RunState, int]:
    """Do every scheduled task with the demo's handlers until the run ends."""
    tasks = 0
    while state.status == "running":
        pending = [
            (sid, i, u)
            for sid, s in state.steps.items()
            for i, u in s.units.items()
            if u.status == "scheduled"
        ]
        assert pending, "a running run has scheduled work"
        sid, index, unit = pending[0]
        event, scheduled = next(
            (e, u)
            for e in reversed(events)
            if isinstance(e, StepTasksScheduled)
            for u in e.tasks
            if u.task_id == unit.task_id
        )
        result = handle(event.task_type, scheduled.payload)
        tasks += 1
        out = RUN_DECIDER.decide(
            RecordStepTaskOutcome(
                run_id=state.run_id,
                step_id=sid,
                index=index,
                attempt=unit.attempt,
                task_id=unit.task_id,
                succeeded=True,
                result=result,
                at=AT,
            ),
            state,
        )
        assert isinstance(out, list), out
        events += out
        state = RUN_DECIDER.fold(out, state)
    return state, tasks


def test_the_template_runs_to_a_report_of_every_module() -> None:
    spec, params = template()
    bound = bind_parameters(params, {"packages": ["json"], "top": 3})
    assert isinstance(bound, dict)
    events = RUN_DECIDER.decide(
        StartWorkflowRun(run_id="r", workflow_id="w", version=1, spec=spec, params=bound, at=AT),
        None,
    )
    assert isinstance(events, list)
    state, tasks = run_to_the_end(RUN_DECIDER.fold(events), events)
    modules = discover_modules("json")
    assert state.status == "completed"
    assert tasks == len(modules) + 2
    final = state.steps["report"].result
    assert final["modules_ranked"] == len(modules)
    assert len(final["findings"]) == 3
    assert final["findings"] == sorted(
        final["findings"], key=lambda f: (-f["complexity"], f["module"], f["line"])
    )


def test_the_gate_fails_a_report_that_missed_a_module() -> None:
    spec, _ = template()
    gate = spec.step("report").gate
    assert gate is not None
    discovered = {"modules": [{"name": "a"}, {"name": "b"}]}
    short = report({"results": [{"module": "a", "most_complex": []}], "top": 10})
    context = {"steps": {"discover": {"result": discovered}}, "result": short}
    assert not truthy(evaluate(gate, context))
    full = report({"results": [{"module": m, "most_complex": []} for m in "ab"], "top": 10})
    assert truthy(evaluate(gate, {**context, "result": full}))
