"""Agents over HTTP: commands, conditional and repeated commands, and the read model."""

from __future__ import annotations

import asyncio

import pytest

from domain.ids import derived_id
from tests.e2e.support import assert_problem, history, positions, register

pytestmark = pytest.mark.e2e


async def test_a_registered_and_started_agent_reads_back_idle(swarm) -> None:
    c = swarm.client
    r = await c.post(
        "/agents",
        json={
            "agent_id": "ada",
            "name": "Ada",
            "capabilities": [{"name": "python", "level": 0.9}],
            "max_concurrent_tasks": 2,
            "cost_per_task": "0.5",
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/agents/ada"
    assert r.headers["etag"] == '"1"'
    registered = r.json()
    assert registered["id"] == "ada" and registered["version"] == 1
    assert registered["state"]["lifecycle"] == "registered"
    assert registered["state"]["cost_per_task"] == "0.500000"
    [event] = registered["events"]
    assert event["type"] == "io.swarmlog.agent.registered"
    assert event["topic"] == swarm.topics.events("agent")
    assert event["position"] == f"{event['topic']}:{event['partition']}:{event['offset']}"

    r = await c.post("/agents/ada/start")
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"2"'
    started = r.json()
    assert started["version"] == 2 and started["state"]["lifecycle"] == "running"

    r = await c.get("/agents/ada", params={"after": positions(registered, started)})
    assert r.status_code == 200, r.text
    assert "x-read-model-stale" not in r.headers
    agent = r.json()
    assert agent["status"] == "idle"
    assert agent["lifecycle"] == "running"
    assert agent["load"] == 0
    assert agent["cost_per_task"] == "0.500000"
    assert agent["capabilities"] == [{"name": "python", "level": 0.9}]
    assert agent["max_concurrent_tasks"] == 2
    assert agent["version"] == 2

    r = await c.get("/agents", params={"status": "idle"})
    assert [a["agent_id"] for a in r.json()["items"]] == ["ada"]
    r = await c.get("/agents", params={"status": "busy"})
    assert r.json()["items"] == []

    assert_problem(await c.get("/agents/nobody"), 404, code="agent_not_found")


async def test_a_repeated_idempotency_key_returns_the_first_outcome_and_writes_once(swarm) -> None:
    c = swarm.client
    body = {"agent_id": "twice", "name": "Twice"}
    first = await c.post("/agents", json=body, headers={"Idempotency-Key": "reg-twice"})
    again = await c.post("/agents", json=body, headers={"Idempotency-Key": "reg-twice"})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    body = first.json()
    assert body["command_id"] == derived_id("command", "reg-twice", "RegisterAgent", body["id"])
    assert again.headers["idempotent-replayed"] == "true"
    assert first.headers["etag"] == again.headers["etag"]

    # The repeat is recognised even where the command itself would now be refused.
    start = await c.post("/agents/twice/start", headers={"Idempotency-Key": "start-twice"})
    start_again = await c.post("/agents/twice/start", headers={"Idempotency-Key": "start-twice"})
    assert start.status_code == start_again.status_code == 200
    assert start.json() == start_again.json()

    # Without an agent_id, the key still names one agent (derived from the key).
    anon = await c.post("/agents", json={"name": "anon"}, headers={"Idempotency-Key": "anon"})
    anon_again = await c.post("/agents", json={"name": "anon"}, headers={"Idempotency-Key": "anon"})
    assert anon.status_code == anon_again.status_code == 201
    assert anon.json() == anon_again.json()

    events = await history(c, "agent", "twice", after=positions(first.json(), start.json()))
    assert [e["type"] for e in events] == [
        "io.swarmlog.agent.registered",
        "io.swarmlog.agent.started",
    ]
    assert await history(c, "agent", anon.json()["id"], after=positions(anon.json())) != []
    assert len(await history(c, "agent", anon.json()["id"])) == 1


async def test_if_match_on_another_version_is_a_412_problem(swarm) -> None:
    c = swarm.client
    [registered] = await register(c, "cas")
    r = await c.post("/agents/cas/start", headers={"If-Match": '"7"'})
    problem = assert_problem(r, 412, code="version_mismatch", field="If-Match")
    assert r.headers["etag"] == '"1"'
    assert problem["version"] == 1

    r = await c.post("/agents/cas/start", headers={"If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    r = await c.post("/agents/cas/stop", headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200, r.text
    r = await c.post("/agents/cas/restart", headers={"If-Match": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 4

    events = await history(c, "agent", "cas", after=positions(r.json()))
    assert [e["sequence"] for e in events] == ["1", "2", "3", "4"]


async def test_an_illegal_transition_is_a_409_problem_naming_the_rule(swarm) -> None:
    c = swarm.client
    await register(c, "busy-bee", start=True)
    r = await c.post("/agents/busy-bee/start")
    problem = assert_problem(r, 409, code="agent_already_running")
    assert "busy-bee" in problem["detail"]
    assert problem["type"] == "urn:swarmlog:problem:agent_already_running"

    assert_problem(await c.post("/agents/ghost/start"), 404, code="agent_not_found")
    r = await c.delete("/agents/busy-bee")
    assert r.status_code == 200, r.text
    assert r.json()["state"]["lifecycle"] == "deregistered"
    assert_problem(await c.post("/agents/busy-bee/heartbeat"), 410, code="agent_deregistered")

    r = await c.post("/tasks", json={"task_id": "t-idle", "type": "noop"})
    assert r.status_code == 201, r.text
    r = await c.post("/tasks/t-idle/complete", json={"agent_id": "busy-bee"})
    assert_problem(r, 409, code="task_not_running")


async def test_capabilities_update_and_heartbeat_are_applied(swarm) -> None:
    c = swarm.client
    await register(c, "learner", capabilities={"sql": 0.2}, start=True)
    r = await c.patch(
        "/agents/learner",
        json={"capabilities": [{"name": "sql", "level": 0.8}, {"name": "go", "level": 0.5}]},
    )
    assert r.status_code == 200, r.text
    updated = r.json()
    r = await c.post("/agents/learner/heartbeat")
    assert r.status_code == 200, r.text
    beat = r.json()
    r = await c.get("/agents/learner", params={"after": positions(updated, beat)})
    agent = r.json()
    assert agent["capabilities"] == [{"name": "sql", "level": 0.8}, {"name": "go", "level": 0.5}]
    assert agent["last_heartbeat_at"] is not None
    assert agent["version"] == 4


async def test_paging_agents_with_a_cursor_sees_every_agent_exactly_once(swarm) -> None:
    c = swarm.client
    ids = [f"pager-{i:02d}" for i in range(11)]
    bodies = await asyncio.gather(*(register(c, i) for i in ids))
    after = positions(*(b for pair in bodies for b in pair))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, object] = {"limit": 3, "after": after}
        if cursor:
            params["cursor"] = cursor
        r = await c.get("/agents", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 3
        seen += [a["agent_id"] for a in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert pages == 4
    assert_problem(await c.get("/agents", params={"cursor": "not-a-cursor"}), 422, field="cursor")
    assert_problem(await c.get("/agents", params={"limit": 501}), 422, field="limit")
