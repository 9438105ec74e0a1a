"""The composition root: the one place that builds swarmlog's parts and hands each its
clients (after cosmicpython's ``bootstrap.py``).

Every long-running part takes what it talks to instead of building it from a URL: a
``infra.kafka.Kafka`` (one cluster), the ``Topics``, a ``Clock``, and where it needs them an
asyncpg pool and a redis.asyncio client. This module is the only one that opens those
clients and the only one that closes them:

* ``connect(settings)`` -> ``Clients``: the Kafka, the Topics (created if missing), the
  clock and the settings every role shares. Nothing else connects here: a Kafka hands
  out clients that the parts start and stop themselves.
* one builder per role, given the ``Clients``: ``build_processor`` and
  ``build_process_managers`` (``build_scheduler``, ``build_economy``, ``build_workflow``)
  are plain constructors (these parts have no client of their own to open);
  ``open_projector`` and ``open_api`` are async context managers (they open the
  PostgreSQL pool and the Redis client of that role, and close them on exit).
* ``open_operator(settings)`` -> ``Operator``: Clients and a pool on the read models
  (``open_read_models``) for the operator commands (``swarmlog audit ledger``,
  ``swarmlog deadletters``), closed on exit.
* ``deploy(settings, roles)``: the processor, streams and projector roles asked for,
  built together on one ``Clients``, as a ``Deployment`` whose ``run(stop)`` runs them
  until ``stop`` is set. The API is built by ``api.app.create_app``'s lifespan with
  ``open_api`` (on the Clients handed to ``create_app``, else on its own ``connect``).

Who calls it: ``swarmlog processor|streams|projector`` (``infra.cli.run_roles``), the
API's lifespan, ``swarmlog audit ledger`` and ``swarmlog deadletters`` (an operator, and
for an event's replay a projector), the e2e fixture (every role, and the app on the same
Clients), the integration fixtures and unit tests (single parts on Clients of their own:
another clock, other settings), the benches (an operator for the ledger audit).

Signal handling and ``asyncio.run`` are the callers' (the CLI): nothing here installs a
signal handler or starts an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import structlog

from infra.clock import Clock, SystemClock
from infra.kafka import Kafka, is_kafka_outage
from infra.settings import Settings
from infra.topics import Topics, ensure_topics
from infra.watch import QuietReconnects, ServiceWatch, kafka_addresses, url_address

if TYPE_CHECKING:  # imported where used: a role loads only the clients it opens
    import asyncpg
    import redis.asyncio as aioredis

    from api.live import StreamHub
    from api.metrics import Metrics
    from commands.client import CommandClient
    from commands.processor import CommandProcessor
    from domain.messages import Decider
    from projections.projector import Projector
    from projections.readmodels.base import ReadModel
    from streams.economy_runner import EconomyRunner
    from streams.leader import ElectedRunner
    from streams.scheduler_runner import SchedulerRunner
    from streams.workflow_runner import WorkflowRunner

log = structlog.get_logger("swarmlog")

Role = Literal["processor", "streams", "projector", "api"]
ROLES: tuple[Role, ...] = ("processor", "streams", "projector", "api")
"""The process roles (``swarmlog processor|streams|projector|api``)."""

PROCESS_MANAGERS = ("scheduler", "economy", "workflow")
"""The process managers the ``streams`` role runs, by name."""


def configure_logging(level: str = "INFO") -> None:
    """structlog to stderr, and quieter aiokafka (its coordinator chatter is expected) and
    asyncpg: their line per reconnection attempt is dropped (``infra.watch.QuietReconnects``;
    a role's ``ServiceWatch`` logs an outage once when it starts and once when it ends)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, QuietReconnects) for f in handler.filters):
            handler.addFilter(QuietReconnects())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(),
    )


class Runnable(Protocol):
    """A long-running part: runs until ``stop`` is set, then finishes the batch in hand,
    commits and returns."""

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass(frozen=True)
class Clients:
    """What every role of one deployment shares: its settings, its Kafka cluster, its
    Topics and its clock. Build with ``connect``, or directly in a test (no IO)."""

    settings: Settings
    kafka: Kafka
    topics: Topics
    clock: Clock


#: Seconds a role starting during an outage waits for Kafka (or the API for PostgreSQL)
#: before it gives up (an address that never answers is more likely a misconfiguration).
START_WAIT_S = 300.0

T = TypeVar("T")


def is_outage(exc: BaseException) -> bool:
    """True for a failure to reach a service that a retry may get past: Kafka's (see
    ``infra.kafka.is_kafka_outage``: connection, timeout, retriable errors) or asyncpg's
    connection errors (checked only where asyncpg is loaded: a role that never opened
    PostgreSQL does not load it for this)."""
    if is_kafka_outage(exc):
        return True
    asyncpg = sys.modules.get("asyncpg")
    return asyncpg is not None and isinstance(
        exc, (asyncpg.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError)
    )


async def wait_out_outage(
    service: str, attempt: Callable[[], Awaitable[T]], *, wait_s: float = START_WAIT_S
) -> T:
    """``await attempt()``, again with capped exponential backoff (0.5 s doubling to 5 s)
    while it fails for an outage (``is_outage``) of ``service``, for up to ``wait_s``
    seconds; a role started during an outage waits for the service instead of exiting.
    Logs once when it starts waiting and once when the service answers. Raises what is
    not an outage at once, and RuntimeError naming the service after ``wait_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    delay, waiting_since = 0.5, None
    while True:
        try:
            result = await attempt()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if loop.time() + delay > deadline:
                raise RuntimeError(
                    f"{service} unreachable for {wait_s:.0f} s at start"
                    f" ({type(exc).__name__}: {exc}); is its address right?"
                ) from exc
            if waiting_since is None:
                waiting_since = loop.time()
                log.warning(
                    f"{service} is unreachable at start; waiting for it",
                    error=f"{type(exc).__name__}: {exc}",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if waiting_since is not None:
            log.info(f"{service} is back", waited_s=round(loop.time() - waiting_since, 1))
        return result


async def connect(
    settings: Settings,
    *,
    kafka: Kafka | None = None,
    clock: Clock | None = None,
    create_topics: bool = True,
) -> Clients:
    """The Clients of ``settings``: its Kafka (``kafka`` if given, else from
    KAFKA_BOOTSTRAP_SERVERS), its Topics (created on the broker if missing, unless
    ``create_topics`` is False) and ``clock`` (default: the system clock).

    An unreachable Kafka is waited for (``wait_out_outage``). Raises RuntimeError naming
    a service URL that ``settings`` lacks, or a Kafka unreachable for ``START_WAIT_S``.
    """
    if kafka is None:
        kafka = Kafka(settings.require_services()[0])
    topics = Topics.of(settings)
    if create_topics:
        servers = kafka.bootstrap_servers
        created = await wait_out_outage("kafka", lambda: ensure_topics(servers, topics))
        if created:
            log.info("topics created", topics=created)
    return Clients(settings=settings, kafka=kafka, topics=topics, clock=clock or SystemClock())


# the clients a role opens ---------------------------------------------------------------


@asynccontextmanager
async def postgres_pool(dsn: str, **kw: Any) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on ``dsn`` (``kw`` as ``asyncpg.create_pool`` takes), closed on exit.

    Every connection gets the read models' JSON codecs (``projections.schema.
    init_connection``), which the projector checks for and the queries rely on."""
    import asyncpg

    from projections.schema import init_connection

    pool = await asyncpg.create_pool(dsn, init=init_connection, **kw)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A redis.asyncio client on ``url`` (connects on first use), closed on exit."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def _service_urls(clients: Clients) -> tuple[str, str]:
    _, database_url, redis_url = clients.settings.require_services()
    return database_url, redis_url


def watch_services(
    clients: Clients, role: str, services: Iterable[str] = ("kafka", "postgres", "redis")
) -> ServiceWatch:
    """A ``ServiceWatch`` of ``services`` (among kafka, postgres, redis): the Kafka of
    ``clients``, the database and Redis its settings name; it logs as ``role``, one
    warning when a service stops answering, one info line when it is back. With more
    than one Kafka bootstrap server each broker is also watched on its own (``kafka
    broker host:port``), so a cluster running on fewer brokers is said too. Raises
    RuntimeError naming a service URL the settings lack.
    """
    settings = clients.settings
    chosen = tuple(services)
    if ("postgres" in chosen or "redis" in chosen) and not (
        settings.database_url and settings.redis_url
    ):
        settings.require_services()  # raises, naming what is missing
    addresses = {
        "kafka": kafka_addresses(clients.kafka.bootstrap_servers),
        "postgres": [url_address(settings.database_url or "", 5432)],
        "redis": [url_address(settings.redis_url or "", 6379)],
    }
    watched = {name: addresses[name] for name in chosen}
    if "kafka" in chosen and len(addresses["kafka"]) > 1:
        # A cluster goes on with a broker down, one loss from refusing writes: say so.
        for host, port in addresses["kafka"]:
            watched[f"kafka broker {host}:{port}"] = [(host, port)]
    return ServiceWatch(watched, role=role)


# one builder per role -------------------------------------------------------------------


def build_processor(
    clients: Clients, *, deciders: Mapping[str, Decider[Any, Any, Any]] | None = None
) -> CommandProcessor:
    """The command processor (consumer group ``<prefix>-processor``); it opens and closes
    its own Kafka consumer and producers (one transactional producer per partition) in
    ``run``."""
    from commands.processor import CommandProcessor

    settings = clients.settings
    return CommandProcessor(
        clients.kafka,
        clients.topics,
        clock=clients.clock,
        outcome_cache_bytes=settings.processor_outcome_cache_bytes,
        record_max_bytes=settings.record_max_bytes,
        **({} if deciders is None else {"deciders": deciders}),
    )


def build_scheduler(clients: Clients) -> SchedulerRunner:
    """The scheduler's process manager (assignment, leases, heartbeats), reading every
    ``settings.scheduler_tick_s``, with the settings' heartbeat timeout and aging."""
    from streams.scheduler import Policy
    from streams.scheduler_runner import SchedulerRunner

    settings = clients.settings
    return SchedulerRunner(
        clients.kafka,
        clients.topics,
        policy=Policy(
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            aging_interval_s=settings.aging_interval_s,
        ),
        clock=clients.clock,
        tick_s=settings.scheduler_tick_s,
    )


def build_economy(clients: Clients) -> EconomyRunner:
    """The economy's process manager (rewards, slashing, ledger credits, governance
    deadlines), resending an unanswered command after ``settings.economy_resend_s``."""
    from streams.economy_runner import EconomyRunner

    settings = clients.settings
    return EconomyRunner(
        clients.kafka,
        clients.topics,
        clock=clients.clock,
        tick_s=settings.scheduler_tick_s,
        resend_s=settings.economy_resend_s,
    )


def build_workflow(clients: Clients) -> WorkflowRunner:
    """The workflow engine's process manager (runs, step tasks, outcomes, cancellation),
    resending an unanswered command after ``settings.workflow_resend_s``."""
    from streams.workflow_runner import WorkflowRunner

    settings = clients.settings
    return WorkflowRunner(
        clients.kafka,
        clients.topics,
        clock=clients.clock,
        tick_s=settings.scheduler_tick_s,
        resend_s=settings.workflow_resend_s,
    )


def build_process_managers(
    clients: Clients, only: Iterable[str] = PROCESS_MANAGERS
) -> dict[str, ElectedRunner]:
    """The process managers named in ``only`` (default: the scheduler, the economy and the
    workflow engine), by name (see ``build_scheduler``, ``build_economy``,
    ``build_workflow``).

    Raises ValueError for a name not in ``PROCESS_MANAGERS``, or for none.
    """
    chosen = tuple(only)
    unknown = sorted(set(chosen) - set(PROCESS_MANAGERS))
    if unknown or not chosen:
        raise ValueError(
            f"unknown process manager(s) {unknown}; choose from {', '.join(PROCESS_MANAGERS)}"
        )
    builders: dict[str, Callable[[Clients], ElectedRunner]] = {
        "scheduler": build_scheduler,
        "economy": build_economy,
        "workflow": build_workflow,
    }
    return {name: builders[name](clients) for name in chosen}


@asynccontextmanager
async def open_projector(
    clients: Clients,
    *,
    pool: asyncpg.Pool | None = None,
    redis: aioredis.Redis | None = None,
    read_models: Sequence[type[ReadModel]] | None = None,
) -> AsyncIterator[Projector]:
    """The projector, with a PostgreSQL pool (sessions named
    ``swarmlog-projector-<schema>``) and a Redis client opened here and closed on exit;
    ``pool`` and ``redis``, when given, are used instead (and left open); ``read_models``,
    when given, replace ``projections.readmodels.READ_MODELS``."""
    from projections.projector import Projector

    settings = clients.settings
    async with AsyncExitStack() as stack:
        if pool is None or redis is None:
            database_url, redis_url = _service_urls(clients)
        if pool is None:
            pool = await stack.enter_async_context(
                postgres_pool(
                    database_url,
                    min_size=0,
                    max_size=4,
                    server_settings={
                        "application_name": f"swarmlog-projector-{settings.db_schema}"
                    },
                )
            )
        if redis is None:
            redis = await stack.enter_async_context(redis_client(redis_url))
        yield Projector(
            clients.kafka,
            clients.topics,
            pool=pool,
            redis=redis,
            schema=settings.db_schema,
            redis_prefix=settings.redis_prefix,
            batch_size=settings.projector_batch_size,
            clock=clients.clock,
            **({} if read_models is None else {"read_models": read_models}),
        )


@asynccontextmanager
async def open_read_models(clients: Clients) -> AsyncIterator[asyncpg.Pool]:
    """A small PostgreSQL pool on the read models (with their JSON codecs, like every
    pool here), for a short-lived reader of them such as an operator command; closed on
    exit."""
    database_url, _ = _service_urls(clients)
    async with postgres_pool(database_url, min_size=0, max_size=2) as pool:
        yield pool


@dataclass(frozen=True)
class Operator:
    """What the operator commands (``swarmlog audit ledger``, ``swarmlog deadletters``)
    work with: the deployment's ``clients`` and a ``pool`` on its read models."""

    clients: Clients
    pool: asyncpg.Pool

    @property
    def kafka(self) -> Kafka:
        """The deployment's Kafka cluster."""
        return self.clients.kafka

    @property
    def topics(self) -> Topics:
        """The deployment's topics."""
        return self.clients.topics

    @property
    def schema(self) -> str:
        """The PostgreSQL schema of the deployment's read models."""
        return self.clients.settings.db_schema


@asynccontextmanager
async def open_operator(
    settings: Settings, *, kafka: Kafka | None = None
) -> AsyncIterator[Operator]:
    """The Clients of ``settings`` (see ``connect``; no topic is created: an operator
    command only reads what the roles wrote) and a pool on its read models
    (``open_read_models``), closed on exit.

    Raises RuntimeError naming a service URL that ``settings`` lacks.
    """
    clients = await connect(settings, kafka=kafka, create_topics=False)
    async with open_read_models(clients) as pool:
        yield Operator(clients, pool)


@dataclass(frozen=True)
class ApiParts:
    """What the API's routes use (api/deps.py reads them from ``app.state``): a pool with
    JSON codecs on the read models, a Redis client, a started CommandClient following
    the outcome topic, and the SSE StreamHub."""

    pool: asyncpg.Pool
    redis: aioredis.Redis
    command_client: CommandClient
    hub: StreamHub


@asynccontextmanager
async def open_api(clients: Clients, metrics: Metrics) -> AsyncIterator[ApiParts]:
    """The API's parts: opens its pool and Redis client, migrates the read-model schema
    (idempotent: queries must never meet a missing table, nor race the projector's DDL),
    starts the CommandClient; on exit closes the SSE streams, the client, Redis and the
    pool. ``metrics`` counts the hub's streams."""
    from api.live import StreamHub
    from commands.client import CommandClient
    from projections.schema import migrate

    settings = clients.settings
    database_url, redis_url = _service_urls(clients)
    async with (
        # min_size 0: an API started during a PostgreSQL outage opens its pool anyway
        # (connections are made on demand; /ready says postgres is down meanwhile).
        postgres_pool(database_url, min_size=0, max_size=10) as pool,
        redis_client(redis_url) as redis,
    ):
        client = CommandClient(
            clients.kafka, clients.topics, remember_bytes=settings.client_outcome_cache_bytes
        )
        hub = StreamHub(
            clients.kafka,
            settings.sse_max_clients,
            metrics,
            window_bytes=settings.sse_window_bytes,
        )
        watch = watch_services(clients, "api")
        watching = asyncio.Event()
        watcher = asyncio.create_task(watch.run(watching), name="service-watch")
        try:

            async def migrated() -> None:
                async with pool.acquire() as conn:
                    await migrate(conn, settings.db_schema)

            await wait_out_outage("postgres", migrated)
            await client.start()
            yield ApiParts(pool=pool, redis=redis, command_client=client, hub=hub)
        finally:
            watching.set()
            await watcher
            await hub.close_all()
            await client.stop()


# every role at once ---------------------------------------------------------------------


@dataclass
class Deployment:
    """The roles ``deploy`` built, sharing one ``clients``. ``runnables`` holds every
    long-running part by name (``processor``, ``scheduler``, ``economy``, ``workflow``,
    ``projector``); the API is served by the caller (uvicorn) from ``create_app``."""

    clients: Clients
    processor: CommandProcessor | None = None
    process_managers: dict[str, ElectedRunner] = field(default_factory=dict)
    projector: Projector | None = None
    #: Logs once per outage of a service the roles use (see ``watch_services``).
    watch: ServiceWatch | None = None

    @property
    def runnables(self) -> dict[str, Runnable]:
        """Every long-running part, by role or process-manager name."""
        parts: dict[str, Runnable] = {}
        if self.processor is not None:
            parts["processor"] = self.processor
        parts.update(self.process_managers)
        if self.projector is not None:
            parts["projector"] = self.projector
        return parts

    async def run(self, stop: asyncio.Event) -> None:
        """Run every part (and the service watch) until ``stop`` is set; the first to
        fail fails this."""
        parts = [part.run(stop) for part in self.runnables.values()]
        if self.watch is not None:
            parts.append(self.watch.run(stop))
        await asyncio.gather(*parts)


@asynccontextmanager
async def deploy(
    settings: Settings,
    roles: Iterable[Role] = ("processor", "streams", "projector"),
    *,
    only: Iterable[str] = PROCESS_MANAGERS,
    kafka: Kafka | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Deployment]:
    """Build the ``roles`` of one deployment of ``settings`` on shared Clients (see
    ``connect``; ``only`` chooses the process managers of the ``streams`` role), and close
    every client they opened on exit. The ``api`` role is built by ``open_api`` from
    ``create_app``'s lifespan and is refused here (ValueError), as is an unknown role.
    """
    wanted = set(roles)
    if "api" in wanted or not wanted <= set(ROLES):
        raise ValueError(f"deploy builds processor, streams and projector, not {sorted(wanted)}")
    clients = await connect(settings, kafka=kafka, clock=clock)
    deployment = Deployment(clients)
    used = ("kafka", "postgres", "redis") if "projector" in wanted else ("kafka",)
    role = ",".join(r for r in ROLES if r in wanted)
    deployment.watch = watch_services(clients, role, used)
    if "processor" in wanted:
        deployment.processor = build_processor(clients)
    if "streams" in wanted:
        deployment.process_managers = build_process_managers(clients, only)
    async with AsyncExitStack() as stack:
        if "projector" in wanted:
            deployment.projector = await stack.enter_async_context(open_projector(clients))
        yield deployment
