"""The SDK worker against the real API: it runs assigned work end to end, takes the task
from the assignment itself, and hands back what a dead process of its agent left running;
its reports land exactly once when the API process is killed (SIGKILL) after deciding
one and stays away longer than 8 s; an agent process killed mid-task has the task handed
back by its next process at once, not after the run timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain import task as tk
from domain.recorded import RecordedEvent
from infra.stack import StackInfo
from infra.supervise import Children
from sdk import SwarmClient, TaskContext, Worker
from tests.e2e.support import history, register
from tests.integration.helpers import (
    ROOT,
    RoleProcess,
    assert_log_is_clean,
    read_events,
    role_env,
)

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


# -- faults: the API killed mid-report, an agent killed mid-task ---------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _ready(base_url: str, api: RoleProcess, timeout_s: float = 60.0) -> None:
    """Wait until the API process answers ``GET /ready`` with 200."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as http:
        while time.monotonic() < deadline:
            assert api.alive(), f"the API process exited:\n{api.output()}"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise AssertionError(f"the API at {base_url} was not ready in {timeout_s} s:\n{api.output()}")


class DiesAfterDeciding(httpx.AsyncBaseTransport):
    """The network, except that the first ``POST /tasks/{id}/<step>`` reaches the API and is
    decided, and then the API process is killed (SIGKILL) before its answer is read: the
    agent sees a broken connection, as when the API dies while answering."""

    def __init__(self, step: str, api: RoleProcess) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.step = step
        self.api = api
        self.killed_at: float | None = None
        self.decided_status: int | None = None
        self.sent: list[str] = []  # the Idempotency-Key of every try of the step

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        is_step = (
            request.method == "POST"
            and path.startswith("/tasks/")
            and path.endswith(f"/{self.step}")
        )
        if is_step:
            self.sent.append(request.headers["Idempotency-Key"])
        response = await self.inner.handle_async_request(request)
        if is_step and self.killed_at is None:
            await response.aread()
            self.decided_status = response.status_code
            await response.aclose()
            self.api.kill9()
            self.killed_at = time.monotonic()
            raise httpx.ReadError("the API died before answering", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _of(events: list[RecordedEvent], task_id: str, cls: type) -> list[RecordedEvent]:
    return [e for e in events if e.aggregate_id == task_id and isinstance(e.event, cls)]


@pytest.mark.parametrize("step", ["start", "complete"])
async def test_a_report_the_api_decided_then_died_on_lands_exactly_once_when_it_returns(
    swarm: Any, services: StackInfo, tmp_path: Path, step: str
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = role_env(services, swarm.settings.topic_prefix, SWARMLOG_API_PORT=str(port))
    api = RoleProcess("api", env, tmp_path / "api-1.log")
    restarted: RoleProcess | None = None
    transport = DiesAfterDeciding(step, api)
    client = SwarmClient(url, transport=transport)
    try:
        await _ready(url, api)
        worker = Worker(
            url,
            agent_id="k1",
            name="echo",
            capabilities={"echo": 1.0},
            handler=_echo,
            heartbeat_interval_s=1.0,
            client=client,
        )
        async with running(worker):
            r = await swarm.client.post(
                "/tasks",
                json={"task_id": "kill", "type": "echo", "payload": {"n": 1},
                      "required_capabilities": ["echo"]},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            await swarm.eventually(lambda: _true(transport.killed_at), what=f"the {step}")
            assert transport.decided_status == 200  # decided; the agent never heard
            await asyncio.sleep(9.0)  # longer than the old 5 tries in about 2 s
            assert transport.killed_at is not None
            restarted = RoleProcess("api", env, tmp_path / "api-2.log")
            assert time.monotonic() - transport.killed_at > 8.0
            await _ready(url, restarted)

            async def completed() -> dict[str, Any] | None:
                task = (await swarm.client.get("/tasks/kill")).json()
                return task if task.get("status") == "completed" else None

            task = await swarm.eventually(completed, what="the task to complete", timeout_s=60)
            # ... and the worker has its answer (for a complete, the replay of the first).
            await swarm.eventually(
                lambda: _true(None if worker.in_flight else True),
                what="the worker to hear the outcome",
                timeout_s=30,
            )
        assert task["attempts"] == 1 and task["result"] == {"echo": {"n": 1}, "attempt": 1}
        # The worker kept resending the step with its one key through the outage.
        assert len(transport.sent) >= 2 and len(set(transport.sent)) == 1
        events = await read_events(swarm.bootstrap, swarm.topics)
        assert_log_is_clean(events)
        assert len(_of(events, "kill", tk.TaskStarted)) == 1
        assert len(_of(events, "kill", tk.TaskCompleted)) == 1
        assert _of(events, "kill", tk.TaskFailed) == []
    finally:
        await client.aclose()
        for process in (api, restarted):
            if process is not None:
                process.kill9()


async def _true(value: object) -> bool:
    return value is not None


async def test_an_agent_killed_mid_task_has_it_handed_back_by_its_next_process(
    swarm: Any, tmp_path: Path
) -> None:
    c = swarm.client
    children = Children(log_dir=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    children.start("agent-1", [sys.executable, "-m", "tests.e2e.sdk_agent", swarm.base_url, "k2"],
                   env, cwd=ROOT)  # fmt: skip
    try:
        r = await c.post(
            "/tasks",
            json={"task_id": "held", "type": "echo", "payload": {"n": 2},
                  "required_capabilities": ["echo"], "run_timeout_s": 300},
        )  # fmt: skip
        assert r.status_code == 201, r.text

        async def working() -> bool:
            task = (await c.get("/tasks/held")).json()
            return task.get("status") == "running" and task.get("progress") == 0.1

        await swarm.eventually(working, what="the first process to work on the task")
    finally:
        if "agent-1" in children.procs:
            children.kill("agent-1")  # SIGKILL: no fail, no stop, not a word
    assert (await c.get("/tasks/held")).json()["status"] == "running"

    worker = Worker(
        swarm.base_url,
        agent_id="k2",
        name="echo",
        capabilities={"echo": 1.0},
        handler=_echo,
        heartbeat_interval_s=1.0,
    )
    began = time.monotonic()
    async with running(worker):

        async def completed() -> dict[str, Any] | None:
            task = (await c.get("/tasks/held")).json()
            return task if task.get("status") == "completed" else None

        task = await swarm.eventually(completed, what="the task to be handed back and rerun")
    took = time.monotonic() - began
    assert took < 30.0  # well before the 300 s run timeout
    assert task["attempts"] == 2 and task["result"] == {"echo": {"n": 2}, "attempt": 2}
    events = await read_events(swarm.bootstrap, swarm.topics)
    assert_log_is_clean(events)
    (failed,) = _of(events, "held", tk.TaskFailed)
    assert failed.event.retryable and "agent k2 restarted or reconnected" in failed.event.error
    assert len(_of(events, "held", tk.TaskStarted)) == 2  # one per attempt
    assert len(_of(events, "held", tk.TaskCompleted)) == 1
    assert _of(events, "held", tk.TaskTimedOut) == []


class ListsLate(httpx.AsyncBaseTransport):
    """The network, except that the first ``GET /tasks?status=running`` (the worker's first
    reconciliation) is held until ``ready()`` says so, then sent: it reads the read model
    as it is *after* what happened meanwhile. ``listed`` is set once the reconciliation's
    second listing (``status=assigned``) has been answered."""

    def __init__(self, ready: Callable[[], Awaitable[bool]]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.ready = ready
        self.held = False
        self.listed = asyncio.Event()
        self.fails: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        listing = request.method == "GET" and request.url.path == "/tasks"
        status = request.url.params.get("status")
        if listing and status == "running" and not self.held:
            self.held = True
            for _ in range(300):
                if await self.ready():
                    break
                await asyncio.sleep(0.1)
        if request.method == "POST" and request.url.path.endswith("/fail"):
            self.fails.append(request.url.path)
        response = await self.inner.handle_async_request(request)
        if listing and status == "assigned" and self.held:
            self.listed.set()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_reconciliation_listing_a_task_this_process_just_started_keeps_it(
    swarm: Any,
) -> None:
    """The race of the old orphan check (snapshot, then list): the worker's first
    reconciliation lists ``running`` only once the task it was offered meanwhile (by the
    stream) is running, so the listing names a task this process runs; it must keep it."""
    c = swarm.client
    submitted = asyncio.Event()

    async def running_in_read_model() -> bool:
        if not submitted.is_set():
            return False
        return bool((await c.get("/tasks/race")).json().get("status") == "running")

    transport = ListsLate(running_in_read_model)

    async def slow(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        await asyncio.wait_for(transport.listed.wait(), 40)
        await asyncio.sleep(1.0)  # past the hand-back decision, which follows the listing
        return {"attempt": ctx.attempt}, 1.0

    client = SwarmClient(swarm.base_url, transport=transport)
    worker = Worker(
        swarm.base_url,
        agent_id="k3",
        name="echo",
        capabilities={"echo": 1.0},
        handler=slow,
        heartbeat_interval_s=1.0,
        client=client,
    )
    try:
        async with running(worker):
            await swarm.eventually(
                lambda: _true(worker.last_event_id or (transport.held or None)),
                what="the worker's first reconciliation",
            )
            r = await c.post(
                "/tasks",
                json={"task_id": "race", "type": "echo", "required_capabilities": ["echo"]},
            )
            assert r.status_code == 201, r.text
            submitted.set()

            async def completed() -> dict[str, Any] | None:
                task = (await c.get("/tasks/race")).json()
                return task if task.get("status") == "completed" else None

            task = await swarm.eventually(completed, what="the task to complete", timeout_s=60)
    finally:
        await client.aclose()
    assert transport.listed.is_set() and transport.fails == []
    assert task["attempts"] == 1 and task["result"] == {"attempt": 1}
    events = await read_events(swarm.bootstrap, swarm.topics)
    assert _of(events, "race", tk.TaskFailed) == []
    assert len(_of(events, "race", tk.TaskStarted)) == 1
