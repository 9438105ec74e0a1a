"""Workflow runs: cancel; a run with its steps, and the answer to an execution."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from api.schemas.commands import EventRef
from api.schemas.common import In
from domain import workflow_run as wr
from domain.task import DEFAULT_CANCEL_REASON, CancelReason

#: A run's status in the read model: the decider's, or ``pending`` before it started.
RunStatus = Literal["pending", wr.RunStatus]


class RunCancel(In):
    """Cancel a run that has not finished."""

    reason: CancelReason = DEFAULT_CANCEL_REASON


class StepPublic(BaseModel):
    """One step of a run: its state, tries, tasks, result and timings.

    ``items_total``/``items_done``: a map step's items and how many succeeded (1 for a
    plain step); ``attempts`` the highest attempt of any of its tasks; ``task_ids`` every
    task scheduled for it; ``error`` why it failed or was skipped; ``duration_s`` from
    start to finish (seconds).
    """

    step_id: str
    kind: Literal["step", "compensation"]
    task_type: str
    status: str
    items_total: int | None
    items_done: int
    attempts: int
    task_ids: list[str]
    result: Any = None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    compensating_for: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StepPublic:
        """From a step of ``projections.queries.get_run``."""
        start, end = row["started_at"], row["finished_at"]
        duration = (end - start).total_seconds() if start and end else None
        return cls.model_validate({**row, "duration_s": duration})


class Progress(BaseModel):
    """How many of the run's steps (not counting compensations) have finished."""

    done: int
    total: int


def run_links(run_id: str, workflow_id: str) -> dict[str, str]:
    """Where to read a run, follow its events, cancel it, and read its workflow."""
    return {
        "self": f"/workflow-runs/{run_id}",
        "events": f"/events?run_id={run_id}&from=beginning",
        "cancel": f"/workflow-runs/{run_id}/cancel",
        "workflow": f"/workflows/{workflow_id}",
    }


class RunPublic(BaseModel):
    """A workflow run as the read model has it; ``steps`` only on ``GET /workflow-runs/{id}``.

    ``status`` is pending (requested, not started yet), running, compensating,
    completed, failed or cancelled; ``version`` the definition version it runs.
    """

    run_id: str
    workflow_id: str
    version: int
    status: str
    inputs: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    failed_step: str | None
    compensated: bool
    progress: Progress
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    aggregate_version: int
    steps: list[StepPublic] | None = None
    links: dict[str, str]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunPublic:
        """From a row of ``projections.queries.get_run``/``list_runs``."""
        steps = row.get("steps")
        return cls.model_validate(
            {
                **row,
                "progress": {"done": row["steps_done"], "total": row["steps_total"]},
                "steps": None if steps is None else [StepPublic.from_row(s) for s in steps],
                "links": run_links(row["run_id"], row["workflow_id"]),
            }
        )


class RunAccepted(BaseModel):
    """An execution request on the log: the run to follow (``links.self``).

    ``status`` is the read model's when it already has the run, else ``pending``;
    ``version`` the definition version the run gets (None if the outcome did not come
    in time).
    """

    run_id: str
    workflow_id: str
    status: str
    version: int | None = None
    command_id: str
    events: list[EventRef] = []
    links: dict[str, str]
