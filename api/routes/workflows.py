"""Workflow definitions: create, read, update, archive, execute. Their runs are in
api/routes/runs.py, templates in api/routes/templates.py.

A definition is checked here with ``domain.workflow.check_spec`` before anything is
sent, so an invalid one is a 422 problem naming the field (``steps[2].depends_on``) and
its code, and nothing reaches the log; the decider checks again. Runs are carried out
by the workflow process manager (streams/): ``POST /workflows/{id}/execute`` answers
202 with the run to follow, whose state the read model then shows step by step.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.deps import Cursor, DispatchDep, FreshDep, Limit, ReadModelsDep, WorkflowIdPath
from api.dispatch import COMMAND_RESPONSES, REPLAYED, event_refs
from api.pagination import TEXT, TIME, Keyset
from api.problems import Problem, validation_problem
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.runs import RunAccepted, run_links
from api.schemas.workflows import (
    MAX_SPEC_BYTES,
    WorkflowCreate,
    WorkflowExecute,
    WorkflowPublic,
    WorkflowUpdate,
)
from domain import workflow as wf
from projections import queries

router = APIRouter(prefix="/workflows", tags=["workflows"])

#: Newest first: by creation, then id, both descending.
WORKFLOWS = Keyset("workflows", (TIME, TEXT), lambda row: (row["created_at"], row["id"]))


def checked_spec(steps: list[wf.StepSpec], compensations: list[wf.StepSpec]) -> wf.WorkflowSpec:
    """The definition made of ``steps`` and ``compensations``, or a 422 problem: a shape
    error, a definition too large for the log (``spec_too_large``), or the first
    ``check_spec`` problem, naming its field (``steps[2].depends_on``) and code."""
    try:
        spec = wf.WorkflowSpec(steps=tuple(steps), compensations=tuple(compensations))
    except ValidationError as exc:
        raise validation_problem(exc.errors(), prefix=("body",)) from None
    size = len(orjson.dumps(spec.model_dump(mode="json")))
    if size > MAX_SPEC_BYTES:
        raise Problem(
            422,
            "spec_too_large",
            f"the steps are {size} bytes as JSON; at most {MAX_SPEC_BYTES} are allowed",
            field="steps",
        )
    problem = wf.check_spec(spec)
    if problem is not None:
        raise Problem(422, problem.code, problem.detail, field=problem.field)
    return spec


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def create_workflow(
    body: WorkflowCreate,
    dispatch: DispatchDep,
) -> JSONResponse:
    """Create a definition at version 1 (201 with Location /workflows/{id}); an invalid
    DAG is a 422 naming the step's field, and nothing is written."""
    spec = checked_spec(body.steps, body.compensations)
    workflow_id = body.id or dispatch.new_id("workflow")
    command = dispatch.command(
        wf.CreateWorkflow,
        workflow_id=workflow_id,
        name=body.name,
        description=body.description,
        spec=spec,
    )
    return await dispatch.execute(command, created_at=f"/workflows/{workflow_id}")


@router.get("", response_model=Page[WorkflowPublic])
async def list_workflows(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    status: Annotated[wf.WorkflowStatus | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[WorkflowPublic]:
    """Definitions newest first (by creation, then id, both descending), optionally of
    one status."""
    rows = await read_models(
        queries.list_workflows, status=status, after=WORKFLOWS.after(cursor), limit=limit + 1
    )
    return WORKFLOWS.page(rows, limit, WorkflowPublic.from_row)


@router.get(
    "/{workflow_id}",
    response_model=WorkflowPublic,
    responses={404: {"description": "no such workflow"}},
)
async def get_workflow(
    workflow_id: WorkflowIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> WorkflowPublic:
    """One definition; ``ETag`` is its aggregate version (for If-Match)."""
    row = await read_models(queries.get_workflow, workflow_id)
    if row is None:
        raise Problem(404, "workflow_not_found", f"no workflow {workflow_id}", field="workflow_id")
    response.headers["ETag"] = f'"{row["aggregate_version"]}"'
    return WorkflowPublic.from_row(row)


@router.patch("/{workflow_id}", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def update_workflow(
    workflow_id: WorkflowIdPath,
    body: WorkflowUpdate,
    dispatch: DispatchDep,
    read_models: ReadModelsDep,
) -> JSONResponse:
    """Replace the steps, name and/or description; the definition's version goes up by
    one (runs already started keep theirs).

    ``steps`` and ``compensations`` are the new definition together (no compensations
    if omitted). Without ``steps``, the definition's steps stay as the read model has
    them, and the update is then conditional on that read (412 if the definition
    changed since, as with If-Match), so it never silently undoes another update.
    """
    if body.model_dump(exclude_unset=True) == {}:
        raise Problem(422, "empty_update", "nothing to change", field="body")
    steps, compensations = body.steps, body.compensations
    expected: int | None = None
    if steps is None:
        row = await read_models(queries.get_workflow, workflow_id)
        if row is None:
            raise Problem(
                404, "workflow_not_found", f"no workflow {workflow_id}", field="workflow_id"
            )
        current = wf.WorkflowSpec.model_validate(row["spec"])
        steps = list(current.steps)
        compensations = list(current.compensations) if compensations is None else compensations
        expected = row["aggregate_version"]
    spec = checked_spec(steps, compensations or [])
    command = dispatch.command(
        wf.UpdateWorkflow,
        workflow_id=workflow_id,
        name=body.name,
        description=body.description,
        spec=spec,
    )
    return await dispatch.execute(command, expected_version=expected)


@router.delete("/{workflow_id}", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def archive_workflow(
    workflow_id: WorkflowIdPath,
    dispatch: DispatchDep,
) -> JSONResponse:
    """Archive the definition: it can no longer be updated or executed (410 after)."""
    return await dispatch.execute(dispatch.command(wf.ArchiveWorkflow, workflow_id=workflow_id))


@router.post(
    "/{workflow_id}/execute",
    status_code=202,
    response_model=RunAccepted,
    # 202 is a RunAccepted whether or not the outcome came in time.
    responses={k: v for k, v in COMMAND_RESPONSES.items() if k != 202},
)
async def execute_workflow(
    workflow_id: WorkflowIdPath,
    dispatch: DispatchDep,
    read_models: ReadModelsDep,
    body: Annotated[WorkflowExecute | None, Body()] = None,
) -> JSONResponse:
    """Ask for a run of the definition's current version on ``inputs``: 202 with the run
    (``Location: /workflow-runs/{run_id}``), ``pending`` until it has started.

    A ``run_id`` the read model already has is a 409 (unless the request repeats an
    Idempotency-Key, which replays the first answer).
    """
    body = body or WorkflowExecute()
    if (
        body.run_id is not None
        and dispatch.meta.idempotency_key is None
        and await read_models(queries.get_run, body.run_id, steps=False) is not None
    ):
        raise Problem(409, "run_exists", f"run {body.run_id} exists", field="run_id")
    run_id = body.run_id or dispatch.new_id("run", workflow_id)
    command = dispatch.command(
        wf.ExecuteWorkflow, workflow_id=workflow_id, run_id=run_id, inputs=body.inputs
    )
    envelope, outcome = await dispatch.send(command)
    if outcome is not None and outcome.status != "accepted":
        return dispatch.respond(envelope, outcome)
    row = await read_models(queries.get_run, run_id, steps=False)
    accepted = RunAccepted(
        run_id=run_id,
        workflow_id=workflow_id,
        status="pending" if row is None else row["status"],
        version=(outcome.state or {}).get("version") if outcome is not None else None,
        command_id=envelope.command_id,
        events=event_refs(outcome) if outcome is not None else [],
        links=run_links(run_id, workflow_id),
    )
    headers = {"Location": f"/workflow-runs/{run_id}"}
    if outcome is not None and outcome.duplicate:
        headers[REPLAYED] = "true"
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers=headers)
