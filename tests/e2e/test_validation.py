"""Bad input at every command route: a 422 problem naming the field, and nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from infra.envelope import decode_command
from tests.e2e.support import assert_problem, history, latest_positions
from tests.integration.helpers import read_events, read_records

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
    ("POST", "/agents/bad-1/heartbeat", {"sent_at": "yesterday"}, {}, "sent_at"),
    ("POST", "/agents/bad-1/heartbeat", {"sent_at": "2026-12-08T03:00:00"}, {}, "sent_at"),
    ("POST", "/agents/bad-1/heartbeat", {"sent_at": 12.5, "beat": 1}, {}, "beat"),
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
    (
        "POST",
        "/proposals",
        {"title": "t", "proposer": "p", "change": {}, "window_s": 0},
        {},
        "window_s",
    ),
    (
        "POST",
        "/proposals",
        {"title": "t", "proposer": "p", "window_s": 60, "change": {"base_reward": "-2"}},
        {},
        "change.base_reward",
    ),
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


# What the log, PostgreSQL or the JSON encoder cannot hold, anywhere in a request
# (api/guard.py): (method, path, raw JSON body or None, query, the field named).
DEEP = '{"task_id": "deep-t", "type": "x", "payload": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
UNSTORABLE: list[tuple[str, str, str | None, dict[str, Any], str]] = [
    ("POST", "/tasks", '{"task_id": "nul-t", "type": "a\\u0000b"}', {}, "type"),
    (
        "POST",
        "/tasks",
        '{"task_id": "nul-t", "type": "x", "payload": {"k": ["ok", "a\\u0000"]}}',
        {},
        "payload.k.1",
    ),
    (
        "POST",
        "/tasks",
        '{"task_id": "nul-t", "type": "x", "payload": {"a\\u0000": 1}}',
        {},
        "payload",
    ),
    (
        "POST",
        "/tasks",
        '{"task_id": "nul-t", "type": "x", "payload": {"s": "\\ud800"}}',
        {},
        "payload.s",
    ),
    (
        "POST",
        "/tasks",
        '{"task_id": "big-t", "type": "x", "payload": {"n": 9223372036854775808}}',
        {},
        "payload.n",
    ),
    (
        "POST",
        "/tasks",
        '{"task_id": "big-t", "type": "x", "payload": {"n": -9223372036854775809}}',
        {},
        "payload.n",
    ),
    (
        "POST",
        "/tasks",
        '{"task_id": "big-t", "type": "x", "payload": {"n": 1e400}}',
        {},
        "payload.n",
    ),
    ("POST", "/tasks", '{"task_id": "big-t", "type": "x", "payload": {"n": NaN}}', {}, "payload.n"),
    ("POST", "/tasks", DEEP, {}, "payload" + ".a" * 31),
    (
        "POST",
        "/tasks:batch",
        (
            '{"tasks": [{"type": "x"}, {"type": "x", "payload": {"v": '
            "123456789012345678901234567890}}]}"
        ),
        {},
        "tasks.1.payload.v",
    ),
    ("POST", "/tasks/t1/complete", '{"agent_id": "a", "result": {"r": "\\u0000"}}', {}, "result.r"),
    ("POST", "/tasks/t1/fail", '{"agent_id": "a", "error": "boom\\u0000"}', {}, "error"),
    ("POST", "/agents", '{"agent_id": "nul-a", "name": "\\u0000"}', {}, "name"),
    (
        "POST",
        "/workflows",
        '{"name": "w", "steps": [{"id": "s", "task_type": "t\\u0000"}]}',
        {},
        "steps.0.task_type",
    ),
    (
        "POST",
        "/workflow-templates/t/instantiate",
        '{"params": {"p": 18446744073709551616}}',
        {},
        "params.p",
    ),
    ("GET", "/tasks", None, {"type": "a\x00b"}, "type"),
    ("GET", "/tasks", None, {"after": "a\x00"}, "after"),
    ("GET", "/aggregates/task/a%00b/events", None, {}, "aggregate_id"),
    ("GET", "/commands/c%00", None, {}, "command_id"),
    # Forged or out-of-range positions, cursors and versions.
    ("GET", "/tasks", None, {"after": "t:99999999999:0"}, "after"),
    ("GET", "/tasks", None, {"after": "nosuchtopic:0:0"}, "after"),
    ("GET", "/tasks", None, {"cursor": "WyJ0YXNrcyIsInNvb24iLCJ4Il0"}, "cursor"),
    ("GET", "/agents", None, {"cursor": "WyJhZ2VudHMiLHsiYSI6MX1d"}, "cursor"),
    (
        "GET",
        "/accounts/a1/ledger",
        None,
        {"cursor": "WyJsZWRnZXIiLDk5OTk5OTk5OTk5OTk5OTk5OTk5XQ"},
        "cursor",
    ),
    (
        "GET",
        "/aggregates/task/t1/events",
        None,
        {"cursor": "WyJldmVudHMiLDk5OTk5OTk5OTk5XQ"},
        "cursor",
    ),
    ("GET", "/workflow-templates/t", None, {"version": "8589934591"}, "version"),
]


async def test_input_that_cannot_be_stored_is_a_422_naming_the_field_and_writes_nothing(
    swarm,
) -> None:
    c = swarm.client
    for method, path, body, params, field in UNSTORABLE:
        r = await c.request(
            method,
            path,
            content=body,
            params=params,
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        assert_problem(r, 422, field=field)
    r = await c.post("/tasks", json={"type": "x"}, headers={"If-Match": '"' + "9" * 30 + '"'})
    assert_problem(r, 422, field="If-Match")
    assert await swarm.commands_on_log() == 0

    # The API, the processor and the projector carry on: a good task is readable at once.
    r = await c.post(
        "/tasks", json={"task_id": "good-t", "type": "ok", "payload": {"n": 2**63 - 1}}
    )
    assert r.status_code == 201, r.text
    after = [e["position"] for e in r.json()["events"]]
    r = await c.get("/tasks/good-t", params={"after": after}, timeout=1.0)
    assert r.status_code == 200 and "X-Read-Model-Stale" not in r.headers, r.text
    assert r.json()["payload"] == {"n": 2**63 - 1}
    assert_problem(await c.get("/tasks/nul-t"), 404)


async def test_a_body_over_the_limit_is_a_413_problem_even_without_content_length(swarm) -> None:
    limit = swarm.settings.max_request_bytes
    big = b'{"type": "x", "payload": {"blob": "' + b"x" * limit + b'"}}'
    assert_problem(
        await swarm.client.post(
            "/tasks", content=big, headers={"Content-Type": "application/json"}
        ),
        413,
    )

    async def chunks():  # streamed: no Content-Length, the body is counted as it comes
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    r = await swarm.client.post(
        "/tasks", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, code="request_too_large")
    r = await swarm.client.post("/tasks", content=b"type=x", headers={"Content-Type": "text/plain"})
    assert_problem(r, 415, field="Content-Type")
    assert await swarm.commands_on_log() == 0


async def test_an_idempotency_key_reused_for_another_batch_answers_each_task_its_own_outcome(
    swarm,
) -> None:
    c = swarm.client
    key = {"Idempotency-Key": "batch-key-1"}
    first = await c.post(
        "/tasks:batch",
        headers=key,
        json={"tasks": [{"task_id": "ik-a", "type": "x"}, {"task_id": "ik-b", "type": "x"}]},
    )
    assert first.status_code == 200, first.text
    # Same key, another batch: ik-b again (in another place), and two new tasks.
    second = await c.post(
        "/tasks:batch",
        headers=key,
        json={
            "tasks": [
                {"task_id": "ik-c", "type": "y"},
                {"task_id": "ik-b", "type": "x"},
                {"task_id": "ik-d", "type": "y"},
            ]
        },
    )
    assert second.status_code == 200, second.text
    items = second.json()["items"]
    assert [i["id"] for i in items] == ["ik-c", "ik-b", "ik-d"]
    assert [i["status"] for i in items] == ["accepted"] * 3, items
    # ik-b's answer is its first outcome, replayed (the same command id, version 1).
    assert items[1] == {**first.json()["items"][1], "index": 1}
    assert len({i["command_id"] for i in first.json()["items"] + items}) == 4

    events = await read_events(swarm.bootstrap, swarm.topics)
    submitted = [e for e in events if e.aggregate_id.startswith("ik-")]
    assert sorted(e.aggregate_id for e in submitted if e.version == 1) == [
        "ik-a",
        "ik-b",
        "ik-c",
        "ik-d",
    ]
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "duplicate CloudEvent ids on the log"
    for task_id, task_type in (("ik-c", "y"), ("ik-d", "y"), ("ik-b", "x")):
        r = await c.get(f"/tasks/{task_id}", params={"after": latest_positions(items)})
        assert r.status_code == 200 and r.json()["type"] == task_type, r.text

    # A task id twice in one batch is refused before anything is sent.
    r = await c.post(
        "/tasks:batch",
        json={"tasks": [{"task_id": "ik-e", "type": "x"}, {"task_id": "ik-e", "type": "x"}]},
    )
    assert_problem(r, 422, code="duplicate_task_id", field="tasks.1.task_id")
