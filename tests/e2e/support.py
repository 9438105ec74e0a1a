"""Helpers for the end-to-end tests: they speak HTTP only, as a client would."""

from __future__ import annotations

from typing import Any

import httpx

PROBLEM_JSON = "application/problem+json"


def positions(*bodies: dict[str, Any]) -> list[str]:
    """The ``?after=`` marks of every event in command responses."""
    return [e["position"] for body in bodies for e in body["events"] if e.get("position")]


def latest_positions(items: list[dict[str, Any]]) -> list[str]:
    """The highest position per (topic, partition) among the events of batch items."""
    best: dict[tuple[str, int], int] = {}
    for item in items:
        for e in item["events"]:
            key = (e["topic"], e["partition"])
            best[key] = max(best.get(key, -1), e["offset"])
    return [f"{t}:{p}:{o}" for (t, p), o in sorted(best.items())]


def assert_problem(
    r: httpx.Response, status: int, *, code: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """Assert ``r`` is an RFC 9457 problem with this status (and code, field); return it."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    for key in ("type", "title", "status", "detail", "code", "field"):
        assert key in body, f"problem without {key}: {body}"
    assert body["status"] == status
    if code is not None:
        assert body["code"] == code, body
    if field is not None:
        named = {body["field"], *(e["field"] for e in body.get("errors", ()))}
        assert field in named, f"{field!r} not named in {body}"
    return body


async def register(
    client: httpx.AsyncClient,
    agent_id: str,
    *,
    capabilities: dict[str, float] | None = None,
    start: bool = False,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Register (and optionally start) an agent; returns the command response bodies."""
    r = await client.post(
        "/agents",
        json={
            "agent_id": agent_id,
            "name": f"agent {agent_id}",
            "capabilities": [{"name": n, "level": v} for n, v in (capabilities or {}).items()],
            **extra,
        },
    )
    assert r.status_code == 201, r.text
    bodies = [r.json()]
    if start:
        r = await client.post(f"/agents/{agent_id}/start")
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    return bodies


async def history(
    client: httpx.AsyncClient,
    aggregate_type: str,
    aggregate_id: str,
    after: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every archived event of one aggregate (all pages), as CloudEvents."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100, "after": after or []}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(f"/aggregates/{aggregate_type}/{aggregate_id}/events", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items
