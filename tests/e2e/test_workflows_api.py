"""Workflows over HTTP: definitions (create, read, list, update, archive), invalid DAGs
refused before anything is written, templates (publish, read, instantiate), and runs
followed to their end with an SDK agent doing the steps' tasks, or cancelled.

The runs need the workflow process manager (streams/) running in the ``swarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from httpx_sse import aconnect_sse

from sdk import TaskContext, Worker
from tests.e2e.support import assert_problem, positions
from tests.e2e.test_live import cloudevent, take

pytestmark = pytest.mark.e2e


def step(sid: str, **fields: Any) -> dict[str, Any]:
    return {"id": sid, "task_type": "wf-echo", "required_capabilities": ["wf"], **fields}


SIMPLE = [step("a"), step("b", depends_on=["a"])]


async def _echo(ctx: TaskContext) -> tuple[dict[str, Any], float]:
    return {"echo": ctx.payload}, 1.0


@contextlib.asynccontextmanager
async def agent(swarm: Any, agent_id: str = "wf-agent"):  # type: ignore[no-untyped-def]
    """An SDK worker with the ``wf`` capability echoing each task's payload."""
    worker = Worker(
        swarm.base_url,
        agent_id=agent_id,
        name="echo",
        capabilities={"wf": 1.0},
        handler=_echo,
        max_concurrent_tasks=4,
        heartbeat_interval_s=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def engine(swarm):  # type: ignore[no-untyped-def]
    """The swarm, whose ``workflow`` role runs the workflow process manager."""
    assert "workflow" in swarm.roles
    return swarm


async def run_where(swarm: Any, run_id: str, *statuses: str) -> dict[str, Any]:
    """Wait until GET /workflow-runs/{id} has one of ``statuses``; return it."""

    async def probe() -> dict[str, Any] | None:
        r = await swarm.client.get(f"/workflow-runs/{run_id}")
        if r.status_code != 200:
            return None
        body: dict[str, Any] = r.json()
        return body if body["status"] in statuses else None

    return await swarm.eventually(probe, timeout_s=60, what=f"run {run_id} {statuses}")


async def test_definitions_are_created_read_listed_updated_and_archived(swarm) -> None:
    c = swarm.client
    r = await c.post(
        "/workflows",
        json={"id": "wf-a", "name": "first", "steps": SIMPLE},
        headers={"Idempotency-Key": "create-wf-a"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/workflows/wf-a" and r.headers["ETag"] == '"1"'
    created = r.json()
    assert created["state"]["version"] == 1 and created["state"]["status"] == "active"
    again = await c.post(
        "/workflows",
        json={"id": "wf-a", "name": "first", "steps": SIMPLE},
        headers={"Idempotency-Key": "create-wf-a"},
    )
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert_problem(
        await c.post("/workflows", json={"id": "wf-a", "name": "x", "steps": SIMPLE}),
        409,
        code="workflow_exists",
    )

    r = await c.post(
        "/workflows", json={"name": "second", "description": "no id given", "steps": [step("only")]}
    )
    assert r.status_code == 201, r.text
    other_id = r.json()["id"]
    second = r.json()
    assert r.headers["Location"] == f"/workflows/{other_id}" and len(other_id) == 36

    r = await c.get("/workflows/wf-a", params={"after": positions(created, second)})
    assert r.status_code == 200, r.text
    wf = r.json()
    assert r.headers["ETag"] == '"1"'
    assert (wf["name"], wf["version"], wf["status"], wf["runs"]) == ("first", 1, "active", 0)
    assert [s["id"] for s in wf["steps"]] == ["a", "b"] and wf["steps"][1]["depends_on"] == ["a"]
    assert wf["steps"][0]["retry"]["max_attempts"] == 1 and wf["compensations"] == []

    # Newest first, one per page.
    seen, cursor = [], None
    for _ in range(3):
        r = await c.get("/workflows", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        seen += [w["id"] for w in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    assert seen == [other_id, "wf-a"]
    assert_problem(
        await c.get("/workflows", params={"cursor": "garbage"}),
        422,
        code="invalid_cursor",
        field="cursor",
    )

    # Updates bump the definition's version; If-Match takes the ETag.
    assert_problem(
        await c.patch("/workflows/wf-a", json={"name": "x"}, headers={"If-Match": '"7"'}), 412
    )
    r = await c.patch("/workflows/wf-a", json={"name": "renamed"}, headers={"If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["state"]["version"] == 2 and r.json()["state"]["name"] == "renamed"
    r = await c.patch(
        "/workflows/wf-a",
        json={"steps": [step("a"), step("b", depends_on=["a"]), step("c", depends_on=["b"])]},
    )
    assert r.status_code == 200, r.text
    r = await c.get("/workflows/wf-a", params={"after": positions(r.json())})
    wf = r.json()
    assert (wf["version"], wf["name"], r.headers["ETag"]) == (3, "renamed", '"3"')
    assert [s["id"] for s in wf["steps"]] == ["a", "b", "c"]
    assert_problem(await c.patch("/workflows/wf-a", json={}), 422, code="empty_update")
    assert_problem(
        await c.patch("/workflows/nope", json={"name": "x", "steps": SIMPLE}),
        404,
        code="workflow_not_found",
    )

    # Archived: read-only, and no more runs.
    r = await c.delete("/workflows/wf-a")
    assert r.status_code == 200, r.text
    assert r.json()["state"]["status"] == "archived"
    assert_problem(
        await c.post("/workflows/wf-a/execute", json={"inputs": {}}), 410, code="workflow_archived"
    )
    assert_problem(
        await c.patch("/workflows/wf-a", json={"name": "x", "steps": SIMPLE}),
        410,
        code="workflow_archived",
    )
    assert_problem(await c.post("/workflows/nope/execute"), 404, code="workflow_not_found")
    r = await c.get("/workflows", params={"status": "archived", "after": positions(r.json())})
    assert [w["id"] for w in r.json()["items"]] == ["wf-a"]
    r = await c.get("/workflows", params={"status": "active"})
    assert [w["id"] for w in r.json()["items"]] == [other_id]


# (body, the field the problem names, its code)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    (
        {"steps": [step("a"), step("b", depends_on=["zz"])]},
        "steps[1].depends_on",
        "unknown_dependency",
    ),
    ({"steps": [step("a"), step("a")]}, "steps[1].id", "duplicate_step"),
    (
        {
            "steps": [
                step("a", depends_on=["c"]),
                step("b", depends_on=["a"]),
                step("c", depends_on=["b"]),
            ]
        },
        "steps[0].depends_on",
        "cycle",
    ),
    ({"steps": [step("a", when="inputs.[")]}, "steps[0].when", "invalid_expression"),
    (
        {
            "steps": [
                step("a"),
                step("b", payload_from={"x": "steps.c.result"}),
                step("c", depends_on=["a"]),
            ]
        },
        "steps[1].payload_from.x",
        "not_upstream",
    ),
    (
        {"steps": [step("a", on_failure="compensate", compensation="undo")]},
        "steps[0].compensation",
        "unknown_compensation",
    ),
    (
        {"steps": [step("a", map={"items": "inputs.xs"}, gate="length(")]},
        "steps[0].gate",
        "invalid_expression",
    ),
    ({"steps": [step("a b")]}, "steps.0.id", "validation_error"),
    ({"steps": []}, "steps", "validation_error"),
    (
        {"steps": [step("a", retry={"max_attempts": 0})]},
        "steps.0.retry.max_attempts",
        "validation_error",
    ),
    ({"steps": [step("a", colour="red")]}, "steps.0.colour", "validation_error"),
]


async def test_an_invalid_definition_is_a_422_naming_step_and_field_and_nothing_is_written(
    swarm,
) -> None:
    c = swarm.client
    for i, (body, field, code) in enumerate(INVALID):
        r = await c.post("/workflows", json={"id": f"bad-{i}", "name": "bad", **body})
        problem = assert_problem(r, 422, code=code, field=field)
        if code == "cycle":
            assert problem["detail"].endswith("a -> b -> c -> a"), problem
    r = await c.post("/workflow-templates", json={"name": "bad", **INVALID[2][0]})
    assert_problem(r, 422, code="cycle", field="steps[0].depends_on")
    r = await c.patch("/workflows/anything", json={"name": "x", **INVALID[0][0]})
    assert_problem(r, 422, code="unknown_dependency", field="steps[1].depends_on")
    assert await swarm.commands_on_log() == 0

    # Once a later valid definition is projected, the invalid ones are still unknown.
    r = await c.post("/workflows", json={"id": "good", "name": "good", "steps": SIMPLE})
    assert r.status_code == 201, r.text
    assert (
        await c.get("/workflows/good", params={"after": positions(r.json())})
    ).status_code == 200
    for i in range(len(INVALID)):
        assert_problem(await c.get(f"/workflows/bad-{i}"), 404, code="workflow_not_found")
    assert_problem(await c.get("/workflow-templates/bad"), 404, code="template_not_found")
    assert await swarm.commands_on_log() == 1


async def test_templates_are_published_in_versions_and_instantiated_with_parameters(
    swarm,
) -> None:
    c = swarm.client
    template = {
        "name": "etl",
        "description": "extract and load",
        "parameters": {
            "source": {"description": "where from"},
            "batch": {"description": "rows per batch", "default": 10, "required": False},
        },
        "steps": [
            step("extract", payload_from={"from": "params.source", "n": "params.batch"}),
            step("load", depends_on=["extract"]),
        ],
    }
    r = await c.post("/workflow-templates", json=template)
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/workflow-templates/etl?version=1"
    r = await c.post("/workflow-templates", json={**template, "description": "v2"})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/workflow-templates/etl?version=2"
    r = await c.post("/workflow-templates", json={"name": "another", "steps": [step("x")]})
    assert r.status_code == 201, r.text
    after = {"after": positions(r.json())}

    r = await c.get("/workflow-templates/etl", params=after)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["version"], got["description"], r.headers["ETag"]) == (2, "v2", '"2"')
    assert got["parameters"]["batch"] == {
        "description": "rows per batch",
        "default": 10,
        "required": False,
    }
    assert [s["id"] for s in got["steps"]] == ["extract", "load"]
    r = await c.get("/workflow-templates/etl", params={"version": 1, **after})
    assert r.json()["description"] == "extract and load"
    assert_problem(
        await c.get("/workflow-templates/etl", params={"version": 9}),
        404,
        code="template_not_found",
        field="version",
    )
    assert_problem(await c.get("/workflow-templates/Bad Name"), 422, field="name")

    first = await c.get("/workflow-templates", params={"limit": 1, **after})
    assert [(t["name"], t["version"]) for t in first.json()["items"]] == [("another", 1)]
    second = await c.get(
        "/workflow-templates", params={"limit": 1, "cursor": first.json()["next_cursor"]}
    )
    assert [(t["name"], t["version"]) for t in second.json()["items"]] == [("etl", 2)]
    assert second.json()["next_cursor"] is None

    r = await c.post(
        "/workflow-templates/etl/instantiate",
        json={"params": {"source": "s3://in"}, "workflow_id": "etl-1"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/workflows/etl-1"
    r = await c.get("/workflows/etl-1", params={"after": positions(r.json())})
    wf = r.json()
    assert wf["template"] == "etl@2" and wf["params"] == {"source": "s3://in", "batch": 10}
    assert (wf["name"], wf["description"]) == ("etl", "v2")
    r = await c.post(
        "/workflow-templates/etl/instantiate",
        json={"params": {"source": "db", "batch": 5}, "version": 1, "name": "old"},
    )
    assert r.status_code == 201, r.text
    r = await c.get(r.headers["Location"], params={"after": positions(r.json())})
    assert (r.json()["template"], r.json()["name"], r.json()["params"]["batch"]) == (
        "etl@1",
        "old",
        5,
    )

    assert_problem(
        await c.post(
            "/workflow-templates/etl/instantiate", json={"params": {"source": "x", "colour": "red"}}
        ),
        422,
        code="unknown_parameter",
        field="params.colour",
    )
    assert_problem(
        await c.post("/workflow-templates/etl/instantiate", json={"params": {}}),
        422,
        code="missing_parameter",
        field="params.source",
    )
    assert_problem(
        await c.post("/workflow-templates/nope/instantiate", json={}),
        404,
        code="template_not_found",
    )


async def test_a_run_is_followed_step_by_step_to_completion(engine) -> None:
    swarm = engine
    c = swarm.client
    steps = [
        step("split", payload={"xs": [1, 2, 3]}),
        step(
            "each",
            depends_on=["split"],
            map={"items": "steps.split.result.echo.xs", "max_parallelism": 2},
        ),
        step(
            "join",
            depends_on=["each"],
            payload_from={"n": "length(steps.each.result)", "who": "inputs.who"},
        ),
    ]
    r = await c.post("/workflows", json={"id": "flow", "name": "flow", "steps": steps})
    assert r.status_code == 201, r.text
    async with agent(swarm):
        r = await c.post(
            "/workflows/flow/execute", json={"run_id": "run-1", "inputs": {"who": "me"}}
        )
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert r.headers["Location"] == "/workflow-runs/run-1"
        assert accepted["run_id"] == "run-1" and accepted["workflow_id"] == "flow"
        assert accepted["status"] in ("pending", "running") and accepted["version"] == 1
        assert accepted["links"]["self"] == "/workflow-runs/run-1"
        run = await run_where(swarm, "run-1", "completed", "failed", "cancelled")

    assert run["status"] == "completed", run
    assert run["progress"] == {"done": 3, "total": 3}
    assert run["result"] == {"join": {"echo": {"n": 3, "who": "me"}}}
    assert run["started_at"] and run["finished_at"] and run["inputs"] == {"who": "me"}
    by_id = {s["step_id"]: s for s in run["steps"]}
    assert [s["step_id"] for s in run["steps"]] == ["split", "each", "join"]
    assert all(s["status"] == "completed" and s["attempts"] == 1 for s in run["steps"])
    assert (by_id["each"]["items_total"], by_id["each"]["items_done"]) == (3, 3)
    assert len(by_id["each"]["task_ids"]) == 3 and len(by_id["join"]["task_ids"]) == 1
    assert by_id["each"]["result"] == [
        {"echo": {"item": x, "index": i}} for i, x in enumerate([1, 2, 3])
    ]
    assert by_id["split"]["duration_s"] is not None and by_id["split"]["duration_s"] >= 0
    # Each step's task is a task like any other.
    task = (await c.get(f"/tasks/{by_id['join']['task_ids'][0]}")).json()
    assert task["status"] == "completed" and task["type"] == "wf-echo"
    assert task["payload"] == {"n": 3, "who": "me"}

    r = await c.get("/workflow-runs", params={"workflow_id": "flow"})
    assert [x["run_id"] for x in r.json()["items"]] == ["run-1"]
    assert r.json()["items"][0]["steps"] is None
    assert (await c.get("/workflow-runs", params={"status": "running"})).json()["items"] == []
    assert (await c.get("/workflows/flow")).json()["runs"] == 1
    assert_problem(
        await c.post("/workflows/flow/execute", json={"run_id": "run-1"}),
        409,
        code="run_exists",
        field="run_id",
    )
    assert_problem(await c.post("/workflow-runs/run-1/cancel"), 409, code="run_finished")

    # The run's events are on the live feed, filtered by run id.
    async with aconnect_sse(
        c, "GET", "/events", params={"run_id": "run-1", "from": "beginning"}
    ) as es:
        got = [cloudevent(e) for e in await take(es.aiter_sse(), 3)]
    assert [e["type"] for e in got] == [
        "io.swarmlog.workflow_run.started",
        "io.swarmlog.workflow_run.step_started",
        "io.swarmlog.workflow_run.step_tasks_scheduled",
    ]
    assert {e["subject"] for e in got} == {"run-1"}


async def test_a_cancelled_run_starts_nothing_more(engine) -> None:
    swarm = engine
    c = swarm.client
    # No agent has the capability, so the first step waits.
    r = await c.post("/workflows", json={"id": "stuck", "name": "stuck", "steps": SIMPLE})
    assert r.status_code == 201, r.text
    r = await c.post("/workflows/stuck/execute", json={"inputs": {}})
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    run = await run_where(swarm, run_id, "running")
    assert run["progress"] == {"done": 0, "total": 2}
    assert [s["status"] for s in run["steps"]] == ["running", "pending"]

    r = await c.post(f"/workflow-runs/{run_id}/cancel", json={"reason": "changed my mind"})
    assert r.status_code == 200, r.text
    run = await run_where(swarm, run_id, "cancelled")
    assert run["error"] == "changed my mind" and run["finished_at"]
    assert [s["status"] for s in run["steps"]] == ["cancelled", "cancelled"]
    assert run["progress"] == {"done": 2, "total": 2}
    r = await c.get("/workflow-runs", params={"status": "cancelled"})
    assert [x["run_id"] for x in r.json()["items"]] == [run_id]
    assert_problem(await c.post(f"/workflow-runs/{run_id}/cancel"), 409, code="run_finished")
    assert_problem(await c.post("/workflow-runs/nope/cancel"), 404, code="run_not_found")
    assert_problem(await c.get("/workflow-runs/nope"), 404, code="run_not_found")


# -- no input stops a role (swarmlog issue 8) ----------------------------------------------

PIPES = "@|" * 999 + "@"


def doubling(stages: int, start: str = "@") -> str:
    """``[x,x]|[@,@]|...``: the JSON written doubles at each of ``stages`` stages."""
    return "|".join([f"[{start},{start}]"] + ["[@,@]"] * (stages - 1))


async def decided_quickly(c: Any, task_id: str) -> None:
    """A plain task submitted now is decided within a second (the command processor
    is not stuck on anything the workflows before sent it)."""
    t0 = asyncio.get_running_loop().time()
    r = await c.post("/tasks", json={"task_id": task_id, "type": "noop"})
    took = asyncio.get_running_loop().time() - t0
    assert r.status_code == 201, r.text
    assert r.json()["state"]["status"] == "queued" and took < 1.0, (took, r.json())


async def test_expression_attacks_are_refused_or_fail_their_step_and_tasks_are_still_decided(
    engine,
) -> None:
    swarm = engine
    c = swarm.client
    # 1. A thousand pipes in a condition: refused at definition, naming the field.
    r = await c.post(
        "/workflows", json={"id": "pipes", "name": "x", "steps": [step("a", when=PIPES)]}
    )
    problem = assert_problem(r, 422, code="expression_too_deep", field="steps[0].when")
    assert "1,000 levels deep; the limit is 40" in problem["detail"]
    r = await c.post(
        "/workflow-templates", json={"name": "pipes", "steps": [step("a", gate=PIPES)]}
    )
    assert_problem(r, 422, code="expression_too_deep", field="steps[0].gate")
    r = await c.post(
        "/workflows", json={"id": "long", "name": "x", "steps": [step("a", when="a" * 5000)]}
    )
    problem = assert_problem(r, 422, code="expression_too_long", field="steps[0].when")
    assert "expression is 5,000 characters; the limit is 2,000" in problem["detail"]
    # 2. Forty doublings: refused at definition too.
    r = await c.post(
        "/workflows",
        json={"id": "d40", "name": "x", "steps": [step("a", payload_from={"x": doubling(40)})]},
    )
    assert_problem(r, 422, code="expression_too_deep", field="steps[0].payload_from.x")
    assert await swarm.commands_on_log() == 0
    await decided_quickly(c, "after-definitions")

    # Twenty-two doublings, and a few of a large input: accepted, but each fails its step
    # at run time, with the size, and the run fails.
    blob = "b" * 100_000
    for wid, expr in (("d22", doubling(22)), ("dblob", doubling(4, "inputs.blob"))):
        r = await c.post(
            "/workflows",
            json={
                "id": wid,
                "name": wid,
                "steps": [step("a", payload_from={"x": expr}), step("b", depends_on=["a"])],
            },
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            f"/workflows/{wid}/execute", json={"run_id": f"run-{wid}", "inputs": {"blob": blob}}
        )
        assert r.status_code == 202, r.text
        run = await run_where(swarm, f"run-{wid}", "completed", "failed", "cancelled")
        assert (run["status"], run["failed_step"]) == ("failed", "a"), run
        assert "builds a value of more than 524,288 bytes" in run["error"], run["error"]
        by_id = {s["step_id"]: s for s in run["steps"]}
        assert (by_id["a"]["status"], by_id["b"]["status"]) == ("failed", "cancelled")
        await decided_quickly(c, f"after-{wid}")


async def _big(ctx: TaskContext) -> tuple[dict[str, Any], float]:
    return {"step": ctx.payload["n"], "data": "r" * 250_000}, 1.0


async def test_a_run_whose_final_results_add_up_past_one_record_completes(engine) -> None:
    swarm = engine
    c = swarm.client
    # Five final steps, each with a result near the 256 KiB bound: 1.25 MB together,
    # more than one Kafka record (1 MiB) could hold.
    steps = [step(f"s{i}", payload={"n": i}) for i in range(5)]
    r = await c.post("/workflows", json={"id": "big", "name": "big", "steps": steps})
    assert r.status_code == 201, r.text
    worker = Worker(
        swarm.base_url,
        agent_id="big-agent",
        name="big",
        capabilities={"wf": 1.0},
        handler=_big,
        max_concurrent_tasks=5,
        heartbeat_interval_s=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        r = await c.post("/workflows/big/execute", json={"run_id": "run-big"})
        assert r.status_code == 202, r.text
        run = await run_where(swarm, "run-big", "completed", "failed", "cancelled")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert run["status"] == "completed", run
    want = {f"s{i}": {"step": i, "data": "r" * 250_000} for i in range(5)}
    assert run["result"] == want
    assert {s["step_id"]: s["result"] for s in run["steps"]} == want
    listed = (await c.get("/workflow-runs", params={"workflow_id": "big"})).json()["items"]
    assert [x["result"] for x in listed] == [want]
    # The completion event names the final steps; it does not copy their results.
    async with aconnect_sse(
        c, "GET", "/events", params={"run_id": "run-big", "from": "beginning"}
    ) as es:
        events = [cloudevent(e) async for e in _until_completed(es.aiter_sse())]
    assert events[-1]["data"]["result_steps"] == [f"s{i}" for i in range(5)]
    assert events[-1]["data"].get("result") is None
    await decided_quickly(c, "after-big")


async def _until_completed(sse: Any, timeout_s: float = 15.0) -> Any:
    """The stream's messages up to the run's completion event (fail after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        async for e in sse:
            if not e.event.startswith("io.swarmlog."):
                continue
            yield e
            if e.event == "io.swarmlog.workflow_run.completed":
                return
