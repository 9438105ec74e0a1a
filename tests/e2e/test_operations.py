"""Health, readiness, metrics, docs, and reading your own writes."""

from __future__ import annotations

import httpx
import pytest

from api.app import create_app
from tests.e2e.support import assert_problem, register

pytestmark = pytest.mark.e2e


async def test_health_ready_and_docs_answer(swarm) -> None:
    c = swarm.client
    r = await c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await c.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "checks": {"kafka": "ok", "postgres": "ok", "redis": "ok", "outcomes": "ok"},
        "failed": [],
    }
    r = await c.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    spec = (await c.get("/openapi.json")).json()
    assert {
        "/agents",
        "/tasks",
        "/tasks:batch",
        "/events",
        "/agents/{agent_id}/assignments",
        "/aggregates/{aggregate_type}/{aggregate_id}/events",
        "/commands/{command_id}",
        "/ready",
        "/metrics",
    } <= set(spec["paths"])


async def test_ready_is_503_naming_the_dependency_that_does_not_answer(swarm) -> None:
    # The same deployment, but Redis is said to be where nothing listens.
    settings = swarm.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            r = await c.get("/ready")
            assert (await c.get("/health")).status_code == 200
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unavailable" and body["failed"] == ["redis"]
    assert body["checks"]["kafka"] == body["checks"]["postgres"] == "ok"


async def test_metrics_count_requests_and_commands(swarm) -> None:
    c = swarm.client
    await register(c, "counted", start=True)
    await c.post("/agents/counted/start")  # rejected: already running
    text = (await c.get("/metrics")).text
    assert 'swarmlog_http_requests_total{method="POST",route="/agents",status="201"} 1.0' in text
    assert (
        'swarmlog_http_requests_total{method="POST",route="/agents/{agent_id}/start",'
        'status="409"} 1.0'
    ) in text
    assert 'swarmlog_commands_total{command="RegisterAgent",outcome="accepted"} 1.0' in text
    assert 'swarmlog_commands_total{command="StartAgent",outcome="rejected"} 1.0' in text
    assert "swarmlog_http_request_duration_seconds_bucket" in text


async def test_a_read_waits_for_its_write_or_says_it_is_stale(swarm) -> None:
    c = swarm.client
    [registered] = await register(c, "rw")
    [event] = registered["events"]
    r = await c.get("/agents/rw", params={"after": event["position"]})
    assert r.status_code == 200 and "x-read-model-stale" not in r.headers

    never = f"{event['topic']}:{event['partition']}:{event['offset'] + 1000}"
    r = await c.get("/agents/rw", params={"after": never})
    assert r.status_code == 200
    assert r.headers["x-read-model-stale"] == "true"
    r = await c.get("/agents/nobody", params={"after": never})
    assert_problem(r, 404, code="agent_not_found")
    assert r.headers["x-read-model-stale"] == "true"

    assert_problem(await c.get("/agents", params={"after": "no-offset"}), 422, field="after")


async def test_unknown_things_are_404_problems(swarm) -> None:
    c = swarm.client
    assert_problem(
        await c.get("/aggregates/spaceship/x/events"), 404, code="unknown_aggregate_type"
    )
    assert_problem(await c.get("/no/such/route"), 404)
    assert_problem(await c.get("/commands/never-sent"), 404, code="outcome_not_found")
    r = await c.get("/aggregates/agent/nobody/events")
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
