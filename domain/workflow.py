"""Workflow definitions and templates: validated DAGs of steps, and their two deciders.

A workflow is a DAG of *steps*; each step runs as a task (or, for a *map* step, one task
per item of a list). A definition is an aggregate (``workflow``): created, updated (each
update bumps its version; a run keeps the version it started with, carried whole in its
start event), archived, and executed (``WorkflowExecutionRequested``; the workflow
process manager, streams/workflow.py, then starts the run on the ``workflow_run``
aggregate, domain/workflow_run.py). A template (``workflow_template``) is a named,
versioned definition with declared parameters; instantiating one makes a definition
whose expressions see the bound parameters as ``params``.

Expressions (``when``, ``gate``, ``payload_from`` values, a map's ``items``) are JMESPath
(https://jmespath.org/specification.html, the ``jmespath`` library), evaluated over the
*context*::

    {"inputs": {...},            # the run's inputs
     "params": {...},            # the template parameters bound at instantiation
     "steps": {"<step id>": {"status": "completed"|"failed"|"skipped", "result": ...,
                             "error": ...}},   # finished upstream steps only
     "item": ..., "index": n,    # map steps: the item this task is for, 0-based
     "result": ...}              # gates only: the step's result

Truthiness is JMESPath's: ``false``, ``null``, ``""``, ``[]`` and ``{}`` are false.
Expressions are bounded (domain/expressions.py): ``check_spec`` refuses one that is too
long or nests too deeply, and an evaluation that fails or runs over its budget fails the
step with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from domain.expressions import (  # noqa: F401 (re-exported: evaluated through this module too)
    MAX_SPEC_EXPRESSION_CHARS,
    ExpressionError,
    check_expression,
    evaluate,
    holds,
    parsed_tree,
    truthy,
)
from domain.messages import Command, Decider, Event, Message, Rejection, rejected
from domain.task import Priority

WORKFLOW = "workflow"
TEMPLATE = "workflow_template"

STEP_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
"""Step ids are JMESPath identifiers, so ``steps.<id>.result`` needs no quoting."""

MAX_STEPS = 200

OnFailure = Literal["fail", "continue", "compensate"]


class RetryPolicy(Message):
    """How often a step's task is tried, and how long to wait between tries (seconds).

    Attempt ``n``'s retry waits ``min(backoff_max_s, backoff_base_s * 2 ** (n - 1))``
    times a deterministic jitter in [0.5, 1] (domain/backoff.py: exponential backoff with
    "equal jitter", Brooker 2015). ``max_attempts`` counts the first try.
    """

    max_attempts: int = Field(default=1, ge=1, le=20)
    backoff_base_s: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_s: float = Field(default=60.0, ge=0, le=86_400)


class MapSpec(Message):
    """Fan out one task per item of the list ``items`` evaluates to.

    At most ``max_parallelism`` of the step's tasks are queued or running at once. The
    step's result is the list of the items' results, in item order (the fan-in).
    """

    items: str = Field(min_length=1)
    max_parallelism: int = Field(default=10, ge=1, le=10_000)
    max_items: int = Field(default=10_000, ge=1, le=100_000)


class StepSpec(Message):
    """One step: a task to run once its dependencies have finished.

    ``payload`` is copied into the task's payload, then each ``payload_from`` key is set
    to its expression's value over the context (the module docstring). ``when`` false
    skips the step (and, in turn, the steps that depend on it). ``gate`` is a condition
    on the step's ``result`` that must hold, or the attempt counts as failed.
    ``on_failure`` says what a step that failed for good does: ``fail`` the run,
    ``continue`` (its dependents still run and see ``status == 'failed'``), or run the
    ``compensation`` step and then fail the run. ``timeout_s`` bounds one attempt's run
    time (seconds). ``map`` makes it a fan-out step.
    """

    id: str = Field(pattern=STEP_ID)
    task_type: str = Field(min_length=1, max_length=128)
    required_capabilities: tuple[str, ...] = ()
    payload: dict[str, Any] = Field(default_factory=dict)
    payload_from: dict[str, str] = Field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    when: str | None = Field(default=None, min_length=1)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    gate: str | None = Field(default=None, min_length=1)
    on_failure: OnFailure = "fail"
    compensation: str | None = None
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 86_400)
    priority: Priority = "normal"
    map: MapSpec | None = None

    @field_validator("required_capabilities", "depends_on")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("entries must be unique")
        return value


class WorkflowSpec(Message):
    """The steps of a workflow (a DAG through ``depends_on``) and its compensation steps.

    Compensation steps run only when a step with ``on_failure == "compensate"`` names
    them; they may not depend on anything and nothing may depend on them.
    """

    steps: tuple[StepSpec, ...] = Field(min_length=1, max_length=MAX_STEPS)
    compensations: tuple[StepSpec, ...] = Field(default=(), max_length=MAX_STEPS)

    def step(self, step_id: str) -> StepSpec:
        """The step (or compensation step) ``step_id``; KeyError if there is none."""
        for spec in self.steps + self.compensations:
            if spec.id == step_id:
                return spec
        raise KeyError(step_id)


class ParameterSpec(Message):
    """A template parameter: required unless it has a ``default``."""

    description: str = Field(default="", max_length=2000)
    default: Any = None
    required: bool = True


# ---------------------------------------------------------------------------------------
# Expressions and validation (pure)


def compile_expression(source: str) -> dict[str, Any]:
    """The parsed tree of expression ``source`` (domain/expressions.py ``parsed_tree``);
    ExpressionError if it is invalid, too long or nests too deeply."""
    return parsed_tree(source)


def referenced_steps(source: str) -> set[str]:
    """The step ids an expression reads as ``steps.<id>`` (from its parsed AST); raises
    ExpressionError if it is not a valid expression."""
    found: set[str] = set()
    stack = [parsed_tree(source)]
    while stack:
        node = stack.pop()
        children = node.get("children", [])
        if (
            node.get("type") == "subexpression"
            and len(children) >= 2
            and children[0].get("type") == "field"
            and children[0].get("value") == "steps"
            and children[1].get("type") == "field"
        ):
            found.add(children[1]["value"])
        stack.extend(c for c in children if isinstance(c, dict))
    return found


class SpecProblem(Message):
    """Why a definition is invalid: ``field`` is a JSON-pointer-like path (``steps[2].when``)."""

    code: str
    detail: str
    field: str


def _expressions(step: StepSpec) -> list[tuple[str, str]]:
    """(field name, expression) for every expression of ``step``."""
    out: list[tuple[str, str]] = []
    if step.when is not None:
        out.append(("when", step.when))
    if step.gate is not None:
        out.append(("gate", step.gate))
    if step.map is not None:
        out.append(("map.items", step.map.items))
    out += [(f"payload_from.{key}", expr) for key, expr in step.payload_from.items()]
    return out


def find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle of ``graph`` (node -> the nodes it depends on) as ``[a, b, ..., a]``, or None.

    Iterative depth-first search with white/grey/black marks (Cormen et al., *Introduction
    to Algorithms*, 22.3): reaching a grey node closes a cycle, read off the DFS path.
    Nodes are visited in the mapping's order, so the cycle reported is deterministic.
    """
    colour: dict[str, int] = {node: 0 for node in graph}  # 0 white, 1 grey, 2 black
    for root in graph:
        if colour[root]:
            continue
        path: list[str] = [root]
        iters = [iter(graph[root])]
        colour[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
                continue
            if nxt not in colour:
                continue
            if colour[nxt] == 1:
                # path[i] depends on path[i+1]; report it in execution order (a -> b: b after a)
                cycle = path[path.index(nxt) :] + [nxt]
                return list(reversed(cycle))
            if colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(graph[nxt]))
    return None


def check_spec(spec: WorkflowSpec) -> SpecProblem | None:
    """The first problem of ``spec`` beyond field shapes, or None if it is a valid DAG.

    Checks, in this order: duplicate step ids (``duplicate_step``), unknown dependencies
    (``unknown_dependency``), expressions over ``MAX_SPEC_EXPRESSION_CHARS`` together
    (``expressions_too_long``), each expression (domain/expressions.py
    ``check_expression``: ``expression_too_long``, ``invalid_expression``,
    ``expression_too_deep``), expressions reading a step that is not upstream
    (``not_upstream``), compensation
    references (``unknown_compensation``, ``compensation_without_policy``,
    ``compensation_missing``), compensation steps with dependencies
    (``compensation_dependency``), and cycles (``cycle``; the detail names it,
    ``a -> b -> c -> a``, each step running after the one before the arrow).
    """
    ids: dict[str, str] = {}
    for group in ("steps", "compensations"):
        for i, step in enumerate(getattr(spec, group)):
            where = f"{group}[{i}]"
            if step.id in ids:
                return SpecProblem(
                    code="duplicate_step",
                    detail=f"step id {step.id!r} is used by {ids[step.id]} and {where}",
                    field=f"{where}.id",
                )
            ids[step.id] = where
    main = {s.id for s in spec.steps}
    compensations = {s.id for s in spec.compensations}
    for i, step in enumerate(spec.steps):
        for dep in step.depends_on:
            if dep not in main:
                what = "a compensation step" if dep in compensations else "no step"
                return SpecProblem(
                    code="unknown_dependency",
                    detail=f"step {step.id!r} depends on {dep!r}, which is {what}",
                    field=f"steps[{i}].depends_on",
                )
    total = 0
    for group in ("steps", "compensations"):
        for i, step in enumerate(getattr(spec, group)):
            for name, expr in _expressions(step):
                total += len(expr)
                if total > MAX_SPEC_EXPRESSION_CHARS:
                    return SpecProblem(
                        code="expressions_too_long",
                        detail=f"the definition's expressions are over "
                        f"{MAX_SPEC_EXPRESSION_CHARS:,} characters together",
                        field=f"{group}[{i}].{name}",
                    )
    graph = {s.id: s.depends_on for s in spec.steps}
    cycle = find_cycle(graph)
    for group in ("steps", "compensations"):
        for i, step in enumerate(getattr(spec, group)):
            where = f"{group}[{i}]"
            for name, expr in _expressions(step):
                bad = check_expression(expr)
                if bad is not None:
                    return SpecProblem(
                        code=bad[0],
                        detail=f"step {step.id!r}: {name}: {bad[1]}",
                        field=f"{where}.{name}",
                    )
                if cycle is None and group == "steps":
                    upstream = _ancestors(graph, step.id)
                    for ref in sorted(referenced_steps(expr)):
                        if ref not in upstream:
                            return SpecProblem(
                                code="not_upstream",
                                detail=f"step {step.id!r}: {name} reads steps.{ref}, "
                                f"but {ref!r} is not a step it depends on",
                                field=f"{where}.{name}",
                            )
            if step.on_failure == "compensate" and step.compensation is None:
                return SpecProblem(
                    code="compensation_missing",
                    detail=f"step {step.id!r} has on_failure 'compensate' but no compensation",
                    field=f"{where}.compensation",
                )
            if step.compensation is not None:
                if step.on_failure != "compensate":
                    return SpecProblem(
                        code="compensation_without_policy",
                        detail=f"step {step.id!r} names a compensation but its on_failure "
                        f"is {step.on_failure!r}",
                        field=f"{where}.on_failure",
                    )
                if step.compensation not in compensations:
                    return SpecProblem(
                        code="unknown_compensation",
                        detail=f"step {step.id!r} names compensation {step.compensation!r}, "
                        "which is not in compensations",
                        field=f"{where}.compensation",
                    )
    for i, step in enumerate(spec.compensations):
        if (
            step.depends_on
            or step.map is not None
            or step.compensation is not None
            or step.when is not None
        ):
            return SpecProblem(
                code="compensation_dependency",
                detail=f"compensation step {step.id!r} may not have depends_on, when, map "
                "or its own compensation",
                field=f"compensations[{i}]",
            )
    if cycle is not None:
        index = next(i for i, s in enumerate(spec.steps) if s.id == cycle[0])
        return SpecProblem(
            code="cycle",
            detail="the steps form a cycle: " + " -> ".join(cycle),
            field=f"steps[{index}].depends_on",
        )
    return None


def _ancestors(graph: Mapping[str, tuple[str, ...]], node: str) -> set[str]:
    """Every step ``node`` depends on, directly or through others (graph must be acyclic)."""
    seen: set[str] = set()
    stack = list(graph.get(node, ()))
    while stack:
        dep = stack.pop()
        if dep not in seen:
            seen.add(dep)
            stack.extend(graph.get(dep, ()))
    return seen


def topological_order(spec: WorkflowSpec) -> list[str]:
    """The steps' ids in an order where every step comes after its dependencies.

    Kahn's algorithm (A. B. Kahn, "Topological sorting of large networks", CACM 1962),
    taking ready steps in declaration order. Raises ValueError if ``spec`` has a cycle.
    """
    remaining = {s.id: set(s.depends_on) for s in spec.steps}
    order: list[str] = []
    while remaining:
        ready = [sid for sid, deps in remaining.items() if not deps]
        if not ready:
            raise ValueError("the steps form a cycle")
        for sid in ready:
            del remaining[sid]
            order.append(sid)
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def _invalid(problem: SpecProblem) -> Rejection:
    return rejected("invalid", problem.code, problem.detail, field=problem.field)


def bind_parameters(
    declared: Mapping[str, ParameterSpec], given: Mapping[str, Any]
) -> dict[str, Any] | Rejection:
    """The parameter values a template instantiation binds: ``given`` over the defaults.

    Rejections (invalid): ``unknown_parameter`` for a name not declared,
    ``missing_parameter`` for a required one not given (field ``params.<name>``).
    """
    for name in given:
        if name not in declared:
            return rejected(
                "invalid",
                "unknown_parameter",
                f"the template has no parameter {name!r}",
                field=f"params.{name}",
            )
    bound: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given:
            bound[name] = given[name]
        elif spec.required and spec.default is None:
            return rejected(
                "invalid",
                "missing_parameter",
                f"parameter {name!r} is required",
                field=f"params.{name}",
            )
        else:
            bound[name] = spec.default
    return bound


# ---------------------------------------------------------------------------------------
# The workflow definition aggregate

WorkflowStatus = Literal["active", "archived"]


class WorkflowCommand(Command):
    """A command addressed to one workflow definition, keyed by ``workflow_id``."""

    aggregate_type: ClassVar[str] = WORKFLOW
    id_field: ClassVar[str] = "workflow_id"
    workflow_id: str = Field(min_length=1, max_length=128)


WorkflowName = Annotated[str, Field(min_length=1, max_length=200)]
"""A workflow definition's display name (also used by the HTTP API's bodies)."""

Description = Annotated[str, Field(max_length=10_000)]
"""A workflow definition's or a template's description."""


class CreateWorkflow(WorkflowCommand):
    """Create a definition (version 1). ``params`` are bound template parameters, if any;
    ``template`` names the template and version it was made from (``name@3``)."""

    name: WorkflowName
    description: Description = ""
    spec: WorkflowSpec
    params: dict[str, Any] = Field(default_factory=dict)
    template: str | None = None


class UpdateWorkflow(WorkflowCommand):
    """Replace the definition's steps (and optionally name/description); bumps the version.

    Runs already started keep the version they started with."""

    name: WorkflowName | None = None
    description: Description | None = None
    spec: WorkflowSpec


class ArchiveWorkflow(WorkflowCommand):
    """Archive the definition: it can no longer be executed or updated."""


class ExecuteWorkflow(WorkflowCommand):
    """Ask for a run ``run_id`` of the current version with ``inputs``."""

    run_id: str = Field(min_length=1, max_length=128)
    inputs: dict[str, Any] = Field(default_factory=dict)


class WorkflowEvent(Event):
    """An event of one workflow definition."""

    aggregate_type: ClassVar[str] = WORKFLOW
    workflow_id: str


class WorkflowCreated(WorkflowEvent):
    """A definition was created at version 1."""

    event_type: ClassVar[str] = "created"
    name: str
    description: str
    spec: WorkflowSpec
    params: dict[str, Any] = Field(default_factory=dict)
    template: str | None = None


class WorkflowUpdated(WorkflowEvent):
    """The definition was replaced; it is now at ``version``."""

    event_type: ClassVar[str] = "updated"
    version: int
    name: str
    description: str
    spec: WorkflowSpec


class WorkflowArchived(WorkflowEvent):
    """The definition was archived."""

    event_type: ClassVar[str] = "archived"


class WorkflowExecutionRequested(WorkflowEvent):
    """A run was asked for: the definition as it is at ``version``, with ``inputs``.

    The workflow process manager answers it with ``StartWorkflowRun`` on ``run_id``."""

    event_type: ClassVar[str] = "execution_requested"
    run_id: str
    version: int
    spec: WorkflowSpec
    inputs: dict[str, Any]
    params: dict[str, Any] = Field(default_factory=dict)


class WorkflowState(Message):
    """The write-side state of one definition."""

    workflow_id: str
    name: str
    description: str
    spec: WorkflowSpec
    params: dict[str, Any] = Field(default_factory=dict)
    version: int = 1
    status: WorkflowStatus = "active"
    runs: int = 0


def decide_workflow(
    command: WorkflowCommand, state: WorkflowState | None
) -> list[WorkflowEvent] | Rejection:
    """Decide a definition command.

    Rejections: ``workflow_not_found`` (not_found); ``workflow_exists`` (conflict);
    ``workflow_archived`` (gone); every ``check_spec`` code (invalid, naming the field).
    """
    wid = command.workflow_id
    match command, state:
        case CreateWorkflow(), None:
            problem = check_spec(command.spec)
            if problem is not None:
                return _invalid(problem)
            return [
                WorkflowCreated(
                    workflow_id=wid,
                    name=command.name,
                    description=command.description,
                    spec=command.spec,
                    params=command.params,
                    template=command.template,
                )
            ]
        case CreateWorkflow(), WorkflowState():
            return rejected("conflict", "workflow_exists", f"workflow {wid} exists")
        case _, None:
            return rejected("not_found", "workflow_not_found", f"no workflow {wid}")
        case _, WorkflowState(status="archived"):
            return rejected("gone", "workflow_archived", f"workflow {wid} is archived")
        case UpdateWorkflow(), WorkflowState():
            problem = check_spec(command.spec)
            if problem is not None:
                return _invalid(problem)
            return [
                WorkflowUpdated(
                    workflow_id=wid,
                    version=state.version + 1,
                    name=command.name or state.name,
                    description=(
                        state.description if command.description is None else command.description
                    ),
                    spec=command.spec,
                )
            ]
        case ArchiveWorkflow(), WorkflowState():
            return [WorkflowArchived(workflow_id=wid)]
        case ExecuteWorkflow(), WorkflowState():
            return [
                WorkflowExecutionRequested(
                    workflow_id=wid,
                    run_id=command.run_id,
                    version=state.version,
                    spec=state.spec,
                    inputs=command.inputs,
                    params=state.params,
                )
            ]
    return rejected("invalid", "unknown_command", f"not a workflow command: {command!r}")


def evolve_workflow(state: WorkflowState | None, event: WorkflowEvent) -> WorkflowState | None:
    """Apply a definition event; never raises."""
    match event:
        case WorkflowCreated():
            return WorkflowState(
                workflow_id=event.workflow_id,
                name=event.name,
                description=event.description,
                spec=event.spec,
                params=event.params,
            )
    if state is None:
        return None
    match event:
        case WorkflowUpdated():
            return state.model_copy(
                update={
                    "version": event.version,
                    "name": event.name,
                    "description": event.description,
                    "spec": event.spec,
                }
            )
        case WorkflowArchived():
            return state.model_copy(update={"status": "archived"})
        case WorkflowExecutionRequested():
            return state.model_copy(update={"runs": state.runs + 1})
    return state


WORKFLOW_DECIDER: Decider[WorkflowCommand, WorkflowState, WorkflowEvent] = Decider(
    aggregate_type=WORKFLOW,
    command_types=(CreateWorkflow, UpdateWorkflow, ArchiveWorkflow, ExecuteWorkflow),
    event_types=(WorkflowCreated, WorkflowUpdated, WorkflowArchived, WorkflowExecutionRequested),
    decide=decide_workflow,
    evolve=evolve_workflow,
)


# ---------------------------------------------------------------------------------------
# The workflow template aggregate

TEMPLATE_NAME = r"^[a-z0-9][a-z0-9._-]{0,99}$"


class TemplateCommand(Command):
    """A command addressed to one template, keyed by its ``name``."""

    aggregate_type: ClassVar[str] = TEMPLATE
    id_field: ClassVar[str] = "name"
    name: str = Field(pattern=TEMPLATE_NAME)


class PublishTemplate(TemplateCommand):
    """Publish a new version of the template ``name`` (version 1 if it is new)."""

    description: Description = ""
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    spec: WorkflowSpec


class TemplateEvent(Event):
    """An event of one template."""

    aggregate_type: ClassVar[str] = TEMPLATE
    name: str


class TemplatePublished(TemplateEvent):
    """Version ``version`` of the template was published (versions never change)."""

    event_type: ClassVar[str] = "published"
    version: int
    description: str
    parameters: dict[str, ParameterSpec]
    spec: WorkflowSpec


class TemplateState(Message):
    """The write-side state of one template: its latest version."""

    name: str
    version: int


def decide_template(
    command: TemplateCommand, state: TemplateState | None
) -> list[TemplateEvent] | Rejection:
    """Decide a template command; rejections are ``check_spec``'s codes (invalid)."""
    match command:
        case PublishTemplate():
            problem = check_spec(command.spec)
            if problem is not None:
                return _invalid(problem)
            return [
                TemplatePublished(
                    name=command.name,
                    version=1 if state is None else state.version + 1,
                    description=command.description,
                    parameters=command.parameters,
                    spec=command.spec,
                )
            ]
    return rejected("invalid", "unknown_command", f"not a template command: {command!r}")


def evolve_template(state: TemplateState | None, event: TemplateEvent) -> TemplateState | None:
    """Apply a template event; never raises."""
    if isinstance(event, TemplatePublished):
        return TemplateState(name=event.name, version=event.version)
    return state


TEMPLATE_DECIDER: Decider[TemplateCommand, TemplateState, TemplateEvent] = Decider(
    aggregate_type=TEMPLATE,
    command_types=(PublishTemplate,),
    event_types=(TemplatePublished,),
    decide=decide_template,
    evolve=evolve_template,
)
