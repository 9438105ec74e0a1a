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

No input stops a runner (the rule the command processor follows too): an event record
that does not decode, an event whose fold raises, a record on the coordination topic
(which carries none) and a command the plan cannot build, that cannot be encoded or
that Kafka refuses (too large) are each written to the dead-letter topic with the
reason (``encode_dead_letter``/``encode_dead_command``, source = the runner), logged
once, and remembered, so a level-triggered plan does not try the same poison again on
every tick; the runner goes on with the next record. Kafka being unavailable is not
poison: what could not be sent is planned and sent again on a later tick. A fold that
raised may have changed part of the view; the view is not rolled back.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Container, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from commands.client import CommandClient
from domain.messages import Command
from domain.recorded import RecordedEvent
from infra.clock import Clock, SystemClock
from infra.cloudevents import DecodeError, Record
from infra.deadletter_records import encode_dead_command, encode_dead_letter
from infra.envelope import CommandEnvelope, encode_command
from infra.kafka import Kafka, send, stop_client
from infra.mapper import ce_type_of, decode_event
from infra.topics import Topics
from streams.unbuilt import Unbuilt

log = structlog.get_logger("swarmlog.streams")

#: Errors of one record that sending it again cannot cure (the rest of KafkaError is
#: taken as Kafka being unavailable, and retried).
_RECORD_FAULTS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
    InvalidTimestampError,
)
_CHUNK = 5000


def record_fault(exc: BaseException) -> bool:
    """Whether ``exc``, raised sending one record, is that record's own fault (too large,
    invalid, or not a Kafka error at all), so that sending it again cannot succeed. A
    cancelled send (the producer stopping) is not."""
    return isinstance(exc, _RECORD_FAULTS) or (
        isinstance(exc, Exception) and not isinstance(exc, KafkaError)
    )


def raw_ce_type(record: Any) -> bytes | None:
    """The raw ``ce_type`` header of ``record`` (the last one, as the codec reads it), or
    None when it has none that is bytes; never raises."""
    found: bytes | None = None
    try:
        for name, value in record.headers or ():
            if name == "ce_type" or (isinstance(name, str) and name.lower() == "ce_type"):
                found = value if isinstance(value, bytes) else None
    except Exception:  # noqa: BLE001 - headers that are not (name, value) pairs
        return None
    return found


class _Skip:
    """Command ids a plan must not build: in flight (a container the runner keeps) or
    dead-lettered."""

    __slots__ = ("dead", "inflight")

    def __init__(self, inflight: Container[str], dead: set[str]) -> None:
        self.inflight = inflight
        self.dead = dead

    def __contains__(self, command_id: object) -> bool:
        return command_id in self.inflight or command_id in self.dead


class ElectedRunner(ABC):
    """A process manager's runner; subclasses say what to read, how to fold and what to send.

    ``name`` names its consumer group (``<prefix>-<name>``); ``tick_s`` is the longest a
    read waits (seconds); ``leader`` and ``caught_up`` are set while it leads and once its
    view has caught up with the log.
    """

    name: str = "process-manager"

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        source: str,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.clock = clock or SystemClock()
        self.tick_s = tick_s
        self.source = source
        self.idle_plan_s = min(0.5, max(tick_s, 0.05))
        self.leader = asyncio.Event()
        self.caught_up = asyncio.Event()
        self.sent = 0
        self.dead_letters = 0
        #: Command ids dead-lettered: never built or sent again (kept across elections).
        self.dead_commands: set[str] = set()
        self._planned_at = 0.0
        self._wants_cache: dict[bytes, bool] = {}
        self._dead_ids: set[str] = set()  # dead letters queued or written
        self._dead_out: dict[str, Record] = {}  # queued, not yet written
        self._logged: set[str] = set()  # problems logged once
        self._unsent_logged = False

    @abstractmethod
    def read_topics(self) -> Iterable[str]:
        """The event topics whose every partition the view is folded from."""

    @abstractmethod
    def reset(self) -> None:
        """Start a fresh view (on election) and forget what was in flight."""

    @abstractmethod
    def apply(self, stored: RecordedEvent) -> None:
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

    def skip(self, inflight: Container[str] = ()) -> Container[str]:
        """What ``plan`` must not build: ``inflight`` (command ids) and every command id
        dead-lettered (``inflight`` itself while none is: a plan asks per item)."""
        return _Skip(inflight, self.dead_commands) if self.dead_commands else inflight

    def unbuildable(self, failures: list[Unbuilt]) -> None:
        """Dead-letter the commands a plan could not build (see streams/unbuilt.py)."""
        for f in failures:
            self.dead_letter_command(
                f.command_id, f"cannot build the command: {f.reason}", f.command_type, f.fields
            )

    def dead_letter(self, record: Any, reason: str) -> None:
        """Queue a dead letter for ``record`` (written by the loop), log it once."""
        letter = encode_dead_letter(
            self.topics.deadletter, record, reason, self.clock.now(), by=self.source
        )
        lid = dict(letter.headers).get("ce_id", b"").decode()
        if lid in self._dead_ids:
            return
        self._dead_ids.add(lid)
        self._dead_out[lid] = letter
        log.warning(
            "record dead-lettered",
            process_manager=self.name,
            topic=getattr(record, "topic", None),
            partition=getattr(record, "partition", None),
            offset=getattr(record, "offset", None),
            reason=reason,
        )

    def dead_letter_command(
        self, command_id: str, reason: str, command_type: str, command: Any
    ) -> None:
        """Queue a dead letter for a command not sent (see ``encode_dead_command``), log
        it once, and never build or send that command id again."""
        if command_id in self.dead_commands:
            return
        self.dead_commands.add(command_id)
        letter = encode_dead_command(
            self.topics.deadletter,
            command_id,
            reason,
            self.clock.now(),
            by=self.source,
            command_type=command_type,
            command=command,
        )
        self._dead_out[f"command/{command_id}"] = letter
        log.warning(
            "command dead-lettered",
            process_manager=self.name,
            command_id=command_id,
            command_type=command_type,
            reason=reason,
        )

    async def flush_dead_letters(self, client: CommandClient) -> None:
        """Write the queued dead letters; those Kafka could not take now stay queued."""
        if not self._dead_out:
            return
        queued = list(self._dead_out.items())
        futures: list[tuple[str, Any]] = []
        for lid, letter in queued:
            try:
                futures.append((lid, await send(client.producer, letter)))
            except Exception as exc:  # noqa: BLE001 - sorted by record_fault
                if not record_fault(exc):
                    self._log_once("dead letters not written; retrying", exc)
                    break
                self._dead_out.pop(lid, None)
                log.error("dead letter dropped", process_manager=self.name, error=repr(exc))
        results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        for (lid, _), result in zip(futures, results, strict=True):
            if isinstance(result, BaseException):
                if not record_fault(result):
                    self._log_once("dead letters not written; retrying", result)
                    continue
                log.error("dead letter dropped", process_manager=self.name, error=repr(result))
            else:
                self.dead_letters += 1
            self._dead_out.pop(lid, None)

    def _log_once(self, what: str, exc: BaseException) -> None:
        key = f"{what}: {type(exc).__name__}: {exc}"
        if key in self._logged:
            return
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged.add(key)
        log.error(what, process_manager=self.name, error=f"{type(exc).__name__}: {exc}")

    async def send(
        self, client: CommandClient, planned: list[tuple[str, Command, int | None]]
    ) -> list[Any | None]:
        """Send (command id, command, expected version) triples, in chunks; returns each
        command's RecordMetadata (partition and offset on the command topic), in order,
        or None for a command not written: one that cannot be encoded or that Kafka
        refuses is dead-lettered (and never sent again); one not written because Kafka
        is unavailable is left for a later tick to plan and send again."""
        written: list[Any | None] = [None] * len(planned)
        unavailable: BaseException | None = None
        for start in range(0, len(planned), _CHUNK):
            futures: list[tuple[int, Any]] = []
            for i in range(start, min(start + _CHUNK, len(planned))):
                command_id, command, expected = planned[i]
                if command_id in self.dead_commands:
                    continue
                env = CommandEnvelope(
                    command_id=command_id,
                    command=command,
                    correlation_id=command_id,
                    expected_version=expected,
                    source=self.source,
                )
                try:
                    record = encode_command(self.topics.commands, env)
                except Exception as exc:  # noqa: BLE001 - whatever it is, it is this command's
                    self._refused(command_id, command, "cannot encode the command", exc)
                    continue
                try:
                    futures.append((i, await send(client.producer, record)))
                except Exception as exc:  # noqa: BLE001 - sorted by record_fault
                    if not record_fault(exc):
                        unavailable = exc
                        break
                    self._refused(command_id, command, "Kafka refused the command", exc)
            results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            for (i, _), result in zip(futures, results, strict=True):
                if not isinstance(result, BaseException):
                    written[i] = result
                elif record_fault(result):
                    self._refused(planned[i][0], planned[i][1], "Kafka refused the command", result)
                else:
                    unavailable = result
            if unavailable is not None:
                break
        if unavailable is not None:
            if not self._unsent_logged:
                self._unsent_logged = True
                log.warning(
                    "commands not sent; Kafka unavailable, retrying",
                    process_manager=self.name,
                    error=f"{type(unavailable).__name__}: {unavailable}",
                )
        elif self._unsent_logged:
            self._unsent_logged = False
            log.info("commands sent again", process_manager=self.name)
        self.sent += sum(1 for w in written if w is not None)
        return written

    def _refused(self, command_id: str, command: Command, what: str, exc: BaseException) -> None:
        self.dead_letter_command(
            command_id, f"{what}: {type(exc).__name__}: {exc}", type(command).__name__, command
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by until elected, then lead until ``stop`` is set or leadership is lost."""
        runner = self

        class Election(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka: untyped
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                if revoked:
                    runner.leader.clear()

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                if assigned:
                    runner.leader.set()

        election = self.kafka.consumer(
            group_id=f"{self.topics.prefix}-{self.name}",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        election.subscribe([self.topics.coordination], listener=Election())
        await election.start()
        client = CommandClient(self.kafka, self.topics, follow_outcomes=False)
        await client.start()
        try:
            while not stop.is_set():
                await self._coordination(election, await election.getmany(timeout_ms=100))
                await self.flush_dead_letters(client)
                if not self.leader.is_set():
                    continue
                log.info("elected leader", process_manager=self.name)
                await self._lead(stop, election, client)
        finally:
            await client.stop()
            await stop_client(election)

    def _wanted(self, record: Any) -> bool:
        # Read from the raw header (one dict lookup per record): decoding a record costs
        # as much as the rest of what a runner does with it.
        ce_type = raw_ce_type(record)
        if ce_type is None:
            return True  # decode_event says what is wrong with it
        wanted = self._wants_cache.get(ce_type)
        if wanted is None:
            try:
                wanted = self.wants(ce_type.decode("utf-8"))
            except UnicodeDecodeError:
                wanted = True
            if len(self._wants_cache) > 10_000:  # foreign types must not grow it for good
                self._wants_cache.clear()
            self._wants_cache[ce_type] = wanted
        return wanted

    def _fold(self, record: Any) -> None:
        """Decode and fold one event record; dead-letter it if either fails."""
        try:
            stored = decode_event(record)
        except DecodeError as exc:
            self.dead_letter(record, f"undecodable event: {exc}")
            return
        try:
            self.apply(stored)
        except Exception as exc:  # noqa: BLE001 - a fold that raises is this event's poison
            self.dead_letter(
                record, f"cannot fold {ce_type_of(stored)}: {type(exc).__name__}: {exc}"
            )

    async def _coordination(self, election: AIOKafkaConsumer, batch: dict[Any, list[Any]]) -> None:
        """The coordination topic carries no records: dead-letter any there, and commit
        past them so that the next leader does not read them again."""
        if not batch:
            return
        for records in batch.values():
            for record in records:
                self.dead_letter(
                    record, "the coordination topic carries no records (it only elects a leader)"
                )
        try:
            await election.commit()
        except KafkaError as exc:  # a rebalance under way: the next leader reads them again
            self._log_once("coordination offsets not committed", exc)

    async def _lead(
        self, stop: asyncio.Event, election: AIOKafkaConsumer, client: CommandClient
    ) -> None:
        self.reset()
        self.caught_up.clear()
        tps: list[TopicPartition] = []
        for topic in self.read_topics():
            tps += await self.kafka.partitions_of(topic)
        consumer = self.kafka.consumer()
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
                        if self._wanted(record):
                            self._fold(record)
                # Stay in the group while reading.
                await self._coordination(election, await election.getmany(timeout_ms=0))
                await self.flush_dead_letters(client)
                if not self.caught_up.is_set():
                    if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                        self.caught_up.set()
                        log.info("view rebuilt", process_manager=self.name, **self.describe())
                    continue
                now = time.monotonic()
                if batch or now - self._planned_at >= self.idle_plan_s:
                    self._planned_at = now
                    try:
                        await self.tick(client)
                    except Exception as exc:  # noqa: BLE001 - no input stops a runner
                        self._log_once("planning failed", exc)
                    await self.flush_dead_letters(client)
        finally:
            await stop_client(consumer)
