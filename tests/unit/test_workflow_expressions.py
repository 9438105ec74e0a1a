"""No workflow expression stops the command processor (swarmlog issue 8).

An expression is refused at definition when it is too long or nests too deeply (the
parser's and the interpreter's stacks), and is evaluated on a budget of node visits and
of bytes built, so that one that fails or builds too much fails its step with the reason
and the run's decider never raises. The timings asserted are loose guards (< 0.5 s), not
performance targets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from domain import expressions as ex
from domain import workflow as wf
from domain import workflow_run as wr
from domain.messages import Rejection

AT = datetime(2026, 1, 1, tzinfo=UTC)
R = "run-1"

PIPES = "@|" * 999 + "@"
"""The ``when`` of the issue: a tree 1,000 levels deep, under the length limit."""

NOT_NOT = "!" * 1999 + "@"
"""Nests 2,000 deep in the parser itself (``!`` is parsed by recursion)."""


def doubling(stages: int, start: str = "@") -> str:
    """``[x,x]|[@,@]|...``: the JSON written doubles at each of ``stages`` stages."""
    return "|".join([f"[{start},{start}]"] + ["[@,@]"] * (stages - 1))


DOUBLE_22 = doubling(22)
DOUBLE_40 = doubling(40)


def step(sid: str, *deps: str, **extra: Any) -> wf.StepSpec:
    return wf.StepSpec(id=sid, task_type=f"do_{sid}", depends_on=deps, **extra)


def problem_of(*steps: wf.StepSpec, **spec: Any) -> wf.SpecProblem:
    found = wf.check_spec(wf.WorkflowSpec(steps=steps, **spec))
    assert found is not None, "expected the definition to be refused"
    return found


@contextmanager
def quickly(limit_s: float = 0.5) -> Iterator[None]:
    """Assert the block took under ``limit_s`` seconds (a loose guard only)."""
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    assert took < limit_s, f"took {took:.3f} s"


def start(spec: wf.WorkflowSpec, inputs: dict[str, Any] | None = None) -> list[wr.RunEvent]:
    out = wr.decide(
        wr.StartWorkflowRun(
            run_id=R, workflow_id="w", version=1, spec=spec, inputs=inputs or {}, at=AT
        ),
        None,
    )
    assert isinstance(out, list), out
    return out


def failed_step(events: list[wr.RunEvent], sid: str) -> str:
    """The error of step ``sid``'s StepFailed among ``events``."""
    [e] = [e for e in events if isinstance(e, wr.StepFailed) and e.step_id == sid]
    return e.error


# -- at definition -----------------------------------------------------------------------


def test_a_when_of_a_thousand_pipes_is_refused_at_definition_naming_the_field() -> None:
    with quickly():
        p = problem_of(step("a", when=PIPES))
    assert (p.code, p.field) == ("expression_too_deep", "steps[0].when")
    assert "nests 1,000 levels deep; the limit is 40" in p.detail
    rejected = wf.decide_workflow(
        wf.CreateWorkflow(
            workflow_id="w", name="w", spec=wf.WorkflowSpec(steps=(step("a", when=PIPES),)), at=AT
        ),
        None,
    )
    assert isinstance(rejected, Rejection)
    assert (rejected.kind, rejected.code, rejected.field) == (
        "invalid",
        "expression_too_deep",
        "steps[0].when",
    )


def test_an_expression_over_the_length_limit_is_refused_before_it_is_parsed() -> None:
    p = problem_of(step("a", when="a" * 5000))
    assert (p.code, p.field) == ("expression_too_long", "steps[0].when")
    assert p.detail.endswith("when: expression is 5,000 characters; the limit is 2,000")
    # one the parser would overflow on is refused for its length, not parsed
    with quickly():
        p = problem_of(step("a", payload_from={"x": "!" * 50_000 + "@"}))
    assert (p.code, p.field) == ("expression_too_long", "steps[0].payload_from.x")


def test_an_expression_that_overflows_the_parser_is_invalid_not_a_crash() -> None:
    for source in (NOT_NOT, "[" * 999 + "@" + "]" * 999):
        with quickly():
            p = problem_of(step("a", gate=source))
        assert (p.code, p.field) == ("invalid_expression", "steps[0].gate")
        assert "nests too deeply to parse" in p.detail


def test_doubling_forty_times_is_refused_at_definition_and_twenty_two_times_is_not() -> None:
    p = problem_of(step("a", payload_from={"x": DOUBLE_40}))
    assert (p.code, p.field) == ("expression_too_deep", "steps[0].payload_from.x")
    assert wf.check_spec(wf.WorkflowSpec(steps=(step("a", payload_from={"x": DOUBLE_22}),))) is None


def test_every_expression_field_is_bounded_in_steps_and_compensations() -> None:
    deep = "a" + "|a" * 60
    cases: list[tuple[wf.WorkflowSpec, str]] = [
        (wf.WorkflowSpec(steps=(step("a", map=wf.MapSpec(items=deep)),)), "steps[0].map.items"),
        (wf.WorkflowSpec(steps=(step("a"), step("b", "a", gate=deep))), "steps[1].gate"),
        (
            wf.WorkflowSpec(
                steps=(step("a", on_failure="compensate", compensation="undo"),),
                compensations=(step("undo", payload_from={"k": deep}),),
            ),
            "compensations[0].payload_from.k",
        ),
    ]
    for spec, field in cases:
        p = wf.check_spec(spec)
        assert p is not None and (p.code, p.field) == ("expression_too_deep", field)
    published = wf.decide_template(wf.PublishTemplate(name="t", spec=cases[0][0], at=AT), None)
    assert isinstance(published, Rejection) and published.field == "steps[0].map.items"


def test_a_definitions_expressions_are_bounded_together() -> None:
    many = {f"k{i}": "inputs.x" + " " * 1990 for i in range(60)}  # 120,000 characters
    p = problem_of(step("a", payload_from=many))
    assert p.code == "expressions_too_long" and p.field.startswith("steps[0].payload_from.k")


def test_the_demo_template_is_within_the_bounds() -> None:
    path = Path(__file__).resolve().parents[2] / "demo" / "templates" / "package-analysis.json"
    body = json.loads(path.read_text())
    spec = wf.WorkflowSpec(
        steps=tuple(body["steps"]), compensations=tuple(body.get("compensations", ()))
    )
    assert wf.check_spec(spec) is None


# -- at evaluation -----------------------------------------------------------------------


def test_doubling_under_the_definition_bounds_fails_the_step_quickly_with_the_size() -> None:
    spec = wf.WorkflowSpec(steps=(step("a", payload_from={"x": DOUBLE_22}), step("b", "a")))
    assert wf.check_spec(spec) is None
    with quickly():
        events = start(spec, {"n": 1})
    error = failed_step(events, "a")
    assert error.startswith("payload_from.x: expression builds a value of more than 524,288")
    assert isinstance(events[-1], wr.WorkflowRunFailed) and events[-1].step_id == "a"


def test_a_short_doubling_of_a_large_input_fails_the_step_quickly() -> None:
    blob = {"blob": "x" * 100_000}
    spec = wf.WorkflowSpec(
        steps=(
            step("a", payload_from={"x": doubling(4, "inputs.blob")}, on_failure="continue"),
            step(
                "b",
                when=f"length(to_string({doubling(3, 'inputs.blob')})) > `0`",
                on_failure="continue",
            ),
            step("c", map=wf.MapSpec(items=doubling(5, "inputs.blob"))),
        )
    )
    assert wf.check_spec(spec) is None
    with quickly():
        events = start(spec, blob)
    assert "524,288 bytes" in failed_step(events, "a")
    assert failed_step(events, "b").startswith("when: expression ")
    assert failed_step(events, "c").startswith("map.items: expression builds a value")


def test_an_old_definition_with_a_deep_expression_fails_the_step_and_never_raises() -> None:
    # Definitions on the log from before the bounds: the run still must not raise.
    spec = wf.WorkflowSpec(
        steps=(
            step("a", when=PIPES, on_failure="continue"),
            step("b", payload_from={"x": NOT_NOT}, on_failure="continue"),
            step("c", payload_from={"x": "x" * 3000}, on_failure="continue"),
            step("d", gate=PIPES),
        )
    )
    with quickly():
        events = start(spec)
    assert "nests 1,000 levels deep" in failed_step(events, "a")
    assert "nests too deeply" in failed_step(events, "b")
    assert "3,000 characters" in failed_step(events, "c")
    state = wr.RUN_DECIDER.fold(events)
    unit = state.steps["d"].units[0]
    out = wr.decide(
        wr.RecordStepTaskOutcome(
            run_id=R,
            step_id="d",
            index=0,
            attempt=1,
            task_id=unit.task_id,
            succeeded=True,
            result={"ok": True},
            at=AT,
        ),
        state,
    )
    assert isinstance(out, list)
    assert failed_step(out, "d").startswith("gate: expression nests 1,000 levels deep")


def test_too_many_visits_is_an_expression_error() -> None:
    context = {"inputs": {"xs": list(range(30_000))}}
    with pytest.raises(ex.ExpressionError, match="more than 50,000 steps"):
        ex.evaluate("inputs.xs[?@ > `-1`]", context)


def test_evaluations_sharing_a_budget_are_bounded_together() -> None:
    budget = ex.Budget(visits=1000)
    context = {"xs": list(range(400))}
    ex.evaluate("xs[*].a", context, budget)  # 402 visits: the projection, xs, a per element
    ex.evaluate("xs[*].a", context, budget)
    with pytest.raises(ex.ExpressionError, match="evaluated together"):
        ex.evaluate("xs[*].a", context, budget)
    bytes_budget = ex.Budget(work_bytes=10_000)
    with pytest.raises(ex.ExpressionError, match="evaluated together"):
        for _ in range(10):
            ex.evaluate("xs[*]", context, bytes_budget)


def test_writing_out_a_large_input_is_refused_before_it_is_written() -> None:
    context = {"inputs": {"xs": ["y" * 1000] * 2000}}
    with quickly(), pytest.raises(ex.ExpressionError, match="writes a value of more than"):
        ex.evaluate("length(to_string(@))", context)


def test_what_an_expression_gives_is_bounded_and_sized() -> None:
    ctx = {"inputs": {"big": ["z" * 1000] * 600, "small": {"a": [1, 2.5, None, True, "é"]}}}
    with pytest.raises(ex.ExpressionError, match="gives a value of more than 524,288"):
        ex.evaluate("inputs.big", ctx)
    assert ex.holds("inputs.big", ctx)  # a condition is only tested, not weighed
    for source in (
        "inputs.small",
        "inputs.small.a",
        "[inputs.small, inputs.small.a]",
        '{x: inputs.small.a[0], y: `"s"`}',
        "inputs.big[:3]",
    ):
        value, size = ex.evaluate_sized(source, ctx)
        assert size == len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


@pytest.mark.parametrize(
    "source",
    ["ceil(`1e400`)", "length(`1`)", "abs(inputs.blob)", 'sort(`[1, "a"]`)', "a.b["],
)
def test_any_failure_is_an_expression_error_with_a_short_message(source: str) -> None:
    with pytest.raises(ex.ExpressionError) as caught:
        ex.evaluate(source, {"inputs": {"blob": "q" * 100_000}})
    assert 0 < len(str(caught.value)) <= 300


def test_the_value_bound_is_the_record_bound_of_run_events() -> None:
    assert ex.MAX_EXPRESSION_BYTES == wr.MAX_VALUE_BYTES


# -- a run can always finish -------------------------------------------------------------

FIVE = wf.WorkflowSpec(steps=tuple(step(s) for s in "abcde"))


def near_limit(sid: str) -> dict[str, Any]:
    """A task result just under the API's 256 KiB bound."""
    return {"step": sid, "data": "r" * (256 * 1024 - 100)}


def outcome_of(state: wr.RunState, sid: str) -> wr.StepTaskOutcome:
    unit = state.steps[sid].units[0]
    return wr.StepTaskOutcome(
        step_id=sid,
        index=0,
        attempt=1,
        task_id=unit.task_id,
        succeeded=True,
        result=near_limit(sid),
    )


def record_sizes(events: list[wr.RunEvent]) -> list[int]:
    from domain.recorded import RecordedEvent
    from infra.mapper import encode_event

    return [
        len(
            encode_event(
                "t",
                RecordedEvent(
                    id=f"e{i}",
                    aggregate_type=wr.RUN,
                    aggregate_id=R,
                    version=i,
                    time=AT,
                    correlation_id="c",
                    causation_id="c",
                    event=e,
                ),
            ).value
        )
        for i, e in enumerate(events)
    ]


@pytest.mark.parametrize("batched", [False, True])
def test_five_final_steps_near_the_result_limit_complete_in_records_under_1_mib(
    batched: bool,
) -> None:
    events = start(FIVE)
    state = wr.RUN_DECIDER.fold(events)
    decided: list[wr.RunEvent] = []
    if batched:
        out = wr.decide(
            wr.RecordStepTaskOutcomes(
                run_id=R, outcomes=tuple(outcome_of(state, s) for s in "abcde"), at=AT
            ),
            state,
        )
        assert isinstance(out, list)
        decided = out
    else:
        for sid in "abcde":
            o = outcome_of(state, sid)
            out = wr.decide(wr.RecordStepTaskOutcome(run_id=R, **o.model_dump(), at=AT), state)
            assert isinstance(out, list)
            decided += out
            state = wr.RUN_DECIDER.fold(out, state)
    end = decided[-1]
    assert isinstance(end, wr.WorkflowRunCompleted)
    assert end.result_steps == ("a", "b", "c", "d", "e") and end.result is None
    assert max(record_sizes(decided)) < 300 * 1024
    assert record_sizes([end])[0] < 1024
    final = wr.RUN_DECIDER.fold(decided, wr.RUN_DECIDER.fold(events))
    assert final.status == "completed"
    assert wr.run_result(final) == {s: near_limit(s) for s in "abcde"}


def test_a_completed_event_written_before_still_reads_with_its_final_steps() -> None:
    from domain.recorded import RecordedEvent
    from infra.mapper import decode_event, encode_event

    new = wr.WorkflowRunCompleted(run_id=R, result_steps=("b",))
    record = encode_event(
        "t",
        RecordedEvent(
            id="e1",
            aggregate_type=wr.RUN,
            aggregate_id=R,
            version=9,
            time=AT,
            correlation_id="c",
            causation_id="c",
            event=new,
        ),
    )
    old_data = json.dumps({"run_id": R, "result": {"b": 2, "c": None}}).encode()

    class Consumed:
        key = record.key
        value = old_data
        headers = record.headers
        topic, partition, offset = "t", 0, 1

    old = decode_event(Consumed()).event
    assert isinstance(old, wr.WorkflowRunCompleted)
    assert old.final_steps == ("b", "c") and old.result == {"b": 2, "c": None}
    assert new.final_steps == ("b",)
    from projections import views

    assert views.run_result_keys(old) == {"b": None, "c": None}


def test_skipped_and_continued_final_steps_are_null_in_the_result() -> None:
    spec = wf.WorkflowSpec(
        steps=(
            step("a", when="inputs.go"),
            step("b", payload_from={"x": "ceil(`1e400`)"}, on_failure="continue"),
            step("c"),
        )
    )
    events = start(spec, {"go": False})
    state = wr.RUN_DECIDER.fold(events)
    o = outcome_of(state, "c")
    out = wr.decide(wr.RecordStepTaskOutcome(run_id=R, **o.model_dump(), at=AT), state)
    assert isinstance(out, list) and isinstance(out[-1], wr.WorkflowRunCompleted)
    final = wr.RUN_DECIDER.fold(out, state)
    assert wr.run_result(final) == {"a": None, "b": None, "c": near_limit("c")}
