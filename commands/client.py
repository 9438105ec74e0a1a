"""Sending commands to the command topic and waiting for their outcomes.

The API and the process managers both send commands through a ``CommandClient``. The
client follows the command-outcome topic from the moment it starts, so ``execute`` can
wait (bounded) for the outcome of the command it just sent. The outcomes it saw lately
are kept for lookup (``GET /commands/{id}`` after a 202) in a ``RecentOutcomes``, bounded
in bytes and in count: a waiter is handed its outcome as it arrives, so the bound only
limits how far back a lookup reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import Any

import structlog

from infra.cloudevents import DecodeError
from infra.envelope import CommandEnvelope, encode_command
from infra.kafka import Kafka, record_bytes, send, stop_client
from infra.outcome import Outcome, decode_outcome
from infra.topics import Topics

log = structlog.get_logger("swarmlog.commands")


#: Default byte budget of a client's recent outcomes (``SWARMLOG_CLIENT_OUTCOME_CACHE_BYTES``):
#: ~14,000 outcomes of ~2.4 KB, 7 s of outcomes at 2,000 commands/s.
OUTCOME_CACHE_BYTES = 32 * 1024 * 1024


def _subject(record: Any) -> str | None:
    """The command id an outcome record is about (its ``ce_subject`` header as UTF-8), or
    None for a record that has none a client could wait on (another producer's record
    on the outcome topic must not stop the follower)."""
    for name, value in record.headers or ():
        if name == "ce_subject" and isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


class RecentOutcomes:
    """The outcome records seen lately, by command id, oldest first: at most ``max_count``
    of them and at most ``max_bytes`` bytes (``kafka.record_bytes`` of each record plus its
    command id), the oldest evicted first.

    Records are kept as read and decoded on lookup: a decoded Outcome (~3 KB, measured
    with tracemalloc) would cost more than its record again, and most outcomes are never
    looked up. A record larger than ``max_bytes`` is not kept (and evicts nothing).
    """

    def __init__(self, max_bytes: int = OUTCOME_CACHE_BYTES, max_count: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        #: What the records held now cost, in bytes.
        self.bytes = 0
        self._records: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._records

    def put(self, command_id: str, record: Any) -> None:
        """Keep ``record`` (a consumer record of the outcome topic) as the newest outcome
        of ``command_id``, then evict the oldest while over either bound."""
        self.discard(command_id)
        size = record_bytes(record) + len(command_id)
        if size > self.max_bytes:
            return  # keeping it would evict everything else, and then itself
        self._records[command_id] = (record, size)
        self.bytes += size
        while self._records and (
            self.bytes > self.max_bytes or len(self._records) > self.max_count
        ):
            _, (_, gone) = self._records.popitem(last=False)
            self.bytes -= gone

    def discard(self, command_id: str) -> None:
        """Forget the outcome of ``command_id``, if kept."""
        kept = self._records.pop(command_id, None)
        if kept is not None:
            self.bytes -= kept[1]

    def get(self, command_id: str) -> Outcome | None:
        """The outcome of ``command_id`` if it is still kept and decodes, else None (one that
        does not decode is forgotten)."""
        kept = self._records.get(command_id)
        if kept is None:
            return None
        try:
            return decode_outcome(kept[0])
        except DecodeError:
            self.discard(command_id)
            return None


class CommandClient:
    """Produces commands (idempotent producer, acks=all) and follows their outcomes.

    ``execute(envelope, wait_s)`` returns the Outcome, or None when none came within
    ``wait_s`` seconds (the command is on the log and will still be decided).
    Recent outcomes (the last ``remember`` of them, at most ``remember_bytes`` bytes of
    records; see RecentOutcomes) can be looked up by command id.
    """

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        follow_outcomes: bool = True,
        remember: int = 100_000,
        remember_bytes: int = OUTCOME_CACHE_BYTES,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.follow_outcomes = follow_outcomes
        self.producer = kafka.producer()
        self._waiters: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._recent = RecentOutcomes(remember_bytes, remember)
        self._task: asyncio.Task[None] | None = None
        self._consumer = kafka.consumer() if follow_outcomes else None

    async def start(self) -> None:
        """Connect, and start following the outcome topic from its end."""
        await self.producer.start()
        if self._consumer is not None:
            await self._consumer.start()
            tps = await self.kafka.partitions_of(self.topics.outcomes)
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            for tp in tps:  # resolve "end" now, so nothing sent after start is missed
                await self._consumer.position(tp)
            self._task = asyncio.create_task(self._follow(), name="outcomes")

    async def stop(self) -> None:
        """Stop following outcomes and flush and close the producer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_client(self._consumer)
        await stop_client(self.producer)

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batch.values():
                for record in records:
                    # The subject is the command id: decode only what someone waits for
                    # now, and keep the rest as records until they are looked up.
                    command_id = _subject(record)
                    if command_id is None:
                        continue  # not an outcome the processor wrote: nothing waits on it
                    self._recent.put(command_id, record)
                    waiters = self._waiters.pop(command_id, None)
                    if not waiters:
                        continue
                    # Decoded from the record, not looked up: a record the byte bound
                    # did not keep still reaches the command waiting for it.
                    try:
                        outcome = decode_outcome(record)
                    except DecodeError:
                        continue
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(outcome)

    def follower_problem(self) -> str | None:
        """Why this client no longer follows outcomes (its task ended), or None if it does.

        A dead follower would turn every command answer into a 202: /ready reports it.
        """
        if self._task is None or not self._task.done():
            return None
        if self._task.cancelled():
            return "outcome follower stopped"
        exc = self._task.exception()
        return f"outcome follower failed: {type(exc).__name__}: {exc}"

    def recent(self, command_id: str) -> Outcome | None:
        """The outcome of ``command_id`` if this client saw it lately (still within its
        bounds) and it decodes, else None."""
        return self._recent.get(command_id)

    async def send_many(self, envelopes: list[CommandEnvelope]) -> list[Any]:
        """Put several commands on the command topic, acked together; returns each one's
        RecordMetadata (its partition and offset), in order."""
        futures = [
            await send(self.producer, encode_command(self.topics.commands, e)) for e in envelopes
        ]
        return list(await asyncio.gather(*futures))

    async def execute_many(
        self, envelopes: list[CommandEnvelope], wait_s: float
    ) -> list[Outcome | None]:
        """Send ``envelopes`` and wait up to ``wait_s`` seconds for all their outcomes."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for env in envelopes:
            fut: asyncio.Future[Outcome] = loop.create_future()
            self._waiters.setdefault(env.command_id, []).append(fut)
            futures.append(fut)
        try:
            await self.send_many(envelopes)
            await asyncio.wait(futures, timeout=wait_s)
            return [f.result() if f.done() else None for f in futures]
        finally:
            for env, fut in zip(envelopes, futures, strict=True):
                waiters = self._waiters.get(env.command_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[env.command_id]

    async def execute(self, envelope: CommandEnvelope, wait_s: float) -> Outcome | None:
        """Send ``envelope`` and wait up to ``wait_s`` seconds for its outcome (None if none)."""
        return (await self.execute_many([envelope], wait_s))[0]
