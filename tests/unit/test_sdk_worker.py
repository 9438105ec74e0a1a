"""Unit tests of sdk/worker.py: handler results and failure texts; and, against a fake of
the API's task routes (tests/unit/sdk_fakes.py), reports that survive outages and lost
answers exactly once, and the reconciliation that hands back what this process does not
run, race-free with its own starts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from sdk import Assignment, NonRetryableError, TaskContext, Worker
from sdk.worker import (
    MAX_ERROR_CHARS,
    PROGRESS_RETRY_S,
    error_text,
    normalize_result,
    task_timeouts,
)
from tests.unit.sdk_fakes import FakeApi, FakeTime


def test_a_result_and_quality_pair_is_taken_as_it_is() -> None:
    assert normalize_result(({"n": 1}, 0.75)) == ({"n": 1}, 0.75)
    assert normalize_result([{"n": 1}, 1]) == ({"n": 1}, 1.0)


def test_a_bare_dict_means_full_quality() -> None:
    assert normalize_result({"n": 1}) == ({"n": 1}, 1.0)


@pytest.mark.parametrize(
    "value", [None, 42, ({"n": 1},), ("text", 0.5), ({"n": 1}, "high"), ({"n": 1}, True)]
)
def test_other_shapes_are_type_errors(value: object) -> None:
    with pytest.raises(TypeError):
        normalize_result(value)


@pytest.mark.parametrize("quality", [-0.1, 1.01, float("nan")])
def test_a_quality_outside_zero_to_one_is_a_value_error(quality: float) -> None:
    with pytest.raises(ValueError):
        normalize_result(({}, quality))


def test_failure_texts_name_the_exception_and_are_bounded() -> None:
    assert error_text(KeyError("path")) == "KeyError: 'path'"
    assert error_text(NonRetryableError()) == "NonRetryableError"
    assert len(error_text(RuntimeError("x" * 20_000))) == MAX_ERROR_CHARS


def test_a_task_items_timeouts_bound_its_reports_else_the_defaults_do() -> None:
    assert task_timeouts({"lease_timeout_s": 5, "run_timeout_s": 90.5}) == (5.0, 90.5)
    assert task_timeouts({"type": "echo"}) == (30.0, 600.0)  # a stream assignment
    assert task_timeouts({"run_timeout_s": -1}, default_run_s=7.0) == (30.0, 7.0)
    assert task_timeouts(None, default_lease_s=1.0) == (1.0, 600.0)


def test_a_worker_refuses_a_nonsense_configuration() -> None:
    async def handler(ctx: object) -> tuple[dict[str, object], float]:
        return {}, 1.0

    common = dict(name="n", capabilities={"python": 1.0}, handler=handler)
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="a", max_concurrent_tasks=0, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="a", heartbeat_interval_s=0, **common)  # type: ignore[arg-type]


# -- reports and reconciliation, against tests/unit/sdk_fakes.FakeApi ---------------------


def worker_on(api: FakeApi, time: FakeTime, handler: Any, agent_id: str = "a1") -> Worker:
    return Worker(
        "http://api.test",
        agent_id=agent_id,
        name="n",
        capabilities={"echo": 1.0},
        handler=handler,
        client=api.client(time),
    )


def assignment(api: FakeApi, task_id: str) -> Assignment:
    item = api.tasks[task_id]
    return Assignment(task_id, item["agent_id"], item["attempts"], task=dict(item))


async def settle(worker: Worker) -> None:
    """Wait for every runner and background job of ``worker`` to finish."""
    for _ in range(1000):
        pending = [*worker._runners, *worker._background]
        if not pending:
            return
        await asyncio.wait(pending, timeout=5)
    raise AssertionError("the worker did not settle")


async def test_a_start_decided_while_the_api_died_is_recovered_and_the_task_runs_once() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "assigned")
    runs: list[int | None] = []
    outage = {"start": 1, "down": 12}

    async def before(request: httpx.Request) -> None:
        # After the first start is decided and its answer lost, the API is away for a
        # dozen tries (longer than the old 5 tries in 2 s).
        if outage["start"] == 0 and outage["down"] > 0:
            outage["down"] -= 1
            raise httpx.ConnectError("connection refused", request=request)

    def lose(request: httpx.Request) -> bool:
        if request.url.path.endswith("/start") and outage["start"]:
            outage["start"] = 0
            return True
        return False

    api.before, api.lose_answer = before, lose

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        runs.append(ctx.attempt)
        await ctx.progress(0.5, "halfway")
        return {"ok": True}, 1.0

    worker = worker_on(api, time, handler)
    assert worker.offer(assignment(api, "t1"))
    await settle(worker)
    assert runs == [1]
    assert api.tasks["t1"]["status"] == "completed"
    starts = api.posts("start", "t1")
    assert len(starts) == 14 and len({r.headers["Idempotency-Key"] for r in starts}) == 1
    assert len(api.decided("start", "t1")) == 1
    assert len(api.decided("progress", "t1")) == 1 and len(api.decided("complete", "t1")) == 1
    assert sum(time.sleeps) > 20


async def test_a_lost_progress_answer_is_not_recorded_twice() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "assigned")
    lost = {"progress": 2}

    def lose(request: httpx.Request) -> bool:
        if request.url.path.endswith("/progress") and lost["progress"]:
            lost["progress"] -= 1
            return True
        return False

    api.lose_answer = lose

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        await ctx.progress(0.3)
        await ctx.progress(0.6)
        return {}, 1.0

    worker = worker_on(api, time, handler)
    worker.offer(assignment(api, "t1"))
    await settle(worker)
    progress = api.posts("progress", "t1")
    assert len(progress) == 4  # the first report sent three times, the second once
    assert len(api.decided("progress", "t1")) == 2  # and each decided once
    assert api.tasks["t1"]["status"] == "completed"


async def test_progress_is_given_up_after_30_s_of_outage_and_the_work_goes_on() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "assigned")

    async def before(request: httpx.Request) -> None:
        if request.url.path.endswith("/progress"):
            raise httpx.ConnectError("connection refused", request=request)

    api.before = before
    waited: list[float] = []

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        started = time.now
        await ctx.progress(0.5)  # the API is away for progress: advisory, given up
        waited.append(time.now - started)
        return {}, 1.0

    worker = worker_on(api, time, handler)
    worker.offer(assignment(api, "t1"))
    await settle(worker)
    assert waited == [pytest.approx(PROGRESS_RETRY_S)]  # not the 600 s run timeout
    assert api.tasks["t1"]["status"] == "completed"


async def test_a_report_given_up_at_the_task_deadline_is_logged_not_raised() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "assigned")
    api.tasks["t1"]["run_timeout_s"] = 60.0

    async def before(request: httpx.Request) -> None:
        if request.url.path.endswith("/complete"):
            raise httpx.ConnectError("connection refused", request=request)

    api.before = before

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        return {}, 1.0

    worker = worker_on(api, time, handler)
    started = time.now
    worker.offer(assignment(api, "t1"))
    await settle(worker)
    assert time.now == pytest.approx(started + 60)  # the run timeout, then no more
    assert worker.in_flight == frozenset()


async def test_a_reconciliation_keeps_a_task_this_process_is_starting() -> None:
    """The race of the old orphan check: a reconciliation whose listing was sent before
    this process offered and started t1, and that comes back after the start was decided
    (so it lists t1 as running), must not hand t1 back."""
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "assigned")
    started, release = asyncio.Event(), asyncio.Event()

    async def before(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.params.get("status") == "running":
            await started.wait()  # the listing is read after our start was decided

    api.before = before

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        started.set()
        await release.wait()
        return {"ok": True}, 1.0

    worker = worker_on(api, time, handler)
    reconciling = asyncio.create_task(worker.reconcile())
    await asyncio.sleep(0)  # the listing is in flight
    assert worker.offer(assignment(api, "t1"))
    result = await asyncio.wait_for(reconciling, 5)
    assert result.kept == 1 and result.handed_back == 0
    assert api.posts("fail") == []
    release.set()
    await settle(worker)
    assert api.tasks["t1"]["status"] == "completed"


async def test_a_task_running_on_the_server_but_not_here_is_handed_back_at_once() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("dead", "a1", "running")  # the previous process of a1 died with it
    api.add_task("new", "a1", "assigned")
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        ran.append(ctx.task_id)
        return {}, 1.0

    worker = worker_on(api, time, handler)
    result = await worker.reconcile()
    await settle(worker)
    assert (result.handed_back, result.offered, result.kept) == (1, 1, 0)
    (fail,) = api.posts("fail", "dead")
    body = json.loads(fail.content)
    assert body["retryable"] is True
    assert "agent a1 restarted or reconnected and is not running this task" in body["error"]
    assert fail.headers["If-Match"] == '"4"'
    assert api.tasks["dead"]["status"] == "queued" and ran == ["new"]
    # An offer of the handed-back attempt arriving late (a replayed stream message) is
    # a repeat: the attempt is not started after being handed back.
    api.tasks["dead"].update(status="assigned", agent_id="a1")
    assert not worker.offer(assignment(api, "dead"))


async def test_a_hand_back_that_finds_the_task_moved_on_looks_again_before_deciding() -> None:
    api, time = FakeApi(), FakeTime()
    api.add_task("t1", "a1", "running")
    listed = dict(api.tasks["t1"])
    api.tasks["t1"]["version"] += 1  # a late progress report, after the listing

    async def handler(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        return {}, 1.0

    worker = worker_on(api, time, handler)
    assert await worker._hand_back(worker._client, listed) == "handed_back"  # type: ignore[arg-type]
    fails = api.posts("fail", "t1")
    assert [f.headers["If-Match"] for f in fails] == ['"4"', '"5"']
    assert len({f.headers["Idempotency-Key"] for f in fails}) == 2
    assert len(api.decided("fail", "t1")) == 1

    # The listing said attempt 1 runs; the server has moved on to attempt 2 meanwhile.
    api.add_task("t2", "a1", "running", attempts=1)
    stale = dict(api.tasks["t2"])
    api.add_task("t2", "a1", "assigned", attempts=2)
    assert await worker._hand_back(worker._client, stale) == "moot"  # type: ignore[arg-type]
    assert api.decided("fail", "t2") == [] and api.tasks["t2"]["status"] == "assigned"
