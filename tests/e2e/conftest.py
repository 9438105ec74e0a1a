"""The ``swarm`` fixture: a whole swarmlog deployment per test, in this process.

Each test gets fresh topics (prefix ``t<10 hex>``), consumer groups, PostgreSQL schema
and Redis prefix on the session's real Kafka, PostgreSQL and Redis (``services``, from
tests/conftest.py), and runs as asyncio tasks every role as the composition root
(infra/bootstrap.py) builds them: the command processor, the process managers (scheduler,
economy, workflow engine), the projector, and the API, served by a real uvicorn on a free
loopback port. Tests talk to
it over HTTP only (httpx, httpx-sse), as a client would.

Override settings for one test with indirect parametrization::

    @pytest.mark.parametrize("swarm", [{"sse_max_clients": 1}], indirect=True)

``{"manual_clock": True}`` runs the API and the process managers on one ManualClock
(``swarm.clock``), for deadlines a test moves past with ``swarm.clock.advance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

from api.app import create_app
from commands.processor import CommandProcessor
from infra import bootstrap
from infra.bootstrap import Clients
from infra.clock import Clock, ManualClock, SystemClock
from infra.settings import Settings
from infra.stack import StackInfo
from infra.supervise import remove_run
from infra.topics import Topics
from projections.projector import Projector
from streams.economy_runner import EconomyRunner
from streams.scheduler_runner import SchedulerRunner
from streams.workflow_runner import WorkflowRunner

T = TypeVar("T")

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0


@dataclass
class Swarm:
    """A running deployment: where its API is, a client for it, its settings and topics."""

    base_url: str
    client: httpx.AsyncClient
    settings: Settings
    topics: Topics
    clients: Clients
    processor: CommandProcessor
    scheduler: SchedulerRunner
    projector: Projector
    economy: EconomyRunner
    workflow: WorkflowRunner
    clock: Clock
    roles: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return self.settings.require_services()[0]

    def check_alive(self) -> None:
        """Raise the error of any role that died (so a test fails with its cause)."""
        for name, (stop, task) in self.roles.items():
            if task.done() and not stop.is_set():
                exc = task.exception()
                raise AssertionError(f"{name} stopped unexpectedly: {exc!r}") from exc

    async def stop_role(self, name: str) -> None:
        """Stop one role (``processor``, ``scheduler``, ``economy``, ``workflow``,
        ``projector``) and wait for it."""
        stop, task = self.roles[name]
        stop.set()
        await asyncio.wait_for(task, SHUTDOWN_TIMEOUT_S)

    def start_processor(self) -> CommandProcessor:
        """Start a new command processor (after ``stop_role("processor")``)."""
        self.processor = bootstrap.build_processor(self.clients)
        self._start("processor", self.processor.run)
        return self.processor

    def _start(self, name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        stop = asyncio.Event()
        self.roles[name] = (stop, asyncio.create_task(run(stop), name=name))

    async def commands_on_log(self) -> int:
        """How many records the command topic holds (all partitions)."""
        tps = await self.clients.kafka.partitions_of(self.topics.commands)
        consumer = self.clients.kafka.consumer()
        await consumer.start()
        try:
            ends = await consumer.end_offsets(tps)
            return sum(ends.values())
        finally:
            await consumer.stop()

    async def eventually(
        self,
        probe: Callable[[], Awaitable[T | None]],
        *,
        timeout_s: float = 30.0,
        what: str = "condition",
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self.check_alive()
            value = await probe()
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(0.1)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@pytest.fixture
async def swarm(services: StackInfo, request: pytest.FixtureRequest) -> AsyncIterator[Swarm]:
    """A fresh deployment for one test (see the module docstring)."""
    overrides: dict[str, Any] = dict(getattr(request, "param", None) or {})
    clock: Clock = (
        ManualClock(start=SystemClock().now())
        if overrides.pop("manual_clock", False)
        else SystemClock()
    )
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings.model_validate(
        {
            "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "topic_prefix": prefix,
            "db_schema": prefix,
            "redis_prefix": prefix,
            "partitions": 3,
            "command_wait_s": 5.0,
            "sse_send_timeout_s": 5.0,
            "heartbeat_timeout_s": 120.0,
            "scheduler_tick_s": 0.1,
            "economy_resend_s": 2.0,
            **overrides,
        }
    )
    roles = ("processor", "streams", "projector")
    async with (
        bootstrap.deploy(settings, roles, clock=clock) as d,
        _serve(services, settings, d) as s,
    ):
        yield s


@contextlib.asynccontextmanager
async def _serve(
    services: StackInfo, settings: Settings, d: bootstrap.Deployment
) -> AsyncIterator[Swarm]:
    """Run the deployment's roles and the API on a free port; stop them all afterwards."""
    assert d.processor is not None and d.projector is not None
    managers = d.process_managers
    scheduler, economy, workflow = (
        managers["scheduler"],
        managers["economy"],
        managers["workflow"],
    )
    assert isinstance(scheduler, SchedulerRunner)
    assert isinstance(economy, EconomyRunner)
    assert isinstance(workflow, WorkflowRunner)
    topics, clock = d.clients.topics, d.clients.clock
    sock = _free_socket()
    port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(clients=d.clients),
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=3,
        )
    )
    client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30.0))
    s = Swarm(
        base_url=base_url,
        client=client,
        settings=settings,
        topics=topics,
        clients=d.clients,
        processor=d.processor,
        scheduler=scheduler,
        projector=d.projector,
        economy=economy,
        workflow=workflow,
        clock=clock,
    )
    for name, part in d.runnables.items():
        s._start(name, part.run)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="api")
    try:

        async def up() -> bool:
            if serving.done():
                raise AssertionError(f"the API did not start: {serving.exception()!r}")
            return (
                server.started
                and len(s.processor.partitions) == settings.partitions
                and scheduler.caught_up.is_set()
                and economy.caught_up.is_set()
                and workflow.caught_up.is_set()
            )

        await s.eventually(up, timeout_s=STARTUP_TIMEOUT_S, what="the swarm to start")
        yield s
        s.check_alive()
    finally:
        await client.aclose()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, SHUTDOWN_TIMEOUT_S)
        sock.close()
        for stop, _ in s.roles.values():
            stop.set()
        tasks = [task for _, task in s.roles.values()]
        done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await remove_run(services, topics, settings.db_schema, settings.redis_prefix)
