"""Workflow templates: publish a version, list, read, instantiate into a definition."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from api.deps import (
    Cursor,
    DispatchDep,
    FreshDep,
    Limit,
    ReadModels,
    ReadModelsDep,
    TemplateNamePath,
)
from api.dispatch import COMMAND_RESPONSES
from api.pagination import TEXT, Keyset
from api.problems import Problem
from api.routes.workflows import checked_spec
from api.schemas.commands import CommandResult
from api.schemas.common import INT4_MAX, Page
from api.schemas.templates import TemplateInstantiate, TemplatePublic, TemplatePublish
from domain import workflow as wf
from domain.messages import Rejection
from projections import queries

router = APIRouter(prefix="/workflow-templates", tags=["workflows"])

#: The latest version of each template, by name.
TEMPLATES = Keyset("workflow-templates", (TEXT,), lambda row: (row["name"],))


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def publish_template(
    body: TemplatePublish,
    dispatch: DispatchDep,
) -> JSONResponse:
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


@router.get("", response_model=Page[TemplatePublic])
async def list_templates(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[TemplatePublic]:
    """The latest version of each template, by name."""
    rows = await read_models(queries.list_templates, after=TEMPLATES.after(cursor), limit=limit + 1)
    return TEMPLATES.page(rows, limit, TemplatePublic.from_row)


async def _template(read_models: ReadModels, name: str, version: int | None) -> dict[str, Any]:
    """The template version from the read model; a 404 problem if it has none."""
    row = await read_models(queries.get_template, name, version)
    if row is None:
        what = f"template {name}" + (f" version {version}" if version is not None else "")
        raise Problem(
            404,
            "template_not_found",
            f"no {what}",
            field="version" if version is not None else "name",
        )
    return row


@router.get(
    "/{name}", response_model=TemplatePublic, responses={404: {"description": "no such template"}}
)
async def get_template(
    name: TemplateNamePath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
    version: Annotated[
        int | None, Query(ge=1, le=INT4_MAX, description="default: the latest")
    ] = None,
) -> TemplatePublic:
    """One version of a template (the latest by default); ``ETag`` is its version."""
    row = await _template(read_models, name, version)
    response.headers["ETag"] = f'"{row["version"]}"'
    return TemplatePublic.from_row(row)


@router.post(
    "/{name}/instantiate",
    status_code=201,
    response_model=CommandResult,
    responses=COMMAND_RESPONSES,
)
async def instantiate_template(
    name: TemplateNamePath,
    body: TemplateInstantiate,
    dispatch: DispatchDep,
    read_models: ReadModelsDep,
) -> JSONResponse:
    """Make a workflow definition from a template version with ``params`` bound over its
    defaults (201 with Location /workflows/{id}); an unknown or missing parameter is a
    422 naming ``params.<name>``. The template version is read from the read model (a
    version never changes, so that is safe): 404 until it is projected."""
    row = await _template(read_models, name, body.version)
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
