"""The workflow engine against real Kafka: the command processor, the scheduler runner
and the workflow runner in-process, and fake agents that take the scheduler's
assignments from the log and start and end them as each test says.

Runs go sequentially, in parallel, around a false condition, fan out over 100 items
within ``max_parallelism`` and fan back in, retry on the runner's ManualClock only once
the backoff is over, fail on a gate, compensate, and cancel their tasks when cancelled;
and when the streams worker running the engine is killed with SIGKILL mid-run, its
restart finishes the run with no task submitted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.messages import Command
from domain.recorded import RecordedEvent
from infra.bootstrap import build_scheduler, build_workflow
from infra.clock import Clock, ManualClock
from infra.envelope import decode_command
from infra.stack import StackInfo
from infra.topics import Topics
from streams.workflow import Scheduled, scheduled_tasks, submit_id
from streams.workflow_runner import WorkflowRunner
from tests.integration.helpers import (
    EventFollower,
    RoleProcess,
    Running,
    assert_log_is_clean,
    clients,
    envelope,
    now,
    processor_with_client,
    read_events,
    read_outcomes,
    read_records,
    role_env,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 20.0
RUN_END = (wr.WorkflowRunCompleted, wr.WorkflowRunFailed, wr.WorkflowRunCancelled)
TASK_END = (tk.TaskCompleted, tk.TaskDeadLettered, tk.TaskCancelled)

Action = tuple[str, Any]
"""What a fake agent does with an assignment: ("complete", result), ("fail", error),
("fail_hard", error: not retryable), or ("hold", None): start it and wait for release."""


def step(sid: str, **kw: Any) -> wf.StepSpec:
    return wf.StepSpec(id=sid, task_type=kw.pop("task_type", sid), **kw)


class Agents:
    """Fake agents: each TaskAssigned to one of ``ids`` on the log is started and ended
    as ``behaviour(assignment)`` says; held tasks wait for ``release``."""

    def __init__(
        self,
        client: CommandClient,
        log: EventFollower,
        ids: set[str],
        behaviour: Callable[[tk.TaskAssigned], Action],
    ) -> None:
        self.client = client
        self.log = log
        self.ids = ids
        self.behaviour = behaviour
        self.held: dict[str, str] = {}  # task id -> agent id
        self._task = asyncio.create_task(self._follow(), name="agents")

    def _end(self, task_id: str, agent_id: str, action: Action) -> Command | None:
        what, arg = action
        at = now()
        match what:
            case "complete":
                return tk.CompleteTask(task_id=task_id, agent_id=agent_id, result=arg or {}, at=at)
            case "fail" | "fail_hard":
                return tk.FailTask(
                    task_id=task_id, agent_id=agent_id, error=arg, retryable=what == "fail", at=at
                )
        self.held[task_id] = agent_id
        return None

    async def _follow(self) -> None:
        seen = 0
        while True:
            new = self.log.events[seen:]
            seen += len(new)
            commands: list[Command] = []
            for e in new:
                if isinstance(e.event, tk.TaskAssigned) and e.event.agent_id in self.ids:
                    a = e.event
                    commands.append(tk.StartTask(task_id=a.task_id, agent_id=a.agent_id, at=now()))
                    end = self._end(a.task_id, a.agent_id, self.behaviour(a))
                    if end is not None:
                        commands.append(end)
            if commands:  # one task's commands go to one partition, in order
                await self.client.send_many([envelope(c) for c in commands])
            await asyncio.sleep(0.02)

    async def release(self, task_id: str, action: Action) -> None:
        """End a held task as ``action`` says."""
        end = self._end(task_id, self.held.pop(task_id), action)
        assert end is not None
        await self.client.send_many([envelope(end)])

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def completing(assignment: tk.TaskAssigned) -> Action:
    """Complete every task at once, echoing its payload as the result."""
    return ("complete", {"echo": assignment.payload})


def scheduled_units(events: list[RecordedEvent]) -> list[Scheduled]:
    """Every task the run events in ``events`` scheduled, one entry per unit attempt."""
    return [
        s
        for e in events
        if isinstance(e.event, wr.StepTasksScheduled)
        for s in scheduled_tasks(e.event)
    ]


@dataclass
class Flow:
    bootstrap: str
    topics: Topics
    client: CommandClient
    log: EventFollower
    services: StackInfo
    running: list[Running] = field(default_factory=list)
    agents: Agents | None = None
    workflow: WorkflowRunner | None = None

    async def do(self, *commands: Command) -> None:
        """Send commands (in order) and require every one to be accepted."""
        envs = [envelope(c) for c in commands]
        outcomes = await self.client.execute_many(envs, WAIT)
        for env, o in zip(envs, outcomes, strict=True):
            assert o is not None, f"no outcome for {env.command!r}"
            assert o.status == "accepted", f"{env.command!r}: {o.rejection}"

    async def register(
        self, *agent_ids: str, max_concurrent: int = 4, capabilities: tuple[str, ...] = ()
    ) -> None:
        t = now()
        caps = tuple(ag.Capability(name=c, level=1.0) for c in capabilities)
        for a in agent_ids:
            await self.do(
                ag.RegisterAgent(
                    agent_id=a, name=a, capabilities=caps, max_concurrent_tasks=max_concurrent, at=t
                ),
                ag.StartAgent(agent_id=a, at=t),
            )

    async def start(
        self,
        behaviour: Callable[[tk.TaskAssigned], Action] = completing,
        clock: Clock | None = None,
        agents: int = 3,
        runners: bool = True,
    ) -> None:
        """Register ``agents`` agents (4 tasks each) playing ``behaviour``, and (if
        ``runners``) start the scheduler and workflow runners; wait until they lead."""
        ids = {f"ag-{i}" for i in range(agents)}
        await self.register(*sorted(ids))
        self.agents = Agents(self.client, self.log, ids, behaviour)
        if not runners:
            return
        self.workflow = build_workflow(
            clients(
                self.bootstrap,
                self.topics,
                clock=clock,
                scheduler_tick_s=0.05,
                workflow_resend_s=2.0,
            )
        )
        scheduler = build_scheduler(
            clients(self.bootstrap, self.topics, scheduler_tick_s=0.05, heartbeat_timeout_s=3600)
        )
        self.running = [Running(r, r.name) for r in (scheduler, self.workflow)]
        for r in self.running:
            await wait_until(
                lambda r=r: r.check() or r.role.caught_up.is_set(),
                30,  # type: ignore[misc]
                what=f"the {r.task.get_name()} runner to lead",
            )

    async def stop(self) -> None:
        if self.agents is not None:
            await self.agents.stop()
        for r in self.running:
            r.check()
            await r.stop()

    async def execute(self, spec: wf.WorkflowSpec, run_id: str = "run-1", **inputs: Any) -> None:
        """Define workflow ``wf-<run id>`` and ask for run ``run_id`` of it."""
        wid = f"def-{run_id}"
        await self.do(
            wf.CreateWorkflow(workflow_id=wid, name=wid, spec=spec, at=now()),
            wf.ExecuteWorkflow(workflow_id=wid, run_id=run_id, inputs=inputs, at=now()),
        )

    async def ended(self, run_id: str = "run-1", timeout: float = WAIT) -> Any:
        """Wait for the run's end event; return it (the domain event)."""

        def end() -> Any:
            return next(
                (
                    e.event
                    for e in self.log.events
                    if isinstance(e.event, RUN_END) and e.aggregate_id == run_id
                ),
                None,
            )

        return await wait_until(end, timeout, what=f"run {run_id} to end")

    def result(self, run_id: str = "run-1") -> dict[str, Any]:
        """The run's result (its final steps' results), from its events on the log."""
        state: wr.RunState | None = None
        for e in self.log.events:
            if e.aggregate_id == run_id and isinstance(e.event, wr.RunEvent):
                state = wr.evolve(state, e.event)
        assert state is not None, f"no run {run_id}"
        return wr.run_result(state)

    def run_events(self, cls: type, run_id: str = "run-1", **fields: Any) -> list[Any]:
        return [e.event for e in self.log.of(cls, **fields) if e.aggregate_id == run_id]

    def submitted(self, task_type: str | None = None) -> list[RecordedEvent]:
        return [
            e
            for e in self.log.of(tk.TaskSubmitted)
            if task_type is None or e.event.type == task_type
        ]  # type: ignore[attr-defined]

    async def clean_log(self) -> list[RecordedEvent]:
        events = await read_events(self.bootstrap, self.topics)
        assert_log_is_clean(events)
        return events


@pytest.fixture
async def flow(services: StackInfo) -> AsyncIterator[Flow]:
    bootstrap = services.kafka_bootstrap_servers
    async with processor_with_client(bootstrap) as (topics, client, log):
        f = Flow(bootstrap, topics, client, log, services)
        try:
            yield f
        finally:
            await f.stop()


def max_in_flight(events: list[RecordedEvent], task_ids: set[str]) -> int:
    """The most of ``task_ids`` submitted and not yet ended at any instant, from the
    events' times (submit: the engine's clock; end: the agent's; one machine clock).
    An end and a submit at the same instant count the end first."""
    points: list[tuple[datetime, int]] = []
    for e in events:
        if e.aggregate_id not in task_ids:
            continue
        if isinstance(e.event, tk.TaskSubmitted):
            points.append((e.time, 1))
        elif isinstance(e.event, TASK_END):
            points.append((e.time, -1))
    points.sort()
    most = level = 0
    for _, delta in points:
        level += delta
        most = max(most, level)
    assert level == 0, "a task never ended"
    return most


# ---------------------------------------------------------------------------------------


async def test_a_sequence_runs_each_step_after_the_one_before_with_its_result(flow: Flow) -> None:
    await flow.start(lambda a: ("complete", {"n": a.payload.get("n", 0) + 1}))  # type: ignore[union-attr]
    spec = wf.WorkflowSpec(
        steps=(
            step("a", payload={"n": 10}),
            step("b", depends_on=("a",), payload_from={"n": "steps.a.result.n"}),
            step("c", depends_on=("b",), payload_from={"n": "steps.b.result.n"}),
        )
    )
    await flow.execute(spec)
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunCompleted) and flow.result() == {"c": {"n": 13}}
    events = await flow.clean_log()
    submitted = {e.event.type: e for e in events if isinstance(e.event, tk.TaskSubmitted)}
    completed = {
        submitted_type: next(
            x
            for x in events
            if isinstance(x.event, tk.TaskCompleted) and x.aggregate_id == s.aggregate_id
        )
        for submitted_type, s in submitted.items()
    }
    assert sorted(submitted) == ["a", "b", "c"]
    assert submitted["b"].time > completed["a"].time and submitted["c"].time > completed["b"].time
    assert submitted["c"].event.payload == {"n": 12}  # type: ignore[attr-defined]


async def test_independent_steps_are_submitted_together(flow: Flow) -> None:
    await flow.start(
        lambda a: ("hold", None) if a.type == "branch" else ("complete", {"t": a.type})
    )
    spec = wf.WorkflowSpec(
        steps=(
            step("a"),
            step("b", task_type="branch", depends_on=("a",)),
            step("c", task_type="branch", depends_on=("a",)),
            step(
                "d",
                depends_on=("b", "c"),
                payload_from={"seen": "[steps.b.result, steps.c.result]"},
            ),
        )
    )
    await flow.execute(spec)
    # Both branches are out while neither has finished (the agents hold them).
    await wait_until(lambda: len(flow.submitted("branch")) == 2, WAIT, what="both branches out")
    assert flow.agents is not None
    await wait_until(lambda: len(flow.agents.held) == 2, WAIT, what="both branches running")  # type: ignore[union-attr]
    assert flow.run_events(wr.StepCompleted, step_id="b") == []
    for i, tid in enumerate(sorted(flow.agents.held)):
        await flow.agents.release(tid, ("complete", {"branch": i}))
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunCompleted)
    [d] = flow.submitted("d")
    assert sorted(x["branch"] for x in d.event.payload["seen"]) == [0, 1]  # type: ignore[attr-defined]


async def test_a_false_condition_skips_the_step_and_its_dependents(flow: Flow) -> None:
    await flow.start(
        lambda a: ("complete", {"go": False} if a.type == "check" else {"ran": a.type})
    )
    spec = wf.WorkflowSpec(
        steps=(
            step("check"),
            step("deploy", depends_on=("check",), when="steps.check.result.go"),
            step("announce", depends_on=("deploy",)),
            step("notify", depends_on=("check",), when="!(steps.check.result.go)"),
        )
    )
    await flow.execute(spec)
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunCompleted)
    assert flow.result() == {"announce": None, "notify": {"ran": "notify"}}
    assert {s.step_id for s in flow.run_events(wr.StepSkipped)} == {"deploy", "announce"}
    assert sorted(e.event.type for e in flow.submitted()) == ["check", "notify"]  # type: ignore[attr-defined]


async def test_a_map_of_100_items_keeps_to_its_parallelism_and_fans_in(flow: Flow) -> None:
    await flow.start(
        lambda a: (
            "complete",
            {"sq": (a.payload or {})["item"] ** 2}
            if a.type == "fan"
            else {"count": len((a.payload or {})["all"])},
        )
    )
    spec = wf.WorkflowSpec(
        steps=(
            step("fan", map=wf.MapSpec(items="inputs.numbers", max_parallelism=5)),
            step("report", depends_on=("fan",), payload_from={"all": "steps.fan.result"}),
        )
    )
    await flow.execute(spec, numbers=list(range(100)))
    end = await flow.ended(timeout=60)
    assert isinstance(end, wr.WorkflowRunCompleted), end
    assert flow.result() == {"report": {"count": 100}}
    events = await flow.clean_log()
    fan = {s.task_id for s in scheduled_units(events) if s.step_id == "fan"}
    assert len(fan) == 100
    assert Counter(
        e.aggregate_id
        for e in events
        if isinstance(e.event, tk.TaskSubmitted) and e.aggregate_id in fan
    ) == Counter(fan)
    assert max_in_flight(events, fan) == 5
    [report] = [
        e.event
        for e in events
        if isinstance(e.event, tk.TaskSubmitted) and e.event.type == "report"
    ]
    assert report.payload["all"] == [{"sq": i * i} for i in range(100)]


async def test_a_retry_waits_for_its_backoff_on_the_engine_clock(flow: Flow) -> None:
    clock = ManualClock(start=now())
    tries: Counter[str] = Counter()

    def flaky(a: tk.TaskAssigned) -> Action:
        tries[a.type or ""] += 1
        return ("fail_hard", "flaky") if tries[a.type or ""] == 1 else ("complete", {"ok": True})

    await flow.start(flaky, clock=clock)
    policy = wf.RetryPolicy(max_attempts=3, backoff_base_s=30, backoff_max_s=60)
    await flow.execute(wf.WorkflowSpec(steps=(step("fetch", retry=policy),)))
    [failed] = await flow.log.wait_for(wr.StepTaskFailed, step_id="fetch")
    retry_at = failed.event.retry_at  # type: ignore[attr-defined]
    assert retry_at is not None
    assert 15 <= (retry_at - clock.now()).total_seconds() <= 30
    second = wr.step_task_id("run-1", "fetch", 0, 2)
    await wait_until(
        lambda: second in {s.task_id for s in scheduled_units(flow.log.events)},
        20,
        what="the second attempt scheduled",
    )
    await asyncio.sleep(1.0)  # many ticks of the engine: the backoff is not over
    assert flow.log.of(tk.TaskSubmitted, task_id=second) == []
    clock.advance((retry_at - clock.now()).total_seconds())
    [submitted] = await flow.log.wait_for(tk.TaskSubmitted, task_id=second)
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunCompleted) and flow.result() == {"fetch": {"ok": True}}
    assert submitted.time >= retry_at
    assert len(flow.submitted()) == 2


async def test_a_result_that_fails_its_gate_is_retried_then_fails_the_run(flow: Flow) -> None:
    await flow.start(lambda a: ("complete", {"ok": False}))
    policy = wf.RetryPolicy(max_attempts=2, backoff_base_s=0.1)
    await flow.execute(
        wf.WorkflowSpec(
            steps=(
                step("check", gate="result.ok", retry=policy),
                step("after", depends_on=("check",)),
            )
        )
    )
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunFailed) and end.step_id == "check"
    assert "gate failed: result.ok" in end.error and "after 2 of 2 attempts" in end.error
    assert [e.event.type for e in flow.submitted()] == ["check", "check"]  # type: ignore[attr-defined]
    assert [f.attempt for f in flow.run_events(wr.StepTaskFailed)] == [1, 2]


async def test_a_failed_step_runs_its_compensation_and_the_run_fails_compensated(
    flow: Flow,
) -> None:
    await flow.start(
        lambda a: (
            ("fail_hard", "card declined")
            if a.type == "charge"
            else ("complete", {"refunded": True})
        )
    )
    await flow.execute(
        wf.WorkflowSpec(
            steps=(
                step("reserve"),
                step(
                    "charge",
                    depends_on=("reserve",),
                    on_failure="compensate",
                    compensation="refund",
                ),
                step("ship", depends_on=("charge",)),
            ),
            compensations=(step("refund"),),
        )
    )
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunFailed)
    assert (end.step_id, end.compensated) == ("charge", True)
    assert "card declined" in end.error
    assert [e.event.type for e in flow.submitted()] == ["reserve", "charge", "refund"]  # type: ignore[attr-defined]
    [refund] = [s for s in flow.run_events(wr.StepStarted) if s.step_id == "refund"]
    assert refund.compensating_for == "charge"


async def test_cancelling_a_run_cancels_its_running_and_queued_tasks(flow: Flow) -> None:
    await flow.start(lambda a: ("hold", None))
    await flow.register("slow-0", max_concurrent=2, capabilities=("slow",))
    assert flow.agents is not None
    flow.agents.ids.add("slow-0")
    spec = wf.WorkflowSpec(
        steps=(
            step(
                "fan",
                required_capabilities=("slow",),
                map=wf.MapSpec(items="inputs.items", max_parallelism=4),
            ),
        )
    )
    await flow.execute(spec, items=list(range(6)))
    await wait_until(
        lambda: len(flow.agents.held) == 2 and len(flow.submitted()) == 4,  # type: ignore[union-attr]
        WAIT,
        what="2 running and 2 queued",
    )
    await asyncio.sleep(0.3)
    assert len(flow.log.of(tk.TaskAssigned)) == 2  # the agent has 2 slots: 2 wait queued
    await flow.do(wr.CancelWorkflowRun(run_id="run-1", reason="changed my mind", at=now()))
    cancelled = await flow.log.wait_for(tk.TaskCancelled, count=4)
    end = await flow.ended()
    assert isinstance(end, wr.WorkflowRunCancelled) and end.reason == "changed my mind"
    assert {e.aggregate_id for e in cancelled} == {e.aggregate_id for e in flow.submitted()}
    assert {e.event.reason for e in cancelled} == {"workflow run run-1 cancelled"}  # type: ignore[attr-defined]
    await asyncio.sleep(1.0)  # items 4 and 5 were never submitted, and never will be
    assert len(flow.submitted()) == 4
    assert flow.workflow is not None
    assert flow.workflow.view.runs == {} and flow.workflow.view.cancels == set()


async def test_kill_9_of_the_streams_worker_mid_run_finishes_the_run_submitting_each_task_once(
    flow: Flow, tmp_path: Path
) -> None:
    # The worker (scheduler, economy, workflow engine) is a subprocess; agents in here.
    failures: Counter[int] = Counter()

    def every_fourth_fails_once(a: tk.TaskAssigned) -> Action:
        item = (a.payload or {}).get("item")
        if isinstance(item, int) and item % 4 == 0 and not failures[item]:
            failures[item] += 1
            return ("fail", "transient")
        return ("complete", {"item": item})

    await flow.start(every_fourth_fails_once, runners=False)
    env = role_env(
        flow.services,
        flow.topics.prefix,
        SWARMLOG_HEARTBEAT_TIMEOUT_S="3600",
        SWARMLOG_SCHEDULER_TICK_S="0.05",
    )
    worker = RoleProcess("streams", env, tmp_path / "streams-1.log")
    policy = wf.RetryPolicy(max_attempts=2, backoff_base_s=0.2, backoff_max_s=0.5)
    spec = wf.WorkflowSpec(
        steps=(
            step("fan", map=wf.MapSpec(items="inputs.items", max_parallelism=6), retry=policy),
            step("report", depends_on=("fan",), payload_from={"all": "steps.fan.result"}),
        )
    )
    n = 40
    try:
        await flow.execute(spec, items=list(range(n)))
        await wait_until(
            lambda: (
                sum(
                    len(e.event.tasks)  # type: ignore[attr-defined]
                    for e in flow.log.of(wr.StepTasksSucceeded)
                )
                >= 12
            ),
            60,
            what="12 units succeeded",
        )
        assert worker.alive(), worker.output()
        worker.kill9()
        worker = RoleProcess("streams", env, tmp_path / "streams-2.log")
        end = await flow.ended(timeout=75)
        assert worker.alive(), worker.output()
    finally:
        worker.terminate()
    assert isinstance(end, wr.WorkflowRunCompleted), end
    events = await flow.clean_log()
    [report] = [
        e.event
        for e in events
        if isinstance(e.event, tk.TaskSubmitted) and e.event.type == "report"
    ]
    assert report.payload["all"] == [{"item": i} for i in range(n)]
    # Each unit's attempts are the run's task ids, each submitted once, within the policy.
    scheduled = scheduled_units(events)
    submitted = Counter(e.aggregate_id for e in events if isinstance(e.event, tk.TaskSubmitted))
    assert set(submitted) == {s.task_id for s in scheduled}
    assert set(submitted.values()) == {1}
    attempts = Counter((s.step_id, s.index) for s in scheduled)
    assert max(attempts.values()) == 2 and len(attempts) == n + 1
    assert {(s.step_id, s.index) for s in scheduled if s.attempt == 2} == {
        ("fan", i) for i in range(0, n, 4)
    }
    # Every SubmitTask on the command topic carries its task's one id; none of the
    # engine's commands was refused (a resend of a decided one is a duplicate, not a
    # rejection).
    for record in await read_records(flow.bootstrap, flow.topics.commands):
        command = decode_command(record)
        if isinstance(command.command, tk.SubmitTask):
            assert command.command_id == submit_id(command.command.task_id)
    engine = {"StartWorkflowRun", "SubmitTask", "RecordStepTaskOutcome"}
    refused = [
        o
        for o in await read_outcomes(flow.bootstrap, flow.topics)
        if o.command_type in engine and o.status != "accepted"
    ]
    assert refused == [], refused[:3]
