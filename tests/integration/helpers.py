"""Shared helpers of the integration tests: fresh names per test, running a process role
in-process or as a subprocess, and reading topics back (read_committed).

Every test works under its own prefix (``t`` + 10 hex digits) used for its topics,
consumer groups, transactional ids, PostgreSQL schema and Redis keys, so that tests
sharing one Kafka, PostgreSQL and Redis never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from aiokafka import TopicPartition

from domain.messages import Command
from domain.recorded import RecordedEvent
from infra import kafka, supervise
from infra.bootstrap import Clients, build_processor
from infra.clock import Clock, SystemClock
from infra.cloudevents import DecodeError
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.mapper import decode_event
from infra.outcome import Outcome, decode_outcome
from infra.settings import Settings
from infra.stack import StackInfo
from infra.topics import Topics, ensure_topics

if TYPE_CHECKING:
    from commands.client import CommandClient

ROOT = Path(__file__).resolve().parents[2]


def fresh_prefix() -> str:
    """A new prefix for one test's topics, groups, schema and keys."""
    return "t" + uuid.uuid4().hex[:10]


async def fresh_topics(bootstrap: str, prefix: str | None = None) -> Topics:
    """A fresh Topics (3 partitions), created on the broker."""
    topics = Topics(prefix=prefix or fresh_prefix(), partitions=3)
    await ensure_topics(bootstrap, topics)
    return topics


def clients(
    bootstrap: str,
    topics: Topics,
    *,
    services: StackInfo | None = None,
    clock: Clock | None = None,
    **settings: Any,
) -> Clients:
    """The composition root's Clients for one test (no IO): Kafka at ``bootstrap``,
    ``topics`` (whose prefix also names the PostgreSQL schema and the Redis keys),
    ``clock`` (default: the system clock) and Settings with ``settings`` (field names,
    e.g. ``scheduler_tick_s=0.05``); ``services`` gives the database and Redis URLs the
    projector and the API open."""
    values: dict[str, Any] = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "topic_prefix": topics.prefix,
        "partitions": topics.partitions,
        "db_schema": topics.prefix,
        "redis_prefix": topics.prefix,
    }
    if services is not None:
        values.update(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url)
    return Clients(
        settings=Settings.model_validate({**values, **settings}),
        kafka=Kafka(bootstrap),
        topics=topics,
        clock=clock or SystemClock(),
    )


def now() -> datetime:
    return datetime.now(UTC)


def envelope(
    command: Command,
    command_id: str | None = None,
    *,
    expected_version: int | None = None,
) -> CommandEnvelope:
    """The envelope a client would send: a fresh command id unless one is given."""
    cid = command_id or str(uuid.uuid4())
    return CommandEnvelope(
        command_id=cid,
        command=command,
        correlation_id=cid,
        expected_version=expected_version,
        source="/tests",
    )


class Runnable(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


class Running:
    """A role's ``run(stop)`` as an asyncio task; ``stop()`` sets the event and waits."""

    def __init__(self, role: Runnable, name: str) -> None:
        self.role = role
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(role.run(self.stop_event), name=name)

    async def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout)

    def check(self) -> None:
        """Raise the role's exception if it died."""
        if self.task.done():
            self.task.result()
            raise AssertionError(f"{self.task.get_name()} stopped by itself")


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# reading topics back ------------------------------------------------------------------


async def read_records(bootstrap: str, topic: str) -> list[Any]:
    """Every committed record of ``topic`` (all partitions, each in offset order)."""
    tps = await kafka.partitions_of(bootstrap, topic)
    out: list[Any] = []
    await kafka.read_to_end(bootstrap, tps, out.append)
    return out


async def read_events(bootstrap: str, topics: Topics) -> list[RecordedEvent]:
    """Every event on every event topic (read_committed), each partition in offset order.

    Records that are not events swarmlog understands are skipped (tests that put them
    there check the dead-letter topic instead).
    """
    out: list[RecordedEvent] = []
    for topic in topics.event_topics.values():
        for record in await read_records(bootstrap, topic):
            with contextlib.suppress(DecodeError):
                out.append(decode_event(record))
    return out


async def read_outcomes(bootstrap: str, topics: Topics) -> list[Outcome]:
    """Every outcome on the command-outcome topic."""
    return [decode_outcome(r) for r in await read_records(bootstrap, topics.outcomes)]


async def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[TopicPartition, int]:
    """The committed end offset (last stable offset) of every partition of ``topics``."""
    tps: list[TopicPartition] = []
    for topic in topics:
        tps += await kafka.partitions_of(bootstrap, topic)
    c = kafka.consumer(bootstrap)
    await c.start()
    try:
        return dict(await c.end_offsets(tps))
    finally:
        await c.stop()


def by_aggregate(events: Iterable[RecordedEvent]) -> dict[tuple[str, str], list[RecordedEvent]]:
    """Events grouped by (aggregate type, id), each group in log order."""
    groups: dict[tuple[str, str], list[RecordedEvent]] = defaultdict(list)
    for e in events:
        groups[(e.aggregate_type, e.aggregate_id)].append(e)
    return groups


def assert_log_is_clean(events: list[RecordedEvent]) -> None:
    """No event id twice; each aggregate's versions are 1..N, gapless, in log order."""
    ids = [e.id for e in events]
    dupes = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    assert not dupes, f"{len(dupes)} event ids on the log more than once, e.g. {sorted(dupes)[:3]}"
    for key, group in by_aggregate(events).items():
        versions = [e.version for e in group]
        assert versions == list(range(1, len(group) + 1)), f"{key}: versions {versions}"


# subprocess roles ---------------------------------------------------------------------


def role_env(services: StackInfo, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a role subprocess working under ``prefix`` (``infra.supervise.
    role_env``, with 3 partitions and unbuffered output), plus the variables ``extra``."""
    env = supervise.role_env(services, prefix, partitions=3)
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class RoleProcess:
    """A role (processor, projector, streams) running as a child process, started and
    stopped by its pid through ``infra.supervise.Children``; its output goes to
    ``log_path`` (a ``<name>.log`` file)."""

    def __init__(self, role: str, env: dict[str, str], log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        self._name = log_path.stem
        self._children = supervise.Children(log_dir=log_path.parent)
        if self._children.log_path(self._name) != log_path:
            raise ValueError(f"{log_path}: a role's log is a <name>.log file")
        self.proc = self._children.start_role(role, env, name=self._name, cwd=ROOT)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL this process (by its pid) and reap it."""
        if self.alive():
            self._children.kill(self._name)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM (a clean stop), SIGKILL if it does not exit in ``timeout`` seconds."""
        self._children.stop_all(timeout_s=timeout)

    def output(self) -> str:
        return self._children.log_tail(self._name)


async def read_at(bootstrap: str, topic: str, partition: int, offset: int) -> Any:
    """The committed record at ``topic``/``partition``/``offset``."""
    tp = TopicPartition(topic, partition)
    c = kafka.consumer(bootstrap)
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, offset)
        return await asyncio.wait_for(c.getone(tp), 10)
    finally:
        await c.stop()


class EventFollower:
    """Follows every event topic from the beginning (read_committed) in the background;
    ``events`` grows as they arrive."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.events: list[RecordedEvent] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        tps: list[TopicPartition] = []
        for topic in self.topics.event_topics.values():
            tps += await kafka.partitions_of(self.bootstrap, topic)
        self._consumer = kafka.consumer(self.bootstrap)
        await self._consumer.start()
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._follow(), name="event-follower")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _follow(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    with contextlib.suppress(DecodeError):
                        self.events.append(decode_event(r))

    def of(self, cls: type, **fields: Any) -> list[RecordedEvent]:
        """The events of type ``cls`` whose data has these field values, in arrival order."""
        return [
            e
            for e in self.events
            if isinstance(e.event, cls) and all(getattr(e.event, k) == v for k, v in fields.items())
        ]

    async def wait_for(
        self, cls: type, count: int = 1, timeout: float = 20.0, **fields: Any
    ) -> list[RecordedEvent]:
        """Wait until at least ``count`` events match ``of(cls, **fields)``; return them."""
        await wait_until(
            lambda: len(self.of(cls, **fields)) >= count,
            timeout,
            what=f"{count} x {cls.__name__} {fields or ''}",
        )
        return self.of(cls, **fields)


@contextlib.asynccontextmanager
async def processor_with_client(
    bootstrap: str,
) -> AsyncIterator[tuple[Topics, CommandClient, EventFollower]]:
    """Fresh topics, an in-process command processor that owns every partition, a started
    CommandClient and an EventFollower: what the process-manager tests stand on. On exit
    the processor must not have crashed (``Running.check``)."""
    from commands.client import CommandClient

    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor = build_processor(clients(bootstrap, topics))
    r = Running(processor, "processor")
    try:
        await wait_until(
            lambda: r.check() or len(processor.partitions) == topics.partitions,
            30,
            what="the processor to own every partition",
        )
        async with EventFollower(bootstrap, topics) as log:
            yield topics, client, log
        r.check()
    finally:
        if not r.task.done():
            await r.stop()
        await client.stop()
