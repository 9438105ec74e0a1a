"""Kafka clients as swarmlog configures them: idempotent producers with acks=all,
read_committed consumers, and reading partitions from the start to their end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner, murmur2

from infra.cloudevents import Record


class CachedPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client), with the
    index of each recent key remembered: the pure-Python murmur2 cost as much per record
    as encoding it, and a command processor writes to the same aggregates over and over.
    Same partition for the same key and partition count, so co-partitioning holds.
    """

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._index: dict[tuple[bytes, int], int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        """The partition of ``key`` among ``all_partitions`` (sorted); see DefaultPartitioner."""
        if key is None:
            chosen: int = DefaultPartitioner()(key, all_partitions, available)
            return chosen
        n = len(all_partitions)
        index = self._index.get((key, n))
        if index is None:
            if len(self._index) >= self._size:
                self._index.clear()
            index = self._index[(key, n)] = (murmur2(key) & 0x7FFFFFFF) % n
        return all_partitions[index]


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """``client.stop()``, except that a CancelledError that is not this task's own is
    swallowed: aiokafka's fetcher cancels its pending fetch requests on close and awaits
    them unguarded (aiokafka 0.12, ``Fetcher.close``), so stopping a consumer while the
    broker is unreachable raised CancelledError out of ``stop`` (a role stopped on
    SIGTERM during a Kafka outage then exited 1, its other clients left open). A
    cancellation of the calling task itself still propagates."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def producer(bootstrap_servers: str, *, transactional_id: str | None = None) -> AIOKafkaProducer:
    """An idempotent producer (acks=all); transactional when ``transactional_id`` is given.

    ``max_batch_size`` is 512 KiB, not aiokafka's 16 KiB: aiokafka sends one batch per
    partition per request and makes ``send`` wait while a partition's batch is full, so
    with 16 KiB a command processor batch of 500 events (about 40 per 16 KiB) waited on
    a dozen broker round trips in a row. It stays under the broker's default
    ``message.max.bytes`` (1 MiB).
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=True,
        acks="all",
        transactional_id=transactional_id,
        linger_ms=2,
        max_batch_size=512 * 1024,
        partitioner=CachedPartitioner(),
        request_timeout_ms=30_000,
    )


def consumer(
    bootstrap_servers: str, *topics: str, group_id: str | None = None, **kw: Any
) -> AIOKafkaConsumer:
    """A read_committed consumer with manual offset commits.

    ``fetch_max_wait_ms`` defaults to 100, not Kafka's 500: measured here, a consumer in
    another process than the producer often got its records only when the broker's
    fetch wait ran out (send-to-decided p90 317 ms at 500, 37 ms at 100, on 100
    commands/s), and every command waits on two such hops (command, then outcome).
    """
    kw.setdefault("fetch_max_wait_ms", 100)
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **kw,
    )


#: What keeping a consumer record costs in memory beyond the lengths of its key, value and
#: headers: the record object and its slot in a window or cache (RECORD_OVERHEAD_BYTES),
#: and per header its tuple and its str and bytes objects (HEADER_OVERHEAD_BYTES).
#: Measured with tracemalloc on records built as aiokafka builds them: a CloudEvents
#: event (13 headers, ~500 bytes of content) takes ~2.9 KB, an outcome (9 headers)
#: ~2.4 KB, both within 3 % of this estimate.
RECORD_OVERHEAD_BYTES = 960
HEADER_OVERHEAD_BYTES = 112


def record_bytes(record: Any) -> int:
    """Bytes that keeping ``record`` (an aiokafka ConsumerRecord, or anything with ``key``,
    ``value`` and ``headers``) in memory costs: its key, value and header lengths plus
    ``RECORD_OVERHEAD_BYTES`` and ``HEADER_OVERHEAD_BYTES`` per header. What
    byte-bounded windows and caches count."""
    size = RECORD_OVERHEAD_BYTES + len(record.key or b"") + len(record.value or b"")
    for name, value in record.headers or ():
        size += HEADER_OVERHEAD_BYTES + len(name) + len(value or b"")
    return size


async def send(p: AIOKafkaProducer, record: Record) -> Any:
    """Queue ``record`` on ``p``; returns the future of its RecordMetadata."""
    return await p.send(record.topic, value=record.value, key=record.key, headers=record.headers)


async def partitions_of(
    bootstrap_servers: str, topic: str, *, wait_s: float = 10.0
) -> list[TopicPartition]:
    """Every partition of ``topic``, sorted; [] if the broker's metadata still has no such
    topic after ``wait_s`` seconds (a topic just created may take a moment to appear in
    the metadata a broker serves, and an empty answer would leave a follower with
    nothing to follow)."""
    c = consumer(bootstrap_servers)
    await c.start()
    try:
        deadline = asyncio.get_running_loop().time() + wait_s
        parts = c.partitions_for_topic(topic)
        while not parts:
            await c._client.force_metadata_update()  # first metadata may not hold the topic
            parts = c.partitions_for_topic(topic)
            if parts or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.1)
        return [TopicPartition(topic, p) for p in sorted(parts or ())]
    finally:
        await stop_client(c)


async def read_to_end(
    bootstrap_servers: str,
    tps: Iterable[TopicPartition],
    handle: Callable[[Any], Awaitable[None] | None],
    *,
    start: dict[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """Read ``tps`` (read_committed) from ``start`` (default: the beginning) to the end
    offsets they have when this is called, calling ``handle(record)`` for each record in
    partition order. Returns the next offset of each partition.
    """
    tps = list(tps)
    c = consumer(bootstrap_servers)
    await c.start()
    try:
        c.assign(tps)
        ends = await c.end_offsets(tps)
        for tp in tps:
            if start and tp in start:
                c.seek(tp, start[tp])
            else:
                await c.seek_to_beginning(tp)
        positions = {tp: await c.position(tp) for tp in tps}
        pending = {tp for tp in tps if positions[tp] < ends[tp]}
        while pending:
            batch = await c.getmany(*pending, timeout_ms=500, max_records=5000)
            for records in batch.values():
                for r in records:
                    out = handle(r)
                    if out is not None:
                        await out
            for tp in list(pending):
                positions[tp] = await c.position(tp)
                if positions[tp] >= ends[tp]:
                    pending.discard(tp)
        return positions
    finally:
        await stop_client(c)


@dataclass(frozen=True)
class Kafka:
    """One Kafka cluster, as the composition root hands it to every part that reads or
    writes the log: the parts ask it for clients configured the swarmlog way (see
    ``producer`` and ``consumer`` above) instead of building them from a URL string, so a
    test or a bench can hand in another cluster without touching the part.

    ``bootstrap_servers`` is Kafka's comma-separated ``host:port`` list.
    """

    bootstrap_servers: str

    def producer(self, *, transactional_id: str | None = None) -> AIOKafkaProducer:
        """An idempotent producer (acks=all), transactional when ``transactional_id`` is given."""
        return producer(self.bootstrap_servers, transactional_id=transactional_id)

    def consumer(self, *topics: str, group_id: str | None = None, **kw: Any) -> AIOKafkaConsumer:
        """A read_committed consumer with manual offset commits, subscribed to ``topics``."""
        return consumer(self.bootstrap_servers, *topics, group_id=group_id, **kw)

    def admin(self, **kw: Any) -> AIOKafkaAdminClient:
        """An admin client of this cluster (``kw`` as ``AIOKafkaAdminClient`` takes); the
        caller starts it and closes it."""
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **kw)

    async def partitions_of(self, topic: str, *, wait_s: float = 10.0) -> list[TopicPartition]:
        """Every partition of ``topic``, sorted (see the module function)."""
        return await partitions_of(self.bootstrap_servers, topic, wait_s=wait_s)

    async def read_to_end(
        self,
        tps: Iterable[TopicPartition],
        handle: Callable[[Any], Awaitable[None] | None],
        *,
        start: dict[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Read ``tps`` to their current end (see the module function)."""
        return await read_to_end(self.bootstrap_servers, tps, handle, start=start)
