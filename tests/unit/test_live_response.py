"""The SSE response ends quietly, and cleans up, when an error comes after it started."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sse_starlette.sse import SendTimeoutError
from starlette.background import BackgroundTask

from api.sse import LiveResponse


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/events", "headers": []}


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_a_send_timeout_after_the_start_ends_the_stream_and_runs_its_clean_up() -> None:
    closed = asyncio.Event()
    sent: list[str] = []

    async def events():
        while True:
            yield {"data": "x"}

    async def slow_client(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            await asyncio.sleep(10)  # never takes the message in time

    async def close() -> None:
        closed.set()

    response = LiveResponse(events(), send_timeout=0.05, ping=60, background=BackgroundTask(close))
    await asyncio.wait_for(response(_scope(), _never_disconnects, slow_client), 5)
    assert sent[0] == "http.response.start"
    assert closed.is_set()


async def test_an_error_before_the_start_propagates() -> None:
    async def events():
        yield {"data": "x"}

    async def broken(message: dict[str, Any]) -> None:
        raise SendTimeoutError()

    with pytest.raises(SendTimeoutError):
        await LiveResponse(events(), ping=60)(_scope(), _never_disconnects, broken)
