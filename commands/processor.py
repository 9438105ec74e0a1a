"""The command processor: consume commands, decide, produce events and the outcome, and
commit the consumer offsets, all in one Kafka transaction.

One transactional producer per command partition (``<prefix>-processor-p<N>``): when a
partition moves to another copy, the new owner's ``init_producer_id`` fences the old one
and aborts its open transaction (the pre-KIP-447 zombie-fencing scheme of KIP-98, which
is what aiokafka supports: its ``send_offsets_to_transaction`` takes a group id, not
group metadata). A fenced copy stops; it never retries.

When partition p is assigned, the decider state of every aggregate it owns is rebuilt
from partition p of each event topic (co-partitioned), and which command ids were
already decided from partition p of the outcome topic (see commands/idempotency.py: a
compact entry per id, the outcomes themselves in a byte-bounded cache and read back
from the outcome topic when a repeat needs one). That is how a repeated command id is
recognised, for as long as the outcome topic retains it (a week by default).

No input stops a partition. Whatever goes wrong with one command (its record does not
decode, its decider or ``evolve`` raises, an event or the outcome cannot be encoded)
ends that command alone: it is rejected (kind ``invalid``, code ``internal_error``, the
exception's type and message, no stack trace), its record goes to the dead-letter topic
with the reason, nothing it staged is kept, and the batch goes on. An event that would
not fit one Kafka record (``record_max_bytes``, as aiokafka counts a record) is a
``too_large`` rejection decided before anything of that command is written; an outcome
that would not fit is written without its ``state`` (then shorter still), so every
decoded command gets an outcome. Only Kafka failures (a send, the commit) abort the
batch: the partition is then taken over afresh and the batch retried; a record the
broker refuses as too large is remembered and rejected on the retry, not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from commands.idempotency import (
    DecidedCommands,
    OutcomeCache,
    command_digest,
    outcome_subject,
)
from domain.ids import event_id
from domain.messages import Decider, Rejection, rejected
from domain.recorded import RecordedEvent
from domain.registry import DECIDERS
from infra.clock import Clock, SystemClock
from infra.cloudevents import DecodeError, Record
from infra.deadletter_records import encode_dead_letter
from infra.envelope import CommandEnvelope, decode_command
from infra.kafka import Kafka, is_kafka_outage, send, stop_client
from infra.mapper import ce_type_of, decode_event, encode_event
from infra.outcome import Outcome, WrittenEvent, decode_outcome, encode_outcome
from infra.settings import Settings
from infra.topics import Topics

log = structlog.get_logger("swarmlog.processor")

Key = tuple[str, str]  # (aggregate type, aggregate id)

#: Longest command id plus aggregate id (UTF-8 bytes) the processor decides; a longer one
#: could not be named in an outcome record, so its command is dead-lettered unanswered.
MAX_ID_BYTES = 16 * 1024

#: Longest exception message an internal_error rejection carries.
MAX_DETAIL_CHARS = 2000

#: Seconds before the first retry of a failed batch, doubled per failed try up to the max.
RETRY_BACKOFF_START_S = 0.5
RETRY_BACKOFF_MAX_S = 5.0

#: Errors of one record that the broker or the producer refuses as too large.
_TOO_LARGE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


@dataclass
class PartitionState:
    """What the owner of one command partition knows: each aggregate's (state, version),
    the aggregates whose events could not be replayed (key -> why), and which command
    ids it has decided (``DecidedCommands``: where each one's first outcome is)."""

    producer: AIOKafkaProducer
    aggregates: dict[Key, tuple[Any, int]] = field(default_factory=dict)
    broken: dict[Key, str] = field(default_factory=dict)
    decided: DecidedCommands = field(default_factory=DecidedCommands)


class Fenced(RuntimeError):
    """A newer copy of the processor owns the partition; this one must stop."""


@dataclass
class Decision:
    """One command's decision, before anything of it is written.

    ``events`` are the encoded event records (each checked to fit one Kafka record);
    ``staged`` is the aggregate's (state, version) after them, None when nothing changes;
    ``dead_letter`` is the reason its record goes to the dead-letter topic, if it does.
    """

    outcome: Outcome
    events: list[Record] = field(default_factory=list)
    key: Key | None = None
    staged: tuple[Any, int] | None = None
    dead_letter: str | None = None


def record_size(record: Record) -> int:
    """Bytes ``record`` takes in a request, as aiokafka counts it against its producer's
    ``max_request_size`` (an upper bound: one record in its own batch)."""
    return int(
        DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
    )


def describe_size(n: int) -> str:
    """``"1.3 MiB (1,363,190 bytes)"``; KiB below one MiB."""
    if n >= 1024 * 1024:
        short = f"{n / (1024 * 1024):.1f}".removesuffix(".0") + " MiB"
    else:
        short = f"{n / 1024:.1f}".removesuffix(".0") + " KiB"
    return f"{short} ({n:,} bytes)"


def internal_error(exc: BaseException) -> Rejection:
    """The rejection of a command whose processing raised ``exc``: kind ``invalid`` (the
    same command would fail again, so it is not one to retry as it is), code
    ``internal_error``, the exception's type and message (no stack trace)."""
    message = str(exc)
    if len(message) > MAX_DETAIL_CHARS:
        message = message[:MAX_DETAIL_CHARS] + "..."
    detail = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return rejected("invalid", "internal_error", detail)


@dataclass(frozen=True)
class _TruncatedRecord:
    """The fields of a consumer record that encode_dead_letter reads, value cut short."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


class OutcomeReader:
    """Reads outcome records back by position (read_committed), for a repeated command
    id whose first outcome is no longer in the cache, and the outcome topic's log start
    offsets (what retention has deleted). One consumer outside any group, shared by the
    partitions under a lock, started on first use."""

    def __init__(self, kafka: Kafka, topic: str, *, timeout_s: float = 10.0) -> None:
        self.kafka = kafka
        self.topic = topic
        self.timeout_s = timeout_s
        self.reads = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = self.kafka.consumer()
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def read(self, partition: int, offset: int) -> Any | None:
        """The record at ``partition``/``offset``, or None when retention deleted it.
        Raises TimeoutError when the broker does not answer in ``timeout_s``."""
        async with self._lock:
            consumer = await self._started()
            tp = TopicPartition(self.topic, partition)
            if consumer.assignment() != {tp}:
                consumer.assign([tp])
            consumer.seek(tp, offset)  # before the log start: reset to it (earliest)
            self.reads += 1
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=200, max_records=50)
                for record in batch.get(tp, ()):
                    if record.offset == offset:
                        return record
                    if record.offset > offset:
                        return None
            raise TimeoutError(f"no outcome record at {self.topic}/{partition}/{offset}")

    async def log_starts(self, partitions: int) -> dict[int, int]:
        """Partition -> log start offset of the outcome topic's ``partitions`` partitions."""
        async with self._lock:
            consumer = await self._started()
            tps = [TopicPartition(self.topic, p) for p in range(partitions)]
            starts = await consumer.beginning_offsets(tps)
            return {tp.partition: offset for tp, offset in starts.items()}

    async def stop(self) -> None:
        """Close the consumer, if it was started."""
        if self._consumer is not None:
            await stop_client(self._consumer)
            self._consumer = None


class CommandProcessor:
    """Runs the transactional consume-decide-produce loop until ``stop`` is set.

    Several copies may run with the same ``topics.prefix``: the consumer group
    ``<prefix>-processor`` shares the command partitions among them.
    ``outcome_cache_bytes`` bounds the outcomes kept in memory for repeated command ids
    and ``record_max_bytes`` is the largest record written (default: the Settings
    ``processor_outcome_cache_bytes`` and ``record_max_bytes``). ``deciders`` maps each
    aggregate type to its decider (default: ``domain.registry.DECIDERS``).
    """

    #: How often the command ids whose outcomes retention deleted are forgotten (seconds).
    forget_interval_s = 300.0

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        clock: Clock | None = None,
        outcome_cache_bytes: int | None = None,
        record_max_bytes: int | None = None,
        deciders: Mapping[str, Decider[Any, Any, Any]] = DECIDERS,
    ) -> None:
        self.kafka = kafka
        self.deciders = deciders
        self.topics = topics
        self.clock = clock or SystemClock()
        if outcome_cache_bytes is None or record_max_bytes is None:
            settings = Settings()
            if outcome_cache_bytes is None:
                outcome_cache_bytes = settings.processor_outcome_cache_bytes
            if record_max_bytes is None:
                record_max_bytes = settings.record_max_bytes
        self.record_max_bytes = record_max_bytes
        self.cache = OutcomeCache(outcome_cache_bytes)
        self.reader = OutcomeReader(kafka, topics.outcomes)
        self.group_id = f"{topics.prefix}-processor"
        self.partitions: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self.consumer = kafka.consumer(
            group_id=self.group_id,
            max_poll_records=500,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        self.processed = 0
        self.internal_errors = 0
        self._failure: BaseException | None = None
        self.retry_backoff_s = RETRY_BACKOFF_START_S
        self._batch_failing = False
        #: Partitions this copy is assigned but could not take over (Kafka out): paused at
        #: the first command not committed, -> the monotonic time of the next try.
        self._lost: dict[int, float] = {}
        #: Seconds of deciding after which a batch is committed and the rest read again
        #: (well inside the producer's transaction timeout of 60 s).
        self.batch_budget_s = 5.0
        # (partition, offset) of a command whose record the broker refused -> rejection.
        self._refused: dict[tuple[int, int], Rejection] = {}
        self._next_forget = time.monotonic() + self.forget_interval_s

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and decide until ``stop`` is set; raises Fenced if fenced."""
        processor = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka: untyped
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                async with processor._lock:
                    for tp in revoked:
                        processor._lost.pop(tp.partition, None)
                        await processor._release(tp.partition)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                # aiokafka only logs what a listener raises; keep it so run() can raise it
                # rather than go on owning a partition it cannot decide for.
                async with processor._lock:
                    for tp in assigned:
                        processor._lost.pop(tp.partition, None)
                        try:
                            await processor._acquire(tp.partition)
                        except Exception as exc:  # noqa: BLE001 (raised by run())
                            processor.partitions.pop(tp.partition, None)
                            if not is_kafka_outage(exc):
                                processor._failure = exc
                                return
                            processor._lose(tp, None)  # taken over by run() once Kafka is back

        await self.consumer.start()
        self.consumer.subscribe([self.topics.commands], listener=Listener())
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200, max_records=500)
                if self._failure is not None:
                    raise RuntimeError("could not take over a command partition") from self._failure
                if time.monotonic() >= self._next_forget:
                    async with self._lock:
                        await self._forget_expired()
                if self._lost:
                    await self._take_over_lost()
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
            await stop_client(self.consumer)
            for p in list(self.partitions):
                await self._release(p)
            await self.reader.stop()

    async def _forget_expired(self) -> None:
        """Forget the command ids whose first outcome the outcome topic no longer holds."""
        self._next_forget = time.monotonic() + self.forget_interval_s
        try:
            starts = await self.reader.log_starts(self.topics.partitions)
        except Exception:  # best effort: try again next interval
            log.warning("could not read the outcome topic's log start offsets", exc_info=True)
            return
        for partition, ps in self.partitions.items():
            dropped = ps.decided.forget_before(starts)
            if dropped:
                log.info("expired command ids forgotten", partition=partition, count=dropped)

    async def _acquire(self, partition: int) -> None:
        producer = self.kafka.producer(
            transactional_id=f"{self.topics.prefix}-processor-p{partition}"
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
            if key in ps.broken:
                return
            state, _ = ps.aggregates.get(key, (None, 0))
            decider = self.deciders[stored.aggregate_type]
            try:
                ps.aggregates[key] = (decider.evolve(state, stored.event), stored.version)
            except Exception as exc:
                # One aggregate whose events cannot be replayed must not stop the
                # partition: its commands are rejected as internal errors instead.
                ps.broken[key] = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]
                ps.aggregates.pop(key, None)
                log.exception(
                    "an aggregate's events could not be replayed",
                    aggregate=key,
                    version=stored.version,
                )

        def on_outcome(record: Any) -> None:
            command_id = outcome_subject(record)
            if command_id is None:
                return
            digest = command_digest(command_id)
            if digest not in ps.decided:  # a later one repeats the first: keep the first
                ps.decided.remember_first(digest, record.partition, record.offset)
                if record.value:
                    self.cache.put(digest, bytes(record.value))

        try:
            await self.kafka.read_to_end(tps, on_event)
            await self.kafka.read_to_end(
                [TopicPartition(self.topics.outcomes, partition)], on_outcome
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await stop_client(producer)
            raise
        self.partitions[partition] = ps
        log.info(
            "partition assigned",
            partition=partition,
            aggregates=len(ps.aggregates),
            commands_seen=len(ps.decided),
            unreadable_aggregates=len(ps.broken),
        )

    def _lose(self, tp: TopicPartition, offset: int | None) -> None:
        """Give up ``tp`` until it can be taken over again (:meth:`_take_over_lost`): seek
        back to ``offset`` (the failed batch's first command; None: where the consumer
        is), pause it so no command of it is read meanwhile, and schedule the next try
        after ``retry_backoff_s`` (0.5 s doubling to 5 s). Nothing of it is held meanwhile,
        so a rebalance can hand it to another copy: the lock is not held while waiting."""
        if tp not in self.consumer.assignment():
            return  # revoked meanwhile: the new owner reads it from the committed offset
        if offset is not None:
            self.consumer.seek(tp, offset)
        self.consumer.pause(tp)
        self._lost[tp.partition] = time.monotonic() + self.retry_backoff_s
        self.retry_backoff_s = min(self.retry_backoff_s * 2, RETRY_BACKOFF_MAX_S)

    async def _take_over_lost(self) -> None:
        """Try again to take over each lost partition that is due and still assigned to
        this copy; resume it once taken. During a Kafka outage the new producer cannot
        start (its ``init_producer_id`` needs the broker) and the role waits the outage
        out, not exits; what is not an outage (``infra.kafka.is_kafka_outage``) is
        raised."""
        now = time.monotonic()
        for partition, due in list(self._lost.items()):
            tp = TopicPartition(self.topics.commands, partition)
            if tp not in self.consumer.assignment():
                self._lost.pop(partition, None)
                continue
            if now < due:
                continue
            async with self._lock:
                if partition not in self._lost:
                    continue  # revoked, or assigned afresh, while waiting for the lock
                try:
                    await self._acquire(partition)
                except Exception as exc:
                    self.partitions.pop(partition, None)
                    if not is_kafka_outage(exc):
                        raise  # not an outage to wait out (misconfigured, unauthorized)
                    log.debug("partition not taken over yet", partition=partition, error=repr(exc))
                    self._lose(tp, None)
                    continue
                del self._lost[partition]
                self.consumer.resume(tp)

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
        # (digest, encoded outcome value, future of its record) of each first decision,
        # remembered once the transaction is committed.
        firsts: list[tuple[bytes, bytes, Any]] = []
        sent: list[tuple[Any, int]] = []  # (future, command offset) of every event sent
        done = len(records)  # how many of the records this transaction decides
        try:
            async with ps.producer.transaction():
                # (outcome, or the id of a first decision in this batch; event futures;
                # digest when it is a first decision)
                pending: list[tuple[Outcome | str, list[Any], bytes | None]] = []
                written: list[Any] = []  # futures of every record sent; all must succeed
                loop = asyncio.get_running_loop()
                started = yielded = loop.time()
                for index, record in enumerate(records):
                    # Decisions are synchronous: end a batch of costly ones (workflow
                    # expressions) early, well inside the transaction timeout (the rest
                    # is read again after the commit), and let the consumer's heartbeats
                    # and the other partitions run between them.
                    now = loop.time()
                    if index and now - started > self.batch_budget_s:
                        done = index
                        break
                    if now - yielded > 0.05:
                        await asyncio.sleep(0)
                        yielded = loop.time()
                    env = await self._read_command(ps, record, written)
                    if isinstance(env, Outcome):  # unreadable, but it names its command id
                        digest = command_digest(env.command_id)
                        if env.command_id not in staged_outcomes and digest not in ps.decided:
                            staged_outcomes[env.command_id] = env
                            pending.append((env, [], digest))
                        continue
                    if env is None:
                        continue
                    if env.command_id in staged_outcomes:
                        pending.append((env.command_id, [], None))  # repeat within this batch
                        continue
                    digest = command_digest(env.command_id)
                    first = await self._first_outcome(ps, digest, env.command_id)
                    if first is not None:
                        pending.append((first.model_copy(update={"duplicate": True}), [], None))
                        continue
                    decision = self._decide_safely(ps, tp.partition, record, env, staged_aggregates)
                    if decision.dead_letter is not None:
                        written.append(await self._dead_letter(ps, record, decision.dead_letter))
                    futures = []
                    for event_record in decision.events:
                        try:
                            future = await send(ps.producer, event_record)
                        except _TOO_LARGE_ERRORS as exc:
                            self._refuse(tp.partition, record.offset, event_record, exc)
                            raise
                        futures.append(future)
                        sent.append((future, record.offset))
                    if decision.staged is not None and decision.key is not None:
                        staged_aggregates[decision.key] = decision.staged
                    staged_outcomes[env.command_id] = decision.outcome
                    pending.append((decision.outcome, futures, digest))
                # One wait for every event of the batch (not one gather per command):
                # the outcomes name the events' offsets, so they go after.
                await asyncio.gather(*(f for _, futures, _ in pending for f in futures))
                for outcome, futures, first_digest in pending:
                    if isinstance(outcome, str):  # its first outcome is complete by now
                        outcome = staged_outcomes[outcome].model_copy(update={"duplicate": True})
                    elif futures:
                        metas = [f.result() for f in futures]
                        events = [
                            e.at(m.partition, m.offset)
                            for e, m in zip(outcome.events, metas, strict=True)
                        ]
                        outcome = outcome.model_copy(update={"events": events})
                        staged_outcomes[outcome.command_id] = outcome
                    out = self._outcome_record(outcome)
                    future = await send(ps.producer, out)
                    written.append(future)
                    if first_digest is not None:
                        firsts.append((first_digest, out.value, future))
                # aiokafka commits a transaction even if one of its records failed: check
                # every record before the offsets go in, so a failure aborts the batch.
                await asyncio.gather(*written)
                await ps.producer.send_offsets_to_transaction(
                    {tp: records[done - 1].offset + 1}, self.group_id
                )
        except ProducerFenced as exc:
            raise Fenced(f"partition {tp.partition} is owned by a newer processor") from exc
        except Exception:
            self._refuse_failed(tp.partition, sent)
            # Start the partition afresh: a new producer with the same transactional id
            # fences this one and aborts whatever it left open (its error state may not
            # allow an abort), and the state is rebuilt from what was committed.
            if not self._batch_failing:  # once per outage, not per try
                self._batch_failing = True
                log.exception(
                    "batch failed; taking the partition over afresh", partition=tp.partition
                )
            await self._release(tp.partition)
            self._lose(tp, records[0].offset)  # taken over again by run(), outside the lock
            return
        self.retry_backoff_s = RETRY_BACKOFF_START_S
        if self._batch_failing:
            self._batch_failing = False
            log.info("batches commit again", partition=tp.partition)
        ps.aggregates.update(staged_aggregates)
        for digest, value, future in firsts:
            meta = future.result()
            ps.decided.remember(digest, meta.partition, meta.offset)
            self.cache.put(digest, value)
        if done < len(records):
            self.consumer.seek(tp, records[done].offset)
        self.processed += done

    # one command ------------------------------------------------------------------------

    async def _read_command(
        self, ps: PartitionState, record: Any, written: list[Any]
    ) -> CommandEnvelope | Outcome | None:
        """The command of ``record``; or, for a record that is not one (or whose ids are
        too long to name in an outcome), dead-letter it and return its rejected outcome
        where its headers name a command id and a command type (else None)."""
        rejection: Rejection | None
        try:
            env = decode_command(record)
        except DecodeError as exc:
            rejection = rejected("invalid", "malformed_command", str(exc)[:MAX_DETAIL_CHARS])
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 (the codec should raise only DecodeError)
            rejection = internal_error(exc)
            reason = f"internal_error: {rejection.detail}"
        else:
            ids = len(env.command_id.encode()) + len(env.command.aggregate_id.encode())
            if ids <= MAX_ID_BYTES:
                return env
            rejection = None
            reason = f"the command id and aggregate id are {ids:,} bytes; at most {MAX_ID_BYTES:,}"
        written.append(await self._dead_letter(ps, record, reason))
        log.warning("command dead-lettered", offset=record.offset, reason=reason)
        return None if rejection is None else self._unreadable_outcome(ps, record, rejection)

    def _unreadable_outcome(
        self, ps: PartitionState, record: Any, rejection: Rejection
    ) -> Outcome | None:
        """The rejected outcome of a command record that could not be read, when its
        headers name its id (``ce_id``) and a command type of a known aggregate."""
        headers: dict[str, str] = {}
        try:
            for name, value in record.headers or ():
                if name in ("ce_id", "ce_type", "ce_subject") and isinstance(value, bytes):
                    headers[name] = value.decode("utf-8")
            key = (record.key or b"").decode("utf-8")
        except UnicodeDecodeError:
            return None
        parts = headers.get("ce_type", "").split(".")
        command_id = headers.get("ce_id", "")
        aggregate_id = headers.get("ce_subject") or key
        if (
            not command_id
            or len(parts) != 5
            or parts[2] != "command"
            or parts[3] not in self.deciders
            or len(command_id.encode()) + len(aggregate_id.encode()) > MAX_ID_BYTES
        ):
            return None
        return Outcome(
            command_id=command_id,
            command_type=parts[4],
            aggregate_type=parts[3],
            aggregate_id=aggregate_id,
            status="rejected",
            version=ps.aggregates.get((parts[3], aggregate_id), (None, 0))[1],
            rejection=rejection,
            decided_at=self.clock.now(),
        )

    async def _first_outcome(
        self, ps: PartitionState, digest: bytes, command_id: str
    ) -> Outcome | None:
        """The first outcome of ``command_id`` if it was decided (from the cache, else read
        back from the outcome topic), or None."""
        position = ps.decided.position(digest)
        if position is None:
            return None
        value = self.cache.get(digest)
        outcome: Outcome | None = None
        if value is not None:
            with contextlib.suppress(ValueError):
                outcome = Outcome.model_validate_json(value)
        if outcome is None:
            record = await self.reader.read(*position)
            if record is None:  # retention deleted it: outside the idempotency window
                ps.decided.forget(digest)
                return None
            try:
                outcome = decode_outcome(record)
            except DecodeError:
                return None
            self.cache.put(digest, bytes(record.value))
        if outcome.command_id != command_id:  # a digest collision: not this command's
            return None
        return outcome

    def _decide_safely(
        self,
        ps: PartitionState,
        partition: int,
        record: Any,
        env: CommandEnvelope,
        staged: dict[Key, tuple[Any, int]],
    ) -> Decision:
        """``_decide``, with any exception turned into an internal_error rejection of this
        command alone (dead-lettered with the reason)."""
        refused = self._refused.pop((partition, record.offset), None)
        try:
            if refused is not None:
                return self._rejection(ps, env, staged, refused)
            return self._decide(ps, env, staged)
        except Exception as exc:
            self.internal_errors += 1
            rejection = internal_error(exc)
            log.exception(
                "command failed; rejected and dead-lettered",
                partition=partition,
                offset=record.offset,
                command_id=env.command_id,
                command_type=type(env.command).__name__,
            )
            key = (env.command.aggregate_type, env.command.aggregate_id)
            _, version = staged.get(key) or ps.aggregates.get(key) or (None, 0)
            outcome = Outcome(
                **self._outcome_base(env),
                status="rejected",
                version=version,
                rejection=rejection,
            )
            return Decision(outcome=outcome, dead_letter=f"internal_error: {rejection.detail}")

    def _outcome_base(self, env: CommandEnvelope) -> dict[str, Any]:
        command = env.command
        return {
            "command_id": env.command_id,
            "command_type": type(command).__name__,
            "aggregate_type": command.aggregate_type,
            "aggregate_id": command.aggregate_id,
            "decided_at": self.clock.now(),
        }

    def _rejection(
        self,
        ps: PartitionState,
        env: CommandEnvelope,
        staged: dict[Key, tuple[Any, int]],
        rejection: Rejection,
    ) -> Decision:
        command = env.command
        key = (command.aggregate_type, command.aggregate_id)
        state, version = staged.get(key) or ps.aggregates.get(key) or (None, 0)
        return Decision(
            outcome=Outcome(
                **self._outcome_base(env),
                status="rejected",
                version=version,
                rejection=rejection,
                state=self.deciders[command.aggregate_type].summary(state),
            )
        )

    def _decide(
        self,
        ps: PartitionState,
        env: CommandEnvelope,
        staged: dict[Key, tuple[Any, int]],
    ) -> Decision:
        """Decide ``env`` on the aggregate's staged or committed state and encode its
        events, checking each fits one record; writes nothing. Raises whatever the
        decider, ``evolve``, ``summary`` or the codec raises."""
        command = env.command
        decider = self.deciders[command.aggregate_type]
        key = (command.aggregate_type, command.aggregate_id)
        if key in ps.broken:
            raise RuntimeError(f"the aggregate's events could not be replayed: {ps.broken[key]}")
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
        if isinstance(result, Rejection):
            return self._rejection(ps, env, staged, result)
        # Events that list many units are cut to a quarter of a record each, leaving the
        # rest for the envelope, the headers and JSON escaping.
        result = decider.packed(result, self.record_max_bytes // 4)
        topic = self.topics.events(command.aggregate_type)
        records: list[Record] = []
        described: list[WrittenEvent] = []
        listed = 0  # bytes the events take in the outcome's list, roughly
        for index, event in enumerate(result):
            version += 1
            stored = RecordedEvent(
                id=event_id(env.command_id, index),
                aggregate_type=command.aggregate_type,
                aggregate_id=command.aggregate_id,
                version=version,
                time=command.at,
                correlation_id=env.correlation_id,
                causation_id=env.command_id,
                event=event,
            )
            encoded = encode_event(topic, stored)
            size = record_size(encoded)
            if size > self.record_max_bytes:
                return self._rejection(
                    ps,
                    env,
                    staged,
                    rejected(
                        "invalid",
                        "too_large",
                        f"event {command.aggregate_type}.{event.event_type} is"
                        f" {describe_size(size)}; the record limit is"
                        f" {describe_size(self.record_max_bytes)}",
                    ),
                )
            records.append(encoded)
            written = WrittenEvent(
                id=stored.id, type=ce_type_of(stored), version=version, topic=topic
            )
            described.append(written)
            listed += len(written.type or "") + len(topic) + 120
            state = decider.evolve(state, event)
        ids = len(env.command_id.encode()) + len(command.aggregate_id.encode())
        if listed + 3 * ids + 4096 > self.record_max_bytes:
            return self._rejection(
                ps,
                env,
                staged,
                rejected(
                    "invalid",
                    "too_large",
                    f"the outcome would list {len(described):,} events, about"
                    f" {describe_size(listed)}; the record limit is"
                    f" {describe_size(self.record_max_bytes)}",
                ),
            )
        summary = decider.summary(state)
        return Decision(
            outcome=Outcome(
                **self._outcome_base(env),
                status="accepted",
                version=version,
                events=described,
                state=summary,
            ),
            events=records,
            key=key,
            staged=(state, version),
        )

    # records ----------------------------------------------------------------------------

    def _outcome_record(self, outcome: Outcome) -> Record:
        """The outcome's record, made to fit one record: without ``state`` if it does not
        fit (or does not encode), then with the rejection detail cut short, then with each
        event listed by id, version and position only. RuntimeError if nothing fits
        (cannot happen for ids within MAX_ID_BYTES)."""
        smaller = [outcome, outcome.model_copy(update={"state": None})]
        if outcome.rejection is not None:
            short = outcome.rejection.model_copy(
                update={"detail": outcome.rejection.detail[:MAX_DETAIL_CHARS]}
            )
            smaller.append(smaller[-1].model_copy(update={"rejection": short}))
        if outcome.events:
            events = [e.bare() for e in outcome.events]
            smaller.append(smaller[-1].model_copy(update={"events": events}))
        problem = ""
        for candidate in smaller:
            try:
                record = encode_outcome(self.topics.outcomes, candidate)
            except Exception as exc:  # noqa: BLE001 (a smaller candidate follows)
                problem = f"{type(exc).__name__}: {exc}"
                continue
            size = record_size(record)
            if size <= self.record_max_bytes:
                if candidate is not outcome:
                    log.warning(
                        "outcome shrunk to fit one record",
                        command_id=outcome.command_id,
                        problem=problem or "too large",
                    )
                return record
            problem = f"{describe_size(size)} over the limit"
        raise RuntimeError(f"no outcome of {outcome.command_id[:100]} fits: {problem}")

    async def _dead_letter(self, ps: PartitionState, record: Any, reason: str) -> Any:
        """Send ``record`` to the dead-letter topic with ``reason``; returns the send's
        future. If that letter would not fit one record (or its headers do not encode),
        the value, key and headers are cut short and the reason says so."""
        at = self.clock.now()
        letter: Record | None = None
        with contextlib.suppress(Exception):
            letter = encode_dead_letter(self.topics.deadletter, record, reason, at)
        if letter is None or record_size(letter) > self.record_max_bytes:
            keep = self.record_max_bytes // 4
            value = bytes(record.value or b"")
            headers: list[tuple[str, bytes]] = []
            with contextlib.suppress(Exception):
                headers = [(str(k)[:256], bytes(v or b"")[:1024]) for k, v in record.headers or ()]
            cut = _TruncatedRecord(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=bytes(record.key or b"")[:1024],
                value=value[:keep],
                headers=headers[:64],
            )
            reason = f"{reason[:MAX_DETAIL_CHARS]} (record cut to {keep:,} of {len(value):,} bytes)"
            letter = encode_dead_letter(self.topics.deadletter, cut, reason, at)
        return await send(ps.producer, letter)

    def _refuse(self, partition: int, offset: int, record: Record, exc: BaseException) -> None:
        """Remember that the broker or producer refused an event of the command at
        ``offset`` as too large: on the batch's retry that command is rejected instead."""
        self._refused[(partition, offset)] = rejected(
            "invalid",
            "too_large",
            f"an event of {describe_size(record_size(record))} was refused by Kafka"
            f" ({type(exc).__name__}); the record limit is"
            f" {describe_size(self.record_max_bytes)}",
        )

    def _refuse_failed(self, partition: int, sent: list[tuple[Any, int]]) -> None:
        for future, offset in sent:
            if future.done() and not future.cancelled():
                exc = future.exception()
                if isinstance(exc, _TOO_LARGE_ERRORS):
                    self._refused.setdefault(
                        (partition, offset),
                        rejected("invalid", "too_large", f"an event was refused by Kafka: {exc}"),
                    )
