"""The workflow process manager: starts runs, submits their tasks, reports task outcomes
back to the run, and cancels the tasks a finished step or run left behind.

Pure, like streams/economy.py: ``apply`` folds events of the ``workflow``,
``workflow_run`` and ``task`` topics into a ``WorkflowView``, and ``plan(view, now)``
returns every command owed at ``now``. The run's decider (domain/workflow_run.py) owns
the DAG; this only carries out what its events say. It is level-triggered: what is
*due* stays in the view until the event settling it is read, so a restarted runner that
refolds the log sends only what is still owed, with the same command ids as before
(``derived_id`` of what caused it), and the command processor drops a repeat.

What it sends:

1. ``WorkflowExecutionRequested`` -> ``StartWorkflowRun`` (id from the request's event
   id), settled by the run's ``WorkflowRunStarted``.
2. Each task a ``StepTasksScheduled`` lists -> ``SubmitTask`` with ``max_attempts=1``
   (id from the task id) once ``now >= not_before`` (the retry backoff, on the injected
   clock), while the unit is current (its step and run have not finished); settled by
   ``TaskSubmitted``.
3. A workflow task (id starting ``wf-``) that ended -> ``RecordStepTaskOutcome`` (id from
   the ending event's id): ``TaskCompleted`` succeeded with its result;
   ``TaskDeadLettered`` failed with the last failure seen (``TaskFailed``'s error, a
   time-out or a lost agent) and the dead-letter reason; ``TaskFailed`` not retryable
   failed with its error; ``TaskCancelled`` failed with ``cancelled: <reason>``. The
   outcomes of one run owed in one tick go as one ``RecordStepTaskOutcomes`` batch (id
   from the single ids it covers), so a burst of map items costs a few commands. Settled
   by the run's ``StepTasksSucceeded``/``StepTaskFailed`` for that task, or by the unit
   no longer being current (the run would reject it as stale).
4. A step that finished (``StepCompleted``/``StepFailed``) or a run that ended
   (completed, failed, cancelled) while some of its tasks were submitted and had not
   ended -> ``CancelTask`` (id from the task id), settled by the task's end. A task
   scheduled but not submitted by then is never submitted.

Topics are read independently, so a settling event may be read before its cause: a
task's events before its ``StepTasksScheduled`` (kept as an *unclaimed* task until it
arrives), the run's record of an outcome before the task's end, a run's start before
the request. Memory is bounded: a task is forgotten once it has ended and its outcome
is settled, a run once it has finished and its tasks are forgotten. What is kept for
good is each started run's id (so a late or repeated execution request for it is known
answered). Two kinds of entry wait on something that may never come, and ``expire``
drops them ``grace_s`` after it first sees them: an unclaimed task (its run finished
and was forgotten before the task's events were read), and a task of a finished step
that was never seen submitted (a ``SubmitTask`` sent just before the step finished
may still land; then it is cancelled).
"""

from __future__ import annotations

import functools
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.ids import derived_id
from domain.messages import Command
from domain.recorded import RecordedEvent
from streams.unbuilt import Unbuilt, build

# Pending items are planned again on every tick until settled; uuid5 is most of a
# tick's cost under load, so remember the ids (one string per cause).
_id = functools.lru_cache(maxsize=1 << 20)(derived_id)


def start_id(request_event_id: str) -> str:
    """The command id of the ``StartWorkflowRun`` answering an execution request."""
    return _id("workflow", "start-run", request_event_id)


def submit_id(task_id: str) -> str:
    """The command id of the ``SubmitTask`` of a workflow task."""
    return _id("workflow", "submit", task_id)


def outcome_id(ending_event_id: str) -> str:
    """The command id of the ``RecordStepTaskOutcome`` for a task's ending event."""
    return _id("workflow", "step-outcome", ending_event_id)


def cancel_id(task_id: str) -> str:
    """The command id of the ``CancelTask`` of a task left behind."""
    return _id("workflow", "cancel", task_id)


@dataclass(frozen=True)
class Ending:
    """How a task ended: the event that ended it and what to report to the run."""

    event_id: str
    succeeded: bool
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Scheduled:
    """One scheduled task, as a ``StepTasksScheduled`` lists it: what the engine submits
    it with."""

    run_id: str
    step_id: str
    index: int
    attempt: int
    task_id: str
    task_type: str
    payload: dict[str, Any]
    required_capabilities: tuple[str, ...]
    priority: tk.Priority
    run_timeout_s: float
    not_before: datetime | None


def scheduled_tasks(e: wr.StepTasksScheduled) -> list[Scheduled]:
    """The tasks a scheduling event lists, one ``Scheduled`` each."""
    return [
        Scheduled(
            e.run_id,
            e.step_id,
            u.index,
            u.attempt,
            u.task_id,
            e.task_type,
            u.payload,
            e.required_capabilities,
            e.priority,
            e.run_timeout_s,
            u.not_before,
        )
        for u in e.tasks
    ]


@dataclass
class TaskEntry:
    """One workflow task (one attempt of one unit of a step) as the engine sees it.

    ``scheduled`` is None while the task is *unclaimed* (its task events were read before
    its ``StepTasksScheduled``). ``current`` is false once its step or run has finished;
    ``recorded`` once the run has recorded its outcome. ``cause`` is the last failure
    seen on the task (reported if it is dead-lettered); ``since`` is when ``expire``
    first saw it waiting on something that may never come.
    """

    task_id: str
    scheduled: Scheduled | None = None
    submitted: bool = False
    ending: Ending | None = None
    recorded: bool = False
    current: bool = True
    cancel_reason: str = ""
    cause: str | None = None
    since: datetime | None = None


@dataclass
class RunEntry:
    """A started run: whether it has finished, and its tasks the view holds, by step."""

    run_id: str
    finished: bool = False
    tasks: dict[str, set[str]] = field(default_factory=dict)  # step id -> task ids


@dataclass
class WorkflowView:
    """Everything the workflow process manager has folded (see the module docstring).

    ``starts`` are execution requests not yet answered, by run id (value: the request);
    ``submits``, ``outcomes`` and ``cancels`` index the task ids owing each command;
    ``limbo`` the tasks ``expire`` may drop.
    """

    starts: dict[str, RecordedEvent] = field(default_factory=dict)
    run_ids: set[str] = field(default_factory=set)
    runs: dict[str, RunEntry] = field(default_factory=dict)
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    submits: set[str] = field(default_factory=set)
    outcomes: set[str] = field(default_factory=set)
    cancels: set[str] = field(default_factory=set)
    limbo: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Planned:
    """A command to send with its deterministic id (and the version it expects, if any)."""

    command_id: str
    command: Command
    expected_version: int | None = None
    covers: tuple[str, ...] = ()
    """For a batch: the command ids of the single commands it stands for (the runner
    marks them in flight too, so the next tick does not plan them again)."""


def _refresh(view: WorkflowView, t: TaskEntry) -> None:
    """Recompute what ``t`` owes after a change, and forget it when nothing more can be."""
    tid = t.task_id
    for due in (view.submits, view.outcomes, view.cancels, view.limbo):
        due.discard(tid)
    s = t.scheduled
    if s is None:  # unclaimed: its StepTasksScheduled is still to be read, or never will be
        view.limbo.add(tid)
        return
    if t.ending is not None:
        if t.recorded or not t.current:
            _forget_task(view, t, s)
        else:
            view.outcomes.add(tid)
    elif t.recorded:
        pass  # the run saw it end; the task's own end is still to be read
    elif t.current:
        if not t.submitted:
            view.submits.add(tid)
    elif t.submitted:
        view.cancels.add(tid)
    else:
        view.limbo.add(tid)  # a SubmitTask sent just before the step ended may still land
    if tid not in view.limbo:
        t.since = None


def _forget_task(view: WorkflowView, t: TaskEntry, s: Scheduled) -> None:
    view.tasks.pop(t.task_id, None)
    run = view.runs.get(s.run_id)
    if run is None:
        return
    ids = run.tasks.get(s.step_id)
    if ids is not None:
        ids.discard(t.task_id)
        if not ids:
            del run.tasks[s.step_id]
    if run.finished and not run.tasks:
        del view.runs[run.run_id]


def _close(view: WorkflowView, run: RunEntry, step_ids: list[str], reason: str) -> None:
    """Steps ``step_ids`` of ``run`` finished: their tasks are no longer current."""
    for sid in step_ids:
        for tid in list(run.tasks.get(sid, ())):
            t = view.tasks.get(tid)
            if t is not None and t.current:
                t.current = False
                t.cancel_reason = reason
                _refresh(view, t)
    if run.finished and not run.tasks:
        view.runs.pop(run.run_id, None)


def _task(view: WorkflowView, task_id: str, create: bool) -> TaskEntry | None:
    t = view.tasks.get(task_id)
    if t is None and create:
        t = view.tasks[task_id] = TaskEntry(task_id)
    return t


def apply(view: WorkflowView, stored: RecordedEvent) -> None:
    """Fold one stored event into ``view`` (in place; no IO). Events of other aggregates
    and of tasks that are not workflow tasks are ignored."""
    e = stored.event
    if isinstance(e, tk.TaskEvent):
        if e.task_id.startswith(wr.TASK_PREFIX):
            _apply_task(view, stored, e)
    elif isinstance(e, wr.RunEvent):
        _apply_run(view, e)
    elif (
        isinstance(e, wf.WorkflowExecutionRequested)
        and e.run_id not in view.run_ids
        and e.run_id not in view.starts
    ):
        view.starts[e.run_id] = stored


def _apply_run(view: WorkflowView, e: wr.RunEvent) -> None:
    rid = e.run_id
    if isinstance(e, wr.WorkflowRunStarted):
        view.run_ids.add(rid)
        view.starts.pop(rid, None)
        view.runs[rid] = RunEntry(rid)
        return
    run = view.runs.get(rid)
    if run is None or run.finished:
        return
    match e:
        case wr.StepTasksScheduled():
            ids = run.tasks.setdefault(e.step_id, set())
            for s in scheduled_tasks(e):
                t = _task(view, s.task_id, create=True)
                assert t is not None
                t.scheduled = s
                ids.add(s.task_id)
                _refresh(view, t)
        case wr.StepTasksSucceeded():
            for u in e.tasks:
                _recorded(view, u.task_id)
        case wr.StepTaskFailed():
            _recorded(view, e.task_id)
        case wr.StepCompleted() | wr.StepFailed():
            what = "completed" if isinstance(e, wr.StepCompleted) else "failed"
            _close(view, run, [e.step_id], f"step {e.step_id} of workflow run {rid} {what}")
        case wr.WorkflowRunCompleted() | wr.WorkflowRunFailed() | wr.WorkflowRunCancelled():
            run.finished = True
            what = {
                wr.WorkflowRunCompleted: "completed",
                wr.WorkflowRunFailed: "failed",
                wr.WorkflowRunCancelled: "cancelled",
            }[type(e)]
            _close(view, run, list(run.tasks), f"workflow run {rid} {what}")


def _recorded(view: WorkflowView, task_id: str) -> None:
    """The run recorded the outcome of ``task_id``."""
    t = view.tasks.get(task_id)
    if t is not None:
        t.recorded = True
        _refresh(view, t)


def _apply_task(view: WorkflowView, stored: RecordedEvent, e: tk.TaskEvent) -> None:
    # A task's first event is TaskSubmitted: any other event of a task the view does not
    # hold belongs to one it has forgotten (ended and settled, or expired).
    t = _task(view, e.task_id, create=isinstance(e, tk.TaskSubmitted))
    if t is None or t.ending is not None:
        return
    match e:
        case tk.TaskSubmitted():
            t.submitted = True
        case tk.TaskCompleted():
            t.ending = Ending(stored.id, succeeded=True, result=e.result)
        case tk.TaskFailed() if not e.retryable:
            t.ending = Ending(stored.id, succeeded=False, error=e.error)
        case tk.TaskFailed():
            t.cause = e.error  # a retry or a dead letter follows
        case tk.TaskTimedOut():
            t.cause = f"timed out on agent {e.agent_id}"
        case tk.TaskRequeued():
            t.cause = f"lost by agent {e.agent_id} ({e.reason})"
        case tk.TaskDeadLettered():
            error = f"{t.cause} (dead-lettered: {e.reason})" if t.cause else e.reason
            t.ending = Ending(stored.id, succeeded=False, error=error)
        case tk.TaskCancelled():
            t.ending = Ending(stored.id, succeeded=False, error=f"cancelled: {e.reason}")
        case _:
            return
    _refresh(view, t)


def expire(view: WorkflowView, now: datetime, grace_s: float = 60.0) -> list[str]:
    """Forget the entries that have waited ``grace_s`` seconds (since ``expire`` first saw
    them at ``now``) for an event that may never come (see the module docstring); return
    the ids of the tasks forgotten. Call it only on a view that has caught up with the
    log, or a task whose events are merely still to be read could be dropped."""
    dropped: list[str] = []
    for tid in list(view.limbo):
        t = view.tasks[tid]
        if t.since is None:
            t.since = now
        elif (now - t.since).total_seconds() >= grace_s:
            view.limbo.discard(tid)
            dropped.append(tid)
            if t.scheduled is None:
                del view.tasks[tid]
            else:
                _forget_task(view, t, t.scheduled)
    return dropped


def plan(
    view: WorkflowView,
    now: datetime,
    skip: Container[str] = (),
    failures: list[Unbuilt] | None = None,
) -> list[Planned]:
    """Every command the workflow engine owes at ``now`` (see the module docstring), each
    with ``at=now``, except those whose command id is in ``skip`` (sent already and not
    yet due again: the runner passes its in-flight ids). With ``failures`` a list, a
    command that cannot be built is appended to it and left out (streams/unbuilt.py)."""
    out: list[Planned] = []
    for run_id, request in view.starts.items():
        cid = start_id(request.id)
        if cid in skip:
            continue
        r = request.event
        assert isinstance(r, wf.WorkflowExecutionRequested)  # what ``apply`` keeps in starts
        start = build(
            failures,
            cid,
            wr.StartWorkflowRun,
            run_id=run_id,
            workflow_id=r.workflow_id,
            version=r.version,
            spec=r.spec,
            inputs=r.inputs,
            params=r.params,
            at=now,
        )
        if start is not None:
            out.append(Planned(cid, start))
    for tid in view.submits:
        s = view.tasks[tid].scheduled
        assert s is not None
        if (s.not_before is not None and now < s.not_before) or submit_id(tid) in skip:
            continue
        submit = build(
            failures,
            submit_id(tid),
            tk.SubmitTask,
            task_id=tid,
            type=s.task_type,
            payload=s.payload,
            required_capabilities=s.required_capabilities,
            priority=s.priority,
            run_timeout_s=s.run_timeout_s,
            max_attempts=1,
            at=now,
        )
        if submit is not None:
            out.append(Planned(submit_id(tid), submit))
    by_run: dict[str, list[tuple[str, wr.StepTaskOutcome]]] = {}
    for tid in view.outcomes:
        t = view.tasks[tid]
        s, end = t.scheduled, t.ending
        assert s is not None and end is not None
        cid = outcome_id(end.event_id)
        if cid in skip:
            continue
        outcome = build(
            failures,
            cid,
            wr.StepTaskOutcome,
            step_id=s.step_id,
            index=s.index,
            attempt=s.attempt,
            task_id=tid,
            succeeded=end.succeeded,
            result=end.result,
            error=end.error,
        )
        if outcome is not None:
            by_run.setdefault(s.run_id, []).append((cid, outcome))
    for run_id, items in by_run.items():
        out += _outcome_commands(run_id, sorted(items, key=lambda item: item[0]), now, failures)
    for tid in view.cancels:
        if cancel_id(tid) in skip:
            continue
        cancel = build(
            failures,
            cancel_id(tid),
            tk.CancelTask,
            task_id=tid,
            reason=view.tasks[tid].cancel_reason,
            at=now,
        )
        if cancel is not None:
            out.append(Planned(cancel_id(tid), cancel))
    return out


BATCH_OUTCOMES = 200
"""Most outcomes one ``RecordStepTaskOutcomes`` carries."""
BATCH_BYTES = 256 * 1024
"""Most bytes of results one batch carries (a record must stay under Kafka's 1 MiB)."""


def _outcome_commands(
    run_id: str,
    items: list[tuple[str, wr.StepTaskOutcome]],
    now: datetime,
    failures: list[Unbuilt] | None = None,
) -> list[Planned]:
    """The outcomes of one run owed now, as commands: one ``RecordStepTaskOutcome`` for a
    lone outcome (its id from the ending event), else ``RecordStepTaskOutcomes`` batches
    of at most ``BATCH_OUTCOMES`` outcomes and about ``BATCH_BYTES`` of results, each with
    an id derived from the single ids it covers (a replay that batches differently makes
    different ids, which is safe: the run passes over outcomes it has already recorded).
    A batch that cannot be built is a failure of each single id it covers.
    """
    if len(items) == 1:
        cid, o = items[0]
        single = build(
            failures, cid, wr.RecordStepTaskOutcome, run_id=run_id, **o.model_dump(), at=now
        )
        return [] if single is None else [Planned(cid, single)]
    out: list[Planned] = []
    batch: list[tuple[str, wr.StepTaskOutcome]] = []
    size = 0

    def flush() -> None:
        covers = tuple(cid for cid, _ in batch)
        cid = derived_id("workflow", "step-outcomes", *covers)
        tried: list[Unbuilt] = []
        outcomes = build(
            tried if failures is not None else None,
            cid,
            wr.RecordStepTaskOutcomes,
            run_id=run_id,
            outcomes=tuple(o for _, o in batch),
            at=now,
        )
        if outcomes is not None:
            out.append(Planned(cid, outcomes, covers=covers))
        elif failures is not None:
            failures.extend(
                Unbuilt(c, "RecordStepTaskOutcome", o.model_dump(), tried[0].reason)
                for c, o in batch
            )

    for cid, o in items:
        weight = wr.json_size(o.result) if o.result is not None else 0
        if batch and (len(batch) >= BATCH_OUTCOMES or size + weight > BATCH_BYTES):
            flush()
            batch, size = [], 0
        batch.append((cid, o))
        size += weight
    flush()
    return out
