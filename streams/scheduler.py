"""The scheduler process manager: the decision, pure (its Kafka runner is
streams/scheduler_runner.py).

It is level-triggered: ``apply`` folds agent and task events into a ``SchedulerView``,
and ``plan(view, now)`` looks at the whole view and returns every command the swarm
needs now:

1. requeue the tasks held by agents that went offline, were deregistered, or were
   stopped before starting them;
2. requeue assigned tasks whose lease ran out before the agent started them, and time
   out running tasks past their run timeout;
3. mark offline the running agents whose heartbeats stopped (the timeout counts from
   when the agent sent its last heartbeat, the event's ``time``; the command carries
   the timeout, and the decider refuses it if a heartbeat sent within it was decided
   meanwhile);
4. assign queued tasks to eligible agents, highest (aged) priority first, best score
   first (domain/scoring.py; an agent's staking tier, folded from its account's
   ``TierChanged`` events, raises its standing).

Every command id is derived from the aggregate version it acts on (uuid5), so planning
again before the outcome arrives, or after a restart, sends the same id, and the
decider drops the repeat. Planning from state rather than from single events means a
restarted scheduler needs no memory beyond the view it rebuilds from the log.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from domain import account as ac
from domain import agent as ag
from domain import task as tk
from domain.ids import derived_id
from domain.messages import Command
from domain.recorded import RecordedEvent
from domain.scoring import Candidate, effective_priority, eligible, score
from streams.unbuilt import Unbuilt, build


@dataclass
class AgentView:
    """The scheduler's view of one agent; ``last_seen`` is its last sign of life (the
    time its last heartbeat was sent, or of its start or last progress report)."""

    agent_id: str
    capabilities: dict[str, float]
    max_concurrent_tasks: int
    cost_per_task: int
    lifecycle: str
    last_seen: datetime
    version: int


@dataclass
class TaskView:
    """The scheduler's view of one unfinished task."""

    task_id: str
    required: tuple[str, ...]
    priority: str
    max_cost: int | None
    lease_timeout_s: float
    run_timeout_s: float
    status: str
    version: int
    queued_at: datetime
    not_before: datetime | None = None
    agent_id: str | None = None
    since: datetime | None = None  # when it was assigned, or started


@dataclass
class SchedulerView:
    """Agents and unfinished tasks, folded from the agent and task event topics.

    Nothing here depends on reading one topic before the other (a runner reads their
    partitions independently): an agent's load is derived from the tasks that name it,
    and its completed/failed counts are kept by agent id whether or not its
    registration has been read yet.
    """

    agents: dict[str, AgentView] = field(default_factory=dict)
    tasks: dict[str, TaskView] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)  # account (= agent) id -> tier

    def load(self) -> dict[str, int]:
        """Agent id -> number of tasks assigned to or running on it."""
        out: dict[str, int] = {}
        for t in self.tasks.values():
            if t.status in tk.ACTIVE and t.agent_id is not None:
                out[t.agent_id] = out.get(t.agent_id, 0) + 1
        return out


@dataclass(frozen=True)
class Policy:
    """Scheduler settings, in seconds."""

    heartbeat_timeout_s: float = 15.0
    aging_interval_s: float = 30.0


@dataclass(frozen=True)
class Planned:
    """A command the scheduler wants sent, with its deterministic id.

    ``expected_version`` is the aggregate version the decision was made on: sent as the
    command's expected version, so a decision made on a view that has since moved on
    (the agent started the task, a heartbeat came in) is rejected, not applied.
    ``task_id``/``agent_id`` name a tentative assignment (it holds a slot of the agent
    until the task's next event arrives).
    """

    command_id: str
    command: Command
    expected_version: int
    task_id: str | None = None
    agent_id: str | None = None


def apply(view: SchedulerView, stored: RecordedEvent) -> None:
    """Fold one stored agent or task event into ``view`` (in place; no IO)."""
    e = stored.event
    if isinstance(e, ag.AgentEvent):
        _apply_agent(view, stored, e)
    elif isinstance(e, tk.TaskEvent):
        _apply_task(view, stored, e)
    elif isinstance(e, ac.TierChanged):
        view.tiers[e.account_id] = e.tier


def _apply_agent(view: SchedulerView, stored: RecordedEvent, e: ag.AgentEvent) -> None:
    if isinstance(e, ag.AgentRegistered):
        view.agents[e.agent_id] = AgentView(
            agent_id=e.agent_id,
            capabilities={c.name: c.level for c in e.capabilities},
            max_concurrent_tasks=e.max_concurrent_tasks,
            cost_per_task=e.cost_per_task,
            lifecycle="registered",
            last_seen=stored.time,
            version=stored.version,
        )
        return
    a = view.agents.get(e.agent_id)
    if a is None:
        return
    a.version = stored.version
    match e:
        case ag.AgentStarted() | ag.AgentRestarted():
            a.lifecycle, a.last_seen = "running", stored.time
        case ag.HeartbeatRecorded():
            sent = e.sent_at or stored.time  # when the agent sent it (v1 records: decided)
            a.lifecycle, a.last_seen = "running", max(a.last_seen, sent)
        case ag.AgentStopped():
            a.lifecycle = "stopped"
        case ag.AgentMarkedOffline():
            a.lifecycle = "offline"
        case ag.CapabilitiesUpdated():
            a.capabilities = {c.name: c.level for c in e.capabilities}
        case ag.AgentDeregistered():
            a.lifecycle = "deregistered"


def _apply_task(view: SchedulerView, stored: RecordedEvent, e: tk.TaskEvent) -> None:
    if isinstance(e, tk.TaskSubmitted):
        view.tasks[e.task_id] = TaskView(
            task_id=e.task_id,
            required=e.required_capabilities,
            priority=e.priority,
            max_cost=e.max_cost,
            lease_timeout_s=e.lease_timeout_s,
            run_timeout_s=e.run_timeout_s,
            status="queued",
            version=stored.version,
            queued_at=stored.time,
        )
        return
    t = view.tasks.get(e.task_id)
    if t is None:
        return
    t.version = stored.version
    match e:
        case tk.TaskQueued() | tk.TaskRetryScheduled():
            t.status, t.agent_id, t.since = "queued", None, None
            t.not_before, t.queued_at = e.not_before, stored.time
        case tk.TaskAssigned():
            t.status, t.agent_id, t.since = "assigned", e.agent_id, stored.time
        case tk.TaskStarted():
            t.status, t.since = "running", stored.time
        case tk.TaskProgressed():
            if (holder := view.agents.get(e.agent_id)) is not None:
                holder.last_seen = max(holder.last_seen, stored.time)
        case tk.TaskRequeued() | tk.TaskTimedOut():
            t.status, t.agent_id = "released", None  # a queued or dead letter event follows
        case tk.TaskCompleted():
            view.completed[e.agent_id] = view.completed.get(e.agent_id, 0) + 1
            del view.tasks[t.task_id]
        case tk.TaskFailed():
            view.failed[e.agent_id] = view.failed.get(e.agent_id, 0) + 1
            if e.retryable:
                t.status, t.agent_id = "released", None  # a retry or dead letter event follows
            else:
                del view.tasks[t.task_id]
        case tk.TaskCancelled() | tk.TaskDeadLettered():
            del view.tasks[t.task_id]


def plan(
    view: SchedulerView,
    now: datetime,
    policy: Policy,
    tentative: Mapping[str, str] | None = None,
    skip: Container[str] = (),
    failures: list[Unbuilt] | None = None,
) -> list[Planned]:
    """Every command the swarm needs at ``now`` (see the module docstring).

    ``tentative`` maps task id -> agent id for assignments sent but not yet seen on the
    log; they hold a slot of their agent and are not planned again. Command ids in
    ``skip`` are not planned (the runner's dead-lettered ones). With ``failures`` a list,
    a command that cannot be built is appended to it and left out (streams/unbuilt.py).
    """
    tentative = tentative or {}
    out: list[Planned] = []
    for t in view.tasks.values():
        if t.status not in tk.ACTIVE or t.agent_id is None:
            continue
        a = view.agents.get(t.agent_id)
        lifecycle = a.lifecycle if a is not None else "deregistered"
        held_s = (now - t.since).total_seconds() if t.since else 0.0
        reason: tk.RequeueReason | None = None
        if lifecycle == "offline":
            reason = "agent_offline"
        elif lifecycle == "deregistered":
            reason = "agent_deregistered"
        elif lifecycle == "stopped" and t.status == "assigned":
            reason = "agent_stopped"
        elif t.status == "assigned" and held_s > t.lease_timeout_s:
            reason = "lease_expired"
        if reason is not None:
            cid = derived_id("requeue", t.task_id, t.version)
            requeue = (
                None
                if cid in skip
                else build(
                    failures,
                    cid,
                    tk.RequeueTask,
                    task_id=t.task_id,
                    agent_id=t.agent_id,
                    reason=reason,
                    at=now,
                )
            )
            if requeue is not None:
                out.append(Planned(cid, requeue, t.version))
        elif t.status == "running" and held_s > t.run_timeout_s:
            cid = derived_id("run-timeout", t.task_id, t.version)
            timeout = (
                None
                if cid in skip
                else build(
                    failures, cid, tk.TimeOutTask, task_id=t.task_id, agent_id=t.agent_id, at=now
                )
            )
            if timeout is not None:
                out.append(Planned(cid, timeout, t.version))
    for a in view.agents.values():
        if (
            a.lifecycle == "running"
            and (now - a.last_seen).total_seconds() > policy.heartbeat_timeout_s
        ):
            cid = derived_id("offline", a.agent_id, a.version)
            offline = (
                None
                if cid in skip
                else build(
                    failures,
                    cid,
                    ag.MarkAgentOffline,
                    agent_id=a.agent_id,
                    reason="heartbeat_timeout",
                    timeout_s=policy.heartbeat_timeout_s,
                    at=now,
                )
            )
            if offline is not None:
                out.append(Planned(cid, offline, a.version))
    out.extend(_assignments(view, now, policy, tentative, skip, failures))
    return out


def _assignments(
    view: SchedulerView,
    now: datetime,
    policy: Policy,
    tentative: Mapping[str, str],
    skip: Container[str],
    failures: list[Unbuilt] | None,
) -> list[Planned]:
    active = view.load()
    load = {a.agent_id: active.get(a.agent_id, 0) for a in view.agents.values()}
    for agent_id in tentative.values():
        if agent_id in load:
            load[agent_id] += 1
    candidates = {
        a.agent_id: a
        for a in view.agents.values()
        if a.lifecycle == "running"
        and load[a.agent_id] < a.max_concurrent_tasks
        and (now - a.last_seen).total_seconds() <= policy.heartbeat_timeout_s
    }
    if not candidates:
        return []
    queued = [
        t
        for t in view.tasks.values()
        if t.status == "queued"
        and t.task_id not in tentative
        and (t.not_before is None or t.not_before <= now)
    ]
    queued.sort(
        key=lambda t: (
            -effective_priority(
                tk.PRIORITY_RANK[t.priority],
                (now - t.queued_at).total_seconds(),
                policy.aging_interval_s,
            ),
            t.queued_at,
            t.task_id,
        )
    )
    out: list[Planned] = []
    for t in queued:
        if not candidates:
            break
        best: tuple[float, str] | None = None
        for a in candidates.values():
            c = Candidate(
                capabilities=a.capabilities,
                max_concurrent_tasks=a.max_concurrent_tasks,
                load=load[a.agent_id],
                cost_per_task=a.cost_per_task,
                completed=view.completed.get(a.agent_id, 0),
                failed=view.failed.get(a.agent_id, 0),
                tier=view.tiers.get(a.agent_id, "none"),
            )
            if not eligible(c, t.required, t.max_cost):
                continue
            s = score(c, t.required, t.max_cost)
            if best is None or (s, a.agent_id) > best:
                best = (s, a.agent_id)
        if best is None:
            continue
        agent_id = best[1]
        cid = derived_id("assign", t.task_id, t.version)
        assign = (
            None
            if cid in skip
            else build(failures, cid, tk.AssignTask, task_id=t.task_id, agent_id=agent_id, at=now)
        )
        if assign is None:
            continue  # it holds no slot of the agent
        load[agent_id] += 1
        if load[agent_id] >= candidates[agent_id].max_concurrent_tasks:
            del candidates[agent_id]
        out.append(Planned(cid, assign, t.version, task_id=t.task_id, agent_id=agent_id))
    return out
