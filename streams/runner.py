"""The thin Kafka runner of the process managers (streams/scheduler.py owns the decisions).

Why aiokafka here and not a faust-streaming agent (DESIGN.md says Faust): the scheduler
needs one view of *all* agents and *all* unfinished tasks, across every partition of two
topics. A Faust agent in a consumer group sees only its share of the partitions, and a
global table is where Faust's recovery hangs live (faust-streaming #74, #651). So the
runner reads every partition itself (no group, read_committed), and copies elect one
leader through a consumer group on the one-partition coordination topic: the copy that
is assigned that partition schedules; the others stand by and take over on rebalance.

Delivery is at-least-once: commands carry ids derived from the aggregate version they
act on, so a resend (after a restart, or while an outcome is slow) is dropped by the
decider.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from commands.client import CommandClient
from infra import kafka
from infra.clock import Clock, SystemClock
from infra.codec import CommandEnvelope, DecodeError, decode_event
from infra.topics import Topics
from streams.scheduler import Planned, Policy, SchedulerView, apply, plan

log = structlog.get_logger("swarmlog.streams")


@dataclass
class _Inflight:
    sent_at: datetime
    planned: Planned
    task_version: int | None


class SchedulerRunner:
    """Runs the scheduler: elect, rebuild the view from the log, then tick.

    ``tick_s`` is how often it plans (seconds); a command not answered by an event
    within ``resend_s`` seconds is planned (and sent, same id) again.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        *,
        policy: Policy | None = None,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 3.0,
        source: str = "/swarmlog/scheduler",
    ) -> None:
        self.bootstrap = bootstrap_servers
        self.topics = topics
        self.policy = policy or Policy()
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        self.resend_s = resend_s
        self.source = source
        self.idle_plan_s = min(0.5, max(tick_s, 0.05))
        self._planned_at = 0.0
        self.view = SchedulerView()
        self.leader = asyncio.Event()
        self.caught_up = asyncio.Event()
        self.sent = 0
        self._inflight: dict[str, _Inflight] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by until elected, then schedule until ``stop`` is set or leadership is lost."""
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
            group_id=f"{self.topics.prefix}-scheduler",
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
                log.info("elected scheduler leader")
                await self._lead(stop, election, client)
        finally:
            await client.stop()
            await election.stop()

    async def _lead(self, stop: asyncio.Event, election, client: CommandClient) -> None:  # type: ignore[no-untyped-def]
        self.view = SchedulerView()
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
                changed = bool(batch)
                for records in batch.values():
                    for record in records:
                        try:
                            apply(self.view, decode_event(record))
                        except DecodeError:
                            continue  # the projector dead-letters it; we only skip it
                await election.getmany(timeout_ms=0)  # stay in the group while catching up
                if not self.caught_up.is_set():
                    if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                        self.caught_up.set()
                        log.info("scheduler view rebuilt", agents=len(self.view.agents),
                                 tasks=len(self.view.tasks))
                    continue
                # Plan when the view changed, and at least every `idle_plan_s` for timers.
                now = time.monotonic()
                if changed or now - self._planned_at >= self.idle_plan_s:
                    self._planned_at = now
                    await self._tick(client)
        finally:
            await consumer.stop()

    async def _tick(self, client: CommandClient) -> None:
        """Plan, and send what is new."""
        now = self.clock.now()
        for cid, inf in list(self._inflight.items()):
            task = self.view.tasks.get(inf.planned.task_id or "")
            moved = inf.task_version is not None and (task is None or task.version != inf.task_version)
            if moved or (now - inf.sent_at).total_seconds() > self.resend_s:
                del self._inflight[cid]
        tentative = {
            i.planned.task_id: i.planned.agent_id
            for i in self._inflight.values()
            if i.planned.task_id and i.planned.agent_id
        }
        fresh = [
            p for p in plan(self.view, now, self.policy, tentative)
            if p.command_id not in self._inflight
        ]
        if not fresh:
            return
        await client.send_many(
            [
                CommandEnvelope(
                    command_id=p.command_id,
                    command=p.command,
                    correlation_id=p.command_id,
                    expected_version=p.expected_version,
                    source=self.source,
                )
                for p in fresh
            ]
        )
        for p in fresh:
            task = self.view.tasks.get(p.task_id or "")
            self._inflight[p.command_id] = _Inflight(now, p, task.version if task else None)
        self.sent += len(fresh)

