"""The SDK worker against the real API: it runs assigned work end to end, takes the task
from the assignment itself, and hands back what a dead process of its agent left running.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from sdk import TaskContext, Worker
from tests.e2e.support import history, register

pytestmark = pytest.mark.e2e


async def _echo(ctx: TaskContext) -> tuple[dict[str, Any], float]:
    await ctx.progress(0.5, "halfway")
    return {"echo": ctx.payload, "attempt": ctx.attempt}, 0.9


@contextlib.asynccontextmanager
async def running(worker: Worker):  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_worker_runs_its_assignments_to_completion_with_their_payloads(swarm) -> None:
    c = swarm.client
    worker = Worker(
        swarm.base_url,
        agent_id="w1",
        name="echo",
        capabilities={"echo": 1.0},
        handler=_echo,
        max_concurrent_tasks=2,
        heartbeat_interval_s=1.0,
    )
    async with running(worker):
        ids = [f"job-{i}" for i in range(5)]
        for i, task_id in enumerate(ids):
            r = await c.post(
                "/tasks",
                json={
                    "task_id": task_id,
                    "type": "echo",
                    "payload": {"n": i},
                    "required_capabilities": ["echo"],
                },
            )
            assert r.status_code == 201, r.text

        async def all_done() -> list[dict[str, Any]] | None:
            tasks = [(await c.get(f"/tasks/{t}")).json() for t in ids]
            return tasks if all(t.get("status") == "completed" for t in tasks) else None

        tasks = await swarm.eventually(all_done, what="the worker to complete every task")
    assert [t["result"] for t in tasks] == [{"echo": {"n": i}, "attempt": 1} for i in range(5)]
    assert all(t["agent_id"] == "w1" and t["quality"] == 0.9 for t in tasks)
    # The assignment carried the payload the worker ran with.
    events = await history(c, "task", "job-3")
    assigned = [e for e in events if e["type"] == "io.swarmlog.task.assigned"]
    assert assigned[0]["data"]["payload"] == {"n": 3} and assigned[0]["data"]["type"] == "echo"


async def test_a_restarted_worker_hands_back_work_its_dead_process_left_running(swarm) -> None:
    c = swarm.client
    await register(c, "w2", capabilities={"echo": 1.0}, start=True)
    r = await c.post(
        "/tasks",
        json={
            "task_id": "orphan",
            "type": "echo",
            "payload": {"n": 7},
            "required_capabilities": ["echo"],
        },
    )
    assert r.status_code == 201, r.text

    async def assigned() -> bool:
        return (await c.get("/tasks/orphan")).json().get("status") == "assigned"

    await swarm.eventually(assigned, what="the task to be assigned to w2")
    # The agent's previous process started the task, then died without a word.
    r = await c.post("/tasks/orphan/start", json={"agent_id": "w2"})
    assert r.status_code == 200, r.text
    await c.post("/agents/w2/heartbeat")

    worker = Worker(
        swarm.base_url,
        agent_id="w2",
        name="echo",
        capabilities={"echo": 1.0},
        handler=_echo,
        heartbeat_interval_s=1.0,
    )
    async with running(worker):

        async def completed() -> dict[str, Any] | None:
            task = (await c.get("/tasks/orphan")).json()
            return task if task.get("status") == "completed" else None

        task = await swarm.eventually(completed, what="the orphan to be retried and completed")
    assert task["attempts"] == 2
    assert task["result"] == {"echo": {"n": 7}, "attempt": 2}
    types = [e["type"] for e in await history(c, "task", "orphan")]
    assert "io.swarmlog.task.failed" in types and "io.swarmlog.task.retry_scheduled" in types
