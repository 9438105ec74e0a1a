"""FastAPI dependencies, as ``Annotated`` aliases (fastapi/full-stack-fastapi-template).

Everything a route needs was built by the lifespan in api/app.py and hung on
``app.state``; these aliases hand it in. ``CommandMetaDep`` reads the command headers
(Idempotency-Key, X-Correlation-ID, If-Match), ``DispatchDep`` sends a route's commands
with them, ``ReadModelsDep`` runs read-model queries
(projections/queries.py) on the app's pool and schema, and ``FreshDep`` makes a query
wait until the read models have caught up with the positions named by ``?after=``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Concatenate, Literal, ParamSpec, TypeVar

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, Header, Path, Query, Request, Response

from api.dispatch import Dispatcher
from api.live import StreamHub
from api.metrics import Metrics
from api.positions import MAX_VECTOR_CHARS, parse_after
from api.problems import Problem
from api.schemas.common import ID_PATTERN
from commands.client import CommandClient
from domain.workflow import TEMPLATE_NAME
from infra.clock import Clock
from infra.settings import Settings
from infra.topics import Topics
from projections import queries


async def get_settings(request: Request) -> Settings:
    """The app's Settings."""
    value: Settings = request.app.state.settings
    return value


async def get_clock(request: Request) -> Clock:
    """The clock that stamps commands."""
    value: Clock = request.app.state.clock
    return value


async def get_pool(request: Request) -> asyncpg.Pool:
    """The asyncpg pool of the read models."""
    value: asyncpg.Pool = request.app.state.pool
    return value


async def get_redis(request: Request) -> aioredis.Redis:
    """The Redis client."""
    value: aioredis.Redis = request.app.state.redis
    return value


async def get_topics(request: Request) -> Topics:
    """The deployment's topics."""
    value: Topics = request.app.state.topics
    return value


async def get_command_client(request: Request) -> CommandClient:
    """The CommandClient (started, following outcomes)."""
    value: CommandClient = request.app.state.command_client
    return value


async def get_metrics(request: Request) -> Metrics:
    """The app's Prometheus collectors."""
    value: Metrics = request.app.state.metrics
    return value


async def get_hub(request: Request) -> StreamHub:
    """The registry of open SSE streams."""
    value: StreamHub = request.app.state.hub
    return value


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClockDep = Annotated[Clock, Depends(get_clock)]
PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
TopicsDep = Annotated[Topics, Depends(get_topics)]
CommandClientDep = Annotated[CommandClient, Depends(get_command_client)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
HubDep = Annotated[StreamHub, Depends(get_hub)]


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class ReadModels:
    """The read models of this deployment: the pool and the schema every query takes.

    ``await read_models(queries.get_task, task_id)`` is
    ``await queries.get_task(pool, schema, task_id)``, so a route names the query and its
    arguments and never handles the pool.
    """

    pool: asyncpg.Pool
    schema: str

    async def __call__(
        self,
        query: Callable[Concatenate[queries.Db, str, P], Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Run ``query`` on the pool and schema with ``args``."""
        return await query(self.pool, self.schema, *args, **kwargs)

    async def ping(self) -> None:
        """``select 1`` on the pool (readiness)."""
        await queries.ping(self.pool)


async def get_read_models(pool: PoolDep, settings: SettingsDep) -> ReadModels:
    """The read models (the app's pool, the settings' schema)."""
    return ReadModels(pool, settings.db_schema)


ReadModelsDep = Annotated[ReadModels, Depends(get_read_models)]

AgentIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the agent id")
]
TaskIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the task id")
]
AccountIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the account id")
]
ProposalIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the proposal id")
]
WorkflowIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the workflow id")
]
RunIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the run id")
]
TemplateNamePath = Annotated[str, Path(pattern=TEMPLATE_NAME, description="the template name")]
Limit = Annotated[int, Query(ge=1, le=500, description="page size (at most 500)")]
Cursor = Annotated[
    str | None, Query(max_length=2000, description="``next_cursor`` of the previous page")
]
#: An SSE stream's resume point: the ``Last-Event-ID`` header, or the same as a query
#: parameter (for clients that cannot set headers), and where to start without one.
LastEventIdHeader = Annotated[
    str | None, Header(alias="Last-Event-ID", max_length=MAX_VECTOR_CHARS)
]
LastEventIdQuery = Annotated[
    str | None, Query(max_length=MAX_VECTOR_CHARS, description="resume after this SSE id")
]
StreamFrom = Annotated[Literal["beginning", "end"], Query(alias="from")]

# If-Match: "3", 3 or W/"3" (a single entity tag; the aggregate version).
_IF_MATCH = re.compile(r'^(?:W/)?(?:"(\d{1,9})"|(\d{1,9}))$')


def parse_if_match(value: str | None) -> int | None:
    """The aggregate version in an If-Match header; 422 problem naming If-Match if malformed."""
    if value is None:
        return None
    m = _IF_MATCH.match(value.strip())
    if m is None:
        raise Problem(
            422,
            "invalid_if_match",
            f'If-Match must be an aggregate version such as "3" (got {value!r})',
            field="If-Match",
        )
    return int(m.group(1) or m.group(2))


@dataclass(frozen=True)
class CommandMeta:
    """The envelope fields a command route takes from its request headers."""

    command_id: str
    correlation_id: str
    expected_version: int | None
    idempotency_key: str | None


async def command_meta(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="the command id; a repeat returns the first outcome, writes nothing",
        ),
    ] = None,
    correlation_id: Annotated[
        str | None, Header(alias="X-Correlation-ID", min_length=1, max_length=200)
    ] = None,
    if_match: Annotated[
        str | None,
        Header(alias="If-Match", description='the aggregate version you saw: "3" or W/"3"'),
    ] = None,
) -> CommandMeta:
    """Read Idempotency-Key (default: a uuid4), X-Correlation-ID (default: the command id)
    and If-Match (optional expected version)."""
    expected = parse_if_match(if_match)
    command_id = idempotency_key or str(uuid.uuid4())
    return CommandMeta(
        command_id=command_id,
        correlation_id=correlation_id or command_id,
        expected_version=expected,
        idempotency_key=idempotency_key,
    )


CommandMetaDep = Annotated[CommandMeta, Depends(command_meta)]


async def fresh_read_models(
    request: Request,
    response: Response,
    settings: SettingsDep,
    read_models: ReadModelsDep,
    topics: TopicsDep,
    after: Annotated[
        list[str] | None,
        Query(
            description="wait (bounded) until the read models hold the event at this"
            " ``<topic>:<partition>:<offset>``; repeatable",
        ),
    ] = None,
) -> bool:
    """Wait up to ``command_wait_s`` until every ``?after=`` position is projected; returns
    True when fresh, else False and sets ``X-Read-Model-Stale: true``."""
    if not after:
        return True
    try:
        positions = parse_after(after, set(topics.event_topics.values()), topics.partitions)
    except ValueError as exc:
        raise Problem(422, "invalid_position", str(exc), field="after") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.command_wait_s
    delay = 0.01
    while await read_models(queries.unreached, positions):
        if loop.time() >= deadline:
            response.headers["X-Read-Model-Stale"] = "true"
            request.state.read_model_stale = True
            return False
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 0.1)
    return True


FreshDep = Annotated[bool, Depends(fresh_read_models)]


async def get_dispatcher(
    client: CommandClientDep,
    settings: SettingsDep,
    clock: ClockDep,
    metrics: MetricsDep,
    meta: CommandMetaDep,
) -> Dispatcher:
    """A Dispatcher (api/dispatch.py) for this request's command headers."""
    return Dispatcher(client, settings, clock, metrics, meta)


DispatchDep = Annotated[Dispatcher, Depends(get_dispatcher)]
