"""Tasks over HTTP: through the scheduler to completion, batches, paging, pending commands."""

from __future__ import annotations

import pytest

from domain.ids import derived_id
from tests.e2e.support import assert_problem, history, latest_positions, positions, register

pytestmark = pytest.mark.e2e


async def test_a_submitted_task_is_assigned_to_a_capable_agent_that_completes_it(swarm) -> None:
    c = swarm.client
    await register(c, "novice", capabilities={"cooking": 0.9}, start=True)
    await register(c, "expert", capabilities={"python": 0.9}, start=True)
    r = await c.post(
        "/tasks",
        json={
            "task_id": "t-1",
            "type": "lint",
            "payload": {"path": "src/"},
            "required_capabilities": ["python"],
            "priority": "high",
            "max_cost": "2.5",
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/tasks/t-1"
    submitted = r.json()
    assert [e["type"] for e in submitted["events"]] == [
        "io.swarmlog.task.submitted",
        "io.swarmlog.task.queued",
    ]
    assert submitted["state"]["max_cost"] == "2.500000"

    async def assigned() -> dict | None:
        task = (await c.get("/tasks/t-1")).json()
        return task if task.get("status") == "assigned" else None

    task = await swarm.eventually(assigned, what="the scheduler to assign t-1")
    assert task["agent_id"] == "expert"
    assert task["attempts"] == 1

    r = await c.get("/agents/expert")
    assert r.json()["status"] == "busy" and r.json()["load"] == 1

    assert_problem(
        await c.post("/tasks/t-1/start", json={"agent_id": "novice"}),
        403,
        code="not_assigned_agent",
    )
    r = await c.post("/tasks/t-1/start", json={"agent_id": "expert"})
    assert r.status_code == 200, r.text
    r = await c.post(
        "/tasks/t-1/progress", json={"agent_id": "expert", "progress": 0.5, "message": "halfway"}
    )
    assert r.status_code == 200, r.text
    r = await c.post(
        "/tasks/t-1/complete",
        json={"agent_id": "expert", "result": {"warnings": 3}, "quality": 0.75},
    )
    assert r.status_code == 200, r.text
    completed = r.json()
    assert completed["state"]["status"] == "completed"

    r = await c.get("/tasks/t-1", params={"after": positions(completed)})
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["status"] == "completed"
    assert task["result"] == {"warnings": 3}
    assert task["quality"] == 0.75
    assert task["agent_id"] == "expert"
    assert task["max_cost"] == "2.500000"
    assert task["payload"] == {"path": "src/"}

    r = await c.get("/agents/expert", params={"after": positions(completed)})
    agent = r.json()
    assert agent["status"] == "idle" and agent["load"] == 0
    assert agent["tasks_completed"] == 1

    events = await history(c, "task", "t-1", after=positions(completed))
    assert [e["type"].rsplit(".", 1)[1] for e in events] == [
        "submitted",
        "queued",
        "assigned",
        "started",
        "progressed",
        "completed",
    ]
    r = await c.get("/tasks", params={"agent_id": "expert", "status": "completed"})
    assert [t["task_id"] for t in r.json()["items"]] == ["t-1"]


async def test_a_batch_of_fifty_tasks_is_submitted_in_one_request(swarm) -> None:
    c = swarm.client
    tasks = [
        {"task_id": f"b-{i:02d}", "type": "batch", "required_capabilities": ["nobody-has-it"]}
        for i in range(50)
    ]
    tasks[7]["priority"] = "critical"
    r = await c.post("/tasks:batch", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["accepted"] == 50 and result["rejected"] == 0 and result["pending"] == 0
    assert [item["id"] for item in result["items"]] == [t["task_id"] for t in tasks]
    assert [item["index"] for item in result["items"]] == list(range(50))
    assert all(item["http_status"] == 201 and item["version"] == 2 for item in result["items"])

    r = await c.get(
        "/tasks",
        params={"type": "batch", "limit": 100, "after": latest_positions(result["items"])},
    )
    assert r.status_code == 200, r.text
    listed = r.json()["items"]
    assert sorted(t["task_id"] for t in listed) == [t["task_id"] for t in tasks]
    assert {t["status"] for t in listed} == {"queued"}
    r = await c.get("/tasks/b-07")
    assert r.json()["priority"] == "critical"

    # Resubmitting one of them is rejected per item, the others are accepted.
    r = await c.post(
        "/tasks:batch", json={"tasks": [{"task_id": "b-00", "type": "batch"}, {"type": "fresh"}]}
    )
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert items[0]["status"] == "rejected" and items[0]["http_status"] == 409
    assert items[0]["problem"]["code"] == "task_already_submitted"
    assert items[1]["status"] == "accepted"

    # A batch repeated under one Idempotency-Key returns the first outcomes.
    repeat = [{"type": "keyed"} for _ in range(3)]
    first = await c.post("/tasks:batch", json={"tasks": repeat}, headers={"Idempotency-Key": "k1"})
    again = await c.post("/tasks:batch", json={"tasks": repeat}, headers={"Idempotency-Key": "k1"})
    assert first.json() == again.json()
    assert first.json()["accepted"] == 3


async def test_a_batch_over_a_thousand_tasks_is_a_422_problem(swarm) -> None:
    r = await swarm.client.post("/tasks:batch", json={"tasks": [{"type": "x"}] * 1001})
    assert_problem(r, 422, field="tasks")
    assert await swarm.commands_on_log() == 0


async def test_paging_tasks_with_a_cursor_sees_every_task_exactly_once(swarm) -> None:
    c = swarm.client
    tasks = [
        {"task_id": f"p-{i:02d}", "type": "page", "required_capabilities": ["none"]}
        for i in range(23)
    ]
    r = await c.post("/tasks:batch", json={"tasks": tasks})
    assert r.json()["accepted"] == 23
    after = latest_positions(r.json()["items"])
    seen: list[dict] = []
    cursor = None
    while True:
        params: dict[str, object] = {"type": "page", "limit": 5, "after": after}
        if cursor:
            params["cursor"] = cursor
        page = (await c.get("/tasks", params=params)).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ids = [t["task_id"] for t in seen]
    assert sorted(ids) == [t["task_id"] for t in tasks]
    assert len(set(ids)) == len(ids)
    # Newest first: submitted_at never increases along the walk.
    stamps = [(t["submitted_at"], t["task_id"]) for t in seen]
    assert stamps == sorted(stamps, reverse=True)


async def test_a_command_not_decided_in_time_is_a_202_and_can_be_looked_up(swarm) -> None:
    c = swarm.client
    await swarm.stop_role("processor")
    r = await c.post(
        "/agents", json={"agent_id": "late", "name": "Late"}, headers={"Idempotency-Key": "late-1"}
    )
    assert r.status_code == 202, r.text
    command_id = derived_id("command", "late-1", "RegisterAgent", "late")
    location = f"/commands/{command_id}"
    assert r.headers["location"] == location
    assert r.json() == {"command_id": command_id, "status": "pending", "location": location}
    assert_problem(await c.get(location), 404, code="outcome_not_found")

    swarm.start_processor()  # the command is on the log: a new processor decides it

    async def decided() -> dict | None:
        r = await c.get(location)
        return r.json() if r.status_code == 200 else None

    outcome = await swarm.eventually(decided, what="the pending command to be decided")
    assert outcome["status"] == "accepted"
    assert outcome["id"] == "late"
    assert outcome["version"] == 1
    r = await c.post(
        "/agents", json={"agent_id": "late", "name": "Late"}, headers={"Idempotency-Key": "late-1"}
    )
    assert r.status_code == 201
    assert r.headers["idempotent-replayed"] == "true"


async def test_an_agent_fails_a_task_and_a_user_cancels_another(swarm) -> None:
    c = swarm.client
    await register(c, "clumsy", capabilities={"glass": 0.5}, start=True)
    r = await c.post(
        "/tasks", json={"task_id": "vase", "type": "carry", "required_capabilities": ["glass"]}
    )
    assert r.status_code == 201, r.text

    async def assigned() -> bool:
        return (await c.get("/tasks/vase")).json().get("status") == "assigned"

    await swarm.eventually(assigned, what="vase to be assigned")
    r = await c.post("/tasks/vase/start", json={"agent_id": "clumsy"})
    assert r.status_code == 200, r.text
    r = await c.post(
        "/tasks/vase/fail", json={"agent_id": "clumsy", "error": "dropped it", "retryable": False}
    )
    assert r.status_code == 200, r.text
    failed = r.json()
    task = (await c.get("/tasks/vase", params={"after": positions(failed)})).json()
    assert task["status"] == "failed" and task["error"] == "dropped it"
    agent = (await c.get("/agents/clumsy", params={"after": positions(failed)})).json()
    assert agent["tasks_failed"] == 1 and agent["status"] == "idle"

    r = await c.post(
        "/tasks", json={"task_id": "later", "type": "x", "required_capabilities": ["none"]}
    )
    assert r.status_code == 201, r.text
    r = await c.post("/tasks/later/cancel")  # no body: the default reason
    assert r.status_code == 200, r.text
    assert r.json()["state"]["status"] == "cancelled"
    r = await c.post("/tasks/later/cancel", json={"reason": "changed my mind"})
    assert_problem(r, 409, code="task_finished")
