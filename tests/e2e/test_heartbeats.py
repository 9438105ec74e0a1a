"""Heartbeats against the real API: each counts from when the agent sent it (clamped by
the API), and a worker's heartbeats do not wait behind its work's HTTP calls."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from sdk import SwarmClient, TaskContext, Worker
from tests.e2e.support import history, register

pytestmark = pytest.mark.e2e

PLUS_2 = timezone(timedelta(hours=2))


def _last_heartbeat(r: httpx.Response) -> datetime:
    assert r.status_code == 200, r.text
    return datetime.fromisoformat(r.json()["state"]["last_heartbeat_at"])


async def test_a_heartbeat_counts_from_its_sent_at_clamped_to_the_skew(swarm) -> None:
    c = swarm.client
    skew = timedelta(seconds=swarm.settings.heartbeat_max_skew_s)
    await register(c, "beater", start=True)
    url = "/agents/beater/heartbeat"

    # Sent an hour ago (a wrong clock): counted from the earliest allowed, received - skew.
    before = datetime.now(UTC)
    r = await c.post(url, json={"sent_at": (before - timedelta(hours=1)).isoformat()})
    after = datetime.now(UTC)
    assert before - skew <= _last_heartbeat(r) <= after - skew

    # The earliest time there is, at an offset that would take it out of range in UTC.
    before = datetime.now(UTC)
    r = await c.post(url, json={"sent_at": "0001-01-01T00:30:00+05:00"})
    assert before - skew <= _last_heartbeat(r) <= datetime.now(UTC) - skew

    # Sent 2 s ago (it waited in a queue): counted from when it was sent, to the microsecond,
    # whatever offset the agent wrote it in.
    sent = datetime.now(UTC) - timedelta(seconds=2)
    r = await c.post(url, json={"sent_at": sent.astimezone(PLUS_2).isoformat()})
    assert _last_heartbeat(r) == sent

    # Sent in the future (a fast clock): counted from when the API received it.
    before = datetime.now(UTC)
    r = await c.post(url, json={"sent_at": (before + timedelta(hours=1)).isoformat()})
    after = datetime.now(UTC)
    assert before <= _last_heartbeat(r) <= after

    # No body (clients before sent_at): counted from when the API received it.
    before = datetime.now(UTC)
    r = await c.post(url)
    assert before <= _last_heartbeat(r) <= datetime.now(UTC)

    # The event says when the heartbeat was sent, and that is the event's time.
    async def five_beats() -> list[dict[str, object]] | None:
        beats = [
            e
            for e in await history(c, "agent", "beater")
            if e["type"] == "io.swarmlog.agent.heartbeat_recorded"
        ]
        return beats if len(beats) == 5 else None

    beats = await swarm.eventually(five_beats, what="the five heartbeats archived")
    second = beats[2]
    assert datetime.fromisoformat(str(second["time"])) == sent
    assert datetime.fromisoformat(str(second["data"]["sent_at"])) == sent  # type: ignore[index]
    assert second["schemaversion"] == 2


async def _never_called(ctx: TaskContext) -> dict[str, object]:
    raise AssertionError("the jammed worker never gets to start a task")


async def test_heartbeats_do_not_wait_behind_the_works_http_calls(swarm) -> None:
    """The worker's own client has one connection, which its assignment stream holds:
    every task call (the poll, start, reports) waits for it forever. The heartbeats,
    on their own client, still arrive every interval."""
    c = swarm.client
    jammed = SwarmClient(
        swarm.base_url,
        transport=httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1)),
    )
    worker = Worker(
        swarm.base_url,
        agent_id="jammed",
        name="jammed",
        capabilities={"jam": 1.0},
        handler=_never_called,
        heartbeat_interval_s=0.5,
        client=jammed,
    )
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(stop))
    try:
        r = await c.post(
            "/tasks", json={"task_id": "stuck", "type": "jam", "required_capabilities": ["jam"]}
        )
        assert r.status_code == 201, r.text

        async def assigned() -> bool:
            return (await c.get("/tasks/stuck")).json().get("status") == "assigned"

        await swarm.eventually(assigned, what="the task to be assigned to the jammed worker")
        beats_before = await _heartbeats(c)
        await asyncio.sleep(3.0)
        beats_after = await _heartbeats(c)
        # About six sent in those 3 s; the projection may lag a little behind the last.
        assert beats_after - beats_before >= 3, (beats_before, beats_after)
        # Meanwhile the work did not move: its calls were held up all along.
        assert (await c.get("/tasks/stuck")).json()["status"] == "assigned"
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        await jammed.aclose()


async def _heartbeats(c: httpx.AsyncClient) -> int:
    """The heartbeats of agent ``jammed`` the archive holds."""
    return sum(
        e["type"] == "io.swarmlog.agent.heartbeat_recorded"
        for e in await history(c, "agent", "jammed")
    )


async def test_the_sdk_refuses_a_naive_sent_at_before_sending_anything() -> None:
    async with SwarmClient("http://127.0.0.1:9") as client:  # nothing listens on port 9
        with pytest.raises(ValueError, match="timezone-aware"):
            await client.heartbeat("a", sent_at=datetime(2026, 12, 8, 3, 0))  # noqa: DTZ001
