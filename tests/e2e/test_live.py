"""Live SSE streams: filters, resume by position vector, assignments, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.e2e.support import assert_problem, history, positions, register

pytestmark = pytest.mark.e2e


async def take(
    events: AsyncIterator[ServerSentEvent], n: int, timeout_s: float = 15.0
) -> list[ServerSentEvent]:
    """The next ``n`` messages of a stream; fail if they do not come within ``timeout_s``."""
    out: list[ServerSentEvent] = []
    async with asyncio.timeout(timeout_s):
        while len(out) < n:
            out.append(await anext(events))
    return out


async def nothing_more(events: AsyncIterator[ServerSentEvent], wait_s: float = 1.5) -> None:
    """Assert the stream delivers nothing within ``wait_s``."""
    try:
        async with asyncio.timeout(wait_s):
            extra = await anext(events)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected event {extra.event} {extra.data}")


def cloudevent(sse: ServerSentEvent) -> dict[str, Any]:
    ce: dict[str, Any] = json.loads(sse.data)
    assert ce["specversion"] == "1.0"
    assert sse.event == ce["type"]
    return ce


def vector(sse: ServerSentEvent) -> list[int]:
    version, _, offsets = sse.id.partition(":")
    assert version == "v1"
    return [int(o) for o in offsets.split(".")]


async def test_events_stream_only_what_the_type_filter_matches(swarm) -> None:
    c = swarm.client
    async with aconnect_sse(c, "GET", "/events", params={"type": "io.swarmlog.task.*"}) as es:
        assert es.response.status_code == 200
        assert es.response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in es.response.headers
        events = es.aiter_sse()
        await register(c, "not-a-task", start=True)
        r = await c.post(
            "/tasks",
            json={"task_id": "tf-1", "type": "filter", "required_capabilities": ["nobody-has-it"]},
        )
        assert r.status_code == 201
        got = await take(events, 2)
        assert [s.event for s in got] == ["io.swarmlog.task.submitted", "io.swarmlog.task.queued"]
        ces = [cloudevent(s) for s in got]
        assert {ce["subject"] for ce in ces} == {"tf-1"}
        assert [ce["id"] for ce in ces] == [e["id"] for e in r.json()["events"]]
        assert ces[0]["data"]["type"] == "filter"
        assert ces[0]["position"]["topic"] == swarm.topics.events("task")
        await nothing_more(events)

    r = await c.post(
        "/tasks",
        json={"task_id": "tf-2", "type": "filter", "required_capabilities": ["nobody-has-it"]},
    )
    async with aconnect_sse(
        c, "GET", "/events", params={"subject": "tf-2", "from": "beginning"}
    ) as es:
        events = es.aiter_sse()
        got = await take(events, 2)
        assert {cloudevent(s)["subject"] for s in got} == {"tf-2"}
        await nothing_more(events)


async def test_events_stream_resumes_from_last_event_id_with_no_gap_and_no_duplicate(swarm) -> None:
    c = swarm.client
    agents = [f"res-{i}" for i in range(4)]
    writes = [b for a in agents for b in await register(c, a)]

    # Agent and task events only: the economy answers each registration with an account
    # of its own, which this test of resumption does not count.
    swarm_types = {"type": ["io.swarmlog.agent.*", "io.swarmlog.task.*"]}
    async with aconnect_sse(c, "GET", "/events", params={"from": "beginning", **swarm_types}) as es:
        assert es.response.status_code == 200
        first = await take(es.aiter_sse(), 2)
    # 2 of the 4 events read; the stream is dropped. More happen while nobody listens.
    for a in agents:
        r = await c.post(f"/agents/{a}/start")
        writes.append(r.json())
    tasks = [f"res-t{i}" for i in range(3)]
    for t in tasks:
        r = await c.post(
            "/tasks",
            json={"task_id": t, "type": "resume", "required_capabilities": ["nobody-has-it"]},
        )
        assert r.status_code == 201
        writes.append(r.json())
    total = 4 + 4 + 2 * 3

    async with aconnect_sse(
        c, "GET", "/events", params=swarm_types, headers={"Last-Event-ID": first[-1].id}
    ) as es:
        assert es.response.status_code == 200
        events = es.aiter_sse()
        rest = await take(events, total - 2)
        await nothing_more(events)

    received = [cloudevent(s)["id"] for s in first + rest]
    assert len(received) == len(set(received)), "an event was delivered twice"
    logged = {
        e["id"]
        for kind, ids in (("agent", agents), ("task", tasks))
        for i in ids
        for e in await history(c, kind, i, after=positions(*writes))
    }
    assert len(logged) == total
    assert set(received) == logged, "an event was missed"

    # Every id is a vector over every partition of every event topic that only moves
    # forward.
    vectors = [vector(s) for s in first + rest]
    assert all(
        len(v) == len(swarm.topics.event_topics) * swarm.settings.partitions for v in vectors
    )
    for before, after in zip(vectors, vectors[1:], strict=False):
        assert sum(after) > sum(before) and all(a >= b for a, b in zip(after, before, strict=True))

    # Resuming from any message (here the 5th, via the query) yields exactly the rest.
    middle = (first + rest)[4]
    async with aconnect_sse(
        c, "GET", "/events", params={"last_event_id": middle.id, **swarm_types}
    ) as es:
        events = es.aiter_sse()
        again = await take(events, total - 5)
        await nothing_more(events)
    assert sorted(cloudevent(s)["id"] for s in again) == sorted(received[5:])


async def test_a_malformed_last_event_id_is_a_400_problem(swarm) -> None:
    c = swarm.client
    for bad in ("garbage", "v1:1.2", "v2:0.0.0.0.0.0", "v1:0.0.0.0.0.x", "v1:999999.0.0.0.0.0"):
        r = await c.get("/events", headers={"Last-Event-ID": bad})
        assert_problem(r, 400, code="bad_position", field="Last-Event-ID")
    r = await c.get("/agents/someone/assignments", params={"last_event_id": "v1:0.0.0.0.0.0"})
    assert_problem(r, 400, code="bad_position")  # the task topic alone has 3 partitions


async def test_an_agent_follows_its_assignments(swarm) -> None:
    c = swarm.client
    await register(c, "bystander", capabilities={"rust": 0.9}, start=True)
    async with aconnect_sse(c, "GET", "/agents/worker/assignments") as es:
        assert es.response.status_code == 200
        events = es.aiter_sse()
        await register(c, "worker", capabilities={"go": 0.8}, start=True)
        await c.post(
            "/tasks",
            json={"task_id": "for-bystander", "type": "x", "required_capabilities": ["rust"]},
        )
        r = await c.post(
            "/tasks", json={"task_id": "for-worker", "type": "x", "required_capabilities": ["go"]}
        )
        assert r.status_code == 201
        [sse] = await take(events, 1, timeout_s=30)
        ce = cloudevent(sse)
        assert sse.event == "io.swarmlog.task.assigned"
        assert ce["data"]["agent_id"] == "worker"
        assert ce["data"]["task_id"] == "for-worker"
        assert ce["subject"] == "for-worker"
        assert len(vector(sse)) == swarm.settings.partitions
        await nothing_more(events)

    r = await c.post("/tasks/for-worker/start", json={"agent_id": "worker"})
    assert r.status_code == 200, r.text


async def test_an_assignment_on_the_log_but_not_yet_projected_is_streamed(swarm) -> None:
    """The SDK worker connects and then lists its assigned tasks from the read model: an
    assignment written before the connection but projected after the list must come by
    the stream, or the worker never sees it."""
    c = swarm.client
    await register(c, "late", capabilities={"zig": 0.8}, start=True)
    await swarm.stop_role("projector")
    r = await c.post(
        "/tasks", json={"task_id": "unseen", "type": "x", "required_capabilities": ["zig"]}
    )
    assert r.status_code == 201, r.text

    # the assignment is on the log (the feed reads the log, not the read model) ...
    async with aconnect_sse(
        c, "GET", "/events", params={"from": "beginning", "type": "io.swarmlog.task.assigned"}
    ) as feed:
        [on_log] = await take(feed.aiter_sse(), 1, timeout_s=30)
        assert cloudevent(on_log)["data"]["task_id"] == "unseen"
    # ... and not in the read model, when the agent connects
    async with aconnect_sse(c, "GET", "/agents/late/assignments") as es:
        assert es.response.status_code == 200
        [sse] = await take(es.aiter_sse(), 1, timeout_s=30)
        assert cloudevent(sse)["data"]["task_id"] == "unseen"


@pytest.mark.parametrize("swarm", [{"sse_max_clients": 1}], indirect=True)
async def test_streams_past_the_limit_get_a_503_with_retry_after(swarm) -> None:
    c = swarm.client
    async with aconnect_sse(c, "GET", "/events") as es:
        assert es.response.status_code == 200
        r = await c.get("/events")
        assert_problem(r, 503, code="too_many_streams")
        assert int(r.headers["retry-after"]) > 0

    async def slot_free() -> bool:
        async with c.stream("GET", "/agents/a/assignments") as r:
            return r.status_code == 200

    assert await swarm.eventually(slot_free, timeout_s=10, what="the closed stream's slot")
    metrics = (await c.get("/metrics")).text
    assert "swarmlog_sse_clients" in metrics


async def test_a_live_stream_resumes_from_the_shared_window_with_no_gap_and_no_duplicate(
    swarm,
) -> None:
    # Live streams share one consumer per API process; a client that drops and comes back
    # with its Last-Event-ID is served from that consumer's window of recent records.
    c = swarm.client
    async with aconnect_sse(c, "GET", "/events", params={"type": "io.swarmlog.agent.*"}) as es:
        assert es.response.status_code == 200
        events = es.aiter_sse()
        await asyncio.sleep(0.5)  # the stream is open and following from now
        writes = await register(c, "win-a")
        (first,) = await take(events, 1)
    assert cloudevent(first)["subject"] == "win-a"
    for a in ("win-b", "win-c"):
        writes += await register(c, a)
    r = await c.post("/agents/win-a/start")
    writes.append(r.json())

    async with aconnect_sse(
        c,
        "GET",
        "/events",
        params={"type": "io.swarmlog.agent.*"},
        headers={"Last-Event-ID": first.id},
    ) as es:
        events = es.aiter_sse()
        rest = await take(events, 3)
        await nothing_more(events)

    got = [cloudevent(s)["id"] for s in rest]
    logged = [
        e["id"]
        for a in ("win-a", "win-b", "win-c")
        for e in await history(c, "agent", a, after=positions(*writes))
    ]
    assert cloudevent(first)["id"] in logged
    assert sorted(got) == sorted(set(logged) - {cloudevent(first)["id"]})
