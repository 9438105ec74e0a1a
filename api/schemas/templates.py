"""Workflow templates: publish a version, instantiate it; a template version."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from api.schemas.common import INT4_MAX, BoundedJson, Id, In
from api.schemas.workflows import Compensations, Steps
from domain.workflow import TEMPLATE_NAME, Description, ParameterSpec, WorkflowName

TemplateName = Annotated[
    str, Field(pattern=TEMPLATE_NAME, description="lower-case letters, digits, . _ -")
]
ParameterName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class TemplatePublish(In):
    """Publish a new version of the template ``name`` (version 1 if it is new)."""

    name: TemplateName
    description: Description = ""
    parameters: dict[ParameterName, ParameterSpec] = Field(default_factory=dict, max_length=100)
    steps: Steps
    compensations: Compensations = Field(default_factory=list)


class TemplateInstantiate(In):
    """Make a workflow definition from a template version (the latest when ``version``
    is omitted), its expressions seeing the bound parameters as ``params``."""

    params: BoundedJson = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=INT4_MAX)
    workflow_id: Id | None = None
    name: WorkflowName | None = None
    description: Description | None = None


class TemplatePublic(BaseModel):
    """One version of a workflow template."""

    name: str
    version: int
    description: str
    parameters: dict[str, dict[str, Any]]
    steps: list[dict[str, Any]]
    compensations: list[dict[str, Any]]
    published_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TemplatePublic:
        """From a row of ``projections.queries.get_template``/``list_templates``."""
        spec = row["spec"]
        return cls.model_validate(
            {**row, "steps": spec["steps"], "compensations": spec.get("compensations", [])}
        )
