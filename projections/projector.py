"""The projector: event topics -> PostgreSQL read models (and Redis hot views).

Offsets live in PostgreSQL, not in Kafka ("storing offsets outside Kafka", KafkaConsumer
javadoc): each batch's rows and the next offset of every partition it read commit in one
transaction, and on assignment the consumer seeks to the stored offsets. A restart, or a
kill -9 mid-batch, therefore neither skips nor double-applies an event.

Redis (agent status and load) is written after the commit, each key guarded by the time
the rows were read, so that an older write never overwrites a newer one; on start the projector
copies every agent row to Redis, which closes the gap a crash between the commit and
the Redis write could leave.

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
  Redis outage does not hold PostgreSQL back: the agents and accounts to copy wait and
  are copied when Redis answers again.

The projector also projects the dead-letter topic (every role's dead letters) into the
``dead_letters`` table, which ``swarmlog deadletters`` and ``GET /deadletters`` list;
``Projector.replay`` re-applies a dead-lettered event after a fix.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiokafka.errors
import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from domain import proposal as pr
from domain import workflow as wf
from domain import workflow_run as wr
from domain.backoff import backoff_seconds
from domain.economy import EconomyParameters
from infra.clock import Clock, SystemClock
from infra.codec import (
    DecodeError,
    Position,
    StoredEvent,
    decode_event,
    encode_dead_letter,
    event_ce_type,
)
from infra.kafka import Kafka, send
from infra.topics import Topics
from projections import views
from projections.schema import checked_schema, migrate
from projections.views import Row

log = structlog.get_logger("swarmlog.projector")

PROJECTION = "core"  # every read model and the event archive, projected together

AGENT_COLUMNS = (
    "agent_id",
    "name",
    "capabilities",
    "max_concurrent_tasks",
    "cost_per_task",
    "lifecycle",
    "registered_at",
    "last_heartbeat_at",
    "version",
    "updated_at",
)
TASK_COLUMNS = (
    "task_id",
    "type",
    "payload",
    "required_capabilities",
    "priority",
    "priority_rank",
    "max_cost",
    "lease_timeout_s",
    "run_timeout_s",
    "max_attempts",
    "status",
    "attempts",
    "requeues",
    "agent_id",
    "progress",
    "progress_message",
    "result",
    "quality",
    "error",
    "not_before",
    "submitted_at",
    "queued_at",
    "assigned_at",
    "started_at",
    "finished_at",
    "version",
    "updated_at",
)
ACCOUNT_COLUMNS = (
    "account_id",
    "holder",
    "balance",
    "staked",
    "unstaking",
    "pending",
    "supply",
    "tier",
    "earned",
    "slashed",
    "opened_at",
    "version",
    "updated_at",
)
PROPOSAL_COLUMNS = (
    "proposal_id",
    "title",
    "proposer",
    "change",
    "opened_at",
    "closes_at",
    "quorum_bp",
    "threshold_bp",
    "total_power",
    "status",
    "votes_for",
    "votes_against",
    "votes_abstain",
    "voters",
    "version",
    "updated_at",
)
WORKFLOW_COLUMNS = (
    "id",
    "name",
    "description",
    "version",
    "status",
    "spec",
    "params",
    "template",
    "runs",
    "created_at",
    "updated_at",
    "aggregate_version",
)
TEMPLATE_COLUMNS = ("name", "version", "description", "parameters", "spec", "published_at")
RUN_COLUMNS = (
    "run_id",
    "workflow_id",
    "version",
    "status",
    "inputs",
    "result",
    "error",
    "failed_step",
    "compensated",
    "steps_total",
    "steps_done",
    "requested_at",
    "started_at",
    "finished_at",
    "updated_at",
    "aggregate_version",
)
STEP_COLUMNS = ("run_id", "step_id", "position", "kind", "task_type", "status", "items_total")
JSON_COLUMNS = {
    "capabilities",
    "payload",
    "required_capabilities",
    "result",
    "pending",
    "change",
    "spec",
    "params",
    "inputs",
    "parameters",
}

# Sets the hash only when ARGV[1] is higher than its stored version: KEYS[1], ARGV = version,
# field, value, field, value...
_GUARDED_HSET = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _upsert_sql(schema: str, table: str, columns: tuple[str, ...], key: str) -> str:
    cols = ", ".join(columns)
    params = ", ".join(
        f"${i}::jsonb" if c in JSON_COLUMNS else f"${i}" for i, c in enumerate(columns, 1)
    )
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != key)
    return (
        f"INSERT INTO {schema}.{table} ({cols}) VALUES ({params}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


def _params(row: dict[str, Any], columns: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(
        json.dumps(row[c]) if c in JSON_COLUMNS and row[c] is not None else row[c] for c in columns
    )


def _columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as columns: the arrays of an ``INSERT ... SELECT FROM unnest(...)``."""
    return [list(c) for c in zip(*rows, strict=True)]


def _row(record: asyncpg.Record) -> dict[str, Any]:
    row = dict(record)
    for c in JSON_COLUMNS & row.keys():
        if isinstance(row[c], str):
            row[c] = json.loads(row[c])
    return row


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

#: A dead letter's value above this is sent with the original value cut (the original
#: stays on its topic at the position the dead letter names); under the 1 MiB default
#: ``max.request.size``, so a dead letter is never refused for its size.
MAX_DEAD_LETTER_BYTES = 900_000


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
    """What applying events changed: how many were applied, and the agents and accounts
    whose Redis views may change."""

    projected: int = 0
    agents: set[str] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)

    def merge(self, other: _Applied) -> None:
        self.projected += other.projected
        self.agents |= other.agents
        self.accounts |= other.accounts


class _Cut:
    """A consumer record with its value cut to ``MAX_DEAD_LETTER_BYTES // 2``."""

    def __init__(self, record: Any) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.key, self.headers = record.key, record.headers
        self.value = (record.value or b"")[: MAX_DEAD_LETTER_BYTES // 2]


def _clean(value: Any) -> str | None:
    """``value`` as text PostgreSQL accepts: NUL written as ``\\u0000``, lone surrogates
    escaped; None stays None."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\x00", "\\u0000")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _small_int(value: Any, bits: int) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** (bits - 1)
    return value if ok else None


def read_dead_letter(record: Any) -> dict[str, Any]:
    """A record of the dead-letter topic as a ``dead_letters`` row; never raises.

    Keys: id (the CloudEvent id, else ``<topic>/<partition>/<offset>`` of the letter),
    source_topic, source_partition, source_offset (where the dead-lettered record is;
    None if the letter does not say), reason, key, dead_lettered_at (the CloudEvent
    time, else the record's timestamp), letter_partition, letter_offset, letter (the
    value as written). Text is cleaned of what PostgreSQL refuses (``_clean``).
    """
    headers: dict[str, bytes] = {}
    for k, v in record.headers or ():
        if isinstance(v, bytes):
            headers[k] = v
    letter_id = _clean(headers.get("ce_id", b"").decode("utf-8", "replace"))
    try:
        data = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        data = {"reason": "unreadable dead letter (its value is not a JSON object)"}
    at: datetime | None = None
    try:
        at = datetime.fromisoformat(headers["ce_time"].decode("utf-8"))
        if at.tzinfo is None:
            at = None
    except (KeyError, ValueError):
        at = None
    if at is None:
        at = datetime.fromtimestamp(max(0, record.timestamp or 0) / 1000, UTC)
    source_topic = data.get("topic") if isinstance(data.get("topic"), str) else None
    return {
        # Ours are uuids; a foreign producer's id may be any length (index and cursor
        # bounds), so a long one is named by where the letter is instead.
        "id": (
            letter_id
            if 0 < len(letter_id) <= 200
            else f"{record.topic}/{record.partition}/{record.offset}"
        ),
        "source_topic": _clean(source_topic),
        "source_partition": _small_int(data.get("partition"), 32),
        "source_offset": _small_int(data.get("offset"), 64),
        "reason": _clean(data.get("reason")) or "",
        "key": _clean(data.get("key")),
        "dead_lettered_at": at,
        "letter_partition": record.partition,
        "letter_offset": record.offset,
        "letter": bytes(record.value or b""),
    }


DEAD_LETTER_COLUMNS = (
    "id",
    "source_topic",
    "source_partition",
    "source_offset",
    "reason",
    "key",
    "dead_lettered_at",
    "letter_partition",
    "letter_offset",
    "letter",
)


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
    the read models of ``schema`` (agents, tasks, the economy, workflows and their runs,
    the event archive) and Redis in step with the log; and the dead-letter topic, into
    the ``dead_letters`` table.

    Several copies share the partitions. ``batch_size`` bounds the records per transaction.
    ``projected`` counts the events applied, ``retries`` the tries of a batch that failed
    for an outage. Its PostgreSQL sessions are named ``swarmlog-projector-<schema>``
    (``application_name``).
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
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.pool = pool
        self.redis = redis
        self.schema = checked_schema(schema)
        self.redis_prefix = redis_prefix
        self.batch_size = batch_size
        self.clock = clock or SystemClock()
        self.projected = 0
        #: Tries of a batch that failed for an outage (or anything not a record's fault).
        self.retries = 0
        s = self.schema
        self._upsert_agent = _upsert_sql(s, "agent_rows", AGENT_COLUMNS, "agent_id")
        self._upsert_task = _upsert_sql(s, "tasks", TASK_COLUMNS, "task_id")
        self._upsert_account = _upsert_sql(s, "accounts", ACCOUNT_COLUMNS, "account_id")
        self._upsert_proposal = _upsert_sql(s, "proposals", PROPOSAL_COLUMNS, "proposal_id")
        self._upsert_workflow = _upsert_sql(s, "workflows", WORKFLOW_COLUMNS, "id")
        self._insert_template = (
            f"INSERT INTO {s}.workflow_templates ({', '.join(TEMPLATE_COLUMNS)}) VALUES"
            " ($1, $2, $3, $4::jsonb, $5::jsonb, $6) ON CONFLICT DO NOTHING"
        )
        # steps_done is counted from the steps rows (below), never written from memory; a
        # row never goes back to an older aggregate version (a copy projecting the
        # workflow topic may insert the pending row after another has started the run).
        self._upsert_run = (
            _upsert_sql(s, "workflow_runs", RUN_COLUMNS, "run_id").replace(
                ", steps_done = EXCLUDED.steps_done", ""
            )
            + f" WHERE {s}.workflow_runs.aggregate_version <= EXCLUDED.aggregate_version"
        )
        self._insert_step = (
            f"INSERT INTO {s}.workflow_steps ({', '.join(STEP_COLUMNS)}) VALUES"
            " ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
        )
        self._change_step = (
            f"UPDATE {s}.workflow_steps SET status = coalesce($3, status),"
            " items_total = coalesce($4, items_total), items_done = items_done + $5,"
            " attempts = greatest(attempts, $6), task_ids = task_ids || $7::text[],"
            " result = CASE WHEN $8 THEN $9::jsonb ELSE result END,"
            " error = coalesce($10, error), started_at = coalesce($11, started_at),"
            " finished_at = coalesce($12, finished_at),"
            " compensating_for = coalesce($13, compensating_for)"
            " WHERE run_id = $1 AND step_id = $2"
        )
        self._close_steps = (
            f"UPDATE {s}.workflow_steps SET status = 'cancelled', finished_at = $2"
            " WHERE run_id = $1 AND status IN ('pending', 'running')"
        )
        self._count_steps_done = (
            f"UPDATE {s}.workflow_runs r SET steps_done = (SELECT count(*) FROM"
            f" {s}.workflow_steps st WHERE st.run_id = r.run_id AND st.kind = 'step'"
            " AND st.status IN ('completed', 'failed', 'skipped', 'cancelled'))"
            " WHERE r.run_id = ANY($1::text[])"
        )
        # Bulk rows go in as one INSERT ... SELECT over arrays (one column per parameter):
        # PostgreSQL plans and runs it once, where executemany ran it once per row, which
        # cost the database more CPU than the projector itself. WITH ORDINALITY keeps the
        # rows in order (ledger_entries.seq is assigned in it).
        self._insert_legs = (
            f"INSERT INTO {s}.ledger_entries (event_id, leg, account_id, bucket, amount, kind,"
            " counterparty, task_id, proposal_id, command_id, time)"
            " SELECT event_id, leg, account_id, bucket, amount, kind, counterparty, task_id,"
            " proposal_id, command_id, time FROM unnest($1::text[], $2::int[], $3::text[],"
            " $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],"
            " $10::text[], $11::timestamptz[]) WITH ORDINALITY AS r(event_id, leg, account_id,"
            " bucket, amount, kind, counterparty, task_id, proposal_id, command_id, time, n)"
            " ORDER BY n ON CONFLICT DO NOTHING"
        )
        self._insert_vote = (
            f"INSERT INTO {s}.proposal_votes (proposal_id, voter, choice, power, time)"
            " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING"
        )
        self._insert_events = (
            f'INSERT INTO {s}.events (topic, partition, "offset", event_id, aggregate_type,'
            " aggregate_id, version, type, time, correlation_id, causation_id, schema_version,"
            " data) SELECT topic, partition, o, event_id, aggregate_type, aggregate_id,"
            " version, type, time, correlation_id, causation_id, schema_version, data::jsonb"
            " FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[],"
            " $6::text[], $7::int[], $8::text[], $9::timestamptz[], $10::text[], $11::text[],"
            " $12::int[], $13::text[]) AS r(topic, partition, o, event_id, aggregate_type,"
            " aggregate_id, version, type, time, correlation_id, causation_id, schema_version,"
            " data) ON CONFLICT DO NOTHING"
        )
        self._save_offset = (
            f"INSERT INTO {s}.projection_offsets (projection, topic, partition, next_offset,"
            " updated_at) VALUES ($1, $2, $3, $4, now()) ON CONFLICT (projection, topic,"
            " partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"
        )
        self._insert_letter = (
            f"INSERT INTO {s}.dead_letters ({', '.join(DEAD_LETTER_COLUMNS)})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING"
        )
        # Redis views still to write (after the commits that changed them); all of them
        # at start, which closes the gap a crash between a commit and its write left.
        self._redis_all = True
        self._redis_agents: set[str] = set()
        self._redis_accounts: set[str] = set()
        self._redis_next_try = 0.0
        self._redis_outage = Backoff("redis views")

    @property
    def leaderboard_key(self) -> str:
        """The Redis sorted set of accounts by rewards earned (micro-tokens)."""
        return f"{self.redis_prefix}:leaderboard:earnings"

    @property
    def stake_by_tier_key(self) -> str:
        """The Redis hash of micro-tokens staked per tier."""
        return f"{self.redis_prefix}:economy:stake_by_tier"

    def agent_key(self, agent_id: str) -> str:
        """The Redis hash of one agent: lifecycle, status, load and version."""
        return f"{self.redis_prefix}:agent:{agent_id}"

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set.

        Never stops for a record (it is dead-lettered) nor for an outage (waited out with
        backoff); an outage at start (migrating the schema) is waited out too.
        """
        pool, r = self.pool, self.redis
        dead_letters = self.kafka.producer()
        consumer = self.kafka.consumer(
            group_id=f"{self.topics.prefix}-projector",
            max_poll_records=self.batch_size,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        projector = self

        class Seek(ConsumerRebalanceListener):
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
                    stored = await projector._offsets(pool)
                except Exception as exc:  # noqa: BLE001 - safe either way (see above)
                    log.warning(
                        "stored offsets unreadable; reading from the beginning", error=_reason(exc)
                    )
                    return
                for tp in assigned:
                    if tp in stored:
                        consumer.seek(tp, stored[tp])

        try:
            starting = Backoff("projector start (migrate)")
            while True:
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn, self.schema)
                    starting.ok()
                    break
                except Exception as exc:  # noqa: BLE001 - an outage at start is waited out
                    if await _sleep_unless(stop, starting.failed(exc)):
                        return
            self._hset = r.register_script(_GUARDED_HSET)
            await dead_letters.start()
            topics = [*self.topics.event_topics.values(), self.topics.deadletter]
            consumer.subscribe(topics, listener=Seek())
            await consumer.start()
            saved: dict[TopicPartition, int] = {}
            outage = Backoff("projection")
            while not stop.is_set():
                await self._flush_redis(pool, r)
                batch = await consumer.getmany(timeout_ms=200, max_records=self.batch_size)
                # The position, not the last offset + 1: it also steps over transaction
                # markers, so a caught-up projector's offsets equal the log end offsets.
                positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                moved = {tp: n for tp, n in positions.items() if saved.get(tp) != n}
                if not (batch or moved):
                    continue
                while True:  # the same batch until it commits: an outage never skips one
                    try:
                        await self._project(pool, dead_letters, batch, moved)
                        outage.ok()
                        break
                    except Exception as exc:  # noqa: BLE001 - records are handled inside
                        self.retries += 1
                        if await _sleep_unless(stop, outage.failed(exc)):
                            return  # nothing committed: a restart reads the batch again
                saved.update(moved)
        finally:
            await consumer.stop()
            await dead_letters.stop()

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
        position yet, or the event is still unreadable or still refused.
        """
        tp = TopicPartition(position.topic, position.partition)
        pool, r = self.pool, self.redis
        producer = self.kafka.producer()
        await producer.start()
        s = self.schema
        try:
            self._hset = r.register_script(_GUARDED_HSET)
            async with pool.acquire() as conn, conn.transaction():
                next_offset = await conn.fetchval(
                    f"SELECT next_offset FROM {s}.projection_offsets WHERE projection = $1"
                    " AND topic = $2 AND partition = $3 FOR UPDATE",
                    PROJECTION,
                    tp.topic,
                    tp.partition,
                )
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
                later: list[tuple[Any, StoredEvent]] = []
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
                archived = f"SELECT count(*) FROM {s}.events WHERE event_id = ANY($1::text[])"
                later_ids = [e.id for _, e in later]
                later_before = await conn.fetchval(archived, later_ids)
                try:
                    async with conn.transaction():
                        first = await self._apply_all(conn, [event])
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise ReplayError(f"still refused: {_reason(exc)}") from exc
                applied = bool(await conn.fetchval(archived, [event.id]))
                more, refused = await self._apply_isolated(conn, later, whole_failed=False)
                await self._dead_letter(producer, refused)
                later_applied = await conn.fetchval(archived, later_ids) - later_before
                await conn.execute(
                    f"UPDATE {s}.dead_letters SET replayed_at = now(), replay_note = $4"
                    " WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3",
                    tp.topic,
                    tp.partition,
                    position.offset,
                    f"re-applied by the projector: event {'applied' if applied else 'ignored'}"
                    f", {later_applied} later event(s) of {event.aggregate_id!r} applied",
                )
            first.merge(more)
            if first.agents:
                await self._sync_redis(pool, r, first.agents)
            if first.accounts:
                await self._sync_economy_redis(pool, r, first.accounts)
            return ReplayResult(
                event_id=event.id,
                aggregate=f"{event.aggregate_type} {event.aggregate_id}",
                applied=applied,
                later_applied=later_applied,
                later_dead_lettered=len(refused),
            )
        finally:
            await producer.stop()

    async def _offsets(self, pool: asyncpg.Pool) -> dict[TopicPartition, int]:
        rows = await pool.fetch(
            f"SELECT topic, partition, next_offset FROM {self.schema}.projection_offsets"
            " WHERE projection = $1",
            PROJECTION,
        )
        return {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def _project(
        self,
        pool: asyncpg.Pool,
        dead_letters: Any,
        batch: dict[TopicPartition, list[Any]],
        positions: dict[TopicPartition, int],
    ) -> None:
        """Apply ``batch`` and store ``positions`` in one transaction: in bulk, and if
        that fails for a data reason, again with the failing records isolated and
        dead-lettered. Raises on an outage (the caller retries the batch)."""
        try:
            applied = await self._transaction(pool, dead_letters, batch, positions, False)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "batch refused; applying it again with the failing records isolated",
                records=sum(map(len, batch.values())),
                error=_reason(exc),
            )
            applied = await self._transaction(pool, dead_letters, batch, positions, True)
        self.projected += applied.projected
        self._redis_agents |= applied.agents
        self._redis_accounts |= applied.accounts

    async def _transaction(
        self,
        pool: asyncpg.Pool,
        dead_letters: Any,
        batch: dict[TopicPartition, list[Any]],
        positions: dict[TopicPartition, int],
        isolate: bool,
    ) -> _Applied:
        """One try at ``batch`` in one transaction (see ``_project``); with ``isolate``,
        records whose rows fail on their own are dead-lettered instead of failing it."""
        s = self.schema
        async with pool.acquire() as conn, conn.transaction():
            # The stored offsets, locked: records below them were projected already (by
            # this copy before a rebalance, or by another copy); they are skipped, so a
            # record is applied once whatever the consumer hands out.
            tps = sorted(set(batch) | set(positions))
            stored = {
                (rec["topic"], rec["partition"]): rec["next_offset"]
                for rec in await conn.fetch(
                    f"SELECT o.topic, o.partition, o.next_offset FROM {s}.projection_offsets o"
                    " JOIN unnest($2::text[], $3::int[]) AS b(topic, partition)"
                    " USING (topic, partition) WHERE o.projection = $1"
                    " ORDER BY o.topic, o.partition FOR UPDATE OF o",
                    PROJECTION,
                    [tp.topic for tp in tps],
                    [tp.partition for tp in tps],
                )
            }
            items: list[tuple[Any, StoredEvent]] = []
            rejected: list[tuple[Any, str]] = []
            letters: list[dict[str, Any]] = []
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
            await conn.executemany(
                self._save_offset,
                [
                    (PROJECTION, tp.topic, tp.partition, n)
                    for tp, n in offsets.items()
                    if n > stored.get((tp.topic, tp.partition), -1)
                ],
            )
        return applied

    async def _apply_all(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> _Applied:
        """Apply ``events`` (in order) to every read model in the open transaction."""
        touched_agents, holders = await self._apply(conn, events)
        touched_accounts = await self._apply_economy(conn, events)
        await self._apply_workflows(conn, events)
        return _Applied(len(events), touched_agents | holders, touched_accounts)

    async def _apply_isolated(
        self,
        conn: asyncpg.Connection,
        items: list[tuple[Any, StoredEvent]],
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

        async def attempt(chunk: list[tuple[Any, StoredEvent]]) -> None:
            try:
                async with conn.transaction():
                    got = await self._apply_all(conn, [e for _, e in chunk])
            except Exception as exc:
                if is_transient(exc):
                    raise
                if len(chunk) == 1:
                    record, e = chunk[0]
                    reason = f"projection refused {e.type} {e.aggregate_id!r}: {_reason(exc)}"
                    refused.append((record, reason))
                    return
                await split(chunk)
            else:
                applied.merge(got)

        async def split(chunk: list[tuple[Any, StoredEvent]]) -> None:
            half = len(chunk) // 2
            await attempt(chunk[:half])
            await attempt(chunk[half:])

        if len(items) > 1 and whole_failed:
            await split(items)  # no need to try it whole again
        elif items:
            await attempt(items)
        return applied, refused

    async def _insert_letters(
        self, conn: asyncpg.Connection, letters: list[dict[str, Any]], isolate: bool
    ) -> None:
        """Insert the ``dead_letters`` rows; with ``isolate``, each in a savepoint, and one
        that still fails is logged and left out (a dead letter is never dead-lettered)."""
        if not letters:
            return
        rows = [tuple(d[c] for c in DEAD_LETTER_COLUMNS) for d in letters]
        if not isolate:
            await conn.executemany(self._insert_letter, rows)
            return
        for row in rows:
            try:
                async with conn.transaction():
                    await conn.execute(self._insert_letter, *row)
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.error("dead letter not listed", id=row[0], error=_reason(exc))

    async def _dead_letter(self, producer: Any, rejected: list[tuple[Any, str]]) -> None:
        """Write a dead letter for each (record, reason) and wait until all are
        acknowledged (acks=all): they are durable when this returns."""
        futures = []
        for record, reason in rejected:
            letter = encode_dead_letter(self.topics.deadletter, record, reason, self.clock.now())
            if len(letter.value) > MAX_DEAD_LETTER_BYTES:
                letter = encode_dead_letter(
                    self.topics.deadletter,
                    _Cut(record),
                    f"{reason} (value cut to {MAX_DEAD_LETTER_BYTES // 2} bytes: the whole"
                    " record is at the position this letter names)",
                    self.clock.now(),
                )
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

    async def _flush_redis(self, pool: asyncpg.Pool, r: aioredis.Redis) -> None:
        """Copy the agents and accounts that committed batches changed to Redis, unless
        the last try failed less than its backoff ago; on failure they wait for the next
        try (the rows in PostgreSQL are what Redis is copied from, so none is lost)."""
        if not (self._redis_all or self._redis_agents or self._redis_accounts):
            return
        if time.monotonic() < self._redis_next_try:
            return
        everything = self._redis_all
        agents, accounts = self._redis_agents, self._redis_accounts
        self._redis_all, self._redis_agents, self._redis_accounts = False, set(), set()
        try:
            if everything:
                await self._sync_redis(pool, r, None)
                await self._sync_economy_redis(pool, r, None)
            else:
                if agents:
                    await self._sync_redis(pool, r, agents)
                if accounts:
                    await self._sync_economy_redis(pool, r, accounts)
            self._redis_outage.ok()
        except Exception as exc:  # noqa: BLE001 - the rows stay; copied on the next try
            self._redis_all |= everything
            self._redis_agents |= agents
            self._redis_accounts |= accounts
            self._redis_next_try = time.monotonic() + self._redis_outage.failed(exc)

    async def _archive(self, conn: asyncpg.Connection, fresh: list[StoredEvent]) -> None:
        """Insert ``fresh`` events into the event archive, in one executemany."""
        if not fresh:
            return
        await conn.execute(
            self._insert_events,
            *_columns(
                (
                    e.position.topic,
                    e.position.partition,
                    e.position.offset,
                    e.id,  # type: ignore[union-attr]
                    e.aggregate_type,
                    e.aggregate_id,
                    e.version,
                    event_ce_type(e.aggregate_type, e.event.event_type),
                    e.time,
                    e.correlation_id,
                    e.causation_id,
                    e.event.schema_version,
                    e.event.model_dump_json(),
                )
                for e in fresh
            ),
        )

    async def _apply(
        self, conn: asyncpg.Connection, events: list[StoredEvent]
    ) -> tuple[set[str], set[str]]:
        """Apply ``events`` to the rows in the open transaction of ``conn``.

        Returns (agents whose row changed, agents that held or now hold a task of this
        batch or gained a counter): the agents whose Redis status and load may change.
        """
        s = self.schema
        agent_ids = {e.aggregate_id for e in events if e.aggregate_type == "agent"}
        task_ids = {e.aggregate_id for e in events if e.aggregate_type == "task"}
        # Lock order (agents, then tasks, by id) keeps concurrent projectors deadlock-free.
        agents = {
            rec["agent_id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.agent_rows WHERE agent_id = ANY($1::text[])"
                " ORDER BY agent_id FOR UPDATE",
                sorted(agent_ids),
            )
        }
        tasks = {
            rec["task_id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.tasks WHERE task_id = ANY($1::text[])"
                " ORDER BY task_id FOR UPDATE",
                sorted(task_ids),
            )
        }
        # A requeue leaves the row on its agent until the next event clears it, which may
        # come in a later batch: remember who held each task before this batch too.
        holders = {t["agent_id"] for t in tasks.values() if t.get("agent_id")}
        counters: dict[tuple[str, str], int] = defaultdict(int)
        fresh: list[StoredEvent] = []
        for e in events:
            if e.aggregate_type == "agent":
                before = agents.get(e.aggregate_id)
                after = views.evolve_agent(before, e)
                if after is not None and after is not before:
                    agents[e.aggregate_id] = after
                    fresh.append(e)
            elif e.aggregate_type == "task":
                before = tasks.get(e.aggregate_id)
                after = views.evolve_task(before, e)
                if after is not None and after is not before:
                    tasks[e.aggregate_id] = after
                    fresh.append(e)
                    if (count := views.agent_counts(e)) is not None:
                        counters[count] += 1
        touched_agents = {e.aggregate_id for e in fresh if e.aggregate_type == "agent"}
        touched_tasks = {e.aggregate_id for e in fresh if e.aggregate_type == "task"}
        holders |= {t["agent_id"] for t in tasks.values() if t.get("agent_id")}
        holders |= {a for a, _ in counters}
        await self._archive(conn, fresh)
        if touched_agents:
            await conn.executemany(
                self._upsert_agent,
                [_params(agents[a], AGENT_COLUMNS) for a in sorted(touched_agents)],
            )
        if touched_tasks:
            await conn.executemany(
                self._upsert_task,
                [_params(tasks[t], TASK_COLUMNS) for t in sorted(touched_tasks)],
            )
        if counters:
            # Kept apart from agent_rows so that a task finished before its agent's
            # registration has been read still counts (the topics are read independently).
            await conn.executemany(
                f"INSERT INTO {s}.agent_counters AS c (agent_id, tasks_completed, tasks_failed,"
                " tasks_lost) VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id) DO UPDATE SET"
                " tasks_completed = c.tasks_completed + EXCLUDED.tasks_completed,"
                " tasks_failed = c.tasks_failed + EXCLUDED.tasks_failed,"
                " tasks_lost = c.tasks_lost + EXCLUDED.tasks_lost",
                [
                    (
                        agent_id,
                        counters[(agent_id, "tasks_completed")],
                        counters[(agent_id, "tasks_failed")],
                        counters[(agent_id, "tasks_lost")],
                    )
                    for agent_id in sorted({a for a, _ in counters})
                ],
            )
        return touched_agents, holders

    async def _sync_redis(
        self, pool: asyncpg.Pool, r: aioredis.Redis, agent_ids: set[str] | None
    ) -> None:
        """Copy agents' lifecycle, status and load to Redis (all agents when None)."""
        s = self.schema
        where = "" if agent_ids is None else "WHERE a.agent_id = ANY($1::text[])"
        args: list[Any] = [] if agent_ids is None else [sorted(agent_ids)]
        rows = await pool.fetch(
            f"""
            SELECT a.agent_id, a.lifecycle,
                   (SELECT count(*) FROM {s}.tasks t
                     WHERE t.agent_id = a.agent_id AND t.status IN ('assigned', 'running')) AS load,
                   (extract(epoch FROM clock_timestamp()) * 1e6)::bigint AS read_at
              FROM {s}.agent_rows a {where}
            """,
            *args,
        )
        if not rows:
            return
        async with r.pipeline(transaction=False) as pipe:
            for row in rows:
                status = row["lifecycle"]
                if status == "running":
                    status = "busy" if row["load"] else "idle"
                # Load depends on other aggregates, so the guard is when the row was read
                # (the database's clock, shared by every projector copy): a slower copy's
                # older read never overwrites a newer one.
                version = row["read_at"]
                await self._hset(
                    keys=[self.agent_key(row["agent_id"])],
                    args=[
                        version,
                        "lifecycle",
                        row["lifecycle"],
                        "status",
                        status,
                        "load",
                        row["load"],
                    ],
                    client=pipe,
                )
            await pipe.execute()

    async def _apply_economy(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> set[str]:
        """Apply the account and proposal ``events`` in the open transaction of ``conn``:
        accounts, ledger legs, proposals with tallies and votes, economy parameters.

        Returns the accounts whose row changed (for the Redis views). The event archive
        rows of these events are written here too.
        """
        s = self.schema
        account_ids = sorted({e.aggregate_id for e in events if e.aggregate_type == "account"})
        proposal_ids = sorted({e.aggregate_id for e in events if e.aggregate_type == "proposal"})
        if not account_ids and not proposal_ids:
            return set()
        accounts = {
            rec["account_id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.accounts WHERE account_id = ANY($1::text[])"
                " ORDER BY account_id FOR UPDATE",
                account_ids,
            )
        }
        proposals = {
            rec["proposal_id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.proposals WHERE proposal_id = ANY($1::text[])"
                " ORDER BY proposal_id FOR UPDATE",
                proposal_ids,
            )
        }
        fresh: list[StoredEvent] = []
        legs: list[tuple[Any, ...]] = []
        votes: list[tuple[Any, ...]] = []
        changes: list[tuple[StoredEvent, Any]] = []
        touched_accounts: set[str] = set()
        touched_proposals: set[str] = set()
        for e in events:
            if e.aggregate_type == "account":
                before = accounts.get(e.aggregate_id)
                after = views.evolve_account(before, e)
                if after is None or after is before:
                    continue
                accounts[e.aggregate_id] = after
                touched_accounts.add(e.aggregate_id)
                fresh.append(e)
                for i, leg in enumerate(views.ledger_legs(e)):
                    legs.append(
                        (
                            e.id,
                            i,
                            leg["account_id"],
                            leg["bucket"],
                            leg["amount"],
                            leg["kind"],
                            leg["counterparty"],
                            leg["task_id"],
                            None,
                            e.causation_id,
                            e.time,
                        )
                    )
            elif e.aggregate_type == "proposal":
                before = proposals.get(e.aggregate_id)
                after = views.evolve_proposal(before, e)
                if after is None or after is before:
                    continue
                proposals[e.aggregate_id] = after
                touched_proposals.add(e.aggregate_id)
                fresh.append(e)
                ev = e.event
                if isinstance(ev, pr.VoteCast):
                    votes.append((ev.proposal_id, ev.voter, ev.choice, ev.power, e.time))
                elif isinstance(ev, pr.ProposalExecuted):
                    changes.append((e, ev.change))
        await self._archive(conn, fresh)
        if touched_accounts:
            await conn.executemany(
                self._upsert_account,
                [_params(accounts[a], ACCOUNT_COLUMNS) for a in sorted(touched_accounts)],
            )
        if legs:
            await conn.execute(self._insert_legs, *_columns(legs))
        if touched_proposals:
            await conn.executemany(
                self._upsert_proposal,
                [_params(proposals[p], PROPOSAL_COLUMNS) for p in sorted(touched_proposals)],
            )
        if votes:
            await conn.executemany(self._insert_vote, votes)
        for e, change in changes:
            current = await conn.fetchval(
                f"SELECT params FROM {s}.economy_parameters WHERE id = 1 FOR UPDATE"
            )
            params = EconomyParameters.model_validate(
                json.loads(current) if isinstance(current, str) else (current or {})
            )
            await conn.execute(
                f"INSERT INTO {s}.economy_parameters (id, params, proposal_id, changed_at)"
                " VALUES (1, $1::jsonb, $2, $3) ON CONFLICT (id) DO UPDATE SET"
                " params = EXCLUDED.params, proposal_id = EXCLUDED.proposal_id,"
                " changed_at = EXCLUDED.changed_at",
                change.applied_to(params).model_dump_json(),
                e.aggregate_id,
                e.time,
            )
        return touched_accounts

    async def _sync_economy_redis(
        self, pool: asyncpg.Pool, r: aioredis.Redis, account_ids: set[str] | None
    ) -> None:
        """Copy earnings to the leaderboard (absolute totals, so a repeat is harmless) and
        recompute stake by tier (all accounts when ``account_ids`` is None)."""
        s = self.schema
        where = "" if account_ids is None else "AND account_id = ANY($1::text[])"
        args: list[Any] = [] if account_ids is None else [sorted(account_ids)]
        rows = await pool.fetch(
            f"SELECT account_id, earned FROM {s}.accounts WHERE holder <> 'treasury' {where}",
            *args,
        )
        tiers = await pool.fetch(
            f"SELECT tier, sum(staked)::bigint AS staked FROM {s}.accounts GROUP BY tier"
        )
        async with r.pipeline(transaction=True) as pipe:
            earned = {row["account_id"]: row["earned"] for row in rows if row["earned"] > 0}
            if earned:
                pipe.zadd(self.leaderboard_key, earned)
            pipe.delete(self.stake_by_tier_key)
            by_tier = {row["tier"]: row["staked"] for row in tiers}
            if by_tier:
                pipe.hset(self.stake_by_tier_key, mapping=by_tier)
            await pipe.execute()

    async def _apply_workflows(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """Apply the workflow, template and run ``events`` in the open transaction of
        ``conn``: definitions, template versions, runs and their steps.

        Steps are written as changes merged over the batch (views.StepChange), one
        UPDATE per touched step, so a map step's per-item events cost one row update
        per batch. The event archive rows of these events are written here too.
        """
        s = self.schema
        workflow_ids = {e.aggregate_id for e in events if e.aggregate_type == wf.WORKFLOW}
        run_ids = {e.aggregate_id for e in events if e.aggregate_type == wr.RUN}
        run_ids |= {
            e.event.run_id for e in events if isinstance(e.event, wf.WorkflowExecutionRequested)
        }
        if (
            not workflow_ids
            and not run_ids
            and not any(e.aggregate_type == wf.TEMPLATE for e in events)
        ):
            return
        # Lock order (definitions, then runs, then steps, by id), as in _apply.
        workflows = {
            rec["id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.workflows WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                sorted(workflow_ids),
            )
        }
        runs = {
            rec["run_id"]: _row(rec)
            for rec in await conn.fetch(
                f"SELECT * FROM {s}.workflow_runs WHERE run_id = ANY($1::text[])"
                " ORDER BY run_id FOR UPDATE",
                sorted(run_ids),
            )
        }
        fresh: list[StoredEvent] = []
        templates: list[Row] = []
        new_steps: list[Row] = []
        changes: dict[tuple[str, str], views.StepChange] = {}
        closes: list[tuple[str, Any]] = []
        touched_workflows: set[str] = set()
        touched_runs: set[str] = set()
        recount: set[str] = set()
        for e in events:
            if e.aggregate_type == wf.WORKFLOW:
                before = workflows.get(e.aggregate_id)
                after = views.evolve_workflow(before, e)
                if after is None or after is before:
                    continue
                workflows[e.aggregate_id] = after
                touched_workflows.add(e.aggregate_id)
                fresh.append(e)
                pending = views.requested_run(e)
                if pending is not None and pending["run_id"] not in runs:
                    runs[pending["run_id"]] = pending
                    touched_runs.add(pending["run_id"])
            elif e.aggregate_type == wf.TEMPLATE:
                row = views.template_row(e)
                if row is not None:
                    templates.append(row)
                    fresh.append(e)
            elif e.aggregate_type == wr.RUN:
                before = runs.get(e.aggregate_id)
                after = views.evolve_run(before, e)
                if after is None or after is before:
                    continue
                runs[e.aggregate_id] = after
                touched_runs.add(e.aggregate_id)
                fresh.append(e)
                new_steps += views.step_rows(e)
                found = views.step_change(e)
                if found is not None:
                    key = (e.aggregate_id, found[0])
                    if key in changes:
                        changes[key].absorb(found[1])
                    else:
                        changes[key] = found[1]
                    if found[1].status is not None:
                        recount.add(e.aggregate_id)
                if views.closes_run(e):
                    closes.append((e.aggregate_id, e.time))
                    recount.add(e.aggregate_id)
        await self._archive(conn, fresh)
        if touched_workflows:
            await conn.executemany(
                self._upsert_workflow,
                [_params(workflows[w], WORKFLOW_COLUMNS) for w in sorted(touched_workflows)],
            )
        if templates:
            await conn.executemany(
                self._insert_template, [_params(t, TEMPLATE_COLUMNS) for t in templates]
            )
        if touched_runs:
            await conn.executemany(
                self._upsert_run, [_params(runs[r], RUN_COLUMNS) for r in sorted(touched_runs)]
            )
        if new_steps:
            await conn.executemany(
                self._insert_step, [tuple(r[c] for c in STEP_COLUMNS) for r in new_steps]
            )
        if changes:
            await conn.executemany(
                self._change_step,
                [
                    (
                        run_id,
                        step_id,
                        c.status,
                        c.items_total,
                        c.items_done,
                        c.attempts,
                        c.task_ids,
                        c.has_result,
                        json.dumps(c.result) if c.has_result else None,
                        c.error,
                        c.started_at,
                        c.finished_at,
                        c.compensating_for,
                    )
                    for (run_id, step_id), c in sorted(changes.items())
                ],
            )
        if closes:
            await conn.executemany(self._close_steps, closes)
        if recount:
            await conn.execute(self._count_steps_done, sorted(recount))
