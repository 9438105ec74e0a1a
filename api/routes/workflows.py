"""Workflows: definitions (create, read, update, archive, execute), their runs (read,
cancel) and templates (publish, read, instantiate).

A definition is checked here with ``domain.workflow.check_spec`` before anything is
sent, so an invalid one is a 422 problem naming the field (``steps[2].depends_on``) and
its code, and nothing reaches the log; the decider checks again. Runs are carried out
by the workflow process manager (streams/): ``POST /workflows/{id}/execute`` answers
202 with the run to follow, whose state the read model then shows step by step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Path, Query, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.deps import Cursor, FreshDep, Limit, PoolDep, SettingsDep
from api.dispatch import COMMAND_RESPONSES, REPLAYED, DispatchDep, event_refs
from api.pagination import TEXT, TIME, decode_cursor, encode_cursor
from api.problems import Problem, validation_problem
from api.schemas import (
    ID_PATTERN,
    INT4_MAX,
    MAX_SPEC_BYTES,
    CommandResult,
    Page,
    RunAccepted,
    RunCancel,
    RunPublic,
    TemplateInstantiate,
    TemplatePublic,
    TemplatePublish,
    WorkflowCreate,
    WorkflowExecute,
    WorkflowPublic,
    WorkflowUpdate,
    run_links,
)
from domain import workflow as wf
from domain import workflow_run as wr
from domain.messages import Rejection
from projections import queries

router = APIRouter(prefix="/workflows", tags=["workflows"])
runs_router = APIRouter(prefix="/workflow-runs", tags=["workflows"])
templates_router = APIRouter(prefix="/workflow-templates", tags=["workflows"])

WorkflowIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the workflow id")
]
RunIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the run id")
]
TemplateNamePath = Annotated[str, Path(pattern=wf.TEMPLATE_NAME, description="the template name")]
RunStatus = Literal["pending", "running", "compensating", "completed", "failed", "cancelled"]


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


def _keyset(kind: str, cursor: str | None) -> tuple[datetime, str] | None:
    """The (time, id) key of a newest-first list's cursor; 422 problem if it is not one."""
    key = decode_cursor(kind, cursor, TIME, TEXT)
    return None if key is None else (key[0], key[1])


# definitions ------------------------------------------------------------------------


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def create_workflow(  # type: ignore[no-untyped-def]
    body: WorkflowCreate,
    dispatch: DispatchDep,
):
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
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    status: Annotated[Literal["active", "archived"] | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[WorkflowPublic]:
    """Definitions newest first (by creation, then id, both descending), optionally of
    one status."""
    rows = await queries.list_workflows(
        pool,
        settings.db_schema,
        status=status,
        after=_keyset("workflows", cursor),
        limit=limit + 1,
    )
    items = [WorkflowPublic.from_row(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor("workflows", last["created_at"].isoformat(), last["id"])
    return Page(items=items, next_cursor=next_cursor)


@router.get(
    "/{workflow_id}",
    response_model=WorkflowPublic,
    responses={404: {"description": "no such workflow"}},
)
async def get_workflow(
    workflow_id: WorkflowIdPath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    response: Response,
) -> WorkflowPublic:
    """One definition; ``ETag`` is its aggregate version (for If-Match)."""
    row = await queries.get_workflow(pool, settings.db_schema, workflow_id)
    if row is None:
        raise Problem(404, "workflow_not_found", f"no workflow {workflow_id}", field="workflow_id")
    response.headers["ETag"] = f'"{row["aggregate_version"]}"'
    return WorkflowPublic.from_row(row)


@router.patch("/{workflow_id}", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def update_workflow(  # type: ignore[no-untyped-def]
    workflow_id: WorkflowIdPath,
    body: WorkflowUpdate,
    dispatch: DispatchDep,
    settings: SettingsDep,
    pool: PoolDep,
):
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
        row = await queries.get_workflow(pool, settings.db_schema, workflow_id)
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
async def archive_workflow(  # type: ignore[no-untyped-def]
    workflow_id: WorkflowIdPath,
    dispatch: DispatchDep,
):
    """Archive the definition: it can no longer be updated or executed (410 after)."""
    return await dispatch.execute(dispatch.command(wf.ArchiveWorkflow, workflow_id=workflow_id))


@router.post(
    "/{workflow_id}/execute",
    status_code=202,
    response_model=RunAccepted,
    # 202 is a RunAccepted whether or not the outcome came in time.
    responses={k: v for k, v in COMMAND_RESPONSES.items() if k != 202},
)
async def execute_workflow(  # type: ignore[no-untyped-def]
    workflow_id: WorkflowIdPath,
    dispatch: DispatchDep,
    settings: SettingsDep,
    pool: PoolDep,
    body: Annotated[WorkflowExecute | None, Body()] = None,
):
    """Ask for a run of the definition's current version on ``inputs``: 202 with the run
    (``Location: /workflow-runs/{run_id}``), ``pending`` until it has started.

    A ``run_id`` the read model already has is a 409 (unless the request repeats an
    Idempotency-Key, which replays the first answer).
    """
    body = body or WorkflowExecute()
    schema = settings.db_schema
    if (
        body.run_id is not None
        and dispatch.meta.idempotency_key is None
        and await queries.get_run(pool, schema, body.run_id, steps=False) is not None
    ):
        raise Problem(409, "run_exists", f"run {body.run_id} exists", field="run_id")
    run_id = body.run_id or dispatch.new_id("run", workflow_id)
    command = dispatch.command(
        wf.ExecuteWorkflow, workflow_id=workflow_id, run_id=run_id, inputs=body.inputs
    )
    envelope, outcome = await dispatch.send(command)
    if outcome is not None and outcome.status != "accepted":
        return dispatch.respond(envelope, outcome)
    row = await queries.get_run(pool, schema, run_id, steps=False)
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


# runs -------------------------------------------------------------------------------


@runs_router.get("", response_model=Page[RunPublic])
async def list_runs(
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    workflow_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    status: Annotated[RunStatus | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[RunPublic]:
    """Runs newest first (by request time, then run id, both descending), filtered by
    workflow and/or status; without their steps."""
    rows = await queries.list_runs(
        pool,
        settings.db_schema,
        workflow_id=workflow_id,
        status=status,
        after=_keyset("workflow-runs", cursor),
        limit=limit + 1,
    )
    items = [RunPublic.from_row(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(
            "workflow-runs", last["requested_at"].isoformat(), last["run_id"]
        )
    return Page(items=items, next_cursor=next_cursor)


@runs_router.get(
    "/{run_id}", response_model=RunPublic, responses={404: {"description": "no such run"}}
)
async def get_run(
    run_id: RunIdPath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    response: Response,
) -> RunPublic:
    """One run with each step's state, attempts, task ids, result and timings, and its
    progress (main steps finished of all); ``ETag`` is the run's aggregate version."""
    row = await queries.get_run(pool, settings.db_schema, run_id)
    if row is None:
        raise Problem(404, "run_not_found", f"no run {run_id}", field="run_id")
    response.headers["ETag"] = f'"{row["aggregate_version"]}"'
    return RunPublic.from_row(row)


@runs_router.post("/{run_id}/cancel", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def cancel_run(  # type: ignore[no-untyped-def]
    run_id: RunIdPath,
    dispatch: DispatchDep,
    body: Annotated[RunCancel | None, Body()] = None,
):
    """Cancel a run that has not finished: no further step starts and its unfinished
    tasks are cancelled (409 ``run_finished`` once it has ended; 404 until it started)."""
    reason = (body or RunCancel()).reason
    return await dispatch.execute(
        dispatch.command(wr.CancelWorkflowRun, run_id=run_id, reason=reason)
    )


# templates --------------------------------------------------------------------------


@templates_router.post(
    "", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES
)
async def publish_template(  # type: ignore[no-untyped-def]
    body: TemplatePublish,
    dispatch: DispatchDep,
):
    """Publish a new version of a template (201 with Location
    /workflow-templates/{name}?version={n}); versions never change once published."""
    spec = checked_spec(body.steps, body.compensations)
    command = dispatch.command(
        wf.PublishTemplate,
        name=body.name,
        description=body.description,
        parameters=body.parameters,
        spec=spec,
    )
    envelope, outcome = await dispatch.send(command)
    location = None
    if outcome is not None and outcome.status == "accepted":
        # One event per publication, so the aggregate version is the template version.
        location = f"/workflow-templates/{body.name}?version={outcome.version}"
    return dispatch.respond(envelope, outcome, created_at=location)


@templates_router.get("", response_model=Page[TemplatePublic])
async def list_templates(
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[TemplatePublic]:
    """The latest version of each template, by name."""
    key = decode_cursor("workflow-templates", cursor, TEXT)
    rows = await queries.list_templates(
        pool, settings.db_schema, after=key[0] if key else None, limit=limit + 1
    )
    items = [TemplatePublic.from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=items,
        next_cursor=encode_cursor("workflow-templates", items[-1].name) if more else None,
    )


async def _template(pool: Any, schema: str, name: str, version: int | None) -> dict[str, Any]:
    row = await queries.get_template(pool, schema, name, version)
    if row is None:
        what = f"template {name}" + (f" version {version}" if version is not None else "")
        raise Problem(
            404,
            "template_not_found",
            f"no {what}",
            field="version" if version is not None else "name",
        )
    return row


@templates_router.get(
    "/{name}", response_model=TemplatePublic, responses={404: {"description": "no such template"}}
)
async def get_template(
    name: TemplateNamePath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    response: Response,
    version: Annotated[
        int | None, Query(ge=1, le=INT4_MAX, description="default: the latest")
    ] = None,
) -> TemplatePublic:
    """One version of a template (the latest by default); ``ETag`` is its version."""
    row = await _template(pool, settings.db_schema, name, version)
    response.headers["ETag"] = f'"{row["version"]}"'
    return TemplatePublic.from_row(row)


@templates_router.post(
    "/{name}/instantiate",
    status_code=201,
    response_model=CommandResult,
    responses=COMMAND_RESPONSES,
)
async def instantiate_template(  # type: ignore[no-untyped-def]
    name: TemplateNamePath,
    body: TemplateInstantiate,
    dispatch: DispatchDep,
    settings: SettingsDep,
    pool: PoolDep,
):
    """Make a workflow definition from a template version with ``params`` bound over its
    defaults (201 with Location /workflows/{id}); an unknown or missing parameter is a
    422 naming ``params.<name>``. The template version is read from the read model (a
    version never changes, so that is safe): 404 until it is projected."""
    row = await _template(pool, settings.db_schema, name, body.version)
    declared = {k: wf.ParameterSpec.model_validate(v) for k, v in row["parameters"].items()}
    bound = wf.bind_parameters(declared, body.params)
    if isinstance(bound, Rejection):
        raise Problem.from_rejection(bound)
    workflow_id = body.workflow_id or dispatch.new_id("workflow", name)
    command = dispatch.command(
        wf.CreateWorkflow,
        workflow_id=workflow_id,
        name=body.name or name,
        description=row["description"] if body.description is None else body.description,
        spec=wf.WorkflowSpec.model_validate(row["spec"]),
        params=bound,
        template=f"{name}@{row['version']}",
    )
    return await dispatch.execute(command, created_at=f"/workflows/{workflow_id}")
