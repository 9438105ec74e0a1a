"""The thin Kafka runner of the economy process manager (streams/economy.py decides).

The same shape as streams/runner.py, for the same reasons: it reads every partition of
every event topic itself (no group, read_committed), folds them into one
``EconomyView``, and copies elect one leader through the consumer group
``<prefix>-economy`` on the one-partition coordination topic. Once the view has caught
up with the log, it plans whenever the view changes and at least every ``idle_plan_s``
(for the governance deadlines), and sends what is new. Delivery is at-least-once; every
command id is derived from its causing event, so repeats are dropped by the deciders'
processor, and a command not settled within ``resend_s`` is sent again (same id).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from commands.client import CommandClient
from infra import kafka
from infra.clock import Clock, SystemClock
from infra.codec import CommandEnvelope, DecodeError, decode_event
from infra.topics import Topics
from streams.economy import EconomyView, apply, plan

log = structlog.get_logger("swarmlog.economy")


class EconomyRunner:
    """Runs the economy process manager: elect, rebuild the view from the log, then plan."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 10.0,
        source: str = "/swarmlog/economy",
    ) -> None:
        self.bootstrap = bootstrap_servers
        self.topics = topics
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        self.resend_s = resend_s
        self.source = source
        self.idle_plan_s = min(0.5, max(tick_s, 0.05))
        self.view = EconomyView()
        self.leader = asyncio.Event()
        self.caught_up = asyncio.Event()
        self.sent = 0
        self._inflight: dict[str, float] = {}  # command id -> monotonic time sent
        self._planned_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by until elected, then run until ``stop`` is set or leadership is lost."""
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
            group_id=f"{self.topics.prefix}-economy",
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
                log.info("elected economy leader")
                await self._lead(stop, election, client)
        finally:
            await client.stop()
            await election.stop()

    async def _lead(self, stop: asyncio.Event, election, client: CommandClient) -> None:  # type: ignore[no-untyped-def]
        self.view = EconomyView()
        self._inflight.clear()
        self.caught_up.clear()
        tps: list[TopicPartition] = []
        for topic in self.topics.event_topics.values():
            tps += await kafka.partitions_of(self.bootstrap, topic)
        consumer = kafka.consumer(self.bootstrap)
        await consumer.start()
        try:
            consumer.assign(tps)
            for tp in tps:
                await consumer.seek_to_beginning(tp)
            ends = await consumer.end_offsets(tps)
            while not stop.is_set() and self.leader.is_set():
                batch = await consumer.getmany(timeout_ms=int(self.tick_s * 1000), max_records=5000)
                for records in batch.values():
                    for record in records:
                        try:
                            apply(self.view, decode_event(record))
                        except DecodeError:
                            continue
                if not self.caught_up.is_set():
                    if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                        self.caught_up.set()
                        log.info("economy view rebuilt", rewards_due=len(self.view.rewards),
                                 credits_due=len(self.view.debits))
                    continue
                now = time.monotonic()
                if batch or now - self._planned_at >= self.idle_plan_s:
                    self._planned_at = now
                    await self._tick(client)
                await election.getmany(timeout_ms=0)
        finally:
            await consumer.stop()

    async def _tick(self, client: CommandClient) -> None:
        """Plan, and send what is new (or was sent more than ``resend_s`` ago)."""
        now = self.clock.now()
        # Resends go by the machine's monotonic time, not the (maybe manual) domain clock.
        mono = time.monotonic()
        for cid, sent_at in list(self._inflight.items()):
            if mono - sent_at > self.resend_s:
                del self._inflight[cid]
        fresh = plan(self.view, now, skip=self._inflight)
        if not fresh:
            return
        for start in range(0, len(fresh), 5000):
            await client.send_many(
                [
                    CommandEnvelope(
                        command_id=p.command_id,
                        command=p.command,
                        correlation_id=p.command_id,
                        expected_version=p.expected_version,
                        source=self.source,
                    )
                    for p in fresh[start:start + 5000]
                ]
            )
        for p in fresh:
            self._inflight[p.command_id] = mono
        self.sent += len(fresh)
