"""The projector: event topics -> PostgreSQL read models (and Redis hot views).

The read models themselves (their tables, how a batch changes them, their Redis views)
are modules of projections/readmodels/, registered in ``READ_MODELS``; the projector owns
the loop around them: the consumer, one transaction per batch, the offsets, dead
letters, retries and replay.

Offsets live in PostgreSQL, not in Kafka ("storing offsets outside Kafka", KafkaConsumer
javadoc): each batch's rows and the next offset of every partition it read commit in one
transaction, and on assignment the consumer seeks to the stored offsets. A restart, or a
kill -9 mid-batch, therefore neither skips nor double-applies an event.

Redis is written after the commit, by each read model's ``sync_redis`` (the agents' hashes
guarded by the time the rows were read, so that an older write never overwrites a newer
one); on start the projector copies every read model's Redis view, which closes the gap a
crash between the commit and the Redis write could leave.

No record stops the projector (a dead letter is written instead), and no outage skips
one (the batch is retried):

- A record that cannot be read, or whose rows PostgreSQL refuses for a reason in the
  record (a NUL in a text or JSON value, a number out of a column's range, a view's
  ``evolve`` raising: anything ``is_transient`` says is not an outage), is dead-lettered
  with the reason, and its offset is stored with the rest of the batch. The batch is
  applied in one transaction with bulk statements; when that fails for a data reason it
  is rolled back and applied again in halves, each in a savepoint, halving again the
  halves that fail, down to the records that fail on their own (``_apply_isolated``).
  Their dead letters are written and flushed before the transaction that skips them
  commits, so a kill between the two loses nothing (a replay writes the same dead
  letter again, with the same id).
- An outage (PostgreSQL, Redis or Kafka unreachable or restarting, a connection killed)
  retries the batch with capped exponential backoff, logged once when it starts and once
  when it ends; nothing is dead-lettered for it. Redis is written after the commit, so a
  Redis outage does not hold PostgreSQL back: the ids to copy wait and are copied when
  Redis answers again.

The projector also projects the dead-letter topic (every role's dead letters) into the
``dead_letters`` table, which ``swarmlog deadletters`` and ``GET /deadletters`` list;
``Projector.replay`` re-applies a dead-lettered event after a fix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiokafka.errors
import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from domain.backoff import backoff_seconds
from domain.recorded import Position, RecordedEvent
from infra.clock import Clock, SystemClock
from infra.cloudevents import DecodeError
from infra.deadletter_records import encode_dead_letter
from infra.kafka import Kafka, send, stop_client
from infra.mapper import ce_type_of, decode_event
from infra.topics import Topics
from projections.db import checked_schema, has_json_codec
from projections.keys import RedisKeys
from projections.offsets import lock_offset, lock_offsets, save_offsets, stored_offsets
from projections.readmodels import READ_MODELS, Applied, DeadLetters, EventArchive, ReadModel
from projections.readmodels.archive import count_archived
from projections.readmodels.base import Row
from projections.readmodels.dead_letters import mark_replayed, read_dead_letter
from projections.schema import migrate

log = structlog.get_logger("swarmlog.projector")

# Not a record's fault: the database, Redis or Kafka is unreachable, restarting or out of
# resources, the connection was killed (08, 57: admin shutdown, cannot connect now), a
# serialization failure or deadlock (40), or the schema is not what the statements expect
# (42: a deployment problem that every record would meet, so dead-lettering would spray
# the whole log). These are retried; everything else met while applying one record is
# that record's (PostgreSQL's data exceptions 22 and constraint violations 23, asyncpg's
# refusal to encode a parameter, a view raising) and dead-letters it.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.SyntaxOrAccessError,
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.OutdatedSchemaCacheError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a failover to a standby
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout behind another copy
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    aiokafka.errors.KafkaError,
)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is an outage to wait out (retry the batch), False if it is the
    fault of the records being applied (find them and dead-letter them).

    asyncpg's client-side ``DataError`` (a parameter it cannot encode, e.g. an integer
    out of int64 range) is an ``InterfaceError`` and a ``ValueError``: data, not an
    outage; other ``InterfaceError`` s (connection closed, released) are outages.
    """
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, ValueError)
    return isinstance(exc, _TRANSIENT)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Backoff:
    """Capped exponential backoff over one outage, logged when it starts and when it ends.

    ``failed(exc)`` returns the seconds to wait before the next try (0.1 s doubling up to
    ``cap_s``, with jitter); ``ok()`` ends the outage.
    """

    def __init__(self, what: str, *, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.what = what
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempts = 0
        self.since = 0.0

    def failed(self, exc: BaseException) -> float:
        """Count a failed try; log the first of an outage; return the delay in seconds."""
        self.attempts += 1
        if self.attempts == 1:
            self.since = time.monotonic()
            if is_transient(exc):
                log.warning(f"{self.what}: outage, retrying with backoff", error=_reason(exc))
            else:
                log.error(
                    f"{self.what}: failed (not a record's fault), retrying with backoff",
                    error=_reason(exc),
                    exc_info=exc,
                )
        return backoff_seconds(self.what, self.attempts, base_s=self.base_s, cap_s=self.cap_s)

    def ok(self) -> None:
        """The try succeeded: log the end of the outage, if there was one."""
        if self.attempts:
            log.info(
                f"{self.what}: recovered",
                tries=self.attempts + 1,
                after_s=round(time.monotonic() - self.since, 3),
            )
        self.attempts = 0


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


@dataclass
class _Applied:
    """What applying events changed: how many were applied, and per read model the ids
    whose Redis view may change."""

    projected: int = 0
    redis: dict[str, set[str]] = field(default_factory=dict)

    def merge(self, other: _Applied) -> None:
        self.projected += other.projected
        for name, ids in other.redis.items():
            self.redis.setdefault(name, set()).update(ids)


@dataclass(frozen=True)
class ReplayResult:
    """What ``Projector.replay`` did: the event re-applied (``applied``: it changed a
    row; False when the row had already moved past it), later events of the same
    aggregate re-applied with it, and those dead-lettered again."""

    event_id: str
    aggregate: str
    applied: bool
    later_applied: int
    later_dead_lettered: int


class ReplayError(Exception):
    """A dead letter could not be re-applied (still refused, or not projected yet)."""


class Projector:
    """Consumes every event topic in the consumer group ``<prefix>-projector`` and keeps
    the read models of ``schema`` (``READ_MODELS`` and the event archive) and their Redis
    views in step with the log; and the dead-letter topic, into the ``dead_letters`` table.

    Takes its clients from the composition root, which opens and closes them: ``kafka``
    (the projector builds its consumer and its dead-letter producer from it and stops
    them), ``pool`` (an asyncpg pool built with ``init=projections.schema.
    init_connection``; ``run`` raises TypeError if it was not; a few connections are
    enough: one per batch, one for the Redis copies) and ``redis``. Keys in Redis start
    with ``redis_prefix`` (``RedisKeys``).

    ``read_models`` are the read-model classes it keeps (default ``READ_MODELS``; the
    composition root or a test may hand in others, in lock order).

    Several copies share the partitions. ``batch_size`` bounds the records per transaction.
    ``projected`` counts the events applied, ``retries`` the tries of a batch that failed
    for an outage.
    """

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        schema: str,
        redis_prefix: str,
        batch_size: int = 500,
        clock: Clock | None = None,
        read_models: Sequence[type[ReadModel]] = READ_MODELS,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.pool = pool
        self.redis = redis
        self.schema = checked_schema(schema)
        self.keys = RedisKeys(redis_prefix)
        self.batch_size = batch_size
        self.clock = clock or SystemClock()
        self.projected = 0
        #: Tries of a batch that failed for an outage (or anything not a record's fault).
        self.retries = 0
        self.read_models: tuple[ReadModel, ...] = tuple(
            model(self.schema, self.keys) for model in read_models
        )
        self.archive = EventArchive(self.schema, self.keys)
        self.dead_letters = DeadLetters(self.schema)
        # Redis views still to write (after the commits that changed them), per read
        # model; all of them at start, which closes the gap a crash between a commit and
        # its write left.
        self._redis_all = True
        self._redis_pending: dict[str, set[str]] = {}
        self._redis_next_try = 0.0
        self._redis_outage = Backoff("redis views")

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set.

        Never stops for a record (it is dead-lettered) nor for an outage (waited out with
        backoff); an outage at start (migrating the schema) is waited out too. Raises
        TypeError at start if the pool has no JSON codec (see the class docstring).
        """
        dead_letters = self.kafka.producer()
        consumer = self.kafka.consumer(
            group_id=f"{self.topics.prefix}-projector",
            max_poll_records=self.batch_size,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        projector = self

        # aiokafka is untyped: its listener base class is Any to mypy.
        class Seek(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                pass

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                # Only synchronous seeks here: an awaited seek lets getmany hand out records
                # from the old position in between. A partition with no stored offset
                # starts at the beginning by auto_offset_reset (we never commit to Kafka).
                # If PostgreSQL is down now, nothing is sought: the partitions start at the
                # beginning and each batch skips what is below the stored offsets (read
                # under lock in _transaction), so this costs reading, never a double apply.
                try:
                    stored = await stored_offsets(projector.pool, projector.schema)
                except Exception as exc:  # noqa: BLE001 - safe either way (see above)
                    log.warning(
                        "stored offsets unreadable; reading from the beginning", error=_reason(exc)
                    )
                    return
                for tp in assigned:
                    if (tp.topic, tp.partition) in stored:
                        consumer.seek(tp, stored[(tp.topic, tp.partition)])

        try:
            starting = Backoff("projector start (migrate)")
            while True:
                try:
                    async with self.pool.acquire() as conn:
                        codec = await has_json_codec(conn)
                        if codec:
                            await migrate(conn, self.schema)
                    starting.ok()
                    break
                except Exception as exc:  # noqa: BLE001 - an outage at start is waited out
                    if await _sleep_unless(stop, starting.failed(exc)):
                        return
            if not codec:
                raise TypeError(
                    "the projector's pool has no JSON codec: build it with"
                    " asyncpg.create_pool(..., init=projections.schema.init_connection)"
                )
            await dead_letters.start()
            topics = [*self.topics.event_topics.values(), self.topics.deadletter]
            consumer.subscribe(topics, listener=Seek())
            await consumer.start()
            saved: dict[TopicPartition, int] = {}
            outage = Backoff("projection")
            while not stop.is_set():
                await self._flush_redis()
                batch = await consumer.getmany(timeout_ms=200, max_records=self.batch_size)
                # The position, not the last offset + 1: it also steps over transaction
                # markers, so a caught-up projector's offsets equal the log end offsets.
                positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                moved = {tp: n for tp, n in positions.items() if saved.get(tp) != n}
                if not (batch or moved):
                    continue
                while True:  # the same batch until it commits: an outage never skips one
                    try:
                        await self._project(dead_letters, batch, moved)
                        outage.ok()
                        break
                    except Exception as exc:  # noqa: BLE001 - records are handled inside
                        self.retries += 1
                        if await _sleep_unless(stop, outage.failed(exc)):
                            return  # nothing committed: a restart reads the batch again
                saved.update(moved)
        finally:
            await stop_client(consumer)
            await stop_client(dead_letters)

    async def replay(self, position: Position) -> ReplayResult:
        """Re-apply the dead-lettered event at ``position`` of an event topic, after a fix
        (of the view, the schema or the decoder), and mark its ``dead_letters`` rows
        replayed.

        The event is re-applied with the later events of its aggregate up to the stored
        offset: the views ignored them while the aggregate lacked the row this event
        makes (a dead-lettered submission leaves its task without a row). It runs in one
        transaction that holds the partition's stored offset, as a projector batch does,
        so it is safe beside running projectors; later events that fail on their own are
        dead-lettered again. An event the row has already moved past (later events were
        projected) changes nothing (``applied`` False): the views never go back.

        Raises ReplayError, changing nothing, if the partition is not projected past the
        position yet, or the event is still unreadable or still refused; TypeError if the
        pool has no JSON codec.
        """
        tp = TopicPartition(position.topic, position.partition)
        if not await has_json_codec(self.pool):
            raise TypeError(
                "the projector's pool has no JSON codec: build it with"
                " asyncpg.create_pool(..., init=projections.schema.init_connection)"
            )
        producer = self.kafka.producer()
        await producer.start()
        s = self.schema
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                next_offset = await lock_offset(conn, s, tp.topic, tp.partition)
                if next_offset is None or next_offset <= position.offset:
                    raise ReplayError(
                        f"{tp.topic}/{tp.partition} is not projected past offset"
                        f" {position.offset} yet (stored offset {next_offset}): the projector"
                        " will read the record itself"
                    )
                records: list[Any] = []
                await self.kafka.read_to_end(
                    [tp],
                    lambda rec: records.append(rec) if rec.offset < next_offset else None,
                    start={tp: position.offset},
                )
                if not records or records[0].offset != position.offset:
                    raise ReplayError(f"no record at {tp.topic}/{tp.partition}/{position.offset}")
                try:
                    event = decode_event(records[0])
                except Exception as exc:  # any failure: still unreadable
                    raise ReplayError(f"still unreadable: {exc}") from exc
                later: list[tuple[Any, RecordedEvent]] = []
                for rec in records[1:]:
                    try:
                        e = decode_event(rec)
                    except Exception:  # noqa: BLE001, S112 - dead-lettered on its own
                        continue
                    if (e.aggregate_type, e.aggregate_id) == (
                        event.aggregate_type,
                        event.aggregate_id,
                    ):
                        later.append((rec, e))
                later_ids = [e.id for _, e in later]
                later_before = await count_archived(conn, s, later_ids)
                try:
                    async with conn.transaction():
                        first = await self._apply_all(conn, [event])
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise ReplayError(f"still refused: {_reason(exc)}") from exc
                applied = bool(await count_archived(conn, s, [event.id]))
                more, refused = await self._apply_isolated(conn, later, whole_failed=False)
                await self._dead_letter(producer, refused)
                later_applied = await count_archived(conn, s, later_ids) - later_before
                await mark_replayed(
                    conn,
                    s,
                    position,
                    f"re-applied by the projector: event {'applied' if applied else 'ignored'}"
                    f", {later_applied} later event(s) of {event.aggregate_id!r} applied",
                )
            first.merge(more)
            for model in self.read_models:
                if first.redis.get(model.name):
                    await model.sync_redis(self.pool, self.redis, first.redis[model.name])
            return ReplayResult(
                event_id=event.id,
                aggregate=f"{event.aggregate_type} {event.aggregate_id}",
                applied=applied,
                later_applied=later_applied,
                later_dead_lettered=len(refused),
            )
        finally:
            await producer.stop()

    async def _project(
        self,
        dead_letters: Any,
        batch: dict[TopicPartition, list[Any]],
        positions: dict[TopicPartition, int],
    ) -> None:
        """Apply ``batch`` and store ``positions`` in one transaction: in bulk, and if
        that fails for a data reason, again with the failing records isolated and
        dead-lettered. Raises on an outage (the caller retries the batch)."""
        try:
            applied = await self._transaction(dead_letters, batch, positions, False)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "batch refused; applying it again with the failing records isolated",
                records=sum(map(len, batch.values())),
                error=_reason(exc),
            )
            applied = await self._transaction(dead_letters, batch, positions, True)
        self.projected += applied.projected
        for name, ids in applied.redis.items():
            self._redis_pending.setdefault(name, set()).update(ids)

    async def _transaction(
        self,
        dead_letters: Any,
        batch: dict[TopicPartition, list[Any]],
        positions: dict[TopicPartition, int],
        isolate: bool,
    ) -> _Applied:
        """One try at ``batch`` in one transaction (see ``_project``); with ``isolate``,
        records whose rows fail on their own are dead-lettered instead of failing it."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The stored offsets, locked: records below them were projected already (by
            # this copy before a rebalance, or by another copy); they are skipped, so a
            # record is applied once whatever the consumer hands out.
            stored = await lock_offsets(
                conn, self.schema, ((tp.topic, tp.partition) for tp in set(batch) | set(positions))
            )
            items: list[tuple[Any, RecordedEvent]] = []
            rejected: list[tuple[Any, str]] = []
            letters: list[Row] = []
            for tp, records in batch.items():
                floor = stored.get((tp.topic, tp.partition), -1)
                for record in records:
                    if record.offset < floor:
                        continue
                    if tp.topic == self.topics.deadletter:
                        letters.append(read_dead_letter(record))
                        continue
                    try:
                        items.append((record, decode_event(record)))
                    except DecodeError as exc:
                        rejected.append((record, str(exc)))
                    except Exception as exc:  # noqa: BLE001 - a decoder should raise
                        rejected.append((record, _reason(exc)))  # nothing else: the record's
            if isolate:
                applied, refused = await self._apply_isolated(conn, items)
                rejected += refused
            else:
                applied = await self._apply_all(conn, [e for _, e in items])
            await self._insert_letters(conn, letters, isolate)
            # Written and flushed before the commit that skips the records: a kill between
            # the two loses nothing (the replayed batch writes the same dead letter again).
            await self._dead_letter(dead_letters, rejected)
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
            for tp, position in positions.items():
                offsets[tp] = max(position, offsets.get(tp, 0))
            await save_offsets(
                conn,
                self.schema,
                [
                    (tp.topic, tp.partition, n)
                    for tp, n in offsets.items()
                    if n > stored.get((tp.topic, tp.partition), -1)
                ],
            )
        return applied

    async def _apply_all(self, conn: asyncpg.Connection, events: list[RecordedEvent]) -> _Applied:
        """Apply ``events`` (in order) to every read model in the open transaction, then
        archive the events they applied."""
        applied = Applied()
        for model in self.read_models:
            applied.merge(await model.apply(conn, events))
        await self.archive.apply(conn, applied.events)
        return _Applied(len(events), applied.redis)

    async def _apply_isolated(
        self,
        conn: asyncpg.Connection,
        items: list[tuple[Any, RecordedEvent]],
        *,
        whole_failed: bool = True,
    ) -> tuple[_Applied, list[tuple[Any, str]]]:
        """Apply ``items`` (record, event) in order in the open transaction, each half in
        a savepoint, halving the halves that fail down to single records: returns what
        was applied and the (record, reason) of each record that fails on its own.

        k bad records among n cost about 2k log2(n) savepoints; the good records are
        applied in the same order as in one go, so the rows are the same.
        ``whole_failed``: ``items`` already failed as a whole (start with the halves). An
        outage raises (the caller retries the whole batch).
        """
        applied = _Applied()
        refused: list[tuple[Any, str]] = []

        async def attempt(chunk: list[tuple[Any, RecordedEvent]]) -> None:
            try:
                async with conn.transaction():
                    got = await self._apply_all(conn, [e for _, e in chunk])
            except Exception as exc:
                if is_transient(exc):
                    raise
                if len(chunk) == 1:
                    record, e = chunk[0]
                    refused_type = ce_type_of(e)
                    reason = f"projection refused {refused_type} {e.aggregate_id!r}: {_reason(exc)}"
                    refused.append((record, reason))
                    return
                await split(chunk)
            else:
                applied.merge(got)

        async def split(chunk: list[tuple[Any, RecordedEvent]]) -> None:
            half = len(chunk) // 2
            await attempt(chunk[:half])
            await attempt(chunk[half:])

        if len(items) > 1 and whole_failed:
            await split(items)  # no need to try it whole again
        elif items:
            await attempt(items)
        return applied, refused

    async def _insert_letters(
        self, conn: asyncpg.Connection, letters: list[Row], isolate: bool
    ) -> None:
        """Insert the ``dead_letters`` rows; with ``isolate``, each in a savepoint, and one
        that still fails is logged and left out (a dead letter is never dead-lettered)."""
        if not isolate:
            await self.dead_letters.insert(conn, letters)
            return
        for letter in letters:
            try:
                async with conn.transaction():
                    await self.dead_letters.insert(conn, [letter])
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.error("dead letter not listed", id=letter["id"], error=_reason(exc))

    async def _dead_letter(self, producer: Any, rejected: list[tuple[Any, str]]) -> None:
        """Write a dead letter for each (record, reason) and wait until all are
        acknowledged (acks=all): they are durable when this returns. A dead letter is
        never refused for its size: ``encode_dead_letter`` cuts what it quotes, so it
        stays under Kafka's 1 MiB default ``max.request.size`` whatever the record."""
        futures = []
        for record, reason in rejected:
            letter = encode_dead_letter(self.topics.deadletter, record, reason, self.clock.now())
            futures.append(await send(producer, letter))
            log.warning(
                "event dead-lettered",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=reason,
            )
        for future in futures:
            await future

    async def _flush_redis(self) -> None:
        """Copy the Redis views of what committed batches changed, unless the last try
        failed less than its backoff ago; on failure they wait for the next try (the rows
        in PostgreSQL are what Redis is copied from, so none is lost)."""
        if not (self._redis_all or any(self._redis_pending.values())):
            return
        if time.monotonic() < self._redis_next_try:
            return
        everything, pending = self._redis_all, self._redis_pending
        self._redis_all, self._redis_pending = False, {}
        try:
            for model in self.read_models:
                if everything:
                    await model.sync_redis(self.pool, self.redis, None)
                elif pending.get(model.name):
                    await model.sync_redis(self.pool, self.redis, pending[model.name])
            self._redis_outage.ok()
        except Exception as exc:  # noqa: BLE001 - the rows stay; copied on the next try
            self._redis_all |= everything
            for name, ids in pending.items():
                self._redis_pending.setdefault(name, set()).update(ids)
            self._redis_next_try = time.monotonic() + self._redis_outage.failed(exc)
