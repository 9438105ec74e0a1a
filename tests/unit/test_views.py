"""The read-model views, pure: the agents and tasks rows evolve with the events, and an
event at or below a row's version changes nothing (so replaying a batch is harmless)."""

from __future__ import annotations

from typing import Any

from domain import agent as ag
from domain import task as tk
from domain.recorded import RecordedEvent
from projections.views import Row, agent_counts, evolve_agent, evolve_task, fold_rows
from tests.unit.logs import Log, t


def fold_agent(events: list[RecordedEvent], row: Row | None = None) -> Row | None:
    for e in events:
        row = evolve_agent(row, e)
    return row


def fold_task(events: list[RecordedEvent], row: Row | None = None) -> Row | None:
    for e in events:
        row = evolve_task(row, e)
    return row


def _agent_log() -> Log:
    log = Log()
    caps = (ag.Capability(name="python", level=0.7),)
    log.add(
        "a1",
        0,
        ag.AgentRegistered(
            agent_id="a1", name="Ada", capabilities=caps, max_concurrent_tasks=2, cost_per_task=250
        ),
    )
    log.add("a1", 1, ag.AgentStarted(agent_id="a1"))
    log.add("a1", 5, ag.HeartbeatRecorded(agent_id="a1"))
    log.add("a1", 30, ag.AgentMarkedOffline(agent_id="a1", reason="heartbeat_timeout"))
    log.add("a1", 40, ag.HeartbeatRecorded(agent_id="a1", resumed=True))
    log.add(
        "a1",
        50,
        ag.CapabilitiesUpdated(
            agent_id="a1", capabilities=(ag.Capability(name="rust", level=0.4),)
        ),
    )
    log.add("a1", 60, ag.AgentStopped(agent_id="a1"))
    return log


def test_an_agent_row_follows_the_agent_lifecycle() -> None:
    log = _agent_log()
    rows = []
    row: Row | None = None
    for e in log.events:
        row = evolve_agent(row, e)
        assert row is not None
        rows.append(row)

    assert [r["lifecycle"] for r in rows] == [
        "registered",
        "running",
        "running",
        "offline",
        "running",
        "running",
        "stopped",
    ]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    final = rows[-1]
    assert final == {
        "agent_id": "a1",
        "name": "Ada",
        "capabilities": [{"name": "rust", "level": 0.4}],
        "max_concurrent_tasks": 2,
        "cost_per_task": 250,
        "lifecycle": "stopped",
        "registered_at": t(0),
        "last_heartbeat_at": t(40),
        "tasks_completed": 0,
        "tasks_failed": 0,
        "tasks_lost": 0,
        "version": 7,
        "updated_at": t(60),
    }


def test_a_deregistered_agent_row_says_so() -> None:
    log = _agent_log()
    log.add("a1", 70, ag.AgentDeregistered(agent_id="a1"))

    row = fold_agent(log.events)

    assert row is not None and row["lifecycle"] == "deregistered" and row["version"] == 8


def test_an_agent_event_before_registration_creates_no_row() -> None:
    log = _agent_log()

    assert evolve_agent(None, log.events[1]) is None


def test_an_agent_event_at_or_below_the_row_version_is_ignored() -> None:
    log = _agent_log()
    row = fold_agent(log.events)
    assert row is not None

    for old in log.events:  # every event again, the newest included
        assert evolve_agent(row, old) == row
    assert fold_agent(log.events, row) == row


def test_replaying_a_prefix_of_agent_events_changes_nothing() -> None:
    log = _agent_log()
    halfway = fold_agent(log.events[:4])

    again = fold_agent(log.events[:4], halfway)

    assert again == halfway
    assert fold_agent(log.events[4:], again) == fold_agent(log.events)


def _task_log() -> Log:
    log = Log()
    log.add(
        "t1",
        0,
        tk.TaskSubmitted(
            task_id="t1",
            type="summarise",
            payload={"doc": 7},
            required_capabilities=("python",),
            priority="high",
            max_cost=900,
            lease_timeout_s=30.0,
            run_timeout_s=60.0,
            max_attempts=3,
        ),
    )
    log.add("t1", 0, tk.TaskQueued(task_id="t1"))
    log.add("t1", 2, tk.TaskAssigned(task_id="t1", agent_id="a1", attempt=1))
    log.add("t1", 40, tk.TaskRequeued(task_id="t1", agent_id="a1", reason="lease_expired"))
    log.add("t1", 40, tk.TaskQueued(task_id="t1", reason="requeued"))
    log.add("t1", 41, tk.TaskAssigned(task_id="t1", agent_id="a2", attempt=2))
    log.add("t1", 42, tk.TaskStarted(task_id="t1", agent_id="a2"))
    log.add("t1", 43, tk.TaskProgressed(task_id="t1", agent_id="a2", progress=0.5, message="half"))
    log.add("t1", 44, tk.TaskFailed(task_id="t1", agent_id="a2", error="oom", retryable=True))
    log.add("t1", 44, tk.TaskRetryScheduled(task_id="t1", attempt=3, not_before=t(46)))
    log.add("t1", 47, tk.TaskAssigned(task_id="t1", agent_id="a1", attempt=3))
    log.add("t1", 48, tk.TaskStarted(task_id="t1", agent_id="a1"))
    log.add(
        "t1", 50, tk.TaskCompleted(task_id="t1", agent_id="a1", result={"ok": True}, quality=0.9)
    )
    return log


def test_a_task_row_follows_the_task_lifecycle() -> None:
    log = _task_log()
    rows = []
    row: Row | None = None
    for e in log.events:
        row = evolve_task(row, e)
        assert row is not None
        rows.append(row)

    assert [(r["status"], r["agent_id"], r["attempts"]) for r in rows] == [
        ("queued", None, 0),
        ("queued", None, 0),
        ("assigned", "a1", 1),
        ("assigned", "a1", 1),  # requeued: queued follows in the same command
        ("queued", None, 1),
        ("assigned", "a2", 2),
        ("running", "a2", 2),
        ("running", "a2", 2),
        ("failed", "a2", 2),
        ("queued", None, 2),
        ("assigned", "a1", 3),
        ("running", "a1", 3),
        ("completed", "a1", 3),
    ]
    assert rows[7]["progress"] == 0.5 and rows[7]["progress_message"] == "half"
    assert rows[9]["not_before"] == t(46) and rows[9]["progress"] == 0.0
    assert rows[9]["finished_at"] is None
    expected: dict[str, Any] = {
        "task_id": "t1",
        "type": "summarise",
        "payload": {"doc": 7},
        "required_capabilities": ["python"],
        "priority": "high",
        "priority_rank": 2,
        "max_cost": 900,
        "lease_timeout_s": 30.0,
        "run_timeout_s": 60.0,
        "max_attempts": 3,
        "status": "completed",
        "attempts": 3,
        "requeues": 1,
        "agent_id": "a1",
        "progress": 1.0,
        "progress_message": None,
        "result": {"ok": True},
        "quality": 0.9,
        "error": "oom",
        "not_before": t(46),
        "submitted_at": t(0),
        "queued_at": t(44),
        "assigned_at": t(47),
        "started_at": t(48),
        "finished_at": t(50),
        "version": 13,
        "updated_at": t(50),
    }
    assert rows[-1] == expected


def test_a_cancelled_task_row_keeps_the_reason() -> None:
    log = Log()
    log.add(
        "t2",
        0,
        tk.TaskSubmitted(
            task_id="t2",
            type="x",
            payload={},
            required_capabilities=(),
            priority="low",
            max_cost=None,
            lease_timeout_s=30.0,
            run_timeout_s=60.0,
            max_attempts=1,
        ),
    )
    log.add("t2", 0, tk.TaskQueued(task_id="t2"))
    log.add("t2", 9, tk.TaskCancelled(task_id="t2", reason="no longer needed"))

    row = fold_task(log.events)

    assert row is not None
    assert (row["status"], row["error"], row["finished_at"], row["version"]) == (
        "cancelled",
        "no longer needed",
        t(9),
        3,
    )


def test_a_dead_lettered_task_row_is_finished() -> None:
    log = Log()
    log.add(
        "t3",
        0,
        tk.TaskSubmitted(
            task_id="t3",
            type="x",
            payload={},
            required_capabilities=(),
            priority="low",
            max_cost=None,
            lease_timeout_s=30.0,
            run_timeout_s=60.0,
            max_attempts=1,
        ),
    )
    log.add("t3", 0, tk.TaskQueued(task_id="t3"))
    log.add("t3", 1, tk.TaskAssigned(task_id="t3", agent_id="a1", attempt=1))
    log.add("t3", 2, tk.TaskStarted(task_id="t3", agent_id="a1"))
    log.add("t3", 70, tk.TaskTimedOut(task_id="t3", agent_id="a1"))
    log.add("t3", 70, tk.TaskDeadLettered(task_id="t3", reason="1 of 1 attempts used"))

    row = fold_task(log.events)

    assert row is not None
    assert (row["status"], row["requeues"], row["finished_at"]) == ("dead_lettered", 1, t(70))


def test_a_task_event_at_or_below_the_row_version_is_ignored() -> None:
    log = _task_log()
    row = fold_task(log.events)
    assert row is not None

    for old in log.events:
        assert evolve_task(row, old) == row
    assert fold_task(log.events, row) == row


def test_applying_task_events_twice_does_not_count_twice() -> None:
    log = _task_log()
    once = fold_task(log.events)
    halfway = fold_task(log.events[:6])

    # A batch replayed after a crash: the first six again, then the rest.
    twice = fold_task(log.events, halfway)

    assert twice == once
    assert twice is not None and twice["requeues"] == 1


def test_agent_counters_come_from_completed_failed_and_lost_tasks() -> None:
    log = _task_log()

    counted = [c for e in log.events if (c := agent_counts(e)) is not None]

    assert counted == [
        ("a1", "tasks_lost"),
        ("a2", "tasks_failed"),
        ("a1", "tasks_completed"),
    ]


def test_a_heartbeat_sent_earlier_but_decided_later_does_not_move_last_heartbeat_back() -> None:
    log = Log()
    log.add(
        "a1",
        0,
        ag.AgentRegistered(
            agent_id="a1", name="Ada", capabilities=(), max_concurrent_tasks=1, cost_per_task=0
        ),
    )
    log.add("a1", 1, ag.AgentStarted(agent_id="a1"))
    log.add("a1", 12, ag.HeartbeatRecorded(agent_id="a1", sent_at=t(12)))
    log.add("a1", 10, ag.HeartbeatRecorded(agent_id="a1", sent_at=t(10)))  # decided after

    row = fold_agent(log.events)

    assert row is not None and row["version"] == 4
    assert row["last_heartbeat_at"] == t(12)


def test_the_log_folds_to_rows_with_each_agents_task_counters() -> None:
    log = _agent_log()
    log.add("t1", 70, tk.TaskCompleted(task_id="t1", agent_id="a1", result={}, quality=1.0))

    agents, tasks = fold_rows(log.events)

    assert agents["a1"]["lifecycle"] == "stopped"
    assert agents["a1"]["tasks_completed"] == 1  # counted though the task has no row
    assert tasks == {"t1": None}  # an event without its submission folds to no row
