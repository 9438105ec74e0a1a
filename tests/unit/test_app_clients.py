"""``create_app(clients=...)`` has one truth: the app is built from ``clients.settings``
and stamps with ``clients.clock``; a second, different settings or clock is an error."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from api.app import create_app
from infra.bootstrap import Clients
from infra.clock import ManualClock
from infra.kafka import Kafka
from infra.settings import Settings
from infra.topics import Topics

AT = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def _clients(**settings: object) -> Clients:
    """Clients that connect to nothing (the app's lifespan is not run here)."""
    return Clients(
        Settings(**settings), Kafka("unused:9092"), Topics(prefix="u"), ManualClock(start=AT)
    )


async def test_the_app_is_built_from_the_clients_settings() -> None:
    clients = _clients(max_request_bytes=1024)
    # No lifespan: the request guard answers before any route or client is needed.
    transport = httpx.ASGITransport(app=create_app(clients=clients))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.post(
            "/agents",
            content=b"{" + b" " * 2048 + b"}",
            headers={"content-type": "application/json"},
        )

    assert response.status_code == 413
    assert "1024 bytes" in response.json()["detail"]


def test_the_same_settings_and_clock_as_the_clients_are_accepted() -> None:
    clients = _clients()

    create_app(clients.settings, clock=clients.clock, clients=clients)


def test_other_settings_than_the_clients_are_refused() -> None:
    clients = _clients(max_request_bytes=1024)

    with pytest.raises(ValueError, match="settings is not clients.settings"):
        create_app(Settings(max_request_bytes=1024), clients=clients)


def test_another_clock_than_the_clients_is_refused() -> None:
    clients = _clients()

    with pytest.raises(ValueError, match="clock is not clients.clock"):
        create_app(clients=clients, clock=ManualClock(start=AT))
