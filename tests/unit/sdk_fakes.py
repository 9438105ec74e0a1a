"""Fakes for the SDK's unit tests: a clock whose sleeps only move it, and a stand-in for
the API's task routes served through ``httpx.MockTransport``.

The fake API decides start, progress, complete and fail the way the Task decider does
(``domain/task.py``) for one agent, replays the first answer to a repeated
Idempotency-Key (as the command processor does for a repeated command id), honours
If-Match, and lists tasks by agent and status. Tests inject faults with ``before``
(raise to drop a request undecided, or await to hold it) and ``lose_answer`` (decide,
then drop the answer): the cases the SDK's retries exist for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httpx

from sdk import SwarmClient

PROBLEM = "application/problem+json"


class FakeTime:
    """A monotonic clock (seconds) that only ``sleep`` moves; ``sleeps`` records each wait."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


class FakeApi:
    """The task routes of the API, in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []  # (task id, event, idempotency key)
        self.requests: list[httpx.Request] = []
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self.before: Callable[[httpx.Request], Awaitable[None]] | None = None
        self.lose_answer: Callable[[httpx.Request], bool] = lambda request: False

    def add_task(self, task_id: str, agent_id: str, status: str, attempts: int = 1) -> None:
        """A task held by ``agent_id`` (``assigned`` or ``running``), at version 3 + attempts."""
        self.tasks[task_id] = {
            "task_id": task_id,
            "type": "echo",
            "payload": {"n": 1},
            "status": status,
            "agent_id": agent_id,
            "attempts": attempts,
            "lease_timeout_s": 30.0,
            "run_timeout_s": 600.0,
            "version": 3 + attempts,
        }

    def client(self, time: FakeTime, **options: Any) -> SwarmClient:
        """A SwarmClient on this fake, its clock and sleep ``time``'s, jitter draw 0.5."""
        return SwarmClient(
            "http://api.test",
            transport=httpx.MockTransport(self.handle),
            clock=time.clock,
            sleep=time.sleep,
            rng=lambda: 0.5,
            **options,
        )

    def posts(self, verb: str, task_id: str | None = None) -> list[httpx.Request]:
        """The POST requests of one verb (``start`` ...) that reached the fake."""
        return [
            r
            for r in self.requests
            if r.method == "POST"
            and r.url.path.endswith(f"/{verb}")
            and (task_id is None or r.url.path.split("/")[2] == task_id)
        ]

    def decided(self, event: str, task_id: str) -> list[str]:
        """The idempotency keys of the decided ``event`` s of ``task_id``."""
        return [key for t, e, key in self.events if t == task_id and e == event]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before is not None:
            await self.before(request)
        response = self._route(request)
        if self.lose_answer(request):
            raise httpx.ReadError("the connection broke before the answer", request=request)
        return response

    def _route(self, request: httpx.Request) -> httpx.Response:
        parts = [unquote(p) for p in request.url.path.strip("/").split("/")]
        if request.method == "GET" and parts == ["tasks"]:
            agent, status = request.url.params.get("agent_id"), request.url.params.get("status")
            items = [
                dict(t)
                for t in self.tasks.values()
                if (agent is None or t["agent_id"] == agent)
                and (status is None or t["status"] == status)
            ]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        if request.method == "GET" and len(parts) == 2 and parts[0] == "tasks":
            task = self.tasks.get(parts[1])
            if task is None:
                return _problem(404, "task_not_found")
            return httpx.Response(200, json=dict(task))
        if request.method == "POST" and len(parts) == 3 and parts[0] == "tasks":
            key = request.headers["Idempotency-Key"]
            if key in self.answers:
                status, body = self.answers[key]
            else:
                status, body = self._decide(parts[1], parts[2], request, key)
                self.answers[key] = (status, body)
            if status >= 400:
                return httpx.Response(status, json=body, headers={"content-type": PROBLEM})
            return httpx.Response(status, json=body)
        return _problem(404, "not_found")

    def _decide(
        self, task_id: str, verb: str, request: httpx.Request, key: str
    ) -> tuple[int, dict[str, Any]]:
        task = self.tasks.get(task_id)
        if task is None:
            return 404, _body(404, "task_not_found")
        body = json.loads(request.content or b"{}")
        if_match = request.headers.get("If-Match")
        if if_match is not None and int(if_match.strip('"')) != task["version"]:
            return 412, _body(412, "version_mismatch")
        if task["status"] not in ("assigned", "running"):
            return 409, _body(409, "task_finished")
        if body.get("agent_id") != task["agent_id"]:
            return 403, _body(403, "not_assigned_agent")
        if verb == "start":
            if task["status"] != "assigned":
                return 409, _body(409, "task_not_assigned")
            task["status"] = "running"
        elif verb in ("progress", "complete"):
            if task["status"] != "running":
                return 409, _body(409, "task_not_running")
            if verb == "complete":
                task["status"] = "completed"
        elif verb == "fail":
            task["status"] = "queued" if body.get("retryable") else "failed"
            task["agent_id"] = None
        task["version"] += 1
        self.events.append((task_id, verb, key))
        return 200, {"id": task_id, "version": task["version"], "events": []}


def _body(status: int, code: str) -> dict[str, Any]:
    return {"type": f"urn:swarmlog:problem:{code}", "title": code, "status": status,
            "detail": code, "code": code, "field": None}  # fmt: skip


def _problem(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json=_body(status, code), headers={"content-type": PROBLEM})
