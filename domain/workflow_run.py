"""The WorkflowRun aggregate: one execution of a workflow definition, step by step.

The run's decider owns the DAG's logic: it is handed what happened to a step's task
(``RecordStepTaskOutcome``, sent by the workflow process manager when the task ends)
and decides, in one atomic list of events, what follows: the attempt's success or
failure (a gate is checked here), a retry after backoff, the step's completion (a map
step's once every item is done, its result the items' results in order), the steps that
became ready (or are skipped: ``when`` false, or a dependency skipped), compensation,
and the run's completion or failure. The process manager (streams/workflow.py) only
carries out what the events say: it submits each task ``StepTasksScheduled`` lists once
``not_before`` has passed, reports task outcomes back, and cancels the tasks a finished
step or run left behind.

Every unit of work is a *task* of a step: a plain step has one (index 0), a map step one
per item. Attempt ``n`` of unit ``i`` of step ``s`` of run ``r`` is the task
``wf-<uuid5(r/s/i/n)>``: deterministic, so the engine's submissions are idempotent and a
replayed event never submits twice. A step's task is tried at most its retry policy's
``max_attempts`` times (the task itself is submitted with ``max_attempts=1``, so the
task aggregate never retries on its own: the workflow's policy is the only one).

Step lifecycle::

    pending -> running -> completed | failed           (when false / upstream skipped:
    pending -> skipped                                  skipped; run ended: cancelled)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ClassVar, Literal

from pydantic import Field

from domain.backoff import backoff_seconds
from domain.expressions import (
    MAX_EXPRESSION_BYTES,
    Budget,
    ExpressionError,
    evaluate,
    evaluate_sized,
    holds,
)
from domain.messages import Command, Decider, Event, Message, Rejection, rejected
from domain.task import DEFAULT_CANCEL_REASON, CancelReason, Priority
from domain.workflow import StepSpec, WorkflowSpec

RUN = "workflow_run"

TASK_NAMESPACE = uuid.UUID("5b0c6e0e-3f7e-4f0b-9c44-9a1f6f7c2d10")
"""The uuid5 namespace of workflow task ids."""

TASK_PREFIX = "wf-"
"""Every workflow task id starts with this (the engine tells them from other tasks)."""

RunStatus = Literal["running", "compensating", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "running", "completed", "failed", "skipped", "cancelled"]
UnitStatus = Literal["scheduled", "succeeded", "failed"]
RUN_TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
STEP_FINISHED: frozenset[str] = frozenset({"completed", "failed", "skipped", "cancelled"})


MAX_VALUE_BYTES = MAX_EXPRESSION_BYTES
"""The most bytes (as compact JSON) one value a run carries may take unless its decider
is given another bound (``RunLimits``): a map's item list, a task's payload, a map
step's results. Later steps read these values through expressions, so by default they
are held to what an expression may build (domain/expressions.py). A step whose value
is larger fails, naming the size."""


@dataclass(frozen=True)
class RunLimits:
    """The bounds a run's decisions hold values to, set by the decider's caller.

    ``max_value_bytes``: the most bytes (compact JSON) of one item list, task payload or
    map step's results; over it the step fails. ``run_decider(limits)`` binds it;
    ``RUN_DECIDER`` (what the command processor runs) has ``DEFAULT_LIMITS``, whatever
    ``SWARMLOG_RECORD_MAX_BYTES`` is: the processor packs events to its record limit
    (``pack``), and a value over that limit is refused there as ``too_large``."""

    max_value_bytes: int = MAX_VALUE_BYTES


DEFAULT_LIMITS = RunLimits()
"""The limits of ``RUN_DECIDER``."""


UNIT_OVERHEAD_BYTES = 160
"""What one listed unit takes as JSON besides its payload or result (ids, attempt...):
``pack`` counts a unit as this plus its payload's or result's size."""


def json_size(value: Any) -> int:
    """The size in bytes of ``value`` as compact JSON (non-JSON values as their str)."""
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def step_task_id(run_id: str, step_id: str, index: int, attempt: int) -> str:
    """The task id of attempt ``attempt`` (1-based) of unit ``index`` of a step."""
    return TASK_PREFIX + str(uuid.uuid5(TASK_NAMESPACE, f"{run_id}/{step_id}/{index}/{attempt}"))


# ---------------------------------------------------------------------------------------
# Commands


class RunCommand(Command):
    """A command addressed to one run, keyed by ``run_id``."""

    aggregate_type: ClassVar[str] = RUN
    id_field: ClassVar[str] = "run_id"
    run_id: str = Field(min_length=1, max_length=128)


class StartWorkflowRun(RunCommand):
    """Start a run of ``workflow_id`` at ``version`` (``spec`` is that version, whole)."""

    workflow_id: str
    version: int
    spec: WorkflowSpec
    inputs: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class RecordStepTaskOutcome(RunCommand):
    """A step's task ended: ``succeeded`` with ``result``, or not, with ``error``."""

    step_id: str
    index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    task_id: str
    succeeded: bool
    result: Any = None
    error: str | None = None


class StepTaskOutcome(Message):
    """One step task's end, as ``RecordStepTaskOutcomes`` carries it (the fields of
    ``RecordStepTaskOutcome`` without the run)."""

    step_id: str
    index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    task_id: str
    succeeded: bool
    result: Any = None
    error: str | None = None


class RecordStepTaskOutcomes(RunCommand):
    """Several step tasks of one run ended: each is recorded as ``RecordStepTaskOutcome``
    would be, in order, in one decision (the engine batches the outcomes it has read in
    one tick, so a 1,000-item map costs tens of commands, not 1,000). Outcomes that are
    no longer current are passed over; if none is current the command is rejected."""

    outcomes: tuple[StepTaskOutcome, ...] = Field(min_length=1, max_length=1000)


class CancelWorkflowRun(RunCommand):
    """Cancel the run: no further step starts; the engine cancels its unfinished tasks."""

    reason: CancelReason = DEFAULT_CANCEL_REASON


# ---------------------------------------------------------------------------------------
# Events


class RunEvent(Event):
    """An event of one run."""

    aggregate_type: ClassVar[str] = RUN
    run_id: str


class WorkflowRunStarted(RunEvent):
    """The run started, on ``spec`` (version ``version`` of ``workflow_id``)."""

    event_type: ClassVar[str] = "started"
    workflow_id: str
    version: int
    spec: WorkflowSpec
    inputs: dict[str, Any]
    params: dict[str, Any]


class StepStarted(RunEvent):
    """The step became ready and started; ``items`` is a map step's list of items (the
    value of its ``map.items`` expression; None for a plain step or when that was not a
    list).

    ``compensating_for`` names the failed step a compensation step runs for."""

    event_type: ClassVar[str] = "step_started"
    step_id: str
    items: list[Any] | None = None
    compensating_for: str | None = None


class ScheduledTask(Message):
    """One unit's task as ``StepTasksScheduled`` lists it: attempt ``attempt`` of unit
    ``index`` is to run as task ``task_id``, not before ``not_before`` (None: now)."""

    index: int
    attempt: int
    task_id: str
    payload: dict[str, Any]
    not_before: datetime | None = None


class StepTasksScheduled(RunEvent):
    """Tasks of a step are to run, one per listed unit. The engine submits each with its
    unit's fields and the step's ``task_type``, ``required_capabilities``, ``priority``
    and ``run_timeout_s`` (the same for every unit of a step, so given once).

    One decision emits one such event per step (a 1,000-item map's start: one event,
    not 1,000); ``pack`` cuts it into several of the same step, in order, where the
    caller's store takes less in one event."""

    event_type: ClassVar[str] = "step_tasks_scheduled"
    step_id: str
    task_type: str
    required_capabilities: tuple[str, ...]
    priority: Priority
    run_timeout_s: float
    tasks: tuple[ScheduledTask, ...]


class SucceededTask(Message):
    """One unit's success as ``StepTasksSucceeded`` lists it."""

    index: int
    attempt: int
    task_id: str
    result: Any


class StepTasksSucceeded(RunEvent):
    """The listed units' tasks succeeded, each with its ``result`` (and passed the gate,
    for a plain step). One per step per decision, packed like ``StepTasksScheduled``."""

    event_type: ClassVar[str] = "step_tasks_succeeded"
    step_id: str
    tasks: tuple[SucceededTask, ...]


class StepTaskFailed(RunEvent):
    """The unit's task failed (or its result failed the gate); retried at ``retry_at``
    when set, else the unit has used every attempt."""

    event_type: ClassVar[str] = "step_task_failed"
    step_id: str
    index: int
    attempt: int
    task_id: str
    error: str
    retry_at: datetime | None = None


class StepCompleted(RunEvent):
    """The step completed with ``result`` (a map step's: the list of its items' results)."""

    event_type: ClassVar[str] = "step_completed"
    step_id: str
    result: Any


class StepFailed(RunEvent):
    """The step failed for good (``error``); its ``on_failure`` policy applies next."""

    event_type: ClassVar[str] = "step_failed"
    step_id: str
    error: str


class StepSkipped(RunEvent):
    """The step will not run (its condition was false, or an upstream step was skipped)."""

    event_type: ClassVar[str] = "step_skipped"
    step_id: str
    reason: str


class WorkflowRunCompleted(RunEvent):
    """Every step finished. The run's result is ``{step id: its result}`` over its final
    steps (those no step depends on), which ``result_steps`` names: their results are on
    the log already, in their ``StepCompleted`` events (null for a final step that was
    skipped, or failed with ``on_failure`` ``continue``), and ``run_result`` assembles it
    from the run's state. The event refers to them rather than copying them, so it stays
    small however large they are (five final steps near the value limit would not fit in
    one event as the store takes it, and the run could never finish).

    ``result`` is what events written before this carried instead (the results
    themselves; None in events written now): read ``final_steps``,
    which is right for both."""

    event_type: ClassVar[str] = "completed"
    result_steps: tuple[str, ...] = ()
    result: dict[str, Any] | None = None

    @property
    def final_steps(self) -> tuple[str, ...]:
        """The ids of the steps whose results make the run's result, in order."""
        return self.result_steps or tuple(self.result or ())


class WorkflowRunFailed(RunEvent):
    """The run failed because ``step_id`` failed; ``compensated`` if its compensation ran
    successfully."""

    event_type: ClassVar[str] = "failed"
    step_id: str
    error: str
    compensated: bool = False


class WorkflowRunCancelled(RunEvent):
    """The run was cancelled."""

    event_type: ClassVar[str] = "cancelled"
    reason: str


# ---------------------------------------------------------------------------------------
# State


class UnitState(Message):
    """One unit of a step (the step's single task, or one map item): its current attempt."""

    attempt: int
    task_id: str
    status: UnitStatus
    result: Any = None
    error: str | None = None


class StepState(Message):
    """One step of a run. ``items`` is a map step's item list (evaluated at start)."""

    status: StepStatus = "pending"
    units: dict[int, UnitState] = Field(default_factory=dict)
    items: list[Any] | None = None
    succeeded: int = 0
    result: Any = None
    error: str | None = None
    compensating_for: str | None = None


class RunState(Message):
    """The write-side state of one run."""

    run_id: str
    workflow_id: str
    version: int
    spec: WorkflowSpec
    inputs: dict[str, Any]
    params: dict[str, Any]
    status: RunStatus = "running"
    steps: dict[str, StepState]


def evolve(state: RunState | None, event: RunEvent) -> RunState | None:
    """Apply a run event; never raises, never checks rules."""
    if isinstance(event, WorkflowRunStarted):
        return _apply(None, event)
    return None if state is None else _apply(state, event)


def _apply(state: RunState | None, event: RunEvent) -> RunState | None:
    """``evolve`` of a started run (of any state, for ``WorkflowRunStarted``)."""
    if isinstance(event, WorkflowRunStarted):
        return RunState(
            run_id=event.run_id,
            workflow_id=event.workflow_id,
            version=event.version,
            spec=event.spec,
            inputs=event.inputs,
            params=event.params,
            steps={s.id: StepState() for s in event.spec.steps + event.spec.compensations},
        )
    if state is None:
        return None

    def step(sid: str, **update: Any) -> RunState:
        current = state.steps.get(sid, StepState())
        return state.model_copy(
            update={"steps": {**state.steps, sid: current.model_copy(update=update)}}
        )

    def unit(sid: str, index: int, **update: Any) -> RunState:
        current = state.steps.get(sid, StepState())
        units = dict(current.units)
        if index not in units:
            return state
        units[index] = units[index].model_copy(update=update)
        extra = {"succeeded": current.succeeded + 1} if update.get("status") == "succeeded" else {}
        return step(sid, units=units, **extra)

    match event:
        case StepStarted():
            new = step(
                event.step_id,
                status="running",
                items=event.items,
                compensating_for=event.compensating_for,
            )
            if event.compensating_for is not None:
                new = new.model_copy(update={"status": "compensating"})
            return new
        case StepTasksScheduled():
            return _scheduled(state, event.step_id, event.tasks)
        case StepTasksSucceeded():
            return _succeeded(state, event.step_id, event.tasks)
        case StepTaskFailed():
            return unit(event.step_id, event.index, status="failed", error=event.error)
        case StepCompleted():
            return step(event.step_id, status="completed", result=event.result)
        case StepFailed():
            return step(event.step_id, status="failed", error=event.error)
        case StepSkipped():
            return step(event.step_id, status="skipped")
        case WorkflowRunCompleted():
            return state.model_copy(update={"status": "completed"})
        case WorkflowRunFailed():
            return _close(state, "failed")
        case WorkflowRunCancelled():
            return _close(state, "cancelled")
    return state


def _scheduled(state: RunState, sid: str, tasks: tuple[ScheduledTask, ...]) -> RunState:
    """``state`` with ``tasks`` of step ``sid`` scheduled (each its unit's current attempt)."""
    current = state.steps.get(sid, StepState())
    units = dict(current.units)
    for t in tasks:
        units[t.index] = UnitState(attempt=t.attempt, task_id=t.task_id, status="scheduled")
    return state.model_copy(
        update={"steps": {**state.steps, sid: current.model_copy(update={"units": units})}}
    )


def _succeeded(state: RunState, sid: str, tasks: tuple[SucceededTask, ...]) -> RunState:
    """``state`` with ``tasks`` of step ``sid`` succeeded (units it does not hold ignored)."""
    current = state.steps.get(sid, StepState())
    units = dict(current.units)
    done = 0
    for t in tasks:
        u = units.get(t.index)
        if u is None:
            continue
        units[t.index] = u.model_copy(update={"status": "succeeded", "result": t.result})
        done += 1
    if not done:
        return state
    step = current.model_copy(update={"units": units, "succeeded": current.succeeded + done})
    return state.model_copy(update={"steps": {**state.steps, sid: step}})


def _close(state: RunState, status: RunStatus) -> RunState:
    """The run ended: steps still pending or running are cancelled."""
    steps = {
        sid: s if s.status in STEP_FINISHED else s.model_copy(update={"status": "cancelled"})
        for sid, s in state.steps.items()
    }
    return state.model_copy(update={"status": status, "steps": steps})


def pack(events: Sequence[RunEvent], max_event_bytes: int) -> list[RunEvent]:
    """``events`` with each ``StepTasksScheduled``/``StepTasksSucceeded`` cut into
    consecutive events of the same step, each listing units of at most about
    ``max_event_bytes`` of JSON (a unit counts ``UNIT_OVERHEAD_BYTES`` plus the size of
    its payload or result; a unit larger than that alone is an event of its own).

    The events fold to the same state as ``events`` (``evolve`` applies a list of units
    one unit at a time, so listing them in several consecutive events changes nothing).
    The caller passes what its store takes in one event: the command processor applies
    it (``Decider.pack``) with a share of its record limit."""
    out: list[RunEvent] = []
    for event in events:
        if not isinstance(event, StepTasksScheduled | StepTasksSucceeded):
            out.append(event)
            continue
        chunks: list[tuple[ScheduledTask | SucceededTask, ...]] = []
        chunk: list[ScheduledTask | SucceededTask] = []
        size = 0
        for task in event.tasks:
            value = task.payload if isinstance(task, ScheduledTask) else task.result
            weight = UNIT_OVERHEAD_BYTES + json_size(value)
            if chunk and size + weight > max_event_bytes:
                chunks.append(tuple(chunk))
                chunk, size = [], 0
            chunk.append(task)
            size += weight
        if not chunks:
            out.append(event)
            continue
        chunks.append(tuple(chunk))
        out.extend(event.model_copy(update={"tasks": c}) for c in chunks)
    return out


# ---------------------------------------------------------------------------------------
# Deciding


class _Batch:
    """A ``StepTasksScheduled`` or ``StepTasksSucceeded`` a decision is still adding
    units to (it becomes the event when the decision's events are read)."""

    def __init__(
        self,
        kind: type[StepTasksScheduled | StepTasksSucceeded],
        step_id: str,
        common: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.step_id = step_id
        self.common = common
        self.tasks: list[ScheduledTask | SucceededTask] = []
        self.indexes: set[int] = set()

    def event(self) -> RunEvent:
        """The event this batch became."""
        fields = {"step_id": self.step_id, "tasks": tuple(self.tasks), **self.common}
        return self.kind.model_validate(fields)


class _Decision:
    """Events decided so far, each folded into ``state`` as it is emitted.

    Unit events are batched: a unit scheduled or succeeded joins the step's open
    ``StepTasksScheduled``/``StepTasksSucceeded`` of this decision (one of each per step
    is open at a time), so a decision over many outcomes of a map emits a couple of events,
    not two per item (how many bytes one event may take is the caller's concern:
    ``pack``). Any other event closes every open batch (the events after it start new
    ones), so the order the log gives is the order they were decided in, except that
    units of the two kinds of one step may be listed in an earlier batch than they were
    decided: they are different units (a unit is only scheduled anew after a
    ``StepTaskFailed``, which closes the batches), and a unit scheduled in this decision
    never succeeds in a batch listed before it (``unit`` checks).
    """

    def __init__(self, state: RunState, at: datetime, limits: RunLimits) -> None:
        self.state = state
        self.at = at
        self.limits = limits
        # One budget for every expression this decision evaluates (domain/expressions.py).
        self.budget = Budget()
        self._events: list[RunEvent | _Batch] = []
        self._open: dict[tuple[type[RunEvent], str], tuple[int, _Batch]] = {}

    @property
    def events(self) -> list[RunEvent]:
        """The events decided, in order."""
        return [e.event() if isinstance(e, _Batch) else e for e in self._events]

    def emit(self, event: RunEvent) -> None:
        """Append ``event`` (closing the open batches) and fold it into ``state``."""
        self._open.clear()
        self._events.append(event)
        self.state = _apply(self.state, event) or self.state

    def unit(
        self,
        kind: type[StepTasksScheduled | StepTasksSucceeded],
        step_id: str,
        task: ScheduledTask | SucceededTask,
        common: dict[str, Any],
    ) -> None:
        """Add ``task`` to the step's open batch of ``kind``, or to a new one (when the
        step's open batch of the other kind, opened after it, lists the same unit); fold
        it into ``state``."""
        key = (kind, step_id)
        opened = self._open.get(key)
        if opened is not None:
            position, batch = opened
            other = next(
                (
                    (p, b)
                    for (k, sid), (p, b) in self._open.items()
                    if sid == step_id and k is not kind
                ),
                None,
            )
            if other is not None and other[0] > position and task.index in other[1].indexes:
                opened = None
        if opened is None:
            batch = _Batch(kind, step_id, common)
            self._open[key] = (len(self._events), batch)
            self._events.append(batch)
        batch.tasks.append(task)
        batch.indexes.add(task.index)
        if isinstance(task, ScheduledTask):
            self.state = _scheduled(self.state, step_id, (task,))
        else:
            self.state = _succeeded(self.state, step_id, (task,))

    def running(self) -> bool:
        """Whether the run, as decided so far, is still running (neither compensating nor
        over)."""
        return self.state.status == "running"

    # -- context ------------------------------------------------------------------

    def context(self, **extra: Any) -> dict[str, Any]:
        steps = {
            sid: {"status": s.status, "result": s.result, "error": s.error}
            for sid, s in self.state.steps.items()
            if s.status in ("completed", "failed", "skipped")
        }
        return {
            "inputs": self.state.inputs,
            "params": self.state.params,
            "steps": steps,
            **extra,
        }

    # -- scheduling ---------------------------------------------------------------

    def schedule(
        self, spec: StepSpec, index: int, attempt: int, not_before: datetime | None
    ) -> bool:
        """Emit the unit's task; False (and the step failed) if its payload cannot be built."""
        extra: dict[str, Any] = {}
        if spec.map is not None:
            items = self.state.steps[spec.id].items or []
            extra = {"item": items[index], "index": index}
        payload = dict(spec.payload)
        if spec.map is not None:
            payload.setdefault("item", extra["item"])
            payload.setdefault("index", index)
        if spec.payload_from:
            # Sized as it is built, so that many keys each near the limit are refused
            # after the first few, not once all are built and written out.
            size = json_size(payload)
            limit = self.limits.max_value_bytes
            ctx = self.context(**extra)
            for key, expr in spec.payload_from.items():
                try:
                    payload[key], weight = evaluate_sized(expr, ctx, self.budget)
                except ExpressionError as exc:
                    self.fail_step(spec, f"payload_from.{key}: {exc}")
                    return False
                size += weight + len(key) + 4
                if size > limit:
                    self.fail_step(spec, f"payload of over {size} bytes is over {limit}")
                    return False
            # The estimate does not count escapes: measure what will be written.
            if (size := json_size(payload)) > limit:
                self.fail_step(spec, f"payload of {size} bytes is over {limit}")
                return False
        self.unit(
            StepTasksScheduled,
            spec.id,
            ScheduledTask(
                index=index,
                attempt=attempt,
                task_id=step_task_id(self.state.run_id, spec.id, index, attempt),
                payload=payload,
                not_before=not_before,
            ),
            {
                "run_id": self.state.run_id,
                "task_type": spec.task_type,
                "required_capabilities": spec.required_capabilities,
                "priority": spec.priority,
                "run_timeout_s": spec.timeout_s,
            },
        )
        return True

    def start(self, spec: StepSpec, compensating_for: str | None = None) -> None:
        """Start a step whose dependencies are done and whose condition holds."""
        rid = self.state.run_id
        if spec.map is None:
            self.emit(StepStarted(run_id=rid, step_id=spec.id, compensating_for=compensating_for))
            self.schedule(spec, 0, 1, None)
            return
        try:
            # evaluate holds the value to MAX_EXPRESSION_BYTES as estimated (escapes
            # not counted), so measuring it exactly is cheap.
            items = evaluate(spec.map.items, self.context(), self.budget)
        except ExpressionError as exc:
            self.emit(StepStarted(run_id=rid, step_id=spec.id))
            self.fail_step(spec, f"map.items: {exc}")
            return
        if (size := json_size(items)) > (limit := self.limits.max_value_bytes):
            self.emit(StepStarted(run_id=rid, step_id=spec.id))
            self.fail_step(spec, f"map.items of {size} bytes is over {limit}")
            return
        listed = isinstance(items, list) and len(items) <= spec.map.max_items
        self.emit(StepStarted(run_id=rid, step_id=spec.id, items=items if listed else None))
        if not isinstance(items, list):
            self.fail_step(spec, f"map.items gave {type(items).__name__}, not a list")
            return
        if len(items) > spec.map.max_items:
            self.fail_step(
                spec, f"map.items gave {len(items)} items, over max_items {spec.map.max_items}"
            )
            return
        if not items:
            self.finish(spec, [])
            return
        for index in range(min(len(items), spec.map.max_parallelism)):
            if not self.schedule(spec, index, 1, None):
                return

    def finish(self, spec: StepSpec, result: Any) -> None:
        """The step's work succeeded: check its size and gate, then complete or fail it."""
        limit = self.limits.max_value_bytes
        if spec.map is not None and (size := json_size(result)) > limit:
            self.fail_step(spec, f"the items' results, {size} bytes, are over {limit}")
            return
        if spec.gate is not None and spec.map is not None:
            try:
                passed = holds(spec.gate, self.context(result=result), self.budget)
            except ExpressionError as exc:
                self.fail_step(spec, f"gate: {exc}")
                return
            if not passed:
                self.fail_step(spec, f"gate failed: {spec.gate}")
                return
        self.emit(StepCompleted(run_id=self.state.run_id, step_id=spec.id, result=result))
        self.after_step(spec)

    def fail_step(self, spec: StepSpec, error: str) -> None:
        """The step failed for good: apply its ``on_failure`` policy."""
        rid = self.state.run_id
        self.emit(StepFailed(run_id=rid, step_id=spec.id, error=error))
        compensating_for = self.state.steps[spec.id].compensating_for
        if compensating_for is None and self.state.status == "compensating":
            return  # another step is being compensated for: the run ends when that does
        if compensating_for is not None:
            self.emit(
                WorkflowRunFailed(
                    run_id=rid,
                    step_id=compensating_for,
                    error=self.state.steps[compensating_for].error or error,
                    compensated=False,
                )
            )
        elif spec.on_failure == "fail":
            self.emit(WorkflowRunFailed(run_id=rid, step_id=spec.id, error=error))
        elif spec.on_failure == "compensate" and spec.compensation is not None:
            self.start(self.state.spec.step(spec.compensation), compensating_for=spec.id)
        else:
            self.after_step(spec)

    def after_step(self, spec: StepSpec) -> None:
        """A step finished: end a compensation, or start what became ready."""
        compensating_for = self.state.steps[spec.id].compensating_for
        if compensating_for is not None:
            self.emit(
                WorkflowRunFailed(
                    run_id=self.state.run_id,
                    step_id=compensating_for,
                    error=self.state.steps[compensating_for].error or "failed",
                    compensated=True,
                )
            )
            return
        self.advance()

    def advance(self) -> None:
        """Start or skip every pending step whose dependencies have all finished, until
        nothing changes; complete the run when every step has finished."""
        changed = True
        while changed and self.running():
            changed = False
            for spec in self.state.spec.steps:
                if not self.running():  # a step started above failed the run
                    return
                if self.state.steps[spec.id].status != "pending":
                    continue
                deps = [self.state.steps[d] for d in spec.depends_on]
                if any(d.status not in STEP_FINISHED for d in deps):
                    continue
                changed = True
                skipped = [d for d in spec.depends_on if self.state.steps[d].status == "skipped"]
                if skipped:
                    self.skip(spec, f"upstream step {skipped[0]} was skipped")
                    continue
                if spec.when is not None:
                    try:
                        go = holds(spec.when, self.context(), self.budget)
                    except ExpressionError as exc:
                        self.emit(StepStarted(run_id=self.state.run_id, step_id=spec.id))
                        self.fail_step(spec, f"when: {exc}")
                        continue
                    if not go:
                        self.skip(spec, f"condition is false: {spec.when}")
                        continue
                self.start(spec)
        if self.running() and all(
            self.state.steps[s.id].status in STEP_FINISHED for s in self.state.spec.steps
        ):
            self.emit(
                WorkflowRunCompleted(
                    run_id=self.state.run_id, result_steps=final_steps(self.state.spec)
                )
            )

    def skip(self, spec: StepSpec, reason: str) -> None:
        self.emit(StepSkipped(run_id=self.state.run_id, step_id=spec.id, reason=reason))

    # -- outcomes -----------------------------------------------------------------

    def outcome(self, command: RecordStepTaskOutcome | StepTaskOutcome) -> None:
        """Record a unit's outcome and decide what follows."""
        spec = self.state.spec.step(command.step_id)
        rid = self.state.run_id
        ok = command.succeeded
        error = command.error or "failed"
        if ok and spec.map is None and spec.gate is not None:
            try:
                ok = holds(spec.gate, self.context(result=command.result), self.budget)
                error = error if ok else f"gate failed: {spec.gate}"
            except ExpressionError as exc:
                ok, error = False, f"gate: {exc}"
        common: dict[str, Any] = {
            "run_id": rid,
            "step_id": spec.id,
            "index": command.index,
            "attempt": command.attempt,
            "task_id": command.task_id,
        }
        if ok:
            self.unit(
                StepTasksSucceeded,
                spec.id,
                SucceededTask(
                    index=command.index,
                    attempt=command.attempt,
                    task_id=command.task_id,
                    result=command.result,
                ),
                {"run_id": rid},
            )
            if spec.map is None:
                self.finish(spec, command.result)
                return
            step = self.state.steps[spec.id]
            items = step.items or []
            if step.succeeded == len(items):
                self.finish(spec, [step.units[i].result for i in range(len(items))])
                return
            next_index = len(step.units)
            if next_index < len(items):
                self.schedule(spec, next_index, 1, None)
            return
        compensating = self.state.status == "compensating"
        if command.attempt < spec.retry.max_attempts and (
            not compensating or self.state.steps[spec.id].compensating_for is not None
        ):
            delay = backoff_seconds(
                command.task_id,
                command.attempt,
                base_s=spec.retry.backoff_base_s,
                cap_s=spec.retry.backoff_max_s,
            )
            retry_at = self.at + timedelta(seconds=delay)
            self.emit(StepTaskFailed(**common, error=error, retry_at=retry_at))
            self.schedule(spec, command.index, command.attempt + 1, retry_at)
            return
        self.emit(StepTaskFailed(**common, error=error))
        where = f"item {command.index}: " if spec.map is not None else ""
        self.fail_step(
            spec, f"{where}{error} (after {command.attempt} of {spec.retry.max_attempts} attempts)"
        )


def final_steps(spec: WorkflowSpec) -> tuple[str, ...]:
    """The ids of ``spec``'s final steps (no step depends on them), in declaration order:
    the steps whose results make a completed run's result."""
    needed = {d for s in spec.steps for d in s.depends_on}
    return tuple(s.id for s in spec.steps if s.id not in needed)


def run_result(state: RunState) -> dict[str, Any]:
    """The result of run ``state``: ``{step id: its result}`` over its final steps (each
    null until it completes, and for one skipped or failed)."""
    return {sid: state.steps[sid].result for sid in final_steps(state.spec)}


def _current(state: RunState, outcome: RecordStepTaskOutcome | StepTaskOutcome) -> bool:
    """Whether ``outcome`` is for the attempt its unit is waiting on."""
    step = state.steps.get(outcome.step_id)
    if step is None or step.status != "running":
        return False
    unit = step.units.get(outcome.index)
    return unit is not None and unit.task_id == outcome.task_id and unit.status == "scheduled"


def _stale(outcome: RecordStepTaskOutcome | StepTaskOutcome) -> Rejection:
    return rejected(
        "conflict",
        "stale_task_outcome",
        f"task {outcome.task_id} is not the running attempt of step "
        f"{outcome.step_id}[{outcome.index}]",
        field="task_id",
    )


def decide(
    command: RunCommand, state: RunState | None, limits: RunLimits = DEFAULT_LIMITS
) -> list[RunEvent] | Rejection:
    """Decide a run command, holding the values it writes to ``limits``.

    Rejections: ``run_exists`` (conflict), ``run_not_found`` (not_found),
    ``run_finished`` (conflict: the run is completed, failed or cancelled),
    ``unknown_step`` (invalid), ``stale_task_outcome`` (conflict: the task is not the
    unit's current attempt, or its outcome is already recorded, or the step is over).
    """
    rid = command.run_id
    match command, state:
        case StartWorkflowRun(), None:
            decision = _Decision(
                RunState(
                    run_id=rid,
                    workflow_id=command.workflow_id,
                    version=command.version,
                    spec=command.spec,
                    inputs=command.inputs,
                    params=command.params,
                    steps={},
                ),
                command.at,
                limits,
            )
            decision.emit(
                WorkflowRunStarted(
                    run_id=rid,
                    workflow_id=command.workflow_id,
                    version=command.version,
                    spec=command.spec,
                    inputs=command.inputs,
                    params=command.params,
                )
            )
            decision.advance()
            return decision.events
        case StartWorkflowRun(), RunState():
            return rejected("conflict", "run_exists", f"run {rid} exists")
        case _, None:
            return rejected("not_found", "run_not_found", f"no run {rid}")
        case _, RunState(status="completed" | "failed" | "cancelled"):
            return rejected("conflict", "run_finished", f"run {rid} is {state.status}")
        case CancelWorkflowRun(), RunState():
            return [WorkflowRunCancelled(run_id=rid, reason=command.reason)]
        case RecordStepTaskOutcome(), RunState():
            if command.step_id not in state.steps:
                return rejected(
                    "invalid",
                    "unknown_step",
                    f"run {rid} has no step {command.step_id}",
                    field="step_id",
                )
            if not _current(state, command):
                return _stale(command)
            decision = _Decision(state, command.at, limits)
            decision.outcome(command)
            return decision.events
        case RecordStepTaskOutcomes(), RunState():
            decision = _Decision(state, command.at, limits)
            for item in command.outcomes:
                if decision.state.status in RUN_TERMINAL:
                    break
                if _current(decision.state, item):
                    decision.outcome(item)
            if not decision.events:
                return _stale(command.outcomes[0])
            return decision.events
    return rejected("invalid", "unknown_command", f"not a run command: {command!r}")


def describe(state: RunState) -> dict[str, Any]:
    """What a command outcome shows of a run: its status and each step's status and unit
    counts (not the spec nor the results, which a 1,000-item map would repeat in each of
    its 2,000 outcomes)."""
    return {
        "run_id": state.run_id,
        "workflow_id": state.workflow_id,
        "version": state.version,
        "status": state.status,
        "steps": {
            sid: {"status": s.status, "units": len(s.units), "succeeded": s.succeeded}
            for sid, s in state.steps.items()
        },
    }


def run_decider(limits: RunLimits = DEFAULT_LIMITS) -> Decider[RunCommand, RunState, RunEvent]:
    """The run's decider, its decisions holding values to ``limits``."""
    return Decider(
        aggregate_type=RUN,
        command_types=(
            StartWorkflowRun,
            RecordStepTaskOutcome,
            RecordStepTaskOutcomes,
            CancelWorkflowRun,
        ),
        event_types=(
            WorkflowRunStarted,
            StepStarted,
            StepTasksScheduled,
            StepTasksSucceeded,
            StepTaskFailed,
            StepCompleted,
            StepFailed,
            StepSkipped,
            WorkflowRunCompleted,
            WorkflowRunFailed,
            WorkflowRunCancelled,
        ),
        decide=decide if limits == DEFAULT_LIMITS else partial(decide, limits=limits),
        evolve=evolve,
        describe=describe,
        pack=pack,
    )


RUN_DECIDER = run_decider()
