"""The workflow process manager, pure: given these events, when it plans at time T, then
these commands; and, run against the deciders in memory, the runs it carries through.

``World`` is a command loop with no IO: commands go through the real deciders (with the
processor's rule that a repeated command id writes nothing), their events are logged as
RecordedEvents and folded into the engine's view as they are written (unless ``live`` is
off, for tests that fold the log in another order), and ``settle`` plans and sends until
nothing more is owed. Agents are played by hand: ``finish`` assigns, starts and ends a
task the way the scheduler and an agent would.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.ids import event_id
from domain.messages import Command, Rejection
from domain.recorded import RecordedEvent
from domain.registry import DECIDERS
from streams.workflow import (
    Planned,
    WorkflowView,
    apply,
    cancel_id,
    expire,
    outcome_id,
    plan,
    start_id,
    submit_id,
)

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
T1 = BASE + timedelta(seconds=1)


def t(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def step(sid: str, **kw: Any) -> wf.StepSpec:
    return wf.StepSpec(id=sid, task_type=kw.pop("task_type", "job"), **kw)


class World:
    """The deciders and the workflow process manager, in memory."""

    def __init__(self, live: bool = True) -> None:
        self.view = WorkflowView()
        self.live = live
        self.states: dict[tuple[str, str], Any] = {}
        self.versions: dict[tuple[str, str], int] = defaultdict(int)
        self.decided: set[str] = set()
        self.log: list[RecordedEvent] = []
        self.rejections: list[tuple[Command, Rejection]] = []
        self.n = 0

    def send(self, command: Command, command_id: str | None = None) -> list[RecordedEvent]:
        self.n += 1
        cid = command_id or f"cmd-{self.n}"
        if cid in self.decided:
            return []
        key = (command.aggregate_type, command.aggregate_id)
        decider = DECIDERS[command.aggregate_type]
        result = decider.decide(command, self.states.get(key))
        self.decided.add(cid)
        if isinstance(result, Rejection):
            self.rejections.append((command, result))
            return []
        out = []
        for i, e in enumerate(result):
            self.versions[key] += 1
            self.states[key] = decider.evolve(self.states.get(key), e)
            stored = RecordedEvent(
                id=event_id(cid, i),
                aggregate_type=key[0],
                aggregate_id=key[1],
                version=self.versions[key],
                time=command.at,
                correlation_id=cid,
                causation_id=cid,
                event=e,
            )
            out.append(stored)
            self.log.append(stored)
            if self.live:
                apply(self.view, stored)
        return out

    def run_plan(self, now: datetime) -> list[Planned]:
        """Plan once and send everything planned; return what was planned."""
        planned = plan(self.view, now)
        for p in planned:
            self.send(p.command, p.command_id)
        return planned

    def settle(self, now: datetime, rounds: int = 20) -> int:
        """Plan and send until nothing new is written; the number of commands sent."""
        sent = 0
        for _ in range(rounds):
            before = len(self.log)
            sent += len(self.run_plan(now))
            if len(self.log) == before:
                break
        return sent

    # scenarios ------------------------------------------------------------------------

    def execute(self, spec: wf.WorkflowSpec, run_id: str = "r1", **inputs: Any) -> RecordedEvent:
        """Create workflow ``w1`` (once) and request run ``run_id``; the request event."""
        if ("workflow", "w1") not in self.states:
            self.send(wf.CreateWorkflow(workflow_id="w1", name="w1", spec=spec, at=t(0)))
        [request] = self.send(
            wf.ExecuteWorkflow(workflow_id="w1", run_id=run_id, inputs=inputs, at=t(0))
        )
        return request

    def run(self, run_id: str = "r1") -> wr.RunState:
        return self.states[("workflow_run", run_id)]  # type: ignore[no-any-return]

    def task(self, task_id: str) -> tk.TaskState:
        return self.states[("task", task_id)]  # type: ignore[no-any-return]

    def unit(self, step_id: str, index: int = 0, run_id: str = "r1") -> wr.UnitState:
        return self.run(run_id).steps[step_id].units[index]

    def take(self, task_id: str, agent: str = "a1", at: datetime = T1) -> None:
        """The scheduler assigns the task and the agent starts it."""
        self.send(tk.AssignTask(task_id=task_id, agent_id=agent, at=at))
        self.send(tk.StartTask(task_id=task_id, agent_id=agent, at=at))

    def finish(self, task_id: str, how: str = "complete", at: datetime = T1, **kw: Any) -> None:
        """Take the task and end it: complete, fail, fail_hard, time_out, lose, cancel."""
        if how != "cancel":
            self.take(task_id, at=at)
        command: Command
        match how:
            case "complete":
                command = tk.CompleteTask(task_id=task_id, agent_id="a1", at=at, **kw)
            case "fail" | "fail_hard":
                command = tk.FailTask(
                    task_id=task_id,
                    agent_id="a1",
                    error=kw.get("error", "boom"),
                    retryable=how == "fail",
                    at=at,
                )
            case "time_out":
                command = tk.TimeOutTask(task_id=task_id, agent_id="a1", at=at)
            case "lose":
                command = tk.RequeueTask(
                    task_id=task_id, agent_id="a1", reason="agent_offline", at=at
                )
            case "cancel":
                command = tk.CancelTask(task_id=task_id, reason="by hand", at=at)
            case _:
                raise ValueError(how)
        out = self.send(command)
        assert out, f"{how} of {task_id} was rejected: {self.rejections[-1:]}"


def commands(planned: list[Planned]) -> list[Command]:
    return [p.command for p in planned]


def of(planned: list[Planned], cls: type) -> list[Any]:
    return [p.command for p in planned if isinstance(p.command, cls)]


def empty(view: WorkflowView) -> bool:
    """Nothing held for any run or task, nothing owed."""
    return not (
        view.runs
        or view.tasks
        or view.starts
        or view.submits
        or view.outcomes
        or view.cancels
        or view.limbo
    )


ONE = wf.WorkflowSpec(steps=(step("a", payload={"x": 1}, priority="high", timeout_s=30),))
TWO = wf.WorkflowSpec(
    steps=(step("a"), step("b", depends_on=("a",), payload_from={"got": "steps.a.result"}))
)


# ---------------------------------------------------------------------------------------
# 1. execution request -> start


def test_an_execution_request_starts_the_run_with_the_requested_version_and_inputs() -> None:
    w = World()
    request = w.execute(ONE, n=3)
    [p] = plan(w.view, t(1))
    assert p.command_id == start_id(request.id)
    assert p.command == wr.StartWorkflowRun(
        run_id="r1", workflow_id="w1", version=1, spec=ONE, inputs={"n": 3}, params={}, at=t(1)
    )
    w.send(p.command, p.command_id)
    assert w.run().status == "running"
    assert of(plan(w.view, t(2)), wr.StartWorkflowRun) == []


def test_a_run_started_before_its_request_is_read_is_not_started_again() -> None:
    w = World(live=False)
    w.execute(ONE)
    request = w.log[-1]
    w.send(
        wr.StartWorkflowRun(run_id="r1", workflow_id="w1", version=1, spec=ONE, at=t(0)),
        start_id(request.id),
    )
    view = WorkflowView()
    for stored in [e for e in w.log if e.aggregate_type == "workflow_run"]:
        apply(view, stored)  # the run topic's partition was read first
    for stored in [e for e in w.log if e.aggregate_type == "workflow"]:
        apply(view, stored)
    assert of(plan(view, t(1)), wr.StartWorkflowRun) == []
    assert view.starts == {}


def test_a_second_request_for_an_existing_run_id_plans_no_start() -> None:
    w = World()
    w.execute(ONE)
    w.settle(t(1))
    w.execute(ONE)  # the same run id again: the run's decider would reject it
    assert of(plan(w.view, t(2)), wr.StartWorkflowRun) == []


# ---------------------------------------------------------------------------------------
# 2. scheduled -> submit


def test_a_scheduled_task_is_submitted_with_its_fields_and_a_single_attempt() -> None:
    w = World()
    w.execute(ONE)
    w.run_plan(t(1))  # start
    tid = w.unit("a").task_id
    [p] = plan(w.view, t(2))
    assert p.command_id == submit_id(tid)
    assert p.command == tk.SubmitTask(
        task_id=tid,
        type="job",
        payload={"x": 1},
        required_capabilities=(),
        priority="high",
        run_timeout_s=30,
        max_attempts=1,
        at=t(2),
    )
    w.send(p.command, p.command_id)
    assert plan(w.view, t(3)) == []  # its TaskSubmitted settled it


def test_a_retry_is_submitted_only_once_the_clock_reaches_not_before() -> None:
    spec = wf.WorkflowSpec(
        steps=(step("a", retry=wf.RetryPolicy(max_attempts=2, backoff_base_s=10)),)
    )
    w = World()
    w.execute(spec)
    w.settle(t(1))
    first = w.unit("a").task_id
    w.finish(first, "fail_hard", at=t(2))
    w.settle(t(3))  # the outcome is recorded at t(3); attempt 2 waits for its backoff
    retry = w.unit("a")
    assert retry.attempt == 2
    [scheduled] = [
        u
        for e in w.log
        if isinstance(e.event, wr.StepTasksScheduled)
        for u in e.event.tasks
        if u.attempt == 2
    ]
    not_before = scheduled.not_before
    assert not_before is not None and t(3) + timedelta(seconds=5) <= not_before <= t(13)
    just_before = not_before - timedelta(microseconds=1)
    assert plan(w.view, just_before) == []
    [p] = plan(w.view, not_before)
    assert p.command == tk.SubmitTask(
        task_id=retry.task_id,
        type="job",
        payload={},
        required_capabilities=(),
        priority="normal",
        run_timeout_s=600,
        max_attempts=1,
        at=not_before,
    )


def test_tasks_that_are_not_workflow_tasks_are_ignored() -> None:
    w = World()
    w.send(tk.SubmitTask(task_id="plain", type="job", at=t(0)))
    w.finish("plain")
    assert plan(w.view, t(2)) == [] and empty(w.view)


# ---------------------------------------------------------------------------------------
# 3. task outcomes


@pytest.mark.parametrize(
    ("how", "kw", "succeeded", "result", "error"),
    [
        ("complete", {"result": {"v": 7}}, True, {"v": 7}, None),
        ("fail_hard", {"error": "bad input"}, False, None, "bad input"),
        ("fail", {"error": "flaky"}, False, None, "flaky (dead-lettered: 1 of 1 attempts used)"),
        (
            "time_out",
            {},
            False,
            None,
            "timed out on agent a1 (dead-lettered: 1 of 1 attempts used)",
        ),
        (
            "lose",
            {},
            False,
            None,
            "lost by agent a1 (agent_offline) (dead-lettered: 1 of 1 attempts used)",
        ),
        ("cancel", {}, False, None, "cancelled: by hand"),
    ],
)
def test_each_ending_of_a_task_is_reported_to_its_run(
    how: str, kw: dict[str, Any], succeeded: bool, result: Any, error: str | None
) -> None:
    w = World()
    w.execute(ONE)
    w.settle(t(1))
    tid = w.unit("a").task_id
    w.finish(tid, how, **kw)
    ending = w.log[-1]
    [p] = plan(w.view, t(2))
    assert p.command_id == outcome_id(ending.id)
    assert p.command == wr.RecordStepTaskOutcome(
        run_id="r1",
        step_id="a",
        index=0,
        attempt=1,
        task_id=tid,
        succeeded=succeeded,
        result=result,
        error=error,
        at=t(2),
    )
    w.send(p.command, p.command_id)
    assert w.run().status == ("completed" if succeeded else "failed")
    assert plan(w.view, t(3)) == []  # settled by StepTasksSucceeded / StepTaskFailed
    assert empty(w.view)
    assert w.rejections == []


def test_a_retryable_failure_is_not_an_ending_until_the_dead_letter() -> None:
    w = World()
    w.execute(ONE)
    w.settle(t(1))
    tid = w.unit("a").task_id
    w.finish(tid, "fail", error="flaky")
    failed, dead = w.log[-2], w.log[-1]
    assert isinstance(failed.event, tk.TaskFailed) and isinstance(dead.event, tk.TaskDeadLettered)
    view = WorkflowView()
    for stored in w.log[:-1]:
        apply(view, stored)
    assert plan(view, t(2)) == []  # the TaskFailed alone ends nothing
    apply(view, dead)
    assert [p.command_id for p in plan(view, t(2))] == [outcome_id(dead.id)]


def test_a_sequence_runs_step_after_step_and_passes_results_on() -> None:
    w = World()
    w.execute(TWO)
    w.settle(t(1))
    w.finish(w.unit("a").task_id, result={"v": 1})
    w.settle(t(2))
    b = w.unit("b").task_id
    assert w.task(b).payload == {"got": {"v": 1}}
    w.finish(b, result={"v": 2})
    w.settle(t(3))
    assert w.run().status == "completed" and w.rejections == []
    assert empty(w.view) and w.view.run_ids == {"r1"}


def test_an_outcome_read_by_the_run_before_the_task_ends_is_not_reported_again() -> None:
    # A refold that reads the run topic ahead of the task topic.
    w = World()
    w.execute(TWO)
    w.settle(t(1))
    w.finish(w.unit("a").task_id)
    w.settle(t(2))
    view = WorkflowView()
    runs = [e for e in w.log if e.aggregate_type != "task"]
    for stored in runs + [e for e in w.log if e.aggregate_type == "task"]:
        apply(view, stored)
        # Mid-refold a submit may show (its TaskSubmitted is still to be read; the runner
        # plans only once caught up, and the same id would be dropped), never an outcome.
        assert of(plan(view, t(3)), wr.RecordStepTaskOutcome) == []
    assert plan(view, t(3)) == []


def test_a_task_ending_read_before_its_scheduling_is_reported_once_the_scheduling_is_read() -> None:
    w = World(live=False)
    w.execute(ONE)
    request = w.log[-1]
    apply(w.view, request)
    w.run_plan(t(1))  # start, not folded
    tid = w.unit("a").task_id
    w.send(tk.SubmitTask(task_id=tid, type="job", max_attempts=1, at=t(1)), submit_id(tid))
    w.finish(tid, result={"ok": True})
    for stored in [e for e in w.log if e.aggregate_type == "task"]:
        apply(w.view, stored)  # the task topic read first
    # Nothing to report before the run says what the task is (the start shows: the run
    # topic, with its WorkflowRunStarted, is still to be read).
    assert [type(c) for c in commands(plan(w.view, t(2)))] == [wr.StartWorkflowRun]
    for stored in [e for e in w.log if e.aggregate_type == "workflow_run"]:
        apply(w.view, stored)
    [p] = plan(w.view, t(2))
    assert isinstance(p.command, wr.RecordStepTaskOutcome)
    assert p.command.task_id == tid and p.command.result == {"ok": True}


# ---------------------------------------------------------------------------------------
# 4. cancellation cascade


MAP = wf.WorkflowSpec(
    steps=(
        step("fan", map=wf.MapSpec(items="inputs.items", max_parallelism=3)),
        step("report", depends_on=("fan",), payload_from={"all": "steps.fan.result"}),
    )
)


def test_a_map_item_failing_for_good_cancels_its_siblings_in_flight() -> None:
    w = World()
    w.execute(MAP, items=[1, 2, 3, 4, 5])
    w.settle(t(1))
    units = [w.unit("fan", i).task_id for i in range(3)]
    assert all(("task", u) in w.states for u in units)
    w.take(units[1])
    w.finish(units[0], "fail_hard", error="no")
    planned = plan(w.view, t(2))
    [outcome] = of(planned, wr.RecordStepTaskOutcome)
    w.send(outcome, outcome_id(w.log[-1].id))  # the step fails, then the run
    assert w.run().status == "failed"
    cancels = plan(w.view, t(3))
    assert sorted(p.command_id for p in cancels) == sorted(cancel_id(u) for u in units[1:])
    assert {c.reason for c in of(cancels, tk.CancelTask)} == {"step fan of workflow run r1 failed"}
    w.settle(t(3))
    assert {w.task(u).status for u in units[1:]} == {"cancelled"}
    assert plan(w.view, t(4)) == [] and empty(w.view) and w.rejections == []
    assert len([e for e in w.log if isinstance(e.event, tk.TaskSubmitted)]) == 3


def test_cancelling_a_run_cancels_its_submitted_tasks_and_never_submits_the_rest() -> None:
    spec = wf.WorkflowSpec(
        steps=(
            step("a"),
            step("b"),
            step("c", retry=wf.RetryPolicy(max_attempts=3, backoff_base_s=100)),
        )
    )
    w = World()
    w.execute(spec)
    w.run_plan(t(1))  # start: a, b and c are scheduled
    a, b, c = (w.unit(s).task_id for s in "abc")
    w.send(tk.SubmitTask(task_id=a, type="job", max_attempts=1, at=t(1)), submit_id(a))
    w.send(tk.SubmitTask(task_id=c, type="job", max_attempts=1, at=t(1)), submit_id(c))
    w.finish(c, "fail_hard")
    w.settle(t(2))  # b submitted; c's attempt 2 waits until t(2) + 50..100 s
    c2 = w.unit("c").task_id
    assert c2 != c and ("task", c2) not in w.states
    w.take(a)
    w.send(wr.CancelWorkflowRun(run_id="r1", reason="stop", at=t(3)))
    cancels = plan(w.view, t(500))  # long past c2's not_before: still not submitted
    assert sorted(p.command_id for p in cancels) == sorted([cancel_id(a), cancel_id(b)])
    assert {c.reason for c in of(cancels, tk.CancelTask)} == {"workflow run r1 cancelled"}
    w.settle(t(500))
    assert (w.task(a).status, w.task(b).status) == ("cancelled", "cancelled")
    assert ("task", c2) not in w.states and w.rejections == []
    # c2 was never seen submitted: held for the grace period, in case a submit lands.
    assert set(w.view.tasks) == {c2}
    expire(w.view, t(500), grace_s=60)
    expire(w.view, t(559), grace_s=60)
    assert set(w.view.tasks) == {c2}
    expire(w.view, t(560), grace_s=60)
    assert empty(w.view)


def test_a_submit_that_lands_after_the_run_was_cancelled_is_cancelled() -> None:
    w = World()
    w.execute(ONE)
    w.run_plan(t(1))
    [submit] = plan(w.view, t(1))  # sent ...
    w.send(wr.CancelWorkflowRun(run_id="r1", at=t(1)))  # ... and the run is cancelled first
    assert plan(w.view, t(2)) == []
    expire(w.view, t(2))
    w.send(submit.command, submit.command_id)  # now it lands
    [p] = plan(w.view, t(3))
    assert p.command_id == cancel_id(submit.command.task_id)  # type: ignore[attr-defined]
    w.settle(t(3))
    assert w.task(submit.command.task_id).status == "cancelled"  # type: ignore[attr-defined]
    assert empty(w.view)


def test_a_task_ending_after_its_run_finished_is_not_reported() -> None:
    w = World()
    w.execute(ONE)
    w.settle(t(1))
    tid = w.unit("a").task_id
    w.take(tid)
    w.send(wr.CancelWorkflowRun(run_id="r1", at=t(2)))
    w.send(tk.CompleteTask(task_id=tid, agent_id="a1", at=t(2)))  # before the cancel lands
    assert plan(w.view, t(3)) == []
    assert empty(w.view)


# ---------------------------------------------------------------------------------------
# restart: refolding the log


def whole_run(w: World) -> None:
    """A map of 5 items (parallelism 3) with a retry and a fan-in, carried through."""
    spec = wf.WorkflowSpec(
        steps=(
            step(
                "fan",
                map=wf.MapSpec(items="inputs.items", max_parallelism=3),
                retry=wf.RetryPolicy(max_attempts=2, backoff_base_s=1),
            ),
            step("report", depends_on=("fan",), payload_from={"all": "steps.fan.result"}),
        )
    )
    w.execute(spec, items=[10, 20, 30, 40, 50])
    now = 1.0
    w.settle(t(now))
    failed_once = False
    while w.run().status == "running":
        w.settle(t(now))
        for tid in [e.event.task_id for e in w.log if isinstance(e.event, tk.TaskSubmitted)]:
            if w.task(tid).status == "queued":
                item = w.task(tid).payload.get("item")
                if item == 30 and not failed_once:
                    failed_once = True
                    w.finish(tid, "fail", at=t(now))
                else:
                    w.finish(tid, result={"double": (item or 0) * 2}, at=t(now))
        now += 5
        assert now < 500
    assert w.run().status == "completed", w.run()


def test_a_whole_run_leaves_nothing_held_but_its_id() -> None:
    w = World()
    whole_run(w)
    report = w.run().steps["report"]
    assert report.status == "completed"
    [report_task] = [
        s
        for (k, s) in w.states.items()
        if k[0] == "task" and s.type == "job" and "all" in s.payload
    ]
    assert report_task.payload["all"] == [{"double": x * 2} for x in (10, 20, 30, 40, 50)]
    assert empty(w.view) and w.view.run_ids == {"r1"} and w.rejections == []


@pytest.mark.parametrize("order", ["log", "tasks_first", "runs_first", "interleaved"])
def test_refolding_the_log_in_any_topic_order_owes_nothing(order: str) -> None:
    w = World()
    whole_run(w)
    by_topic: dict[str, list[RecordedEvent]] = defaultdict(list)
    for e in w.log:
        by_topic[e.aggregate_type].append(e)
    if order == "log":
        events = w.log
    elif order == "tasks_first":
        events = by_topic["task"] + by_topic["workflow_run"] + by_topic["workflow"]
    elif order == "runs_first":
        events = by_topic["workflow_run"] + by_topic["workflow"] + by_topic["task"]
    else:
        events = []
        queues = [list(by_topic[k]) for k in ("task", "workflow_run", "workflow")]
        while any(queues):
            for q in queues:
                events += q[:7]
                del q[:7]
    view = WorkflowView()
    for stored in events:
        apply(view, stored)
    assert plan(view, t(1000)) == []
    assert empty(view)


def test_a_refold_mid_run_owes_exactly_what_was_owed_with_the_same_ids() -> None:
    w = World()
    w.execute(MAP, items=[1, 2, 3, 4, 5])
    w.settle(t(1))
    units = [w.unit("fan", i).task_id for i in range(3)]
    w.finish(units[0], result={"r": 1})
    w.finish(units[1], "cancel")
    owed = plan(w.view, t(2))
    view = WorkflowView()
    for stored in sorted(w.log, key=lambda e: e.aggregate_type != "task"):
        apply(view, stored)
    again = plan(view, t(2))
    assert sorted(p.command_id for p in again) == sorted(p.command_id for p in owed)
    # the two outcomes of the run go in one batch, which stands for both single ids
    [batch] = owed
    assert isinstance(batch.command, wr.RecordStepTaskOutcomes)
    assert {o.task_id for o in batch.command.outcomes} == set(units[:2])
    assert len(batch.covers) == 2
    assert plan(w.view, t(2), skip=set(batch.covers)) == []


def test_many_runs_leave_only_their_ids() -> None:
    w = World()
    for i in range(20):
        w.execute(TWO, run_id=f"r{i}")
    w.settle(t(1))
    for _ in range(2):
        for (kind, tid), s in list(w.states.items()):
            if kind == "task" and s.status == "queued":
                w.finish(tid)
        w.settle(t(2))
    assert {w.run(f"r{i}").status for i in range(20)} == {"completed"}
    assert empty(w.view) and len(w.view.run_ids) == 20


def test_an_unclaimed_task_is_dropped_after_the_grace_period() -> None:
    view = WorkflowView()
    w = World(live=False)
    w.send(tk.SubmitTask(task_id="wf-orphan", type="job", at=t(0)))
    for stored in w.log:
        apply(view, stored)
    assert plan(view, t(1)) == [] and set(view.tasks) == {"wf-orphan"}
    expire(view, t(1), grace_s=10)
    expire(view, t(11), grace_s=10)
    assert empty(view)
