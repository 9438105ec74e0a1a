"""A command a process manager cannot build from its view is reported, not raised: the
plan goes on with the rest, the failure names the command id (which the runner
dead-letters and passes back in ``skip``), and a skipped poison is not built again.

Given what another producer may write (an id longer than a command takes, an agent id
that is not an account id), when the manager plans with a ``failures`` list, then the
others are planned and the poison is in ``failures``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from domain import agent as ag
from domain import workflow as wf
from domain.ids import derived_id
from domain.messages import Event
from domain.recorded import RecordedEvent
from streams import economy, workflow
from streams.scheduler import Policy, plan
from streams.unbuilt import Unbuilt, build
from tests.unit.test_scheduler import Swarm

NOW = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
LONG = "t" * 200  # commands take ids of at most 128 characters


def _stored(aggregate_type: str, aggregate_id: str, event: Event, event_id: str) -> RecordedEvent:
    return RecordedEvent(
        id=event_id,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        version=1,
        time=NOW,
        correlation_id="c",
        causation_id="c",
        event=event,
    )


def test_build_records_the_failure_only_when_given_a_list() -> None:
    failures: list[Unbuilt] = []
    assert build(failures, "c-1", wf.ExecuteWorkflow, workflow_id="w", run_id="", at=NOW) is None
    [failure] = failures
    assert (failure.command_id, failure.command_type) == ("c-1", "ExecuteWorkflow")
    assert failure.reason.startswith("ValidationError") and failure.fields["run_id"] == ""
    with pytest.raises(ValidationError):
        build(None, "c-1", wf.ExecuteWorkflow, workflow_id="w", run_id="", at=NOW)


def test_the_scheduler_assigns_the_others_and_reports_an_assignment_it_cannot_build() -> None:
    swarm = Swarm().agent("a1").task(LONG, at=1).task("ok", at=2)
    poison = derived_id("assign", LONG, 2)

    failures: list[Unbuilt] = []
    planned = plan(swarm.view, NOW, Policy(heartbeat_timeout_s=1e9), failures=failures)

    # The poison held no slot: the one-task agent still gets the next task.
    assert [(p.task_id, p.agent_id) for p in planned] == [("ok", "a1")]
    assert [(f.command_id, f.command_type) for f in failures] == [(poison, "AssignTask")]
    with pytest.raises(ValidationError):
        plan(swarm.view, NOW, Policy(heartbeat_timeout_s=1e9))

    again: list[Unbuilt] = []
    planned = plan(swarm.view, NOW, Policy(heartbeat_timeout_s=1e9), skip={poison}, failures=again)
    assert [p.task_id for p in planned] == ["ok"] and again == []


def test_the_economy_opens_the_other_accounts_and_reports_one_it_cannot_build() -> None:
    view = economy.EconomyView()
    for agent_id in ("bad agent!", "good"):
        economy.apply(
            view,
            _stored(
                "agent",
                agent_id,
                ag.AgentRegistered(
                    agent_id=agent_id,
                    name="x",
                    capabilities=(),
                    max_concurrent_tasks=1,
                    cost_per_task=0,
                ),
                event_id=agent_id,
            ),
        )
    failures: list[Unbuilt] = []
    planned = economy.plan(view, NOW, failures=failures)
    assert [p.command.account_id for p in planned] == ["good"]  # type: ignore[attr-defined]
    [failure] = failures
    assert failure.command_id == derived_id("open-account", "bad agent!")
    assert failure.command_type == "OpenAccount"
    assert economy.plan(view, NOW, skip={failure.command_id}, failures=[]) == planned


def test_the_workflow_engine_starts_the_other_runs_and_reports_one_it_cannot_build() -> None:
    view = workflow.WorkflowView()
    spec = wf.WorkflowSpec(steps=(wf.StepSpec(id="a", task_type="a"),))
    for run_id in (LONG, "run-ok"):
        workflow.apply(
            view,
            _stored(
                "workflow",
                "def-1",
                wf.WorkflowExecutionRequested(
                    run_id=run_id, version=1, spec=spec, inputs={}, workflow_id="def-1"
                ),
                event_id=f"request-{run_id[:8]}",
            ),
        )
    failures: list[Unbuilt] = []
    planned = workflow.plan(view, NOW, failures=failures)
    assert [p.command.run_id for p in planned] == ["run-ok"]  # type: ignore[attr-defined]
    assert [(f.command_id, f.command_type) for f in failures] == [
        (workflow.start_id("request-tttttttt"), "StartWorkflowRun")
    ]
