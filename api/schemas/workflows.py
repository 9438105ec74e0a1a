"""Workflow definitions: create, update, execute; a definition as the read model has it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from api.schemas.common import BoundedJson, Id, In
from domain.workflow import MAX_STEPS, Description, StepSpec, WorkflowName

#: Most bytes a workflow's steps (with their payloads) may take as JSON: the definition
#: travels whole in its events, and in every run's start event.
MAX_SPEC_BYTES = 256 * 1024

Steps = Annotated[
    list[StepSpec],
    Field(
        min_length=1,
        max_length=MAX_STEPS,
        description="the steps, a DAG through depends_on (domain/workflow.py StepSpec)",
    ),
]
Compensations = Annotated[
    list[StepSpec],
    Field(
        max_length=MAX_STEPS,
        description="steps run when a step with on_failure 'compensate' names them",
    ),
]


class WorkflowCreate(In):
    """Create a workflow definition; ``id`` defaults to a fresh uuid4."""

    id: Id | None = None
    name: WorkflowName
    description: Description = ""
    steps: Steps
    compensations: Compensations = Field(default_factory=list)


class WorkflowUpdate(In):
    """Replace a definition's steps (with its compensations: none if omitted), name
    and/or description (omitted: unchanged); the definition's version goes up by one."""

    name: WorkflowName | None = None
    description: Description | None = None
    steps: Steps | None = None
    compensations: Compensations | None = None


class WorkflowExecute(In):
    """Run the definition's current version on ``inputs``; ``run_id`` defaults to a
    fresh uuid4 (derived from the Idempotency-Key when there is one)."""

    run_id: Id | None = None
    inputs: BoundedJson = Field(default_factory=dict)


class WorkflowPublic(BaseModel):
    """A workflow definition as the read model has it. ``version`` is the definition's
    version; ``aggregate_version`` (also the ``ETag``) is what If-Match compares, and
    executions raise it too."""

    id: str
    name: str
    description: str
    version: int
    status: str
    steps: list[dict[str, Any]]
    compensations: list[dict[str, Any]]
    params: dict[str, Any]
    template: str | None
    runs: int
    created_at: datetime
    updated_at: datetime
    aggregate_version: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkflowPublic:
        """From a row of ``projections.queries.get_workflow``/``list_workflows``."""
        spec = row["spec"]
        return cls.model_validate(
            {**row, "steps": spec["steps"], "compensations": spec.get("compensations", [])}
        )
