"""The composition root: builds each process role from Settings and runs it until SIGTERM.

One function per role (``swarmlog processor|streams|projector|api``); each creates its
clients inside the running loop (nothing connects at import time), ensures the topics
exist, and stops cleanly on SIGTERM or SIGINT: it finishes the batch in hand, commits,
and closes its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import structlog

from infra.clock import SystemClock
from infra.settings import Settings
from infra.topics import Topics, ensure_topics

log = structlog.get_logger("swarmlog")


def configure_logging(level: str = "INFO") -> None:
    """structlog to stderr, and quieter aiokafka (its coordinator chatter is expected)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(),
    )


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await run(stop)


async def _ready_topics(settings: Settings) -> Topics:
    kafka_url, _, _ = settings.require_services()
    topics = Topics.of(settings)
    created = await ensure_topics(kafka_url, topics)
    if created:
        log.info("topics created", topics=created)
    return topics


def run_processor(settings: Settings) -> None:
    """Run the command processor until SIGTERM."""
    from commands.processor import CommandProcessor

    async def main() -> None:
        topics = await _ready_topics(settings)
        processor = CommandProcessor(settings.require_services()[0], topics, clock=SystemClock())
        await _until_signalled(processor.run)

    asyncio.run(main())


PROCESS_MANAGERS = ("scheduler", "economy", "workflow")
"""The process managers ``swarmlog streams`` runs, by name."""


def run_streams(settings: Settings, only: tuple[str, ...] = PROCESS_MANAGERS) -> None:
    """Run the process managers named in ``only`` (default: the scheduler, the economy and
    the workflow engine) until SIGTERM. Raises ValueError for a name not in
    ``PROCESS_MANAGERS``."""
    unknown = sorted(set(only) - set(PROCESS_MANAGERS))
    if unknown or not only:
        raise ValueError(
            f"unknown process manager(s) {unknown}; choose from {', '.join(PROCESS_MANAGERS)}"
        )
    from streams.economy_runner import EconomyRunner
    from streams.scheduler import Policy
    from streams.scheduler_runner import SchedulerRunner
    from streams.workflow_runner import WorkflowRunner

    async def main() -> None:
        topics = await _ready_topics(settings)
        kafka_url = settings.require_services()[0]
        scheduler = SchedulerRunner(
            kafka_url,
            topics,
            policy=Policy(
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
                aging_interval_s=settings.aging_interval_s,
            ),
            tick_s=settings.scheduler_tick_s,
        )
        economy = EconomyRunner(kafka_url, topics, tick_s=settings.scheduler_tick_s)
        workflow = WorkflowRunner(kafka_url, topics, tick_s=settings.scheduler_tick_s)

        runners = {"scheduler": scheduler, "economy": economy, "workflow": workflow}

        async def every(stop: asyncio.Event) -> None:
            await asyncio.gather(*(runners[name].run(stop) for name in only))

        await _until_signalled(every)

    asyncio.run(main())


def run_projector(settings: Settings) -> None:
    """Run the projector until SIGTERM."""
    import asyncpg
    import redis.asyncio as aioredis

    from infra.kafka import Kafka
    from projections.projector import Projector
    from projections.schema import init_connection

    async def main() -> None:
        topics = await _ready_topics(settings)
        kafka_url, database_url, redis_url = settings.require_services()
        pool = await asyncpg.create_pool(
            database_url,
            min_size=0,
            max_size=4,
            init=init_connection,
            server_settings={"application_name": f"swarmlog-projector-{settings.db_schema}"},
        )
        redis = aioredis.from_url(redis_url)
        try:
            projector = Projector(
                Kafka(kafka_url),
                topics,
                pool=pool,
                redis=redis,
                schema=settings.db_schema,
                redis_prefix=settings.redis_prefix,
                batch_size=settings.projector_batch_size,
            )
            await _until_signalled(projector.run)
        finally:
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def run_api(settings: Settings) -> None:
    """Serve the HTTP API with uvicorn until SIGTERM, in ``settings.api_workers``
    processes (uvicorn's workers share the port; each has its own Kafka clients)."""
    import os

    import uvicorn

    from api.app import create_app

    asyncio.run(_ready_topics(settings))
    if settings.api_workers > 1:
        # Workers build the app from the environment: hand the settings down through it.
        kafka_url, database_url, redis_url = settings.require_services()
        os.environ.update(
            KAFKA_BOOTSTRAP_SERVERS=kafka_url, DATABASE_URL=database_url, REDIS_URL=redis_url
        )
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=settings.api_host,
            port=settings.api_port,
            workers=settings.api_workers,
            log_level="warning",
        )
        return
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="on",
    )  # uvicorn handles SIGTERM itself
