"""The FastAPI app factory.

Nothing connects at import time (STYLE rule 7): ``create_app`` only wires routes,
handlers and middleware; the lifespan asks the composition root (``infra.bootstrap.
open_api``) for the API's parts (the asyncpg pool, the Redis client, a started
CommandClient following the outcome topic, the SSE hub; the read-model schema migrated),
hangs them on ``app.state`` for api/deps.py, and the root closes them on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import problems
from api.guard import RequestGuard, storable_path
from api.metrics import Metrics, MetricsMiddleware
from api.routes import (
    accounts,
    agents,
    audit,
    commands,
    deadletters,
    economy,
    events,
    health,
    proposals,
    runs,
    tasks,
    templates,
    workflows,
)
from infra import bootstrap
from infra.clock import Clock
from infra.settings import Settings
from projections.schema import checked_schema

DESCRIPTION = """\
Commands (POST/PATCH/DELETE) wait for the decider's outcome: 201/200 with the aggregate's
version (also the `ETag`) and the position of each event written, problem+json when
rejected, 202 when the outcome did not come in time. `Idempotency-Key` makes a command
safe to repeat; `If-Match` makes it conditional on the version you saw.

Queries (GET) read the PostgreSQL read models; pass an event's `position` as
`?after=<topic>:<partition>:<offset>` to read your own write (the answer carries
`X-Read-Model-Stale: true` if the read models did not catch up in time).

Live streams (SSE) carry CloudEvents; each SSE id is a position vector that
`Last-Event-ID` resumes with no gap and no duplicate.

Input the log or the read models cannot hold is a 422 naming the field, wherever it is
(a body, a free-form payload, a query or path parameter): NUL (U+0000) or a lone
surrogate in a string, an integer outside the signed 64-bit range, a non-finite number,
JSON nested deeper than 32 levels. A body over `SWARMLOG_MAX_REQUEST_BYTES` (1 MiB by
default) is a 413, a body that is not JSON a 415. Every error is problem+json.

Money is in tokens as decimal strings (`"0.500000"`); CloudEvent data keeps the wire
form, integer micro-tokens (1 token = 1,000,000).
"""


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    clients: bootstrap.Clients | None = None,
) -> FastAPI:
    """The swarmlog HTTP API for ``settings`` (default: from the environment).

    ``clock`` stamps every command's ``at`` (default: the system clock). The lifespan asks
    the composition root (infra/bootstrap.py) for the API's parts: ``clients`` when given
    (a test's or a deployment's settings, Kafka, Topics and clock: the API then uses
    ``clients.settings`` and ``clients.clock``, one truth), else
    ``bootstrap.connect(settings, clock=clock)``, which also creates missing topics.

    Raises ValueError when ``clients`` is given with a ``settings`` or ``clock`` that is
    not the very object ``clients`` holds.
    """
    if clients is not None:
        if settings is not None and settings is not clients.settings:
            raise ValueError("settings is not clients.settings: pass clients alone")
        if clock is not None and clock is not clients.clock:
            raise ValueError("clock is not clients.clock: pass clients alone")
        settings, clock = clients.settings, clients.clock
    settings = settings or Settings()
    checked_schema(settings.db_schema)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shared = clients or await bootstrap.connect(settings, clock=clock)
        async with bootstrap.open_api(shared, metrics) as parts:
            app.state.settings = settings
            app.state.clock = shared.clock
            app.state.topics = shared.topics
            app.state.pool = parts.pool
            app.state.redis = parts.redis
            app.state.command_client = parts.command_client
            app.state.metrics = metrics
            app.state.hub = parts.hub
            yield

    app = FastAPI(
        title="swarmlog",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(storable_path)],
    )
    problems.install(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts the guard's too
    for module in (
        agents,
        tasks,
        accounts,
        proposals,
        economy,
        workflows,
        commands,
        events,
        audit,
        health,
    ):
        app.include_router(module.router)
    app.include_router(runs.router)
    app.include_router(templates.router)
    app.include_router(deadletters.router)
    return app
