"""Fixtures shared by every test: one real Kafka, PostgreSQL and Redis per test session.

Where the session's services come from, first that answers:

1. ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and ``REDIS_URL``, when all three are set:
   the session uses those services and starts nothing;
2. a Docker engine, when one answers a ping: testcontainers starts Kafka (KRaft, one
   broker, transactions on one replica), PostgreSQL and Redis containers for the session
   and removes them at its end;
3. otherwise the local stack: :func:`infra.stack.up` in a temporary state directory,
   stopped (by pid) and deleted at the end.

Either way a test run leaves no process and no data behind. Tests isolate themselves
with fresh topic, consumer-group, schema and key names, never by restarting services.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from infra.stack import StackInfo, down, environment_info, up

DOCKER_SOCKET = Path("/var/run/docker.sock")


def docker_answers() -> bool:
    """Whether a Docker engine answers a ping within 2 s (DOCKER_HOST, else the local
    socket). Cheap when there is none: no socket and no DOCKER_HOST is False at once."""
    if not os.environ.get("DOCKER_HOST") and not DOCKER_SOCKET.exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False


@contextlib.contextmanager
def containers() -> Iterator[StackInfo]:
    """Kafka, PostgreSQL and Redis as testcontainers for the session, removed on exit."""
    # testcontainers 4.x keeps its modules under testcontainers.community (the old
    # top-level names warn that they are deprecated).
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer

    kafka = (
        KafkaContainer("confluentinc/cp-kafka:7.6.0")
        .with_kraft()
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    )
    postgres = PostgresContainer("postgres:16-alpine", driver=None)
    redis = RedisContainer("redis:7-alpine")
    with kafka, postgres, redis:
        redis_host = redis.get_container_host_ip()
        yield StackInfo(
            kafka_bootstrap_servers=kafka.get_bootstrap_server(),
            database_url=postgres.get_connection_url(),
            redis_url=f"redis://{redis_host}:{redis.get_exposed_port(6379)}/0",
            started=False,
        )


@pytest.fixture(scope="session")
def stack_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The state directory of this session's own local stack; None when the environment
    names services or Docker answers (see the module docstring)."""
    if environment_info() is not None or docker_answers():
        return None
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def services(stack_state_dir: Path | None) -> Iterator[StackInfo]:
    """Where Kafka, PostgreSQL and Redis are for this session (see the module docstring)."""
    if stack_state_dir is None:
        external = environment_info()
        if external is not None:
            yield external
            return
        with containers() as info:
            # Subprocess roles (tests/integration/helpers.role_env) read the environment.
            os.environ.update(
                KAFKA_BOOTSTRAP_SERVERS=info.kafka_bootstrap_servers,
                DATABASE_URL=info.database_url,
                REDIS_URL=info.redis_url,
            )
            yield info
        return
    console = Console(stderr=True)
    try:
        info = up(stack_state_dir, console=console)
    except BaseException:
        down(stack_state_dir, purge=True)  # stop whatever did start before the failure
        raise
    try:
        yield info
    finally:
        for message in down(stack_state_dir, purge=True):
            console.print(message, soft_wrap=True, highlight=False)
