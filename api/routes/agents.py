"""Agents: register, start, stop, restart, heartbeat, update, deregister; list and read;
follow an agent's assignments live (SSE)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import (
    AgentIdPath,
    Cursor,
    DispatchDep,
    FreshDep,
    HubDep,
    LastEventIdHeader,
    LastEventIdQuery,
    Limit,
    ReadModelsDep,
    SettingsDep,
    StreamFrom,
    TopicsDep,
)
from api.dispatch import COMMAND_RESPONSES
from api.live import sse_response
from api.pagination import TEXT, Keyset
from api.positions import Layout
from api.problems import Problem
from api.schemas.agents import AgentCreate, AgentPublic, AgentUpdate, HeartbeatIn
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.money import to_micro
from domain import agent as ag
from domain import task as tk
from domain.recorded import RecordedEvent
from infra.mapper import event_ce_type
from projections import queries

router = APIRouter(prefix="/agents", tags=["agents"])

#: An agent's status in the read model, derived from its lifecycle and load.
AgentStatus = Literal["registered", "idle", "busy", "stopped", "offline", "deregistered"]
#: By agent id.
AGENTS = Keyset("agents", (TEXT,), lambda row: (row["agent_id"],))


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def register_agent(body: AgentCreate, dispatch: DispatchDep) -> JSONResponse:
    """Register an agent (201 with Location /agents/{id})."""
    agent_id = body.agent_id or dispatch.new_id("agent")
    command = dispatch.command(
        ag.RegisterAgent,
        agent_id=agent_id,
        name=body.name,
        capabilities=tuple(ag.Capability(**c.model_dump()) for c in body.capabilities),
        max_concurrent_tasks=body.max_concurrent_tasks,
        cost_per_task=to_micro(body.cost_per_task),
    )
    return await dispatch.execute(command, created_at=f"/agents/{agent_id}")


_LIFECYCLE_COMMANDS: dict[str, type[ag.AgentCommand]] = {
    "start": ag.StartAgent,
    "stop": ag.StopAgent,
    "restart": ag.RestartAgent,
}


def _lifecycle_route(action: str, cls: type[ag.AgentCommand]) -> None:
    async def route(agent_id: AgentIdPath, dispatch: DispatchDep) -> JSONResponse:
        return await dispatch.execute(dispatch.command(cls, agent_id=agent_id))

    route.__name__ = f"{action}_agent"
    route.__doc__ = f"{cls.__doc__}"
    router.add_api_route(
        f"/{{agent_id}}/{action}",
        route,
        methods=["POST"],
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        summary=f"{action.capitalize()} an agent",
    )


for _action, _cls in _LIFECYCLE_COMMANDS.items():
    _lifecycle_route(_action, _cls)


@router.post(
    "/{agent_id}/heartbeat",
    response_model=CommandResult,
    responses=COMMAND_RESPONSES,
    summary="Record a heartbeat",
)
async def heartbeat_agent(
    agent_id: AgentIdPath,
    dispatch: DispatchDep,
    settings: SettingsDep,
    body: HeartbeatIn | None = None,
) -> JSONResponse:
    """Record that the agent is alive; an offline agent comes back online.

    The heartbeat counts from the body's ``sent_at`` (when the agent sent it), clamped to
    [received - ``heartbeat_max_skew_s``, received] (seconds; received = when this route
    took it up); with no ``sent_at``, from received. The scheduler's heartbeat timeout
    is measured from that time, so a heartbeat that waited behind other requests is not
    counted late. 404 ``agent_not_found``; 409 ``agent_not_running`` (registered or
    stopped: an operator's stop is not overruled); 422 naming ``sent_at`` when it is not
    a date-time with a UTC offset.
    """
    command = dispatch.command(ag.RecordHeartbeat, agent_id=agent_id)
    if body is not None and body.sent_at is not None:
        received = command.at
        earliest = received - timedelta(seconds=settings.heartbeat_max_skew_s)
        # Clamped first: converting year 1 at +05:00 to UTC would overflow.
        sent = min(max(body.sent_at, earliest), received).astimezone(received.tzinfo)
        command = command.model_copy(update={"at": sent})
    return await dispatch.execute(command)


@router.patch("/{agent_id}", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def update_agent(
    agent_id: AgentIdPath, body: AgentUpdate, dispatch: DispatchDep
) -> JSONResponse:
    """Replace the agent's capabilities."""
    command = dispatch.command(
        ag.UpdateCapabilities,
        agent_id=agent_id,
        capabilities=tuple(ag.Capability(**c.model_dump()) for c in body.capabilities),
    )
    return await dispatch.execute(command)


@router.delete("/{agent_id}", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def deregister_agent(agent_id: AgentIdPath, dispatch: DispatchDep) -> JSONResponse:
    """Deregister the agent for good (its id can never be registered again)."""
    return await dispatch.execute(dispatch.command(ag.DeregisterAgent, agent_id=agent_id))


@router.get("", response_model=Page[AgentPublic])
async def list_agents(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    lifecycle: Annotated[ag.Lifecycle | None, Query()] = None,
    status: Annotated[AgentStatus | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[AgentPublic]:
    """Agents ordered by agent id, filtered by lifecycle and/or derived status."""
    rows = await read_models(
        queries.list_agents,
        lifecycle=lifecycle,
        status=status,
        after=AGENTS.after(cursor),
        limit=limit + 1,
    )
    return AGENTS.page(rows, limit, AgentPublic.from_row)


@router.get(
    "/{agent_id}", response_model=AgentPublic, responses={404: {"description": "no such agent"}}
)
async def get_agent(
    agent_id: AgentIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> AgentPublic:
    """One agent, with ``status`` (idle/busy/...) and ``load`` derived from its tasks;
    ``ETag`` is its version (for If-Match)."""
    row = await read_models(queries.get_agent, agent_id)
    if row is None:
        raise Problem(404, "agent_not_found", f"no agent {agent_id}", field="agent_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return AgentPublic.from_row(row)


@router.get(
    "/{agent_id}/assignments",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE of assignments"},
        400: {"description": "malformed Last-Event-ID, or past the end of the log"},
        503: {"description": "too many streams; see Retry-After"},
    },
)
async def follow_assignments(
    agent_id: AgentIdPath,
    settings: SettingsDep,
    topics: TopicsDep,
    hub: HubDep,
    read_models: ReadModelsDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
    from_: StreamFrom = "end",
) -> EventSourceResponse:
    """The agent's ``io.swarmlog.task.assigned`` events, live (by default).

    Each SSE id is a position vector over the task topic's partitions; send it back as
    ``Last-Event-ID`` (or ``?last_event_id=``) to resume with no gap and no duplicate.

    Without one, the stream starts where the read models are (the projected offsets of
    the task topic), not at the log's end: an assignment already on the log but not yet
    projected is streamed, so a client that connects and then lists its assigned tasks
    (as the SDK worker does) misses none. It may see one both ways; task ids tell.
    """
    layout = Layout.of([topics.events(tk.TASK)], topics.partitions)
    resume = last_event_id or last_event_id_header
    if resume is None and from_ == "end":
        projected = await read_models(
            queries.projected_offsets, ((tp.topic, tp.partition) for tp in layout.partitions)
        )
        resume = layout.encode(
            {tp: projected.get((tp.topic, tp.partition), 0) for tp in layout.partitions}
        )

    def keep(stored: RecordedEvent) -> bool:
        return isinstance(stored.event, tk.TaskAssigned) and stored.event.agent_id == agent_id

    assigned = event_ce_type(tk.TASK, tk.TaskAssigned.event_type)

    return await sse_response(
        hub,
        layout,
        keep,
        pre=lambda ce_type, _: ce_type == assigned,
        last_event_id=resume,
        from_beginning=from_ == "beginning",
        send_timeout_s=settings.sse_send_timeout_s,
    )
