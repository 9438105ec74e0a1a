"""Tasks: submit (one, or up to 1,000 in a batch), start, progress, complete, fail,
cancel; list and read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse

from api.deps import Cursor, DispatchDep, FreshDep, Limit, ReadModelsDep, TaskIdPath
from api.dispatch import COMMAND_RESPONSES, Dispatcher
from api.pagination import TEXT, TIME, Keyset
from api.problems import Problem
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.money import to_micro
from api.schemas.tasks import (
    BatchResult,
    TaskBatchCreate,
    TaskCancel,
    TaskComplete,
    TaskCreate,
    TaskFail,
    TaskProgress,
    TaskPublic,
    TaskStart,
)
from domain import task as tk
from domain.messages import Command
from domain.task import Status as TaskStatus
from projections import queries

router = APIRouter(prefix="/tasks", tags=["tasks"])

#: Newest first: by ``submitted_at``, then task id, both descending.
TASKS = Keyset("tasks", (TIME, TEXT), lambda row: (row["submitted_at"], row["task_id"]))


def _submit(dispatch: Dispatcher, body: TaskCreate, index: int | None = None) -> tk.SubmitTask:
    return dispatch.command_at(
        ("body",) if index is None else ("body", "tasks", index),
        tk.SubmitTask,
        task_id=body.task_id or dispatch.new_id("task", *([] if index is None else [index])),
        type=body.type,
        payload=body.payload,
        required_capabilities=tuple(body.required_capabilities),
        priority=body.priority,
        max_cost=None if body.max_cost is None else to_micro(body.max_cost),
        lease_timeout_s=body.lease_timeout_s,
        run_timeout_s=body.run_timeout_s,
        max_attempts=body.max_attempts,
    )


# Declared before the /{task_id} routes (Starlette matches in order).
@router.post(":batch", response_model=BatchResult, responses={422: COMMAND_RESPONSES[422]})
async def submit_task_batch(body: TaskBatchCreate, dispatch: DispatchDep) -> BatchResult:
    """Submit up to 1,000 tasks in one request; 200 with one result per task, in order.

    With an Idempotency-Key, task i's id (when not given) derives from the key and i,
    and its command id from the key and the task id (as for one task), so the whole
    batch can be retried safely, and a key reused for another batch replays only the
    tasks both hold. A task id given twice in one batch is a 422.
    """
    commands: list[Command] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(body.tasks):
        command = _submit(dispatch, item, i)
        if command.task_id in seen:
            raise Problem(
                422,
                "duplicate_task_id",
                f"task {command.task_id} is also task {seen[command.task_id]} of the batch",
                field=f"tasks.{i}.task_id",
            )
        seen[command.task_id] = i
        commands.append(command)
    results = await dispatch.execute_many(commands, created=True)
    return BatchResult(
        items=results,
        accepted=sum(r.status == "accepted" for r in results),
        rejected=sum(r.status == "rejected" for r in results),
        pending=sum(r.status == "pending" for r in results),
    )


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def submit_task(body: TaskCreate, dispatch: DispatchDep) -> JSONResponse:
    """Submit a task; it is queued at once (201 with Location /tasks/{id})."""
    command = _submit(dispatch, body)
    return await dispatch.execute(command, created_at=f"/tasks/{command.task_id}")


@router.post("/{task_id}/start", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def start_task(task_id: TaskIdPath, body: TaskStart, dispatch: DispatchDep) -> JSONResponse:
    """The assigned agent starts the task."""
    return await dispatch.execute(
        dispatch.command(tk.StartTask, task_id=task_id, agent_id=body.agent_id)
    )


@router.post("/{task_id}/progress", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def report_progress(
    task_id: TaskIdPath, body: TaskProgress, dispatch: DispatchDep
) -> JSONResponse:
    """The assigned agent reports progress in [0, 1] on a running task."""
    return await dispatch.execute(
        dispatch.command(
            tk.ReportProgress,
            task_id=task_id,
            agent_id=body.agent_id,
            progress=body.progress,
            message=body.message,
        )
    )


@router.post("/{task_id}/complete", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def complete_task(
    task_id: TaskIdPath, body: TaskComplete, dispatch: DispatchDep
) -> JSONResponse:
    """The assigned agent completes a running task with a result."""
    return await dispatch.execute(
        dispatch.command(
            tk.CompleteTask,
            task_id=task_id,
            agent_id=body.agent_id,
            result=body.result,
            quality=body.quality,
        )
    )


@router.post("/{task_id}/fail", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def fail_task(task_id: TaskIdPath, body: TaskFail, dispatch: DispatchDep) -> JSONResponse:
    """The assigned agent reports a failure (retried if retryable and attempts remain)."""
    return await dispatch.execute(
        dispatch.command(
            tk.FailTask,
            task_id=task_id,
            agent_id=body.agent_id,
            error=body.error,
            retryable=body.retryable,
        )
    )


@router.post("/{task_id}/cancel", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def cancel_task(
    task_id: TaskIdPath,
    dispatch: DispatchDep,
    body: Annotated[TaskCancel | None, Body()] = None,
) -> JSONResponse:
    """Cancel a task that has not finished (the body, with a ``reason``, is optional)."""
    reason = (body or TaskCancel()).reason
    return await dispatch.execute(dispatch.command(tk.CancelTask, task_id=task_id, reason=reason))


@router.get("", response_model=Page[TaskPublic])
async def list_tasks(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    status: Annotated[TaskStatus | None, Query()] = None,
    type: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    agent_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[TaskPublic]:
    """Tasks newest first (by ``submitted_at``, then task id, both descending), filtered by
    status, type and/or agent."""
    rows = await read_models(
        queries.list_tasks,
        status=status,
        type=type,
        agent_id=agent_id,
        after=TASKS.after(cursor),
        limit=limit + 1,
    )
    return TASKS.page(rows, limit, TaskPublic.from_row)


@router.get(
    "/{task_id}", response_model=TaskPublic, responses={404: {"description": "no such task"}}
)
async def get_task(
    task_id: TaskIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> TaskPublic:
    """One task; ``ETag`` is its version (for If-Match)."""
    row = await read_models(queries.get_task, task_id)
    if row is None:
        raise Problem(404, "task_not_found", f"no task {task_id}", field="task_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return TaskPublic.from_row(row)
