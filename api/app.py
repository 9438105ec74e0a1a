"""The FastAPI app factory; its lifespan is the API's composition root.

Nothing connects at import time (STYLE rule 7): ``create_app`` only wires routes,
handlers and middleware; the lifespan builds the asyncpg pool, the Redis client, the
Topics (created if missing) and a started CommandClient (following the outcome topic),
migrates the read-model schema (idempotent, so queries never meet a missing table),
hangs them on ``app.state`` for api/deps.py, and closes them on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI

from api import problems
from api.guard import RequestGuard, storable_path
from api.live import StreamHub
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
from commands.client import CommandClient
from infra.clock import Clock, SystemClock
from infra.settings import Settings
from infra.topics import Topics, ensure_topics
from projections.schema import checked_schema, init_connection, migrate

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


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The swarmlog HTTP API for ``settings`` (default: from the environment).

    ``clock`` stamps every command's ``at`` (default: the system clock).
    """
    settings = settings or Settings()
    clock = clock or SystemClock()
    checked_schema(settings.db_schema)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kafka_url, database_url, redis_url = settings.require_services()
        topics = Topics.of(settings)
        pool = await asyncpg.create_pool(
            database_url, min_size=1, max_size=10, init=init_connection
        )
        redis = aioredis.from_url(redis_url)
        client = CommandClient(
            kafka_url, topics, remember_bytes=settings.client_outcome_cache_bytes
        )
        hub = StreamHub(
            kafka_url,
            settings.sse_max_clients,
            metrics,
            window_bytes=settings.sse_window_bytes,
        )
        try:
            await ensure_topics(kafka_url, topics)  # idempotent; the outcome topic must exist
            async with pool.acquire() as conn:  # queries must not race the projector's DDL
                await migrate(conn, settings.db_schema)
            await client.start()
            app.state.settings = settings
            app.state.clock = clock
            app.state.topics = topics
            app.state.pool = pool
            app.state.redis = redis
            app.state.command_client = client
            app.state.metrics = metrics
            app.state.hub = hub
            yield
        finally:
            await hub.close_all()
            await client.stop()
            await redis.aclose()
            await pool.close()

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
