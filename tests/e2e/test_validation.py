"""Bad input at every command route: a 422 problem naming the field, and nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from infra.codec import decode_command
from tests.e2e.support import assert_problem, history
from tests.integration.helpers import read_records

pytestmark = pytest.mark.e2e

LONG_ID = "x" * 129

# (method, path, json body, headers, the field the problem must name)
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], str]] = [
    # POST /agents
    ("POST", "/agents", {"agent_id": "bad-1", "name": ""}, {}, "name"),
    ("POST", "/agents", {"agent_id": "bad-1"}, {}, "name"),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "cost_per_task": "-1"},
        {},
        "cost_per_task",
    ),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "cost_per_task": "0.0000001"},
        {},
        "cost_per_task",
    ),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "cost_per_task": "lots"},
        {},
        "cost_per_task",
    ),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "cost_per_task": 0.5},
        {},
        "cost_per_task",
    ),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "max_concurrent_tasks": 0},
        {},
        "max_concurrent_tasks",
    ),
    (
        "POST",
        "/agents",
        {"agent_id": "bad-1", "name": "n", "capabilities": [{"name": "py", "level": 1.5}]},
        {},
        "capabilities.0.level",
    ),
    (
        "POST",
        "/agents",
        {
            "agent_id": "bad-1",
            "name": "n",
            "capabilities": [{"name": "py", "level": 0.1}, {"name": "py", "level": 0.2}],
        },
        {},
        "capabilities",
    ),
    ("POST", "/agents", {"agent_id": "bad id/1", "name": "n"}, {}, "agent_id"),
    ("POST", "/agents", {"agent_id": "bad-1", "name": "n", "colour": "red"}, {}, "colour"),
    ("POST", "/agents", None, {}, "body"),
    ("POST", "/agents", {"agent_id": "bad-1", "name": "n"}, {"If-Match": "three"}, "If-Match"),
    # agent lifecycle
    ("POST", f"/agents/{LONG_ID}/start", None, {}, "agent_id"),
    ("POST", "/agents/bad-1/start", None, {"If-Match": '"x"'}, "If-Match"),
    ("POST", f"/agents/{LONG_ID}/stop", None, {}, "agent_id"),
    ("POST", "/agents/bad-1/stop", None, {"If-Match": "-1"}, "If-Match"),
    ("POST", f"/agents/{LONG_ID}/restart", None, {}, "agent_id"),
    ("POST", "/agents/bad-1/restart", None, {"If-Match": "W/"}, "If-Match"),
    ("POST", f"/agents/{LONG_ID}/heartbeat", None, {}, "agent_id"),
    ("POST", "/agents/bad-1/heartbeat", None, {"If-Match": "*"}, "If-Match"),
    (
        "PATCH",
        "/agents/bad-1",
        {"capabilities": [{"name": "no spaces", "level": 0.5}]},
        {},
        "capabilities.0.name",
    ),
    ("PATCH", "/agents/bad-1", {}, {}, "capabilities"),
    ("DELETE", f"/agents/{LONG_ID}", None, {}, "agent_id"),
    ("DELETE", "/agents/bad-1", None, {"If-Match": "1.5"}, "If-Match"),
    # POST /tasks
    ("POST", "/tasks", {"task_id": "bad-t", "type": ""}, {}, "type"),
    ("POST", "/tasks", {"task_id": "bad-t"}, {}, "type"),
    ("POST", "/tasks", {"task_id": "bad-t", "type": "x", "max_cost": "-0.5"}, {}, "max_cost"),
    ("POST", "/tasks", {"task_id": "bad-t", "type": "x", "max_cost": "1.1234567"}, {}, "max_cost"),
    ("POST", "/tasks", {"task_id": "bad-t", "type": "x", "priority": "whenever"}, {}, "priority"),
    (
        "POST",
        "/tasks",
        {"task_id": "bad-t", "type": "x", "lease_timeout_s": 0},
        {},
        "lease_timeout_s",
    ),
    ("POST", "/tasks", {"task_id": "bad-t", "type": "x", "max_attempts": 0}, {}, "max_attempts"),
    (
        "POST",
        "/tasks",
        {"task_id": "bad-t", "type": "x", "required_capabilities": ["a", "a"]},
        {},
        "required_capabilities",
    ),
    ("POST", "/tasks", {"task_id": "bad-t", "type": "x", "payload": [1, 2]}, {}, "payload"),
    (
        "POST",
        "/tasks",
        {"task_id": "bad-t", "type": "x", "payload": {"blob": "x" * 300_000}},
        {},
        "payload",
    ),
    # POST /tasks:batch
    ("POST", "/tasks:batch", {"tasks": []}, {}, "tasks"),
    (
        "POST",
        "/tasks:batch",
        {"tasks": [{"task_id": "bad-t", "type": "ok"}, {"type": ""}]},
        {},
        "tasks.1.type",
    ),
    (
        "POST",
        "/tasks:batch",
        {"tasks": [{"type": "ok"}, {"type": "ok", "required_capabilities": ["a", "a"]}]},
        {},
        "tasks.1.required_capabilities",
    ),
    # task lifecycle
    ("POST", "/tasks/bad-t/start", {}, {}, "agent_id"),
    ("POST", f"/tasks/{LONG_ID}/start", {"agent_id": "a"}, {}, "task_id"),
    ("POST", "/tasks/bad-t/progress", {"agent_id": "a", "progress": 1.5}, {}, "progress"),
    ("POST", "/tasks/bad-t/progress", {"agent_id": "a"}, {}, "progress"),
    ("POST", "/tasks/bad-t/complete", {"agent_id": "a", "quality": -0.1}, {}, "quality"),
    ("POST", "/tasks/bad-t/complete", {"result": {}}, {}, "agent_id"),
    (
        "POST",
        "/tasks/bad-t/complete",
        {"agent_id": "a", "result": {"blob": "x" * 300_000}},
        {},
        "result",
    ),
    ("POST", "/tasks/bad-t/fail", {"agent_id": "a", "error": ""}, {}, "error"),
    (
        "POST",
        "/tasks/bad-t/fail",
        {"agent_id": "a", "error": "e", "retryable": "maybe"},
        {},
        "retryable",
    ),
    ("POST", "/tasks/bad-t/cancel", {"reason": "x" * 2001}, {}, "reason"),
    ("POST", "/tasks/bad-t/cancel", None, {"If-Match": "v1"}, "If-Match"),
    # the economy: negative, more than 6 decimals, overflow, zero, unknown fields
    ("POST", "/accounts/bad-a/stake", {"amount": "-1"}, {}, "amount"),
    ("POST", "/accounts/bad-a/transfer", {"to": "bad-b", "amount": "1.0000001"}, {}, "amount"),
    ("POST", "/accounts/bad-a/grant", {"amount": "1000000001"}, {}, "amount"),
    ("POST", "/accounts/bad-a/unstake", {"amount": "0"}, {}, "amount"),
    ("POST", "/accounts/bad-a/withdraw", None, {"If-Match": "x"}, "If-Match"),
    ("POST", "/accounts/bad-a/transfer", {"to": "bad b", "amount": "1"}, {}, "to"),
    ("POST", "/proposals", {"title": "t", "proposer": "p", "change": {}, "window_s": 0},
     {}, "window_s"),
    ("POST", "/proposals", {"title": "t", "proposer": "p", "window_s": 60,
                            "change": {"base_reward": "-2"}}, {}, "change.base_reward"),
    ("POST", "/proposals/bad-p/votes", {"voter": "v", "choice": "maybe"}, {}, "choice"),
]


async def test_bad_input_at_every_command_route_is_a_422_problem_and_writes_nothing(swarm) -> None:
    c = swarm.client
    for method, path, body, headers, field in BAD_REQUESTS:
        r = await c.request(method, path, json=body, headers=headers)
        problem = assert_problem(r, 422, field=field)
        assert problem["code"] in ("validation_error", "invalid_if_match"), problem
        if problem["code"] == "validation_error":
            assert problem["errors"] and all(e["message"] for e in problem["errors"])

    assert await swarm.commands_on_log() == 0
    # A valid command afterwards goes through, and then the read models are known to be
    # live: none of the refused commands left a trace in them.
    r = await c.post("/agents", json={"agent_id": "good", "name": "good"})
    assert r.status_code == 201, r.text
    # On the log: that command, and at most the account the economy opens for the agent.
    sent = [
        (type(env.command).__name__, env.command.aggregate_id)
        for env in map(decode_command, await read_records(swarm.bootstrap, swarm.topics.commands))
    ]
    assert sent[0] == ("RegisterAgent", "good")
    assert sent[1:] in ([], [("OpenAccount", "good")]), sent
    after = [e["position"] for e in r.json()["events"]]
    assert_problem(await c.get("/agents/bad-1", params={"after": after}), 404)
    assert_problem(await c.get("/tasks/bad-t"), 404)
    assert await history(c, "agent", "bad-1") == []
    assert await history(c, "task", "bad-t") == []
    assert (await c.get("/tasks")).json()["items"] == []
    assert [a["agent_id"] for a in (await c.get("/agents")).json()["items"]] == ["good"]
