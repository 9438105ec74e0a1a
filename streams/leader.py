"""What every process-manager runner shares: leader election, rebuilding a view from the
log, and planning when the view changes.

Why aiokafka here and not a faust-streaming agent (DESIGN.md says Faust): a process
manager needs one view across *all* partitions of the topics it reads. A Faust agent in a
consumer group sees only its share of the partitions, and a global table is where Faust's
recovery hangs live (faust-streaming #74, #651). So a runner reads every partition itself
(no group, read_committed), and copies elect one leader through a consumer group on the
one-partition coordination topic: the copy that is assigned that partition leads; the
others stand by and take over on rebalance.

Once elected, the leader folds the log from the beginning into a fresh view, and when it
has caught up with the end offsets it had at election, it plans whenever the view
changes and at least every ``idle_plan_s`` (for timers). Delivery is at-least-once:
command ids are derived from what caused them, so a resend is dropped by the deciders.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from commands.client import CommandClient
from domain.messages import Command
from infra import kafka
from infra.clock import Clock, SystemClock
from infra.codec import CommandEnvelope, DecodeError, StoredEvent, decode_event
from infra.topics import Topics

log = structlog.get_logger("swarmlog.streams")


class ElectedRunner(ABC):
    """A process manager's runner; subclasses say what to read, how to fold and what to send.

    ``name`` names its consumer group (``<prefix>-<name>``); ``tick_s`` is the longest a
    read waits (seconds); ``leader`` and ``caught_up`` are set while it leads and once its
    view has caught up with the log.
    """

    name: str = "process-manager"

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        source: str,
    ) -> None:
        self.bootstrap = bootstrap_servers
        self.topics = topics
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        self.source = source
        self.idle_plan_s = min(0.5, max(tick_s, 0.05))
        self.leader = asyncio.Event()
        self.caught_up = asyncio.Event()
        self.sent = 0
        self._planned_at = 0.0
        self._wants_cache: dict[bytes, bool] = {}

    @abstractmethod
    def read_topics(self) -> Iterable[str]:
        """The event topics whose every partition the view is folded from."""

    @abstractmethod
    def reset(self) -> None:
        """Start a fresh view (on election) and forget what was in flight."""

    @abstractmethod
    def apply(self, stored: StoredEvent) -> None:
        """Fold one event into the view."""

    @abstractmethod
    async def tick(self, client: CommandClient) -> None:
        """Plan from the view and send what is new (see ``send``)."""

    def wants(self, ce_type: str) -> bool:
        """Whether the view folds events of this CloudEvent type: records of other types
        are skipped before they are decoded (all are folded unless a runner says)."""
        return True

    def describe(self) -> dict[str, int]:
        """Figures logged when the view has been rebuilt."""
        return {}

    async def send(
        self, client: CommandClient, planned: list[tuple[str, Command, int | None]]
    ) -> list[Any]:
        """Send (command id, command, expected version) triples, in chunks; returns each
        command's RecordMetadata (partition and offset on the command topic), in order."""
        written: list[Any] = []
        for start in range(0, len(planned), 5000):
            written += await client.send_many(
                [
                    CommandEnvelope(
                        command_id=command_id,
                        command=command,
                        correlation_id=command_id,
                        expected_version=expected,
                        source=self.source,
                    )
                    for command_id, command, expected in planned[start : start + 5000]
                ]
            )
        self.sent += len(planned)
        return written

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by until elected, then lead until ``stop`` is set or leadership is lost."""
        runner = self

        class Election(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                if revoked:
                    runner.leader.clear()

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                if assigned:
                    runner.leader.set()

        election = kafka.consumer(
            self.bootstrap,
            group_id=f"{self.topics.prefix}-{self.name}",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        election.subscribe([self.topics.coordination], listener=Election())
        await election.start()
        client = CommandClient(self.bootstrap, self.topics, follow_outcomes=False)
        await client.start()
        try:
            while not stop.is_set():
                await election.getmany(timeout_ms=100)
                if not self.leader.is_set():
                    continue
                log.info("elected leader", process_manager=self.name)
                await self._lead(stop, election, client)
        finally:
            await client.stop()
            await election.stop()

    def _wanted(self, record: Any) -> bool:
        # Read from the raw header (one dict lookup per record): decoding a record costs
        # as much as the rest of what a runner does with it.
        ce_type = next((v for k, v in record.headers or () if k == "ce_type"), None)
        if ce_type is None:
            return True  # decode_event says what is wrong with it
        wanted = self._wants_cache.get(ce_type)
        if wanted is None:
            try:
                wanted = self.wants(ce_type.decode("utf-8"))
            except UnicodeDecodeError:
                wanted = True
            self._wants_cache[ce_type] = wanted
        return wanted

    async def _lead(
        self, stop: asyncio.Event, election: AIOKafkaConsumer, client: CommandClient
    ) -> None:
        self.reset()
        self.caught_up.clear()
        tps: list[TopicPartition] = []
        for topic in self.read_topics():
            tps += await kafka.partitions_of(self.bootstrap, topic)
        consumer = kafka.consumer(self.bootstrap)
        await consumer.start()
        try:
            consumer.assign(tps)
            for tp in tps:
                await consumer.seek_to_beginning(tp)
            ends = await consumer.end_offsets(tps)
            while not stop.is_set() and self.leader.is_set():
                batch = await consumer.getmany(
                    timeout_ms=int(self.tick_s * 1000), max_records=5000
                )
                for records in batch.values():
                    for record in records:
                        if not self._wanted(record):
                            continue
                        try:
                            self.apply(decode_event(record))
                        except DecodeError:
                            continue  # the projector dead-letters it; we only skip it
                await election.getmany(timeout_ms=0)  # stay in the group while reading
                if not self.caught_up.is_set():
                    if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                        self.caught_up.set()
                        log.info("view rebuilt", process_manager=self.name, **self.describe())
                    continue
                now = time.monotonic()
                if batch or now - self._planned_at >= self.idle_plan_s:
                    self._planned_at = now
                    await self.tick(client)
        finally:
            await consumer.stop()
