"""Unit tests of sdk/client.py's retries: a task report is resent with one Idempotency-Key,
on a capped, jittered exponential schedule, until a definite answer or its deadline;
every other call keeps retrying by count. The clock and sleep are fakes, so the schedule
is checked exactly and nothing waits."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from sdk import DeadlineExceeded, SwarmClient, SwarmConnectionError, SwarmError
from sdk.errors import is_revocation
from tests.unit.sdk_fakes import FakeTime

Step = Callable[[httpx.Request], httpx.Response]


def down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def status(code: int, *, retry_after: str | None = None, problem: str | None = None) -> Step:
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"retry-after": retry_after} if retry_after else {}
        if problem is None:
            return httpx.Response(code, json={"id": "t1", "version": 5}, headers=headers)
        body = {"status": code, "code": problem, "detail": problem, "title": "Conflict"}
        headers["content-type"] = "application/problem+json"
        return httpx.Response(code, json=body, headers=headers)

    return answer


class Scripted:
    """A transport answering request i with step i (the last step repeats)."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.steps[min(len(self.requests), len(self.steps)) - 1](request)

    def keys(self) -> set[str]:
        return {r.headers["Idempotency-Key"] for r in self.requests}


def client(script: Scripted, time: FakeTime) -> SwarmClient:
    return SwarmClient(
        "http://api.test",
        transport=httpx.MockTransport(script),
        clock=time.clock,
        sleep=time.sleep,
        rng=lambda: 0.5,  # every delay is 0.75 of its ceiling
    )


async def test_a_report_is_resent_with_one_key_through_outages_429_503_and_202() -> None:
    script = Scripted(
        down, down, status(503, retry_after="3"), status(202), status(429), status(200)
    )
    time = FakeTime()
    async with client(script, time) as c:
        result = await c.start_task("t1", "a1", idempotency_key="k-1", until=time.now + 600)
    assert result.status == 200 and result.idempotency_key == "k-1"
    assert len(script.requests) == 6 and script.keys() == {"k-1"}
    # 0.2 s doubling, times 0.75; the 503's Retry-After (3 s) wins over its 0.6 s.
    assert time.sleeps == pytest.approx([0.15, 0.3, 3.0, 1.2, 2.4])


async def test_a_long_outage_is_ridden_out_with_the_delay_capped() -> None:
    script = Scripted(*([down] * 40), status(200))
    time = FakeTime()
    async with client(script, time) as c:
        result = await c.complete_task("t1", "a1", {"n": 1}, idempotency_key="k", until=1e9)
    assert result.status == 200 and len(script.requests) == 41 and script.keys() == {"k"}
    assert max(time.sleeps) == pytest.approx(5.0 * 0.75)  # backoff_cap_s, jittered
    assert sum(time.sleeps) > 120  # minutes of outage, not 5 tries in 2 s


async def test_the_deadline_ends_the_retries_with_deadline_exceeded() -> None:
    script = Scripted(down)
    time = FakeTime()
    start = time.now
    async with client(script, time) as c:
        with pytest.raises(DeadlineExceeded) as caught:
            await c.fail_task("t1", "a1", "boom", idempotency_key="k", until=start + 20)
    assert time.now == pytest.approx(start + 20)  # the last wait is cut to the deadline
    assert isinstance(caught.value.last_error, SwarmConnectionError)
    assert not caught.value.pending and caught.value.code == "deadline_exceeded"
    assert len(script.requests) == len(time.sleeps) + 1 and script.keys() == {"k"}


async def test_a_command_still_pending_at_the_deadline_says_so() -> None:
    script = Scripted(status(202))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(DeadlineExceeded) as caught:
            await c.report_progress("t1", "a1", 0.5, idempotency_key="k", until=time.now + 10)
    assert caught.value.pending and caught.value.last_error is None


@pytest.mark.parametrize(
    ("code", "problem"),
    [(409, "task_finished"), (403, "not_assigned_agent"), (409, "task_not_assigned")],
)
async def test_an_answer_that_makes_the_report_moot_is_definite(code: int, problem: str) -> None:
    script = Scripted(down, status(code, problem=problem))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmError) as caught:
            await c.start_task("t1", "a1", until=time.now + 600)
    assert len(script.requests) == 2 and is_revocation(caught.value)


async def test_a_validation_error_is_not_retried() -> None:
    script = Scripted(status(422, problem="validation_error"))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmError) as caught:
            await c.complete_task("t1", "a1", {}, until=time.now + 600)
    assert caught.value.status == 422 and len(script.requests) == 1 and time.sleeps == []


async def test_before_a_deadline_a_server_error_is_sent_again_with_the_same_key() -> None:
    script = Scripted(status(500, problem="internal_error"), status(200))
    time = FakeTime()
    async with client(script, time) as c:
        result = await c.complete_task("t1", "a1", {}, idempotency_key="k-5", until=time.now + 60)
    assert result.status == 200 and len(script.requests) == 2 and script.keys() == {"k-5"}


async def test_before_a_deadline_a_server_error_that_keeps_coming_is_raised() -> None:
    script = Scripted(status(500, problem="internal_error"))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmError) as caught:
            await c.complete_task("t1", "a1", {}, until=time.now + 600)
    assert caught.value.status == 500 and len(script.requests) == 6  # 1 + 5 resends


async def test_without_a_deadline_a_server_error_is_raised_at_once() -> None:
    script = Scripted(status(500, problem="internal_error"), status(200))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmError) as caught:
            await c.complete_task("t1", "a1", {})
    assert caught.value.status == 500 and len(script.requests) == 1


async def test_without_a_deadline_a_call_still_retries_by_count() -> None:
    script = Scripted(down)
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmConnectionError, match="after 5 tries"):
            await c.start_task("t1", "a1")
    assert len(script.requests) == 5


async def test_without_a_deadline_a_202_is_asked_again_then_returned() -> None:
    script = Scripted(status(202))
    time = FakeTime()
    async with client(script, time) as c:
        result = await c.start_task("t1", "a1")
    assert result.pending and len(script.requests) == 3  # pending_resends=2


async def test_a_failure_can_be_made_conditional_on_the_task_version() -> None:
    script = Scripted(status(412, problem="version_mismatch"))
    time = FakeTime()
    async with client(script, time) as c:
        with pytest.raises(SwarmError) as caught:
            await c.fail_task("t1", "a1", "x", expected_version=7, until=time.now + 60)
    assert caught.value.status == 412 and len(script.requests) == 1
    assert script.requests[0].headers["If-Match"] == '"7"'
