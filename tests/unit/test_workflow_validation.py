"""Workflow definitions are validated at creation: every valid DAG is accepted and runs in
an order that respects its dependencies; any back edge is rejected naming the cycle."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.workflow import (
    MapSpec,
    ParameterSpec,
    StepSpec,
    WorkflowSpec,
    bind_parameters,
    check_spec,
    find_cycle,
    referenced_steps,
    topological_order,
)
from domain.workflow_run import (
    RUN_DECIDER,
    RecordStepTaskOutcome,
    RunState,
    StartWorkflowRun,
    StepStarted,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)


def step(sid: str, *deps: str, **extra: Any) -> StepSpec:
    return StepSpec(id=sid, task_type="t", depends_on=deps, **extra)


def problem(*steps: StepSpec, compensations: tuple[StepSpec, ...] = ()) -> tuple[str, str, str]:
    found = check_spec(WorkflowSpec(steps=steps, compensations=compensations))
    assert found is not None, "expected the definition to be rejected"
    return found.code, found.field, found.detail


# -- one rule at a time ---------------------------------------------------------------


def test_a_valid_dag_has_no_problem() -> None:
    spec = WorkflowSpec(
        steps=(
            step("a"),
            step("b", "a", when="steps.a.result.go"),
            step("c", "a", "b", payload_from={"x": "steps.b.result"}, gate="result.ok"),
        )
    )
    assert check_spec(spec) is None


def test_duplicate_step_ids_name_the_second_step() -> None:
    code, field, detail = problem(step("a"), step("b"), step("a"))
    assert (code, field) == ("duplicate_step", "steps[2].id")
    assert "steps[0]" in detail


def test_an_unknown_dependency_names_the_step_and_the_field() -> None:
    code, field, detail = problem(step("a"), step("b", "a", "nope"))
    assert (code, field) == ("unknown_dependency", "steps[1].depends_on")
    assert "'nope'" in detail and "'b'" in detail


def test_a_cycle_is_named_in_execution_order() -> None:
    code, field, detail = problem(step("a", "c"), step("b", "a"), step("c", "b"))
    assert code == "cycle"
    assert detail.endswith("a -> b -> c -> a")
    assert field == "steps[0].depends_on"


def test_a_self_dependency_is_a_cycle_of_one() -> None:
    code, _, detail = problem(step("a", "a"))
    assert code == "cycle" and detail.endswith("a -> a")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"when": "steps.["}, "steps[1].when"),
        ({"gate": "result.ok =="}, "steps[1].gate"),
        ({"payload_from": {"n": "length("}}, "steps[1].payload_from.n"),
        ({"map": MapSpec(items="[?")}, "steps[1].map.items"),
    ],
)
def test_an_invalid_expression_names_its_field(extra: dict[str, Any], field: str) -> None:
    code, got, detail = problem(step("a"), step("b", "a", **extra))
    assert (code, got) == ("invalid_expression", field)
    assert "not valid JMESPath" in detail


def test_an_expression_may_only_read_upstream_steps() -> None:
    code, field, detail = problem(step("a"), step("b", when="steps.a.result"))
    assert (code, field) == ("not_upstream", "steps[1].when")
    assert "steps.a" in detail


def test_an_expression_may_read_a_transitive_upstream_step() -> None:
    spec = WorkflowSpec(steps=(step("a"), step("b", "a"), step("c", "b", when="steps.a.status")))
    assert check_spec(spec) is None


def test_an_unknown_compensation_is_rejected() -> None:
    code, field, _ = problem(step("a", on_failure="compensate", compensation="undo"))
    assert (code, field) == ("unknown_compensation", "steps[0].compensation")


def test_compensate_needs_a_compensation_step() -> None:
    code, field, _ = problem(step("a", on_failure="compensate"))
    assert (code, field) == ("compensation_missing", "steps[0].compensation")


def test_a_compensation_without_the_policy_is_rejected() -> None:
    code, field, _ = problem(step("a", compensation="undo"), compensations=(step("undo"),))
    assert (code, field) == ("compensation_without_policy", "steps[0].on_failure")


def test_a_compensation_step_may_not_depend_on_anything() -> None:
    code, field, _ = problem(
        step("a", on_failure="compensate", compensation="undo"),
        compensations=(step("undo", "a"),),
    )
    assert (code, field) == ("compensation_dependency", "compensations[0]")


def test_a_normal_step_may_not_depend_on_a_compensation_step() -> None:
    code, field, detail = problem(
        step("a", on_failure="compensate", compensation="undo"),
        step("b", "undo"),
        compensations=(step("undo"),),
    )
    assert (code, field) == ("unknown_dependency", "steps[1].depends_on")
    assert "compensation step" in detail


def test_step_ids_must_be_jmespath_identifiers() -> None:
    with pytest.raises(ValueError, match="id"):
        StepSpec(id="has-dash", task_type="t")


def test_referenced_steps_reads_the_ast() -> None:
    assert referenced_steps("steps.a.result && length(steps.b.result[?x]) > `1`") == {"a", "b"}
    assert referenced_steps("inputs.steps") == set()


def test_parameters_bind_over_defaults() -> None:
    declared = {
        "package": ParameterSpec(),
        "top": ParameterSpec(default=10, required=False),
    }
    assert bind_parameters(declared, {"package": "json"}) == {"package": "json", "top": 10}
    missing = bind_parameters(declared, {})
    assert not isinstance(missing, dict) and missing.field == "params.package"
    unknown = bind_parameters(declared, {"package": "json", "zzz": 1})
    assert not isinstance(unknown, dict) and unknown.code == "unknown_parameter"


# -- properties over random DAGs ------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> WorkflowSpec:
    """A random DAG: step i may depend only on steps with a smaller index (so it is
    acyclic), declared in a random order."""
    n = draw(st.integers(min_value=1, max_value=12))
    deps: list[tuple[str, ...]] = []
    for i in range(n):
        chosen = draw(st.sets(st.integers(min_value=0, max_value=max(0, i - 1)), max_size=3))
        deps.append(tuple(f"s{j}" for j in sorted(chosen) if j < i))
    steps = [step(f"s{i}", *deps[i]) for i in range(n)]
    order = draw(st.permutations(range(n)))
    return WorkflowSpec(steps=tuple(steps[i] for i in order))


def ancestors(spec: WorkflowSpec, sid: str) -> set[str]:
    graph = {s.id: s.depends_on for s in spec.steps}
    seen: set[str] = set()
    todo = list(graph[sid])
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(graph[d])
    return seen


@settings(max_examples=150, deadline=None)
@given(spec=dags(), data=st.data())
def test_every_valid_dag_is_accepted_and_runs_in_dependency_order(
    spec: WorkflowSpec, data: st.DataObject
) -> None:
    assert check_spec(spec) is None
    order = topological_order(spec)
    assert all(order.index(d) < order.index(s.id) for s in spec.steps for d in s.depends_on)

    # Run it through the run decider, finishing whichever task hypothesis picks next.
    events = RUN_DECIDER.decide(
        StartWorkflowRun(run_id="r", workflow_id="w", version=1, spec=spec, at=AT), None
    )
    assert isinstance(events, list)
    state: RunState = RUN_DECIDER.fold(events)
    started: list[str] = [e.step_id for e in events if isinstance(e, StepStarted)]
    finished: list[str] = []
    while state.status == "running":
        running = sorted(sid for sid, s in state.steps.items() if s.status == "running")
        assert running, "a running workflow has a running step"
        sid = data.draw(st.sampled_from(running))
        unit = state.steps[sid].units[0]
        outcome = RUN_DECIDER.decide(
            RecordStepTaskOutcome(
                run_id="r",
                step_id=sid,
                index=0,
                attempt=unit.attempt,
                task_id=unit.task_id,
                succeeded=True,
                result={"step": sid},
                at=AT,
            ),
            state,
        )
        assert isinstance(outcome, list)
        finished.append(sid)
        started += [e.step_id for e in outcome if isinstance(e, StepStarted)]
        state = RUN_DECIDER.fold(outcome, state)
    assert state.status == "completed"
    assert sorted(finished) == sorted(s.id for s in spec.steps)
    for sid in started:
        # a step started only once every step it depends on (transitively) had finished
        done_before = set(finished[: finished.index(sid)])
        assert ancestors(spec, sid) <= done_before


@settings(max_examples=150, deadline=None)
@given(spec=dags(), data=st.data())
def test_any_back_edge_is_rejected_naming_a_real_cycle(
    spec: WorkflowSpec, data: st.DataObject
) -> None:
    # pick a step with an ancestor and make the ancestor depend on it: a back edge
    with_ancestors = [s.id for s in spec.steps if ancestors(spec, s.id)]
    sid = data.draw(st.sampled_from(with_ancestors)) if with_ancestors else spec.steps[0].id
    target = data.draw(st.sampled_from(sorted(ancestors(spec, sid)))) if with_ancestors else sid
    steps = tuple(
        s.model_copy(update={"depends_on": s.depends_on + (sid,)}) if s.id == target else s
        for s in spec.steps
    )
    found = check_spec(WorkflowSpec(steps=steps))
    assert found is not None and found.code == "cycle"
    cycle = found.detail.split(": ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1]
    graph = {s.id: s.depends_on for s in steps}
    for before, after in itertools.pairwise(cycle):
        assert before in graph[after], f"{after} does not depend on {before}"
    assert find_cycle(graph) is not None


def test_a_compensation_step_may_not_have_a_condition() -> None:
    code, field, _ = problem(
        step("a", on_failure="compensate", compensation="undo"),
        compensations=(step("undo", when="inputs.x"),),
    )
    assert (code, field) == ("compensation_dependency", "compensations[0]")
