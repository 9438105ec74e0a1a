"""Workflow runs: list, read (each step's state), cancel.

A run is carried out by the workflow process manager (streams/); it is asked for by
``POST /workflows/{id}/execute`` (api/routes/workflows.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse

from api.deps import Cursor, DispatchDep, FreshDep, Limit, ReadModelsDep, RunIdPath
from api.dispatch import COMMAND_RESPONSES
from api.pagination import TEXT, TIME, Keyset
from api.problems import Problem
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.runs import RunCancel, RunPublic, RunStatus
from domain import workflow_run as wr
from projections import queries

router = APIRouter(prefix="/workflow-runs", tags=["workflows"])

#: Newest first: by request time, then run id, both descending.
RUNS = Keyset("workflow-runs", (TIME, TEXT), lambda row: (row["requested_at"], row["run_id"]))


@router.get("", response_model=Page[RunPublic])
async def list_runs(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    workflow_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    status: Annotated[RunStatus | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[RunPublic]:
    """Runs newest first (by request time, then run id, both descending), filtered by
    workflow and/or status; without their steps."""
    rows = await read_models(
        queries.list_runs,
        workflow_id=workflow_id,
        status=status,
        after=RUNS.after(cursor),
        limit=limit + 1,
    )
    return RUNS.page(rows, limit, RunPublic.from_row)


@router.get("/{run_id}", response_model=RunPublic, responses={404: {"description": "no such run"}})
async def get_run(
    run_id: RunIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> RunPublic:
    """One run with each step's state, attempts, task ids, result and timings, and its
    progress (main steps finished of all); ``ETag`` is the run's aggregate version."""
    row = await read_models(queries.get_run, run_id)
    if row is None:
        raise Problem(404, "run_not_found", f"no run {run_id}", field="run_id")
    response.headers["ETag"] = f'"{row["aggregate_version"]}"'
    return RunPublic.from_row(row)


@router.post("/{run_id}/cancel", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def cancel_run(
    run_id: RunIdPath,
    dispatch: DispatchDep,
    body: Annotated[RunCancel | None, Body()] = None,
) -> JSONResponse:
    """Cancel a run that has not finished: no further step starts and its unfinished
    tasks are cancelled (409 ``run_finished`` once it has ended; 404 until it started)."""
    reason = (body or RunCancel()).reason
    return await dispatch.execute(
        dispatch.command(wr.CancelWorkflowRun, run_id=run_id, reason=reason)
    )
