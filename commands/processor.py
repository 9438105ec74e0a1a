"""The command processor: consume commands, decide, produce events and the outcome, and
commit the consumer offsets, all in one Kafka transaction.

One transactional producer per command partition (``<prefix>-processor-p<N>``): when a
partition moves to another copy, the new owner's ``init_producer_id`` fences the old one
and aborts its open transaction (the pre-KIP-447 zombie-fencing scheme of KIP-98, which
is what aiokafka supports: its ``send_offsets_to_transaction`` takes a group id, not
group metadata). A fenced copy stops; it never retries.

When partition p is assigned, the decider state of every aggregate it owns is rebuilt
from partition p of each event topic (co-partitioned), and the outcomes of the commands
already decided from partition p of the outcome topic: that is how a repeated command id
is recognised (for as long as the outcome topic retains it, a week by default).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ProducerFenced

from domain.messages import Rejection, rejected
from domain.registry import DECIDERS
from infra import kafka
from infra.clock import Clock, SystemClock
from infra.codec import (
    CommandEnvelope,
    DecodeError,
    Outcome,
    StoredEvent,
    decode_command,
    decode_event,
    decode_outcome,
    encode_dead_letter,
    encode_event,
    encode_outcome,
    event_id,
)
from infra.topics import Topics

log = structlog.get_logger("swarmlog.processor")

Key = tuple[str, str]  # (aggregate type, aggregate id)


@dataclass
class PartitionState:
    """What the owner of one command partition knows: each aggregate's (state, version)
    and every command id it has decided, with its outcome."""

    producer: AIOKafkaProducer
    aggregates: dict[Key, tuple[Any, int]] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class Fenced(RuntimeError):
    """A newer copy of the processor owns the partition; this one must stop."""


class CommandProcessor:
    """Runs the transactional consume-decide-produce loop until ``stop`` is set.

    Several copies may run with the same ``topics.prefix``: the consumer group
    ``<prefix>-processor`` shares the command partitions among them.
    """

    def __init__(
        self, bootstrap_servers: str, topics: Topics, *, clock: Clock | None = None
    ) -> None:
        self.bootstrap = bootstrap_servers
        self.topics = topics
        self.clock = clock or SystemClock()
        self.group_id = f"{topics.prefix}-processor"
        self.partitions: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self.consumer = kafka.consumer(
            bootstrap_servers,
            group_id=self.group_id,
            max_poll_records=500,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        self.processed = 0
        self._failure: BaseException | None = None
        self.retry_backoff_s = 0.5

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and decide until ``stop`` is set; raises Fenced if fenced."""
        processor = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                async with processor._lock:
                    for tp in revoked:
                        await processor._release(tp.partition)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                # aiokafka only logs what a listener raises; keep it so run() can raise it
                # rather than go on owning a partition it cannot decide for.
                async with processor._lock:
                    for tp in assigned:
                        try:
                            await processor._acquire(tp.partition)
                        except Exception as exc:
                            processor._failure = exc
                            return

        await self.consumer.start()
        self.consumer.subscribe([self.topics.commands], listener=Listener())
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200, max_records=500)
                if self._failure is not None:
                    raise RuntimeError("could not take over a command partition") from self._failure
                if not batch:
                    continue
                async with self._lock:
                    await asyncio.gather(
                        *(
                            self._process(tp, records)
                            for tp, records in batch.items()
                            if tp.partition in self.partitions
                        )
                    )
        finally:
            await self.consumer.stop()
            for p in list(self.partitions):
                await self._release(p)

    async def _acquire(self, partition: int) -> None:
        producer = kafka.producer(
            self.bootstrap, transactional_id=f"{self.topics.prefix}-processor-p{partition}"
        )
        await producer.start()  # init_producer_id: fences a stale owner, aborts its txn
        ps = PartitionState(producer=producer)
        tps = [TopicPartition(t, partition) for t in self.topics.event_topics.values()]

        def on_event(record: Any) -> None:
            try:
                stored = decode_event(record)
            except DecodeError:
                return  # we never wrote it; a foreign record must not stop a rebuild
            key = (stored.aggregate_type, stored.aggregate_id)
            state, _ = ps.aggregates.get(key, (None, 0))
            decider = DECIDERS[stored.aggregate_type]
            ps.aggregates[key] = (decider.evolve(state, stored.event), stored.version)

        def on_outcome(record: Any) -> None:
            try:
                outcome = decode_outcome(record)
            except DecodeError:
                return
            if not outcome.duplicate:
                ps.outcomes[outcome.command_id] = outcome

        await kafka.read_to_end(self.bootstrap, tps, on_event)
        await kafka.read_to_end(
            self.bootstrap, [TopicPartition(self.topics.outcomes, partition)], on_outcome
        )
        self.partitions[partition] = ps
        log.info(
            "partition assigned",
            partition=partition,
            aggregates=len(ps.aggregates),
            commands_seen=len(ps.outcomes),
        )

    async def _release(self, partition: int) -> None:
        ps = self.partitions.pop(partition, None)
        if ps is not None:
            with contextlib.suppress(Exception):  # a failed producer may not stop cleanly
                await ps.producer.stop()
            log.info("partition revoked", partition=partition)

    async def _process(self, tp: TopicPartition, records: list[Any]) -> None:
        ps = self.partitions[tp.partition]
        staged_aggregates: dict[Key, tuple[Any, int]] = {}
        staged_outcomes: dict[str, Outcome] = {}
        try:
            async with ps.producer.transaction():
                pending: list[tuple[Outcome | str, list[Any]]] = []
                written: list[Any] = []  # futures of every record sent; all must succeed
                for record in records:
                    try:
                        env = decode_command(record)
                    except DecodeError as exc:
                        written.append(
                            await kafka.send(
                                ps.producer,
                                encode_dead_letter(
                                    self.topics.deadletter, record, str(exc), self.clock.now()
                                ),
                            )
                        )
                        log.warning("command dead-lettered", offset=record.offset, reason=str(exc))
                        continue
                    if env.command_id in staged_outcomes:
                        pending.append((env.command_id, []))  # repeat within this batch
                        continue
                    first = ps.outcomes.get(env.command_id)
                    if first is not None:
                        pending.append((first.model_copy(update={"duplicate": True}), []))
                        continue
                    outcome, futures = await self._decide(ps, env, staged_aggregates)
                    staged_outcomes[env.command_id] = outcome
                    pending.append((outcome, futures))
                # One wait for every event of the batch (not one gather per command):
                # the outcomes name the events' offsets, so they go after.
                await asyncio.gather(*(f for _, futures in pending for f in futures))
                for outcome, futures in pending:
                    if isinstance(outcome, str):  # its first outcome is complete by now
                        outcome = staged_outcomes[outcome].model_copy(update={"duplicate": True})
                    elif futures:
                        metas = [f.result() for f in futures]
                        events = [
                            {**e, "partition": m.partition, "offset": m.offset}
                            for e, m in zip(outcome.events, metas, strict=True)
                        ]
                        outcome = outcome.model_copy(update={"events": events})
                        staged_outcomes[outcome.command_id] = outcome
                    written.append(
                        await kafka.send(ps.producer, encode_outcome(self.topics.outcomes, outcome))
                    )
                # aiokafka commits a transaction even if one of its records failed: check
                # every record before the offsets go in, so a failure aborts the batch.
                await asyncio.gather(*written)
                await ps.producer.send_offsets_to_transaction(
                    {tp: records[-1].offset + 1}, self.group_id
                )
        except ProducerFenced as exc:
            raise Fenced(f"partition {tp.partition} is owned by a newer processor") from exc
        except Exception:
            # Start the partition afresh: a new producer with the same transactional id
            # fences this one and aborts whatever it left open (its error state may not
            # allow an abort), and the state is rebuilt from what was committed.
            log.exception("batch failed; taking the partition over afresh", partition=tp.partition)
            await self._release(tp.partition)
            await asyncio.sleep(self.retry_backoff_s)
            self.retry_backoff_s = min(self.retry_backoff_s * 2, 30.0)
            await self._acquire(tp.partition)
            self.consumer.seek(tp, records[0].offset)
            return
        self.retry_backoff_s = 0.5
        ps.aggregates.update(staged_aggregates)
        ps.outcomes.update(staged_outcomes)
        self.processed += len(records)

    async def _decide(
        self,
        ps: PartitionState,
        env: CommandEnvelope,
        staged: dict[Key, tuple[Any, int]],
    ) -> tuple[Outcome, list[Any]]:
        command = env.command
        decider = DECIDERS[command.aggregate_type]
        key = (command.aggregate_type, command.aggregate_id)
        state, version = staged.get(key) or ps.aggregates.get(key) or (None, 0)
        result: list[Any] | Rejection
        if env.expected_version is not None and env.expected_version != version:
            result = rejected(
                "precondition",
                "version_mismatch",
                f"expected version {env.expected_version}, the aggregate is at {version}",
                field="If-Match",
            )
        else:
            result = decider.decide(command, state)
        base = dict(
            command_id=env.command_id,
            command_type=type(command).__name__,
            aggregate_type=command.aggregate_type,
            aggregate_id=command.aggregate_id,
            decided_at=self.clock.now(),
        )
        if isinstance(result, Rejection):
            return (
                Outcome(
                    **base,
                    status="rejected",
                    version=version,
                    rejection=result,
                    state=decider.summary(state),
                ),
                [],
            )
        topic = self.topics.events(command.aggregate_type)
        futures: list[Any] = []
        described: list[dict[str, Any]] = []
        for index, event in enumerate(result):
            version += 1
            stored = StoredEvent(
                id=event_id(env.command_id, index),
                aggregate_type=command.aggregate_type,
                aggregate_id=command.aggregate_id,
                version=version,
                time=command.at,
                correlation_id=env.correlation_id,
                causation_id=env.command_id,
                event=event,
            )
            futures.append(await kafka.send(ps.producer, encode_event(topic, stored)))
            described.append(
                {"id": stored.id, "type": stored.type, "version": version, "topic": topic}
            )
            state = decider.evolve(state, event)
        staged[key] = (state, version)
        return (
            Outcome(
                **base,
                status="accepted",
                version=version,
                events=described,
                state=decider.summary(state),
            ),
            futures,
        )
