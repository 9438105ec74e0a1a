"""An API process keeps its recent outcomes and its SSE window bounded in bytes
(``client_outcome_cache_bytes``, ``sse_window_bytes``) without losing what clients rely
on: a command still gets its outcome, a stream still resumes with no gap and no
duplicate."""

from __future__ import annotations

import pytest
from httpx_sse import aconnect_sse

from tests.e2e.support import assert_problem, history, positions, register
from tests.e2e.test_live import cloudevent, nothing_more, take

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("swarm", [{"client_outcome_cache_bytes": 1}], indirect=True)
async def test_a_command_gets_its_outcome_even_when_none_can_be_kept(swarm) -> None:
    c = swarm.client
    *_, started = await register(c, "tiny-a", start=True)
    r = await c.post("/agents/tiny-a/heartbeat")

    assert r.status_code == 200, r.text
    assert r.json()["version"] == started["version"] + 1
    # Answered from the outcome as it came; kept for later lookups it was not.
    assert_problem(
        await c.get(f"/commands/{r.json()['command_id']}"), 404, code="outcome_not_found"
    )


@pytest.mark.parametrize("swarm", [{"client_outcome_cache_bytes": 8_000}], indirect=True)
async def test_recent_outcomes_are_evicted_by_bytes_oldest_first(swarm) -> None:
    c = swarm.client
    registered, _ = await register(c, "few-a", start=True)
    beats = []
    for _ in range(8):
        r = await c.post("/agents/few-a/heartbeat")
        assert r.status_code == 200, r.text
        beats.append(r.json()["command_id"])

    # ~2.5 KB per outcome record: 8,000 bytes keep the last three, not nine.
    latest = await c.get(f"/commands/{beats[-1]}")
    assert latest.status_code == 200, latest.text
    assert latest.json()["command_type"] == "RecordHeartbeat"
    assert_problem(await c.get(f"/commands/{registered['command_id']}"), 404)
    assert_problem(await c.get(f"/commands/{beats[0]}"), 404)


@pytest.mark.parametrize("swarm", [{"sse_window_bytes": 16_384}], indirect=True)
async def test_a_stream_resumes_with_no_gap_after_large_events_left_the_window(swarm) -> None:
    c = swarm.client
    tasks_only = {"type": ["io.swarmlog.task.*"]}
    async with aconnect_sse(c, "GET", "/events", params=tasks_only) as es:
        assert es.response.status_code == 200
        events = es.aiter_sse()
        # The shared consumer started with this client, at the log's end: live from here.
        r = await c.post(
            "/tasks",
            json={"task_id": "win-t0", "type": "small", "required_capabilities": ["nobody-has-it"]},
        )
        assert r.status_code == 201, r.text
        writes = [r.json()]
        (first,) = await take(events, 1)
    assert cloudevent(first)["subject"] == "win-t0"

    # While nobody listens, ~100 KB of events pass through a 16 KiB window: the records
    # after ``first`` are gone from it, so the resumed stream reads the log itself.
    big = [f"win-big{i}" for i in range(6)]
    for t in big:
        r = await c.post(
            "/tasks",
            json={
                "task_id": t,
                "type": "large",
                "payload": {"blob": "x" * 8_000},
                "required_capabilities": ["nobody-has-it"],
            },
        )
        assert r.status_code == 201, r.text
        writes.append(r.json())

    async with aconnect_sse(
        c, "GET", "/events", params=tasks_only, headers={"Last-Event-ID": first.id}
    ) as es:
        assert es.response.status_code == 200
        events = es.aiter_sse()
        rest = await take(events, 1 + 2 * len(big))  # win-t0's queued, then 2 per task
        await nothing_more(events)

    got = [cloudevent(s)["id"] for s in rest]
    assert len(got) == len(set(got)), "an event was delivered twice"
    logged = {
        e["id"]
        for t in ["win-t0", *big]
        for e in await history(c, "task", t, after=positions(*writes))
    }
    assert set(got) == logged - {cloudevent(first)["id"]}, "an event was missed"
