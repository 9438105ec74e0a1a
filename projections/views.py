"""Views: how each read-model row evolves with the events (pure; the projector writes them).

A row is a plain dict keyed by column name (projections/schema.py). ``evolve_*`` returns
the new row and never raises; an event at or below the row's version is ignored, so
applying an event twice is harmless.
"""

from __future__ import annotations

from typing import Any

from domain import agent as ag
from domain import task as tk
from infra.codec import StoredEvent

Row = dict[str, Any]


def evolve_agent(row: Row | None, stored: StoredEvent) -> Row | None:
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
            row["lifecycle"] = "running"
            row["last_heartbeat_at"] = stored.time
        case ag.AgentStopped():
            row["lifecycle"] = "stopped"
        case ag.AgentMarkedOffline():
            row["lifecycle"] = "offline"
        case ag.CapabilitiesUpdated():
            row["capabilities"] = [c.model_dump() for c in e.capabilities]
        case ag.AgentDeregistered():
            row["lifecycle"] = "deregistered"
    return row


def agent_counts(stored: StoredEvent) -> tuple[str, str] | None:
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


def evolve_task(row: Row | None, stored: StoredEvent) -> Row | None:
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
            row.update(status="queued", agent_id=None, queued_at=stored.time,
                       not_before=e.not_before, progress=0.0, progress_message=None,
                       finished_at=None)
        case tk.TaskAssigned():
            row.update(status="assigned", agent_id=e.agent_id, attempts=e.attempt,
                       assigned_at=stored.time, started_at=None)
        case tk.TaskStarted():
            row.update(status="running", started_at=stored.time)
        case tk.TaskProgressed():
            row.update(progress=e.progress, progress_message=e.message)
        case tk.TaskCompleted():
            row.update(status="completed", result=e.result, quality=e.quality, progress=1.0,
                       finished_at=stored.time)
        case tk.TaskFailed():
            row.update(status="failed", error=e.error, finished_at=stored.time)
        case tk.TaskRequeued() | tk.TaskTimedOut():
            row.update(requeues=row["requeues"] + 1)
        case tk.TaskCancelled():
            row.update(status="cancelled", error=e.reason, finished_at=stored.time)
        case tk.TaskDeadLettered():
            row.update(status="dead_lettered", error=e.reason, finished_at=stored.time)
    return row
