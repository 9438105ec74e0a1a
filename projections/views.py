"""Views: how each read-model row evolves with the events (pure; the read models in
projections/readmodels/ read and write the rows).

A row is a plain dict keyed by column name (the read model's table). ``evolve_*`` returns
the new row and never raises; an event at or below the row's version is ignored, so
applying an event twice is harmless.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from domain import account as ac
from domain import agent as ag
from domain import proposal as pr
from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.recorded import RecordedEvent

Row = dict[str, Any]


def evolve_agent(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The agents row after ``stored`` (an agent event).

    The task counters start at 0 here and are never changed by agent events: the
    projector adds ``agent_counts`` of task events to them in a table of their own.
    """
    e = stored.event
    if isinstance(e, ag.AgentRegistered):
        if row is not None:
            return row
        return {
            "agent_id": e.agent_id,
            "name": e.name,
            "capabilities": [c.model_dump() for c in e.capabilities],
            "max_concurrent_tasks": e.max_concurrent_tasks,
            "cost_per_task": e.cost_per_task,
            "lifecycle": "registered",
            "registered_at": stored.time,
            "last_heartbeat_at": None,
            "tasks_completed": 0,
            "tasks_failed": 0,
            "tasks_lost": 0,
            "version": stored.version,
            "updated_at": stored.time,
        }
    if row is None or stored.version <= row["version"]:
        return row
    row = {**row, "version": stored.version, "updated_at": stored.time}
    match e:
        case ag.AgentStarted() | ag.AgentRestarted():
            row["lifecycle"] = "running"
            row["last_heartbeat_at"] = stored.time
        case ag.HeartbeatRecorded():
            # A heartbeat's time is when the agent sent it (sent_at): one sent earlier
            # may be decided after a later one, so the latest send time wins.
            row["lifecycle"] = "running"
            last = row.get("last_heartbeat_at")
            row["last_heartbeat_at"] = stored.time if last is None else max(last, stored.time)
        case ag.AgentStopped():
            row["lifecycle"] = "stopped"
        case ag.AgentMarkedOffline():
            row["lifecycle"] = "offline"
        case ag.CapabilitiesUpdated():
            row["capabilities"] = [c.model_dump() for c in e.capabilities]
        case ag.AgentDeregistered():
            row["lifecycle"] = "deregistered"
    return row


def agent_counts(stored: RecordedEvent) -> tuple[str, str] | None:
    """(agent id, counter column) that a task event adds one to, if any.

    Completed adds to ``tasks_completed``, failed to ``tasks_failed``, and a task taken
    back from an agent (requeued or timed out) to ``tasks_lost``.
    """
    e = stored.event
    match e:
        case tk.TaskCompleted():
            return e.agent_id, "tasks_completed"
        case tk.TaskFailed():
            return e.agent_id, "tasks_failed"
        case tk.TaskRequeued() | tk.TaskTimedOut():
            return e.agent_id, "tasks_lost"
    return None


def evolve_task(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The tasks row after ``stored`` (a task event)."""
    e = stored.event
    if isinstance(e, tk.TaskSubmitted):
        if row is not None:
            return row
        return {
            "task_id": e.task_id,
            "type": e.type,
            "payload": e.payload,
            "required_capabilities": list(e.required_capabilities),
            "priority": e.priority,
            "priority_rank": tk.PRIORITY_RANK[e.priority],
            "max_cost": e.max_cost,
            "lease_timeout_s": e.lease_timeout_s,
            "run_timeout_s": e.run_timeout_s,
            "max_attempts": e.max_attempts,
            "status": "queued",
            "attempts": 0,
            "requeues": 0,
            "agent_id": None,
            "progress": 0.0,
            "progress_message": None,
            "result": None,
            "quality": None,
            "error": None,
            "not_before": None,
            "submitted_at": stored.time,
            "queued_at": stored.time,
            "assigned_at": None,
            "started_at": None,
            "finished_at": None,
            "version": stored.version,
            "updated_at": stored.time,
        }
    if row is None or stored.version <= row["version"]:
        return row
    row = {**row, "version": stored.version, "updated_at": stored.time}
    match e:
        case tk.TaskQueued() | tk.TaskRetryScheduled():
            row.update(
                status="queued",
                agent_id=None,
                queued_at=stored.time,
                not_before=e.not_before,
                progress=0.0,
                progress_message=None,
                finished_at=None,
            )
        case tk.TaskAssigned():
            row.update(
                status="assigned",
                agent_id=e.agent_id,
                attempts=e.attempt,
                assigned_at=stored.time,
                started_at=None,
            )
        case tk.TaskStarted():
            row.update(status="running", started_at=stored.time)
        case tk.TaskProgressed():
            row.update(progress=e.progress, progress_message=e.message)
        case tk.TaskCompleted():
            row.update(
                status="completed",
                result=e.result,
                quality=e.quality,
                progress=1.0,
                finished_at=stored.time,
            )
        case tk.TaskFailed():
            row.update(status="failed", error=e.error, finished_at=stored.time)
        case tk.TaskRequeued() | tk.TaskTimedOut():
            row.update(requeues=row["requeues"] + 1)
        case tk.TaskCancelled():
            row.update(status="cancelled", error=e.reason, finished_at=stored.time)
        case tk.TaskDeadLettered():
            row.update(status="dead_lettered", error=e.reason, finished_at=stored.time)
    return row


# the economy ------------------------------------------------------------------------


def evolve_account(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The accounts row after ``stored`` (an account event), folded with the Account
    decider's own ``evolve`` so the read model cannot drift from the write model."""
    e = stored.event
    if not isinstance(e, ac.AccountEvent) or (row is not None and stored.version <= row["version"]):
        return row
    state: ac.AccountState | None = None
    if row is not None:
        state = ac.AccountState(
            account_id=row["account_id"],
            holder=row["holder"],
            balance=row["balance"],
            staked=row["staked"],
            unstaking=tuple(ac.PendingUnstake(**p) for p in row["pending"]),
            supply=row["supply"],
            tier=row["tier"],
            earned=row["earned"],
            slashed=row["slashed"],
        )
    after = ac.evolve(state, e)
    if after is None:
        return row
    return {
        "account_id": after.account_id,
        "holder": after.holder,
        "balance": after.balance,
        "staked": after.staked,
        "unstaking": after.unstaking_total,
        "pending": [p.model_dump(mode="json") for p in after.unstaking],
        "supply": after.supply,
        "tier": after.tier,
        "earned": after.earned,
        "slashed": after.slashed,
        "opened_at": row["opened_at"] if row is not None else stored.time,
        "version": stored.version,
        "updated_at": stored.time,
    }


IN_FLIGHT = "in_flight"
MINT = "mint"


def ledger_legs(stored: RecordedEvent) -> list[Row]:
    """The double-entry legs of an account event (they sum to zero), with their cause.

    Each leg: account_id, bucket (balance | staked | unstaking, or the pseudo accounts
    ``in_flight`` and ``mint``), signed amount (micro-tokens), kind, counterparty,
    task_id. An event that moves nothing has no legs.
    """
    e = stored.event
    a = stored.aggregate_id

    def leg(
        account: str,
        bucket: str,
        amount: int,
        kind: str,
        other: str | None = None,
        task_id: str | None = None,
    ) -> Row:
        return {
            "account_id": account,
            "bucket": bucket,
            "amount": amount,
            "kind": kind,
            "counterparty": other,
            "task_id": task_id,
        }

    match e:
        case ac.TokensMinted():
            return [
                leg(a, "balance", e.amount, "mint", MINT),
                leg(MINT, MINT, -e.amount, "mint", a),
            ]
        case ac.TransferSent():
            return [
                leg(a, "balance", -e.amount, e.kind, e.to, e.task_id),
                leg(IN_FLIGHT, IN_FLIGHT, e.amount, e.kind, a, e.task_id),
            ]
        case ac.TransferReceived() | ac.RewardAccrued():
            kind = "reward" if isinstance(e, ac.RewardAccrued) else e.kind
            return [
                leg(IN_FLIGHT, IN_FLIGHT, -e.amount, kind, a, e.task_id),
                leg(a, "balance", e.amount, kind, e.from_account, e.task_id),
            ]
        case ac.TokensStaked():
            return [leg(a, "balance", -e.amount, "stake"), leg(a, "staked", e.amount, "stake")]
        case ac.UnstakeRequested():
            return [
                leg(a, "staked", -e.amount, "unstake"),
                leg(a, "unstaking", e.amount, "unstake"),
            ]
        case ac.TokensUnstaked():
            return [
                leg(a, "unstaking", -e.amount, "withdraw"),
                leg(a, "balance", e.amount, "withdraw"),
            ]
        case ac.StakeSlashed():
            return [
                leg(a, "staked", -e.amount, "slash", e.to, e.task_id),
                leg(IN_FLIGHT, IN_FLIGHT, e.amount, "slash", a, e.task_id),
            ]
    return []


def evolve_proposal(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The proposals row (with its tallies) after ``stored`` (a proposal event)."""
    e = stored.event
    if isinstance(e, pr.ProposalCreated):
        if row is not None:
            return row
        return {
            "proposal_id": e.proposal_id,
            "title": e.title,
            "proposer": e.proposer,
            "change": e.change.model_dump(mode="json", exclude_none=True),
            "opened_at": e.opened_at,
            "closes_at": e.closes_at,
            "quorum_bp": e.quorum_bp,
            "threshold_bp": e.threshold_bp,
            "total_power": e.total_power,
            "status": "open",
            "votes_for": 0,
            "votes_against": 0,
            "votes_abstain": 0,
            "voters": 0,
            "version": stored.version,
            "updated_at": stored.time,
        }
    if row is None or stored.version <= row["version"]:
        return row
    row = {**row, "version": stored.version, "updated_at": stored.time}
    match e:
        case pr.VoteCast():
            column = {"for": "votes_for", "against": "votes_against", "abstain": "votes_abstain"}
            row[column[e.choice]] += e.power
            row["voters"] += 1
        case pr.ProposalClosed():
            row["status"] = e.outcome
        case pr.ProposalExecuted():
            row["status"] = "executed"
    return row


# workflows --------------------------------------------------------------------------


def evolve_workflow(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The workflows row after ``stored`` (a workflow definition event).

    ``version`` is the definition's version; ``aggregate_version`` the event sequence
    (what If-Match compares), which an execution request bumps too.
    """
    e = stored.event
    if isinstance(e, wf.WorkflowCreated):
        if row is not None:
            return row
        return {
            "id": e.workflow_id,
            "name": e.name,
            "description": e.description,
            "version": 1,
            "status": "active",
            "spec": e.spec.model_dump(mode="json"),
            "params": e.params,
            "template": e.template,
            "runs": 0,
            "created_at": stored.time,
            "updated_at": stored.time,
            "aggregate_version": stored.version,
        }
    if row is None or stored.version <= row["aggregate_version"]:
        return row
    row = {**row, "aggregate_version": stored.version, "updated_at": stored.time}
    match e:
        case wf.WorkflowUpdated():
            row.update(
                version=e.version,
                name=e.name,
                description=e.description,
                spec=e.spec.model_dump(mode="json"),
            )
        case wf.WorkflowArchived():
            row["status"] = "archived"
        case wf.WorkflowExecutionRequested():
            row["runs"] += 1
    return row


def template_row(stored: RecordedEvent) -> Row | None:
    """The workflow_templates row a ``TemplatePublished`` event adds (None for others)."""
    e = stored.event
    if not isinstance(e, wf.TemplatePublished):
        return None
    return {
        "name": e.name,
        "version": e.version,
        "description": e.description,
        "parameters": {k: p.model_dump(mode="json") for k, p in e.parameters.items()},
        "spec": e.spec.model_dump(mode="json"),
        "published_at": stored.time,
    }


def requested_run(stored: RecordedEvent) -> Row | None:
    """The ``pending`` workflow_runs row an execution request stands for until the run
    aggregate starts (None for other events). Its ``aggregate_version`` is 0."""
    e = stored.event
    if not isinstance(e, wf.WorkflowExecutionRequested):
        return None
    return {
        "run_id": e.run_id,
        "workflow_id": e.workflow_id,
        "version": e.version,
        "status": "pending",
        "inputs": e.inputs,
        "result": None,
        "error": None,
        "failed_step": None,
        "compensated": False,
        "steps_total": len(e.spec.steps),
        "steps_done": 0,
        "requested_at": stored.time,
        "started_at": None,
        "finished_at": None,
        "updated_at": stored.time,
        "aggregate_version": 0,
    }


def evolve_run(row: Row | None, stored: RecordedEvent) -> Row | None:
    """The workflow_runs row after ``stored`` (a run event).

    ``steps_done`` is not kept here: the projector counts it from the steps rows.
    """
    e = stored.event
    if isinstance(e, wr.WorkflowRunStarted):
        if row is not None and row["aggregate_version"] >= stored.version:
            return row
        return {
            "run_id": e.run_id,
            "workflow_id": e.workflow_id,
            "version": e.version,
            "status": "running",
            "inputs": e.inputs,
            "result": None,
            "error": None,
            "failed_step": None,
            "compensated": False,
            "steps_total": len(e.spec.steps),
            "steps_done": 0 if row is None else row["steps_done"],
            "requested_at": stored.time if row is None else row["requested_at"],
            "started_at": stored.time,
            "finished_at": None,
            "updated_at": stored.time,
            "aggregate_version": stored.version,
        }
    if row is None or stored.version <= row["aggregate_version"]:
        return row
    row = {**row, "aggregate_version": stored.version, "updated_at": stored.time}
    match e:
        case wr.StepStarted(compensating_for=str()):
            row["status"] = "compensating"
        case wr.WorkflowRunCompleted():
            # The event names the final steps; their results are in the steps rows
            # (queries.get_run/list_runs fill them in), so the row keeps the names only.
            row.update(status="completed", result=run_result_keys(e), finished_at=stored.time)
        case wr.WorkflowRunFailed():
            row.update(
                status="failed",
                failed_step=e.step_id,
                error=e.error,
                compensated=e.compensated,
                finished_at=stored.time,
            )
        case wr.WorkflowRunCancelled():
            row.update(status="cancelled", error=e.reason, finished_at=stored.time)
    return row


def run_result_keys(e: wr.WorkflowRunCompleted) -> dict[str, None]:
    """What a completed run's ``result`` column holds: its final steps' ids, each mapped
    to null. Their results are in the run's workflow_steps rows, and the read side
    (projections/readmodels/workflows.py) assembles the run's result from them, so a run whose final
    results add up to megabytes is not written twice."""
    return dict.fromkeys(e.final_steps)


def step_rows(stored: RecordedEvent) -> list[Row]:
    """The workflow_steps rows a ``WorkflowRunStarted`` event creates, all ``pending``:
    the steps, then the compensation steps, in declaration order (``position``)."""
    e = stored.event
    if not isinstance(e, wr.WorkflowRunStarted):
        return []
    specs = [("step", s) for s in e.spec.steps]
    specs += [("compensation", s) for s in e.spec.compensations]
    return [
        {
            "run_id": e.run_id,
            "step_id": spec.id,
            "position": i,
            "kind": kind,
            "task_type": spec.task_type,
            "status": "pending",
            # A map step's item count is known when it starts.
            "items_total": 1 if spec.map is None else None,
        }
        for i, (kind, spec) in enumerate(specs)
    ]


@dataclass
class StepChange:
    """What one or more run events change in one workflow_steps row.

    Merged over a batch (``absorb``) so that a map step's many task events cost one
    row update: ``items_done`` is added, ``attempts`` raised to the highest, ``task_ids``
    appended; every other field, when set, replaces the row's. The projector writes it
    with one UPDATE; ``applied_to`` is the same rule on a row dict.
    """

    status: str | None = None
    items_total: int | None = None
    items_done: int = 0
    attempts: int = 0
    task_ids: list[str] = field(default_factory=list)
    has_result: bool = False
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    compensating_for: str | None = None

    def absorb(self, later: StepChange) -> None:
        """Fold ``later`` (the change of a later event of the same step) into this one."""
        self.status = later.status or self.status
        self.items_total = later.items_total if later.items_total is not None else self.items_total
        self.items_done += later.items_done
        self.attempts = max(self.attempts, later.attempts)
        self.task_ids.extend(later.task_ids)
        if later.has_result:
            self.has_result, self.result = True, later.result
        self.error = later.error if later.error is not None else self.error
        self.started_at = later.started_at or self.started_at
        self.finished_at = later.finished_at or self.finished_at
        self.compensating_for = later.compensating_for or self.compensating_for

    def applied_to(self, row: Row) -> Row:
        """``row`` (a workflow_steps row) with this change applied."""
        out = {
            **row,
            "items_done": row.get("items_done", 0) + self.items_done,
            "attempts": max(row.get("attempts", 0), self.attempts),
            "task_ids": [*row.get("task_ids", []), *self.task_ids],
        }
        for name in (
            "status",
            "items_total",
            "error",
            "started_at",
            "finished_at",
            "compensating_for",
        ):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.has_result:
            out["result"] = self.result
        return out


def step_change(stored: RecordedEvent) -> tuple[str, StepChange] | None:
    """(step id, its change) for a run event about one step; None for the others."""
    e = stored.event
    t = stored.time
    match e:
        case wr.StepStarted():
            return e.step_id, StepChange(
                status="running",
                items_total=None if e.items is None else len(e.items),
                started_at=t,
                compensating_for=e.compensating_for,
            )
        case wr.StepTasksScheduled():
            return e.step_id, StepChange(
                attempts=max(u.attempt for u in e.tasks), task_ids=[u.task_id for u in e.tasks]
            )
        case wr.StepTasksSucceeded():
            return e.step_id, StepChange(items_done=len(e.tasks))
        case wr.StepCompleted():
            return e.step_id, StepChange(
                status="completed", has_result=True, result=e.result, finished_at=t
            )
        case wr.StepFailed():
            return e.step_id, StepChange(status="failed", error=e.error, finished_at=t)
        case wr.StepSkipped():
            # ``error`` says why a step did not complete: its failure, or why it was skipped.
            return e.step_id, StepChange(status="skipped", error=e.reason, finished_at=t)
    return None


def closes_run(stored: RecordedEvent) -> bool:
    """True for the run events after which unfinished steps count as ``cancelled``
    (the run failed or was cancelled), as the run decider's own ``evolve`` has it."""
    return isinstance(stored.event, wr.WorkflowRunFailed | wr.WorkflowRunCancelled)


def close_steps(steps: dict[str, Row], at: datetime) -> dict[str, Row]:
    """Steps rows after their run closed at ``at``: pending and running ones cancelled."""
    return {
        sid: r
        if r["status"] in wr.STEP_FINISHED
        else {**r, "status": "cancelled", "finished_at": at}
        for sid, r in steps.items()
    }


def steps_done(steps: dict[str, Row]) -> int:
    """The run's progress: how many of its main steps (not compensations) have finished."""
    return sum(1 for r in steps.values() if r["kind"] == "step" and r["status"] in wr.STEP_FINISHED)


def fold_rows(events: Iterable[RecordedEvent]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The agents and tasks rows (by id) that ``events``, in log order, fold to: what the
    projector's read models must equal once they have read exactly these events (the
    agent counters count every completed, failed or lost task, whichever topic the
    projector read first). For audits and tests; the projector applies the same views
    batch by batch."""
    agents: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e.aggregate_type == ag.AGENT:
            agents[e.aggregate_id] = evolve_agent(agents.get(e.aggregate_id), e)
        elif e.aggregate_type == tk.TASK:
            tasks[e.aggregate_id] = evolve_task(tasks.get(e.aggregate_id), e)
            if (c := agent_counts(e)) is not None:
                counts[c] += 1
    for (agent_id, column), n in counts.items():
        if agent_id in agents:
            agents[agent_id] = {**agents[agent_id], column: agents[agent_id][column] + n}
    return agents, tasks
