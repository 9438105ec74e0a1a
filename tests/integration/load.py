"""A steady trickle of commands through the API, sent as a real client sends them: an
Idempotency-Key per task, and the same request again after a connection error, a
timeout or a 5xx, until the API answers 201 or 202 (the command is then on the log)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import httpx

from domain.task import TaskSubmitted
from infra.topics import Topics
from tests.integration.helpers import assert_log_is_clean, read_events, read_outcomes, wait_until


async def is_ready(http: httpx.AsyncClient) -> bool:
    """Whether ``GET /ready`` answers 200 within 5 s (False on any HTTP error)."""
    try:
        return (await http.get("/ready", timeout=5)).status_code == 200
    except httpx.HTTPError:
        return False


async def follow_sse(base_url: str, lines: list[str], prefix: str = "id:") -> None:
    """Hold a live SSE stream of every event (``GET /events``) open until the server ends
    it, keeping its lines that start with ``prefix``."""
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(5, read=None)) as http,
        http.stream("GET", "/events") as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith(prefix):
                lines.append(line)


@dataclass
class Trickle:
    """Clients submitting tasks named ``<name>-<worker>-<n>`` through the API at ``http``;
    ``accepted`` holds every task the API answered 201 or 202 for, ``unexpected`` every
    4xx (none is expected)."""

    http: httpx.AsyncClient
    name: str
    accepted: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    retries: int = 0

    async def run(self, stop: asyncio.Event, workers: int = 3, pause_s: float = 0.2) -> None:
        """Submit until ``stop`` is set, ``workers`` clients each pausing ``pause_s`` s
        between tasks; a request in hand is retried to an answer even after ``stop``."""
        await asyncio.gather(*(self._worker(k, stop, pause_s) for k in range(workers)))

    async def _worker(self, k: int, stop: asyncio.Event, pause_s: float) -> None:
        i = 0
        while not stop.is_set():
            task_id = f"{self.name}-{k}-{i}"
            i += 1
            while True:  # a real client retries until it gets an answer
                try:
                    r = await self.http.post(
                        "/tasks",
                        json={"task_id": task_id, "type": "lint", "payload": {"n": i}},
                        headers={"Idempotency-Key": task_id},
                    )
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code in (201, 202):
                    self.accepted.append(task_id)
                    break
                if r is not None and r.status_code < 500:
                    self.unexpected.append(f"{task_id}: {r.status_code} {r.text[:200]}")
                    break
                self.retries += 1
                await asyncio.sleep(0.3)
            await asyncio.sleep(pause_s)

    async def check_projected(self, timeout_s: float = 60.0) -> None:
        """Wait until the read models show every accepted task (GET /tasks/{id} is 200)."""
        assert not self.unexpected, self.unexpected[:5]
        pending = list(self.accepted)

        async def projected() -> bool:
            for task_id in list(pending):
                if (await self.http.get(f"/tasks/{task_id}")).status_code != 200:
                    return False
                pending.remove(task_id)
            return True

        await wait_until(projected, timeout_s, interval=0.5, what=f"tasks projected: {pending[:5]}")

    async def check_log(self, bootstrap: str, topics: Topics) -> None:
        """The log holds every accepted task once (one TaskSubmitted each, none else of
        this trickle), every command id has one first outcome, and the log is clean."""
        events = await read_events(bootstrap, topics)
        assert_log_is_clean(events)
        submitted = Counter(
            e.aggregate_id
            for e in events
            if isinstance(e.event, TaskSubmitted) and e.aggregate_id.startswith(f"{self.name}-")
        )
        assert set(submitted) == set(self.accepted)
        assert all(n == 1 for n in submitted.values()), submitted.most_common(3)
        outcomes = await read_outcomes(bootstrap, topics)
        firsts = Counter(o.command_id for o in outcomes if not o.duplicate)
        assert all(n == 1 for n in firsts.values()), firsts.most_common(3)
