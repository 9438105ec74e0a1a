"""A role's ServiceWatch logs an outage once when it starts and once when it ends, and
QuietReconnects drops the client libraries' line per reconnection attempt."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from structlog.testing import capture_logs

from infra.watch import QuietReconnects, ServiceWatch, kafka_addresses, url_address


def test_addresses_are_read_from_bootstrap_servers_and_urls() -> None:
    assert kafka_addresses("h1:9092, h2:9093,") == [("h1", 9092), ("h2", 9093)]
    assert kafka_addresses("broker") == [("broker", 9092)]
    assert url_address("postgresql://u@db:6543/x", 5432) == ("db", 6543)
    assert url_address("redis://cache/0", 6379) == ("cache", 6379)
    with pytest.raises(ValueError):
        kafka_addresses("h1:port")


def _record(name: str, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)


def test_reconnection_chatter_is_dropped_and_everything_else_kept() -> None:
    quiet = QuietReconnects()
    assert not quiet.filter(_record("aiokafka.conn", "Unable connect to node with id %s: %s"))
    assert not quiet.filter(_record("aiokafka", "Unable to update metadata from %s"))
    assert not quiet.filter(
        _record("asyncpg.pool", "Failed to restore the pool connection floor; retrying")
    )
    assert quiet.filter(_record("aiokafka.consumer", "Error in consumer rebalance listener"))
    assert quiet.filter(_record("swarmlog", "Unable connect to node"))  # not a library's


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends() -> None:
    async def serve(port: int) -> asyncio.Server:
        return await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)

    server = await serve(0)
    port = server.sockets[0].getsockname()[1]
    watch = ServiceWatch({"redis": [("127.0.0.1", port)]}, role="test", interval_s=0.01)
    with capture_logs() as logs:
        await watch.check()
        assert watch.down == [] and logs == []

        server.close()
        await server.wait_closed()
        for _ in range(5):  # five failed checks: one outage
            await watch.check()
        assert watch.down == ["redis"]

        server = await serve(port)  # back on the same port
        for _ in range(3):
            await watch.check()
        server.close()
        await server.wait_closed()

    assert watch.down == []
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "redis is unreachable; waiting for it, retrying with backoff"),
        ("info", "redis is back"),
    ]
    assert logs[0]["address"] == f"127.0.0.1:{port}" and logs[1]["outage_s"] >= 0


async def test_one_failed_check_is_not_an_outage() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    watch = ServiceWatch({"kafka": [("127.0.0.1", port)]}, role="test")
    with capture_logs() as logs:
        await watch.check()
    assert watch.down == [] and logs == []


def test_a_cluster_is_watched_as_a_whole_and_broker_by_broker() -> None:
    from infra.bootstrap import Clients, watch_services
    from infra.clock import SystemClock
    from infra.kafka import Kafka
    from infra.settings import Settings
    from infra.topics import Topics

    def watched(bootstrap: str) -> set[str]:
        settings = Settings(
            kafka_bootstrap_servers=bootstrap,
            database_url="postgresql://u@db:5432/d",
            redis_url="redis://cache:6379/0",
        )
        clients = Clients(settings, Kafka(bootstrap), Topics(), SystemClock())
        return set(watch_services(clients, "processor", services=("kafka",)).services)

    assert watched("k1:9092,k2:9093") == {"kafka", "kafka broker k1:9092", "kafka broker k2:9093"}
    assert watched("k1:9092") == {"kafka"}
