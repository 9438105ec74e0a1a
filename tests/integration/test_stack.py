"""The local stack really serves what the rest of swarmlog relies on.

Most of all, single-node Kafka must run transactions (it hangs at ``init_transactions``
without replication factor 1 for its internal topics), and ``read_committed`` consumers
must not see aborted writes: the command processor's exactly-once loop depends on both.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console

from infra.stack import StackInfo, down, env_exports, status, up

pytestmark = pytest.mark.integration


async def _create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _read_until(bootstrap: str, topic: str, isolation_level: str, last: bytes) -> list[bytes]:
    """Read ``topic`` from the start until the value ``last`` arrives; return the values read."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while last not in values:
                batches = await consumer.getmany(timeout_ms=500)
                values.extend(r.value for records in batches.values() for r in records)
    finally:
        await consumer.stop()
    return values


async def test_read_committed_consumer_sees_committed_and_not_aborted_transactions(
    services: StackInfo,
) -> None:
    topic = f"test-stack-{uuid.uuid4().hex}"
    await _create_topic(services.kafka_bootstrap_servers, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap_servers,
        transactional_id=f"test-stack-{uuid.uuid4().hex}",
        enable_idempotence=True,
        acks="all",
    )
    async with asyncio.timeout(60):  # a misconfigured single node hangs here
        await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed", key=b"agent-1")
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted", key=b"agent-1")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-after-abort", key=b"agent-1")
    finally:
        await producer.stop()

    committed = await _read_until(
        services.kafka_bootstrap_servers, topic, "read_committed", b"committed-after-abort"
    )
    everything = await _read_until(
        services.kafka_bootstrap_servers, topic, "read_uncommitted", b"committed-after-abort"
    )

    assert committed == [b"committed", b"committed-after-abort"]
    # The aborted record was written to the log: read_committed filtered it, not luck.
    assert everything == [b"committed", b"aborted", b"committed-after-abort"]


async def test_postgresql_answers(services: StackInfo) -> None:
    connection = await asyncpg.connect(services.database_url, timeout=10)
    try:
        assert await connection.fetchval("select 1") == 1
        if services.started:
            assert await connection.fetchval("select current_database()") == "swarmlog"
    finally:
        await connection.close()


async def test_redis_answers_ping(services: StackInfo) -> None:
    client = aioredis.from_url(services.redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_second_up_reuses_the_running_services(
    services: StackInfo,
    stack_state_dir: Path | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own_stack = stack_state_dir is None  # the environment names services: start our own
    state_dir = tmp_path / "own" if own_stack else stack_state_dir
    assert state_dir is not None
    if own_stack:
        for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name, raising=False)
    try:
        first = up(state_dir, console=Console(stderr=True)) if own_stack else services
        before = status(state_dir)

        again = up(state_dir, console=Console(stderr=True))

        after = status(state_dir)
        assert again == first
        assert all(service["running"] for service in after)
        assert [s["pid"] for s in after] == [s["pid"] for s in before]
        assert all(isinstance(s["pid"], int) for s in after)
    finally:
        if own_stack:
            down(state_dir, purge=True)


def test_up_starts_nothing_when_the_environment_names_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example/x")
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6379/0")
    state_dir = tmp_path / "unused"

    info = up(state_dir, console=Console(stderr=True))

    assert info == StackInfo(
        "kafka.example:9092", "postgresql://u@db.example/x", "redis://cache.example:6379/0", False
    )
    assert not state_dir.exists()
    assert env_exports(info).splitlines() == [
        "export KAFKA_BOOTSTRAP_SERVERS=kafka.example:9092",
        "export DATABASE_URL=postgresql://u@db.example/x",
        "export REDIS_URL=redis://cache.example:6379/0",
    ]


def test_down_never_signals_a_pid_that_is_not_its_service(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    # Our own pid stands in for a recycled pid now owned by an unrelated process.
    (redis_dir / "redis.pid").write_text(f"{os.getpid()}\n")

    messages = down(tmp_path)

    assert f"Redis: not running (forgot stale pid {os.getpid()})." in messages
    assert not (redis_dir / "redis.pid").exists()
