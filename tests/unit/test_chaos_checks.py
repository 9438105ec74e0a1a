"""bench/chaos's checks on hand-written logs: each passes on a clean log and fails, naming
what is wrong, on the fault it looks for (a task submitted twice or never answered, a
task completed twice, not at all or too late, a version gap, an event twice)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.chaos import (
    ChaosConfig,
    ChaosReport,
    check_completions,
    check_sequences,
    check_submissions,
)
from domain import task as tk
from tests.unit.logs import Log, t

CONFIG = ChaosConfig(tasks=2, settle_timeout_s=60.0)


def submitted(task_id: str) -> tk.TaskSubmitted:
    return tk.TaskSubmitted(
        task_id=task_id,
        type="chaos",
        payload={},
        required_capabilities=("chaos",),
        priority="normal",
        max_cost=None,
        lease_timeout_s=30.0,
        run_timeout_s=600.0,
        max_attempts=20,
    )


def lifecycle(log: Log, task_id: str, done_at: float) -> None:
    log.add(task_id, 0, submitted(task_id))
    log.add(task_id, 1, tk.TaskAssigned(task_id=task_id, agent_id="a", attempt=1))
    log.add(task_id, 2, tk.TaskStarted(task_id=task_id, agent_id="a"))
    log.add(task_id, done_at, tk.TaskCompleted(task_id=task_id, agent_id="a", result={}, quality=1))


def report(*accepted: str) -> ChaosReport:
    return ChaosReport(config=CONFIG, run="r", log_dir=Path("."), accepted=set(accepted))


def test_a_clean_run_passes_every_log_check() -> None:
    log = Log()
    lifecycle(log, "t1", 5)
    lifecycle(log, "t2", 8)
    r = report("t1", "t2")

    assert check_submissions(log.events, r).ok
    assert all(c.ok for c in check_completions(log.events, r, faults_end=t(4)))
    assert r.completed == 2
    assert r.settle_s == 4.0
    assert check_sequences(log.events).ok


def test_a_task_submitted_twice_or_never_acknowledged_fails_the_submission_check() -> None:
    log = Log()
    lifecycle(log, "t1", 5)
    log.add("t1", 6, submitted("t1"))
    log.add("t3", 6, submitted("t3"))

    check = check_submissions(log.events, report("t1", "t2"))

    assert not check.ok
    assert "1 submitted twice" in check.detail
    assert "1 accepted but not on the log, e.g. ['t2']" in check.detail
    assert "1 on the log but never answered 201, e.g. ['t3']" in check.detail


def test_a_task_completed_twice_or_left_running_fails_the_completion_check() -> None:
    log = Log()
    lifecycle(log, "t1", 5)
    log.add("t1", 6, tk.TaskCompleted(task_id="t1", agent_id="b", result={}, quality=1))
    log.add("t2", 0, submitted("t2"))
    log.add("t2", 1, tk.TaskAssigned(task_id="t2", agent_id="a", attempt=1))
    log.add("t2", 2, tk.TaskStarted(task_id="t2", agent_id="a"))

    once, in_time = check_completions(log.events, report("t1", "t2"), faults_end=t(0))

    assert not once.ok
    assert "1 completed twice" in once.detail
    assert "t2 v3 TaskStarted" in once.detail
    assert not in_time.ok


def test_a_completion_later_than_the_bound_fails_the_time_check() -> None:
    log = Log()
    lifecycle(log, "t1", 5)
    lifecycle(log, "t2", 70)

    once, in_time = check_completions(log.events, report("t1", "t2"), faults_end=t(3))

    assert once.ok
    assert not in_time.ok
    assert in_time.detail == "last completion 67.0 s after"


def test_a_version_gap_or_a_repeated_event_fails_the_sequence_check() -> None:
    log = Log()
    lifecycle(log, "t1", 5)
    lifecycle(log, "t2", 5)
    gap = [e for e in log.events if not (e.aggregate_id == "t1" and e.version == 2)]
    repeated = [*log.events, log.events[0]]
    renumbered = [
        dataclasses.replace(e, version=1) if e.aggregate_id == "t2" and e.version == 2 else e
        for e in log.events
    ]

    assert "aggregates with a gap or repeat" in check_sequences(gap).detail
    assert "1 event ids twice" in check_sequences(repeated).detail
    assert not check_sequences(renumbered).ok
