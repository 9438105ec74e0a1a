"""One service of a private local stack stops alone and ``up`` brings it back where it was.

The outage tests (tests/integration/test_outages.py) and the chaos test rely on this:
:func:`infra.stack.stop_service` stops Kafka, PostgreSQL or Redis by recorded pid and
leaves the other two running; :func:`infra.stack.up` on the same state directory starts
it again on the same port, so clients configured with the old URL reconnect to it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console

from infra.stack import SERVICES, StackInfo, down, status, stop_service, up

pytestmark = pytest.mark.integration

_NAMES = {"kafka": "Kafka", "postgres": "PostgreSQL", "redis": "Redis"}


def _port_of(info: StackInfo, service: str) -> int:
    if service == "kafka":
        return int(info.kafka_bootstrap_servers.rsplit(":", 1)[1])
    url = info.database_url if service == "postgres" else info.redis_url
    port = urlsplit(url).port
    assert port is not None
    return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _service_works(info: StackInfo, service: str) -> None:
    if service == "kafka":
        admin = AIOKafkaAdminClient(bootstrap_servers=info.kafka_bootstrap_servers)
        await admin.start()
        try:
            assert (await admin.describe_cluster())["brokers"]
        finally:
            await admin.close()
    elif service == "postgres":
        connection = await asyncpg.connect(info.database_url, timeout=10)
        try:
            assert await connection.fetchval("select 1") == 1
        finally:
            await connection.close()
    else:
        client = aioredis.from_url(info.redis_url)
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, StackInfo]]:
    """A local stack of our own (the shared one must never be stopped)."""
    state_dir = tmp_path_factory.mktemp("stop-service")
    try:
        info = up(state_dir, console=Console(stderr=True), own=True)
    except BaseException:
        down(state_dir, purge=True)
        raise
    yield state_dir, info
    down(state_dir, purge=True)


@pytest.mark.parametrize("service", SERVICES)
def test_stop_service_then_up_brings_it_back_on_the_same_url(
    private_stack: tuple[Path, StackInfo], service: str
) -> None:
    state_dir, info = private_stack
    before = {s["name"]: s for s in status(state_dir)}

    message = stop_service(state_dir, service)

    name = _NAMES[service]
    assert message.startswith(f"{name}: stopped"), message
    after_stop = {s["name"]: s for s in status(state_dir)}
    assert not after_stop[name]["running"]
    assert not _answers(_port_of(info, service))
    for other, described in after_stop.items():  # the other two were left alone
        if other != name:
            assert described["running"]
            assert described["pid"] == before[other]["pid"]

    again = up(state_dir, console=Console(stderr=True), own=True)

    assert again == info  # same bootstrap servers and URLs, hence the same ports
    after_up = {s["name"]: s for s in status(state_dir)}
    assert all(s["running"] for s in after_up.values())
    assert after_up[name]["pid"] != before[name]["pid"]
    asyncio.run(_service_works(again, service))


def test_stop_service_refuses_an_unknown_service(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service 'zookeeper'"):
        stop_service(tmp_path, "zookeeper")
